# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Loss curves and AP-vs-iteration curves from Detectron2's ``metrics.json``.

Works on any output folder of this project: a plain ``tools/train_net.py`` run
(``OUTPUT_DIR/metrics.json``) or the Appendix B schedule, whose stages each write
their own (``OUTPUT_DIR/stage1_rpn/metrics.json``, ``stage3_fast_rcnn/...``)::

    python tools/plot_results.py output/demo                 # -> output/demo/loss_curves.png
    python tools/plot_results.py output/a output/b --output plots/

Writes ``loss_curves.png`` (one panel per run, every ``loss*`` key over iterations)
and, when a run evaluated during training (``TEST.EVAL_PERIOD``), ``ap_curves.png``
(COCO AP, AP50, AP75 of each task over iterations). Files are written atomically.
"""
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from .errors import ConfigError, MissingFileError  # noqa: E402
from .utils.io import atomic_write  # noqa: E402

__all__ = [
    "read_metrics",
    "find_runs",
    "loss_keys",
    "plot_loss_curves",
    "plot_ap_curves",
    "plot_results",
]

METRICS = "metrics.json"
_AP_KEYS = ("AP", "AP50", "AP75")


def read_metrics(path: str) -> List[dict]:
    """The rows of a Detectron2 ``metrics.json`` (JSON lines, one dict per write).

    A last line cut short by a killed run is skipped; any other malformed line is
    an error naming the file and line.
    """
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue  # half-written by a run that was killed
            raise ConfigError(f"{path}, line {i + 1}: not a JSON object ({e})") from e
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {i + 1}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def find_runs(folder: str) -> Dict[str, str]:
    """``{label: metrics.json path}`` for ``folder`` and its sub-folders, in sorted
    order; the label is the sub-folder's path relative to ``folder`` (or the
    folder's own name)."""
    if os.path.isfile(folder):
        return {os.path.basename(os.path.dirname(os.path.abspath(folder))) or folder: folder}
    if not os.path.isdir(folder):
        raise MissingFileError(f"{folder!r}: no such folder (give an OUTPUT_DIR or a metrics.json)")
    runs = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        if METRICS in filenames:
            rel = os.path.relpath(dirpath, folder)
            label = os.path.basename(os.path.abspath(folder)) if rel == "." else rel
            runs[label] = os.path.join(dirpath, METRICS)
    return runs


def loss_keys(rows: Sequence[dict]) -> List[str]:
    """The loss keys logged in ``rows``: ``total_loss`` first, then ``loss_*`` sorted."""
    keys = sorted({k for r in rows for k in r if k.startswith("loss") or k == "total_loss"})
    return sorted(keys, key=lambda k: (k != "total_loss", k))


def _series(rows: Sequence[dict], key: str):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and "iteration" in r and math.isfinite(v):
            xs.append(r["iteration"] + 1)  # Detectron2 logs 0-based iterations
            ys.append(v)
    return xs, ys


def _save(fig, out_file: str) -> str:
    try:
        atomic_write(out_file, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out_file


def _panels(n: int):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def plot_loss_curves(runs: Dict[str, str], out_file: str, *, title: Optional[str] = None) -> str:
    """Draw every loss of every run over iterations, one panel per run.

    Args:
        runs: ``{label: metrics.json path}`` (see :func:`find_runs`).
        out_file: the PNG to write.
        title: the figure title.

    Returns:
        ``out_file``.
    """
    data = {label: read_metrics(p) for label, p in runs.items()}
    data = {k: v for k, v in data.items() if loss_keys(v)}
    if not data:
        raise ConfigError(f"No losses in {', '.join(runs.values()) or 'any metrics.json'}: nothing to plot.")
    fig, axes = _panels(len(data))
    for ax, (label, rows) in zip(axes, data.items()):
        for key in loss_keys(rows):
            xs, ys = _series(rows, key)
            if xs:
                bold = key == "total_loss"
                ax.plot(xs, ys, label=key, lw=2.2 if bold else 1.3, color="black" if bold else None,
                        marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (median of the logging window)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_file)


def plot_ap_curves(runs: Dict[str, str], out_file: str, *, title: Optional[str] = None) -> Optional[str]:
    """Draw COCO AP / AP50 / AP75 over iterations for the runs that evaluated
    during training (rows with ``bbox/AP``, ``segm/AP``...).

    Returns:
        ``out_file``, or None (nothing written) when no run has evaluation rows.
    """
    data = {}
    for label, p in runs.items():
        rows = read_metrics(p)
        tasks = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/AP")})
        if tasks:
            data[label] = (rows, tasks)
    if not data:
        return None
    fig, axes = _panels(len(data))
    for ax, (label, (rows, tasks)) in zip(axes, data.items()):
        for task in tasks:
            for key in _AP_KEYS:
                xs, ys = _series(rows, f"{task}/{key}")
                if xs:
                    ax.plot(xs, ys, marker="o", label=f"{task} {key}")
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("COCO AP (%)")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_file)


def plot_results(folders: Sequence[str], output: Optional[str] = None) -> Dict[str, str]:
    """Find the runs under ``folders`` and draw their curves into ``output``
    (default: the first folder). Returns ``{"loss_curves": path, "ap_curves": path}``
    (the latter only when there was an evaluation during training)."""
    runs: Dict[str, str] = {}
    for folder in folders:
        found = find_runs(folder)
        if len(folders) > 1:
            found = {f"{os.path.basename(os.path.abspath(folder))}/{k}": v for k, v in found.items()}
        runs.update(found)
    if not runs:
        raise MissingFileError(
            f"No {METRICS} under {', '.join(folders)}: train first (tools/train_net.py writes it)."
        )
    output = output or (folders[0] if os.path.isdir(folders[0]) else os.path.dirname(folders[0]))
    out = {"loss_curves": plot_loss_curves(runs, os.path.join(output, "loss_curves.png"))}
    ap = plot_ap_curves(runs, os.path.join(output, "ap_curves.png"))
    if ap:
        out["ap_curves"] = ap
    return out
