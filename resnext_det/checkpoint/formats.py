# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Name mappings of every public ImageNet format to Detectron2's ResNet names.

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
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "FORMATS",
    "BN_EPS",
    "ConversionError",
    "torchvision_to_d2",
    "caffe2_to_d2",
    "detectron2_to_d2",
    "torch7_to_d2",
    "torch7_layout",
    "t7_field",
    "t7_typename",
    "t7_modules",
]

FORMATS = ("auto", "torchvision", "timm", "caffe2", "torch7", "detectron2")
#: eps of Detectron2's FrozenBatchNorm2d / BatchNorm2d. BN without statistics
#: (Caffe2 AffineChannel) is written with running_var = 1 - BN_EPS so that the
#: frozen BN computes exactly x * scale + bias.
BN_EPS = 1e-5
_BN_STATS = ("weight", "bias", "running_mean", "running_var")
_D2_BACKBONE_KEY = re.compile(
    r"(stem\.conv1|res[2-5]\.\d+\.(conv[123]|shortcut))(\.norm)?\.(weight|bias|running_mean|running_var)"
)


class ConversionError(UserError):
    """The input cannot be converted as asked; the message says what to change."""



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


def detectron2_to_d2(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str], bool]:
    """Detectron2 names already: the classifier is dropped, and BN without
    statistics (affine only) gets running_mean 0 and running_var 1 - eps, as in
    :func:`caffe2_to_d2`. Returns (weights, dropped, affine)."""
    out: Dict[str, torch.Tensor] = {}
    dropped = []
    for k, v in tensors.items():
        if k.endswith("num_batches_tracked"):
            continue
        if _is_classifier(k):
            dropped.append(k)
        else:
            out[k] = v
    affine = False
    for k in [k for k in out if k.endswith(".norm.weight")]:
        p = k[: -len("weight")]
        if p + "running_mean" not in out:
            affine = True
            out[p + "running_mean"] = torch.zeros_like(out[k])
            out[p + "running_var"] = torch.full_like(out[k], 1.0 - BN_EPS)
    return out, dropped, affine


# --------------------------------------------------------------------------
# Torch7 module trees (torchfile objects), as the name mapping and the
# ``--verify`` reference (:mod:`.verify`) read them
# --------------------------------------------------------------------------
def t7_field(obj, name: str, default=None):
    """A field of a torchfile object (``default`` when absent; an empty Lua table
    reads as a list, so attribute access cannot be used)."""
    d = getattr(obj, "_obj", None)
    if isinstance(d, dict):
        for k in (name, name.encode()):
            if k in d:
                return d[k]
    return default


def t7_typename(obj) -> str:
    """The Torch7 class of a torchfile object (e.g. "nn.Sequential", "cudnn.SpatialConvolution")."""
    # torchfile's plain Lua tables answer any attribute with None: only a class has a name.
    name = getattr(obj, "torch_typename", None)
    t = name() if callable(name) else "a Lua table" if isinstance(obj, dict) else type(obj).__name__
    return t.decode() if isinstance(t, bytes) else str(t)


def t7_modules(obj) -> list:
    """The child modules of a Torch7 container, in order (one replica of a
    DataParallelTable); [] for a module without children."""
    mods = t7_field(obj, "modules")
    if mods is None:
        return []
    if isinstance(mods, dict):  # a table that was not list-like
        mods = [mods[k] for k in sorted(mods)]
    if t7_typename(obj).endswith("DataParallelTable"):
        mods = mods[:1]  # one replica per GPU: they are the same network
    return list(mods)


def _is_conv(obj) -> bool:
    return re.search(r"SpatialConvolution(MM)?$", t7_typename(obj)) is not None


def _is_bn(obj) -> bool:
    return t7_typename(obj).endswith("SpatialBatchNormalization")


def _arr(x) -> Optional[torch.Tensor]:
    if x is None or (isinstance(x, np.ndarray) and x.size == 0):
        return None
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _t7_conv(conv, *, where: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A Torch7 convolution's weight as (out, in, kH, kW), and its bias; ``where`` (e.g.
    "res3.0.conv2") names it in the error when its fields do not describe its weight."""
    w = _arr(t7_field(conv, "weight"))
    if w is None:
        raise ConversionError(f"{where}: a Torch7 {t7_typename(conv)} has no weight")
    shape = {k: t7_field(conv, k) for k in ("kH", "kW", "nOutputPlane")}
    try:
        kh, kw, n_out = (int(shape[k]) for k in ("kH", "kW", "nOutputPlane"))
    except (TypeError, ValueError):
        kh = kw = n_out = 0
    if min(kh, kw, n_out) < 1 or w.numel() % (n_out * kh * kw):
        raise ConversionError(
            f"{where}: a Torch7 {t7_typename(conv)} whose kH, kW, nOutputPlane "
            f"({', '.join(f'{k}={v!r}' for k, v in shape.items())}) do not describe its weight of "
            f"shape {tuple(w.shape)}: the file is damaged or not a Torch7 convolution"
        )
    w = w.reshape(n_out, -1, kh, kw)  # SpatialConvolutionMM stores (out, in*kh*kw)
    return w, _arr(t7_field(conv, "bias"))


def _t7_bn(bn, conv_bias: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A Torch7 BN (after a conv with ``conv_bias``) as Detectron2 BN tensors.

    A conv bias b before BN is folded exactly: BN(y + b) = BN'(y) with
    running_mean' = running_mean - b. A Torch7 eps other than Detectron2's is
    folded into running_var; old files store running_std = 1/sqrt(var + eps).
    """
    mean = _arr(t7_field(bn, "running_mean"))
    eps = float(t7_field(bn, "eps")) if t7_field(bn, "eps") is not None else 1e-5
    var = _arr(t7_field(bn, "running_var"))
    if var is None and t7_field(bn, "running_std") is not None:
        var = 1.0 / _arr(t7_field(bn, "running_std")) ** 2 - eps
    if mean is None or var is None:
        raise ConversionError("a Torch7 SpatialBatchNormalization has no running statistics")
    c = mean.numel()
    w = _arr(t7_field(bn, "weight"))
    b = _arr(t7_field(bn, "bias"))
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
    mods = t7_modules(seq)
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
    for m in t7_modules(obj):
        t = t7_typename(m)
        if t.endswith("ConcatTable"):
            acc.append((ancestors, m))
        elif t.endswith("Sequential") or t.endswith("DataParallelTable"):
            _find_blocks(m, ancestors, acc)
    return acc


def _first_conv_bn(obj):
    """The stem: the first conv (and its BN) outside any residual block."""
    mods = t7_modules(obj)
    for i, m in enumerate(mods):
        t = t7_typename(m)
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
    branches = t7_modules(concat)
    return len(branches) == 2 and bool(t7_modules(branches[1])) and bool(_conv_bn_pairs(branches[1]))


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
    w, b = _t7_conv(stem[0], where="stem.conv1")
    out["stem.conv1.weight"] = w
    for k, v in _t7_bn(stem[1], b).items():
        out[f"stem.conv1.norm.{k}"] = v

    for s, stage_blocks in enumerate(stages):
        for j, (_, block) in enumerate(stage_blocks):
            prefix = f"res{s + 2}.{j}"
            branches = t7_modules(block)
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
                w, b = _t7_conv(conv, where=f"{prefix}.conv{k}")
                out[f"{prefix}.conv{k}.weight"] = w
                for n, v in _t7_bn(bn, b).items():
                    out[f"{prefix}.conv{k}.norm.{n}"] = v
            sc = _conv_bn_pairs(shortcut) if t7_modules(shortcut) else []
            if len(sc) == 1:
                w, b = _t7_conv(sc[0][0], where=f"{prefix}.shortcut")
                out[f"{prefix}.shortcut.weight"] = w
                for n, v in _t7_bn(sc[0][1], b).items():
                    out[f"{prefix}.shortcut.norm.{n}"] = v
            elif sc or not t7_typename(shortcut).endswith("Identity"):
                raise ConversionError(
                    f"{prefix}: shortcut {t7_typename(shortcut)} is neither nn.Identity nor a 1x1 "
                    "conv + BN projection (type B)"
                )
    return out
