# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""ROI heads whose res5 is a ResNeXt stage (for C4 models)."""
import torch
from torch import nn

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

from .resnext import make_resnext_stage
from .spec import ResNeXtSpec

__all__ = ["ResNeXtRes5ROIHeads"]


@ROI_HEADS_REGISTRY.register()
class ResNeXtRes5ROIHeads(Res5ROIHeads):
    """Detectron2's C4 head (:class:`Res5ROIHeads`: RoI pooling on res4, then res5
    per region, as in Faster R-CNN with ResNet, He et al. 2016, Sec. A) with res5
    built from ``MODEL.RESNEXT``: the same C, d, block form and norm as the trunk,
    so an ImageNet ResNeXt's res5 weights (``roi_heads.res5.*``) load into it.
    """

    # A constant for TorchScript: scripting a C4 model without masks then compiles the
    # mask branch of Res5ROIHeads.forward away instead of failing on the missing
    # mask_head (Detectron2 annotates StandardROIHeads so in its torchscript_patch.py).
    mask_on: torch.jit.Final[bool]

    @classmethod
    def _build_res5_block(cls, cfg):
        spec = ResNeXtSpec.from_config(cfg)
        args = spec.stage_args(5)
        # The head pools res4 at stride 16 and downsamples to 32 in its first block.
        args.update(first_stride=2, dilation=1)
        blocks = make_resnext_stage(**args)
        return nn.Sequential(*blocks), args["out_channels"]
