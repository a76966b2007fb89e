"""Tests of resnext_det/checkpoint/formats.py: each public format's name mapping to Detectron2's
ResNet names (torchvision and timm, wrapped and safetensors files, Caffe2 blobs with their
AffineChannel BN, files already in Detectron2 names), checked against the source network's
own features or a mapping written here by hand, and the variants outside the paper each
format refuses. Torch7 .t7 files: tests/test_weights_torch7.py."""
import pickle

import pytest
import torch

from resnext_det.checkpoint import (
    ConversionError,
    WeightsConfigError,
    config_pairs,
    convert_weights,
    save_converted,
    verify_conversion,
)

from weights_helpers import (
    STAGES,
    TOL,
    convert_to,
    detector_cfg,
    detector_stages,
    load_detector,
    normalized_input,
    randomize_bn,
    rel_err,
    tv_resnext,
    tv_stages,
    tv_to_caffe2_blobs,
)


# --------------------------------------------------------------------------
# torchvision / timm files (wrapped, safetensors, EMA) and files already in Detectron2 names
# --------------------------------------------------------------------------
def test_timm_safetensors_and_wrapped_checkpoint(tmp_path):
    from safetensors.torch import save_file
    from timm.models.resnet import Bottleneck as TimmBottleneck
    from timm.models.resnet import ResNet as TimmResNet

    torch.manual_seed(5)
    tm = randomize_bn(TimmResNet(block=TimmBottleneck, layers=[2, 2, 2, 2], cardinality=8, base_width=2), 5).eval()
    sd = tm.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "tm.safetensors"))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "state_dict_ema": ema, "epoch": 3},
               tmp_path / "tm-train.pth")

    x = normalized_input(seed=7)
    ref = tv_stages(tm, x)
    for name in ("tm.safetensors", "tm-train.pth"):
        r = convert_to(tmp_path / name, tmp_path / f"{name}-d2.pth")
        assert r.format == ("timm" if name.endswith("safetensors") else "torchvision")
        assert (r.metadata.arch.cardinality, r.metadata.arch.bottleneck_width) == (8, 2)
        cfg = detector_cfg("FPN", config_pairs(r.metadata, str(tmp_path / f"{name}-d2.pth")))
        ours = detector_stages(load_detector(cfg), x)
        for s in STAGES:
            assert rel_err(ours[s], ref[s]) < TOL, (name, s)
    # --verify's reference is timm's own network for timm files.
    diffs = verify_conversion(convert_weights(str(tmp_path / "tm.safetensors"), progress=False), size=64)
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL
    # --use-ema takes the EMA weights, which differ.
    r_ema = convert_weights(str(tmp_path / "tm-train.pth"), use_ema=True, progress=False)
    assert torch.equal(r_ema.state_dict["stem.conv1.weight"], sd["conv1.weight"] + 1)


def test_detectron2_format_files(tmp_path, tv26):
    """Files already in Detectron2 names: Detectron2's own torchvision converter
    output (a .pkl of numpy arrays), and a file we converted, converted again."""
    tv, d, r = tv26
    sd = {k: v.numpy() for k, v in r.state_dict.items()}
    with open(tmp_path / "R-from-tv.pkl", "wb") as f:  # tools/convert-torchvision-to-d2.py's layout
        pickle.dump({"model": sd, "__author__": "torchvision", "matching_heuristics": True}, f)
    r2 = convert_weights(str(tmp_path / "R-from-tv.pkl"), progress=False)
    assert r2.format == "detectron2" and r2.metadata.input == r.metadata.input
    diffs = verify_conversion(r2, size=64)  # reference: Detectron2's own ResNet
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL
    # A BGR file of ours, made RGB: the recorded convention is carried over and flipped.
    with open(tmp_path / "X-26.pkl", "wb") as f:
        pickle.dump(tv_to_caffe2_blobs(tv.state_dict()), f, protocol=2)
    convert_to(tmp_path / "X-26.pkl", tmp_path / "bgr.pth", convention="fair")
    r3 = convert_weights(str(tmp_path / "bgr.pth"), to_rgb=True, progress=False)
    assert r3.metadata.input.format == "RGB" and r3.metadata.input.pixel_std == (58.395, 57.12, 57.375)
    x = normalized_input()
    cfg = detector_cfg("FPN", config_pairs(r3.metadata, str(tmp_path / "rgb.pth")))
    save_converted(r3, str(tmp_path / "rgb.pth"))
    ours, ref = detector_stages(load_detector(cfg), x.flip(1)), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL


def test_detectron2_named_file_with_bn_counters_or_without_statistics(tmp_path, tv26):
    """A file in Detectron2 names holding BN ``num_batches_tracked`` counters (a model saved
    with trainable BN) converts with every tensor but the counters; one without running
    statistics (norms folded into an affine) gets running_mean 0 and running_var 1 - eps,
    so that FrozenBN computes x * weight + bias, and records norm "affine" (what the
    GN/BN warnings read)."""
    from detectron2.layers import FrozenBatchNorm2d

    _, _, r = tv26
    with_counters = {}
    for k, v in r.state_dict.items():  # a counter before every BN's tensors
        if k.endswith(".norm.weight"):
            with_counters[k[: -len("weight")] + "num_batches_tracked"] = torch.tensor(7)
        with_counters[k] = v
    torch.save({"model": with_counters}, tmp_path / "counters.pth")
    r2 = convert_weights(str(tmp_path / "counters.pth"), convention="torchvision", progress=False)
    assert set(r2.state_dict) == set(r.state_dict)
    assert all(torch.equal(r2.state_dict[k], v) for k, v in r.state_dict.items())
    assert r2.metadata.weights_norm == "BN"

    affine = {k: v for k, v in r.state_dict.items() if not k.endswith(("running_mean", "running_var"))}
    torch.save({"model": affine}, tmp_path / "affine.pth")
    r3 = convert_weights(str(tmp_path / "affine.pth"), convention="torchvision", progress=False)
    assert set(r3.state_dict) == set(r.state_dict) and r3.metadata.weights_norm == "affine"
    ckpt = r3.checkpoint()  # what save_converted writes
    assert set(ckpt) == {"model", "__author__", "matching_heuristics", "resnext_det"}
    assert "detectron2" in ckpt["__author__"] and ckpt["resnext_det"]["arch"]["norm"] == "affine"
    p = "res3.0.conv2.norm."
    w, b = affine[p + "weight"].double(), affine[p + "bias"].double()
    bn = FrozenBatchNorm2d(len(w)).double()
    bn.load_state_dict({k: r3.state_dict[p + k].double() for k in ("weight", "bias", "running_mean", "running_var")})
    x = torch.randn(2, len(w), 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = x * w[None, :, None, None] + b[None, :, None, None]
    assert float((bn(x) - want).abs().max() / want.abs().max()) < 3e-7


# --------------------------------------------------------------------------
# Caffe2 (Detectron) .pkl files: blob names, BN folded into an AffineChannel
# --------------------------------------------------------------------------
def test_caffe2_pkl_same_features_and_to_rgb(tmp_path, tv26):
    tv, _, _ = tv26
    with open(tmp_path / "X-26.pkl", "wb") as f:
        pickle.dump({"blobs": tv_to_caffe2_blobs(tv.state_dict())}, f, protocol=2)
    r = convert_to(tmp_path / "X-26.pkl", tmp_path / "bgr.pth", convention="fair")
    assert r.format == "caffe2" and r.metadata.weights_norm == "affine"
    assert r.metadata.input.format == "BGR" and r.metadata.input.pixel_std == (57.375, 57.12, 58.395)
    assert sorted(r.dropped) == ["fc1000_b", "fc1000_w"]
    x = normalized_input()
    ref = tv_stages(tv, x)  # these weights, seen as "BGR" weights: x is in BGR order
    cfg = detector_cfg("C4", config_pairs(r.metadata, str(tmp_path / "bgr.pth")))
    assert cfg.INPUT.FORMAT == "BGR"
    ours = detector_stages(load_detector(cfg), x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, s

    # --to-rgb: the same image in RGB order gives the same features, with the
    # shipped RGB bases' mean/std (FAIR's BGR mean/std reversed).
    r = convert_to(tmp_path / "X-26.pkl", tmp_path / "rgb.pth", convention="fair", to_rgb=True)
    assert r.metadata.input.format == "RGB" and r.metadata.input.pixel_mean == (123.675, 116.28, 103.53)
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(tmp_path / "rgb.pth")))
    ours = detector_stages(load_detector(cfg), x.flip(1))
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, s
    diffs = verify_conversion(r, size=64)  # reference: a network that reads the blob names
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL

    # Plain Detectron2 loads the raw .pkl by heuristics; resnext_det refuses it.
    cfg = detector_cfg("C4", [("MODEL.WEIGHTS", str(tmp_path / "X-26.pkl"))])
    with pytest.raises(WeightsConfigError, match="(?s)raw caffe2 ImageNet weights.*convert_pretrained.py"):
        load_detector(cfg)


def test_caffe2_affine_channel_becomes_an_exact_frozen_bn(tmp_path):
    """Caffe2's AffineChannel computes y = x * s + b, with no statistics. Every converted norm,
    run as Detectron2's own FrozenBatchNorm2d (eps 1e-5) in float64, computes x * weight + bias
    with the file's s and b, within 3e-7 (measured: 5e-9, the fp32 rounding of the stored
    running_var), where a running_var that forgets BN's eps measures 4.4e-6."""
    from detectron2.layers import FrozenBatchNorm2d

    blobs = tv_to_caffe2_blobs(tv_resnext(layers=(1, 1, 1, 1)).state_dict())
    with open(tmp_path / "X-14.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    sd = convert_weights(str(tmp_path / "X-14.pkl"), convention="fair", progress=False).state_dict
    # By hand, Detectron's names for three of them: the stem, a 1x1 in res2, a shortcut in res5.
    hand = {"stem.conv1.norm": "res_conv1", "res2.0.conv1.norm": "res2_0_branch2a",
            "res5.0.shortcut.norm": "res5_0_branch1"}  # fmt: skip
    norms = sorted(k[: -len(".weight")] for k in sd if k.endswith(".norm.weight"))
    assert len(norms) == 17 and set(hand) <= set(norms)
    g = torch.Generator().manual_seed(0)
    for p in norms:
        w, b = sd[p + ".weight"].double(), sd[p + ".bias"].double()
        if p in hand:
            assert torch.equal(w, torch.as_tensor(blobs[hand[p] + "_bn_s"]).double())
            assert torch.equal(b, torch.as_tensor(blobs[hand[p] + "_bn_b"]).double())
        assert not sd[p + ".running_mean"].any()
        bn = FrozenBatchNorm2d(len(w)).double()
        bn.load_state_dict({k: sd[f"{p}.{k}"].double() for k in ("weight", "bias", "running_mean", "running_var")})
        x = torch.randn(2, len(w), 5, 5, generator=g, dtype=torch.float64)
        want = x * w[None, :, None, None] + b[None, :, None, None]
        err = float((bn(x) - want).abs().max() / want.abs().max())
        assert err < 3e-7, (p, err)


# --------------------------------------------------------------------------
# Variants outside the paper, each refused with its own hint
# --------------------------------------------------------------------------
def test_variants_outside_the_paper_are_refused(tmp_path):
    from timm.models.resnet import Bottleneck as TimmBottleneck
    from timm.models.resnet import ResNet as TimmResNet

    deep = TimmResNet(block=TimmBottleneck, layers=[1, 1, 1, 1], cardinality=2, base_width=4,
                      stem_type="deep", avg_down=True)
    torch.save(deep.state_dict(), tmp_path / "resnext-d.pth")
    with pytest.raises(ConversionError, match="deep 3x3 stem.*average-pool shortcut") as e:
        convert_weights(str(tmp_path / "resnext-d.pth"), progress=False)
    assert "squeeze-excitation" not in str(e.value)  # each hint only for its own tensors
    for extra in ("layer1.0.se.fc1.weight", "layer1.0.attn.fc1.weight"):  # timm's SE / attention blocks
        sd = tv_resnext().state_dict()
        sd[extra] = torch.zeros(4, 256, 1, 1)
        torch.save(sd, tmp_path / "se.pth")
        with pytest.raises(ConversionError, match="squeeze-excitation") as e:
            convert_weights(str(tmp_path / "se.pth"), progress=False)
        assert "deep 3x3 stem" not in str(e.value) and extra in str(e.value), extra
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="does not hold a ResNeXt/ResNet"):
        convert_weights(str(tmp_path / "other.pth"), progress=False)
