# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Faster R-CNN whose RPN and Fast R-CNN do not share features (the paper's
Appendix B detector), as one model that runs raw images end to end."""
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, ProposalNetwork
from detectron2.structures import ImageList, Instances

from .stages import stage_configs
from ..errors import ConfigError

__all__ = ["UnsharedRCNN"]


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
        cfgs = stage_configs(cfg)
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
