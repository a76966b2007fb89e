# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The fast path (resnext_det.fast) computes the same model.

References are independent of the code under test: torchvision's ``roi_align``
kernel, Detectron2's own ``ROIPooler``/``ROIAlign``, the unfolded / NCHW / fp32
forward of the same weights. No timings here (tools/benchmark.py measures them).
"""
import copy
import os

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

import resnext_det  # noqa: F401  registrations
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.layers import FrozenBatchNorm2d, ROIAlign
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from resnext_det.config import add_resnext_config
from resnext_det.fast import (
    AutocastInference,
    AutocastTrainer,
    FastROIAlign,
    FrozenBNFusedConv2d,
    amp_dtype,
    apply_fast_path,
    fast_path_summary,
    fold_frozen_bn,
    fuse_frozen_bn,
    prepare_for_inference,
    replace_roi_align,
    sparse_roi_align,
)
from resnext_det.modeling.resnext import ResNeXt, ResNeXtSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
FPN_OUT = ("res2", "res3", "res4", "res5")


# One torch thread for every test of this module (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# Tolerances of the fp32 checks, near what the correct code measures (max over each test's
# comparisons on this project's CPU): ROIAlign 1.9e-7..6.6e-7, FrozenBN folded or fused
# 4.0e-7..6.1e-7 (outputs and gradients), channels_last 2.6e-7, the whole tiny detector
# 1.07e-6. A FrozenBN that forgets its eps (5e-6 relative per layer) measures 1.1e-5 on the
# trunk and 2.5e-5 on the detector: an order of magnitude above these, not just above.
FP32 = 2e-6
FP32_DETECTOR = 5e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max abs value."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def _random_rois(g, n_img, height, width, scale, k=48):
    """Boxes in image pixels: inside, straddling and outside the map, tiny, empty, inverted."""
    size = torch.tensor([width, height]) / scale
    xy = (torch.rand(k, 2, generator=g) * 1.4 - 0.2) * size
    wh = torch.rand(k, 2, generator=g) * size * torch.rand(k, 1, generator=g) * 1.2
    rois = torch.cat([torch.randint(0, n_img, (k, 1), generator=g).float(), xy, xy + wh], 1)
    rois[0, 3] = rois[0, 1] - 2.0  # inverted
    rois[1, 3:] = rois[1, 1:3]  # empty
    rois[2, 1:] = torch.tensor([0.2, 0.3, 0.9, 0.6])  # sub-pixel
    return rois


# ----------------------------------------------------------------------------- ROIAlign


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_sparse_roi_align_equals_torchvision(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1 + sampling_ratio + 10 * aligned)
    for trial, (n, c, h, w, scale, out) in enumerate(
        [(2, 5, 23, 17, 0.25, (7, 7)), (1, 3, 9, 31, 0.125, (2, 3)), (3, 4, 40, 40, 1.0, (14, 14))]
    ):
        x = torch.randn(n, c, h, w, generator=g)
        rois = _random_rois(g, n, h, w, scale)
        x_ref = x.clone().requires_grad_()
        x_new = x.clone().requires_grad_()
        ref = tv_roi_align(x_ref, rois, out, scale, sampling_ratio, aligned)
        new = sparse_roi_align(x_new, rois, out, scale, sampling_ratio, aligned)
        assert new.shape == ref.shape
        assert _rel(new, ref) < FP32, (trial, _rel(new, ref))
        grad = torch.randn(ref.shape, generator=g)
        ref.backward(grad)
        new.backward(grad)
        assert _rel(x_new.grad, x_ref.grad) < FP32, (trial, _rel(x_new.grad, x_ref.grad))
        # The degenerate boxes pool to exactly zero, as in the kernel.
        assert torch.equal(new[0], torch.zeros_like(new[0])) == torch.equal(ref[0], torch.zeros_like(ref[0]))


def test_sparse_roi_align_channels_last_and_bf16():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 30, 30, generator=g)
    rois = _random_rois(g, 2, 30, 30, 0.5)
    ref = tv_roi_align(x, rois, (7, 7), 0.5, 0, True)
    cl = sparse_roi_align(x.contiguous(memory_format=torch.channels_last), rois, (7, 7), 0.5, 0, True)
    assert _rel(cl, ref) < FP32
    bf = sparse_roi_align(x.bfloat16(), rois, (7, 7), 0.5, 0, True)
    assert bf.dtype == torch.bfloat16
    # bf16 tolerance: inputs and weights rounded to 8 bits of mantissa (2^-8 = 0.4%).
    assert _rel(bf, ref) < 2e-2


def test_fast_roi_align_replaces_detectron2_poolers():
    """Detectron2's multi-level ROIPooler (FPN level assignment, ROIAlignV2) gives the
    same pooled features, values and gradients, with FastROIAlign inside."""
    g = torch.Generator().manual_seed(4)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    pooler = ROIPooler((7, 7), scales, sampling_ratio=0, pooler_type="ROIAlignV2")
    fast = copy.deepcopy(pooler)
    assert replace_roi_align(fast) == 4
    assert all(isinstance(p, FastROIAlign) for p in fast.level_poolers)
    assert not any(isinstance(m, ROIAlign) for m in fast.modules())
    feats = [torch.randn(2, 8, 256 // int(1 / s), 256 // int(1 / s), generator=g) for s in scales]
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=g) * 200
        wh = torch.rand(30, 2, generator=g) ** 2 * 250 + 2
        boxes.append(Boxes(torch.cat([xy, xy + wh], 1)))
    f_ref = [f.clone().requires_grad_() for f in feats]
    f_new = [f.clone().requires_grad_() for f in feats]
    ref = pooler(f_ref, boxes)
    new = fast(f_new, boxes)
    assert _rel(new, ref) < FP32
    grad = torch.randn(ref.shape, generator=g)
    ref.backward(grad)
    new.backward(grad)
    for a, b in zip(f_new, f_ref):
        assert _rel(a.grad, b.grad) < FP32


# ----------------------------------------------------------------------------- FrozenBN


def _tiny_trunk(form="c", norm="FrozenBN", channels_last=False, seed=0):
    torch.manual_seed(seed)
    spec = ResNeXtSpec(
        stage_blocks=(1, 1, 1, 1),
        cardinality=4,
        bottleneck_width=4,
        form=form,
        norm=norm,
        out_features=FPN_OUT,
        freeze_at=0,
        stem_out_channels=16,
        res2_out_channels=32,
        channels_last=channels_last,
    )
    m = ResNeXt(spec)
    _randomize_frozen_bn(m, seed)
    return m


@torch.no_grad()
def _randomize_frozen_bn(model, seed=0):
    """Non-trivial statistics (a fresh FrozenBN is the identity, which folds trivially)."""
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g))
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


@pytest.mark.parametrize("form", ["a", "b", "c"])
def test_fold_frozen_bn_is_exact_in_fp32(form):
    m = _tiny_trunk(form=form).eval()
    x = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(x)
        folded = fold_frozen_bn(m)
        out = folded(x)
    for k in ref:
        assert _rel(out[k], ref[k]) < FP32, (k, _rel(out[k], ref[k]))
    norms_left = sum(isinstance(q, FrozenBatchNorm2d) for q in folded.modules())
    if form == "c":
        assert norms_left == 0  # every conv -> FrozenBN pair folded
    else:  # the explicit paths of forms a/b read conv.weight and keep their norms
        assert norms_left == 12
    # The original model is untouched (fold works on a copy).
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_fuse_frozen_bn_trains_the_same():
    ref = _tiny_trunk(form="c")
    new = copy.deepcopy(ref)
    assert fuse_frozen_bn(new) == 17  # stem + 4 blocks x (3 convs + shortcut)
    assert list(new.state_dict()) == list(ref.state_dict())  # checkpoints unchanged
    x = torch.randn(2, 3, 64, 64)
    out_ref, out_new = ref(x), new(x)
    for k in out_ref:
        assert _rel(out_new[k], out_ref[k]) < FP32
    sum(v.square().mean() for v in out_ref.values()).backward()
    sum(v.square().mean() for v in out_new.values()).backward()
    for (name, p), q in zip(ref.named_parameters(), new.parameters()):
        assert q.grad is not None and _rel(q.grad, p.grad) < FP32, name
    assert any(isinstance(m, FrozenBNFusedConv2d) for m in new.modules())


def test_fold_and_fuse_frozen_bn_exact_in_float64():
    """In float64 the algebra is exact to ~1e-15: folding and fusing keep the trunk's outputs
    and gradients to 1e-12, where an eps missing from (var + eps) is 1e-5 off."""

    def rel(a, b):  # in float64 (``_rel`` compares in fp32)
        return ((a - b).abs().max() / b.abs().max()).item()

    ref = _tiny_trunk(form="c").double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        got = fold_frozen_bn(ref)(x)
    for k in want:
        assert rel(got[k], want[k]) < 1e-12, (k, rel(got[k], want[k]))
    fused = copy.deepcopy(ref)
    assert fuse_frozen_bn(fused) == 17
    out_ref, out_new = ref(x), fused(x)
    for k in out_ref:
        assert rel(out_new[k], out_ref[k]) < 1e-12, k
    sum(v.square().mean() for v in out_ref.values()).backward()
    sum(v.square().mean() for v in out_new.values()).backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert q.grad is not None and rel(q.grad, p.grad) < 1e-12, name


def test_channels_last_equals_nchw_in_fp32():
    ref = _tiny_trunk(channels_last=False).eval()
    cl = _tiny_trunk(channels_last=True).eval()
    cl.load_state_dict(ref.state_dict())
    assert cl.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ref(x), cl(x)
    for k in a:
        assert b[k].is_contiguous(memory_format=torch.channels_last)
        assert _rel(b[k], a[k]) < FP32


@pytest.mark.skipif(not BF16, reason="this CPU has no native bfloat16")
def test_bf16_fast_backbone_within_bf16_tolerance():
    ref = _tiny_trunk().eval()
    fast = _tiny_trunk(channels_last=True).eval()
    fast.load_state_dict(ref.state_dict())
    fuse_frozen_bn(fast)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = fast(x)
    for k in a:
        assert b[k].dtype == torch.bfloat16
        # Relative L2 error: bf16 keeps 8 mantissa bits (~0.4%), compounded over layers.
        err = ((b[k].float() - a[k]).norm() / a[k].norm()).item()
        assert err < 3e-2, (k, err)


# ----------------------------------------------------------------------------- detector


def _tiny_detector_cfg(*opts):
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/Base-ResNeXt-FPN.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.RESNEXT.PRESET", "",
            "MODEL.RESNEXT.STAGE_BLOCKS", [1, 1, 1, 1],
            "MODEL.RESNEXT.CARDINALITY", 4,
            "MODEL.RESNEXT.BOTTLENECK_WIDTH", 4,
            "MODEL.RESNEXT.STEM_OUT_CHANNELS", 16,
            "MODEL.RESNEXT.RES2_OUT_CHANNELS", 32,
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
            "MODEL.ROI_HEADS.NUM_CLASSES", 3,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
            "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
            "INPUT.MIN_SIZE_TRAIN", (128,),
            "INPUT.MAX_SIZE_TRAIN", 128,
            "INPUT.MIN_SIZE_TEST", 128,
            "INPUT.MAX_SIZE_TEST", 128,
        ]
        + list(opts)
    )  # fmt: skip
    return cfg


FAST = (
    "MODEL.RESNEXT.CHANNELS_LAST", True,
    "MODEL.RESNEXT.FAST_ROI_ALIGN", True,
    "MODEL.RESNEXT.FOLD_FROZEN_BN", True,
    "SOLVER.AMP.ENABLED", True,
)  # fmt: skip


def _images(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12, 60, 70], [70, 40, 120, 110]]))
        inst.gt_classes = torch.tensor([0, 2])
        img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": img, "height": size, "width": size, "instances": inst})
    return out


def test_switches_reach_the_model():
    cfg = _tiny_detector_cfg(*FAST)
    model = apply_fast_path(build_model(cfg), cfg)
    assert not any(isinstance(m, ROIAlign) for m in model.modules())
    assert sum(isinstance(m, FastROIAlign) for m in model.modules()) == 4
    assert sum(isinstance(m, FrozenBNFusedConv2d) for m in model.modules()) == 17
    # channels_last reaches the heads, not only the trunk.
    assert model.proposal_generator.rpn_head.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.backbone.fpn_output2.weight.is_contiguous(memory_format=torch.channels_last)
    inf = prepare_for_inference(model, cfg)
    if BF16:
        assert isinstance(inf, AutocastInference) and inf.dtype == torch.bfloat16
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in inf.modules())
        # The folded copy stores conv/linear weights in bf16 once; the trained model is fp32.
        assert inf.model.backbone.fpn_output2.weight.dtype == torch.bfloat16
        assert inf.model.roi_heads.box_head.fc1.weight.dtype == torch.bfloat16
        assert model.backbone.fpn_output2.weight.dtype == torch.float32
        assert inf.model.pixel_mean.dtype == torch.float32
    # The trained model keeps its norms (inference folds a copy).
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # Off by default: nothing changes.
    plain = _tiny_detector_cfg()
    m2 = apply_fast_path(build_model(plain), plain)
    assert any(isinstance(m, ROIAlign) for m in m2.modules())
    assert prepare_for_inference(m2, plain) is m2


def test_fp32_roi_pool_is_torchvisions_roi_pool_under_autocast():
    """py-faster-rcnn's RoI pooling (the Appendix B C4 configs) under bf16 autocast: the same
    fp32 values as torchvision's RoIPool on the same (bf16-rounded) features, boxes given as a
    tensor (Detectron2's ROIPooler) or as a list per image (torchvision's other form)."""
    from torchvision.ops import RoIPool

    from resnext_det.fast.amp import Fp32RoIPool

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g).bfloat16()
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([[2.0, 3.0, 12.0, 10.0], [0.0, 0.0, 15.0, 15.0]])]
    ref = RoIPool((3, 3), 0.5)(x.float(), boxes)
    pool = Fp32RoIPool((3, 3), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for rois in (boxes, torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                                       for i, b in enumerate(boxes)])):  # fmt: skip
            out = pool(x, rois)
            assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_fast_path_summary_names_every_switch():
    on = _tiny_detector_cfg(*FAST, "MODEL.RESNEXT.COMPILE", True, "SOLVER.AMP.PRECISION", "float16")
    assert fast_path_summary(on) == {
        "MODEL.RESNEXT.CHANNELS_LAST": True, "MODEL.RESNEXT.FAST_ROI_ALIGN": True,
        "MODEL.RESNEXT.FOLD_FROZEN_BN": True, "MODEL.RESNEXT.COMPILE": True,
        "SOLVER.AMP.ENABLED": True, "SOLVER.AMP.PRECISION": "float16",
    }  # fmt: skip
    off = _tiny_detector_cfg()
    for key in ("CHANNELS_LAST", "FAST_ROI_ALIGN", "FOLD_FROZEN_BN", "COMPILE"):
        del off.MODEL.RESNEXT[key]  # a config written before the switches existed
    del off.SOLVER.AMP["PRECISION"]
    assert fast_path_summary(off) == {
        "MODEL.RESNEXT.CHANNELS_LAST": False, "MODEL.RESNEXT.FAST_ROI_ALIGN": False,
        "MODEL.RESNEXT.FOLD_FROZEN_BN": False, "MODEL.RESNEXT.COMPILE": False,
        "SOLVER.AMP.ENABLED": False, "SOLVER.AMP.PRECISION": "auto",
    }  # fmt: skip


def test_amp_precision_key():
    cfg = _tiny_detector_cfg()
    assert amp_dtype(cfg) is None  # SOLVER.AMP.ENABLED False
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "half"
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        amp_dtype(cfg)
    cfg.SOLVER.AMP.PRECISION = "float16"
    assert amp_dtype(cfg) == torch.float16
    cfg.SOLVER.AMP.PRECISION = "auto"
    if BF16:
        assert amp_dtype(cfg) == torch.bfloat16
        assert amp_dtype(cfg, "cuda") == torch.float16  # Detectron2's AMP on GPUs


@torch.no_grad()
def test_fold_and_fast_roi_align_exact_on_a_detector_fp32():
    """Every switch but AMP keeps the detector's outputs, to fp32 rounding."""
    cfg = _tiny_detector_cfg()
    torch.manual_seed(0)
    ref = build_model(cfg).eval()
    _randomize_frozen_bn(ref)
    fcfg = _tiny_detector_cfg(*FAST[:6])  # CHANNELS_LAST, FAST_ROI_ALIGN, FOLD_FROZEN_BN
    fast = apply_fast_path(build_model(fcfg), fcfg)
    fast.load_state_dict(ref.state_dict())
    fast = prepare_for_inference(fast, fcfg).eval()
    imgs = _images()
    images = ref.preprocess_image(imgs)
    feats_ref = ref.backbone(images.tensor)
    feats_new = fast.backbone(images.tensor)
    for k in feats_ref:
        assert _rel(feats_new[k], feats_ref[k]) < FP32_DETECTOR, k
    # Same proposals into both ROI heads: pooled features and box predictions agree.
    props = [Instances((128, 128), proposal_boxes=i["instances"].gt_boxes) for i in imgs]
    for p in props:
        p.objectness_logits = torch.zeros(len(p))
    fr = [feats_ref[f] for f in ref.roi_heads.box_in_features]
    fn = [feats_new[f] for f in fast.roi_heads.box_in_features]
    boxes = [p.proposal_boxes for p in props]
    pooled_ref = ref.roi_heads.box_pooler(fr, boxes)
    pooled_new = fast.roi_heads.box_pooler(fn, boxes)
    assert _rel(pooled_new, pooled_ref) < FP32_DETECTOR
    out_ref = ref.roi_heads.box_predictor(ref.roi_heads.box_head(pooled_ref))
    out_new = fast.roi_heads.box_predictor(fast.roi_heads.box_head(pooled_new))
    for a, b in zip(out_new, out_ref):
        assert _rel(a, b) < FP32_DETECTOR


@pytest.mark.skipif(not BF16, reason="this CPU has no native bfloat16")
def test_fast_detector_matches_fp32_within_bf16_tolerance():
    cfg = _tiny_detector_cfg()
    torch.manual_seed(0)
    ref = build_model(cfg)
    _randomize_frozen_bn(ref)
    fcfg = _tiny_detector_cfg(*FAST)
    fast = apply_fast_path(build_model(fcfg), fcfg)
    fast.load_state_dict(ref.state_dict())
    imgs = _images()
    # Training: the RPN losses depend on anchors and ground truth only, so with the
    # same seed both models sample the same anchors; the values agree to bf16.
    ref.train()
    fast.train()
    with EventStorage(0):
        torch.manual_seed(1)
        l_ref = ref(imgs)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l_new = fast(imgs)
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        assert abs(l_new[k].item() - l_ref[k].item()) <= 3e-2 * abs(l_ref[k].item()) + 1e-3, k
    for k in l_ref:
        assert torch.isfinite(l_new[k]), k
    # Inference: features and box predictions for the same boxes agree to bf16.
    inf = prepare_for_inference(fast, fcfg).eval()
    ref.eval()
    with torch.no_grad():
        images = ref.preprocess_image(imgs)
        fr = ref.backbone(images.tensor)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn = inf.model.backbone(images.tensor)
        for k in fr:
            assert ((fn[k].float() - fr[k]).norm() / fr[k].norm()).item() < 3e-2, k
        outs = inf([{k: v for k, v in i.items() if k != "instances"} for i in imgs])
    for o in outs:  # AutocastInference hands back fp32
        assert o["instances"].pred_boxes.tensor.dtype == torch.float32
        assert o["instances"].scores.dtype == torch.float32


def test_autocast_trainer_float16_scaler_state(tmp_path):
    """float16 uses a GradScaler and checkpoints its state; bf16 needs none."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, data):
            return {"loss": (self.lin(data) - 1).square().mean()}

    def loader():
        while True:
            yield torch.ones(8, 4)

    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = AutocastTrainer(model, loader(), opt, device_type="cpu", dtype=torch.float16)
    assert t.grad_scaler.is_enabled()
    with EventStorage(0) as s:
        t.storage = s
        for t.iter in range(3):
            t.run_step()
            s.iter += 1
    assert "grad_scaler" in t.state_dict()
    t2 = AutocastTrainer(Toy(), loader(), opt, device_type="cpu", dtype=torch.bfloat16)
    assert not t2.grad_scaler.is_enabled()
    # A float16 run resumes from checkpoints of runs without a scaler: bf16 (PRECISION "auto"
    # on a CPU, resumed with "auto" on a GPU) saves an empty one, fp32 none; it starts anew.
    t2.iter = 7
    for state in (t2.state_dict(), SimpleTrainer.state_dict(t2)):
        t3 = AutocastTrainer(Toy(), loader(), opt, device_type="cpu", dtype=torch.float16)
        t3.load_state_dict(state)
        assert t3.iter == 7 and t3.grad_scaler.get_scale() == 65536.0


def test_resume_restores_every_piece_of_trainer_state(tmp_path):
    """Save -> a new Trainer -> ``resume_or_load``: every piece of state Detectron2's resume
    restores comes back as it was saved: the weights, the optimizer's momentum buffers and
    learning rates, the LR scheduler, the iteration, and (float16 AMP) the GradScaler's scale
    and growth tracker. Those two are set by hand to 1024 and 7 before saving: a new scaler
    starts at 65536 and 0, which is what a resume that forgets to load them would show."""
    from detectron2.utils.env import seed_all_rng

    from resnext_det.engine import Trainer

    cfg = _shapes_cfg(tmp_path, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "float16",
                      "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 4,
                      "SOLVER.STEPS", (1,))  # fmt: skip
    cfg.DATASETS.TEST = ()
    seed_all_rng(0)
    first = Trainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    scaler = first._trainer.grad_scaler
    assert isinstance(first._trainer, AutocastTrainer) and scaler.is_enabled()
    scaler.load_state_dict(dict(scaler.state_dict(), scale=1024.0, _growth_tracker=7))
    first.checkpointer.save("model_resume")  # as the periodic checkpointer saves

    fresh = Trainer(cfg)
    assert fresh._trainer.grad_scaler.get_scale() == 65536.0  # what must not survive the resume
    fresh.resume_or_load(resume=True)
    assert first.iter == 2 and (fresh.iter, fresh.start_iter) == (2, 3)
    scaler2 = fresh._trainer.grad_scaler.state_dict()
    assert scaler2["scale"] == 1024.0 and scaler2["_growth_tracker"] == 7
    a, b = first.model.state_dict(), fresh.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = first.optimizer.state_dict(), fresh.optimizer.state_dict()
    momenta = [s["momentum_buffer"] for s in opt_a["state"].values()]
    assert momenta and all(m is not None and m.abs().sum() > 0 for m in momenta)  # trained: non-zero
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for k, s in opt_a["state"].items():
        assert torch.equal(s["momentum_buffer"], opt_b["state"][k]["momentum_buffer"]), k
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    # The scheduler stepped twice (last_epoch 2): in warm-up, after the step at iteration 1.
    assert first.scheduler.last_epoch == fresh.scheduler.last_epoch == 2
    assert first.scheduler.state_dict() == fresh.scheduler.state_dict()


# ----------------------------------------------------------------------------- training


def _shapes_cfg(tmp_path, *opts):
    cfg = _tiny_detector_cfg(
        "DATASETS.TRAIN", ("shapes_train",),
        "DATASETS.TEST", ("shapes_val",),
        "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 4,
        "SOLVER.BASE_LR", 0.02,
        "SOLVER.WARMUP_ITERS", 5,
        "SOLVER.MAX_ITER", 40,
        "SOLVER.STEPS", (),
        "SOLVER.CHECKPOINT_PERIOD", 100000,
        "TEST.EVAL_PERIOD", 0,
        "MODEL.WEIGHTS", "",
        "OUTPUT_DIR", str(tmp_path),
        *opts,
    )  # fmt: skip
    return cfg


@pytest.mark.skipif(not BF16, reason="this CPU has no native bfloat16")
def test_fast_path_training_on_shapes_learns(tmp_path):
    from resnext_det.engine import Trainer

    from detectron2.utils.env import seed_all_rng

    cfg = _shapes_cfg(tmp_path, *FAST)
    cfg.DATASETS.TEST = ()  # evaluated below on a small subset
    # Detectron2's TrainingSampler draws a random seed when given none, and the model's
    # initialisation and the flips use the global RNGs: seeded here, the run is the same
    # every time (unseeded, the loss-drop check failed 1 run in 7).
    seed_all_rng(0)
    trainer = Trainer(cfg)
    # The switches reach the trainer (autocast on CPU) and the model.
    assert isinstance(trainer._trainer, AutocastTrainer)
    assert trainer._trainer.precision == torch.bfloat16
    assert any(isinstance(m, FastROIAlign) for m in trainer.model.modules())
    assert any(isinstance(m, FrozenBNFusedConv2d) for m in trainer.model.modules())
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 40
    first = sum(v for v, _ in losses[:5]) / 5
    last = sum(v for v, _ in losses[-5:]) / 5
    # Measured (last / first): 0.51 with this seed; 0.36-0.66 over seeds 0-14.
    assert last < 0.8 * first, (first, last)
    # Evaluation goes through the fast inference path and returns fp32 COCO AP.
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    name = "shapes_val_fastpath_subset"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: DatasetCatalog.get("shapes_val")[:8])
        MetadataCatalog.get(name).set(**{
            k: v for k, v in MetadataCatalog.get("shapes_val").as_dict().items()
            if k in ("thing_classes", "thing_dataset_id_to_contiguous_id", "evaluator_type")
        })  # fmt: skip
    cfg2 = cfg.clone()
    cfg2.DATASETS.TEST = (name,)
    # Every box scored: after 40 iterations some seeds leave no box above the default 0.05,
    # and COCO AP of no detections is NaN (2 seeds in 15), which is not what this checks.
    trainer.model.roi_heads.box_predictor.test_score_thresh = 0.0
    res = Trainer.test(cfg2, trainer.model, [COCOEvaluator(name, output_dir=str(tmp_path / "eval"))])
    assert "bbox" in res and res["bbox"]["AP"] == res["bbox"]["AP"]  # a number, not NaN


@pytest.mark.slow
def test_compile_switch_compiles_backbone_in_place():
    """MODEL.RESNEXT.COMPILE: torch.compile of the backbone, same outputs, same
    parameter names (checkpoints unchanged). Compiling takes ~1 minute here."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    cfg = _tiny_detector_cfg()
    torch.manual_seed(0)
    ref = build_model(cfg).eval()
    ccfg = _tiny_detector_cfg("MODEL.RESNEXT.COMPILE", True)
    comp = apply_fast_path(build_model(ccfg), ccfg).eval()
    comp.load_state_dict(ref.state_dict())
    assert list(comp.state_dict()) == list(ref.state_dict())
    x = ref.preprocess_image(_images(1)).tensor
    with torch.no_grad():
        a, b = ref.backbone(x), comp.backbone(x)
    for k in a:
        assert _rel(b[k], a[k]) < 1e-4, k


def test_roi_pool_runs_under_bf16_autocast_as_in_fp32():
    """The Appendix B C4 configs pool with ROIPool (py-faster-rcnn). torchvision has an autocast
    rule for roi_align, none for roi_pool: bf16 features beside fp32 boxes failed in stage 4 and
    `--eval-only` with SOLVER.AMP.ENABLED. Fp32RoIPool computes what RoIPool computes in fp32."""
    from torchvision.ops import RoIPool

    from resnext_det.fast import Fp32RoIPool

    torch.manual_seed(0)
    x = torch.randn(2, 8, 20, 20)
    rois = torch.tensor([[0, 1.0, 2.0, 15.0, 12.0], [1, 0.0, 0.0, 19.0, 19.0]])
    ref = RoIPool((7, 7), 0.5)(x.bfloat16().float(), rois)  # torchvision in fp32, same input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="same type"):
            RoIPool((7, 7), 0.5)(x.bfloat16(), rois)
        got = Fp32RoIPool((7, 7), 0.5)(x.bfloat16(), rois)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # max pooling: exact
