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

:func:`resolve_placement` decides, in that order, and refuses a contradiction in one
line; :func:`launch_main` starts the processes, creates Detectron2's local process
group (``comm.get_local_rank()``, per-machine SyncBN and data loading), bounds every
collective by ``--dist-timeout`` (a dead process ends the others, :func:`_peer_failure`
says which rank is gone), and after a stop signal (:mod:`.preemption`) requeues a
SLURM job that hit its time limit. :func:`check_shared_output_dir` proves that all
processes see one ``OUTPUT_DIR``.
"""
import argparse
import contextlib
import dataclasses
import datetime
import logging
import multiprocessing
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, List, Mapping, Optional

import torch
import torch.distributed as dist

import detectron2.utils.comm as comm
from detectron2.engine import launch as d2_launch

from ..errors import ConfigError, UserError
from ..engine import preemption
from ..engine.setup import set_processes_on_host

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

#: The variables torchrun gives each process it starts (where it stands, and the rendezvous).
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process stands, and what it must start.

    Attributes:
        how: ``"torchrun"``, ``"slurm"`` (one task per process), ``"slurm+launch"`` (one
            task per node, each starting ``processes_per_machine`` with Detectron2's
            ``launch``) or ``"launch"`` (Detectron2's flags).
        world_size: processes in the job.
        num_machines: nodes.
        machine_rank: this node's index.
        processes_per_machine: processes on each node.
        rank: this process's global rank; None when this process starts the node's
            processes itself (``launch``).
        local_rank: its rank on the node (None as ``rank``).
        dist_url: the rendezvous (``env://`` under torchrun, ``tcp://host:port``).
        restart: how many times the job was restarted (SLURM requeues, torchrun restarts).
        job_id: the SLURM job id, or None.
    """

    how: str
    world_size: int
    num_machines: int
    machine_rank: int
    processes_per_machine: int
    rank: Optional[int]
    local_rank: Optional[int]
    dist_url: str
    restart: int = 0
    job_id: Optional[str] = None

    @property
    def spawns(self) -> bool:
        """Whether this process starts the node's processes (Detectron2's ``launch``)."""
        return self.rank is None

    @property
    def leads_job(self) -> bool:
        """Whether this process is the job's first (global rank 0, or the launcher of node 0)."""
        return (self.rank == 0) if self.rank is not None else self.machine_rank == 0


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


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None


def _torchrun(args, env: Mapping[str, str]) -> Placement:
    world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
    local, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
    if world % local_world:
        raise ConfigError(
            f"torchrun started {local_world} processes on this node but {world} in all: every node "
            "must run the same --nproc-per-node"
        )
    nodes = world // local_world
    if args.num_gpus not in (1, local_world):
        raise ConfigError(
            f"--num-gpus {args.num_gpus} under torchrun, which started {local_world} process(es) on "
            f"this node: torchrun starts the processes itself. Drop --num-gpus, or give torchrun "
            f"--nproc-per-node {args.num_gpus}"
        )
    if args.num_machines not in (1, nodes) or args.machine_rank not in (0, rank // local_world):
        raise ConfigError(
            f"--num-machines {args.num_machines} --machine-rank {args.machine_rank} under torchrun, "
            f"which runs {nodes} node(s): drop them (torchrun's --nnodes and --node-rank decide)"
        )
    if "GROUP_RANK" in env and rank != _int(env, "GROUP_RANK") * local_world + local:
        raise ConfigError(
            f"torchrun gave RANK {rank} to LOCAL_RANK {local} of node {env['GROUP_RANK']}: the "
            "processes of a node must hold consecutive ranks (Detectron2's local process group)"
        )
    return Placement(
        how="torchrun", world_size=world, num_machines=nodes, machine_rank=rank // local_world,
        processes_per_machine=local_world, rank=rank, local_rank=local, dist_url="env://",
        restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    )  # fmt: skip


def _tasks_per_node(spec: str) -> List[int]:
    """SLURM's ``2(x3),1`` as ``[2, 2, 2, 1]``."""
    out: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ConfigError(f"cannot read SLURM_STEP_TASKS_PER_NODE={spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _hostnames(nodelist: str) -> List[str]:
    """The node names of a SLURM node list (``n[1-2]``), as ``scontrol show hostnames`` gives them."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)  # without scontrol: the first node only
    if not m:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}: set MASTER_ADDR")
    return [m.group(1) + (m.group(2) or "")]


def _node_address(name: str) -> str:
    """An address of node ``name`` that the other nodes reach: its DNS name where it
    resolves, else the ``NodeAddr`` SLURM knows it by (node names need not resolve)."""
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        m = re.search(r"NodeAddr=(\S+)", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    raise ConfigError(f"SLURM node {name!r} does not resolve and scontrol does not know its address: set MASTER_ADDR")


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: derived from its id (every task computes the
    same one, and two jobs sharing a node rarely collide), in 20000-39999."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 20000 + int(digits) % 20000


def _slurm(args, env: Mapping[str, str]) -> Optional[Placement]:
    """The placement of a task of a SLURM job step; None in the batch script itself (no step
    with several tasks), where Detectron2's flags decide."""
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None  # the batch script: not a task of an srun step
    if ntasks <= 1:
        return None
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    per_node = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(ntasks))
    if len(set(per_node)) != 1:
        raise ConfigError(
            f"this SLURM step runs {'/'.join(map(str, per_node))} tasks on its nodes: give every node the "
            "same number (sbatch/srun --ntasks-per-node)"
        )
    tasks_per_node = per_node[0]
    rank, local, node = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), _int(env, "SLURM_NODEID")
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    addr = env.get("MASTER_ADDR") or _node_address(
        _hostnames(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or socket.gethostname())[0]
    )
    port = int(env.get("MASTER_PORT") or slurm_port(job))
    url = f"tcp://{addr}:{port}"
    restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if tasks_per_node == 1:  # one task per node, which starts --num-gpus processes
        if args.num_machines not in (1, nodes) or args.machine_rank not in (0, node):
            raise ConfigError(
                f"--num-machines {args.num_machines} --machine-rank {args.machine_rank} in a SLURM step of "
                f"{nodes} node(s): drop them (SLURM_NNODES and SLURM_NODEID decide)"
            )
        return Placement(
            how="slurm+launch", world_size=nodes * args.num_gpus, num_machines=nodes, machine_rank=node,
            processes_per_machine=args.num_gpus, rank=None, local_rank=None, dist_url=url,
            restart=restart, job_id=job,
        )  # fmt: skip
    if args.num_gpus not in (1, tasks_per_node):
        raise ConfigError(
            f"--num-gpus {args.num_gpus} in a SLURM step of {tasks_per_node} tasks per node: each task is one "
            f"process. Drop --num-gpus, or run one task per node (srun --ntasks-per-node 1) with --num-gpus "
            f"{args.num_gpus}"
        )
    if args.num_machines not in (1, nodes):
        raise ConfigError(
            f"--num-machines {args.num_machines} in a SLURM step of {nodes} node(s): drop it (SLURM decides)"
        )
    if rank != node * tasks_per_node + local:
        raise ConfigError(
            f"SLURM gave rank {rank} to task {local} of node {node}: the tasks of a node must hold "
            "consecutive ranks (Detectron2's local process group); use srun --distribution=block"
        )
    return Placement(
        how="slurm", world_size=ntasks, num_machines=nodes, machine_rank=node,
        processes_per_machine=tasks_per_node, rank=rank, local_rank=local, dist_url=url,
        restart=restart, job_id=job,
    )  # fmt: skip


def resolve_placement(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> Placement:
    """Where this process stands: from torchrun's variables, else a SLURM step's, else
    Detectron2's flags (``args`` of ``default_argument_parser``).

    Raises:
        ConfigError: the flags contradict what started the process (one line, naming the flag).
    """
    env = os.environ if environ is None else environ
    if all(v in env for v in TORCHRUN_VARS):
        return _torchrun(args, env)
    placed = _slurm(args, env)
    if placed is not None:
        return placed
    n = args.num_gpus * args.num_machines
    return Placement(
        how="launch", world_size=n, num_machines=args.num_machines, machine_rank=args.machine_rank,
        processes_per_machine=args.num_gpus, rank=None, local_rank=None, dist_url=args.dist_url,
        restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0), job_id=env.get("SLURM_JOB_ID"),
    )  # fmt: skip


def describe_placement(p: Placement) -> str:
    """One line: how the processes were started, the world size, the local layout."""
    how = {
        "torchrun": "torchrun",
        "slurm": "SLURM (one task per process)",
        "slurm+launch": "SLURM (one task per node) + Detectron2's launch",
        "launch": "Detectron2's launch",
    }[p.how]
    where = f"job {p.job_id}, " if p.job_id else ""
    restart = f", restart {p.restart}" if p.restart else ""
    return (
        f"Processes started by {how}: world size {p.world_size} = {p.num_machines} machine(s) x "
        f"{p.processes_per_machine} process(es), this machine {p.machine_rank}, ranks "
        f"{p.machine_rank * p.processes_per_machine}-{(p.machine_rank + 1) * p.processes_per_machine - 1} here "
        f"({where}rendezvous {p.dist_url}{restart})"
    )


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
        sys.exit(USER_ERROR_EXIT)
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
