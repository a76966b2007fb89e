# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The synthetic shapes dataset: determinism, COCO validity checked independently
(pycocotools rasterisation, polygon extents, OpenCV shape fitting), the promised
ranges, Detectron2 registration and evaluation, and safe concurrent generation."""
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
import pycocotools.mask as mask_util

import resnext_det  # noqa: F401  (registers shapes_train / shapes_val)
from resnext_det.data import shapes
from resnext_det.data.shapes import generate_shapes, read_marker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_digest(root):
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_sample") / "shapes")
    generate_shapes(root, num_train=60, num_val=20, seed=3)
    return root


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = generate_shapes(str(tmp_path / "a" / "shapes"), num_train=8, num_val=4, seed=5)
    b = generate_shapes(str(tmp_path / "b" / "shapes"), num_train=8, num_val=4, seed=5)
    c = generate_shapes(str(tmp_path / "c" / "shapes"), num_train=8, num_val=4, seed=6)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert len([p for p in da if p.endswith(".jpg")]) == 12
    assert da == db  # every JSON and every image, byte for byte
    json_name = os.path.join("annotations", "instances_train.json")
    assert da[json_name] != dc[json_name]  # and the seed matters


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_validity_checked_independently(sample, split):
    coco = COCO(os.path.join(sample, "annotations", f"instances_{split}.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "ellipse", "triangle"]
    assert len(coco.getImgIds()) == {"train": 60, "val": 20}[split]
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
    for img_info in coco.loadImgs(coco.getImgIds()):
        W, H = img_info["width"], img_info["height"]
        img = cv2.imread(os.path.join(sample, split, img_info["file_name"]))
        assert img is not None and img.shape == (H, W, 3) == (256, 256, 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_info["id"]))
        masks = []
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= W and y + h <= H
            assert len(a["segmentation"]) == 1 and len(a["segmentation"][0]) >= 6
            poly = np.array(a["segmentation"][0], dtype=np.float64).reshape(-1, 2)
            # the box is the polygon's extent (computed here from the vertices), within 1 px
            # (the generator traces the mask at 4x, so it is in fact within 1/8 px)
            np.testing.assert_allclose(
                [x, y, x + w, y + h], [*poly.min(0), *poly.max(0)], atol=0.5)
            # pycocotools' own rasterisation of the polygon agrees with bbox and area
            rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], H, W))
            # (a triangle's sharpest px covers no pixel centre: the raster can lose 1.5 px)
            mx, my, mw, mh = mask_util.toBbox(rle)
            np.testing.assert_allclose([mx, my, mx + mw, my + mh], [x, y, x + w, y + h], atol=1.5)
            shoelace = 0.5 * abs(np.dot(poly[:, 0], np.roll(poly[:, 1], 1))
                                 - np.dot(poly[:, 1], np.roll(poly[:, 0], 1)))
            assert abs(a["area"] - shoelace) <= 0.05 * a["area"] + 2.0
            assert abs(float(mask_util.area(rle)) - a["area"]) <= 0.1 * a["area"] + 6.0
            masks.append(coco.annToMask(a).astype(bool))
        # COCO's convention: masks are the visible parts, so objects never share pixels
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert (masks[i] & masks[j]).sum() <= 2


def test_counts_sizes_overlaps_and_balance(sample):
    coco = COCO(os.path.join(sample, "annotations", "instances_train.json"))
    per_image = [coco.loadAnns(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    counts = [len(a) for a in per_image]
    assert min(counts) >= 1 and max(counts) <= 6
    assert set(counts) == set(range(1, 7))  # every count from 1 to 6 occurs in 60 images
    sides = np.array([max(a["bbox"][2:]) for anns in per_image for a in anns])
    assert sides.min() >= 16 and sides.max() <= 96  # objects 16-96 px (longer side)
    assert sides.min() < 24 and sides.max() > 80  # and the whole range is used
    with_overlap = sum(any(_overlap(a["bbox"], b["bbox"]) for i, a in enumerate(anns)
                           for b in anns[i + 1:]) for anns in per_image)
    assert with_overlap >= 0.15 * len(per_image)  # objects may overlap, and do
    cats = np.array([a["category_id"] for anns in per_image for a in anns])
    frac = np.bincount(cats, minlength=4)[1:] / len(cats)
    assert np.all(frac > 0.22) and np.all(frac < 0.45), frac  # 3 classes, roughly balanced


def test_classes_have_the_promised_geometry_and_contrast(sample):
    """Fits shapes to the polygons of unoccluded objects with OpenCV: circles are round,
    ellipses are clearly elongated (the confusable pair is separable), triangles have 3
    corners; and every object stands out from its surroundings in the image."""
    coco = COCO(os.path.join(sample, "annotations", "instances_train.json"))
    ratios = {1: [], 2: []}
    seen = {1: 0, 2: 0, 3: 0}
    for info in coco.loadImgs(coco.getImgIds()):
        img = cv2.imread(os.path.join(sample, "train", info["file_name"])).astype(np.float64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
        for i, a in enumerate(anns):
            if any(_overlap(a["bbox"], b["bbox"]) for j, b in enumerate(anns) if j != i):
                continue
            p = np.array(a["segmentation"][0], np.float32).reshape(-1, 1, 2)
            corners = len(cv2.approxPolyDP(p, 0.04 * cv2.arcLength(p, True), True))
            cat = a["category_id"]
            seen[cat] += 1
            if cat == 3:
                assert corners == 3
            else:
                assert corners >= 4  # a small thin ellipse may reduce to 4
                (_, _), (d1, d2), _ = cv2.fitEllipse(p)
                ratios[cat].append(min(d1, d2) / max(d1, d2))
            m = coco.annToMask(a)
            inner = cv2.erode(m, np.ones((3, 3), np.uint8)).astype(bool)
            ring = (cv2.dilate(m, np.ones((7, 7), np.uint8))
                    - cv2.dilate(m, np.ones((3, 3), np.uint8))).astype(bool)
            assert np.linalg.norm(img[inner].mean(0) - img[ring].mean(0)) > 40
    assert min(seen.values()) >= 10
    assert min(ratios[1]) > 0.95  # circles
    assert 0.45 < min(ratios[2]) and max(ratios[2]) < 0.8  # ellipses: minor/major 0.5-0.75


def test_registered_datasets_load_with_metadata(tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode
    from detectron2.utils.visualizer import Visualizer

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    # a complete dataset of any size at $DETECTRON2_DATASETS/shapes is used as it is
    generate_shapes(str(tmp_path / "shapes"), num_train=6, num_val=3, seed=1)
    for name, split, n in (("shapes_train", "train", 6), ("shapes_val", "val", 3)):
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == n
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["circle", "ellipse", "triangle"]
        assert meta.evaluator_type == "coco"
        assert meta.json_file == str(tmp_path / "shapes" / "annotations" / f"instances_{split}.json")
        assert meta.image_root == str(tmp_path / "shapes" / split)
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (256, 256)
            assert 1 <= len(d["annotations"]) <= 6
            for a in d["annotations"]:
                assert a["bbox_mode"] == BoxMode.XYWH_ABS and a["category_id"] in (0, 1, 2)
                assert len(a["segmentation"][0]) >= 6
    d = DatasetCatalog.get("shapes_val")[0]
    img = cv2.imread(d["file_name"])[:, :, ::-1]
    drawn = Visualizer(img, metadata=MetadataCatalog.get("shapes_val")).draw_dataset_dict(d)
    assert drawn.get_image().shape == (256, 256, 3)
    assert not np.array_equal(drawn.get_image(), img)  # boxes and masks were drawn


def test_evaluator_built_before_any_load_generates_and_scores_ground_truth(tmp_path, monkeypatch):
    """COCOEvaluator reads metadata.json_file in its constructor: on a fresh machine
    this must generate the default dataset; scoring the ground truth gives AP 100."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "fresh"))
    evaluator = COCOEvaluator("shapes_val", tasks=("bbox",), output_dir=str(tmp_path / "eval"))
    marker = read_marker(str(tmp_path / "fresh" / "shapes"))
    assert marker["num_train"] == 400 and marker["num_val"] == 100
    evaluator.reset()
    for d in DatasetCatalog.get("shapes_val"):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in d["annotations"]]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()["bbox"]
    assert res["AP"] == pytest.approx(100.0, abs=0.01)
    assert {"AP-circle", "AP-ellipse", "AP-triangle"} <= set(res)


def test_bad_arguments_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--num-train"):
        generate_shapes(str(tmp_path / "s"), num_train=0)
    with pytest.raises(ValueError, match="--seed"):
        generate_shapes(str(tmp_path / "s"), seed=-1)


_WORKER = textwrap.dedent("""
    import os, sys, time
    from resnext_det.data.shapes import generate_shapes
    root, go = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    print(generate_shapes(root, num_train=int(sys.argv[3]), num_val=5, seed=2), flush=True)
""")


def _worker(root, go, num_train):
    return subprocess.Popen([sys.executable, "-c", _WORKER, root, go, str(num_train)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)


def test_two_processes_generating_at_once_leave_one_valid_dataset(tmp_path):
    root, go = str(tmp_path / "ds" / "shapes"), str(tmp_path / "go")
    procs = [_worker(root, go, 30) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    open(go, "w").close()  # both start generating at the same moment
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.split()[-1] for o in outs] == [root, root]
    ref = generate_shapes(str(tmp_path / "ref" / "shapes"), num_train=30, num_val=5, seed=2)
    assert _tree_digest(root) == _tree_digest(ref)  # complete, and not a mix of two runs
    assert os.listdir(os.path.dirname(root)) == ["shapes"]  # no temporary folders left


def test_killed_generation_never_leaves_a_dataset_in_place(tmp_path):
    root, go = str(tmp_path / "ds" / "shapes"), str(tmp_path / "go")
    p = _worker(root, go, 5000)
    assert p.stdout.readline().strip() == "ready"
    open(go, "w").close()
    deadline = time.time() + 120
    while not glob.glob(os.path.join(os.path.dirname(root), ".shapes.tmp-*", "train", "*.jpg")):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(root)  # only the temporary folder was half-written
    # a half-written dataset at the final path (no completion marker) is never used
    os.makedirs(os.path.join(root, "annotations"))
    with open(os.path.join(root, "annotations", "instances_train.json"), "w") as f:
        f.write('{"images": [')
    assert read_marker(root) is None
    generate_shapes(root, num_train=4, num_val=2, seed=0)
    assert read_marker(root)["num_train"] == 4
    assert COCO(os.path.join(root, "annotations", "instances_train.json")).getImgIds()
    assert os.listdir(os.path.dirname(root)) == ["shapes"]  # the stale temp folder is gone


def test_ensure_regenerates_incomplete_or_outdated_data(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "DEFAULT_NUM_TRAIN", 3)
    monkeypatch.setattr(shapes, "DEFAULT_NUM_VAL", 2)
    root = str(tmp_path / "shapes")
    os.makedirs(os.path.join(root, "train"))  # e.g. a copy interrupted half way
    shapes.ensure_shapes(root)
    assert read_marker(root)["num_train"] == 3
    # a dataset from another generator version is regenerated with its own parameters
    generate_shapes(root, num_train=5, num_val=2, seed=4)
    marker_path = os.path.join(root, "COMPLETE.json")
    with open(marker_path) as f:
        marker = json.load(f)
    marker["generator_version"] = -1
    with open(marker_path, "w") as f:
        json.dump(marker, f)
    shapes.ensure_shapes(root)
    marker = read_marker(root)
    assert (marker["generator_version"], marker["num_train"], marker["seed"]) == (
        shapes.GENERATOR_VERSION, 5, 4)


def test_cli_generates_and_reports(tmp_path):
    root = str(tmp_path / "shapes")
    cmd = [sys.executable, os.path.join(REPO, "datasets", "generate_shapes.py"), "--root", root,
           "--num-train", "3", "--num-val", "2", "--seed", "7"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "train 3 images" in out.stdout and "val 2 images" in out.stdout
    assert read_marker(root)["seed"] == 7
    bad = subprocess.run(cmd[:4] + ["--num-val", "0"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "num_val (CLI --num-val) must be an integer >= 1" in bad.stderr
