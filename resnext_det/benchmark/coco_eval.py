# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The ``eval`` section: COCO evaluation with pycocotools' pure-Python ``COCOeval`` against
the compiled one this environment has (:func:`resnext_det.evaluation.coco_eval_backend`),
on a synthetic COCO-sized set, and the project's whole evaluation path.

* :func:`synthetic_coco` makes a COCO-format ground truth and the detections of a
  detector on it (numpy, fixed seed): COCO-like non-contiguous category ids with skewed
  frequencies, crowd regions (uncompressed RLE, as COCO's), images without objects,
  images without detections, small / medium / large objects, images with more
  detections than ``maxDets`` (100), near-duplicate and background detections; masks
  (polygons; detections as compressed RLE, as Detectron2 writes them) and keypoints on
  request. The tests prove on it that the compiled evaluators give pycocotools' numbers.
* :func:`section_eval` times ``loadRes``, ``evaluate()``, ``accumulate()``, ``summarize()``
  (as Detectron2 runs them) with each for bbox and segm: pycocotools, the compiled one, and
  the compiled one with Python's garbage collector paused, as
  :class:`~resnext_det.evaluation.FastCOCOEvaluator` runs it. Then the project's path:
  :class:`~resnext_det.data.robust.SkipAwareCOCOEvaluator` (what ``Trainer`` builds) fed
  as Detectron2's inference loop feeds it (``reset``, ``process`` with ``Instances``,
  ``evaluate``: conversion to COCO json, the json and ``.pth`` writes, the per-category
  table), against Detectron2's ``COCOEvaluator`` (the path before) and pycocotools alone.
"""
import contextlib
import functools
import io
import math
import os
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from ..data.robust import SkipAwareCOCOEvaluator
from ..evaluation import coco_eval_backend, gc_paused
from ..utils.io import atomic_write_json
from ..utils.measure import measure_interleaved
from .settings import BenchmarkSettings

__all__ = [
    "synthetic_coco",
    "coco_api",
    "evaluate_on_coco",
    "register_synthetic_dataset",
    "instances_for",
    "section_eval",
    "COCO_KEYPOINT_SIGMAS",
]

#: COCO's 17 person keypoints' OKS sigmas (pycocotools' defaults).
COCO_KEYPOINT_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)

Log = Callable[[str], None]


def _ellipse(x: float, y: float, w: float, h: float, rng: np.random.Generator, n: int = 12) -> List[float]:
    """A polygon (x0, y0, x1, y1, ...) close to the ellipse inscribed in the box."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.8, 1.0, n)
    px = x + w / 2 + r * (w / 2) * np.cos(t)
    py = y + h / 2 + r * (h / 2) * np.sin(t)
    return np.stack([px, py], 1).ravel().round(2).tolist()


def _polygon_area(poly: List[float]) -> float:
    p = np.asarray(poly).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _rectangle_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> dict:
    """Uncompressed RLE (column-major run lengths, as COCO's crowd regions) of a rectangle."""
    counts = [x0 * h + y0]
    for _ in range(x0, x1 - 1):
        counts += [y1 - y0, h - (y1 - y0)]
    counts += [y1 - y0, h * w - counts[0] - (x1 - x0 - 1) * h - (y1 - y0)]
    return {"counts": counts, "size": [h, w]}


def _boxes(rng: np.random.Generator, n: int, w: int, h: int, min_side: float = 4.0) -> np.ndarray:
    """``n`` boxes (x, y, w, h) in a w x h image, areas log-uniform from tiny to half the
    image: small (< 32^2), medium and large (> 96^2) objects all occur."""
    area = np.exp(rng.uniform(np.log(min_side**2), np.log(0.5 * w * h), n))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    bw = np.clip(np.sqrt(area * aspect), min_side, w - 1)
    bh = np.clip(area / bw, min_side, h - 1)
    x = rng.uniform(0, w - bw)
    y = rng.uniform(0, h - bh)
    return np.stack([x, y, bw, bh], 1).round(2)


def synthetic_coco(
    images: int,
    *,
    seed: int = 0,
    categories: int = 80,
    gt_per_image: float = 7.6,
    dets_per_image: float = 65.0,
    crowd_fraction: float = 0.01,
    empty_fraction: float = 0.03,
    no_detection_fraction: float = 0.03,
    over_max_dets_fraction: float = 0.03,
    image_size: Tuple[int, int] = (320, 640),
    masks: bool = False,
    keypoints: bool = False,
) -> Tuple[dict, List[dict]]:
    """A COCO-format ground truth and a detector's results on it, numpy only, fixed seed.

    The defaults give COCO val2017's scale: 5,000 images make ~38k ground-truth objects
    and ~330k detections over 80 categories (as the issue measured).

    Args:
        images: number of images.
        seed: numpy seed: the same arguments give the same set.
        categories: number of categories; their ids have gaps, as COCO's (1..89 for 80).
        gt_per_image: mean objects per image (Poisson), crowd regions included.
        dets_per_image: mean detections per image with detections (matches and background).
        crowd_fraction: share of objects that are crowd regions (``iscrowd`` 1,
            uncompressed RLE masks; COCO evaluation ignores what matches them).
        empty_fraction: share of images without any object (0, or at least one image).
        no_detection_fraction: share of images without any detection (likewise).
        over_max_dets_fraction: share of images with 150-250 detections (likewise), most
            of one class (COCO's ``maxDets`` of 100 is per image and class) and background
            scored as high as matches, so that the cut-off matters.
        image_size: smallest and largest image side in px.
        masks: also ``segmentation``: ground truth as polygons (crowd: RLE), detections
            as compressed RLE with the counts as ``str`` (as Detectron2 writes them).
        keypoints: a person-keypoint set instead (one category, 17 keypoints with COCO's
            sigmas, ``num_keypoints`` 0 for some objects, which COCO then ignores).

    Returns:
        ``(ground_truth, detections)``: the ground-truth dict (``images``,
        ``annotations``, ``categories``) and the detections (``image_id``,
        ``category_id``, ``bbox`` XYWH, ``score``, and ``segmentation`` / ``keypoints``),
        as :func:`detectron2.evaluation.coco_evaluation.instances_to_coco_json` gives them.
    """
    rng = np.random.default_rng(seed)
    if keypoints:
        categories = 1
    cat_ids = [i + 1 + i // 8 for i in range(categories)]  # 1..8, 10..17, ...: gaps as COCO's
    cats = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in cat_ids]
    if keypoints:
        cats[0].update(name="person", keypoints=[f"kp{k}" for k in range(17)], skeleton=[])
    freq = 1.0 / np.arange(1, categories + 1) ** 0.8
    freq /= freq.sum()
    out_images, anns, dets = [], [], []
    ann_id = 1
    lo, hi = image_size

    def some(fraction: float) -> set:  # round(images * fraction) images, at least one
        n = min(images, max(1, round(images * fraction))) if fraction > 0 else 0
        return set(rng.choice(images, n, replace=False).tolist())

    empty, no_detections = some(empty_fraction), some(no_detection_fraction)
    crowded_images = some(over_max_dets_fraction)
    for i in range(images):
        img_id = 100 + 3 * i  # not 0..N-1: ids are names, not indices
        w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        out_images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id:012d}.jpg"})
        n_gt = 0 if i in empty else int(rng.poisson(gt_per_image))
        boxes = _boxes(rng, n_gt, w, h)
        classes = rng.choice(cat_ids, n_gt, p=freq)
        crowded = i in crowded_images
        if crowded:  # a crowd of one class, detected more than maxDets times (per image and class)
            classes[:] = rng.choice(cat_ids, p=freq)
        crowd = rng.random(n_gt) < crowd_fraction
        gt_kps = []
        for (x, y, bw, bh), c, is_crowd in zip(boxes, classes, crowd):
            ann = {"id": ann_id, "image_id": img_id, "category_id": int(c), "iscrowd": int(is_crowd)}
            ann_id += 1
            if is_crowd:
                x0, y0 = int(x), int(y)
                x1, y1 = min(w, int(math.ceil(x + bw))), min(h, int(math.ceil(y + bh)))
                ann["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
                ann["segmentation"] = _rectangle_rle(x0, y0, x1, y1, h, w)
                ann["area"] = float((x1 - x0) * (y1 - y0))
            else:
                ann["bbox"] = [float(x), float(y), float(bw), float(bh)]
                poly = _ellipse(x, y, bw, bh, rng)
                ann["segmentation"] = [poly]
                ann["area"] = _polygon_area(poly)
            if keypoints:
                kx = rng.uniform(x, x + bw, 17)
                ky = rng.uniform(y, y + bh, 17)
                v = rng.choice([0, 1, 2], 17, p=[0.3, 0.2, 0.5]) * (rng.random() > 0.1)  # some: none labelled
                ann["keypoints"] = np.stack([kx * (v > 0), ky * (v > 0), v], 1).round(2).ravel().tolist()
                ann["num_keypoints"] = int((v > 0).sum())
                ann["area"] = float(bw * bh)
                gt_kps.append((kx, ky))
            anns.append(ann)
        if i in no_detections:
            continue
        n_det = int(rng.poisson(dets_per_image))
        if crowded:  # and background as confident as matches: some matches rank past 100
            n_det = int(rng.integers(150, 251))
        det_boxes, det_classes, det_scores, det_kps = [], [], [], []
        for j, ((x, y, bw, bh), c) in enumerate(zip(boxes, classes)):
            for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))):  # missed, found, found twice
                jit = rng.normal(0, 0.12, 4) * [bw, bh, bw, bh]
                bx = np.clip([x + jit[0], y + jit[1]], 0, [w - 2, h - 2])
                bs = np.clip([bw + jit[2], bh + jit[3]], 1, [w - bx[0], h - bx[1]])
                det_boxes.append([*bx, *bs])
                det_classes.append(int(c) if rng.random() < 0.9 else int(rng.choice(cat_ids)))
                det_scores.append(float(rng.beta(5, 2)))
                if keypoints:
                    kx, ky = gt_kps[j]
                    det_kps.append((kx + rng.normal(0, 0.05 * bw, 17), ky + rng.normal(0, 0.05 * bh, 17)))
        n_bg = max(0, n_det - len(det_boxes))
        bg_classes = rng.choice(cat_ids, n_bg, p=freq)
        if crowded and n_gt:
            bg_classes[rng.random(n_bg) < 0.9] = classes[0]
        for (x, y, bw, bh), c in zip(_boxes(rng, n_bg, w, h, min_side=2.0), bg_classes):
            det_boxes.append([x, y, bw, bh])
            det_classes.append(int(c))
            det_scores.append(float(rng.beta(5, 2) if crowded else rng.beta(2, 5)))
            if keypoints:
                det_kps.append((rng.uniform(x, x + bw, 17), rng.uniform(y, y + bh, 17)))
        for k, (box, c, s) in enumerate(zip(det_boxes, det_classes, det_scores)):
            d = {"image_id": img_id, "category_id": c, "bbox": [round(float(v), 2) for v in box], "score": round(s, 5)}
            if masks:
                rle = mask_util.merge(mask_util.frPyObjects([_ellipse(*box, rng)], h, w))
                rle["counts"] = rle["counts"].decode("utf-8")
                d["segmentation"] = rle
            if keypoints:
                kx, ky = det_kps[k]
                d["keypoints"] = np.stack([kx, ky, rng.uniform(0, 1, 17)], 1).round(2).ravel().tolist()
            dets.append(d)
    gt = {"images": out_images, "annotations": anns, "categories": cats}
    return gt, dets


def coco_api(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` over ``dataset`` (quiet; the dataset is copied, since
    evaluation writes into its annotations)."""
    coco = COCO()
    coco.dataset = {k: [dict(a) for a in v] if isinstance(v, list) else v for k, v in dataset.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_on_coco(cocoeval_cls: Callable, gt: COCO, dets: List[dict], iou_type: str, **params):
    """``loadRes``, ``evaluate()``, ``accumulate()``, ``summarize()`` with ``cocoeval_cls``,
    as Detectron2's ``_evaluate_predictions_on_coco`` runs them (segm: without the boxes,
    so that the mask area decides small / medium / large); prints swallowed. Returns the
    COCOeval object (``stats``, ``eval["precision"]``)."""
    dets = [dict(d) for d in dets]
    if iou_type == "segm":
        for d in dets:
            d.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = cocoeval_cls(gt, gt.loadRes(dets), iou_type)
        for k, v in params.items():
            setattr(ev.params, k, v)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def register_synthetic_dataset(name: str, gt: dict, folder: str) -> None:
    """Register ``gt`` (written to ``folder/name.json``) as Detectron2 registers a COCO
    json: ``json_file``, ``thing_classes`` and the dataset-id -> contiguous-id map that
    the evaluator reverses."""
    path = os.path.join(folder, f"{name}.json")
    atomic_write_json(path, gt)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        json_file=path,
        image_root=folder,
        evaluator_type="coco",
        thing_classes=[names[c] for c in cat_ids],
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(cat_ids)},
    )


def instances_for(gt: dict, dets: List[dict]) -> List[Tuple[dict, dict]]:
    """The detections as Detectron2's inference loop hands them to an evaluator: per
    image, the input dict and the model output ``{"instances": Instances}`` (boxes XYXY,
    contiguous classes, and ``pred_masks`` / ``pred_keypoints`` where the detections have
    them). Every image, also those without detections. Detectron2's conversion
    (``instances_to_coco_json``) shifts ``pred_keypoints`` in place: feed those once."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    contiguous = {c: i for i, c in enumerate(cat_ids)}
    by_image: Dict[int, List[dict]] = {img["id"]: [] for img in gt["images"]}
    for d in dets:
        by_image[d["image_id"]].append(d)
    out = []
    for img in gt["images"]:
        ds = by_image[img["id"]]
        h, w = img["height"], img["width"]
        inst = Instances((h, w))
        xywh = torch.tensor([d["bbox"] for d in ds], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        inst.scores = torch.tensor([d["score"] for d in ds], dtype=torch.float32)
        inst.pred_classes = torch.tensor([contiguous[d["category_id"]] for d in ds], dtype=torch.int64)
        if ds and "segmentation" in ds[0]:
            inst.pred_masks = torch.from_numpy(mask_util.decode([d["segmentation"] for d in ds])).permute(2, 0, 1) > 0
        if ds and "keypoints" in ds[0]:
            kp = torch.tensor([d["keypoints"] for d in ds], dtype=torch.float32).reshape(len(ds), -1, 3)
            kp[:, :, :2] += 0.5  # instances_to_coco_json subtracts Detectron2's half-pixel shift
            inst.pred_keypoints = kp
        out.append(({"image_id": img["id"], "height": h, "width": w}, {"instances": inst}))
    return out


def _run_evaluator(evaluator, fed: List[Tuple[dict, dict]]) -> dict:
    evaluator.reset()
    for inp, output in fed:
        evaluator.process([inp], [output])
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()


def section_eval(s: BenchmarkSettings, configs: Dict[str, str], log: Log) -> Iterator[List[dict]]:
    """COCO evaluation: pycocotools against the compiled evaluator, bbox and segm, then the
    project's whole path; ratios are pycocotools' time over the contender's, and every row
    says how far its 12 statistics are from pycocotools' (``max_stat_diff``)."""
    backend = coco_eval_backend()
    for task, n in (("bbox", s.eval_images), ("segm", s.eval_segm_images)):
        if n == 0:
            continue
        log(f"[eval {task}] making a synthetic COCO set of {n} images ...")
        gt, dets = synthetic_coco(n, seed=0, masks=task == "segm")
        coco = coco_api(gt)
        contenders = {PYCOCOTOOLS_ROW: (COCOeval, contextlib.nullcontext)}
        if backend.compiled:
            contenders[backend.name] = (backend.cls, contextlib.nullcontext)
            contenders[f"{backend.name}, GC paused"] = (backend.cls, gc_paused)  # as FastCOCOEvaluator
        results: Dict[str, np.ndarray] = {}

        def run(name, cls, context, task=task, coco=coco, dets=dets):
            with context():
                results[name] = np.asarray(evaluate_on_coco(cls, coco, dets, task).stats)

        fns = {name: functools.partial(run, name, *c) for name, c in contenders.items()}
        label = f"{task}: {n} images, {len(gt['annotations'])} GT, {len(dets)} detections"
        log(f"[eval {task}] {label}: {', '.join(fns)}")
        rows = _measure_eval(s, fns, images=n, label=f"eval {task}", log=log, baseline=PYCOCOTOOLS_ROW)
        for r in rows:
            stats = results[r["contender"]]
            r.update(mode=label, task=task, stats=stats.tolist())
            r["max_stat_diff"] = float(np.abs(stats - results[PYCOCOTOOLS_ROW]).max())
        yield rows
    if s.eval_path_images:
        yield _path_rows(s, log)


#: The baseline row of the eval section.
PYCOCOTOOLS_ROW = "pycocotools COCOeval"
#: The project's path before (Detectron2's COCOEvaluator, without its _C: pycocotools).
BEFORE_ROW = "before: Detectron2 COCOEvaluator"


def _measure_eval(s: BenchmarkSettings, fns, *, images: int, label: str, log: Log, baseline: str) -> List[dict]:
    return measure_interleaved(
        fns, device="cpu", images=images, repeats=s.eval_repeats, warmup=0, baseline=baseline,
        memory=False, label=label, log=log, untimed_run=False,
    )  # fmt: skip


def _path_rows(s: BenchmarkSettings, log: Log) -> List[dict]:
    """pycocotools alone (``loadRes`` to ``summarize``), the project's path as it was
    (``SkipAwareCOCOEvaluator`` was Detectron2's ``COCOEvaluator``, computing with
    pycocotools here) and as it is, on the same bbox detections."""
    n = s.eval_path_images
    gt, dets = synthetic_coco(n, seed=1)
    fed = instances_for(gt, dets)
    coco = coco_api(gt)
    results: Dict[str, List[float]] = {}
    name = "_resnext_det_benchmark_eval"
    with tempfile.TemporaryDirectory(prefix="resnext-det-bench-eval-") as d:
        register_synthetic_dataset(name, gt, d)
        try:
            evaluators = {
                BEFORE_ROW: COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=os.path.join(d, "d2")),
                "project path": SkipAwareCOCOEvaluator(
                    name, tasks=("bbox",), distributed=False, output_dir=os.path.join(d, "now")
                ),
            }

            def alone():
                results[PYCOCOTOOLS_ROW] = list(evaluate_on_coco(COCOeval, coco, dets, "bbox").stats[:6])

            def path(label):
                res = _run_evaluator(evaluators[label], fed)["bbox"]
                results[label] = [res[k] / 100 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]  # percent

            fns = {PYCOCOTOOLS_ROW: alone, **{k: functools.partial(path, k) for k in evaluators}}
            log(f"[eval path] {n} images, {len(gt['annotations'])} GT, {len(dets)} detections: {', '.join(fns)}")
            rows = _measure_eval(s, fns, images=n, label="eval path", log=log, baseline=PYCOCOTOOLS_ROW)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    label = f"project path (bbox; conversion, json and .pth writes included): {n} images, {len(dets)} detections"
    base = np.asarray(results[PYCOCOTOOLS_ROW])
    for r in rows:
        r.update(mode=label, task="path", stats=results[r["contender"]])
        r["max_stat_diff"] = float(np.nanmax(np.abs(np.asarray(results[r["contender"]]) - base)))
    return rows

