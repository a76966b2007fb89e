# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Convert ImageNet ResNeXt weights of any public format to a Detectron2 checkpoint.

Every source tensor is accounted for (the classifier is dropped on purpose),
the result must match, key for key and shape for shape, the
:class:`~resnext_det.modeling.ResNeXt` of the architecture inferred from it, and
the file records the weights' input convention and architecture
(:class:`~resnext_det.checkpoint.metadata.WeightsMetadata`).

The name mappings of each format are in :mod:`.formats`, what the tensors hold
(architecture, a detector's trunk and convention) in :mod:`.layout`.

Full detector checkpoints in Detectron2 names (another project's, e.g. Detectron2's
model zoo) keep every tensor; what the file tells about their input convention is
read by :func:`detector_convention`, recorded, and ``to_rgb`` flips their stem.
"""
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..modeling.spec import ResNeXtSpec
from ..presets import PRESETS
from ..utils.io import atomic_write, file_sha256
from .formats import (
    BN_EPS,
    FORMATS,
    ConversionError,
    caffe2_to_d2,
    detectron2_to_d2,
    torch7_to_d2,
    torchvision_to_d2,
)
from .layout import (
    TRUNK_PREFIXES,
    DetectorConvention,
    check_against_model,
    detector_arch,
    detector_convention,
    detector_trunk,
    infer_arch,
)
from .metadata import CONVENTIONS, METADATA_KEY, InputConvention, WeightsMetadata
from .readers import SourceWeights, key_family, read_weights_file

__all__ = [
    "FORMATS",
    "BN_EPS",
    "ConversionError",
    "ConversionResult",
    "convert_weights",
    "convert_detector",
    "save_converted",
    "infer_arch",
    "check_against_model",
    "DetectorConvention",
    "detector_convention",
    "detector_trunk",
]

logger = logging.getLogger(__name__)

@dataclass
class ConversionResult:
    """A converted backbone.

    Attributes:
        state_dict: Detectron2-named tensors (float32), ``stem.*``, ``res2.*`` .. ``res5.*``.
        metadata: what the weights need (input convention, architecture).
        format: the source format ("torchvision", "timm", "caffe2", "torch7", "detectron2").
        source: the file as read (kept for ``--verify``).
        dropped: source tensors left out on purpose (the ImageNet classifier).
        flipped_to_rgb: the stem conv's input channels were reversed (``--to-rgb``).
    """

    state_dict: Dict[str, torch.Tensor]
    metadata: WeightsMetadata
    format: str
    source: SourceWeights
    dropped: List[str] = field(default_factory=list)
    flipped_to_rgb: bool = False

    def checkpoint(self) -> dict:
        """The dict written to disk (Detectron2 checkpoint format)."""
        if self.metadata.kind == "detector":  # full names: no heuristics
            return {
                "model": self.state_dict,
                "__author__": f"resnext_det tools/convert_pretrained.py (from {self.source.extra.get('__author__') or 'a detector'})",
                METADATA_KEY: self.metadata.to_dict(),
            }
        return {
            "model": self.state_dict,
            "__author__": f"resnext_det tools/convert_pretrained.py (from {self.format})",
            # Plain Detectron2 (without resnext_det's checkpointer) then maps
            # res5.* to roi_heads.res5.* (C4) and stem/res* to backbone.bottom_up.*
            # (FPN) by suffix, as it does for its own ImageNet files.
            "matching_heuristics": True,
            METADATA_KEY: self.metadata.to_dict(),
        }

    def verification_view(self) -> "ConversionResult":
        """What ``--verify`` compares: the backbone itself, or a detector's ResNet
        trunk (source and converted), as a backbone in Detectron2 names."""
        if self.metadata.kind != "detector":
            return self
        src = dataclasses.replace(self.source, tensors=detector_trunk(self.source.tensors))
        return dataclasses.replace(
            self,
            state_dict=detector_trunk(self.state_dict),
            metadata=dataclasses.replace(self.metadata, kind="backbone"),
            format="detectron2",
            source=src,
        )


# --------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------
def _check_requested_arch(arch: ResNeXtSpec, requested: Optional[str], path: str) -> None:
    if not requested:
        return
    if requested not in PRESETS:
        raise ConversionError(
            f"--arch {requested!r} is not a known architecture: choose one of {sorted(PRESETS)}"
        )
    p = PRESETS[requested]
    if not ResNeXtSpec.from_preset(requested).same_shapes(arch):
        found = arch.preset or "no named architecture"
        raise ConversionError(
            f"--arch {requested} (depth {p.depth}, C={p.cardinality}, d={p.bottleneck_width}) does "
            f"not match the weights in {path!r}, which hold {arch.describe()} = {found}. "
            f"Check that you downloaded the file you meant, or drop --arch"
            + (f" / pass --arch {arch.preset}" if arch.preset else "")
            + "."
        )


def _resolve_format(src: SourceWeights, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    if src.container == "t7":
        if fmt not in ("auto", "torch7"):
            raise ConversionError(
                f"{src.path!r} is a Torch7 file, not --format {fmt}: pass --format torch7 or auto"
            )
        return "torch7"
    if fmt == "torch7":
        raise ConversionError(
            f"--format torch7, but {src.path!r} is a {src.container} file, not a Torch7 .t7"
        )
    fam = key_family(src.tensors)
    if fam == "detector":
        raise ConversionError(
            f"{src.path!r} is a full detector checkpoint (keys 'backbone.*'), not an ImageNet "
            "backbone: use it directly as MODEL.WEIGHTS."
        )
    if fam is None:
        raise ConversionError(
            f"{src.path!r} does not hold a ResNeXt/ResNet in torchvision/timm, Detectron2 or "
            f"Caffe2 names; its keys start {sorted(src.tensors)[:6]}. (timm's 'resnext26ts' and "
            "other byobnet models are different networks.)"
        )
    want = {"torchvision": ("torchvision", "timm"), "caffe2": ("caffe2",), "detectron2": ("detectron2",)}[fam]
    if fmt == "auto":
        if fam == "torchvision":
            return "timm" if src.container == "safetensors" else "torchvision"
        return fam
    if fmt not in want:
        raise ConversionError(
            f"--format {fmt}, but {src.path!r} uses {fam} names: pass --format {want[0]} or auto"
        )
    return fmt


def _resolve_convention(
    fmt: str, src: SourceWeights, convention: Optional[str]
) -> Tuple[str, InputConvention, bool]:
    if convention is None:
        if fmt in ("torchvision", "timm", "torch7"):
            convention = "torchvision"
        elif fmt == "detectron2" and str(src.extra.get("__author__", "")).startswith("torchvision"):
            convention = "torchvision"
        else:
            # Caffe2 files of the same names come with three conventions; the
            # tensors cannot tell them apart, and a wrong guess costs a training run.
            raise ConversionError(
                f"the input convention of these {fmt} weights cannot be known from the file: pass "
                "--convention fair (Detectron2 zoo ImageNetPretrained/FAIR/*.pkl: BGR, std 57-58), "
                "--convention detectron1 (Detectron ImageNetPretrained/20171220/X-101-*.pkl: BGR, "
                "std 1), --convention msra (ImageNetPretrained/MSRA/R-*.pkl: BGR, std 1, stride in "
                "the 1x1 conv), or --convention torchvision. See docs/weights.md."
            )
    if convention not in CONVENTIONS:
        raise ConversionError(f"--convention {convention!r}: choose one of {sorted(CONVENTIONS)}")
    inp, stride = CONVENTIONS[convention]
    return convention, inp, stride


def convert_weights(
    path: str,
    *,
    fmt: str = "auto",
    arch: Optional[str] = None,
    convention: Optional[str] = None,
    pixel_mean: Optional[Sequence[float]] = None,
    pixel_std: Optional[Sequence[float]] = None,
    stride_in_1x1: Optional[bool] = None,
    to_rgb: bool = False,
    use_ema: bool = False,
    trust_pickle: bool = False,
    progress: bool = True,
    source: Optional[SourceWeights] = None,
) -> ConversionResult:
    """Read ``path`` and convert it to Detectron2 names, checking everything.

    A full detector checkpoint in Detectron2 names is not renamed: see
    :func:`convert_detector`, which this calls for one.

    Args:
        path: the ImageNet weight file (or detector checkpoint).
        fmt: one of :data:`FORMATS`; "auto" recognises it from the content.
        arch: a :data:`~resnext_det.presets.PRESETS` name the weights must be.
        convention: a :data:`~resnext_det.checkpoint.metadata.CONVENTIONS` name;
            by default the format's own (required for Caffe2 files).
        pixel_mean: override, 0-255 scale, in the convention's channel order.
        pixel_std: override, likewise.
        stride_in_1x1: override the convention's stride placement.
        to_rgb: reverse the stem conv's input channels of BGR weights, so that
            they take RGB input (exact; mean/std are reversed with them).
        use_ema: take a timm checkpoint's EMA weights.
        trust_pickle: allow arbitrary objects in pickles (trusted files only).
        progress: show a progress bar while copying tensors.
        source: ``path`` as :func:`~resnext_det.checkpoint.readers.read_weights_file`
            already read it (not read again).
    """
    t0 = time.perf_counter()
    size_mb = os.path.getsize(path) / 2**20 if os.path.isfile(path) else 0
    if source is None:
        logger.info("Reading %s (%.1f MB) ...", path, size_mb)
    src = source or read_weights_file(path, use_ema=use_ema, trust_pickle=trust_pickle)
    if src.container != "t7" and key_family(src.tensors) == "detector":
        if fmt not in ("auto", "detectron2"):
            raise ConversionError(
                f"{path!r} is a full detector checkpoint (keys 'backbone.*'), not --format {fmt}: "
                "pass --format auto"
            )
        if arch:
            _check_requested_arch(detector_arch(src.tensors, path), arch, path)
        return convert_detector(
            src, convention=convention, pixel_mean=pixel_mean, pixel_std=pixel_std,
            stride_in_1x1=stride_in_1x1, to_rgb=to_rgb,
        )
    fmt = _resolve_format(src, fmt)
    logger.info("Read %s as %s weights in %.1f s", path, fmt, time.perf_counter() - t0)

    dropped: List[str] = []
    norm = "BN"
    if fmt in ("torchvision", "timm"):
        sd, dropped = torchvision_to_d2(src.tensors, fmt=fmt)
    elif fmt == "caffe2":
        sd, dropped, affine = caffe2_to_d2(src.tensors)
        norm = "affine" if affine else "BN"
    elif fmt == "torch7":
        sd = torch7_to_d2(src.tree)
    else:  # detectron2 names already
        sd, dropped, affine = detectron2_to_d2(src.tensors)
        norm = "affine" if affine else "BN"

    arch_info = infer_arch(sd)
    _check_requested_arch(arch_info, arch, path)
    recorded = src.extra.get(METADATA_KEY)
    if fmt == "detectron2" and convention is None and isinstance(recorded, dict) and recorded.get("input"):
        # A file we converted before (e.g. converted again with --to-rgb).
        old = WeightsMetadata.from_dict(recorded)
        name, inp, conv_stride = "recorded", old.input, old.arch.stride_in_1x1
        norm = old.weights_norm
    else:
        name, inp, conv_stride = _resolve_convention(fmt, src, convention)
    try:
        if pixel_mean is not None:
            inp = dataclasses.replace(inp, pixel_mean=tuple(pixel_mean))
        if pixel_std is not None:
            inp = dataclasses.replace(inp, pixel_std=tuple(pixel_std))
    except ValueError as e:
        raise ConversionError(f"--pixel-mean / --pixel-std: {e}") from e
    stride = conv_stride if stride_in_1x1 is None else bool(stride_in_1x1)
    arch_info = arch_info.replace(stride_in_1x1=stride)
    check_against_model(sd, arch_info)

    items = sorted(sd.items())
    try:
        from tqdm import tqdm

        items = tqdm(items, desc="converting", unit="tensor", disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        pass
    out = {}
    for k, v in items:
        out[k] = v.detach().to(torch.float32).contiguous().clone()

    flipped = False
    if to_rgb:
        if inp.format == "BGR":
            out["stem.conv1.weight"] = out["stem.conv1.weight"].flip(1).contiguous()
            inp = inp.flipped()
            flipped = True
            logger.info("--to-rgb: reversed the stem conv's input channels (BGR -> RGB)")
        else:
            logger.info("--to-rgb: the weights already take RGB input; nothing to flip")

    source = {
        "format": fmt,
        "file": os.path.basename(path),
        "sha256": file_sha256(path),
        "convention": name,
        "flipped_to_rgb": flipped,
        "dropped": sorted(dropped),
    }
    meta = WeightsMetadata(kind="backbone", input=inp, arch=arch_info, source=source, weights_norm=norm)
    logger.info(
        "Converted %d tensors (%s) in %.1f s; dropped %s",
        len(out), arch_info.describe(), time.perf_counter() - t0, sorted(dropped) or "nothing",
    )
    return ConversionResult(out, meta, fmt, src, sorted(dropped), flipped)


def save_converted(result: ConversionResult, output: str) -> None:
    """Write ``result`` to ``output`` atomically (temp file + ``os.replace``)."""
    if not output.endswith((".pth", ".pt")):
        raise ConversionError(
            f"output {output!r}: name it *.pth (Detectron2 reads *.pkl files with pickle, not torch.load)"
        )
    atomic_write(output, lambda f: torch.save(result.checkpoint(), f))
    logger.info("Wrote %s", output)


def convert_detector(
    src: SourceWeights,
    *,
    convention: Optional[str] = None,
    pixel_mean: Optional[Sequence[float]] = None,
    pixel_std: Optional[Sequence[float]] = None,
    stride_in_1x1: Optional[bool] = None,
    to_rgb: bool = False,
) -> ConversionResult:
    """A full detector checkpoint in Detectron2 names, every tensor kept, with its
    input convention recorded (as the file tells it, :func:`detector_convention`,
    or as given); ``to_rgb`` reverses the stem conv's input channels of a BGR
    detector (and its mean/std with them), which is exact.
    """
    path = src.path
    found = detector_convention(src.tensors, src.extra)
    recorded = src.extra.get(METADATA_KEY)
    if isinstance(recorded, dict) and recorded.get("input") and convention is None:
        old = WeightsMetadata.from_dict(recorded)  # ours (trained or converted before)
        found = DetectorConvention(
            "a resnext_det detector", old.input.format, old.input.pixel_mean, old.input.pixel_std,
            old.arch.stride_in_1x1 if old.arch else None, found.arch,
        )
    if convention is not None:
        if convention not in CONVENTIONS:
            raise ConversionError(f"--convention {convention!r}: choose one of {sorted(CONVENTIONS)}")
        inp, stride = CONVENTIONS[convention]
        found = dataclasses.replace(
            found, format=inp.format, pixel_mean=inp.pixel_mean, pixel_std=inp.pixel_std, stride_in_1x1=stride
        )
    overrides = {"pixel_mean": pixel_mean, "pixel_std": pixel_std, "stride_in_1x1": stride_in_1x1}
    found = dataclasses.replace(
        found, **{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in overrides.items() if v is not None}
    )
    if found.arch is None:
        detector_arch(src.tensors, path)  # raises with the reason
    unknown = found.unknown_keys()
    if unknown:
        raise ConversionError(
            f"{path!r} is {found.origin} whose {', '.join(unknown)} the file does not tell: pass "
            "--convention fair|detectron1|msra|torchvision, or --pixel-mean/--pixel-std/"
            "--stride-in-1x1, with the values it was trained with (see docs/weights.md)"
        )
    try:
        meta = found.metadata()
    except ValueError as e:
        raise ConversionError(f"--pixel-mean / --pixel-std: {e}") from e
    out = {k: v.detach().contiguous().clone() for k, v in src.tensors.items()}
    flipped = False
    if to_rgb and meta.input.format == "BGR":
        for prefix in TRUNK_PREFIXES:
            if prefix + "stem.conv1.weight" in out:
                out[prefix + "stem.conv1.weight"] = out[prefix + "stem.conv1.weight"].flip(1).contiguous()
                break
        for k in ("pixel_mean", "pixel_std"):  # old Detectron2 files: keep them consistent
            if k in out and out[k].numel() == 3:
                out[k] = out[k].flip(0).contiguous()
        meta = dataclasses.replace(meta, input=meta.input.flipped())
        flipped = True
        logger.info("--to-rgb: reversed the stem conv's input channels of the detector (BGR -> RGB)")
    elif to_rgb:
        logger.info("--to-rgb: the detector already takes RGB input; nothing to flip")
    meta = dataclasses.replace(
        meta,
        source={
            "format": "detector",
            "origin": found.origin,
            "file": os.path.basename(path),
            "sha256": file_sha256(path),
            "flipped_to_rgb": flipped,
        },
    )
    return ConversionResult(out, meta, "detector", src, [], flipped)
