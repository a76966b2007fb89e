#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Check a COCO folder for this project's configs, file by file, or your own COCO-format
datasets image by image. Never downloads.

    python datasets/prepare_coco.py --check                       # $DETECTRON2_DATASETS/coco
    python datasets/prepare_coco.py --check --root /data/datasets --datasets zoo
    python datasets/prepare_coco.py --check --config-file configs/Base-ResNeXt-FPN.yaml
    python datasets/prepare_coco.py --check --register-coco mydata_train data/train.json data/images \
        --register-coco mydata_val data/val.json data/images [--verify-images]

``--root`` is the folder that holds ``coco/`` (Detectron2's ``$DETECTRON2_DATASETS``,
default ``datasets``). What each file is and where it comes from: datasets/README.md.
``--register-coco`` datasets (and the non-COCO datasets of ``--config-file``) get the check
a training run starts with (``resnext_det.data.check_datasets``): the json loads, every
image file is there, the boxes training drops; ``--verify-images`` also decodes each image.
Exit status: 0 when every needed file is present and looks right, 1 otherwise,
2 for a bad command line.
"""
import argparse
import os
import sys
from typing import List, Optional

from resnext_det.data import check_datasets, format_checks
from resnext_det.data.coco_check import COCO_DATASETS, check_coco, format_report, resolve_datasets
from resnext_det.data.checks import unreadable_images
from resnext_det.data.custom import add_register_coco_argument, register_coco_datasets
from resnext_det.engine import setup_cfg
from resnext_det.errors import UserError


def _config_datasets(config_file: str) -> List[str]:
    cfg = setup_cfg(config_file, [])
    return list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="inspect the COCO folder and report what is present / missing")
    parser.add_argument("--root", default=None,
                        help="folder holding coco/ (default: $DETECTRON2_DATASETS or 'datasets')")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="Detectron2 dataset names whose files are needed, or the groups "
                             "'appendix-b' (default: coco_2014_train, coco_2014_valminusminival, "
                             "coco_2014_minival), 'zoo' (coco_2017_train, coco_2017_val), 'all'; "
                             "with --register-coco: none unless given")
    parser.add_argument("--config-file", default=None,
                        help="take the needed datasets from this config's DATASETS.TRAIN/TEST "
                             "(overrides --datasets)")
    parser.add_argument("--full-parse-max-mb", type=float, default=64.0,
                        help="JSON files up to this size are parsed fully; larger ones are "
                             "streamed (structure + image count)")
    parser.add_argument("--verify-images", action="store_true",
                        help="with --check: also decode every image of the needed folders (and of "
                             "the --register-coco datasets) and list the ones training and evaluation "
                             "would skip (truncated, not an image, 16-bit, another size than the json's); "
                             "slow: about 10 min for train2017 on one core")
    add_register_coco_argument(parser)
    args = parser.parse_args(argv)
    if not args.check:
        parser.error("nothing to do: pass --check (this tool never downloads; see datasets/README.md)")

    try:
        own = register_coco_datasets(args.register_coco)
    except UserError as e:
        parser.error(str(e))
    root = os.path.abspath(os.path.expanduser(
        args.root or os.getenv("DETECTRON2_DATASETS", "datasets")))
    coco_dir = os.path.join(root, "coco")
    if not os.path.isdir(coco_dir) and os.path.isdir(os.path.join(root, "annotations")):
        print(f"note: {root} has annotations/ but no coco/: checking it as the coco folder itself "
              f"(Detectron2 expects it at $DETECTRON2_DATASETS/coco)")
        coco_dir = root
    names = args.datasets or ([] if own else ["appendix-b"])
    if args.config_file:
        all_names = _config_datasets(args.config_file)
        names = [n for n in all_names if n in COCO_DATASETS]
        own += [n for n in all_names if n not in COCO_DATASETS and n not in own]
    try:
        names = resolve_datasets(names)
    except ValueError as e:
        parser.error(str(e))
    ok = True
    if own:  # one code path with the start of a training run
        reports = check_datasets(own, verify_images=args.verify_images, strict=False)
        print(format_checks(reports))
        ok = all(r.ok for r in reports)
        if not names:
            return 0 if ok else 1
        print()
    if not os.path.isdir(coco_dir):
        print(f"COCO folder {coco_dir} does not exist: create it and put the files listed in "
              f"datasets/README.md there, or point --root / $DETECTRON2_DATASETS at the folder "
              f"that holds coco/.")
    items = check_coco(coco_dir, datasets=names,
                       full_parse_max_bytes=int(args.full_parse_max_mb * (1 << 20)))
    print(format_report(items, coco_dir, datasets=names))
    ok = ok and all(i.ok for i in items if i.needed)
    if args.verify_images:
        bad = []
        for i in items:
            if i.needed and i.kind == "images" and i.status != "missing":
                bad += unreadable_images(os.path.join(coco_dir, i.path))
        for path, reason in bad:
            print(f"  [ UNREADABLE] {path}: {reason}")
        print(f"{len(bad)} image(s) that training would skip" if bad else "Every image decodes.")
        ok = ok and not bad
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
