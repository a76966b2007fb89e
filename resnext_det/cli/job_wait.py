# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Waiting on a submitted job (``tools/submit.py --wait``), and telling how it failed.

This module owns :func:`wait_for_job`: it polls the tasks' result files and the job's
state (:func:`slurm_state`: ``scontrol``/``squeue``, which work without SLURM accounting,
unlike the ``sacct`` that submitit's own watcher needs). A job that left the queue without
results failed, and the report names the failing tasks and prints the last lines of the
log to read first; a requeued job is still running. :func:`job_task` is how a submitit job
of one task or many gives its task ``k``. Submitting is :mod:`.submit`, which re-exports
:func:`wait_for_job`.
"""
import pickle
import re
import subprocess
import sys
import time
from typing import List, Optional, Tuple

__all__ = ["TAIL_LINES", "job_task", "slurm_state", "wait_for_job"]

#: Lines of a failed task's log printed by ``--wait``.
TAIL_LINES = 20
#: SLURM job states of a job that may still run (a requeued job comes back PENDING).
_ACTIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "COMPLETING",
    "CONFIGURING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
}  # fmt: skip


def job_task(job, k: int):
    """Task ``k`` of a submitit ``job`` (the job itself when it has one task): its
    ``paths`` name the task's log and result files."""
    return job.task(k) if job.num_tasks > 1 else job


def _read_result(path) -> Optional[Tuple[str, object]]:
    """A task's result file: ("success", value) or ("error", traceback); None if absent."""
    try:
        with open(path, "rb") as f:
            out = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as e:  # unreadable (written by another version?): a failure to report
        return ("error", f"cannot read {path}: {type(e).__name__}: {e}")
    return out if isinstance(out, tuple) and len(out) == 2 else ("error", f"unexpected result {out!r}")


def _run(cmd: List[str]) -> Tuple[Optional[int], str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    return r.returncode, r.stdout + r.stderr


def slurm_state(job_id: str) -> Tuple[Optional[str], str]:
    """(state, detail) of a SLURM job from ``scontrol show job`` (else ``squeue``): the
    state (RUNNING, PENDING, FAILED, ...), "" when SLURM no longer knows the job, None
    when SLURM could not be asked (detail: why)."""
    rc, out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if rc == 0 and "JobState=" in out:
        state = re.search(r"JobState=(\S+)", out).group(1)
        code = re.search(r"ExitCode=(\S+)", out)
        reason = re.search(r"Reason=(\S+)", out)
        detail = ", ".join(
            x for x in (code and f"exit code {code.group(1)}", reason and reason.group(1) != "None"
                        and f"reason {reason.group(1)}") if x
        )  # fmt: skip
        return state, detail
    if "Invalid job id" in out:
        return "", "no longer known to SLURM"
    rc2, out2 = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
    if rc2 == 0:
        return (out2.split()[0], "") if out2.split() else ("", "no longer in the queue")
    if "Invalid job id" in out2:
        return "", "no longer known to SLURM"
    said = {"scontrol": out, "squeue": out2}
    return None, "; ".join(f"{cmd}: {(text.strip().splitlines() or ['no answer'])[-1]}" for cmd, text in said.items())


def _tail(path, n: int = TAIL_LINES) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError as e:
        return [f"({e})"]


def _failure_report(job, results, state_line: str) -> str:
    """Which tasks failed and how; then the last lines of the log of the one to read first
    (a user error, else the first error, else the first task without a result)."""
    how = {}  # what happened -> the tasks it happened to
    for k, r in enumerate(results):
        if r is None:
            what = "no result (killed, cancelled, or its node was lost)"
        elif r[0] != "success":
            last = [x for x in str(r[1]).strip().splitlines() if x.strip()][-1:] or ["error"]
            what = last[0].strip()[:300]
        else:
            continue
        how.setdefault(what, []).append(str(k))
    errors = [k for k, r in enumerate(results) if r is not None and r[0] != "success"]
    user = [k for k in errors if "train_net.py: error:" in str(results[k][1])]
    missing = [k for k, r in enumerate(results) if r is None]
    first = (user or errors or missing or [0])[0]
    log = job_task(job, first).paths.stdout
    said = "; ".join(f"task{'s' if len(ks) > 1 else ''} {', '.join(ks)}: {what}" for what, ks in how.items())
    lines = [f"submit.py: job {job.job_id} failed ({state_line}): {said}"]
    lines.append(f"--- last lines of task {first}'s log {log} ---")
    lines += _tail(log)
    return "\n".join(lines)


def wait_for_job(job, cluster: str, poll_s: float = 1.0, max_poll_s: float = 10.0, unreachable_s: float = 600.0,
                 out=None, err=None) -> int:  # fmt: skip
    """Wait until ``job`` ends: 0 when every task returned, else 1 after printing (on
    ``err``) which task failed and the last lines of its log. Never waits on a job that
    is gone: a job that left the queue (SLURM) or whose controller ended (local) without
    every result failed. A requeued job (PENDING again) is still running."""
    out = out or sys.stdout
    err = err or sys.stderr
    n = job.num_tasks
    paths = [job_task(job, k).paths.result_pickle for k in range(n)]
    start = time.monotonic()
    unreachable_since = None
    ended_polls = 0
    while True:
        results = [_read_result(p) for p in paths]
        if all(r is not None and r[0] == "success" for r in results):
            print(f"Job {job.job_id} finished: {n} task(s) succeeded.", file=out, flush=True)
            return 0
        if cluster == "local":
            code = job._process.poll() if job._process is not None else -1
            state, detail = (None, "") if code is None else ("ended", f"local controller exit status {code}")
            ended = state is not None
        else:
            state, detail = slurm_state(job.job_id)
            if state is None:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > unreachable_s:
                    print(f"submit.py: cannot ask SLURM about job {job.job_id} for {unreachable_s:g} s "
                          f"({detail}): see squeue -j {job.job_id}", file=err, flush=True)  # fmt: skip
                    return 1
            else:
                unreachable_since = None
            ended = state is not None and state.split("+")[0] not in _ACTIVE_STATES
        # An ended job is judged on the next poll too: result files written at the end may
        # show late on a shared file system, and a preempted job may be requeued.
        ended_polls = ended_polls + 1 if ended else 0
        if ended_polls >= 3:
            results = [_read_result(p) for p in paths]
            if all(r is not None and r[0] == "success" for r in results):
                continue
            line = (state or "gone") + (f", {detail}" if detail else "")
            print(_failure_report(job, results, line), file=err, flush=True)
            return 1
        elapsed = time.monotonic() - start
        time.sleep(min(1.0, max_poll_s) if ended else min(max_poll_s, poll_s + elapsed / 60))
