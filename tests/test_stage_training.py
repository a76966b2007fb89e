"""How the training stages of the Appendix B schedule train (resnext_det/unshared/training.py;
Xie et al., CVPR 2017, Appendix B): each resumes from its folder and says when its schedule
changed; its marker records the trainer's latest losses; a check fails on every process when it
fails on the main one; the two trained networks are written as one UnsharedRCNN checkpoint.
"""
import json
import os

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage

from resnext_det.unshared import ProposalFileMismatch, stage_configs
from unshared_runs import SMALL, _tiny_state, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_puts_each_stage_under_its_prefix_with_the_weights_record(tmp_path):
    """Hand-built stage checkpoints: Detectron2's format ({"model": ..., "iteration": ...}) for
    the RPN, with the weights record; a bare state dict for the Fast R-CNN."""
    from resnext_det.checkpoint import METADATA_KEY
    from resnext_det.unshared.training import export_unshared_checkpoint

    rpn_sd = _tiny_state("backbone.stem.conv1.weight", "proposal_generator.rpn_head.conv.weight", seed=1)
    frcn_sd = _tiny_state("backbone.stem.conv1.weight", "roi_heads.box_predictor.cls_score.weight", seed=2)
    record = {"format": "RGB", "arch": "X-26-8x4d"}
    rpn_file, frcn_file = str(tmp_path / "rpn.pth"), str(tmp_path / "frcn.pth")
    torch.save({"model": rpn_sd, "iteration": 99, "optimizer": {"x": 1}, METADATA_KEY: record}, rpn_file)
    torch.save(frcn_sd, frcn_file)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "model_final.pth")
    assert export_unshared_checkpoint(rpn_file, frcn_file, out) == out
    got = torch.load(out, weights_only=True)
    assert set(got) == {"model", METADATA_KEY, "__stages__"}
    assert got["__stages__"] == {"rpn": rpn_file, "fast_rcnn": frcn_file}
    assert got[METADATA_KEY] == record
    want = {**{f"rpn.{k}": v for k, v in rpn_sd.items()}, **{f"fast_rcnn.{k}": v for k, v in frcn_sd.items()}}
    assert set(got["model"]) == set(want)
    for k, v in want.items():
        assert torch.equal(got["model"][k], v), k
    # Tagged as the folder's last checkpoint, as Detectron2's checkpointer reads it.
    assert DetectionCheckpointer(torch.nn.Linear(1, 1), str(out_dir)).get_checkpoint_file() == out
    # The record of the Fast R-CNN's checkpoint when only that one has one; none when neither.
    torch.save({"model": rpn_sd}, rpn_file)
    torch.save({"model": frcn_sd, METADATA_KEY: record}, frcn_file)
    export_unshared_checkpoint(rpn_file, frcn_file, out)
    assert torch.load(out, weights_only=True)[METADATA_KEY] == record
    torch.save(frcn_sd, frcn_file)
    export_unshared_checkpoint(rpn_file, frcn_file, out)
    assert METADATA_KEY not in torch.load(out, weights_only=True)


def test_stage_results_record_the_trainers_latest_losses():
    """What the stage marker records as final losses: the losses (and only they) among the
    trainer's latest scalars in Detectron2's EventStorage; nothing before training."""
    import types

    from resnext_det.unshared.training import _latest_losses

    storage = EventStorage(7)
    storage.put_scalars(loss_cls=0.5, loss_rpn_loc=0.25, total_loss=0.75, lr=0.01, data_time=0.2)
    storage.step()
    storage.put_scalars(loss_cls=0.125)  # iteration 8: the latest value counts
    got = _latest_losses(types.SimpleNamespace(storage=storage))
    assert got == {"loss_cls": 0.125, "loss_rpn_loc": 0.25, "total_loss": 0.75}
    assert all(type(v) is float for v in got.values())
    assert _latest_losses(types.SimpleNamespace()) == {}  # DefaultTrainer before train()


def test_main_first_runs_the_check_once_and_reraises_its_error():
    from resnext_det.unshared.training import main_first

    calls = []
    assert main_first(lambda: calls.append(1)) is None
    assert calls == [1]
    err = ProposalFileMismatch("bad file")

    def check():
        raise err

    with pytest.raises(ProposalFileMismatch) as e:
        main_first(check)
    assert e.value is err


def test_a_training_stage_resumes_from_its_folder_and_says_when_its_schedule_changed(tmp_path, caplog):
    """train_stage twice on the same folder: the second run finds the stage trained to its
    MAX_ITER (Detectron2 resumes from model_final.pth) and trains no further; a third run with
    more iterations resumes, saying that the stored schedule differs."""
    from resnext_det.unshared.training import train_stage

    def run(max_iter):
        c = stage_configs(tiny_cfg(tmp_path / "out", *SMALL, "UNSHARED.RPN.MAX_ITER", str(max_iter)))["rpn"]
        caplog.clear()
        with caplog.at_level("INFO", logger="resnext_det"), caplog.at_level("INFO", logger="detectron2"):
            r = train_stage(c)
        return c.OUTPUT_DIR, r, caplog.text

    folder, first, _ = run(1)
    assert first["max_iter"] == 2  # 1 at 2 processes, 2 on one
    _, again, log = run(1)
    assert f"{folder} is trained to its MAX_ITER already; delete it to retrain." in log
    assert "Starting training from iteration 2" in log and "was started with" not in log
    _, more, log = run(2)
    before = {"world_size": 1, "ims_per_batch": 1, "max_iter": 2}
    now = {"world_size": 1, "ims_per_batch": 1, "max_iter": 4}
    assert (f"{folder} was started with {before} and resumes with {now}: training continues at the "
            "stored iteration of the new schedule.") in log  # fmt: skip
    assert "Starting training from iteration 2" in log and "trained to its MAX_ITER already" not in log
    with open(os.path.join(folder, "stage_started.json")) as f:
        assert json.load(f) == now
    assert more["max_iter"] == 4
