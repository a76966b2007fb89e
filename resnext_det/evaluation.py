# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""COCO evaluation with a compiled ``COCOeval``: pycocotools' numbers, about ten times sooner.

Detectron2's ``COCOEvaluator`` computes COCO AP with ``COCOeval_opt``, from its compiled
``detectron2._C``, where that loads, and otherwise with pycocotools' pure-Python ``COCOeval``,
which takes ~10x as long (a COCO val2017-sized bbox evaluation: docs/performance.md).
Detectron2 as tools/setup_env.sh installs it on Python 3.11 (the PyPI wheel's Python code)
has no ``_C``. :class:`FastCOCOEvaluator` is Detectron2's evaluator, same arguments and same
results, computing with the first of (:func:`coco_eval_backend`):

1. Detectron2's ``COCOeval_opt``, where its ``_C`` loads;
2. faster-coco-eval's ``COCOeval_faster`` (PyPI ``faster-coco-eval``, in requirements.txt: a
   maintained compiled port of pycocotools' ``COCOeval``) on Detectron2's pycocotools
   ``COCO`` objects (:func:`faster_cocoeval`);
3. pycocotools' ``COCOeval``, with one warning per process saying how to install 2.

One log line per evaluation names the one that ran. For bbox, segm and keypoints, every COCO
statistic and the per-category AP of 2. equal pycocotools' to 1e-6 (tests/test_coco_eval.py).
``use_fast_impl=False`` asks for pycocotools' official one, as it does of Detectron2's. Either
way Python's cyclic garbage collector is paused while COCOeval runs (:func:`gc_paused`).
"""
import contextlib
import functools
import gc
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import detectron2.evaluation.coco_evaluation as d2_coco_evaluation
from detectron2.evaluation import COCOEvaluator

__all__ = [
    "FastCOCOEvaluator",
    "COCOevalBackend",
    "coco_eval_backend",
    "faster_cocoeval",
    "gc_paused",
    "PYCOCOTOOLS",
    "INSTALL_HINT",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class COCOevalBackend:
    """A ``COCOeval`` implementation.

    Args:
        cls: builds the evaluation as pycocotools' class does: ``cls(coco_gt, coco_dt,
            iou_type)``, then ``params``, ``evaluate()``, ``accumulate()``, ``summarize()``,
            ``stats``, ``eval["precision"]``.
        name: what the log says.
        compiled: whether it is a compiled one (Detectron2's ``use_fast_impl`` path).
    """

    cls: Callable
    name: str
    compiled: bool


#: pycocotools' pure-Python ``COCOeval``: the reference, and the fallback.
PYCOCOTOOLS = COCOevalBackend(COCOeval, "pycocotools' COCOeval (pure Python)", compiled=False)

#: The warning, once per process, of an environment without a compiled COCOeval.
INSTALL_HINT = (
    "COCO evaluation uses pycocotools' pure-Python COCOeval: faster-coco-eval is not installed "
    "and Detectron2's compiled COCOeval_opt does not load. The compiled one gives the same numbers "
    "~10x sooner (a COCO val2017-sized bbox evaluation: 36.6 s -> 3.7 s; docs/performance.md): "
    ".venv/bin/pip install faster-coco-eval"
)


@functools.lru_cache(maxsize=None)
def coco_eval_backend() -> COCOevalBackend:
    """The fastest ``COCOeval`` of this environment (chosen once per process; the choice
    is cached, ``coco_eval_backend.cache_clear()`` chooses again): Detectron2's
    ``COCOeval_opt`` where ``detectron2._C`` loads, else faster-coco-eval's, else
    pycocotools' with :data:`INSTALL_HINT` logged (a warning)."""
    try:
        from detectron2.evaluation.fast_eval_api import COCOeval_opt  # needs detectron2._C
    except ImportError:
        pass
    else:
        return COCOevalBackend(COCOeval_opt, "Detectron2's COCOeval_opt (compiled)", compiled=True)
    try:
        import faster_coco_eval
    except ImportError:
        logger.warning(INSTALL_HINT)
        return PYCOCOTOOLS
    return COCOevalBackend(faster_cocoeval, f"faster-coco-eval {faster_coco_eval.__version__} (compiled)", True)


def faster_cocoeval(coco_gt: COCO, coco_dt: COCO, iou_type: str):
    """faster-coco-eval's ``COCOeval_faster`` on two pycocotools ``COCO`` objects, set up as
    ``pycocotools.cocoeval.COCOeval(coco_gt, coco_dt, iou_type)`` would be: a drop-in for
    Detectron2's ``cocoeval_fn``.

    faster-coco-eval reads its own ``COCO`` class: one is indexed over each object's dataset
    (the annotation dicts are shared, not copied; evaluation marks the ground truth's
    ``ignore`` in them, as pycocotools does). Its keypoint evaluation takes only the
    categories that have annotations, pycocotools' every category: they are set to
    pycocotools' so that ``eval["precision"]`` has a column per category, as Detectron2's
    per-category table reads it. It prints its progress and summary, as pycocotools does.
    """
    import faster_coco_eval  # optional: coco_eval_backend chooses this only where it imports

    def indexed(coco):
        return coco if isinstance(coco, faster_coco_eval.COCO) else faster_coco_eval.COCO(coco.dataset)

    ev = faster_coco_eval.COCOeval_faster(indexed(coco_gt), indexed(coco_dt), iou_type, print_function=print)
    ev.params.catIds = sorted(coco_gt.getCatIds())
    return ev


class FastCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` (same arguments, same results dict) computing with the
    fastest ``COCOeval`` there is (:func:`coco_eval_backend`); every evaluation logs which
    one ran. ``use_fast_impl=False`` computes with pycocotools, as in Detectron2.

    A ``max_dets_per_image`` other than 100 makes Detectron2 compute with pycocotools'
    ``COCOeval`` (its ``COCOevalMaxDets``) whatever is installed, and the log says so.
    """

    def __init__(self, dataset_name: str, tasks=None, distributed: bool = True, output_dir=None, *,
                 use_fast_impl: bool = True, **kwargs):  # fmt: skip
        self.backend = coco_eval_backend() if use_fast_impl else PYCOCOTOOLS
        # Without its _C, Detectron2 would log that it falls back to pycocotools: not asked to.
        super().__init__(dataset_name, tasks, distributed, output_dir, use_fast_impl=False, **kwargs)
        self._use_fast_impl = self.backend.compiled

    @property
    def evaluator_name(self) -> str:
        """The ``COCOeval`` that :meth:`evaluate` computes with, for the log."""
        if self._max_dets_per_image[2] != 100:
            n = self._max_dets_per_image[2]
            return f"{PYCOCOTOOLS.name} (Detectron2's COCOevalMaxDets for max_dets_per_image={n})"
        return self.backend.name

    def _eval_predictions(self, predictions, img_ids=None):
        if self._do_evaluation:
            logger.info("COCO evaluation of %s with %s", self._metadata.name, self.evaluator_name)
        with _detectron2_cocoeval_opt(self.backend.cls), gc_paused():
            super()._eval_predictions(predictions, img_ids=img_ids)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (back on after, errors
    included, if it was on). COCO evaluation makes and drops millions of small dicts and
    lists, which reference counting frees; but their allocations start full collections,
    and in a process that holds the predictions each walks all of them. On COCO val2017's
    size (bbox): faster-coco-eval 4.9 s -> 3.7 s (``tools/benchmark.py --what eval``),
    pycocotools 36.7 s -> 31.2 s."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_SWAP = threading.Lock()


@contextlib.contextmanager
def _detectron2_cocoeval_opt(cls: Callable) -> Iterator[None]:
    """Detectron2's ``COCOEvaluator._eval_predictions`` hands its module's ``COCOeval_opt``
    to ``_evaluate_predictions_on_coco`` (``cocoeval_fn``) and has no argument for another:
    that name is ``cls`` for the duration (restored after, errors included), so that its
    code runs unchanged (a copy of it would fork from it)."""
    with _SWAP:
        saved = d2_coco_evaluation.COCOeval_opt
        d2_coco_evaluation.COCOeval_opt = cls
        try:
            yield
        finally:
            d2_coco_evaluation.COCOeval_opt = saved
