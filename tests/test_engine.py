"""Tests of resnext_det/engine (trainer.py, setup.py) as an unlucky user meets them (issue #12):
a resume with another learning rate is refused, MODEL.DEVICE cuda without a GPU runs on the
CPU and says so."""
import logging

import pytest
import torch

from resnext_det.engine import Trainer, setup_cfg
from resnext_det.errors import ConfigError

from reliability_helpers import CONFIG, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resuming_with_another_learning_rate_is_refused(tmp_path):
    """Detectron2 restores the optimizer and scheduler on resume, so a changed BASE_LR was
    ignored silently (the Appendix B stage record then claimed the new one)."""
    cfg = setup_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2",
                                    "SOLVER.CHECKPOINT_PERIOD", "1"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    same = Trainer(cfg)
    same.resume_or_load(resume=True)  # the same solver resumes
    assert same.start_iter == 2
    changed = setup_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2",
                                        "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.BASE_LR", "0.001"])
    with pytest.raises(ConfigError, match=r"SOLVER.BASE_LR 0.01 -> 0.001.*delete"):
        Trainer(changed).resume_or_load(resume=True)


def test_cuda_without_a_gpu_runs_on_the_cpu_and_says_so(caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with caplog.at_level(logging.WARNING):
        cfg = setup_cfg(CONFIG, ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == "cpu" and "no CUDA device" in caplog.text
