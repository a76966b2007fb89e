# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The paper's Appendix B detector and schedule: RPN and Fast R-CNN that do not
share features, trained in stages (Xie et al., CVPR 2017, Appendix B)."""
from ..modeling.unshared_rcnn import UnsharedRCNN
from .proposals import ProposalFileMismatch, check_proposal_file, dump_proposals, load_proposal_file
from .report import TABLE8
from .schedule import read_stage_marker, run_schedule
from .stages import SCHEDULE, STAGE_DIRS, STAGES, Stage, proposal_file, stage_configs
from .training import export_unshared_checkpoint

__all__ = [
    "UnsharedRCNN",
    "ProposalFileMismatch",
    "check_proposal_file",
    "dump_proposals",
    "load_proposal_file",
    "SCHEDULE",
    "STAGE_DIRS",
    "STAGES",
    "Stage",
    "TABLE8",
    "export_unshared_checkpoint",
    "proposal_file",
    "read_stage_marker",
    "run_schedule",
    "stage_configs",
]
