# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What ``tools/demo.py`` runs: a trained detector on images and videos, the drawn results
and ``predictions.json`` written (Detectron2's ``demo/demo.py``, without the webcam and the
window).

Its command line takes config overrides as Detectron2's ``--opts KEY VALUE ...`` and as
trailing ``KEY VALUE`` pairs (as ``tools/train_net.py``), in any order with the flags
(:func:`split_argv`, :func:`parse_args`); :func:`main` checks the inputs before it loads
the model, resolves the weights (:func:`~resnext_det.inference.resolve_weights`), runs a
:class:`~resnext_det.inference.Predictor` on every input (:mod:`resnext_det.visualize`
draws and writes) and says what was skipped and, when nothing was detected, why.
``tools/demo.py`` describes the command line, the weights and the outputs.
"""
import argparse
import difflib
import logging
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

from detectron2.utils.logger import setup_logger

from ..data import add_register_coco_argument, check_num_classes, dataset_classes, register_coco_datasets
from ..engine import setup_cfg, setup_logging
from ..errors import ConfigError
from ..inference import Predictor, resolve_weights, trained_size_mismatch
from ..utils.io import atomic_write_json
from ..visualize import check_inputs, expand_inputs, no_detection_hint, output_paths, run_on_files

__all__ = ["MODEL_SCORE_FLOOR", "get_parser", "split_argv", "parse_args", "setup", "main", "cli"]

logger = logging.getLogger("resnext_det.demo")  # its handler: setup_logger in main

#: The score down to which the model keeps detections (those under --confidence-threshold
#: are counted, not drawn): Detectron2's evaluation threshold.
MODEL_SCORE_FLOOR = 0.05


def get_parser() -> argparse.ArgumentParser:
    """``tools/demo.py``'s flags (the config overrides: :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        description="Run a resnext_det detector on images / videos (as Detectron2's demo/demo.py). "
        "Config overrides: KEY VALUE pairs after the flags (as tools/train_net.py) or after --opts.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's config "
                        "(a trained run's OUTPUT_DIR/config.yaml carries its classes and sizes)")
    parser.add_argument(
        "--input", nargs="+", help="images, videos, folders or glob patterns such as 'dir/*.jpg'"
    )
    parser.add_argument("--video-input", help="a video file (Detectron2's flag; same as --input FILE)")
    parser.add_argument(
        "--output", required=True,
        help="folder for the drawn results (or one image file for a single input image)",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5,
        help="minimum score of the detections drawn (default 0.5)",
    )
    parser.add_argument(
        "--opts", default=[], nargs="*", action="extend", metavar="KEY VALUE",
        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu (Detectron2's "
        "flag; the same pairs work without it, after the flags)",
    )
    # The class names drawn are those of DATASETS.TEST[0]: your own data's come from its json.
    return add_register_coco_argument(parser)


#: A config key as typed on the command line: MODEL.WEIGHTS, DATASETS.TEST, ...
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def _is_flag(word: str) -> bool:
    """A word argparse reads as an option: starts with "-" and is not a number."""
    if not word.startswith("-") or word == "-":
        return False
    try:
        float(word)
    except ValueError:
        return True
    return False


def _action(parser: argparse.ArgumentParser, flag: str):
    """The action of ``flag`` (exact, or a unique prefix, as argparse allows), or None."""
    actions = {o: a for a in parser._actions for o in a.option_strings}
    if flag in actions:
        return actions[flag]
    found = {a for o, a in actions.items() if o.startswith("--") and o.startswith(flag)}
    return found.pop() if len(found) == 1 else None


def split_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``argv`` as (the flags with their values, for ``parser.parse_args``; the trailing
    ``KEY VALUE`` words). A flag anywhere, after ``--opts`` too, is that flag; ``--opts``
    takes the words up to the next flag; ``--input``'s list ends at the next flag or at
    the first word that is a config key (``MODEL.WEIGHTS``) and no file; every other
    word is a config override, as for ``tools/train_net.py``."""
    flags: List[str] = []
    pairs: List[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":  # what follows is overrides only
            pairs += words[i:]
            break
        if not _is_flag(word):
            pairs.append(word)
            continue
        flags.append(word)
        action = _action(parser, word.split("=", 1)[0])
        if action is None or "=" in word:  # unknown (argparse says so by name), or --flag=value
            continue
        nargs = action.nargs
        if isinstance(nargs, int) or nargs is None:
            n = 1 if nargs is None else nargs
            flags += words[i:i + n]
            i += n
            continue
        if nargs not in ("*", "+", "?"):  # REMAINDER / PARSER: not used here
            continue
        while i < len(words) and not _is_flag(words[i]):
            if action.dest == "input" and _CONFIG_KEY.match(words[i]) and not os.path.exists(words[i]):
                break
            flags.append(words[i])
            i += 1
            if nargs == "?":
                break
    return flags, pairs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags (parsed by :func:`get_parser`'s ``parse_args``: its errors and ``--help``),
    and in ``opts`` every config override: the ``--opts`` pairs, then the trailing ones
    (:func:`split_argv`)."""
    parser = get_parser()
    flags, pairs = split_argv(parser, sys.argv[1:] if argv is None else argv)
    known = [o for a in parser._actions for o in a.option_strings]
    for word in flags:
        name = word.split("=", 1)[0]
        if _is_flag(word) and not any(o.startswith(name) for o in known):
            close = difflib.get_close_matches(name, known, n=1)
            parser.error(
                f"unrecognized argument {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                + ": not a flag of demo.py; config overrides are KEY VALUE pairs (MODEL.WEIGHTS FILE)"
            )
    args = parser.parse_args(flags)
    args.opts = list(args.opts) + pairs
    return args


def setup(args):
    """The config with the demo's overrides (score thresholds), frozen."""
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ConfigError(f"--confidence-threshold must lie in [0, 1], got {args.confidence_threshold}")
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)  # no GPU: runs on the CPU, says so
    # The model keeps detections down to MODEL_SCORE_FLOOR (Detectron2's evaluation
    # threshold), so that the demo can say what scored below --confidence-threshold; those
    # at or above it are the same as with the model's threshold set to it (the score
    # filter comes before per-class NMS, which a lower-scoring box never wins, and the
    # top-k keeps the highest scores), and only they are drawn.
    model_threshold = min(args.confidence_threshold, MODEL_SCORE_FLOOR)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = model_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = model_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def _named(items, most: int = 8) -> str:
    shown = ", ".join(f"{f} ({why})" for f, why in items[:most])
    return shown + (f", and {len(items) - most} more" if len(items) > most else "")


def main(args: argparse.Namespace) -> int:
    """The demo of :func:`parse_args`'s ``args``; returns 0 (a user error raises
    :class:`~resnext_det.errors.ConfigError`)."""
    setup_logger(name="resnext_det.demo", abbrev_name="demo")
    setup_logging()
    setup_logger(name="fvcore")
    inputs = list(args.input or []) + ([args.video_input] if args.video_input else [])
    if not inputs:
        raise ConfigError("give --input (images, folders, globs, videos) or --video-input")
    files, skipped = expand_inputs(inputs)
    files, bad = check_inputs(files)  # training's check, from the headers: before the model
    skipped += bad
    for f, why in skipped:
        logger.warning(f"Skipped {f}: {why}")
    given = len(files) + len(skipped)
    if not files:
        raise ConfigError(f"--input: none of the {given} input(s) can be used: {_named(skipped)}")
    outputs, folder = output_paths(files, args.output)
    register_coco_datasets(args.register_coco)
    cfg = setup(args)
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    check_num_classes(cfg, names[:1])
    if names:
        dataset_classes(names[0])  # the class names drawn (a --register-coco json's categories)
    weights = resolve_weights(cfg, args.opts, config_file=args.config_file)
    mismatch = trained_size_mismatch(cfg, weights)
    if mismatch:
        logger.warning(f"{mismatch}.")
    logger.info(f"Loading {weights}")
    predictor = Predictor(cfg, weights=weights)
    reasons = {}
    records, unreadable = run_on_files(
        predictor, files, outputs, threshold=args.confidence_threshold, logger=logger, reasons=reasons
    )
    skipped += [(f, reasons.get(f, "unreadable")) for f in unreadable]
    if folder is not None:
        atomic_write_json(
            os.path.join(folder, "predictions.json"),
            {"weights": weights, "confidence_threshold": args.confidence_threshold, "results": records,
             "skipped": [{"file": f, "reason": why} for f, why in skipped]},
        )
    if skipped:
        logger.warning(f"{len(skipped)} of {given} input(s) skipped: {_named(skipped)}")
    if not records:
        raise ConfigError(f"--input: none of the {given} input(s) could be used: {_named(skipped)}")
    hint = no_detection_hint(records, args.confidence_threshold, cfg, mismatch)
    if hint:
        logger.warning(hint)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/demo.py``: parse ``argv`` (default ``sys.argv[1:]``) and run :func:`main`."""
    return main(parse_args(argv))
