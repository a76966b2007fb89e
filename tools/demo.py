#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Run a trained resnext_det detector on images or videos and write the drawn results.

The command line of Detectron2's ``demo/demo.py`` (without the webcam and the
window: results are always written)::

    # the model trained by `make demo` (the Appendix B UnsharedRCNN, both networks)
    python tools/demo.py --config-file configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml \\
        --input datasets/shapes/val --output output/demo_vis
    # any config + checkpoint; --input takes files, globs, folders and videos
    python tools/demo.py --config-file configs/COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml \\
        --input 'photos/*.jpg' clip.mp4 --output vis/ --confidence-threshold 0.6 \\
        --opts MODEL.WEIGHTS model_final.pth

Weights: ``--opts MODEL.WEIGHTS FILE`` when given; otherwise the config's own
trained model, ``OUTPUT_DIR/model_final.pth`` (what ``tools/train_net.py`` and the
Appendix B schedule write); otherwise the config's ``MODEL.WEIGHTS``. Loading is
strict: weights that leave any tensor of the model untrained (an ImageNet backbone,
a checkpoint of another architecture) are refused with the reason.

Outputs: with one input image and an ``--output`` ending in an image extension,
that file; otherwise ``--output`` is a folder that receives one drawn image per
input image (same file name), one ``.mp4`` per input video, and
``predictions.json`` (boxes in input-image pixels, XYXY, with scores and class names).
"""
import argparse
import glob
import json
import logging
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import detectron2.data.transforms as T  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.video_visualizer import VideoVisualizer  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

import resnext_det  # noqa: E402,F401  registers the models and datasets
from resnext_det.checkpoint import ResNeXtCheckpointer  # noqa: E402
from resnext_det.engine import Trainer, setup_cfg  # noqa: E402
from resnext_det.fast import prepare_for_inference  # noqa: E402

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "Predictor",
    "resolve_weights",
    "expand_inputs",
    "draw_predictions",
    "instances_to_json",
    "get_parser",
    "main",
]

logger = logging.getLogger("resnext_det.demo")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
#: Proposal-only models (the RPN stage) draw at most this many proposals.
MAX_PROPOSALS_DRAWN = 20


def _has_opt(opts: Sequence[str], key: str) -> bool:
    return key in list(opts)[::2]


def resolve_weights(cfg, opts: Sequence[str] = ()) -> str:
    """The checkpoint to run: ``MODEL.WEIGHTS`` if set on the command line, else
    ``OUTPUT_DIR/model_final.pth`` if it exists, else the config's ``MODEL.WEIGHTS``.

    Raises:
        FileNotFoundError: nothing to load, with what to do about it.
    """
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if _has_opt(opts, "MODEL.WEIGHTS") and cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    if os.path.isfile(final):
        return final
    if cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    raise FileNotFoundError(
        f"No trained weights: {final} does not exist and MODEL.WEIGHTS is empty. Train the "
        "config first (python tools/train_net.py --config-file ..., or `make demo` for the "
        "quickstart config), or pass --opts MODEL.WEIGHTS path/to/model_final.pth."
    )


class Predictor:
    """Detectron2's ``DefaultPredictor`` for this project's models: built with the
    fast-path switches of the config (:meth:`Trainer.build_model`), loaded strictly
    (:class:`ResNeXtCheckpointer`, every tensor must come from the checkpoint),
    evaluated as ``tools/train_net.py --eval-only`` does (FrozenBN folding and
    autocast when configured). Works for every meta-architecture of the project,
    the Appendix B ``UnsharedRCNN`` (both networks in one checkpoint) included.
    """

    def __init__(self, cfg, *, weights: str):
        """
        Args:
            cfg: the model's config.
            weights: the checkpoint file (see :func:`resolve_weights`).
        """
        self.cfg = cfg.clone()
        model = Trainer.build_model(self.cfg)
        model.eval()
        ResNeXtCheckpointer(model, cfg=self.cfg, require="all").load(weights)
        self.model = prepare_for_inference(model, self.cfg)
        self.model.eval()
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for the demo, got {cfg.INPUT.FORMAT!r}.")
        self.input_format = cfg.INPUT.FORMAT
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.metadata = MetadataCatalog.get(names[0]) if names else MetadataCatalog.get("__unused")

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray) -> Dict[str, Instances]:
        """Predictions for one image (H, W, 3 uint8, BGR as OpenCV reads it), in
        its own pixel coordinates: Detectron2's output dict (``instances``, or
        ``proposals`` for an RPN-only model)."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
        return self.model([{"image": tensor, "height": height, "width": width}])[0]


def _instances(pred: Dict, threshold: float) -> Instances:
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
    raise ValueError(f"The model returned {sorted(pred)}: nothing the demo can draw.")


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
                raise FileNotFoundError(f"--input {item!r}: folder holds no image or video ({', '.join(IMAGE_EXTS + VIDEO_EXTS)})")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                raise FileNotFoundError(f"--input {item!r}: no such file, folder or matching glob")
            files += [f for f in found if os.path.isfile(f)]
    bad = [f for f in files if not f.lower().endswith(IMAGE_EXTS + VIDEO_EXTS)]
    if bad:
        raise ValueError(
            f"--input: {bad[0]!r} is neither an image ({', '.join(IMAGE_EXTS)}) nor a video "
            f"({', '.join(VIDEO_EXTS)})."
        )
    return files


def _is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTS)


def _output_paths(files: Sequence[str], output: str) -> Tuple[Dict[str, str], Optional[str]]:
    """``{input: output file}`` and the folder for predictions.json (None when the
    output is one image file)."""
    if len(files) == 1 and not _is_video(files[0]) and output.lower().endswith(IMAGE_EXTS) and not os.path.isdir(output):
        return {files[0]: output}, None
    if os.path.isfile(output):
        raise ValueError(
            f"--output {output!r} is a file; with {len(files)} input(s) or a video it must be a folder."
        )
    paths = {}
    for f in files:
        name = os.path.basename(f)
        if _is_video(f):
            name = os.path.splitext(name)[0] + ".mp4"
        paths[f] = os.path.join(output, name)
    seen: Dict[str, str] = {}
    for f, p in paths.items():
        if p in seen:
            raise ValueError(
                f"--input {seen[p]!r} and {f!r} would both be written to {p}: run them separately "
                "(different --output folders)."
            )
        seen[p] = f
    return paths, output


def _atomic_target(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=ext, dir=folder)
    os.close(fd)
    return tmp


def _write_image(path: str, image_rgb: np.ndarray) -> None:
    tmp = _atomic_target(path)
    try:
        if not cv2.imwrite(tmp, np.ascontiguousarray(image_rgb[:, :, ::-1])):
            raise OSError(f"OpenCV could not write {path} (unsupported extension?)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _run_video(predictor: Predictor, src: str, dst: str, threshold: float) -> List[dict]:
    cap = cv2.VideoCapture(src)
    if not cap.isOpened():
        raise ValueError(f"--input {src!r}: OpenCV cannot open this video")
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
            inst = _instances(predictor(frame), threshold)
            drawn = draw_predictions(frame[:, :, ::-1], inst, predictor.metadata, video=video)
            writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            frames.append({"frame": len(frames), "instances": instances_to_json(inst, predictor.metadata)})
        writer.release()
        if not frames:
            raise ValueError(f"--input {src!r}: the video has no readable frame")
        os.replace(tmp, dst)
    finally:
        cap.release()
        writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
    return frames


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run a resnext_det detector on images / videos (as Detectron2's demo/demo.py).",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's config")
    parser.add_argument(
        "--input", nargs="+", help="images, videos, folders or glob patterns such as 'dir/*.jpg'"
    )
    parser.add_argument("--video-input", help="a video file (Detectron2's flag; same as --input FILE)")
    parser.add_argument(
        "--output", required=True,
        help="folder for the drawn results (or one image file for a single input image)",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5,
        help="minimum score of the detections drawn (default 0.5)",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu",
    )
    return parser


def setup(args):
    """The config with the demo's overrides (score thresholds), frozen."""
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ValueError(f"--confidence-threshold must lie in [0, 1], got {args.confidence_threshold}")
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        logger.warning("No CUDA device: running on the CPU (MODEL.DEVICE cpu).")
        cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="resnext_det")
    setup_logger(name="fvcore")
    inputs = list(args.input or []) + ([args.video_input] if args.video_input else [])
    if not inputs:
        print("demo.py: give --input (images, folders, globs, videos) or --video-input", file=sys.stderr)
        return 2
    try:
        files = expand_inputs(inputs)
        outputs, folder = _output_paths(files, args.output)
        cfg = setup(args)
        weights = resolve_weights(cfg, args.opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"demo.py: {e}", file=sys.stderr)
        return 2
    logger.info(f"Loading {weights}")
    try:
        predictor = Predictor(cfg, weights=weights)
    except (FileNotFoundError, ValueError) as e:  # WeightsConfigError etc.: they name the fix
        print(f"demo.py: {e}", file=sys.stderr)
        return 2
    records = []
    for src in files:
        dst = outputs[src]
        t0 = time.perf_counter()
        if _is_video(src):
            frames = _run_video(predictor, src, dst, args.confidence_threshold)
            records.append({"file": src, "output": dst, "frames": frames})
            logger.info(f"{src}: {len(frames)} frames in {time.perf_counter() - t0:.1f} s -> {dst}")
            continue
        image = cv2.imread(src, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"--input {src!r}: OpenCV cannot read this image")
        inst = _instances(predictor(image), args.confidence_threshold)
        _write_image(dst, draw_predictions(image[:, :, ::-1], inst, predictor.metadata))
        records.append({"file": src, "output": dst, "instances": instances_to_json(inst, predictor.metadata)})
        logger.info(f"{src}: {len(inst)} detections in {time.perf_counter() - t0:.2f} s -> {dst}")
    if folder is not None:
        path = os.path.join(folder, "predictions.json")
        tmp = _atomic_target(path)
        with open(tmp, "w") as f:
            json.dump({"weights": weights, "confidence_threshold": args.confidence_threshold,
                       "results": records}, f, indent=1)
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
