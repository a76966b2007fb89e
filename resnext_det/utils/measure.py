# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Timing contenders side by side with ``torch.utils.benchmark``, and their peak memory.

Contenders run interleaved: round after round, each contender once (A B C A B C
...), so that load from other processes hits all of them alike. A timed run is
one :meth:`torch.utils.benchmark.Timer.blocked_autorange` with ``min_run_time=0``:
one untimed run (the Timer's warm-up, which also puts the contender's own state in
the caches and the allocator after the previous contender's), then one timed block
of one run. Medians come from the merged :class:`~torch.utils.benchmark.Measurement`.
Contenders of many seconds each (the ``eval`` section) can skip the untimed run
(``untimed_run=False``): each round is then one timed run, with Python's garbage collector
on, as in real use.
"""
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

# torch.utils.benchmark imports torch.utils.cpp_extension (for C++ timers, unused
# here), which warns "No CUDA runtime is found" at import on a machine with a CUDA
# toolkit and no GPU: quiet during this import only.
_cpp_ext_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_ext_log.level
_cpp_ext_log.setLevel(logging.ERROR)
try:
    from torch.utils.benchmark import Measurement, Timer  # noqa: E402
    from torch.utils.benchmark.utils.common import TaskSpec  # noqa: E402
finally:
    _cpp_ext_log.setLevel(_level)

__all__ = ["TIMING_METHOD", "measure_interleaved", "peak_memory_mb", "cpu_peak_tensor_mb", "memory_method"]

#: How :func:`measure_interleaved` times (for the results JSON).
TIMING_METHOD = (
    "torch.utils.benchmark.Timer.blocked_autorange(min_run_time=0) per contender and round "
    "(one untimed run, then one timed), contenders interleaved, warm-up rounds dropped, "
    "median (and min) over repeats"
)


class _Clock:
    """The Timers' clock: wall time (after a CUDA synchronize on CUDA), noting the
    process's CPU time (user + system, all threads) at every reading, so that the
    CPU time of a timed block is known as well."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.cpu_marks: List[float] = []

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        self.cpu_marks.append(time.process_time())
        return time.perf_counter()

    def measure(self, timer: Timer) -> Tuple[Measurement, float]:
        """One warm-up run and one timed block; returns the measurement and the CPU
        seconds per run of its timed blocks."""
        self.cpu_marks.clear()
        m = timer.blocked_autorange(min_run_time=0)
        # The clock is read twice around every block (start, end): the last
        # readings are the timed blocks'.
        marks = self.cpu_marks[-2 * len(m.raw_times) :]
        cpu = sum(marks[1::2]) - sum(marks[0::2])
        return m, cpu / (len(m.raw_times) * m.number_per_run)

    def measure_once(self, fn: Callable[[], object], task_spec: TaskSpec) -> Tuple[Measurement, float]:
        """One timed run of ``fn`` and nothing else (no warm-up run, the garbage collector
        left as it is); returns the measurement and its CPU seconds."""
        self.cpu_marks.clear()
        start = self()
        fn()
        wall = self() - start
        cpu = self.cpu_marks[1] - self.cpu_marks[0]
        return Measurement(number_per_run=1, raw_times=[wall], task_spec=task_spec), cpu


def measure_interleaved(
    contenders: Dict[str, Callable[[], object]],
    *,
    device: str,
    images: int,
    repeats: int,
    warmup: int,
    baseline: Optional[str],
    memory: bool,
    label: str,
    log: Callable[[str], None],
    untimed_run: bool = True,
) -> List[dict]:
    """Time every contender in ``repeats`` interleaved rounds after ``warmup`` untimed
    ones, then measure each one's peak memory in one more, untimed, run.

    Args:
        contenders: name -> a callable that runs one step.
        device: "cpu" or "cuda" (CUDA is synchronized around every timed block).
        images: images per step (for images/s).
        baseline: the contender the ratios divide (``speedup_vs_builtin*``), or None.
        memory: measure peak memory (else ``peak_mem_mb`` is None).
        label: the Timers' label (e.g. "backbone forward").
        log: progress messages.
        untimed_run: each timed run comes after an untimed one (the Timer's warm-up);
            False: one timed run per round and nothing else (contenders of many seconds).

    Returns:
        One row per contender, in the order given: median/min/all times, median CPU
        time, images/s, peak memory, and the ratios to the baseline.
    """
    clock = _Clock(cuda=device == "cuda")
    timers = {
        name: Timer(
            "fn()",
            globals={"fn": fn},
            timer=clock,
            label=label,
            description=name,
            num_threads=torch.get_num_threads(),  # the Timer's default would be 1
        )
        for name, fn in contenders.items()
    }
    for r in range(warmup):
        for fn in contenders.values():
            fn()
        log(f"  round {r + 1}/{warmup + repeats} (warm-up)")
    runs: Dict[str, List[Measurement]] = {k: [] for k in contenders}
    cpus: Dict[str, List[float]] = {k: [] for k in contenders}
    for r in range(warmup, warmup + repeats):
        for name, timer in timers.items():
            if untimed_run:
                m, cpu = clock.measure(timer)
            else:
                spec = TaskSpec("fn()", "pass", label=label, description=name, num_threads=torch.get_num_threads())
                m, cpu = clock.measure_once(contenders[name], spec)
            runs[name].append(m)
            cpus[name].append(cpu)
        log(f"  round {r + 1}/{warmup + repeats}")
    merged = {name: Measurement.merge(ms)[0] for name, ms in runs.items()}
    mems = {name: peak_memory_mb(fn, device) if memory else None for name, fn in contenders.items()}

    def stats(name):
        m = merged[name]
        return m.median, min(m.times), statistics.median(cpus[name])

    base = stats(baseline) if baseline in contenders else None
    rows = []
    for name in contenders:
        med, best, cpu = stats(name)
        rows.append(
            {
                "contender": name,
                "median_s": med,
                "min_s": best,
                "times_s": list(merged[name].times),
                # CPU time of the process (all threads): with --threads 1 it is the
                # work done, whatever the load of other processes.
                "cpu_s": cpu,
                "images_per_s": images / med,
                "peak_mem_mb": mems[name],
                "speedup_vs_builtin": base[0] / med if base else None,
                "speedup_vs_builtin_min": base[1] / best if base else None,
                "speedup_vs_builtin_cpu": base[2] / cpu if base else None,
            }
        )
    return rows


def memory_method(device: str) -> str:
    """How :func:`peak_memory_mb` measures on ``device`` (for the results JSON)."""
    if device == "cuda":
        return "torch.cuda.max_memory_allocated minus allocated before the run"
    return (
        "peak of PyTorch's CPU allocator (profiler memory events) minus what it held "
        "before the run, in one extra untimed run"
    )


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak MB that one ``fn()`` allocates above what was allocated before it."""
    if device != "cuda":
        return cpu_peak_tensor_mb(fn)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cpu_peak_tensor_mb(fn: Callable[[], object]) -> float:
    """Peak bytes held by PyTorch's CPU allocator during ``fn()`` above what it held
    before, from the profiler's memory events ("Total Allocated" after each
    allocation and free). ``tracemalloc`` does not see these allocations, and the
    process's resident set mostly measures glibc's caching."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's backend, logs "ERROR: ... gpuGetDeviceCount failed"
    # when it stops on a machine without a GPU, and a line per start and stop; none
    # concerns a CPU profile. Level 6 silences its logger; it is read when the
    # profiler first starts, and a value the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="resnext-det-bench-") as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    mem = [
        e["args"] for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]  # fmt: skip
    if not mem:
        return 0.0
    first = mem[0]
    before = first["Total Allocated"] - first["Bytes"]  # held when fn() started
    return max(0.0, (max(m["Total Allocated"] for m in mem) - before) / 2**20)
