# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""resnext_det.benchmark compares the same network, and tools/benchmark.py runs end to end.

No timing assertions: only that the numbers exist, are consistent, and that the
"built-in" contender really is Detectron2's own ResNeXt computing what ours does.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import BottleneckBlock
from resnext_det.benchmark import (
    BenchmarkSettings,
    builtin_cfg,
    config_files,
    copy_weights,
    cpu_peak_tensor_mb,
    measure_interleaved,
    our_cfg,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = config_files(os.path.join(ROOT, "configs"))
TOOL = os.path.join(ROOT, "tools", "benchmark.py")

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


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    """tools/benchmark.py as a user runs it, on one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, TOOL, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_builtin_contender_is_detectron2_resnext_with_our_weights():
    """The baseline is Detectron2's BottleneckBlock network, and with our weights
    it computes our backbone's features (form c = the built-in grouped conv)."""
    cfg = our_cfg(CONFIGS["fpn"], TINY, "cpu")
    cfg.MODEL.RESNEXT.NORM = "BN"  # with random statistics below
    cfg.MODEL.BACKBONE.NAME = "build_resnext_backbone"
    bcfg = builtin_cfg(cfg)
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
    copy_weights(builtin, ours)  # strict: same names, same shapes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), builtin(x)
    assert set(a) == set(b) == {"res2", "res3", "res4", "res5"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_builtin_cfg_refuses_depths_detectron2_lacks():
    cfg = our_cfg(CONFIGS["fpn"], TINY + ["MODEL.RESNEXT.STAGE_BLOCKS", "[1, 1, 1, 1]"], "cpu")
    with pytest.raises(ValueError, match="MODEL.RESNEXT.DEPTH"):
        builtin_cfg(cfg)


def test_settings_reject_bad_values_naming_the_flag():
    with pytest.raises(ValueError, match="--what"):
        BenchmarkSettings(what=["backbone", "speed"])
    with pytest.raises(ValueError, match="--archs"):
        BenchmarkSettings(archs=["retina"])
    with pytest.raises(ValueError, match="--overhead-depths"):
        BenchmarkSettings(overhead_depths=[26])
    with pytest.raises(ValueError, match="KEY VALUE"):
        BenchmarkSettings(opts=["MODEL.RESNEXT.DEPTH"])


@pytest.mark.parametrize(
    "argv, flag",
    [(["--what", "backbone,speed"], "--what"), (["--archs", "retina"], "--archs"),
     (["--overhead-depths", "26"], "--overhead-depths")],
)  # fmt: skip
def test_cli_rejects_bad_arguments(argv, flag):
    r = run_tool(*argv)
    assert r.returncode == 2, r.stderr  # argparse's usage error, before any model is built
    assert flag in r.stderr.splitlines()[-1]


def test_measure_interleaves_contenders_and_times_cpu():
    """Every round runs each contender before the next round starts (A B A B ...,
    warm-up rounds too); one time per repeat; CPU time is the process's: a
    contender that sleeps uses far less of it than one that computes."""
    calls = []

    def busy():
        calls.append("busy")
        t = time.process_time()
        while time.process_time() - t < 0.02:
            pass

    def sleep():
        calls.append("sleep")
        time.sleep(0.02)

    rows = measure_interleaved(
        {"busy": busy, "sleep": sleep}, device="cpu", images=2, repeats=3, warmup=1,
        baseline="busy", memory=False, label="test", log=lambda msg: None,
    )  # fmt: skip
    runs = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    assert runs == ["busy", "sleep"] * 4  # 1 warm-up + 3 timed rounds
    by = {r["contender"]: r for r in rows}
    for r in rows:
        assert len(r["times_s"]) == 3 and r["min_s"] <= r["median_s"] <= max(r["times_s"])
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
        assert r["peak_mem_mb"] is None
    assert by["busy"]["speedup_vs_builtin"] == pytest.approx(1.0)
    ratio = by["busy"]["median_s"] / by["sleep"]["median_s"]
    assert by["sleep"]["speedup_vs_builtin"] == pytest.approx(ratio)
    assert by["busy"]["cpu_s"] >= 0.015 and by["sleep"]["cpu_s"] < 0.5 * by["busy"]["cpu_s"]


def test_cli_smoke_json(tmp_path):
    out = tmp_path / "bench.json"
    r = run_tool(
        "--what", "backbone,detector,inference,proposals,overhead",
        "--archs", "fpn",
        "--repeats", "1", "--warmup", "0", "--threads", "1",
        "--size", "64", "--backbone-size", "64", "--overhead-size", "32",
        "--overhead-depths", "50",
        "--no-ablation", "--no-torchvision", "--no-memory",
        "--json", str(out), "--markdown", str(tmp_path / "bench.md"),
        *TINY,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    printed = r.stdout
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


def test_cli_says_what_it_measured_and_no_gpu_error_on_cpu(tmp_path):
    """Issue 15: the output and the JSON name the model, image size, batch, threads
    and device; on a CPU nothing says that a GPU is missing (the profiled memory run
    printed Kineto's "gpuGetDeviceCount failed" error)."""
    out = tmp_path / "bench.json"
    r = run_tool(
        "--what", "backbone", "--repeats", "2", "--warmup", "1", "--threads", "1",
        "--backbone-size", "64", "--no-torchvision", "--json", str(out), *TINY,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[:2]
    assert header[0].startswith("model: depth 50 (blocks [3, 4, 6, 3], C=2, d=4, stem 8, res2 16")
    assert "device cpu, 1 torch thread" in header[0] and "median of 2 after 1 warm-up" in header[0]
    assert header[1] == "images: backbone 2 x 64 px"
    assert "gpuGetDeviceCount" not in r.stderr and "ERROR" not in r.stderr
    assert "No CUDA runtime" not in r.stderr and "no CUDA device" not in r.stderr
    data = json.loads(out.read_text())
    setup = data["setup"]
    assert setup["model"].startswith("depth 50") and setup["preset"] == ""
    assert (setup["device"], setup["threads"], setup["batch"], setup["backbone_size"]) == ("cpu", 1, 2, 64)
    for r in data["sections"]["backbone"]:
        assert len(r["times_s"]) == 2 and r["peak_mem_mb"] > 0


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

    assert cpu_peak_tensor_mb(fn) == pytest.approx(16e6 / 2**20, rel=0.02)
