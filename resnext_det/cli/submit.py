# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Submit ``tools/train_net.py`` as a cluster job, through submitit.

``tools/submit.py`` parses the flags (``tools/train_net.py``'s and the cluster's);
this module does the rest:

- :func:`complete_args` checks the flags and the config *before* anything is
  submitted (a bad key is one line and exit status 2, as with ``train_net.py``) and
  fills the defaults that depend on the config (GPUs, tasks, ``--job-dir`` =
  ``OUTPUT_DIR/submitit``);
- :func:`build_executor` maps every flag to submitit's parameters: its SLURM
  executor (sbatch script, one ``srun`` task per GPU or CPU process, the time-limit
  signal ``USR2`` ``--signal-delay-s`` before the end, ``srun --kill-on-bad-exit=1``
  so that a failing task ends the job) or its ``LocalExecutor`` (tasks on this
  machine, for a workstation and for tests);
- :class:`TrainJob` runs in every task: ``train_net.py``'s :func:`~.cli.cli` with the
  job's argv. Under SLURM, :mod:`.launch` reads the step's variables; under the
  LocalExecutor the task exports torchrun's. A stop for the time limit saves the
  state, then submitit's handler (kept by :mod:`.preemption`) calls
  :meth:`TrainJob.checkpoint` (the same argv plus ``--resume``) and requeues the job;
  a requeued Appendix B job (``UNSHARED.ENABLED``) skips its finished stages and
  resumes the first unfinished one;
- :func:`~.job_wait.wait_for_job` (``--wait``, :mod:`.job_wait`, re-exported here) polls
  the tasks' result files and the job's state (``scontrol``/``squeue``, which work without
  SLURM accounting, unlike the ``sacct`` that submitit's own watcher needs): a job that left
  the queue without results failed, a requeued one is still running.
"""
import argparse
import contextlib
import io
import os
import sys
import time
from typing import Iterator, List, Sequence

import torch

from detectron2.engine import DefaultTrainer

from ..data.custom import register_coco_datasets
from ..errors import ConfigError, UserError
from ..engine import preemption
from ..engine.setup import override_keys, setup_cfg
from .job_wait import job_task, wait_for_job
from .placement import TORCHRUN_VARS, slurm_port
from .tool import run_tool
from .train_net import argument_parser as train_parser
from .train_net import cli

__all__ = [
    "TaskFailed",
    "TrainJob",
    "build_executor",
    "complete_args",
    "describe_submission",
    "submit",
    "train_argv",
    "wait_for_job",
]

#: ``--gpus-per-node`` under SLURM for a CUDA config when not given (the paper's 8 GPUs).
DEFAULT_SLURM_GPUS = 8
#: ``--time`` (minutes) when not given.
DEFAULT_TIME_MIN = 24 * 60
#: ``--signal-delay-s``: the time-limit signal comes this long before the end, for the
#: running iteration to finish and the checkpoint to be written.
DEFAULT_SIGNAL_DELAY_S = 120
#: The argv ``--resume`` flag (``checkpoint()`` adds it once).
RESUME = "--resume"
#: train_net.py's flags that a job does not take: a task is one process, SLURM or the
#: LocalExecutor place it (the flag to use instead).
_PLACEMENT_FLAGS = {
    "num_gpus": ("--num-gpus", "--gpus-per-node (one task per GPU)"),
    "num_machines": ("--num-machines", "--nodes"),
    "machine_rank": ("--machine-rank", "nothing (each node's rank comes from SLURM)"),
    "dist_url": ("--dist-url", "nothing (the rendezvous is derived from the job id)"),
}
#: Flags the LocalExecutor cannot honour (one machine, no scheduler).
_SLURM_ONLY = {
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "mem_gb": "--mem-gb",
    "cpus_per_task": "--cpus-per-task",
}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("submitting a job needs submitit: pip install submitit==1.5.4") from None
    return submitit


# ---------------------------------------------------------------------------------------------
# The flags
# ---------------------------------------------------------------------------------------------
def complete_args(args: argparse.Namespace):
    """Check ``args`` (``tools/submit.py``'s) and the config they name, before any job
    exists, and fill the defaults that depend on the config: ``gpus_per_node``,
    ``tasks_per_node``, ``job_dir`` (absolute). Returns the config (not frozen).

    Raises:
        ConfigError: one line naming the flag or key.
    """
    defaults = train_parser()
    for dest, (flag, instead) in _PLACEMENT_FLAGS.items():
        if getattr(args, dest) != defaults.get_default(dest):
            raise ConfigError(f"{flag} is not for a submitted job (each task is one process): use {instead}")
    if not args.config_file:
        raise ConfigError("--config-file is required: the config of the run to submit")
    slurm = args.cluster == "slurm"
    if not slurm:
        for dest, flag in _SLURM_ONLY.items():
            if getattr(args, dest) is not None:
                raise ConfigError(f"{flag} is for --cluster slurm: the local executor cannot honour it")
        if args.nodes != 1:
            raise ConfigError(f"--nodes {args.nodes} with --cluster local: the local executor runs one node")
    if args.signal_delay_s >= args.time * 60:
        raise ConfigError(
            f"--signal-delay-s {args.signal_delay_s} is not shorter than --time {args.time} min: the "
            "time-limit signal must come before the end"
        )
    if args.max_requeues < 0:
        raise ConfigError(f"--max-requeues {args.max_requeues} must be 0 or more")
    flags = [k for k in override_keys(args.opts) if k.startswith("--")]
    if flags:
        raise ConfigError(f"{flags[0]} comes after the KEY VALUE overrides: put the flags first")
    register_coco_datasets(args.register_coco)  # missing files: one line
    cfg = setup_cfg(args.config_file, args.opts, freeze=False, device_fallback=False)
    if args.stage and not cfg.UNSHARED.ENABLED:
        raise ConfigError("--stage is for the Appendix B schedule: set UNSHARED.ENABLED True")

    cuda = torch.device(cfg.MODEL.DEVICE).type == "cuda"
    have = torch.cuda.device_count()
    given = args.gpus_per_node is not None
    if not given:
        args.gpus_per_node = (DEFAULT_SLURM_GPUS if slurm else have) if cuda else 0
    if cuda and args.gpus_per_node == 0:
        why = "" if given else " (this machine has no CUDA device)"
        raise ConfigError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but --gpus-per-node is 0{why}: append MODEL.DEVICE cpu "
            "to train with CPU tasks, or give --gpus-per-node N"
        )
    if args.tasks_per_node is None:
        args.tasks_per_node = max(1, args.gpus_per_node)
    if cuda and args.tasks_per_node != args.gpus_per_node:
        raise ConfigError(
            f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: with "
            f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} each task is one process on one GPU; give --tasks-per-node "
            f"{args.gpus_per_node} or leave it out"
        )
    if not slurm and args.gpus_per_node > have:
        raise ConfigError(
            f"--gpus-per-node {args.gpus_per_node} but this machine has {have} CUDA device(s): "
            f"give --gpus-per-node {have}" + ("" if have else " and append MODEL.DEVICE cpu")
        )
    _check_batch(cfg, args)
    args.config_file = os.path.abspath(args.config_file)
    args.job_dir = os.path.abspath(args.job_dir or os.path.join(cfg.OUTPUT_DIR, "submitit"))
    return cfg


def _check_batch(cfg, args: argparse.Namespace) -> None:
    """Detectron2 asserts, in every task once the job runs, that the batch splits evenly
    over the processes: say it now, in one line (the Appendix B stages have their own)."""
    world = args.nodes * args.tasks_per_node
    if args.eval_only or cfg.UNSHARED.ENABLED:
        return
    try:
        batch = DefaultTrainer.auto_scale_workers(cfg, world).SOLVER.IMS_PER_BATCH
    except AssertionError as e:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH / SOLVER.REFERENCE_WORLD_SIZE: {e}") from None
    if batch % world:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {batch} does not split over the job's {world} processes (--nodes "
            f"{args.nodes} x --tasks-per-node {args.tasks_per_node}): make it a multiple of {world}"
        )


def train_argv(args: argparse.Namespace) -> List[str]:
    """The ``tools/train_net.py`` argv of the job: every train_net flag given (their
    defaults left out), then the ``KEY VALUE`` overrides; never the placement flags
    (``--num-gpus`` ...) nor the cluster's."""
    argv: List[str] = []
    for action in train_parser()._actions:
        if not action.option_strings or action.dest == "help" or action.dest in _PLACEMENT_FLAGS:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, *map(str, item if isinstance(item, (list, tuple)) else [item])]
        elif isinstance(action, argparse._StoreAction):
            argv += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
        else:  # a kind of flag this function does not know: better refuse than drop it
            raise ConfigError(f"{flag}: submit.py cannot pass this flag to the job")
    return argv + [str(o) for o in args.opts]


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
class TaskFailed(RuntimeError):
    """A task of a submitted job ended without success; the message says how (for a
    user error, ``train_net.py``'s one line)."""


def _handed_over() -> bool:
    """Whether a time-limit signal ended the run and submitit's handler took over (it
    checkpoints and requeues the job on rank 0)."""
    signum = preemption.stop_requested()
    return preemption.is_time_limit(signum) and preemption.previous_handler(signum) is not None


def _export_torchrun_variables(env) -> None:
    """A LocalExecutor task: where it stands, as torchrun would say it (the rendezvous on
    this machine, at a port derived from the job id, as under SLURM)."""
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(1, env.num_nodes)), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(slurm_port(env.job_id)),
    )  # fmt: skip


class TrainJob:
    """``tools/train_net.py ARGV`` as a submitit job function (picklable: the argv
    only). Runs in each task; a task is one process of the training."""

    def __init__(self, argv: Sequence[str]):
        self.argv = [str(a) for a in argv]

    def __repr__(self) -> str:
        return f"TrainJob({self.argv!r})"

    def __call__(self) -> int:
        env = _submitit().JobEnvironment()
        if env.cluster == "local":
            _export_torchrun_variables(env)
        else:  # SLURM's variables place the task; torchrun's from the submitting shell must not
            for name in TORCHRUN_VARS:
                os.environ.pop(name, None)
        errors: List[str] = []

        def run():
            try:
                return cli(self.argv)
            except UserError as e:
                errors.append(f"train_net.py: error: {e}")
                raise

        try:
            status = run_tool(run, "train_net.py")
        except SystemExit as e:
            if _handed_over():
                raise  # submitit requeued the job (rank 0): leave without a result, it comes back
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if status == 0:
            return 0
        signum = preemption.stop_requested()
        if _handed_over() and env.global_rank != 0:
            # Saved at the time limit; task 0 hands over to submitit, which requeues the job.
            # Leave without a result (the requeued job writes it) and with status 0: under
            # srun --kill-on-bad-exit a non-zero status would kill task 0 mid-requeue.
            print(f"task {env.global_rank}: stopped by {preemption.signal_name(signum)}, state saved; "
                  "task 0 requeues the job", file=sys.stderr, flush=True)  # fmt: skip
            raise SystemExit(0)
        if signum is not None and status == preemption.exit_code(signum):
            # Preempted or cancelled (SIGTERM), state saved: leave without a result. A requeued
            # job (SLURM requeues preempted jobs) writes it when it ends; a cancelled job has
            # none, and --wait reads its state instead.
            print(f"task {env.global_rank}: stopped by {preemption.signal_name(signum)}, state saved; "
                  "a requeued job resumes here, else resubmit with --resume", file=sys.stderr, flush=True)
            raise SystemExit(status)
        if errors:
            raise TaskFailed(errors[0])
        raise TaskFailed(f"train_net.py ended with exit status {status}")

    def checkpoint(self, *args, **kwargs):
        """What submitit resubmits when it requeues the job: the same run with
        ``--resume`` (once, before the ``KEY VALUE`` overrides)."""
        argv = self.argv if RESUME in self.argv else [RESUME, *self.argv]
        return _submitit().helpers.DelayedSubmission(TrainJob(argv))


# ---------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------
def build_executor(args: argparse.Namespace):
    """A submitit executor with every flag of ``args`` (completed by
    :func:`complete_args`) as its parameters. Job files go to ``args.job_dir``:
    ``<id>_submission.sh``, ``<id>_<task>_log.out`` (stdout and stderr), results.

    Raises:
        ConfigError: ``--cluster slurm`` where there is no ``srun``.
    """
    submitit = _submitit()
    name = "resnext_det:" + os.path.splitext(os.path.basename(args.config_file))[0]
    # The folder holds no %j: SLURM does not create the folder of --output, and the
    # LocalExecutor's controller may open its logs before submitit creates it.
    if args.cluster == "local":
        executor = submitit.LocalExecutor(folder=args.job_dir, max_num_timeout=args.max_requeues)
        executor.update_parameters(
            nodes=1, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
            timeout_min=args.time, signal_delay_s=args.signal_delay_s, stderr_to_stdout=True,
        )  # fmt: skip
        return executor
    try:
        executor = submitit.AutoExecutor(folder=args.job_dir, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    except RuntimeError as e:  # no srun here
        raise ConfigError(f"--cluster slurm: {e} (use --cluster local on a workstation)") from None
    executor.update_parameters(
        name=name,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        gpus_per_node=args.gpus_per_node or None,  # no --gpus-per-node=0: a cluster without GRES refuses it
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=args.time,
        stderr_to_stdout=True,
        slurm_partition=args.partition,
        slurm_account=args.account,
        slurm_qos=args.qos,
        slurm_constraint=args.constraint,
        slurm_signal_delay_s=args.signal_delay_s,
        slurm_srun_args=["--kill-on-bad-exit=1"],  # a failing task ends the job
    )
    return executor


@contextlib.contextmanager
def _std_streams_to(path: str) -> Iterator[None]:
    """Point this process's stdout and stderr (file descriptors) at ``path`` meanwhile:
    the LocalExecutor's controller inherits them and outlives this process, and would
    hold a caller's pipe open until the job ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved + [fd]:
            os.close(f)


def submit(args: argparse.Namespace, executor=None):
    """Submit ``train_net.py`` with ``args`` (completed); the submitit job."""
    executor = executor if executor is not None else build_executor(args)
    job_fn = TrainJob(train_argv(args))
    os.makedirs(args.job_dir, exist_ok=True)
    if args.cluster == "local":
        start = time.time()
        with _std_streams_to(os.path.join(args.job_dir, "local_controller.log")):
            job = executor.submit(job_fn)
        for k in range(job.num_tasks):  # a job of an earlier process with the same id (pid)
            stale = job_task(job, k).paths.result_pickle
            if stale.exists() and stale.stat().st_mtime < start - 1:
                stale.unlink()
        return job
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal too
            return executor.submit(job_fn)
    except Exception as e:  # sbatch refused: its message names the reason
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"sbatch refused the job: {text[-600:]}") from None


def describe_submission(job, args: argparse.Namespace) -> str:
    """The one line that says what was submitted, where its log is and how to follow it."""
    log = job_task(job, 0).paths.stdout
    where = "local" if args.cluster == "local" else (args.partition or "the default partition")
    follow = f"tail -f {log}" + (f", squeue -j {job.job_id}" if args.cluster == "slurm" else "")
    return (
        f"Submitted job {job.job_id}: {args.nodes} node(s) x {args.tasks_per_node} task(s) "
        f"({args.gpus_per_node} GPU(s) per node) on {where}; logs: {log}; follow: {follow}"
    )

