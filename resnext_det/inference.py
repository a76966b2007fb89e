# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""A model ready for inference, assembled in one place.

:func:`build_inference_model` builds the config's model with the fast-path
switches (:meth:`Trainer.build_model`), loads its weights strictly
(:class:`~resnext_det.checkpoint.ResNeXtCheckpointer`: every tensor must come from
the file, and its recorded convention must match the config) and prepares it for
evaluation (FrozenBN folded, autocast, as configured). ``tools/train_net.py
--eval-only``, the Appendix B evaluation (stage 4), :class:`Predictor`
(``tools/demo.py``) and the exporter all use it, so they compute the same detections.
"""
import logging
import os
from typing import Dict, NamedTuple, Optional, Sequence

import numpy as np
import torch
import yaml
from torch import nn

import detectron2.data.transforms as T
from detectron2.data import MetadataCatalog
from detectron2.structures import Instances

from .checkpoint import ResNeXtCheckpointer, final_checkpoint
from .engine.setup import override_keys
from .engine.trainer import Trainer
from .errors import ConfigError, MissingFileError
from .fast import prepare_for_inference

__all__ = [
    "build_inference_model", "load_model", "Predictor", "resolve_weights", "run_config_of",
    "SizeMismatch", "trained_size_mismatch",
]

logger = logging.getLogger(__name__)


def load_model(
    cfg, weights: Optional[str] = None, *, require: str = "all", resume: bool = False, save_dir: str = ""
) -> nn.Module:
    """The config's model (fast-path switches applied, eval mode) with ``weights``
    (default ``MODEL.WEIGHTS``) loaded strictly; not yet prepared for inference.

    Args:
        cfg: the model's config.
        weights: checkpoint file; ``None`` means ``cfg.MODEL.WEIGHTS``.
        require: "all" (every tensor from the file, for evaluation) or "backbone".
        resume: load ``save_dir``'s last checkpoint instead, when there is one.
        save_dir: the folder of ``last_checkpoint`` (``OUTPUT_DIR``) for ``resume``.
    """
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    model = Trainer.build_model(cfg)
    model.eval()
    ResNeXtCheckpointer(model, save_dir, cfg=cfg, require=require).resume_or_load(weights, resume=resume)
    return model


def build_inference_model(
    cfg, weights: Optional[str] = None, *, require: str = "all", resume: bool = False, save_dir: str = ""
) -> nn.Module:
    """:func:`load_model`, then :func:`~resnext_det.fast.prepare_for_inference`
    (``MODEL.RESNEXT.FOLD_FROZEN_BN`` folds on a copy, ``SOLVER.AMP.ENABLED`` runs
    under autocast). Evaluate it with :func:`detectron2.evaluation.inference_on_dataset`
    or ``Trainer.test``; preparing it again is a no-op."""
    model = load_model(cfg, weights, require=require, resume=resume, save_dir=save_dir)
    return prepare_for_inference(model, cfg).eval()


def resolve_weights(cfg, opts: Sequence[str] = (), *, config_file: Optional[str] = None) -> str:
    """The checkpoint to run: ``MODEL.WEIGHTS`` if set on the command line, else
    ``OUTPUT_DIR/model_final.pth`` if it exists, else the ``model_final.pth`` beside
    ``config_file`` (a run's own ``OUTPUT_DIR/config.yaml`` read from another folder than
    the run's: its relative ``OUTPUT_DIR`` points elsewhere there), else the config's
    ``MODEL.WEIGHTS`` (for a run's config.yaml, the weights training *started* from).

    Raises:
        MissingFileError: nothing to load, with what to do about it.
    """
    final = final_checkpoint(cfg.OUTPUT_DIR)
    if "MODEL.WEIGHTS" in override_keys(opts) and cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    if os.path.isfile(final):
        return final
    beside = final_checkpoint(os.path.dirname(config_file)) if config_file else ""
    if beside and os.path.isfile(beside):
        return beside
    if cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    raise MissingFileError(
        f"No trained weights: {final} does not exist and MODEL.WEIGHTS is empty. Train the "
        "config first (.venv/bin/python tools/train_net.py --config-file ..., or `make demo` for the "
        "quickstart config), or pass MODEL.WEIGHTS path/to/model_final.pth."
    )


#: The test-time sizes a model is run at, which a run's config.yaml records.
_TEST_SIZE_KEYS = ("MIN_SIZE_TEST", "MAX_SIZE_TEST")


def run_config_of(weights: str) -> Optional[str]:
    """The ``config.yaml`` that ``tools/train_net.py`` (Detectron2's ``default_setup``) and
    the Appendix B schedule write into the ``OUTPUT_DIR`` that also holds ``weights``: the
    settings the model was trained with, or None when there is none."""
    if not weights or "://" in weights:
        return None
    path = os.path.join(os.path.dirname(weights), "config.yaml")
    return path if os.path.isfile(path) else None


def _test_sizes(d) -> str:
    return " / ".join(f"INPUT.{k} {d[k]}" for k in _TEST_SIZE_KEYS)


class SizeMismatch(NamedTuple):
    """A model run at other test sizes than its training run evaluated at."""

    config_file: str  #: the training run's config.yaml
    trained: str  #: "INPUT.MIN_SIZE_TEST 384 / INPUT.MAX_SIZE_TEST 667", from it
    here: str  #: the same keys of the config in use

    def __str__(self) -> str:
        return (
            f"The model was trained at {self.trained} ({self.config_file}) but runs here at "
            f"{self.here}: not the detections of the trained size (and larger sizes are slower); use "
            f"--config-file {self.config_file} (that run's settings: classes, sizes, thresholds)"
        )


def trained_size_mismatch(cfg, weights: str) -> Optional[SizeMismatch]:
    """The sizes when ``cfg`` runs ``weights`` at other ``INPUT.*_SIZE_TEST`` than the run
    that trained them (its :func:`run_config_of`) evaluated at; None when they agree or
    are unknown."""
    path = run_config_of(weights)
    if path is None:
        return None
    try:
        with open(path) as f:
            trained = (yaml.safe_load(f) or {}).get("INPUT", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(trained, dict) or not all(k in trained for k in _TEST_SIZE_KEYS):
        return None
    here = {k: cfg.INPUT[k] for k in _TEST_SIZE_KEYS}
    if all(trained[k] == here[k] for k in _TEST_SIZE_KEYS):
        return None
    return SizeMismatch(path, _test_sizes(trained), _test_sizes(here))


class Predictor:
    """Detectron2's ``DefaultPredictor`` for this project's models: one image (BGR,
    as OpenCV reads it) in, Detectron2's output dict out, from the model of
    :func:`build_inference_model` (strict loading, fast path as configured). Works
    for every meta-architecture of the project, the Appendix B ``UnsharedRCNN``
    (both networks in one checkpoint) included.
    """

    def __init__(self, cfg, *, weights: Optional[str] = None):
        """
        Args:
            cfg: the model's config.
            weights: the checkpoint file (default ``MODEL.WEIGHTS``; see
                :func:`resolve_weights`).
        """
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for a predictor, got {cfg.INPUT.FORMAT!r}.")
        self.cfg = cfg.clone()
        self.model = build_inference_model(self.cfg, weights)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.metadata = MetadataCatalog.get(names[0]) if names else MetadataCatalog.get("__unused")

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray) -> Dict[str, Instances]:
        """Predictions for one image (H, W, 3 uint8, BGR as OpenCV reads it), in
        its own pixel coordinates: Detectron2's output dict (``instances``, or
        ``proposals`` for an RPN-only model)."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
        return self.model([{"image": tensor, "height": height, "width": width}])[0]
