# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What ``tools/export_model.py`` does."""
import logging
import os
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch

from ..engine import setup_cfg
from ..errors import MissingFileError
from ..inference import trained_size_mismatch
from ..utils.io import atomic_write_json
from .adapters import build_eager_model, export_config, export_weights, preprocess, sample_image, verification_images
from .check import import_onnxruntime, verify_export
from .constants import DEFAULT_OPSET, ExportError
from .exporter import export_model
from .latency import benchmark_latency, benchmark_table

logger = logging.getLogger(__name__)


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
    weights = export_weights(cfg, opts, config_file=config_file)
    mismatch = trained_size_mismatch(cfg, weights)
    if mismatch:  # export.json records the sizes the application must resize to
        logger.warning(f"{mismatch}.")
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
    if format == "onnx":
        try:
            import_onnxruntime()
        except ExportError as e:
            raise ExportError(
                f"--verify: {result.path} was written but not verified: {e}, then rerun the same "
                "command (or leave out --verify)"
            ) from e
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
