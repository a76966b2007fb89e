# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Strict loading of ``MODEL.WEIGHTS``.

Detectron2's :class:`DetectionCheckpointer` loads whatever names match and
only *warns* about the rest, so a wrong file trains on half-random weights.
:class:`ResNeXtCheckpointer` loads the same files, but when a fresh run starts
from ``MODEL.WEIGHTS`` it refuses:

* a missing, truncated or non-checkpoint file (clear message, no pickle trace);
* raw torchvision / timm / Caffe2 ImageNet files (convert them first, so that
  their input convention is recorded);
* weights whose recorded architecture or input convention disagrees with the
  config (the message lists the ``KEY VALUE`` pairs to set);
* any backbone tensor (stem, res2..res5, including a C4 model's
  ``roi_heads.res5``) that the file would leave at its random initialisation.

Resuming from ``OUTPUT_DIR/last_checkpoint`` loads as Detectron2 does.
:func:`weights_file` gives the file ``MODEL.WEIGHTS`` loads (a name fetched into the
cache): an entry point calls it before a run starts, so that a missing file or a name
that cannot be downloaded ends the run before anything else is logged.
"""
import difflib
import logging
import os
import re
from typing import Dict, List, Tuple

import torch

from detectron2.checkpoint import DetectionCheckpointer

from .metadata import (
    METADATA_KEY,
    WeightsConfigError,
    WeightsMetadata,
    check_weights_against_config,
    metadata_from_model,
)
from ..utils.io import atomic_write, atomic_write_text
from .layout import detector_convention
from .readers import (
    _READ_ERRORS,
    CheckpointReadError,
    describe_read_failure,
    key_family,
    safe_pickle_load,
    torch_load_weights,
)
from .sources import fetch_weights, is_source_name
from ..errors import ConfigError, MissingFileError

__all__ = [
    "ResNeXtCheckpointer",
    "WeightsRecord",
    "attach_weights_record",
    "backbone_targets",
    "classify_checkpoint",
    "final_checkpoint",
    "weights_file",
]

#: What a finished training run leaves in its folder (Detectron2's trainer saves "model_final").
FINAL_CHECKPOINT = "model_final"


def final_checkpoint(folder: str) -> str:
    """``folder/model_final.pth``: the checkpoint a finished training run (Detectron2's
    trainer, a training stage of the Appendix B schedule) leaves in its ``OUTPUT_DIR``."""
    return os.path.join(folder, FINAL_CHECKPOINT + ".pth")

logger = logging.getLogger(__name__)
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


def _missing_weights(path: str, require: str) -> str:
    """What to do about ``MODEL.WEIGHTS = path`` that does not exist: the files of its
    folder whose names are close to it, then what the run needs (evaluation: a trained
    detector; fine-tuning: also a converted backbone, or nothing)."""
    folder = os.path.dirname(path) or "."
    try:
        here = [f for f in os.listdir(folder) if f.endswith((".pth", ".pkl", ".pt", ".pyth"))]
    except OSError:
        here = []
    near = difflib.get_close_matches(os.path.basename(path), here, n=2, cutoff=0.7)
    near = [os.path.join(os.path.dirname(path), f) for f in near]
    hint = f" (did you mean {' or '.join(repr(f) for f in near)}?)" if near else ""
    if require == "all":
        fix = (
            "Evaluation needs a trained detector: point MODEL.WEIGHTS at its checkpoint (the "
            "model_final.pth a training run writes in its OUTPUT_DIR), or pass --resume with "
            "OUTPUT_DIR set to that run's folder to evaluate its last checkpoint."
        )
    else:
        fix = (
            "Point MODEL.WEIGHTS at a backbone converted by tools/convert_pretrained.py or at a "
            "detector checkpoint (model_final.pth), or set MODEL.WEIGHTS '' to train from scratch."
        )
    return f"MODEL.WEIGHTS = {path!r}: no such file{hint}. {fix}"


def weights_file(path: str, *, require: str = "backbone") -> str:
    """The local file that ``MODEL.WEIGHTS = path`` loads: a name (``torchvision://``,
    ``timm://``, ..., ``https://``) from the cache, downloaded, checked and converted
    there the first time (:func:`~resnext_det.checkpoint.sources.fetch_weights`); a path
    as it is; "" as it is (no weights).

    Args:
        path: ``MODEL.WEIGHTS``.
        require: as :class:`ResNeXtCheckpointer`: "all" (evaluation) or "backbone"; it
            decides what the message for a missing file advises.

    Raises:
        MissingFileError: ``path`` is not a file; the message says what to point it at.
        WeightsSourceError: a name that cannot be resolved or downloaded (offline: one
            line naming the URL and the command that converts the file by hand).
    """
    if is_source_name(path):  # torchvision://, timm://, ...: downloaded once, converted, cached
        return fetch_weights(path)
    if path and "://" not in path and not os.path.isfile(path):
        raise MissingFileError(_missing_weights(path, require))
    return path


def _not_weights(what: str, data) -> str:
    """The message for a file that PyTorch reads but that holds no dict of weights."""
    if isinstance(data, torch.Tensor):
        content = f"one tensor of shape {tuple(data.shape)}"
    elif isinstance(data, (list, tuple)):
        content = f"a {type(data).__name__} of {len(data)} item(s)"
    else:
        content = f"a {type(data).__name__}"
    return (
        f"{what} is not a checkpoint: it holds {content}, not a dict of named weights (MODEL.WEIGHTS "
        "takes a model_final.pth of a training run, a backbone converted by tools/convert_pretrained.py, "
        "or a Detectron2 model-zoo .pkl)"
    )


def _unreadable(path: str, error: BaseException, what: str) -> str:
    """The message for a file that PyTorch cannot read: the reader's own error where it
    describes the file (pickle's "invalid load key", a zip without its directory), but
    not an unpickler's inner state (``IndexError: pop from empty list``, ``KeyError: 101``
    on random bytes) nor PyTorch's advice to load with ``weights_only=False`` (no weights
    file here runs code when read)."""
    text = str(error)
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if size == 0:
        kind = "the file is empty"
    elif m:
        kind = (
            f"it pickles Python objects ({m.group(1)}), not only tensors, and no weights file runs code "
            "when read: save a dict of tensors instead (torch.save(model.state_dict(), path))"
        )
    elif isinstance(error, (IndexError, KeyError)) or "Weights only load failed" in text:
        kind = "its content is neither a PyTorch checkpoint (a zip archive) nor a pickle of tensors"
    else:
        return describe_read_failure(path, error, what=what)
    return (
        f"{what} ({size} bytes) is not a readable checkpoint: {kind}. It is truncated (an "
        "interrupted download or copy: compare its size and sha256 with the source) or not a "
        "weight file at all."
    )


def _required(keys, prefixes) -> List[str]:
    return [k for k in keys if k.startswith(tuple(prefixes)) and not k.endswith(_NOT_REQUIRED)]


class WeightsRecord:
    """A checkpointable that stores the config's input convention and
    architecture in every checkpoint the trainer saves (key ``"resnext_det"``),
    so that a detector checkpoint can be checked like a converted backbone.
    On resume it refuses a config that changed them."""

    def __init__(self, cfg, model: torch.nn.Module):
        self.cfg = cfg
        self.model = model

    def state_dict(self) -> dict:
        return metadata_from_model(self.model, self.cfg).to_dict()

    def load_state_dict(self, state: dict) -> None:
        check_weights_against_config(
            WeightsMetadata.from_dict(state),
            self.cfg,
            model=self.model,
            weights="the last checkpoint of OUTPUT_DIR",
        )


def attach_weights_record(checkpointer, cfg) -> None:
    """Add a :class:`WeightsRecord` of ``checkpointer.model`` to ``checkpointer`` (once)."""
    if METADATA_KEY not in checkpointer.checkpointables:
        checkpointer.add_checkpointable(METADATA_KEY, WeightsRecord(cfg, checkpointer.model))


class ResNeXtCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads ``MODEL.WEIGHTS`` strictly (see
    the module docstring). Use it wherever a fresh run starts from weights::

        ResNeXtCheckpointer(model, cfg=cfg).load(cfg.MODEL.WEIGHTS)
    """

    def __init__(self, model, save_dir: str = "", *, cfg=None, require: str = "backbone", **checkpointables):
        """
        Args:
            model: the model to load into.
            save_dir: as :class:`DetectionCheckpointer`.
            cfg: the config; when given, the checkpoint's recorded input
                convention and architecture must match it.
            require: "backbone": every backbone tensor must come from the file
                (fine-tuning: the heads start random); "all": every tensor
                (evaluation).
            checkpointables: as :class:`DetectionCheckpointer`.
        """
        super().__init__(model, save_dir, **checkpointables)
        if require not in ("backbone", "all"):
            raise ConfigError(f"require must be 'backbone' or 'all', got {require!r}")
        self.cfg = cfg
        self.require = require
        self._validate = True
        self._path = ""

    # -- entry points --------------------------------------------------------
    def resume_or_load(self, path: str, *, resume: bool = True):
        """Resume from ``save_dir``'s last checkpoint as Detectron2 does, or load
        ``path`` strictly. A ``last_checkpoint`` that names a missing or unreadable
        file (written by a version that did not write atomically, a disk that filled
        up, a file deleted by hand), or that is empty, falls back to the newest complete
        checkpoint of ``save_dir``, with a warning; with none, a one-line error says what
        to do."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = self._last_name()
        if not last or not os.path.isfile(os.path.join(self.save_dir, last)):
            logger.warning(
                "%s %s: resuming from the newest complete checkpoint of %s instead.",
                os.path.join(self.save_dir, "last_checkpoint"),
                f"names {last!r}, which does not exist" if last else "is empty",
                self.save_dir,
            )
        self._validate = False
        try:
            for candidate in self._resume_candidates():
                try:
                    return self.load(candidate)
                except CheckpointReadError as e:
                    logger.warning("Cannot resume from %s (%s); trying an older checkpoint.", candidate, e)
            raise CheckpointReadError(
                f"--resume: no complete checkpoint in {self.save_dir!r} (last_checkpoint names "
                f"{self._last_name()!r}). Delete {os.path.join(self.save_dir, 'last_checkpoint')} "
                "to start over from MODEL.WEIGHTS, or point OUTPUT_DIR elsewhere."
            )
        finally:
            self._validate = True

    def _last_name(self) -> str:
        try:
            with open(os.path.join(self.save_dir, "last_checkpoint")) as f:
                return f.read().strip()
        except OSError:
            return ""

    def _resume_candidates(self) -> List[str]:
        """The file ``last_checkpoint`` names, then the other ``model_*.pth`` of
        ``save_dir``, newest iteration first."""
        out = []
        last = self._last_name()
        if last and os.path.isfile(os.path.join(self.save_dir, last)):
            out.append(os.path.join(self.save_dir, last))
        others = sorted(
            (f for f in os.listdir(self.save_dir) if re.fullmatch(r"model_(\d+|final)\.pth", f)),
            key=lambda f: (f == FINAL_CHECKPOINT + ".pth", f),
            reverse=True,
        )
        out += [os.path.join(self.save_dir, f) for f in others if os.path.join(self.save_dir, f) not in out]
        return out

    def load(self, path: str, checkpointables=None):
        name = path
        path = weights_file(path, require=self.require)
        self._path = name
        try:
            return super().load(path, checkpointables)
        finally:
            # Detectron2 resets it only when loading succeeds: a failed load would make
            # every later load of this checkpointer (the resume fallback) assert.
            self._parsed_url_during_load = None

    # -- writing: whole or not at all -----------------------------------------
    def save(self, name: str, **kwargs) -> None:
        """As Detectron2's ``save``, but the file is written to a temporary name,
        ``fsync``-ed and renamed (a kill or a full disk never leaves a truncated
        ``model_final.pth``), then tagged in ``last_checkpoint``, also atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # -- reading: no file runs code ------------------------------------------
    def _load_file(self, filename: str):
        what = f"MODEL.WEIGHTS = {self._path or filename!r}"
        try:
            if filename.endswith(".pkl"):
                data = _detectron_pickle(safe_pickle_load(filename, what=what))
            elif filename.endswith(".pyth"):
                data = self._torch_load(filename)
                data = {"model": data.get("model_state", data), "__author__": "pycls", "matching_heuristics": True}
            else:
                data = super()._load_file(filename)
        except CheckpointReadError:
            raise
        except _READ_ERRORS as e:
            raise CheckpointReadError(_unreadable(filename, e, what)) from e
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise CheckpointReadError(_not_weights(what, data.get("model") if isinstance(data, dict) else data))
        return data

    def _torch_load(self, f: str):
        """No code runs: see :func:`~resnext_det.checkpoint.readers.torch_load_weights`.
        Anything but a dict (a tensor, a list) is refused here, before Detectron2 looks
        for its ``"model"`` entry."""
        data = torch_load_weights(f)
        if not isinstance(data, dict):
            raise CheckpointReadError(_not_weights(f"MODEL.WEIGHTS = {self._path or f!r}", data))
        return data

    # -- loading -------------------------------------------------------------
    def _load_model(self, checkpoint):
        if not self._validate:
            return super()._load_model(checkpoint)
        what = f"MODEL.WEIGHTS = {self._path!r}"
        sd = checkpoint["model"]
        try:
            self._convert_ndarray_to_tensor(sd)
        except ValueError as e:
            raise CheckpointReadError(f"{what} is not a checkpoint of weights: {e}") from e
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        kind = classify_checkpoint(sd)
        meta = checkpoint.get(METADATA_KEY)
        meta = WeightsMetadata.from_dict(meta) if isinstance(meta, dict) else None
        if meta is None and kind == "detector":  # another project's: what its file tells
            found = detector_convention(sd, checkpoint)
            meta = found.metadata(assume=metadata_from_model(self.model, self.cfg))
            if found.unknown_keys():
                logger.warning(found.warning(what))

        if kind in ("torchvision", "caffe2"):
            raise WeightsConfigError(
                f"{what} holds raw {kind} ImageNet weights. Detectron2 would load them by "
                "name-matching heuristics, silently leave the rest random and not know their "
                "input convention. Convert them first and use the config lines it prints:\n"
                f"  python tools/convert_pretrained.py {self._path} {_suggest_output(self._path)}"
            )
        if kind == "backbone" and meta is None:
            raise WeightsConfigError(
                f"{what} is a backbone-only checkpoint that does not record its input "
                "convention (it was not written by tools/convert_pretrained.py). Convert it:\n"
                f"  python tools/convert_pretrained.py {self._path} {_suggest_output(self._path)} "
                "--format detectron2 --convention torchvision|fair|detectron1|msra (see docs/weights.md)"
            )
        if meta is not None:
            for w in check_weights_against_config(meta, self.cfg, model=self.model, weights=self._path):
                logger.warning(w)

        targets = backbone_targets(self.model)
        model_sd = self.model.state_dict()
        if kind == "backbone" and self.require == "all":
            raise WeightsConfigError(
                f"{what} holds backbone weights only (ImageNet-style, for fine-tuning): every "
                "head would stay random. To evaluate or run a detector, point MODEL.WEIGHTS at a "
                "trained detector checkpoint (the model_final.pth a training run writes in its "
                "OUTPUT_DIR)."
            )
        if kind == "backbone":
            if not targets:
                raise WeightsConfigError(
                    f"{what} is a ResNeXt/ResNet backbone, but the model has no ResNet-family "
                    "backbone to load it into (MODEL.BACKBONE.NAME)"
                )
            mapped = {}
            for mp, cp in targets:
                for k in model_sd:
                    if k.startswith(mp) and cp + k[len(mp) :] in sd:
                        mapped[k] = sd[cp + k[len(mp) :]]
            required = _required(model_sd, [mp for mp, _ in targets])
            self._check_required(model_sd, mapped, required, what, backbone=True)
            used = {cp + k[len(mp) :] for mp, cp in targets for k in mapped if k.startswith(mp)}
            unused = sorted(set(sd) - used)
            if unused:
                logger.info(
                    "%s: %d backbone tensors not used by this model, e.g. %s", what, len(unused), unused[:4]
                )
            checkpoint["model"] = mapped
            checkpoint["matching_heuristics"] = False
            logger.info(
                "Loaded all %d backbone tensors of %s into %s", len(required), what,
                ", ".join(repr(mp.rstrip(".") or "<model>") for mp, _ in targets),
            )
        else:
            prefixes = [""] if self.require == "all" else [mp for mp, _ in targets]
            required = _required(model_sd, prefixes)
            self._check_required(model_sd, sd, required, what, backbone=self.require != "all")
            checkpoint["model"] = sd
        return super()._load_model(checkpoint)

    def _check_required(self, model_sd, provided, required, what: str, *, backbone: bool) -> None:
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
                f"than the config builds; set {' and '.join(_shape_fixes(other, provided, model_sd))}"
            )
        scope = "backbone tensors" if backbone else "model tensors"
        raise WeightsConfigError(
            f"{what} would leave {len(missing) + len(shapes)} of the {len(required)} {scope} at "
            f"their random initialisation: " + "; ".join(parts) + ". Fix MODEL.WEIGHTS or the config."
        )


_BACKBONE_KEY = re.compile(r"(^|\.)(stem|res[2-5])\.")


def _shape_fixes(keys: List[str], provided, model_sd) -> List[str]:
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


def _detectron_pickle(data) -> dict:
    """A Detectron2 model-zoo ``.pkl`` (``{"model": ..., "__author__": ...}``) as it is,
    a Detectron/Caffe2 one (blobs) in the form Detectron2's checkpointer gives it."""
    if not isinstance(data, dict):
        return data
    if "model" in data and "__author__" in data:
        return data
    if "blobs" in data:
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not str(k).endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def _suggest_output(path: str) -> str:
    base = os.path.splitext(os.path.basename(path or "weights"))[0]
    return f"{base}-d2.pth"
