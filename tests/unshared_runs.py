"""What the tests of the Appendix B schedule (resnext_det.unshared; Xie et al., CVPR 2017,
Appendix B) share: the paper's numbers typed in by hand, the small shapes datasets and the tiny
config of the runs, hand-made stage outputs, and the end-to-end runs of tools/train_net.py.

This file is also the launcher of those runs (``python tests/unshared_runs.py <train_net args>``):
it registers the small datasets, in the spawned workers too, then calls tools/train_net.py.
"""
import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog

from resnext_det.cli import train_net as train_cli
from resnext_det.engine import setup_cfg
from resnext_det.unshared import STAGE_DIRS


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET = os.path.join(ROOT, "configs", "COCO-Detection")
BASE = os.path.join(DET, "Base-AppendixB-C4.yaml")


# ---------------------------------------------------------------------------------------------
# The paper (Xie et al. 2017, Appendix B and Table 8; /work/shared/PAPER.md), typed in by hand.
# ---------------------------------------------------------------------------------------------
PAPER_RPN = dict(gpus=8, ims_per_gpu=2, anchors=256, lr=0.02, lr_after=0.002, iters=(120000, 60000))
PAPER_FRCN = dict(gpus=8, ims_per_gpu=1, rois=64, lr=0.005, lr_after=0.0005, iters=(120000, 60000))
PAPER_MOMENTUM, PAPER_WD = 0.9, 0.0001
PAPER_TRAIN = ("coco_2014_train", "coco_2014_valminusminival")
PAPER_TEST = ("coco_2014_minival",)
PAPER_TABLE8 = {  # config -> (depth, C, d, AP@0.5, AP)
    "faster_rcnn_R_50_C4_appendixB.yaml": (50, 1, 64, 47.6, 26.5),
    "faster_rcnn_X_50_32x4d_C4_appendixB.yaml": (50, 32, 4, 49.7, 27.5),
    "faster_rcnn_R_101_C4_appendixB.yaml": (101, 1, 64, 51.1, 29.8),
    "faster_rcnn_X_101_32x4d_C4_appendixB.yaml": (101, 32, 4, 51.9, 30.0),
}


# ---------------------------------------------------------------------------------------------
# Small datasets of the end-to-end runs: the first 16 shapes_train images, all one class "shape"
# (train, and the same images as a separate test set: a tiny from-scratch model can learn them).
# ---------------------------------------------------------------------------------------------
TRAIN_DS, TEST_DS, N_IMAGES = "unshared_shapes16_train", "unshared_shapes16_eval", 16


def _one_class_subset():
    out = []
    for d in DatasetCatalog.get("shapes_train")[:N_IMAGES]:
        out.append(dict(d, annotations=[dict(a, category_id=0) for a in d["annotations"]]))
    return out


for _name in (TRAIN_DS, TEST_DS):
    if _name not in DatasetCatalog.list():
        DatasetCatalog.register(_name, _one_class_subset)
        # no json_file: COCOEvaluator converts these dicts (a subset of the json's images)
        MetadataCatalog.get(_name).set(thing_classes=["shape"], evaluator_type="coco")

# A ResNeXt of depth 26 (C=8, d=4, GroupNorm: from scratch), 256 px images, a schedule given
# for 2 processes (1 image each) of 100 iterations per training stage; one process runs it
# scaled by the linear rule (1 image, half the lr, 200 iterations).
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNEXT.PRESET", "",
    "MODEL.RESNEXT.DEPTH", "26",
    "MODEL.RESNEXT.CARDINALITY", "8",
    "MODEL.RESNEXT.BOTTLENECK_WIDTH", "4",
    "MODEL.RESNEXT.STEM_OUT_CHANNELS", "32",
    "MODEL.RESNEXT.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNEXT.NORM", "GN",
    "MODEL.RESNEXT.FREEZE_AT", "0",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64, 128]]",
    "MODEL.RPN.BOUNDARY_THRESH", "-1",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.ROI_HEADS.NUM_CLASSES", "1",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8",
    "INPUT.MIN_SIZE_TRAIN", "(256,)",
    "INPUT.MAX_SIZE_TRAIN", "256",
    "INPUT.MIN_SIZE_TEST", "256",
    "INPUT.MAX_SIZE_TEST", "256",
    "DATASETS.TRAIN", f"('{TRAIN_DS}',)",
    "DATASETS.TEST", f"('{TEST_DS}',)",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.REFERENCE_WORLD_SIZE", "2",
    "SOLVER.WARMUP_ITERS", "10",
    "SOLVER.CHECKPOINT_PERIOD", "20",
    "UNSHARED.RPN.IMS_PER_BATCH", "2",
    "UNSHARED.RPN.BATCH_SIZE_PER_IMAGE", "64",
    "UNSHARED.RPN.STEPS", "(80,)",
    "UNSHARED.RPN.MAX_ITER", "100",
    "UNSHARED.FAST_RCNN.IMS_PER_BATCH", "2",
    "UNSHARED.FAST_RCNN.BASE_LR", "0.02",
    "UNSHARED.FAST_RCNN.BATCH_SIZE_PER_IMAGE", "32",
    "UNSHARED.FAST_RCNN.STEPS", "(80,)",
    "UNSHARED.FAST_RCNN.MAX_ITER", "100",
    "UNSHARED.PROPOSALS.TRAIN_PRE_NMS_TOPK", "300",
    "UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK", "50",
    "SEED", "1",
]  # fmt: skip
RUN_TIMEOUT = 900


def tiny_cfg(out_dir, *extra):
    return setup_cfg(BASE, TINY + ["OUTPUT_DIR", str(out_dir), *extra])


def _cmd(out_dir, *flags):
    return [sys.executable, os.path.abspath(__file__), "--config-file", BASE, *flags,
            *TINY, "OUTPUT_DIR", str(out_dir)]  # fmt: skip


def _env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    return env


def _last_checkpoint(folder):
    path = os.path.join(folder, "last_checkpoint")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _run(cmd, log_path, *, threads=1, kill_at_checkpoint_in=None):
    """Run ``cmd``; with ``kill_at_checkpoint_in``, SIGKILL its whole process group as soon as
    that folder has a periodic (not final) checkpoint. Returns the log text."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=_env(threads), start_new_session=True)  # fmt: skip
        try:
            t0 = time.time()
            while proc.poll() is None and time.time() - t0 < RUN_TIMEOUT:
                ckpt = kill_at_checkpoint_in and _last_checkpoint(kill_at_checkpoint_in)
                if ckpt and ckpt != "model_final.pth":
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(log_path) as f:
        text = f.read()
    if kill_at_checkpoint_in is None:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{text[-6000:]}"
    else:
        assert proc.returncode == -signal.SIGKILL, (
            f"the run ended (rc {proc.returncode}) before a checkpoint appeared in "
            f"{kill_at_checkpoint_in}:\n{text[-4000:]}"
        )
    return text


def _sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def _marker(out, stage):
    path = os.path.join(out, STAGE_DIRS[stage], "stage_done.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _results(out):
    with open(os.path.join(out, STAGE_DIRS["eval"], "results.json")) as f:
        return json.load(f)


def _bbox(results, kind):
    return results[kind][TEST_DS]["bbox"]


def _start_iters(log):
    return [int(m) for m in re.findall(r"Starting training from iteration (\d+)", log)]


def _write(path, ids, n_boxes=3):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (len(ids), n_boxes, 2)).astype(np.float32)
    data = {
        "ids": list(ids),
        "boxes": [np.concatenate([p, p + 10], 1) for p in xy],
        "objectness_logits": [rng.normal(size=n_boxes).astype(np.float32) for _ in ids],
        "bbox_mode": 0,
    }
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def _stage1_done(cfg, model=None):
    """Make stage 1 look finished in ``cfg.OUTPUT_DIR``: its marker and an RPN checkpoint
    (``model``'s weights, or an empty file where stage 2's model loading is replaced)."""
    folder = os.path.join(cfg.OUTPUT_DIR, STAGE_DIRS["rpn"])
    os.makedirs(folder, exist_ok=True)
    if model is None:
        open(os.path.join(folder, "model_final.pth"), "wb").close()
    else:
        DetectionCheckpointer(model, folder).save("model_final")
    with open(os.path.join(folder, "stage_done.json"), "w") as f:
        json.dump({"stage": "rpn", "finished": "2017-07-21T00:00:00", "results": {}}, f)


def _tiny_state(*names, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, 3, generator=g) for n in names}



# Two images (train, and the same as a separate test set), 128 px, a few iterations: the whole
# schedule in-process in a few seconds. Untrained models: the data flow is checked, not the AP.
SMALL_TRAIN, SMALL_TEST = "unshared_shapes2_train", "unshared_shapes2_eval"
for _name in (SMALL_TRAIN, SMALL_TEST):
    if _name not in DatasetCatalog.list():
        DatasetCatalog.register(_name, lambda: _one_class_subset()[:2])
        MetadataCatalog.get(_name).set(thing_classes=["shape"], evaluator_type="coco")
SMALL = [
    "DATASETS.TRAIN", f"('{SMALL_TRAIN}',)",
    "DATASETS.TEST", f"('{SMALL_TEST}',)",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.WARMUP_ITERS", "0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # detections from an untrained model
    # given for 2 processes: one process runs 1 image per batch, half the lr, twice the iterations
    "UNSHARED.RPN.IMS_PER_BATCH", "2", "UNSHARED.RPN.BASE_LR", "0.02",
    "UNSHARED.RPN.STEPS", "()", "UNSHARED.RPN.MAX_ITER", "1",
    "UNSHARED.FAST_RCNN.IMS_PER_BATCH", "2", "UNSHARED.FAST_RCNN.BASE_LR", "0.005",
    "UNSHARED.FAST_RCNN.STEPS", "(1,)", "UNSHARED.FAST_RCNN.MAX_ITER", "2",
]  # fmt: skip


if __name__ == "__main__":  # the launcher of the end-to-end runs (what tools/train_net.py runs)
    train_cli.cli(sys.argv[1:])
