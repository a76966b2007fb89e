# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Stop and save at the next iteration when the cluster asks.

A cluster ends a job in two ways, and both send a signal first:

- **the time limit** (and submitit's ``USR2``, sent ``--signal-delay-s`` before the end,
  or the ``SIGUSR1`` of a common ``#SBATCH --signal=USR1@90``): the job should save
  and come back (requeue) to continue;
- **preemption, ``scancel``** (``SIGTERM``, then ``SIGKILL`` after SLURM's ``KillWait``):
  the job should save; SLURM requeues a preempted job itself, and a cancelled job
  stays cancelled.

Python's default for all three is to die on the spot, losing everything since the
last periodic checkpoint. :func:`install` replaces that with a flag: the signal is
recorded, and the work goes on until a safe point (the end of a training iteration,
of a chunk of proposals, of a stage) where every process agrees to stop
(:func:`agree`, one collective), the main process saves the state *of that point*,
and :class:`Preempted` ends each process's work. The launcher
(:mod:`resnext_det.cli.launch`) then requeues the job after a time-limit signal.

A handler that was installed before ours (submitit installs one for its ``USR2``
that checkpoints the submission, requeues the job and exits) is not lost: it is
called by :func:`finish` once the state is saved, instead of at the signal, when it
would cut the save short.
"""
import logging
import os
import signal
import threading
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

__all__ = [
    "Preempted",
    "STOP_SIGNALS",
    "TIME_LIMIT_SIGNALS",
    "agree",
    "exit_code",
    "install",
    "is_time_limit",
    "previous_handler",
    "request_stop",
    "reset",
    "signal_name",
    "stop_requested",
]

logger = logging.getLogger(__name__)

#: The time limit: submitit's signal (USR2) and the one of a common ``--signal=USR1@90``.
TIME_LIMIT_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1)
#: Preemption and ``scancel``: save, do not requeue (SLURM requeues a preempted job itself).
STOP_SIGNALS = (signal.SIGTERM,)

_received: Optional[int] = None  # the first signal received, or None
_previous: Dict[int, Callable] = {}  # handlers ours replaced (submitit's), by signal


class Preempted(BaseException):
    """The work stopped at a safe point after a signal, its state saved.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that Detectron2's training loop,
    which logs every ``Exception`` as a failure, lets it through unlogged; its hooks'
    ``after_train`` still run.

    Attributes:
        signum: the signal that asked for the stop.
        saved: what was saved, for the log (e.g. a checkpoint's path).
    """

    def __init__(self, signum: int, saved: str = ""):
        super().__init__(signum, saved)
        self.signum = signum
        self.saved = saved

    def __str__(self) -> str:
        what = f"; saved {self.saved}" if self.saved else ""
        return f"stopped by {signal_name(self.signum)}{what}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def is_time_limit(signum: Optional[int]) -> bool:
    """Whether ``signum`` announces the time limit (save and requeue) rather than a
    preemption or cancellation (save only)."""
    return signum in TIME_LIMIT_SIGNALS


def exit_code(signum: int) -> int:
    """The exit status of a process that stopped, saved, after ``signum``: 128 + the
    signal's number, the shell's convention for "ended by that signal"."""
    return 128 + int(signum)


def _handler(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum
        # Logged from the signal handler: the logging lock could be held by the interrupted
        # frame, so only a plain write to stderr here.
        os.write(2, f"[resnext_det] {signal_name(signum)} received: saving and stopping at the next "
                    f"iteration\n".encode())


def install() -> bool:
    """Replace the default action of :data:`TIME_LIMIT_SIGNALS` and :data:`STOP_SIGNALS`
    (die on the spot) with a flag, keeping handlers installed before (submitit's) for
    :func:`finish`. Idempotent. Returns False (and does nothing) outside the main thread,
    where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in TIME_LIMIT_SIGNALS + STOP_SIGNALS:
        old = signal.getsignal(s)
        if old is _handler:
            continue
        if callable(old):
            _previous[s] = old
        signal.signal(s, _handler)
    return True


def reset() -> None:
    """Forget a received signal (a new run in the same process, tests)."""
    global _received
    _received = None


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop as if ``signum`` had arrived (for tests and embedding code)."""
    _handler(signum, None)


def stop_requested() -> Optional[int]:
    """The signal this process received, or None. Local: no communication."""
    return _received


def previous_handler(signum: int) -> Optional[Callable]:
    """The Python handler ours replaced for ``signum`` (submitit's), or None."""
    return _previous.get(signum)


def agree() -> Optional[int]:
    """Whether any process of the job received a stop signal: the signal (the same
    on every process), or None. A collective: every process calls it at the same
    point. On one process, no communication."""
    mine = _received or 0
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _received
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    got = int(t.item())
    return got or None
