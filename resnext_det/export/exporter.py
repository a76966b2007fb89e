# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Writing TorchScript and ONNX files, and refusing what would compute another model."""
import contextlib
import copy
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.layers import ROIAlign
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.structures import Boxes

from ..fast import AutocastInference, FastROIAlign
from ..utils.io import atomic_write, atomic_write_bytes, atomic_write_json
from .adapters import detector_adapter, meta_arch, output_names
from .constants import DEFAULT_OPSET, FORMATS, METHODS, MIN_OPSET_ALIGNED_ROI_ALIGN, ExportError

logger = logging.getLogger(__name__)

# The file each format is written to, in the output folder.
_EXT = {"torchscript": "model.ts", "onnx": "model.onnx"}
# Instances fields the scripted models use (Detectron2's export_model.py list).
_SCRIPT_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": Tensor,
    "pred_boxes": Boxes,
    "scores": Tensor,
    "pred_classes": Tensor,
    "pred_masks": Tensor,
}


# ----------------------------------------------------------------------------- export
def _aligned_roi_aligns(model: nn.Module) -> int:
    return sum(isinstance(m, ROIAlign) and bool(m.aligned) for m in model.modules())


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _where(e: BaseException) -> str:
    """``package/module.py:line`` of the innermost frame in detectron2 or resnext_det."""
    frames = traceback.extract_tb(e.__traceback__)
    for fr in reversed(frames):
        for pkg in ("detectron2", "resnext_det"):
            i = fr.filename.rfind(os.sep + pkg + os.sep)
            if i >= 0:
                return f"{fr.filename[i + 1:]}:{fr.lineno}"
    return ""


@contextlib.contextmanager
def _quiet_export():
    """Export warnings that say nothing to a user here (tracer warnings on Detectron2's
    shape arithmetic, which it writes to be trace-safe; jit deprecations)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # indices there are never negative (verified against eager); meshgrid: Detectron2's call
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", message="torch.meshgrid")
        yield


def _check_opset(model: nn.Module, opset: int) -> None:
    n = _aligned_roi_aligns(model)
    if n and opset < MIN_OPSET_ALIGNED_ROI_ALIGN:
        raise ExportError(
            f"--opset {opset} refused: this model has {n} aligned ROIAlign (ROIAlignV2) layers and "
            f"ONNX RoiAlign has no half-pixel mode before opset {MIN_OPSET_ALIGNED_ROI_ALIGN}; "
            f"torchvision would export the unaligned op (boxes off by many pixels). Use --opset "
            f">= {MIN_OPSET_ALIGNED_ROI_ALIGN} (default {DEFAULT_OPSET})."
        )


@contextlib.contextmanager
def _keep_prepared_modules_alive(model: nn.Module):
    """Work around a PyTorch bug that breaks scripting a model with two backbones
    (UnsharedRCNN). ``torch.jit.script`` first calls ``__prepare_scriptable__`` on every
    submodule (Detectron2's ResNet and FPN return a modified deep copy) and memoises
    the result by ``id()`` of the original, which nothing keeps alive: the id is reused
    by a module of the next copy, which is then swapped for the memoised one (an FPN's
    output conv replaced by a ResNeXt: "Could not match type Dict[str, Tensor]"). Holding
    every module passed to ``__prepare_scriptable__`` until scripting ends avoids it."""
    alive: List[nn.Module] = []
    owners = {
        klass
        for m in model.modules()
        for klass in type(m).__mro__
        if "__prepare_scriptable__" in vars(klass)
    }
    originals = {klass: vars(klass)["__prepare_scriptable__"] for klass in owners}

    def keeping(prepare):
        def wrapper(self):
            alive.append(self)
            return prepare(self)

        return wrapper

    for klass, prepare in originals.items():
        setattr(klass, "__prepare_scriptable__", keeping(prepare))
    try:
        yield
    finally:
        for klass, prepare in originals.items():
            setattr(klass, "__prepare_scriptable__", prepare)
        alive.clear()


def _refuse(model: nn.Module, kind: str, format: str, method: str, opset: int) -> None:
    """The combinations that cannot be exported, or would compute another model,
    refused before any work with the reason measured in docs/deploy.md."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: choose one of {list(FORMATS)}")
    if method not in METHODS:
        raise ExportError(f"--export-method {method!r}: choose one of {list(METHODS)}")
    if isinstance(model, AutocastInference) or any(isinstance(m, FastROIAlign) for m in model.modules()):
        raise ExportError(
            "the model runs under autocast or with the sparse CPU ROIAlign (SOLVER.AMP.ENABLED, "
            "MODEL.RESNEXT.FAST_ROI_ALIGN): build it from export_config(cfg), which exports fp32 "
            "with Detectron2's ROIAlign"
        )
    if format == "torchscript" and method == "torch_export":
        raise ExportError(
            "--export-method torch_export writes ONNX only (a torch.export program is not "
            "TorchScript): use --format onnx, or --export-method tracing|scripting"
        )
    if format == "onnx":
        _check_opset(model, opset)
        if method == "scripting":
            raise ExportError(
                "--format onnx --export-method scripting: PyTorch's ONNX exporter cannot convert "
                "a scripted Detectron2 model (it stops on the TorchScript class Box2BoxTransform: "
                "'This class type does not extend __getstate__ method'); use --export-method "
                "tracing for ONNX"
            )
    if method == "scripting" and isinstance(getattr(model, "roi_heads", None), CascadeROIHeads):
        raise ExportError(
            "--export-method scripting: Detectron2's CascadeROIHeads is not scriptable (its "
            "_forward_box has untyped arguments and indexes ModuleLists by a loop variable; "
            "torch.jit.script stops at `features[f]` in cascade_rcnn.py); export Cascade R-CNN "
            "with --export-method tracing"
        )


def _script(adapter: nn.Module) -> torch.jit.ScriptModule:
    from detectron2.export import scripting_with_instances

    # A copy: preparing for scripting replaces submodules in place (Detectron2's
    # ResNet/FPN become ModuleList-based copies), which would change the caller's model.
    adapter = copy.deepcopy(adapter)
    with _keep_prepared_modules_alive(adapter):
        return scripting_with_instances(adapter, _SCRIPT_FIELDS)


def _traceable(adapter: nn.Module, image: Tensor) -> nn.Module:
    """Detectron2's ``TracingAdapter`` around ``adapter``: it traces under
    ``patch_builtin_len`` (``len(instances)`` in the ROI heads recorded as a tensor,
    not frozen to the export image's number of proposals) and without autograd."""
    from detectron2.export import TracingAdapter

    # eval(): the ONNX exporter sets every submodule to the wrapper's mode
    return TracingAdapter(adapter, (image,)).eval()


def _trace(adapter: nn.Module, image: Tensor) -> torch.jit.ScriptModule:
    return torch.jit.trace(_traceable(adapter, image), (image,), check_trace=False)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    path: str
    format: str
    method: str
    meta_arch: str
    outputs: Tuple[str, ...]
    input_shape: Tuple[int, ...]
    opset: Optional[int] = None
    seconds: float = 0.0
    info: Dict[str, object] = field(default_factory=dict)


def export_model(
    model: nn.Module,
    image: Tensor,
    output_dir: str,
    *,
    format: str = "torchscript",
    method: str = "tracing",
    opset: int = DEFAULT_OPSET,
    cfg=None,
) -> ExportResult:
    """Export the eager ``model`` (from :func:`build_eager_model`) to
    ``output_dir/model.ts`` or ``output_dir/model.onnx``, plus ``export.json``
    (inputs, outputs, method, opset, input convention).

    Args:
        model: the eager model, eval mode, fp32.
        image: a model input (3, H, W) float32 (:func:`preprocess`): the trace's
            example; scripting ignores it.
        output_dir: the folder to write into (created).
        format: "torchscript" or "onnx".
        method: "tracing", "scripting" (TorchScript only) or "torch_export" (ONNX
            through ``torch.export``, PyTorch's default exporter; see docs/deploy.md).
        opset: ONNX opset.
        cfg: the model's config, to record its input convention in ``export.json``.

    Raises:
        ExportError: a combination that cannot be exported, or that would compute
            another model; one line naming the cause.
    """
    if model.training:
        raise ExportError("the model is in training mode: export it in eval mode (model.eval())")
    kind = meta_arch(model)
    _refuse(model, kind, format, method, opset)
    adapter = detector_adapter(model)
    names = output_names(model)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, _EXT[format])
    start = time.perf_counter()
    try:
        with torch.no_grad(), _quiet_export():
            if format == "torchscript":
                ts = _script(adapter) if method == "scripting" else _trace(adapter, image)
                atomic_write(path, lambda f: torch.jit.save(ts, f))
            elif method == "tracing":
                _export_onnx_tracing(adapter, image, path, names, opset)
            else:
                _export_onnx_torch_export(adapter, image, path, names, opset)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - reported in one line, traceback chained
        where = _where(e)
        log = os.path.join(output_dir, "torch_export.log")
        more = f" (details: {log})" if method == "torch_export" and os.path.isfile(log) else ""
        raise ExportError(
            f"{method} of {kind} to {format} failed{' in ' + where if where else ''}: {_one_line(e)}{more}"
        ) from e
    result = ExportResult(
        path=path,
        format=format,
        method=method,
        meta_arch=kind,
        outputs=names,
        input_shape=tuple(image.shape),
        opset=opset if format == "onnx" else None,
        seconds=time.perf_counter() - start,
    )
    info = {k: v for k, v in asdict(result).items() if k not in ("info", "seconds")}
    info["input"] = "image: float32 (3, H, W), 0-255, any H and W"
    if cfg is not None:
        info.update(
            input_format=cfg.INPUT.FORMAT,
            min_size_test=cfg.INPUT.MIN_SIZE_TEST,
            max_size_test=cfg.INPUT.MAX_SIZE_TEST,
            folded_frozen_bn=bool(cfg.MODEL.RESNEXT.FOLD_FROZEN_BN),
        )
    info["torch"] = torch.__version__
    result.info = info
    atomic_write_json(os.path.join(output_dir, "export.json"), info)
    logger.info("Exported %s (%s, %s) to %s in %.1f s", kind, method, format, path, result.seconds)
    return result


def _dynamic_axes(names: Sequence[str]) -> Dict[str, Dict[int, str]]:
    axes = {"image": {1: "height", 2: "width"}}
    axes.update({n: {0: "detections"} for n in names})
    return axes


def _export_onnx_tracing(adapter, image, path, names, opset):
    def write(f):
        torch.onnx.export(
            _traceable(adapter, image),
            (image,),
            f,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=list(names),
            dynamic_axes=_dynamic_axes(names),
        )

    atomic_write(path, write)
    import onnx

    onnx.checker.check_model(path)


@contextlib.contextmanager
def _stderr_to(path: str):
    """Standard error (Python's and the process's file descriptor 2) into ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f, contextlib.redirect_stderr(f):
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            f.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _export_onnx_torch_export(adapter, image, path, names, opset):
    """PyTorch's default ONNX route: ``torch.export`` (dynamic height and width), then
    the program to ONNX (which needs the ``onnxscript`` package)."""
    from torch.export import Dim

    dynamic = ({1: Dim("height", min=32, max=4096), 2: Dim("width", min=32, max=4096)},)
    # torch.export prints its whole graph when it stops: to a log file, not the console
    log = os.path.join(os.path.dirname(path), "torch_export.log")
    with _stderr_to(log):
        program = torch.export.export(adapter, (image,), dynamic_shapes=dynamic, strict=False)
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(
            "torch.export succeeded; writing its program as ONNX needs the onnxscript package "
            "(pip install onnxscript)"
        ) from e
    onnx_program = torch.onnx.export(
        program, (image,), dynamo=True, opset_version=opset, input_names=["image"], output_names=list(names)
    )
    atomic_write_bytes(path, onnx_program.model_proto.SerializeToString())
