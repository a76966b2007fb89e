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


def test_a_trainer_has_one_checkpointer_which_saves_and_loads_the_weights(tmp_path, monkeypatch):
    """One checkpointer per Trainer (issue #23: there were three: Detectron2's, replaced in
    build_hooks, and another one to load MODEL.WEIGHTS), and it is ours: strict loading of
    MODEL.WEIGHTS, whole files, the solver recorded."""
    from detectron2.checkpoint import DetectionCheckpointer

    from resnext_det.checkpoint import ResNeXtCheckpointer

    made = []
    original = DetectionCheckpointer.__init__

    def counted(self, *args, **kwargs):
        made.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(DetectionCheckpointer, "__init__", counted)
    cfg = setup_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(tmp_path / "first"), "SOLVER.MAX_ITER", "1"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert made == ["ResNeXtCheckpointer"]
    assert isinstance(trainer.checkpointer, ResNeXtCheckpointer)
    assert {"solver", "resnext_det"} <= set(trainer.checkpointer.checkpointables)
    # Its weights load into a second trainer's model through that trainer's one checkpointer.
    made.clear()
    weights = str(tmp_path / "first" / "model_final.pth")
    second = Trainer(setup_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(tmp_path / "second"), "MODEL.WEIGHTS", weights]))
    second.resume_or_load(resume=False)
    assert made == ["ResNeXtCheckpointer"]
    state = torch.load(weights, weights_only=True)["model"]
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(second.model.state_dict()[key], state[key])


def test_a_run_starts_by_removing_what_killed_writes_left_in_its_folders(tmp_path):
    """The one clean-up of a run (issue #23: the Trainer and the schedule each had one):
    OUTPUT_DIR and its folders (the Appendix B stage folders), on the run's start."""
    from detectron2.engine import default_argument_parser

    out = tmp_path / "run"
    (out / "stage1_rpn").mkdir(parents=True)
    left = [out / ".model_final.pth.tmp-ab12", out / "stage1_rpn" / ".model_0000009.pth.tmp-x1y2"]
    kept = [out / "model_final.pth", out / "stage1_rpn" / "last_checkpoint"]
    for f in left + kept:
        f.write_bytes(b"x")
    args = default_argument_parser().parse_args(["--config-file", CONFIG])
    setup_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(out)], args=args)
    assert [f.exists() for f in left] == [False, False]
    assert [f.exists() for f in kept] == [True, True]
