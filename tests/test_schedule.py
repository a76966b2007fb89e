"""The Appendix B schedule as a loop over its stages (resnext_det/unshared/schedule.py; Xie et
al., CVPR 2017, Appendix B): settings it would ignore are refused with the key to change; a
finished stage run with another config is named with the keys that differ; all four stages in
this process at a tiny size, against Detectron2's own classes.
"""
import json
import os
import re

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from resnext_det.engine import Trainer
from resnext_det.unshared import STAGE_DIRS, ProposalFileMismatch, run_schedule, stage_configs
from unshared_runs import SMALL, SMALL_TEST, _last_checkpoint, _marker, _write, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bad_settings_are_refused_with_the_key_to_change(tmp_path):
    with pytest.raises(ValueError, match=r"UNSHARED\.RPN\.STEPS"):
        stage_configs(tiny_cfg(tmp_path, "UNSHARED.RPN.STEPS", "(150,)"))
    with pytest.raises(ValueError, match=r"UNSHARED\.FAST_RCNN\.IMS_PER_BATCH.*REFERENCE_WORLD_SIZE"):
        stage_configs(tiny_cfg(tmp_path, "UNSHARED.FAST_RCNN.IMS_PER_BATCH", "3"))
    with pytest.raises(ValueError, match=r"UNSHARED\.RPN\.<KEY>"):
        run_schedule(tiny_cfg(tmp_path), cli_opts=["SOLVER.BASE_LR", "0.1"])
    with pytest.raises(ValueError, match="META_ARCHITECTURE"):
        run_schedule(tiny_cfg(tmp_path, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"))
    with pytest.raises(ValueError, match="PROPOSAL_FILES"):
        run_schedule(tiny_cfg(tmp_path, "DATASETS.PROPOSAL_FILES_TRAIN", "('x.pkl',)"))
    # A later stage alone needs the earlier ones.
    with pytest.raises(RuntimeError, match="needs stage 'rpn'.*--stage rpn"):
        run_schedule(tiny_cfg(tmp_path), stage="fast_rcnn")


def test_a_finished_stage_run_with_another_config_is_named_with_the_keys_that_differ(tmp_path, caplog):
    """A finished stage's marker records its config; a rerun with other values keeps the result
    and warns, naming the differing keys (the first 8, sorted) and the folder to delete."""
    from resnext_det.unshared.schedule import _warn_if_changed
    from resnext_det.unshared.stages import config_identity

    cfg = tiny_cfg(tmp_path)
    cfgs = stage_configs(cfg)

    def marker_of(c, stage):  # what run_schedule stores, read back from JSON
        return {"config_keys": json.loads(json.dumps(config_identity(stage_configs(c)["rpn" if stage in ("rpn", "proposals") else "fast_rcnn"], stage), default=str))}

    def warned(stage, marker):
        caplog.clear()
        with caplog.at_level("WARNING", logger="resnext_det"):
            _warn_if_changed(cfg, cfgs, stage, marker)
        return "\n".join(r.getMessage() for r in caplog.records)

    for stage in STAGE_DIRS:
        assert warned(stage, marker_of(cfg, stage)) == "", stage  # the same config
        assert warned(stage, {"finished": "x"}) == "", stage  # a marker of an older version
    # The RPN's NMS threshold: stages 1-2 (the RPN's config); stage 3 trains with stored proposals.
    other = tiny_cfg(tmp_path, "MODEL.RPN.NMS_THRESH", "0.5", "UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK", "40")
    msg = warned("rpn", marker_of(other, "rpn"))
    folder = os.path.join(str(tmp_path), STAGE_DIRS["rpn"])
    assert msg == (f"Stage 'rpn' finished earlier with another config (differs in MODEL.RPN.NMS_THRESH); "
                   f"its result is kept. To redo it, delete {folder} (and the later stages' folders).")  # fmt: skip
    assert "differs in MODEL.RPN.NMS_THRESH, UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK)" in warned("proposals", marker_of(other, "proposals"))
    assert os.path.join(str(tmp_path), STAGE_DIRS["proposals"]) in warned("proposals", marker_of(other, "proposals"))
    # Stage 3 is built with stage 2's file names (from the top-k) and its own ROI sampling.
    msg = warned("fast_rcnn", marker_of(tiny_cfg(tmp_path, "UNSHARED.FAST_RCNN.BATCH_SIZE_PER_IMAGE", "16"), "fast_rcnn"))
    assert "differs in MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE)" in msg
    assert warned("eval", marker_of(tiny_cfg(tmp_path, "UNSHARED.EVAL_END_TO_END", "False"), "eval")).count(
        "differs in UNSHARED.EVAL_END_TO_END)") == 1
    # Keys the stored config has and the current one lacks, or the reverse; more than 8: "...".
    marker = marker_of(cfg, "rpn")
    del marker["config_keys"]["SOLVER.BASE_LR"]
    marker["config_keys"].update({f"OLD.K{i}": i for i in range(9)})
    msg = warned("rpn", marker)
    assert "differs in OLD.K0, OLD.K1, OLD.K2, OLD.K3, OLD.K4, OLD.K5, OLD.K6, OLD.K7 ...); its result" in msg
    marker = marker_of(cfg, "rpn")
    marker["config_keys"].update({f"OLD.K{i}": i for i in range(7)})
    assert "differs in OLD.K0, OLD.K1, OLD.K2, OLD.K3, OLD.K4, OLD.K5, OLD.K6); its result" in warned("rpn", marker)
    del marker["config_keys"]["SOLVER.BASE_LR"]  # 8: all named
    assert "differs in OLD.K0, OLD.K1, OLD.K2, OLD.K3, OLD.K4, OLD.K5, OLD.K6, SOLVER.BASE_LR); its" in warned("rpn", marker)


def test_schedule_in_process_small(tmp_path):
    """All four stages in this process, at a tiny size: what each stage records and writes,
    against Detectron2's own classes (its checkpointer, its GeneralizedRCNN on the stored
    proposals with its COCOEvaluator) and the linear scaling rule by hand."""
    from detectron2.config import CfgNode

    out = str(tmp_path / "out")
    cfg = tiny_cfg(out, *SMALL)
    res = run_schedule(cfg)
    cfgs = stage_configs(cfg)
    s1, s3, s4 = (os.path.join(out, STAGE_DIRS[s]) for s in ("rpn", "fast_rcnn", "eval"))
    combined = os.path.join(out, "model_final.pth")

    # Stages 1 and 3: the solver by the linear scaling rule (x1/2 batch and lr, x2 iterations).
    losses = {"rpn": {"loss_rpn_cls", "loss_rpn_loc"}, "fast_rcnn": {"loss_cls", "loss_box_reg"}}
    for stage, folder, lr, steps, max_iter in (("rpn", s1, 0.01, [], 2), ("fast_rcnn", s3, 0.0025, [2], 4)):
        r = _marker(out, stage)["results"]
        fl = r.pop("final_losses")
        assert set(fl) == losses[stage] | {"total_loss"}, fl  # Detectron2's SimpleTrainer's names
        assert fl["total_loss"] == pytest.approx(sum(fl[k] for k in losses[stage]), rel=1e-5)
        want = {"model_final": os.path.join(folder, "model_final.pth"), "world_size": 1,
                "ims_per_batch": 1, "base_lr": pytest.approx(lr), "steps": steps, "max_iter": max_iter}  # fmt: skip
        if stage == "fast_rcnn":
            want["unshared_model"] = combined
        assert r == want, stage
        with open(os.path.join(folder, "stage_started.json")) as f:
            assert json.load(f) == {"world_size": 1, "ims_per_batch": 1, "max_iter": max_iter}
        with open(os.path.join(folder, "config.yaml")) as f:
            written = CfgNode.load_cfg(f)
        assert written.OUTPUT_DIR == folder and written.MODEL.META_ARCHITECTURE == cfgs[stage].MODEL.META_ARCHITECTURE
        assert list(written.DATASETS.TEST) == [] and list(written.DATASETS.PROPOSAL_FILES_TEST) == []
        assert not os.path.exists(os.path.join(folder, "inference"))  # no evaluation while training

    # The combined checkpoint: the two stages' weights under rpn.* / fast_rcnn.*, exactly the
    # UnsharedRCNN's parameters, and the last checkpoint of OUTPUT_DIR.
    rpn = torch.load(os.path.join(s1, "model_final.pth"), weights_only=True)["model"]
    frcn = torch.load(os.path.join(s3, "model_final.pth"), weights_only=True)["model"]
    both = torch.load(combined, weights_only=True)["model"]
    assert set(both) == {f"rpn.{k}" for k in rpn} | {f"fast_rcnn.{k}" for k in frcn}
    assert set(both) == set(build_model(cfg).state_dict())
    assert all(torch.equal(both[f"rpn.{k}"], v) for k, v in rpn.items())
    assert all(torch.equal(both[f"fast_rcnn.{k}"], v) for k, v in frcn.items())
    assert _last_checkpoint(out) == "model_final.pth"

    # Stage 4: the AP of Detectron2's GeneralizedRCNN with stage 3's weights on the stored test
    # proposals, evaluated by Detectron2 here; the end-to-end model gives the same detections.
    model = build_model(cfgs["fast_rcnn"])
    DetectionCheckpointer(model).load(os.path.join(s3, "model_final.pth"))
    ref = inference_on_dataset(
        model, build_detection_test_loader(cfgs["fast_rcnn"], SMALL_TEST),
        Trainer.build_evaluator(cfgs["fast_rcnn"], SMALL_TEST, str(tmp_path / "ref")),
    )["bbox"]  # fmt: skip
    assert np.isfinite(ref["AP"]), ref

    def detections(folder):
        preds = torch.load(os.path.join(folder, "instances_predictions.pth"), weights_only=False)
        return {p["image_id"]: p["instances"] for p in preds}

    want = detections(str(tmp_path / "ref"))
    assert len(want) == 2 and all(want.values())
    for kind in ("stored_proposals", "end_to_end"):
        assert set(res[kind]) == {SMALL_TEST}
        assert res[kind][SMALL_TEST]["bbox"] == pytest.approx(ref, abs=1e-4, nan_ok=True), kind
        # Detectron2's evaluator wrote its files in the stage folder, per kind and dataset.
        got = detections(os.path.join(s4, kind, SMALL_TEST))
        assert set(got) == set(want), kind
        for i in want:
            assert [d["category_id"] for d in got[i]] == [d["category_id"] for d in want[i]], kind
            np.testing.assert_allclose([d["bbox"] for d in got[i]], [d["bbox"] for d in want[i]], atol=1e-2)
            np.testing.assert_allclose([d["score"] for d in got[i]], [d["score"] for d in want[i]], atol=1e-4)
    assert res["paper_table8"] is None
    with open(os.path.join(s4, "results.json")) as f:
        stored = json.load(f)
    assert set(stored) == {"stored_proposals", "end_to_end", "paper_table8"} and stored["paper_table8"] is None
    for kind in ("stored_proposals", "end_to_end"):
        for k in ("AP", "AP50", "AP75"):  # (NaN, for sizes without objects, is stored as null)
            assert stored[kind][SMALL_TEST]["bbox"][k] == pytest.approx(ref[k], abs=1e-4), kind
    with open(os.path.join(s4, "results.md")) as f:
        md = f.read()
    for label in ("ours: Fast R-CNN on stored proposals (stage 4)", "ours: UnsharedRCNN end to end"):
        assert f"| {label} | {SMALL_TEST} | {ref['AP']:.1f} | {ref['AP50']:.1f} | {ref['AP75']:.1f} |" in md
    assert "paper, Table 8" not in md

    # Stage 4 again without the end-to-end model: the stored-proposal results only.
    again = run_schedule(tiny_cfg(out, *SMALL, "UNSHARED.EVAL_END_TO_END", "False"), stage="eval")
    assert set(again) == {"stored_proposals", "paper_table8"}
    assert again["stored_proposals"][SMALL_TEST]["bbox"] == pytest.approx(ref, abs=1e-4, nan_ok=True)
    # Stages 3 and 4 refuse proposal files of other images before they start.
    (train_file,), (test_file,) = cfgs["fast_rcnn"].DATASETS.PROPOSAL_FILES_TRAIN, cfgs["fast_rcnn"].DATASETS.PROPOSAL_FILES_TEST
    for stage, f in (("fast_rcnn", train_file), ("eval", test_file)):
        keep = f + ".keep"
        os.replace(f, keep)
        _write(f, ["not-an-id", "nor-this"])
        with pytest.raises(ProposalFileMismatch, match=re.escape(f)):
            run_schedule(cfg, stage=stage)
        os.replace(keep, f)
