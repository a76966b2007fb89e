#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""``make demo``: the paper's Appendix B schedule, end to end, on the CPU, on the
bundled shapes data; then its results, as numbers and pictures.

    python tools/run_demo.py                       # what `make demo` runs
    python tools/run_demo.py --rpn-iters 20 --fast-rcnn-iters 20 --output-dir /tmp/quick

First, stage 0 (``tools/pretrain_shapes.py``, a subprocess) stands in for the
paper's ImageNet-1K pretraining: it trains torchvision's ResNeXt of the config's
depth, C and d as a classifier on crops of the shapes training images, saves it as
torchvision weights and converts them for ``MODEL.WEIGHTS`` (see
:mod:`resnext_det.pretrain`). Then it runs ``tools/train_net.py --config-file
configs/quickstart/<demo config> MODEL.WEIGHTS <stage 0's file>`` (a subprocess; its
log goes to the console and to ``OUTPUT_DIR/log.txt``), which fine-tunes an RPN
(stage 1), writes its proposals (stage 2), fine-tunes a Fast R-CNN with its own
backbone on them (stage 3) and evaluates both, end to end, on ``shapes_val``
(stage 4). Rerunning skips finished stages and resumes an interrupted one (Ctrl-C
ends the run with one line saying where it stopped; stage 0 saves the iteration it
was in). Then it writes into the output folder (default ``output/demo``):

* ``final_results.json``: COCO bbox metrics of the end-to-end model on shapes_val,
  ``{"bbox": {"AP": ..., "AP50": ..., ...}}`` with Detectron2's key names (``null``
  where COCO has no object of a size: ``APl`` on the shapes data);
* ``results.md``: those metrics as a table, with the thresholds and stage times;
* ``loss_curves.png``: the losses of each training stage over iterations;
* ``val_*.png``: validation images, ground truth on the left, predictions right;
* ``summary.json``: the wall time of each stage and of the whole run;

beside the stages' own ``stage*/metrics.json`` and TensorBoard event files and
stage 0's ``stage0_pretrain/`` (classifier weights, torchvision and converted).
At the default length it also checks the target (AP >= 50 and AP50 >= 80) and
exits with status 1 when the model falls short.
"""
import argparse
import os
import sys

from resnext_det.cli import run_demo  # the work: stages, subprocesses, results
from resnext_det.cli.run_demo import DEFAULT_CONFIG, DEFAULT_OUTPUT
from resnext_det.cli.tool import run_tool

#: The repository this tool belongs to: the demo runs there, with its tools, configs and datasets.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    p.add_argument("--rpn-iters", type=int, help="stage 1 iterations (default: the config's)")
    p.add_argument("--fast-rcnn-iters", type=int, help="stage 3 iterations (default: the config's)")
    p.add_argument("--pretrain-iters", type=int,
                   help="stage 0 iterations (default: tools/pretrain_shapes.py's)")
    p.add_argument("--no-pretrain", action="store_true",
                   help="skip stage 0: train from the config's MODEL.WEIGHTS (with FrozenBN and "
                        "MODEL.WEIGHTS '', the backbone stays random: set MODEL.RESNEXT.NORM GN)")
    p.add_argument("--num-images", type=int, default=8, help="val_*.png pictures to draw (default 8)")
    p.add_argument("--seed", type=int, help="SEED of the run (default: the config's)")
    p.add_argument("--fresh", action="store_true", help="delete --output-dir first")
    p.add_argument("--no-check", action="store_true", help="do not fail when the target AP is missed")
    p.add_argument("--quiet", action="store_true", help="hide the training log (still in log.txt)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="more KEY VALUE config overrides")
    return p


def main(argv=None) -> int:
    """The demo; returns its exit status (1: the target was missed; a stage's own on failure)."""
    return run_demo.main(get_parser().parse_args(argv), root=ROOT)


if __name__ == "__main__":
    sys.exit(run_tool(main, "run_demo.py"))
