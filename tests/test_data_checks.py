# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Issue 22, points 1, 6 and 11: every dataset a run reads is checked before the run
(resnext_det.data.check_datasets), and evaluation gets training's per-image safety.

The data are made here, by hand: a COCO json and tiny images written with PIL, among them
one bad item of each kind the issue probed (a 16-bit grayscale PNG, a truncated JPEG,
random bytes, a file the json names that is not on disk, an image of another size than
its json entry, a category_id absent from 'categories'). The AP of an evaluation that
skipped images is compared with Detectron2's own loader and COCOEvaluator on a json that
never had them."""
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.structures import Boxes, Instances

from resnext_det.data import check_datasets, format_checks, register_coco
from resnext_det.data.checks import image_problem
from resnext_det.data.robust import SkipUnreadableImages, evaluation_dataset_dicts, training_dataset_dicts
from resnext_det.engine import setup_cfg
from resnext_det.engine.trainer import Trainer
from resnext_det.errors import MissingFileError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "COCO-Detection", "faster_rcnn_X_50_32x4d_FPN_1x.yaml")
SIZE = 64
GOOD = [f"g{i}.jpg" for i in range(6)]
#: One bad item of each kind, and what the check calls it.
BAD = {"deep.png": "high-bit", "cut.jpg": "unreadable", "noise.jpg": "unreadable", "wide.jpg": "wrong-size"}
GONE = "gone.jpg"  # named in the json, not on disk


@pytest.fixture(autouse=True)
def _logs_reach_caplog():
    # Detectron2's setup_logger (run by other tests' setup_cfg(args=...)) stops propagation.
    pkg = logging.getLogger("resnext_det")
    old, pkg.propagate = pkg.propagate, True
    yield
    pkg.propagate = old


def _write_images(folder, bad=True):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in GOOD:
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(os.path.join(folder, f))
    if not bad:
        return
    Image.fromarray(np.full((SIZE, SIZE), 3000, np.uint16)).save(os.path.join(folder, "deep.png"))  # 16-bit
    data = open(os.path.join(folder, GOOD[0]), "rb").read()
    open(os.path.join(folder, "cut.jpg"), "wb").write(data[: len(data) // 2])  # an interrupted copy
    open(os.path.join(folder, "noise.jpg"), "wb").write(np.random.default_rng(1).bytes(3000))
    Image.fromarray(np.zeros((SIZE, SIZE + 16, 3), np.uint8)).save(os.path.join(folder, "wide.jpg"))


def _write_json(path, files, *, extra_annotations=()):
    """One box per image (category 1 or 2, 'cat' and 'dog'), all images SIZE x SIZE."""
    images = [{"id": i + 1, "file_name": f, "width": SIZE, "height": SIZE} for i, f in enumerate(files)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [8.0 + i, 10.0, 30.0, 24.0],
             "area": 720.0, "iscrowd": 0} for i in range(len(files))]
    anns += [dict(a, id=1000 + k) for k, a in enumerate(extra_annotations)]
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    with open(path, "w") as f:
        json.dump(data, f)
    return data


def _dataset(tmp_path, tag, files, *, bad=True, image_dir=None, **kw):
    """Writes the images and the json, registers them as --register-coco does."""
    images = str(tmp_path / "images")
    _write_images(images, bad=bad)
    js = str(tmp_path / f"{tag}.json")
    data = _write_json(js, files, **kw)
    name = f"dc_{tmp_path.name}_{tag}"
    register_coco(name, js, image_dir or images)
    return name, js, images, data


def _cfg(tmp_path, train=(), test=()):
    return setup_cfg(CONFIG, [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "2", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", f"({SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(SIZE),
        "INPUT.MIN_SIZE_TEST", str(SIZE), "INPUT.MAX_SIZE_TEST", str(SIZE),
        "DATASETS.TRAIN", repr(tuple(train)), "DATASETS.TEST", repr(tuple(test)),
        "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path / "out"),
    ])  # fmt: skip


# --------------------------------------------------------------------------- point 6
def test_start_of_run_check_counts_and_names_what_a_run_leaves_out(tmp_path, caplog):
    degenerate = {"image_id": 2, "category_id": 1, "bbox": [5.0, 5.0, 0.0, 9.0], "area": 0.0, "iscrowd": 0}
    name, js, images, _ = _dataset(tmp_path, "train", GOOD + [GONE], bad=False, extra_annotations=[degenerate])
    with caplog.at_level(logging.INFO):
        (r,) = check_datasets([name])
    # the counts, against the json written above
    assert (r.num_images, r.num_boxes, r.classes) == (7, 8, ["cat", "dog"])
    assert r.missing == [os.path.join(images, GONE)] and r.error is None and not r.verified
    assert r.boxes == {"zero-area or negative size": 1} and r.box_images == [os.path.join(images, "g1.jpg")]
    # one info line per dataset, one warning naming how many files are missing, and which
    assert f"dataset '{name}' ({js}): 7 images, 8 boxes, 2 categories, 1 image file(s) missing" in caplog.text
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"1 of 7 image files named in its json ({js}) are not on disk" in warnings[0]
    assert os.path.join(images, GONE) in warnings[0]


def test_a_few_missing_files_are_dropped_before_sampling_with_one_warning(tmp_path, caplog):
    # Issue 22, point 6: the missing file was skipped at every draw, the same warning 4 times in 2
    # iterations. Now: the start-of-run check warns once; training and evaluation leave it out silently.
    name, js, images, _ = _dataset(tmp_path, "few", GOOD + [GONE], bad=False)
    cfg = _cfg(tmp_path, train=[name], test=[name])
    with caplog.at_level(logging.WARNING):
        check_datasets(cfg)
        dicts = training_dataset_dicts(cfg)
        test_dicts = evaluation_dataset_dicts(cfg, name)
        loader = iter(Trainer.build_train_loader(cfg))
        batches = [next(loader) for _ in range(4)]  # 2 images each, drawn from the 6 that are there
    gone = os.path.join(images, GONE)
    assert [d["file_name"] for d in dicts] == [os.path.join(images, f) for f in GOOD]
    assert [d["file_name"] for d in test_dicts] == [os.path.join(images, f) for f in GOOD]
    assert all(len(b) == 2 and all(x["file_name"] != gone for x in b) for b in batches)
    assert caplog.text.count("not on disk") == 1 and caplog.text.count(gone) == 1


def test_a_wrong_image_folder_is_refused_naming_the_folder(tmp_path):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    name, js, _, _ = _dataset(tmp_path, "wrong", GOOD, bad=False, image_dir=str(empty))
    with pytest.raises(MissingFileError) as e:
        check_datasets([name])
    msg = str(e.value)
    assert "\n" not in msg and f"dataset '{name}': 6 of the 6 image files its json ({js})" in msg
    assert f"not in the image folder {empty} (e.g. {empty / GOOD[0]}" in msg and "--register-coco" in msg
    # the loaders refuse it too (a run that skipped the check): not 6 images skipped at every draw
    with pytest.raises(MissingFileError, match="not in the image folder"):
        training_dataset_dicts(_cfg(tmp_path, train=[name]))


def test_half_missing_is_dropped_more_is_refused(tmp_path):
    images = str(tmp_path / "images")
    _write_images(images, bad=False)
    for n_gone, refused in ((6, False), (7, True)):  # of 12: MOST_MISSING = 50%
        js = str(tmp_path / f"half{n_gone}.json")
        _write_json(js, GOOD + [f"gone{i}.jpg" for i in range(n_gone)])
        name = f"dc_{tmp_path.name}_half{n_gone}"
        register_coco(name, js, images)
        (r,) = check_datasets([name], strict=False)
        assert len(r.missing) == n_gone and (r.error is not None) == refused


def test_unknown_category_id_is_one_line_naming_json_id_and_image(tmp_path):
    stray = {"image_id": 3, "category_id": 9, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0}
    name, js, _, _ = _dataset(tmp_path, "cats", GOOD, bad=False, extra_annotations=[stray])
    with pytest.raises(UserError) as e:
        check_datasets([name])
    msg = str(e.value)
    assert not isinstance(e.value, KeyError) and "\n" not in msg
    assert js in msg and "category_id 9" in msg and "'g2.jpg'" in msg and "ids 1, 2" in msg
    # where users met the KeyError: the training loader
    with pytest.raises(UserError, match="category_id 9"):
        training_dataset_dicts(_cfg(tmp_path, train=[name]))


def test_verify_images_finds_each_bad_kind(tmp_path):
    name, _, images, _ = _dataset(tmp_path, "all", GOOD + list(BAD) + [GONE])
    (r,) = check_datasets([name], verify_images=True, strict=False)
    assert r.missing == [os.path.join(images, GONE)] and r.verified
    assert {os.path.basename(p.path): p.kind for p in r.unusable} == BAD
    reasons = {os.path.basename(p.path): p.reason for p in r.unusable}
    assert "more than 8 bits" in reasons["deep.png"] and "is 80x64 (width x height)" in reasons["wide.jpg"]
    # the header-only read finds all but the truncated file (its pixels are not decoded)
    assert image_problem(os.path.join(images, "cut.jpg"), decode=False) is None
    assert image_problem(os.path.join(images, "cut.jpg")).kind == "unreadable"


# --------------------------------------------------------------------------- prepare_coco.py
def _prepare_coco():
    spec = importlib.util.spec_from_file_location("prepare_coco", os.path.join(ROOT, "datasets", "prepare_coco.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepare_coco_checks_a_register_coco_dataset(tmp_path, capsys):
    # Issue 22, point 6: "--register-coco is not accepted", "Unknown COCO dataset".
    images = str(tmp_path / "images")
    _write_images(images)
    js = str(tmp_path / "mine.json")
    _write_json(js, GOOD + list(BAD) + [GONE])
    name = f"dc_{tmp_path.name}_cli"
    main = _prepare_coco().main
    assert main(["--check", "--register-coco", name, js, images]) == 1
    out = capsys.readouterr().out
    assert f"Dataset {name}: json {js}, images in {images}" in out
    assert "[    MISSING] 1 of 11 image files are not on disk" in out and GONE in out
    assert "--verify-images decodes each one" in out and out.rstrip().endswith(f"cannot be loaded: {name}")
    assert "COCO folder" not in out  # the COCO tree is not what was asked about
    assert main(["--check", "--register-coco", name, js, images, "--verify-images"]) == 1
    out = capsys.readouterr().out
    for f, kind in BAD.items():
        line = next(l for l in out.splitlines() if f in l)
        assert f"[{kind.upper():>11}] {os.path.join(images, f)}:" in line
    # a clean dataset is READY, exit 0
    clean = str(tmp_path / "clean.json")
    _write_json(clean, GOOD)
    assert main(["--check", "--register-coco", f"{name}_clean", clean, images, "--verify-images"]) == 0
    assert "READY: all 1 datasets load and every image file is decoded." in capsys.readouterr().out


# --------------------------------------------------------------------------- point 11
class _Table(torch.nn.Module):
    """A detector whose detections are a table (image id -> [(x0, y0, x1, y1, score, class)]):
    COCO AP of known detections, and a record of the images it was given."""

    def __init__(self, table):
        super().__init__()
        self.table, self.seen = table, []

    def forward(self, inputs):
        out = []
        for x in inputs:
            self.seen.append(x["image_id"])
            rows = torch.tensor(self.table.get(x["image_id"], []), dtype=torch.float32).reshape(-1, 6)
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes, inst.scores, inst.pred_classes = Boxes(rows[:, :4]), rows[:, 4], rows[:, 5].long()
            out.append({"instances": inst})
        return out


def _detections(data):
    """Imperfect detections of the good images (AP well inside (0, 100)), and confident false
    ones on the bad images: an evaluation that scored any bad image would get another AP."""
    table = {}
    for im in data["images"]:
        i = im["id"]
        (a,) = [a for a in data["annotations"] if a["image_id"] == i]
        x, y, w, h = a["bbox"]
        gt, cls = [x, y, x + w, y + h], a["category_id"] - 1
        if im["file_name"] not in GOOD:
            table[i] = [[40.0, 40.0, 60.0, 60.0, 0.99, cls]]
            continue
        table[i] = {
            0: [gt + [0.9, cls]],
            1: [gt + [0.8, cls]],
            2: [[30.0, 34.0, 60.0, 60.0, 0.85, cls], gt + [0.3, cls]],
            3: [],
            4: [[x + 6, y + 3, x + w + 6, y + h + 3, 0.7, cls]],
            5: [gt + [0.95, 1 - cls], gt + [0.6, cls]],
        }[GOOD.index(im["file_name"])]
    return table


def test_evaluation_skips_each_bad_image_by_name_and_scores_the_others(tmp_path, caplog):
    # Issue 22, point 11: a 16-bit PNG was scored as an all-white image (a wrong AP), and a
    # truncated, garbage, missing or resized test image ended the end-of-training evaluation.
    name, js, images, data = _dataset(tmp_path, "val", GOOD + list(BAD) + [GONE])
    cfg = _cfg(tmp_path, test=[name])
    table = _detections(data)
    model = _Table(table)
    with caplog.at_level(logging.WARNING):
        res = Trainer.test(cfg, model)  # what the end of training runs
    bad = sorted(list(BAD) + [GONE])
    ids = {im["file_name"]: im["id"] for im in data["images"]}
    assert sorted(model.seen) == sorted(ids[f] for f in GOOD)  # the bad images never reached the model
    assert res["skipped_images"] == len(bad) == 5
    listed = json.load(open(tmp_path / "out" / "inference" / name / "skipped_images.json"))
    assert sorted(os.path.basename(f) for f in listed["skipped"]) == bad and listed["images"] == 11
    for f in BAD:
        assert f"Skipped evaluation image {os.path.join(images, f)}" in caplog.text
    assert "Mismatched image shape" in caplog.text and "more than 8 bits" in caplog.text
    assert f"Evaluation of {name} skipped 5 of its 11 images" in caplog.text

    # The independent reference: Detectron2's own loader and COCOEvaluator, the same detections,
    # on a json that never had the bad images.
    ref_json = str(tmp_path / "ref.json")
    ref_data = _write_json(ref_json, GOOD)
    ref = f"{name}_ref"
    register_coco(ref, ref_json, images)
    ref_table = {im["id"]: table[ids[im["file_name"]]] for im in ref_data["images"]}
    want = inference_on_dataset(
        _Table(ref_table),
        build_detection_test_loader(DatasetCatalog.get(ref), mapper=DatasetMapper(cfg, False)),
        COCOEvaluator(ref, tasks=("bbox",), output_dir=str(tmp_path / "ref")),
    )["bbox"]  # fmt: skip
    assert 10 < want["AP"] < 90  # a number the bad images would move
    assert set(res["bbox"]) == set(want)
    for k, v in want.items():
        assert (math.isnan(v) and math.isnan(res["bbox"][k])) or res["bbox"][k] == pytest.approx(v, abs=1e-9), k

    # What Detectron2 alone does with the 16-bit PNG: an all-white image, which it would score.
    deep = {"file_name": os.path.join(images, "deep.png"), "image_id": 0, "height": SIZE, "width": SIZE}
    assert int(DatasetMapper(cfg, False)(dict(deep))["image"].min()) == 255


def test_evaluation_of_a_clean_dataset_reports_nothing_skipped(tmp_path, caplog):
    name, _, _, data = _dataset(tmp_path, "clean", GOOD, bad=False)
    with caplog.at_level(logging.WARNING):
        res = Trainer.test(_cfg(tmp_path, test=[name]), _Table(_detections(data)))
    assert "skipped_images" not in res and "skipped" not in caplog.text and "AP" in res["bbox"]


def test_training_skips_an_image_of_another_size_than_its_json_entry(tmp_path, caplog):
    # Issue 22, point 11: Detectron2's SizeMismatchError ended training.
    name, _, images, _ = _dataset(tmp_path, "size", GOOD + ["wide.jpg", "cut.jpg"])
    cfg = _cfg(tmp_path, train=[name])
    mapper = SkipUnreadableImages(DatasetMapper(cfg, True))
    dicts = {os.path.basename(d["file_name"]): d for d in training_dataset_dicts(cfg)}
    with caplog.at_level(logging.WARNING):
        assert mapper(dict(dicts["wide.jpg"])) is None
        assert mapper(dict(dicts["cut.jpg"])) is None
        assert mapper(dict(dicts["cut.jpg"])) is None  # drawn again in a later epoch: said once
        assert mapper(dict(dicts["g0.jpg"]))["image"].shape[1:] == (SIZE, SIZE)
    assert f"Skipped training image {os.path.join(images, 'wide.jpg')}: Mismatched image shape" in caplog.text
    assert caplog.text.count("cut.jpg") == 1 and mapper.skipped[os.path.join(images, "cut.jpg")] == 2


def test_dropped_box_warning_names_the_images(tmp_path, caplog):
    outside = {"image_id": 4, "category_id": 2, "bbox": [70.0, 70.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0}
    name, _, images, _ = _dataset(tmp_path, "boxes", GOOD, bad=False, extra_annotations=[outside])
    with caplog.at_level(logging.WARNING):
        training_dataset_dicts(_cfg(tmp_path, train=[name]))
    g3 = os.path.join(images, "g3.jpg")
    assert f"{name}: training drops 1 box(es) (1 outside the image) of 1 image(s) ({g3})" in caplog.text


# --------------------------------------------------------------------------- point 1
def test_builtin_coco_without_its_json_is_one_line_naming_the_folder(tmp_path):
    # Issue 22, point 1: a shipped COCO config without COCO ended in a 47-line traceback, exit 1.
    # MODEL.WEIGHTS "": the README's case has its weights converted already (no download here).
    empty = tmp_path / "datasets"
    empty.mkdir()
    env = dict(os.environ, DETECTRON2_DATASETS=str(empty), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG,
         "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    json_file = empty / "coco" / "annotations" / "instances_train2017.json"
    assert last.startswith("train_net.py: error: dataset 'coco_2017_train': its annotation file ")
    assert str(json_file) in last and f"DETECTRON2_DATASETS folder {empty}" in last
    assert "datasets/prepare_coco.py --check --datasets coco_2017_train" in last


def test_report_of_several_datasets_and_an_unregistered_name(tmp_path):
    name, _, _, _ = _dataset(tmp_path, "ok", GOOD, bad=False)
    reports = check_datasets([name, name, "dc_nowhere"], strict=False)
    assert [r.name for r in reports] == [name, "dc_nowhere"]  # once each
    assert reports[0].ok and "--register-coco dc_nowhere JSON IMAGE_DIR" in str(reports[1].error)
    text = format_checks(reports)
    assert "[         ok] 6 images, 6 boxes, 2 categories: cat, dog" in text
    assert text.endswith("NOT READY: 1 of 2 datasets have missing or unusable files or cannot be loaded: dc_nowhere")
    with pytest.raises(UserError, match="dc_nowhere"):
        check_datasets([name, "dc_nowhere"])


def test_appendix_b_results_table_says_how_many_images_an_evaluation_skipped():
    from resnext_det.unshared.report import results_markdown

    md = results_markdown({"stored_proposals": {"mine_val": {"bbox": {"AP": 40.0}, "skipped_images": 2}},
                           "end_to_end": {"mine_val": {"bbox": {"AP": 41.0}}}})
    notes = [line for line in md.splitlines() if line.startswith("- ")]
    assert notes == ["- ours: Fast R-CNN on stored proposals (stage 4), mine_val: 2 image(s) skipped (unreadable, "
                     "missing or of another size than the json's; named in the log and in skipped_images.json): "
                     "AP over the others, not the whole dataset's."]
