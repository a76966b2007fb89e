# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""ImageNet backbone weights: convert every public format, record their input
convention and architecture, load them strictly, prove them equal.

* :func:`convert_weights` / :func:`save_converted` (``tools/convert_pretrained.py``)
* :func:`verify_conversion`: source model vs our backbone on the same images
  (:func:`torchvision_resnext`: torchvision's ResNeXt of an architecture)
* :class:`ResNeXtCheckpointer`: refuses weights that disagree with the config
* :func:`fetch_weights`: ``MODEL.WEIGHTS`` names (``torchvision://...``, ``timm://...``,
  ``detectron2://...``, URLs; :func:`resolve_source`) downloaded once, checked, converted
  and cached
"""
from .convert import (
    FORMATS,
    ConversionError,
    ConversionResult,
    DetectorConvention,
    convert_weights,
    detector_convention,
    infer_arch,
    save_converted,
)
from .loading import ResNeXtCheckpointer, WeightsRecord, attach_weights_record, final_checkpoint
from .metadata import (
    CONVENTIONS,
    METADATA_KEY,
    InputConvention,
    WeightsConfigError,
    WeightsMetadata,
    check_weights_against_config,
    config_pairs,
    config_yaml,
    format_opts,
)
from .readers import CheckpointReadError, read_weights_file
from .names import WeightsSource, WeightsSourceError, is_source_name, resolve_source
from .sources import fetch_weights
from .verify import max_relative_error, torchvision_resnext, verify_conversion

__all__ = [
    "FORMATS",
    "CONVENTIONS",
    "METADATA_KEY",
    "InputConvention",
    "WeightsMetadata",
    "ConversionError",
    "ConversionResult",
    "CheckpointReadError",
    "WeightsConfigError",
    "convert_weights",
    "save_converted",
    "infer_arch",
    "read_weights_file",
    "verify_conversion",
    "max_relative_error",
    "torchvision_resnext",
    "check_weights_against_config",
    "config_pairs",
    "config_yaml",
    "format_opts",
    "ResNeXtCheckpointer",
    "WeightsRecord",
    "attach_weights_record",
    "final_checkpoint",
    "DetectorConvention",
    "detector_convention",
    "WeightsSource",
    "WeightsSourceError",
    "fetch_weights",
    "is_source_name",
    "resolve_source",
]
