#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Train or evaluate a ResNeXt detector with Detectron2.

    python tools/train_net.py --config-file configs/Base-ResNeXt-FPN.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file ... --resume   # continue a killed run
    # Appendix B (UNSHARED.ENABLED): RPN, proposals, Fast R-CNN, eval; rerun to resume
    python tools/train_net.py --config-file configs/COCO-Detection/faster_rcnn_X_101_32x4d_C4_appendixB.yaml --num-gpus 8
    python tools/train_net.py --config-file ...appendixB.yaml --stage eval   # one stage alone

Any ``KEY VALUE`` pairs after the flags override the config (Detectron2's ``opts``).

A bad config, bad weights or a missing file end the run with one line that names what
to fix, on standard error, and exit status 2 (``RESNEXT_DET_TRACEBACK=1`` adds the
traceback). Other failures keep Python's traceback. The work is done by
:mod:`resnext_det.cli.train_net`.
"""
import sys

from resnext_det.cli.tool import run_tool
from resnext_det.cli.train_net import cli

if __name__ == "__main__":
    sys.exit(run_tool(cli, "train_net.py"))
