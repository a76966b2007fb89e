# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The trainer used by ``tools/train_net.py`` (and by the staged schedule)."""
import contextlib
import functools
import os
from typing import List, Optional
from unittest import mock

import torch

import detectron2.engine.defaults as _d2_defaults
import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer
from detectron2.evaluation import DatasetEvaluators

from ..checkpoint import ResNeXtCheckpointer, attach_weights_record, final_checkpoint
from ..data.robust import (
    SkipAwareCOCOEvaluator,
    SkipUnreadableImages,
    build_evaluation_loader,
    evaluation_dataset_dicts,
    training_dataset_dicts,
)
from ..errors import ConfigError
from ..fast import AutocastTrainer, amp_dtype, apply_fast_path, prepare_for_inference
from . import preemption

__all__ = ["Trainer", "SolverRecord", "StopAndSave"]



class Trainer(DefaultTrainer):
    """Detectron2's :class:`DefaultTrainer` with COCO evaluation (bbox, and segm
    for mask models) on every test set, written under ``OUTPUT_DIR/inference``.
    Also trains with several CPU processes (gloo), e.g. ``--num-gpus 2 MODEL.DEVICE cpu``.
    """

    def __init__(self, cfg: CfgNode):
        # The solver as configured, before Detectron2 scales it to the world size.
        self._solver_record = SolverRecord(cfg)
        with _detectron2_parts(cfg):
            super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:
            # Detectron2's AMPTrainer is CUDA-only; autocast on CPU (bf16) or CUDA
            # (SOLVER.AMP.PRECISION). amp_dtype is None where bf16 is not native.
            dtype, t = amp_dtype(cfg), self._trainer
            self._trainer = (
                AutocastTrainer(
                    t.model,
                    t.data_loader,
                    t.optimizer,
                    device_type=torch.device(cfg.MODEL.DEVICE).type,
                    dtype=dtype,
                )
                if dtype is not None
                else SimpleTrainer(t.model, t.data_loader, t.optimizer)
            )

    def build_hooks(self):
        """Detectron2's hooks, checkpointing through the trainer's one
        :class:`ResNeXtCheckpointer`: every checkpoint written whole (temporary name,
        fsync, rename), resume falling back to the newest complete one, and the solver
        recorded (see :class:`SolverRecord`)."""
        self.checkpointer.add_checkpointable("solver", self._solver_record)
        return super().build_hooks() + [StopAndSave(self.checkpointer)]

    def train(self):
        """Train; a run resumed at ``MAX_ITER`` (killed while the final checkpoint was
        written) writes ``model_final.pth`` from the restored state instead of nothing."""
        out = super().train()
        final = final_checkpoint(self.cfg.OUTPUT_DIR)
        if comm.is_main_process() and self.iter >= self.max_iter - 1 and not os.path.isfile(final):
            self.checkpointer.save("model_final", iteration=self.max_iter - 1)
        comm.synchronize()
        return out

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Detectron2's training loader, where image files that are not on disk are left
        out before sampling (one warning; most of them missing is refused), an image that
        cannot be used (unreadable, 16-bit, another size than its json entry) is skipped with
        a warning that names it, and each dataset's dropped boxes are counted in the log
        (:mod:`resnext_det.data.robust`)."""
        mapper = SkipUnreadableImages(DatasetMapper(cfg, True))
        return build_detection_train_loader(cfg, mapper=mapper, dataset=training_dataset_dicts(cfg))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """Detectron2's test loader, with training's safety: missing files left out before
        the loader, and an image that cannot be used skipped by name instead of ending the
        evaluation (:func:`resnext_det.data.robust.build_evaluation_loader`). The evaluator
        of :meth:`build_evaluator` reports how many were skipped."""
        return build_evaluation_loader(
            evaluation_dataset_dicts(cfg, dataset_name),
            DatasetMapper(cfg, False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_model(cls, cfg: CfgNode):
        """Detectron2's model with the fast-path switches applied (see resnext_det.fast)."""
        return apply_fast_path(super().build_model(cfg), cfg)

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None):
        """Evaluate with FrozenBN folded (on a copy) and under autocast, as configured."""
        return super().test(cfg, prepare_for_inference(model, cfg), evaluators)

    def resume_or_load(self, resume: bool = True):
        """Resume from ``OUTPUT_DIR``'s last checkpoint, else load ``MODEL.WEIGHTS``
        strictly with :class:`~resnext_det.checkpoint.ResNeXtCheckpointer`: it refuses
        weights whose architecture or input convention disagrees with the config, or
        that would leave backbone tensors random (Detectron2 only warns). Checkpoints
        saved by this trainer record the config's input convention and architecture.
        """
        attach_weights_record(self.checkpointer, self.cfg)
        if resume and self.checkpointer.has_checkpoint():
            return super().resume_or_load(resume=True)
        self.checkpointer.load(self.cfg.MODEL.WEIGHTS, checkpointables=[])  # the model only

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        """COCO evaluation (bbox, and segm for mask models) of the images the test loader
        gave; skipped images are left out of the AP and counted in the results
        (``skipped_images``): :class:`resnext_det.data.robust.SkipAwareCOCOEvaluator`. It
        computes with a compiled COCOeval (Detectron2's, else faster-coco-eval's; the log
        names it), pycocotools' numbers ~10x sooner (:mod:`resnext_det.evaluation`)."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks: List[str] = ["bbox"]
        if cfg.MODEL.MASK_ON:
            tasks.append("segm")
        return DatasetEvaluators(
            [SkipAwareCOCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)]
        )


class StopAndSave(HookBase):
    """Stop and save at the end of the iteration during which a stop signal arrived
    (the time limit, preemption: :mod:`resnext_det.engine.preemption`).

    After every iteration all processes agree on whether any of them received one (one
    collective); if so the main process writes the checkpoint of *this* iteration
    (whole or not at all, as every checkpoint), all processes wait for it, and
    :class:`~resnext_det.engine.preemption.Preempted` ends the training. ``--resume``
    continues at the next iteration: at most the iteration in flight is lost. Last among
    the hooks, so the periodic checkpoint, evaluation and metrics of the iteration are done.
    """

    def __init__(self, checkpointer):
        self._checkpointer = checkpointer

    def after_step(self):
        signum = preemption.agree()
        if signum is None:
            return
        it = self.trainer.iter
        name = f"model_{it:07d}"
        self._checkpointer.save(name, iteration=it)  # writes on the main process only
        comm.synchronize()
        path = os.path.join(self._checkpointer.save_dir, name + ".pth")
        raise preemption.Preempted(signum, saved=f"{path} (iteration {it + 1} of {self.trainer.max_iter})")


#: Solver keys a resumed run does not take from the config: Detectron2 restores the
#: optimizer's param groups (lr, momentum, weight decay) and the scheduler's base_lrs.
_RESTORED_SOLVER_KEYS = (
    "BASE_LR", "MOMENTUM", "NESTEROV", "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "WEIGHT_DECAY_BIAS",
    "BIAS_LR_FACTOR", "REFERENCE_WORLD_SIZE",
)  # fmt: skip


class SolverRecord:
    """A checkpointable holding the solver values a resumed run cannot change (the
    restored optimizer and scheduler keep the old ones). Resuming with other values is
    refused with the keys and the two ways out, instead of training on silently with
    the old learning rate."""

    def __init__(self, cfg: CfgNode):
        self.values = {k: _plain(cfg.SOLVER[k]) for k in _RESTORED_SOLVER_KEYS if k in cfg.SOLVER}
        self.output_dir = cfg.OUTPUT_DIR

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        changed = [k for k in self.values if k in state and state[k] != self.values[k]]
        if changed:
            raise ConfigError(
                "--resume with another solver than the checkpoint was trained with: "
                + ", ".join(f"SOLVER.{k} {state[k]!r} -> {self.values[k]!r}" for k in changed)
                + ". A resumed run would keep the old values (Detectron2 restores the optimizer "
                "and the scheduler). Rerun with the old values (in the Appendix B schedule they come "
                f"from UNSHARED.RPN / UNSHARED.FAST_RCNN), or start over: delete {self.output_dir}."
            )


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _detectron2_parts(cfg: CfgNode) -> contextlib.ExitStack:
    """Two parts DefaultTrainer's constructor builds, replaced for its duration: its
    DetectionCheckpointer by a :class:`ResNeXtCheckpointer` of ``cfg`` (strict loading,
    whole files: the trainer's one checkpointer), and, for a CPU model, the
    DistributedDataParallel wrapper's ``device_ids=[local rank]`` (which PyTorch refuses
    for a CPU model) by ``device_ids=None``."""
    parts = contextlib.ExitStack()
    parts.enter_context(
        mock.patch.object(_d2_defaults, "DetectionCheckpointer", functools.partial(ResNeXtCheckpointer, cfg=cfg))
    )
    if torch.device(cfg.MODEL.DEVICE).type == "cpu":
        ddp = functools.partial(_d2_defaults.create_ddp_model, device_ids=None)
        parts.enter_context(mock.patch.object(_d2_defaults, "create_ddp_model", ddp))
    return parts
