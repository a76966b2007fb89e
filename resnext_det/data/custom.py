# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Your own COCO-format data from the command line, and the class count it implies.

``--register-coco NAME JSON IMAGE_DIR`` (repeatable; ``tools/train_net.py``,
``tools/demo.py``, ``tools/pretrain_shapes.py``, ``tools/lazyconfig_train_net.py``)
registers ``NAME`` with Detectron2's catalogs exactly as
:func:`detectron2.data.datasets.register_coco_instances` does, so that
``DATASETS.TRAIN "('NAME',)"`` works without writing Python. Registration is a
per-process thing: Detectron2's ``launch`` spawns workers that start with empty
catalogs, so every tool registers inside the function each process runs.

:func:`check_num_classes` compares the config's class count
(``MODEL.ROI_HEADS.NUM_CLASSES``, or ``MODEL.RETINANET.NUM_CLASSES`` for RetinaNet)
with the categories of each dataset, before a model is built: a wrong count
otherwise trains (too many classes, silently) or fails deep inside a loss (too few).
"""
import argparse
import json
import logging
import os
from typing import Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..errors import ConfigError, MissingFileError

__all__ = [
    "add_register_coco_argument",
    "register_coco",
    "register_coco_datasets",
    "coco_category_names",
    "dataset_classes",
    "num_classes_key",
    "check_num_classes",
]

logger = logging.getLogger(__name__)

#: Meta-architectures whose class count is ``MODEL.ROI_HEADS.NUM_CLASSES``.
_ROI_ARCHS = ("GeneralizedRCNN", "UnsharedRCNN", "PanopticFPN")


def add_register_coco_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--register-coco NAME JSON IMAGE_DIR`` (repeatable) to ``parser``."""
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register a COCO-format dataset (instances json + image folder) under NAME, for "
        "DATASETS.TRAIN / DATASETS.TEST \"('NAME',)\"; repeat for each split",
    )
    return parser


def register_coco(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO instances json and its image folder as dataset ``name``.

    Idempotent for the same files (the parent process and each launched worker
    register); a name already taken by another dataset (``coco_2017_train``,
    ``shapes_train``, ...) is refused.

    Raises:
        MissingFileError: the json or the image folder does not exist.
        ConfigError: ``name`` is registered to other data.
    """
    flag = f"--register-coco {name} {json_file} {image_root}"
    if not os.path.isfile(json_file):
        raise MissingFileError(f"{flag}: the annotation file {json_file!r} does not exist")
    if not os.path.isdir(image_root):
        raise MissingFileError(f"{flag}: the image folder {image_root!r} does not exist")
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
            return
        raise ConfigError(
            f"{flag}: the name {name!r} is already registered (to {meta.get('json_file', 'other data')}): "
            "choose another NAME"
        )
    register_coco_instances(name, {}, json_file, image_root)


def register_coco_datasets(triples: Optional[Iterable[Sequence[str]]]) -> List[str]:
    """:func:`register_coco` for each ``(NAME, JSON, IMAGE_DIR)`` of the parsed
    ``--register-coco`` flags; returns the names."""
    names = []
    for name, json_file, image_root in triples or []:
        register_coco(name, json_file, image_root)
        names.append(name)
    return names


def coco_category_names(json_file: str) -> List[str]:
    """The category names of a COCO instances json, in category-id order (the
    contiguous class ids Detectron2 gives them)."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise MissingFileError(f"{json_file!r} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{json_file!r} is not a readable COCO json: {e}") from e
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise ConfigError(
            f"{json_file!r} is not a COCO instances json: it needs a non-empty 'categories' list of "
            "{'id': ..., 'name': ...} (and 'images', 'annotations')"
        )
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def dataset_classes(name: str) -> Optional[List[str]]:
    """The class names of registered dataset ``name``: its metadata's
    ``thing_classes``, else the categories of its ``json_file`` (stored in the
    metadata, as loading the dataset would); None when neither is known."""
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes", None)
    if classes is not None:
        return list(classes)
    json_file = meta.get("json_file", None)
    if not json_file or not os.path.isfile(json_file):
        return None
    classes = coco_category_names(json_file)
    meta.set(thing_classes=classes)
    return classes


def num_classes_key(cfg) -> Optional[str]:
    """The config key holding the model's class count, or None (an RPN, a semantic
    segmentor, a meta-architecture this module does not know)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return "MODEL.RETINANET.NUM_CLASSES"
    if arch in _ROI_ARCHS:
        return "MODEL.ROI_HEADS.NUM_CLASSES"
    return None


def check_num_classes(cfg, dataset_names: Iterable[str]) -> None:
    """Refuse a config whose class count differs from the categories of any of
    ``dataset_names`` (registered datasets whose classes are known), naming the key
    and the value to set.

    Raises:
        ConfigError: e.g. ``MODEL.ROI_HEADS.NUM_CLASSES is 80, but dataset 'mine_train'
            has 3 categories ...: append MODEL.ROI_HEADS.NUM_CLASSES 3``.
    """
    key = num_classes_key(cfg)
    if key is None:
        return
    node = cfg
    for part in key.split(".")[:-1]:
        node = node[part]
    want = node[key.rsplit(".", 1)[1]]
    registered = set(DatasetCatalog.list())
    for name in dict.fromkeys(dataset_names):  # in order, once each
        if name not in registered:
            continue  # Detectron2 names the unknown dataset itself
        classes = dataset_classes(name)
        if classes is None or len(classes) == want:
            continue
        json_file = MetadataCatalog.get(name).get("json_file", None)
        where = f" ({json_file})" if json_file else ""
        shown = ", ".join(map(str, classes[:8])) + (", ..." if len(classes) > 8 else "")
        raise ConfigError(
            f"{key} is {want}, but dataset {name!r}{where} has {len(classes)} categories ({shown}): "
            f"append {key} {len(classes)}"
        )
