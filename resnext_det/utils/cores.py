# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The CPU cores this process may use: the one answer the whole package gives.

``os.cpu_count()`` counts the machine's cores; a container, ``taskset`` or a SLURM
allocation (``--cpus-per-task``) lets a process run on fewer. Everything that sizes
threads or workers, or reports the cores a measurement ran on, asks
:func:`available_cores`.
"""
import os

__all__ = ["available_cores"]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
