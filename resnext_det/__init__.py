# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""resnext_det: ResNeXt (Xie et al., CVPR 2017) for Detectron2.

Importing the package registers its backbones, ROI heads, the Appendix B
meta-architecture (``UnsharedRCNN``) and the shapes datasets with Detectron2's
registries and catalogs, and imports nothing of training, the Appendix B schedule,
export or benchmarks (their modules load when used).
"""
import difflib
import os
import warnings

from .errors import MissingFileError

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

with warnings.catch_warnings():
    # Known noise, filtered here once for every tool (they import resnext_det first):
    # detectron2 (April 2024) scripts two box-regression helpers when imported, and recent
    # torch (2.14 here) warns that torch.jit.script is deprecated. Only that import is quiet.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import detectron2.modeling  # noqa: F401

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

#: The shipped configs: ``configs/`` of the repository, installed with the package
#: (``resnext_det/configs`` is a link to it, as Detectron2's ``model_zoo/configs``).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(config_path: str) -> str:
    """The path of a shipped config, from any working directory, as
    :func:`detectron2.model_zoo.get_config_file` does for Detectron2's::

        resnext_det.get_config_file("COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml")

    Args:
        config_path: relative to ``configs/`` (a leading ``configs/`` is accepted).

    Raises:
        MissingFileError: no such shipped config; the message names close matches.
    """
    rel = config_path.replace(os.sep, "/")
    rel = rel[len("configs/"):] if rel.startswith("configs/") else rel
    path = os.path.join(CONFIG_DIR, *rel.split("/"))
    if rel and os.path.isfile(path):
        return path
    shipped = sorted(
        os.path.relpath(os.path.join(d, f), CONFIG_DIR).replace(os.sep, "/")
        for d, _, files in os.walk(CONFIG_DIR, followlinks=True)
        for f in files
        if f.endswith((".yaml", ".py"))
    )
    close = difflib.get_close_matches(rel, shipped, n=3, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"see {CONFIG_DIR}"
    raise MissingFileError(f"{config_path!r} is not a shipped config ({len(shipped)} in {CONFIG_DIR}); {hint}")


__all__ = [
    "get_config_file",
    "CONFIG_DIR",
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
