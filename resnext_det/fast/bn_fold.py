# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Frozen BatchNorm folded into the convolution before it.

The paper fine-tunes detectors with BN statistics frozen (Appendix B, as in
He et al. 2016): every ``conv -> FrozenBN`` pair is then one affine map,
``s * (W * x) + b == (s * W) * x + b`` with ``s = gamma / sqrt(var + eps)`` and
``b = beta - mean * s``. Two uses:

* :func:`fold_frozen_bn` (inference): a copy of the model whose convs carry
  ``s * W`` and a bias, and no norm: one pass over the activations instead of
  two or three. Exact up to float rounding (the tests check it in fp32).
* :func:`fuse_frozen_bn` (training): the same algebra done on the fly, each
  forward computes ``s * W`` from the trained ``W`` (tiny) and the conv adds the
  bias for free, so the activation-sized ``x * s + b`` and its backward are
  gone. State-dict keys and trainable parameters are unchanged (checkpoints
  load and save as before).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from ..modeling.resnext import ResNeXtBlock

__all__ = ["fold_frozen_bn", "fuse_frozen_bn", "FrozenBNFusedConv2d"]


def _scale_shift(bn: FrozenBatchNorm2d):
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


def _foldable_convs(model: nn.Module):
    """Detectron2 ``Conv2d``s followed by a ``FrozenBatchNorm2d`` that compute
    through ``Conv2d.forward`` (not the explicit paths of forms a/b, which read
    ``conv.weight`` directly and would ignore a bias)."""
    skip = set()
    for m in model.modules():
        if isinstance(m, ResNeXtBlock) and m.form != "c":
            skip.update(id(c) for c in (m.conv1, m.conv2, m.conv3))
    for m in model.modules():
        if (
            isinstance(m, Conv2d)
            and isinstance(m.norm, FrozenBatchNorm2d)
            and id(m) not in skip
        ):
            yield m


@torch.no_grad()
def fold_frozen_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return a model with every ``conv -> FrozenBatchNorm2d`` folded into the conv.

    For inference only: the folded model has different state-dict keys (no
    ``.norm.*``, a conv ``bias``), so do not save it as a checkpoint. Trainable
    BN (``MODEL.RESNEXT.NORM: "BN"``) is left alone; so are the convs of blocks in
    forms a/b (``MODEL.RESNEXT.BLOCK_FORM``), which compute without the module.

    Args:
        model: any module (a whole detector, a backbone).
        inplace: modify ``model`` itself instead of a deep copy.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for conv in list(_foldable_convs(model)):
        if isinstance(conv, FrozenBNFusedConv2d):
            conv.__class__ = Conv2d
        scale, shift = _scale_shift(conv.norm)
        w = conv.weight
        conv.weight = nn.Parameter(
            (w * scale.to(w.dtype).reshape(-1, 1, 1, 1)).detach(), requires_grad=w.requires_grad
        )
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.to(w.dtype).detach(), requires_grad=w.requires_grad)
        conv.norm = None
    return model


class FrozenBNFusedConv2d(Conv2d):
    """A Detectron2 ``Conv2d`` whose ``FrozenBatchNorm2d`` is applied to the
    weight (``s * W``, bias ``b``) instead of the output. Same parameters, buffers
    and state-dict keys as the ``Conv2d`` it replaces (see :func:`fuse_frozen_bn`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = _scale_shift(self.norm)
        weight = self.weight * scale.to(self.weight.dtype).reshape(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        x = F.conv2d(x, weight, bias.to(weight.dtype), self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x


def fuse_frozen_bn(model: nn.Module) -> int:
    """Make every ``conv -> FrozenBatchNorm2d`` of ``model`` a
    :class:`FrozenBNFusedConv2d`, in place (training-safe: gradients reach the
    conv weight exactly as before). Returns how many convs were changed."""
    n = 0
    for conv in list(_foldable_convs(model)):
        if type(conv) is Conv2d:
            conv.__class__ = FrozenBNFusedConv2d
            n += 1
    return n
