# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What one benchmark run measures: :class:`BenchmarkSettings`, checked when created.

The field names are ``tools/benchmark.py``'s flags (``--backbone-size`` is
``backbone_size``), and errors name the flag, since that is where most values come
from; the results JSON stores the settings under ``"args"``.
"""
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

__all__ = ["SECTIONS", "ARCHS", "BUILTIN_DEPTHS", "FAST_OPTS", "BenchmarkSettings"]

#: The sections of a run, in the order they run.
SECTIONS = ("backbone", "detector", "inference", "proposals", "overhead", "eval")
#: Detector architectures: configs/Base-ResNeXt-FPN.yaml and Base-ResNeXt-C4.yaml.
ARCHS = ("fpn", "c4")
#: Depths of Detectron2's built-in ResNet (``MODEL.RESNETS.DEPTH``) with bottleneck blocks.
BUILTIN_DEPTHS = (50, 101, 152)
#: The fast path: every switch of resnext_det.fast (torch.compile excluded, see
#: docs/performance.md), as config KEY VALUE pairs.
FAST_OPTS = [
    "MODEL.RESNEXT.CHANNELS_LAST", "True",
    "MODEL.RESNEXT.FAST_ROI_ALIGN", "True",
    "MODEL.RESNEXT.FOLD_FROZEN_BN", "True",
    "SOLVER.AMP.ENABLED", "True",
    "SOLVER.AMP.PRECISION", "auto",
]  # fmt: skip


@dataclass
class BenchmarkSettings:
    """One run of the benchmark.

    Args:
        what: sections to run, from :data:`SECTIONS`.
        device: "cpu" or "cuda".
        repeats: timed runs per contender (medians over them).
        warmup: untimed rounds of every contender before the timed ones.
        size: image side in px (detector, inference, proposals).
        batch: images per training step, trunk batch and proposal batch.
        backbone_size: image side of the backbone section.
        overhead_size: image side of the overhead section.
        overhead_depths: depths compared in the overhead section.
        archs: detector architectures, from :data:`ARCHS`.
        threads: torch threads (0: PyTorch's default).
        no_ablation: skip the one-switch-at-a-time contenders.
        no_torchvision: skip torchvision's trunk.
        compile: add the "ours fast+compile" contender (``MODEL.RESNEXT.COMPILE``).
        no_memory: skip the (slow, profiled) peak-memory run.
        fast_opts: config KEY VALUE pairs of the "ours fast" contender.
        eval_images: images of the synthetic COCO set of the eval section's bbox timing
            (5,000: COCO val2017's size).
        eval_segm_images: the same for segm (0: skip it).
        eval_path_images: images of the eval section's project-path timing (0: skip it).
        eval_repeats: timed runs per contender in the eval section (one each, no warm-up:
            every run takes seconds).
        json: write the results here (after every section, atomically).
        markdown: also write the tables as Markdown here.
        opts: KEY VALUE config overrides for every model.
    """

    what: List[str] = field(default_factory=lambda: list(SECTIONS))
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 2
    size: int = 320
    batch: int = 2
    backbone_size: int = 320
    overhead_size: int = 224
    overhead_depths: List[int] = field(default_factory=lambda: [50, 101])
    archs: List[str] = field(default_factory=lambda: list(ARCHS))
    threads: int = 0
    no_ablation: bool = False
    no_torchvision: bool = False
    compile: bool = False
    no_memory: bool = False
    fast_opts: List[str] = field(default_factory=lambda: list(FAST_OPTS))
    eval_images: int = 5000
    eval_segm_images: int = 5000
    eval_path_images: int = 2000
    eval_repeats: int = 3
    json: Optional[str] = None
    markdown: Optional[str] = None
    opts: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.what, self.archs = list(self.what), list(self.archs)
        self.overhead_depths = list(self.overhead_depths)
        self.fast_opts, self.opts = list(self.fast_opts), list(self.opts)
        bad = [w for w in self.what if w not in SECTIONS]
        if bad or not self.what:
            raise ValueError(f"--what: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
        if not self.archs or any(a not in ARCHS for a in self.archs):
            raise ValueError(f"--archs {','.join(self.archs)!r}: give fpn, c4 or fpn,c4")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose cpu or cuda")
        for name in ("repeats", "size", "batch", "backbone_size", "overhead_size", "eval_images", "eval_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("eval_segm_images", "eval_path_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: skip it)")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0 (0: PyTorch's default)")
        if not self.overhead_depths or any(d not in BUILTIN_DEPTHS for d in self.overhead_depths):
            raise ValueError(
                f"--overhead-depths {self.overhead_depths}: Detectron2's built-in ResNet has "
                f"depths {', '.join(map(str, BUILTIN_DEPTHS))}"
            )
        if len(self.opts) % 2:
            raise ValueError(f"config overrides must be KEY VALUE pairs, got {self.opts}")
        if len(self.fast_opts) % 2:
            raise ValueError(f"--fast-opts must be KEY VALUE pairs, got {self.fast_opts}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")

    def as_dict(self) -> dict:
        """The settings as the results JSON stores them (``"args"``)."""
        return asdict(self)
