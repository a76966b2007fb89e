# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The fast path: what the config switches do to a built detector.

=================================  =====================================================
switch                             effect
=================================  =====================================================
``MODEL.RESNEXT.CHANNELS_LAST``    NHWC activations and conv weights, backbone and heads
``SOLVER.AMP.ENABLED``             autocast in training (:class:`AutocastTrainer`) and
                                   in inference (:class:`AutocastInference`)
``SOLVER.AMP.PRECISION``           "auto" (bf16 on CPU, fp16 on CUDA), "bfloat16", "float16"
``MODEL.RESNEXT.FAST_ROI_ALIGN``   ROIAlign as a sparse matrix product on CPU
``MODEL.RESNEXT.FOLD_FROZEN_BN``   FrozenBN applied to conv weights (training) / folded
                                   into them once (inference)
``MODEL.RESNEXT.COMPILE``          ``torch.compile`` of the backbone (default off)
``CUDNN_BENCHMARK``                Detectron2's key: cudnn autotuning on CUDA
=================================  =====================================================

All are numerically the same model (up to float rounding) except AMP, which
computes convs and matmuls in 16 bits (accuracy measured in docs/performance.md).
"""
import logging

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .amp import AutocastInference, amp_dtype, autocast_safe_roi_pool
from .bn_fold import fold_frozen_bn, fuse_frozen_bn
from .roi_align import replace_roi_align
from ..errors import ConfigError

__all__ = ["apply_fast_path", "prepare_for_inference", "fast_path_summary"]

logger = logging.getLogger(__name__)


def _fast(cfg, key: str) -> bool:
    return bool(cfg.MODEL.RESNEXT.get(key, False))


def apply_fast_path(model: nn.Module, cfg) -> nn.Module:
    """Apply the training-safe switches of ``cfg`` to a freshly built ``model``, in
    place (state-dict keys unchanged, so checkpoints load and save as before).

    Returns ``model``. AMP is not applied here: it lives in the trainer
    (:class:`~resnext_det.fast.amp.AutocastTrainer`) and in
    :func:`prepare_for_inference`.
    """
    done = []
    if _fast(cfg, "FAST_ROI_ALIGN"):
        done.append(f"FastROIAlign x{replace_roi_align(model)}")
    if _fast(cfg, "FOLD_FROZEN_BN"):
        done.append(f"FrozenBN fused into {fuse_frozen_bn(model)} convs")
    if _fast(cfg, "CHANNELS_LAST"):
        # The ResNeXt trunk already is (MODEL.RESNEXT.CHANNELS_LAST); this also
        # converts the FPN, RPN and ROI-head conv weights.
        model.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if _fast(cfg, "COMPILE"):
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise ConfigError(
                "MODEL.RESNEXT.COMPILE compiles model.backbone, but this model has none; "
                "set MODEL.RESNEXT.COMPILE False."
            )
        # nn.Module.compile() compiles in place: parameter names (and checkpoints)
        # stay the same, unlike torch.compile(module) which adds "_orig_mod.".
        backbone.compile(dynamic=None)
        done.append("torch.compile(backbone)")
    if done:
        logger.info("resnext_det fast path: %s", ", ".join(done))
    return model


#: Attribute set on the folded copy: preparing it a second time is a no-op.
_PREPARED = "_resnext_det_prepared_for_inference"


def prepare_for_inference(model: nn.Module, cfg) -> nn.Module:
    """The model to evaluate: ``MODEL.RESNEXT.FOLD_FROZEN_BN`` folds FrozenBN into a
    **copy** (the given model, e.g. the one being trained, is untouched), and
    ``SOLVER.AMP.ENABLED`` wraps it in :class:`AutocastInference` (with both, the
    copy's conv/linear weights are stored in the autocast dtype: ~10% faster CPU
    inference, same numbers). Returns the model itself when neither switch is on,
    or when it was prepared already.
    """
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    if isinstance(model, AutocastInference) or getattr(model, _PREPARED, False):
        return model  # prepared already (e.g. by resnext_det.inference.build_inference_model)
    copied = False
    if _fast(cfg, "FOLD_FROZEN_BN"):
        model, copied = fold_frozen_bn(model), True
        setattr(model, _PREPARED, True)
    dtype = amp_dtype(cfg)
    if dtype is not None:
        if copied:
            # Our own copy: store conv/linear weights in the autocast dtype once,
            # instead of autocast casting every weight at every forward.
            _cast_weights(model, dtype)
        autocast_safe_roi_pool(model)
        model = AutocastInference(model, device_type=torch.device(cfg.MODEL.DEVICE).type, dtype=dtype)
    return model


@torch.no_grad()
def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Conv and linear parameters to ``dtype`` (what autocast feeds those ops anyway);
    norms, anchors and pixel statistics stay fp32."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)


def fast_path_summary(cfg) -> dict:
    """The switches as a dict (for logs and the benchmark's JSON)."""
    r = cfg.MODEL.RESNEXT
    return {
        "MODEL.RESNEXT.CHANNELS_LAST": bool(r.get("CHANNELS_LAST", False)),
        "MODEL.RESNEXT.FAST_ROI_ALIGN": bool(r.get("FAST_ROI_ALIGN", False)),
        "MODEL.RESNEXT.FOLD_FROZEN_BN": bool(r.get("FOLD_FROZEN_BN", False)),
        "MODEL.RESNEXT.COMPILE": bool(r.get("COMPILE", False)),
        "SOLVER.AMP.ENABLED": bool(cfg.SOLVER.AMP.ENABLED),
        "SOLVER.AMP.PRECISION": cfg.SOLVER.AMP.get("PRECISION", "auto"),
    }
