#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Convert ImageNet ResNeXt/ResNet weights, or a detector, to a Detectron2 checkpoint for MODEL.WEIGHTS.

    python tools/convert_pretrained.py resnext50_32x4d-1a0047aa.pth X-50-32x4d.pth --verify
    python tools/convert_pretrained.py X-101-32x8d.pkl X-101-32x8d.pth --convention fair --to-rgb --verify
    python tools/convert_pretrained.py resnext_101_64x4d.t7 X-101-64x4d.pth --arch X-101-64x4d \\
        --config-out configs/my-X-101-64x4d-FPN.yaml
    python tools/convert_pretrained.py model_final_2d9806.pkl mask_rcnn_X101_rgb.pth --to-rgb --verify

Reads torchvision / timm (.pth, .pt, .safetensors), Detectron / Detectron2
Caffe2 (.pkl) and Torch7 (.t7) files, recognised from their content. Infers
depth, cardinality C and width d from the tensors (``--arch`` makes it a check),
records the input convention (RGB/BGR, mean/std, STRIDE_IN_1X1) in the output,
and prints the config keys to set. A full detector in Detectron2 names (e.g. a
Detectron2 model-zoo ``model_final_*.pkl``) keeps every tensor; its convention
is read from the file (or given), and ``--to-rgb`` makes a BGR one take RGB.
``--verify`` runs the source model and our backbone on the same images; it fails
(exit 1, nothing written) unless res2..res5 agree to float precision. Errors exit
with status 2 and say what to change. MODEL.WEIGHTS names (torchvision://...)
run this same conversion on the fly: see docs/weights.md. The work is done by
:mod:`resnext_det.cli.convert_pretrained`.
"""
import argparse
import logging
import os
import sys

from resnext_det.checkpoint import CONVENTIONS, FORMATS
from resnext_det.cli import convert_pretrained  # the work: conversion, verification, config keys
from resnext_det.cli.tool import run_tool
from resnext_det.presets import PRESETS

#: The repository this tool belongs to: --base defaults to its configs/Base-ResNeXt-FPN.yaml.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = os.path.join(ROOT, "configs", "Base-ResNeXt-FPN.yaml")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See docs/weights.md for the public weights and their conventions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input", help="ImageNet weight file (.pth/.pt/.safetensors/.pkl/.t7), or a detector checkpoint "
        "in Detectron2 names (e.g. a Detectron2 model-zoo model_final_*.pkl)",
    )
    p.add_argument("output", help="Detectron2 checkpoint to write (*.pth), atomically")
    p.add_argument("--arch", choices=sorted(PRESETS), help="refuse unless the weights are this architecture")
    p.add_argument("--format", default="auto", choices=FORMATS, help="source format (default: from the content)")
    p.add_argument(
        "--convention",
        choices=sorted(CONVENTIONS),
        help="input convention of the source: torchvision (RGB, ImageNet mean/std; also timm and "
        "Torch7), fair (Detectron2 zoo ImageNetPretrained/FAIR: BGR), msra (ImageNetPretrained/MSRA: "
        "BGR, std 1, STRIDE_IN_1X1), detectron1 (Detectron v1 ImageNetPretrained/20171220/X-101-*: "
        "BGR, std 1). Default: torchvision for torchvision/timm/Torch7; required for Caffe2 .pkl",
    )
    p.add_argument(
        "--pixel-mean", type=float, nargs=3, metavar="M",
        help="override the mean, 0-255 scale, in the convention's channel order",
    )
    p.add_argument(
        "--pixel-std", type=float, nargs=3, metavar="S",
        help="override the std, 0-255 scale, in the convention's channel order",
    )
    p.add_argument(
        "--stride-in-1x1", type=_bool, metavar="BOOL",
        help="override the convention's stride placement (true: first 1x1 conv, false: 3x3)",
    )
    p.add_argument(
        "--to-rgb", action="store_true",
        help="make BGR weights (ImageNet backbone or detector) take RGB input: reverses the stem "
        "conv's input channels and the mean/std with them; exact",
    )
    p.add_argument("--use-ema", action="store_true", help="timm training checkpoints: take state_dict_ema")
    p.add_argument(
        "--trust-pickle", action="store_true",
        help="allow arbitrary Python objects in pickles (unpickling runs code: trusted files only)",
    )
    p.add_argument(
        "--verify", action="store_true",
        help="before writing, compare res2..res5 of the source model and ours on the same images",
    )
    p.add_argument("--verify-size", type=int, default=224, help="image side for --verify (default 224)")
    p.add_argument(
        "--tolerance", type=float, default=1e-4,
        help="--verify fails above this max|diff| / max(1, max|feature|) (default 1e-4)",
    )
    p.add_argument(
        "--config-out", metavar="YAML",
        help="also write a config: _BASE_ --base plus the keys these weights need",
    )
    p.add_argument(
        "--base", default=DEFAULT_BASE,
        help="_BASE_ of --config-out, or 'none' (default: configs/Base-ResNeXt-FPN.yaml)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The tool on ``argv`` (default ``sys.argv[1:]``); returns its exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return run_tool(lambda: convert_pretrained.main(args, root=ROOT), "convert_pretrained.py")


if __name__ == "__main__":
    sys.exit(main())
