# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Speed of resnext_det against Detectron2's built-in ResNeXt, side by side in one
process, on ``torch.utils.benchmark`` (``tools/benchmark.py`` is its command line).

Contenders: Detectron2's own ``build_resnet_backbone`` with ``NUM_GROUPS x
WIDTH_PER_GROUP`` = our C x d and our weights ("d2-builtin fp32", the baseline of
every ratio), ours in fp32, ours with the fast path, torchvision's trunk. Sections:
see :mod:`.sections`; method: see :mod:`.measure`.
"""
from .contenders import builtin_cfg, copy_weights, our_cfg, synthetic_batch
from ..utils.measure import cpu_peak_tensor_mb, measure_interleaved, peak_memory_mb
from .report import format_markdown, format_table, machine_info, run_benchmark
from .sections import SECTION_RUNNERS, config_files
from .settings import ARCHS, BUILTIN_DEPTHS, FAST_OPTS, SECTIONS, BenchmarkSettings

__all__ = [
    "BenchmarkSettings",
    "SECTIONS",
    "ARCHS",
    "BUILTIN_DEPTHS",
    "FAST_OPTS",
    "run_benchmark",
    "SECTION_RUNNERS",
    "config_files",
    "our_cfg",
    "builtin_cfg",
    "copy_weights",
    "synthetic_batch",
    "measure_interleaved",
    "peak_memory_mb",
    "cpu_peak_tensor_mb",
    "machine_info",
    "format_table",
    "format_markdown",
]
