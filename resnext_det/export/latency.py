# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Latency of one image: eager fp32, the fast path, TorchScript and onnxruntime, timed
with the benchmark's interleaved torch.utils.benchmark measurement."""
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..utils.measure import measure_interleaved
from ..engine import Trainer
from ..fast import fold_frozen_bn, prepare_for_inference
from .adapters import export_config, preprocess, sample_image
from .check import load_exported
from .exporter import export_model

logger = logging.getLogger(__name__)


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def benchmark_latency(
    cfg,
    *,
    short_sides: Sequence[int] = (800, 320),
    repeats: int = 3,
    warmup: int = 2,
    work_dir: str,
    image: Optional[np.ndarray] = None,
) -> List[Dict[str, object]]:
    """Latency of one image, side by side: eager fp32, the fast path (the config
    switches of resnext_det.fast: CHANNELS_LAST, FAST_ROI_ALIGN, FOLD_FROZEN_BN,
    SOLVER.AMP.ENABLED, as prepare_for_inference runs them), TorchScript (traced,
    FrozenBN folded) in torch, ONNX (traced, folded, opset :data:`DEFAULT_OPSET`) in
    onnxruntime with as many threads as torch. Random weights (the latency does not
    depend on them; the ROI heads see the RPN's full POST_NMS_TOPK_TEST proposals).

    Returns one row per (short side, runtime): ``{"short_side", "input", "runtime",
    "seconds", "threads"}``, the median of ``repeats`` interleaved rounds after ``warmup``
    untimed runs of each (TorchScript's profiling executor optimises on the first runs).
    """
    threads = torch.get_num_threads()
    image = sample_image() if image is None else image
    # A landscape image, as photos are: 4:3.
    h = image.shape[0]
    image = np.ascontiguousarray(np.concatenate([image, image[:, : image.shape[1] // 3]], axis=1))
    assert image.shape[0] == h

    def variant(**switches):
        c = cfg.clone()
        c.defrost()
        for k, v in switches.items():
            if k == "AMP":
                c.SOLVER.AMP.ENABLED = v
            else:
                c.MODEL.RESNEXT[k] = v
        c.MODEL.WEIGHTS = ""
        c.freeze()
        return c

    plain = variant(CHANNELS_LAST=False, FAST_ROI_ALIGN=False, FOLD_FROZEN_BN=False, AMP=False, COMPILE=False)
    fast = variant(CHANNELS_LAST=True, FAST_ROI_ALIGN=True, FOLD_FROZEN_BN=True, AMP=True, COMPILE=False)
    torch.manual_seed(0)
    eager = Trainer.build_model(plain).eval()
    state = eager.state_dict()
    fast_model = Trainer.build_model(fast).eval()
    fast_model.load_state_dict(state)
    fast_model = prepare_for_inference(fast_model, fast)
    folded_cfg = export_config(variant(CHANNELS_LAST=False, FAST_ROI_ALIGN=False, FOLD_FROZEN_BN=True, AMP=False))
    folded = Trainer.build_model(folded_cfg).eval()
    folded.load_state_dict(state)
    folded = fold_frozen_bn(folded)

    def model_input(side: int) -> Tensor:
        c = plain.clone()
        c.defrost()
        c.INPUT.MIN_SIZE_TEST = side
        c.INPUT.MAX_SIZE_TEST = max(c.INPUT.MAX_SIZE_TEST, side * 2)
        return preprocess(c, image)

    # One export of each kind serves every size (the exports take any H, W: verified).
    first = model_input(short_sides[0])
    ts_dir, onnx_dir = os.path.join(work_dir, "torchscript"), os.path.join(work_dir, "onnx")
    export_model(folded, first, ts_dir, format="torchscript", method="tracing")
    export_model(folded, first, onnx_dir, format="onnx", method="tracing")
    run_ts = load_exported(os.path.join(ts_dir, "model.ts"))
    run_onnx = load_exported(os.path.join(onnx_dir, "model.onnx"), threads=threads)
    rows = []
    for side in short_sides:
        x = model_input(side)
        shape = "x".join(str(s) for s in x.shape[1:])
        runs = {
            "eager fp32": lambda: eager([{"image": x}]),
            "fast path": lambda: fast_model([{"image": x}]),
            "TorchScript (traced, folded)": lambda: run_ts(x),
            "onnxruntime (folded)": lambda: run_onnx(x),
        }
        measured = measure_interleaved(
            {name: _no_grad(fn) for name, fn in runs.items()},
            device="cpu",
            images=1,
            repeats=repeats,
            warmup=warmup,
            baseline=None,
            memory=False,
            label=f"inference {shape}",
            log=logger.debug,
        )
        for m in measured:
            sec = m["median_s"]
            rows.append({"short_side": side, "input": shape, "runtime": m["contender"], "seconds": sec, "threads": threads})
            logger.info("latency %s %s: %.3f s", shape, m["contender"], sec)
    return rows


def benchmark_table(rows: Sequence[Dict[str, object]]) -> List[str]:
    """:func:`benchmark_latency` rows as a markdown table: one line per runtime,
    one column per input size, seconds per image and speed-up over eager fp32."""
    sizes = list(dict.fromkeys(r["input"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    sec = {(r["runtime"], r["input"]): float(r["seconds"]) for r in rows}
    base = runtimes[0]
    lines = ["| runtime | " + " | ".join(f"{s} (s/image)" for s in sizes) + " |"]
    lines.append("|---|" + "---|" * len(sizes))
    for rt in runtimes:
        cells = []
        for s in sizes:
            t = sec.get((rt, s))
            cells.append("-" if t is None else f"{t:.3f} ({sec[(base, s)] / t:.2f}x)")
        lines.append(f"| {rt} | " + " | ".join(cells) + " |")
    return lines
