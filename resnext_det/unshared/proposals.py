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
Detectron2 ignores. While it computes them, each process keeps its share in chunk
files beside ``output_file`` (``.shard{rank}of{world}.part{k:05d}``), so that a
killed or preempted run resumes where it stopped (:func:`dump_proposals`).
"""
import logging
import os
import glob
import json
import pickle
import re
from collections import Counter
from typing import Any, Dict, List, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import SequentialSampler
from tqdm import tqdm

import detectron2.utils.comm as comm
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.evaluator import inference_context
from detectron2.structures import Boxes, BoxMode, Instances

from ..checkpoint.readers import safe_pickle_load
from ..engine import preemption
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
# What follows ``output_file.shard{rank}of{world}`` in the name of a chunk file.
_PART_RE = re.compile(r"\.part(\d+)")


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


def _share(n_images: int, rank: int, world: int) -> range:
    """The indices of a dataset of ``n_images`` that process ``rank`` of ``world``
    computes: those Detectron2's ``InferenceSampler`` gives it (contiguous blocks,
    the first ``n_images % world`` processes one image more)."""
    size, left = divmod(n_images, world)
    begin = rank * size + min(rank, left)
    return range(begin, begin + size + int(rank < left))


def _remaining_dicts(
    dataset_dicts: Sequence[dict], done_ids: Iterable, rank: int, world: int
) -> Tuple[List[dict], List[dict]]:
    """This process's share of ``dataset_dicts`` (see :func:`_share`) and, in the
    dataset's order, the dicts of the share whose ``image_id`` (as a string) is not
    in ``done_ids``: ``(share, remaining)``."""
    share = [dataset_dicts[i] for i in _share(len(dataset_dicts), rank, world)]
    done = {str(i) for i in done_ids}
    return share, [d for d in share if str(d["image_id"]) not in done]


def _part_files(shard_file: str) -> List[tuple]:
    """The chunk files ``{shard_file}.part{k:05d}`` that exist, as ``(k, path)`` by k."""
    out = []
    for path in glob.glob(glob.escape(shard_file) + ".part*"):
        m = _PART_RE.fullmatch(path[len(shard_file):])
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def _read_part(path: str, meta: Dict[str, Any], warn: bool = True) -> Optional[tuple]:
    """``(ids, boxes, logits)`` of a chunk file made from ``meta``; None for a file of
    other settings or one that does not load (cut short, overwritten: recomputed)."""
    try:
        data = safe_pickle_load(path)
    except Exception as e:  # any garbage: the images are computed again
        if warn:
            logger.warning(f"{path} does not load ({type(e).__name__}: {e}): its images are computed again")
        return None
    if not isinstance(data, dict) or data.get("meta") != meta:
        return None  # another run's (other top-k, other weights): not reused
    ids, boxes, logits = (data.get(k) for k in ("ids", "boxes", "objectness_logits"))
    if not (
        all(isinstance(x, list) for x in (ids, boxes, logits)) and len(ids) == len(boxes) == len(logits)
    ):
        if warn:
            logger.warning(f"{path} is inconsistent: its images are computed again")
        return None
    return ids, boxes, logits


def _saved_parts(shard_file: str, meta: Dict[str, Any], warn: bool = True) -> List[tuple]:
    """The usable ``(ids, boxes, logits)`` that a process left for ``shard_file``: its
    chunk files, and the whole share an earlier version wrote as ``shard_file``."""
    paths = [shard_file] if os.path.isfile(shard_file) else []
    paths += [p for _, p in _part_files(shard_file)]
    return [part for part in (_read_part(p, meta, warn) for p in paths) if part is not None]


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
    chunk_images: int = 1000,
) -> Dict[str, Any]:
    """Write the proposals of an RPN-only model for every image of a dataset.

    The images are read at the test scale (``INPUT.MIN_SIZE_TEST`` of ``cfg``,
    Detectron2's test ``DatasetMapper``) and split over the processes as
    Detectron2's ``InferenceSampler`` splits them. Each process writes its share
    as it goes, every ``chunk_images`` images, to an atomic chunk file
    ``output_file.shard{rank}of{world}.part{k:05d}`` (ids, boxes, logits and
    ``meta``). Then the main process gathers all chunks in the dataset's order into
    ``output_file``, written atomically, and removes them. ``OUTPUT_DIR`` must be on
    a file system that all processes see, as for Detectron2's checkpoints. Call it
    on every process.

    Resuming: a process killed (``SIGKILL``) loses at most the chunk it was
    computing. A rerun with the same ``meta`` and world size reads the process's
    chunk files and computes only the images of its share that they lack; a chunk
    that does not load (cut short) is ignored and its images computed again, and
    chunks of other settings or of another world size are ignored (and removed at
    the end, with the rest of ``output_file.shard*``).

    Preemption: after each batch, a process that received a stop signal
    (:func:`resnext_det.engine.preemption.stop_requested`) writes the chunk it has
    so far and raises :class:`~resnext_det.engine.preemption.Preempted` (each
    process on its own flag: no communication); so does a process whose share is
    done, before it waits for the others. The rerun continues from there.

    Args:
        model: a :class:`ProposalNetwork` (or any model whose outputs have
            ``"proposals"``), with its weights loaded.
        cfg: the config of the model's input pipeline.
        dataset_name: registered dataset name.
        output_file: path of the proposal file.
        pre_nms_topk, post_nms_topk: boxes kept before and after the RPN's NMS,
            for this dataset (replacing ``MODEL.RPN.*_NMS_TOPK_TEST`` meanwhile).
        meta: what the proposals are made from (e.g. the RPN weights), stored
            under ``"meta"`` with the dataset and top-k; chunks left by an
            interrupted run are reused only if made from the same.
        recall: compute the proposals' COCO average recall (AR@100, AR@1000)
            when the dataset has a COCO json.
        chunk_images: images per chunk file (``UNSHARED.PROPOSALS.CHUNK_IMAGES``):
            at most this many images of work are lost per process by a kill.

    Returns:
        Statistics (images, proposals per image, and for datasets with a COCO
        json the proposals' average recall) on the main process; {} elsewhere.

    Raises:
        Preempted: after a stop signal, this process's computed images saved.
    """
    if chunk_images < 1:
        raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
    rank, world = comm.get_rank(), comm.get_world_size()
    meta = dict(meta or {}, dataset=dataset_name, pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk)
    shard_file = f"{output_file}.shard{rank}of{world}"
    where = f"{shard_file}.part*"

    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    done_ids = [i for ids, _, _ in _saved_parts(shard_file, meta) for i in ids]
    share, remaining = _remaining_dicts(dicts, done_ids, rank, world)
    n_saved = len(share) - len(remaining)
    if n_saved:
        logger.info(
            f"Proposals for {dataset_name} (process {rank + 1}/{world}): resuming, {n_saved} of its "
            f"{len(share)} images found done in {where} (an interrupted run), {len(remaining)} remain"
        )
    if remaining:
        parts = _part_files(shard_file)
        next_part = parts[-1][0] + 1 if parts else 0  # never over a file of another run
        loader = build_detection_test_loader(
            dataset=remaining,
            mapper=DatasetMapper(cfg, False),
            sampler=SequentialSampler(range(len(remaining))),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )
        ids, boxes, logits = [], [], []

        def write_chunk() -> None:
            nonlocal next_part, n_saved
            if ids:
                _atomic_pickle(
                    f"{shard_file}.part{next_part:05d}",
                    {"ids": list(ids), "boxes": list(boxes), "objectness_logits": list(logits), "meta": meta},
                )
                next_part += 1
                n_saved += len(ids)
                ids.clear()
                boxes.clear()
                logits.clear()

        bar = tqdm(
            loader,
            total=len(share),
            initial=n_saved,
            desc=f"proposals {dataset_name} (process {rank + 1}/{world})",
            disable=not comm.is_main_process(),
            mininterval=2.0,
            dynamic_ncols=True,
        )
        rpn = getattr(model, "proposal_generator", None)
        saved = None
        if rpn is not None and hasattr(rpn, "pre_nms_topk"):
            saved = (rpn.pre_nms_topk[False], rpn.post_nms_topk[False])
            rpn.pre_nms_topk[False], rpn.post_nms_topk[False] = pre_nms_topk, post_nms_topk
        try:
            with inference_context(model), torch.no_grad():
                for inputs in bar:
                    for inp, out in zip(inputs, model(inputs)):
                        p = out["proposals"].to("cpu")
                        ids.append(inp["image_id"])
                        boxes.append(p.proposal_boxes.tensor.numpy().astype(np.float32))
                        logits.append(p.objectness_logits.numpy().astype(np.float32))
                    if len(ids) >= chunk_images:
                        write_chunk()
                    signum = preemption.stop_requested()
                    if signum is not None:
                        write_chunk()
                        raise preemption.Preempted(
                            signum, saved=f"{n_saved} of the {len(share)} images of {dataset_name} of "
                            f"process {rank + 1}/{world} in {where}",
                        )
            write_chunk()
        finally:
            bar.close()
            if saved is not None:
                rpn.pre_nms_topk[False], rpn.post_nms_topk[False] = saved
    signum = preemption.stop_requested()
    if signum is not None:  # share saved: stop here rather than wait for the others
        raise preemption.Preempted(
            signum, saved=f"all {n_saved} images of {dataset_name} of process {rank + 1}/{world} in {where}"
        )
    comm.synchronize()

    stats: Dict[str, Any] = {}
    if comm.is_main_process():
        by_id: Dict[str, tuple] = {}
        for r in range(world):
            f = f"{output_file}.shard{r}of{world}"
            if not (os.path.isfile(f) or _part_files(f)) and len(_share(len(dicts), r, world)):
                raise MissingFileError(
                    f"{f}.part* are missing: every process writes its share of the proposals into "
                    "OUTPUT_DIR, which must be on a file system shared by all machines."
                )
            for part in _saved_parts(f, meta, warn=False):
                for i, b, s in zip(*part):
                    by_id[str(i)] = (i, b, s)
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
