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
run this same conversion on the fly: see docs/weights.md.
"""
import argparse
import logging
import os
import shlex
import sys

from resnext_det.checkpoint import (
    CONVENTIONS,
    FORMATS,
    ConversionError,
    config_pairs,
    config_yaml,
    convert_weights,
    format_opts,
    is_source_name,
    max_relative_error,
    resolve_source,
    save_converted,
    verify_conversion,
)
from resnext_det.cli.tool import run_tool
from resnext_det.presets import PRESETS
from resnext_det.utils.io import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = os.path.join(ROOT, "configs", "Base-ResNeXt-FPN.yaml")
logger = logging.getLogger("resnext_det.convert_pretrained")


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


def run(args: argparse.Namespace) -> int:
    if is_source_name(args.input):
        src = resolve_source(args.input)  # an unknown name: WeightsSourceError, one line
        raise ConversionError(
            f"{args.input!r} is a weights name, not a file: set MODEL.WEIGHTS {args.input} (downloaded, "
            f"checked and converted on first use, see docs/weights.md), or download {src.url} and "
            f"convert that file"
        )
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ConversionError("OUTPUT must differ from INPUT")
    base = None
    if args.config_out and args.base.lower() != "none":
        if not os.path.isfile(args.base):
            raise ConversionError(f"--base {args.base!r} does not exist")
        if not args.config_out.endswith((".yaml", ".yml")):
            raise ConversionError(f"--config-out {args.config_out!r}: name it *.yaml")
        base = os.path.abspath(args.base)
        out_dir = os.path.dirname(os.path.abspath(args.config_out))
        if os.path.commonpath([out_dir, ROOT]) == ROOT and os.path.commonpath([base, ROOT]) == ROOT:
            base = os.path.relpath(base, out_dir)  # inside the repository: keep it relocatable

    result = convert_weights(
        args.input,
        fmt=args.format,
        arch=args.arch,
        convention=args.convention,
        pixel_mean=args.pixel_mean,
        pixel_std=args.pixel_std,
        stride_in_1x1=args.stride_in_1x1,
        to_rgb=args.to_rgb,
        use_ema=args.use_ema,
        trust_pickle=args.trust_pickle,
        progress=not args.quiet,
    )
    meta = result.metadata
    if args.verify:
        logger.info("Verifying on 2 random %dx%d images ...", args.verify_size, args.verify_size)
        diffs = verify_conversion(result.verification_view(), size=args.verify_size)
        print(f"--verify: {result.format} source model vs resnext_det backbone ({args.verify_size}x{args.verify_size}):")
        for stage, (d, m) in diffs.items():
            print(f"  {stage}: max |diff| = {d:.3g}  (max |feature| = {m:.3g})")
        err = max_relative_error(diffs)
        if not err <= args.tolerance:
            print(
                f"--verify FAILED: max relative difference {err:.3g} > --tolerance {args.tolerance:g}. "
                f"{args.output} was not written. Check --stride-in-1x1 / --format / the file.",
                file=sys.stderr,
            )
            return 1
        print(f"--verify passed: max relative difference {err:.3g} <= {args.tolerance:g}")

    save_converted(result, args.output)
    weights = os.path.abspath(args.output)
    pairs = config_pairs(meta, weights)
    a, i = meta.arch, meta.input
    if meta.kind == "detector":
        print(f"Wrote {args.output}: {meta.source['origin']} with a {a.describe()} trunk ({args.input})")
    else:
        print(f"Wrote {args.output}: {a.describe()} from {result.format} ({args.input})")
    print(f"Input convention: {i.describe()}; STRIDE_IN_1X1 {a.stride_in_1x1}")
    if result.dropped:
        print(f"Left out (ImageNet classifier): {', '.join(result.dropped)}")
    print("\nSet these config keys:")
    width = max(len(k) for k, _ in pairs)
    opts = format_opts(pairs)
    for k, v in zip(opts[0::2], opts[1::2]):
        print(f"  {k.ljust(width)}  {v}")
    print("\nor append them to a command line:")
    config = "<the detector's config>.yaml" if meta.kind == "detector" else "configs/Base-ResNeXt-FPN.yaml"
    print(f"  python tools/train_net.py --config-file {config} \\\n    " + " ".join(shlex.quote(o) for o in opts))
    if args.config_out:
        header = (
            f"Written by tools/convert_pretrained.py from {os.path.basename(args.input)} ({result.format}).\n"
            f"Weights: {a.describe()}; input: {i.describe()}.\n"
            f"Use: python tools/train_net.py --config-file {args.config_out}"
        )
        atomic_write_text(args.config_out, config_yaml(pairs, base=base, header=header))
        print(f"\nWrote {args.config_out}" + (f" (_BASE_: {base})" if base else " (no _BASE_: merge it after a base config)"))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return run_tool(lambda: run(args), "convert_pretrained.py")


if __name__ == "__main__":
    sys.exit(main())
