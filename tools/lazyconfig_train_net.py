#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Train or evaluate a ResNeXt detector from a LazyConfig (Detectron2's Python configs).

    python tools/lazyconfig_train_net.py --num-gpus 8 \\
        --config-file configs/new_baselines/mask_rcnn_X_50_32x4d_FPN_1x.py
    python tools/lazyconfig_train_net.py --config-file ... --eval-only \\
        train.init_checkpoint=output/model_final.pth
    python tools/lazyconfig_train_net.py --config-file ... --resume   # continue a killed run
    # your own COCO-format data (registered in every process)
    python tools/lazyconfig_train_net.py --config-file ... --register-coco mydata_train data/train.json data/images \
        dataloader.train.dataset.names=mydata_train model.roi_heads.num_classes=3

Overrides after the flags are ``key=value`` pairs on the config tree, e.g.
``train.max_iter=1000 dataloader.train.total_batch_size=8 train.device=cpu``.
This is Detectron2's ``tools/lazyconfig_train_net.py`` with resnext_det registered and
checks that turn a wrong device or AMP setting into a message naming the override to pass.
"""
import logging
import sys

import resnext_det  # noqa: F401  registers backbones, heads and datasets (first: quiets detectron2's import)
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from resnext_det.checkpoint import ResNeXtCheckpointer, attach_weights_record
from resnext_det.data import add_register_coco_argument, register_coco_datasets
from resnext_det.cli.tool import run_tool
from resnext_det.cli.launch import add_cluster_arguments, check_shared_output_dir, launch_main, log_placement
from resnext_det.engine.setup import check_lazy_device, setup_logging
from resnext_det.engine.trainer import StopAndSave
from resnext_det.errors import ConfigError

logger = logging.getLogger("resnext_det")


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    # Strict, as tools/train_net.py: init_checkpoint must fill the whole backbone and match
    # the model's input convention (input_format / pixel_mean / pixel_std) and architecture.
    checkpointer = ResNeXtCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    attach_weights_record(checkpointer, None)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
            StopAndSave(checkpointer),  # a stop signal (time limit, preemption): save this iteration
        ]
    )

    # With --resume, continue from the last checkpoint in train.output_dir (its
    # iteration, optimizer and scheduler state); otherwise start from init_checkpoint.
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    register_coco_datasets(getattr(args, "register_coco", None))  # in every launched process
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_lazy_device(cfg)
    default_setup(cfg, args)
    setup_logging(cfg.train.output_dir)
    log_placement()  # torchrun, SLURM or Detectron2's launch; world size; the layout
    check_shared_output_dir(cfg.train.output_dir)  # before any resume: one folder for every process

    if args.eval_only:
        if not cfg.train.init_checkpoint:
            raise ConfigError(
                "--eval-only evaluates train.init_checkpoint, which is empty: add the override "
                "train.init_checkpoint=path/to/model_final.pth"
            )
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        ResNeXtCheckpointer(model, require="all").load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)


def get_parser():
    """Detectron2's ``default_argument_parser`` plus ``--register-coco NAME JSON IMAGE_DIR``
    and the cluster's ``--dist-timeout`` and ``--max-requeues``."""
    return add_cluster_arguments(add_register_coco_argument(default_argument_parser()))


def cli(argv=None):
    args = get_parser().parse_args(argv)
    register_coco_datasets(args.register_coco)  # missing files: one line, before any process starts
    return launch_main(main, args)


if __name__ == "__main__":
    sys.exit(run_tool(cli, "lazyconfig_train_net.py"))
