# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The paper's Appendix B schedule: RPN and Fast R-CNN that do not share
features, trained one after the other, then COCO evaluation.

Xie et al., CVPR 2017, Appendix B (numbers in ``UNSHARED.*``, see
:func:`resnext_det.add_resnext_config`):

1. ``rpn``: an RPN-only model (Detectron2 ``ProposalNetwork``, backbone from
   ``MODEL.WEIGHTS``), 8 GPUs x 2 images, 256 anchors per image, lr 0.02 for
   120k iterations then 0.002 for 60k;
2. ``proposals``: the trained RPN writes proposals for every training and test
   dataset (Detectron2's proposal-file format);
3. ``fast_rcnn``: a detector with its own backbone, again from ``MODEL.WEIGHTS``,
   learning from the stored proposals only: 8 GPUs x 1 image, 64 RoIs per image,
   lr 0.005 for 120k then 0.0005 for 60k. At the end the two trained networks
   are written as one :class:`UnsharedRCNN` checkpoint, ``OUTPUT_DIR/model_final.pth``;
4. ``eval``: COCO AP of the Fast R-CNN on the stored test proposals (the
   paper's protocol) and of the end-to-end UnsharedRCNN, beside Table 8.

Every stage works in its own folder ``OUTPUT_DIR/stage{k}_{name}`` and marks its
completion with ``stage_done.json``. Rerunning skips finished stages and
resumes an interrupted training stage from its last checkpoint.
"""
import datetime
import hashlib
import json
import logging
import math
import os
import time
import zipfile
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import inference_on_dataset, print_csv_format

from ..checkpoint import METADATA_KEY, final_checkpoint
from ..engine import preemption
from ..engine.setup import override_keys
from ..engine.trainer import Trainer
from ..inference import build_inference_model, load_model
from ..modeling.spec import ResNeXtSpec
from ..utils.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    remove_stale_temporaries,
)
from .stages import PER_STAGE_SOLVER, STAGE_DIRS, STAGES, proposal_file, stage_configs, stage_dir
from .proposals import (
    check_proposal_file,
    dump_proposals,
    proposal_file_meta,
)

from ..errors import ConfigError

__all__ = [
    "STAGES",
    "STAGE_DIRS",
    "TABLE8",
    "export_unshared_checkpoint",
    "proposal_file",
    "read_stage_marker",
    "run_schedule",
    "stage_configs",
]

logger = logging.getLogger(__name__)

MARKER = "stage_done.json"
# Keys that change the proposals, named in proposal files' metadata (the config digest
# covers the rest): a file made with other values is made again.
_PROPOSAL_KEYS = (
    "MODEL.RPN.NMS_THRESH",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
    "INPUT.FORMAT",
)

# Table 8 of the paper: Faster R-CNN on COCO minival (coco_2014_minival), keyed
# by (depth, cardinality C, bottleneck width d). AP is COCO's AP@[.5:.95].
TABLE8: Dict[tuple, Dict[str, Any]] = {
    (50, 1, 64): {"backbone": "ResNet-50 (1x64d)", "AP50": 47.6, "AP": 26.5},
    (50, 32, 4): {"backbone": "ResNeXt-50 (32x4d)", "AP50": 49.7, "AP": 27.5},
    (101, 1, 64): {"backbone": "ResNet-101 (1x64d)", "AP50": 51.1, "AP": 29.8},
    (101, 32, 4): {"backbone": "ResNeXt-101 (32x4d)", "AP50": 51.9, "AP": 30.0},
}
PAPER_TEST_SET = "coco_2014_minival"

# Keys that do not change what a stage computes (ignored when a finished stage's
# config is compared with the current one).
_VOLATILE = (
    "OUTPUT_DIR",
    "DATALOADER.NUM_WORKERS",
    "MODEL.DEVICE",
    "SOLVER.CHECKPOINT_PERIOD",
    "TEST.EVAL_PERIOD",
    "VIS_PERIOD",
    "CUDNN_BENCHMARK",
    "SEED",
    "DATASETS.PROPOSAL_FILES_TRAIN",
    "DATASETS.PROPOSAL_FILES_TEST",
    "UNSHARED.PROPOSALS.CHUNK_IMAGES",  # how stage 2 saves its work, not what it computes
)
def _check_schedule_config(cfg: CfgNode, cli_opts: Sequence[str]) -> None:
    if cfg.MODEL.META_ARCHITECTURE != "UnsharedRCNN":
        raise ConfigError(
            "UNSHARED.ENABLED trains the Appendix B schedule, whose final checkpoint is an "
            "UnsharedRCNN: set MODEL.META_ARCHITECTURE to 'UnsharedRCNN' (it was "
            f"{cfg.MODEL.META_ARCHITECTURE!r}), e.g. start from "
            "configs/COCO-Detection/Base-AppendixB-C4.yaml."
        )
    if cfg.MODEL.LOAD_PROPOSALS or cfg.DATASETS.PROPOSAL_FILES_TRAIN or cfg.DATASETS.PROPOSAL_FILES_TEST:
        raise ConfigError(
            "The schedule computes its own proposals (stage 2): leave MODEL.LOAD_PROPOSALS "
            "False and DATASETS.PROPOSAL_FILES_TRAIN/TEST empty."
        )
    if not cfg.DATASETS.TRAIN or not cfg.DATASETS.TEST:
        raise ConfigError("The schedule needs DATASETS.TRAIN and DATASETS.TEST (evaluated in stage 4).")
    set_keys = set(override_keys(cli_opts))
    wrong = [f"SOLVER.{k}" for k in PER_STAGE_SOLVER if f"SOLVER.{k}" in set_keys]
    if wrong:
        raise ConfigError(
            f"{', '.join(wrong)} would be ignored: each stage of the schedule has its own "
            "solver settings. Set UNSHARED.RPN.<KEY> and/or UNSHARED.FAST_RCNN.<KEY> instead."
        )


# ----------------------------------------------------------------------------
# Stage markers
# ----------------------------------------------------------------------------
def read_stage_marker(cfg: CfgNode, stage: str) -> Optional[Dict[str, Any]]:
    """The completion record of ``stage`` (its ``stage_done.json``), or None if
    the stage has not finished."""
    path = os.path.join(stage_dir(cfg, stage), MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _flat(cfg: CfgNode, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _identity(cfg: CfgNode, stage: str) -> Dict[str, Any]:
    """The config keys that determine what ``stage`` computes."""
    keep_unshared = {"proposals": "UNSHARED.PROPOSALS.", "eval": "UNSHARED.EVAL_END_TO_END"}
    flat = _flat(cfg)
    return {
        k: v
        for k, v in flat.items()
        if k not in _VOLATILE
        and (not k.startswith("UNSHARED.") or k.startswith(keep_unshared.get(stage, "~")))
    }


def _loads(path: str) -> bool:
    """Whether a checkpoint (a torch zip) is whole: its central directory, written last,
    is readable. A file cut short by a kill or a full disk is not."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _broken_outputs(cfg: CfgNode, cfgs: Dict[str, CfgNode], stage: str) -> Optional[str]:
    """The first output of a finished ``stage`` that is missing or does not load, or None."""
    if stage in ("rpn", "fast_rcnn"):
        files = [final_checkpoint(cfgs[stage].OUTPUT_DIR)]
        if stage == "fast_rcnn":
            files.append(final_checkpoint(cfg.OUTPUT_DIR))
        return next((f for f in files if not _loads(f)), None)
    if stage == "proposals":
        frcn = cfgs["fast_rcnn"].DATASETS
        for f in list(frcn.PROPOSAL_FILES_TRAIN) + list(frcn.PROPOSAL_FILES_TEST):
            if not (os.path.isfile(f) and os.path.getsize(f) > 0 and proposal_file_meta(f) is not None):
                return f
        return None
    results = os.path.join(stage_dir(cfg, "eval"), "results.json")
    try:
        with open(results) as fh:
            json.load(fh)
    except (OSError, ValueError):
        return results
    return None


def _stage_cfg_for_marker(cfg: CfgNode, cfgs: Dict[str, CfgNode], stage: str) -> CfgNode:
    return cfgs["rpn"] if stage in ("rpn", "proposals") else cfgs["fast_rcnn"]


def _warn_if_changed(cfg, cfgs, stage: str, marker: Dict[str, Any]) -> None:
    old = marker.get("config_keys")
    if not isinstance(old, dict):
        return
    new = json.loads(json.dumps(_identity(_stage_cfg_for_marker(cfg, cfgs, stage), stage), default=str))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        logger.warning(
            f"Stage {stage!r} finished earlier with another config (differs in "
            f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}); its result is kept. "
            f"To redo it, delete {stage_dir(cfg, stage)} (and the later stages' folders)."
        )


# ----------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------
def _main_first(fn: Callable[[], Any]) -> None:
    """Run ``fn`` (a check) on the main process; if it fails, fail everywhere
    instead of leaving the other processes waiting at the next barrier."""
    err = None
    if comm.is_main_process():
        try:
            fn()
        except Exception as e:  # re-raised below, on every process
            err = e
    msgs = comm.all_gather(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if msgs[0] is not None:
        raise RuntimeError(f"The main process stopped the schedule: {msgs[0]}")


def _latest_losses(trainer: DefaultTrainer) -> Dict[str, float]:
    try:
        latest = trainer.storage.latest()
    except AttributeError:
        return {}
    return {k: float(v[0]) for k, v in latest.items() if "loss" in k}


def _train_stage(stage_cfg: CfgNode) -> Dict[str, Any]:
    """Train one stage with Detectron2's trainer, resuming from the stage
    folder's last checkpoint. Evaluation is left to stage 4."""
    c = stage_cfg.clone()
    c.defrost()
    c.DATASETS.TEST = ()
    c.DATASETS.PROPOSAL_FILES_TEST = ()
    c.freeze()
    if comm.is_main_process():
        os.makedirs(c.OUTPUT_DIR, exist_ok=True)
        atomic_write_text(os.path.join(c.OUTPUT_DIR, "config.yaml"), c.dump())
    trainer = Trainer(c)  # scales batch, lr and iterations to the world size
    s = trainer.cfg.SOLVER
    now = {"world_size": comm.get_world_size(), "ims_per_batch": s.IMS_PER_BATCH, "max_iter": s.MAX_ITER}
    started = os.path.join(c.OUTPUT_DIR, "stage_started.json")
    if os.path.isfile(started):
        with open(started) as f:
            before = json.load(f)
        if before != now:
            logger.warning(
                f"{c.OUTPUT_DIR} was started with {before} and resumes with {now}: training "
                "continues at the stored iteration of the new schedule."
            )
    comm.synchronize()
    if comm.is_main_process():
        atomic_write_json(started, now)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter >= trainer.max_iter:
        logger.info(f"{c.OUTPUT_DIR} is trained to its MAX_ITER already; delete it to retrain.")
    trainer.train()
    comm.synchronize()
    final = final_checkpoint(c.OUTPUT_DIR)
    if not os.path.isfile(final):
        raise RuntimeError(f"Training finished but {final} was not written.")
    return {
        "model_final": final,
        "world_size": comm.get_world_size(),
        "ims_per_batch": s.IMS_PER_BATCH,
        "base_lr": s.BASE_LR,
        "steps": list(s.STEPS),
        "max_iter": s.MAX_ITER,
        "final_losses": _latest_losses(trainer),
    }


def _stage_rpn(cfg, cfgs, force: bool) -> Dict[str, Any]:
    return _train_stage(cfgs["rpn"])


def _stage_proposals(cfg, cfgs, force: bool) -> Dict[str, Any]:
    rpn_cfg = cfgs["rpn"]
    weights = final_checkpoint(rpn_cfg.OUTPUT_DIR)
    model = load_model(rpn_cfg, weights)  # strict: the RPN stage's own complete checkpoint
    u = cfg.UNSHARED.PROPOSALS
    jobs = [("train", n, u.TRAIN_PRE_NMS_TOPK, u.TRAIN_POST_NMS_TOPK) for n in cfg.DATASETS.TRAIN]
    jobs += [
        ("test", n, cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
        for n in cfg.DATASETS.TEST
    ]
    # What the proposals are made from: the RPN's weights (their bytes, not their path) and
    # every RPN and test-input key. Files made from anything else are made again.
    flat = _flat(rpn_cfg)
    source = {
        "rpn_weights_sha256": file_sha256(weights),
        "rpn_config_sha256": hashlib.sha256(
            json.dumps(_identity(rpn_cfg, "rpn"), sort_keys=True, default=str).encode()
        ).hexdigest(),
        **{k: flat[k] for k in _PROPOSAL_KEYS},
    }
    out: Dict[str, Any] = {}
    for role, name, pre, post in jobs:
        path = proposal_file(cfg, name, post)
        key = f"{role}:{name}"
        if any(v.get("file") == path for v in out.values()):
            continue  # a dataset both trained and tested on, with one top-k
        expected = dict(source, dataset=name, pre_nms_topk=pre, post_nms_topk=post)
        found = proposal_file_meta(path)
        if not force and found == expected:
            logger.info(f"Proposals for {name}: {path} exists (written by an interrupted run)")
            out[key] = {"file": path}
            continue
        if found is not None:
            diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            logger.warning(f"Proposals for {name}: {path} was made from other settings ({', '.join(diff)}): "
                           "making them again.")
        stats = dump_proposals(
            model,
            rpn_cfg,
            name,
            path,
            pre_nms_topk=pre,
            post_nms_topk=post,
            meta=source,
            recall=role == "test",
            chunk_images=u.CHUNK_IMAGES,
        )
        out[key] = stats or {"file": path}
    return out


def export_unshared_checkpoint(rpn_weights: str, fast_rcnn_weights: str, output_file: str) -> str:
    """Write the two trained networks as one :class:`UnsharedRCNN` checkpoint
    (keys ``rpn.*`` and ``fast_rcnn.*``), atomically, and tag it as the last
    checkpoint of its folder (so ``--eval-only --resume`` finds it)."""
    model: Dict[str, torch.Tensor] = {}
    out: Dict[str, Any] = {"__stages__": {"rpn": rpn_weights, "fast_rcnn": fast_rcnn_weights}}
    for prefix, path in (("rpn.", rpn_weights), ("fast_rcnn.", fast_rcnn_weights)):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.update({prefix + k: v for k, v in ckpt.get("model", ckpt).items()})
        if METADATA_KEY in ckpt:  # input convention and architecture, checked when loaded
            out[METADATA_KEY] = ckpt[METADATA_KEY]
    out["model"] = model
    atomic_write(output_file, lambda f: torch.save(out, f))
    folder = os.path.dirname(os.path.abspath(output_file))
    atomic_write_text(os.path.join(folder, "last_checkpoint"), os.path.basename(output_file))
    return output_file


def _stage_fast_rcnn(cfg, cfgs, force: bool) -> Dict[str, Any]:
    frcn = cfgs["fast_rcnn"]
    for name, path in zip(frcn.DATASETS.TRAIN, frcn.DATASETS.PROPOSAL_FILES_TRAIN):
        _main_first(lambda name=name, path=path: check_proposal_file(path, name))
    res = _train_stage(frcn)
    final = final_checkpoint(cfg.OUTPUT_DIR)
    if comm.is_main_process():
        rpn_final = final_checkpoint(cfgs["rpn"].OUTPUT_DIR)
        export_unshared_checkpoint(rpn_final, res["model_final"], final)
        logger.info(f"UnsharedRCNN (both networks) written to {final}")
    comm.synchronize()
    res["unshared_model"] = final
    return res


def _evaluate(cfg: CfgNode, model, folder: str) -> Dict[str, Any]:
    results = {}
    for name in cfg.DATASETS.TEST:
        evaluator = Trainer.build_evaluator(cfg, name, os.path.join(folder, name))
        res = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
        if comm.is_main_process():
            logger.info(f"Evaluation of {name} ({folder}):")
            print_csv_format(res)
        results[name] = res
    return results


def _paper_row(cfg: CfgNode) -> Optional[Dict[str, Any]]:
    """The Table 8 row of the config's architecture, if the paper has one."""
    spec = ResNeXtSpec.from_config(cfg)
    if spec.standard_depth is None:
        return None
    return TABLE8.get((spec.standard_depth, spec.cardinality, spec.bottleneck_width))


_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _markdown(results: Dict[str, Any]) -> str:
    def fmt(v):
        return "–" if v is None or not math.isfinite(v) else f"{v:.1f}"

    lines = [
        "# Appendix B schedule: COCO box AP",
        "",
        "| model | dataset | " + " | ".join(_COLUMNS) + " |",
        "|---|---|" + "---|" * len(_COLUMNS),
    ]
    labels = {
        "stored_proposals": "ours: Fast R-CNN on stored proposals (stage 4)",
        "end_to_end": "ours: UnsharedRCNN end to end",
    }
    for kind, label in labels.items():
        for name, res in (results.get(kind) or {}).items():
            box = res.get("bbox", {})
            lines.append(f"| {label} | {name} | " + " | ".join(fmt(box.get(c)) for c in _COLUMNS) + " |")
    paper = results.get("paper_table8")
    if paper:
        lines.append(
            f"| paper, Table 8: {paper['backbone']} | {PAPER_TEST_SET} | "
            + " | ".join(fmt(paper.get(c)) for c in _COLUMNS)
            + " |"
        )
    # An evaluation that skipped unusable images (named in the log): its AP is not the dataset's.
    notes = [
        f"- {label}, {name}: {res['skipped_images']} image(s) skipped (unreadable, missing or of another "
        "size than the json's; named in the log and in skipped_images.json): AP over the others, not "
        "the whole dataset's."
        for kind, label in labels.items()
        for name, res in (results.get(kind) or {}).items()
        if res.get("skipped_images")
    ]
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def _stage_eval(cfg, cfgs, force: bool) -> Dict[str, Any]:
    folder = stage_dir(cfg, "eval")
    frcn = cfgs["fast_rcnn"].clone()
    frcn.defrost()
    frcn.OUTPUT_DIR = folder
    frcn.freeze()
    for name, path in zip(frcn.DATASETS.TEST, frcn.DATASETS.PROPOSAL_FILES_TEST):
        _main_first(lambda name=name, path=path: check_proposal_file(path, name))
    # The same model --eval-only evaluates: strict loading, FOLD_FROZEN_BN and AMP as configured.
    model = build_inference_model(frcn, final_checkpoint(cfgs["fast_rcnn"].OUTPUT_DIR))
    results: Dict[str, Any] = {
        "stored_proposals": _evaluate(frcn, model, os.path.join(folder, "stored_proposals"))
    }
    del model
    if cfg.UNSHARED.EVAL_END_TO_END:
        model = build_inference_model(cfg, final_checkpoint(cfg.OUTPUT_DIR))  # UnsharedRCNN
        results["end_to_end"] = _evaluate(cfg, model, os.path.join(folder, "end_to_end"))
    results["paper_table8"] = _paper_row(cfg)
    if comm.is_main_process():
        atomic_write_json(os.path.join(folder, "results.json"), results)
        md = _markdown(results)
        atomic_write_text(os.path.join(folder, "results.md"), md)
        logger.info("Appendix B results (also in %s):\n%s", os.path.join(folder, "results.md"), md)
    return results


_RUNNERS = {
    "rpn": _stage_rpn,
    "proposals": _stage_proposals,
    "fast_rcnn": _stage_fast_rcnn,
    "eval": _stage_eval,
}


def _plan(cfg: CfgNode, cfgs: Dict[str, CfgNode], world: int) -> str:
    ref = cfg.SOLVER.REFERENCE_WORLD_SIZE or world
    rows = [f"Appendix B schedule on {world} process(es) (reference: {ref}), OUTPUT_DIR={cfg.OUTPUT_DIR}"]
    for i, (stage, model) in enumerate((("rpn", "ProposalNetwork"), ("fast_rcnn", "Fast R-CNN"))):
        c = cfgs[stage]
        d2_logger = logging.getLogger("detectron2.engine.defaults")
        level = d2_logger.level
        d2_logger.setLevel(logging.WARNING)  # it logs the scaling again when the stage starts
        try:
            s = DefaultTrainer.auto_scale_workers(c, world).SOLVER
        finally:
            d2_logger.setLevel(level)
        scaled = "" if s.IMS_PER_BATCH == c.SOLVER.IMS_PER_BATCH else " (linear scaling rule)"
        rows.append(
            f"  stage {2 * i + 1} {stage:9s} {model:15s} on {'+'.join(c.DATASETS.TRAIN)}: "
            f"batch {c.SOLVER.IMS_PER_BATCH} -> {s.IMS_PER_BATCH}, lr {c.SOLVER.BASE_LR:g} -> "
            f"{s.BASE_LR:g} (x{c.SOLVER.GAMMA:g} at {list(c.SOLVER.STEPS)} -> {list(s.STEPS)}), "
            f"iterations {c.SOLVER.MAX_ITER} -> {s.MAX_ITER}{scaled}"
        )
        if i == 0:
            u = cfg.UNSHARED.PROPOSALS
            rows.append(
                f"  stage 2 proposals for {'+'.join(cfg.DATASETS.TRAIN)} (top {u.TRAIN_POST_NMS_TOPK}) "
                f"and {'+'.join(cfg.DATASETS.TEST)} (top {cfg.MODEL.RPN.POST_NMS_TOPK_TEST})"
            )
    rows.append(f"  stage 4 eval      COCO AP on {'+'.join(cfg.DATASETS.TEST)}")
    return "\n".join(rows)


def run_schedule(
    cfg: CfgNode, *, stage: Optional[str] = None, cli_opts: Iterable[str] = ()
) -> Dict[str, Any]:
    """Run the Appendix B schedule (all stages, or one), on every process of a
    Detectron2 ``launch``.

    Finished stages (with a ``stage_done.json``) are skipped; an interrupted
    training stage resumes from its last checkpoint; proposal files already
    written are kept.

    Args:
        cfg: the schedule's config (``UNSHARED.ENABLED``,
            ``MODEL.META_ARCHITECTURE: UnsharedRCNN``).
        stage: run only this stage (one of :data:`STAGES`), even if it finished
            before; the earlier stages must have finished.
        cli_opts: the command line's ``KEY VALUE`` overrides, to refuse solver
            keys that the stages would ignore.

    Returns:
        The results of stage 4 (COCO metrics per test set, stored proposals and
        end to end, and the paper's Table 8 row) when it ran or was done, else
        the results of the stages run, by stage name. Metrics are complete on
        the main process only.
    """
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}.")
    _check_schedule_config(cfg, list(cli_opts))
    if not cfg.MODEL.WEIGHTS:
        logger.warning(
            "MODEL.WEIGHTS is empty: both backbones train from scratch. The paper fine-tunes "
            "ImageNet-1K weights (Appendix B); set MODEL.WEIGHTS to a converted checkpoint."
        )
    cfgs = stage_configs(cfg)
    world = comm.get_world_size()
    logger.info(_plan(cfg, cfgs, world))
    if comm.is_main_process():
        for folder in [cfg.OUTPUT_DIR] + [stage_dir(cfg, st) for st in STAGES]:
            n = remove_stale_temporaries(folder)
            if n:
                logger.info(f"Removed {n} temporary file(s) that interrupted writes left in {folder}")
    comm.synchronize()
    results: Dict[str, Any] = {}
    for k, name in enumerate(STAGES):
        if stage is not None and name != stage:
            continue
        marker = read_stage_marker(cfg, name)
        if marker is not None and stage is None:
            broken = _broken_outputs(cfg, cfgs, name)
            if broken:
                logger.warning(
                    f"Stage {k + 1} ({name}) is marked finished but {broken} is missing or "
                    "incomplete: running the stage again."
                )
                marker = None
        if marker is not None and stage is None:
            _warn_if_changed(cfg, cfgs, name, marker)
            logger.info(f"Stage {k + 1} ({name}) finished on {marker['finished']}: skipped.")
            results[name] = marker.get("results", {})
            continue
        for prev in STAGES[:k]:
            if read_stage_marker(cfg, prev) is None:
                raise RuntimeError(
                    f"Stage {name!r} needs stage {prev!r}, which has not finished in "
                    f"{cfg.OUTPUT_DIR}: run the whole schedule (no --stage) or `--stage {prev}`."
                )
        logger.info(f"Stage {k + 1} ({name}): starting in {stage_dir(cfg, name)}")
        t0 = time.perf_counter()
        res = _RUNNERS[name](cfg, cfgs, stage is not None)
        comm.synchronize()
        seconds = time.perf_counter() - t0
        if comm.is_main_process():
            atomic_write_json(
                os.path.join(stage_dir(cfg, name), MARKER),
                {
                    "stage": name,
                    "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                    "seconds": round(seconds, 1),
                    "world_size": world,
                    "results": res,
                    "config_keys": _identity(_stage_cfg_for_marker(cfg, cfgs, name), name),
                },
            )
            logger.info(f"Stage {k + 1} ({name}) finished in {seconds:.0f} s")
        comm.synchronize()
        results[name] = res
        signum = preemption.agree()  # a stop signal during the stage: stop before the next one
        if signum is not None and name != STAGES[-1]:
            raise preemption.Preempted(signum, saved=f"stage {k + 1} ({name}) finished, in {stage_dir(cfg, name)}")
    return results.get("eval", results)
