# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Datasets: the synthetic shapes set (registered as ``shapes_train`` / ``shapes_val``),
your own COCO-format data from the command line (``--register-coco``, :mod:`.custom`),
the check of every dataset a run reads (:func:`check_datasets`, :mod:`.checks`: at the start
of a run, and ``datasets/prepare_coco.py --check --register-coco``) and the COCO folder
checker used by ``datasets/prepare_coco.py``."""
from .checks import DatasetCheck, check_datasets, format_checks
from .custom import (
    add_register_coco_argument,
    check_num_classes,
    dataset_classes,
    register_coco,
    register_coco_datasets,
)
from .shapes import (
    SHAPES_CLASSES,
    default_shapes_root,
    ensure_shapes,
    generate_shapes,
    load_shapes_json,
    register_all_shapes,
    register_shapes,
)

__all__ = [
    "DatasetCheck",
    "check_datasets",
    "format_checks",
    "add_register_coco_argument",
    "check_num_classes",
    "dataset_classes",
    "register_coco",
    "register_coco_datasets",
    "SHAPES_CLASSES",
    "default_shapes_root",
    "ensure_shapes",
    "generate_shapes",
    "load_shapes_json",
    "register_all_shapes",
    "register_shapes",
]

register_all_shapes()  # shapes_train, shapes_val (data generated on first use)
