# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What ``tools/train_net.py`` runs.

:func:`main` refuses what it can find wrong before it starts (config keys and
values, ``NUM_CLASSES`` against the datasets, ``MODEL.WEIGHTS`` that is missing or
cannot be downloaded) before Detectron2's ``default_setup`` logs the environment
and the whole config: the line that ends such a run is the only thing it prints.
"""
import argparse
import multiprocessing
import os
import signal
import time
from typing import Optional, Sequence

import torch

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results

from ..checkpoint import is_source_name
from ..checkpoint.loading import weights_file
from ..data import check_datasets
from ..data.custom import add_register_coco_argument, check_num_classes, register_coco_datasets
from ..engine.setup import read_cfg, setup_logging, setup_run
from ..engine.trainer import Trainer
from ..errors import ConfigError, Interrupted
from ..inference import build_inference_model
from ..unshared import SCHEDULE, STAGES, run_schedule
from .launch import add_cluster_arguments, check_shared_output_dir, launch_main, log_placement
from .tool import interrupted_trainer, last_checkpoint, traceback_frames


__all__ = ["argument_parser", "main", "cli"]


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


def _loads_weights(cfg, args: argparse.Namespace) -> bool:
    """Whether this run loads ``MODEL.WEIGHTS``: not when it resumes from a checkpoint of
    ``OUTPUT_DIR`` (``--resume``), nor, in the Appendix B schedule, when every training
    stage it runs has a checkpoint of its own to resume from (a finished one too)."""
    if not cfg.MODEL.WEIGHTS:
        return False
    if args.eval_only or not cfg.UNSHARED.ENABLED:
        return not (args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")))
    stages = [st for st in SCHEDULE if st.trains and getattr(args, "stage", None) in (None, st.name)]
    return any(not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, st.folder, "last_checkpoint")) for st in stages)


def _check_weights(cfg, args: argparse.Namespace) -> None:
    """``MODEL.WEIGHTS`` where this run loads it: a missing file, or a name that cannot be
    resolved or downloaded (offline), ends the run here in one line. A name is fetched
    now (downloaded once, checked, converted, cached, its lines logged), and the model
    later loads the cached file."""
    if not _loads_weights(cfg, args):
        return
    if is_source_name(cfg.MODEL.WEIGHTS):
        setup_logging(cfg.OUTPUT_DIR)  # the download's lines, on the console and in log.txt
    weights_file(cfg.MODEL.WEIGHTS, require="all" if args.eval_only else "backbone")


def main(args: argparse.Namespace):
    """Train (plain Detectron2 training, or the Appendix B schedule when
    ``UNSHARED.ENABLED``) or, with ``--eval-only``, evaluate ``MODEL.WEIGHTS``.
    Runs in every launched process: the ``--register-coco`` datasets are registered
    here, since spawned workers start with empty catalogs. Ctrl-C ends it with
    :class:`~resnext_det.errors.Interrupted`: where it stopped, how to continue."""
    register_coco_datasets(getattr(args, "register_coco", None))
    cfg = read_cfg(args.config_file, args.opts)  # config keys and values
    # Before the dump: what ends the run here is all it prints (Detectron2's default_setup,
    # below, logs the environment and the whole config: hundreds of lines).
    datasets = _datasets_used(cfg, args)
    check_num_classes(cfg, datasets)  # before any model or data loader is built
    setup_logging(cfg.OUTPUT_DIR)  # the dataset check's lines, on the console and in log.txt
    check_datasets(datasets)  # json, categories, image files: missing ones counted, most missing refused
    if getattr(args, "stage", None) and not cfg.UNSHARED.ENABLED:
        raise ConfigError("--stage is for the Appendix B schedule: set UNSHARED.ENABLED True")
    _check_weights(cfg, args)  # missing, or a name that cannot be downloaded
    cfg = setup_run(cfg, args)  # the dump, OUTPUT_DIR/config.yaml, logging
    log_placement()  # torchrun, SLURM or Detectron2's launch; world size; the layout
    check_shared_output_dir(cfg.OUTPUT_DIR)  # before any resume: one folder for every process
    try:
        return _run(cfg, args)
    except KeyboardInterrupt as e:
        raise _interruption(e, cfg, args) from e


def _run(cfg, args: argparse.Namespace):
    if args.eval_only:
        # Strict: refuses weights that leave any tensor random or disagree with the config.
        model = build_inference_model(cfg, resume=args.resume, save_dir=cfg.OUTPUT_DIR)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    if cfg.UNSHARED.ENABLED:  # Appendix B: RPN, proposals, Fast R-CNN, evaluation
        return run_schedule(cfg, stage=getattr(args, "stage", None), cli_opts=args.opts)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _interruption(error: KeyboardInterrupt, cfg, args: argparse.Namespace) -> Interrupted:
    """Where Ctrl-C stopped train_net (``cfg`` is the run's), and how to continue."""
    if isinstance(error, Interrupted):
        return error
    trainer = interrupted_trainer(error)
    evaluating = any(f.f_code.co_name == "inference_on_dataset" for f in traceback_frames(error))
    if args.eval_only:
        return Interrupted("during evaluation", "rerun the same command to evaluate again")
    at = f"at iteration {trainer.iter} of {trainer.max_iter}" if trainer is not None else ""
    at += " (evaluating)" if evaluating and at else ""
    if cfg.UNSHARED.ENABLED:
        folder = getattr(getattr(trainer, "cfg", None), "OUTPUT_DIR", "")
        by_folder = {st.folder: st for st in SCHEDULE}
        st = by_folder.get(os.path.basename(os.path.normpath(folder))) if folder else None
        if st is None:
            return Interrupted("", "rerun the same command to continue: finished stages are skipped")
        k, stage = st.number, st.name
        ckpt = last_checkpoint(folder)
        resumes = f"resumes from {ckpt}" if ckpt else "starts again (no checkpoint was saved yet)"
        return Interrupted(
            f"in stage {k} ({stage}) {at}".rstrip(),
            f"rerun the same command to continue: finished stages are skipped, and stage {k} {resumes}",
        )
    ckpt = last_checkpoint(getattr(getattr(trainer, "cfg", None), "OUTPUT_DIR", "") or cfg.OUTPUT_DIR)
    if ckpt:
        return Interrupted(at, f"rerun the same command with --resume to continue from {ckpt}")
    return Interrupted(at, "rerun the same command to start again (no checkpoint was saved yet)")


def _check_processes(args: argparse.Namespace):
    """Before several processes start, each of which would end in its own traceback:
    ``--num-gpus N`` on a machine without N GPUs (the config's MODEL.DEVICE as written,
    before any CPU fallback), and a NUM_CLASSES the datasets contradict; one line each.
    Returns the config (None for one process)."""
    n = args.num_gpus * args.num_machines
    if n <= 1:
        return None
    cfg = read_cfg(args.config_file, args.opts, device_fallback=False)  # config errors first
    have = torch.cuda.device_count()
    if cfg.MODEL.DEVICE.startswith("cuda") and have < max(args.num_gpus, 1):
        raise ConfigError(
            f"--num-gpus {args.num_gpus} but this machine has {have} CUDA device(s): use "
            f"--num-gpus {max(have, 1)}" + ("" if have else " (append MODEL.DEVICE cpu)")
            + f", or append MODEL.DEVICE cpu to train with {n} CPU processes"
        )
    check_num_classes(cfg, _datasets_used(cfg, args))
    return cfg


def cli(argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` as ``tools/train_net.py`` does and :func:`launch` :func:`main`."""
    args = argument_parser().parse_args(argv)  # default_setup logs them once the logger exists
    register_coco_datasets(args.register_coco)  # missing files: one line, before any process starts
    cfg = _check_processes(args)
    try:
        return launch_main(main, args)
    except KeyboardInterrupt as e:
        # The launcher of --num-gpus processes: its workers end with the same Ctrl-C, silently
        # (torch's spawn); what is saved is in OUTPUT_DIR.
        if cfg is None or isinstance(e, Interrupted):
            raise
        _wait_for_workers()
        raise _interruption(e, cfg, args) from e


def _wait_for_workers(grace_s: float = 10.0, kill_s: float = 60.0) -> None:
    """The launcher after Ctrl-C: its workers got the same SIGINT (a terminal sends it to
    the whole process group) and are ending; wait for them, so that the line that says
    where the run stopped comes after their last log lines. When some still run after
    ``grace_s`` (a SIGINT sent to the launcher alone), all of them get it passed on at
    once (one stopping alone would leave the others in a collective). Ctrl-C again stops
    waiting."""
    children = multiprocessing.active_children()
    try:
        deadline = time.monotonic() + grace_s
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
        running = [c for c in children if c.is_alive()]
        for child in running:
            os.kill(child.pid, signal.SIGINT)
        deadline = time.monotonic() + kill_s
        for child in running:
            child.join(max(0.0, deadline - time.monotonic()))
    except (KeyboardInterrupt, OSError):
        pass


