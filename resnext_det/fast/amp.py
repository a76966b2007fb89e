# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Mixed precision on CPUs and GPUs, in training and in inference.

Detectron2's ``AMPTrainer`` only knows ``torch.cuda.amp``: it asserts CUDA in
every step, so ``SOLVER.AMP.ENABLED: True`` fails on a CPU. :class:`AutocastTrainer`
uses ``torch.autocast(device_type)`` instead:

* CPU: bfloat16 (oneDNN runs convs and matmuls on AVX512-BF16 / AMX units), no
  loss scaling (bf16 has fp32's exponent range);
* CUDA: float16 with a ``GradScaler`` (as Detectron2), or bfloat16 without one.

The precision comes from ``SOLVER.AMP.PRECISION`` (see :func:`amp_dtype`).
"""
import logging
import time
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torchvision.ops import RoIPool

from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage

from ..errors import ConfigError

__all__ = [
    "PRECISIONS",
    "Fp32RoIPool",
    "autocast_safe_roi_pool",
    "amp_dtype",
    "autocast",
    "AutocastTrainer",
    "AutocastInference",
]

logger = logging.getLogger(__name__)

PRECISIONS = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - old or odd builds
        return False


def amp_dtype(cfg, device: Optional[str] = None) -> Optional[torch.dtype]:
    """The autocast dtype the config asks for on ``device``, or ``None`` for fp32.

    ``SOLVER.AMP.ENABLED`` turns mixed precision on; ``SOLVER.AMP.PRECISION`` picks
    "bfloat16" or "float16", or "auto": bfloat16 on CPU, float16 on CUDA (what
    Detectron2's ``AMPTrainer`` does). On a CPU without native bf16 (no
    AVX512-BF16/AMX) bf16 would be emulated and slower than fp32: it warns and
    runs in fp32.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    precision = cfg.SOLVER.AMP.get("PRECISION", "auto")
    if precision not in PRECISIONS:
        raise ConfigError(
            f"SOLVER.AMP.PRECISION = {precision!r} is not valid: choose one of {sorted(PRECISIONS)}."
        )
    device_type = torch.device(device or cfg.MODEL.DEVICE).type
    dtype = PRECISIONS[precision]
    if dtype is None:
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    if device_type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        warnings.warn(
            "SOLVER.AMP.ENABLED: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so "
            "bf16 autocast would be slower than fp32; running in fp32. Set "
            "SOLVER.AMP.ENABLED False to silence this."
        )
        return None
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "SOLVER.AMP.PRECISION = 'bfloat16' needs a GPU with bf16 (Ampere or newer); "
            "set SOLVER.AMP.PRECISION 'float16'."
        )
    return dtype


@contextmanager
def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """``torch.autocast(device_type, dtype)``, or nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type, dtype=dtype):
        yield


class Fp32RoIPool(RoIPool):
    """torchvision's ``RoIPool`` computed in float32 under autocast. torchvision gives
    ``roi_align`` an autocast rule (it casts to fp32) but not ``roi_pool``, which then
    refuses bf16/fp16 features beside fp32 boxes ("input should have the same type as
    rois"): the py-faster-rcnn ``ROIPool`` of the Appendix B C4 configs. No parameters:
    the state dict is unchanged."""

    def forward(self, input: torch.Tensor, rois):
        rois = rois.float() if isinstance(rois, torch.Tensor) else [r.float() for r in rois]
        with torch.autocast(device_type=input.device.type, enabled=False):
            return super().forward(input.float(), rois)


def autocast_safe_roi_pool(model: nn.Module) -> int:
    """Swap every torchvision ``RoIPool`` inside ``model`` for :class:`Fp32RoIPool`, in
    place (the same op outside autocast). Returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RoIPool) and not isinstance(child, Fp32RoIPool):
                setattr(module, name, Fp32RoIPool(child.output_size, child.spatial_scale))
                count += 1
    return count


class AutocastTrainer(SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` with the forward pass under
    ``torch.autocast(device_type, dtype)``; a ``GradScaler`` for float16.

    A drop-in for Detectron2's ``AMPTrainer`` that also runs on CPUs. The grad
    scaler's state is checkpointed (``state_dict``), so a resumed fp16 run keeps
    its loss scale.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader,
        optimizer,
        *,
        device_type: str,
        dtype: torch.dtype,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
    ):
        """
        Args:
            model, data_loader, optimizer, gather_metric_period,
                zero_grad_before_forward, async_write_metrics: as for ``SimpleTrainer``.
            device_type: "cpu" or "cuda", where the model runs.
            dtype: ``torch.bfloat16`` or ``torch.float16``.
        """
        super().__init__(
            model,
            data_loader,
            optimizer,
            gather_metric_period=gather_metric_period,
            zero_grad_before_forward=zero_grad_before_forward,
            async_write_metrics=async_write_metrics,
        )
        self.device_type = device_type
        self.precision = dtype
        autocast_safe_roi_pool(model)
        # Loss scaling only for float16: bf16 has the exponent range of fp32.
        self.grad_scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        if self.grad_scaler.is_enabled():
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.after_backward()

        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # A bf16 run saves its disabled scaler as {}: resumed in float16 it starts a new one.
        if state_dict.get("grad_scaler") and self.grad_scaler.is_enabled():
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class AutocastInference(nn.Module):
    """Runs ``model`` under ``torch.autocast`` and returns fp32 outputs.

    For evaluation (``inference_on_dataset`` switches it to eval mode and back,
    which reaches the wrapped model). Detectron2 decodes boxes in fp32 already
    (``Box2BoxTransform.apply_deltas``); tensors that come out in bf16/fp16
    (scores, masks) are cast back to fp32 here, so evaluators see fp32.
    """

    def __init__(self, model: nn.Module, *, device_type: str, dtype: torch.dtype):
        """
        Args:
            model: a Detectron2 model (list of dicts in, list of dicts out).
            device_type: "cpu" or "cuda".
            dtype: the autocast dtype.
        """
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.model(*args, **kwargs)
        return _to_fp32(out)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def _to_fp32(x):
    from detectron2.structures import Boxes, Instances

    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, Boxes):
        return Boxes(_to_fp32(x.tensor))
    if isinstance(x, Instances):
        out = Instances(x.image_size)
        for k, v in x.get_fields().items():
            out.set(k, _to_fp32(v))
        return out
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x
