"""Tests of resnext_det/checkpoint/verify.py (``verify_conversion``, tools/convert_pretrained.py
--verify): a wrong conversion fails, a detector is verified through its trunk, and a source the
reference network does not take is refused. More of verify.py's references (Torch7, Caffe2
with statistics, every format's wrong conversion): tests/test_weights_torch7.py."""
import pytest
import torch

from resnext_det.checkpoint import ConversionError, convert_weights, verify_conversion

from weights_helpers import D2_BGR_MEAN, D2_BGR_STD, TOL, run_tool, save_detector


def test_verify_fails_on_wrong_stride_override(tv26):
    _, d, _ = tv26
    p = run_tool(d / "tv26.pth", d / "never.pth", "--stride-in-1x1", "true", "--verify", "--verify-size", 64, check=False)
    assert p.returncode == 1 and "--verify FAILED" in p.stderr
    assert not (d / "never.pth").exists()


def test_detector_verification_view_is_its_trunk_as_a_detectron2_backbone(tmp_path, tv26):
    """--verify on a converted detector compares its ResNet trunk: the view holds the
    trunk's tensors (source and converted) in backbone names, as a backbone record in
    Detectron2 format, and verifies against Detectron2's own ResNet."""
    _, _, r = tv26
    bufs = {"pixel_mean": torch.tensor(D2_BGR_MEAN), "pixel_std": torch.tensor(D2_BGR_STD)}
    save_detector(tmp_path / "det.pth", r.state_dict, bufs)
    r2 = convert_weights(str(tmp_path / "det.pth"), stride_in_1x1=False, progress=False)
    v = r2.verification_view()
    assert v.metadata.kind == "backbone" and v.format == "detectron2"
    assert set(v.state_dict) == set(r.state_dict) == set(v.source.tensors)
    assert v.metadata.input == r2.metadata.input and r2.metadata.kind == "detector"
    assert max(dd / max(1, m) for dd, m in verify_conversion(v, size=32).values()) < TOL


def test_verify_refuses_a_source_the_reference_model_does_not_take(tv26):
    """--verify loads the source into torchvision's model: a source tensor missing (or one
    the model has no place for) is an error naming it, not a comparison against random
    weights."""
    import dataclasses

    _, _, r = tv26
    tensors = dict(r.source.tensors)
    missing = {k: v for k, v in tensors.items() if k != "layer2.0.conv1.weight"}
    extra = {**tensors, "layer2.0.conv9.weight": torch.zeros(1)}
    for src, key in ((missing, "layer2.0.conv1.weight"), (extra, "layer2.0.conv9.weight")):
        bad = dataclasses.replace(r, source=dataclasses.replace(r.source, tensors=src))
        with pytest.raises(ConversionError) as e:
            verify_conversion(bad, size=32)
        assert key in str(e.value)
