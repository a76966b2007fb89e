# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Deployment (resnext_det/export/, tools/export_model.py): every meta-architecture
of the project exports to TorchScript (tracing, scripting) and ONNX, and the file, read
back from disk, gives the eager model's detections on an image of another size.

The reference is always the eager model, run here through Detectron2's own entry
points (``GeneralizedRCNN.inference(do_postprocess=False)``, ``model(inputs)``), and
the exported files are run here with plain ``torch.jit.load`` / ``onnxruntime``, not
through the code under test. Models are tiny (1 block per stage, C=2, d=4, 16-channel
FPN) with random weights *and* random FrozenBN statistics, as a trained model has.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN, build_backbone, build_model

import resnext_det  # noqa: F401  registrations
from resnext_det import export as E
from resnext_det.export.exporter import _export_onnx_tracing, _quiet_export  # the exporter's internals
from resnext_det.data.shapes import render_image
from resnext_det.engine import setup_cfg
from resnext_det.errors import UserError
from resnext_det.presets import PRESETS

from weights_helpers import frozen_bn_as_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "MODEL.RESNEXT.PRESET", "",
    "MODEL.RESNEXT.STAGE_BLOCKS", "[1, 1, 1, 1]",
    "MODEL.RESNEXT.CARDINALITY", "2",
    "MODEL.RESNEXT.BOTTLENECK_WIDTH", "4",
    "MODEL.RESNEXT.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNEXT.RES2_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.RETINANET.NUM_CLASSES", "3",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    # random weights score every class ~equally: keep every detection, 20 per image
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "20",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "160",
    "MODEL.DEVICE", "cpu",
]  # fmt: skip

FAMILIES = {
    "faster_rcnn_C4": "COCO-Detection/faster_rcnn_X_50_32x4d_C4_1x.yaml",
    "faster_rcnn_FPN": "COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml",
    "mask_rcnn_C4": "COCO-InstanceSegmentation/mask_rcnn_X_50_32x4d_C4_1x.yaml",
    "mask_rcnn_FPN": "COCO-InstanceSegmentation/mask_rcnn_X_50_32x4d_FPN_1x.yaml",
    "retinanet": "COCO-Detection/retinanet_X_50_32x4d_FPN_1x.yaml",
    "cascade_mask_rcnn": "Misc/cascade_mask_rcnn_X_50_32x4d_FPN_1x.yaml",
    # Appendix B: the paper's C4 / RoIPool UnsharedRCNN, and the demo's FPN one, which
    # has the fast path on (FOLD_FROZEN_BN, CHANNELS_LAST, FAST_ROI_ALIGN, AMP)
    "unshared_C4_appendixB": "COCO-Detection/faster_rcnn_X_50_32x4d_C4_appendixB.yaml",
    "unshared_FPN_appendixB": "quickstart/faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml",
}
COMBOS = [("torchscript", "tracing"), ("torchscript", "scripting"), ("onnx", "tracing")]

# Measured on correct code (x86 CPU, fp32): TorchScript gives the eager numbers exactly
# (difference 0); onnxruntime differs by <= 1.6e-5 px in boxes and <= 1e-7 in scores and
# mask probabilities. The tolerances leave ~100x for other CPUs and kernels.
BOX_ATOL = 1e-3  # pixels
PROB_ATOL = 1e-5  # scores and mask probabilities


def _image(size=128, seed=0):
    return render_image(np.random.default_rng(seed), size=size)[0]


def _cfg(family, *extra):
    cfg = setup_cfg(os.path.join(ROOT, "configs", FAMILIES[family]), TINY + list(extra), freeze=False)
    cfg.OUTPUT_DIR = ""  # never pick up a model_final.pth of a real run
    return cfg


def _write_trained_like(cfg, path):
    """A detector checkpoint of ``cfg``'s architecture with random weights and random
    FrozenBN statistics, saved as a training run saves it."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        frozen_bn_as_trained(model)
        head = getattr(model, "head", None)
        if head is not None:  # RetinaNet: its std-0.01 init scores every anchor alike (ties)
            for conv in head.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    conv.weight.normal_(0, 0.1)
            head.cls_score.bias.normal_(-2.0, 0.5)
    torch.save({"model": model.state_dict()}, path)
    return path


_MODELS = {}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """(export cfg, eager model) of a family, built once per module: strict loading of a
    checkpoint through the exporter's own model assembly."""

    def get(family, *extra):
        key = (family,) + extra
        if key not in _MODELS:
            cfg = _cfg(family, *extra)
            weights = _write_trained_like(cfg, str(tmp_path_factory.mktemp(family) / "model_final.pth"))
            ecfg = E.export_config(cfg)
            _MODELS[key] = (ecfg, E.build_eager_model(ecfg, weights))
        return _MODELS[key]

    return get


def _eager(model, image):
    """The eager model's detections through Detectron2's own API (independent reference)."""
    inputs = [{"image": image}]
    with torch.no_grad():
        if isinstance(model, GeneralizedRCNN):  # what Detectron2 exports: before postprocessing
            inst = model.inference(inputs, do_postprocess=False)[0]
        else:  # RetinaNet, UnsharedRCNN: postprocessed at the input's own size
            inst = model(inputs)[0]["instances"]
    out = [inst.pred_boxes.tensor, inst.scores, inst.pred_classes]
    if inst.has("pred_masks"):
        out.append(inst.pred_masks)
    return [t.detach() for t in out]


def _run_file(path, image):
    """The exported file, read back from disk, run without resnext_det."""
    if path.endswith(".onnx"):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["image"]
        return [torch.from_numpy(o) for o in sess.run(None, {"image": image.numpy()})]
    with torch.no_grad():
        return list(torch.jit.load(path)(image))


def _assert_same_detections(ref, out):
    assert len(out) == len(ref)
    assert out[0].shape == ref[0].shape, f"{len(out[0])} detections, eager {len(ref[0])}"
    assert torch.equal(out[2].long(), ref[2].long()), "classes differ"
    torch.testing.assert_close(out[0], ref[0], atol=BOX_ATOL, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=PROB_ATOL, rtol=0)
    if len(ref) == 4:
        assert out[3].shape == ref[3].shape and ref[3].shape[1] == 1  # (N, 1, M, M) probabilities
        torch.testing.assert_close(out[3], ref[3], atol=PROB_ATOL, rtol=0)


def _cases():
    for family in FAMILIES:
        for fmt, method in COMBOS:
            if family == "cascade_mask_rcnn" and method == "scripting":
                continue  # refused: test_cascade_scripting_is_refused_in_one_line
            yield pytest.param(family, fmt, method, id=f"{family}-{fmt}-{method}")


# ------------------------------------------------------------------------- per model
@pytest.mark.parametrize("family,fmt,method", list(_cases()))
def test_export_reloaded_gives_eager_detections_on_another_size(family, fmt, method, family_model, tmp_path):
    cfg, model = family_model(family)
    export_image = E.preprocess(cfg, _image())  # 96x96
    result = E.export_model(model, export_image, str(tmp_path), format=fmt, method=method, cfg=cfg)
    assert os.path.isfile(result.path)
    with open(tmp_path / "export.json") as f:
        assert json.load(f)["outputs"] == list(result.outputs)
    image = E.preprocess(cfg, _image(seed=1)[:80])  # 96x154, not the export's 96x96
    ref = _eager(model, image)
    assert len(ref[0]) >= 5, "nothing to compare"
    _assert_same_detections(ref, _run_file(result.path, image))


def test_unshared_export_holds_both_networks(family_model, tmp_path):
    """The Appendix B export is the end-to-end UnsharedRCNN: the RPN's backbone and the
    Fast R-CNN's backbone are both in the graph (changing either changes the output)."""
    cfg, model = family_model("unshared_C4_appendixB")
    image = E.preprocess(cfg, _image())
    result = E.export_model(model, image, str(tmp_path), format="torchscript", method="tracing")
    assert result.meta_arch == "UnsharedRCNN"
    ts = torch.jit.load(result.path)
    names = {n for n, _ in ts.named_parameters()}
    assert any(".rpn_backbone." in n for n in names) and any(".backbone." in n for n in names)
    assert any(".proposal_generator." in n for n in names) and any(".roi_heads." in n for n in names)


def test_every_block_form_exports_the_same_model(family_model, tmp_path):
    """Forms a and b (Fig. 3) script, trace and export to ONNX too, and compute what
    form c computes from the same checkpoint."""
    cfg, model_c = family_model("faster_rcnn_C4")
    image = E.preprocess(cfg, _image(seed=3)[:, :100])
    ref = _eager(model_c, image)
    for form in ("a", "b"):
        model = copy.deepcopy(model_c)
        for m in model.modules():
            if isinstance(m, resnext_det.ResNeXtBlock):
                m.form = form
        torch.testing.assert_close(_eager(model, image)[0], ref[0], atol=BOX_ATOL, rtol=0)
        for fmt, method in COMBOS:
            r = E.export_model(model, image, str(tmp_path / f"{form}_{fmt}_{method}"), format=fmt, method=method)
            _assert_same_detections(ref, _run_file(r.path, image))


# ----------------------------------------------------------------------- backbones
# depth 50 and 101, every C x d of the named models, and the ResNet (C=1, d=64); depth 152
# only adds blocks of the same kind
_PRESET_FAMILIES = [p for p in PRESETS if p.startswith(("X-", "R-")) and "-152" not in p and p != "R-101"]


@pytest.mark.parametrize(
    "preset,form",
    [(p, "c") for p in _PRESET_FAMILIES] + [("X-50-32x4d", "a"), ("X-50-32x4d", "b")],
)
def test_bare_backbone_scripts(preset, form):
    """torch.jit.script of the bare trunk, every preset's depth / C / d (narrow stem and
    res2 widths keep it small), computes what the eager trunk does."""
    import detectron2.export  # noqa: F401  Detectron2's ResNet.__prepare_scriptable__

    cfg = setup_cfg(
        os.path.join(ROOT, "configs/Base-ResNeXt-FPN.yaml"),
        ["MODEL.RESNEXT.PRESET", preset, "MODEL.RESNEXT.BLOCK_FORM", form,
         "MODEL.RESNEXT.STEM_OUT_CHANNELS", "8", "MODEL.RESNEXT.RES2_OUT_CHANNELS", "16",
         "MODEL.BACKBONE.NAME", "build_resnext_backbone", "MODEL.DEVICE", "cpu"],
    )  # fmt: skip
    model = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        scripted = torch.jit.script(model)
        x = torch.randn(1, 3, 32, 32)
        ref, out = model(x), scripted(x)
    assert set(out) == set(ref) == {"res2", "res3", "res4", "res5"}
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)  # measured: equal


def test_bare_backbone_exports_with_torch_export():
    """Our part of the torch.export route is clean: the ResNeXt trunk exports with dynamic
    height and width (no guard, no graph break) and computes what the eager trunk does on
    another size. What stops the detectors is Detectron2's RPN and Boxes (next tests)."""
    from torch.export import Dim

    cfg = setup_cfg(
        os.path.join(ROOT, "configs/Base-ResNeXt-FPN.yaml"),
        TINY + ["MODEL.BACKBONE.NAME", "build_resnext_backbone"],
    )
    model = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    dims = {2: Dim("height", min=64, max=2048), 3: Dim("width", min=64, max=2048)}
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=(dims,), strict=False)
        x = torch.randn(1, 3, 112, 80)
        ref, out = model(x), program.module()(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)  # measured: equal


# -------------------------------------------------------------------- refusals
def test_opset_below_16_refused_and_what_it_would_compute(family_model, tmp_path):
    """ONNX opset 11 (Detectron2's export_model.py) cannot express ROIAlignV2; torchvision
    would write the unaligned op. It is refused in one line, and the graph it would have
    written is indeed wrong: verify catches it."""
    cfg, model = family_model("faster_rcnn_FPN")
    image = E.preprocess(cfg, _image())
    with pytest.raises(E.ExportError, match=r"--opset 11 refused.*opset 16") as err:
        E.export_model(model, image, str(tmp_path / "o11"), format="onnx", opset=11)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "o11" / "model.onnx")
    # what the refused export would be (written here with the exporter's internals)
    adapter = E.detector_adapter(model)
    os.makedirs(tmp_path / "forced")
    path = str(tmp_path / "forced" / "model.onnx")
    with torch.no_grad(), _quiet_export():
        _export_onnx_tracing(adapter, image, path, E.output_names(model), 11)
    other = E.preprocess(cfg, _image(seed=1)[:, :96])
    ref, out = _eager(model, other), _run_file(path, other)
    wrong = len(ref[0]) != len(out[0]) or (ref[0] - out[0]).abs().max() > 0.1
    assert wrong, "opset 11 computed the aligned model after all: the refusal is unjustified"
    report = E.verify_export(model, path, [other])
    assert not report.ok


def test_verify_catches_perturbed_weights(family_model, tmp_path):
    """A TorchScript and an ONNX file whose box-regression weights were changed after
    export give other detections: verify_export says so (and passes the unchanged ones)."""
    cfg, model = family_model("mask_rcnn_FPN")
    image = E.preprocess(cfg, _image())
    images = [E.preprocess(cfg, _image(seed=4)[:, :100])]
    ts = E.export_model(model, image, str(tmp_path / "ts"), format="torchscript")
    onx = E.export_model(model, image, str(tmp_path / "onnx"), format="onnx")
    assert E.verify_export(model, ts.path, images).ok
    assert E.verify_export(model, onx.path, images).ok

    m = torch.jit.load(ts.path)
    with torch.no_grad():
        w = dict(m.named_parameters())["model.detect.model.roi_heads.box_predictor.bbox_pred.weight"]
        w.add_(0.05 * torch.randn_like(w))
    torch.jit.save(m, ts.path)
    report = E.verify_export(model, ts.path, images)
    assert not report.ok and report.worst["boxes"] > BOX_ATOL

    proto = onnx.load(onx.path)
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight
    arr = onnx.numpy_helper.to_array(init).copy()
    arr += 0.05 * np.random.default_rng(0).standard_normal(arr.shape).astype(arr.dtype)
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, onx.path)
    assert not E.verify_export(model, onx.path, images).ok


def test_compare_detections_pairs_reordered_ties_and_counts_what_differs():
    """Hand-made detections: two with equal scores in swapped order are the same
    detections (difference 0); a missing one, another class, a moved box are reported."""
    ref = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 8, 8]]),
        "scores": torch.tensor([0.9, 0.5, 0.5]),
        "classes": torch.tensor([0, 1, 2]),
    }
    swapped = {k: v[[0, 2, 1]] for k, v in ref.items()}
    assert E.compare_detections(ref, swapped) == {
        "detections": 3.0, "count": 0.0, "classes": 0.0, "boxes": 0.0, "scores": 0.0
    }  # fmt: skip
    moved = {k: v.clone() for k, v in ref.items()}
    moved["boxes"][1, 2] += 0.5
    moved["classes"][2] = 0
    r = E.compare_detections(ref, moved)
    assert r["boxes"] == 0.5 and r["classes"] == 1.0
    assert E.compare_detections(ref, {k: v[:2] for k, v in ref.items()})["count"] == 1.0


def test_cascade_scripting_is_refused_in_one_line(family_model, tmp_path):
    cfg, model = family_model("cascade_mask_rcnn")
    with pytest.raises(E.ExportError, match="CascadeROIHeads is not scriptable.*tracing") as err:
        E.export_model(model, E.preprocess(cfg, _image()), str(tmp_path), method="scripting")
    assert "\n" not in str(err.value)


def test_onnx_by_scripting_is_refused_in_one_line(family_model, tmp_path):
    cfg, model = family_model("faster_rcnn_FPN")
    with pytest.raises(E.ExportError, match="scripting.*tracing for ONNX") as err:
        E.export_model(model, E.preprocess(cfg, _image()), str(tmp_path), format="onnx", method="scripting")
    assert "\n" not in str(err.value)


def test_torch_export_route_stops_in_detectron2_in_one_line(family_model, tmp_path, capfd):
    """PyTorch's default ONNX exporter (torch.export) stops on a data-dependent branch in
    Detectron2's RPN (``if not valid_mask.all()``); the error says where, in one line."""
    cfg, model = family_model("faster_rcnn_C4")
    with pytest.raises(E.ExportError, match=r"torch_export of GeneralizedRCNN.*detectron2/") as err:
        E.export_model(model, E.preprocess(cfg, _image()), str(tmp_path), format="onnx", method="torch_export")
    assert "\n" not in str(err.value) and "proposal_utils.py" in str(err.value)
    assert len(capfd.readouterr().err) < 2000  # its graph dump went to torch_export.log
    assert os.path.getsize(tmp_path / "torch_export.log") > 0


# ---------------------------------------------------------------- weights, folding
def test_folded_frozen_bn_exports_a_smaller_graph_with_the_same_detections(family_model, tmp_path):
    """FOLD_FROZEN_BN: the TorchScript graph has no batch_norm left (FrozenBN is in the
    conv weights) and fewer nodes, and gives the unfolded eager model's detections
    (measured: boxes 0 to 4e-6 px, scores 3e-8 apart). (PyTorch's ONNX exporter fuses
    FrozenBN into the convs by itself: both ONNX graphs are the same size.)"""
    cfg, plain = family_model("faster_rcnn_FPN")
    cfg_f, folded = family_model("faster_rcnn_FPN", "MODEL.RESNEXT.FOLD_FROZEN_BN", "True")
    assert cfg_f.MODEL.RESNEXT.FOLD_FROZEN_BN
    image = E.preprocess(cfg, _image())
    a = E.export_model(plain, image, str(tmp_path / "plain"))
    b = E.export_model(folded, image, str(tmp_path / "folded"))

    def kinds(path):
        return [n.kind() for n in torch.jit.load(path).inlined_graph.nodes()]

    ka, kb = kinds(a.path), kinds(b.path)
    assert ka.count("aten::batch_norm") >= 10 and kb.count("aten::batch_norm") == 0
    assert len(kb) < len(ka)
    other = E.preprocess(cfg, _image(seed=5)[:90])
    _assert_same_detections(_eager(plain, other), _run_file(b.path, other))


def test_weights_resolution_and_strict_loading(tmp_path):
    """An Appendix B config exports the schedule's OUTPUT_DIR/model_final.pth; MODEL.WEIGHTS
    "" is the random model; weights of another architecture are refused as in training."""
    cfg = _cfg("unshared_C4_appendixB")
    cfg.OUTPUT_DIR = str(tmp_path)
    assert E.export_weights(cfg, []) == cfg.MODEL.WEIGHTS  # nothing trained yet: the config's
    final = _write_trained_like(cfg, str(tmp_path / "model_final.pth"))
    assert E.export_weights(cfg, []) == final
    assert E.export_weights(cfg, ["MODEL.WEIGHTS", "other.pth"]) == cfg.MODEL.WEIGHTS
    random_cfg = cfg.clone()
    random_cfg.MODEL.WEIGHTS = ""
    assert E.export_weights(random_cfg, ["MODEL.WEIGHTS", ""]) == ""

    other = _cfg("unshared_C4_appendixB", "MODEL.RESNEXT.CARDINALITY", "4")
    misfit = _write_trained_like(other, str(tmp_path / "c4.pth"))
    with pytest.raises(UserError, match="another shape"):
        E.build_eager_model(E.export_config(cfg), misfit)
    imagenet = str(tmp_path / "backbone.pth")
    torch.save({"model": {k[len("rpn.backbone."):]: v for k, v in torch.load(final)["model"].items()
                          if k.startswith("rpn.backbone.")}}, imagenet)  # fmt: skip
    with pytest.raises(UserError):
        E.build_eager_model(E.export_config(cfg), imagenet)


# ------------------------------------------------------------------------- the tool
def _tool(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip


def test_tool_exports_onnx_and_verifies(tmp_path):
    """The command line end to end: the Appendix B demo config with random weights,
    ONNX at the default opset, --verify on the default (shapes) image's crops: exit 0."""
    out = tmp_path / "onnx"
    sample = tmp_path / "sample.png"
    import cv2

    cv2.imwrite(str(sample), _image(size=160)[:, :, ::-1])
    p = _tool(
        "--config-file", "configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml",
        "--format", "onnx", "--output", str(out), "--verify", "--sample-image", str(sample),
        *TINY, "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "RANDOMLY INITIALISED" in p.stderr + p.stdout
    assert "Verify: OK" in p.stdout, p.stdout
    assert (out / "model.onnx").is_file()
    with open(out / "export.json") as f:
        info = json.load(f)
    assert info["meta_arch"] == "UnsharedRCNN" and info["opset"] == E.DEFAULT_OPSET


def test_tool_refuses_unsafe_opset_in_one_line(tmp_path, capsys):
    """What the tool runs (``run_tool(run_export)``, in process): exit status 2, one line."""
    from resnext_det.cli.tool import run_tool

    status = run_tool(
        lambda: E.run_export(
            os.path.join(ROOT, "configs/COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml"),
            TINY + ["MODEL.WEIGHTS", ""], output=str(tmp_path), format="onnx", opset=11,
        ),
        "export_model.py",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("export_model.py: error:")]
    assert len(lines) == 1 and "opset 16" in lines[0], err[-2000:]
    assert "Traceback" not in err and not os.listdir(tmp_path)


def test_benchmark_runs_every_runtime(tmp_path):
    """--benchmark's function: one row per runtime and size (no timing assertions)."""
    cfg = _cfg("faster_rcnn_FPN")
    rows = E.benchmark_latency(cfg, short_sides=(64,), repeats=1, warmup=0, work_dir=str(tmp_path), image=_image())
    assert [r["runtime"] for r in rows] == [
        "eager fp32", "fast path", "TorchScript (traced, folded)", "onnxruntime (folded)"
    ]  # fmt: skip
    assert all(r["seconds"] > 0 and r["input"] == "64x85" for r in rows)
    assert E.benchmark_table(rows)[2].startswith("| eager fp32 | ")


# ------------------------------------------------- a fine-tuned run's config.yaml (issue 22)
def _fine_tuned_run(base, family="faster_rcnn_FPN"):
    """What tools/train_net.py leaves in OUTPUT_DIR for a fine-tune on 3 classes:
    ``config.yaml`` (Detectron2's cfg.dump(), as default_setup writes it; OUTPUT_DIR relative,
    as in the README's recipe) and ``model_final.pth``. The shipped config has 80 classes."""
    cfg = _cfg(family, "MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", "output/mydata")
    cfg.OUTPUT_DIR = "output/mydata"
    run = base / "output" / "mydata"
    os.makedirs(run)
    (run / "config.yaml").write_text(cfg.dump())
    _write_trained_like(cfg, str(run / "model_final.pth"))
    return run


def _tool_in(cwd, *args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), *args],
        capture_output=True, text=True, cwd=cwd, env=dict(env or os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip


def test_tool_exports_a_fine_tuned_run_from_its_config_yaml(tmp_path):
    """Issue 22, point 3: the docs' deploy command with the run's own OUTPUT_DIR/config.yaml
    exports its model_final.pth with its 3 classes (the shipped config says 80), from the
    folder the run was made in and from any other folder."""
    from detectron2.config import CfgNode

    run = _fine_tuned_run(tmp_path)
    want = CfgNode.load_yaml_with_base(str(run / "config.yaml"))["MODEL"]["ROI_HEADS"]["NUM_CLASSES"]
    assert want == 3
    cls = torch.load(run / "model_final.pth")["model"]["roi_heads.box_predictor.cls_score.weight"]
    assert cls.shape[0] == want + 1  # 3 classes and background

    # docs/deploy.md's command, from the folder the run was made in
    p = _tool_in(tmp_path, "--config-file", "output/mydata/config.yaml", "--format", "onnx",
                 "--output", "export/mydata", "--verify")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Verify: OK" in p.stdout and "trained at" not in p.stderr + p.stdout
    graph = onnx.load(str(tmp_path / "export" / "mydata" / "model.onnx")).graph
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer]
    assert any(w.shape == tuple(cls.shape) and np.array_equal(w, cls.numpy()) for w in weights)

    # from another folder: the run's relative OUTPUT_DIR leads nowhere, the model_final.pth
    # beside the config file is the model (not the ImageNet backbone training started from)
    os.makedirs(tmp_path / "other")
    p = _tool_in(tmp_path / "other", "--config-file", "../output/mydata/config.yaml", "--output", "ts", "--verify")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Verify: OK" in p.stdout
    params = dict(torch.jit.load(str(tmp_path / "other" / "ts" / "model.ts")).named_parameters())
    ts_cls = next(v for k, v in params.items() if k.endswith("box_predictor.cls_score.weight"))
    torch.testing.assert_close(ts_cls, cls, rtol=0, atol=0)


def test_tool_reads_its_config_file_with_train_nets_errors(tmp_path, capsys):
    """A missing and a broken --config-file end export_model.py exactly as they end
    tools/train_net.py: one line, the same message, exit status 2."""
    from resnext_det.cli import train_net as cli
    from resnext_det.cli.tool import run_tool

    broken = tmp_path / "config.yaml"
    broken.write_text("MODEL:\n  WEIGHTS: [unclosed\n")
    for config in (str(tmp_path / "missing" / "config.yaml"), str(broken)):
        lines = {}
        for prog, fn in (
            ("export_model.py", lambda: E.run_export(config, [], output=str(tmp_path / "out"))),
            ("train_net.py", lambda: cli.cli(["--config-file", config])),
        ):
            assert run_tool(fn, prog) == 2
            err = capsys.readouterr().err
            line = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
            assert len(line) == 1 and "Traceback" not in err, err[-2000:]
            lines[prog] = line[0][len(f"{prog}: error:"):]
        assert lines["export_model.py"] == lines["train_net.py"] and config in lines["train_net.py"]


def test_tool_without_onnxruntime_says_the_file_is_unverified_in_one_line(tmp_path):
    """Issue 22, point 8: without onnxruntime, --format onnx --verify wrote the file, then
    ended in a raw traceback. Now: one line naming the package and how to install it, and
    that the .onnx file was written but not verified; exit status 2; the file is there."""
    fake = tmp_path / "no_ort" / "onnxruntime"
    os.makedirs(fake)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")])))
    check = subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'onnxruntime'" in check.stderr  # the simulation holds
    run = _fine_tuned_run(tmp_path)
    p = _tool_in(tmp_path, "--config-file", "output/mydata/config.yaml", "--format", "onnx",
                 "--output", "export/mydata", "--verify", env=env)  # fmt: skip
    onnx_file = os.path.join("export", "mydata", "model.onnx")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.rstrip().splitlines()[-1]
    assert last.startswith("export_model.py: error:"), last
    for words in ("pip install onnxruntime", ".venv/bin/pip", onnx_file, "not verified"):
        assert words in last, (words, last)
    assert os.path.isfile(tmp_path / onnx_file) and os.path.getsize(tmp_path / onnx_file) > 0
    assert run.is_dir()
