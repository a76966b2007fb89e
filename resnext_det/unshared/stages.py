# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The Detectron2 configs of the Appendix B stages (Xie et al., CVPR 2017,
Appendix B): what the staged schedule trains (:mod:`.schedule`) and what the
end-to-end :class:`~resnext_det.unshared.meta_arch.UnsharedRCNN` is built from.
Both import this module; it imports neither."""
import os
from typing import Dict

from detectron2.config import CfgNode

from ..errors import ConfigError

__all__ = ["STAGES", "STAGE_DIRS", "PER_STAGE_SOLVER", "stage_dir", "proposal_file", "stage_configs"]

STAGES = ("rpn", "proposals", "fast_rcnn", "eval")
STAGE_DIRS = {
    "rpn": "stage1_rpn",
    "proposals": "stage2_proposals",
    "fast_rcnn": "stage3_fast_rcnn",
    "eval": "stage4_eval",
}
# Solver keys that each stage takes from UNSHARED.{RPN,FAST_RCNN} instead.
PER_STAGE_SOLVER = ("IMS_PER_BATCH", "BASE_LR", "STEPS", "MAX_ITER")


def stage_dir(cfg: CfgNode, stage: str) -> str:
    return os.path.join(cfg.OUTPUT_DIR, STAGE_DIRS[stage])


def proposal_file(cfg: CfgNode, dataset_name: str, post_nms_topk: int) -> str:
    """Where stage 2 writes the proposals of ``dataset_name`` (``post_nms_topk``
    per image): ``OUTPUT_DIR/stage2_proposals/{dataset}_top{k}.pkl``."""
    return os.path.join(stage_dir(cfg, "proposals"), f"{dataset_name}_top{post_nms_topk}.pkl")


def _check_solver_node(cfg: CfgNode, node: str) -> None:
    s = cfg.UNSHARED[node]
    key = f"UNSHARED.{node}"
    if s.MAX_ITER <= 0:
        raise ConfigError(f"{key}.MAX_ITER must be > 0, got {s.MAX_ITER}.")
    steps = list(s.STEPS)
    if steps != sorted(steps) or any(not 0 < x < s.MAX_ITER for x in steps):
        raise ConfigError(
            f"{key}.STEPS must increase and lie in (0, {key}.MAX_ITER={s.MAX_ITER}), got {steps}."
        )
    if s.BASE_LR <= 0 or s.IMS_PER_BATCH <= 0 or s.BATCH_SIZE_PER_IMAGE <= 0:
        raise ConfigError(
            f"{key}.BASE_LR, IMS_PER_BATCH and BATCH_SIZE_PER_IMAGE must be > 0, got "
            f"{s.BASE_LR}, {s.IMS_PER_BATCH}, {s.BATCH_SIZE_PER_IMAGE}."
        )
    ref = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if ref > 0 and s.IMS_PER_BATCH % ref:
        raise ConfigError(
            f"{key}.IMS_PER_BATCH={s.IMS_PER_BATCH} is not a multiple of "
            f"SOLVER.REFERENCE_WORLD_SIZE={ref} (the number of GPUs it is given for); "
            "change one of them."
        )


def stage_configs(cfg: CfgNode) -> Dict[str, CfgNode]:
    """The Detectron2 configs of the two training stages of the schedule.

    Args:
        cfg: a config with the ``UNSHARED`` node (:func:`add_resnext_config`).

    Returns:
        ``{"rpn": cfg_rpn, "fast_rcnn": cfg_fast_rcnn}``: plain Detectron2 configs
        (``UNSHARED.ENABLED`` False) that train the stage when given to
        :class:`DefaultTrainer`. ``cfg_rpn`` is a ``ProposalNetwork`` trained
        with ``UNSHARED.RPN``; ``cfg_fast_rcnn`` a ``GeneralizedRCNN`` with
        ``PrecomputedProposals`` trained with ``UNSHARED.FAST_RCNN`` on the files of
        stage 2 (``DATASETS.PROPOSAL_FILES_TRAIN/TEST``). Both start from
        ``MODEL.WEIGHTS`` and keep ``SOLVER.REFERENCE_WORLD_SIZE``, so that
        Detectron2 scales them to the number of processes. Their ``OUTPUT_DIR``
        are the stage folders.
    """
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals":
        raise ConfigError(
            "The schedule trains its own RPN: set MODEL.PROPOSAL_GENERATOR.NAME to 'RPN' "
            "(the stored proposals of stage 2 are used automatically)."
        )
    for node in ("RPN", "FAST_RCNN"):
        _check_solver_node(cfg, node)
    chunk = cfg.UNSHARED.PROPOSALS.CHUNK_IMAGES
    if chunk < 1:
        raise ConfigError(
            f"UNSHARED.PROPOSALS.CHUNK_IMAGES (images per chunk file of stage 2) must be >= 1, got {chunk}."
        )
    u = cfg.UNSHARED

    base = cfg.clone()
    base.defrost()
    base.UNSHARED.ENABLED = False
    base.MODEL.LOAD_PROPOSALS = False
    base.DATASETS.PROPOSAL_FILES_TRAIN = ()
    base.DATASETS.PROPOSAL_FILES_TEST = ()

    rpn = base.clone()
    rpn.MODEL.META_ARCHITECTURE = "ProposalNetwork"
    rpn.MODEL.RPN.BATCH_SIZE_PER_IMAGE = u.RPN.BATCH_SIZE_PER_IMAGE
    # ProposalNetwork computes proposals in training only to discard them (Detectron2:
    # "about 5% slower"; on a CPU the NMS over 12000 boxes is ~40% of an iteration).
    rpn.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 1
    rpn.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1
    for k in PER_STAGE_SOLVER:
        rpn.SOLVER[k] = u.RPN[k]
    rpn.OUTPUT_DIR = stage_dir(cfg, "rpn")

    frcn = base.clone()
    frcn.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    frcn.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    frcn.MODEL.LOAD_PROPOSALS = True
    frcn.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = u.FAST_RCNN.BATCH_SIZE_PER_IMAGE
    for k in PER_STAGE_SOLVER:
        frcn.SOLVER[k] = u.FAST_RCNN[k]
    frcn.DATASETS.PROPOSAL_FILES_TRAIN = tuple(
        proposal_file(cfg, n, u.PROPOSALS.TRAIN_POST_NMS_TOPK) for n in cfg.DATASETS.TRAIN
    )
    frcn.DATASETS.PROPOSAL_FILES_TEST = tuple(
        proposal_file(cfg, n, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) for n in cfg.DATASETS.TEST
    )
    # Use all stored proposals: the same boxes as the end-to-end UnsharedRCNN.
    frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = u.PROPOSALS.TRAIN_POST_NMS_TOPK
    frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = cfg.MODEL.RPN.POST_NMS_TOPK_TEST
    frcn.OUTPUT_DIR = stage_dir(cfg, "fast_rcnn")

    if cfg.is_frozen():
        rpn.freeze()
        frcn.freeze()
    return {"rpn": rpn, "fast_rcnn": frcn}
