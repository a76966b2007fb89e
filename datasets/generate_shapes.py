#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Generate the synthetic shapes dataset (registered as shapes_train / shapes_val).

    python datasets/generate_shapes.py                       # $DETECTRON2_DATASETS/shapes
    python datasets/generate_shapes.py --num-train 2000 --num-val 200 --seed 1

You rarely need this: the data is generated on first use. A complete dataset with
the same parameters is kept unless --force; a bigger set made here is what
shapes_train / shapes_val then load. See docs/data.md.
"""
import argparse
import sys
import time
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from resnext_det.data.shapes import (
        DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SEED, default_shapes_root, generate_shapes,
        read_marker,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None,
                        help="dataset folder (default: $DETECTRON2_DATASETS/shapes, "
                             "DETECTRON2_DATASETS defaulting to 'datasets')")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN,
                        help=f"train images (default {DEFAULT_NUM_TRAIN})")
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL,
                        help=f"val images (default {DEFAULT_NUM_VAL})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed; the same seed gives byte-identical files (default {DEFAULT_SEED})")
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if a matching dataset exists")
    parser.add_argument("--preview", metavar="DIR", default=None,
                        help="also draw the first --preview-count train images with their boxes "
                             "and masks (Detectron2 Visualizer) into DIR/shapes_sample_*.png")
    parser.add_argument("--preview-count", type=int, default=4, help="images to draw (default 4)")
    args = parser.parse_args(argv)
    root = args.root or default_shapes_root()
    t0 = time.perf_counter()
    try:
        root = generate_shapes(root, num_train=args.num_train, num_val=args.num_val,
                               seed=args.seed, force=args.force)
    except ValueError as e:
        parser.error(str(e))
    marker = read_marker(root)
    stats = marker.get("stats", {})
    print(f"shapes dataset in {root}: "
          + ", ".join(f"{s} {v['images']} images / {v['annotations']} objects"
                      for s, v in stats.items())
          + f" (seed {marker.get('seed')}; {time.perf_counter() - t0:.1f} s)")
    if args.preview:
        for path in draw_preview(root, args.preview, count=args.preview_count):
            print(f"preview: {path}")
    return 0


def draw_preview(root: str, out_dir: str, *, count: int = 4) -> List[str]:
    """Draw the first ``count`` train images of the dataset at ``root`` with their
    ground truth (Detectron2's Visualizer, scale 2), the raw image on the left."""
    import os

    import cv2
    import numpy as np
    from detectron2.data import MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer

    from resnext_det.data.shapes import load_shapes_json, register_shapes

    name = "shapes_preview"
    if name not in MetadataCatalog.list():
        register_shapes(name, split="train", root=root)
    meta = MetadataCatalog.get(name)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, d in enumerate(load_shapes_json("train", name, root)[:count]):
        img = read_image(d["file_name"], format="RGB")
        drawn = Visualizer(img, metadata=meta, scale=2.0).draw_dataset_dict(d).get_image()
        raw = cv2.resize(img, drawn.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        path = os.path.join(out_dir, f"shapes_sample_{i}.png")
        cv2.imwrite(path, np.concatenate([raw, drawn], axis=1)[:, :, ::-1])
        paths.append(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
