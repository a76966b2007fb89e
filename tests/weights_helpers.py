"""Helpers of the weights tests (tests/test_checkpoint_*.py, tests/test_weights_*.py): small
torchvision ResNeXts and their features, Caffe2 blobs written from them, tiny detector configs
loaded through MODEL.WEIGHTS, tools/convert_pretrained.py run in this process, and the
published names and config lines the tests share. Not a test file."""
import contextlib
import hashlib
import importlib.util
import io
import os
import re
import subprocess

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from resnext_det import add_resnext_config
from resnext_det.checkpoint import ResNeXtCheckpointer, convert_weights, format_opts, save_converted


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_pretrained.py")
STAGES = ("res2", "res3", "res4", "res5")


# Relative to max(1, max |feature|). The correct conversions measure 2.6e-7 to 4.4e-7 here
# (fp32 rounding: depth 26 and resnext50_32x4d, torchvision/timm/Caffe2/Torch7 sources); a
# Caffe2 AffineChannel written without BN's eps (5e-6 relative per layer) measures 1.04e-5.
TOL = 2e-6


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


def frozen_bn_as_trained(model: nn.Module) -> nn.Module:
    """A trained model's FrozenBN statistics and affine values (a fresh detector has 0/1,
    which fold to nothing), drawn from torch's global generator; call under no_grad."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
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


def _record_cfg_model(*opts):
    """A tiny FPN detector (tiny_cfg) and its config."""
    cfg = tiny_cfg("FPN", *opts)
    return cfg, build_model(cfg)


# The trunk of tv_resnext(): depth 26 ([2, 2, 2, 2]), C=4, d=4, torchvision widths.
X26_LINES = [
    ("MODEL.RESNEXT.PRESET", ""), ("MODEL.RESNEXT.STAGE_BLOCKS", [2, 2, 2, 2]),
    ("MODEL.RESNEXT.CARDINALITY", 4), ("MODEL.RESNEXT.BOTTLENECK_WIDTH", 4),
]
RGB_LINES = [("INPUT.FORMAT", "RGB"), ("MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53]),
             ("MODEL.PIXEL_STD", [58.395, 57.12, 57.375])]
FAIR_BGR_LINES = [("INPUT.FORMAT", "BGR"), ("MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675]),
                  ("MODEL.PIXEL_STD", [57.375, 57.12, 58.395])]


# As published by torchvision (models/resnet.py weights enums), Detectron2
# (configs, ModelCatalog), timm (Hub ids) and facebookresearch/ResNeXt (README).
PUBLISHED = {
    "torchvision://resnext50_32x4d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
    "torchvision://resnext50_32x4d.IMAGENET1K_V2": "https://download.pytorch.org/models/resnext50_32x4d-1a0047aa.pth",
    "torchvision://resnext101_32x8d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth",
    "torchvision://resnext101_32x8d": "https://download.pytorch.org/models/resnext101_32x8d-110c445d.pth",  # DEFAULT = V2
    "torchvision://resnext101_64x4d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_64x4d-173b62eb.pth",
    "torchvision://resnet50.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "torchvision://resnet101.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "timm://resnext50_32x4d.a1h_in1k": "https://huggingface.co/timm/resnext50_32x4d.a1h_in1k/resolve/main/model.safetensors",
    "timm://resnext101_32x8d.fb_wsl_ig1b_ft_in1k": "https://huggingface.co/timm/resnext101_32x8d.fb_wsl_ig1b_ft_in1k/resolve/main/model.safetensors",
    "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl": "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/FAIR/X-101-32x8d.pkl",
    "detectron2://ImageNetPretrained/MSRA/R-50.pkl": "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl",
    "catalog://ImageNetPretrained/FAIR/X-152-32x8d-IN5k": "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/25093814/X-152-32x8d-IN5k.pkl",
    "catalog://ImageNetPretrained/FAIR/X-101-64x4d": "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/FBResNeXt/X-101-64x4d.pkl",
    "torch7://resnext_101_32x4d": "https://dl.fbaipublicfiles.com/resnext/imagenet_models/resnext_101_32x4d.t7",
    "torch7://resnext_50_32x4d.t7": "https://dl.fbaipublicfiles.com/resnext/imagenet_models/resnext_50_32x4d.t7",
}


TINY_HEADS = [
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
    "MODEL.ROI_HEADS.NUM_CLASSES", 20, "MODEL.DEVICE", "cpu", "MODEL.RPN.PRE_NMS_TOPK_TEST", 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 20,
]


def our_detector_cfg(weights, *lines):
    """Our shipped mask_rcnn_X_101_32x8d_FPN_3x.yaml (RGB) at the zoo detector's tiny sizes."""
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "COCO-InstanceSegmentation", "mask_rcnn_X_101_32x8d_FPN_3x.yaml"))
    cfg.merge_from_list([
        "MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.STAGE_BLOCKS", [3, 4, 6, 3], "MODEL.RESNEXT.CARDINALITY", 2,
        "MODEL.RESNEXT.BOTTLENECK_WIDTH", 4, "MODEL.RESNEXT.STEM_OUT_CHANNELS", 16,
        "MODEL.RESNEXT.RES2_OUT_CHANNELS", 32, *TINY_HEADS, "MODEL.WEIGHTS", str(weights),
    ])
    for k, v in lines:
        cfg.merge_from_list([k, v])
    return cfg


@torch.no_grad()
def predict(model, image):
    h, w = image.shape[-2:]
    return model([{"image": image, "height": h, "width": w}])[0]["instances"]


def assert_same_predictions(a, b):
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3, rtol=0)
    assert torch.allclose(a.scores, b.scores, atol=1e-5, rtol=0)
    assert torch.allclose(a.pred_masks.float(), b.pred_masks.float(), atol=0) or (
        (a.pred_masks != b.pred_masks).float().mean() < 1e-3
    )
