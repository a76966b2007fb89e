"""Every config in configs/ (yaml and LazyConfig) loads, builds what its name says, trains one
step and runs inference, on the CPU, on the shapes data.

Configs are discovered by glob: a new file is tested without editing this module. For each:

* ``test_*_architecture``: the *real* config (no overrides) is built on the meta device (no
  memory, no compute) and checked against what the file name promises and against independent
  references: every ResNeXt stage has exactly the tensors of torchvision's ResNet/ResNeXt of the
  same depth, C and d (and the paper's exact parameter counts where PAPER.md gives them); the
  meta-architecture, ROI heads, mask branch, norm, schedule (Detectron2's Nx rule), ImageNet
  weights file and input convention match the name.
* ``test_*_step``: the same config with a tiny backbone and tiny images (the architecture keys
  the config sets are kept: head type, norm, FPN/C4, cascade, mask, input format) builds, takes
  one SGD step on shapes_train images (masks included for mask models) and predicts on a
  shapes_val image.

Configs of the Appendix B staged schedule (``UNSHARED.ENABLED``) are tested per stage through
``resnext_det.unshared.stage_configs(cfg)``.
"""
import copy
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.solver import LRMultiplier, build_lr_scheduler, build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import resnext_det
from resnext_det import ResNeXt, add_resnext_config
from resnext_det.checkpoint import is_source_name, resolve_source
from resnext_det.engine.setup import check_lazy_device
from resnext_det.errors import ConfigError
from resnext_det.modeling.roi_heads import ResNeXtRes5ROIHeads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")


def _rel(path):
    return os.path.relpath(path, CONFIG_DIR)


YAML_CONFIGS = sorted(
    _rel(p) for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
)
LAZY_CONFIGS = sorted(
    _rel(p)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.py"), recursive=True)
    if not os.path.basename(p).startswith("_")
)

# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------
# Blocks per stage, from the paper (Sec. 3.1, Table 1; ResNet's table). 26/38 are not the
# paper's; they come from the package (used by small quick-start models only).
PAPER_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
# Exact torchvision classifier parameter counts (PAPER.md), fc-1000 (2048*1000+1000) included.
PAPER_PARAM_COUNTS = {(50, 32, 4): 25_028_904, (101, 32, 8): 88_791_336, (101, 64, 4): 83_455_272}
FC_PARAMS = 2048 * 1000 + 1000
# torchvision's input convention (RGB, 0-1, ImageNet mean/std) on Detectron2's 0-255 scale.
TORCHVISION_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
TORCHVISION_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
# Detectron (v1) / Caffe2 convention: BGR 0-255, mean subtraction only.
DETECTRON_BGR_MEAN = [103.530, 116.280, 123.675]
SHAPES_NUM_CLASSES = 3


def parse_name(path):
    """What a config's file name promises, in Detectron2's naming convention."""
    name = os.path.splitext(os.path.basename(path))[0]
    tokens = name.split("_")
    out = {"name": name}
    m = re.search(r"(?:^|_)X_(\d+)_(\d+)x(\d+)d(?:_|$)", name)
    if m:
        out["arch"] = tuple(int(g) for g in m.groups())  # (depth, C, d)
    m = re.search(r"(?:^|_)R_(\d+)(?:_|$)", name)
    if m:
        out["arch"] = (int(m.group(1)), 1, 64)  # a ResNet is the C=1, d=64 ResNeXt
    for t in tokens:
        if re.fullmatch(r"\d+x", t):
            out["schedule_x"] = int(t[:-1])
        if re.fullmatch(r"\d+ep", t):
            out["epochs"] = int(t[:-2])
    out["c4"] = "C4" in tokens
    out["fpn"] = "FPN" in tokens
    out["retinanet"] = name.startswith("retinanet")
    out["cascade"] = "cascade" in tokens
    out["mask"] = "mask" in tokens
    out["faster"] = name.startswith(("faster_rcnn", "cascade_rcnn"))
    out["gn"] = "gn" in tokens
    out["syncbn"] = "syncbn" in tokens
    out["scratch"] = "scratch" in tokens or "LSJ" in tokens
    return out


def torchvision_reference(depth, cardinality, width, blocks=None):
    """torchvision's ResNet/ResNeXt of this (depth, C, d), on the meta device (no memory)."""
    blocks = blocks or PAPER_BLOCKS.get(depth) or list(resnext_det.STAGE_BLOCKS[depth])
    with torch.device("meta"):
        return torchvision.models.resnet.ResNet(
            Bottleneck, blocks, groups=cardinality, width_per_group=width
        )


def _numel(module, prefix=""):
    """Weights of a module as a checkpoint holds them: every tensor but BN running statistics
    (FrozenBN keeps its affine as buffers, GN has no statistics: this counts all alike)."""
    return sum(
        v.numel()
        for k, v in module.state_dict(prefix=prefix).items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


def resnext_stages(model):
    """{"stem"/"res2".."res5": module} of every ResNeXt part of a built detector."""
    stages = {}
    for m in model.modules():
        if isinstance(m, ResNeXt):
            stages["stem"] = m.stem
            for name in m.stage_names:
                stages[name] = getattr(m, name)
        if isinstance(m, ResNeXtRes5ROIHeads):
            stages["res5"] = m.res5
    return stages


def expected_arch(rel, cfg):
    """(depth, C, d, blocks or None): from the file name if it names one, else from the config's
    MODEL.RESNEXT keys (Base files, quick-start models)."""
    info = parse_name(rel)
    if "arch" in info:
        return info["arch"] + (None,)
    r = cfg.MODEL.RESNEXT
    if r.PRESET:
        p = resnext_det.PRESETS[r.PRESET]
        return (p.depth, p.cardinality, p.bottleneck_width, None)
    return (r.DEPTH, r.CARDINALITY, r.BOTTLENECK_WIDTH, list(r.STAGE_BLOCKS) or None)


def assert_backbone_matches_reference(model, arch, label):
    depth, cardinality, width = arch[:3]
    ref = torchvision_reference(depth, cardinality, width, arch[3] if len(arch) > 3 else None)
    if (depth, cardinality, width) in PAPER_PARAM_COUNTS:  # the reference itself, vs the paper
        n = sum(p.numel() for p in ref.parameters())
        assert n == PAPER_PARAM_COUNTS[(depth, cardinality, width)]
    ours = resnext_stages(model)
    assert "stem" in ours and "res2" in ours, f"{label}: no ResNeXt in the built model"
    ref_parts = {"stem": [ref.conv1, ref.bn1], "res2": [ref.layer1], "res3": [ref.layer2],
                 "res4": [ref.layer3], "res5": [ref.layer4]}
    for name, mod in ours.items():
        ref_shapes = sorted(
            tuple(v.shape)
            for part in ref_parts[name]
            for k, v in part.state_dict().items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
        our_shapes = sorted(
            tuple(v.shape)
            for k, v in mod.state_dict().items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
        assert our_shapes == ref_shapes, f"{label}: {name} differs from torchvision's"
    if set(ours) == {"stem", "res2", "res3", "res4", "res5"}:
        total = sum(_numel(m) for m in ours.values())
        assert total == sum(p.numel() for p in ref.parameters()) - FC_PARAMS, label


# ---------------------------------------------------------------------------------------------
# Tiny overrides: keep every architectural choice of the config, shrink widths and sizes.
# ---------------------------------------------------------------------------------------------
TINY_YAML = {
    "MODEL.WEIGHTS": "",
    "MODEL.DEVICE": "cpu",
    "MODEL.RESNEXT.PRESET": "",
    "MODEL.RESNEXT.STAGE_BLOCKS": [1, 1, 1, 1],
    "MODEL.RESNEXT.CARDINALITY": 8,  # C*d = 32: GN's 32 groups still divide every width
    "MODEL.RESNEXT.BOTTLENECK_WIDTH": 4,
    "MODEL.RESNEXT.STEM_OUT_CHANNELS": 32,
    "MODEL.RESNEXT.RES2_OUT_CHANNELS": 64,
    "MODEL.FPN.OUT_CHANNELS": 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 64,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 32,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 200,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 50,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 100,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 20,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
    "MODEL.ROI_HEADS.NUM_CLASSES": SHAPES_NUM_CLASSES,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,  # an untrained model still predicts boxes
    "MODEL.RETINANET.NUM_CLASSES": SHAPES_NUM_CLASSES,
    "MODEL.RETINANET.SCORE_THRESH_TEST": 0.0,
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": 100,
    "TEST.DETECTIONS_PER_IMAGE": 10,
    "INPUT.MIN_SIZE_TRAIN": (96,),
    "INPUT.MAX_SIZE_TRAIN": 128,
    "INPUT.MIN_SIZE_TEST": 96,
    "INPUT.MAX_SIZE_TEST": 128,
    "DATASETS.TRAIN": ("shapes_train",),
    "DATASETS.TEST": ("shapes_val",),
    "SOLVER.IMS_PER_BATCH": 2,
    "DATALOADER.NUM_WORKERS": 0,
}


def load_yaml(rel):
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, rel))
    return cfg


def tiny_yaml(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    opts = []
    for k, v in TINY_YAML.items():
        opts += [k, v]
    cfg.merge_from_list(opts)
    return cfg


def is_unshared(cfg):
    return (cfg.get("UNSHARED") is not None and bool(cfg.UNSHARED.get("ENABLED", False))) or (
        cfg.MODEL.META_ARCHITECTURE == "UnsharedRCNN"
    )


def models_of(cfg):
    """{"": cfg} for a plain config. For the Appendix B staged schedule, the config of each
    training stage (``resnext_det.unshared.stage_configs``: "rpn", "fast_rcnn"), plus the
    config itself ("end_to_end") when its meta-architecture is the two-backbone UnsharedRCNN;
    a skip saying what is missing when the schedule's code is not there."""
    if not is_unshared(cfg):
        return {"": cfg}
    try:
        from resnext_det.unshared import stage_configs
    except ImportError as e:
        pytest.skip(f"UNSHARED config, but resnext_det.unshared.stage_configs is absent: {e}")
    cfgs = dict(stage_configs(cfg))
    assert set(cfgs) >= {"rpn", "fast_rcnn"}, sorted(cfgs)
    if cfg.MODEL.META_ARCHITECTURE == "UnsharedRCNN":
        cfgs["end_to_end"] = cfg
    return cfgs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster
    than two competing with other processes (measured: 0.09 s vs 0.64 s for a step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes():
    if "shapes_train" not in DatasetCatalog.list():
        pytest.skip("the shapes dataset (resnext_det.data) is not registered")
    assert len(MetadataCatalog.get("shapes_train").thing_classes) == SHAPES_NUM_CLASSES
    return {
        "train": DatasetCatalog.get("shapes_train")[:2],
        "val": DatasetCatalog.get("shapes_val")[:1],
    }


def add_fake_proposals(batch):
    """Precomputed proposals for a Fast R-CNN stage: ground truth, jittered, and random boxes."""
    g = torch.Generator().manual_seed(0)
    for x in batch:
        h, w = x["image"].shape[-2:]
        boxes = [x["instances"].gt_boxes.tensor] if "instances" in x else []
        if boxes:
            boxes.append(boxes[0] + torch.randn(boxes[0].shape, generator=g) * 4)
        xy = torch.rand(20, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes.append(torch.cat([xy, xy + torch.tensor([w / 2, h / 2])], dim=1))
        b = Boxes(torch.cat(boxes))
        b.clip((h, w))
        x["proposals"] = Instances((h, w), proposal_boxes=b, objectness_logits=torch.zeros(len(b)))
    return batch


def train_step_and_predict(model, optimizer, batch, test_input, *, label, mask_on):
    """One SGD step through Detectron2's SimpleTrainer, then one prediction; assert both."""
    model.train()
    trainer = SimpleTrainer(model, [batch], optimizer)
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()  # raises FloatingPointError on a non-finite loss
        losses = {k: v for k, v in storage.latest().items() if k.startswith("loss")}
    assert losses, f"{label}: no loss was logged"
    if mask_on:
        assert "loss_mask" in losses, f"{label}: mask model trained without a mask loss"
    # The loss reached our backbone: its trainable weights have gradients.
    stages = resnext_stages(model).values()
    trainable = [p for m in stages for p in m.parameters() if p.requires_grad]
    assert trainable, f"{label}: every ResNeXt weight is frozen"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), label

    model.eval()
    with torch.no_grad():
        (out,) = model([test_input])
    h, w = test_input["height"], test_input["width"]
    if "instances" in out:
        inst = out["instances"]
        assert len(inst) > 0, f"{label}: no detections with score threshold 0"
        assert inst.pred_boxes.tensor.shape[1] == 4 and torch.isfinite(inst.pred_boxes.tensor).all()
        assert inst.image_size == (h, w)
        assert int(inst.pred_classes.max()) < SHAPES_NUM_CLASSES
        if mask_on:
            assert inst.pred_masks.shape[-2:] == (h, w), label
    else:  # an RPN-only stage
        props = out["proposals"]
        assert len(props) > 0 and props.image_size == (h, w), label


# ---------------------------------------------------------------------------------------------
# YAML configs
# ---------------------------------------------------------------------------------------------
def _check_name_against_cfg(rel, cfg, model):
    """The file name's promises, for one built (meta) model of the config."""
    info = parse_name(rel)
    label = rel
    assert_backbone_matches_reference(model, expected_arch(rel, cfg), label)
    if info["c4"]:
        assert cfg.MODEL.BACKBONE.NAME == "build_resnext_backbone", label
        assert cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or isinstance(
            model.roi_heads, ResNeXtRes5ROIHeads
        ), f"{label}: a C4 model must run res5 in ResNeXtRes5ROIHeads"
    if info["fpn"]:
        assert "fpn" in cfg.MODEL.BACKBONE.NAME, label
    if info["retinanet"]:
        assert type(model).__name__ == "RetinaNet", label
        assert cfg.MODEL.BACKBONE.NAME == "build_resnext_retinanet_fpn_backbone", label
        assert cfg.SOLVER.BASE_LR == 0.01, label  # Detectron2's RetinaNet lr
    if info["cascade"]:
        assert type(model.roi_heads).__name__ == "CascadeROIHeads", label
        assert len(model.roi_heads.box_predictor) == 3, label
        assert cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG, label
    if info["mask"]:
        assert cfg.MODEL.MASK_ON and hasattr(model.roi_heads, "mask_head"), label
    if info["faster"] or info["retinanet"]:
        assert not cfg.MODEL.MASK_ON, label
    # The norm of the deepest stage (frozen stages become FrozenBN whatever NORM says, as in
    # Detectron2's ResNet.freeze).
    stages = resnext_stages(model)
    deepest = stages[max(k for k in stages if k.startswith("res"))]
    norm_types = {
        type(m.norm).__name__ for m in deepest.modules() if getattr(m, "norm", None) is not None
    }
    if info["gn"]:
        assert norm_types == {"GroupNorm"} and cfg.MODEL.FPN.NORM == "GN", label
        assert cfg.MODEL.ROI_BOX_HEAD.NORM == "GN" and cfg.MODEL.ROI_MASK_HEAD.NORM == "GN", label
    elif info["syncbn"]:
        assert norm_types == {"SyncBatchNorm"} and cfg.MODEL.FPN.NORM == "SyncBN", label
    elif cfg.MODEL.WEIGHTS:  # fine-tuned from ImageNet: the paper's frozen BN
        assert norm_types == {"FrozenBatchNorm2d"}, f"{label}: {norm_types}"
    if info["scratch"]:
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNEXT.FREEZE_AT == 0, label
    elif "arch" in info and any(d.startswith("coco") for d in cfg.DATASETS.TRAIN):
        # A COCO recipe not named "scratch" fine-tunes ImageNet weights of the named architecture.
        depth, c, d = info["arch"]
        tag = f"X-{depth}-{c}x{d}d" if c > 1 else f"R-{depth}"
        held = resolve_source(cfg.MODEL.WEIGHTS).arch  # what the named file holds (no download)
        assert held == tag, f"{label}: MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} holds {held!r}, not {tag}"
    # The input convention of the weights the config names.
    w = cfg.MODEL.WEIGHTS.lower()
    conv = resolve_source(cfg.MODEL.WEIGHTS).convention if is_source_name(cfg.MODEL.WEIGHTS) else None
    if conv == "torchvision" or "torchvision" in w or "torch7" in w or "timm" in w or info["scratch"]:
        assert cfg.INPUT.FORMAT == "RGB", label
        assert cfg.MODEL.PIXEL_MEAN == pytest.approx(TORCHVISION_MEAN, abs=1e-3), label
        assert cfg.MODEL.PIXEL_STD == pytest.approx(TORCHVISION_STD, abs=1e-3), label
        assert not cfg.MODEL.RESNEXT.STRIDE_IN_1X1, label
    elif conv == "detectron1" or "detectron" in w:  # Detectron (v1) Caffe2: BGR, mean only, BN fused (FrozenBN)
        assert cfg.INPUT.FORMAT == "BGR", label
        assert cfg.MODEL.PIXEL_MEAN == pytest.approx(DETECTRON_BGR_MEAN), label
        assert cfg.MODEL.PIXEL_STD == pytest.approx([1.0, 1.0, 1.0]), label
        assert cfg.MODEL.RESNEXT.NORM == "FrozenBN", label
    # Schedule: Detectron2's "Nx" = N x 90k iterations at 16 images; the lr drops at 60k/80k
    # (x N/1) for N <= 2, else 60k and 20k (at 16 images) before the end.
    if "schedule_x" in info:
        n, bs = info["schedule_x"], cfg.SOLVER.IMS_PER_BATCH
        total = n * 90000 * 16 / bs
        assert cfg.SOLVER.MAX_ITER == total, label
        if n <= 2:
            steps = (total * 6 / 9, total * 8 / 9)
        else:
            steps = (total - 60000 * 16 / bs, total - 20000 * 16 / bs)
        assert tuple(cfg.SOLVER.STEPS) == steps, label
        assert cfg.SOLVER.BASE_LR == pytest.approx((0.01 if info["retinanet"] else 0.02) * bs / 16)


@pytest.mark.parametrize("rel", YAML_CONFIGS)
def test_yaml_config_architecture(rel):
    """The real config builds the architecture, schedule and input convention its name says."""
    cfg = load_yaml(rel)
    for stage, c in models_of(cfg).items():
        c = c.clone()
        c.defrost()
        c.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            model = build_model(c)
        if not stage:
            _check_name_against_cfg(rel, c, model)
            continue
        # The staged schedule: the backbone(s) of each model (its solver is the schedule's,
        # checked by its own tests).
        nets = [model.rpn, model.fast_rcnn] if stage == "end_to_end" else [model]
        for net in nets:
            assert_backbone_matches_reference(net, expected_arch(rel, cfg), f"{rel}:{stage}")
        if stage == "end_to_end":
            assert model.rpn.backbone is not model.fast_rcnn.backbone  # not shared


@pytest.mark.parametrize("rel", YAML_CONFIGS)
def test_yaml_config_step(rel, shapes):
    """Tiny version of the config: build, one training step on shapes_train, one prediction."""
    cfg = load_yaml(rel)
    for stage, c in models_of(cfg).items():
        c = tiny_yaml(c)
        torch.manual_seed(0)
        model = build_model(c)
        optimizer = build_optimizer(c, model)
        build_lr_scheduler(c, optimizer)  # sets the learning rate of iteration 0 (warm-up)
        mapper = DatasetMapper(c, is_train=True)
        batch = [mapper(copy.deepcopy(d)) for d in shapes["train"]]
        test_input = DatasetMapper(c, is_train=False)(copy.deepcopy(shapes["val"][0]))
        if c.MODEL.LOAD_PROPOSALS:
            add_fake_proposals(batch)
            add_fake_proposals([test_input])
        if c.MODEL.MASK_ON:
            assert all(x["instances"].has("gt_masks") for x in batch)
        train_step_and_predict(
            model, optimizer, batch, test_input, label=f"{rel}:{stage}", mask_on=c.MODEL.MASK_ON
        )


def test_retinanet_anchors_are_detectron2s():
    """The RetinaNet base lists Detectron2's anchors (3 scales per octave) as numbers."""
    cfg = load_yaml("Base-ResNeXt-RetinaNet.yaml")
    expected = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]
    assert len(cfg.MODEL.ANCHOR_GENERATOR.SIZES) == 5
    for ours, ref in zip(cfg.MODEL.ANCHOR_GENERATOR.SIZES, expected):
        assert ours == pytest.approx(ref, abs=1e-3)


def test_zoo_covers_every_preset_and_family():
    """The issue's matrix: each family x preset x schedule exists (C4 without X-152)."""
    presets = ["X_50_32x4d", "X_101_32x4d", "X_101_64x4d", "X_101_32x8d"]
    missing = []
    for sched in ("1x", "3x"):
        for p in presets + ["X_152_32x8d"]:
            for f in (f"COCO-Detection/faster_rcnn_{p}_FPN_{sched}.yaml",
                      f"COCO-InstanceSegmentation/mask_rcnn_{p}_FPN_{sched}.yaml",
                      f"COCO-Detection/retinanet_{p}_FPN_{sched}.yaml",
                      f"COCO-Detection/cascade_rcnn_{p}_FPN_{sched}.yaml"):
                missing += [f] if f not in YAML_CONFIGS else []
        for p in presets:
            for f in (f"COCO-Detection/faster_rcnn_{p}_C4_{sched}.yaml",
                      f"COCO-InstanceSegmentation/mask_rcnn_{p}_C4_{sched}.yaml"):
                missing += [f] if f not in YAML_CONFIGS else []
    assert not missing, missing
    assert any(parse_name(r)["gn"] and parse_name(r)["mask"] for r in YAML_CONFIGS)
    assert any(parse_name(r)["syncbn"] for r in YAML_CONFIGS)


def test_yaml_bases_stay_inside_the_repository():
    """Every _BASE_ is a relative path to a file of this repository."""
    for rel in YAML_CONFIGS:
        path = os.path.join(CONFIG_DIR, rel)
        with open(path) as f:
            base = re.search(r'^_BASE_:\s*"?([^"\n]+)"?', f.read(), re.M)
        if base:
            target = os.path.normpath(os.path.join(os.path.dirname(path), base.group(1).strip()))
            assert target.startswith(CONFIG_DIR + os.sep) and os.path.isfile(target), rel


# ---------------------------------------------------------------------------------------------
# LazyConfigs
# ---------------------------------------------------------------------------------------------
def _tiny_augmentations(augs, *, is_train):
    for a in augs:
        target = a.get("_target_")
        name = getattr(target, "__name__", str(target))
        if name.endswith("ResizeShortestEdge"):
            a.short_edge_length = (96,) if is_train else 96
            a.max_size = 128
        elif name.endswith("ResizeScale"):
            a.target_height = a.target_width = 128
        elif name.endswith("FixedSizeCrop"):
            a.crop_size = (128, 128)
    return augs


def tiny_lazy(cfg):
    spec = cfg.model.backbone.bottom_up.spec
    spec.stage_blocks = [1, 1, 1, 1]
    spec.cardinality, spec.bottleneck_width = 8, 4
    spec.stem_out_channels, spec.res2_out_channels = 32, 64
    top = cfg.model.backbone.get("top_block")
    if top is not None and "in_channels" in top:
        top.in_channels = 64 * 8  # res5 width of the tiny backbone
    m = cfg.model
    if "roi_heads" in m:
        m.roi_heads.num_classes = SHAPES_NUM_CLASSES
        m.roi_heads.batch_size_per_image = 32
        for p in m.roi_heads.get("box_predictors", [m.roi_heads.get("box_predictor")]):
            if p is not None:
                p.test_score_thresh = 0.0
                p.test_topk_per_image = 10
        if "mask_head" in m.roi_heads:
            m.roi_heads.mask_head.conv_dims = [64] * len(m.roi_heads.mask_head.conv_dims)
        m.proposal_generator.pre_nms_topk = (200, 100)
        m.proposal_generator.post_nms_topk = (50, 20)
        m.proposal_generator.batch_size_per_image = 32
    else:  # RetinaNet-like
        m.num_classes = SHAPES_NUM_CLASSES
        m.test_score_thresh = 0.0
        m.test_topk_candidates = 100
        m.max_detections_per_image = 10
    dl = cfg.dataloader
    dl.train.dataset.names = "shapes_train"
    dl.train.total_batch_size = 2
    dl.train.num_workers = 0
    _tiny_augmentations(dl.train.mapper.augmentations, is_train=True)
    dl.test.dataset.names = "shapes_val"
    _tiny_augmentations(dl.test.mapper.augmentations, is_train=False)
    cfg.train.device = "cpu"
    return cfg


@pytest.mark.parametrize("rel", LAZY_CONFIGS)
def test_lazy_config_architecture(rel):
    """The real LazyConfig builds the named architecture, schedule and input convention."""
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, rel))
    info = parse_name(rel)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert_backbone_matches_reference(model, info["arch"], rel)
    if info["retinanet"]:
        assert type(model).__name__ == "RetinaNet"
    if info["mask"]:
        assert hasattr(model.roi_heads, "mask_head")
        assert cfg.dataloader.train.mapper.use_instance_mask
    assert model.input_format == "RGB" and cfg.dataloader.train.mapper.image_format == "RGB"
    assert list(cfg.model.pixel_mean) == pytest.approx(TORCHVISION_MEAN, abs=1e-3)
    assert list(cfg.model.pixel_std) == pytest.approx(TORCHVISION_STD, abs=1e-3)
    if info["scratch"]:
        assert cfg.train.init_checkpoint == "" and cfg.model.backbone.bottom_up.spec.freeze_at == 0
    else:
        depth, c, d = info["arch"]
        assert resolve_source(cfg.train.init_checkpoint).arch == f"X-{depth}-{c}x{d}d"
    if "schedule_x" in info:  # Nx = N x 90k iterations at 16 images
        images = cfg.train.max_iter * cfg.dataloader.train.total_batch_size
        assert images == info["schedule_x"] * 90000 * 16
    if "epochs" in info:  # COCO train2017 has 118k images (Detectron2's LSJ recipes)
        epochs = cfg.train.max_iter * cfg.dataloader.train.total_batch_size / 118000
        assert epochs == pytest.approx(info["epochs"], rel=1e-3)


@pytest.mark.parametrize("rel", LAZY_CONFIGS)
def test_lazy_config_step(rel, shapes):
    """Tiny version of the LazyConfig: its own data pipeline and optimizer, a step, a prediction."""
    cfg = tiny_lazy(LazyConfig.load(os.path.join(CONFIG_DIR, rel)))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), cfg.train.max_iter)  # iteration 0
    batch = next(iter(instantiate(cfg.dataloader.train)))
    mask_on = "roi_heads" in cfg.model and bool(
        cfg.dataloader.train.mapper.get("use_instance_mask", False)
    )
    if mask_on:
        assert all(x["instances"].has("gt_masks") for x in batch)
    test_input = instantiate(cfg.dataloader.test.mapper)(copy.deepcopy(shapes["val"][0]))
    train_step_and_predict(model, optimizer, batch, test_input, label=rel, mask_on=mask_on)


# ---------------------------------------------------------------------------------------------
# End to end through the command-line tools
# ---------------------------------------------------------------------------------------------
def _run(cmd, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"  # see _one_thread
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _metrics(output_dir):
    """(training rows, evaluation results) of a Detectron2 metrics.json."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "total_loss" in r]
    evals = {}
    for r in rows:
        evals.update({k: v for k, v in r.items() if k.startswith(("bbox/", "segm/"))})
    return train_rows, evals


@pytest.mark.slow
def test_mask_rcnn_fpn_trains_through_train_net_with_bbox_and_segm_eval(shapes, tmp_path):
    """tools/train_net.py trains the Mask R-CNN FPN config on shapes_train for a few
    iterations and evaluates bbox and segm AP on shapes_val (polygon masks)."""
    out = str(tmp_path / "out")
    opts = []
    for k, v in TINY_YAML.items():
        opts += [k, str(list(v) if isinstance(v, tuple) else v)]
    opts += ["SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()", "SOLVER.BASE_LR", "0.005",
             "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000",
             "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out]
    cfg_file = os.path.join(
        CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_X_50_32x4d_FPN_1x.yaml"
    )
    _run([sys.executable, "tools/train_net.py", "--config-file", cfg_file] + opts, cwd=ROOT)

    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    train_rows, evals = _metrics(out)
    assert [r["iteration"] for r in train_rows][-1] == 2  # iterations 0, 1, 2
    for r in train_rows:
        assert math.isfinite(r["loss_mask"]) and math.isfinite(r["loss_box_reg"]), r
    for task in ("bbox", "segm"):
        ap = evals[f"{task}/AP"]
        assert math.isnan(ap) or 0.0 <= ap <= 100.0, (task, ap)
        assert f"{task}/AP50" in evals and f"{task}/APl" in evals
    with open(os.path.join(out, "inference", "shapes_val", "coco_instances_results.json")) as f:
        results = json.load(f)
    assert results and {"bbox", "segmentation", "score", "category_id"} <= set(results[0])


@pytest.mark.slow
def test_lazyconfig_train_net_trains_and_evaluates(shapes, tmp_path):
    """tools/lazyconfig_train_net.py trains the LazyConfig Mask R-CNN for a few iterations on
    the CPU with command-line overrides, writes a checkpoint and evaluates on shapes_val."""
    out = str(tmp_path / "lazy")
    rel = "new_baselines/mask_rcnn_X_50_32x4d_FPN_1x.py"
    cfg = tiny_lazy(LazyConfig.load(os.path.join(CONFIG_DIR, rel)))
    sp = cfg.model.backbone.bottom_up.spec
    p = "model.backbone.bottom_up.spec"
    opts = [
        f"{p}.stage_blocks=[1,1,1,1]", f"{p}.cardinality={sp.cardinality}",
        f"{p}.bottleneck_width={sp.bottleneck_width}",
        f"{p}.stem_out_channels={sp.stem_out_channels}",
        f"{p}.res2_out_channels={sp.res2_out_channels}",
        f"model.roi_heads.num_classes={SHAPES_NUM_CLASSES}",
        "model.roi_heads.batch_size_per_image=32",
        "model.roi_heads.box_predictor.test_topk_per_image=5",
        "model.roi_heads.mask_head.conv_dims=[64,64,64,64,64]",
        "model.proposal_generator.pre_nms_topk=[200,100]",
        "model.proposal_generator.post_nms_topk=[50,20]",
        "dataloader.train.dataset.names=shapes_train", "dataloader.test.dataset.names=shapes_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        "train.device=cpu", "train.max_iter=3", "train.eval_period=0", "train.init_checkpoint=",
        f"train.output_dir={out}", "optimizer.lr=0.005",
    ]
    _run([sys.executable, "tools/lazyconfig_train_net.py", "--config-file",
          os.path.join(CONFIG_DIR, rel)] + opts, cwd=ROOT)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    train_rows, evals = _metrics(out)
    assert [r["iteration"] for r in train_rows][-1] == 2
    assert all(math.isfinite(r["loss_mask"]) for r in train_rows)
    assert "bbox/AP" in evals and "segm/AP" in evals


def test_lazyconfig_train_net_names_the_override_without_cuda(tmp_path):
    """On a machine without CUDA the recipe's default device gives a message naming the fix."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "new_baselines/mask_rcnn_X_50_32x4d_FPN_1x.py"))
    with pytest.raises(ConfigError, match="train.device=cpu"):
        check_lazy_device(cfg)
    cfg.train.device = "cpu"
    cfg.train.amp.enabled = True
    with pytest.raises(ConfigError, match="train.amp.enabled=False"):
        check_lazy_device(cfg)
