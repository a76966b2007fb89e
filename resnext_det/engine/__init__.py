# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
from .trainer import Trainer, setup_cfg

__all__ = ["Trainer", "setup_cfg"]
