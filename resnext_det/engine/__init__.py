# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
from .setup import setup_cfg, setup_logging, share_cpu_cores
from .trainer import Trainer

__all__ = ["Trainer", "setup_cfg", "setup_logging", "share_cpu_cores"]
