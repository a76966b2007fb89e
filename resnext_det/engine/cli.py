# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What ``tools/train_net.py`` runs, and how every tool ends on a user error.

:func:`run_tool` turns a :class:`~resnext_det.errors.UserError` (a config value,
a weights file, a path: the message names the fix) into one line on standard
error and exit status 2; any other exception is a bug or a machine failure and
keeps its traceback. ``RESNEXT_DET_TRACEBACK=1`` shows the traceback of user
errors too.
"""
import argparse
import errno
import logging
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

import torch

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results

from ..data.custom import add_register_coco_argument, check_num_classes, register_coco_datasets
from ..errors import ConfigError, UserError
from ..inference import build_inference_model
from ..unshared import STAGES, run_schedule
from .launch import add_cluster_arguments, check_shared_output_dir, launch_main, log_placement
from .setup import setup_cfg
from .trainer import Trainer


__all__ = ["argument_parser", "main", "cli", "launch_main", "run_tool"]


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` plus ``--stage`` (Appendix B),
    ``--register-coco NAME JSON IMAGE_DIR`` (your own COCO-format data), and the
    cluster's ``--dist-timeout`` and ``--max-requeues``."""
    parser = add_cluster_arguments(default_argument_parser())
    parser.add_argument(
        "--stage", choices=STAGES, help="run one stage of the Appendix B schedule (UNSHARED.*)"
    )
    return add_register_coco_argument(parser)


def _datasets_used(cfg, args: argparse.Namespace):
    return list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)


def main(args: argparse.Namespace):
    """Train (plain Detectron2 training, or the Appendix B schedule when
    ``UNSHARED.ENABLED``) or, with ``--eval-only``, evaluate ``MODEL.WEIGHTS``.
    Runs in every launched process: the ``--register-coco`` datasets are registered
    here, since spawned workers start with empty catalogs."""
    register_coco_datasets(getattr(args, "register_coco", None))
    cfg = setup_cfg(args.config_file, args.opts, args=args)
    log_placement()  # torchrun, SLURM or Detectron2's launch; world size; the layout
    check_shared_output_dir(cfg.OUTPUT_DIR)  # before any resume: one folder for every process
    check_num_classes(cfg, _datasets_used(cfg, args))  # before any model or data loader is built

    if args.eval_only:
        # Strict: refuses weights that leave any tensor random or disagree with the config.
        model = build_inference_model(cfg, resume=args.resume, save_dir=cfg.OUTPUT_DIR)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    if cfg.UNSHARED.ENABLED:  # Appendix B: RPN, proposals, Fast R-CNN, evaluation
        return run_schedule(cfg, stage=getattr(args, "stage", None), cli_opts=args.opts)
    if getattr(args, "stage", None):
        raise ConfigError("--stage is for the Appendix B schedule: set UNSHARED.ENABLED True")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _check_processes(args: argparse.Namespace) -> None:
    """Before several processes start, each of which would end in its own traceback:
    ``--num-gpus N`` on a machine without N GPUs (the config's MODEL.DEVICE as written,
    before any CPU fallback), and a NUM_CLASSES the datasets contradict; one line each."""
    n = args.num_gpus * args.num_machines
    if n <= 1:
        return
    cfg = setup_cfg(args.config_file, args.opts, freeze=False, device_fallback=False)  # config errors first
    have = torch.cuda.device_count()
    if cfg.MODEL.DEVICE.startswith("cuda") and have < max(args.num_gpus, 1):
        raise ConfigError(
            f"--num-gpus {args.num_gpus} but this machine has {have} CUDA device(s): use "
            f"--num-gpus {max(have, 1)}" + ("" if have else " (append MODEL.DEVICE cpu)")
            + f", or append MODEL.DEVICE cpu to train with {n} CPU processes"
        )
    check_num_classes(cfg, _datasets_used(cfg, args))


def cli(argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` as ``tools/train_net.py`` does and :func:`launch` :func:`main`."""
    args = argument_parser().parse_args(argv)  # default_setup logs them once the logger exists
    register_coco_datasets(args.register_coco)  # missing files: one line, before any process starts
    _check_processes(args)
    return launch_main(main, args)


def run_tool(fn: Callable[[], object], prog: str) -> int:
    """Run ``fn``; a :class:`UserError` (or a full disk) ends it with
    ``"{prog}: error: {message}"`` on standard error and returns 2, other exceptions
    propagate (with their traceback).
    Returns 0 on success (or ``fn``'s return value when it is an int)."""
    # A log handler that cannot write (full disk) must not print a page per record.
    logging.raiseExceptions = False
    try:
        out = fn()
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
