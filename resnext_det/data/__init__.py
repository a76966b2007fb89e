# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Datasets: the synthetic shapes set (registered as ``shapes_train`` / ``shapes_val``)
and the COCO folder checker used by ``datasets/prepare_coco.py``."""
from .shapes import (
    SHAPES_CLASSES,
    default_shapes_root,
    ensure_shapes,
    generate_shapes,
    load_shapes_json,
    register_shapes,
)
from .shapes import _register_all

__all__ = [
    "SHAPES_CLASSES",
    "default_shapes_root",
    "ensure_shapes",
    "generate_shapes",
    "load_shapes_json",
    "register_shapes",
]

_register_all()  # shapes_train, shapes_val (data generated on first use)
