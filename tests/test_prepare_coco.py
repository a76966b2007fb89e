# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""datasets/prepare_coco.py --check on fake COCO trees: present, missing, corrupt,
wrong-count and incomplete cases, the dataset groups, and no network use; --verify-images names
the images training would skip."""
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from resnext_det.data import coco_check

from reliability_helpers import ROOT, _images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "prepare_coco", os.path.join(REPO, "datasets", "prepare_coco.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prepare_coco = _load_cli()

# the fake tree's sizes: tiny stand-ins for 82783 / 35504 / 5000 / 40504 images
FAKE_COUNTS = {
    "annotations/instances_train2014.json": 3,
    "annotations/instances_valminusminival2014.json": 2,
    "annotations/instances_minival2014.json": 2,
    "train2014": 3,
    "val2014": 4,
}


def _write_json(path, n_images):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {
        "info": {"description": "fake"},
        "images": [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": 8, "width": 8}
                   for i in range(n_images)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                         "area": 4, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _make_tree(root, skip=()):
    coco = os.path.join(root, "coco")
    for rel, n in FAKE_COUNTS.items():
        if rel in skip:
            continue
        path = os.path.join(coco, rel)
        if rel.endswith(".json"):
            _write_json(path, n)
        else:
            os.makedirs(path, exist_ok=True)
            for i in range(n):
                open(os.path.join(path, f"{i:012d}.jpg"), "wb").close()
    return coco


@pytest.fixture
def fake_counts(monkeypatch):
    for rel, n in FAKE_COUNTS.items():
        monkeypatch.setitem(coco_check.EXPECTED_IMAGES, rel, n)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("prepare_coco.py must never open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _run(capsys, *argv):
    rc = prepare_coco.main(["--check", *argv])
    return rc, capsys.readouterr().out


def test_complete_tree_is_ready(tmp_path, capsys, fake_counts):
    _make_tree(str(tmp_path))
    rc, out = _run(capsys, "--root", str(tmp_path))
    assert rc == 0, out
    assert "READY: all 5 needed" in out
    assert "coco_2014_train, coco_2014_valminusminival, coco_2014_minival" in out
    # the 2017 files are reported, as optional
    assert "annotations/instances_val2017.json" in out.split("Optional:")[1]


def test_missing_file_is_named_with_its_source(tmp_path, capsys, fake_counts):
    _make_tree(str(tmp_path), skip={"annotations/instances_minival2014.json"})
    rc, out = _run(capsys, "--root", str(tmp_path))
    assert rc == 1
    line = next(l for l in out.splitlines() if "instances_minival2014.json" in l)
    assert "MISSING" in line
    assert "coco_annotations_minival.tgz" in out  # Detectron's file, where minival comes from
    assert "NOT READY: 1 of 5" in out and out.rstrip().endswith("annotations/instances_minival2014.json")


def test_missing_coco_folder_lists_everything(tmp_path, capsys):
    rc, out = _run(capsys, "--root", str(tmp_path / "nowhere"))
    assert rc == 1
    assert "does not exist" in out
    for name in ("instances_train2014.json", "instances_valminusminival2014.json",
                 "instances_minival2014.json", "train2014", "val2014"):
        assert name in out.split("Optional:")[0]
    assert "annotations_trainval2014.zip" in out and "val2014.zip" in out


@pytest.mark.parametrize("full_parse_mb", ["64", "0"])  # parsed, and streamed
def test_corrupt_json_is_reported(tmp_path, capsys, fake_counts, full_parse_mb):
    coco = _make_tree(str(tmp_path))
    path = os.path.join(coco, "annotations", "instances_train2014.json")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # an interrupted copy
    rc, out = _run(capsys, "--root", str(tmp_path), "--full-parse-max-mb", full_parse_mb)
    assert rc == 1
    line = next(l for l in out.splitlines() if "instances_train2014.json" in l)
    assert "CORRUPT" in line


def test_json_that_is_not_coco_is_reported(tmp_path):
    path = str(tmp_path / "x.json")
    with open(path, "w") as f:
        json.dump({"hello": 1}, f)
    for max_bytes in (1 << 20, 0):
        status, detail = coco_check.inspect_json(path, 5, full_parse_max_bytes=max_bytes)
        assert status == "corrupt" and "images" in detail


def test_wrong_image_count_against_the_known_coco_sizes(tmp_path):
    # no patched counts: minival must list Detectron's 5000 images
    path = str(tmp_path / "annotations" / "instances_minival2014.json")
    _write_json(path, 7)
    status, detail = coco_check.inspect_json(path, coco_check.EXPECTED_IMAGES[
        "annotations/instances_minival2014.json"])
    assert status == "wrong-count" and "7 images, expected 5000" in detail
    assert coco_check.EXPECTED_IMAGES["annotations/instances_valminusminival2014.json"] == 35504
    assert coco_check.EXPECTED_IMAGES["annotations/instances_train2014.json"] == 82783


def test_streamed_count_equals_a_full_parse(tmp_path):
    path = str(tmp_path / "big.json")
    _write_json(path, 1234)
    with open(path) as f:
        n_parsed = len(json.load(f)["images"])
    for chunk in (7, 11, 12, 13, 4096):  # chunk edges cut the key names everywhere
        n, _, _, keys = coco_check._count_stream(path, chunk=chunk)
        assert n == n_parsed == 1234 and all(keys.values())
    status, detail = coco_check.inspect_json(path, 1234, full_parse_max_bytes=0)
    assert status == "ok" and "streamed" in detail


def test_incomplete_image_folder(tmp_path, capsys, fake_counts, monkeypatch):
    _make_tree(str(tmp_path))
    monkeypatch.setitem(coco_check.EXPECTED_IMAGES, "train2014", 10)
    rc, out = _run(capsys, "--root", str(tmp_path))
    assert rc == 1
    line = next(l for l in out.splitlines() if "] train2014" in l)
    assert "INCOMPLETE" in line and "3 images, expected 10" in line


def test_dataset_groups_and_config_file(tmp_path, capsys, fake_counts):
    _make_tree(str(tmp_path))  # the 2014 files only
    rc, out = _run(capsys, "--root", str(tmp_path), "--datasets", "zoo")
    assert rc == 1 and "coco_2017_train, coco_2017_val" in out
    assert "instances_train2017.json" in out.split("Optional:")[0]
    rc, out = _run(capsys, "--root", str(tmp_path), "--datasets", "coco_2014_minival")
    assert rc == 0, out
    rc, out = _run(capsys, "--root", str(tmp_path), "--config-file",
                   os.path.join(REPO, "configs", "Base-ResNeXt-FPN.yaml"))
    from resnext_det.engine import setup_cfg

    cfg = setup_cfg(os.path.join(REPO, "configs", "Base-ResNeXt-FPN.yaml"), [])
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        assert name in out.splitlines()[1]


def test_unknown_dataset_name_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_coco.main(["--check", "--root", str(tmp_path), "--datasets", "coco_2015_foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "coco_2015_foo" in err and "--datasets" in err and "coco_2014_minival" in err


def test_without_check_it_refuses_and_never_downloads(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_coco.main([])
    assert e.value.code == 2 and "--check" in capsys.readouterr().err


def test_command_line_exit_status(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "datasets", "prepare_coco.py"),
                          "--check", "--root", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1
    assert "instances_valminusminival2014.json" in out.stdout and "NOT READY" in out.stdout


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_prepare_coco_finds_the_images_training_would_skip(tmp_path):
    val = tmp_path / "coco" / "val2017"
    val.mkdir(parents=True)
    good, cut, noise, deep = _images(val)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "datasets", "prepare_coco.py"), "--check", "--root", str(tmp_path),
         "--datasets", "coco_2017_val", "--verify-images"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    unreadable = [line for line in r.stdout.splitlines() if "UNREADABLE" in line]
    assert sorted(os.path.basename(line.split(": ")[0].split()[-1]) for line in unreadable) == [
        "cut.jpg", "deep.png", "noise.jpg"]
    assert "3 image(s) that training would skip" in r.stdout
