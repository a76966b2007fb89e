# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Where a process stands in a job: read from torchrun's variables, a SLURM step's, or
Detectron2's flags.

This module owns the placement (:class:`Placement`, :func:`resolve_placement`, its one-line
:func:`describe_placement`) and the SLURM details it needs (the step's tasks per node, its
first node's address, the rendezvous port :func:`slurm_port` derived from the job id).
Starting the processes is :mod:`.launch`, which re-exports these names.
"""
import argparse
import dataclasses
import os
import re
import socket
import subprocess
from typing import List, Mapping, Optional

from ..errors import ConfigError

__all__ = [
    "Placement",
    "TORCHRUN_VARS",
    "describe_placement",
    "resolve_placement",
    "slurm_port",
]

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
