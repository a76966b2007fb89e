# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Where a process stands in a job, and how the job's processes start.

The same command runs in the three ways the field starts distributed training:

- **torchrun** (``torchrun --nproc-per-node N tools/train_net.py ...``, one or many
  nodes): torchrun started every process; each reads ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and joins the
  group in place (no second spawn);
- **SLURM** (``srun python tools/train_net.py ...`` in an sbatch script): one task per
  GPU (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``; the
  rendezvous on the step's first node, at a port derived from ``SLURM_JOB_ID``), or
  one task per node that starts ``--num-gpus`` processes with Detectron2's ``launch``;
- **Detectron2's flags** (``--num-gpus``, ``--num-machines``, ``--machine-rank``,
  ``--dist-url``): its ``launch``, as before.

:mod:`.placement` decides, in that order, where this process stands
(:func:`~.placement.resolve_placement`) and refuses a contradiction in one line;
:func:`launch_main` starts the processes, creates Detectron2's local process group
(``comm.get_local_rank()``, per-machine SyncBN and data loading), bounds every
collective by ``--dist-timeout`` (a dead process ends the others, :func:`_peer_failure`
says which rank is gone), and after a stop signal (:mod:`.preemption`) requeues a
SLURM job that hit its time limit. :func:`check_shared_output_dir` proves that all
processes see one ``OUTPUT_DIR``. The placement's public names are importable from here too.
"""
import argparse
import contextlib
import datetime
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

import detectron2.utils.comm as comm
from detectron2.engine import launch as d2_launch

from ..errors import ConfigError, UserError
from ..engine import preemption
from ..engine.setup import set_processes_on_host
from .placement import TORCHRUN_VARS, Placement, describe_placement, resolve_placement, slurm_port

__all__ = [
    "Placement",
    "TORCHRUN_VARS",
    "add_cluster_arguments",
    "check_shared_output_dir",
    "describe_placement",
    "launch_main",
    "log_placement",
    "resolve_placement",
    "slurm_port",
]

logger = logging.getLogger(__name__)

#: Minutes a collective may wait for a process before the others give up. Well below
#: Detectron2's 30, above the slowest legitimate wait: the main process gathering a
#: COCO-train proposal file (GBs) or running the COCO evaluation while the others wait.
DEFAULT_DIST_TIMEOUT_MIN = 10
#: The exit status of a tool that ended on a user error (one line naming the fix).
USER_ERROR_EXIT = 2
#: Time-limit requeues of one job before it is left to end (submitit's default too).
DEFAULT_MAX_REQUEUES = 3


def add_cluster_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--dist-timeout`` and ``--max-requeues``, beside Detectron2's launch flags."""
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_DIST_TIMEOUT_MIN,
        metavar="MINUTES",
        help="a collective waiting this long for a process ends the run: a dead process or node "
        f"does not hang the others (default {DEFAULT_DIST_TIMEOUT_MIN}; Detectron2's is 30)",
    )
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=DEFAULT_MAX_REQUEUES,
        metavar="N",
        help="under SLURM, a run stopped by its time-limit signal requeues its job (and resumes) "
        f"at most N times (default {DEFAULT_MAX_REQUEUES})",
    )
    return parser


_PLACEMENT: Optional[Placement] = None


def log_placement() -> None:
    """Log, once per run (on the main process), how :func:`launch_main` placed the processes."""
    if _PLACEMENT is not None:
        logging.getLogger("resnext_det").info(describe_placement(_PLACEMENT))


# ---------------------------------------------------------------------------------------------
# Checks every process makes together
# ---------------------------------------------------------------------------------------------
def _host_process_counts() -> int:
    """How many processes of the job run on this host, however they were started
    (two 'machines' of one host included): a collective."""
    hosts = comm.all_gather(socket.gethostname())
    return hosts.count(socket.gethostname())


def check_shared_output_dir(output_dir: str) -> None:
    """Every process must see one ``output_dir`` (checkpoints written by the main process
    are resumed by all; proposal shares are gathered from it). The main process writes a
    file with a random token there; a process that reads another token, or none, stops
    the run on every machine, before any training or resume. A collective: call it on
    every process (does nothing on one).

    Raises:
        ConfigError: naming the ranks and hosts that do not share the folder.
    """
    if comm.get_world_size() == 1:
        return
    token = comm.all_gather(secrets.token_hex(8) if comm.is_main_process() else None)[0]
    probe = os.path.join(output_dir, f".shared-check-{token}")
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write(token)
    comm.synchronize()
    try:
        with open(probe) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    views = comm.all_gather((seen, os.path.abspath(output_dir), socket.gethostname()))
    comm.synchronize()
    if comm.is_main_process():
        try:
            os.remove(probe)
        except OSError:
            pass
    blind = [(r, host, path) for r, (ok, path, host) in enumerate(views) if not ok]
    if blind:
        where = ", ".join(f"rank {r} on {host}" for r, host, _ in blind[:4]) + (" ..." if len(blind) > 4 else "")
        raise ConfigError(
            f"OUTPUT_DIR {views[0][1]} (rank 0 on {views[0][2]}) is not the folder {where} see(s) "
            f"({blind[0][2]}): OUTPUT_DIR and the datasets must be on a file system all nodes share "
            "(NFS, Lustre, ...), with the same path everywhere"
        )


# ---------------------------------------------------------------------------------------------
# Starting the processes
# ---------------------------------------------------------------------------------------------
def _peer_failure(error: BaseException, timeout_min: float) -> Optional[str]:
    """The line to print when a collective failed because a process is gone, or None
    when ``error`` is something else. Names the gone ranks where the rendezvous store
    (hosted by rank 0, or by torchrun's agent) can still tell."""
    text = f"{type(error).__name__}: {error}"
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out",
             "Timed out", "Timeout", "NCCL", "DistBackendError", "DistNetworkError", "Socket", "recvBytes",
             "ProcessGroup", "gloo", "Gloo")  # fmt: skip
    if not (dist.is_available() and dist.is_initialized()) or not any(s in text for s in signs):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    gone = None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=10))
        store.set(f"resnext_det/alive/{rank}", "1")
        time.sleep(3)  # the other survivors answer too
        gone = [r for r in range(world) if not store.check([f"resnext_det/alive/{r}"])]
    except Exception:  # the store is gone with the process that hosted it
        gone = None
    who = (
        f"rank(s) {', '.join(map(str, gone))} of {world}" if gone
        else "the process hosting the rendezvous (rank 0, or torchrun's agent), or its machine"
    )  # fmt: skip
    return (
        f"rank {rank}: a collective failed because {who} is gone (killed, out of memory, or its node "
        f"was lost; a silent node is given up after --dist-timeout {timeout_min:g} min). Rerun the same "
        f"command with --resume to continue from the last checkpoint. ({text.splitlines()[0][:200]})"
    )


def _worker(
    fn: Callable, args: argparse.Namespace, timeout_min: float, status, placement: Placement, spawned: bool = False
) -> None:
    """Runs in every process once its group exists: the host's process count for the CPU
    share, the stop-signal flag, then ``fn(args)``. A user error in a process that
    Detectron2's ``launch`` spawned is one line (from the first process of each machine)
    and exit status 2, which the launcher passes on."""
    global _PLACEMENT
    _PLACEMENT = placement  # a spawned process starts with the module anew
    preemption.install()
    if comm.get_world_size() > 1:
        set_processes_on_host(_host_process_counts())
    try:
        fn(args)
    except preemption.Preempted as e:
        logging.getLogger("resnext_det").warning("Stopped at a safe point: %s", e)
        status.value = e.signum
        _synchronize_quietly()
    except UserError as e:
        if not spawned:
            raise  # run_tool prints it
        if comm.get_local_rank() == 0:
            print(f"{os.path.basename(sys.argv[0]) or 'resnext_det'}: error: {e}", file=sys.stderr, flush=True)
        # Leave at once, as after a dead peer: the interpreter's exit could tear down gloo's
        # threads while the other processes leave too and abort ("terminate called without
        # an active exception"), which the launcher reports as a process killed by SIGABRT
        # instead of the user error's exit status. Nothing is left to save before a user error.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(USER_ERROR_EXIT)
    except Exception as e:
        line = _peer_failure(e, timeout_min)
        if line is None:
            raise
        logging.getLogger("resnext_det").error(line)
        print(line, file=sys.stderr, flush=True)
        # gloo's and NCCL's destructors can wait on the dead peer: leave at once.
        logging.shutdown()
        os._exit(1)


def _synchronize_quietly() -> None:
    """A barrier that a dead peer turns into nothing (the stop is already saved)."""
    try:
        comm.synchronize()
    except Exception:
        pass


def _in_place(fn: Callable, args: argparse.Namespace, p: Placement, timeout: datetime.timedelta, status) -> None:
    """torchrun's and SLURM's processes: join the group here (no spawn)."""
    if p.world_size == 1:
        _worker(fn, args, timeout.total_seconds() / 60, status, p)
        return
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(p.local_rank)
    dist.init_process_group(
        backend="nccl" if has_gpu else "gloo", init_method=p.dist_url, world_size=p.world_size,
        rank=p.rank, timeout=timeout,
    )  # fmt: skip
    comm.create_local_process_group(p.processes_per_machine)
    comm.synchronize()
    try:
        _worker(fn, args, timeout.total_seconds() / 60, status, p)
    finally:
        # Torn down here, not by the interpreter's exit: gloo's threads destroyed at exit
        # abort the process ("terminate called without an active exception"), which SLURM
        # counts as a failed task of a job that succeeded.
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _forward_to_children(signum, frame) -> None:
    """The launcher of ``--num-gpus`` processes: record the signal and pass it on (a
    ``kill`` of the launcher alone would otherwise reach no worker)."""
    preemption.request_stop(signum)  # the first signal counts
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signum)
        except OSError:
            pass


def _after_stop(p: Placement, signum: int, args: argparse.Namespace) -> int:
    """What the job does once every process stopped and the state is saved: requeue it
    after a time-limit signal (submitit's handler where submitit runs the job, else
    ``scontrol requeue``), on the job's first process only. Returns the exit status."""
    name = preemption.signal_name(signum)
    previous = preemption.previous_handler(signum)
    if not preemption.is_time_limit(signum):
        logger.warning(
            "%s: saved and stopped. A preempted SLURM job is requeued by SLURM (and resumes); "
            "otherwise rerun the same command with --resume.", name
        )
    elif previous is not None:
        logger.warning("%s: saved; handing over to the job's own handler (submitit: requeue)", name)
        previous(signum, None)  # submitit: checkpoint(), requeue, exit on rank 0; returns elsewhere
    elif p.job_id and p.leads_job:
        if p.restart >= args.max_requeues:
            logger.warning("%s: saved; not requeued: job %s was requeued %d time(s) (--max-requeues %d). "
                           "Resubmit with --resume to continue.", name, p.job_id, p.restart, args.max_requeues)
        else:
            subprocess.run(["scontrol", "requeue", str(p.job_id)], check=False)
            logger.warning("%s: saved; job %s requeued (%d of --max-requeues %d): it resumes where it stopped.",
                           name, p.job_id, p.restart + 1, args.max_requeues)
    elif not p.job_id:
        logger.warning("%s: saved and stopped. Rerun the same command with --resume to continue.", name)
    return preemption.exit_code(signum)


def launch_main(fn: Callable[[argparse.Namespace], object], args: argparse.Namespace):
    """Run ``fn(args)`` on every process of the job, however it was started (see the
    module's docstring). A job that SLURM or torchrun restarted resumes (``--resume``).

    Returns:
        None after a normal end; the exit status ``128 + signal`` when a stop signal
        ended the run at a safe point (everything up to there saved).
    """
    global _PLACEMENT
    p = resolve_placement(args)
    _PLACEMENT = p
    timeout_min = getattr(args, "dist_timeout", DEFAULT_DIST_TIMEOUT_MIN)
    if not timeout_min > 0:
        raise ConfigError(f"--dist-timeout {timeout_min} must be a positive number of minutes")
    timeout = datetime.timedelta(minutes=timeout_min)
    if p.restart and not getattr(args, "resume", False):
        args.resume = True  # a requeued or restarted job continues, it does not start over
    preemption.install()
    status = argparse.Namespace(value=0)  # the stop signal, set when a stop ended the run
    if not p.spawns:
        _in_place(fn, args, p, timeout, status)
    elif p.world_size <= 1:
        _worker(fn, args, timeout_min, status, p)
    else:
        status = multiprocessing.get_context("spawn").Value("i", 0)
        for s in preemption.TIME_LIMIT_SIGNALS + preemption.STOP_SIGNALS:
            signal.signal(s, _forward_to_children)
        try:
            d2_launch(
                _worker, p.processes_per_machine, num_machines=p.num_machines, machine_rank=p.machine_rank,
                dist_url=p.dist_url, args=(fn, args, timeout_min, status, p, True), timeout=timeout,
            )  # fmt: skip
        except torch.multiprocessing.ProcessExitedException as e:
            if e.exit_code == USER_ERROR_EXIT:
                return USER_ERROR_EXIT  # the process printed its one line
            rank = p.machine_rank * p.processes_per_machine + e.error_index
            how = f"killed by {e.signal_name}" if e.signal_name else f"exit status {e.exit_code}"
            print(
                f"rank {rank} (pid {e.error_pid}) is gone ({how}); the other processes of this machine "
                "were stopped. Rerun the same command with --resume to continue from the last checkpoint.",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            return 1
    if not status.value:
        return None
    return _after_stop(p, status.value, args)
