# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Config keys of resnext_det.

Call :func:`add_resnext_config` on a Detectron2 config **before**
``merge_from_file``, exactly as Detectron2's own projects do::

    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file("configs/Base-ResNeXt-FPN.yaml")
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_resnext_config", "RESNEXT_ARCH_DEFAULTS"]

#: Defaults of the architecture keys that MODEL.RESNEXT.PRESET sets (a key left at
#: its default does not disagree with the preset): ResNeXt-50 32x4d.
RESNEXT_ARCH_DEFAULTS = {"DEPTH": 50, "CARDINALITY": 32, "BOTTLENECK_WIDTH": 4}


def add_resnext_config(cfg: CN) -> CN:
    """Add the ``MODEL.RESNEXT`` node, the fast-path solver key and the Appendix B
    ``UNSHARED`` node to ``cfg``.

    The names follow the paper (Xie et al., CVPR 2017): C is the cardinality,
    d the bottleneck width of one path in res2; the width doubles each stage.
    Returns ``cfg`` for chaining. Calling it twice is harmless. This module imports
    nothing of resnext_det: every key of the plugin is defined here.
    """
    _C = cfg
    _C.MODEL.RESNEXT = CN()
    # Named preset of the paper's models, e.g. "X-50-32x4d", "X-101-64x4d", or a
    # Table 2 setting ("1x64d", "2x40d", "4x24d", "8x14d", "32x4d", all depth 50).
    # It sets DEPTH, CARDINALITY and BOTTLENECK_WIDTH; "" means use those keys.
    _C.MODEL.RESNEXT.PRESET = ""
    # Depth: 26, 38, 50, 101 or 152 (blocks per stage from Sec. 3.1 / Table 1).
    _C.MODEL.RESNEXT.DEPTH = RESNEXT_ARCH_DEFAULTS["DEPTH"]
    # Blocks in res2..res5, overriding DEPTH when not empty, e.g. [2, 2, 2, 2].
    _C.MODEL.RESNEXT.STAGE_BLOCKS = []
    # Cardinality C: the number of paths (groups of the 3x3 conv). C=1 is a ResNet.
    _C.MODEL.RESNEXT.CARDINALITY = RESNEXT_ARCH_DEFAULTS["CARDINALITY"]
    # Bottleneck width d of one path in res2; doubles in each later stage.
    _C.MODEL.RESNEXT.BOTTLENECK_WIDTH = RESNEXT_ARCH_DEFAULTS["BOTTLENECK_WIDTH"]
    # Which of the paper's equivalent forms (Fig. 3) computes the block:
    # "a" C paths summed, "b" C paths concatenated then one 1x1, "c" grouped conv.
    # All three share parameters and state-dict keys; "c" is the fast one.
    _C.MODEL.RESNEXT.BLOCK_FORM = "c"
    # Normalization after every conv: "FrozenBN" (the paper's fine-tuning setup),
    # "BN", "SyncBN", "GN", "nnSyncBN", "naiveSyncBN", or "" for none.
    _C.MODEL.RESNEXT.NORM = "FrozenBN"
    # Put the stride-2 of a downsampling block on the first 1x1 conv (original
    # MSRA ResNet, Caffe2 "MSRA" weights) instead of the 3x3. False for
    # torchvision, timm, the Torch7 release and Detectron2's ImageNet X-* weights.
    _C.MODEL.RESNEXT.STRIDE_IN_1X1 = False
    # Dilation of res5's 3x3 convs: 1, or 2 to keep res5 at stride 16.
    _C.MODEL.RESNEXT.RES5_DILATION = 1
    # Backbone outputs, any of "stem", "res2", "res3", "res4", "res5".
    # C4 models use ["res4"]; FPN models ["res2", "res3", "res4", "res5"].
    _C.MODEL.RESNEXT.OUT_FEATURES = ["res4"]
    # Freeze the first N parts: 0 nothing, 1 the stem, 2 stem+res2, ... 5 all.
    _C.MODEL.RESNEXT.FREEZE_AT = 2
    # Output channels of the 7x7 stem conv (64 in the paper).
    _C.MODEL.RESNEXT.STEM_OUT_CHANNELS = 64
    # Output channels of res2 (256 in the paper); doubles in each later stage.
    _C.MODEL.RESNEXT.RES2_OUT_CHANNELS = 256
    # Store backbone activations as channels_last (NHWC): faster convs on CPUs
    # and tensor cores. Numerically the same model; see tools/benchmark.py.
    _C.MODEL.RESNEXT.CHANNELS_LAST = False
    # Fast path (resnext_det/fast, docs/performance.md); each switch keeps the model
    # and its checkpoints the same. ROIAlign as a sparse matrix product on CPU
    # (torchvision's CPU kernel is single-threaded, its backward very slow).
    _C.MODEL.RESNEXT.FAST_ROI_ALIGN = False
    # Apply FrozenBN to the conv weights instead of the activations in training,
    # and fold it into them (on a copy) for inference. Needs NORM "FrozenBN".
    _C.MODEL.RESNEXT.FOLD_FROZEN_BN = False
    # torch.compile the backbone in place (needs a C++ compiler on CPU). Off by default.
    _C.MODEL.RESNEXT.COMPILE = False
    # Autocast dtype when SOLVER.AMP.ENABLED (Detectron2's key) is True, in training
    # and inference: "auto" (bfloat16 on CPU, float16 with loss scaling on CUDA),
    # "bfloat16" or "float16". (Set only on full Detectron2 configs, which have SOLVER.AMP.)
    if "SOLVER" in _C and "AMP" in _C.SOLVER:
        _C.SOLVER.AMP.PRECISION = "auto"

    _add_unshared_config(cfg)
    return cfg


def _add_unshared_config(cfg: CN) -> None:
    """The ``UNSHARED`` node: the paper's Appendix B schedule (resnext_det/unshared).

    Its defaults are the paper's numbers (Xie et al., CVPR 2017, Appendix B), given
    for the reference world size ``SOLVER.REFERENCE_WORLD_SIZE`` (8 GPUs): on fewer
    or more processes Detectron2's linear scaling rule
    (``DefaultTrainer.auto_scale_workers``) scales batch, learning rate and
    iterations of each stage. Momentum, weight decay, GAMMA (the x0.1 step),
    checkpoint period and the reference world size are shared by both training
    stages and live in ``SOLVER``; ``SOLVER.IMS_PER_BATCH/BASE_LR/STEPS/MAX_ITER``
    are replaced by the per-stage values below.
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
    # Images per chunk file each process writes as it goes: the most work a kill loses.
    _C.UNSHARED.PROPOSALS.CHUNK_IMAGES = 1000

