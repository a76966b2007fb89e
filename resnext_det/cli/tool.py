# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""How every tool ends on a user error or Ctrl-C.

:func:`run_tool` turns a :class:`~resnext_det.errors.UserError` (a config value,
a weights file, a path: the message names the fix) into one line on standard
error and exit status 2, and Ctrl-C (``KeyboardInterrupt``) into one line saying
where the work stopped and how to continue, and exit status 130; any other
exception is a bug or a machine failure and keeps its traceback.
``RESNEXT_DET_TRACEBACK=1`` shows the traceback of user errors and Ctrl-C too.
"""
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator, Optional, Tuple

import detectron2.utils.comm as comm
from detectron2.engine import TrainerBase

from ..errors import UserError

__all__ = [
    "INTERRUPTED_EXIT", "INTERRUPT_NOTE_ENV", "interrupted_trainer", "last_checkpoint", "run_tool",
    "traceback_frames",
]  # fmt: skip

#: The exit status of a tool stopped by Ctrl-C: 128 + SIGINT, the shell's convention.
INTERRUPTED_EXIT = 128 + int(signal.SIGINT)
#: Set by a tool that runs another one as a subprocess (``tools/run_demo.py``): on Ctrl-C
#: the inner tool writes where it stopped and how to continue into this file (JSON, keys
#: "where" and "how") instead of printing it, and the outer tool says it in its own line.
INTERRUPT_NOTE_ENV = "RESNEXT_DET_INTERRUPT_NOTE"


# ---------------------------------------------------------------------------------------------
# Ctrl-C: where the work stopped, and how to continue
# ---------------------------------------------------------------------------------------------
def traceback_frames(error: BaseException) -> Iterator:
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def interrupted_trainer(error: BaseException) -> Optional[TrainerBase]:
    """The Detectron2 trainer whose loop ``error`` (a Ctrl-C) went through, or None: the
    innermost one that has a config (``DefaultTrainer``, ours), else the innermost one."""
    found = [f.f_locals.get("self") for f in traceback_frames(error)]
    found = [t for t in found if isinstance(t, TrainerBase)]
    with_cfg = [t for t in found if hasattr(t, "cfg")]
    return (with_cfg or found or [None])[-1]


def last_checkpoint(folder: str) -> str:
    """The checkpoint ``folder/last_checkpoint`` names, when that file exists; else ""."""
    try:
        with open(os.path.join(folder, "last_checkpoint")) as f:
            name = f.read().strip()
    except OSError:
        return ""
    path = os.path.join(folder, name)
    return path if name and os.path.isfile(path) else ""


def _describe_interruption(error: KeyboardInterrupt) -> Tuple[str, str]:
    """(where, how) for a Ctrl-C that ended a tool: an :class:`Interrupted` says it; a
    Ctrl-C inside a Detectron2 training loop is "at iteration N of M", continued with
    ``--resume``; anything else is started again."""
    where = getattr(error, "where", "")
    how = getattr(error, "how", "")
    trainer = interrupted_trainer(error)
    if not where and trainer is not None:
        where = f"at iteration {trainer.iter} of {getattr(trainer, 'max_iter', '?')}"
    if not how and trainer is not None:
        ckpt = last_checkpoint(getattr(getattr(trainer, "checkpointer", None), "save_dir", "") or "")
        how = f"rerun the same command with --resume to continue from {ckpt or 'the last checkpoint'}"
    return where, how or "rerun the same command to start again"


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """A second Ctrl-C while the first one is reported must not turn the line into a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _report_interruption(error: KeyboardInterrupt, prog: str) -> int:
    """One line, ``"{prog}: interrupted {where}: {how}"``, from one process of a job (the
    others were stopped by the same Ctrl-C); into ``$RESNEXT_DET_INTERRUPT_NOTE`` instead
    when another tool runs this one. Returns :data:`INTERRUPTED_EXIT`."""
    with _sigint_ignored():
        if os.environ.get("RESNEXT_DET_TRACEBACK"):
            traceback.print_exception(error)
        if comm.get_rank() != 0:
            return INTERRUPTED_EXIT
        where, how = _describe_interruption(error)
        note = os.environ.get(INTERRUPT_NOTE_ENV)
        if note:
            try:
                with open(note, "w") as f:
                    json.dump({"where": where, "how": how}, f)
                return INTERRUPTED_EXIT
            except OSError:
                pass  # say it here then
        print(f"{prog}: interrupted{' ' + where if where else ''}: {how}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT


def run_tool(fn: Callable[[], object], prog: str) -> int:
    """Run ``fn``; a :class:`UserError` (or a full disk) ends it with
    ``"{prog}: error: {message}"`` on standard error and returns 2; Ctrl-C with
    ``"{prog}: interrupted {where}: {how to continue}"`` and returns 130; other
    exceptions propagate (with their traceback).
    Returns 0 on success (or ``fn``'s return value when it is an int)."""
    # A log handler that cannot write (full disk) must not print a page per record.
    logging.raiseExceptions = False
    try:
        out = fn()
    except KeyboardInterrupt as e:
        return _report_interruption(e, prog)
    except UserError as e:
        if os.environ.get("RESNEXT_DET_TRACEBACK"):
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        if os.environ.get("RESNEXT_DET_TRACEBACK"):
            traceback.print_exc()
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"{prog}: error: no space left on the device{where}: free space there or point "
            "OUTPUT_DIR at another disk, then rerun with --resume (checkpoints are written whole, "
            "so the last complete one is intact)",
            file=sys.stderr,
        )
        return 2
    return out if isinstance(out, int) and not isinstance(out, bool) else 0
