# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The trainer used by ``tools/train_net.py`` (and by the staged schedule)."""
import os
from typing import List, Optional

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from ..config import add_resnext_config

__all__ = ["Trainer", "setup_cfg"]


class Trainer(DefaultTrainer):
    """Detectron2's :class:`DefaultTrainer` with COCO evaluation (bbox, and segm
    for mask models) on every test set, written under ``OUTPUT_DIR/inference``.
    """

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


def setup_cfg(
    config_file: str, opts: Optional[List[str]] = None, *, args=None, freeze: bool = True
) -> CfgNode:
    """Detectron2 config with ``MODEL.RESNEXT`` added, ``config_file`` and ``opts``
    merged. With ``args`` (from :func:`detectron2.engine.default_argument_parser`),
    also runs :func:`default_setup` (logging, output folder, seeds, env info).
    """
    cfg = get_cfg()
    add_resnext_config(cfg)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    if freeze:
        cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg
