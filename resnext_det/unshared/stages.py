# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The four stages of the paper's Appendix B schedule (Xie et al., CVPR 2017,
Appendix B), each one :class:`Stage` record of :data:`SCHEDULE`:

1. ``rpn``: an RPN-only model (Detectron2 ``ProposalNetwork``, backbone from
   ``MODEL.WEIGHTS``), 8 GPUs x 2 images, 256 anchors per image, lr 0.02 for
   120k iterations then 0.002 for 60k;
2. ``proposals``: the trained RPN writes proposals for every training and test
   dataset (Detectron2's proposal-file format);
3. ``fast_rcnn``: a detector with its own backbone, again from ``MODEL.WEIGHTS``,
   learning from the stored proposals only: 8 GPUs x 1 image, 64 RoIs per image,
   lr 0.005 for 120k then 0.0005 for 60k. At the end the two trained networks
   are written as one :class:`UnsharedRCNN` checkpoint, ``OUTPUT_DIR/model_final.pth``;
4. ``eval``: COCO AP of the Fast R-CNN on the stored test proposals (the
   paper's protocol) and of the end-to-end UnsharedRCNN, beside Table 8.

A record names the stage's folder, the network config it trains or is marked
with, the ``UNSHARED`` keys that belong to its identity, what it runs, what it
leaves behind and how to tell each of those files is whole. :mod:`.schedule`
runs the records in order; the names, folders and Detectron2 configs below are
views of them (the end-to-end :class:`~resnext_det.modeling.unshared_rcnn.UnsharedRCNN`
is built from the same network configs).
"""
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.evaluation import inference_on_dataset, print_csv_format

from ..checkpoint import final_checkpoint
from ..engine.trainer import Trainer
from ..inference import build_inference_model, load_model
from ..modeling.unshared_rcnn import network_configs
from ..utils.io import atomic_write_json, atomic_write_text, file_sha256
from . import report
from .proposals import check_proposal_file, dump_proposals, proposal_file_meta
from .training import export_unshared_checkpoint, main_first, train_stage

__all__ = [
    "SCHEDULE",
    "STAGES",
    "STAGE_BY_NAME",
    "STAGE_DIRS",
    "Stage",
    "broken_output",
    "config_identity",
    "proposal_file",
    "stage_configs",
    "stage_dir",
]

logger = logging.getLogger(__name__)

#: ``run(cfg, cfgs, force)``: the schedule's config, :func:`stage_configs`, and whether
#: the stage was asked for by name (``--stage``: files of an earlier try are made again).
Runner = Callable[[CfgNode, Dict[str, CfgNode], bool], Dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of the Appendix B schedule."""

    number: int  #: 1 to 4, in the order the schedule runs them
    name: str  #: what ``--stage`` and the logs call it
    folder: str  #: where it works and leaves its marker, under ``OUTPUT_DIR``
    #: the network config (``"rpn"`` or ``"fast_rcnn"`` of :func:`stage_configs`) that it
    #: trains or uses, and whose keys its marker records (:func:`config_identity`)
    network: str
    #: whether it trains that network (in its folder, resuming from the folder's last checkpoint)
    trains: bool
    #: ``UNSHARED.*`` keys (prefixes) that change what it computes; the other ``UNSHARED``
    #: keys are settings of other stages
    unshared_keys: Tuple[str, ...]
    run: Runner  #: the stage itself; returns what its marker records as ``results``
    #: the files it leaves behind, from the schedule's config and :func:`stage_configs`
    outputs: Callable[[CfgNode, Dict[str, CfgNode]], List[str]]
    whole: Callable[[str], bool]  #: whether one of those files is complete
    #: its line of the plan the schedule logs first (:mod:`.report`), given the number of processes
    plan: Callable[[CfgNode, Dict[str, CfgNode], int], str]


def stage_dir(cfg: CfgNode, stage: str) -> str:
    return os.path.join(cfg.OUTPUT_DIR, STAGE_DIRS[stage])


def proposal_file(cfg: CfgNode, dataset_name: str, post_nms_topk: int) -> str:
    """Where stage 2 writes the proposals of ``dataset_name`` (``post_nms_topk``
    per image): ``OUTPUT_DIR/stage2_proposals/{dataset}_top{k}.pkl``."""
    return os.path.join(stage_dir(cfg, "proposals"), f"{dataset_name}_top{post_nms_topk}.pkl")


def stage_configs(cfg: CfgNode) -> Dict[str, CfgNode]:
    """The Detectron2 configs of the two training stages of the schedule.

    Args:
        cfg: a config with the ``UNSHARED`` node (:func:`add_resnext_config`).

    Returns:
        ``{"rpn": cfg_rpn, "fast_rcnn": cfg_fast_rcnn}``: the configs of
        :func:`~resnext_det.modeling.unshared_rcnn.network_configs`, which train the
        stage when given to :class:`DefaultTrainer`, with their stage folders as
        ``OUTPUT_DIR``; ``cfg_fast_rcnn`` trains on the files of stage 2
        (``DATASETS.PROPOSAL_FILES_TRAIN/TEST``). Detectron2 scales both to the
        number of processes (``SOLVER.REFERENCE_WORLD_SIZE``).
    """
    nets = network_configs(cfg)
    rpn, frcn = nets["rpn"], nets["fast_rcnn"]
    for c in (rpn, frcn):
        c.defrost()
    rpn.OUTPUT_DIR = stage_dir(cfg, "rpn")
    frcn.DATASETS.PROPOSAL_FILES_TRAIN = tuple(
        proposal_file(cfg, n, cfg.UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK) for n in cfg.DATASETS.TRAIN
    )
    frcn.DATASETS.PROPOSAL_FILES_TEST = tuple(
        proposal_file(cfg, n, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) for n in cfg.DATASETS.TEST
    )
    frcn.OUTPUT_DIR = stage_dir(cfg, "fast_rcnn")
    if cfg.is_frozen():
        rpn.freeze()
        frcn.freeze()
    return {"rpn": rpn, "fast_rcnn": frcn}


# ----------------------------------------------------------------------------
# What identifies a stage's work, and whether it is still there
# ----------------------------------------------------------------------------
# Keys that do not change what a stage computes (ignored when a finished stage's
# config is compared with the current one).
_VOLATILE = (
    "OUTPUT_DIR",
    "DATALOADER.NUM_WORKERS",
    "MODEL.DEVICE",
    "SOLVER.CHECKPOINT_PERIOD",
    "TEST.EVAL_PERIOD",
    "VIS_PERIOD",
    "CUDNN_BENCHMARK",
    "SEED",
    "DATASETS.PROPOSAL_FILES_TRAIN",
    "DATASETS.PROPOSAL_FILES_TEST",
    "UNSHARED.PROPOSALS.CHUNK_IMAGES",  # how stage 2 saves its work, not what it computes
)


def _flat(cfg: CfgNode, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def config_identity(cfg: CfgNode, stage: str) -> Dict[str, Any]:
    """The keys of ``cfg`` (the stage's network config) that determine what ``stage``
    computes, flattened (``"MODEL.RPN.NMS_THRESH": 0.7``): all but the volatile ones
    (folders, workers, device, periods) and the ``UNSHARED`` keys of other stages."""
    keep_unshared = STAGE_BY_NAME[stage].unshared_keys
    flat = _flat(cfg)
    return {
        k: v
        for k, v in flat.items()
        if k not in _VOLATILE and (not k.startswith("UNSHARED.") or k.startswith(keep_unshared))
    }


def broken_output(cfg: CfgNode, cfgs: Dict[str, CfgNode], stage: str) -> Optional[str]:
    """The first output of a finished ``stage`` that is missing or does not load, or None."""
    st = STAGE_BY_NAME[stage]
    return next((f for f in st.outputs(cfg, cfgs) if not st.whole(f)), None)


def _loads(path: str) -> bool:
    """Whether a checkpoint (a torch zip) is whole: its central directory, written last,
    is readable. A file cut short by a kill or a full disk is not."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _proposal_file_whole(path: str) -> bool:
    """A proposal file is whole when it is not empty and its metadata, written after it, reads."""
    return os.path.isfile(path) and os.path.getsize(path) > 0 and proposal_file_meta(path) is not None


def _parses(path: str) -> bool:
    try:
        with open(path) as fh:
            json.load(fh)
    except (OSError, ValueError):
        return False
    return True


def _rpn_outputs(cfg: CfgNode, cfgs: Dict[str, CfgNode]) -> List[str]:
    return [final_checkpoint(cfgs["rpn"].OUTPUT_DIR)]


def _proposals_outputs(cfg: CfgNode, cfgs: Dict[str, CfgNode]) -> List[str]:
    frcn = cfgs["fast_rcnn"].DATASETS
    return list(frcn.PROPOSAL_FILES_TRAIN) + list(frcn.PROPOSAL_FILES_TEST)


def _fast_rcnn_outputs(cfg: CfgNode, cfgs: Dict[str, CfgNode]) -> List[str]:
    return [final_checkpoint(cfgs["fast_rcnn"].OUTPUT_DIR), final_checkpoint(cfg.OUTPUT_DIR)]


def _eval_outputs(cfg: CfgNode, cfgs: Dict[str, CfgNode]) -> List[str]:
    return [os.path.join(stage_dir(cfg, "eval"), "results.json")]


# ----------------------------------------------------------------------------
# What each stage runs
# ----------------------------------------------------------------------------
# Keys that change the proposals, named in proposal files' metadata (the config digest
# covers the rest): a file made with other values is made again.
_PROPOSAL_KEYS = (
    "MODEL.RPN.NMS_THRESH",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
    "INPUT.FORMAT",
)


def _stage_rpn(cfg, cfgs, force: bool) -> Dict[str, Any]:
    return train_stage(cfgs["rpn"])


def _stage_proposals(cfg, cfgs, force: bool) -> Dict[str, Any]:
    rpn_cfg = cfgs["rpn"]
    weights = final_checkpoint(rpn_cfg.OUTPUT_DIR)
    model = load_model(rpn_cfg, weights)  # strict: the RPN stage's own complete checkpoint
    u = cfg.UNSHARED.PROPOSALS
    jobs = [("train", n, u.TRAIN_PRE_NMS_TOPK, u.TRAIN_POST_NMS_TOPK) for n in cfg.DATASETS.TRAIN]
    jobs += [
        ("test", n, cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
        for n in cfg.DATASETS.TEST
    ]
    # What the proposals are made from: the RPN's weights (their bytes, not their path) and
    # every RPN and test-input key. Files made from anything else are made again.
    flat = _flat(rpn_cfg)
    source = {
        "rpn_weights_sha256": file_sha256(weights),
        "rpn_config_sha256": hashlib.sha256(
            json.dumps(config_identity(rpn_cfg, "rpn"), sort_keys=True, default=str).encode()
        ).hexdigest(),
        **{k: flat[k] for k in _PROPOSAL_KEYS},
    }
    out: Dict[str, Any] = {}
    for role, name, pre, post in jobs:
        path = proposal_file(cfg, name, post)
        key = f"{role}:{name}"
        if any(v.get("file") == path for v in out.values()):
            continue  # a dataset both trained and tested on, with one top-k
        expected = dict(source, dataset=name, pre_nms_topk=pre, post_nms_topk=post)
        found = proposal_file_meta(path)
        if not force and found == expected:
            logger.info(f"Proposals for {name}: {path} exists (written by an interrupted run)")
            out[key] = {"file": path}
            continue
        if found is not None:
            diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            logger.warning(f"Proposals for {name}: {path} was made from other settings ({', '.join(diff)}): "
                           "making them again.")
        stats = dump_proposals(
            model,
            rpn_cfg,
            name,
            path,
            pre_nms_topk=pre,
            post_nms_topk=post,
            meta=source,
            recall=role == "test",
            chunk_images=u.CHUNK_IMAGES,
        )
        out[key] = stats or {"file": path}
    return out


def _stage_fast_rcnn(cfg, cfgs, force: bool) -> Dict[str, Any]:
    frcn = cfgs["fast_rcnn"]
    for name, path in zip(frcn.DATASETS.TRAIN, frcn.DATASETS.PROPOSAL_FILES_TRAIN):
        main_first(lambda name=name, path=path: check_proposal_file(path, name))
    res = train_stage(frcn)
    final = final_checkpoint(cfg.OUTPUT_DIR)
    if comm.is_main_process():
        rpn_final = final_checkpoint(cfgs["rpn"].OUTPUT_DIR)
        export_unshared_checkpoint(rpn_final, res["model_final"], final)
        logger.info(f"UnsharedRCNN (both networks) written to {final}")
    comm.synchronize()
    res["unshared_model"] = final
    return res


def _evaluate(cfg: CfgNode, model, folder: str) -> Dict[str, Any]:
    results = {}
    for name in cfg.DATASETS.TEST:
        evaluator = Trainer.build_evaluator(cfg, name, os.path.join(folder, name))
        res = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
        if comm.is_main_process():
            logger.info(f"Evaluation of {name} ({folder}):")
            print_csv_format(res)
        results[name] = res
    return results


def _stage_eval(cfg, cfgs, force: bool) -> Dict[str, Any]:
    folder = stage_dir(cfg, "eval")
    frcn = cfgs["fast_rcnn"].clone()
    frcn.defrost()
    frcn.OUTPUT_DIR = folder
    frcn.freeze()
    for name, path in zip(frcn.DATASETS.TEST, frcn.DATASETS.PROPOSAL_FILES_TEST):
        main_first(lambda name=name, path=path: check_proposal_file(path, name))
    # The same model --eval-only evaluates: strict loading, FOLD_FROZEN_BN and AMP as configured.
    model = build_inference_model(frcn, final_checkpoint(cfgs["fast_rcnn"].OUTPUT_DIR))
    results: Dict[str, Any] = {
        "stored_proposals": _evaluate(frcn, model, os.path.join(folder, "stored_proposals"))
    }
    del model
    if cfg.UNSHARED.EVAL_END_TO_END:
        model = build_inference_model(cfg, final_checkpoint(cfg.OUTPUT_DIR))  # UnsharedRCNN
        results["end_to_end"] = _evaluate(cfg, model, os.path.join(folder, "end_to_end"))
    results["paper_table8"] = report.paper_row(cfg)
    if comm.is_main_process():
        atomic_write_json(os.path.join(folder, "results.json"), results)
        md = report.results_markdown(results)
        atomic_write_text(os.path.join(folder, "results.md"), md)
        logger.info("Appendix B results (also in %s):\n%s", os.path.join(folder, "results.md"), md)
    return results


# ----------------------------------------------------------------------------
# The schedule: the four records, and the views of them
# ----------------------------------------------------------------------------
SCHEDULE: Tuple[Stage, ...] = (
    Stage(1, "rpn", "stage1_rpn", network="rpn", trains=True, unshared_keys=(),
          run=_stage_rpn, outputs=_rpn_outputs, whole=_loads, plan=report.rpn_plan),
    Stage(2, "proposals", "stage2_proposals", network="rpn", trains=False, unshared_keys=("UNSHARED.PROPOSALS.",),
          run=_stage_proposals, outputs=_proposals_outputs, whole=_proposal_file_whole,
          plan=report.proposals_plan),
    Stage(3, "fast_rcnn", "stage3_fast_rcnn", network="fast_rcnn", trains=True, unshared_keys=(),
          run=_stage_fast_rcnn, outputs=_fast_rcnn_outputs, whole=_loads, plan=report.fast_rcnn_plan),
    Stage(4, "eval", "stage4_eval", network="fast_rcnn", trains=False, unshared_keys=("UNSHARED.EVAL_END_TO_END",),
          run=_stage_eval, outputs=_eval_outputs, whole=_parses, plan=report.eval_plan),
)  # fmt: skip
STAGE_BY_NAME: Dict[str, Stage] = {st.name: st for st in SCHEDULE}
STAGES: Tuple[str, ...] = tuple(st.name for st in SCHEDULE)
STAGE_DIRS: Dict[str, str] = {st.name: st.folder for st in SCHEDULE}
