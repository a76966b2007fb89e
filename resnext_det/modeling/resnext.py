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
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem

from ..config import add_resnext_config
from ..presets import PRESETS, STAGE_BLOCKS

__all__ = [
    "BLOCK_FORMS",
    "ResNeXtBlock",
    "ResNeXt",
    "ResNeXtSpec",
    "resnext_spec_from_config",
    "make_resnext_stage",
    "build_resnext_backbone",
    "build_resnext_fpn_backbone",
    "build_resnext_retinanet_fpn_backbone",
]

BLOCK_FORMS = ("a", "b", "c")
_STAGE_NAMES = ("res2", "res3", "res4", "res5")
_FEATURE_NAMES = ("stem",) + _STAGE_NAMES
_NORMS = ("FrozenBN", "BN", "SyncBN", "GN", "nnSyncBN", "naiveSyncBN", "LN", "")


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
            raise ValueError(f"ResNeXtBlock form must be one of {BLOCK_FORMS}, got {form!r}")
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

    @staticmethod
    def _norm(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
        return conv.norm(x) if conv.norm is not None else x

    def _paths_1x1_3x3(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The first two layers of the C explicit paths (forms a and b)."""
        d = self.bottleneck_width
        w1 = self.conv1.weight.split(d, dim=0)  # C x (d, in, 1, 1)
        w2 = self.conv2.weight.split(d, dim=0)  # C x (d, d, 3, 3): group i
        h = [F.conv2d(x, w, stride=self.stride_1x1) for w in w1]
        h = F.relu_(self._norm(self.conv1, torch.cat(h, dim=1))).split(d, dim=1)
        h = [
            F.conv2d(
                hi,
                w,
                stride=self.stride_3x3,
                padding=self.dilation,
                dilation=self.dilation,
            )
            for hi, w in zip(h, w2)
        ]
        return F.relu_(self._norm(self.conv2, torch.cat(h, dim=1))).split(d, dim=1)

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
            out = sum(F.conv2d(p, w) for p, w in zip(paths, w3))
            out = self._norm(self.conv3, out)

        shortcut = self.shortcut(x) if self.shortcut is not None else x
        # In place, as Detectron2's BottleneckBlock: a new tensor here cost ~3-7% of
        # the trunk's forward on CPU (allocation + page faults; tools/benchmark.py).
        out += shortcut
        return F.relu_(out)


@dataclass(frozen=True)
class ResNeXtSpec:
    """A validated, fully resolved ResNeXt architecture (see ``MODEL.RESNEXT``)."""

    stage_blocks: Tuple[int, int, int, int]
    cardinality: int
    bottleneck_width: int
    form: str = "c"
    norm: str = "FrozenBN"
    stride_in_1x1: bool = False
    res5_dilation: int = 1
    out_features: Tuple[str, ...] = ("res4",)
    freeze_at: int = 2
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    channels_last: bool = False

    @property
    def depth(self) -> int:
        """3 layers a block, plus the stem conv and the classifier, as the paper counts."""
        return 3 * sum(self.stage_blocks) + 2

    def stage_args(self, stage: int) -> dict:
        """Keyword arguments of :func:`make_resnext_stage` for res{stage} (2..5)."""
        i = stage - 2
        dilation = self.res5_dilation if stage == 5 else 1
        first_stride = 1 if stage == 2 or dilation > 1 else 2
        in_channels = self.stem_out_channels if stage == 2 else self.res2_out_channels * 2 ** (i - 1)
        return dict(
            num_blocks=self.stage_blocks[i],
            in_channels=in_channels,
            out_channels=self.res2_out_channels * 2**i,
            # "the width of the bottleneck doubles when the feature map is downsampled"
            bottleneck_width=self.bottleneck_width * 2**i,
            cardinality=self.cardinality,
            first_stride=first_stride,
            dilation=dilation,
            norm=self.norm,
            stride_in_1x1=self.stride_in_1x1,
            form=self.form,
        )


def _bad(key: str, value, allowed: str) -> ValueError:
    return ValueError(f"MODEL.RESNEXT.{key} = {value!r} is not valid: {allowed}.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _default_resnext_node():
    from detectron2.config import CfgNode as CN

    cfg = CN()
    cfg.MODEL = CN()
    return add_resnext_config(cfg).MODEL.RESNEXT


def resnext_spec_from_config(cfg) -> ResNeXtSpec:
    """Read and validate ``cfg.MODEL.RESNEXT``; errors name the key to change."""
    r = cfg.MODEL.RESNEXT
    # fmt: off
    depth             = r.DEPTH
    cardinality       = r.CARDINALITY
    bottleneck_width  = r.BOTTLENECK_WIDTH
    # fmt: on
    if r.PRESET:
        if r.PRESET not in PRESETS:
            raise _bad("PRESET", r.PRESET, f"choose one of {sorted(PRESETS)} or '' (none)")
        preset = PRESETS[r.PRESET]
        d = _default_resnext_node()
        for key, ours, theirs, dflt in (
            ("DEPTH", depth, preset.depth, d.DEPTH),
            ("CARDINALITY", cardinality, preset.cardinality, d.CARDINALITY),
            ("BOTTLENECK_WIDTH", bottleneck_width, preset.bottleneck_width, d.BOTTLENECK_WIDTH),
        ):
            if ours not in (theirs, dflt):
                raise ValueError(
                    f"MODEL.RESNEXT.PRESET = {r.PRESET!r} sets {key} = {theirs}, but "
                    f"MODEL.RESNEXT.{key} = {ours}: remove one of the two."
                )
        depth, cardinality, bottleneck_width = preset

    if r.STAGE_BLOCKS:
        blocks = list(r.STAGE_BLOCKS)
        if len(blocks) != 4 or not all(_is_int(b) and b > 0 for b in blocks):
            raise _bad("STAGE_BLOCKS", blocks, "give 4 positive block counts for res2..res5, or []")
    else:
        if depth not in STAGE_BLOCKS:
            raise _bad(
                "DEPTH",
                depth,
                f"choose one of {sorted(STAGE_BLOCKS)}, or set MODEL.RESNEXT.STAGE_BLOCKS "
                "to 4 block counts for a custom depth",
            )
        blocks = STAGE_BLOCKS[depth]
    if not _is_int(cardinality) or cardinality < 1:
        raise _bad("CARDINALITY", cardinality, "the paper's C must be an integer >= 1 (e.g. 32)")
    if not _is_int(bottleneck_width) or bottleneck_width < 1:
        raise _bad("BOTTLENECK_WIDTH", bottleneck_width, "the paper's d must be an integer >= 1 (e.g. 4)")
    if r.BLOCK_FORM not in BLOCK_FORMS:
        raise _bad("BLOCK_FORM", r.BLOCK_FORM, f"choose one of {list(BLOCK_FORMS)} (Fig. 3)")
    if r.NORM not in _NORMS:
        raise _bad("NORM", r.NORM, f"choose one of {list(_NORMS)}")
    if r.NORM == "GN" and (cardinality * bottleneck_width) % 32:
        raise ValueError(
            f"MODEL.RESNEXT.NORM = 'GN' uses 32 groups, but C*d = {cardinality * bottleneck_width} "
            "(MODEL.RESNEXT.CARDINALITY x MODEL.RESNEXT.BOTTLENECK_WIDTH) is not a multiple of 32."
        )
    if r.RES5_DILATION not in (1, 2):
        raise _bad("RES5_DILATION", r.RES5_DILATION, "choose 1 or 2")
    out_features = tuple(r.OUT_FEATURES)
    bad = [f for f in out_features if f not in _FEATURE_NAMES]
    if not out_features or bad:
        raise _bad("OUT_FEATURES", list(out_features), f"name one or more of {list(_FEATURE_NAMES)}")
    if not _is_int(r.FREEZE_AT) or not 0 <= r.FREEZE_AT <= 5:
        raise _bad("FREEZE_AT", r.FREEZE_AT, "choose 0 (train all) .. 5 (freeze stem and res2..res5)")
    for key in ("STEM_OUT_CHANNELS", "RES2_OUT_CHANNELS"):
        if not _is_int(r[key]) or r[key] < 1:
            raise _bad(key, r[key], "must be a positive integer")
    return ResNeXtSpec(
        stage_blocks=tuple(blocks),
        cardinality=cardinality,
        bottleneck_width=bottleneck_width,
        form=r.BLOCK_FORM,
        norm=r.NORM,
        stride_in_1x1=bool(r.STRIDE_IN_1X1),
        res5_dilation=r.RES5_DILATION,
        out_features=out_features,
        freeze_at=r.FREEZE_AT,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        channels_last=bool(r.get("CHANNELS_LAST", False)),
    )


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
            spec: the architecture, usually from :func:`resnext_spec_from_config`.
            in_channels: channels of the input image.
        """
        stem = BasicStem(in_channels=in_channels, out_channels=spec.stem_out_channels, norm=spec.norm)
        last = max(_FEATURE_NAMES.index(f) for f in spec.out_features)  # 0 = stem .. 4 = res5
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

    def forward(self, x: torch.Tensor):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def _check_fpn_inputs(cfg, bottom_up: ResNeXt, in_features: Sequence[str]) -> None:
    if not in_features:
        raise ValueError(
            "MODEL.FPN.IN_FEATURES is empty: name the ResNeXt stages the FPN reads, e.g. "
            '["res2", "res3", "res4", "res5"] (or ["res3", "res4", "res5"] for RetinaNet).'
        )
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES = {list(in_features)} needs {missing} from the backbone, but "
            f"MODEL.RESNEXT.OUT_FEATURES = {list(cfg.MODEL.RESNEXT.OUT_FEATURES)}: "
            f"add {missing} to MODEL.RESNEXT.OUT_FEATURES."
        )


@BACKBONE_REGISTRY.register()
def build_resnext_backbone(cfg, input_shape: ShapeSpec) -> ResNeXt:
    """Plain ResNeXt trunk (C4 models: ``OUT_FEATURES: ["res4"]``), from ``MODEL.RESNEXT``."""
    return ResNeXt(resnext_spec_from_config(cfg), in_channels=input_shape.channels)


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
        raise ValueError(
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
