"""Tests of resnext_det/visualize.py (issue #12): ``run_on_files`` skips a corrupt image and
goes on, and says how many detections fell below the threshold."""
import logging
import os

import pytest
import torch

from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances

from resnext_det.visualize import run_on_files

from reliability_helpers import _images

pytestmark = pytest.mark.usefixtures("one_thread")


class _FakePredictor:
    metadata = MetadataCatalog.get("reliability_fake")

    def __call__(self, image):
        inst = Instances(image.shape[:2])
        inst.pred_boxes = Boxes(torch.tensor([[1.0, 1.0, 10.0, 10.0], [2.0, 2.0, 5.0, 5.0]]))
        inst.scores = torch.tensor([0.9, 0.1])
        inst.pred_classes = torch.tensor([0, 0])
        return {"instances": inst}


def test_demo_skips_a_corrupt_image_and_goes_on(tmp_path, caplog):
    good, cut, noise, _ = _images(tmp_path)
    files = [str(noise), str(good)]
    outputs = {f: str(tmp_path / "out" / os.path.basename(f)) for f in files}
    with caplog.at_level(logging.INFO):
        records, skipped = run_on_files(_FakePredictor(), files, outputs, threshold=0.5)
    assert skipped == [str(noise)] and [r["file"] for r in records] == [str(good)]
    assert len(records[0]["instances"]) == 1  # the 0.1 detection is below the threshold ...
    assert "1 more below --confidence-threshold 0.5" in caplog.text  # ... and the log says so
    assert os.path.isfile(outputs[str(good)])
