#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Submit ``tools/train_net.py`` as a cluster job (SLURM, or this machine), through submitit.

    # 2 nodes x 8 GPUs, one task per GPU, 3 days, requeued (and resumed) at the time limit
    python tools/submit.py --config-file configs/COCO-Detection/faster_rcnn_X_101_32x4d_FPN_1x.yaml \\
        --nodes 2 --gpus-per-node 8 --cpus-per-task 8 --mem-gb 400 --partition gpu --time 4320
    # the Appendix B schedule as one job: it runs the remaining stages, resumes after a requeue
    python tools/submit.py --config-file configs/COCO-Detection/faster_rcnn_X_101_32x4d_C4_appendixB.yaml ...
    # on a workstation, 2 CPU processes, and wait for the end
    python tools/submit.py --cluster local --gpus-per-node 0 --tasks-per-node 2 --wait \\
        --config-file ... MODEL.DEVICE cpu

Everything ``tools/train_net.py`` takes (``--resume``, ``--eval-only``, ``--stage``,
``--register-coco``, ``KEY VALUE`` overrides, ``--dist-timeout``, ``--max-requeues``)
goes to the job; the flags below are the cluster's. The config is checked before
submitting. It prints one line, ``Submitted job <id>: ...``, with the log of task 0 and
how to follow it; with ``--wait`` it exits with the job's status (0, or 1 and the failing
task's last lines). A bad flag or config: one line ``submit.py: error: ...``, exit 2.
The work is done by :mod:`resnext_det.cli.submit`.
"""
import argparse
import sys

from resnext_det.cli import submit
from resnext_det.cli.tool import run_tool
from resnext_det.cli.train_net import argument_parser as train_net_parser
from resnext_det.errors import ConfigError


def _number(kind, low):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'} >= {low}")
        return value

    return parse


def _refuse(message):
    raise ConfigError(message)  # one line through run_tool, not argparse's usage + exit


def argument_parser() -> argparse.ArgumentParser:
    """``tools/train_net.py``'s flags and the cluster's."""
    parser = train_net_parser()
    parser.prog = "submit.py"
    parser.description = __doc__.split("\n")[0]
    parser.epilog = None
    parser.error = _refuse
    g = parser.add_argument_group("cluster (submitit)")
    g.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="SLURM (sbatch, one srun task per process), or this machine (submitit's "
                   "LocalExecutor, for a workstation and tests); default slurm")
    g.add_argument("--nodes", type=_number(int, 1), default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=_number(int, 0), default=None, metavar="N",
                   help=f"GPUs per node (default: {submit.DEFAULT_SLURM_GPUS} under SLURM, this machine's "
                   "under local; 0 for a MODEL.DEVICE cpu config)")
    g.add_argument("--tasks-per-node", type=_number(int, 1), default=None, metavar="N",
                   help="processes per node (default: the GPUs per node, one task per GPU; with "
                   "--gpus-per-node 0 and MODEL.DEVICE cpu, CPU tasks; default 1)")
    g.add_argument("--cpus-per-task", type=_number(int, 1), default=None, metavar="N",
                   help="CPU cores per task (data loading workers need them; default: the cluster's)")
    g.add_argument("--mem-gb", type=_number(float, 0.001), default=None, metavar="GB",
                   help="memory per node (default: the cluster's)")
    g.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    g.add_argument("--account", help="SLURM account to charge")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--constraint", help="SLURM node features (e.g. volta32gb)")
    g.add_argument("--time", type=_number(int, 1), default=submit.DEFAULT_TIME_MIN, metavar="MINUTES",
                   help=f"time limit of one run of the job (default {submit.DEFAULT_TIME_MIN}); at the limit "
                   "it saves, requeues itself (at most --max-requeues times) and resumes")
    g.add_argument("--signal-delay-s", type=_number(int, 0), default=submit.DEFAULT_SIGNAL_DELAY_S,
                   metavar="S", help="the time-limit signal (USR2) comes this long before the end, to "
                   f"save (default {submit.DEFAULT_SIGNAL_DELAY_S})")
    g.add_argument("--job-dir", metavar="DIR",
                   help="the job's script, logs and results (default: OUTPUT_DIR/submitit)")
    g.add_argument("--wait", action="store_true",
                   help="wait for the job to end; exit 0, or 1 with the failing task's last lines")
    return parser


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    submit.complete_args(args)
    job = submit.submit(args)
    print(submit.describe_submission(job, args), flush=True)
    return submit.wait_for_job(job, args.cluster) if args.wait else 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "submit.py"))
