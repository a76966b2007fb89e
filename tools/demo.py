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
    # a model fine-tuned on your own COCO-format data: its class names come from the json
    python tools/demo.py --config-file configs/COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml \\
        --register-coco mydata_val data/val.json data/images --input photos/ --output vis/ \\
        --opts DATASETS.TEST "('mydata_val',)" MODEL.ROI_HEADS.NUM_CLASSES 3 MODEL.WEIGHTS output/mydata/model_final.pth

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
import os
import sys

import resnext_det  # noqa: F401  registers the models and datasets (first: quiets detectron2's import)
from detectron2.utils.logger import setup_logger

from resnext_det.data import add_register_coco_argument, check_num_classes, dataset_classes, register_coco_datasets
from resnext_det.engine import setup_cfg, setup_logging
from resnext_det.engine.cli import run_tool
from resnext_det.errors import ConfigError
from resnext_det.inference import Predictor, resolve_weights
from resnext_det.utils.io import atomic_write_json
from resnext_det.visualize import expand_inputs, output_paths, run_on_files

logger = setup_logger(name="resnext_det.demo", abbrev_name="demo")


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
    # The class names drawn are those of DATASETS.TEST[0]: your own data's come from its json.
    return add_register_coco_argument(parser)


def setup(args):
    """The config with the demo's overrides (score thresholds), frozen."""
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ConfigError(f"--confidence-threshold must lie in [0, 1], got {args.confidence_threshold}")
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)  # no GPU: runs on the CPU, says so
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging()
    setup_logger(name="fvcore")
    inputs = list(args.input or []) + ([args.video_input] if args.video_input else [])
    if not inputs:
        raise ConfigError("give --input (images, folders, globs, videos) or --video-input")
    files = expand_inputs(inputs)
    outputs, folder = output_paths(files, args.output)
    register_coco_datasets(args.register_coco)
    cfg = setup(args)
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    check_num_classes(cfg, names[:1])
    if names:
        dataset_classes(names[0])  # the class names drawn (a --register-coco json's categories)
    weights = resolve_weights(cfg, args.opts)
    logger.info(f"Loading {weights}")
    predictor = Predictor(cfg, weights=weights)
    records, skipped = run_on_files(predictor, files, outputs, threshold=args.confidence_threshold, logger=logger)
    if folder is not None:
        atomic_write_json(
            os.path.join(folder, "predictions.json"),
            {"weights": weights, "confidence_threshold": args.confidence_threshold,
             "results": records, "skipped": skipped},
        )
    if skipped:
        logger.warning(f"{len(skipped)} of {len(files)} input(s) could not be read and were skipped: {skipped}")
    if not records:
        raise ConfigError(f"--input: none of the {len(files)} input(s) could be read")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "demo.py"))
