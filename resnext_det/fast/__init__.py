# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Speed: mixed precision on CPU and GPU, a sparse-matrix ROIAlign, FrozenBN
folding, channels_last and ``torch.compile``, each behind a config switch
(see :mod:`resnext_det.fast.fast_path`; measured by ``tools/benchmark.py``)."""
from .amp import AutocastInference, AutocastTrainer, Fp32RoIPool, amp_dtype, autocast, autocast_safe_roi_pool
from .bn_fold import FrozenBNFusedConv2d, fold_frozen_bn, fuse_frozen_bn
from .fast_path import apply_fast_path, fast_path_summary, prepare_for_inference
from .roi_align import FastROIAlign, replace_roi_align, roi_align_matrix, sparse_roi_align

__all__ = [
    "AutocastInference",
    "AutocastTrainer",
    "Fp32RoIPool",
    "autocast_safe_roi_pool",
    "amp_dtype",
    "autocast",
    "FrozenBNFusedConv2d",
    "fold_frozen_bn",
    "fuse_frozen_bn",
    "apply_fast_path",
    "fast_path_summary",
    "prepare_for_inference",
    "FastROIAlign",
    "replace_roi_align",
    "roi_align_matrix",
    "sparse_roi_align",
]
