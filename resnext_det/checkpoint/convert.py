# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Convert ImageNet ResNeXt weights of any public format to a Detectron2 checkpoint.

Every source tensor is accounted for (the classifier is dropped on purpose),
the result must match, key for key and shape for shape, the
:class:`~resnext_det.modeling.ResNeXt` of the architecture inferred from it, and
the file records the weights' input convention and architecture
(:class:`~resnext_det.checkpoint.metadata.WeightsMetadata`).

Name mapping to Detectron2's ResNet names (``stem.conv1``, ``res2.0.conv1.norm``,
``res2.0.shortcut``), which the paper's block keeps (Sec. 3.3, Fig. 3c):

================  =======================  ===========================
Detectron2        torchvision / timm       Detectron / Caffe2 ``.pkl``
================  =======================  ===========================
stem.conv1        conv1, bn1               conv1_w, res_conv1_bn_*
resS.B.convK      layer(S-1).B.convK, bnK  resS_B_branch2{a,b,c}_*
resS.B.shortcut   layer(S-1).B.downsample  resS_B_branch1_*
================  =======================  ===========================

Torch7 ``.t7`` models (the paper's release) are mapped by walking the module
tree: each residual block is ``nn.Sequential(nn.ConcatTable(branch, shortcut),
nn.CAddTable, ReLU)``.

Full detector checkpoints in Detectron2 names (another project's, e.g. Detectron2's
model zoo) keep every tensor; what the file tells about their input convention is
read by :func:`detector_convention`, recorded, and ``to_rgb`` flips their stem.
"""
import dataclasses
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..modeling.resnext import ResNeXt
from ..modeling.spec import ResNeXtSpec, ResNeXtSpecError
from ..presets import PRESETS
from ..utils.io import atomic_write
from .metadata import CONVENTIONS, METADATA_KEY, InputConvention, WeightsMetadata
from .readers import SourceWeights, key_family, read_weights_file
from ..errors import UserError

__all__ = [
    "FORMATS",
    "BN_EPS",
    "ConversionError",
    "ConversionResult",
    "convert_weights",
    "save_converted",
    "torchvision_to_d2",
    "caffe2_to_d2",
    "torch7_to_d2",
    "torch7_layout",
    "infer_arch",
    "check_against_model",
    "DETECTRON2_ZOO_AUTHOR",
    "DetectorConvention",
    "detector_convention",
    "detector_trunk",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "torchvision", "timm", "caffe2", "torch7", "detectron2")
#: eps of Detectron2's FrozenBatchNorm2d / BatchNorm2d. BN without statistics
#: (Caffe2 AffineChannel) is written with running_var = 1 - BN_EPS so that the
#: frozen BN computes exactly x * scale + bias.
BN_EPS = 1e-5
_BN_STATS = ("weight", "bias", "running_mean", "running_var")
_D2_BACKBONE_KEY = re.compile(
    r"(stem\.conv1|res[2-5]\.\d+\.(conv[123]|shortcut))(\.norm)?\.(weight|bias|running_mean|running_var)"
)
_STAGES = ("res2", "res3", "res4", "res5")


class ConversionError(UserError):
    """The input cannot be converted as asked; the message says what to change."""


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
# Name mappings
# --------------------------------------------------------------------------
def _fail_unused(unused: Sequence[str], fmt: str) -> None:
    if not unused:
        return
    hints = []
    if any(re.match(r"conv1\.\d", k) for k in unused):
        hints.append("a deep 3x3 stem (timm '...d'/'...s' variants) is not the paper's 7x7 stem")
    if any(".downsample.2" in k for k in unused):
        hints.append("an average-pool shortcut (timm '...d' variants) is not the paper's 1x1 projection")
    if any(".se." in k or ".attn." in k for k in unused):
        hints.append("squeeze-excitation/attention (SE-ResNeXt) is not in the paper's block")
    raise ConversionError(
        f"{len(unused)} {fmt} tensors have no place in a ResNeXt backbone, e.g. "
        f"{sorted(unused)[:8]}" + (": " + "; ".join(hints) if hints else "")
        + ". Only the paper's ResNeXt/ResNet (7x7 stem, 1x1-3x3(grouped)-1x1 bottlenecks, "
        "1x1 projection shortcuts) can be converted."
    )


def _is_classifier(name: str) -> bool:
    return bool(re.match(r"^(fc|fc1000|classifier|head\.fc|linear|pred)([._]|$)", name))


def torchvision_to_d2(
    tensors: Dict[str, torch.Tensor], *, fmt: str = "torchvision"
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """torchvision / timm names -> Detectron2 names. Returns (weights, dropped)."""
    out: Dict[str, torch.Tensor] = {}
    dropped, unused = [], []
    for k, v in tensors.items():
        if k.endswith("num_batches_tracked"):
            continue
        if _is_classifier(k):
            dropped.append(k)
            continue
        m = re.fullmatch(r"conv1\.weight", k)
        if m:
            out["stem.conv1.weight"] = v
            continue
        m = re.fullmatch(r"bn1\.(weight|bias|running_mean|running_var)", k)
        if m:
            out[f"stem.conv1.norm.{m[1]}"] = v
            continue
        m = re.fullmatch(r"layer(\d)\.(\d+)\.conv(\d)\.weight", k)
        if m:
            out[f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"] = v
            continue
        m = re.fullmatch(r"layer(\d)\.(\d+)\.bn(\d)\.(weight|bias|running_mean|running_var)", k)
        if m:
            out[f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"] = v
            continue
        m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.0\.weight", k)
        if m:
            out[f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"] = v
            continue
        m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.1\.(weight|bias|running_mean|running_var)", k)
        if m and v.dim() == 1:
            out[f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"] = v
            continue
        unused.append(k)
    _fail_unused(unused, fmt)
    return out, dropped


def caffe2_to_d2(blobs: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str], bool]:
    """Detectron / Caffe2 blob names -> Detectron2 names, with Detectron2's own
    :func:`~detectron2.checkpoint.c2_model_loading.convert_basic_c2_names`.

    Caffe2 ImageNet models store BN folded into an AffineChannel (``_bn_s``,
    ``_bn_b``): the frozen BN gets running_mean 0 and running_var 1 - eps so
    that it computes exactly ``x * s + b``. Returns (weights, dropped, affine).
    """
    from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names

    names = [k for k in blobs if not k.endswith("_momentum")]
    renamed = convert_basic_c2_names(names)
    out: Dict[str, torch.Tensor] = {}
    dropped, unused = [], []
    for orig, new in zip(names, renamed):
        if _is_classifier(orig) or _is_classifier(new):
            dropped.append(orig)
        elif _D2_BACKBONE_KEY.fullmatch(new):
            out[new] = blobs[orig]
        else:
            unused.append(orig)
    _fail_unused(unused, "Caffe2")
    affine = False
    for k in list(out):
        if k.endswith(".norm.weight"):
            p = k[: -len("weight")]
            if p + "running_mean" not in out:
                affine = True
                c = out[k].numel()
                out[p + "running_mean"] = torch.zeros(c)
                out[p + "running_var"] = torch.full((c,), 1.0 - BN_EPS)
    return out, dropped, affine


def _field(obj, name: str, default=None):
    """A field of a torchfile object (``None`` when absent; an empty Lua table
    reads as a list, so attribute access cannot be used)."""
    d = getattr(obj, "_obj", None)
    if isinstance(d, dict):
        for k in (name, name.encode()):
            if k in d:
                return d[k]
    return default


def _typename(obj) -> str:
    t = obj.torch_typename() if hasattr(obj, "torch_typename") else type(obj).__name__
    return t.decode() if isinstance(t, bytes) else str(t)


def _t7_modules(obj) -> list:
    mods = _field(obj, "modules")
    if mods is None:
        return []
    if isinstance(mods, dict):  # a table that was not list-like
        mods = [mods[k] for k in sorted(mods)]
    if _typename(obj).endswith("DataParallelTable"):
        mods = mods[:1]  # one replica per GPU: they are the same network
    return list(mods)


def _is_conv(obj) -> bool:
    return re.search(r"SpatialConvolution(MM)?$", _typename(obj)) is not None


def _is_bn(obj) -> bool:
    return _typename(obj).endswith("SpatialBatchNormalization")


def _arr(x) -> Optional[torch.Tensor]:
    if x is None or (isinstance(x, np.ndarray) and x.size == 0):
        return None
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _t7_conv(conv) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    w = _arr(_field(conv, "weight"))
    if w is None:
        raise ConversionError(f"a Torch7 {_typename(conv)} has no weight")
    kh, kw, n_out = int(_field(conv, "kH")), int(_field(conv, "kW")), int(_field(conv, "nOutputPlane"))
    w = w.reshape(n_out, -1, kh, kw)  # SpatialConvolutionMM stores (out, in*kh*kw)
    return w, _arr(_field(conv, "bias"))


def _t7_bn(bn, conv_bias: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A Torch7 BN (after a conv with ``conv_bias``) as Detectron2 BN tensors.

    A conv bias b before BN is folded exactly: BN(y + b) = BN'(y) with
    running_mean' = running_mean - b. A Torch7 eps other than Detectron2's is
    folded into running_var; old files store running_std = 1/sqrt(var + eps).
    """
    mean = _arr(_field(bn, "running_mean"))
    eps = float(_field(bn, "eps")) if _field(bn, "eps") is not None else 1e-5
    var = _arr(_field(bn, "running_var"))
    if var is None and _field(bn, "running_std") is not None:
        var = 1.0 / _arr(_field(bn, "running_std")) ** 2 - eps
    if mean is None or var is None:
        raise ConversionError("a Torch7 SpatialBatchNormalization has no running statistics")
    c = mean.numel()
    w = _arr(_field(bn, "weight"))
    b = _arr(_field(bn, "bias"))
    if conv_bias is not None:
        mean = mean - conv_bias
    return {
        "weight": w if w is not None else torch.ones(c),
        "bias": b if b is not None else torch.zeros(c),
        "running_mean": mean,
        "running_var": var + (eps - BN_EPS),
    }


def _conv_bn_pairs(seq) -> List[Tuple[object, object]]:
    """(conv, bn) pairs of a flat Torch7 nn.Sequential, in order."""
    mods = _t7_modules(seq)
    pairs = []
    for i, m in enumerate(mods):
        if _is_conv(m):
            bn = mods[i + 1] if i + 1 < len(mods) and _is_bn(mods[i + 1]) else None
            if bn is None:
                raise ConversionError("a Torch7 convolution is not followed by SpatialBatchNormalization")
            pairs.append((m, bn))
    return pairs


def _find_blocks(obj, ancestors=(), acc=None):
    """[(ancestors, block ConcatTable)] in execution order; ``ancestors[-1]`` is
    the container holding the ConcatTable (fb.resnet.torch: the block's
    nn.Sequential), ``ancestors[-2]`` the stage's."""
    acc = [] if acc is None else acc
    ancestors = ancestors + (obj,)
    for m in _t7_modules(obj):
        t = _typename(m)
        if t.endswith("ConcatTable"):
            acc.append((ancestors, m))
        elif t.endswith("Sequential") or t.endswith("DataParallelTable"):
            _find_blocks(m, ancestors, acc)
    return acc


def _first_conv_bn(obj):
    """The stem: the first conv (and its BN) outside any residual block."""
    mods = _t7_modules(obj)
    for i, m in enumerate(mods):
        t = _typename(m)
        if t.endswith("ConcatTable"):
            return None
        if _is_conv(m):
            if i + 1 < len(mods) and _is_bn(mods[i + 1]):
                return m, mods[i + 1]
            raise ConversionError("the Torch7 stem conv is not followed by SpatialBatchNormalization")
        if t.endswith("Sequential") or t.endswith("DataParallelTable"):
            r = _first_conv_bn(m)
            if r is not None:
                return r
    return None


def _has_projection(concat) -> bool:
    branches = _t7_modules(concat)
    return len(branches) == 2 and bool(_t7_modules(branches[1])) and bool(_conv_bn_pairs(branches[1]))


def torch7_layout(tree):
    """The stem's (conv, bn) and, per stage, the blocks as (container, ConcatTable).

    Stages are the containers holding the blocks (fb.resnet.torch's ``layer``);
    if the tree is laid out otherwise, a stage starts at each projection shortcut.
    """
    if not hasattr(tree, "torch_typename"):
        raise ConversionError(f"the .t7 file holds a {type(tree).__name__}, not a Torch7 nn module")
    stem = _first_conv_bn(tree)
    if stem is None:
        raise ConversionError("no stem convolution found in the Torch7 model")
    blocks = _find_blocks(tree)
    if not blocks:
        raise ConversionError("no residual blocks (nn.ConcatTable) found in the Torch7 model")
    stages: List[list] = []
    key = None
    for ancestors, concat in blocks:
        parent = ancestors[-2] if len(ancestors) > 1 else None
        if not stages or parent is not key:
            stages.append([])
            key = parent
        stages[-1].append((ancestors[-1], concat))
    if len(stages) != 4:
        stages = []
        for ancestors, concat in blocks:
            if not stages or _has_projection(concat):
                stages.append([])
            stages[-1].append((ancestors[-1], concat))
    if len(stages) != 4:
        raise ConversionError(
            f"found {len(stages)} stages of residual blocks in the Torch7 model, expected 4 (res2..res5)"
        )
    return stem, stages


def torch7_to_d2(tree) -> Dict[str, torch.Tensor]:
    """Map a Torch7 ResNeXt (fb.resnet.torch / facebookresearch/ResNeXt layout)
    to Detectron2 names by walking its module tree."""
    stem, stages = torch7_layout(tree)
    out: Dict[str, torch.Tensor] = {}
    w, b = _t7_conv(stem[0])
    out["stem.conv1.weight"] = w
    for k, v in _t7_bn(stem[1], b).items():
        out[f"stem.conv1.norm.{k}"] = v

    for s, stage_blocks in enumerate(stages):
        for j, (_, block) in enumerate(stage_blocks):
            prefix = f"res{s + 2}.{j}"
            branches = _t7_modules(block)
            if len(branches) != 2:
                raise ConversionError(
                    f"{prefix}: a Torch7 residual block with {len(branches)} branches; only the "
                    "paper's form (c) (one grouped-conv branch + shortcut) is supported"
                )
            residual, shortcut = branches
            pairs = _conv_bn_pairs(residual)
            if len(pairs) != 3:
                raise ConversionError(
                    f"{prefix}: the residual branch has {len(pairs)} conv+BN layers, expected the "
                    "paper's 3 (1x1, grouped 3x3, 1x1); forms (a)/(b) and basic blocks are not supported"
                )
            for k, (conv, bn) in enumerate(pairs, start=1):
                w, b = _t7_conv(conv)
                out[f"{prefix}.conv{k}.weight"] = w
                for n, v in _t7_bn(bn, b).items():
                    out[f"{prefix}.conv{k}.norm.{n}"] = v
            sc = _conv_bn_pairs(shortcut) if _t7_modules(shortcut) else []
            if len(sc) == 1:
                w, b = _t7_conv(sc[0][0])
                out[f"{prefix}.shortcut.weight"] = w
                for n, v in _t7_bn(sc[0][1], b).items():
                    out[f"{prefix}.shortcut.norm.{n}"] = v
            elif sc or not _typename(shortcut).endswith("Identity"):
                raise ConversionError(
                    f"{prefix}: shortcut {_typename(shortcut)} is neither nn.Identity nor a 1x1 "
                    "conv + BN projection (type B)"
                )
    return out


# --------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------
def infer_arch(sd: Dict[str, torch.Tensor], *, stride_in_1x1: bool = False) -> ResNeXtSpec:
    """Depth, C and d from Detectron2-named tensors: blocks per stage from the
    block indices, C and d from res2.0's grouped 3x3 conv (weight shape
    (C*d, d, 3, 3): d is its input channels per group, Sec. 3.3 / Fig. 3c)."""
    blocks = []
    for s in _STAGES:
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
    return arch.replace(norm="FrozenBN", out_features=_STAGES, freeze_at=0, form="c")


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


# --------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
            _check_requested_arch(_detector_arch(src.tensors, path), arch, path)
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
        sd = {}
        for k, v in src.tensors.items():
            if k.endswith("num_batches_tracked"):
                continue
            if _is_classifier(k):
                dropped.append(k)
            else:
                sd[k] = v
        for k in [k for k in sd if k.endswith(".norm.weight")]:
            p = k[: -len("weight")]
            if p + "running_mean" not in sd:
                norm = "affine"
                sd[p + "running_mean"] = torch.zeros_like(sd[k])
                sd[p + "running_var"] = torch.full_like(sd[k], 1.0 - BN_EPS)

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
        "sha256": _sha256(path),
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


# --------------------------------------------------------------------------
# Detector checkpoints from elsewhere
# --------------------------------------------------------------------------
#: ``__author__`` of the files of Detectron2's model zoo (``model_final_*.pkl``).
DETECTRON2_ZOO_AUTHOR = "Detectron2 Model Zoo"
#: Where a detector in Detectron2 names keeps its ResNet trunk: FPN / RetinaNet
#: models under ``backbone.bottom_up.``, C4 models under ``backbone.`` with res5
#: in ``roi_heads.res5.``.
_TRUNK_PREFIXES = ("backbone.bottom_up.", "backbone.")


def detector_trunk(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ResNet/ResNeXt trunk (``stem.*``, ``res2.*`` .. ``res5.*``) of a
    detector in Detectron2 names; empty when it has none."""
    for prefix in _TRUNK_PREFIXES:
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


def _detector_arch(tensors: Dict[str, torch.Tensor], path: str = "") -> ResNeXtSpec:
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
        _detector_arch(src.tensors, path)  # raises with the reason
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
        for prefix in _TRUNK_PREFIXES:
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
            "sha256": _sha256(path),
            "flipped_to_rgb": flipped,
        },
    )
    return ConversionResult(out, meta, "detector", src, [], flipped)
