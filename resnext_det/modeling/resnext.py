# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""ResNeXt backbones (Xie et al., "Aggregated Residual Transformations for Deep
Neural Networks", CVPR 2017) for Detectron2.

The block is the paper's split-transform-aggregate unit (Eq. 3)::

    y = x + sum_{i=1..C} T_i(x)

with C paths ("cardinality") of identical topology 1x1 (in->d), 3x3 (d->d),
1x1 (d->out). :class:`ResNeXtBlock` computes it in any of the three equivalent
forms of Fig. 3, from the same parameters. The network around the blocks is
Detectron2's :class:`~detectron2.modeling.backbone.ResNet` (stem, stages, freezing,
feature bookkeeping), so parameter names are Detectron2's (``stem.conv1``,
``res2.0.conv1.norm``, ``res2.0.shortcut``) and Detectron2 model-zoo ResNeXt
checkpoints load unchanged.
"""
from typing import Dict, List, Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem

from .spec import BLOCK_FORMS, FEATURE_NAMES, ResNeXtSpec
from ..errors import ConfigError

__all__ = [
    "BLOCK_FORMS",
    "ResNeXtBlock",
    "ResNeXt",
    "make_resnext_stage",
    "build_resnext_backbone",
    "build_resnext_fpn_backbone",
    "build_resnext_retinanet_fpn_backbone",
]



class ResNeXtBlock(CNNBlockBase):
    """The aggregated residual transformation of the paper (Sec. 3.3, Fig. 3).

    ``y = relu(x + sum_{i=1..C} T_i(x))`` where every path T_i is
    1x1 conv (in -> d), 3x3 conv (d -> d), 1x1 conv (d -> out), each followed by
    a norm, ReLU after the first two (Sec. 4: "BN right after the conv, ReLU
    after each BN, except the block output where ReLU follows the addition").

    All three forms of Fig. 3 hold the same three convolutions ``conv1``
    (in -> C*d), ``conv2`` (C*d -> C*d, C groups) and ``conv3`` (C*d -> out),
    each with its ``norm``; they only differ in how ``forward`` computes:

    * ``"a"``: C explicit paths, path i uses rows ``i*d:(i+1)*d`` of conv1 and
      conv2's group i, and its own 1x1 (columns ``i*d:(i+1)*d`` of conv3) to
      ``out`` channels; the C results are **summed** (the aggregation), then
      conv3's norm is applied, before the shortcut is added (as the paper says).
    * ``"b"``: the C paths' 1x1 and 3x3 convs are explicit, their outputs are
      **concatenated**, then one 1x1 conv (conv3) maps C*d -> out (Fig. 3b).
    * ``"c"``: one 1x1, one **grouped** 3x3 with C groups, one 1x1 (Fig. 3c,
      what the paper implements, and by far the fastest).

    Normalization is per channel for the BN family, so in forms a/b the norm of
    conv1/conv2 is applied once to the C stacked path outputs: that equals C
    separate per-path norms, with the same statistics. Parameter tensors and
    state-dict keys are those of Detectron2's ``BottleneckBlock``, so any
    checkpoint loads into any form, and forms give the same outputs and
    gradients (to float tolerance).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        cardinality: int,
        bottleneck_width: int,
        stride: int = 1,
        norm: str = "BN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
        form: str = "c",
    ):
        """
        Args:
            in_channels: input channels of the block.
            out_channels: output channels of the block.
            cardinality: C, the number of paths (groups of the 3x3 conv).
            bottleneck_width: d, the width of one path in this block (so the
                grouped conv has C*d channels).
            stride: 2 for the first block of res3..res5, else 1.
            norm: a Detectron2 norm name, see :func:`detectron2.layers.get_norm`.
            stride_in_1x1: put the stride on the first 1x1 conv (MSRA/Caffe2)
                rather than the 3x3 conv (torchvision, Torch7, timm).
            dilation: dilation of the 3x3 conv.
            form: "a", "b" or "c" (Fig. 3); see the class docstring.
        """
        super().__init__(in_channels, out_channels, stride)
        if form not in BLOCK_FORMS:
            raise ConfigError(f"ResNeXtBlock form must be one of {BLOCK_FORMS}, got {form!r}")
        self.cardinality = cardinality
        self.bottleneck_width = bottleneck_width
        self.form = form
        self.dilation = dilation
        width = cardinality * bottleneck_width

        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                kernel_size=1,
                stride=stride,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
        else:
            self.shortcut = None

        # The original MSRA ResNet puts the stride in the first 1x1 conv;
        # fb.resnet.torch (the paper's code base) and torchvision in the 3x3.
        self.stride_1x1, self.stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)

        self.conv1 = Conv2d(
            in_channels,
            width,
            kernel_size=1,
            stride=self.stride_1x1,
            bias=False,
            norm=get_norm(norm, width),
        )
        self.conv2 = Conv2d(
            width,
            width,
            kernel_size=3,
            stride=self.stride_3x3,
            padding=dilation,
            bias=False,
            groups=cardinality,
            dilation=dilation,
            norm=get_norm(norm, width),
        )
        self.conv3 = Conv2d(
            width,
            out_channels,
            kernel_size=1,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                weight_init.c2_msra_fill(layer)

    # TorchScript compiles every branch of forward whatever self.form is, so forms a
    # and b are written in its subset too: explicit loops (no generators, no module
    # passed as an argument), each norm read from its conv (None once folded).

    def _paths_1x1_3x3(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The first two layers of the C explicit paths (forms a and b)."""
        d = self.bottleneck_width
        w1 = self.conv1.weight.split(d, dim=0)  # C x (d, in, 1, 1)
        w2 = self.conv2.weight.split(d, dim=0)  # C x (d, d, 3, 3): group i
        h: List[torch.Tensor] = []
        for w in w1:
            h.append(F.conv2d(x, w, stride=self.stride_1x1))
        y = torch.cat(h, dim=1)
        if self.conv1.norm is not None:
            y = self.conv1.norm(y)
        h1 = F.relu_(y).split(d, dim=1)
        h = []
        for i in range(len(w2)):
            h.append(
                F.conv2d(
                    h1[i],
                    w2[i],
                    stride=self.stride_3x3,
                    padding=self.dilation,
                    dilation=self.dilation,
                )
            )
        y = torch.cat(h, dim=1)
        if self.conv2.norm is not None:
            y = self.conv2.norm(y)
        return F.relu_(y).split(d, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "c":
            out = F.relu_(self.conv1(x))
            out = F.relu_(self.conv2(out))
            out = self.conv3(out)
        elif self.form == "b":
            paths = self._paths_1x1_3x3(x)
            out = self.conv3(torch.cat(paths, dim=1))
        else:  # "a": each path ends in its own 1x1 to `out`; aggregate by summing.
            paths = self._paths_1x1_3x3(x)
            w3 = self.conv3.weight.split(self.bottleneck_width, dim=1)  # C x (out, d, 1, 1)
            out = F.conv2d(paths[0], w3[0])
            for i in range(1, len(paths)):
                out = out + F.conv2d(paths[i], w3[i])
            if self.conv3.norm is not None:
                out = self.conv3.norm(out)

        shortcut = self.shortcut(x) if self.shortcut is not None else x
        # In place, as Detectron2's BottleneckBlock: a new tensor here cost ~3-7% of
        # the trunk's forward on CPU (allocation + page faults; tools/benchmark.py).
        out += shortcut
        return F.relu_(out)


def make_resnext_stage(
    *,
    num_blocks: int,
    in_channels: int,
    out_channels: int,
    bottleneck_width: int,
    cardinality: int,
    first_stride: int,
    dilation: int = 1,
    norm: str = "FrozenBN",
    stride_in_1x1: bool = False,
    form: str = "c",
) -> List[ResNeXtBlock]:
    """One stage (res2..res5) of :class:`ResNeXtBlock`; downsampling in its first block.

    ``bottleneck_width`` is d *of this stage* (the paper doubles it per stage).
    """
    return ResNet.make_stage(
        ResNeXtBlock,
        num_blocks,
        in_channels=in_channels,
        out_channels=out_channels,
        stride_per_block=[first_stride] + [1] * (num_blocks - 1),
        cardinality=cardinality,
        bottleneck_width=bottleneck_width,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        dilation=dilation,
        form=form,
    )


class ResNeXt(ResNet):
    """Detectron2's :class:`ResNet` trunk built from :class:`ResNeXtBlock` stages.

    Only the stages up to the last of ``spec.out_features`` are built (C4 models
    put res5 in the ROI head, :class:`ResNeXtRes5ROIHeads`).
    """

    def __init__(self, spec: ResNeXtSpec, *, in_channels: int = 3):
        """
        Args:
            spec: the architecture, usually ``ResNeXtSpec.from_config(cfg)``.
            in_channels: channels of the input image.
        """
        stem = BasicStem(in_channels=in_channels, out_channels=spec.stem_out_channels, norm=spec.norm)
        last = max(FEATURE_NAMES.index(f) for f in spec.out_features)  # 0 = stem .. 4 = res5
        stages = [
            make_resnext_stage(**spec.stage_args(stage)) for stage in range(2, 2 + max(last, 1))
        ]
        super().__init__(stem, stages, out_features=list(spec.out_features), freeze_at=spec.freeze_at)
        if last == 0:  # only "stem" asked for: do not keep an unused res2
            del self.res2
            self.stages, self.stage_names = [], ()
        self.spec = spec
        self.channels_last = spec.channels_last
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """:meth:`ResNet.forward` (written out: TorchScript has no ``super()``), with
        NHWC activations when ``channels_last``."""
        if x.dim() != 4:
            raise ConfigError(f"ResNeXt takes an input of shape (N, C, H, W), got {x.shape}.")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs: Dict[str, torch.Tensor] = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        # A ModuleList when scripted (ResNet.__prepare_scriptable__, Detectron2's patch).
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


def _check_fpn_inputs(cfg, bottom_up: ResNeXt, in_features: Sequence[str]) -> None:
    if not in_features:
        raise ConfigError(
            "MODEL.FPN.IN_FEATURES is empty: name the ResNeXt stages the FPN reads, e.g. "
            '["res2", "res3", "res4", "res5"] (or ["res3", "res4", "res5"] for RetinaNet).'
        )
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ConfigError(
            f"MODEL.FPN.IN_FEATURES = {list(in_features)} needs {missing} from the backbone, but "
            f"MODEL.RESNEXT.OUT_FEATURES = {list(cfg.MODEL.RESNEXT.OUT_FEATURES)}: "
            f"add {missing} to MODEL.RESNEXT.OUT_FEATURES."
        )


@BACKBONE_REGISTRY.register()
def build_resnext_backbone(cfg, input_shape: ShapeSpec) -> ResNeXt:
    """Plain ResNeXt trunk (C4 models: ``OUT_FEATURES: ["res4"]``), from ``MODEL.RESNEXT``."""
    return ResNeXt(ResNeXtSpec.from_config(cfg), in_channels=input_shape.channels)


@BACKBONE_REGISTRY.register()
def build_resnext_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNeXt + FPN with P2-P6 (P6 by max-pooling P5), as Detectron2's R-FPN models."""
    bottom_up = build_resnext_backbone(cfg, input_shape)
    # fmt: off
    in_features  = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    # fmt: on
    _check_fpn_inputs(cfg, bottom_up, in_features)
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_resnext_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNeXt + FPN with P3-P7 (P6, P7 by stride-2 convs on res5), for RetinaNet."""
    bottom_up = build_resnext_backbone(cfg, input_shape)
    # fmt: off
    in_features  = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    # fmt: on
    _check_fpn_inputs(cfg, bottom_up, in_features)
    if "res5" not in bottom_up.output_shape():
        raise ConfigError(
            "RetinaNet's P6/P7 are computed from res5: add 'res5' to MODEL.RESNEXT.OUT_FEATURES."
        )
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(in_channels_p6p7, out_channels),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
