# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The check of a dataset before a run reads it: its json, its files, its boxes, and (on
request) every image decoded. One code path for the start of a run and for
``datasets/prepare_coco.py --check --register-coco``.

:func:`check_datasets` takes dataset names (or a config: ``DATASETS.TRAIN`` + ``DATASETS.TEST``)
and, for each one:

1. loads its dicts through Detectron2's ``DatasetCatalog``, as the loaders do, with the
   failures a user causes turned into one line (:func:`dataset_errors`): the missing json of
   a builtin COCO dataset names the file, ``DETECTRON2_DATASETS`` and
   ``datasets/prepare_coco.py``; a ``category_id`` absent from ``categories`` names the json,
   the id and the image (Detectron2: a ``KeyError`` traceback);
2. stats every image file (:func:`missing_images`; threads from :data:`PARALLEL_FROM`
   images on, for network file systems). More than :data:`MOST_MISSING` of them missing
   (a wrong image folder) is refused, naming the folder; fewer are left out of training and
   evaluation (:func:`drop_missing_images`, called by the loaders) with one warning line;
3. counts the boxes training drops (:func:`box_problems`) and the images without annotations;
4. with ``verify_images``, decodes every image (:func:`image_problem`): unreadable
   (truncated, not an image), more than 8 bits per channel (Detectron2 reads it as all
   white) or of another size than its json entry. Without it, these images are found
   when a loader reads them, and skipped by name (:mod:`.robust`).

This module owns the checks of a dataset as a whole (its files, its boxes, its loading
errors, the start-of-run check); the checks of one image file are :mod:`.image_checks`,
the report (:class:`DatasetCheck`, :func:`format_checks`) is :mod:`.check_report`. Their
public names are importable from here too.
"""
import contextlib
import json
import logging
import os
import time
from collections import Counter
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..errors import ConfigError, MissingFileError, UserError
from .check_report import SHOWN, DatasetCheck, format_checks, shown_paths
from .coco_check import COCO_DATASETS
from .image_checks import (
    ImageProblem,
    UnusableImage,
    check_image_file,
    image_problem,
    thread_map,
    unreadable_images,
)

__all__ = [
    "MOST_MISSING",
    "PARALLEL_FROM",
    "UnusableImage",
    "ImageProblem",
    "image_problem",
    "check_image_file",
    "unreadable_images",
    "missing_images",
    "drop_missing_images",
    "box_problems",
    "unusable_boxes",
    "dataset_errors",
    "DatasetCheck",
    "check_datasets",
    "format_checks",
]

logger = logging.getLogger(__name__)

#: More than this fraction of a dataset's image files missing is a wrong image folder:
#: refused. At most this fraction: the missing ones are left out, with one warning.
MOST_MISSING = 0.5
#: From this many images on, files are checked by a pool of threads (on a network file
#: system a stat waits ~0.1-1 ms for the server; threads wait together).
PARALLEL_FROM = 1000


def missing_images(dicts: Sequence[dict], *, workers: Optional[int] = None) -> List[str]:
    """The ``file_name`` of each dict that is not a file on disk (a stat each; a pool of
    ``workers`` threads from :data:`PARALLEL_FROM` dicts on)."""
    paths = [d["file_name"] for d in dicts if "file_name" in d]
    exists = thread_map(os.path.isfile, paths, threads=len(paths) >= PARALLEL_FROM, workers=workers)
    return [p for p, ok in zip(paths, exists) if not ok]


def _json_of(name: str) -> Optional[str]:
    json_file = MetadataCatalog.get(name).get("json_file", None)
    return os.path.abspath(json_file) if json_file else None


def _where(name: str) -> str:
    json_file = _json_of(name)
    return f" ({json_file})" if json_file else ""


def _most_missing_message(name: str, n: int, missing: Sequence[str]) -> str:
    root = MetadataCatalog.get(name).get("image_root", None)
    folder = os.path.abspath(root) if root else os.path.dirname(os.path.abspath(missing[0]))
    return (
        f"dataset {name!r}: {len(missing)} of the {n} image files its json{_where(name)} names are "
        f"not in the image folder {folder} (e.g. {os.path.abspath(missing[0])}): is it the folder "
        f"that holds them (IMAGE_DIR of --register-coco {name} JSON IMAGE_DIR)? A run refuses a "
        f"dataset with more than {MOST_MISSING:.0%} of its images missing"
    )


def _refuse_most_missing(name: str, n: int, missing: Sequence[str]) -> None:
    if missing and len(missing) > MOST_MISSING * n:
        raise MissingFileError(_most_missing_message(name, n, missing))


#: The missing files each dataset's warning named already, in this process.
_warned_missing: Dict[str, set] = {}


def _warn_missing_once(name: str, n: int, missing: Sequence[str], what: str) -> None:
    if set(missing) <= _warned_missing.get(name, set()):
        return  # said already (by the start-of-run check): one warning per dataset
    _warned_missing.setdefault(name, set()).update(missing)
    logger.warning(
        "%s: %d of %d image files named in its json%s are not on disk and are left out of %s: %s",
        name, len(missing), n, _where(name), what, shown_paths(missing),
    )  # fmt: skip


def drop_missing_images(name: str, dicts: List[dict], *, purpose: str = "training") -> List[dict]:
    """``dicts`` of dataset ``name`` without those whose file is not on disk, with one
    warning line per dataset and process (none when the start-of-run check named them).

    Raises:
        MissingFileError: more than :data:`MOST_MISSING` of the files are missing (a wrong
            image folder), naming the folder and one of the files.
    """
    if not isinstance(dicts, list) or not dicts:
        return dicts  # a torch Dataset (Detectron2 passes it on as it is), or empty
    missing = missing_images(dicts)
    if not missing:
        return dicts
    _refuse_most_missing(name, len(dicts), missing)
    _warn_missing_once(name, len(dicts), missing, purpose)
    gone = set(missing)
    return [d for d in dicts if d.get("file_name") not in gone]


def box_problems(dicts: Iterable[dict]) -> Tuple[Dict[str, int], List[str]]:
    """The non-crowd boxes Detectron2 drops in training, counted by kind ("zero-area or
    negative size", "outside the image"), and the images that have them, in order."""
    counts: Counter = Counter()
    images: Dict[str, None] = {}
    for d in dicts:
        h, w = d.get("height"), d.get("width")
        for a in d.get("annotations", ()):
            if a.get("iscrowd", 0) or "bbox" not in a:
                continue
            mode = a.get("bbox_mode", BoxMode.XYWH_ABS)
            if mode == BoxMode.XYWH_ABS:
                x0, y0, bw, bh = a["bbox"][:4]
                x1, y1 = x0 + bw, y0 + bh
            elif mode == BoxMode.XYXY_ABS:
                x0, y0, x1, y1 = a["bbox"][:4]
            else:
                x0, y0, x1, y1 = BoxMode.convert(list(a["bbox"]), mode, BoxMode.XYXY_ABS)
            if x1 <= x0 or y1 <= y0:
                kind = "zero-area or negative size"
            elif h and w and (x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h):
                kind = "outside the image"
            else:
                continue
            counts[kind] += 1
            images[d.get("file_name", "?")] = None
    return dict(counts), list(images)


def unusable_boxes(dicts: Iterable[dict]) -> Dict[str, int]:
    """Counts of the non-crowd boxes Detectron2 drops in training: zero-area or
    negative-size, and boxes entirely outside their image."""
    return box_problems(dicts)[0]


# --------------------------------------------------------------------------- loading errors
def _missing_file_message(name: str, path: str) -> str:
    path = os.path.abspath(path)
    is_json = _json_of(name) == path
    msg = f"dataset {name!r}: {'its annotation file' if is_json else 'the file'} {path} does not exist"
    env = os.environ.get("DETECTRON2_DATASETS")
    root = os.path.abspath(os.path.expanduser(env or "datasets"))
    if not path.startswith(root + os.sep):
        return msg
    # A builtin dataset: Detectron2 registers them under $DETECTRON2_DATASETS.
    msg += (
        f". Detectron2 looked for it in the DETECTRON2_DATASETS folder {root}"
        + ("" if env else " (DETECTRON2_DATASETS is unset: ./datasets)")
    )
    if name in COCO_DATASETS or f"{os.sep}coco{os.sep}" in path:
        check = "datasets/prepare_coco.py --check" + (f" --datasets {name}" if name in COCO_DATASETS else "")
        msg += (
            f": put COCO there ({check} lists every file it needs and where to get it), or set "
            "DETECTRON2_DATASETS to the folder that holds coco/; to train on your own data "
            "instead, see --register-coco"
        )
    else:
        msg += ": put the dataset there as Detectron2's datasets/README.md lays it out"
    return msg


def _unknown_category_message(name: str, error: Exception) -> str:
    json_file = _json_of(name)
    if not json_file:
        return f"dataset {name!r}: {error}"
    try:
        with open(json_file) as f:
            data = json.load(f)
        known = sorted({c["id"] for c in data["categories"]}, key=str)
        bad = [a for a in data["annotations"] if a.get("category_id") not in set(known)]
        files = {im.get("id"): im.get("file_name") for im in data["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return f"dataset {name!r} ({json_file}): {error}"
    if not bad:
        return f"dataset {name!r} ({json_file}): {error}"
    first = bad[0]
    ids = sorted({a.get("category_id") for a in bad}, key=str)
    return (
        f"dataset {name!r}: {json_file} has {len(bad)} annotation(s) whose category_id is not one "
        f"of its 'categories' (ids {', '.join(map(str, known))}): category_id {first.get('category_id')} "
        f"in image {files.get(first.get('image_id'), first.get('image_id'))!r} (annotation id "
        f"{first.get('id')})" + (f"; unknown ids: {', '.join(map(str, ids))}" if len(ids) > 1 else "")
        + ": add the category to 'categories', or correct or remove those annotations"
    )


def _not_registered_message(name: str) -> str:
    return (
        f"dataset {name!r} is not registered: for your own COCO-format data add "
        f"--register-coco {name} JSON IMAGE_DIR; builtin names include coco_2017_train, "
        "coco_2017_val, shapes_train, shapes_val"
    )


@contextlib.contextmanager
def dataset_errors(name: str) -> Iterator[None]:
    """Turn the errors loading dataset ``name`` raises for a user's mistake into one-line
    :class:`~resnext_det.errors.UserError` s naming the dataset, the file and the fix: a
    missing file (a builtin dataset's json: also ``DETECTRON2_DATASETS`` and
    ``datasets/prepare_coco.py``), an unknown ``category_id``, a json that does not parse,
    duplicate annotation ids, an empty dataset, an unregistered name. Other errors pass."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as e:
        if not e.filename:
            raise MissingFileError(f"dataset {name!r}: {e}") from e
        raise MissingFileError(_missing_file_message(name, e.filename)) from e
    except KeyError as e:
        text = str(e)
        if "category_id" in text:
            raise UserError(_unknown_category_message(name, e)) from e
        if "not registered" in text:
            raise ConfigError(_not_registered_message(name)) from e
        raise
    except json.JSONDecodeError as e:
        raise UserError(
            f"dataset {name!r}: its json{_where(name)} does not parse ({e}): re-export or re-copy it"
        ) from e
    except ValueError as e:
        if "valid COCO format" not in str(e):
            raise
        raise UserError(f"dataset {name!r}{_where(name)}: {e}") from e
    except AssertionError as e:
        text = str(e)
        if "not unique" in text:
            fix = "give every annotation its own 'id'"
        elif "is empty" in text:
            fix = "its json lists no images"
        elif "No valid data found" in text:
            fix = ("no image has an annotation training can use (DATALOADER.FILTER_EMPTY_ANNOTATIONS "
                   "leaves out images without a non-crowd box)")
        else:
            raise
        raise UserError(f"dataset {name!r}{_where(name)}: {text}: {fix}") from e


# --------------------------------------------------------------------------- the check
def _dataset_names(cfg_or_names: Union[CfgNode, str, Iterable[str]]) -> List[str]:
    if isinstance(cfg_or_names, CfgNode):
        names: Iterable[str] = list(cfg_or_names.DATASETS.TRAIN) + list(cfg_or_names.DATASETS.TEST)
    elif isinstance(cfg_or_names, str):
        names = [cfg_or_names]
    else:
        names = cfg_or_names
    return list(dict.fromkeys(names))  # in order, once each


def _check_one(name: str, *, verify_images: bool, workers: Optional[int]) -> DatasetCheck:
    start = time.perf_counter()
    meta = MetadataCatalog.get(name)
    r = DatasetCheck(name, json_file=_json_of(name), image_root=meta.get("image_root", None))
    if r.image_root:
        r.image_root = os.path.abspath(r.image_root)
    try:
        if name not in DatasetCatalog.list():
            raise ConfigError(_not_registered_message(name))
        with dataset_errors(name):
            dicts = DatasetCatalog.get(name)
        if not isinstance(dicts, list):
            return r  # a torch Dataset: nothing to check here
        r.classes = meta.get("thing_classes", None)
        r.num_images = len(dicts)
        if not dicts:
            raise UserError(f"dataset {name!r}{_where(name)} has no images")
        r.missing = missing_images(dicts, workers=workers)
        _refuse_most_missing(name, len(dicts), r.missing)
    except UserError as e:
        r.error = e
        r.seconds = time.perf_counter() - start
        return r
    r.num_boxes = sum(1 for d in dicts for a in d.get("annotations", ()) if "bbox" in a)
    r.empty_images = sum(1 for d in dicts if not any(not a.get("iscrowd", 0) for a in d.get("annotations", ())))
    r.boxes, r.box_images = box_problems(dicts)
    if verify_images:
        gone = set(r.missing)
        todo = [d for d in dicts if "file_name" in d and d["file_name"] not in gone]
        found = thread_map(lambda d: image_problem(d["file_name"], d.get("width"), d.get("height")), todo,
                     threads=len(todo) >= 64, workers=workers)  # fmt: skip
        r.unusable = [p for p in found if p is not None]
        r.verified = True
    r.seconds = time.perf_counter() - start
    return r


def check_datasets(
    cfg_or_names: Union[CfgNode, str, Iterable[str]],
    *,
    verify_images: bool = False,
    workers: Optional[int] = None,
    strict: bool = True,
) -> List[DatasetCheck]:
    """Check each dataset a run reads, before it reads them (see the module's docstring).

    Args:
        cfg_or_names: dataset names, or a config (its ``DATASETS.TRAIN`` and ``DATASETS.TEST``).
        verify_images: also decode every image (slow: ~1-5 ms an image and core).
        workers: threads for large datasets (default: 4 per core, at most 32).
        strict: the start of a run: log one line per dataset (info) and the missing files
            (one warning per dataset), and raise the first dataset's error. False
            (``prepare_coco.py --check``): log nothing, record errors in the report.

    Returns:
        One :class:`DatasetCheck` per dataset, in order.

    Raises:
        UserError: with ``strict``, the first dataset that cannot be used (a
            :class:`~resnext_det.errors.MissingFileError` for a missing json or a wrong image
            folder), and how many more cannot.
    """
    reports = [_check_one(n, verify_images=verify_images, workers=workers) for n in _dataset_names(cfg_or_names)]
    if not strict:
        return reports
    for r in reports:
        if r.error is not None:
            continue
        logger.info("Checked %s", r.summary())
        if r.missing:
            _warn_missing_once(r.name, r.num_images, r.missing, "training and evaluation")
        if r.unusable:
            logger.warning("%s: %d images training and evaluation will skip: %s", r.name, len(r.unusable),
                           "; ".join(f"{p.path}: {p.reason}" for p in r.unusable[:SHOWN]))
    bad = [r for r in reports if r.error is not None]
    if bad:
        first = bad[0].error
        if len(bad) > 1:
            more = ", ".join(r.name for r in bad[1:])
            raise type(first)(f"{first} (and {len(bad) - 1} more dataset(s) that cannot be used: {more})") from first
        raise first
    return reports

