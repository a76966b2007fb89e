# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
from .resnext import (
    BLOCK_FORMS,
    ResNeXt,
    ResNeXtBlock,
    ResNeXtSpec,
    build_resnext_backbone,
    build_resnext_fpn_backbone,
    build_resnext_retinanet_fpn_backbone,
    make_resnext_stage,
    resnext_spec_from_config,
)
from .roi_heads import ResNeXtRes5ROIHeads
