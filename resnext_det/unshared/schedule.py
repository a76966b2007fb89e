# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The paper's Appendix B schedule: RPN and Fast R-CNN that do not share
features, trained one after the other, then COCO evaluation.

Xie et al., CVPR 2017, Appendix B (numbers in ``UNSHARED.*``, see
:func:`resnext_det.add_resnext_config`). The four stages (``rpn``,
``proposals``, ``fast_rcnn``, ``eval``) are the records of
:data:`.stages.SCHEDULE`; this module runs them in order.

Every stage works in its own folder ``OUTPUT_DIR/stage{k}_{name}`` and marks its
completion with ``stage_done.json``. Rerunning skips finished stages (whose
outputs are still whole) and resumes an interrupted training stage from its last
checkpoint.
"""
import datetime
import json
import logging
import os
import time
from typing import Any, Dict, Iterable, Optional, Sequence

import detectron2.utils.comm as comm
from detectron2.config import CfgNode

from ..engine import preemption
from ..engine.setup import override_keys
from ..errors import ConfigError
from ..modeling.unshared_rcnn import PER_STAGE_SOLVER
from ..utils.io import atomic_write_json
from .stages import SCHEDULE, STAGE_BY_NAME, STAGES, broken_output, config_identity, stage_configs, stage_dir

__all__ = ["MARKER", "read_stage_marker", "run_schedule"]

logger = logging.getLogger(__name__)

#: The file that marks a finished stage, in its folder.
MARKER = "stage_done.json"


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


def _marked_keys(cfgs: Dict[str, CfgNode], stage: str) -> Dict[str, Any]:
    """The config keys a marker of ``stage`` records: those of its network's config."""
    return config_identity(cfgs[STAGE_BY_NAME[stage].network], stage)


def _warn_if_changed(cfg, cfgs, stage: str, marker: Dict[str, Any]) -> None:
    old = marker.get("config_keys")
    if not isinstance(old, dict):
        return
    new = json.loads(json.dumps(_marked_keys(cfgs, stage), default=str))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        logger.warning(
            f"Stage {stage!r} finished earlier with another config (differs in "
            f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}); its result is kept. "
            f"To redo it, delete {stage_dir(cfg, stage)} (and the later stages' folders)."
        )


def _plan(cfg: CfgNode, cfgs: Dict[str, CfgNode], world: int) -> str:
    """What the schedule logs first: each stage's line (:mod:`.report`), scaled to ``world``."""
    ref = cfg.SOLVER.REFERENCE_WORLD_SIZE or world
    rows = [f"Appendix B schedule on {world} process(es) (reference: {ref}), OUTPUT_DIR={cfg.OUTPUT_DIR}"]
    rows += [f"  stage {st.number} {st.name:9s} {st.plan(cfg, cfgs, world)}" for st in SCHEDULE]
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
    results: Dict[str, Any] = {}
    for k, st in enumerate(SCHEDULE):
        name = st.name
        if stage is not None and name != stage:
            continue
        marker = read_stage_marker(cfg, name)
        if marker is not None and stage is None:
            broken = broken_output(cfg, cfgs, name)
            if broken:
                logger.warning(
                    f"Stage {st.number} ({name}) is marked finished but {broken} is missing or "
                    "incomplete: running the stage again."
                )
                marker = None
        if marker is not None and stage is None:
            _warn_if_changed(cfg, cfgs, name, marker)
            logger.info(f"Stage {st.number} ({name}) finished on {marker['finished']}: skipped.")
            results[name] = marker.get("results", {})
            continue
        for prev in SCHEDULE[:k]:
            if read_stage_marker(cfg, prev.name) is None:
                raise RuntimeError(
                    f"Stage {name!r} needs stage {prev.name!r}, which has not finished in "
                    f"{cfg.OUTPUT_DIR}: run the whole schedule (no --stage) or `--stage {prev.name}`."
                )
        logger.info(f"Stage {st.number} ({name}): starting in {stage_dir(cfg, name)}")
        t0 = time.perf_counter()
        res = st.run(cfg, cfgs, stage is not None)
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
                    "config_keys": _marked_keys(cfgs, name),
                },
            )
            logger.info(f"Stage {st.number} ({name}) finished in {seconds:.0f} s")
        comm.synchronize()
        results[name] = res
        signum = preemption.agree()  # a stop signal during the stage: stop before the next one
        if signum is not None and name != SCHEDULE[-1].name:
            raise preemption.Preempted(
                signum, saved=f"stage {st.number} ({name}) finished, in {stage_dir(cfg, name)}"
            )
    return results.get("eval", results)
