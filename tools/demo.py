#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Run a trained resnext_det detector on images or videos and write the drawn results.

The command line of Detectron2's ``demo/demo.py`` (without the webcam and the
window: results are always written)::

    # a model trained by tools/train_net.py: its run's OUTPUT_DIR/config.yaml holds everything
    # it was trained with (NUM_CLASSES, DATASETS.TEST, the INPUT.*_TEST sizes); the weights
    # are the model_final.pth beside it
    .venv/bin/python tools/demo.py --config-file output/mydata/config.yaml \\
        --register-coco mydata_val data/val.json data/images --input data/images --output output/mydata_vis
    # the model trained by `make demo` (the Appendix B UnsharedRCNN, both networks)
    .venv/bin/python tools/demo.py --config-file output/demo/config.yaml \\
        --input datasets/shapes/val --output output/demo_vis
    # any config + checkpoint; --input takes files, globs, folders and videos; config
    # overrides as KEY VALUE pairs after the flags (as tools/train_net.py) or after --opts
    .venv/bin/python tools/demo.py --config-file configs/COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml \\
        --input 'photos/*.jpg' clip.mp4 --output vis/ --confidence-threshold 0.6 \\
        MODEL.WEIGHTS model_final.pth

Arguments: Detectron2's ``--opts KEY VALUE ...`` and train_net's trailing ``KEY VALUE``
pairs both work, in any order with the flags: a flag after ``--opts`` (``--register-coco``,
``--confidence-threshold``, ...) is read as that flag; pairs right after ``--input``
files start at the first word that is a config key (``MODEL.WEIGHTS``) and not a file.
The ``--opts`` pairs are applied first, then the trailing ones.

Weights: ``MODEL.WEIGHTS FILE`` when given; otherwise the config's own trained model,
``OUTPUT_DIR/model_final.pth`` (what ``tools/train_net.py`` and the Appendix B schedule
write), or the ``model_final.pth`` beside the config file (a run's config.yaml);
otherwise the config's ``MODEL.WEIGHTS``. Loading is strict: weights that leave any
tensor of the model untrained (an ImageNet backbone, a checkpoint of another
architecture) are refused with the reason. Weights whose run (the ``config.yaml`` beside
them) was evaluated at other ``INPUT.*_SIZE_TEST`` than the config given: one warning.

Inputs get training's per-image check: a missing file, a file that is not an image, an
image of more than 8 bits per channel (read as all white) and a truncated one are
skipped with a warning naming them, and counted at the end; exit status 2 when no input
could be used. When every image (or most) got no detection, the last line says what
scored below ``--confidence-threshold`` and at which test size the images ran.

Outputs: with one input image and an ``--output`` ending in an image extension,
that file; otherwise ``--output`` is a folder that receives one drawn image per
input image (same file name), one ``.mp4`` per input video, and
``predictions.json`` (boxes in input-image pixels, XYXY, with scores and class names;
the inputs skipped and why).

The work is done by :mod:`resnext_det.cli.demo`.
"""
import sys

from resnext_det.cli.demo import cli  # the work: parsing, inputs, predictions, drawing
from resnext_det.cli.tool import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(cli, "demo.py"))
