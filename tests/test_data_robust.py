"""Tests of resnext_det/data/robust.py (issue #12): unreadable training images skipped by name,
unusable boxes counted per dataset."""
import logging

import pytest

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.structures import BoxMode

from resnext_det.data.checks import unusable_boxes
from resnext_det.data.robust import SkipUnreadableImages, training_dataset_dicts
from resnext_det.engine import setup_cfg

from reliability_helpers import CONFIG, TINY, _images

pytestmark = pytest.mark.usefixtures("one_thread")


def _dict(path):
    return {"file_name": str(path), "height": 64, "width": 64, "image_id": 0,
            "annotations": [{"bbox": [4, 4, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]}


def test_unreadable_training_images_are_skipped_by_name(tmp_path, caplog):
    good, cut, noise, deep = _images(tmp_path)
    cfg = setup_cfg(CONFIG, TINY)
    mapper = SkipUnreadableImages(DatasetMapper(cfg, True))
    assert mapper(_dict(good))["image"].shape[0] == 3
    with caplog.at_level(logging.WARNING):
        for bad in (cut, noise, deep):
            assert mapper(_dict(bad)) is None
    for bad in (cut, noise, deep):
        assert str(bad) in caplog.text
    assert "more than 8 bits" in caplog.text  # the 16-bit PNG is named as such, not trained white
    assert len(mapper.skipped) == 3


def test_dropped_boxes_are_counted_per_dataset(tmp_path, caplog):
    good = _images(tmp_path)[0]
    anns = [
        {"bbox": [4, 4, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [4, 4, 0, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},  # zero width
        {"bbox": [30, 30, 10, 10], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # negative
        {"bbox": [70, 70, 90, 90], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # outside 64x64
        {"bbox": [0, 0, 0, 0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 1},
    ]
    d = dict(_dict(good), annotations=anns)
    assert unusable_boxes([d]) == {"zero-area or negative size": 2, "outside the image": 1}
    name = "reliability_boxes"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [dict(d)])
        MetadataCatalog.get(name).thing_classes = ["a"]
    cfg = setup_cfg(CONFIG, TINY + ["DATASETS.TRAIN", f"('{name}',)"])
    with caplog.at_level(logging.WARNING):
        assert len(training_dataset_dicts(cfg)) == 1
    assert f"{name}: training drops 3 box(es)" in caplog.text
