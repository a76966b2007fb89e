# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Config keys of the paper's Appendix B schedule (``UNSHARED.*``).

:func:`add_unshared_config` is called by :func:`resnext_det.add_resnext_config`,
so every config made by resnext_det has these keys. Their defaults are the
paper's numbers (Xie et al., CVPR 2017, Appendix B), given for the reference
world size ``SOLVER.REFERENCE_WORLD_SIZE`` (8 GPUs): on fewer or more processes
Detectron2's linear scaling rule (``DefaultTrainer.auto_scale_workers``) scales
batch, learning rate and iterations of each stage.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_unshared_config"]


def add_unshared_config(cfg: CN) -> CN:
    """Add the ``UNSHARED`` node to ``cfg`` (in place) and return ``cfg``.

    Momentum, weight decay, GAMMA (the x0.1 step), checkpoint period and the
    reference world size are shared by both training stages and live in
    ``SOLVER``; ``SOLVER.IMS_PER_BATCH/BASE_LR/STEPS/MAX_ITER`` are replaced by
    the per-stage values below.
    """
    _C = cfg
    _C.UNSHARED = CN()
    # Train with the paper's staged schedule (RPN -> proposals -> Fast R-CNN ->
    # evaluation, no shared features) when tools/train_net.py trains this config.
    _C.UNSHARED.ENABLED = False
    # Models are evaluated twice in stage 4: the Fast R-CNN on the stored
    # proposals (the paper's protocol) and the end-to-end UnsharedRCNN
    # (RPN backbone -> proposals -> Fast R-CNN backbone). Both APs are reported.
    _C.UNSHARED.EVAL_END_TO_END = True

    # Stage 1, the RPN (Appendix B: "8 GPUs, 2 images per GPU, 256 anchors").
    _C.UNSHARED.RPN = CN()
    # Images per iteration over all processes, at SOLVER.REFERENCE_WORLD_SIZE.
    _C.UNSHARED.RPN.IMS_PER_BATCH = 16
    # Learning rate; multiplied by SOLVER.GAMMA at each of STEPS.
    _C.UNSHARED.RPN.BASE_LR = 0.02
    # Iterations where the learning rate drops (0.02 -> 0.002 after 120k).
    _C.UNSHARED.RPN.STEPS = (120000,)
    # Total iterations (120k + 60k).
    _C.UNSHARED.RPN.MAX_ITER = 180000
    # Anchors sampled per image for the RPN loss.
    _C.UNSHARED.RPN.BATCH_SIZE_PER_IMAGE = 256

    # Stage 3, Fast R-CNN on stored proposals ("8 GPUs, 1 image per GPU,
    # 64 regions per image").
    _C.UNSHARED.FAST_RCNN = CN()
    # Images per iteration over all processes, at SOLVER.REFERENCE_WORLD_SIZE.
    _C.UNSHARED.FAST_RCNN.IMS_PER_BATCH = 8
    # Learning rate; multiplied by SOLVER.GAMMA at each of STEPS.
    _C.UNSHARED.FAST_RCNN.BASE_LR = 0.005
    # Iterations where the learning rate drops (0.005 -> 0.0005 after 120k).
    _C.UNSHARED.FAST_RCNN.STEPS = (120000,)
    # Total iterations (120k + 60k).
    _C.UNSHARED.FAST_RCNN.MAX_ITER = 180000
    # Regions (RoIs) sampled per image for the Fast R-CNN loss.
    _C.UNSHARED.FAST_RCNN.BATCH_SIZE_PER_IMAGE = 64

    # Stage 2, proposals written by the trained RPN. Test sets use
    # MODEL.RPN.PRE_NMS_TOPK_TEST / POST_NMS_TOPK_TEST, the values the
    # end-to-end UnsharedRCNN uses too, so that both evaluations agree.
    _C.UNSHARED.PROPOSALS = CN()
    # Boxes kept before NMS on training images (py-faster-rcnn keeps all).
    _C.UNSHARED.PROPOSALS.TRAIN_PRE_NMS_TOPK = 12000
    # Proposals kept after NMS on training images (py-faster-rcnn: 2000).
    _C.UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK = 2000
    return cfg
