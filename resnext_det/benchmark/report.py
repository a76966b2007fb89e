# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""A whole benchmark run: what was measured and where, the tables, the JSON."""
import os
import platform
import sys
from typing import Callable, Dict, List, Optional, TextIO

import detectron2
import torch
import torchvision

from ..fast.amp import cpu_has_fast_bf16
from ..modeling import ResNeXtSpec
from ..utils.cores import available_cores
from ..utils.io import atomic_write_json, atomic_write_text
from .contenders import our_cfg
from ..utils.measure import TIMING_METHOD, memory_method
from .sections import SECTION_RUNNERS, config_files
from .settings import BenchmarkSettings

__all__ = ["run_benchmark", "machine_info", "setup_info", "format_header", "format_table", "format_markdown"]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_benchmark(
    s: BenchmarkSettings,
    *,
    config_dir: str,
    log: Callable[[str], None] = _stderr,
    out: Optional[TextIO] = None,
) -> dict:
    """Run the sections of ``s``, print a header and each table to ``out`` (stdout),
    progress to ``log``; write ``s.json`` after every table (a killed run keeps
    what it measured) and ``s.markdown`` at the end. Returns the results.

    Args:
        config_dir: the folder of ``Base-ResNeXt-FPN.yaml`` and ``Base-ResNeXt-C4.yaml``.
    """
    out = out or sys.stdout
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.device == "cuda":
        torch.backends.cudnn.benchmark = True  # the fast path's CUDNN_BENCHMARK
    configs = config_files(config_dir)
    result = {
        "machine": machine_info(s.device),
        "setup": setup_info(s, configs),
        "args": s.as_dict(),
        "fast_opts": list(s.fast_opts),
        "method": {
            "timing": TIMING_METHOD,
            "memory": memory_method(s.device),
            "speedup_vs_builtin": "built-in fp32 median time / contender median time "
            "(eval section: pycocotools' median time / contender median time)",
        },
        "sections": {},
    }
    print(format_header(result), file=out, flush=True)
    for section in s.what:
        result["sections"][section] = []
        for rows in SECTION_RUNNERS[section](s, configs, log):
            result["sections"][section].extend(rows)
            print(format_table(section, rows), file=out, flush=True)
            if s.json:
                atomic_write_json(s.json, result, indent=1)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    m = result["machine"]
    print(
        f"machine: {m['cpu']} ({m['cpu_count']} available cores, {m['torch_threads']} threads), "
        f"torch {m['torch']}, torchvision {m['torchvision']}, detectron2 {m['detectron2']}, "
        f"device {m['device']}{' ' + m['gpu'] if 'gpu' in m else ''}; load average "
        f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}",
        file=out,
        flush=True,
    )
    if s.json:
        atomic_write_json(s.json, result, indent=1)
    if s.markdown:
        atomic_write_text(s.markdown, format_markdown(result))
    return result


def machine_info(device: str) -> dict:
    """CPU (and GPU), bf16 support, library versions, load average now."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    info = {
        "cpu": model or platform.processor(),
        "cpu_count": available_cores(),  # the cores this process may use, not the machine's
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "mkldnn_bf16_supported": cpu_has_fast_bf16(),
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


def setup_info(s: BenchmarkSettings, configs: Dict[str, str]) -> dict:
    """What the run measures: the model (from the FPN config and the overrides),
    image sizes, batch, threads, device."""
    spec = ResNeXtSpec.from_config(our_cfg(configs["fpn"], s.opts, s.device))
    return {
        "model": spec.describe(),
        "preset": spec.preset,
        "norm": spec.norm,
        "configs": {a: configs[a] for a in s.archs},
        "device": s.device,
        "threads": torch.get_num_threads(),
        "batch": s.batch,
        "size": s.size,
        "backbone_size": s.backbone_size,
        "overhead_size": s.overhead_size,
        "overhead_depths": list(s.overhead_depths),
        "repeats": s.repeats,
        "warmup": s.warmup,
        "eval_images": s.eval_images,
        "eval_segm_images": s.eval_segm_images,
        "eval_path_images": s.eval_path_images,
        "eval_repeats": s.eval_repeats,
    }


def format_header(result: dict) -> str:
    """Two lines: the model, device and threads; the sizes of the sections run."""
    u, what = result["setup"], result["args"]["what"]
    sizes = []
    if "backbone" in what:
        sizes.append(f"backbone {u['batch']} x {u['backbone_size']} px")
    if "detector" in what:
        sizes.append(f"detector {u['batch']} x {u['size']} px ({', '.join(u['configs'])})")
    if "inference" in what:
        sizes.append(f"inference 1 x {u['size']} px ({', '.join(u['configs'])})")
    if "proposals" in what:
        sizes.append(f"proposals {u['batch']} x {u['size']} px")
    if "overhead" in what:
        depths = ", ".join(map(str, u["overhead_depths"]))
        sizes.append(f"overhead {u['batch']} x {u['overhead_size']} px (R-D vs X-D-32x4d, D = {depths})")
    if "eval" in what:
        sizes.append(
            f"eval synthetic COCO sets of {u['eval_images']} (bbox), {u['eval_segm_images']} (segm) and "
            f"{u['eval_path_images']} (project path) images, median of {u['eval_repeats']} runs, no warm-up"
        )
    threads = f"{u['threads']} torch thread" + ("s" if u["threads"] != 1 else "")
    if what == ["eval"]:  # no model is timed
        return f"COCO evaluation; device cpu, {threads}\nimages: {'; '.join(sizes)}"
    return (
        f"model: {u['model']}, {u['norm']}; device {u['device']}, {threads}; "
        f"median of {u['repeats']} after {u['warmup']} warm-up rounds\n"
        f"images: {'; '.join(sizes)}"
    )


def _group(r: dict) -> str:
    return str(r.get("mode") or r.get("arch") or (f"depth {r['depth']}" if "depth" in r else ""))


def format_table(section: str, rows: List[dict]) -> str:
    """A section's rows as a text table, one block per mode / arch / depth."""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"== {section} =="]
    head = (
        f"{'contender':42s} {'median s':>9s} {'min s':>8s} {'cpu s':>8s} {'img/s':>8s} "
        f"{'x pycoco' if section == 'eval' else 'x builtin':>9s} {'peak MB':>8s}"
    )
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    for key, rs in groups.items():
        if key:
            lines.append(f"-- {key}")
        lines.append(head)
        for r in rs:
            over = r.get("overhead_vs_resnet")
            extra = "" if over is None else f"  overhead vs ResNet {over:.2f}x"
            if "max_stat_diff" in r:
                extra += f"  AP {r['stats'][0]:.4f}, stats - pycocotools' <= {r['max_stat_diff']:.0e}"
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
        f"Machine: {m['cpu']}, {m['cpu_count']} available cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, torchvision {m['torchvision']}, detectron2 {m['detectron2']}; "
        f"load average {m['loadavg_start'][0]:.1f} at start.",
        "",
    ]
    if "setup" in result:
        out += [line[0].upper() + line[1:] + "." for line in format_header(result).splitlines()] + [""]
    for section, rows in result["sections"].items():
        out += [f"**{section}**", ""]
        vs = "vs pycocotools" if section == "eval" else "vs built-in"
        out.append(f"| | contender | median s | min s | CPU s | images/s | {vs} | peak MB |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = r.get("speedup_vs_builtin")
            if "overhead_vs_resnet" in r:
                ratio_s = f"{r['overhead_vs_resnet']:.2f}x ResNet's time"
            else:
                ratio_s = "" if ratio is None else f"{ratio:.2f}x"
            mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            out.append(
                f"| {_group(r)} | {r['contender']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                f"{r['cpu_s']:.3f} | {r['images_per_s']:.2f} | {ratio_s} | {mem} |"
            )
        out.append("")
    return "\n".join(out)
