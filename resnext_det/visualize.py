# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Detections drawn on images and videos, and written as JSON: what ``tools/demo.py``
does with a :class:`~resnext_det.inference.Predictor` (Detectron2's ``demo/demo.py``,
without the webcam and the window)."""
import glob
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from detectron2.data.detection_utils import read_image
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from .data.checks import UnusableImage, check_image_file
from .errors import ConfigError
from .inference import Predictor, SizeMismatch
from .utils.io import TMP_MARK, atomic_write_bytes

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "MAX_PROPOSALS_DRAWN",
    "instances_to_draw",
    "draw_predictions",
    "instances_to_json",
    "expand_inputs",
    "check_inputs",
    "read_input_image",
    "is_video",
    "output_paths",
    "write_image",
    "run_video",
    "run_on_files",
    "no_detection_hint",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
#: Proposal-only models (the RPN stage) draw at most this many proposals.
MAX_PROPOSALS_DRAWN = 20


def instances_to_draw(pred: Dict, threshold: float) -> Instances:
    """The instances to draw: detections, or the best proposals of an RPN."""
    if "instances" in pred:
        inst = pred["instances"].to("cpu")
        return inst[inst.scores >= threshold] if inst.has("scores") else inst
    if "proposals" in pred:
        p = pred["proposals"].to("cpu")
        scores = p.objectness_logits.sigmoid()
        keep = (scores >= threshold).nonzero().flatten()[:MAX_PROPOSALS_DRAWN]
        inst = Instances(p.image_size)
        inst.pred_boxes = p.proposal_boxes[keep]
        inst.scores = scores[keep]
        return inst
    raise ConfigError(f"The model returned {sorted(pred)}: nothing the demo can draw.")


def draw_predictions(image_rgb: np.ndarray, instances: Instances, metadata, *, video=None) -> np.ndarray:
    """``image_rgb`` with ``instances`` drawn (Detectron2's Visualizer); RGB out."""
    if video is not None:
        return video.draw_instance_predictions(image_rgb, instances).get_image()
    vis = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()


def instances_to_json(instances: Instances, metadata) -> List[dict]:
    """Boxes (XYXY, image pixels), scores and class names of ``instances``."""
    names = metadata.get("thing_classes", None) or []
    out = []
    boxes = instances.pred_boxes.tensor.tolist() if instances.has("pred_boxes") else []
    for i, box in enumerate(boxes):
        row = {"bbox_xyxy": [round(v, 2) for v in box]}
        if instances.has("scores"):
            row["score"] = round(float(instances.scores[i]), 4)
        if instances.has("pred_classes"):
            c = int(instances.pred_classes[i])
            row["category_id"] = c
            row["category"] = names[c] if c < len(names) else str(c)
        out.append(row)
    return out


def expand_inputs(items: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files from ``--input``: image or video files, glob patterns, folders (their
    images and videos, sorted, not recursive).

    Returns:
        (the files, ``(item, reason)`` for each item that gives none: a missing file,
        folder or glob match, a folder without images or videos, a file that is neither
        an image nor a video). The caller skips those by name: one bad item does not
        stop the others.
    """
    files: List[str] = []
    skipped: List[Tuple[str, str]] = []
    media = IMAGE_EXTS + VIDEO_EXTS
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(media))
            if not found:
                skipped.append((item, f"folder holds no image or video ({', '.join(media)})"))
            files += found
            continue
        found = [item] if os.path.isfile(item) else sorted(
            f for f in glob.glob(os.path.expanduser(item)) if os.path.isfile(f)
        )
        if not found:
            skipped.append((item, "no such file, folder or matching glob"))
        for f in found:
            if f.lower().endswith(media):
                files.append(f)
            else:
                skipped.append((f, f"neither an image ({', '.join(IMAGE_EXTS)}) nor a video ({', '.join(VIDEO_EXTS)})"))
    return files, skipped


def check_inputs(files: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Training's per-image check (:func:`resnext_det.data.checks.check_image_file`: an
    image PIL can read, at most 8 bits per channel) on the images among ``files``, from
    their headers (cheap: before any model is built). A truncated file passes here and is
    caught where it is decoded (:func:`read_input_image`).

    Returns:
        (the files that pass, videos included; ``(file, reason)`` for the others)
    """
    ok: List[str] = []
    bad: List[Tuple[str, str]] = []
    for f in files:
        if not is_video(f):
            try:
                check_image_file(f)
            except OSError as e:
                bad.append((f, str(e)))
                continue
        ok.append(f)
    return ok, bad


def read_input_image(path: str) -> np.ndarray:
    """An input image as the model's data loaders read images (Detectron2's
    ``read_image``: PIL, EXIF orientation applied), BGR uint8, after training's check.

    Raises:
        UnusableImage: a missing file, not an image, more than 8 bits per channel, or
            truncated (found while decoding); the message says which.
    """
    check_image_file(path)
    try:
        return read_image(path, format="BGR")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnusableImage(f"not an image PIL can read ({e})") from e


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTS)


def output_paths(files: Sequence[str], output: str) -> Tuple[Dict[str, str], Optional[str]]:
    """``{input: output file}`` and the folder for predictions.json (None when the
    output is one image file)."""
    if len(files) == 1 and not is_video(files[0]) and output.lower().endswith(IMAGE_EXTS) and not os.path.isdir(output):
        return {files[0]: output}, None
    if os.path.isfile(output):
        raise ConfigError(
            f"--output {output!r} is a file; with {len(files)} input(s) or a video it must be a folder."
        )
    paths = {}
    for f in files:
        name = os.path.basename(f)
        if is_video(f):
            name = os.path.splitext(name)[0] + ".mp4"
        paths[f] = os.path.join(output, name)
    seen: Dict[str, str] = {}
    for f, p in paths.items():
        if p in seen:
            raise ConfigError(
                f"--input {seen[p]!r} and {f!r} would both be written to {p}: run them separately "
                "(different --output folders)."
            )
        seen[p] = f
    return paths, output


def write_image(path: str, image_rgb: np.ndarray) -> None:
    """``image_rgb`` encoded by the extension of ``path``, written whole."""
    ok, data = cv2.imencode(os.path.splitext(path)[1] or ".png", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"OpenCV could not encode {path} (unsupported extension?)")
    atomic_write_bytes(path, data.tobytes())


def _atomic_target(path: str) -> str:
    """A temporary file beside ``path`` (same extension: OpenCV's video writer picks
    its container by it), for writers that need a file name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}{TMP_MARK}", suffix=ext, dir=folder)
    os.close(fd)
    return tmp


def run_video(predictor: Predictor, src: str, dst: str, threshold: float) -> List[dict]:
    cap = cv2.VideoCapture(src)
    if not cap.isOpened():
        raise ConfigError(f"--input {src!r}: OpenCV cannot open this video")
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else 25.0
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    tmp = _atomic_target(dst)
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height), True)
    frames = []
    try:
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write an mp4v video to {dst}")
        video = VideoVisualizer(predictor.metadata, ColorMode.IMAGE)
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            inst = instances_to_draw(predictor(frame), threshold)
            drawn = draw_predictions(frame[:, :, ::-1], inst, predictor.metadata, video=video)
            writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            frames.append({"frame": len(frames), "instances": instances_to_json(inst, predictor.metadata)})
        writer.release()
        if not frames:
            raise ConfigError(f"--input {src!r}: the video has no readable frame")
        os.replace(tmp, dst)
    finally:
        cap.release()
        writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
    return frames


def run_on_files(
    predictor: Predictor,
    files: Sequence[str],
    outputs: Dict[str, str],
    *,
    threshold: float,
    logger=None,
    reasons: Optional[Dict[str, str]] = None,
) -> Tuple[List[dict], List[str]]:
    """Run ``predictor`` on every file, write the drawn images/videos to ``outputs``.

    A file that cannot be used (truncated, not an image, more than 8 bits per channel,
    an unreadable video) is skipped with a warning that names it, so that one bad file
    does not end a folder; ``reasons``, when given, receives ``{file: why}`` for them.
    Each image's record counts the detections the model returned under ``threshold``
    (``below_threshold``, with the best of their scores): the predictor may run at a
    lower score threshold than the one drawn.

    Returns:
        (records for predictions.json, the files skipped)
    """
    import logging
    import time

    log = logger or logging.getLogger(__name__)
    records: List[dict] = []
    skipped: List[str] = []

    def skip(src: str, why: str) -> None:
        log.warning("Skipped %s: %s", src, why)
        skipped.append(src)
        if reasons is not None:
            reasons[src] = why

    for src in files:
        dst = outputs[src]
        t0 = time.perf_counter()
        if is_video(src):
            try:
                frames = run_video(predictor, src, dst, threshold)
            except ConfigError as e:
                skip(src, str(e))
                continue
            records.append({"file": src, "output": dst, "frames": frames})
            log.info(f"{src}: {len(frames)} frames in {time.perf_counter() - t0:.1f} s -> {dst}")
            continue
        try:
            image = read_input_image(src)
        except UnusableImage as e:
            skip(src, str(e))
            continue
        pred = predictor(image)
        inst = instances_to_draw(pred, threshold)
        write_image(dst, draw_predictions(image[:, :, ::-1], inst, predictor.metadata))
        below, best = _below(pred, threshold)
        records.append({
            "file": src, "output": dst, "instances": instances_to_json(inst, predictor.metadata),
            "below_threshold": below, "best_score_below": best,
        })  # fmt: skip
        note = f" ({below} more below --confidence-threshold {threshold:g})" if below else ""
        log.info(f"{src}: {len(inst)} detections{note} in {time.perf_counter() - t0:.2f} s -> {dst}")
    return records, skipped


def no_detection_hint(
    records: Sequence[dict], threshold: float, cfg, mismatch: Optional[SizeMismatch] = None
) -> Optional[str]:
    """One line when every image, or most (80%), got no detection at ``threshold``:
    how many, what scored below it, a lower ``--confidence-threshold`` to try, the
    test size the images ran at and, given ``mismatch``
    (:func:`resnext_det.inference.trained_size_mismatch`), that it is not the trained
    one. None otherwise (and for videos, which are not counted)."""
    images = [r for r in records if "instances" in r]
    empty = [r for r in images if not r["instances"]]
    if not empty or len(empty) * 5 < len(images) * 4:
        return None
    below = sum(r.get("below_threshold", 0) for r in empty)
    bests = [r["best_score_below"] for r in empty if r.get("best_score_below") is not None]
    line = f"{len(empty)} of {len(images)} image(s) got no detection at --confidence-threshold {threshold:g}"
    if below:
        line += f" ({below} scored below it, the highest {math.floor(max(bests) * 1000) / 1000:g})"
    if threshold > 0.3:
        line += ": try --confidence-threshold 0.3 or lower"
    elif threshold > 0:
        line += f": try a lower --confidence-threshold (e.g. {threshold / 2:.2g})"
    else:
        line += ": the model found nothing at all"
    line += f"; they ran at INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST} / INPUT.MAX_SIZE_TEST {cfg.INPUT.MAX_SIZE_TEST}"
    if mismatch:
        line += f", not at the {mismatch.trained} the model was trained at: use --config-file {mismatch.config_file}"
    return line


def _below(pred: Dict, threshold: float) -> Tuple[int, Optional[float]]:
    """Detections the model returned that score under ``threshold`` (not drawn), and the
    best of their scores."""
    if "instances" in pred and pred["instances"].has("scores"):
        scores = pred["instances"].scores
        low = scores[scores < threshold]
        return int(low.numel()), (round(float(low.max()), 4) if low.numel() else None)
    return 0, None
