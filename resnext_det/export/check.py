# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Running an exported file (TorchScript in torch, ONNX in onnxruntime) beside the
eager model, and the largest differences of their detections."""
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .adapters import meta_arch
from .constants import TOLERANCES, ExportError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------- run, verify
def import_onnxruntime():
    """The ``onnxruntime`` module, which runs ONNX files (``--verify``, ``--benchmark``).

    Raises:
        ExportError: it cannot be imported; the message names the package and how to
            install it (it is in requirements.txt and the package's ``export`` extra).
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"running an ONNX file needs the onnxruntime package, which cannot be imported here ({e}): "
            "install it with `.venv/bin/pip install onnxruntime` (`pip install onnxruntime` in "
            "another environment)"
        ) from e
    return onnxruntime


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
        ort = import_onnxruntime()
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
    if meta_arch(model) == "GeneralizedRCNN":
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
