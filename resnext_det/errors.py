# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The errors that mean "what you gave needs changing" (a config value, a file, a
command-line argument). Their messages name the key or file and the fix, and the
entry points (:func:`resnext_det.engine.cli.run_tool`) print them as one line and
exit with status 2. Every other exception is a bug or a failure of the machine
and keeps its traceback. This module imports nothing of resnext_det.
"""

__all__ = ["UserError", "ConfigError", "MissingFileError"]


class UserError(ValueError):
    """Base class: the user's input is wrong; the message says what to change."""


class ConfigError(UserError):
    """A config value (yaml, command line or LazyConfig) is not valid; the message
    names the key, e.g. ``MODEL.RESNEXT.CARDINALITY``."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (config, weights, dataset, image) does not exist."""
