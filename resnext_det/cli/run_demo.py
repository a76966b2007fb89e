# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What ``tools/run_demo.py`` (``make demo``) runs: the paper's Appendix B schedule, end
to end, on the CPU, on the bundled shapes data; then its results, as numbers and pictures.

:func:`main` runs stage 0 (``tools/pretrain_shapes.py``, :func:`run_pretrain_subprocess`)
and the schedule (``tools/train_net.py``, :func:`run_schedule_subprocess`) as
subprocesses of the repository's ``tools/`` (a Ctrl-C there ends the demo with one line
saying where the tool stopped: :data:`~resnext_det.cli.tool.INTERRUPT_NOTE_ENV`), then
reads the stages' markers (:func:`collect_results`) and writes ``final_results.json``,
``results.md`` (:func:`write_results_md`), ``loss_curves.png``, ``val_*.png``
(:func:`draw_val_images`) and ``summary.json`` into the output folder, and checks the
:data:`TARGET` at the default length. ``tools/run_demo.py`` describes the outputs.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..checkpoint import final_checkpoint
from ..engine import setup_cfg
from ..errors import ConfigError, Interrupted
from ..inference import Predictor
from ..plots import plot_loss_curves
from ..pretrain import STAGE0_DIR, read_pretrain_marker
from ..unshared import SCHEDULE, STAGES, read_stage_marker
from ..utils.io import atomic_write_json, atomic_write_text
from ..visualize import instances_to_draw, write_image
from .tool import INTERRUPT_NOTE_ENV, INTERRUPTED_EXIT

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_OUTPUT",
    "TARGET",
    "COLUMNS",
    "REFERENCE",
    "REQUEST_FILE",
    "StageFailed",
    "schedule_overrides",
    "run_pretrain_subprocess",
    "run_schedule_subprocess",
    "collect_results",
    "write_results_md",
    "draw_val_images",
    "main",
]

#: The demo's config, relative to the repository root.
DEFAULT_CONFIG = os.path.join("configs", "quickstart", "faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml")
#: The demo's output folder, relative to the repository root.
DEFAULT_OUTPUT = os.path.join("output", "demo")
#: The demo's target on shapes_val (issue 5), checked at the default length.
TARGET = {"AP": 50.0, "AP50": 80.0}
#: Columns of the results table (Detectron2's COCOEvaluator names).
COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: For scale: Detectron2's built-in X-50-32x4d FPN with GN, from scratch, on a similar
#: 3-shape set at 256 px, batch 4, 200 iterations (measured on this 2-core machine).
REFERENCE = {
    "label": "Detectron2 built-in X-50-32x4d FPN, GN, from scratch, joint, 200 it",
    "AP": 47.4,
    "AP50": 70.9,
    "minutes": 12.8,
}
#: The settings of the demo run an output folder holds (a rerun with others is refused).
REQUEST_FILE = "demo_request.json"


# ----------------------------------------------------------------------------- helpers

def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.1f}"


def _scaled_steps(steps: Sequence[int], old_max: int, new_max: int) -> List[int]:
    out = sorted({round(s * new_max / old_max) for s in steps})
    return [s for s in out if 0 < s < new_max]


def schedule_overrides(cfg, *, rpn_iters: Optional[int], fast_rcnn_iters: Optional[int]) -> List[str]:
    """``KEY VALUE`` overrides for a shorter schedule: each stage's MAX_ITER, with its
    lr steps (and the warm-up) scaled in proportion."""
    opts: List[str] = []
    for node, iters in (("RPN", rpn_iters), ("FAST_RCNN", fast_rcnn_iters)):
        if iters is None:
            continue
        if iters < 1:
            raise ConfigError(f"--{node.lower().replace('_', '-')}-iters must be >= 1, got {iters}")
        s = cfg.UNSHARED[node]
        steps = _scaled_steps(s.STEPS, s.MAX_ITER, iters)
        opts += [f"UNSHARED.{node}.MAX_ITER", str(iters),
                 f"UNSHARED.{node}.STEPS", "(" + "".join(f"{x}," for x in steps) + ")"]
    if opts:
        longest = max(v for v in (rpn_iters, fast_rcnn_iters) if v is not None)
        warm = min(cfg.SOLVER.WARMUP_ITERS, max(1, longest // 4))
        opts += ["SOLVER.WARMUP_ITERS", str(warm)]
    return opts


def _env(root: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DETECTRON2_DATASETS", os.path.join(root, "datasets"))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class StageFailed(Exception):
    """A stage's tool ended with an error it has already printed (its one line, or its
    traceback): the demo ends with the same exit status and no message of its own."""

    def __init__(self, returncode: int):
        super().__init__(returncode)
        self.returncode = returncode


def _stop(proc: subprocess.Popen) -> None:
    """After Ctrl-C here: wait for the tool to stop. A Ctrl-C typed in the terminal reached
    it too (stage 0 finishes its iteration and saves it); a SIGINT sent to this process
    alone is passed on after a few seconds; Ctrl-C again, or a minute more, kills it."""
    for sig, wait in ((None, 5.0), (signal.SIGINT, 60.0), (signal.SIGKILL, None)):
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.communicate(timeout=wait)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            continue


def _run_stage_tool(script: str, args: Sequence[str], log_dir: str, *, root: str, quiet: bool, stage: str) -> int:
    """``python tools/<script> *args`` from the repository root ``root``. Returns its exit status
    (0). Ctrl-C raises :class:`Interrupted` with what the tool says of where it stopped
    (``stage`` names it when it says nothing); an error it printed raises
    :class:`StageFailed`."""
    cmd = [sys.executable, os.path.join(root, "tools", script), *args]
    print("+ " + " ".join(cmd), flush=True)
    kw = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) if quiet else {}
    with tempfile.TemporaryDirectory(prefix="run_demo-") as tmp:
        note = os.path.join(tmp, "interrupted.json")
        proc = subprocess.Popen(cmd, cwd=root, env=dict(_env(root), **{INTERRUPT_NOTE_ENV: note}), **kw)
        try:
            _, err = proc.communicate()
        except KeyboardInterrupt:
            _stop(proc)
            raise _interrupted(note, stage) from None
        if proc.returncode in (INTERRUPTED_EXIT, -signal.SIGINT):  # a SIGINT that reached it alone
            raise _interrupted(note, stage)
    if proc.returncode != 0:
        if quiet and err:
            sys.stderr.write(err[-4000:])
        if proc.returncode != 2:  # 2: its one line said what to fix
            print(f"run_demo.py: tools/{script} failed (exit status {proc.returncode}); its log is "
                  f"{os.path.join(log_dir, 'log.txt')}. Rerun the same command to resume.", file=sys.stderr)
        raise StageFailed(proc.returncode)
    return proc.returncode


def _interrupted(note: str, stage: str) -> Interrupted:
    """The demo's Ctrl-C: where the interrupted tool says it stopped and how to continue
    (``note``, see :data:`INTERRUPT_NOTE_ENV`; rerunning the demo reruns that tool), or
    ``stage`` when it could not say."""
    try:
        with open(note) as f:
            said = json.load(f)
    except (OSError, ValueError):
        said = {}
    if said.get("where"):
        return Interrupted(said["where"], said.get("how") or "rerun the same command to continue")
    return Interrupted(f"in {stage}", "rerun the same command to continue: finished stages are skipped, and an "
                                      "interrupted one resumes from its last checkpoint")


def run_pretrain_subprocess(config_file: str, output_dir: str, opts: Sequence[str], *, root: str,
                            iters: Optional[int], quiet: bool = False) -> Dict[str, Any]:
    """Stage 0: ``tools/pretrain_shapes.py`` (of the repository ``root``) into
    ``output_dir/stage0_pretrain``; returns its ``pretrain_done.json``."""
    folder = os.path.join(output_dir, STAGE0_DIR)
    args = ["--config-file", config_file, "--output-dir", folder]
    if iters is not None:
        args += ["--iters", str(iters)]
    _run_stage_tool("pretrain_shapes.py", [*args, *opts], folder, root=root, quiet=quiet,
                    stage="stage 0: pretraining")
    done = read_pretrain_marker(folder)
    if done is None:
        raise RuntimeError(f"tools/pretrain_shapes.py ended without {folder}/pretrain_done.json")
    return done


def run_schedule_subprocess(config_file: str, output_dir: str, opts: Sequence[str], *, root: str,
                            quiet: bool = False) -> None:
    """``tools/train_net.py --config-file config_file OUTPUT_DIR output_dir *opts`` (of the
    repository ``root``)."""
    _run_stage_tool("train_net.py", ["--config-file", config_file, "OUTPUT_DIR", output_dir, *opts], output_dir,
                    root=root, quiet=quiet, stage="the Appendix B schedule")


# ----------------------------------------------------------------------------- results
def collect_results(cfg) -> Dict[str, Any]:
    """Metrics and timings of a finished schedule, from its stage markers."""
    markers = {s: read_stage_marker(cfg, s) for s in STAGES}
    missing = [s for s, m in markers.items() if m is None]
    if missing:
        raise RuntimeError(f"Stages {missing} of {cfg.OUTPUT_DIR} have not finished: rerun to resume.")
    res = markers["eval"]["results"]
    test = cfg.DATASETS.TEST[0]
    kind = "end_to_end" if res.get("end_to_end") else "stored_proposals"
    bbox = res[kind][test]["bbox"]
    stored = (res.get("stored_proposals") or {}).get(test, {}).get("bbox")
    proposals = markers["proposals"]["results"].get(f"test:{test}", {})
    return {
        "dataset": test,
        "model": "UnsharedRCNN end to end" if kind == "end_to_end" else "Fast R-CNN on stored proposals",
        "bbox": {k: (float("nan") if v is None else v) for k, v in bbox.items()},
        "stored_proposals_bbox": stored,
        "proposal_recall": {k: v for k, v in proposals.items() if k.startswith("AR") and "@100" in k},
        "stage_seconds": {s: markers[s].get("seconds") for s in STAGES},
        "iterations": {st.name: markers[st.name]["results"].get("max_iter") for st in SCHEDULE if st.trains},
    }


def write_results_md(path: str, results: Dict[str, Any], *, config_file: str, wall_seconds: float,
                     checked: bool) -> str:
    """The metrics as a Markdown table, with the target and the timings."""
    box = results["bbox"]
    classes = [k for k in box if k.startswith("AP-")]
    lines = [
        "# make demo: Appendix B schedule on shapes_val",
        "",
        f"Config: `{config_file}`. Model: {results['model']} (RPN backbone -> proposals -> "
        "Fast R-CNN backbone). COCO box metrics, %:",
        "",
        "| model | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
        "| ours, end to end | " + " | ".join(_fmt(box.get(c)) for c in COLUMNS) + " |",
    ]
    if results.get("stored_proposals_bbox"):
        s = results["stored_proposals_bbox"]
        lines.append("| ours, Fast R-CNN on stored proposals | "
                     + " | ".join(_fmt(s.get(c)) for c in COLUMNS) + " |")
    lines.append(f"| target | {TARGET['AP']:.0f} | {TARGET['AP50']:.0f} |" + " |" * (len(COLUMNS) - 2))
    lines.append(f"| reference: {REFERENCE['label']} | {REFERENCE['AP']} | {REFERENCE['AP50']} |"
                 + " |" * (len(COLUMNS) - 2))
    if box.get("APl") is None or not math.isfinite(box["APl"]):
        lines += ["", f"APl is n/a: no {results['dataset']} object is COCO-large (area > 96^2)."]
    if classes:
        lines += ["", "| " + " | ".join(classes) + " |", "|" + "---:|" * len(classes),
                  "| " + " | ".join(_fmt(box[c]) for c in classes) + " |"]
    if results.get("pretrain_val_accuracy") is not None:
        lines += ["", f"Stage 0 (ImageNet stand-in) classifier: {results['pretrain_val_accuracy']:.1f}% "
                  f"accuracy on crops of {results['dataset']} (4 classes with background; chance 25%)."]
    if results.get("proposal_recall"):
        lines += ["", f"RPN proposals on {results['dataset']}, COCO average recall (%): "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in results["proposal_recall"].items())]
    lines += ["", "| stage | iterations | seconds |", "|---|---:|---:|"]
    for stage, sec in results["stage_seconds"].items():
        it = results["iterations"].get(stage)
        lines.append(f"| {stage} | {it if it is not None else ''} | {_fmt(sec)} |")
    lines.append(f"| whole run (this command) | | {wall_seconds:.1f} |")
    if checked:
        ok = all(box.get(k, float("nan")) >= v for k, v in TARGET.items())
        lines += ["", f"Target AP >= {TARGET['AP']:.0f} and AP50 >= {TARGET['AP50']:.0f}: "
                  + ("**met**" if ok else "**missed**")]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def draw_val_images(cfg, output_dir: str, *, num_images: int, scale: float = 2.0,
                    threshold: float = 0.5) -> List[str]:
    """Draw the first ``num_images`` of the test set: ground truth left, the
    end-to-end model's detections (score >= threshold) right, ``scale`` times the
    image size, with a caption strip on top. Returns the files written."""
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    dicts = DatasetCatalog.get(name)[:num_images]
    predictor = Predictor(cfg, weights=final_checkpoint(cfg.OUTPUT_DIR))
    written = []
    for d in dicts:
        bgr = cv2.imread(d["file_name"], cv2.IMREAD_COLOR)
        rgb = bgr[:, :, ::-1]
        # Boxes and labels only (the model predicts boxes): drop the polygons.
        boxes_only = dict(d, annotations=[{k: v for k, v in a.items() if k != "segmentation"}
                                          for a in d.get("annotations", [])])
        gt = Visualizer(rgb, meta, scale=scale).draw_dataset_dict(boxes_only).get_image()
        inst = instances_to_draw(predictor(bgr), threshold)
        pred = Visualizer(rgb, meta, scale=scale, instance_mode=ColorMode.IMAGE)
        pred = pred.draw_instance_predictions(inst).get_image()
        h = gt.shape[0]
        header = np.full((28, gt.shape[1] + pred.shape[1], 3), 255, np.uint8)
        cv2.putText(header, f"ground truth ({len(d.get('annotations', []))})", (8, 20),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(header, f"predictions, score >= {threshold:g} ({len(inst)})",
                    (gt.shape[1] + 8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        canvas = np.concatenate([header, np.concatenate([gt, pred[:h]], axis=1)], axis=0)
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        path = os.path.join(output_dir, f"val_{stem}.png")
        write_image(path, canvas)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- main
def _check_request(output_dir: str, request: Dict[str, Any], fresh: bool) -> None:
    """Refuse to mix the stages of two different demo runs in one folder."""
    path = os.path.join(output_dir, REQUEST_FILE)
    if fresh and os.path.isdir(output_dir):
        print(f"--fresh: deleting {output_dir}", flush=True)
        shutil.rmtree(output_dir)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != request:
            raise ConfigError(
                f"{output_dir} holds a demo run with other settings (before: {old}; now: {request}): "
                "rerun with --fresh to start over there, or choose another --output-dir."
            )
    elif os.path.isdir(output_dir) and any(n.startswith("stage") for n in os.listdir(output_dir)):
        raise ConfigError(f"{output_dir} holds stages of another run: use --fresh or another --output-dir.")
    atomic_write_json(path, request)


def main(args, *, root: str) -> int:
    """The demo of ``tools/run_demo.py``'s parsed ``args``, with the tools, configs and
    datasets of the repository ``root`` (it runs there); returns its exit status (1: the
    target was missed; a stage's own on failure)."""
    try:
        return _main(args, root)
    except StageFailed as e:
        return e.returncode
    except KeyboardInterrupt as e:  # between the stages' tools: nothing of a stage is lost
        if isinstance(e, Interrupted):
            raise
        raise Interrupted("", "rerun the same command to continue: finished stages are skipped") from e


def _main(args, root: str) -> int:
    t_start = time.perf_counter()
    os.chdir(root)
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(root, "datasets"))
    if args.num_images < 0:
        raise ConfigError(f"--num-images must be >= 0, got {args.num_images}")
    opts = list(args.opts)
    if opts[:1] == ["--"]:
        opts = opts[1:]
    if len(opts) % 2:
        raise ConfigError(f"config overrides come in KEY VALUE pairs, got {opts}: add the last one's value or remove it")

    base = setup_cfg(args.config_file, opts)
    if not base.UNSHARED.ENABLED:
        raise ConfigError(f"{args.config_file} does not enable UNSHARED.ENABLED (the Appendix B schedule the "
                          "demo runs): use a configs/quickstart/*appendixB.yaml config")
    opts += schedule_overrides(base, rpn_iters=args.rpn_iters, fast_rcnn_iters=args.fast_rcnn_iters)
    if args.seed is not None:
        opts += ["SEED", str(args.seed)]
    output_dir = os.path.abspath(args.output_dir)
    cfg = setup_cfg(args.config_file, opts + ["OUTPUT_DIR", output_dir])
    full_length = args.rpn_iters is None and args.fast_rcnn_iters is None and args.pretrain_iters is None
    request = {"config_file": args.config_file, "opts": opts,
               "pretrain": None if args.no_pretrain else {"iters": args.pretrain_iters}}
    _check_request(output_dir, request, args.fresh)

    pre = None
    train_opts = list(opts)
    if not args.no_pretrain:
        pre = run_pretrain_subprocess(args.config_file, output_dir, opts, root=root, iters=args.pretrain_iters,
                                      quiet=args.quiet)
        train_opts += ["MODEL.WEIGHTS", pre["weights"]]
    run_schedule_subprocess(args.config_file, output_dir, train_opts, root=root, quiet=args.quiet)
    setup_logger(name="resnext_det")
    results = collect_results(cfg)
    if pre is not None:
        results["stage_seconds"] = {"pretrain": pre["seconds"], **results["stage_seconds"]}
        results["iterations"]["pretrain"] = pre["settings"]["iters"]
        results["pretrain_val_accuracy"] = pre.get("val_accuracy")
    bbox = results["bbox"]
    atomic_write_json(os.path.join(output_dir, "final_results.json"), {"bbox": bbox})

    runs = {label: os.path.join(output_dir, folder, "metrics.json")
            for label, folder in (("stage 1: RPN", "stage1_rpn"), ("stage 3: Fast R-CNN", "stage3_fast_rcnn"))}
    runs = {k: v for k, v in runs.items() if os.path.isfile(v)}
    t0 = time.perf_counter()
    plot_loss_curves(runs, os.path.join(output_dir, "loss_curves.png"),
                     title="Appendix B schedule on shapes: training losses")
    pictures = draw_val_images(cfg, output_dir, num_images=args.num_images)
    t_pictures = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    check = full_length and not args.no_check
    write_results_md(os.path.join(output_dir, "results.md"), results, config_file=args.config_file,
                     wall_seconds=wall, checked=check)
    atomic_write_json(os.path.join(output_dir, "summary.json"), {
        "config_file": args.config_file, "opts": train_opts, "stage_seconds": results["stage_seconds"],
        "pretrain_val_accuracy": results.get("pretrain_val_accuracy"),
        "iterations": results["iterations"], "pictures_seconds": round(t_pictures, 1),
        "wall_seconds": round(wall, 1), "bbox": bbox,
    })

    print("\n" + "=" * 72)
    print(f"make demo: done in {wall / 60:.1f} min. Outputs in {output_dir}/")
    print("  final_results.json, results.md, loss_curves.png, "
          f"{len(pictures)} val_*.png, stage*/metrics.json + TensorBoard events")
    print(f"\n  {results['model']} on {results['dataset']} (COCO box metrics, %):")
    print("  " + "  ".join(f"{c:>5s}" for c in COLUMNS))
    print("  " + "  ".join(f"{_fmt(bbox.get(c)):>5s}" for c in COLUMNS))
    print("\n  stage time (s): " + ", ".join(f"{s} {_fmt(v)}" for s, v in results["stage_seconds"].items())
          + f"; pictures {t_pictures:.1f}; whole command {wall:.1f}")
    status = 0
    if check:
        missed = [f"{k} {_fmt(bbox.get(k))} < {v:.0f}" for k, v in TARGET.items()
                  if not bbox.get(k, float("nan")) >= v]
        if missed:
            print(f"\n  TARGET MISSED: {', '.join(missed)}", file=sys.stderr)
            status = 1
        else:
            print(f"\n  Target met: AP >= {TARGET['AP']:.0f}, AP50 >= {TARGET['AP50']:.0f}.")
    print("=" * 72)
    return status
