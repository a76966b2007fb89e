# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""resnext_det: ResNeXt (Xie et al., CVPR 2017) for Detectron2.

Importing the package registers its backbones, ROI heads and datasets with
Detectron2's registries and catalogs.
"""
__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by tests in a subprocess
    raise ImportError(
        "resnext_det needs detectron2, which is not installed in this Python "
        f"({e}). Install it with `make setup` from the resnext_det repository "
        "(it creates .venv/ with torch, torchvision and detectron2), or build "
        "detectron2 from source: "
        "`pip install 'git+https://github.com/facebookresearch/detectron2.git'`. "
        "See README.md, section 'Set-up'."
    ) from e

from .config import add_resnext_config
from .modeling import (
    ResNeXt,
    ResNeXtBlock,
    ResNeXtRes5ROIHeads,
    ResNeXtSpec,
    build_resnext_backbone,
    build_resnext_fpn_backbone,
    build_resnext_retinanet_fpn_backbone,
)
from .presets import PRESETS, STAGE_BLOCKS
from .checkpoint import ResNeXtCheckpointer, convert_weights
from . import data as _  # registration: shapes_train, shapes_val
from . import unshared as _  # noqa: F811  registration: UnsharedRCNN (Appendix B)

__all__ = [
    "add_resnext_config",
    "ResNeXt",
    "ResNeXtBlock",
    "ResNeXtRes5ROIHeads",
    "ResNeXtSpec",
    "build_resnext_backbone",
    "build_resnext_fpn_backbone",
    "build_resnext_retinanet_fpn_backbone",
    "PRESETS",
    "STAGE_BLOCKS",
    "ResNeXtCheckpointer",
    "convert_weights",
]
