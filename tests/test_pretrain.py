"""Stage 0 of the demo (resnext_det.pretrain, tools/pretrain_shapes.py): the crops
carry the right labels, the classifier is torchvision's own ResNeXt, a killed run
resumes to the weights of an uninterrupted one, and the converted file is what
Detectron2 loads."""
import json
import os

import numpy as np
import pytest
import torch

from resnext_det.pretrain import (
    CONVERTED_FILE,
    CROP_CLASSES,
    TORCHVISION_FILE,
    PretrainSettings,
    ShapeCrops,
    build_torchvision_resnext,
    pretrain_shapes_classifier,
    read_pretrain_marker,
    settings_from_config,
)

TINY = dict(stage_blocks=(1, 1, 1, 1), cardinality=2, bottleneck_width=4, batch_size=8, crop_size=32,
            val_crops=16, warmup_iters=1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """8 + 4 shapes images, registered as pt_train / pt_val."""
    from detectron2.data import DatasetCatalog

    from resnext_det.data import generate_shapes
    from resnext_det.data.shapes import register_shapes

    root = str(tmp_path_factory.mktemp("pt") / "shapes")
    generate_shapes(root, num_train=8, num_val=4, seed=5)
    for name, split in (("pt_train", "train"), ("pt_val", "val")):
        if name not in DatasetCatalog.list():
            register_shapes(name, split=split, root=root)
    return root


def _dicts(name):
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get(name)


class _NoJitter:
    """A stand-in for ``np.random.Generator`` in ``ShapeCrops.sample``: never background
    (``random`` is above any background fraction below 0.99), object ``k`` (``integers``),
    ``uniform`` at the middle of its range (no jitter; context lo == hi). The flip and the
    90-degree rotation stay whatever they come out: the checks below do not depend on them."""

    def __init__(self, k: int):
        self.k = k

    def random(self):
        return 0.99

    def integers(self, n):
        return self.k % n

    def uniform(self, lo, hi):
        return (lo + hi) / 2


def _dihedral(a: np.ndarray):
    """The 8 flips/rotations of an (H, W, C) array."""
    for b in (a, a[:, ::-1]):
        for k in range(4):
            yield np.rot90(b, k)


def test_object_crops_are_centred_on_their_labelled_object(shapes):
    """Without jitter, the centre of object k's crop is the centre of object k's box, and the crop
    is labelled with that object's class: read on a coordinate image (pixel value = its own x
    and y; bilinear resampling of a linear ramp returns the coordinate it samples), against the
    boxes and classes of the dataset's annotations, in their order. Background crops avoid
    every box."""
    dicts = _dicts("pt_train")
    data = ShapeCrops(dicts, size=32, background_fraction=0.0, context=(1.5, 1.5))
    anns = [(i, a) for i, d in enumerate(dicts) for a in d["annotations"]]
    assert len(data.objects) == len(anns)
    h, w = data.images[0].shape[:2]
    assert h <= 256 and w <= 256  # coordinates fit in uint8
    yy, xx = np.mgrid[0:h, 0:w]
    coords = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
    data.images = [coords] * len(data.images)
    for k, (i, a) in enumerate(anns):
        x, y, bw, bh = a["bbox"]
        crops, labels = data.sample(1, _NoJitter(k))
        assert labels[0] == a["category_id"], k
        # The crop's geometry, by hand: side 1.5 x the longer box side, scale s = 32 / side;
        # OpenCV's warp maps crop pixel j to source pixel c + (j - 16) / s, so crop pixels 15
        # and 16 sample c - 1/s and c: mean c - 0.5/s, the same after any flip or rotation.
        s = 32 / (1.5 * max(bw, bh))
        got = crops[0, 15:17, 15:17, :2].astype(np.float64).mean((0, 1))
        want = np.array([x + bw / 2, y + bh / 2]) - 0.5 / s
        assert np.abs(got - want).max() <= 0.6, (k, got, want, a["bbox"])  # uint8 rounding
        assert x <= got[0] <= x + bw and y <= got[1] <= y + bh

    data = ShapeCrops(dicts, size=32, background_fraction=0.0, context=(1.5, 1.5))
    crops, labels = data.sample(64, np.random.default_rng(0))
    assert crops.shape == (64, 32, 32, 3) and crops.dtype == np.uint8
    assert set(labels.tolist()) <= {0, 1, 2}
    # Every label is a real object's class, and all classes of the set appear.
    names = {CROP_CLASSES[k] for k in labels.tolist()}
    cats = {CROP_CLASSES[a["category_id"]] for d in dicts for a in d["annotations"]}
    assert names <= cats and len(names) >= 2

    bg = ShapeCrops(dicts, size=32, background_fraction=0.999, context=(1.5, 1.5))
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(30):
        hit = bg._background(rng)
        if hit is None:
            continue
        found += 1
        i, cx, cy, side = hit
        for b in bg.boxes[i]:
            ix = max(0.0, min(b[2], cx + side / 2) - max(b[0], cx - side / 2))
            iy = max(0.0, min(b[3], cy + side / 2) - max(b[1], cy - side / 2))
            assert ix * iy <= 0.2 * (b[2] - b[0]) * (b[3] - b[1]) + 1e-6
    assert found > 10
    _, bl = bg.sample(32, np.random.default_rng(2))
    assert (bl == CROP_CLASSES.index("background")).mean() > 0.8


def test_crops_are_rgb_squares_around_the_box_centre(tmp_path, shapes):
    """Pixels against independent references: the images are read as Detectron2's
    ``read_image(format="RGB")`` reads them, and a crop of an object whose longer side is the
    crop size (scale 1, no jitter) is, up to a flip/rotation, the square sub-array around the
    box centre, cut by hand from an image written here in known RGB."""
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    for d, img in zip(_dicts("pt_train"), ShapeCrops(_dicts("pt_train"), size=32, background_fraction=0.0,
                                                     context=(1.5, 1.5)).images):  # fmt: skip
        np.testing.assert_array_equal(img, read_image(d["file_name"], format="RGB"))

    rgb = np.random.default_rng(0).integers(0, 256, (200, 240, 3), dtype=np.uint8)
    path = str(tmp_path / "hand.png")
    Image.fromarray(rgb, "RGB").save(path)
    # XYWH boxes, longer side 32: centres (56, 32) and (128, 166); not square, so that x and y
    # (and x0/x1, y0/y1) mixed up give other pixels.
    boxes = {0: [40, 20, 32, 24], 1: [120, 150, 16, 32]}
    want = {0: rgb[16:48, 40:72], 1: rgb[150:182, 112:144]}
    d = {"file_name": path, "height": 200, "width": 240, "image_id": 0,
         "annotations": [{"bbox": b, "bbox_mode": 1, "category_id": c} for c, b in boxes.items()]}  # fmt: skip
    data = ShapeCrops([d], size=32, background_fraction=0.0, context=(1.0, 1.0))
    for k in boxes:
        crops, labels = data.sample(1, _NoJitter(k))
        assert labels[0] == k
        assert any(np.array_equal(crops[0], v) for v in _dihedral(want[k])), k


def test_raw_coco_ids_are_refused(shapes):
    """Dicts that still hold COCO category ids (1..3) would shift every label."""
    from resnext_det.data.shapes import load_shapes_json

    with pytest.raises(ValueError, match="contiguous"):
        ShapeCrops(load_shapes_json("train", root=shapes), size=32, background_fraction=0.0,
                   context=(1.5, 1.5))


def test_crop_geometry_matches_a_hand_crop(shapes):
    """A crop of side equal to the output size (scale 1), centred on integer
    coordinates, is exactly the image's sub-array (before flips/rotations)."""
    data = ShapeCrops(_dicts("pt_train"), size=32, background_fraction=0.0, context=(1.0, 1.0))
    img = data.images[0]
    warped = data._warp(img, 100.0, 80.0, 32.0)
    np.testing.assert_array_equal(warped, img[64:96, 84:116])


def test_classifier_is_torchvisions_resnext():
    """Same module tree and tensor shapes as torchvision's resnext50_32x4d when the
    settings say depth 50, 32x4d."""
    from torchvision.models import resnext50_32x4d

    ours = build_torchvision_resnext(PretrainSettings(stage_blocks=(3, 4, 6, 3), cardinality=32,
                                                      bottleneck_width=4), num_classes=1000)
    ref = resnext50_32x4d()
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        PretrainSettings(batch_size=1)
    with pytest.raises(ValueError, match="optimizer"):
        PretrainSettings(optimizer="lamb")
    with pytest.raises(ValueError, match="crop_size"):
        PretrainSettings(crop_size=16)


def test_settings_follow_the_config():
    from resnext_det.engine import setup_cfg

    cfg = setup_cfg("configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml", [])
    s = settings_from_config(cfg)
    assert s.stage_blocks == (2, 2, 2, 2) and s.cardinality == cfg.MODEL.RESNEXT.CARDINALITY
    cfg = setup_cfg("configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml",
                    ["MODEL.RESNEXT.STEM_OUT_CHANNELS", "32"])
    with pytest.raises(ValueError, match="MODEL.RESNEXT.STEM_OUT_CHANNELS"):
        settings_from_config(cfg)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_weights(shapes, tmp_path, monkeypatch):
    s = PretrainSettings(iters=6, **TINY)
    ref = pretrain_shapes_classifier(s, output_dir=str(tmp_path / "ref"), train_dataset="pt_train",
                                     val_dataset="pt_val", checkpoint_period=2)
    assert 0.0 <= ref["val_accuracy"] <= 100.0

    # Kill at iteration 5 (after the checkpoint of iteration 4).
    calls = {"n": 0}
    real = ShapeCrops.sample

    def dying(self, n, rng):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(self, n, rng)

    monkeypatch.setattr(ShapeCrops, "sample", dying)
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        pretrain_shapes_classifier(s, output_dir=out, train_dataset="pt_train", val_dataset="pt_val",
                                   checkpoint_period=2)
    assert read_pretrain_marker(out) is None and not os.path.exists(os.path.join(out, CONVERTED_FILE))
    monkeypatch.setattr(ShapeCrops, "sample", real)
    res = pretrain_shapes_classifier(s, output_dir=out, train_dataset="pt_train", val_dataset="pt_val",
                                     checkpoint_period=2)
    a = torch.load(os.path.join(out, TORCHVISION_FILE))
    b = torch.load(os.path.join(tmp_path / "ref", TORCHVISION_FILE))
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert res["val_accuracy"] == ref["val_accuracy"]

    # A finished folder is reused; other settings are refused.
    again = pretrain_shapes_classifier(s, output_dir=out, train_dataset="pt_train", val_dataset="pt_val")
    assert again == json.load(open(os.path.join(out, "pretrain_done.json")))
    with pytest.raises(ValueError, match="other settings"):
        pretrain_shapes_classifier(PretrainSettings(iters=7, **TINY), output_dir=out,
                                   train_dataset="pt_train", val_dataset="pt_val")


@pytest.mark.slow
def test_converted_weights_load_into_our_backbone_and_match_torchvision(shapes, tmp_path):
    """The converted file gives our ResNeXt (FrozenBN) the torchvision classifier's
    res5 features: compared against torchvision's own forward up to layer4."""
    from resnext_det.modeling.resnext import ResNeXt, ResNeXtSpec

    s = PretrainSettings(iters=2, **TINY)
    res = pretrain_shapes_classifier(s, output_dir=str(tmp_path), train_dataset="pt_train", val_dataset=None)
    assert res["val_accuracy"] is None
    tv = build_torchvision_resnext(s)
    tv.load_state_dict(torch.load(res["torchvision_weights"]))
    tv.eval()
    ck = torch.load(res["weights"], weights_only=False)
    assert ck["resnext_det"]["input"]["format"] == "RGB"
    spec = ResNeXtSpec(stage_blocks=s.stage_blocks, cardinality=s.cardinality,
                       bottleneck_width=s.bottleneck_width, norm="FrozenBN", out_features=("res5",),
                       freeze_at=0)
    ours = ResNeXt(spec)
    missing, unexpected = ours.load_state_dict(ck["model"], strict=False)
    assert not [k for k in missing if not k.endswith("num_batches_tracked")] and not unexpected
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        o = ours(x)["res5"]
    torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-4)
