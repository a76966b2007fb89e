#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Speed of resnext_det against Detectron2's built-in ResNeXt, side by side in one process.

    python tools/benchmark.py                                   # everything, CPU
    python tools/benchmark.py --what detector,inference --json out/bench.json
    python tools/benchmark.py --device cuda --what overhead     # the paper's 1.36x figure
    python tools/benchmark.py --what eval                       # COCO evaluation: pycocotools vs compiled

Sections (``--what``): backbone (trunk forward, forward+backward), detector (one
training step of Faster R-CNN FPN and C4), inference (latency per image),
proposals (RPN-only), overhead (ResNeXt vs ResNet at the same FLOPs), eval (COCO
evaluation: pycocotools' COCOeval against the compiled one, and the project's whole
evaluation path, on synthetic COCO-sized sets; its ratios are over pycocotools). The
"built-in" contender is Detectron2's ``build_resnet_backbone`` with
``NUM_GROUPS x WIDTH_PER_GROUP`` = our C x d and our weights, loaded strictly; "vs
built-in" is its median time over the contender's (> 1: faster than built-in).
Measured with ``torch.utils.benchmark``, contenders interleaved; the output starts
with the model, image sizes, batch, threads and device. The code and the method
are in :mod:`resnext_det.benchmark`; the results in docs/performance.md. A config
error ends it with one line (exit status 2), Ctrl-C too (exit status 130).
"""
import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional, Sequence

from resnext_det.benchmark import ARCHS, SECTIONS, BenchmarkSettings, run_benchmark
from resnext_det.cli.tool import run_tool

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _comma_list(text: str) -> List[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> BenchmarkSettings:
    d = BenchmarkSettings()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--what", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--device", default=d.device, choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per contender (median)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds of every contender first")
    p.add_argument("--size", type=int, default=d.size, help="image side in px (detector, inference, proposals)")
    p.add_argument("--batch", type=int, default=d.batch, help="images per training step / proposal batch")
    p.add_argument("--backbone-size", type=int, default=d.backbone_size, help="image side, backbone section")
    p.add_argument("--overhead-size", type=int, default=d.overhead_size, help="image side, overhead section")
    p.add_argument("--overhead-depths", default=",".join(map(str, d.overhead_depths)), help="depths compared there")
    p.add_argument("--archs", default=",".join(ARCHS), help="detector architectures: fpn, c4")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: PyTorch's default)")
    p.add_argument("--no-ablation", action="store_true", help="skip the one-switch-at-a-time contenders")
    p.add_argument("--no-torchvision", action="store_true", help="skip torchvision's trunk")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add 'ours fast+compile' (MODEL.RESNEXT.COMPILE: torch.compile of the backbone; "
        "compiling takes minutes)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the (slow, profiled) peak-memory run")
    p.add_argument(
        "--fast-opts",
        nargs="*",
        default=None,
        help="config KEY VALUE pairs of the fast contender (default: all switches, "
        "resnext_det.benchmark.FAST_OPTS)",
    )
    p.add_argument("--eval-images", type=int, default=d.eval_images, help="eval section: images, bbox set")
    p.add_argument("--eval-segm-images", type=int, default=d.eval_segm_images, help="eval: images, segm set (0: skip)")
    p.add_argument(
        "--eval-path-images", type=int, default=d.eval_path_images, help="eval: images, project path (0: skip)"
    )
    p.add_argument("--eval-repeats", type=int, default=d.eval_repeats, help="eval: timed runs per contender")
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    p.add_argument("--markdown", default=None, help="also write the tables as Markdown here")
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides for every model (e.g. a smaller model for a smoke run)",
    )
    a = p.parse_args(argv)
    try:
        depths = [int(x) for x in _comma_list(a.overhead_depths)]
    except ValueError:
        p.error(f"--overhead-depths {a.overhead_depths!r}: give depths like 50,101")
    try:
        return BenchmarkSettings(
            what=_comma_list(a.what),
            device=a.device,
            repeats=a.repeats,
            warmup=a.warmup,
            size=a.size,
            batch=a.batch,
            backbone_size=a.backbone_size,
            overhead_size=a.overhead_size,
            overhead_depths=depths,
            archs=_comma_list(a.archs),
            threads=a.threads,
            no_ablation=a.no_ablation,
            no_torchvision=a.no_torchvision,
            compile=a.compile,
            no_memory=a.no_memory,
            fast_opts=d.fast_opts if a.fast_opts is None else a.fast_opts,
            eval_images=a.eval_images,
            eval_segm_images=a.eval_segm_images,
            eval_path_images=a.eval_path_images,
            eval_repeats=a.eval_repeats,
            json=a.json,
            markdown=a.markdown,
            opts=a.opts[1:] if a.opts[:1] == ["--"] else a.opts,
        )
    except ValueError as e:
        p.error(str(e))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    settings = parse_args(argv)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    return run_benchmark(settings, config_dir=CONFIG_DIR)


if __name__ == "__main__":
    sys.exit(run_tool(main, "benchmark.py"))
