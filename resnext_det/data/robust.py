# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Training and evaluation data that one bad file cannot stop, and that say what they
leave out. The checks themselves are :mod:`.checks`'; here is where the loaders apply them.

* :class:`SkipUnreadableImages` wraps a dataset mapper: an image that cannot be used
  (truncated, random bytes, missing, a 16-bit image Detectron2 would read as all white, a
  size other than its json entry's) is skipped (None) with one warning naming the file.
  In training Detectron2's ``MapDataset`` then draws another image (its documented
  behaviour for a mapper returning None); in evaluation :func:`build_evaluation_loader`
  drops it.
* :func:`training_dataset_dicts` and :func:`evaluation_dataset_dicts` load a dataset as
  Detectron2's loaders do, with its loading errors as one line
  (:func:`~.checks.dataset_errors`) and its missing files left out
  (:func:`~.checks.drop_missing_images`); training also reports, per dataset, the boxes it
  drops and the first images that have them.
* :class:`SkipAwareCOCOEvaluator` is Detectron2's ``COCOEvaluator`` (computing with a compiled
  COCOeval: :class:`resnext_det.evaluation.FastCOCOEvaluator`) scoring the images it
  was given, no more: an image the loader skipped is neither counted as all missed nor
  silently lost: the results say ``skipped_images``, the log names them, and
  ``OUTPUT/skipped_images.json`` lists them, since the AP is then not the whole dataset's.
"""
import itertools
import logging
import os
from collections import Counter
from typing import Callable, List, Optional, Union

import torch.utils.data as torchdata

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.detection_utils import SizeMismatchError, check_metadata_consistency

from ..evaluation import FastCOCOEvaluator
from ..utils.io import atomic_write_json
from .checks import SHOWN, box_problems, check_image_file, dataset_errors, drop_missing_images

__all__ = [
    "SkipUnreadableImages",
    "training_dataset_dicts",
    "evaluation_dataset_dicts",
    "NonEmptyBatches",
    "build_evaluation_loader",
    "SkipAwareCOCOEvaluator",
]

logger = logging.getLogger(__name__)


class SkipUnreadableImages:
    """A mapper that skips (returns None for) images that cannot be used, with one warning
    per file that names it and the reason, and a count per process.

    Args:
        mapper: the mapper to wrap (Detectron2's ``DatasetMapper``).
        purpose: "training" or "evaluation", for the warning.
    """

    def __init__(self, mapper: Callable[[dict], Optional[dict]], *, purpose: str = "training"):
        self.mapper = mapper
        self.purpose = purpose
        self.skipped: Counter = Counter()
        # Files whose header passed check_image_file: checked once per worker, not every epoch.
        self._checked: set = set()

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        path = dataset_dict.get("file_name", "?")
        if path in self.skipped:  # drawn again (a later epoch): skipped again, said once
            self.skipped[path] += 1
            return None
        try:
            if path not in self._checked:
                check_image_file(path)
                self._checked.add(path)
            return self.mapper(dataset_dict)
        # truncated JPEG: OSError; PIL parse errors: SyntaxError; another size than the json's:
        # SizeMismatchError (Detectron2's check_image_size)
        except (OSError, SyntaxError, SizeMismatchError) as e:
            self.skipped[path] += 1
            logger.warning(
                "Skipped %s image %s: %s (%d unusable image(s) met by this worker so far)",
                self.purpose, path, e, len(self.skipped),
            )  # fmt: skip
            return None


def training_dataset_dicts(cfg: CfgNode) -> List[dict]:
    """``DATASETS.TRAIN`` as Detectron2's training loader loads it (empty images
    filtered, keypoint minimum, precomputed proposals), one dataset at a time so that
    each one's missing files are left out and its dropped boxes reported by name."""
    names = list(cfg.DATASETS.TRAIN)
    proposals = list(cfg.DATASETS.PROPOSAL_FILES_TRAIN) if cfg.MODEL.LOAD_PROPOSALS else [None] * len(names)
    out: List[dict] = []
    for name, prop in zip(names, proposals):
        with dataset_errors(name):
            dicts = get_detection_dataset_dicts(
                [name],
                filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
                proposal_files=[prop] if prop else None,
            )
        dicts = drop_missing_images(name, dicts, purpose="training")
        counts, images = box_problems(dicts)
        if counts:
            logger.warning(
                "%s: training drops %s box(es) (%s) of %d image(s) (%s); COCO evaluation of this "
                "dataset would still count them as ground truth.",
                name, sum(counts.values()), ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
                len(images), ", ".join(images[:SHOWN]) + (", ..." if len(images) > SHOWN else ""),
            )  # fmt: skip
        out += dicts
    if len(names) > 1:
        check_metadata_consistency("thing_classes", names)
    return out


def evaluation_dataset_dicts(cfg: CfgNode, dataset_name: str) -> Union[List[dict], torchdata.Dataset]:
    """Test set ``dataset_name`` as Detectron2's test loader loads it (every image, the
    ``DATASETS.PROPOSAL_FILES_TEST`` proposals with ``MODEL.LOAD_PROPOSALS``), with its
    loading errors as one line and its missing files left out (one warning)."""
    proposal_files = None
    if cfg.MODEL.LOAD_PROPOSALS:
        proposal_files = [cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]]
    with dataset_errors(dataset_name):
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False, proposal_files=proposal_files)
    return drop_missing_images(dataset_name, dicts, purpose="evaluation")


class _MapOrSkip(torchdata.Dataset):
    """``mapper(dicts[i])``, None included (Detectron2's MapDataset would draw another
    image instead: in evaluation, a duplicate)."""

    def __init__(self, dicts: Union[List[dict], torchdata.Dataset], mapper: Callable[[dict], Optional[dict]]):
        self._dicts = DatasetFromList(dicts, copy=False) if isinstance(dicts, list) else dicts
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, i: int) -> Optional[dict]:
        return self._mapper(self._dicts[i])


def _without_skipped(batch: list) -> list:
    return [x for x in batch if x is not None]


class NonEmptyBatches:
    """A test loader that leaves out the batches whose every image was skipped (a model
    cannot take an empty batch). ``len`` is the wrapped loader's, as Detectron2's
    ``inference_on_dataset`` uses it for its progress and ETA only."""

    def __init__(self, loader: torchdata.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (batch for batch in self.loader if batch)

    @property
    def dataset(self) -> torchdata.Dataset:
        return self.loader.dataset


def build_evaluation_loader(
    dicts: Union[List[dict], torchdata.Dataset],
    mapper: Callable[[dict], Optional[dict]],
    *,
    num_workers: int = 0,
    batch_size: int = 1,
) -> NonEmptyBatches:
    """Detectron2's test loader (``InferenceSampler``: each process its share, each image
    once) over ``dicts``, where an image that cannot be used is skipped by name
    (:class:`SkipUnreadableImages`) instead of ending the evaluation."""
    dataset = _MapOrSkip(dicts, SkipUnreadableImages(mapper, purpose="evaluation"))
    loader = build_detection_test_loader(
        dataset, mapper=None, num_workers=num_workers, batch_size=batch_size, collate_fn=_without_skipped
    )
    return NonEmptyBatches(loader)


class SkipAwareCOCOEvaluator(FastCOCOEvaluator):
    """Detectron2's ``COCOEvaluator`` (same arguments, same results; computing with the
    fastest COCOeval installed, :class:`~resnext_det.evaluation.FastCOCOEvaluator`) that
    scores only the images the model was given. When the loader skipped some, COCO AP is
    computed over the others (Detectron2 would count each skipped image's objects as
    missed), the results get ``"skipped_images": N``, a warning names the first ones, and
    ``output_dir/skipped_images.json`` lists them all. A missing json is one line
    (:func:`~.checks.dataset_errors`)."""

    def __init__(self, dataset_name: str, *args, **kwargs):
        with dataset_errors(dataset_name):
            super().__init__(dataset_name, *args, **kwargs)
        self._dataset_name = dataset_name
        self._seen: List[int] = []

    def reset(self):
        super().reset()
        self._seen = []

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        self._seen.extend(x["image_id"] for x in inputs)

    def evaluate(self, img_ids=None):
        seen = self._seen
        if self._distributed:
            seen = list(itertools.chain(*comm.gather(seen, dst=0)))  # [] off the main process
        skipped: List[int] = []
        if not self._distributed or comm.is_main_process():
            wanted = list(img_ids) if img_ids is not None else self._coco_api.getImgIds()
            done = set(seen)
            skipped = [i for i in wanted if i not in done]
            if skipped:
                img_ids = [i for i in wanted if i in done]
        results = super().evaluate(img_ids=img_ids)
        if skipped:
            self._report_skipped(skipped, len(img_ids) + len(skipped))
            results["skipped_images"] = len(skipped)
        return results

    def _report_skipped(self, skipped: List[int], total: int) -> None:
        root = self._metadata.get("image_root", None)
        files = []
        for i in skipped:
            f = self._coco_api.imgs.get(i, {}).get("file_name", str(i))
            files.append(os.path.join(root, f) if root and not os.path.isabs(f) else f)
        listed = ""
        if self._output_dir:
            path = os.path.join(self._output_dir, "skipped_images.json")
            atomic_write_json(path, {"dataset": self._dataset_name, "images": total, "skipped": files})
            listed = f"; all listed in {path}"
        logger.warning(
            "Evaluation of %s skipped %d of its %d images (%s): its AP is over the %d others, not the "
            "whole dataset's%s",
            self._dataset_name, len(skipped), total, ", ".join(files[:SHOWN]) + (", ..." if len(files) > SHOWN else ""),
            total - len(skipped), listed,
        )  # fmt: skip
