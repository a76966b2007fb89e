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
from .adapters import (
    build_eager_model,
    detector_adapter,
    export_config,
    export_weights,
    meta_arch,
    output_names,
    preprocess,
    sample_image,
    verification_images,
)
from .check import (
    VerifyReport,
    compare_detections,
    eager_detections,
    import_onnxruntime,
    load_exported,
    verify_export,
)
from .constants import (
    DEFAULT_OPSET,
    FORMATS,
    METHODS,
    MIN_OPSET_ALIGNED_ROI_ALIGN,
    TOLERANCES,
    ExportError,
)
from .exporter import ExportResult, export_model
from .latency import benchmark_latency, benchmark_table
from .run import run_export

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
    "meta_arch",
    "output_names",
    "sample_image",
    "verification_images",
    "preprocess",
    "export_model",
    "import_onnxruntime",
    "load_exported",
    "eager_detections",
    "compare_detections",
    "verify_export",
    "benchmark_latency",
    "benchmark_table",
    "run_export",
]

