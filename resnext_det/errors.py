# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The errors that mean "what you gave needs changing" (a config value, a file, a
command-line argument). Their messages name the key or file and the fix, and the
entry points (:func:`resnext_det.cli.tool.run_tool`) print them as one line and
exit with status 2. Every other exception is a bug or a failure of the machine
and keeps its traceback. Ctrl-C is the user's too: :class:`Interrupted` carries where
the work stopped and how to continue, and the entry points print it as one line and
exit with status 130. This module imports nothing of resnext_det.
"""

__all__ = ["UserError", "ConfigError", "MissingFileError", "Interrupted"]


class UserError(ValueError):
    """Base class: the user's input is wrong; the message says what to change."""


class ConfigError(UserError):
    """A config value (yaml, command line or LazyConfig) is not valid; the message
    names the key, e.g. ``MODEL.RESNEXT.CARDINALITY``."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (config, weights, dataset, image) does not exist."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (``SIGINT``) ended the work at a known point.

    A ``KeyboardInterrupt``, so that whatever lets Ctrl-C through lets it through too
    (Detectron2's training loop, torch's spawned workers).

    Attributes:
        where: where the work stopped, e.g. ``"at iteration 37 of 900 (stage 0:
            pretraining), saved"``; "" when unknown.
        how: how to continue, e.g. ``"rerun the same command to continue"``; "" leaves
            it to the entry point.
    """

    def __init__(self, where: str = "", how: str = ""):
        super().__init__(where, how)
        self.where = where
        self.how = how

    def __str__(self) -> str:
        return "; ".join(p for p in (self.where, self.how) if p)
