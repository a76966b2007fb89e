#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Train or evaluate a ResNeXt detector with Detectron2.

    python tools/train_net.py --config-file configs/Base-ResNeXt-FPN.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file ... --resume   # continue a killed run
    # Appendix B (UNSHARED.ENABLED): RPN, proposals, Fast R-CNN, eval; rerun to resume
    python tools/train_net.py --config-file configs/COCO-Detection/faster_rcnn_X_101_32x4d_C4_appendixB.yaml --num-gpus 8
    python tools/train_net.py --config-file ...appendixB.yaml --stage eval   # one stage alone

Any ``KEY VALUE`` pairs after the flags override the config (Detectron2's ``opts``).

A bad config, bad weights or a missing file end the run with one line that names what
to fix, on standard error, and exit status 2 (``RESNEXT_DET_TRACEBACK=1`` adds the
traceback). Other failures keep Python's traceback.
"""
import os
import sys
import traceback

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results

import resnext_det  # noqa: F401  registers backbones, heads and datasets
from resnext_det.checkpoint import ResNeXtCheckpointer
from resnext_det.engine import Trainer, setup_cfg
from resnext_det.unshared import STAGES, run_schedule


def setup(args):
    return setup_cfg(args.config_file, args.opts, args=args)


def main(args):
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Strict: refuses weights that leave any tensor random or disagree with the config.
        ResNeXtCheckpointer(model, save_dir=cfg.OUTPUT_DIR, cfg=cfg, require="all").resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    if cfg.UNSHARED.ENABLED:  # Appendix B: RPN, proposals, Fast R-CNN, evaluation
        return run_schedule(cfg, stage=args.stage, cli_opts=args.opts)
    if args.stage:
        raise ValueError("--stage is for the Appendix B schedule: set UNSHARED.ENABLED True")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--stage", choices=STAGES, help="run one stage of the Appendix B schedule (UNSHARED.*)"
    )
    args = parser.parse_args(argv)  # default_setup logs them once the logger exists
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


#: Errors that describe the user's input (config keys, weight files, paths): they end the run
#: with their message alone. Training's own errors (e.g. a NaN loss) keep the traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


if __name__ == "__main__":
    try:
        cli()
    except _USER_ERRORS as e:
        if os.environ.get("RESNEXT_DET_TRACEBACK"):
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"train_net.py: error: {msg}", file=sys.stderr)
        sys.exit(2)
