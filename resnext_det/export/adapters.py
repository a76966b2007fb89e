# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The model to export, the adapters that give every meta-architecture flat tensor
outputs, and the images exports are made and checked on."""
import logging
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor, nn

import detectron2.data.transforms as T
from detectron2.layers import move_device_like
from detectron2.modeling import GeneralizedRCNN, RetinaNet
from detectron2.structures import ImageList, Instances

from ..data.shapes import ensure_shapes, shapes_image_root
from ..engine.setup import override_keys
from ..errors import ConfigError
from ..inference import build_inference_model, resolve_weights
from ..modeling.unshared_rcnn import UnsharedRCNN
from .constants import ExportError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the model
def export_config(cfg):
    """A frozen copy of ``cfg`` for export: fp32 (``SOLVER.AMP.ENABLED`` off: an
    exported graph is not wrapped in autocast), Detectron2's ROIAlign (the sparse
    CPU ROIAlign of ``MODEL.RESNEXT.FAST_ROI_ALIGN`` builds its matrix with
    data-dependent Python loops that a trace would freeze), no ``torch.compile``.
    ``MODEL.RESNEXT.FOLD_FROZEN_BN`` is kept: the model is exported folded."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = False
    cfg.MODEL.RESNEXT.FAST_ROI_ALIGN = False
    cfg.MODEL.RESNEXT.COMPILE = False
    cfg.freeze()
    return cfg


def export_weights(cfg, opts: Sequence[str] = (), *, config_file: Optional[str] = None) -> str:
    """The checkpoint to export (:func:`resnext_det.inference.resolve_weights`:
    ``MODEL.WEIGHTS`` when given in ``opts``, else ``OUTPUT_DIR/model_final.pth``
    when a training run or the Appendix B schedule wrote it, else the one beside
    ``config_file`` (a run's ``OUTPUT_DIR/config.yaml``), else the config's
    ``MODEL.WEIGHTS``), or ``""`` when ``opts`` set ``MODEL.WEIGHTS ""``: the
    randomly initialised model, for smoke tests and CI."""
    if "MODEL.WEIGHTS" in override_keys(opts) and not cfg.MODEL.WEIGHTS:
        return ""
    return resolve_weights(cfg, opts, config_file=config_file)


def build_eager_model(cfg, weights: str) -> nn.Module:
    """The eager model to export, in eval mode:
    :func:`resnext_det.inference.build_inference_model` (the config's model,
    weights loaded strictly: a file that does not fit the config is refused as in
    training; FrozenBN folded into the convs when ``MODEL.RESNEXT.FOLD_FROZEN_BN``).
    ``cfg`` should come from :func:`export_config` (fp32, so nothing is wrapped in
    autocast). ``weights=""`` keeps the random initialisation, with a warning."""
    if not weights:
        logger.warning(
            "MODEL.WEIGHTS is empty: exporting the RANDOMLY INITIALISED model (fine for smoke "
            "tests and CI, useless for detection). Pass MODEL.WEIGHTS path/to/model_final.pth."
        )
    return build_inference_model(cfg, weights).eval()


# --------------------------------------------------------------------------- adapters
def _clip_nonempty(inst: Instances) -> Instances:
    """What ``detector_postprocess`` does at the input's own size: clip, drop empty boxes."""
    boxes = inst.pred_boxes
    boxes.clip(inst.image_size)
    return inst[boxes.nonempty()]


class _RCNNDetect(nn.Module):
    """GeneralizedRCNN (Faster/Mask/Cascade, C4/FPN), as Detectron2 exports it."""

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Instances:
        return self.model.inference([{"image": image}], do_postprocess=False)[0]


class _RetinaNetDetect(nn.Module):
    """RetinaNet: ``forward`` without the per-image Python loop of its postprocessing
    (which scripting skips), clipped as ``detector_postprocess`` does."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Instances:
        m = self.model
        images = m.preprocess_image([{"image": image}])
        features = m.backbone(images.tensor)
        feats = [features[f] for f in m.head_in_features]
        predictions = m.head(feats)
        return _clip_nonempty(m.forward_inference(images, feats, predictions)[0])


class _UnsharedDetect(nn.Module):
    """The Appendix B ``UnsharedRCNN``: the RPN's own backbone proposes, the Fast
    R-CNN's own backbone classifies, as ``UnsharedRCNN.forward`` in eval mode. It
    holds the two networks' parts, not the networks: scripting compiles the
    ``forward`` of every submodule, and those of ``ProposalNetwork`` and of a
    ``GeneralizedRCNN`` fed precomputed proposals are not scriptable."""

    def __init__(self, model: nn.Module):
        super().__init__()
        rpn, frcn = model.rpn, model.fast_rcnn
        self.rpn_backbone = rpn.backbone
        self.proposal_generator = rpn.proposal_generator
        self.backbone = frcn.backbone
        self.roi_heads = frcn.roi_heads
        self.register_buffer("rpn_pixel_mean", rpn.pixel_mean.clone(), persistent=False)
        self.register_buffer("rpn_pixel_std", rpn.pixel_std.clone(), persistent=False)
        self.register_buffer("pixel_mean", frcn.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", frcn.pixel_std.clone(), persistent=False)

    def forward(self, image: Tensor) -> Instances:
        image = move_device_like(image, self.pixel_mean)
        images = ImageList.from_tensors(
            [(image - self.rpn_pixel_mean) / self.rpn_pixel_std],
            self.rpn_backbone.size_divisibility,
            padding_constraints=self.rpn_backbone.padding_constraints,
        )
        proposals, _ = self.proposal_generator(images, self.rpn_backbone(images.tensor), None)
        images = ImageList.from_tensors(
            [(image - self.pixel_mean) / self.pixel_std],
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        results, _ = self.roi_heads(images, self.backbone(images.tensor), proposals, None)
        return _clip_nonempty(results[0])


class _BoxOutputs(nn.Module):
    def __init__(self, detect: nn.Module):
        super().__init__()
        self.detect = detect

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        inst = self.detect(image)
        return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


class _MaskOutputs(nn.Module):
    def __init__(self, detect: nn.Module):
        super().__init__()
        self.detect = detect

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        inst = self.detect(image)
        return inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks


def meta_arch(model: nn.Module) -> str:
    """The meta-architecture of ``model`` as the exporter names it: "UnsharedRCNN",
    "GeneralizedRCNN" (subclasses included) or "RetinaNet"; else its class name (which
    :func:`detector_adapter` refuses)."""
    if isinstance(model, UnsharedRCNN):
        return "UnsharedRCNN"
    if isinstance(model, GeneralizedRCNN):
        return "GeneralizedRCNN"
    if isinstance(model, RetinaNet):
        return "RetinaNet"
    return type(model).__name__


def _mask_on(model: nn.Module) -> bool:
    heads = getattr(model, "roi_heads", None)
    return bool(getattr(heads, "mask_on", False))


def output_names(model: nn.Module) -> Tuple[str, ...]:
    """Names of the exported model's outputs, in order."""
    return ("boxes", "scores", "classes") + (("masks",) if _mask_on(model) else ())


def detector_adapter(model: nn.Module) -> nn.Module:
    """``model`` as a module ``image (3, H, W) -> (boxes, scores, classes[, masks])``
    (see the module docstring), ready for tracing, scripting or ONNX.

    Raises:
        ExportError: a meta-architecture the project does not export.
    """
    kind = meta_arch(model)
    if kind == "UnsharedRCNN":
        detect = _UnsharedDetect(model)
    elif kind == "GeneralizedRCNN":
        if model.proposal_generator is None:
            raise ExportError(
                "a GeneralizedRCNN without proposal generator (PrecomputedProposals) needs "
                "proposals as input: export the end-to-end model (UnsharedRCNN) instead."
            )
        detect = _RCNNDetect(model)
    elif kind == "RetinaNet":
        detect = _RetinaNetDetect(model)
    else:
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {kind!r} is not exported: GeneralizedRCNN (Faster/Mask/"
            "Cascade R-CNN), RetinaNet and UnsharedRCNN are."
        )
    return (_MaskOutputs if _mask_on(model) else _BoxOutputs)(detect).eval()


# ----------------------------------------------------------------------------- images
def sample_image(index: int = 0) -> np.ndarray:
    """An image of the bundled shapes set (``shapes_val``, generated on first use):
    uint8 (H, W, 3) RGB."""
    folder = shapes_image_root("val", ensure_shapes())
    names = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
    return cv2.imread(os.path.join(folder, names[index]))[:, :, ::-1].copy()


def verification_images(image: np.ndarray) -> List[np.ndarray]:
    """Two crops of ``image``, one portrait and one landscape: after resizing they
    have other sizes than ``image`` (and than one another), so a graph that froze the
    export image's size shows."""
    h, w = image.shape[:2]
    return [image[:, : max(8, (w * 3) // 4)].copy(), image[: max(8, (h * 5) // 8), :].copy()]


def preprocess(cfg, image_rgb: np.ndarray) -> Tensor:
    """The model input for an RGB uint8 image, as ``DefaultPredictor`` makes it:
    ``INPUT.FORMAT`` channel order, ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``,
    float32 (3, H, W)."""
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ConfigError(f"INPUT.FORMAT must be 'RGB' or 'BGR' to export, got {cfg.INPUT.FORMAT!r}.")
    image = image_rgb if cfg.INPUT.FORMAT == "RGB" else image_rgb[:, :, ::-1]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(np.ascontiguousarray(image))
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
