# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Issue 24: COCO evaluation with a compiled COCOeval gives pycocotools' numbers.

The independent reference is pycocotools' own ``COCOeval`` (what Detectron2 computes with
when its ``_C`` does not load), run here on its own ``COCO`` objects. The data are
synthetic COCO sets (numpy, fixed seed, :func:`resnext_det.benchmark.coco_eval.synthetic_coco`,
the generator the benchmark times on); the first test checks that they hold the cases that
make COCO evaluation hard (crowd regions, empty images, images without detections, small /
medium / large objects, more detections than ``maxDets``). Then: every one of the 12 (10 for
keypoints) COCO statistics, the per-category AP and the whole precision and recall arrays
equal pycocotools' to 1e-6 for bbox, segm and keypoints; the project's evaluator, fed as
Detectron2's inference loop feeds it, gives the results dict of Detectron2's own
``COCOEvaluator`` with pycocotools and says in the log which COCOeval ran; without
faster-coco-eval it computes with pycocotools and says once how to install it.
"""
import contextlib
import copy
import gc
import glob
import io
import json
import logging
import math
import os
import subprocess
import sys
import types

import faster_coco_eval
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import detectron2.evaluation.coco_evaluation as d2_coco_evaluation
from detectron2.config import LazyConfig, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from resnext_det.benchmark.coco_eval import instances_for, register_synthetic_dataset, synthetic_coco
from resnext_det.data.robust import SkipAwareCOCOEvaluator
from resnext_det.engine.trainer import Trainer
from resnext_det.evaluation import INSTALL_HINT, PYCOCOTOOLS, FastCOCOEvaluator, coco_eval_backend, faster_cocoeval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark.py")
LOGGER = "resnext_det.evaluation"

#: Small sets: 40 images, ~300 objects, ~1,500 detections (a few images with 150+).
SMALL = dict(images=40, categories=12, dets_per_image=25.0, over_max_dets_fraction=0.1, crowd_fraction=0.05,
             empty_fraction=0.1, no_detection_fraction=0.1)  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_backend_choice():
    """Each test chooses the COCOeval anew (the choice is cached per process)."""
    coco_eval_backend.cache_clear()
    yield
    coco_eval_backend.cache_clear()


@pytest.fixture
def eval_log(caplog):
    """Records of resnext_det.evaluation, each once, whether or not an earlier test's
    Detectron2 ``setup_logger`` stopped the package logger's propagation."""
    log = logging.getLogger(LOGGER)
    old = log.level, log.propagate
    log.addHandler(caplog.handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield caplog
    log.setLevel(old[0])
    log.propagate = old[1]
    log.removeHandler(caplog.handler)


def run_cocoeval(cocoeval_cls, gt: dict, dets: list, iou_type: str, max_dets=None):
    """loadRes, evaluate, accumulate, summarize on a pycocotools COCO of its own, as
    Detectron2 does (segm: the boxes dropped, so that the mask area sets the size class)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    dets = copy.deepcopy(dets)
    if iou_type == "segm":
        for d in dets:
            d.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = cocoeval_cls(coco, coco.loadRes(dets), iou_type)
        if max_dets:
            ev.params.maxDets = max_dets
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def per_category_ap(ev) -> np.ndarray:
    """AP per category as Detectron2's per-category table computes it."""
    p = ev.eval["precision"][:, :, :, 0, -1]
    return np.array([np.mean(x[x > -1]) if (x > -1).any() else np.nan for x in np.moveaxis(p, 2, 0)])


def small_set(task: str, **kw):
    return synthetic_coco(**{**SMALL, **kw}, seed=7, masks=task == "segm", keypoints=task == "keypoints")


def test_synthetic_sets_hold_the_hard_cases():
    gt, dets = small_set("segm")
    anns = gt["annotations"]
    per_image = {img["id"]: 0 for img in gt["images"]}
    for d in dets:
        per_image[d["image_id"]] += 1
    gt_images = {a["image_id"] for a in anns}
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # uncompressed RLE
    assert all(isinstance(a["segmentation"], list) for a in anns if not a["iscrowd"])  # polygons
    assert all(isinstance(d["segmentation"]["counts"], str) for d in dets)  # compressed RLE, as Detectron2's
    assert any(i not in gt_images for i in per_image)  # images without objects
    assert any(n == 0 for i, n in per_image.items() if i in gt_images)  # objects, no detections
    per_image_class = {}
    for d in dets:
        key = (d["image_id"], d["category_id"])
        per_image_class[key] = per_image_class.get(key, 0) + 1
    assert max(per_image_class.values()) > 100  # more than maxDets (per image and class)
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    assert len({a["category_id"] for a in anns}) > 5 and 9 not in {c["id"] for c in gt["categories"]}  # id gaps
    kgt, _ = small_set("keypoints")
    assert any(a["num_keypoints"] == 0 for a in kgt["annotations"])  # ignored by COCO's keypoint AP


@pytest.mark.parametrize("task", ["bbox", "segm", "keypoints"])
def test_compiled_cocoeval_equals_pycocotools(task):
    gt, dets = small_set(task)
    if task == "keypoints":  # a category without annotations: pycocotools keeps its column
        gt["categories"].append({"id": 99, "name": "unlabelled", "supercategory": "thing"})
    ref = run_cocoeval(COCOeval, gt, dets, task)
    ours = run_cocoeval(faster_cocoeval, gt, dets, task)
    assert type(ours).__module__.startswith("faster_coco_eval")
    assert len(ref.stats) == (10 if task == "keypoints" else 12) == len(ours.stats)
    np.testing.assert_allclose(ours.stats, ref.stats, rtol=0, atol=1e-6)
    assert 0.02 < ref.stats[0] < 0.9  # a meaningful AP, not a degenerate 0 or 1
    assert ours.eval["precision"].shape == ref.eval["precision"].shape
    np.testing.assert_allclose(per_category_ap(ours), per_category_ap(ref), rtol=0, atol=1e-6)  # NaN == NaN
    np.testing.assert_allclose(ours.eval["precision"], ref.eval["precision"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.eval["recall"], ref.eval["recall"], rtol=0, atol=1e-6)


def test_max_dets_cut_off_matters_and_is_the_same():
    """Matches ranked past COCO's 100 detections per image exist in these sets (a wider
    maxDets finds more), and both evaluators cut at maxDets alike, 100 or another."""
    gt, dets = small_set("bbox")
    ref = run_cocoeval(COCOeval, gt, dets, "bbox")
    wide = run_cocoeval(COCOeval, gt, dets, "bbox", max_dets=[1, 10, 300])
    assert ref.stats[6] < ref.stats[7] < ref.stats[8]  # AR@1 < AR@10 < AR@100
    assert (wide.eval["recall"][..., -1] >= ref.eval["recall"][..., -1]).all()
    assert wide.eval["recall"][:, :, 0, -1].mean() > ref.eval["recall"][:, :, 0, -1].mean()  # AR@300 > AR@100
    ours = run_cocoeval(faster_cocoeval, gt, dets, "bbox", max_dets=[1, 10, 300])
    for k in ("precision", "recall"):
        np.testing.assert_allclose(ours.eval[k], wide.eval[k], rtol=0, atol=1e-6)


def _feed(evaluator, fed):
    """As inference_on_dataset: reset, process per image, evaluate. On copies: Detectron2's
    instances_to_coco_json shifts pred_keypoints by -0.5 px in place."""
    evaluator.reset()
    for inp, out in fed:
        evaluator.process([inp], [copy.deepcopy(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()


def _assert_same_results(ours: dict, ref: dict):
    assert set(ours) == set(ref)
    for task in ref:
        assert set(ours[task]) == set(ref[task]), task
        for k, v in ref[task].items():  # percent: 1e-4 is the 1e-6 of COCOeval's fractions
            assert ours[task][k] == pytest.approx(v, abs=1e-4, nan_ok=True), (task, k)


@pytest.fixture
def dataset(tmp_path):
    """Register a synthetic set (small images: the inference loop hands full-image masks)."""
    names = []

    def make(task, **kw):
        gt, dets = small_set(task, images=24, image_size=(96, 200), **kw)
        name = f"_test_coco_eval_{task}_{len(names)}"
        register_synthetic_dataset(name, gt, str(tmp_path))
        names.append(name)
        return name, gt, instances_for(gt, dets)

    yield make
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_trainer_evaluator_gives_detectron2_results_with_the_compiled_cocoeval(dataset, tmp_path, eval_log):
    """Trainer.build_evaluator (Trainer.test, --eval-only, Appendix B stage 4), fed as
    inference_on_dataset feeds it: bbox and segm results (per-category AP included) are
    Detectron2's COCOEvaluator's with pycocotools, and the log names faster-coco-eval."""
    name, gt, fed = dataset("segm")
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    ours = _feed(Trainer.build_evaluator(cfg, name), fed)
    assert d2_coco_evaluation.COCOeval_opt is COCOeval  # Detectron2's module as it was: no _C here
    ref = _feed(COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, output_dir=str(tmp_path / "d2")), fed)
    assert {"bbox", "segm"} == set(ref) and "AP-class_10" in ref["bbox"]
    _assert_same_results(ours, ref)
    lines = [r.getMessage() for r in eval_log.records if r.name == LOGGER]
    assert lines == [f"COCO evaluation of {name} with faster-coco-eval {faster_coco_eval.__version__} (compiled)"]
    written = json.load(open(os.path.join(cfg.OUTPUT_DIR, "inference", name, "coco_instances_results.json")))
    assert len(written) == sum(len(out["instances"]) for _, out in fed)


def test_keypoint_evaluation_gives_detectron2_results(dataset, tmp_path):
    name, gt, fed = dataset("keypoints")
    ours = _feed(SkipAwareCOCOEvaluator(name, tasks=("bbox", "keypoints"), distributed=False), fed)
    assert ours["keypoints"]["AP"] > 1  # percent
    ref = _feed(COCOEvaluator(name, tasks=("bbox", "keypoints"), distributed=False), fed)
    _assert_same_results(ours, ref)


def test_without_faster_coco_eval_pycocotools_and_one_install_hint(dataset, monkeypatch, eval_log):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import faster_coco_eval: ImportError
    monkeypatch.setitem(sys.modules, "detectron2.evaluation.fast_eval_api", None)  # no Detectron2 _C either
    name, gt, fed = dataset("bbox")
    first = _feed(SkipAwareCOCOEvaluator(name, tasks=("bbox",), distributed=False), fed)
    again = _feed(SkipAwareCOCOEvaluator(name, tasks=("bbox",), distributed=False), fed)
    hints = [r for r in eval_log.records if r.getMessage() == INSTALL_HINT]
    assert len(hints) == 1 and hints[0].levelno == logging.WARNING
    assert ".venv/bin/pip install faster-coco-eval" in INSTALL_HINT and "10x" in INSTALL_HINT
    ran = [r.getMessage() for r in eval_log.records if r.getMessage().startswith("COCO evaluation of")]
    assert ran == [f"COCO evaluation of {name} with {PYCOCOTOOLS.name}"] * 2
    ref = _feed(COCOEvaluator(name, tasks=("bbox",), distributed=False), fed)
    _assert_same_results(first, ref)
    _assert_same_results(again, ref)


def test_detectron2_cocoeval_opt_is_used_where_its_C_loads(dataset, monkeypatch, eval_log):
    """A detectron2 with _C: its COCOeval_opt computes (stands in here: a recording
    pycocotools COCOeval), with the garbage collector paused; Detectron2's module name and
    the collector are restored after, errors included."""
    made = []

    class RecordingCOCOeval(COCOeval):
        def __init__(self, *args, **kwargs):
            made.append((args[2], gc.isenabled()))
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(
        sys.modules, "detectron2.evaluation.fast_eval_api", types.SimpleNamespace(COCOeval_opt=RecordingCOCOeval)
    )
    name, gt, fed = dataset("bbox")
    evaluator = FastCOCOEvaluator(name, tasks=("bbox",), distributed=False)
    res = _feed(evaluator, fed)
    assert made == [("bbox", False)] and res["bbox"]["AP"] > 0  # garbage collector paused while it ran
    assert gc.isenabled()
    assert [r.getMessage() for r in eval_log.records if r.name == LOGGER] == [
        f"COCO evaluation of {name} with Detectron2's COCOeval_opt (compiled)"
    ]
    assert d2_coco_evaluation.COCOeval_opt is COCOeval

    class Broken(COCOeval):
        def evaluate(self):
            raise RuntimeError("broken evaluator")

    evaluator.backend = type(evaluator.backend)(Broken, "broken", compiled=True)
    with pytest.raises(RuntimeError, match="broken evaluator"):
        _feed(evaluator, fed)
    assert d2_coco_evaluation.COCOeval_opt is COCOeval and gc.isenabled()


def test_use_fast_impl_false_and_max_dets_compute_with_pycocotools(dataset, eval_log):
    name, gt, fed = dataset("bbox")
    official = FastCOCOEvaluator(name, tasks=("bbox",), distributed=False, use_fast_impl=False)
    assert official.backend is PYCOCOTOOLS
    _feed(official, fed)
    _feed(FastCOCOEvaluator(name, tasks=("bbox",), distributed=False, max_dets_per_image=50), fed)
    ran = [r.getMessage() for r in eval_log.records if r.name == LOGGER]
    assert ran[0] == f"COCO evaluation of {name} with {PYCOCOTOOLS.name}"
    assert "COCOevalMaxDets for max_dets_per_image=50" in ran[1]


def test_new_baselines_lazyconfigs_evaluate_with_the_compiled_evaluator():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "new_baselines", "*.py")))
    assert len(files) == 4
    for f in files:
        assert LazyConfig.load(f).dataloader.evaluator._target_ is FastCOCOEvaluator, f


def test_benchmark_eval_section_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run(
        [sys.executable, TOOL, "--what", "eval", "--eval-images", "12", "--eval-segm-images", "8",
         "--eval-path-images", "10", "--eval-repeats", "2", "--threads", "1", "--json", str(out)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "== eval ==" in r.stdout and "x pycoco" in r.stdout
    rows = json.loads(out.read_text())["sections"]["eval"]
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], {})[row["contender"]] = row
    assert set(by_task) == {"bbox", "segm", "path"}
    assert set(by_task["path"]) == {"pycocotools COCOeval", "before: Detectron2 COCOEvaluator", "project path"}
    for task, contenders in by_task.items():
        base = contenders["pycocotools COCOeval"]
        assert len(contenders) == 3, task  # the compiled one (bbox, segm: also with GC paused) is there
        for row in contenders.values():
            assert len(row["times_s"]) == 2 and row["median_s"] > 0
            assert row["speedup_vs_builtin"] == pytest.approx(base["median_s"] / row["median_s"])
            assert row["max_stat_diff"] <= 1e-6 and not math.isnan(row["stats"][0])
