# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The trainer used by ``tools/train_net.py`` (and by the staged schedule)."""
import contextlib
import functools
import os
from typing import List, Optional

import torch

import detectron2.engine.defaults as _d2_defaults
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from ..checkpoint import ResNeXtCheckpointer, attach_weights_record
from ..fast import AutocastTrainer, amp_dtype, apply_fast_path, prepare_for_inference

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """Detectron2's :class:`DefaultTrainer` with COCO evaluation (bbox, and segm
    for mask models) on every test set, written under ``OUTPUT_DIR/inference``.
    Also trains with several CPU processes (gloo), e.g. ``--num-gpus 2 MODEL.DEVICE cpu``.
    """

    def __init__(self, cfg: CfgNode):
        with _cpu_ddp(cfg):
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
        ResNeXtCheckpointer(self.model, cfg=self.cfg).load(self.cfg.MODEL.WEIGHTS)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks: List[str] = ["bbox"]
        if cfg.MODEL.MASK_ON:
            tasks.append("segm")
        return DatasetEvaluators(
            [COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)]
        )


@contextlib.contextmanager
def _cpu_ddp(cfg: CfgNode):
    """DefaultTrainer wraps the model in DistributedDataParallel with
    ``device_ids=[local rank]``, which PyTorch refuses for a CPU model; CPU
    processes need ``device_ids=None``. Patched for the constructor's duration."""
    if torch.device(cfg.MODEL.DEVICE).type != "cpu":
        yield
        return
    original = _d2_defaults.create_ddp_model
    _d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        _d2_defaults.create_ddp_model = original
