# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The Detectron2 configs of the Appendix B stages (Xie et al., CVPR 2017,
Appendix B): what the staged schedule trains (:mod:`.schedule`) and what the
end-to-end :class:`~resnext_det.modeling.unshared_rcnn.UnsharedRCNN` is built from.
Both import this module; it imports neither."""
import os
from typing import Dict

from detectron2.config import CfgNode

from ..modeling.unshared_rcnn import PER_STAGE_SOLVER, network_configs

__all__ = ["STAGES", "STAGE_DIRS", "PER_STAGE_SOLVER", "stage_dir", "proposal_file", "stage_configs"]

STAGES = ("rpn", "proposals", "fast_rcnn", "eval")
STAGE_DIRS = {
    "rpn": "stage1_rpn",
    "proposals": "stage2_proposals",
    "fast_rcnn": "stage3_fast_rcnn",
    "eval": "stage4_eval",
}


def stage_dir(cfg: CfgNode, stage: str) -> str:
    return os.path.join(cfg.OUTPUT_DIR, STAGE_DIRS[stage])


def proposal_file(cfg: CfgNode, dataset_name: str, post_nms_topk: int) -> str:
    """Where stage 2 writes the proposals of ``dataset_name`` (``post_nms_topk``
    per image): ``OUTPUT_DIR/stage2_proposals/{dataset}_top{k}.pkl``."""
    return os.path.join(stage_dir(cfg, "proposals"), f"{dataset_name}_top{post_nms_topk}.pkl")


def stage_configs(cfg: CfgNode) -> Dict[str, CfgNode]:
    """The Detectron2 configs of the two training stages of the schedule.

    Args:
        cfg: a config with the ``UNSHARED`` node (:func:`add_resnext_config`).

    Returns:
        ``{"rpn": cfg_rpn, "fast_rcnn": cfg_fast_rcnn}``: the configs of
        :func:`~resnext_det.modeling.unshared_rcnn.network_configs`, which train the
        stage when given to :class:`DefaultTrainer`, with their stage folders as
        ``OUTPUT_DIR``; ``cfg_fast_rcnn`` trains on the files of stage 2
        (``DATASETS.PROPOSAL_FILES_TRAIN/TEST``). Detectron2 scales both to the
        number of processes (``SOLVER.REFERENCE_WORLD_SIZE``).
    """
    nets = network_configs(cfg)
    rpn, frcn = nets["rpn"], nets["fast_rcnn"]
    for c in (rpn, frcn):
        c.defrost()
    rpn.OUTPUT_DIR = stage_dir(cfg, "rpn")
    frcn.DATASETS.PROPOSAL_FILES_TRAIN = tuple(
        proposal_file(cfg, n, cfg.UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK) for n in cfg.DATASETS.TRAIN
    )
    frcn.DATASETS.PROPOSAL_FILES_TEST = tuple(
        proposal_file(cfg, n, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) for n in cfg.DATASETS.TEST
    )
    frcn.OUTPUT_DIR = stage_dir(cfg, "fast_rcnn")
    if cfg.is_frozen():
        rpn.freeze()
        frcn.freeze()
    return {"rpn": rpn, "fast_rcnn": frcn}
