# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""tools/benchmark.py: it compares the same network, and its CLI runs end to end.

No timing assertions: only that the numbers exist, are consistent, and that the
"built-in" contender really is Detectron2's own ResNeXt computing what ours does.
"""
import json
import os
import sys

import pytest
import torch

import resnext_det  # noqa: F401  registrations
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import BottleneckBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402

# One torch thread for every test of this module (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = [
    "MODEL.RESNEXT.PRESET", "",
    "MODEL.RESNEXT.DEPTH", "50",
    "MODEL.RESNEXT.CARDINALITY", "2",
    "MODEL.RESNEXT.BOTTLENECK_WIDTH", "4",
    "MODEL.RESNEXT.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNEXT.RES2_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
]  # fmt: skip


def test_builtin_contender_is_detectron2_resnext_with_our_weights():
    """The baseline is Detectron2's BottleneckBlock network, and with our weights
    it computes our backbone's features (form c = the built-in grouped conv)."""
    cfg = benchmark.our_cfg(os.path.join(ROOT, "configs/Base-ResNeXt-FPN.yaml"), TINY, "cpu")
    cfg.MODEL.RESNEXT.NORM = "BN"  # with random statistics below
    cfg.MODEL.BACKBONE.NAME = "build_resnext_backbone"
    bcfg = benchmark.builtin_cfg(cfg)
    assert bcfg.MODEL.BACKBONE.NAME == "build_resnet_backbone"
    assert (bcfg.MODEL.RESNETS.NUM_GROUPS, bcfg.MODEL.RESNETS.WIDTH_PER_GROUP) == (2, 4)
    ours = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    builtin = build_backbone(bcfg, ShapeSpec(channels=3)).eval()
    assert sum(isinstance(m, BottleneckBlock) for m in builtin.modules()) == 16  # depth 50
    benchmark.copy_weights(builtin, ours)  # strict: same names, same shapes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), builtin(x)
    assert set(a) == set(b) == {"res2", "res3", "res4", "res5"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_builtin_cfg_refuses_depths_detectron2_lacks():
    cfg = benchmark.our_cfg(
        os.path.join(ROOT, "configs/Base-ResNeXt-FPN.yaml"),
        TINY + ["MODEL.RESNEXT.STAGE_BLOCKS", "[1, 1, 1, 1]"],
        "cpu",
    )
    with pytest.raises(ValueError, match="MODEL.RESNEXT.DEPTH"):
        benchmark.builtin_cfg(cfg)


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--what", "backbone,speed"])
    assert "--what" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--archs", "retina"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--overhead-depths", "26"])


def test_cli_smoke_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--what", "backbone,detector,inference,proposals,overhead",
        "--archs", "fpn",
        "--repeats", "1", "--warmup", "0", "--threads", "1",
        "--size", "64", "--backbone-size", "64", "--overhead-size", "32",
        "--overhead-depths", "50",
        "--no-ablation", "--no-torchvision", "--no-memory",
        "--json", str(out), "--markdown", str(tmp_path / "bench.md"),
        *TINY,
    ]  # fmt: skip
    benchmark.main(argv)
    printed = capsys.readouterr().out
    assert "== detector ==" in printed and "machine:" in printed
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert set(data["sections"]) == {"backbone", "detector", "inference", "proposals", "overhead"}
    for section in ("backbone", "detector", "inference", "proposals"):
        rows = {r["contender"]: r for r in data["sections"][section] if r.get("mode") != "forward"}
        assert {"d2-builtin fp32", "ours fp32", "ours fast"} <= set(rows), section
        base = rows["d2-builtin fp32"]
        assert base["speedup_vs_builtin"] == pytest.approx(1.0)
        for r in rows.values():
            assert r["median_s"] > 0 and len(r["times_s"]) == 1
            assert r["peak_mem_mb"] is None  # --no-memory
            # images/s and the ratio follow from the times.
            assert r["speedup_vs_builtin"] == pytest.approx(base["median_s"] / r["median_s"])
    md = (tmp_path / "bench.md").read_text()
    assert "| fpn | ours fast |" in md and "**overhead**" in md
    over = {r["contender"]: r for r in data["sections"]["overhead"]}
    x, rn = over["ResNeXt-50 32x4d fp32"], over["ResNet-50 1x64d fp32"]
    assert x["overhead_vs_resnet"] == pytest.approx(x["median_s"] / rn["median_s"])


def test_cpu_peak_memory_counts_live_tensors():
    """The CPU memory method sees PyTorch's allocations: 8 MB + 8 MB live at the
    peak (the first 4 MB tensor is freed before), whatever was allocated before."""
    keep = torch.ones(3_000_000)  # held before the run: not counted  # noqa: F841

    def fn():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB
        del a
        c = b + 1  # 8 MB
        return c.sum()

    assert benchmark._cpu_peak_tensor_mb(fn) == pytest.approx(16e6 / 2**20, rel=0.02)
