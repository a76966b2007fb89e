# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What a set of Detectron2-named tensors holds: the ResNeXt architecture (depth, C
and d from the shapes, Sec. 3.3 / Table 1), and, for a whole detector from another
project (e.g. Detectron2's model zoo), its trunk and what the file tells about its
input convention."""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..modeling.resnext import ResNeXt
from ..modeling.spec import STAGE_NAMES, ResNeXtSpec, ResNeXtSpecError
from .formats import ConversionError
from .metadata import CONVENTIONS, InputConvention, WeightsMetadata

__all__ = [
    "infer_arch",
    "trunk_spec",
    "check_against_model",
    "DETECTRON2_ZOO_AUTHOR",
    "TRUNK_PREFIXES",
    "detector_arch",
    "DetectorConvention",
    "detector_convention",
    "detector_trunk",
]

# --------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------
def infer_arch(sd: Dict[str, torch.Tensor], *, stride_in_1x1: bool = False) -> ResNeXtSpec:
    """Depth, C and d from Detectron2-named tensors: blocks per stage from the
    block indices, C and d from res2.0's grouped 3x3 conv (weight shape
    (C*d, d, 3, 3): d is its input channels per group, Sec. 3.3 / Fig. 3c)."""
    blocks = []
    for s in STAGE_NAMES:
        idx = sorted({int(m[1]) for k in sd for m in [re.match(rf"{s}\.(\d+)\.", k)] if m})
        if not idx:
            raise ConversionError(f"the weights have no {s} blocks: not a 4-stage ResNeXt/ResNet")
        if idx != list(range(len(idx))):
            raise ConversionError(f"{s} block indices are not 0..n-1: {idx}")
        blocks.append(len(idx))
    for k in ("stem.conv1.weight", "res2.0.conv2.weight", "res2.0.conv3.weight"):
        if k not in sd:
            raise ConversionError(f"the weights have no {k}")
    stem = sd["stem.conv1.weight"]
    if stem.dim() != 4 or tuple(stem.shape[1:]) != (3, 7, 7):
        raise ConversionError(
            f"stem conv weight has shape {tuple(stem.shape)}; the paper's stem is a 7x7 conv on 3 channels"
        )
    w2 = sd["res2.0.conv2.weight"]
    if w2.dim() != 4 or tuple(w2.shape[2:]) != (3, 3):
        raise ConversionError(f"res2.0 conv2 weight has shape {tuple(w2.shape)}, expected a 3x3 conv")
    width, d = int(w2.shape[0]), int(w2.shape[1])
    if width % d:
        raise ConversionError(f"res2.0 conv2: {width} channels are not a multiple of the group width {d}")
    try:
        return ResNeXtSpec(
            stage_blocks=tuple(blocks),
            cardinality=width // d,
            bottleneck_width=d,
            stem_out_channels=int(stem.shape[0]),
            res2_out_channels=int(sd["res2.0.conv3.weight"].shape[0]),
            stride_in_1x1=stride_in_1x1,
        )
    except ResNeXtSpecError as e:
        raise ConversionError(f"the weights' shapes make no ResNeXt: {e}") from e


def trunk_spec(arch: ResNeXtSpec) -> ResNeXtSpec:
    """``arch`` as the whole ImageNet trunk (stem..res5 out, FrozenBN, nothing frozen):
    the model a converted file is checked and verified against."""
    return arch.replace(norm="FrozenBN", out_features=STAGE_NAMES, freeze_at=0, form="c")


def check_against_model(sd: Dict[str, torch.Tensor], arch: ResNeXtSpec) -> None:
    """Raise unless ``sd`` has exactly the keys and shapes of our ResNeXt for ``arch``."""
    with torch.device("meta"):
        ref = ResNeXt(trunk_spec(arch)).state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} in the weights, {tuple(ref[k].shape)} in {arch.describe()}"
        for k in ref
        if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing, e.g. {missing[:6]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:6]}")
        if shapes:
            parts.append(f"{len(shapes)} of another shape, e.g. {shapes[:3]}")
        raise ConversionError(
            "the weights do not form a complete ResNeXt backbone: " + "; ".join(parts)
            + ". The file is incomplete or not the paper's architecture (widths must double each stage)."
        )


# --------------------------------------------------------------------------
# Detector checkpoints from elsewhere
# --------------------------------------------------------------------------
#: ``__author__`` of the files of Detectron2's model zoo (``model_final_*.pkl``).
DETECTRON2_ZOO_AUTHOR = "Detectron2 Model Zoo"
#: Where a detector in Detectron2 names keeps its ResNet trunk: FPN / RetinaNet
#: models under ``backbone.bottom_up.``, C4 models under ``backbone.`` with res5
#: in ``roi_heads.res5.``.
TRUNK_PREFIXES = ("backbone.bottom_up.", "backbone.")


def detector_trunk(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ResNet/ResNeXt trunk (``stem.*``, ``res2.*`` .. ``res5.*``) of a
    detector in Detectron2 names; empty when it has none."""
    for prefix in TRUNK_PREFIXES:
        if prefix + "stem.conv1.weight" in tensors:
            out = {}
            for k, v in tensors.items():
                if k.endswith("num_batches_tracked"):
                    continue
                if k.startswith(prefix) and re.match(r"(stem|res[2-5])\.", k[len(prefix):]):
                    out[k[len(prefix):]] = v
                elif prefix == "backbone." and k.startswith("roi_heads.res5."):
                    out[k[len("roi_heads."):]] = v
            return out
    return {}


def detector_arch(tensors: Dict[str, torch.Tensor], path: str = "") -> ResNeXtSpec:
    """The architecture of a detector's ResNet/ResNeXt trunk (:func:`detector_trunk`,
    :func:`infer_arch`); a ConversionError naming ``path`` when it has none."""
    trunk = detector_trunk(tensors)
    if not trunk:
        raise ConversionError(
            f"{path!r} is a detector without a ResNet/ResNeXt trunk in Detectron2 names "
            f"('backbone.bottom_up.stem.*' or 'backbone.stem.*'); its keys start {sorted(tensors)[:6]}"
        )
    return infer_arch(trunk)


def _vector3(v) -> Optional[Tuple[float, float, float]]:
    if isinstance(v, (torch.Tensor, np.ndarray)) and int(np.prod(v.shape)) == 3:
        return tuple(float(x) for x in torch.as_tensor(v).flatten())
    return None


def _close3(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= 1e-3 * max(1.0, abs(y)) for x, y in zip(a, b))


@dataclass(frozen=True)
class DetectorConvention:
    """What a detector checkpoint that does not record resnext_det metadata tells
    about the input it was trained on; None where the file cannot tell.

    Attributes:
        origin: where the file comes from, in words.
        format: "RGB" or "BGR" (``INPUT.FORMAT``).
        pixel_mean: 0-255 scale, in ``format`` order (``MODEL.PIXEL_MEAN``).
        pixel_std: likewise (``MODEL.PIXEL_STD``).
        stride_in_1x1: ``MODEL.RESNEXT.STRIDE_IN_1X1`` of its trunk.
        arch: its trunk's shapes (depth, C, d, widths), when it has a ResNet trunk.
    """

    origin: str
    format: Optional[str] = None
    pixel_mean: Optional[Tuple[float, float, float]] = None
    pixel_std: Optional[Tuple[float, float, float]] = None
    stride_in_1x1: Optional[bool] = None
    arch: Optional[ResNeXtSpec] = None

    def unknown_keys(self) -> List[str]:
        """The config keys whose value the file does not tell."""
        keys = [
            k
            for k, v in (
                ("INPUT.FORMAT", self.format),
                ("MODEL.PIXEL_MEAN", self.pixel_mean),
                ("MODEL.PIXEL_STD", self.pixel_std),
            )
            if v is None
        ]
        if self.arch is not None and self.stride_in_1x1 is None:
            keys.append("MODEL.RESNEXT.STRIDE_IN_1X1")
        return keys

    def metadata(self, assume: Optional[WeightsMetadata] = None) -> WeightsMetadata:
        """The file's metadata, what it does not tell taken from ``assume`` (the
        config's own values: not checked then; see :meth:`unknown_keys`)."""
        a_in = assume.input if assume is not None else None
        fmt = self.format or (a_in.format if a_in else None)
        mean = self.pixel_mean or (a_in.pixel_mean if a_in else None)
        std = self.pixel_std or (a_in.pixel_std if a_in else None)
        inp = InputConvention(fmt, "0-255", mean, std) if fmt and mean and std else None
        arch = None
        if self.arch is not None:
            stride = self.stride_in_1x1
            if stride is None and assume is not None and assume.arch is not None:
                stride = assume.arch.stride_in_1x1
            arch = self.arch.replace(stride_in_1x1=stride) if stride is not None else None
        return WeightsMetadata(kind="detector", input=inp, arch=arch, source={"origin": self.origin})

    def warning(self, what: str) -> str:
        """One line: which keys the user must check, for this file."""
        hint = ""
        if self.origin.startswith("a Detectron2 model-zoo") and "MODEL.PIXEL_STD" in self.unknown_keys():
            hint = (
                " (Detectron2's zoo: its R-* detectors from MSRA weights were trained with "
                "MODEL.PIXEL_STD [1, 1, 1] and MODEL.RESNEXT.STRIDE_IN_1X1 True, its 2021 LSJ "
                "baselines with [57.375, 57.12, 58.395] and True, its GN models with [1, 1, 1] and False)"
            )
        return (
            f"{what} is {self.origin} whose {', '.join(self.unknown_keys())} the file does not "
            "tell: the config's values are used unchecked; make sure they are those it was "
            f"trained with{hint}."
        )


def detector_convention(tensors: Dict[str, torch.Tensor], extra: dict) -> DetectorConvention:
    """What a detector checkpoint in Detectron2 names tells about its input.

    * Detectron2's model zoo (``__author__`` "Detectron2 Model Zoo", a ResNet
      trunk): every model takes BGR input with the Caffe2 mean; its ResNeXts stride
      in the 3x3 conv, and were trained with PIXEL_STD [57.375, 57.12, 58.395]
      (the X-101-32x8d ones, from ``ImageNetPretrained/FAIR``) or [1, 1, 1] (the
      X-152-32x8d one, from Detectron's IN5k file). Its ResNets came with std 1
      (MSRA, GN) or 57-58 (2021 LSJ baselines) and either stride: not known.
    * ``pixel_mean`` / ``pixel_std`` buffers, which Detectron2 wrote into the
      checkpoints of its first versions, give the values (and the channel order,
      when the mean is ImageNet's in one order).
    """
    author = str(extra.get("__author__", "") or "")
    arch = None
    trunk = detector_trunk(tensors)
    if trunk:
        try:
            arch = infer_arch(trunk)
        except ConversionError:
            arch = None
    mean, std = _vector3(tensors.get("pixel_mean")), _vector3(tensors.get("pixel_std"))
    bgr_mean = CONVENTIONS["fair"][0].pixel_mean
    if author == DETECTRON2_ZOO_AUTHOR and arch is not None:
        stride = None
        if arch.cardinality > 1:  # its ResNeXts: FAIR's X-101-32x8d, Detectron's X-152 IN5k
            stride = False
            if std is None:
                std = CONVENTIONS["detectron1" if arch.depth == 152 else "fair"][0].pixel_std
        return DetectorConvention("a Detectron2 model-zoo detector", "BGR", mean or bgr_mean, std, stride, arch)
    fmt = None
    if mean is not None:
        fmt = "BGR" if _close3(mean, bgr_mean) else "RGB" if _close3(mean, bgr_mean[::-1]) else None
    origin = f"a detector checkpoint ({author})" if author else "a detector checkpoint"
    return DetectorConvention(origin, fmt, mean, std, None, arch)
