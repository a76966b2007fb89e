# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Prove a conversion: run the source model and our backbone on the same input.

The reference is the source network itself, computed without our name mapping:
torchvision's / timm's ResNet built from the source state dict, a functional
network that reads Caffe2 blob names directly, a small interpreter that runs the
Torch7 module tree as stored (conv biases, BN eps and all), or Detectron2's own
ResNet for files already in Detectron2 names. Both see the same normalised
images; res2..res5 must agree to float precision.
"""
import logging
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet

from ..modeling.resnext import ResNeXt
from ..modeling.spec import STAGE_NAMES, ResNeXtSpec
from .convert import ConversionResult
from .formats import ConversionError, t7_field, t7_modules, t7_typename, torch7_layout
from .layout import trunk_spec

__all__ = ["torchvision_resnext", "reference_features", "verify_conversion", "max_relative_error"]

logger = logging.getLogger(__name__)


def _num_classes(tensors) -> int:
    for k in ("fc.weight", "fc1000_w"):
        if k in tensors:
            return int(tensors[k].shape[0])
    return 0


def _load_reference(model, tensors) -> None:
    sd = {k: v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("fc.")]
    if missing or unexpected:
        raise RuntimeError(
            "the reference model does not take the source weights: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def torchvision_resnext(
    arch: Union[ResNeXtSpec, str],
    *,
    num_classes: int = 1000,
    norm_layer: Optional[Callable[[int], torch.nn.Module]] = None,
    zero_init_residual: bool = False,
) -> tv_resnet.ResNet:
    """torchvision's ResNeXt/ResNet (``torchvision.models.resnet.ResNet``, Bottleneck
    blocks) of ``arch``'s blocks per stage, C and d: ``groups=C``,
    ``width_per_group=d``, so res2's grouped conv has C x d channels, as in
    ``resnext50_32x4d`` (C=1, d=64: ResNet-50). The one place the package builds
    it: the ``--verify`` reference of torchvision files, the classifier of
    pretraining stage 0 and the torchvision contender of the benchmark.

    torchvision's widths are fixed (stem 64, res2 256 channels): ``arch``'s
    ``stem_out_channels`` / ``res2_out_channels`` are not used, and a caller whose
    architecture may have others checks them first.

    Args:
        arch: the architecture, or a :data:`~resnext_det.presets.PRESETS` name.
        num_classes: outputs of the classifier ``fc``.
        norm_layer: torchvision's ``norm_layer`` (None: ``BatchNorm2d``; e.g.
            ``torchvision.ops.FrozenBatchNorm2d`` for detection).
        zero_init_residual: torchvision's: each block's last BN weight starts at 0.

    Returns:
        The model, initialised by torchvision from the global random generator.
    """
    if isinstance(arch, str):
        arch = ResNeXtSpec.from_preset(arch)
    return tv_resnet.ResNet(
        tv_resnet.Bottleneck,
        list(arch.stage_blocks),
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
        groups=arch.cardinality,
        width_per_group=arch.bottleneck_width,
        norm_layer=norm_layer,
    )


def _torchvision_features(result: ConversionResult, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    model = torchvision_resnext(result.metadata.arch, num_classes=_num_classes(result.source.tensors) or 1000)
    _load_reference(model, result.source.tensors)
    model.eval()
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for s, layer in zip(STAGE_NAMES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        h = layer(h)
        out[s] = h
    return out


def _timm_features(result: ConversionResult, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    try:
        from timm.models.resnet import Bottleneck, ResNet
    except ImportError:  # pragma: no cover - timm is a requirement
        logger.warning("timm is not importable: verifying against torchvision's ResNet (same keys)")
        return _torchvision_features(result, x)
    a = result.metadata.arch
    model = ResNet(
        block=Bottleneck,
        layers=list(a.stage_blocks),
        cardinality=a.cardinality,
        base_width=a.bottleneck_width,
        stem_width=a.stem_out_channels,
        num_classes=_num_classes(result.source.tensors),
    )
    _load_reference(model, result.source.tensors)
    model.eval()
    h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    out = {}
    for s, layer in zip(STAGE_NAMES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        h = layer(h)
        out[s] = h
    return out


def _caffe2_features(result: ConversionResult, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detectron's Caffe2 ResNet, read straight from blob names."""
    b = {k: v.float() for k, v in result.source.tensors.items()}
    stride_in_1x1 = result.metadata.arch.stride_in_1x1

    def affine(h, p):
        s, t = b[p + "_bn_s"], b[p + "_bn_b"]
        if p + "_bn_rm" in b:
            return F.batch_norm(h, b[p + "_bn_rm"], b[p + "_bn_riv"], s, t, False, 0.0, 1e-5)
        return h * s[None, :, None, None] + t[None, :, None, None]

    def conv(h, w, stride=1, pad=0):
        w = b[w]
        return F.conv2d(h, w, stride=stride, padding=pad, groups=h.shape[1] // w.shape[1])

    h = F.relu(affine(conv(x, "conv1_w", 2, 3), "res_conv1"))
    h = F.max_pool2d(h, 3, 2, 1)
    out = {}
    for s in range(2, 6):
        j = 0
        while f"res{s}_{j}_branch2a_w" in b:
            p = f"res{s}_{j}"
            stride = 2 if s > 2 and j == 0 else 1
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            y = F.relu(affine(conv(h, p + "_branch2a_w", s1), p + "_branch2a"))
            y = F.relu(affine(conv(y, p + "_branch2b_w", s3, 1), p + "_branch2b"))
            y = affine(conv(y, p + "_branch2c_w"), p + "_branch2c")
            sc = affine(conv(h, p + "_branch1_w", stride), p + "_branch1") if p + "_branch1_w" in b else h
            h = F.relu(y + sc)
            j += 1
        out[f"res{s}"] = h
    return out


class _Done(Exception):
    pass


def _torch7_features(result: ConversionResult, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run the Torch7 module tree as stored, recording each stage's output."""
    _, stages = torch7_layout(result.source.tree)
    # A stage's output is that of its last block: the ConcatTable's sum after CAddTable and
    # ReLU in the same container (blocks may be inlined in their stage's or the network's
    # nn.Sequential), else the end of the container that holds the ConcatTable.
    last_blocks = {id(stage[-1][0]): name for name, stage in zip(STAGE_NAMES, stages)}
    last_concats = {id(stage[-1][1]): name for name, stage in zip(STAGE_NAMES, stages)}
    out: Dict[str, torch.Tensor] = {}

    def record(name, h):
        if name not in out:
            out[name] = h
            if len(out) == 4:
                raise _Done

    def t(m, name):
        a = t7_field(m, name)
        return None if a is None else torch.as_tensor(a.copy(), dtype=torch.float32)

    def ints(m, *names):
        return tuple(int(t7_field(m, n) or 0) for n in names)

    def per_channel(v):
        return v[None, :, None, None]

    def run(m, h):
        typ = t7_typename(m)
        if typ.endswith(("Sequential", "DataParallelTable")):
            stage, added = None, False  # a stage's last block whose output comes next
            for c in t7_modules(m):
                h = run(c, h)
                if id(c) in last_concats:
                    stage, added = last_concats[id(c)], False
                elif stage is not None and t7_typename(c).endswith("CAddTable"):
                    added = True
                elif stage is not None and added and t7_typename(c).endswith("ReLU"):
                    record(stage, h)
                    stage = None
        elif typ.endswith("ConcatTable"):
            h = [run(c, h) for c in t7_modules(m)]
        elif typ.endswith("CAddTable"):
            h = sum(h[1:], h[0])
        elif typ.endswith("ReLU"):
            h = F.relu(h)
        elif typ.endswith("Identity"):
            pass
        elif typ.endswith(("SpatialConvolution", "SpatialConvolutionMM")):
            n_out, kh, kw = ints(m, "nOutputPlane", "kH", "kW")
            w = t(m, "weight").reshape(n_out, -1, kh, kw)  # MM: (out, in*kh*kw)
            h = F.conv2d(
                h, w, t(m, "bias"), stride=ints(m, "dH", "dW"), padding=ints(m, "padH", "padW"),
                groups=h.shape[1] // w.shape[1],
            )
        elif typ.endswith("SpatialBatchNormalization"):
            eps = float(t7_field(m, "eps", 1e-5))
            mean, var, weight, bias = (t(m, n) for n in ("running_mean", "running_var", "weight", "bias"))
            if var is not None:
                h = F.batch_norm(h, mean, var, weight, bias, False, 0.0, eps)
            else:  # old nn: running_std = 1 / sqrt(var + eps)
                h = (h - per_channel(mean)) * per_channel(t(m, "running_std"))
                if weight is not None:
                    h = h * per_channel(weight) + per_channel(bias)
        elif typ.endswith("SpatialMaxPooling"):
            h = F.max_pool2d(
                h, ints(m, "kH", "kW"), ints(m, "dH", "dW"), ints(m, "padH", "padW"),
                ceil_mode=bool(t7_field(m, "ceil_mode")),
            )
        else:
            raise RuntimeError(f"the Torch7 reference cannot run a {typ} before res5")
        if id(m) in last_blocks:
            record(last_blocks[id(m)], h)
        return h

    try:
        run(result.source.tree, x)
    except _Done:
        pass
    return out


def _detectron2_features(result: ConversionResult, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detectron2's own ResNet (BottleneckBlock with num_groups) on the file's tensors."""
    from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet

    a = result.metadata.arch
    stem = BasicStem(in_channels=3, out_channels=a.stem_out_channels, norm="FrozenBN")
    stages, in_ch, out_ch = [], a.stem_out_channels, a.res2_out_channels
    width = a.cardinality * a.bottleneck_width
    for i, n in enumerate(a.stage_blocks):
        stages.append(
            ResNet.make_stage(
                BottleneckBlock, n, stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=in_ch, out_channels=out_ch, bottleneck_channels=width,
                num_groups=a.cardinality, norm="FrozenBN", stride_in_1x1=a.stride_in_1x1,
            )
        )
        in_ch, out_ch, width = out_ch, out_ch * 2, width * 2
    model = ResNet(stem, stages, out_features=list(STAGE_NAMES)).eval()
    sd = {k: v for k, v in result.source.tensors.items() if k in model.state_dict()}
    # Detectron2's FrozenBN takes files without running statistics (affine only).
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if [k for k in missing if not k.endswith(("running_mean", "running_var"))]:
        raise RuntimeError(f"reference model does not take the source weights: missing {missing[:5]}")
    return model(x)


_REFERENCES = {
    "torchvision": _torchvision_features,
    "timm": _timm_features,
    "caffe2": _caffe2_features,
    "torch7": _torch7_features,
    "detectron2": _detectron2_features,
}


@torch.no_grad()
def reference_features(result: ConversionResult, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """res2..res5 of the source model on ``x`` (in the source's channel order)."""
    return _REFERENCES[result.format](result, x)


def max_relative_error(diffs: Dict[str, Tuple[float, float]]) -> float:
    """Largest ``max|ours - ref| / max(1, max|ref|)`` over the stages."""
    return max(d / max(1.0, m) for d, m in diffs.values())


@torch.no_grad()
def verify_conversion(
    result: ConversionResult, *, size: int = 224, batch: int = 2, seed: int = 0
) -> Dict[str, Tuple[float, float]]:
    """Run the source model and our ResNeXt (loaded strictly from the converted
    tensors, frozen BN, Fig. 3c form) on the same ``batch`` random normalised
    images of ``size`` x ``size``.

    Returns:
        {stage: (max abs difference, max abs reference value)} for res2..res5.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    try:
        ref = reference_features(result, x)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConversionError(f"--verify could not run the {result.format} source model: {e}") from e
    model = ResNeXt(trunk_spec(result.metadata.arch)).eval()
    model.load_state_dict(result.state_dict, strict=True)
    # --to-rgb weights take the channels reversed: feed them the same image.
    ours = model(x.flip(1) if result.flipped_to_rgb else x)
    return {s: (float((ours[s] - ref[s]).abs().max()), float(ref[s].abs().max())) for s in STAGE_NAMES}
