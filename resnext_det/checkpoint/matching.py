# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What a checkpoint's tensors are and where they go in a model, for
:class:`~resnext_det.checkpoint.loading.ResNeXtCheckpointer`: the kind of a
checkpoint from its keys (a backbone, a detector, raw ImageNet weights), the
places of a model that take backbone weights, the tensors a load must fill, and
the error that names the config keys when the file's shapes are another model's.
"""
import re
from typing import Dict, List, Tuple

import torch

from .metadata import WeightsConfigError
from .readers import key_family

__all__ = [
    "classify_checkpoint",
    "backbone_targets",
    "required_keys",
    "check_required",
    "shape_fixes",
]

_BACKBONE_ONLY = re.compile(r"^(stem|res[2-5])\.")
_NOT_REQUIRED = ("num_batches_tracked",)


def classify_checkpoint(sd: Dict[str, object]) -> str:
    """"backbone" (Detectron2 names, trunk only), "detector", or the raw
    ImageNet family ("torchvision", "caffe2")."""
    fam = key_family(sd)
    if fam in ("torchvision", "caffe2"):
        return fam
    if any(k.startswith("backbone.") for k in sd):
        return "detector"
    if fam == "detectron2" or (sd and all(_BACKBONE_ONLY.match(k) for k in sd)):
        return "backbone"
    return "detector"


def backbone_targets(model: torch.nn.Module) -> List[Tuple[str, str]]:
    """(model prefix, backbone-checkpoint prefix) of every place backbone
    weights go: the ResNet/ResNeXt trunk (``backbone.`` or
    ``backbone.bottom_up.``) and a C4 model's ``roi_heads.res5.``."""
    from detectron2.modeling.backbone.resnet import ResNet
    from detectron2.modeling.roi_heads import Res5ROIHeads

    out = []
    for name, m in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(m, ResNet):
            out.append((prefix, ""))
        elif isinstance(m, Res5ROIHeads):
            out.append((prefix + "res5.", "res5."))
    return out


def required_keys(keys, prefixes) -> List[str]:
    """The ``keys`` under ``prefixes`` that a load must fill (not ``num_batches_tracked``)."""
    return [k for k in keys if k.startswith(tuple(prefixes)) and not k.endswith(_NOT_REQUIRED)]


def check_required(model_sd, provided, required, what: str, *, backbone: bool) -> None:
    """Raise unless ``provided`` has every ``required`` tensor of the model's state dict
    ``model_sd``, each of the model's shape; the message names what is missing, what has
    another shape and the config keys that set those shapes (:func:`shape_fixes`).

    Args:
        model_sd: the model's state dict.
        provided: the file's tensors, in the model's names.
        required: the model's keys that must come from the file (:func:`required_keys`).
        what: how the message names the file (``MODEL.WEIGHTS = '...'``).
        backbone: whether ``required`` are the backbone's tensors (else the model's).
    """
    missing = [k for k in required if k not in provided]
    other = [k for k in required if k in provided and tuple(provided[k].shape) != tuple(model_sd[k].shape)]
    shapes = [f"{k}: {tuple(provided[k].shape)} in the file, {tuple(model_sd[k].shape)} in the model" for k in other]
    if not missing and not shapes:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} are not in the file, e.g. {missing[:6]}")
    if shapes:
        parts.append(
            f"{len(shapes)} have another shape, e.g. {shapes[:3]}: the file holds another model "
            f"than the config builds; set {' and '.join(shape_fixes(other, provided, model_sd))}"
        )
    scope = "backbone tensors" if backbone else "model tensors"
    raise WeightsConfigError(
        f"{what} would leave {len(missing) + len(shapes)} of the {len(required)} {scope} at "
        f"their random initialisation: " + "; ".join(parts) + ". Fix MODEL.WEIGHTS or the config."
    )


_BACKBONE_KEY = re.compile(r"(^|\.)(stem|res[2-5])\.")


def shape_fixes(keys: List[str], provided, model_sd) -> List[str]:
    """The config keys that set the shapes of ``keys`` (tensors whose shape differs
    between the file and the model), with the value the file implies where its shape
    tells it: a head trained for 3 classes names ``MODEL.ROI_HEADS.NUM_CLASSES 3``,
    a backbone of another size the ``MODEL.RESNEXT`` keys. A predictor whose class
    dimension agrees differs in its input width: that names the head's width keys, not
    the class count the config already has."""
    fixes: Dict[str, None] = {}  # ordered set
    trained = "(the number of classes the file's heads were trained for)"

    def size(sd, key, dim=0):
        t = sd.get(key)
        return t.shape[dim] if t is not None and t.dim() > dim else 0

    def kp_dim(key):  # the keypoint predictor, a ConvTranspose2d: weight (in, K, k, k), bias (K,)
        return 1 if provided[key].dim() > 1 else 0

    for k in keys:
        out = size(provided, k)
        classes_differ = out != size(model_sd, k)  # dimension 0: classes (x boxes, x anchors)
        if re.search(r"box_predictor\.(\d+\.)?cls_score\.", k) and classes_differ:  # K classes + background
            fixes[f"MODEL.ROI_HEADS.NUM_CLASSES {out - 1} {trained}"] = None
        elif re.search(r"box_predictor\.(\d+\.)?bbox_pred\.", k) and classes_differ:
            fix = ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True" if out == 4
                   else f"MODEL.ROI_HEADS.NUM_CLASSES {out // 4} {trained}")
            fixes[fix] = None
        elif re.search(r"mask_head\.predictor\.", k) and classes_differ:
            fix = ("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True" if out == 1
                   else f"MODEL.ROI_HEADS.NUM_CLASSES {out} {trained}")
            fixes[fix] = None
        elif re.search(r"keypoint_head\.score_lowres\.", k) and (
            size(provided, k, kp_dim(k)) != size(model_sd, k, kp_dim(k))
        ):  # else its input width differs: the keypoint head's keys below
            n = size(provided, k, kp_dim(k))
            fixes[f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS {n} (the file's keypoint head has {n})"] = None
        elif re.search(r"(^|\.)head\.(cls_score|bbox_pred)\.", k):  # RetinaNet: anchors x classes, anchors x 4
            cls, box = (k.replace("bbox_pred", "cls_score"), k.replace("cls_score", "bbox_pred"))
            anchors, anchors_model = size(provided, box) // 4, size(model_sd, box) // 4
            if anchors and anchors != anchors_model:
                fixes[f"MODEL.ANCHOR_GENERATOR.SIZES / ASPECT_RATIOS (the file's RetinaNet has {anchors} anchors "
                      f"per position, the model {anchors_model})"] = None
            elif anchors and size(provided, cls) != size(model_sd, cls):
                fixes[f"MODEL.RETINANET.NUM_CLASSES {size(provided, cls) // anchors} {trained}"] = None
            elif not anchors:
                fixes["MODEL.RETINANET.NUM_CLASSES / MODEL.ANCHOR_GENERATOR (classes x anchors)"] = None
            else:
                fixes["MODEL.FPN.OUT_CHANNELS / MODEL.RETINANET.NUM_CONVS (the file's RetinaNet head differs)"] = None
        elif re.search(r"sem_seg_head\.predictor\.", k) and classes_differ:
            fixes[f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {out} {trained}"] = None
        elif re.search(r"sem_seg_head\.", k):
            fixes["MODEL.SEM_SEG_HEAD.CONVS_DIM / COMMON_STRIDE / IN_FEATURES (the file's semantic head differs)"] = None
        elif _BACKBONE_KEY.search(k):
            fixes["MODEL.RESNEXT.PRESET / DEPTH / CARDINALITY / BOTTLENECK_WIDTH / STEM_OUT_CHANNELS / "
                  "RES2_OUT_CHANNELS (the file's backbone has another architecture)"] = None
        elif re.search(r"(^|\.)(fpn_|top_block\.)", k):
            fixes[f"MODEL.FPN.OUT_CHANNELS {out} (the file's FPN width; the heads on it follow)"] = None
        elif "rpn_head." in k:
            fixes["MODEL.ANCHOR_GENERATOR.SIZES / ASPECT_RATIOS (anchors per position; the file's RPN head "
                  "differs)"] = None
        elif "box_head." in k or "box_predictor." in k:
            fixes["MODEL.ROI_BOX_HEAD.FC_DIM / NUM_FC / CONV_DIM / NUM_CONV / POOLER_RESOLUTION (the file's box "
                  "head differs)"] = None
        elif "mask_head." in k:
            fixes["MODEL.ROI_MASK_HEAD.CONV_DIM / NUM_CONV (the file's mask head differs)"] = None
        elif "keypoint_head." in k:
            fixes["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS (the file's keypoint head differs)"] = None
        else:
            fixes[f"the keys that build {k.rsplit('.', 1)[0]} (or point MODEL.WEIGHTS at a file of this model)"] = None
    if any(f.startswith("MODEL.FPN.") for f in fixes):  # the RPN and box heads' shapes follow its width
        return [f for f in fixes if not f.startswith(("MODEL.ANCHOR_GENERATOR.", "MODEL.ROI_BOX_HEAD.FC_DIM"))]
    return list(fixes)
