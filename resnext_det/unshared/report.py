# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What the Appendix B schedule says (Xie et al., CVPR 2017, Appendix B): the plan it
logs before it starts, one line per stage, and the results table of stage 4 beside
the paper's Table 8.

Text only: it reads configs and results and runs nothing. The stage records of
:mod:`.stages` name their plan lines here; :mod:`.schedule` logs them.
"""
import logging
import math
from typing import Any, Dict, Optional

from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer

from ..modeling.spec import ResNeXtSpec

__all__ = [
    "PAPER_TEST_SET",
    "TABLE8",
    "eval_plan",
    "fast_rcnn_plan",
    "paper_row",
    "proposals_plan",
    "results_markdown",
    "rpn_plan",
]

# Table 8 of the paper: Faster R-CNN on COCO minival (coco_2014_minival), keyed
# by (depth, cardinality C, bottleneck width d). AP is COCO's AP@[.5:.95].
TABLE8: Dict[tuple, Dict[str, Any]] = {
    (50, 1, 64): {"backbone": "ResNet-50 (1x64d)", "AP50": 47.6, "AP": 26.5},
    (50, 32, 4): {"backbone": "ResNeXt-50 (32x4d)", "AP50": 49.7, "AP": 27.5},
    (101, 1, 64): {"backbone": "ResNet-101 (1x64d)", "AP50": 51.1, "AP": 29.8},
    (101, 32, 4): {"backbone": "ResNeXt-101 (32x4d)", "AP50": 51.9, "AP": 30.0},
}
#: The dataset of Table 8 (COCO minival).
PAPER_TEST_SET = "coco_2014_minival"


# ----------------------------------------------------------------------------
# The plan: what each stage will do, logged before the first one starts
# ----------------------------------------------------------------------------
def _training_plan(c: CfgNode, model: str, world: int) -> str:
    """A training stage's data and solver, as given (for ``SOLVER.REFERENCE_WORLD_SIZE``
    processes) and as run on ``world`` processes (Detectron2's linear scaling rule)."""
    d2_logger = logging.getLogger("detectron2.engine.defaults")
    level = d2_logger.level
    d2_logger.setLevel(logging.WARNING)  # it logs the scaling again when the stage starts
    try:
        s = DefaultTrainer.auto_scale_workers(c, world).SOLVER
    finally:
        d2_logger.setLevel(level)
    scaled = "" if s.IMS_PER_BATCH == c.SOLVER.IMS_PER_BATCH else " (linear scaling rule)"
    return (
        f"{model:15s} on {'+'.join(c.DATASETS.TRAIN)}: "
        f"batch {c.SOLVER.IMS_PER_BATCH} -> {s.IMS_PER_BATCH}, lr {c.SOLVER.BASE_LR:g} -> "
        f"{s.BASE_LR:g} (x{c.SOLVER.GAMMA:g} at {list(c.SOLVER.STEPS)} -> {list(s.STEPS)}), "
        f"iterations {c.SOLVER.MAX_ITER} -> {s.MAX_ITER}{scaled}"
    )


def rpn_plan(cfg: CfgNode, cfgs: Dict[str, CfgNode], world: int) -> str:
    """Stage 1's plan line: the RPN-only model (Detectron2's ``ProposalNetwork``) and its solver."""
    return _training_plan(cfgs["rpn"], "ProposalNetwork", world)


def proposals_plan(cfg: CfgNode, cfgs: Dict[str, CfgNode], world: int) -> str:
    """Stage 2's plan line: the datasets it writes proposals for, and how many per image."""
    u = cfg.UNSHARED.PROPOSALS
    return (
        f"for {'+'.join(cfg.DATASETS.TRAIN)} (top {u.TRAIN_POST_NMS_TOPK}) "
        f"and {'+'.join(cfg.DATASETS.TEST)} (top {cfg.MODEL.RPN.POST_NMS_TOPK_TEST})"
    )


def fast_rcnn_plan(cfg: CfgNode, cfgs: Dict[str, CfgNode], world: int) -> str:
    """Stage 3's plan line: the Fast R-CNN on stored proposals and its solver."""
    return _training_plan(cfgs["fast_rcnn"], "Fast R-CNN", world)


def eval_plan(cfg: CfgNode, cfgs: Dict[str, CfgNode], world: int) -> str:
    """Stage 4's plan line: the test sets it evaluates."""
    return f"COCO AP on {'+'.join(cfg.DATASETS.TEST)}"


# ----------------------------------------------------------------------------
# The results of stage 4
# ----------------------------------------------------------------------------
def paper_row(cfg: CfgNode) -> Optional[Dict[str, Any]]:
    """The Table 8 row of the config's architecture, if the paper has one."""
    spec = ResNeXtSpec.from_config(cfg)
    if spec.standard_depth is None:
        return None
    return TABLE8.get((spec.standard_depth, spec.cardinality, spec.bottleneck_width))


_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def results_markdown(results: Dict[str, Any]) -> str:
    """Stage 4's ``results.md``: COCO box AP of the Fast R-CNN on stored proposals and of
    the end-to-end UnsharedRCNN per test set, the paper's Table 8 row (``paper_table8``)
    when there is one, and a note for each evaluation that skipped images."""

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
