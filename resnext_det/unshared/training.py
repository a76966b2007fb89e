# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""How the training stages of the Appendix B schedule (Xie et al., CVPR 2017,
Appendix B) train: stage 1 (the RPN) and stage 3 (the Fast R-CNN on stored
proposals) each with Detectron2's trainer in its own folder, resuming from that
folder's last checkpoint; at the end of stage 3 the two networks are written as one
:class:`~resnext_det.modeling.unshared_rcnn.UnsharedRCNN` checkpoint. The stage
records of :mod:`.stages` call these.
"""
import json
import logging
import os
from typing import Any, Callable, Dict

import torch

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer

from ..checkpoint import METADATA_KEY, final_checkpoint
from ..engine.trainer import Trainer
from ..utils.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["export_unshared_checkpoint", "main_first", "train_stage"]

logger = logging.getLogger(__name__)


def main_first(fn: Callable[[], Any]) -> None:
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


def train_stage(stage_cfg: CfgNode) -> Dict[str, Any]:
    """Train one stage with Detectron2's trainer, resuming from the stage
    folder's last checkpoint. Evaluation is left to stage 4.

    Returns:
        What the stage's marker records: the final checkpoint, the world size, the
        solver as scaled to it, and the last losses.
    """
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
