"""ImageNet weights: converted from torchvision / timm / Caffe2 files made here,
loaded through MODEL.WEIGHTS into C4 and FPN detectors, and compared with the
source model (torchvision's or timm's own network) on the same input. Every bad
input is tried and its message checked."""
import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import pickle
import re
import subprocess

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import resnext_det  # noqa: F401  registers the backbones and heads
from resnext_det import add_resnext_config
from resnext_det.checkpoint import (
    CheckpointReadError,
    ConversionError,
    ResNeXtCheckpointer,
    WeightsConfigError,
    config_pairs,
    convert_weights,
    format_opts,
    WeightsMetadata,
    config_yaml,
    save_converted,
    verify_conversion,
)
from resnext_det.checkpoint.convert import convert_detector
from resnext_det.checkpoint.loading import attach_weights_record
from resnext_det.checkpoint.metadata import InputConvention
from resnext_det.checkpoint.readers import read_weights_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_pretrained.py")
STAGES = ("res2", "res3", "res4", "res5")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Relative to max(1, max |feature|). The correct conversions measure 2.6e-7 to 4.4e-7 here
# (fp32 rounding: depth 26 and resnext50_32x4d, torchvision/timm/Caffe2/Torch7 sources); a
# Caffe2 AffineChannel written without BN's eps (5e-6 relative per layer) measures 1.04e-5.
TOL = 2e-6


# --------------------------------------------------------------------------
# Helpers (also used by tests/test_weights_*.py)
# --------------------------------------------------------------------------
@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (torchvision initialises them
    to 0/1 and timm zeroes the last BN of each block, which would hide a wrongly
    mapped or missing BN)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def tv_resnext(layers=(2, 2, 2, 2), groups=4, width=4, seed=0) -> ResNet:
    """A torchvision ResNeXt (same class as resnext50_32x4d), random, eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(ResNet(Bottleneck, list(layers), groups=groups, width_per_group=width), seed).eval()


@torch.no_grad()
def tv_stages(model, x):
    """layer1..layer4 outputs of a torchvision/timm ResNet."""
    act = getattr(model, "relu", None) or model.act1
    h = model.maxpool(act(model.bn1(model.conv1(x))))
    out = {}
    for s, layer in zip(STAGES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        h = layer(h)
        out[s] = h
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def detector_cfg(kind: str, pairs, *opts):
    """A tiny detector config from a shipped base plus the converter's lines."""
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", f"Base-ResNeXt-{kind}.yaml"))
    cfg.merge_from_list(format_opts(pairs))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", 3, *opts])
    return cfg


def load_detector(cfg, **kw):
    model = build_model(cfg).eval()
    ResNeXtCheckpointer(model, cfg=cfg, **kw).load(cfg.MODEL.WEIGHTS)
    return model


@torch.no_grad()
def detector_stages(model, x) -> dict:
    """res2..res5 of a C4 (trunk + roi_heads.res5) or FPN (bottom_up) model."""
    if hasattr(model.backbone, "bottom_up"):
        return model.backbone.bottom_up(x)
    trunk, out = model.backbone, {}
    h = trunk.stem(x)
    for name, stage in zip(trunk.stage_names, trunk.stages):
        h = out[name] = stage(h)
    assert torch.equal(trunk(x)["res4"], out["res4"])
    out["res5"] = model.roi_heads.res5(out["res4"])
    return out


def normalized_input(size=64, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def convert_to(path_in, path_out, **kw):
    r = convert_weights(str(path_in), progress=False, **kw)
    save_converted(r, str(path_out))
    return r


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_pretrained", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_tool(*args, check=True):
    """tools/convert_pretrained.py's main() in this process (a subprocess per
    call would spend most of the suite's time importing torch)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = _load_tool().main([*map(str, args), "--quiet"])
    p = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def tv26(tmp_path_factory):
    """A depth-26, C=4, d=4 torchvision ResNeXt, saved and converted."""
    d = tmp_path_factory.mktemp("tv26")
    model = tv_resnext()
    torch.save(model.state_dict(), d / "tv26.pth")
    r = convert_to(d / "tv26.pth", d / "tv26-d2.pth")
    return model, d, r


# --------------------------------------------------------------------------
# torchvision resnext50_32x4d: the real architecture, through the CLI
# --------------------------------------------------------------------------
def test_torchvision_resnext50_cli_c4_and_fpn_equal_source(tmp_path):
    tv = randomize_bn(torchvision.models.resnext50_32x4d()).eval()
    torch.save(tv.state_dict(), tmp_path / "resnext50_32x4d.pth")
    out = tmp_path / "X-50-32x4d.pth"
    p = run_tool(
        tmp_path / "resnext50_32x4d.pth", out, "--arch", "X-50-32x4d", "--verify", "--verify-size", 64,
        "--config-out", tmp_path / "x50.yaml", "--base", os.path.join(ROOT, "configs", "Base-ResNeXt-C4.yaml"),
    )
    # The printed lines: what a user copies.
    for line in ("MODEL.RESNEXT.PRESET", "X-50-32x4d", "INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN",
                 "[123.675, 116.28, 103.53]", "[58.395, 57.12, 57.375]", "STRIDE_IN_1X1", "--verify passed"):
        assert line in p.stdout
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["resnext_det"]["arch"]["cardinality"] == 32 and ckpt["resnext_det"]["input"]["format"] == "RGB"

    # Raw 0-255 RGB images through the detector's own normalisation (the printed
    # PIXEL_MEAN/STD) against torchvision's documented preprocessing.
    img = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(3)).float()
    x_tv = torchvision.transforms.functional.normalize(img / 255, IMAGENET_MEAN, IMAGENET_STD)[None]
    ref = tv_stages(tv, x_tv)
    for kind, cfg in (
        ("C4", get_c4_cfg_from_yaml(tmp_path / "x50.yaml")),
        ("FPN", detector_cfg("FPN", config_pairs(_meta(ckpt), str(out)))),
    ):
        model = load_detector(cfg)
        x = model.preprocess_image([{"image": img}]).tensor
        ours = detector_stages(model, x)
        for s in STAGES:
            assert rel_err(ours[s], ref[s]) < TOL, (kind, s, rel_err(ours[s], ref[s]))


def get_c4_cfg_from_yaml(path):
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(str(path))  # _BASE_ Base-ResNeXt-C4.yaml + the weight lines
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    return cfg


def _meta(ckpt):
    from resnext_det.checkpoint import WeightsMetadata

    return WeightsMetadata.from_dict(ckpt["resnext_det"])


# --------------------------------------------------------------------------
# Small models: every code path at CPU cost
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,norm", [("C4", "FrozenBN"), ("FPN", "FrozenBN"), ("FPN", "SyncBN"), ("C4", "BN")])
def test_depth26_loads_every_backbone_tensor(tv26, kind, norm):
    tv, d, r = tv26
    cfg = detector_cfg(kind, config_pairs(r.metadata, str(d / "tv26-d2.pth")), "MODEL.RESNEXT.NORM", norm)
    model = load_detector(cfg)
    # Every backbone parameter and BN statistic equals the source tensor.
    src = tv.state_dict()
    trunk = model.backbone.bottom_up if kind == "FPN" else model.backbone
    got = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    if kind == "C4":
        got.update({f"res5.{k}": v for k, v in model.roi_heads.res5.state_dict().items() if "num_batches" not in k})
    assert len(got) == len(r.state_dict) == len([k for k in src if not k.startswith("fc.") and "num_batches" not in k])
    assert torch.equal(got["stem.conv1.norm.running_var"], src["bn1.running_var"])
    assert torch.equal(got["res5.1.conv2.weight"], src["layer4.1.conv2.weight"])
    assert torch.equal(got["res3.0.shortcut.norm.running_mean"], src["layer2.0.downsample.1.running_mean"])
    x = normalized_input()
    ours, ref = detector_stages(model, x), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, (s, rel_err(ours[s], ref[s]))


def test_plain_detectron2_checkpointer_also_loads_converted_file(tv26):
    """Without resnext_det's checkpointer, Detectron2's name heuristics put the
    converted file's res5 into a C4 model's roi_heads.res5 (and the trunk into
    backbone.*): the file is a standard Detectron2 ImageNet checkpoint."""
    tv, d, r = tv26
    cfg = detector_cfg("C4", config_pairs(r.metadata, str(d / "tv26-d2.pth")))
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    x = normalized_input()
    ours, ref = detector_stages(model, x), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL


@pytest.mark.parametrize("layers,groups,width", [((2, 2, 2, 2), 8, 2), ((3, 4, 6, 3), 2, 4), ((1, 2, 1, 1), 1, 64)])
def test_architecture_inferred_from_shapes(tmp_path, layers, groups, width):
    model = ResNet(Bottleneck, list(layers), groups=groups, width_per_group=width)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    r = convert_weights(str(tmp_path / "m.pth"), progress=False)
    a = r.metadata.arch
    assert (a.stage_blocks, a.cardinality, a.bottleneck_width) == (tuple(layers), groups, width)
    assert a.depth == 3 * sum(layers) + 2
    assert a.preset == ""  # none of these is a named model of the paper
    pairs = dict(config_pairs(r.metadata))
    if a.standard_depth is None:  # [1, 2, 1, 1] has no DEPTH: the lines give the block table
        assert pairs["MODEL.RESNEXT.STAGE_BLOCKS"] == list(layers) and pairs["MODEL.RESNEXT.PRESET"] == ""


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


def tv_to_caffe2_blobs(sd, eps=1e-5, *, stats=False) -> dict:
    """Detectron's Caffe2 ImageNet layout (AffineChannel BN: _bn_s, _bn_b), written
    from Detectron's naming: conv1_w, res_conv1_bn_*, resS_B_branch2{a,b,c}_*,
    resS_B_branch1_*, fc1000_*. ``stats``: BN with its statistics instead (_bn_s, _bn_b,
    _bn_rm, _bn_riv: weight, bias, running mean and variance, as Detectron2 names them)."""
    blobs = {}

    def bn(name, p):
        if stats:
            for suffix, k in (("s", "weight"), ("b", "bias"), ("rm", "running_mean"), ("riv", "running_var")):
                blobs[f"{name}_bn_{suffix}"] = sd[f"{p}.{k}"].numpy()
            return
        s = sd[p + ".weight"] / torch.sqrt(sd[p + ".running_var"] + eps)
        blobs[name + "_bn_s"] = s.numpy()
        blobs[name + "_bn_b"] = (sd[p + ".bias"] - sd[p + ".running_mean"] * s).numpy()

    blobs["conv1_w"] = sd["conv1.weight"].numpy()
    bn("res_conv1", "bn1")
    for k in sd:
        if k.startswith("layer") and k.endswith("conv1.weight"):
            i, j = int(k[5]), int(k.split(".")[1])
            c2, tv = f"res{i + 1}_{j}", f"layer{i}.{j}"
            for br, n in (("branch2a", 1), ("branch2b", 2), ("branch2c", 3)):
                blobs[f"{c2}_{br}_w"] = sd[f"{tv}.conv{n}.weight"].numpy()
                bn(f"{c2}_{br}", f"{tv}.bn{n}")
            if f"{tv}.downsample.0.weight" in sd:
                blobs[f"{c2}_branch1_w"] = sd[f"{tv}.downsample.0.weight"].numpy()
                bn(f"{c2}_branch1", f"{tv}.downsample.1")
    blobs["fc1000_w"], blobs["fc1000_b"] = sd["fc.weight"].numpy(), sd["fc.bias"].numpy()
    blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])
    return blobs


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


def test_caffe2_files_need_a_convention(tmp_path):
    tv = tv_resnext(groups=1, width=64)
    with open(tmp_path / "R-26.pkl", "wb") as f:
        pickle.dump(tv_to_caffe2_blobs(tv.state_dict()), f, protocol=2)
    with pytest.raises(ConversionError, match="--convention fair.*--convention detectron1.*--convention msra"):
        convert_weights(str(tmp_path / "R-26.pkl"), progress=False)
    r = convert_weights(str(tmp_path / "R-26.pkl"), convention="msra", progress=False)
    assert r.metadata.arch.stride_in_1x1 and r.metadata.input.pixel_std == (1.0, 1.0, 1.0)
    # The MSRA stride placement is honoured by our backbone and the reference alike.
    diffs = verify_conversion(r, size=64)
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL


# --------------------------------------------------------------------------
# Bad inputs, each with its message
# --------------------------------------------------------------------------
def test_arch_flag_disagreeing_with_weights_is_refused(tv26):
    _, d, _ = tv26
    p = run_tool(d / "tv26.pth", d / "never.pth", "--arch", "X-50-32x4d", check=False)
    assert p.returncode == 2
    assert "--arch X-50-32x4d (depth 50, C=32, d=4) does not match" in p.stderr
    assert "blocks [2, 2, 2, 2], C=4, d=4" in p.stderr and "Traceback" not in p.stderr
    assert not (d / "never.pth").exists()


def test_verify_fails_on_wrong_stride_override(tv26):
    _, d, _ = tv26
    p = run_tool(d / "tv26.pth", d / "never.pth", "--stride-in-1x1", "true", "--verify", "--verify-size", 64, check=False)
    assert p.returncode == 1 and "--verify FAILED" in p.stderr
    assert not (d / "never.pth").exists()


def test_bgr_weights_with_rgb_config_are_refused(tmp_path, tv26):
    tv, _, _ = tv26
    with open(tmp_path / "X-26.pkl", "wb") as f:
        pickle.dump(tv_to_caffe2_blobs(tv.state_dict()), f, protocol=2)
    r = convert_to(tmp_path / "X-26.pkl", tmp_path / "bgr.pth", convention="fair")
    pairs = [p for p in config_pairs(r.metadata, str(tmp_path / "bgr.pth")) if not p[0].startswith(("INPUT", "MODEL.PIXEL"))]
    cfg = detector_cfg("FPN", pairs)  # the base's RGB / torchvision mean and std
    with pytest.raises(WeightsConfigError) as e:
        load_detector(cfg)
    msg = str(e.value)
    assert "INPUT.FORMAT: the weights were trained on BGR input, the config feeds RGB" in msg
    assert "--to-rgb" in msg and "MODEL.PIXEL_MEAN" in msg and "MODEL.PIXEL_STD" in msg
    assert "INPUT.FORMAT BGR MODEL.PIXEL_MEAN '[103.53, 116.28, 123.675]'" in msg


def test_architecture_mismatch_at_load_names_the_keys(tv26):
    _, d, r = tv26
    pairs = config_pairs(r.metadata, str(d / "tv26-d2.pth"))
    cfg = detector_cfg("C4", pairs, "MODEL.RESNEXT.CARDINALITY", 8, "MODEL.RESNEXT.BOTTLENECK_WIDTH", 2)
    with pytest.raises(WeightsConfigError, match=r"C=4, d=4.*config builds.*C=8, d=2") as e:
        load_detector(cfg)
    assert "MODEL.RESNEXT.CARDINALITY 4 MODEL.RESNEXT.BOTTLENECK_WIDTH 4" in str(e.value)
    assert "(MODEL.RESNEXT.PRESET / DEPTH / STAGE_BLOCKS / CARDINALITY / BOTTLENECK_WIDTH)" in str(e.value)
    cfg = detector_cfg("FPN", pairs, "MODEL.RESNEXT.STRIDE_IN_1X1", True)
    with pytest.raises(WeightsConfigError, match="MODEL.RESNEXT.STRIDE_IN_1X1") as e:
        load_detector(cfg)
    # torchvision puts the stride on the 3x3 conv: the fix line sets the key back to False.
    assert "trained with the stride on the 3x3 conv, the config puts it on the first 1x1 conv" in str(e.value)
    assert str(e.value).splitlines()[-1].split() == ["MODEL.RESNEXT.STRIDE_IN_1X1", "False"]


def test_checkpoint_missing_a_stage_is_refused(tmp_path, tv26):
    _, d, r = tv26
    ckpt = torch.load(d / "tv26-d2.pth", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("res4.1.")}
    torch.save(ckpt, tmp_path / "holey.pth")
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(tmp_path / "holey.pth")))
    with pytest.raises(WeightsConfigError, match=r"would leave 15 of the \d+ backbone tensors at their random"):
        load_detector(cfg)
    # The converter refuses a source with a tensor missing.
    sd = {k: v for k, v in tv26[0].state_dict().items() if k != "layer3.1.bn2.running_var"}
    torch.save(sd, tmp_path / "holey-tv.pth")
    with pytest.raises(ConversionError, match=r"1 tensors missing, e.g. \['res4.1.conv2.norm.running_var'\]"):
        convert_weights(str(tmp_path / "holey-tv.pth"), progress=False)


def _bad_files(tmp_path, good: str):
    data = open(good, "rb").read()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")
    return {
        "truncated.pth": "truncated",
        "random.pth": "not a",
        "empty.pth": "empty|truncated",
        "list.pth": "not a checkpoint|not a dict",
        "page.pth": "not a",
        "missing.pth": "no such file|does not exist",
    }


def test_unreadable_files_give_clear_errors(tmp_path, tv26):
    _, d, r = tv26
    cases = _bad_files(tmp_path, str(d / "tv26-d2.pth"))
    cfg0 = detector_cfg("C4", config_pairs(r.metadata, str(d / "tv26-d2.pth")))
    model = build_model(cfg0)
    for name, pattern in cases.items():
        path = str(tmp_path / name)
        # Loading through MODEL.WEIGHTS.
        with pytest.raises((CheckpointReadError, FileNotFoundError, WeightsConfigError)) as e:
            ResNeXtCheckpointer(model, cfg=cfg0).load(path)
        assert "MODEL.WEIGHTS" in str(e.value) and any(w in str(e.value) for w in pattern.split("|")), (name, e.value)
        # Converting.
        with pytest.raises(CheckpointReadError) as e:
            convert_weights(path, progress=False)
        assert any(w in str(e.value) for w in pattern.split("|")), (name, e.value)
    p = run_tool(tmp_path / "truncated.pth", tmp_path / "x.pth", check=False)
    assert p.returncode == 2 and "truncated" in p.stderr and "Traceback" not in p.stderr


def test_raw_torchvision_file_as_model_weights_is_refused(tv26):
    _, d, r = tv26
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(d / "tv26.pth")))
    with pytest.raises(WeightsConfigError, match="(?s)raw torchvision ImageNet weights.*tools/convert_pretrained.py"):
        load_detector(cfg)


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


# --------------------------------------------------------------------------
# Detector checkpoints in Detectron2 names: every tensor kept, the input
# convention the file tells (or the flags give) recorded, --to-rgb exact
# --------------------------------------------------------------------------
# Detectron2's Caffe2 (BGR) ImageNet mean/std, its MODEL.PIXEL_MEAN/STD defaults and the
# ones of its FAIR ImageNet weights; torchvision's mean/std x 255 in RGB order.
D2_BGR_MEAN, D2_BGR_STD = (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)
TV_RGB_MEAN, TV_RGB_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def names(msg: str, token: str) -> bool:
    """``token`` (a config key or a command-line flag) stands in ``msg`` as a word of its
    own, ready to copy."""
    return re.search(rf"(?<![\w.-]){re.escape(token)}(?![\w.-])", msg) is not None


def save_detector(path, trunk, extra_tensors=(), **entries):
    """A detector checkpoint: ``trunk`` (stem/res*) under backbone.bottom_up. (FPN), a
    box predictor, ``extra_tensors`` and other top-level ``entries``."""
    g = torch.Generator().manual_seed(4)
    model = {f"backbone.bottom_up.{k}": v for k, v in trunk.items()}
    model["backbone.fpn_lateral2.weight"] = torch.randn(8, 256, 1, 1, generator=g)
    model["roi_heads.box_predictor.cls_score.weight"] = torch.randn(4, 8, generator=g)
    model.update(dict(extra_tensors))
    torch.save({"model": model, **entries}, path)
    return model


def sha256_of(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_detector_with_bgr_pixel_buffers_made_rgb_flips_stem_and_buffers(tmp_path, tv26, caplog):
    """An old Detectron2 checkpoint with pixel_mean/pixel_std buffers (the mean is Detectron2's
    BGR one, rounded): BGR is read from the file; --to-rgb reverses the stem conv's input
    channels and both buffers, every other tensor is kept as is."""
    _, _, r = tv26
    path = tmp_path / "old_d2.pth"
    src = save_detector(path, r.state_dict, {
        "pixel_mean": torch.tensor([103.5, 116.3, 123.7]).view(3, 1, 1),  # as Detectron2 stored it
        "pixel_std": torch.tensor(D2_BGR_STD),
    })
    # The file does not tell the stride placement: without it, the message names the key and flag.
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg and names(msg, "MODEL.RESNEXT.STRIDE_IN_1X1") and names(msg, "--stride-in-1x1")
    assert not names(msg, "INPUT.FORMAT") and not names(msg, "MODEL.PIXEL_MEAN")

    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r2 = convert_weights(str(path), stride_in_1x1=False, to_rgb=True, progress=False)
    assert r2.format == "detector" and r2.dropped == [] and r2.flipped_to_rgb is True
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(r2.state_dict[stem], src[stem].flip(1))
    assert torch.equal(r2.state_dict["pixel_mean"], torch.tensor([123.7, 116.3, 103.5]).view(3, 1, 1))
    assert torch.equal(r2.state_dict["pixel_std"], torch.tensor(TV_RGB_STD))
    assert set(r2.state_dict) == set(src)
    assert all(torch.equal(r2.state_dict[k], v) for k, v in src.items() if k not in (stem, "pixel_mean", "pixel_std"))
    m = r2.metadata
    assert m.kind == "detector" and m.input.format == "RGB"
    assert m.input.pixel_mean == pytest.approx((123.7, 116.3, 103.5)) and m.input.pixel_std == pytest.approx(TV_RGB_STD)
    assert (m.arch.cardinality, m.arch.bottleneck_width, m.arch.stage_blocks) == (4, 4, (2, 2, 2, 2))
    assert m.arch.stride_in_1x1 is False
    assert m.source["format"] == "detector" and m.source["file"] == "old_d2.pth"
    assert m.source["sha256"] == sha256_of(path) and m.source["flipped_to_rgb"] is True
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "BGR -> RGB" in logs[0]
    # Written and read back: the recorded convention is the flipped one.
    save_converted(r2, str(tmp_path / "rgb.pth"))
    ckpt = torch.load(tmp_path / "rgb.pth", weights_only=True)
    assert ckpt["resnext_det"]["input"]["format"] == "RGB" and "matching_heuristics" not in ckpt
    # The library call without to_rgb keeps the file's BGR input, nothing flipped.
    r3 = convert_detector(read_weights_file(str(path)), stride_in_1x1=False)
    assert r3.metadata.input.format == "BGR" and r3.flipped_to_rgb is False
    assert torch.equal(r3.state_dict[stem], src[stem])


def test_detector_with_rgb_pixel_buffers_needs_no_flip(tmp_path, tv26, caplog):
    """pixel_mean in RGB order (torchvision's x 255): RGB, and --to-rgb changes nothing."""
    _, _, r = tv26
    path = tmp_path / "rgb_det.pth"
    src = save_detector(path, r.state_dict, {"pixel_mean": torch.tensor(TV_RGB_MEAN), "pixel_std": torch.tensor(TV_RGB_STD)},
                        __author__="someone")
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r2 = convert_weights(str(path), stride_in_1x1=False, to_rgb=True, progress=False)
    assert r2.metadata.input.format == "RGB" and r2.metadata.input.pixel_mean == pytest.approx(TV_RGB_MEAN)
    assert r2.flipped_to_rgb is False and r2.metadata.source["flipped_to_rgb"] is False
    assert all(torch.equal(r2.state_dict[k], v) for k, v in src.items())
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "RGB" in logs[0] and "BGR -> RGB" not in logs[0]
    # Without --to-rgb: nothing flipped either.
    r3 = convert_weights(str(path), stride_in_1x1=False, progress=False)
    assert r3.flipped_to_rgb is False and r3.metadata.source["flipped_to_rgb"] is False


def test_detector_trained_here_keeps_its_recorded_convention(tmp_path, tv26):
    """A checkpoint a resnext_det training wrote (its WeightsRecord: BGR, FAIR's std, stride
    in the 3x3 conv): converted to RGB without any flag; one that records no architecture
    (a Detectron2-ResNet trunk) needs the stride placement."""
    _, _, r = tv26
    arch = r.metadata.arch.replace(stride_in_1x1=False)
    fair = InputConvention("BGR", "0-255", D2_BGR_MEAN, D2_BGR_STD)
    rec = WeightsMetadata(kind="detector", input=fair, arch=arch).to_dict()
    path = tmp_path / "model_final.pth"
    src = save_detector(path, r.state_dict, resnext_det=rec)
    r2 = convert_weights(str(path), to_rgb=True, progress=False)
    m = r2.metadata
    assert m.input.format == "RGB" and m.input.pixel_mean == TV_RGB_MEAN and m.input.pixel_std == TV_RGB_STD
    assert m.arch.stride_in_1x1 is False and m.arch.cardinality == 4
    assert m.source["origin"] == "a resnext_det detector"
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(r2.state_dict[stem], src[stem].flip(1))
    # An explicit --convention wins over the record.
    r3 = convert_weights(str(path), convention="msra", progress=False)
    assert r3.metadata.input.pixel_std == (1.0, 1.0, 1.0) and r3.metadata.arch.stride_in_1x1 is True

    rec["arch"] = None
    save_detector(tmp_path / "no_arch.pth", r.state_dict, resnext_det=rec)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(tmp_path / "no_arch.pth"), progress=False)
    msg = str(e.value)
    assert names(msg, "MODEL.RESNEXT.STRIDE_IN_1X1") and names(msg, "--stride-in-1x1") and not names(msg, "INPUT.FORMAT")
    r4 = convert_weights(str(tmp_path / "no_arch.pth"), stride_in_1x1=True, progress=False)
    assert r4.metadata.input.format == "BGR" and r4.metadata.arch.stride_in_1x1 is True


def test_detector_that_tells_nothing_needs_the_convention_flags(tmp_path, tv26):
    """No buffers, no author, no record: the message names the four keys and the flags; then
    --convention gives them (Detectron's MSRA weights: BGR, std 1, stride in the 1x1 conv),
    and --pixel-mean / --pixel-std / --stride-in-1x1 override it."""
    _, _, r = tv26
    path = tmp_path / "someones.pth"
    save_detector(path, r.state_dict)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg
    for token in ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.RESNEXT.STRIDE_IN_1X1",
                  "--convention", "--pixel-mean", "--pixel-std", "--stride-in-1x1"):
        assert names(msg, token), token
    for c in ("fair", "detectron1", "msra", "torchvision"):
        assert c in msg

    m = convert_weights(str(path), convention="msra", progress=False).metadata
    assert (m.input.format, m.input.pixel_mean, m.input.pixel_std) == ("BGR", D2_BGR_MEAN, (1.0, 1.0, 1.0))
    assert m.arch.stride_in_1x1 is True
    m = convert_weights(str(path), convention="torchvision", pixel_mean=[1.0, 2.0, 3.0], pixel_std=[4.0, 5.0, 6.0],
                        stride_in_1x1=True, progress=False).metadata
    assert (m.input.format, m.input.pixel_mean, m.input.pixel_std) == ("RGB", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert m.arch.stride_in_1x1 is True

    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), convention="caffe", progress=False)
    assert "'caffe'" in str(e.value) and names(str(e.value), "--convention") and "msra" in str(e.value)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), convention="fair", pixel_std=[0.0, 1.0, 1.0], progress=False)
    assert names(str(e.value), "--pixel-std") and "positive" in str(e.value)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), fmt="torchvision", progress=False)
    assert names(str(e.value), "--format") and "auto" in str(e.value)


def test_detector_without_a_resnet_trunk_or_of_another_arch_is_refused(tmp_path, tv26):
    _, _, r = tv26
    path = tmp_path / "other_backbone.pth"
    keys = [f"backbone.fpn_lateral{i}.weight" for i in range(2, 6)] + ["backbone.vit.blocks.0.w", "roi_heads.x.w"]
    torch.save({"model": {k: torch.zeros(2) for k in keys}}, path)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), convention="fair", progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg and "backbone.bottom_up.stem" in msg and "backbone.fpn_lateral2.weight" in msg
    # --arch is checked against the detector's trunk (the tiny one is no X-50-32x4d).
    save_detector(tmp_path / "tiny.pth", r.state_dict)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(tmp_path / "tiny.pth"), arch="X-50-32x4d", convention="fair", progress=False)
    assert names(str(e.value), "--arch") and "X-50-32x4d" in str(e.value) and "C=4, d=4" in str(e.value)


# --------------------------------------------------------------------------
# A detector checkpoint of other head shapes than the config builds: the message names
# the config key that made the file's shapes, with the file's value
# --------------------------------------------------------------------------
def tiny_cfg(kind, *opts):
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", f"Base-ResNeXt-{kind}.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.STAGE_BLOCKS", [1, 1, 1, 1],
        "MODEL.RESNEXT.CARDINALITY", 2, "MODEL.RESNEXT.BOTTLENECK_WIDTH", 4, "MODEL.RESNEXT.STEM_OUT_CHANNELS", 8,
        "MODEL.RESNEXT.RES2_OUT_CHANNELS", 16, "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 16,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", [8], "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
        *opts,
    ])  # fmt: skip
    return cfg


MASK, KP, PANOPTIC = ["MODEL.MASK_ON", True], ["MODEL.KEYPOINT_ON", True], ["MODEL.META_ARCHITECTURE", "PanopticFPN"]
# (base, the file's config, the loading config, what the message must name, what it must not)
SHAPE_CASES = {
    "classes": ("FPN", [*MASK, "MODEL.ROI_HEADS.NUM_CLASSES", 5], [*MASK, "MODEL.ROI_HEADS.NUM_CLASSES", 3],
                ["MODEL.ROI_HEADS.NUM_CLASSES 5"], ["CLS_AGNOSTIC", "CONV_DIM"]),
    "agnostic": ("FPN", [*MASK, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True],
                 MASK, ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True", "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True"],
                 ["NUM_CLASSES", "CONV_DIM"]),
    "keypoints": ("FPN", [*KP, "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 17], [*KP, "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 5],
                  ["MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 17"], ["NUM_CLASSES"]),
    "retinanet_classes": ("RetinaNet", ["MODEL.RETINANET.NUM_CLASSES", 5], ["MODEL.RETINANET.NUM_CLASSES", 3],
                          ["MODEL.RETINANET.NUM_CLASSES 5"], ["MODEL.ANCHOR_GENERATOR", "head.bbox_pred"]),
    "retinanet_anchors": ("RetinaNet", ["MODEL.RETINANET.NUM_CLASSES", 5],
                          ["MODEL.RETINANET.NUM_CLASSES", 5, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]]],
                          ["MODEL.ANCHOR_GENERATOR.SIZES", "ASPECT_RATIOS"], ["NUM_CLASSES", "the keys that build"]),
    "semseg": ("FPN", [*PANOPTIC, *MASK, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 54],
               [*PANOPTIC, *MASK, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 10], ["MODEL.SEM_SEG_HEAD.NUM_CLASSES 54"], ["ROI_HEADS"]),
    # The RPN and box heads' shapes follow the FPN's width: only the width is named for them.
    "fpn_width": ("FPN", [*MASK, "MODEL.FPN.OUT_CHANNELS", 16], [*MASK, "MODEL.FPN.OUT_CHANNELS", 32],
                  ["MODEL.FPN.OUT_CHANNELS 16", "MODEL.ROI_MASK_HEAD.CONV_DIM"], ["MODEL.ANCHOR_GENERATOR", "FC_DIM"]),
    "rpn_anchors": ("FPN", [], ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]]],
                    ["MODEL.ANCHOR_GENERATOR.SIZES", "ASPECT_RATIOS"], ["MODEL.FPN", "ROI_BOX_HEAD"]),
    "box_head": ("FPN", [], ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 5],
                 ["MODEL.ROI_BOX_HEAD.FC_DIM", "POOLER_RESOLUTION"], ["NUM_CLASSES", "MODEL.FPN"]),
    # A predictor whose class dimension agrees differs in its input width: the head's width is
    # named, not the class count the config already has.
    "mask_head": ("FPN", MASK, [*MASK, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16], ["MODEL.ROI_MASK_HEAD.CONV_DIM", "NUM_CONV"],
                  ["ROI_BOX_HEAD", "MODEL.FPN", "NUM_CLASSES"]),
    "box_fc_dim": ("FPN", [], ["MODEL.ROI_BOX_HEAD.FC_DIM", 32], ["MODEL.ROI_BOX_HEAD.FC_DIM"], ["NUM_CLASSES", "MODEL.FPN"]),
    "keypoint_width": ("FPN", KP, [*KP, "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", [16]], ["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS"],
                       ["NUM_KEYPOINTS", "NUM_CLASSES"]),
    "semseg_width": ("FPN", [*PANOPTIC, *MASK], [*PANOPTIC, *MASK, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 64],
                     ["MODEL.SEM_SEG_HEAD.CONVS_DIM"], ["NUM_CLASSES"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_detector_of_other_head_shapes_names_the_key_and_the_file_value(tmp_path, case):
    kind, file_opts, cfg_opts, named, not_named = SHAPE_CASES[case]
    trained_cfg = tiny_cfg(kind, *file_opts)
    trained = build_model(trained_cfg)
    ck = ResNeXtCheckpointer(trained, str(tmp_path))  # as the trainer writes model_final.pth
    attach_weights_record(ck, trained_cfg)
    ck.save("model_final")
    cfg = tiny_cfg(kind, *cfg_opts)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(build_model(cfg), cfg=cfg, require="all").load(str(tmp_path / "model_final.pth"))
    fixes = str(e.value).split("; set ", 1)[1]
    for token in named:
        key, _, value = token.partition(" ")
        assert names(fixes, key), (token, fixes)
        if value:  # the file's value, and no other
            assert set(re.findall(rf"{re.escape(key)} (\S+?)(?=\.?(?:\s|$))", fixes)) == {value}, (token, fixes)
    for token in not_named:
        assert token not in fixes, (token, fixes)
    assert "None" not in fixes
    assert "the keys that build" not in fixes, fixes  # every tensor here comes from a head the message knows


def test_retinanet_file_without_its_box_branch_names_classes_and_anchors(tmp_path):
    """The class count of a RetinaNet head needs the anchors per position (from its box
    branch): without it, both keys are named."""
    trained = build_model(tiny_cfg("RetinaNet", "MODEL.RETINANET.NUM_CLASSES", 5))
    sd = {k: v for k, v in trained.state_dict().items() if not k.startswith("head.bbox_pred.")}
    torch.save({"model": sd}, tmp_path / "retinanet.pth")
    cfg = tiny_cfg("RetinaNet", "MODEL.RETINANET.NUM_CLASSES", 3)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(build_model(cfg), cfg=cfg, require="all").load(str(tmp_path / "retinanet.pth"))
    fixes = str(e.value).split("; set ", 1)[1]
    assert names(fixes, "MODEL.RETINANET.NUM_CLASSES") and names(fixes, "MODEL.ANCHOR_GENERATOR")
    assert "MODEL.RETINANET.NUM_CLASSES 5" not in fixes  # not knowable from the file


# --------------------------------------------------------------------------
# .pkl files through MODEL.WEIGHTS: read as Detectron2's own checkpointer reads them
# --------------------------------------------------------------------------
def test_pkl_files_are_read_as_detectron2_reads_them(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    files = {
        "zoo.pkl": {"model": {"backbone.w": w}, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True},
        "caffe2.pkl": {"blobs": {"conv1_w": w, "conv1_w_momentum": w * 0, "res2_0_branch2a_w": w}},
        "flat.pkl": {"conv1_w": w, "fc1000_w_momentum": w * 0},
        "model_only.pkl": {"model": {"conv1_w": w}},  # no __author__: Detectron2 takes it for Caffe2's
    }
    for name, data in files.items():
        with open(tmp_path / name, "wb") as f:
            pickle.dump(data, f, protocol=2)
        ref = DetectionCheckpointer(nn.Linear(1, 1))._load_file(str(tmp_path / name))
        ours = ResNeXtCheckpointer(nn.Linear(1, 1))._load_file(str(tmp_path / name))
        assert {k: v for k, v in ours.items() if k != "model"} == {k: v for k, v in ref.items() if k != "model"}, name
        assert ours["model"].keys() == ref["model"].keys(), name
        for k, v in ref["model"].items():
            assert type(ours["model"][k]) is type(v) and (not isinstance(v, np.ndarray) or np.array_equal(ours["model"][k], v))


def test_unconverted_files_name_the_convert_command_with_an_output_name(tmp_path, tv26):
    """The command printed for a raw or unrecorded file is the input file and an output named
    after it (*-d2.pth, a name save_converted accepts)."""
    tv, d, r = tv26
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(d / "tv26.pth")))
    with pytest.raises(WeightsConfigError) as e:
        load_detector(cfg)
    assert f"tools/convert_pretrained.py {d / 'tv26.pth'} tv26-d2.pth" in str(e.value)
    torch.save({"model": r.state_dict}, tmp_path / "backbone.v2.pth")  # Detectron2 names, nothing recorded
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(tmp_path / "backbone.v2.pth")))
    with pytest.raises(WeightsConfigError) as e:
        load_detector(cfg)
    msg = str(e.value)
    assert f"tools/convert_pretrained.py {tmp_path / 'backbone.v2.pth'} backbone.v2-d2.pth" in msg
    assert names(msg, "--format") and names(msg, "detectron2") and names(msg, "--convention")


def test_truncated_file_message_gives_its_size_and_the_error(tmp_path, tv26):
    _, d, _ = tv26
    data = open(d / "tv26-d2.pth", "rb").read()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointReadError) as e:
        convert_weights(str(path), progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg and f"({len(data) // 3} bytes)" in msg
    cause = e.value.__cause__
    assert cause is not None and type(cause).__name__ in msg and str(cause)[:40] in msg
    assert "truncated" in msg and "sha256" in msg


def test_config_yaml_reads_back_in_detectron2(tmp_path):
    pairs = [("MODEL.WEIGHTS", "w.pth"), ("MODEL.RESNEXT.CARDINALITY", 4), ("MODEL.PIXEL_STD", [1.0, 2.0, 3.0]),
             ("INPUT.FORMAT", "BGR"), ("MODEL.RESNEXT.STRIDE_IN_1X1", True)]
    base = os.path.join(ROOT, "configs", "Base-ResNeXt-FPN.yaml")
    for header in ("", "Made here.\n\nTwo paragraphs.  "):
        text = config_yaml(pairs, base=base, header=header) if header else config_yaml(pairs, base=base)
        lines = text.splitlines()
        assert all(line == line.rstrip() for line in lines)  # no trailing blanks
        assert sum(line.startswith("#") for line in lines) == len(header.splitlines())
        (tmp_path / "c.yaml").write_text(text)
        cfg = get_cfg()
        add_resnext_config(cfg)
        cfg.merge_from_file(str(tmp_path / "c.yaml"))
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"  # from the base
        for k, v in pairs:
            node = cfg
            for part in k.split("."):
                node = node[part]
            assert (list(node) if isinstance(v, list) else node) == v, k


def test_zoo_resnet_detector_warning_gives_the_zoo_values_to_check(tmp_path):
    """A Detectron2 model-zoo ResNet (C=1) detector does not tell its PIXEL_STD or stride
    placement: the one-line warning names both keys, with the values Detectron2's zoo trained
    them with (MSRA R-*: std [1, 1, 1], stride in the 1x1 conv; 2021 LSJ baselines: FAIR's std;
    GN models: [1, 1, 1], stride in the 3x3); another project's detector gets no zoo hint."""
    from resnext_det.checkpoint.layout import detector_convention

    torch.save(tv_resnext(layers=(1, 1, 1, 1), groups=1, width=64).state_dict(), tmp_path / "r14.pth")
    trunk = convert_weights(str(tmp_path / "r14.pth"), progress=False).state_dict
    tensors = {f"backbone.bottom_up.{k}": v for k, v in trunk.items()}
    w = detector_convention(tensors, {"__author__": "Detectron2 Model Zoo"}).warning("MODEL.WEIGHTS = 'zoo.pkl'")
    assert "\n" not in w and "MODEL.WEIGHTS = 'zoo.pkl'" in w and not names(w, "INPUT.FORMAT")
    assert names(w, "MODEL.PIXEL_STD") and names(w, "MODEL.RESNEXT.STRIDE_IN_1X1")
    assert "MODEL.PIXEL_STD, MODEL.RESNEXT.STRIDE_IN_1X1" in w  # the unknown keys, listed
    assert names(w, "MODEL.PIXEL_STD [1, 1, 1]") and names(w, "MODEL.RESNEXT.STRIDE_IN_1X1 True")  # MSRA R-*
    assert "[57.375, 57.12, 58.395] and True" in w and "[1, 1, 1] and False" in w  # LSJ; GN
    assert "MSRA" in w and "GN" in w and "None" not in w
    other = detector_convention(tensors, {"__author__": "someone"}).warning("MODEL.WEIGHTS = 'x.pth'")
    assert names(other, "INPUT.FORMAT") and names(other, "MODEL.PIXEL_STD") and "[1, 1, 1]" not in other
    assert "None" not in other


def test_group_norm_warning_only_for_weights_trained_with_bn(tmp_path, caplog):
    """GN keeps no running statistics: a BN-trained checkpoint loaded into a GN config is
    warned about (GN takes BN's scale and bias, the statistics are dropped); a GN model's
    own checkpoint, loaded into the config it was trained with, is not."""
    gn = ["MODEL.RESNEXT.BOTTLENECK_WIDTH", 16, "MODEL.RESNEXT.RES2_OUT_CHANNELS", 64, "MODEL.RESNEXT.STEM_OUT_CHANNELS", 32]

    def saved(norm):
        cfg = tiny_cfg("FPN", *gn, "MODEL.RESNEXT.NORM", norm)
        model = build_model(cfg)
        ck = ResNeXtCheckpointer(model, str(tmp_path / norm))  # as the trainer writes model_final.pth
        attach_weights_record(ck, cfg)
        ck.save("model_final")
        return str(tmp_path / norm / "model_final.pth")

    cfg = tiny_cfg("FPN", *gn, "MODEL.RESNEXT.NORM", "GN")
    for path, warned in ((saved("GN"), False), (saved("FrozenBN"), True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="resnext_det"):
            ResNeXtCheckpointer(build_model(cfg), cfg=cfg, require="all").load(path)
        lines = [r.getMessage() for r in caplog.records if "with BN-trained weights" in r.getMessage()]
        assert len(lines) == int(warned), (path, lines)
        if warned:
            assert names(lines[0], "MODEL.RESNEXT.NORM") and "'GN'" in lines[0]


def test_arch_flag_unknown_or_of_another_shape_names_the_choices_and_the_file(tv26):
    """--arch must be one of the paper's names (presets.PRESETS, typed here from Table 3/5):
    an unknown one lists them; a known one of another shape names the file and what it holds."""
    _, d, _ = tv26
    with pytest.raises(ConversionError) as e:
        convert_weights(str(d / "tv26.pth"), arch="X-50-64x4d", progress=False)
    for name in ("X-50-32x4d", "X-101-32x4d", "X-101-64x4d", "X-101-32x8d", "X-152-32x8d"):
        assert repr(name) in str(e.value)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(d / "tv26.pth"), arch="X-101-32x8d", progress=False)
    msg = str(e.value)
    assert "(depth 101, C=32, d=8)" in msg and repr(str(d / "tv26.pth")) in msg
    assert msg.count("no named architecture") == 1  # depth 26, C=4, d=4 is none of the presets


def test_legacy_torch_files_and_wrapped_state_dicts_read_as_torch_loads_them(tmp_path):
    """A pre-1.6 torch.save file (not a zip; torch's magic number first) and the usual
    wrappers ("state_dict", "model", "model_state", DataParallel's "module") read as
    torch.load gives them, without running code."""
    from resnext_det.checkpoint.readers import read_weights_file

    sd = {"conv1.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.ones(2)}
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    got = read_weights_file(str(legacy)).tensors
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    for key in ("state_dict", "model", "model_state", "module"):
        torch.save({key: sd, "epoch": 3}, tmp_path / f"{key}.pth")
        got = read_weights_file(str(tmp_path / f"{key}.pth")).tensors
        assert set(got) == set(sd), key


def test_a_lazyconfig_models_own_convention_is_what_its_checkpoint_records(tmp_path):
    """Without a yacs config (LazyConfig users), the record and the check read the input
    convention from the model itself: Detectron2's GeneralizedRCNN's input_format,
    pixel_mean and pixel_std."""
    from resnext_det.checkpoint.metadata import metadata_from_model

    cfg = tiny_cfg("FPN", "MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0], "MODEL.PIXEL_STD", [4.0, 5.0, 6.0])
    model = build_model(cfg)
    inp = metadata_from_model(model).input
    assert (inp.format, tuple(inp.pixel_mean), tuple(inp.pixel_std)) == (cfg.INPUT.FORMAT, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


def test_affine_weights_warn_under_every_norm_that_normalises_with_batch_statistics():
    """Caffe2 weights (BN folded into an affine, no ImageNet statistics) under a norm that
    normalises with batch statistics in training get the warning; which norms do is read
    from Detectron2's own get_norm (a _BatchNorm that is not FrozenBatchNorm2d), not typed."""
    import dataclasses

    from detectron2.layers import FrozenBatchNorm2d, get_norm
    from torch.nn.modules.batchnorm import _BatchNorm

    from resnext_det.checkpoint.metadata import check_weights_against_config, metadata_from_model
    from resnext_det.modeling.spec import NORMS

    gn = ["MODEL.RESNEXT.BOTTLENECK_WIDTH", 16, "MODEL.RESNEXT.RES2_OUT_CHANNELS", 64, "MODEL.RESNEXT.STEM_OUT_CHANNELS", 32]
    for norm in NORMS:
        layer = get_norm(norm, 32) if norm else None
        batch_stats = isinstance(layer, _BatchNorm) and not isinstance(layer, FrozenBatchNorm2d)
        cfg = tiny_cfg("FPN", *gn, "MODEL.RESNEXT.NORM", norm)
        model = build_model(cfg)
        meta = dataclasses.replace(metadata_from_model(model, cfg), weights_norm="affine")
        warned = [w for w in check_weights_against_config(meta, cfg, model=model) if "Caffe2 weights" in w]
        assert len(warned) == int(batch_stats), (norm, warned)
        if warned:
            assert f"MODEL.RESNEXT.NORM = {norm!r}" in warned[0] and "FrozenBN" in warned[0]


def test_a_backbone_with_one_tensor_too_many_or_too_few_is_refused_naming_it(tv26):
    """The converted trunk must be exactly our ResNeXt's: one extra tensor (typed here) or
    one missing is a ConversionError that names it, not a file with a stray tensor."""
    from resnext_det.checkpoint.layout import check_against_model, infer_arch

    _, _, r = tv26
    sd = dict(r.state_dict)
    arch = infer_arch(sd)
    check_against_model(sd, arch)  # complete: no error
    with pytest.raises(ConversionError, match=r"1 unexpected, e\.g\. \['res6\.0\.conv1\.weight'\]"):
        check_against_model({**sd, "res6.0.conv1.weight": torch.zeros(1)}, arch)
    sd.pop("res4.0.conv2.weight")
    with pytest.raises(ConversionError, match=r"1 tensors missing, e\.g\. \['res4\.0\.conv2\.weight'\]"):
        check_against_model(sd, arch)


# --------------------------------------------------------------------------
# What the written files hold, what the architecture is read as, and the detector
# conventions, each against a reference written here by hand
# --------------------------------------------------------------------------
def tv_key_to_d2(k: str):
    """torchvision's name -> Detectron2's, as Detectron2's tools/convert-torchvision-to-d2.py
    renames them (None: not part of the backbone)."""
    if k.startswith("fc.") or k.endswith("num_batches_tracked"):
        return None
    if k.startswith("conv1."):
        return "stem." + k
    if k.startswith("bn1."):
        return "stem.conv1.norm." + k[len("bn1."):]
    m = re.match(r"layer(\d)\.(\d+)\.(.*)", k)
    stage, block, rest = f"res{int(m[1]) + 1}", m[2], m[3]
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"{stage}.{block}.{rest}"


def test_converted_backbone_file_holds_detectron2_names_and_its_record(tv26):
    """The written backbone file is a Detectron2 ImageNet checkpoint: every torchvision tensor
    under the name Detectron2's own converter gives it (fc dropped), float32 and equal,
    ``matching_heuristics`` True (docs/weights.md: plain Detectron2 maps it by suffix), and
    the record of its source: format, file name, sha256, convention, what was dropped."""
    tv, d, _ = tv26
    ckpt = torch.load(d / "tv26-d2.pth", weights_only=True)
    assert set(ckpt) == {"model", "__author__", "matching_heuristics", "resnext_det"}
    assert ckpt["matching_heuristics"] is True and "torchvision" in ckpt["__author__"]
    src = tv.state_dict()
    want = {tv_key_to_d2(k): v for k, v in src.items() if tv_key_to_d2(k)}
    assert set(ckpt["model"]) == set(want)
    for k, v in want.items():
        assert ckpt["model"][k].dtype == torch.float32 and torch.equal(ckpt["model"][k], v), k
    source = ckpt["resnext_det"]["source"]
    assert source["format"] == "torchvision" and source["file"] == "tv26.pth"
    assert source["sha256"] == sha256_of(d / "tv26.pth") and source["convention"] == "torchvision"
    assert source["flipped_to_rgb"] is False and source["dropped"] == ["fc.bias", "fc.weight"]


def test_format_names_are_the_listed_lowercase_choices(tv26):
    """--format takes the names of docs/weights.md as written (argparse ``choices``, case
    sensitive): "torchvision" converts, "TorchVision" is refused naming the choices."""
    from resnext_det.checkpoint.formats import FORMATS

    _, d, _ = tv26
    assert convert_weights(str(d / "tv26.pth"), fmt="torchvision", progress=False).format == "torchvision"
    with pytest.raises(ConversionError) as e:
        convert_weights(str(d / "tv26.pth"), fmt="TorchVision", progress=False)
    msg = str(e.value)
    assert "'TorchVision'" in msg and names(msg, "--format")
    assert all(repr(f) in msg for f in FORMATS) and "'auto'" in msg
    with pytest.raises(SystemExit):  # argparse refuses it before any conversion
        run_tool(d / "tv26.pth", d / "never.pth", "--format", "TORCHVISION", check=False)
    assert not (d / "never.pth").exists()


def test_a_detector_given_to_the_format_resolver_is_sent_to_model_weights():
    """A detector checkpoint is no ImageNet backbone: the format resolver refuses it and
    tells the user to use it as MODEL.WEIGHTS directly."""
    from resnext_det.checkpoint.convert import _resolve_format
    from resnext_det.checkpoint.readers import SourceWeights

    src = SourceWeights("det.pth", "zip", tensors={"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)})
    with pytest.raises(ConversionError) as e:
        _resolve_format(src, "auto")
    # the key, ready to copy (a sentence may end after it)
    assert "'det.pth'" in str(e.value) and re.search(r"(?<![\w.])MODEL\.WEIGHTS(?![\w-]|\.\w)", str(e.value))


def test_progress_false_draws_no_progress_bar(tv26, capsys):
    """progress=False (the library default of the tests, --quiet in the tool) writes nothing
    to the terminal: no tqdm bar on stderr."""
    _, d, _ = tv26
    capsys.readouterr()
    convert_weights(str(d / "tv26.pth"), progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_converted_detector_file_keeps_every_tensor_and_names_its_origin(tmp_path, tv26):
    """A detector written by the converter keeps its own (Detectron2) tensor names, no
    ``matching_heuristics`` (the names are full), and says where it came from: the source
    file's ``__author__`` (or that it is a detector) and the record of its convention."""
    _, _, r = tv26
    bufs = {"pixel_mean": torch.tensor(D2_BGR_MEAN), "pixel_std": torch.tensor(D2_BGR_STD)}
    path = tmp_path / "theirs.pth"
    src = save_detector(path, r.state_dict, bufs, __author__="Lab X trainer")
    r2 = convert_weights(str(path), stride_in_1x1=False, progress=False)
    save_converted(r2, str(tmp_path / "out.pth"))
    ckpt = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(ckpt) == {"model", "__author__", "resnext_det"}
    assert set(ckpt["model"]) == set(src) and all(torch.equal(ckpt["model"][k], v) for k, v in src.items())
    assert "Lab X trainer" in ckpt["__author__"]
    rec = ckpt["resnext_det"]
    assert rec["kind"] == "detector" and rec["input"]["format"] == "BGR"
    assert rec["input"]["pixel_std"] == pytest.approx(D2_BGR_STD) and rec["arch"]["stride_in_1x1"] is False
    assert rec["source"]["format"] == "detector" and "Lab X trainer" in rec["source"]["origin"]
    assert rec["source"]["file"] == "theirs.pth" and rec["source"]["sha256"] == sha256_of(path)
    assert r2.format == "detector" and r2.dropped == []

    save_detector(tmp_path / "anon.pth", r.state_dict, bufs)  # no __author__
    r3 = convert_weights(str(tmp_path / "anon.pth"), stride_in_1x1=False, progress=False)
    author = r3.checkpoint()["__author__"]
    assert "detector" in author and "None" not in author
    assert "(" not in r3.metadata.source["origin"]  # no author to name


def test_a_backbone_with_a_tensor_of_another_shape_is_refused_naming_it(tv26):
    """Same keys, one tensor of another shape (a res3 conv of other width): refused, the
    message names the key and both shapes."""
    from resnext_det.checkpoint.layout import check_against_model, infer_arch

    _, _, r = tv26
    sd = dict(r.state_dict)
    arch = infer_arch(sd)
    good = tuple(sd["res3.1.conv1.weight"].shape)
    sd["res3.1.conv1.weight"] = torch.zeros(good[0] + 2, *good[1:])
    with pytest.raises(ConversionError) as e:
        check_against_model(sd, arch)
    msg = str(e.value)
    assert "1 of another shape" in msg and "res3.1.conv1.weight" in msg
    assert str((good[0] + 2, *good[1:])) in msg and str(good) in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_converted_trunk_is_checked_as_the_whole_frozen_bn_imagenet_trunk(tv26):
    """trunk_spec: whatever the spec's norm, outputs and freezing (a detector config's), the
    reference is the ImageNet trunk: FrozenBN (no num_batches_tracked), res2..res5 out,
    nothing frozen, same shapes; a converted file passes against a SyncBN spec too."""
    from resnext_det.checkpoint.layout import check_against_model, infer_arch, trunk_spec

    _, _, r = tv26
    arch = infer_arch(r.state_dict).replace(norm="SyncBN", freeze_at=3, out_features=("res4",))
    t = trunk_spec(arch)
    assert (t.norm, t.freeze_at, tuple(t.out_features)) == ("FrozenBN", 0, ("res2", "res3", "res4", "res5"))
    assert (t.stage_blocks, t.cardinality, t.bottleneck_width) == ((2, 2, 2, 2), 4, 4)
    check_against_model(dict(r.state_dict), arch)  # no error


def hand_sd(blocks=(3, 4, 6, 3), conv2=(128, 4, 3, 3), stem=(64, 3, 7, 7), res2_out=256):
    """The tensors infer_arch reads, typed by hand: block indices, the stem conv, res2.0's
    grouped 3x3 conv (C*d, d, 3, 3) and its last 1x1 conv."""
    sd = {f"res{s + 2}.{b}.conv1.weight": torch.zeros(1) for s, n in enumerate(blocks) for b in range(n)}
    sd["stem.conv1.weight"] = torch.zeros(stem)
    sd["res2.0.conv2.weight"] = torch.zeros(conv2)
    sd["res2.0.conv3.weight"] = torch.zeros(res2_out, conv2[0], 1, 1)
    return sd


@pytest.mark.parametrize("blocks,conv2,depth,c,d", [
    ((3, 4, 6, 3), (128, 4, 3, 3), 50, 32, 4),     # X-50-32x4d (Table 1)
    ((3, 4, 23, 3), (256, 8, 3, 3), 101, 32, 8),   # X-101-32x8d
    ((3, 8, 36, 3), (256, 4, 3, 3), 152, 64, 4),   # X-152-64x4d
    ((3, 4, 6, 3), (64, 64, 3, 3), 50, 1, 64),     # ResNet-50: C=1, d=64
])  # fmt: skip
def test_infer_arch_reads_depth_cardinality_and_width_from_hand_built_tensors(blocks, conv2, depth, c, d):
    """Depth = 3 * blocks + 2; d = the grouped conv's input channels per group, C = its
    output channels / d (Sec. 3.3); stem and res2 widths from their convs."""
    from resnext_det.checkpoint.layout import infer_arch

    a = infer_arch(hand_sd(blocks, conv2, stem=(32, 3, 7, 7), res2_out=128), stride_in_1x1=True)
    assert (a.stage_blocks, a.depth, a.cardinality, a.bottleneck_width) == (blocks, depth, c, d)
    assert (a.stem_out_channels, a.res2_out_channels, a.stride_in_1x1) == (32, 128, True)


def test_infer_arch_refuses_hand_built_tensors_that_make_no_resnext_naming_why():
    """Each malformed layout is refused with what is wrong: a gap in a stage's block
    indices, a missing stage, a grouped conv whose width is no multiple of its group width,
    a stem that is not a 7x7 conv on 3 channels, a missing res2.0 conv."""
    from resnext_det.checkpoint.layout import infer_arch

    sd = hand_sd()
    sd["res4.7.conv1.weight"] = sd.pop("res4.5.conv1.weight")  # indices 0..4, 7
    with pytest.raises(ConversionError, match=r"res4 block indices.*\[0, 1, 2, 3, 4, 7\]"):
        infer_arch(sd)
    sd = {k: v for k, v in hand_sd().items() if not k.startswith("res5.")}
    with pytest.raises(ConversionError, match="no res5 blocks"):
        infer_arch(sd)
    with pytest.raises(ConversionError) as e:
        infer_arch(hand_sd(conv2=(126, 4, 3, 3)))  # 126 channels, groups of 4
    assert "res2.0 conv2" in str(e.value) and "126" in str(e.value) and "4" in str(e.value)
    with pytest.raises(ConversionError, match=r"stem conv weight has shape \(64, 3, 3, 3\)"):
        infer_arch(hand_sd(stem=(64, 3, 3, 3)))
    with pytest.raises(ConversionError, match=r"res2\.0 conv2 weight has shape \(128, 4, 1, 1\), expected a 3x3"):
        infer_arch(hand_sd(conv2=(128, 4, 1, 1)))  # a 1x1 where the grouped 3x3 should be
    sd = hand_sd()
    del sd["res2.0.conv3.weight"]
    with pytest.raises(ConversionError, match=r"res2\.0\.conv3\.weight"):
        infer_arch(sd)


def test_detector_trunk_of_fpn_and_c4_layouts_without_bn_counters(tv26):
    """An FPN detector keeps its trunk under backbone.bottom_up., a C4 one under backbone.
    with res5 in roi_heads.res5.: both give the trunk in backbone names, without the
    num_batches_tracked counters of a (Sync)BN training, and nothing of the heads."""
    from resnext_det.checkpoint.layout import check_against_model, detector_trunk, infer_arch

    _, _, r = tv26
    trunk = dict(r.state_dict)
    counters = {k[: -len("running_mean")] + "num_batches_tracked": torch.tensor(7)
                for k in trunk if k.endswith("running_mean")}  # fmt: skip
    heads = {"backbone.fpn_lateral2.weight": torch.zeros(1), "roi_heads.box_predictor.cls_score.weight": torch.zeros(1),
             "proposal_generator.rpn_head.conv.weight": torch.zeros(1)}  # fmt: skip
    fpn = {f"backbone.bottom_up.{k}": v for k, v in {**trunk, **counters}.items()}
    c4 = {(f"roi_heads.{k}" if k.startswith("res5.") else f"backbone.{k}"): v for k, v in {**trunk, **counters}.items()}
    for tensors in ({**fpn, **heads}, {**c4, **heads}):
        got = detector_trunk(tensors)
        assert set(got) == set(trunk)
        assert all(got[k] is tensors[n] for k in got for n in (f"backbone.bottom_up.{k}", f"backbone.{k}",
                                                                  f"roi_heads.{k}") if n in tensors)  # fmt: skip
        check_against_model(got, infer_arch(got))
    assert detector_trunk(heads) == {}


def test_what_a_detector_file_tells_nothing_of_gives_no_metadata():
    """A convention the file does not tell, with no config to assume from: no input record
    and no architecture (not a guess, not an error)."""
    from resnext_det.checkpoint.layout import DetectorConvention

    m = DetectorConvention("a detector checkpoint").metadata()
    assert m.kind == "detector" and m.input is None and m.arch is None
    assert DetectorConvention("a detector checkpoint").unknown_keys() == ["INPUT.FORMAT", "MODEL.PIXEL_MEAN",
                                                                          "MODEL.PIXEL_STD"]  # fmt: skip


@pytest.mark.parametrize("mean,fmt", [
    ((103.53, 116.28, 123.675), "BGR"),    # Detectron2's Caffe2 mean
    ((123.675, 116.28, 103.53), "RGB"),    # torchvision's x 255
    ((103.6, 116.2, 123.6), "BGR"),        # within 0.1 %
    ((103.0, 116.28, 123.675), None),      # 0.5 % off: another mean
    ((0.485, 0.456, 0.406), None),         # torchvision's on the 0-1 scale
    ((116.28, 116.28, 116.28), None),
])  # fmt: skip
def test_channel_order_is_read_from_an_imagenet_mean_buffer_only(mean, fmt):
    """pixel_mean buffers give the channel order only when they are ImageNet's mean (0-255)
    in one order; any other mean leaves INPUT.FORMAT unknown (named in the warning)."""
    from resnext_det.checkpoint.layout import detector_convention

    found = detector_convention({"pixel_mean": torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)}, {})
    assert found.format == fmt and found.pixel_mean == pytest.approx(mean)
    assert ("INPUT.FORMAT" in found.unknown_keys()) == (fmt is None)


def test_to_rgb_on_backbones_flips_only_bgr_weights_and_says_so(tmp_path, tv26, caplog):
    """--to-rgb on BGR (Caffe2) weights reverses the stem conv's input channels, records it
    and logs it naming the flag; on torchvision (RGB) weights nothing is flipped and the log
    says so."""
    tv, d, r = tv26
    blobs = tv_to_caffe2_blobs(tv_resnext(layers=(1, 1, 1, 1)).state_dict())
    with open(tmp_path / "X-14.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r2 = convert_weights(str(tmp_path / "X-14.pkl"), convention="fair", to_rgb=True, progress=False)
    assert torch.equal(r2.state_dict["stem.conv1.weight"], torch.as_tensor(blobs["conv1_w"]).flip(1))
    assert r2.flipped_to_rgb is True and r2.metadata.source["flipped_to_rgb"] is True
    assert r2.metadata.input.format == "RGB" and r2.metadata.source["convention"] == "fair"
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "BGR -> RGB" in logs[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r3 = convert_weights(str(d / "tv26.pth"), to_rgb=True, progress=False)
    assert torch.equal(r3.state_dict["stem.conv1.weight"], tv.state_dict()["conv1.weight"])
    assert r3.flipped_to_rgb is False and r3.metadata.source["flipped_to_rgb"] is False
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "BGR -> RGB" not in logs[0]


def test_torch7_format_is_taken_for_t7_files_only_and_named_when_refused(tv26):
    """--format torch7 (or auto) reads a Torch7 file as torch7; another --format on a .t7
    names the flag to pass; --format torch7 on a file that is no .t7 says it wants a .t7."""
    from resnext_det.checkpoint.convert import _resolve_format
    from resnext_det.checkpoint.readers import SourceWeights

    t7 = SourceWeights("net.t7", "t7")
    assert _resolve_format(t7, "torch7") == "torch7" and _resolve_format(t7, "auto") == "torch7"
    with pytest.raises(ConversionError) as e:
        _resolve_format(t7, "torchvision")
    assert "'net.t7'" in str(e.value) and "--format torch7" in str(e.value)
    _, d, _ = tv26
    pth = read_weights_file(str(d / "tv26.pth"))
    with pytest.raises(ConversionError) as e:
        _resolve_format(pth, "torch7")
    assert repr(pth.path) in str(e.value) and ".t7" in str(e.value)


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


def test_conversion_logs_the_file_it_reads_once(tv26, caplog):
    """The converter logs the file it reads with its size; given the file already read
    (``source``, as the tool does after sniffing it) it logs no second read."""
    _, d, _ = tv26
    path = str(d / "tv26.pth")
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        convert_weights(path, progress=False)
    assert any(path in m and "MB" in m for m in (rec.getMessage() for rec in caplog.records))
    src = read_weights_file(path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        convert_weights(path, source=src, progress=False)
    assert not any("MB" in rec.getMessage() for rec in caplog.records)


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


def test_detector_convention_metadata_takes_the_stride_from_the_config_and_names_its_origin(tv26):
    """A detector file that does not tell its stride placement takes the config's
    (``assume``: the model being loaded); without a config architecture it records none
    (not an error). The record names where the file comes from (its provenance)."""
    from resnext_det.checkpoint.layout import detector_convention

    _, _, r = tv26
    found = detector_convention(detector_trunk_tensors(r), {})
    assert found.arch is not None and found.stride_in_1x1 is None
    for stride in (True, False):
        assume = WeightsMetadata(kind="detector", input=None, arch=r.metadata.arch.replace(stride_in_1x1=stride))
        m = found.metadata(assume=assume)
        assert m.arch.stride_in_1x1 is stride and m.arch.cardinality == r.metadata.arch.cardinality
        assert m.source == {"origin": found.origin} and found.origin
    assert found.metadata(assume=WeightsMetadata(kind="detector", input=None, arch=None)).arch is None


def detector_trunk_tensors(r):
    """``r``'s backbone as the trunk of an FPN detector (Detectron2 names)."""
    return {f"backbone.bottom_up.{k}": v for k, v in r.state_dict.items()}


def test_caffe2_convention_message_names_the_zoo_folders_as_written(tmp_path):
    """Without --convention, a Caffe2 file's message names each convention flag with the
    folder of the zoo files it fits, spelled as docs/weights.md (and the zoo URLs) spell
    them (case matters in a URL), and points to docs/weights.md."""
    from resnext_det.checkpoint.convert import _resolve_convention
    from resnext_det.checkpoint.readers import SourceWeights

    with pytest.raises(ConversionError) as e:
        _resolve_convention("caffe2", SourceWeights("R-26.pkl", "pickle"), None)
    msg = str(e.value)
    # docs/weights.md's table: detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl,
    # Detectron's ImageNetPretrained/20171220/X-101-32x8d.pkl, .../ImageNetPretrained/MSRA/R-50.pkl
    # (docs/ is not copied into mutmut's tree: the spellings are written here).
    for flag, folder in (("fair", "ImageNetPretrained/FAIR/"), ("detectron1", "ImageNetPretrained/20171220/"),
                         ("msra", "ImageNetPretrained/MSRA/R-")):
        assert folder in msg and names(msg, flag)
    assert "docs/weights.md" in msg and names(msg, "--convention") and "BGR" in msg


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
