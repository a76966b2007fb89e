# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""ROIAlign as a sparse matrix product: the same numbers as torchvision's
``roi_align``, much faster on CPUs, above all in training.

Where the time goes (``torch.profiler``, X-50-32x4d FPN Faster R-CNN, 2 images of
320x320, 2-core CPU): torchvision's CPU ``roi_align`` runs on one thread and its
backward recomputes the bilinear weights for every channel and scatters into an
NCHW map; it took ~30% of an fp32 training step and ~40% of a bf16 one.

ROIAlign (He et al., Mask R-CNN, 2017) is linear in the feature map: every output
bin is a fixed weighted sum of feature pixels (bilinear interpolation at a grid of
sampling points, averaged). For K boxes on an ``N x C x H x W`` map it is one
sparse matrix ``S`` of shape ``(K*ph*pw, N*H*W)`` applied to the map viewed as
``(N*H*W, C)`` (channels_last): ``out = S @ F``, and the gradient is
``S^T @ grad``. Both run as fbgemm ``embedding_bag`` sums (all cores), channels
contiguous. The bilinear weights are separable (a y weight times an x weight),
so ``S`` is built from two small 1-D weight tables, with sorted, unique columns.
"""
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align as _tv_roi_align

from ..errors import ConfigError

__all__ = ["FastROIAlign", "sparse_roi_align", "roi_align_matrix", "replace_roi_align"]


def _axis_weights(
    start: torch.Tensor, bin_size: torch.Tensor, grid: int, pooled: int, length: int
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """1-D bilinear weights of the ``grid`` sampling points of every bin.

    Follows torchvision's ``roi_align`` CPU kernel (``pre_calc_for_bilinear_interpolate``)
    along one axis: a sample outside ``[-1, length]`` contributes 0, samples are
    clamped to ``[0, length - 1]``. Returns, for ``n`` boxes, a band of weights
    ``(n, pooled, band)`` (already divided by ``grid``), the first pixel index of
    every band ``(n, pooled)``, and ``band``.
    """
    n = start.shape[0]
    dev = start.device
    p = torch.arange(pooled, device=dev, dtype=torch.float32)
    g = torch.arange(grid, device=dev, dtype=torch.float32)
    # Same expression order as the kernel: start + p * bin + (g + .5) * bin / grid.
    c = start[:, None, None] + p[None, :, None] * bin_size[:, None, None] + (
        g[None, None, :] + 0.5
    ) * bin_size[:, None, None] / grid
    valid = ((c >= -1.0) & (c <= length)).to(torch.float32)
    c = c.clamp(min=0.0)
    lo = c.floor().long()
    edge = lo >= length - 1
    lo = torch.where(edge, torch.full_like(lo, length - 1), lo)
    hi = torch.where(edge, lo, lo + 1)
    c = torch.where(edge, lo.to(c.dtype), c)
    l = c - lo.to(c.dtype)
    h = 1.0 - l
    lo_min = lo.amin(2)
    # The pixels a bin reads span grid + 1 rows when the grid is adaptive (ceil of
    # the bin size); a fixed SAMPLING_RATIO may spread fewer samples wider.
    span = int((hi.amax(2) - lo_min).max()) + 1 if lo.numel() else 1
    band = min(span, length)
    first = lo_min.clamp(max=length - band)  # every lo/hi of the bin is in the band
    w = torch.zeros(n, pooled, band, device=dev, dtype=torch.float32)
    w.scatter_add_(2, lo - first[:, :, None], h * valid / grid)
    w.scatter_add_(2, hi - first[:, :, None], l * valid / grid)
    return w, first, band


def roi_align_matrix(
    rois: torch.Tensor,
    *,
    batch: int,
    height: int,
    width: int,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR matrix ``S`` with ``roi_align(x, rois) == S @ x`` (x as ``(N*H*W, C)``).

    Args:
        rois: ``(K, 5)`` boxes ``(batch index, x1, y1, x2, y2)`` in image pixels.
        batch, height, width: N, H, W of the feature map.
        output_size: (ph, pw) bins per box.
        spatial_scale: feature-map pixels per image pixel (1 / stride).
        sampling_ratio: samples per bin and axis; <= 0 for torchvision's adaptive
            ``ceil(box size / bins)``.
        aligned: Detectron2's ``ROIAlignV2`` half-pixel shift.

    Returns:
        ``crow`` (K*ph*pw + 1), ``col``, ``val`` (float32) of ``S``; the columns of
        each row are sorted and unique.
    """
    ph, pw = output_size
    dev = rois.device
    rois = rois.to(torch.float32)  # never in bf16/fp16: box coordinates need 24 bits
    k = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    img = rois[:, 0].long()
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # the legacy kernel forces boxes to be at least 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / ph
    bin_w = roi_w / pw
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.long, device=dev)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / ph).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / pw).long().clamp(min=0)
    grid_h = torch.where(grid_w > 0, grid_h, torch.zeros_like(grid_h))
    grid_w = torch.where(grid_h > 0, grid_w, torch.zeros_like(grid_w))
    # Boxes with the same sampling grid are done together (a few groups).
    parts = []
    nnz_row = torch.zeros(k, dtype=torch.long, device=dev)  # entries in each of a box's rows
    if k:
        pairs = torch.stack([grid_h, grid_w], 1)
        groups, which = torch.unique(pairs, dim=0, return_inverse=True)
        for gi, (gh, gw) in enumerate(groups.tolist()):
            if gh == 0:  # empty or inverted box: all-zero output, like the kernel
                continue
            idx = (which == gi).nonzero().squeeze(1)
            wy, y0, bh = _axis_weights(y1[idx], bin_h[idx], gh, ph, height)
            wx, x0, bw = _axis_weights(x1[idx], bin_w[idx], gw, pw, width)
            nnz_row[idx] = bh * bw
            parts.append((idx, wy, y0, bh, wx, x0, bw))
    roi_start = torch.zeros(k + 1, dtype=torch.long, device=dev)
    torch.cumsum(nnz_row * (ph * pw), 0, out=roi_start[1:])
    total = int(roi_start[-1])
    col = torch.empty(total, dtype=torch.long, device=dev)
    val = torch.empty(total, dtype=torch.float32, device=dev)
    for idx, wy, y0, bh, wx, x0, bw in parts:
        # (n, ph, pw, bh, bw): rows (ph, pw) in order, columns ascending in each row.
        v = wy[:, :, None, :, None] * wx[:, None, :, None, :]
        ys = y0[:, :, None] + torch.arange(bh, device=dev)  # (n, ph, bh)
        xs = x0[:, :, None] + torch.arange(bw, device=dev)  # (n, pw, bw)
        c = (img[idx] * (height * width))[:, None, None, None, None] + (
            ys[:, :, None, :, None] * width + xs[:, None, :, None, :]
        )
        pos = (roi_start[idx][:, None] + torch.arange(ph * pw * bh * bw, device=dev)).reshape(-1)
        col[pos] = c.reshape(-1)
        val[pos] = v.reshape(-1)
    crow = torch.zeros(k * ph * pw + 1, dtype=torch.long, device=dev)
    torch.cumsum(nnz_row.repeat_interleave(ph * pw), 0, out=crow[1:])
    return crow, col, val


class _SparseRows(torch.autograd.Function):
    """``out = S @ x`` for a CSR ``S``; backward ``S^T @ grad`` (no grad for S)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor):
        ctx.save_for_backward(crow, col, val)
        ctx.num_cols = x.shape[0]
        # embedding_bag (fbgemm, parallel over rows) is a CSR-times-dense product:
        # bags = rows, indices = columns, per-sample weights = values. Autocast off:
        # the dtype is chosen by the caller.
        with torch.autocast(x.device.type, enabled=False):
            return F.embedding_bag(
                col, x, crow[:-1], mode="sum", per_sample_weights=val, include_last_offset=False
            )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        crow, col, val = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        num_rows = crow.numel() - 1
        rows = torch.arange(num_rows, device=crow.device).repeat_interleave(crow.diff())
        # S^T in CSR: entries sorted by column (stable, so rows stay ascending).
        order = torch.argsort(col, stable=True)
        counts = torch.bincount(col, minlength=ctx.num_cols)
        offsets = torch.zeros(ctx.num_cols, dtype=torch.long, device=col.device)
        torch.cumsum(counts[:-1], 0, out=offsets[1:])
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = F.embedding_bag(
                rows[order],
                grad.to(val.dtype).contiguous(),
                offsets,
                mode="sum",
                per_sample_weights=val[order],
            )
        return grad_x, None, None, None


def sparse_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """torchvision's ``roi_align`` (same arguments, same result to float rounding)
    computed as a sparse matrix product on channels_last features.

    The product runs in float32, or in bfloat16 for bfloat16 input (with float32
    accumulation); the result has the input's dtype and is channels_last.
    """
    n, c, h, w = input.shape
    ph, pw = output_size
    crow, col, val = roi_align_matrix(
        rois,
        batch=n,
        height=h,
        width=w,
        output_size=(ph, pw),
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    # bf16 features (autocast) are pooled in bf16 (fbgemm accumulates in fp32; ~6x
    # faster than fp32 and no casts: the box head consumes bf16 anyway); anything
    # else in fp32, as torchvision's autocast rule for roi_align does.
    dtype = torch.bfloat16 if input.dtype == torch.bfloat16 else torch.float32
    x = input.to(dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = _SparseRows.apply(x, crow, col, val.to(dtype))
    return out.reshape(-1, ph, pw, c).permute(0, 3, 1, 2).to(input.dtype)


class FastROIAlign(nn.Module):
    """Drop-in replacement of :class:`detectron2.layers.ROIAlign`.

    On CPU it computes :func:`sparse_roi_align`; elsewhere (CUDA, where
    torchvision's kernel is fast, or quantized inputs) it calls torchvision's op.
    In both cases the boxes stay in float32 (Detectron2's ``ROIAlign`` casts them
    to the feature dtype, i.e. to bf16 under autocast, which moves boxes by up to
    a pixel at 300 px).
    """

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = True):
        """
        Args:
            output_size: (h, w) bins, or one int.
            spatial_scale: scale of the boxes to feature-map pixels.
            sampling_ratio: samples per bin and axis, 0 for adaptive.
            aligned: the half-pixel shift of ``ROIAlignV2``.
        """
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = tuple(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(N, C, H, W)`` features.
            rois: ``(K, 5)`` boxes, first column the index into N.
        """
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ConfigError(f"FastROIAlign expects (K, 5) rois, got {tuple(rois.shape)}")
        if input.is_quantized:
            input = input.dequantize()
        if input.device.type != "cpu":
            out = _tv_roi_align(
                input.float(),
                rois.float(),
                self.output_size,
                self.spatial_scale,
                self.sampling_ratio,
                self.aligned,
            )
            return out.to(input.dtype)
        return sparse_roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    @classmethod
    def from_roi_align(cls, m: nn.Module) -> "FastROIAlign":
        """The equivalent of a Detectron2 ``ROIAlign`` module ``m``."""
        return cls(m.output_size, m.spatial_scale, m.sampling_ratio, m.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


def replace_roi_align(model: nn.Module) -> int:
    """Swap every Detectron2 ``ROIAlign`` inside ``model`` (the level poolers of its
    ``ROIPooler``s) for :class:`FastROIAlign`, in place. Returns how many."""
    from detectron2.layers import ROIAlign

    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ROIAlign):
                setattr(module, name, FastROIAlign.from_roi_align(child))
                count += 1
    return count
