#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Export a trained resnext_det detector to TorchScript or ONNX (the command line of
Detectron2's ``tools/deploy/export_model.py``), and check it against the eager model.

    # a model trained by tools/train_net.py: its run's OUTPUT_DIR/config.yaml carries what it
    # was trained with (NUM_CLASSES, the INPUT.*_TEST sizes); model_final.pth beside it
    .venv/bin/python tools/export_model.py --config-file output/mydata/config.yaml \\
        --format onnx --output export/mydata --verify
    # TorchScript by tracing (default), checked on images of other sizes
    .venv/bin/python tools/export_model.py --config-file configs/COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml \\
        --output export/frcn_ts --verify MODEL.WEIGHTS output/model_final.pth
    # ONNX (opset 17), run in onnxruntime by --verify
    .venv/bin/python tools/export_model.py --config-file ... --format onnx --output export/frcn_onnx --verify
    # TorchScript by scripting
    .venv/bin/python tools/export_model.py --config-file ... --export-method scripting --output export/frcn_script
    # the Appendix B UnsharedRCNN (both networks) from the schedule's OUTPUT_DIR/model_final.pth
    .venv/bin/python tools/export_model.py --config-file configs/COCO-Detection/faster_rcnn_X_50_32x4d_C4_appendixB.yaml \\
        --format onnx --output export/appendixB --verify
    # latency of one image: eager fp32, fast path, TorchScript, onnxruntime
    .venv/bin/python tools/export_model.py --config-file configs/COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml \\
        --benchmark --output export/bench MODEL.WEIGHTS ""

Weights: ``MODEL.WEIGHTS`` when given after the flags; otherwise the config's trained
model ``OUTPUT_DIR/model_final.pth``, or the one beside the config file (a run's
config.yaml); otherwise the config's ``MODEL.WEIGHTS``. Loading is strict, as for
evaluation. ``MODEL.WEIGHTS ""`` exports the randomly initialised
model (with a warning), for smoke tests.

``--verify`` exits with status 1 when the exported model's boxes, scores, classes or
masks differ from the eager model's past float tolerance. A combination that cannot be
exported (or would compute another model, such as ONNX opset < 16 with ROIAlignV2), a
bad config or weights, and ``--verify`` of an ONNX file without the onnxruntime package
(the file is written; the line says it is not verified and how to install it) end with
one line on standard error and exit status 2
(``RESNEXT_DET_TRACEBACK=1`` adds the traceback). The work is done by
:func:`resnext_det.export.run_export`; docs/deploy.md has the support table.
"""
import argparse
import sys

from resnext_det.cli.tool import run_tool
from resnext_det.engine.setup import setup_logging
from resnext_det.export import DEFAULT_OPSET, FORMATS, METHODS, run_export


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a resnext_det model to TorchScript or ONNX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-file", required=True, metavar="FILE",
        help="the model's config (a trained run's OUTPUT_DIR/config.yaml carries its classes and sizes)",
    )
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="output format")
    parser.add_argument(
        "--export-method",
        choices=METHODS,
        default="tracing",
        help="tracing (TorchScript and ONNX), scripting (TorchScript), torch_export "
        "(ONNX through torch.export; stops in Detectron2 today, see docs/deploy.md)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.ts / model.onnx")
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image to trace with and verify on (default: the first image of the bundled "
        "shapes_val set)",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}; >= 16 "
        "for models with ROIAlignV2)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the exported file beside the eager model on images of other sizes; exit 1 "
        "past float tolerance",
    )
    parser.add_argument(
        "--benchmark",
        action="store_true",
        help="instead of exporting: latency of one image in eager fp32, the fast path, "
        "TorchScript and onnxruntime",
    )
    parser.add_argument(
        "--benchmark-sizes", type=int, nargs="+", default=[800, 320], metavar="PX",
        help="short sides for --benchmark (default 800 320)",
    )
    parser.add_argument("--benchmark-repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging()
    return run_export(
        args.config_file,
        args.opts,
        output=args.output,
        format=args.format,
        method=args.export_method,
        sample_image_file=args.sample_image,
        opset=args.opset,
        verify=args.verify,
        benchmark=args.benchmark,
        benchmark_sizes=args.benchmark_sizes,
        benchmark_repeats=args.benchmark_repeats,
    )


if __name__ == "__main__":
    sys.exit(run_tool(main, "export_model.py"))
