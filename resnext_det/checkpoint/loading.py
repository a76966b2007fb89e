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

What a checkpoint's tensors are and where they go in the model is decided in
:mod:`.matching`. Resuming from ``OUTPUT_DIR/last_checkpoint`` loads as Detectron2 does.
:func:`weights_file` gives the file ``MODEL.WEIGHTS`` loads (a name fetched into the
cache): an entry point calls it before a run starts, so that a missing file or a name
that cannot be downloaded ends the run before anything else is logged.
"""
import difflib
import logging
import os
import re
from typing import List

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..errors import ConfigError, MissingFileError
from ..utils.io import atomic_write, atomic_write_text
from .layout import detector_convention
from .matching import backbone_targets, check_required, classify_checkpoint, required_keys
from .metadata import (
    METADATA_KEY,
    WeightsConfigError,
    WeightsMetadata,
    check_weights_against_config,
    metadata_from_model,
)
from .names import is_source_name
from .readers import (
    READ_ERRORS,
    CheckpointReadError,
    describe_read_failure,
    safe_pickle_load,
    torch_load_weights,
)
from .sources import fetch_weights

__all__ = [
    "ResNeXtCheckpointer",
    "WeightsRecord",
    "attach_weights_record",
    "final_checkpoint",
    "weights_file",
    # what a checkpoint holds and where it goes (:mod:`.matching`), also importable from here
    "backbone_targets",
    "classify_checkpoint",
]

#: What a finished training run leaves in its folder (Detectron2's trainer saves "model_final").
FINAL_CHECKPOINT = "model_final"


def final_checkpoint(folder: str) -> str:
    """``folder/model_final.pth``: the checkpoint a finished training run (Detectron2's
    trainer, a training stage of the Appendix B schedule) leaves in its ``OUTPUT_DIR``."""
    return os.path.join(folder, FINAL_CHECKPOINT + ".pth")


logger = logging.getLogger(__name__)


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
        except READ_ERRORS as e:
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
            required = required_keys(model_sd, [mp for mp, _ in targets])
            check_required(model_sd, mapped, required, what, backbone=True)
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
            required = required_keys(model_sd, prefixes)
            check_required(model_sd, sd, required, what, backbone=self.require != "all")
            checkpoint["model"] = sd
        return super()._load_model(checkpoint)


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
