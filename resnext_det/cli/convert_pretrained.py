# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What ``tools/convert_pretrained.py`` runs: ImageNet ResNeXt/ResNet weights, or a
detector, converted to a Detectron2 checkpoint for ``MODEL.WEIGHTS``.

:func:`main` refuses a weights name (``torchvision://...``: ``MODEL.WEIGHTS`` converts
those itself), converts with :func:`~resnext_det.checkpoint.convert_weights`, with
``--verify`` compares the source model and our backbone
(:func:`~resnext_det.checkpoint.verify_conversion`) before writing, saves the checkpoint,
prints the config keys to set, and writes ``--config-out``. The command line and the
formats read are described in ``tools/convert_pretrained.py`` and docs/weights.md.
"""
import argparse
import logging
import os
import shlex
import sys

from ..checkpoint import (
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
from ..utils.io import atomic_write_text

__all__ = ["main"]

logger = logging.getLogger("resnext_det.convert_pretrained")


def main(args: argparse.Namespace, *, root: str) -> int:
    """Convert as ``tools/convert_pretrained.py``'s parsed ``args`` say, print what was
    written and the config keys to set, and write ``--config-out``: its ``_BASE_`` is
    relative when both files lie inside the repository ``root``. Returns 0, or 1 when
    ``--verify`` fails (nothing written); errors raise
    :class:`~resnext_det.checkpoint.ConversionError` (a user error: one line, exit 2)."""
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
        if os.path.commonpath([out_dir, root]) == root and os.path.commonpath([base, root]) == root:
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
