"""Helpers of the tests of issue #12 (tests/test_checkpoint_readers.py, test_checkpoint_loading.py,
test_atomic_io.py, test_engine.py, test_data_robust.py, test_visualize.py, test_prepare_coco.py):
the shapes quickstart detector at 96 px and the bad images a user has. Not a test file."""
import os

import numpy as np
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes.yaml")
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RESNEXT.STEM_OUT_CHANNELS", "32",
    "MODEL.RESNEXT.RES2_OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01",
    "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "MODEL.DEVICE", "cpu",
]  # fmt: skip


def _tiny_model(tmp_path):
    from resnext_det.engine import Trainer, setup_cfg

    cfg = setup_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(tmp_path)])
    return cfg, Trainer.build_model(cfg)


def _images(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(good)
    cut = tmp_path / "cut.jpg"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(os.urandom(4000))
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((64, 64), 3000, np.uint16)).save(deep)
    return good, cut, noise, deep
