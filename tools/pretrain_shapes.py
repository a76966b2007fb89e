#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Stage 0 of ``make demo``: pretrain the config's ResNeXt as a classifier on
crops of the shapes training images (the demo's stand-in for ImageNet-1K), write
it as torchvision weights and convert it for ``MODEL.WEIGHTS``.

    python tools/pretrain_shapes.py --config-file configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml
    python tools/train_net.py --config-file <same> MODEL.WEIGHTS <the printed path>
    # crops of your own COCO-format data instead of the shapes (at most 3 categories:
    # the classifier's classes are the shapes' three and background)
    python tools/pretrain_shapes.py --config-file <same> --register-coco mydata_train data/train.json data/images \
        --train-dataset mydata_train --val-dataset ''

The architecture (depth, C, d) is the config's ``MODEL.RESNEXT``; the output
folder defaults to ``OUTPUT_DIR/stage0_pretrain``. A finished folder is reused; an
interrupted one resumes (Ctrl-C saves the iteration under way and says so in one
line). Errors end in one line naming the fix, exit status 2. See
:mod:`resnext_det.pretrain`.
"""
import argparse
import os
import sys

from resnext_det.data import add_register_coco_argument, register_coco_datasets
from resnext_det.cli.tool import run_tool
from resnext_det.pretrain import STAGE0_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_parser() -> argparse.ArgumentParser:
    from resnext_det.pretrain import PretrainSettings

    d = PretrainSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the detection config whose backbone to pretrain")
    p.add_argument("--output-dir", help=f"default: OUTPUT_DIR/{STAGE0_DIR} of the config")
    p.add_argument("--iters", type=int, default=d.iters, help=f"default {d.iters}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--crop-size", type=int, default=d.crop_size, help=f"default {d.crop_size}")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer, help=f"default {d.optimizer}")
    p.add_argument("--lr", type=float, default=d.base_lr, help=f"peak learning rate (default {d.base_lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--train-dataset", default="shapes_train", help="a registered dataset (see --register-coco)")
    p.add_argument("--val-dataset", default="shapes_val", help="'' for no accuracy")
    add_register_coco_argument(p)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the config")
    return p


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    from detectron2.utils.logger import setup_logger

    import resnext_det  # noqa: F401  registers the shapes datasets
    from resnext_det.engine import setup_cfg
    from resnext_det.pretrain import pretrain_shapes_classifier, settings_from_config

    register_coco_datasets(args.register_coco)
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    cfg = setup_cfg(args.config_file, opts)
    out = args.output_dir or os.path.join(cfg.OUTPUT_DIR, STAGE0_DIR)
    setup_logger(out, name="resnext_det")
    settings = settings_from_config(
        cfg, iters=args.iters, batch_size=args.batch_size, crop_size=args.crop_size,
        optimizer=args.optimizer, base_lr=args.lr, weight_decay=args.weight_decay, bf16=not args.fp32,
    )
    result = pretrain_shapes_classifier(settings, output_dir=out, train_dataset=args.train_dataset,
                                        val_dataset=args.val_dataset or None)
    if args.json:
        from resnext_det.utils.io import atomic_write_json

        atomic_write_json(args.json, result)
    acc = result.get("val_accuracy")
    print(f"Stage 0 done: accuracy on {result.get('val_dataset')} crops "
          f"{'n/a' if acc is None else f'{acc:.1f}%'}; train the detector with\n"
          f"  MODEL.WEIGHTS {result['weights']}")
    return result


if __name__ == "__main__":
    sys.exit(run_tool(main, "pretrain_shapes.py"))
