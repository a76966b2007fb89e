# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Faster R-CNN whose RPN and Fast R-CNN do not share features (the paper's
Appendix B detector), as one model that runs raw images end to end."""
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, ProposalNetwork
from detectron2.structures import ImageList, Instances

from ..errors import ConfigError

__all__ = ["PER_STAGE_SOLVER", "UnsharedRCNN", "network_configs"]

# Solver keys that each network takes from UNSHARED.{RPN,FAST_RCNN} instead.
PER_STAGE_SOLVER = ("IMS_PER_BATCH", "BASE_LR", "STEPS", "MAX_ITER")


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


def network_configs(cfg: CfgNode) -> Dict[str, CfgNode]:
    """The Detectron2 configs of the two networks of the Appendix B detector.

    Args:
        cfg: a config with the ``UNSHARED`` node (:func:`add_resnext_config`).

    Returns:
        ``{"rpn": cfg_rpn, "fast_rcnn": cfg_fast_rcnn}``: plain Detectron2 configs
        (``UNSHARED.ENABLED`` False). ``cfg_rpn`` is a ``ProposalNetwork`` with the
        solver of ``UNSHARED.RPN``; ``cfg_fast_rcnn`` a ``GeneralizedRCNN`` with
        ``PrecomputedProposals`` and the solver of ``UNSHARED.FAST_RCNN``. Both start
        from ``MODEL.WEIGHTS`` and keep ``SOLVER.REFERENCE_WORLD_SIZE``. Where each
        stage of the schedule works and reads its proposals is
        :func:`resnext_det.unshared.stage_configs`'s.

    Raises:
        ConfigError: a ``UNSHARED.*`` value the schedule cannot run, naming the key.
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

    frcn = base.clone()
    frcn.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    frcn.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    frcn.MODEL.LOAD_PROPOSALS = True
    frcn.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = u.FAST_RCNN.BATCH_SIZE_PER_IMAGE
    for k in PER_STAGE_SOLVER:
        frcn.SOLVER[k] = u.FAST_RCNN[k]
    # Use all stored proposals: the same boxes as the end-to-end UnsharedRCNN.
    frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = u.PROPOSALS.TRAIN_POST_NMS_TOPK
    frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = cfg.MODEL.RPN.POST_NMS_TOPK_TEST

    if cfg.is_frozen():
        rpn.freeze()
        frcn.freeze()
    return {"rpn": rpn, "fast_rcnn": frcn}




@META_ARCH_REGISTRY.register()
class UnsharedRCNN(nn.Module):
    """RPN backbone -> proposals -> Fast R-CNN backbone -> boxes.

    Xie et al. (CVPR 2017), Appendix B: "for simplicity RPN and Fast R-CNN do not
    share features". The model holds the two networks trained by the staged
    schedule (:func:`resnext_det.unshared.run_schedule`): ``rpn``, a Detectron2
    :class:`ProposalNetwork` with its own backbone, and ``fast_rcnn``, a
    :class:`GeneralizedRCNN` without proposal generator (``PrecomputedProposals``)
    with its own backbone. Its state-dict keys are ``rpn.*`` and ``fast_rcnn.*``:
    the checkpoint ``OUTPUT_DIR/model_final.pth`` written by the schedule loads
    into it, which is what ``tools/train_net.py --eval-only`` and the demo use.

    Inputs and outputs are those of :class:`GeneralizedRCNN`. In training mode
    it returns the losses of both networks, the RPN's proposals (without
    gradient) feeding the Fast R-CNN: approximate joint training of two
    unshared networks, which plain ``tools/train_net.py`` runs when
    ``UNSHARED.ENABLED`` is False. The paper's stage-wise training is the
    schedule's.
    """

    @configurable
    def __init__(self, *, rpn: ProposalNetwork, fast_rcnn: GeneralizedRCNN):
        """
        Args:
            rpn: the RPN-only network (stage 1 of the schedule).
            fast_rcnn: the detector trained on stored proposals (stage 3); its
                ``proposal_generator`` must be None.
        """
        super().__init__()
        if getattr(fast_rcnn, "proposal_generator", None) is not None:
            raise ConfigError(
                "UnsharedRCNN's fast_rcnn must take its proposals from the RPN: build it "
                "with MODEL.PROPOSAL_GENERATOR.NAME 'PrecomputedProposals'."
            )
        self.rpn = rpn
        self.fast_rcnn = fast_rcnn

    @classmethod
    def from_config(cls, cfg) -> Dict[str, nn.Module]:
        cfgs = network_configs(cfg)
        rpn_cfg = cfgs["rpn"].clone()
        rpn_cfg.defrost()
        # stage 1 makes no training proposals; joint training here needs them
        rpn_cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN
        rpn_cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN
        return {
            "rpn": META_ARCH_REGISTRY.get("ProposalNetwork")(rpn_cfg),
            "fast_rcnn": META_ARCH_REGISTRY.get("GeneralizedRCNN")(cfgs["fast_rcnn"]),
        }

    @property
    def device(self) -> torch.device:
        return self.fast_rcnn.device

    def _rpn_forward(self, batched_inputs, gt_instances=None):
        rpn = self.rpn
        images = [rpn._move_to_current_device(x["image"]) for x in batched_inputs]
        images = [(x - rpn.pixel_mean) / rpn.pixel_std for x in images]
        images = ImageList.from_tensors(
            images,
            rpn.backbone.size_divisibility,
            padding_constraints=rpn.backbone.padding_constraints,
        )
        features = rpn.backbone(images.tensor)
        return rpn.proposal_generator(images, features, gt_instances)

    def propose(self, batched_inputs: List[Dict[str, torch.Tensor]]) -> List[Instances]:
        """Run the RPN (its own backbone) on the inputs.

        Returns:
            One :class:`Instances` per image with ``proposal_boxes`` and
            ``objectness_logits``, in the coordinates of the input ``image``
            tensors (as the Fast R-CNN reads them), at most
            ``MODEL.RPN.POST_NMS_TOPK_TEST`` per image (``_TRAIN`` in training
            mode), best first.
        """
        return self._rpn_forward(batched_inputs)[0]

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Detect objects in raw images (eval mode), or return the losses of both
        networks (training mode); see :meth:`GeneralizedRCNN.forward`."""
        if not self.training:
            proposals = self.propose(batched_inputs)
            inputs = [dict(x, proposals=p) for x, p in zip(batched_inputs, proposals)]
            return self.fast_rcnn.inference(inputs)

        if "instances" not in batched_inputs[0]:
            raise ConfigError("Training UnsharedRCNN needs 'instances' (ground truth) in the inputs.")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        # The RPN computes its proposals without gradient: fixed Fast R-CNN inputs.
        proposals, rpn_losses = self._rpn_forward(batched_inputs, gt_instances)
        frcn = self.fast_rcnn
        images = frcn.preprocess_image(batched_inputs)
        features = frcn.backbone(images.tensor)
        _, detector_losses = frcn.roi_heads(images, features, proposals, gt_instances)
        return {**rpn_losses, **detector_losses}
