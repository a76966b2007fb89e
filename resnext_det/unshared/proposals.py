# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Stage 2 of the Appendix B schedule: write RPN proposals, in Detectron2's
proposal-file format, for whole datasets; and check such files.

The format is the one :func:`detectron2.data.build.load_proposals_into_dataset`
reads (``DATASETS.PROPOSAL_FILES_TRAIN/TEST``), and the one Detectron2's
``COCOEvaluator`` writes as ``box_proposals.pkl``: a pickled dict with

- ``"ids"``: the image ids, in the dataset's order;
- ``"boxes"``: one float32 ``(N_i, 4)`` array per image, in the original image's
  pixels (the boxes were computed on the resized test image and scaled back);
- ``"objectness_logits"``: one float32 ``(N_i,)`` array per image, best first;
- ``"bbox_mode"``: ``BoxMode.XYXY_ABS`` (0).

Files written here also hold ``"meta"`` (dataset, top-k, RPN weights), which
Detectron2 ignores.
"""
import logging
import os
import glob
import json
import pickle
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.evaluator import inference_context
from detectron2.structures import Boxes, BoxMode, Instances

from ..checkpoint.readers import safe_pickle_load
from ..utils.io import atomic_write_bytes, atomic_write_json
from ..errors import MissingFileError, UserError

__all__ = [
    "ProposalFileMismatch",
    "check_proposal_file",
    "dump_proposals",
    "load_proposal_file",
    "proposal_file_meta",
]

logger = logging.getLogger(__name__)

# Names used by Detectron (v1) proposal files, which Detectron2 also reads.
_D1_KEYS = {"indexes": "ids", "scores": "objectness_logits"}


class ProposalFileMismatch(UserError):
    """A proposal file does not hold exactly one entry per image of its dataset."""


def _atomic_pickle(path: str, obj: Any) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def load_proposal_file(proposal_file: str) -> Dict[str, Any]:
    """Read a proposal file (Detectron2 or Detectron v1 key names) as a dict with
    ``ids``, ``boxes``, ``objectness_logits`` and ``bbox_mode``."""
    if not os.path.isfile(proposal_file):
        raise MissingFileError(
            f"Proposal file {proposal_file!r} does not exist. The schedule writes it in "
            "stage 2: run tools/train_net.py with the same config (or `--stage proposals`)."
        )
    # numpy arrays and plain containers only: a proposal file runs no code
    data = safe_pickle_load(proposal_file, what=f"proposal file {proposal_file!r}")
    if not isinstance(data, dict):
        raise ProposalFileMismatch(
            f"Proposal file {proposal_file!r} holds a {type(data).__name__}, not the dict "
            "with 'ids', 'boxes', 'objectness_logits' that Detectron2 reads."
        )
    for old, new in _D1_KEYS.items():
        if old in data and new not in data:
            data[new] = data.pop(old)
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in data]
    if missing:
        raise ProposalFileMismatch(
            f"Proposal file {proposal_file!r} lacks the key(s) {missing}; Detectron2's "
            "format has 'ids', 'boxes', 'objectness_logits' (and 'bbox_mode')."
        )
    data.setdefault("bbox_mode", BoxMode.XYXY_ABS.value)
    return data


def _examples(items: Sequence, n: int = 3) -> str:
    items = sorted(items, key=str)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def check_proposal_file(
    proposal_file: str, dataset_name: str, dataset_dicts: Optional[List[dict]] = None
) -> Dict[str, Any]:
    """Load ``proposal_file`` and check that it matches ``dataset_name``: one entry
    per image, the same image ids, and boxes/logits of consistent shapes.

    Detectron2's ``load_proposals_into_dataset`` ignores entries of images that are
    not in the dataset and stops with a bare ``KeyError`` on an image that has no
    entry; proposals computed for another dataset, or for another version of it,
    would go unnoticed when the ids happen to overlap. This check refuses them.

    Args:
        proposal_file: path of the pickle.
        dataset_name: a name registered in Detectron2's ``DatasetCatalog``.
        dataset_dicts: the dataset's dicts, if already loaded.

    Returns:
        The file's content (see :func:`load_proposal_file`).

    Raises:
        ProposalFileMismatch: with what differs and how to regenerate the file.
    """
    data = load_proposal_file(proposal_file)
    if dataset_dicts is None:
        dataset_dicts = DatasetCatalog.get(dataset_name)
    fix = (
        "Delete it and rerun the schedule (or `--stage proposals`) to write proposals for "
        "this dataset, or point DATASETS.PROPOSAL_FILES_TRAIN/TEST at the right file."
    )
    ids = [str(i) for i in data["ids"]]
    n = len(ids)
    if not (len(data["boxes"]) == n == len(data["objectness_logits"])):
        raise ProposalFileMismatch(
            f"Proposal file {proposal_file!r} is inconsistent: {n} ids, "
            f"{len(data['boxes'])} box arrays, {len(data['objectness_logits'])} logit "
            f"arrays. {fix}"
        )
    dataset_ids = [str(d["image_id"]) for d in dataset_dicts]
    if len(set(ids)) != n:
        dup = {i for i, c in Counter(ids).items() if c > 1}
        raise ProposalFileMismatch(
            f"Proposal file {proposal_file!r} lists some image ids more than once "
            f"({_examples(dup)}). {fix}"
        )
    file_set, data_set = set(ids), set(dataset_ids)
    if file_set != data_set or n != len(dataset_ids):
        missing, extra = data_set - file_set, file_set - data_set
        parts = [
            f"Proposal file {proposal_file!r} does not match dataset {dataset_name!r}: "
            f"it has {n} images, the dataset {len(dataset_ids)}."
        ]
        if missing:
            parts.append(f"{len(missing)} dataset images have no proposals: {_examples(missing)}.")
        if extra:
            parts.append(f"{len(extra)} ids are not in the dataset: {_examples(extra)}.")
        parts.append(fix)
        raise ProposalFileMismatch(" ".join(parts))
    for i, boxes, logits in zip(ids, data["boxes"], data["objectness_logits"]):
        boxes, logits = np.asarray(boxes), np.asarray(logits)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or logits.shape != (boxes.shape[0],):
            raise ProposalFileMismatch(
                f"Proposal file {proposal_file!r}, image {i!r}: boxes of shape "
                f"{boxes.shape} and logits of shape {logits.shape}; expected (N, 4) and "
                f"(N,). {fix}"
            )
    return data


def _read_pickle_meta(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    try:
        data = safe_pickle_load(path)
    except (UserError, pickle.UnpicklingError, EOFError, OSError):
        return None  # a share cut short by a kill: recomputed
    return data.get("meta") if isinstance(data, dict) else None


def proposal_file_meta(proposal_file: str) -> Optional[Dict[str, Any]]:
    """What :func:`dump_proposals` wrote ``proposal_file`` from (dataset, top-k, RPN
    weights), read from its small ``.json`` companion; None if there is none."""
    path = proposal_file + ".json"
    if not (os.path.isfile(path) and os.path.isfile(proposal_file)):
        return None
    with open(path) as f:
        return json.load(f)


def _proposal_recall(dataset_name: str, data: Dict[str, Any]) -> Dict[str, float]:
    """COCO-style average recall of stored proposals (Detectron2's
    ``COCOEvaluator`` box-proposal metrics), for datasets with a COCO json."""
    if not MetadataCatalog.get(dataset_name).get("json_file"):
        return {}
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False, output_dir=None)
    evaluator.reset()
    for image_id, boxes, logits in zip(data["ids"], data["boxes"], data["objectness_logits"]):
        inst = Instances((1, 1))
        inst.proposal_boxes = Boxes(torch.as_tensor(boxes))
        inst.objectness_logits = torch.as_tensor(logits)
        evaluator.process([{"image_id": image_id}], [{"proposals": inst}])
    return dict(evaluator.evaluate().get("box_proposals", {}))


def dump_proposals(
    model: torch.nn.Module,
    cfg,
    dataset_name: str,
    output_file: str,
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    meta: Optional[Dict[str, Any]] = None,
    recall: bool = True,
) -> Dict[str, Any]:
    """Write the proposals of an RPN-only model for every image of a dataset.

    The images are read at the test scale (``INPUT.MIN_SIZE_TEST`` of ``cfg``),
    split over the processes (Detectron2's ``InferenceSampler``); each process
    writes its share to ``output_file.shard{rank}of{world}`` (kept if the run
    is killed, so that a rerun only computes what is missing), the main
    process gathers the shares in the dataset's order into ``output_file``,
    written atomically. ``OUTPUT_DIR`` must be on a file system that all
    processes see, as for Detectron2's checkpoints. Call it on every process.

    Args:
        model: a :class:`ProposalNetwork` (or any model whose outputs have
            ``"proposals"``), with its weights loaded.
        cfg: the config of the model's input pipeline.
        dataset_name: registered dataset name.
        output_file: path of the proposal file.
        pre_nms_topk, post_nms_topk: boxes kept before and after the RPN's NMS,
            for this dataset (replacing ``MODEL.RPN.*_NMS_TOPK_TEST`` meanwhile).
        meta: what the proposals are made from (e.g. the RPN weights), stored
            under ``"meta"`` with the dataset and top-k; a share left by an
            interrupted run is reused only if made from the same.
        recall: compute the proposals' COCO average recall (AR@100, AR@1000)
            when the dataset has a COCO json.

    Returns:
        Statistics (images, proposals per image, and for datasets with a COCO
        json the proposals' average recall) on the main process; {} elsewhere.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    meta = dict(meta or {}, dataset=dataset_name, pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk)
    shard_file = f"{output_file}.shard{rank}of{world}"
    if _read_pickle_meta(shard_file) == meta:
        logger.info(f"Proposals for {dataset_name}: reusing {shard_file} of an interrupted run")
    else:
        loader = build_detection_test_loader(cfg, dataset_name)
        rpn = getattr(model, "proposal_generator", None)
        saved = None
        if rpn is not None and hasattr(rpn, "pre_nms_topk"):
            saved = (rpn.pre_nms_topk[False], rpn.post_nms_topk[False])
            rpn.pre_nms_topk[False], rpn.post_nms_topk[False] = pre_nms_topk, post_nms_topk
        ids, boxes, logits = [], [], []
        try:
            with inference_context(model), torch.no_grad():
                bar = tqdm(
                    loader,
                    total=len(loader),
                    desc=f"proposals {dataset_name} (process {rank + 1}/{world})",
                    disable=not comm.is_main_process(),
                    mininterval=2.0,
                    dynamic_ncols=True,
                )
                for inputs in bar:
                    for inp, out in zip(inputs, model(inputs)):
                        p = out["proposals"].to("cpu")
                        ids.append(inp["image_id"])
                        boxes.append(p.proposal_boxes.tensor.numpy().astype(np.float32))
                        logits.append(p.objectness_logits.numpy().astype(np.float32))
        finally:
            if saved is not None:
                rpn.pre_nms_topk[False], rpn.post_nms_topk[False] = saved
        _atomic_pickle(
            shard_file, {"ids": ids, "boxes": boxes, "objectness_logits": logits, "meta": meta}
        )
    comm.synchronize()

    stats: Dict[str, Any] = {}
    if comm.is_main_process():
        by_id: Dict[str, tuple] = {}
        shard_files = [f"{output_file}.shard{r}of{world}" for r in range(world)]
        for f in shard_files:
            if not os.path.isfile(f):
                raise MissingFileError(
                    f"{f} is missing: every process writes its share of the proposals into "
                    "OUTPUT_DIR, which must be on a file system shared by all machines."
                )
            shard = safe_pickle_load(f)
            for i, b, s in zip(shard["ids"], shard["boxes"], shard["objectness_logits"]):
                by_id[str(i)] = (i, b, s)
        dicts = DatasetCatalog.get(dataset_name)
        order = [str(d["image_id"]) for d in dicts]
        lost = [i for i in order if i not in by_id]
        if lost:
            raise RuntimeError(
                f"No proposals were computed for {len(lost)} images of {dataset_name} "
                f"({_examples(lost)}); delete {output_file}.shard* and rerun."
            )
        data = {
            "ids": [by_id[i][0] for i in order],
            "boxes": [by_id[i][1] for i in order],
            "objectness_logits": [by_id[i][2] for i in order],
            "bbox_mode": BoxMode.XYXY_ABS.value,
            "meta": meta,
        }
        _atomic_pickle(output_file, data)
        # what the file was made from, readable without loading the file (it can be GBs)
        atomic_write_json(output_file + ".json", meta)
        for f in glob.glob(glob.escape(output_file) + ".shard*"):
            os.remove(f)  # this run's shares, and stale ones of runs on other world sizes
        counts = [len(b) for b in data["boxes"]]
        stats = {
            "file": output_file,
            "images": len(counts),
            "proposals_per_image": float(np.mean(counts)) if counts else 0.0,
        }
        if recall:
            stats.update(_proposal_recall(dataset_name, data))
        logger.info(f"Proposals for {dataset_name}: {stats}")
    comm.synchronize()
    return stats
