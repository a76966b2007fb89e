# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Deployment: every detector of the project as TorchScript or ONNX, checked
against the eager model it came from.

An exported model takes one image and returns flat tensors::

    image    float32 (3, H, W): the config's INPUT.FORMAT (RGB/BGR), 0-255, already
             resized as the test loader does (ResizeShortestEdge(MIN_SIZE_TEST,
             MAX_SIZE_TEST)); any H, W
    boxes    float32 (N, 4)  XYXY in the pixels of ``image``
    scores   float32 (N,)
    classes  int64   (N,)    0-based contiguous class ids
    masks    float32 (N, 1, M, M)  mask models only: per-box mask probabilities
             (Detectron2's ``pred_masks`` before pasting; paste them with
             ``detectron2.layers.paste_masks_in_image``)

which is what Detectron2's own ``tools/deploy/export_model.py`` exports for
R-CNN models (``inference(..., do_postprocess=False)``): resizing boxes to the
original image and pasting masks are left to the application.

Methods and formats (:func:`export_model`):

* ``tracing`` (default), ``torchscript`` or ``onnx``: the adapter below is run once
  on the sample image; Detectron2 writes its shape arithmetic so that the trace
  holds for any image size.
* ``scripting``, ``torchscript``: ``torch.jit.script`` with Detectron2's
  ``scripting_with_instances``; every block form of :class:`ResNeXtBlock` is
  scriptable.
* ONNX is written by PyTorch's TorchScript-based exporter (``dynamo=False``) at
  opset :data:`DEFAULT_OPSET`. An opset below 16 is refused for models with an
  aligned ROIAlign (``ROIAlignV2``, every R-CNN config here): ONNX ``RoiAlign``
  has no half-pixel mode before opset 16, and torchvision then exports the
  unaligned op with a warning only, a model whose boxes are off by many pixels.

:func:`verify_export` runs the file written to disk (TorchScript in torch, ONNX
in onnxruntime) beside the eager model on images of other sizes than the export
image and reports the largest differences of boxes, scores, classes and masks.
"""
import contextlib
import copy
import json
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor, nn

import detectron2.data.transforms as T
from detectron2.layers import ROIAlign, move_device_like
from detectron2.modeling import GeneralizedRCNN, RetinaNet
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.structures import Boxes, ImageList, Instances

from .data.shapes import ensure_shapes, shapes_image_root
from .engine import Trainer, setup_cfg
from .errors import ConfigError, MissingFileError, UserError
from .fast import AutocastInference, FastROIAlign, fold_frozen_bn, prepare_for_inference
from .inference import build_inference_model, resolve_weights
from .unshared import UnsharedRCNN
from .utils.io import atomic_write, atomic_write_bytes, atomic_write_json

__all__ = [
    "FORMATS",
    "METHODS",
    "DEFAULT_OPSET",
    "MIN_OPSET_ALIGNED_ROI_ALIGN",
    "TOLERANCES",
    "ExportError",
    "ExportResult",
    "VerifyReport",
    "export_config",
    "export_weights",
    "build_eager_model",
    "detector_adapter",
    "output_names",
    "sample_image",
    "verification_images",
    "preprocess",
    "export_model",
    "load_exported",
    "eager_detections",
    "compare_detections",
    "verify_export",
    "benchmark_latency",
    "benchmark_table",
    "run_export",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
METHODS = ("tracing", "scripting", "torch_export")
#: ONNX opset written by default: the first with ``RoiAlign(coordinate_transformation_mode)``
#: is 16; 17 is what onnxruntime and TensorRT releases of the last years all run.
DEFAULT_OPSET = 17
#: ONNX ``RoiAlign`` has the half-pixel (``aligned=True``) mode from this opset on.
MIN_OPSET_ALIGNED_ROI_ALIGN = 16
#: Largest differences :func:`verify_export` accepts between the exported and the
#: eager model (fp32 both; correct exports measure 1e-4 px and below, see
#: docs/deploy.md): boxes in pixels, scores and mask probabilities absolute.
TOLERANCES = {"boxes": 0.01, "scores": 1e-4, "masks": 1e-4}
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


class ExportError(UserError):
    """An export that cannot be done, or that would compute another model; the
    message is one line that says why and what to do instead. Tools print it as
    one line and exit with status 2 (:func:`resnext_det.engine.cli.run_tool`)."""


# ----------------------------------------------------------------------------- the model
def export_config(cfg):
    """A frozen copy of ``cfg`` for export: fp32 (``SOLVER.AMP.ENABLED`` off: an
    exported graph is not wrapped in autocast), Detectron2's ROIAlign (the sparse
    CPU ROIAlign of ``MODEL.RESNEXT.FAST_ROI_ALIGN`` builds its matrix with
    data-dependent Python loops that a trace would freeze), no ``torch.compile``.
    ``MODEL.RESNEXT.FOLD_FROZEN_BN`` is kept: the model is exported folded."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = False
    cfg.MODEL.RESNEXT.FAST_ROI_ALIGN = False
    cfg.MODEL.RESNEXT.COMPILE = False
    cfg.freeze()
    return cfg


def export_weights(cfg, opts: Sequence[str] = ()) -> str:
    """The checkpoint to export (:func:`resnext_det.inference.resolve_weights`:
    ``MODEL.WEIGHTS`` when given in ``opts``, else ``OUTPUT_DIR/model_final.pth``
    when a training run or the Appendix B schedule wrote it, else the config's
    ``MODEL.WEIGHTS``), or ``""`` when ``opts`` set ``MODEL.WEIGHTS ""``: the
    randomly initialised model, for smoke tests and CI."""
    pairs = dict(zip(list(opts)[::2], list(opts)[1::2]))
    if "MODEL.WEIGHTS" in pairs and not cfg.MODEL.WEIGHTS:
        return ""
    return resolve_weights(cfg, opts)


def build_eager_model(cfg, weights: str) -> nn.Module:
    """The eager model to export, in eval mode:
    :func:`resnext_det.inference.build_inference_model` (the config's model,
    weights loaded strictly: a file that does not fit the config is refused as in
    training; FrozenBN folded into the convs when ``MODEL.RESNEXT.FOLD_FROZEN_BN``).
    ``cfg`` should come from :func:`export_config` (fp32, so nothing is wrapped in
    autocast). ``weights=""`` keeps the random initialisation, with a warning."""
    if not weights:
        logger.warning(
            "MODEL.WEIGHTS is empty: exporting the RANDOMLY INITIALISED model (fine for smoke "
            "tests and CI, useless for detection). Pass MODEL.WEIGHTS path/to/model_final.pth."
        )
    return build_inference_model(cfg, weights).eval()


# --------------------------------------------------------------------------- adapters
def _clip_nonempty(inst: Instances) -> Instances:
    """What ``detector_postprocess`` does at the input's own size: clip, drop empty boxes."""
    boxes = inst.pred_boxes
    boxes.clip(inst.image_size)
    return inst[boxes.nonempty()]


class _RCNNDetect(nn.Module):
    """GeneralizedRCNN (Faster/Mask/Cascade, C4/FPN), as Detectron2 exports it."""

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Instances:
        return self.model.inference([{"image": image}], do_postprocess=False)[0]


class _RetinaNetDetect(nn.Module):
    """RetinaNet: ``forward`` without the per-image Python loop of its postprocessing
    (which scripting skips), clipped as ``detector_postprocess`` does."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Instances:
        m = self.model
        images = m.preprocess_image([{"image": image}])
        features = m.backbone(images.tensor)
        feats = [features[f] for f in m.head_in_features]
        predictions = m.head(feats)
        return _clip_nonempty(m.forward_inference(images, feats, predictions)[0])


class _UnsharedDetect(nn.Module):
    """The Appendix B ``UnsharedRCNN``: the RPN's own backbone proposes, the Fast
    R-CNN's own backbone classifies, as ``UnsharedRCNN.forward`` in eval mode. It
    holds the two networks' parts, not the networks: scripting compiles the
    ``forward`` of every submodule, and those of ``ProposalNetwork`` and of a
    ``GeneralizedRCNN`` fed precomputed proposals are not scriptable."""

    def __init__(self, model: nn.Module):
        super().__init__()
        rpn, frcn = model.rpn, model.fast_rcnn
        self.rpn_backbone = rpn.backbone
        self.proposal_generator = rpn.proposal_generator
        self.backbone = frcn.backbone
        self.roi_heads = frcn.roi_heads
        self.register_buffer("rpn_pixel_mean", rpn.pixel_mean.clone(), persistent=False)
        self.register_buffer("rpn_pixel_std", rpn.pixel_std.clone(), persistent=False)
        self.register_buffer("pixel_mean", frcn.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", frcn.pixel_std.clone(), persistent=False)

    def forward(self, image: Tensor) -> Instances:
        image = move_device_like(image, self.pixel_mean)
        images = ImageList.from_tensors(
            [(image - self.rpn_pixel_mean) / self.rpn_pixel_std],
            self.rpn_backbone.size_divisibility,
            padding_constraints=self.rpn_backbone.padding_constraints,
        )
        proposals, _ = self.proposal_generator(images, self.rpn_backbone(images.tensor), None)
        images = ImageList.from_tensors(
            [(image - self.pixel_mean) / self.pixel_std],
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        results, _ = self.roi_heads(images, self.backbone(images.tensor), proposals, None)
        return _clip_nonempty(results[0])


class _BoxOutputs(nn.Module):
    def __init__(self, detect: nn.Module):
        super().__init__()
        self.detect = detect

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        inst = self.detect(image)
        return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


class _MaskOutputs(nn.Module):
    def __init__(self, detect: nn.Module):
        super().__init__()
        self.detect = detect

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        inst = self.detect(image)
        return inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks


def _meta_arch(model: nn.Module) -> str:
    if isinstance(model, UnsharedRCNN):
        return "UnsharedRCNN"
    if isinstance(model, GeneralizedRCNN):
        return "GeneralizedRCNN"
    if isinstance(model, RetinaNet):
        return "RetinaNet"
    return type(model).__name__


def _mask_on(model: nn.Module) -> bool:
    heads = getattr(model, "roi_heads", None)
    return bool(getattr(heads, "mask_on", False))


def output_names(model: nn.Module) -> Tuple[str, ...]:
    """Names of the exported model's outputs, in order."""
    return ("boxes", "scores", "classes") + (("masks",) if _mask_on(model) else ())


def detector_adapter(model: nn.Module) -> nn.Module:
    """``model`` as a module ``image (3, H, W) -> (boxes, scores, classes[, masks])``
    (see the module docstring), ready for tracing, scripting or ONNX.

    Raises:
        ExportError: a meta-architecture the project does not export.
    """
    kind = _meta_arch(model)
    if kind == "UnsharedRCNN":
        detect = _UnsharedDetect(model)
    elif kind == "GeneralizedRCNN":
        if model.proposal_generator is None:
            raise ExportError(
                "a GeneralizedRCNN without proposal generator (PrecomputedProposals) needs "
                "proposals as input: export the end-to-end model (UnsharedRCNN) instead."
            )
        detect = _RCNNDetect(model)
    elif kind == "RetinaNet":
        detect = _RetinaNetDetect(model)
    else:
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {kind!r} is not exported: GeneralizedRCNN (Faster/Mask/"
            "Cascade R-CNN), RetinaNet and UnsharedRCNN are."
        )
    return (_MaskOutputs if _mask_on(model) else _BoxOutputs)(detect).eval()


# ----------------------------------------------------------------------------- images
def sample_image(index: int = 0) -> np.ndarray:
    """An image of the bundled shapes set (``shapes_val``, generated on first use):
    uint8 (H, W, 3) RGB."""
    folder = shapes_image_root("val", ensure_shapes())
    names = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
    return cv2.imread(os.path.join(folder, names[index]))[:, :, ::-1].copy()


def verification_images(image: np.ndarray) -> List[np.ndarray]:
    """Two crops of ``image``, one portrait and one landscape: after resizing they
    have other sizes than ``image`` (and than one another), so a graph that froze the
    export image's size shows."""
    h, w = image.shape[:2]
    return [image[:, : max(8, (w * 3) // 4)].copy(), image[: max(8, (h * 5) // 8), :].copy()]


def preprocess(cfg, image_rgb: np.ndarray) -> Tensor:
    """The model input for an RGB uint8 image, as ``DefaultPredictor`` makes it:
    ``INPUT.FORMAT`` channel order, ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``,
    float32 (3, H, W)."""
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ConfigError(f"INPUT.FORMAT must be 'RGB' or 'BGR' to export, got {cfg.INPUT.FORMAT!r}.")
    image = image_rgb if cfg.INPUT.FORMAT == "RGB" else image_rgb[:, :, ::-1]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(np.ascontiguousarray(image))
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))


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
    kind = _meta_arch(model)
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


# ------------------------------------------------------------------------- run, verify
def load_exported(
    path: str, *, threads: Optional[int] = None, device: str = "cpu"
) -> Callable[[Tensor], Dict[str, Tensor]]:
    """Load ``model.ts`` (in torch, on ``device``: where it was traced, for a traced
    model) or ``model.onnx`` (in onnxruntime, CPU) as a function
    ``image (3, H, W) -> {"boxes", "scores", "classes"[, "masks"]}`` (CPU tensors)."""
    info_file = os.path.join(os.path.dirname(path), "export.json")
    names: Tuple[str, ...] = ("boxes", "scores", "classes", "masks")
    if os.path.isfile(info_file):
        with open(info_file) as f:
            names = tuple(json.load(f)["outputs"])
    if path.endswith(".onnx"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        out_names = [o.name for o in sess.get_outputs()]

        def run_onnx(image: Tensor) -> Dict[str, Tensor]:
            outs = sess.run(None, {"image": image.detach().cpu().numpy()})
            return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(out_names, outs)}

        return run_onnx
    ts = torch.jit.load(path, map_location=device)  # eval already (scripted: a constant)

    def run_ts(image: Tensor) -> Dict[str, Tensor]:
        with torch.no_grad():
            outs = ts(image.to(device))
        return {n: o.cpu() for n, o in zip(names, outs)}

    return run_ts


@torch.no_grad()
def eager_detections(model: nn.Module, image: Tensor) -> Dict[str, Tensor]:
    """The eager model's detections on ``image`` through its own public inference
    entry point, the reference of :func:`verify_export`: ``inference(...,
    do_postprocess=False)`` for R-CNN models (what Detectron2 exports; masks
    before pasting), ``forward`` (postprocessed at the input's own size) for
    RetinaNet and UnsharedRCNN."""
    inputs = [{"image": image}]
    if _meta_arch(model) == "GeneralizedRCNN":
        inst = model.inference(inputs, do_postprocess=False)[0]
    else:
        inst = model(inputs)[0]["instances"]
    out = {"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "classes": inst.pred_classes}
    if inst.has("pred_masks"):
        out["masks"] = inst.pred_masks
    return {k: v.detach().cpu() for k, v in out.items()}


def compare_detections(ref: Dict[str, Tensor], out: Dict[str, Tensor]) -> Dict[str, float]:
    """Largest differences between two sets of detections of one image.

    Detections are paired in order (both come sorted by score); where near-equal
    scores were ordered differently, each reference detection is paired with the
    closest output detection of the same class. Returns ``count`` (difference of
    the numbers of detections), ``classes`` (pairs whose class differs), ``boxes``
    (pixels), ``scores`` and ``masks`` (absolute; masks only when both have them).
    """
    n_ref, n_out = len(ref["scores"]), len(out["scores"])
    res = {"detections": float(n_ref), "count": float(abs(n_ref - n_out)), "classes": 0.0, "boxes": 0.0, "scores": 0.0}
    has_masks = "masks" in ref and "masks" in out
    if has_masks:
        res["masks"] = 0.0
    if min(n_ref, n_out) == 0:
        return res
    rb, ob = ref["boxes"].float(), out["boxes"].float()
    rs, os_ = ref["scores"].float(), out["scores"].float()
    rc, oc = ref["classes"].long(), out["classes"].long()
    idx = torch.arange(n_ref)  # the output detection paired with each reference one
    in_order = n_ref == n_out and bool((rc == oc).all()) and float((rb - ob).abs().max()) <= 1.0
    if not in_order:  # the nearest output detection, same class first
        dist = (rb[:, None, :] - ob[None, :, :]).abs().amax(-1) + 1e3 * (rc[:, None] != oc[None, :])
        idx = (dist + (rs[:, None] - os_[None, :]).abs()).argmin(1)
    res["classes"] = float((rc != oc[idx]).sum())
    res["boxes"] = float((rb - ob[idx]).abs().max())
    res["scores"] = float((rs - os_[idx]).abs().max())
    if has_masks:
        res["masks"] = float((ref["masks"].float() - out["masks"].float()[idx]).abs().max())
    return res


@dataclass
class VerifyReport:
    """Result of :func:`verify_export`: per image and overall largest differences."""

    per_image: List[Dict[str, float]]
    worst: Dict[str, float]
    tolerances: Dict[str, float]
    ok: bool

    def lines(self) -> List[str]:
        out = []
        for i, r in enumerate(self.per_image):
            out.append(
                f"  image {i} {r['input']}: {int(r['detections'])} detections, "
                + ", ".join(f"{k} {_fmt(r.get(k))}" for k in ("count", "classes", "boxes", "scores", "masks") if k in r)
            )
        out.append(
            "  largest: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in self.worst.items())
            + f" (tolerances: boxes {self.tolerances['boxes']} px, scores {self.tolerances['scores']}, "
            f"masks {self.tolerances['masks']}; classes and count exact)"
        )
        return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.2e}"


def verify_export(
    model: nn.Module,
    path: str,
    images: Sequence[Tensor],
    *,
    tolerances: Optional[Dict[str, float]] = None,
) -> VerifyReport:
    """Run the exported file at ``path`` (reloaded from disk) and the eager
    ``model`` on ``images`` (model inputs, :func:`preprocess`; give sizes other than
    the export image's) and compare (:func:`compare_detections`).

    ``ok`` is False when any image differs in the number of detections or in a
    class, or past ``tolerances`` (default :data:`TOLERANCES`) in boxes, scores or
    masks, or when an image has no detection at all (nothing was compared).
    """
    tol = dict(TOLERANCES, **(tolerances or {}))
    device = str(next(model.parameters()).device)
    run = load_exported(path, device=device)
    per_image = []
    for image in images:
        ref = eager_detections(model, image)
        out = run(image)
        r = compare_detections(ref, out)
        r["input"] = "x".join(str(s) for s in image.shape[1:])
        per_image.append(r)
    keys = ("count", "classes", "boxes", "scores", "masks")
    worst = {k: max(r[k] for r in per_image) for k in keys if all(k in r for r in per_image)}
    ok = (
        bool(per_image)
        and all(r["detections"] > 0 for r in per_image)
        and worst["count"] == 0
        and worst["classes"] == 0
        and all(worst[k] <= tol[k] for k in ("boxes", "scores", "masks") if k in worst)
    )
    return VerifyReport(per_image=per_image, worst=worst, tolerances=tol, ok=ok)


# --------------------------------------------------------------------------- benchmark
def _interleaved(fns: Dict[str, Callable[[], object]], *, repeats: int, warmup: int) -> Dict[str, float]:
    """Median seconds of each function, timed in interleaved rounds (one call of each per
    round), so that a load that changes during the run weighs on all of them alike."""
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: Dict[str, List[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t)) for name, t in times.items()}


def benchmark_latency(
    cfg,
    *,
    short_sides: Sequence[int] = (800, 320),
    repeats: int = 3,
    warmup: int = 2,
    work_dir: str,
    image: Optional[np.ndarray] = None,
) -> List[Dict[str, object]]:
    """Latency of one image, side by side: eager fp32, the fast path (the config
    switches of resnext_det.fast: CHANNELS_LAST, FAST_ROI_ALIGN, FOLD_FROZEN_BN,
    SOLVER.AMP.ENABLED, as prepare_for_inference runs them), TorchScript (traced,
    FrozenBN folded) in torch, ONNX (traced, folded, opset :data:`DEFAULT_OPSET`) in
    onnxruntime with as many threads as torch. Random weights (the latency does not
    depend on them; the ROI heads see the RPN's full POST_NMS_TOPK_TEST proposals).

    Returns one row per (short side, runtime): ``{"short_side", "input", "runtime",
    "seconds", "threads"}``, the median of ``repeats`` interleaved rounds after ``warmup``
    untimed runs of each (TorchScript's profiling executor optimises on the first runs).
    """
    threads = torch.get_num_threads()
    image = sample_image() if image is None else image
    # A landscape image, as photos are: 4:3.
    h = image.shape[0]
    image = np.ascontiguousarray(np.concatenate([image, image[:, : image.shape[1] // 3]], axis=1))
    assert image.shape[0] == h

    def variant(**switches):
        c = cfg.clone()
        c.defrost()
        for k, v in switches.items():
            if k == "AMP":
                c.SOLVER.AMP.ENABLED = v
            else:
                c.MODEL.RESNEXT[k] = v
        c.MODEL.WEIGHTS = ""
        c.freeze()
        return c

    plain = variant(CHANNELS_LAST=False, FAST_ROI_ALIGN=False, FOLD_FROZEN_BN=False, AMP=False, COMPILE=False)
    fast = variant(CHANNELS_LAST=True, FAST_ROI_ALIGN=True, FOLD_FROZEN_BN=True, AMP=True, COMPILE=False)
    torch.manual_seed(0)
    eager = Trainer.build_model(plain).eval()
    state = eager.state_dict()
    fast_model = Trainer.build_model(fast).eval()
    fast_model.load_state_dict(state)
    fast_model = prepare_for_inference(fast_model, fast)
    folded_cfg = export_config(variant(CHANNELS_LAST=False, FAST_ROI_ALIGN=False, FOLD_FROZEN_BN=True, AMP=False))
    folded = Trainer.build_model(folded_cfg).eval()
    folded.load_state_dict(state)
    folded = fold_frozen_bn(folded)

    def model_input(side: int) -> Tensor:
        c = plain.clone()
        c.defrost()
        c.INPUT.MIN_SIZE_TEST = side
        c.INPUT.MAX_SIZE_TEST = max(c.INPUT.MAX_SIZE_TEST, side * 2)
        return preprocess(c, image)

    # One export of each kind serves every size (the exports take any H, W: verified).
    first = model_input(short_sides[0])
    ts_dir, onnx_dir = os.path.join(work_dir, "torchscript"), os.path.join(work_dir, "onnx")
    export_model(folded, first, ts_dir, format="torchscript", method="tracing")
    export_model(folded, first, onnx_dir, format="onnx", method="tracing")
    run_ts = load_exported(os.path.join(ts_dir, "model.ts"))
    run_onnx = load_exported(os.path.join(onnx_dir, "model.onnx"), threads=threads)
    rows = []
    for side in short_sides:
        x = model_input(side)
        shape = "x".join(str(s) for s in x.shape[1:])
        runs = {
            "eager fp32": lambda: eager([{"image": x}]),
            "fast path": lambda: fast_model([{"image": x}]),
            "TorchScript (traced, folded)": lambda: run_ts(x),
            "onnxruntime (folded)": lambda: run_onnx(x),
        }
        for name, sec in _interleaved(runs, repeats=repeats, warmup=warmup).items():
            rows.append({"short_side": side, "input": shape, "runtime": name, "seconds": sec, "threads": threads})
            logger.info("latency %s %s: %.3f s", shape, name, sec)
    return rows


def benchmark_table(rows: Sequence[Dict[str, object]]) -> List[str]:
    """:func:`benchmark_latency` rows as a markdown table: one line per runtime,
    one column per input size, seconds per image and speed-up over eager fp32."""
    sizes = list(dict.fromkeys(r["input"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    sec = {(r["runtime"], r["input"]): float(r["seconds"]) for r in rows}
    base = runtimes[0]
    lines = ["| runtime | " + " | ".join(f"{s} (s/image)" for s in sizes) + " |"]
    lines.append("|---|" + "---|" * len(sizes))
    for rt in runtimes:
        cells = []
        for s in sizes:
            t = sec.get((rt, s))
            cells.append("-" if t is None else f"{t:.3f} ({sec[(base, s)] / t:.2f}x)")
        lines.append(f"| {rt} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------ the tool
def _read_image(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise MissingFileError(f"--sample-image {path!r} does not exist")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ExportError(f"--sample-image {path!r} is not an image OpenCV can read")
    return image[:, :, ::-1].copy()


def run_export(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    output: str,
    format: str = "torchscript",
    method: str = "tracing",
    sample_image_file: Optional[str] = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
    benchmark: bool = False,
    benchmark_sizes: Sequence[int] = (800, 320),
    benchmark_repeats: int = 3,
    print_fn: Callable[[str], None] = print,
) -> int:
    """What ``tools/export_model.py`` does (see its ``--help``). Returns the exit
    status: 0, or 1 when ``verify`` finds the exported model differs from the eager
    one past :data:`TOLERANCES`. User errors (config, weights, refused
    combinations) raise :class:`~resnext_det.errors.UserError`."""
    cfg = setup_cfg(config_file, opts)
    image = _read_image(sample_image_file) if sample_image_file else sample_image()
    if benchmark:
        rows = benchmark_latency(
            cfg, short_sides=benchmark_sizes, repeats=benchmark_repeats, work_dir=output, image=image
        )
        os.makedirs(output, exist_ok=True)
        atomic_write_json(os.path.join(output, "benchmark.json"), rows)
        print_fn(f"Latency of one image, {torch.get_num_threads()} CPU thread(s), median of {benchmark_repeats}:")
        for line in benchmark_table(rows):
            print_fn(line)
        return 0
    ecfg = export_config(cfg)
    weights = export_weights(cfg, opts)
    model = build_eager_model(ecfg, weights)
    x = preprocess(ecfg, image)
    result = export_model(model, x, output, format=format, method=method, opset=opset, cfg=ecfg)
    print_fn(
        f"Exported {result.meta_arch} ({'weights ' + weights if weights else 'RANDOM weights'}) by "
        f"{method} to {result.path}" + (f" (opset {opset})" if format == "onnx" else "")
        + f": input image (3, H, W) {ecfg.INPUT.FORMAT} 0-255, outputs {', '.join(result.outputs)}"
    )
    if not verify:
        return 0
    images = [preprocess(ecfg, v) for v in verification_images(image)]
    report = verify_export(model, result.path, images)
    runtime = "onnxruntime" if format == "onnx" else "torch"
    print_fn(
        f"Verify: {result.path} reloaded and run in {runtime} beside the eager model on "
        f"{len(images)} images of other sizes than the export image ({'x'.join(map(str, x.shape[1:]))}):"
    )
    for line in report.lines():
        print_fn(line)
    if report.ok:
        print_fn("Verify: OK, the exported model gives the eager model's detections.")
        return 0
    if any(r["detections"] == 0 for r in report.per_image) and report.worst.get("count", 0) == 0:
        print_fn(
            "Verify: FAILED, an image has no detection, so nothing was compared (random weights? "
            "lower MODEL.ROI_HEADS.SCORE_THRESH_TEST / MODEL.RETINANET.SCORE_THRESH_TEST, or give "
            "--sample-image with objects)."
        )
    else:
        print_fn("Verify: FAILED, the exported model differs from the eager model past the tolerances.")
    return 1
