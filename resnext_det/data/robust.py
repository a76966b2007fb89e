# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Training data that one bad file cannot stop, and that says what it leaves out.

* :class:`SkipUnreadableImages` wraps a dataset mapper: an image that cannot be read
  (truncated JPEG, random bytes, a 16-bit image Detectron2 would read as all white) is
  skipped with a warning naming the file, and counted; Detectron2's ``MapDataset``
  then draws another image (its documented behaviour for a mapper returning None).
* :func:`training_dataset_dicts` loads ``DATASETS.TRAIN`` as Detectron2 does and logs,
  per dataset, how many boxes training will drop (zero-area, negative-size, outside
  the image) although the evaluation ground truth keeps them.
"""
import logging
import os
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

from PIL import Image

from detectron2.data import get_detection_dataset_dicts
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.structures import BoxMode

__all__ = [
    "UnusableImage",
    "check_image_file",
    "unreadable_images",
    "SkipUnreadableImages",
    "unusable_boxes",
    "training_dataset_dicts",
]

logger = logging.getLogger(__name__)

#: PIL modes of images with more than 8 bits per channel: Detectron2's read_image
#: converts them to RGB by clipping at 255 (an all-white image).
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class UnusableImage(OSError):
    """An image file that training cannot use as it is; the message says why."""


def check_image_file(path: str) -> None:
    """Raise :class:`UnusableImage` for a file PIL cannot identify or a high-bit-depth
    image (reads only the header; truncation shows when the pixels are decoded)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise UnusableImage(f"not an image PIL can read ({e})") from e
    if mode in _HIGH_BIT_MODES:
        raise UnusableImage(
            f"a {mode} (more than 8 bits per channel) image, which Detectron2 reads as all "
            "white: convert it to 8 bits (e.g. PIL: (array / 257).astype('uint8'))"
        )


def unreadable_images(folder: str, *, exts=(".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")) -> List[Tuple[str, str]]:
    """Decode every image of ``folder`` (not recursive) and return ``(file, reason)`` for
    each one training could not use: truncated, not an image, more than 8 bits. Slow on
    purpose (a full decode: about 5 ms a COCO image on one core)."""
    bad: List[Tuple[str, str]] = []
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.name.lower().endswith(exts))
    for name in names:
        path = os.path.join(folder, name)
        try:
            check_image_file(path)
            with Image.open(path) as im:
                im.load()
        except (OSError, SyntaxError) as e:
            bad.append((path, str(e)))
    return bad


class SkipUnreadableImages:
    """A mapper that skips (returns None for) images that cannot be read, with a warning
    that names the file and a running count per process."""

    def __init__(self, mapper: Callable[[dict], Optional[dict]]):
        self.mapper = mapper
        self.skipped: Counter = Counter()
        # Files whose header passed check_image_file: checked once per worker, not every epoch.
        self._checked: set = set()

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        path = dataset_dict.get("file_name", "?")
        try:
            if path not in self._checked:
                check_image_file(path)
                self._checked.add(path)
            return self.mapper(dataset_dict)
        except (OSError, SyntaxError) as e:  # truncated JPEG: OSError; PIL parse errors: SyntaxError
            self.skipped[path] += 1
            logger.warning(
                "Skipped training image %s: %s (%d unusable image(s) met by this worker so far)",
                path, e, len(self.skipped),
            )
            return None


def unusable_boxes(dicts: List[dict]) -> Dict[str, int]:
    """Counts of the non-crowd boxes Detectron2 drops in training: zero-area or
    negative-size, and boxes entirely outside their image."""
    out = Counter()
    for d in dicts:
        h, w = d.get("height"), d.get("width")
        for a in d.get("annotations", []):
            if a.get("iscrowd", 0) or "bbox" not in a:
                continue
            x0, y0, x1, y1 = BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
            if x1 <= x0 or y1 <= y0:
                out["zero-area or negative size"] += 1
            elif h and w and (x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h):
                out["outside the image"] += 1
    return dict(out)


def training_dataset_dicts(cfg) -> List[dict]:
    """``DATASETS.TRAIN`` as Detectron2's training loader loads it (empty images
    filtered, keypoint minimum, precomputed proposals), one dataset at a time so that
    each one's dropped boxes are reported by name."""
    names = list(cfg.DATASETS.TRAIN)
    proposals = list(cfg.DATASETS.PROPOSAL_FILES_TRAIN) if cfg.MODEL.LOAD_PROPOSALS else [None] * len(names)
    out: List[dict] = []
    for name, prop in zip(names, proposals):
        dicts = get_detection_dataset_dicts(
            [name],
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=[prop] if prop else None,
        )
        bad = unusable_boxes(dicts)
        if bad:
            logger.warning(
                "%s: training drops %s box(es) (%s); COCO evaluation of this dataset would "
                "still count them as ground truth.",
                name, sum(bad.values()), ", ".join(f"{n} {k}" for k, n in sorted(bad.items())),
            )
        out += dicts
    if len(names) > 1:
        check_metadata_consistency("thing_classes", names)
    return out
