"""The ResNeXt backbone against independent references: torchvision's models,
Detectron2's built-in ResNet, the paper's numbers and a hand-built C-path block."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from fvcore.nn import FlopCountAnalysis
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.roi_heads import Res5ROIHeads

import resnext_det
from resnext_det import PRESETS, ResNeXtBlock, ResNeXtRes5ROIHeads, add_resnext_config
from resnext_det.modeling import ResNeXtSpec, ResNeXtSpecError
from resnext_det.presets import preset_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_STAGES = ["res2", "res3", "res4", "res5"]


def make_cfg(**resnext):
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnext_backbone"
    cfg.MODEL.RESNEXT.OUT_FEATURES = list(ALL_STAGES)
    for k, v in resnext.items():
        cfg.MODEL.RESNEXT[k] = v
    return cfg


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm random affine parameters and statistics, so that a
    comparison would notice a wrongly mapped or missing BN."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "running_mean") and m.running_mean is not None:
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def set_form(model: nn.Module, form: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, ResNeXtBlock):
            m.form = form
    return model


# --------------------------------------------------------------------------
# Parameter counts and FLOPs: torchvision and the paper.
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,tv_name,expected_with_fc",
    [
        ("X-50-32x4d", "resnext50_32x4d", 25_028_904),
        ("X-101-32x8d", "resnext101_32x8d", 88_791_336),
        ("X-101-64x4d", "resnext101_64x4d", 83_455_272),
    ],
)
def test_parameter_count_equals_torchvision(preset, tv_name, expected_with_fc):
    fc = 2048 * 1000 + 1000  # PAPER.md: the fc layer is 2048*1000+1000
    with torch.device("meta"):
        ours = build_backbone(make_cfg(PRESET=preset, NORM="BN", FREEZE_AT=0))
        tv = getattr(torchvision.models, tv_name)()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_tv = sum(p.numel() for p in tv.parameters())
    assert n_tv == expected_with_fc  # the reference itself, as PAPER.md lists it
    assert n_ours == n_tv - fc


def _flops(model, size=224):
    f = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, size, size))
    f.unsupported_ops_warnings(False)
    f.uncalled_modules_warnings(False)
    return f


def test_flops_of_x50_32x4d_match_paper_and_torchvision():
    ours = _flops(build_backbone(make_cfg(PRESET="X-50-32x4d", OUT_FEATURES=["res5"])))
    tv = _flops(torchvision.models.resnext50_32x4d())
    # Paper, Table 1/3: 4.2 GFLOPs (multiply-adds), for the whole network.
    assert abs(ours.total() / 1e9 - 4.2) / 4.2 < 0.02
    # Same convolutions as torchvision's trunk (its fc is 2 MFLOPs more).
    assert ours.by_operator()["conv"] == tv.by_operator()["conv"]
    assert abs(tv.by_operator()["conv"] / 1e9 - 4.23) < 0.005


def test_table2_settings_have_equal_complexity():
    """Table 2: 1x64d, 2x40d, 4x24d, 8x14d, 32x4d keep complexity ~constant."""
    counts = {}
    widths = {}
    for name in ("1x64d", "2x40d", "4x24d", "8x14d", "32x4d"):
        with torch.device("meta"):
            m = build_backbone(make_cfg(PRESET=name, NORM="BN", FREEZE_AT=0))
        counts[name] = sum(p.numel() for p in m.parameters())
        widths[name] = m.res2[0].conv2.weight.shape[0]
    # The paper's group-conv widths for these settings (Table 2).
    assert widths == {"1x64d": 64, "2x40d": 80, "4x24d": 96, "8x14d": 112, "32x4d": 128}
    ref = counts["1x64d"]  # ResNet-50 trunk
    assert abs(ref + 2049000 - 25.5e6) / 25.5e6 < 0.01  # Table 3: ResNet-50 25.5M
    for name, n in counts.items():
        assert abs(n - ref) / ref < 0.03, (name, n, ref)


def test_presets_name_the_paper_models():
    assert PRESETS["X-101-64x4d"] == (101, 64, 4)
    spec = ResNeXtSpec.from_config(make_cfg(PRESET="X-152-32x8d"))
    assert spec.stage_blocks == (3, 8, 36, 3) and spec.depth == 152
    assert ResNeXtSpec.from_config(make_cfg(DEPTH=101)).stage_blocks == (3, 4, 23, 3)
    assert ResNeXtSpec.from_config(make_cfg(PRESET="X-50-32x4d")).depth == 50


# --------------------------------------------------------------------------
# Detectron2's built-in ResNet with NUM_GROUPS x WIDTH_PER_GROUP = C x d.
# --------------------------------------------------------------------------
def _builtin_resnet(c, d, depth, norm="BN", out_features=ALL_STAGES, stride_in_1x1=False, res5_dilation=1):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.RES5_DILATION = res5_dilation
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NUM_GROUPS = c
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = d
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    cfg.MODEL.RESNETS.OUT_FEATURES = list(out_features)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("stride_in_1x1,res5_dilation", [(False, 1), (True, 1), (False, 2)])
def test_form_c_equals_detectron2_builtin_resnext(stride_in_1x1, res5_dilation):
    builtin = randomize_bn(_builtin_resnet(8, 4, 50, stride_in_1x1=stride_in_1x1,
                                           res5_dilation=res5_dilation)).eval()  # fmt: skip
    ours = build_backbone(
        make_cfg(DEPTH=50, CARDINALITY=8, BOTTLENECK_WIDTH=4, NORM="BN", FREEZE_AT=0,
                 STRIDE_IN_1X1=stride_in_1x1, RES5_DILATION=res5_dilation)
    ).eval()
    # Same state-dict keys and shapes: a Detectron2 ResNeXt checkpoint loads unchanged.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in builtin.state_dict().items()
    }
    ours.load_state_dict(builtin.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        a, b = ours(x), builtin(x)
    for name in ALL_STAGES:
        assert a[name].shape == b[name].shape
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    assert ours.output_shape() == builtin.output_shape()


@pytest.mark.parametrize("res5_dilation", [1, 2])
def test_res5_head_matches_detectron2_res5_head(res5_dilation):
    """The C4 head's res5 is Detectron2's: stride 2 in its first block, no dilation, whatever
    RES5_DILATION says (that key is for trunks that compute res5, e.g. DeepLab-style; the head
    pools res4 at stride 16 and must reach 32). A 14x14 RoI feature comes out 7x7."""
    cfg = make_cfg(DEPTH=50, CARDINALITY=4, BOTTLENECK_WIDTH=8, NORM="BN", RES5_DILATION=res5_dilation)
    cfg.MODEL.RESNETS.NUM_GROUPS, cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4, 8
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # Detectron2's default is True (MSRA weights)
    cfg.MODEL.RESNETS.RES5_DILATION = res5_dilation  # which Detectron2's head does not read
    ours, ch = ResNeXtRes5ROIHeads._build_res5_block(cfg)
    ref, ch_ref = Res5ROIHeads._build_res5_block(cfg)
    assert ch == ch_ref == 2048
    randomize_bn(ref).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(3, 1024, 14, 14)
    with torch.no_grad():
        y = ours(x)
        assert y.shape == (3, 2048, 7, 7)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


def test_models_register_with_detectron2():
    from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY

    for name in ("build_resnext_backbone", "build_resnext_fpn_backbone",
                 "build_resnext_retinanet_fpn_backbone"):
        assert BACKBONE_REGISTRY.get(name) is getattr(resnext_det, name)
    assert ROI_HEADS_REGISTRY.get("ResNeXtRes5ROIHeads") is ResNeXtRes5ROIHeads


@pytest.mark.parametrize(
    "builder,expected",
    [
        ("build_resnext_fpn_backbone", {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}),
        ("build_resnext_retinanet_fpn_backbone", {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}),
    ],
)
def test_fpn_variants(builder, expected):
    cfg = make_cfg(DEPTH=26, CARDINALITY=4, BOTTLENECK_WIDTH=4)
    cfg.MODEL.BACKBONE.NAME = builder
    if "retinanet" in builder:
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    else:
        cfg.MODEL.FPN.IN_FEATURES = list(ALL_STAGES)
    m = build_backbone(cfg).eval()
    assert {k: v.stride for k, v in m.output_shape().items()} == expected
    with torch.no_grad():
        out = m(torch.randn(1, 3, 128, 128))
    for k, s in expected.items():
        assert out[k].shape == (1, 256, 128 // s if s <= 128 else 1, 128 // s if s <= 128 else 1)


def test_c4_backbone_builds_only_up_to_res4_and_freezes():
    m = build_backbone(make_cfg(DEPTH=26, CARDINALITY=4, BOTTLENECK_WIDTH=4,
                                OUT_FEATURES=["res4"], FREEZE_AT=2))
    assert not hasattr(m, "res5")
    assert m.output_shape()["res4"].stride == 16 and m.output_shape()["res4"].channels == 1024
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert frozen == {"stem", "res2"} and trainable == {"res3", "res4"}


def test_res5_dilation_keeps_stride_16():
    m = build_backbone(make_cfg(DEPTH=26, CARDINALITY=2, BOTTLENECK_WIDTH=4, RES5_DILATION=2))
    assert m.output_shape()["res5"].stride == 16
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64))["res5"].shape[-1] == 4


def test_custom_widths_and_stage_blocks():
    m = build_backbone(make_cfg(STAGE_BLOCKS=[1, 2, 1, 1], CARDINALITY=3, BOTTLENECK_WIDTH=5,
                                STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=64))
    assert [len(getattr(m, s)) for s in ALL_STAGES] == [1, 2, 1, 1]
    assert m.stem.conv1.weight.shape[0] == 32
    # C*d doubles per stage (15, 30, 60, 120), outputs 64, 128, 256, 512.
    assert [getattr(m, s)[0].conv2.weight.shape[0] for s in ALL_STAGES] == [15, 30, 60, 120]
    assert [m.output_shape()[s].channels for s in ALL_STAGES] == [64, 128, 256, 512]
    assert m.res3[0].conv2.groups == 3


# --------------------------------------------------------------------------
# The block: the paper's equation, and the three forms of Fig. 3.
# --------------------------------------------------------------------------
def test_block_is_sum_of_c_explicit_paths():
    """Eq. (3): y = relu(x + BN(sum_i T_i(x))), T_i built here by hand from plain
    nn.Conv2d / nn.BatchNorm2d, independent of the block's code."""
    C, d, cin, cout = 3, 4, 16, 16
    block = randomize_bn(ResNeXtBlock(cin, cout, cardinality=C, bottleneck_width=d, norm="BN"), 1)
    block.eval()
    x = torch.randn(2, cin, 9, 9)
    bn1, bn2, bn3 = block.conv1.norm, block.conv2.norm, block.conv3.norm

    def bn(m, t, sl):  # eval-mode BN of channels `sl`
        return F.batch_norm(t, m.running_mean[sl], m.running_var[sl], m.weight[sl], m.bias[sl],
                            False, 0.0, m.eps)

    total = 0
    for i in range(C):
        sl = slice(i * d, (i + 1) * d)
        c1 = nn.Conv2d(cin, d, 1, bias=False)
        c1.weight.data = block.conv1.weight[sl].clone()
        c2 = nn.Conv2d(d, d, 3, padding=1, bias=False)
        c2.weight.data = block.conv2.weight[sl].clone()
        c3 = nn.Conv2d(d, cout, 1, bias=False)
        c3.weight.data = block.conv3.weight[:, sl].clone()
        h = F.relu(bn(bn1, c1(x), sl))
        h = F.relu(bn(bn2, c2(h), sl))
        total = total + c3(h)
    expected = F.relu(x + bn(bn3, total, slice(None)))
    for form in "abc":
        block.form = form
        with torch.no_grad():
            torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "GN", ""])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forms_a_b_c_agree_on_outputs_and_gradients(norm, mode):
    cfg = make_cfg(DEPTH=26, CARDINALITY=4, BOTTLENECK_WIDTH=8, NORM=norm, FREEZE_AT=0)
    base = build_backbone(cfg)
    if norm in ("BN", "FrozenBN"):
        randomize_bn(base, 3)
    # float64, so that the different summation orders of the forms stay far below
    # the tolerance and any real difference shows.
    base = base.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results = {}
    for form in "abc":
        m = set_form(copy.deepcopy(base), form)
        m.train(mode == "train")
        out = m(x)
        loss = sum((v * (i + 1)).square().mean() for i, v in enumerate(out.values()))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results[form] = (out, grads, {k: v.clone() for k, v in m.state_dict().items()})
    out_c, grads_c, state_c = results["c"]
    assert len(grads_c) == len(list(base.parameters()))
    for form in "ab":
        out, grads, state = results[form]
        for k in out_c:
            torch.testing.assert_close(out[k], out_c[k], rtol=1e-9, atol=1e-10)
        assert grads.keys() == grads_c.keys()
        for k in grads_c:
            torch.testing.assert_close(grads[k], grads_c[k], rtol=1e-8, atol=1e-10)
        # train-mode BN updates the same running statistics in every form
        for k in state_c:
            torch.testing.assert_close(state[k].double(), state_c[k].double(), rtol=1e-9, atol=1e-10)


def test_forms_share_state_dict_keys():
    keys = {}
    for form in "abc":
        keys[form] = build_backbone(make_cfg(DEPTH=26, CARDINALITY=2, BOTTLENECK_WIDTH=4,
                                             BLOCK_FORM=form)).state_dict().keys()
    assert keys["a"] == keys["b"] == keys["c"]
    assert "res2.0.conv1.norm.running_mean" in keys["a"] and "res2.0.shortcut.weight" in keys["a"]
    assert "stem.conv1.weight" in keys["a"]


def test_block_form_config_key_selects_form():
    m = build_backbone(make_cfg(DEPTH=26, CARDINALITY=2, BOTTLENECK_WIDTH=4, BLOCK_FORM="a"))
    assert {b.form for b in m.modules() if isinstance(b, ResNeXtBlock)} == {"a"}


# --------------------------------------------------------------------------
# Errors name the config key and the allowed values.
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,must_say",
    [
        (dict(CARDINALITY=0), ["MODEL.RESNEXT.CARDINALITY", ">= 1"]),
        (dict(BOTTLENECK_WIDTH=-4), ["MODEL.RESNEXT.BOTTLENECK_WIDTH", ">= 1"]),
        (dict(DEPTH=77), ["MODEL.RESNEXT.DEPTH", "26, 38, 50, 101, 152", "STAGE_BLOCKS"]),
        (dict(BLOCK_FORM="d"), ["MODEL.RESNEXT.BLOCK_FORM", "'a', 'b', 'c'"]),
        (dict(OUT_FEATURES=["res6"]), ["MODEL.RESNEXT.OUT_FEATURES", "res5"]),
        (dict(OUT_FEATURES=[]), ["MODEL.RESNEXT.OUT_FEATURES"]),
        (dict(STAGE_BLOCKS=[3, 4]), ["MODEL.RESNEXT.STAGE_BLOCKS", "4 positive"]),
        (dict(NORM="batchnorm"), ["MODEL.RESNEXT.NORM", "FrozenBN"]),
        (dict(RES5_DILATION=3), ["MODEL.RESNEXT.RES5_DILATION", "1 or 2"]),
        (dict(FREEZE_AT=9), ["MODEL.RESNEXT.FREEZE_AT"]),
        (dict(PRESET="X-77-1x1d"), ["MODEL.RESNEXT.PRESET", "X-101-32x8d"]),
        (dict(PRESET="X-101-64x4d", CARDINALITY=8), ["PRESET", "MODEL.RESNEXT.CARDINALITY = 8"]),
        (dict(NORM="GN", CARDINALITY=2, BOTTLENECK_WIDTH=40), ["MODEL.RESNEXT.NORM", "32"]),
    ],
)
def test_bad_values_name_the_key(override, must_say):
    with pytest.raises(ValueError) as e:
        build_backbone(make_cfg(**override))
    for text in must_say:
        assert text in str(e.value), str(e.value)


# --------------------------------------------------------------------------
# ResNeXtSpec: each field refused past its boundary and accepted at it, with the message the
# README gives ("MODEL.RESNEXT.CARDINALITY = 0 is not valid: the paper's C must be an integer
# >= 1 (e.g. 32)."), written out here by hand.
# --------------------------------------------------------------------------
def _spec(**fields):
    return ResNeXtSpec(**{"stage_blocks": (1, 1, 1, 1), "cardinality": 2, "bottleneck_width": 4, **fields})


_POSITIVE = "must be a positive integer"
_BLOCKS = "give 4 positive block counts for res2..res5"
_FREEZE = "choose 0 (train all) .. 5 (freeze stem and res2..res5)"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("cardinality", 0, "CARDINALITY = 0 is not valid: the paper's C must be an integer >= 1 (e.g. 32)."),
        ("cardinality", True, "CARDINALITY = True is not valid: the paper's C must be an integer >= 1 (e.g. 32)."),
        ("cardinality", 32.0, "CARDINALITY = 32.0 is not valid: the paper's C must be an integer >= 1 (e.g. 32)."),
        ("bottleneck_width", 0, "BOTTLENECK_WIDTH = 0 is not valid: the paper's d must be an integer >= 1 (e.g. 4)."),
        ("stage_blocks", (3, 4, 0, 3), f"STAGE_BLOCKS = (3, 4, 0, 3) is not valid: {_BLOCKS}."),
        ("stage_blocks", (3, 4, 6.5, 3), f"STAGE_BLOCKS = (3, 4, 6.5, 3) is not valid: {_BLOCKS}."),
        ("stage_blocks", 5, f"STAGE_BLOCKS = 5 is not valid: {_BLOCKS}."),
        ("form", "d", "BLOCK_FORM = 'd' is not valid: choose one of ['a', 'b', 'c'] (Fig. 3)."),
        ("norm", "batchnorm", "NORM = 'batchnorm' is not valid: choose one of "
                              "['FrozenBN', 'BN', 'SyncBN', 'GN', 'nnSyncBN', 'naiveSyncBN', 'LN', '']."),
        ("stem_out_channels", 0, f"STEM_OUT_CHANNELS = 0 is not valid: {_POSITIVE}."),
        ("stem_out_channels", 2.5, f"STEM_OUT_CHANNELS = 2.5 is not valid: {_POSITIVE}."),
        ("res2_out_channels", 0, f"RES2_OUT_CHANNELS = 0 is not valid: {_POSITIVE}."),
        ("res5_dilation", 3, "RES5_DILATION = 3 is not valid: choose 1 or 2."),
        ("out_features", ("res6",), "OUT_FEATURES = ('res6',) is not valid: name one or more of "
                                    "['stem', 'res2', 'res3', 'res4', 'res5']."),
        ("out_features", 4, "OUT_FEATURES = 4 is not valid: name one or more of "
                            "['stem', 'res2', 'res3', 'res4', 'res5']."),
        ("freeze_at", 6, f"FREEZE_AT = 6 is not valid: {_FREEZE}."),
        ("freeze_at", -1, f"FREEZE_AT = -1 is not valid: {_FREEZE}."),
    ],
)  # fmt: skip
def test_spec_refuses_each_bad_field_in_the_readmes_words(field, value, message):
    with pytest.raises(ResNeXtSpecError) as e:
        _spec(**{field: value})
    assert str(e.value) == "MODEL.RESNEXT." + message


def test_spec_accepts_each_fields_boundary_and_normalises_its_types():
    """1 is a valid C, d and width, 0 and 5 valid FREEZE_ATs; lists become tuples and 0/1 become
    bools, so that a spec from a yaml (lists), a LazyConfig or Python is the same, hashable value."""
    s = _spec(stage_blocks=[1, 1, 1, 1], cardinality=1, bottleneck_width=1, stem_out_channels=1,
              res2_out_channels=1, freeze_at=5, out_features=["stem", "res5"], stride_in_1x1=1,
              channels_last=0)  # fmt: skip
    assert type(s.stage_blocks) is tuple and type(s.out_features) is tuple
    assert s.stride_in_1x1 is True and s.channels_last is False
    same = _spec(stage_blocks=(1, 1, 1, 1), cardinality=1, bottleneck_width=1, stem_out_channels=1,
                 res2_out_channels=1, freeze_at=5, out_features=("stem", "res5"), stride_in_1x1=True,
                 channels_last=False)  # fmt: skip
    assert s == same and hash(s) == hash(same)
    assert _spec(freeze_at=0).freeze_at == 0 and _spec(channels_last=1).channels_last is True


def test_group_norm_check_covers_each_normalised_width():
    """GN splits channels into 32 groups: the stem, each stage's C*d and each stage's output must
    be multiples of 32 (doubling keeps a multiple a multiple, so the res2 widths decide)."""
    _spec(norm="GN", cardinality=8, bottleneck_width=4, stem_out_channels=32, res2_out_channels=32)
    tail = "not a multiple of 32: change that key or the norm."
    for fields, what, c in (
        (dict(stem_out_channels=48), "MODEL.RESNEXT.STEM_OUT_CHANNELS", 48),
        (dict(cardinality=12), "MODEL.RESNEXT.CARDINALITY x MODEL.RESNEXT.BOTTLENECK_WIDTH (C*d of res2, "
                               "doubled per stage)", 48),
        (dict(res2_out_channels=48), "MODEL.RESNEXT.RES2_OUT_CHANNELS (doubled per stage)", 48),
    ):  # fmt: skip
        good = dict(norm="GN", cardinality=8, bottleneck_width=4, stem_out_channels=32, res2_out_channels=32)
        with pytest.raises(ResNeXtSpecError) as e:
            _spec(**{**good, **fields})
        assert str(e.value) == (f"MODEL.RESNEXT.NORM = 'GN' splits channels into 32 groups, but {what} "
                                f"gives {c} channels, {tail}")  # fmt: skip


def test_spec_from_config_reads_every_key_and_names_bad_ones():
    with pytest.raises(ResNeXtSpecError) as e:
        ResNeXtSpec.from_config(make_cfg(DEPTH=77))
    assert str(e.value) == ("MODEL.RESNEXT.DEPTH = 77 is not valid: choose one of [26, 38, 50, 101, 152], "
                            "or set MODEL.RESNEXT.STAGE_BLOCKS to 4 block counts for a custom depth.")  # fmt: skip
    with pytest.raises(ResNeXtSpecError) as e:
        ResNeXtSpec.from_config(make_cfg(PRESET="X-77-1x1d"))
    assert str(e.value).startswith("MODEL.RESNEXT.PRESET = 'X-77-1x1d' is not valid: choose one of [")
    assert ResNeXtSpec.from_config(make_cfg(CHANNELS_LAST=True)).channels_last is True
    cfg = make_cfg()
    del cfg.MODEL.RESNEXT["CHANNELS_LAST"]  # a config written before the key existed
    assert ResNeXtSpec.from_config(cfg).channels_last is False
    spec = ResNeXtSpec.from_config(make_cfg(PRESET="X-50-32x4d", NORM="GN", BLOCK_FORM="b", FREEZE_AT=3,
                                            STRIDE_IN_1X1=True, RES5_DILATION=2, OUT_FEATURES=["res3"],
                                            STEM_OUT_CHANNELS=64, RES2_OUT_CHANNELS=256))  # fmt: skip
    assert spec == ResNeXtSpec(stage_blocks=(3, 4, 6, 3), cardinality=32, bottleneck_width=4, form="b", norm="GN",
                               stride_in_1x1=True, res5_dilation=2, out_features=("res3",), freeze_at=3)  # fmt: skip


def test_spec_names_describes_replaces_and_compares_shapes():
    x101 = ResNeXtSpec.from_preset("X-101-32x8d", norm="GN", freeze_at=0)
    assert (x101.stage_blocks, x101.cardinality, x101.bottleneck_width) == ((3, 4, 23, 3), 32, 8)
    assert (x101.norm, x101.freeze_at, x101.preset, x101.standard_depth, x101.depth) == ("GN", 0, "X-101-32x8d", 101, 101)
    assert x101.describe() == "X-101-32x8d (blocks [3, 4, 23, 3], C=32, d=8, stem 64, res2 256 channels)"
    with pytest.raises(ResNeXtSpecError, match=r"^MODEL.RESNEXT.PRESET = 'X-77' is not valid: choose one of \["):
        ResNeXtSpec.from_preset("X-77")
    tiny = _spec(stem_out_channels=32, res2_out_channels=64)
    assert (tiny.preset, tiny.standard_depth) == ("", None)
    assert tiny.describe() == "depth 14 (blocks [1, 1, 1, 1], C=2, d=4, stem 32, res2 64 channels)"
    # By default preset_name assumes the paper's widths (stem 64, res2 256).
    assert preset_name([3, 4, 6, 3], 32, 4) == "X-50-32x4d" and preset_name([3, 4, 23, 3], 1, 64) == "R-101"
    assert preset_name([3, 4, 6, 3], 32, 4, stem_out_channels=32) == ""
    # The paper's X-50-32x4d with other widths has no name; with its own it has.
    assert _spec(stage_blocks=(3, 4, 6, 3), cardinality=32, stem_out_channels=32).preset == ""
    assert _spec(stage_blocks=(3, 4, 6, 3), cardinality=32).preset == "X-50-32x4d"
    assert tiny.replace(cardinality=4) == _spec(cardinality=4, stem_out_channels=32, res2_out_channels=64)
    with pytest.raises(ResNeXtSpecError, match="CARDINALITY = 0"):
        tiny.replace(cardinality=0)
    # Weights fit whatever the form, norm, stride placement, dilation, outputs or freezing ...
    assert tiny.same_shapes(tiny.replace(form="a", norm="BN", stride_in_1x1=True, res5_dilation=2,
                                         out_features=("res5",), freeze_at=0, channels_last=True))  # fmt: skip
    # ... and not across any of the five fields that shape the tensors.
    for change in (dict(stage_blocks=(1, 1, 2, 1)), dict(cardinality=4), dict(bottleneck_width=8),
                   dict(stem_out_channels=64), dict(res2_out_channels=128)):  # fmt: skip
        assert not tiny.same_shapes(tiny.replace(**change)), change


def test_fpn_needs_features_from_backbone():
    cfg = make_cfg(DEPTH=26, CARDINALITY=2, BOTTLENECK_WIDTH=4, OUT_FEATURES=["res4"])
    cfg.MODEL.BACKBONE.NAME = "build_resnext_fpn_backbone"
    with pytest.raises(ValueError, match="MODEL.FPN.IN_FEATURES is empty"):
        build_backbone(cfg)
    cfg.MODEL.FPN.IN_FEATURES = list(ALL_STAGES)
    with pytest.raises(ValueError, match=r"add \['res2', 'res3', 'res5'\] to MODEL.RESNEXT.OUT_FEATURES"):
        build_backbone(cfg)


def test_import_without_detectron2_says_how_to_install():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'detectron2' or name.startswith('detectron2.'):\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, Block())\n"
        "import resnext_det\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "make setup" in r.stderr and "detectron2" in r.stderr


# --------------------------------------------------------------------------
# Defaults and trims that the configs above always set explicitly.
# --------------------------------------------------------------------------
def test_block_built_with_its_defaults_equals_torchvision_bottleneck():
    """``ResNeXtBlock`` built directly, with no ``stride_in_1x1``, strides its 3x3 conv as
    torchvision's ``Bottleneck`` does (the docstring's default): same weights, same
    outputs. A block striding its 1x1 by default gives other values at the same shape."""
    from torchvision.models.resnet import Bottleneck

    # torchvision: width = planes * base_width / 64 * groups = 8 * 64/64 * 2 = 16 = C*d.
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    tv = randomize_bn(Bottleneck(16, 8, stride=2, downsample=down, groups=2, base_width=64), 3)
    ours = ResNeXtBlock(16, 32, cardinality=2, bottleneck_width=8, stride=2, norm="BN")
    rename = {"conv1.": "conv1.", "bn1.": "conv1.norm.", "conv2.": "conv2.", "bn2.": "conv2.norm.",
              "conv3.": "conv3.", "bn3.": "conv3.norm.", "downsample.0.": "shortcut.",
              "downsample.1.": "shortcut.norm."}  # fmt: skip
    sd = {}
    for k, v in tv.state_dict().items():
        prefix = next(p for p in rename if k.startswith(p))
        sd[rename[prefix] + k[len(prefix):]] = v
    ours.load_state_dict(sd, strict=True)
    tv.eval(), ours.eval()
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


def test_channels_last_backbone_runs_nhwc_and_matches_nchw():
    """CHANNELS_LAST: the input is made NHWC before the stem, so the activations are
    channels-last (torch's memory format) and the values those of the NCHW model."""
    kw = dict(DEPTH=26, CARDINALITY=2, BOTTLENECK_WIDTH=4, FREEZE_AT=0)
    nchw = randomize_bn(build_backbone(make_cfg(**kw))).eval()
    nhwc = build_backbone(make_cfg(CHANNELS_LAST=True, **kw)).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(1, 3, 64, 64)  # an ordinary NCHW tensor, as Detectron2 hands it over
    with torch.no_grad():
        a, b = nchw(x), nhwc(x)
    for name in ALL_STAGES:
        assert b[name].is_contiguous(memory_format=torch.channels_last), name
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)


def test_each_form_computes_as_its_figure_and_keeps_the_dilation():
    """Fig. 3: (c) runs the grouped 3x3 conv (conv2) once; (b) runs C explicit 1x1-3x3 paths
    and ONE 1x1 (conv3) on their concatenation; (a) runs no shared conv at all, C 1x1s to
    `out` summed, then conv3's norm. Forward hooks count which modules run. A dilated block
    (res5 with RES5_DILATION 2) gives form (c)'s output in every form."""
    block = randomize_bn(ResNeXtBlock(16, 16, cardinality=4, bottleneck_width=2, dilation=2), 2).eval()
    calls = {}
    for name in ("conv1", "conv2", "conv3", "conv3.norm"):
        block.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x = torch.randn(1, 16, 11, 11)
    expected = {"c": {"conv1": 1, "conv2": 1, "conv3": 1, "conv3.norm": 1},
                "b": {"conv3": 1, "conv3.norm": 1},
                "a": {"conv3.norm": 1}}
    out = {}
    for form in "cba":
        calls.clear()
        block.form = form
        with torch.no_grad():
            out[form] = block(x)
        assert calls == expected[form], (form, calls)
    for form in "ab":
        torch.testing.assert_close(out[form], out["c"], rtol=1e-5, atol=1e-5)


def test_block_and_trunk_errors_say_what_they_take():
    """A block form outside Fig. 3's three, or an input that is not (N, C, H, W): a
    ConfigError naming the allowed forms / the expected shape and what was given."""
    from resnext_det.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        ResNeXtBlock(8, 8, cardinality=2, bottleneck_width=2, form="d")
    assert all(f"'{f}'" in str(e.value) for f in "abcd"), str(e.value)
    m = build_backbone(make_cfg(DEPTH=26, CARDINALITY=2, BOTTLENECK_WIDTH=4))
    with pytest.raises(ConfigError) as e:
        m(torch.randn(3, 32, 32))
    assert "(N, C, H, W)" in str(e.value) and "[3, 32, 32]" in str(e.value), str(e.value)
