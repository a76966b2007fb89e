#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Speed of resnext_det against Detectron2's built-in ResNeXt, side by side in one process.

    python tools/benchmark.py                                   # everything, CPU
    python tools/benchmark.py --what detector,inference --json out/bench.json
    python tools/benchmark.py --device cuda --what overhead     # the paper's 1.36x figure

Sections (``--what``):

* ``backbone``: the trunk alone (stem..res5), forward (eval, no grad) and
  forward+backward: Detectron2's ``build_resnet_backbone`` with
  ``NUM_GROUPS x WIDTH_PER_GROUP`` = our C x d and **our weights** (the state-dict
  keys are the same, loaded strictly), ours in fp32, ours with the fast path,
  torchvision's ``resnext*`` trunk (its own random weights, FrozenBN).
* ``detector``: one training step (forward, backward, SGD step with lr 0 so every
  repeat sees the same weights) of Faster R-CNN FPN and C4, ``--batch`` images of
  ``--size`` px with fixed synthetic boxes.
* ``inference``: latency per image (batch 1, eval, no grad), same contenders.
* ``proposals``: RPN-only model (Detectron2 ``ProposalNetwork``, as the Appendix B
  schedule uses to dump proposals), images/s.
* ``overhead``: ResNeXt vs ResNet at the same FLOPs (X-50-32x4d vs R-50, X-101-32x4d
  vs R-101), trunk forward+backward with trainable BN as in ImageNet training:
  the paper reports 1.36x for ResNeXt-101 (0.95 s vs 0.70 s per mini-batch).

Method: contenders run interleaved (A B C A B C ...) so that a load from other
processes hits all alike; ``--warmup`` rounds are dropped, then medians (and
minima) over ``--repeats``. Ratios are the built-in's median time over the
contender's (> 1: faster than built-in); also in CPU time (``cpu s``, the
process's user+system time: with ``--threads 1`` a measure of the work that other
processes' load hardly moves). Peak memory, in one more untimed run: on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before the run; on
CPU the same for PyTorch's CPU allocator, from the profiler's memory events
(``tracemalloc`` does not see PyTorch's allocations; the resident set mostly
measures glibc's caching). The "fast" contender is our
model with the config switches of ``--fast-opts`` (see docs/performance.md).
"""
import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

__all__ = ["main", "parse_args", "FAST_OPTS"]

SECTIONS = ("backbone", "detector", "inference", "proposals", "overhead")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fast path: every switch of resnext_det.fast (torch.compile excluded, see docs).
FAST_OPTS = [
    "MODEL.RESNEXT.CHANNELS_LAST", "True",
    "MODEL.RESNEXT.FAST_ROI_ALIGN", "True",
    "MODEL.RESNEXT.FOLD_FROZEN_BN", "True",
    "SOLVER.AMP.ENABLED", "True",
    "SOLVER.AMP.PRECISION", "auto",
]  # fmt: skip


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per contender first")
    p.add_argument("--size", type=int, default=320, help="image side in px (detector, inference, proposals)")
    p.add_argument("--batch", type=int, default=2, help="images per training step / proposal batch")
    p.add_argument("--backbone-size", type=int, default=320, help="image side for the backbone section")
    p.add_argument("--overhead-size", type=int, default=224, help="image side for the overhead section")
    p.add_argument("--overhead-depths", default="50,101", help="depths compared in the overhead section")
    p.add_argument("--archs", default="fpn,c4", help="detector architectures: fpn, c4")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--no-ablation", action="store_true", help="skip the one-switch-at-a-time contenders")
    p.add_argument("--no-torchvision", action="store_true", help="skip torchvision's trunk")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add 'ours fast+compile' (MODEL.RESNEXT.COMPILE: torch.compile of the backbone; "
        "compiling takes minutes)",
    )
    p.add_argument(
        "--no-memory", action="store_true", help="skip the (slow, profiled) peak-memory run"
    )
    p.add_argument(
        "--fast-opts",
        nargs="*",
        default=None,
        help="config KEY VALUE pairs of the fast contender (default: all switches, see FAST_OPTS)",
    )
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    p.add_argument("--markdown", default=None, help="also write the tables as Markdown here")
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides for every model (e.g. a smaller model for a smoke run)",
    )
    args = p.parse_args(argv)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in what if w not in SECTIONS]
    if bad or not what:
        p.error(f"--what: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    args.what = what
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs or any(a not in ("fpn", "c4") for a in archs):
        p.error(f"--archs {args.archs!r}: give fpn, c4 or fpn,c4")
    args.archs = archs
    for name in ("repeats", "size", "batch", "backbone_size", "overhead_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    try:
        args.overhead_depths = [int(d) for d in args.overhead_depths.split(",") if d.strip()]
    except ValueError:
        p.error(f"--overhead-depths {args.overhead_depths!r}: give depths like 50,101")
    if any(d not in (50, 101, 152) for d in args.overhead_depths):
        p.error("--overhead-depths: Detectron2's built-in ResNet has depths 50, 101, 152")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    args.fast_opts = FAST_OPTS if args.fast_opts is None else args.fast_opts
    if len(args.fast_opts) % 2:
        p.error(f"--fast-opts must be KEY VALUE pairs, got {args.fast_opts}")
    return args


# ----------------------------------------------------------------------------- measuring


def _cpu_peak_tensor_mb(fn: Callable[[], object]) -> float:
    """Peak bytes held by PyTorch's CPU allocator during ``fn()`` above what it held
    before, from the profiler's memory events ("Total Allocated" after each
    allocation and free). ``tracemalloc`` does not see these allocations, and the
    process's resident set mostly measures glibc's caching."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json", prefix=".bench-trace-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    mem = [
        e["args"] for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]  # fmt: skip
    if not mem:
        return 0.0
    first = mem[0]
    before = first["Total Allocated"] - first["Bytes"]  # held when fn() started
    return max(0.0, (max(m["Total Allocated"] for m in mem) - before) / 2**20)


class Meter:
    """Times a callable (wall clock and process CPU time) and measures its peak memory."""

    def __init__(self, device: str, *, memory: bool = True):
        self.cuda = device == "cuda"
        self.memory = memory
        if self.cuda:
            self.memory_method = "torch.cuda.max_memory_allocated minus allocated before the run"
        else:
            self.memory_method = (
                "peak of PyTorch's CPU allocator (profiler memory events) minus what it held "
                "before the run, in one extra untimed run"
            )

    def time(self, fn: Callable[[], object]):
        if self.cuda:
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    def peak_memory_mb(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            return _cpu_peak_tensor_mb(fn)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_interleaved(
    contenders: Dict[str, Callable[[], object]],
    *,
    meter: Meter,
    images: int,
    repeats: int,
    warmup: int,
    baseline: Optional[str],
    log: Callable[[str], None],
) -> List[dict]:
    """Run every contender once per round (A B C A B C ...), warm-up rounds dropped;
    then one more, untimed, run each for the peak memory."""
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    cpus: Dict[str, List[float]] = {k: [] for k in contenders}
    for r in range(warmup + repeats):
        for name, fn in contenders.items():
            dt, cpu = meter.time(fn)
            if r >= warmup:
                times[name].append(dt)
                cpus[name].append(cpu)
        log(f"  round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    mems = {name: meter.peak_memory_mb(fn) if meter.memory else None for name, fn in contenders.items()}
    rows = []
    base = statistics.median(times[baseline]) if baseline in times else None
    base_min = min(times[baseline]) if baseline in times else None
    base_cpu = statistics.median(cpus[baseline]) if baseline in cpus else None
    for name in contenders:
        med, best, cpu = statistics.median(times[name]), min(times[name]), statistics.median(cpus[name])
        rows.append(
            {
                "contender": name,
                "median_s": med,
                "min_s": best,
                "times_s": times[name],
                # CPU time of the process (all threads): with --threads 1 it is the
                # work done, whatever the load of other processes.
                "cpu_s": cpu,
                "images_per_s": images / med,
                "peak_mem_mb": mems[name],
                "speedup_vs_builtin": (base / med) if base else None,
                "speedup_vs_builtin_min": (base_min / best) if base_min else None,
                "speedup_vs_builtin_cpu": (base_cpu / cpu) if base_cpu else None,
            }
        )
    return rows


# ----------------------------------------------------------------------------- models


def _import():
    import resnext_det  # noqa: F401  registrations

    return resnext_det


def our_cfg(config_file: str, opts: Sequence[str], device: str, extra: Sequence[str] = ()):
    from resnext_det.engine import setup_cfg

    cfg = setup_cfg(config_file, list(opts) + list(extra), freeze=False)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    return cfg


_DEPTH_OF_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def builtin_cfg(cfg):
    """Detectron2's built-in ResNet(eXt) config equal to our ``MODEL.RESNEXT`` one."""
    from resnext_det.modeling.resnext import resnext_spec_from_config

    spec = resnext_spec_from_config(cfg)
    depth = _DEPTH_OF_BLOCKS.get(tuple(spec.stage_blocks))
    if depth is None:
        raise ValueError(
            f"Detectron2's built-in ResNet has depths 50, 101, 152; MODEL.RESNEXT gives blocks "
            f"{list(spec.stage_blocks)}: set MODEL.RESNEXT.DEPTH to one of them for the benchmark."
        )
    if spec.form != "c":
        raise ValueError("the built-in computes form (c): set MODEL.RESNEXT.BLOCK_FORM 'c'")
    b = cfg.clone()
    r = b.MODEL.RESNETS
    r.DEPTH = depth
    r.NUM_GROUPS = spec.cardinality
    r.WIDTH_PER_GROUP = spec.bottleneck_width
    r.STRIDE_IN_1X1 = spec.stride_in_1x1
    r.NORM = spec.norm
    r.OUT_FEATURES = list(spec.out_features)
    r.RES5_DILATION = spec.res5_dilation
    r.STEM_OUT_CHANNELS = spec.stem_out_channels
    r.RES2_OUT_CHANNELS = spec.res2_out_channels
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


def build(cfg, *, fast: bool):
    from detectron2.modeling import build_model

    from resnext_det.fast import apply_fast_path

    model = build_model(cfg)
    return apply_fast_path(model, cfg) if fast else model


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Same tensors under the same names; strict, so a key mismatch is an error."""
    dst.load_state_dict(src.state_dict(), strict=True)


def synthetic_batch(n: int, size: int, num_classes: int, *, seed: int = 0, device: str = "cpu"):
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


def _amp(cfg):
    from resnext_det.fast import amp_dtype

    return amp_dtype(cfg)


def train_step_fn(model, batch, *, device_type: str, dtype: Optional[torch.dtype]):
    from detectron2.utils.events import EventStorage

    from resnext_det.fast import autocast

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


def eval_fn(model, inputs):
    model.eval()

    def run():
        with torch.no_grad():
            return model(inputs)

    return run


# ----------------------------------------------------------------------------- sections


def section_backbone(args, meter, log) -> Iterator[List[dict]]:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    from resnext_det.fast import fuse_frozen_bn
    from resnext_det.modeling.resnext import resnext_spec_from_config

    ours_cfg = our_cfg(os.path.join(ROOT, "configs/Base-ResNeXt-FPN.yaml"), args.opts, args.device)
    ours_cfg.MODEL.BACKBONE.NAME = "build_resnext_backbone"
    b_cfg = builtin_cfg(ours_cfg)
    fast_cfg = ours_cfg.clone()
    fast_cfg.merge_from_list(args.fast_opts)
    spec = resnext_spec_from_config(ours_cfg)
    dtype = _amp(fast_cfg)

    ours = build_backbone(ours_cfg, ShapeSpec(channels=3)).to(args.device)
    builtin = build_backbone(b_cfg, ShapeSpec(channels=3)).to(args.device)
    copy_weights(builtin, ours)
    fast = build_backbone(fast_cfg, ShapeSpec(channels=3)).to(args.device)
    copy_weights(fast, ours)
    if fast_cfg.MODEL.RESNEXT.FOLD_FROZEN_BN:
        fuse_frozen_bn(fast)
    if fast_cfg.MODEL.RESNEXT.COMPILE:
        fast.compile()
    models = {"d2-builtin fp32": (builtin, None), "ours fp32": (ours, None), "ours fast": (fast, dtype)}
    if args.compile:
        compiled = copy.deepcopy(fast)
        compiled.compile()
        models["ours fast+compile"] = (compiled, dtype)
    if not args.no_torchvision:
        tv = _torchvision_trunk(spec, args.device)
        if tv is not None:
            models["torchvision fp32"] = (tv, None)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.backbone_size, args.backbone_size, generator=g).to(args.device)
    for mode in ("forward", "forward+backward"):
        fns = {}
        for name, (m, dt) in models.items():
            fns[name] = _backbone_fn(m, x, mode=mode, device_type=args.device, dtype=dt)
        log(f"[backbone] {mode}: {', '.join(fns)}")
        rows = run_interleaved(
            fns, meter=meter, images=args.batch, repeats=args.repeats, warmup=args.warmup,
            baseline="d2-builtin fp32", log=log,
        )  # fmt: skip
        for row in rows:
            row["mode"] = mode
        yield rows


def _torchvision_trunk(spec, device):
    """torchvision's ResNeXt trunk (conv1..layer4) with FrozenBN, or None if the
    spec has no torchvision equivalent."""
    import torchvision
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops import FrozenBatchNorm2d

    if spec.stem_out_channels != 64 or spec.res2_out_channels != 256:
        return None
    # torchvision: width = planes * width_per_group / 64 * groups; planes = 64 in layer1.
    net = ResNet(
        Bottleneck,
        list(spec.stage_blocks),
        groups=spec.cardinality,
        width_per_group=spec.bottleneck_width,
        norm_layer=FrozenBatchNorm2d,
    )
    trunk = torch.nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    # FREEZE_AT 2 as in detection: stem and layer1 frozen.
    for m in (net.conv1, net.layer1):
        for p in m.parameters():
            p.requires_grad_(False)
    del torchvision
    return _TVFeatures(trunk).to(device)


class _TVFeatures(torch.nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, x):
        out = {}
        for i, m in enumerate(self.trunk):
            x = m(x)
            if i >= 4:
                out[f"res{i - 2}"] = x
        return out


def _backbone_fn(model, x, *, mode, device_type, dtype):
    from resnext_det.fast import autocast

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


def _detector_models(args, arch: str, *, meta_arch: Optional[str] = None, extra=()):
    cfg_file = os.path.join(ROOT, "configs", "Base-ResNeXt-FPN.yaml" if arch == "fpn" else "Base-ResNeXt-C4.yaml")
    ours_cfg = our_cfg(cfg_file, args.opts, args.device, extra)
    if meta_arch:
        ours_cfg.MODEL.META_ARCHITECTURE = meta_arch
    b_cfg = builtin_cfg(ours_cfg)
    fast_cfg = ours_cfg.clone()
    fast_cfg.merge_from_list(args.fast_opts)
    torch.manual_seed(0)
    ours = build(ours_cfg, fast=False)
    builtin = build(b_cfg, fast=False)
    copy_weights(builtin, ours)
    fast = build_model_from(fast_cfg, ours)
    contenders = {
        "d2-builtin fp32": (builtin, None, b_cfg),
        "ours fp32": (ours, None, ours_cfg),
        "ours fast": (fast, _amp(fast_cfg), fast_cfg),
    }
    if args.compile:
        c = fast_cfg.clone()
        c.MODEL.RESNEXT.COMPILE = True
        contenders["ours fast+compile"] = (build_model_from(c, ours), _amp(c), c)
    if args.no_ablation:
        return contenders
    # The obvious: the built-in model in channels_last under bf16/fp16 autocast.
    obvious = copy.deepcopy(builtin).to(memory_format=torch.channels_last)
    amp_cfg = b_cfg.clone()
    amp_cfg.SOLVER.AMP.ENABLED = True
    contenders["d2-builtin channels_last+amp"] = (obvious, _amp(amp_cfg), amp_cfg)
    # One switch at a time, on our fp32 model.
    for key, label in (("MODEL.RESNEXT.FAST_ROI_ALIGN", "FAST_ROI_ALIGN"), ("SOLVER.AMP.ENABLED", "AMP")):
        c = ours_cfg.clone()
        c.merge_from_list([key, "True"])
        contenders[f"ours +{label} only"] = (build_model_from(c, ours), _amp(c), c)
    return contenders


def build_model_from(cfg, src):
    """A model for ``cfg`` (fast-path switches applied) with ``src``'s weights."""
    from detectron2.modeling import build_model

    from resnext_det.fast import apply_fast_path

    m = build_model(cfg)
    copy_weights(m, src)
    return apply_fast_path(m, cfg)


def section_detector(args, meter, log) -> Iterator[List[dict]]:
    for arch in args.archs:
        contenders = _detector_models(args, arch)
        nc = contenders["ours fp32"][2].MODEL.ROI_HEADS.NUM_CLASSES
        batch = synthetic_batch(args.batch, args.size, nc, device=args.device)
        fns = {
            name: train_step_fn(m, batch, device_type=args.device, dtype=dt)
            for name, (m, dt, _) in contenders.items()
        }
        log(f"[detector {arch}] training step, {args.batch} x {args.size}px: {', '.join(fns)}")
        rows = run_interleaved(
            fns, meter=meter, images=args.batch, repeats=args.repeats, warmup=args.warmup,
            baseline="d2-builtin fp32", log=log,
        )  # fmt: skip
        for row in rows:
            row["arch"] = arch
        yield rows


def section_inference(args, meter, log) -> Iterator[List[dict]]:
    from resnext_det.fast import prepare_for_inference

    for arch in args.archs:
        contenders = _detector_models(args, arch)
        inputs = [
            {k: v for k, v in d.items() if k != "instances"}
            for d in synthetic_batch(1, args.size, 1, seed=1, device=args.device)
        ]
        fns = {}
        for name, (m, dt, cfg) in contenders.items():
            m = prepare_for_inference(m, cfg) if name.startswith("ours") or "amp" in name else m
            fns[name] = eval_fn(m, inputs)
        log(f"[inference {arch}] 1 image of {args.size}px: {', '.join(fns)}")
        rows = run_interleaved(
            fns, meter=meter, images=1, repeats=args.repeats, warmup=args.warmup,
            baseline="d2-builtin fp32", log=log,
        )  # fmt: skip
        for row in rows:
            row["arch"] = arch
            row["latency_s_per_image"] = row["median_s"]
        yield rows


def section_proposals(args, meter, log) -> Iterator[List[dict]]:
    from resnext_det.fast import prepare_for_inference

    contenders = _detector_models(args, "fpn", meta_arch="ProposalNetwork")
    contenders = {k: v for k, v in contenders.items() if "only" not in k}
    inputs = [
        {k: v for k, v in d.items() if k != "instances"}
        for d in synthetic_batch(args.batch, args.size, 1, seed=2, device=args.device)
    ]
    fns = {}
    for name, (m, dt, cfg) in contenders.items():
        m = prepare_for_inference(m, cfg) if name.startswith("ours") or "amp" in name else m
        fns[name] = eval_fn(m, inputs)
    log(f"[proposals] RPN-only, {args.batch} x {args.size}px: {', '.join(fns)}")
    yield run_interleaved(
        fns, meter=meter, images=args.batch, repeats=args.repeats, warmup=args.warmup,
        baseline="d2-builtin fp32", log=log,
    )  # fmt: skip


def section_overhead(args, meter, log) -> Iterator[List[dict]]:
    """ResNeXt-D 32x4d vs ResNet-D (1x64d) at equal FLOPs: trunk fwd+bwd with
    trainable BN, as in the paper's ImageNet timing."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.overhead_size, args.overhead_size, generator=g).to(args.device)
    base = os.path.join(ROOT, "configs/Base-ResNeXt-FPN.yaml")
    for depth in args.overhead_depths:
        fns = {}
        for label, (c, d) in (("ResNet", (1, 64)), ("ResNeXt", (32, 4))):
            for prec, extra in (("fp32", []), ("fast", args.fast_opts)):
                cfg = our_cfg(base, args.opts, args.device, extra)
                cfg.merge_from_list(
                    ["MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.DEPTH", depth,
                     "MODEL.RESNEXT.CARDINALITY", c, "MODEL.RESNEXT.BOTTLENECK_WIDTH", d,
                     "MODEL.RESNEXT.NORM", "BN", "MODEL.RESNEXT.FREEZE_AT", 0,
                     "MODEL.RESNEXT.FOLD_FROZEN_BN", False,
                     "MODEL.BACKBONE.NAME", "build_resnext_backbone"]
                )  # fmt: skip
                torch.manual_seed(0)
                m = build_backbone(cfg, ShapeSpec(channels=3)).to(args.device)
                fns[f"{label}-{depth} {c}x{d}d {prec}"] = _backbone_fn(
                    m, x, mode="forward+backward", device_type=args.device, dtype=_amp(cfg)
                )
        log(f"[overhead] depth {depth}, {args.batch} x {args.overhead_size}px fwd+bwd: {', '.join(fns)}")
        r = run_interleaved(
            fns, meter=meter, images=args.batch, repeats=args.repeats, warmup=args.warmup,
            baseline=None, log=log,
        )  # fmt: skip
        by = {row["contender"]: row for row in r}
        for prec in ("fp32", "fast"):
            rx, rr = by[f"ResNeXt-{depth} 32x4d {prec}"], by[f"ResNet-{depth} 1x64d {prec}"]
            rx["overhead_vs_resnet"] = rx["median_s"] / rr["median_s"]
        for row in r:
            row["depth"] = depth
        yield r


# ----------------------------------------------------------------------------- report


def machine_info(device: str) -> dict:
    import detectron2
    import torchvision

    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    info = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "mkldnn_bf16_supported": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "device": device,
        "loadavg_start": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def format_table(section: str, rows: List[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"== {section} =="]
    head = (
        f"{'contender':42s} {'median s':>9s} {'min s':>8s} {'cpu s':>8s} {'img/s':>8s} "
        f"{'x builtin':>9s} {'peak MB':>8s}"
    )
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        key = r.get("mode") or r.get("arch") or (f"depth {r['depth']}" if "depth" in r else "")
        groups.setdefault(str(key), []).append(r)
    for key, rs in groups.items():
        if key:
            lines.append(f"-- {key}")
        lines.append(head)
        for r in rs:
            extra = f"  overhead vs ResNet {r['overhead_vs_resnet']:.2f}x" if "overhead_vs_resnet" in r else ""
            lines.append(
                f"{r['contender']:42s} {r['median_s']:9.4f} {r['min_s']:8.4f} {r['cpu_s']:8.4f} "
                f"{r['images_per_s']:8.2f} "
                f"{f(r['speedup_vs_builtin'], '9.2f')} {f(r['peak_mem_mb'], '8.1f')}{extra}"
            )
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The tables of ``result`` as Markdown (what docs/performance.md shows)."""
    m = result["machine"]
    out = [
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, torchvision {m['torchvision']}, detectron2 {m['detectron2']}; "
        f"load average {m['loadavg_start'][0]:.1f} at start.",
        "",
    ]
    for section, rows in result["sections"].items():
        out += [f"**{section}**", ""]
        out.append("| | contender | median s | min s | CPU s | images/s | vs built-in | peak MB |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            key = r.get("mode") or r.get("arch") or (f"depth {r['depth']}" if "depth" in r else "")
            ratio = r.get("speedup_vs_builtin")
            if "overhead_vs_resnet" in r:
                ratio_s = f"{r['overhead_vs_resnet']:.2f}x ResNet's time"
            else:
                ratio_s = "" if ratio is None else f"{ratio:.2f}x"
            mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            out.append(
                f"| {key} | {r['contender']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                f"{r['cpu_s']:.3f} | {r['images_per_s']:.2f} | {ratio_s} | {mem} |"
            )
        out.append("")
    return "\n".join(out)


def write_json_atomic(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # the fast path's CUDNN_BENCHMARK
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _import()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    meter = Meter(args.device, memory=not args.no_memory)
    result = {
        "machine": machine_info(args.device),
        "args": {k: v for k, v in vars(args).items()},
        "fast_opts": list(args.fast_opts),
        "method": {
            "timing": "interleaved rounds, warm-up dropped, median (and min) over repeats",
            "memory": meter.memory_method,
            "speedup_vs_builtin": "built-in fp32 median time / contender median time",
        },
        "sections": {},
    }
    runners = {
        "backbone": section_backbone,
        "detector": section_detector,
        "inference": section_inference,
        "proposals": section_proposals,
        "overhead": section_overhead,
    }
    for section in args.what:
        result["sections"][section] = []
        for rows in runners[section](args, meter, log):
            result["sections"][section].extend(rows)
            print(format_table(section, rows), flush=True)
            if args.json:  # partial results survive a killed run
                write_json_atomic(args.json, result)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    m = result["machine"]
    print(
        f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} threads), "
        f"torch {m['torch']}, torchvision {m['torchvision']}, detectron2 {m['detectron2']}, "
        f"device {m['device']}{' ' + m['gpu'] if 'gpu' in m else ''}; load average "
        f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
    )
    if args.json:
        write_json_atomic(args.json, result)
    if args.markdown:
        _write_text_atomic(args.markdown, format_markdown(result))
    return result


def _write_text_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
