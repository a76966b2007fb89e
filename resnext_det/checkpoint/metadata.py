# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What a converted checkpoint records about its weights, and the config it needs.

An ImageNet backbone is only correct with the input convention it was trained
with (channel order, pixel scale, mean/std) and with its exact architecture
(depth, cardinality C, bottleneck width d; Xie et al., CVPR 2017, Sec. 3.3 and
Table 1) and stride placement. A converted checkpoint stores both under the key
``"resnext_det"``; :func:`check_weights_against_config` compares them with a
config and names every key to change.
"""
import math
import shlex
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modeling.resnext import ResNeXt
from ..modeling.spec import ResNeXtSpec
from ..errors import UserError

__all__ = [
    "METADATA_KEY",
    "METADATA_VERSION",
    "WeightsConfigError",
    "InputConvention",
    "WeightsMetadata",
    "CONVENTIONS",
    "config_pairs",
    "format_opts",
    "config_yaml",
    "check_weights_against_config",
    "metadata_from_model",
    "spec_of_model",
]

#: Key of the metadata in a checkpoint dict (next to ``"model"``).
METADATA_KEY = "resnext_det"
METADATA_VERSION = 1


class WeightsConfigError(UserError):
    """The weights and the config disagree; the message names the keys to set."""


def _floats(v: Sequence[float]) -> Tuple[float, ...]:
    return tuple(float(x) for x in v)


@dataclass(frozen=True)
class InputConvention:
    """The input a backbone was trained on, in Detectron2's terms.

    Detectron2 always feeds 0-255 pixels and normalises with ``MODEL.PIXEL_MEAN``
    / ``MODEL.PIXEL_STD`` in the channel order of ``INPUT.FORMAT``, so a model
    trained on 0-1 RGB inputs with ImageNet mean/std (torchvision) has its
    mean/std multiplied by 255 here.

    Attributes:
        format: "RGB" or "BGR" (``INPUT.FORMAT``).
        scale: the pixel range the source framework fed, "0-1" or "0-255"
            (informative: ``pixel_mean``/``pixel_std`` already absorb it).
        pixel_mean: per channel, on the 0-255 scale, in ``format`` order.
        pixel_std: per channel, on the 0-255 scale, in ``format`` order.
    """

    format: str
    scale: str
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]

    def __post_init__(self):
        if self.format not in ("RGB", "BGR"):
            raise ValueError(f"input format must be 'RGB' or 'BGR', got {self.format!r}")
        for name in ("pixel_mean", "pixel_std"):
            v = _floats(getattr(self, name))
            if len(v) != 3:
                raise ValueError(f"{name} needs 3 values (one per channel), got {list(v)}")
            object.__setattr__(self, name, v)
        if min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_std must be positive, got {list(self.pixel_std)}")

    def flipped(self) -> "InputConvention":
        """The same convention with channels reversed (RGB <-> BGR)."""
        return replace(
            self,
            format="BGR" if self.format == "RGB" else "RGB",
            pixel_mean=self.pixel_mean[::-1],
            pixel_std=self.pixel_std[::-1],
        )

    def describe(self) -> str:
        return (
            f"{self.format} input ({self.scale} in the source framework), "
            f"PIXEL_MEAN {list(self.pixel_mean)}, PIXEL_STD {list(self.pixel_std)}"
        )


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

#: Known conventions of public ImageNet weights: name -> (input, STRIDE_IN_1X1).
CONVENTIONS: Dict[str, Tuple[InputConvention, bool]] = {
    # torchvision, timm (most weights: check the weight's pretrained_cfg), and the
    # official Torch7 release (fb.resnet.torch): RGB in [0, 1], ImageNet mean/std,
    # stride on the 3x3 conv.
    "torchvision": (
        InputConvention(
            "RGB",
            "0-1",
            tuple(round(255 * m, 6) for m in _IMAGENET_MEAN),
            tuple(round(255 * s, 6) for s in _IMAGENET_STD),
        ),
        False,
    ),
    # Detectron2 / Detectron model zoo "FAIR" ImageNet weights (ImageNetPretrained/
    # FAIR/X-101-32x8d.pkl, FAIR/R-50.pkl): BGR 0-255, ImageNet mean/std x 255.
    "fair": (
        InputConvention("BGR", "0-255", (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)),
        False,
    ),
    # Original MSRA ResNet (ImageNetPretrained/MSRA/R-50.pkl, R-101.pkl): BGR
    # 0-255, mean only (std 1), stride on the first 1x1 conv.
    "msra": (InputConvention("BGR", "0-255", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)), True),
    # Detectron (v1, Caffe2) ResNeXt ImageNet weights (ImageNetPretrained/20171220/
    # X-101-64x4d.pkl, X-152-32x8d-IN5k.pkl, ...): BGR 0-255, no std division (absorbed
    # into conv1), stride on the 3x3 conv; the mean Detectron2 uses for them.
    "detectron1": (InputConvention("BGR", "0-255", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)), False),
}


@dataclass(frozen=True)
class WeightsMetadata:
    """Everything :mod:`resnext_det.checkpoint` records next to the weights.

    Attributes:
        kind: "backbone" (converted ImageNet trunk, keys ``stem.*``,
            ``res2.*`` .. ``res5.*``) or "detector" (saved by our trainer).
        input: the input convention, or None when unknown.
        arch: the backbone architecture, or None when unknown. Of the spec, the
            fields that shapes decide (``ResNeXtSpec.SHAPE_FIELDS``) and
            ``stride_in_1x1`` are recorded; the others are the model's business.
        source: provenance (format, file name, sha256) for backbone files.
        weights_norm: how the file stores its norms: "BN" (running statistics from
            ImageNet), "affine" (Caffe2 AffineChannel: BN folded into scale and bias)
            or "GN" (GroupNorm: scale and bias, no statistics).
    """

    kind: str
    input: Optional[InputConvention]
    arch: Optional[ResNeXtSpec]
    source: Optional[dict] = None
    weights_norm: str = "BN"

    def to_dict(self) -> dict:
        arch = None
        if self.arch is not None:
            arch = {k: getattr(self.arch, k) for k in ResNeXtSpec.SHAPE_FIELDS}
            arch.update(stride_in_1x1=self.arch.stride_in_1x1, norm=self.weights_norm)
        return {
            "version": METADATA_VERSION,
            "kind": self.kind,
            "input": asdict(self.input) if self.input else None,
            "arch": arch,
            "source": dict(self.source) if self.source else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "WeightsMetadata":
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError(f"not resnext_det weights metadata: {d!r:.200}")
        if d.get("version", 1) > METADATA_VERSION:
            raise ValueError(
                f"the checkpoint's metadata is version {d['version']}, newer than this "
                f"resnext_det ({METADATA_VERSION}): update resnext_det"
            )
        inp = InputConvention(**d["input"]) if d.get("input") else None
        arch, weights_norm = None, "BN"
        if d.get("arch"):
            a = dict(d["arch"])
            weights_norm = a.pop("norm", "BN")
            arch = ResNeXtSpec(**{k: a[k] for k in ResNeXtSpec.SHAPE_FIELDS + ("stride_in_1x1",) if k in a})
        return cls(kind=d["kind"], input=inp, arch=arch, source=d.get("source"), weights_norm=weights_norm)


# --------------------------------------------------------------------------
# Config lines
# --------------------------------------------------------------------------
def _fmt_floats(v: Sequence[float]) -> List[float]:
    return [float(f"{x:.6g}") for x in v]


def config_pairs(meta: WeightsMetadata, weights: Optional[str] = None) -> List[Tuple[str, object]]:
    """The ``(KEY, value)`` pairs a config needs for these weights, in order."""
    pairs: List[Tuple[str, object]] = []
    if weights is not None:
        pairs.append(("MODEL.WEIGHTS", weights))
    a = meta.arch
    if a is not None:
        depth = a.standard_depth
        pairs += [
            ("MODEL.RESNEXT.PRESET", a.preset),
            ("MODEL.RESNEXT.DEPTH", depth if depth is not None else a.depth),
            ("MODEL.RESNEXT.STAGE_BLOCKS", [] if depth is not None else list(a.stage_blocks)),
            ("MODEL.RESNEXT.CARDINALITY", a.cardinality),
            ("MODEL.RESNEXT.BOTTLENECK_WIDTH", a.bottleneck_width),
            ("MODEL.RESNEXT.STEM_OUT_CHANNELS", a.stem_out_channels),
            ("MODEL.RESNEXT.RES2_OUT_CHANNELS", a.res2_out_channels),
            ("MODEL.RESNEXT.STRIDE_IN_1X1", bool(a.stride_in_1x1)),
        ]
    if meta.input is not None:
        pairs += [
            ("INPUT.FORMAT", meta.input.format),
            ("MODEL.PIXEL_MEAN", _fmt_floats(meta.input.pixel_mean)),
            ("MODEL.PIXEL_STD", _fmt_floats(meta.input.pixel_std)),
        ]
    return pairs


def _opt_value(v) -> str:
    """A value as Detectron2's ``merge_from_list`` parses it back (literal_eval)."""
    if isinstance(v, str):
        # Keep plain strings plain (yacs keeps what literal_eval cannot parse);
        # quote the ones literal_eval would turn into something else ("", "True").
        if v == "":
            return '""'
        if v in ("True", "False", "None") or v[:1] in "[(0123456789-'\"":
            return repr(v)
        return v
    return repr(v) if not isinstance(v, list) else "[" + ", ".join(repr(x) for x in v) + "]"


def format_opts(pairs: Sequence[Tuple[str, object]]) -> List[str]:
    """``KEY VALUE`` arguments for ``tools/train_net.py`` (one list item each)."""
    out: List[str] = []
    for k, v in pairs:
        out += [k, _opt_value(v)]
    return out


def config_yaml(pairs: Sequence[Tuple[str, object]], *, base: Optional[str] = None, header: str = "") -> str:
    """A Detectron2 yaml with ``_BASE_: base`` and ``pairs`` as nested keys
    (values in JSON notation, which YAML reads unchanged)."""
    import json

    tree: dict = {}
    for key, value in pairs:
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def emit(node: dict, indent: int) -> List[str]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out.append(" " * indent + f"{k}:")
                out += emit(v, indent + 2)
            else:
                out.append(" " * indent + f"{k}: {json.dumps(v)}")
        return out

    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if base is not None:
        lines.append(f"_BASE_: {json.dumps(base)}")
    return "\n".join(lines + emit(tree, 0)) + "\n"


# --------------------------------------------------------------------------
# Config <-> metadata
# --------------------------------------------------------------------------


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-3) for x, y in zip(a, b))


def spec_of_model(model: nn.Module) -> Optional[ResNeXtSpec]:
    """The :class:`ResNeXtSpec` of the (first) ResNeXt trunk in ``model``, or None
    for a model without one (e.g. Detectron2's built-in ResNet)."""
    for m in model.modules():
        if isinstance(m, ResNeXt):
            return m.spec
    return None


def metadata_from_model(model: nn.Module, cfg=None, *, kind: str = "detector") -> WeightsMetadata:
    """What a checkpoint of ``model`` records and expects: the input convention of
    ``cfg`` (``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN/STD``) or, without a yacs config
    (LazyConfig users), of the model itself (``input_format``, ``pixel_mean``,
    ``pixel_std`` of Detectron2's meta-architectures), and the architecture of the
    model's ResNeXt trunk."""
    if cfg is not None:
        fmt, mean, std = cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD
    else:
        fmt = getattr(model, "input_format", None)
        mean = [float(v) for v in getattr(model, "pixel_mean", torch.zeros(0)).flatten()]
        std = [float(v) for v in getattr(model, "pixel_std", torch.zeros(0)).flatten()]
    inp = None
    if fmt in ("RGB", "BGR") and len(mean) == 3 and len(std) == 3:
        inp = InputConvention(fmt, "0-255", tuple(mean), tuple(std))
    spec = spec_of_model(model)
    # GN keeps no running statistics: its weights are another kind than BN's.
    norm = "GN" if spec is not None and spec.norm == "GN" else "BN"
    return WeightsMetadata(kind=kind, input=inp, arch=spec, weights_norm=norm)


def check_weights_against_config(
    meta: WeightsMetadata, cfg, *, model: nn.Module, weights: str = ""
) -> List[str]:
    """Raise :class:`WeightsConfigError` when ``meta`` disagrees with ``model`` (its
    architecture) or ``cfg`` (the input convention; ``None``: the model's own
    ``input_format``/``pixel_mean``/``pixel_std``); the message lists each key and
    the ``KEY VALUE`` pairs that fix it. Returns warnings (non-fatal notes)."""
    want = metadata_from_model(model, cfg)
    problems: List[str] = []
    fixes: List[Tuple[str, object]] = []
    warnings: List[str] = []
    what = f"MODEL.WEIGHTS = {weights!r}" if weights else "The checkpoint"

    a, b = meta.arch, want.arch
    if a is not None and b is not None:
        if not a.same_shapes(b):
            problems.append(
                f"architecture: the weights are {a.describe()}, the config builds {b.describe()} "
                "(MODEL.RESNEXT.PRESET / DEPTH / STAGE_BLOCKS / CARDINALITY / BOTTLENECK_WIDTH)"
            )
            fixes += [p for p in config_pairs(WeightsMetadata("backbone", None, a)) if "STRIDE" not in p[0]]
        if bool(a.stride_in_1x1) != bool(b.stride_in_1x1):
            problems.append(
                f"MODEL.RESNEXT.STRIDE_IN_1X1: the weights were trained with the stride on the "
                f"{'first 1x1' if a.stride_in_1x1 else '3x3'} conv, the config puts it on the "
                f"{'first 1x1' if b.stride_in_1x1 else '3x3'} conv"
            )
            fixes.append(("MODEL.RESNEXT.STRIDE_IN_1X1", bool(a.stride_in_1x1)))
        if meta.weights_norm == "affine" and b.norm in ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN"):
            warnings.append(
                f"MODEL.RESNEXT.NORM = {b.norm!r} with Caffe2 weights whose BN is folded into an "
                "affine (no ImageNet statistics): training-mode BN normalises with batch statistics "
                "before that affine. FrozenBN reproduces the ImageNet network exactly."
            )
        if b.norm == "GN" and meta.weights_norm != "GN":
            warnings.append(
                "MODEL.RESNEXT.NORM = 'GN' with BN-trained weights: the convs load, GN's "
                "affine parameters take BN's, and the running statistics are dropped."
            )

    i, j = meta.input, want.input
    # Without a config, a model that does not say its input convention cannot be checked.
    if i is not None and (cfg is not None or j is not None):
        if j is None:
            problems.append(
                f"INPUT.FORMAT: the weights were trained on {i.format} input, the config "
                f"feeds {cfg.INPUT.FORMAT if cfg is not None else getattr(model, 'input_format', None)!r}"
            )
            fixes.append(("INPUT.FORMAT", i.format))
        else:
            if i.format != j.format:
                hint = (
                    " (or convert the weights again with --to-rgb, which flips the stem conv's "
                    "input channels so that an RGB config is right)"
                    if i.format == "BGR"
                    else ""
                )
                problems.append(
                    f"INPUT.FORMAT: the weights were trained on {i.format} input, the config "
                    f"feeds {j.format}{hint}"
                )
                fixes.append(("INPUT.FORMAT", i.format))
            if not _close(i.pixel_mean, j.pixel_mean):
                problems.append(
                    f"MODEL.PIXEL_MEAN: the weights need {list(i.pixel_mean)} ({i.format}, 0-255 "
                    f"scale), the config has {list(j.pixel_mean)}"
                )
                fixes.append(("MODEL.PIXEL_MEAN", _fmt_floats(i.pixel_mean)))
            if not _close(i.pixel_std, j.pixel_std):
                problems.append(
                    f"MODEL.PIXEL_STD: the weights need {list(i.pixel_std)} ({i.format}, 0-255 "
                    f"scale), the config has {list(j.pixel_std)}"
                )
                fixes.append(("MODEL.PIXEL_STD", _fmt_floats(i.pixel_std)))

    if problems:
        raise WeightsConfigError(
            f"{what} does not match the config (Detectron2 would only warn, then train or "
            "evaluate with the weights used wrongly):\n  - "
            + "\n  - ".join(problems)
            + "\nSet in the config (or append to the command line):\n  "
            + " ".join(shlex.quote(o) for o in format_opts(fixes))
        )
    return warnings
