# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The sections of a benchmark run; each yields its rows, one table at a time.

* ``backbone``: the trunk alone (stem..res5), forward (eval, no grad) and
  forward+backward: the built-in, ours in fp32, ours with the fast path,
  torchvision's ``resnext*`` trunk (its own random weights, FrozenBN).
* ``detector``: one training step (forward, backward, SGD step with lr 0) of
  Faster R-CNN FPN and C4 on fixed synthetic images and boxes.
* ``inference``: latency per image (batch 1, eval, no grad), same contenders.
* ``proposals``: RPN-only model (Detectron2 ``ProposalNetwork``, as the Appendix B
  schedule uses to dump proposals), images/s.
* ``overhead``: ResNeXt vs ResNet at the same FLOPs (X-D-32x4d vs R-D), trunk
  forward+backward with trainable BN as in ImageNet training: the paper reports
  1.36x for ResNeXt-101 (0.95 s vs 0.70 s per mini-batch).
* ``eval``: COCO evaluation, pycocotools' ``COCOeval`` against the compiled one, on a
  synthetic COCO-sized set (bbox, segm), and the project's whole evaluation path
  (:mod:`.coco_eval`).
"""
import copy
import os
from typing import Callable, Dict, Iterator, List

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from ..fast import amp_dtype, fuse_frozen_bn, prepare_for_inference
from ..modeling import ResNeXtSpec
from .coco_eval import section_eval
from .contenders import (
    backbone_fn,
    builtin_cfg,
    copy_weights,
    detector_contenders,
    eval_fn,
    our_cfg,
    synthetic_batch,
    torchvision_trunk,
    train_step_fn,
)
from ..utils.measure import measure_interleaved
from .settings import BenchmarkSettings

__all__ = ["SECTION_RUNNERS", "config_files"]

BASELINE = "d2-builtin fp32"
Log = Callable[[str], None]


def config_files(config_dir: str) -> Dict[str, str]:
    """The base config of each detector architecture, in ``config_dir``."""
    return {
        "fpn": os.path.join(config_dir, "Base-ResNeXt-FPN.yaml"),
        "c4": os.path.join(config_dir, "Base-ResNeXt-C4.yaml"),
    }


def _measure(s: BenchmarkSettings, fns, *, images: int, label: str, log: Log, baseline=BASELINE):
    return measure_interleaved(
        fns, device=s.device, images=images, repeats=s.repeats, warmup=s.warmup,
        baseline=baseline, memory=not s.no_memory, label=label, log=log,
    )  # fmt: skip


def section_backbone(s: BenchmarkSettings, configs: Dict[str, str], log: Log) -> Iterator[List[dict]]:
    ours_cfg = our_cfg(configs["fpn"], s.opts, s.device)
    ours_cfg.MODEL.BACKBONE.NAME = "build_resnext_backbone"
    b_cfg = builtin_cfg(ours_cfg)
    fast_cfg = ours_cfg.clone()
    fast_cfg.merge_from_list(s.fast_opts)
    dtype = amp_dtype(fast_cfg)

    ours = build_backbone(ours_cfg, ShapeSpec(channels=3)).to(s.device)
    builtin = build_backbone(b_cfg, ShapeSpec(channels=3)).to(s.device)
    copy_weights(builtin, ours)
    fast = build_backbone(fast_cfg, ShapeSpec(channels=3)).to(s.device)
    copy_weights(fast, ours)
    if fast_cfg.MODEL.RESNEXT.FOLD_FROZEN_BN:
        fuse_frozen_bn(fast)
    if fast_cfg.MODEL.RESNEXT.COMPILE:
        fast.compile()
    models = {BASELINE: (builtin, None), "ours fp32": (ours, None), "ours fast": (fast, dtype)}
    if s.compile:
        compiled = copy.deepcopy(fast)
        compiled.compile()
        models["ours fast+compile"] = (compiled, dtype)
    if not s.no_torchvision:
        tv = torchvision_trunk(ResNeXtSpec.from_config(ours_cfg), s.device)
        if tv is not None:
            models["torchvision fp32"] = (tv, None)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, 3, s.backbone_size, s.backbone_size, generator=g).to(s.device)
    for mode in ("forward", "forward+backward"):
        fns = {
            name: backbone_fn(m, x, mode=mode, device_type=s.device, dtype=dt)
            for name, (m, dt) in models.items()
        }
        log(f"[backbone] {mode}, {s.batch} x {s.backbone_size}px: {', '.join(fns)}")
        rows = _measure(s, fns, images=s.batch, label=f"backbone {mode}", log=log)
        for row in rows:
            row["mode"] = mode
        yield rows


def section_detector(s: BenchmarkSettings, configs: Dict[str, str], log: Log) -> Iterator[List[dict]]:
    for arch in s.archs:
        contenders = detector_contenders(s, configs[arch])
        nc = contenders["ours fp32"][2].MODEL.ROI_HEADS.NUM_CLASSES
        batch = synthetic_batch(s.batch, s.size, nc, device=s.device)
        fns = {
            name: train_step_fn(m, batch, device_type=s.device, dtype=dt)
            for name, (m, dt, _) in contenders.items()
        }
        log(f"[detector {arch}] training step, {s.batch} x {s.size}px: {', '.join(fns)}")
        rows = _measure(s, fns, images=s.batch, label=f"detector {arch}", log=log)
        for row in rows:
            row["arch"] = arch
        yield rows


def _inference_fns(contenders, inputs) -> Dict[str, Callable]:
    """Ours and the "obvious" contender as prepared for inference (FrozenBN folded
    into a copy, autocast); the built-in as shipped."""
    fns = {}
    for name, (m, _, cfg) in contenders.items():
        if name.startswith("ours") or "amp" in name:
            m = prepare_for_inference(m, cfg)
        fns[name] = eval_fn(m, inputs)
    return fns


def _images_only(batch: List[dict]) -> List[dict]:
    return [{k: v for k, v in d.items() if k != "instances"} for d in batch]


def section_inference(s: BenchmarkSettings, configs: Dict[str, str], log: Log) -> Iterator[List[dict]]:
    for arch in s.archs:
        contenders = detector_contenders(s, configs[arch])
        inputs = _images_only(synthetic_batch(1, s.size, 1, seed=1, device=s.device))
        fns = _inference_fns(contenders, inputs)
        log(f"[inference {arch}] 1 image of {s.size}px: {', '.join(fns)}")
        rows = _measure(s, fns, images=1, label=f"inference {arch}", log=log)
        for row in rows:
            row["arch"] = arch
            row["latency_s_per_image"] = row["median_s"]
        yield rows


def section_proposals(s: BenchmarkSettings, configs: Dict[str, str], log: Log) -> Iterator[List[dict]]:
    contenders = detector_contenders(s, configs["fpn"], meta_arch="ProposalNetwork")
    contenders = {k: v for k, v in contenders.items() if "only" not in k}
    inputs = _images_only(synthetic_batch(s.batch, s.size, 1, seed=2, device=s.device))
    fns = _inference_fns(contenders, inputs)
    log(f"[proposals] RPN-only, {s.batch} x {s.size}px: {', '.join(fns)}")
    yield _measure(s, fns, images=s.batch, label="proposals", log=log)


def section_overhead(s: BenchmarkSettings, configs: Dict[str, str], log: Log) -> Iterator[List[dict]]:
    """ResNeXt-D 32x4d vs ResNet-D (1x64d) at equal FLOPs: trunk fwd+bwd with
    trainable BN, as in the paper's ImageNet timing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, 3, s.overhead_size, s.overhead_size, generator=g).to(s.device)
    for depth in s.overhead_depths:
        fns = {}
        for label, (c, d) in (("ResNet", (1, 64)), ("ResNeXt", (32, 4))):
            for prec, extra in (("fp32", []), ("fast", s.fast_opts)):
                cfg = our_cfg(configs["fpn"], s.opts, s.device, extra)
                cfg.merge_from_list(
                    ["MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.DEPTH", depth,
                     "MODEL.RESNEXT.CARDINALITY", c, "MODEL.RESNEXT.BOTTLENECK_WIDTH", d,
                     "MODEL.RESNEXT.NORM", "BN", "MODEL.RESNEXT.FREEZE_AT", 0,
                     "MODEL.RESNEXT.FOLD_FROZEN_BN", False,
                     "MODEL.BACKBONE.NAME", "build_resnext_backbone"]
                )  # fmt: skip
                torch.manual_seed(0)
                m = build_backbone(cfg, ShapeSpec(channels=3)).to(s.device)
                fns[f"{label}-{depth} {c}x{d}d {prec}"] = backbone_fn(
                    m, x, mode="forward+backward", device_type=s.device, dtype=amp_dtype(cfg)
                )
        log(f"[overhead] depth {depth}, {s.batch} x {s.overhead_size}px fwd+bwd: {', '.join(fns)}")
        rows = _measure(s, fns, images=s.batch, label=f"overhead depth {depth}", log=log, baseline=None)
        by = {row["contender"]: row for row in rows}
        for prec in ("fp32", "fast"):
            rx, rr = by[f"ResNeXt-{depth} 32x4d {prec}"], by[f"ResNet-{depth} 1x64d {prec}"]
            rx["overhead_vs_resnet"] = rx["median_s"] / rr["median_s"]
        for row in rows:
            row["depth"] = depth
        yield rows


#: section name -> runner(settings, config files, log) yielding tables of rows.
SECTION_RUNNERS = {
    "backbone": section_backbone,
    "detector": section_detector,
    "inference": section_inference,
    "proposals": section_proposals,
    "overhead": section_overhead,
    "eval": section_eval,
}
