# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Detections drawn on images and videos, and written as JSON: what ``tools/demo.py``
does with a :class:`~resnext_det.inference.Predictor` (Detectron2's ``demo/demo.py``,
without the webcam and the window)."""
import glob
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from .errors import ConfigError, MissingFileError
from .inference import Predictor
from .utils.io import TMP_MARK, atomic_write_bytes

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "MAX_PROPOSALS_DRAWN",
    "instances_to_draw",
    "draw_predictions",
    "instances_to_json",
    "expand_inputs",
    "is_video",
    "output_paths",
    "write_image",
    "run_video",
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


def expand_inputs(items: Sequence[str]) -> List[str]:
    """Files from ``--input``: image or video files, glob patterns, folders (their
    images and videos, sorted, not recursive)."""
    files: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTS + VIDEO_EXTS)
            )
            if not found:
                raise MissingFileError(f"--input {item!r}: folder holds no image or video ({', '.join(IMAGE_EXTS + VIDEO_EXTS)})")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                raise MissingFileError(f"--input {item!r}: no such file, folder or matching glob")
            files += [f for f in found if os.path.isfile(f)]
    bad = [f for f in files if not f.lower().endswith(IMAGE_EXTS + VIDEO_EXTS)]
    if bad:
        raise ConfigError(
            f"--input: {bad[0]!r} is neither an image ({', '.join(IMAGE_EXTS)}) nor a video "
            f"({', '.join(VIDEO_EXTS)})."
        )
    return files


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
) -> Tuple[List[dict], List[str]]:
    """Run ``predictor`` on every file, write the drawn images/videos to ``outputs``.

    A file that cannot be read (a corrupt image, an unreadable video) is skipped
    with a warning that names it, so that one bad file does not end a folder.

    Returns:
        (records for predictions.json, the files skipped)
    """
    import logging
    import time

    log = logger or logging.getLogger(__name__)
    records: List[dict] = []
    skipped: List[str] = []
    for src in files:
        dst = outputs[src]
        t0 = time.perf_counter()
        if is_video(src):
            try:
                frames = run_video(predictor, src, dst, threshold)
            except ConfigError as e:
                log.warning("Skipped %s: %s", src, e)
                skipped.append(src)
                continue
            records.append({"file": src, "output": dst, "frames": frames})
            log.info(f"{src}: {len(frames)} frames in {time.perf_counter() - t0:.1f} s -> {dst}")
            continue
        image = cv2.imread(src, cv2.IMREAD_COLOR)
        if image is None:
            log.warning("Skipped %s: OpenCV cannot read this image (corrupt or not an image)", src)
            skipped.append(src)
            continue
        pred = predictor(image)
        inst = instances_to_draw(pred, threshold)
        write_image(dst, draw_predictions(image[:, :, ::-1], inst, predictor.metadata))
        records.append({"file": src, "output": dst, "instances": instances_to_json(inst, predictor.metadata)})
        below = _count_below(pred, threshold)
        note = f" ({below} more below --confidence-threshold {threshold:g})" if below else ""
        log.info(f"{src}: {len(inst)} detections{note} in {time.perf_counter() - t0:.2f} s -> {dst}")
    return records, skipped


def _count_below(pred: Dict, threshold: float) -> int:
    """Detections the model returned that score under ``threshold`` (not drawn)."""
    if "instances" in pred and pred["instances"].has("scores"):
        return int((pred["instances"].scores < threshold).sum())
    return 0
