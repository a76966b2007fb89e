# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The models the benchmark compares, and the steps it times.

The baseline, "d2-builtin fp32", is Detectron2 as shipped: its own
``build_resnet_backbone`` (``BottleneckBlock``) with ``NUM_GROUPS x
WIDTH_PER_GROUP`` = our C x d, and **our weights** loaded strictly (the state-dict
keys are the same). "ours fp32" is our model as configured, "ours fast" the same
weights with the fast-path switches (:data:`~.settings.FAST_OPTS`).
"""
import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..checkpoint import torchvision_resnext
from ..engine import setup_cfg
from ..fast import amp_dtype, apply_fast_path, autocast
from ..modeling import ResNeXtSpec
from .settings import BUILTIN_DEPTHS, BenchmarkSettings

__all__ = [
    "our_cfg",
    "builtin_cfg",
    "copy_weights",
    "build_like",
    "detector_contenders",
    "torchvision_trunk",
    "synthetic_batch",
    "train_step_fn",
    "eval_fn",
    "backbone_fn",
]

#: name -> (model, autocast dtype or None, config)
Contenders = Dict[str, Tuple[torch.nn.Module, Optional[torch.dtype], CfgNode]]


def our_cfg(config_file: str, opts: Sequence[str], device: str, extra: Sequence[str] = ()) -> CfgNode:
    """Our config (not frozen) from ``config_file`` and ``opts`` then ``extra``, on
    ``device``, without weights (speed does not depend on them)."""
    return setup_cfg(
        config_file, [*opts, *extra, "MODEL.DEVICE", device, "MODEL.WEIGHTS", ""], freeze=False
    )


def builtin_cfg(cfg: CfgNode) -> CfgNode:
    """Detectron2's built-in ResNet(eXt) config equal to our ``MODEL.RESNEXT`` one."""
    spec = ResNeXtSpec.from_config(cfg)
    depth = spec.standard_depth
    if depth not in BUILTIN_DEPTHS:
        raise ValueError(
            f"Detectron2's built-in ResNet has depths {', '.join(map(str, BUILTIN_DEPTHS))}; "
            f"MODEL.RESNEXT gives blocks {list(spec.stage_blocks)}: set MODEL.RESNEXT.DEPTH to "
            "one of them for the benchmark."
        )
    if spec.form != "c":
        raise ValueError("the built-in computes form (c): set MODEL.RESNEXT.BLOCK_FORM 'c'")
    b = cfg.clone()
    r = b.MODEL.RESNETS
    # fmt: off
    r.DEPTH             = depth
    r.NUM_GROUPS        = spec.cardinality
    r.WIDTH_PER_GROUP   = spec.bottleneck_width
    r.STRIDE_IN_1X1     = spec.stride_in_1x1
    r.NORM              = spec.norm
    r.OUT_FEATURES      = list(spec.out_features)
    r.RES5_DILATION     = spec.res5_dilation
    r.STEM_OUT_CHANNELS = spec.stem_out_channels
    r.RES2_OUT_CHANNELS = spec.res2_out_channels
    # fmt: on
    b.MODEL.BACKBONE.FREEZE_AT = spec.freeze_at
    name = b.MODEL.BACKBONE.NAME
    b.MODEL.BACKBONE.NAME = {
        "build_resnext_backbone": "build_resnet_backbone",
        "build_resnext_fpn_backbone": "build_resnet_fpn_backbone",
        "build_resnext_retinanet_fpn_backbone": "build_retinanet_resnet_fpn_backbone",
    }.get(name, name)
    if b.MODEL.ROI_HEADS.NAME == "ResNeXtRes5ROIHeads":
        b.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    # None of the fast path: this is Detectron2 as shipped.
    for k in ("CHANNELS_LAST", "FAST_ROI_ALIGN", "FOLD_FROZEN_BN", "COMPILE"):
        b.MODEL.RESNEXT[k] = False
    b.SOLVER.AMP.ENABLED = False
    return b


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Same tensors under the same names; strict, so a key mismatch is an error."""
    dst.load_state_dict(src.state_dict(), strict=True)


def build_like(cfg: CfgNode, src: torch.nn.Module) -> torch.nn.Module:
    """A model for ``cfg`` with ``src``'s weights, the fast-path switches of ``cfg`` applied."""
    model = build_model(cfg)
    copy_weights(model, src)
    return apply_fast_path(model, cfg)


def detector_contenders(
    s: BenchmarkSettings, config_file: str, *, meta_arch: Optional[str] = None
) -> Contenders:
    """The detectors of one section, all with the weights of "ours fp32"."""
    ours_cfg = our_cfg(config_file, s.opts, s.device)
    if meta_arch:
        ours_cfg.MODEL.META_ARCHITECTURE = meta_arch
    b_cfg = builtin_cfg(ours_cfg)
    fast_cfg = ours_cfg.clone()
    fast_cfg.merge_from_list(s.fast_opts)
    torch.manual_seed(0)
    ours = build_model(ours_cfg)
    builtin = build_model(b_cfg)
    copy_weights(builtin, ours)
    contenders: Contenders = {
        "d2-builtin fp32": (builtin, None, b_cfg),
        "ours fp32": (ours, None, ours_cfg),
        "ours fast": (build_like(fast_cfg, ours), amp_dtype(fast_cfg), fast_cfg),
    }
    if s.compile:
        c = fast_cfg.clone()
        c.MODEL.RESNEXT.COMPILE = True
        contenders["ours fast+compile"] = (build_like(c, ours), amp_dtype(c), c)
    if s.no_ablation:
        return contenders
    # The obvious: the built-in model in channels_last under bf16/fp16 autocast.
    obvious = copy.deepcopy(builtin).to(memory_format=torch.channels_last)
    amp_cfg = b_cfg.clone()
    amp_cfg.SOLVER.AMP.ENABLED = True
    contenders["d2-builtin channels_last+amp"] = (obvious, amp_dtype(amp_cfg), amp_cfg)
    # One switch at a time, on our fp32 model.
    for key, label in (("MODEL.RESNEXT.FAST_ROI_ALIGN", "FAST_ROI_ALIGN"), ("SOLVER.AMP.ENABLED", "AMP")):
        c = ours_cfg.clone()
        c.merge_from_list([key, "True"])
        contenders[f"ours +{label} only"] = (build_like(c, ours), amp_dtype(c), c)
    return contenders


def torchvision_trunk(spec: ResNeXtSpec, device: str) -> Optional[torch.nn.Module]:
    """torchvision's ResNeXt trunk (conv1..layer4) with FrozenBN and its own random
    weights, or None if ``spec`` has no torchvision equivalent."""
    from torchvision.ops import FrozenBatchNorm2d

    if spec.stem_out_channels != 64 or spec.res2_out_channels != 256:
        return None
    # torchvision: width = planes * width_per_group / 64 * groups; planes = 64 in layer1.
    net = torchvision_resnext(spec, norm_layer=FrozenBatchNorm2d)
    trunk = torch.nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    # FREEZE_AT 2 as in detection: stem and layer1 frozen.
    for m in (net.conv1, net.layer1):
        for p in m.parameters():
            p.requires_grad_(False)
    return _TVFeatures(trunk).to(device)


class _TVFeatures(torch.nn.Module):
    """torchvision's trunk returning res2..res5 as Detectron2's backbones do."""

    def __init__(self, trunk: torch.nn.Sequential):
        super().__init__()
        self.trunk = trunk

    def forward(self, x):
        out = {}
        for i, m in enumerate(self.trunk):
            x = m(x)
            if i >= 4:
                out[f"res{i - 2}"] = x
        return out


def synthetic_batch(n: int, size: int, num_classes: int, *, seed: int = 0, device: str = "cpu") -> List[dict]:
    """Fixed random images with 3-5 fixed boxes each (Detectron2's input format)."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        k = int(torch.randint(3, 6, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = (torch.rand(k, 2, generator=g) * 0.35 + 0.05) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (k,), generator=g)
        batch.append({"image": img.to(device), "height": size, "width": size, "instances": inst.to(device)})
    return batch


def train_step_fn(model, batch: List[dict], *, device_type: str, dtype: Optional[torch.dtype]) -> Callable:
    """One training step: forward, backward and an SGD step with lr 0."""
    from detectron2.utils.events import EventStorage

    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the update is computed and applied, the weights (and the work of the
    # next repeat: proposals, sampled boxes) stay the same.
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    storage = EventStorage(0)
    model.train()

    def step():
        with storage:
            opt.zero_grad(set_to_none=True)
            with autocast(device_type, dtype):
                losses = model(batch)
                loss = sum(losses.values())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss

    return step


def eval_fn(model, inputs: List[dict]) -> Callable:
    """One inference of ``inputs`` (eval mode, no grad)."""
    model.eval()

    def run():
        with torch.no_grad():
            return model(inputs)

    return run


def backbone_fn(
    model, x: torch.Tensor, *, mode: str, device_type: str, dtype: Optional[torch.dtype]
) -> Callable:
    """The trunk's "forward" (eval, no grad) or "forward+backward" (train mode, the
    mean of every output as the loss)."""
    if mode == "forward":
        model.eval()

        def run():
            with torch.no_grad(), autocast(device_type, dtype):
                return model(x)

        return run
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        with autocast(device_type, dtype):
            out = model(x)
            loss = sum(o.float().mean() for o in out.values())
        loss.backward()
        return loss

    return run
