# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
from .resnext import (
    ResNeXt,
    ResNeXtBlock,
    build_resnext_backbone,
    build_resnext_fpn_backbone,
    build_resnext_retinanet_fpn_backbone,
    make_resnext_stage,
)
from .roi_heads import ResNeXtRes5ROIHeads
from .spec import BLOCK_FORMS, ResNeXtSpec, ResNeXtSpecError
from .unshared_rcnn import UnsharedRCNN, network_configs
