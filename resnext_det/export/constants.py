# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Formats, methods, opsets and tolerances of the exporter, and its error."""
import logging

from ..errors import UserError

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


class ExportError(UserError):
    """An export that cannot be done, or that would compute another model; the
    message is one line that says why and what to do instead. Tools print it as
    one line and exit with status 2 (:func:`resnext_det.cli.tool.run_tool`)."""
