"""The four stages of the Appendix B schedule (resnext_det/unshared/stages.py; Xie et al., CVPR
2017, Appendix B) against the paper and against Detectron2:

* The shipped configs hold the paper's Appendix B numbers (8 GPUs x 2 images, 256 anchors, lr 0.02
  for 120k then 0.002 for 60k; 8 x 1 image, 64 RoIs, 0.005 / 0.0005; momentum 0.9, wd 1e-4), read
  back through Detectron2's own LR scheduler; both stages start from the ImageNet weights.
* Stage 2 writes each split's proposals with py-faster-rcnn's top-k, under the names stages 3
  and 4 read, equal to Detectron2's ProposalNetwork's, and reuses them after an interruption.
* A finished stage counts only when what it left behind loads.
"""
import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler

import resnext_det
from resnext_det.engine import Trainer, setup_cfg
from resnext_det.unshared import (
    SCHEDULE,
    STAGE_DIRS,
    STAGES,
    TABLE8,
    check_proposal_file,
    run_schedule,
    stage_configs,
)
from resnext_det.unshared.stages import broken_output
from unshared_runs import (
    DET,
    PAPER_FRCN,
    PAPER_MOMENTUM,
    PAPER_RPN,
    PAPER_TABLE8,
    PAPER_TEST,
    PAPER_TRAIN,
    PAPER_WD,
    TEST_DS,
    TRAIN_DS,
    _marker,
    _stage1_done,
    _tiny_state,
    _write,
    tiny_cfg,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Shipped configs against the paper
# ---------------------------------------------------------------------------------------------


def _lr_at(cfg, iters):
    """Learning rates Detectron2's own scheduler gives at ``iters`` for ``cfg``'s solver."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    out = {}
    for it in iters:
        sched.last_epoch = it  # the iteration whose lr get_lr() computes
        out[it] = sched.get_lr()[0]
    return out


@pytest.mark.parametrize("name", sorted(PAPER_TABLE8))
def test_shipped_configs_hold_the_papers_numbers(name):
    cfg = setup_cfg(os.path.join(DET, name), [])
    depth, c, d, ap50, ap = PAPER_TABLE8[name]
    assert cfg.UNSHARED.ENABLED and cfg.MODEL.META_ARCHITECTURE == "UnsharedRCNN"
    preset = resnext_det.PRESETS[cfg.MODEL.RESNEXT.PRESET]
    assert (preset.depth, preset.cardinality, preset.bottleneck_width) == (depth, c, d)
    assert TABLE8[(depth, c, d)]["AP50"] == ap50 and TABLE8[(depth, c, d)]["AP"] == ap
    # Both stages start from ImageNet-1K weights of the config's architecture (by name: downloaded
    # and converted on first use), which the source publishes a top-1 for.
    src = resnext_det.checkpoint.resolve_source(cfg.MODEL.WEIGHTS)
    assert src.arch == cfg.MODEL.RESNEXT.PRESET and src.top1 is not None
    cfgs = stage_configs(cfg)

    for stage, paper, meta in (("rpn", PAPER_RPN, "ProposalNetwork"),
                               ("fast_rcnn", PAPER_FRCN, "GeneralizedRCNN")):  # fmt: skip
        s = cfgs[stage]
        assert s.MODEL.META_ARCHITECTURE == meta
        assert s.MODEL.WEIGHTS == cfg.MODEL.WEIGHTS
        assert s.SOLVER.REFERENCE_WORLD_SIZE == paper["gpus"]
        assert s.SOLVER.IMS_PER_BATCH == paper["gpus"] * paper["ims_per_gpu"]
        assert s.SOLVER.MOMENTUM == PAPER_MOMENTUM and s.SOLVER.WEIGHT_DECAY == PAPER_WD
        first, second = paper["iters"]
        assert s.SOLVER.MAX_ITER == first + second
        lrs = _lr_at(s, [0, first - 1, first, first + second - 1])
        assert lrs[0] == pytest.approx(paper["lr"]) and lrs[first - 1] == pytest.approx(paper["lr"])
        assert lrs[first] == pytest.approx(paper["lr_after"])
        assert lrs[first + second - 1] == pytest.approx(paper["lr_after"])
        assert tuple(s.DATASETS.TRAIN) == PAPER_TRAIN and tuple(s.DATASETS.TEST) == PAPER_TEST
    assert cfgs["rpn"].MODEL.RPN.BATCH_SIZE_PER_IMAGE == PAPER_RPN["anchors"]
    frcn = cfgs["fast_rcnn"]
    assert frcn.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == PAPER_FRCN["rois"]
    # Fast R-CNN learns only from stored proposals, one file per dataset, from stage 2's folder.
    assert frcn.MODEL.LOAD_PROPOSALS and frcn.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals"
    assert len(frcn.DATASETS.PROPOSAL_FILES_TRAIN) == 2 and len(frcn.DATASETS.PROPOSAL_FILES_TEST) == 1
    for f in frcn.DATASETS.PROPOSAL_FILES_TRAIN + frcn.DATASETS.PROPOSAL_FILES_TEST:
        assert os.path.dirname(f) == os.path.join(cfg.OUTPUT_DIR, STAGE_DIRS["proposals"])
    assert frcn.OUTPUT_DIR != cfgs["rpn"].OUTPUT_DIR


def test_both_stages_start_from_the_imagenet_weights(tmp_path):
    """Appendix B: the RPN's backbone and, again, the Fast R-CNN's own backbone (res5 in its
    C4 head included) are initialised from the ImageNet weights, through the trainer."""
    from torchvision.models.resnet import Bottleneck, ResNet

    from resnext_det.checkpoint import convert_weights, save_converted

    torch.manual_seed(0)
    net = ResNet(Bottleneck, [2, 2, 2, 2], groups=8, width_per_group=4)  # ResNeXt-26 (8x4d)
    for m in net.modules():  # non-trivial BN statistics, so that FrozenBN values are checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    weights = str(tmp_path / "X-26-8x4d.pth")
    save_converted(convert_weights(str(tmp_path / "tv.pth"), progress=False), weights)
    cfg = tiny_cfg(tmp_path / "out", "MODEL.WEIGHTS", weights, "MODEL.RESNEXT.NORM", "FrozenBN",
                   "MODEL.RESNEXT.FREEZE_AT", "2", "MODEL.RESNEXT.STEM_OUT_CHANNELS", "64",
                   "MODEL.RESNEXT.RES2_OUT_CHANNELS", "256")  # fmt: skip
    tv = net.state_dict()
    for stage, where in (("rpn", {"backbone.res4.1.conv2.weight": "layer3.1.conv2.weight"}),
                         ("fast_rcnn", {"backbone.stem.conv1.weight": "conv1.weight",
                                        "backbone.res2.0.conv1.norm.running_mean": "layer1.0.bn1.running_mean",
                                        "roi_heads.res5.1.conv3.weight": "layer4.1.conv3.weight"})):  # fmt: skip
        c = stage_configs(cfg)[stage].clone()
        c.defrost()
        c.DATASETS.TEST = ()
        for f in c.DATASETS.PROPOSAL_FILES_TRAIN:  # stage 3 trains on stored proposals
            os.makedirs(os.path.dirname(f), exist_ok=True)
            _write(f, [d["image_id"] for d in DatasetCatalog.get(TRAIN_DS)])
        trainer = Trainer(c)
        trainer.resume_or_load(resume=False)
        state = trainer.model.state_dict()
        for ours, theirs in where.items():
            assert torch.equal(state[ours], tv[theirs]), (stage, ours)
    assert "roi_heads.res5.0.conv1.weight" not in Trainer.build_model(stage_configs(cfg)["rpn"]).state_dict()


def test_stage_configs_by_hand(tmp_path):
    """The two stage configs of the tiny schedule, key by key, typed in from TINY."""
    cfg = tiny_cfg(tmp_path)
    assert cfg.is_frozen()
    cfgs = stage_configs(cfg)
    rpn, frcn = cfgs["rpn"], cfgs["fast_rcnn"]
    assert rpn.is_frozen() and frcn.is_frozen()
    folder = lambda s: os.path.join(str(tmp_path), STAGE_DIRS[s])  # noqa: E731
    for c in (rpn, frcn):
        assert not c.UNSHARED.ENABLED and c.SOLVER.REFERENCE_WORLD_SIZE == 2 and c.MODEL.WEIGHTS == ""
    assert rpn.MODEL.META_ARCHITECTURE == "ProposalNetwork" and rpn.OUTPUT_DIR == folder("rpn")
    assert rpn.MODEL.RPN.BATCH_SIZE_PER_IMAGE == 64
    assert (rpn.MODEL.RPN.PRE_NMS_TOPK_TRAIN, rpn.MODEL.RPN.POST_NMS_TOPK_TRAIN) == (1, 1)
    assert (rpn.SOLVER.IMS_PER_BATCH, rpn.SOLVER.BASE_LR, tuple(rpn.SOLVER.STEPS), rpn.SOLVER.MAX_ITER) == (2, 0.02, (80,), 100)
    assert not rpn.MODEL.LOAD_PROPOSALS and rpn.DATASETS.PROPOSAL_FILES_TRAIN == () and rpn.DATASETS.PROPOSAL_FILES_TEST == ()
    assert frcn.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and frcn.OUTPUT_DIR == folder("fast_rcnn")
    assert frcn.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals" and frcn.MODEL.LOAD_PROPOSALS
    assert frcn.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 32
    assert (frcn.SOLVER.IMS_PER_BATCH, frcn.SOLVER.BASE_LR, tuple(frcn.SOLVER.STEPS), frcn.SOLVER.MAX_ITER) == (2, 0.02, (80,), 100)
    assert frcn.DATASETS.PROPOSAL_FILES_TRAIN == (os.path.join(folder("proposals"), f"{TRAIN_DS}_top50.pkl"),)
    assert frcn.DATASETS.PROPOSAL_FILES_TEST == (os.path.join(folder("proposals"), f"{TEST_DS}_top50.pkl"),)
    assert (frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN, frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST) == (50, 50)
    # An unfrozen config gives unfrozen stage configs (a caller may still change them).
    c = cfg.clone()
    c.defrost()
    assert not any(x.is_frozen() for x in stage_configs(c).values())


# ---------------------------------------------------------------------------------------------
# Stage 2's files: the paper's top-k per split, and reuse after an interruption
# ---------------------------------------------------------------------------------------------
# py-faster-rcnn (lib/fast_rcnn/config.py), which Appendix B follows: TRAIN.RPN_PRE_NMS_TOP_N 12000,
# TRAIN.RPN_POST_NMS_TOP_N 2000; TEST.RPN_PRE_NMS_TOP_N 6000, TEST.RPN_POST_NMS_TOP_N 300. Typed in
# by hand: the two splits differ, which the tiny configs (one top-k for both) cannot show.
PAPER_TOPK = {"train": (12000, 2000), "test": (6000, 300)}


def test_stage2_writes_the_files_stages_3_and_4_read_with_the_papers_topk(tmp_path, monkeypatch):
    """With the shipped Appendix B config (no COCO here: the RPN and the writer are stand-ins
    that record what they are asked), stage 2 writes each training set's proposals with the
    training top-k and the test set's with the test top-k, under the names that stage 3
    (training files) and stage 4 (test files) read; both read all the boxes written."""
    from resnext_det.unshared import stages

    cfg = setup_cfg(os.path.join(DET, "faster_rcnn_X_101_32x4d_C4_appendixB.yaml"),
                    ["OUTPUT_DIR", str(tmp_path)])  # fmt: skip
    asked = {}

    def record(model, cfg_, name, path, *, pre_nms_topk, post_nms_topk, **kw):
        asked[name] = (pre_nms_topk, post_nms_topk, path)
        return {"file": path}

    monkeypatch.setattr(stages, "load_model", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(stages, "dump_proposals", record)
    _stage1_done(cfg)
    run_schedule(cfg, stage="proposals")

    folder = os.path.join(str(tmp_path), STAGE_DIRS["proposals"])
    train, test = PAPER_TOPK["train"], PAPER_TOPK["test"]
    assert asked == {
        "coco_2014_train": (*train, os.path.join(folder, "coco_2014_train_top2000.pkl")),
        "coco_2014_valminusminival": (*train, os.path.join(folder, "coco_2014_valminusminival_top2000.pkl")),
        "coco_2014_minival": (*test, os.path.join(folder, "coco_2014_minival_top300.pkl")),
    }
    frcn = stage_configs(cfg)["fast_rcnn"]
    assert frcn.DATASETS.PROPOSAL_FILES_TRAIN == (asked["coco_2014_train"][2],
                                                  asked["coco_2014_valminusminival"][2])  # fmt: skip
    assert frcn.DATASETS.PROPOSAL_FILES_TEST == (asked["coco_2014_minival"][2],)
    assert frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN == train[1]
    assert frcn.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST == test[1]
    # The end-to-end UnsharedRCNN's RPN proposes with the test top-k, as the test files hold.
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == test


@torch.no_grad()
def _detectron2_proposals(rpn_cfg, weights, dataset, pre, post):
    """Proposals of Detectron2's own ProposalNetwork built with ``pre``/``post`` as its test
    top-k (no resnext_det code in the loop but the backbone), by image id."""
    c = rpn_cfg.clone()
    c.defrost()
    c.MODEL.RPN.PRE_NMS_TOPK_TEST, c.MODEL.RPN.POST_NMS_TOPK_TEST = pre, post
    model = build_model(c).eval()
    DetectionCheckpointer(model).load(weights)
    out = {}
    for inputs in build_detection_test_loader(c, dataset):
        for inp, res in zip(inputs, model(inputs)):
            out[inp["image_id"]] = res["proposals"].proposal_boxes.tensor.numpy()
    return out


def _file_id(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_stage2_writes_each_splits_topk_and_reuses_its_files_after_an_interruption(tmp_path, monkeypatch):
    """Distinct train/test top-k (1000/200 and 300/50), an untrained RPN (proposals need not be
    good, only right): each file holds what Detectron2's ProposalNetwork gives with that split's
    top-k, under the name stages 3 and 4 read. Killed after the files and before its marker,
    stage 2 reruns without recomputing them (same inode and mtime); a changed pre-NMS top-k
    recomputes that file only."""
    from resnext_det.unshared import schedule

    out = tmp_path / "out"
    topk = ["UNSHARED.PROPOSALS.TRAIN_PRE_NMS_TOPK", "1000", "UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK", "200"]
    cfg = tiny_cfg(out, *topk)
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (300, 50)
    cfgs = stage_configs(cfg)
    torch.manual_seed(0)
    _stage1_done(cfg, build_model(cfgs["rpn"]))
    weights = os.path.join(out, STAGE_DIRS["rpn"], "model_final.pth")

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop("stage 3 is not run here")

    monkeypatch.setattr(schedule, "SCHEDULE", tuple(dataclasses.replace(st, run=stop) if st.name == "fast_rcnn" else st
                                                    for st in schedule.SCHEDULE))
    with pytest.raises(Stop):
        run_schedule(cfg)
    frcn = cfgs["fast_rcnn"]
    (train_file,), (test_file,) = frcn.DATASETS.PROPOSAL_FILES_TRAIN, frcn.DATASETS.PROPOSAL_FILES_TEST
    for path, ds, (pre, post) in ((train_file, TRAIN_DS, (1000, 200)), (test_file, TEST_DS, (300, 50))):
        data = check_proposal_file(path, ds)  # what stages 3 and 4 check before they read
        ref = _detectron2_proposals(cfgs["rpn"], weights, ds, pre, post)
        assert max(len(b) for b in data["boxes"]) == post, path
        for i, boxes in zip(data["ids"], data["boxes"]):
            assert boxes.shape == ref[i].shape, (path, i)
            # the file is in original-image pixels; the images are 256 px, as the test scale
            np.testing.assert_allclose(boxes, ref[i], rtol=0, atol=1e-3)

    # Killed after both files, before stage 2's marker: the rerun keeps them as they are.
    os.remove(os.path.join(out, STAGE_DIRS["proposals"], "stage_done.json"))
    before = {p: _file_id(p) for p in (train_file, test_file)}
    time.sleep(0.01)
    with pytest.raises(Stop):
        run_schedule(cfg)
    assert {p: _file_id(p) for p in (train_file, test_file)} == before
    assert _marker(out, "proposals") is not None

    # Another training pre-NMS top-k: the training file is made again, the test file kept.
    os.remove(os.path.join(out, STAGE_DIRS["proposals"], "stage_done.json"))
    with pytest.raises(Stop):
        run_schedule(tiny_cfg(out, *topk, "UNSHARED.PROPOSALS.TRAIN_PRE_NMS_TOPK", "900"))
    assert _file_id(train_file) != before[train_file] and _file_id(test_file) == before[test_file]


def test_a_finished_stage_counts_only_when_its_outputs_load_fast(tmp_path):
    """The same check as the end-to-end test, on hand-made outputs: a torch checkpoint
    (a zip) that is whole, cut short, empty or missing; proposal files with and without
    their metadata; a results.json that parses or not."""
    cfg = tiny_cfg(tmp_path)
    cfgs = stage_configs(cfg)
    rpn_final = os.path.join(cfgs["rpn"].OUTPUT_DIR, "model_final.pth")
    frcn_final = os.path.join(cfgs["fast_rcnn"].OUTPUT_DIR, "model_final.pth")
    combined = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    assert broken_output(cfg, cfgs, "rpn") == rpn_final  # missing
    os.makedirs(os.path.dirname(rpn_final))
    torch.save({"model": _tiny_state("a", "b")}, rpn_final)
    assert broken_output(cfg, cfgs, "rpn") is None
    with open(rpn_final, "rb") as f:
        whole = f.read()
    with open(rpn_final, "wb") as f:
        f.write(whole[: len(whole) // 2])  # killed half way
    assert broken_output(cfg, cfgs, "rpn") == rpn_final
    with open(rpn_final, "wb") as f:
        f.write(b"")
    assert broken_output(cfg, cfgs, "rpn") == rpn_final
    # Stage 3: its own checkpoint, then the combined one.
    os.makedirs(os.path.dirname(frcn_final))
    torch.save({"model": _tiny_state("c")}, frcn_final)
    assert broken_output(cfg, cfgs, "fast_rcnn") == combined
    torch.save({"model": _tiny_state("rpn.a", "fast_rcnn.c")}, combined)
    assert broken_output(cfg, cfgs, "fast_rcnn") is None
    os.remove(frcn_final)
    assert broken_output(cfg, cfgs, "fast_rcnn") == frcn_final
    # Stage 2: every file of stage 3's config, with the metadata it was written with.
    (train_file,), (test_file,) = cfgs["fast_rcnn"].DATASETS.PROPOSAL_FILES_TRAIN, cfgs["fast_rcnn"].DATASETS.PROPOSAL_FILES_TEST
    os.makedirs(os.path.dirname(train_file))
    assert broken_output(cfg, cfgs, "proposals") == train_file
    for f in (train_file, test_file):
        _write(f, [1, 2])
        with open(f + ".json", "w") as fh:
            json.dump({"dataset": "x"}, fh)
    assert broken_output(cfg, cfgs, "proposals") is None
    os.remove(test_file + ".json")
    assert broken_output(cfg, cfgs, "proposals") == test_file
    open(train_file, "wb").close()  # empty
    assert broken_output(cfg, cfgs, "proposals") == train_file
    # Stage 4: a results.json that parses.
    results = os.path.join(cfg.OUTPUT_DIR, STAGE_DIRS["eval"], "results.json")
    assert broken_output(cfg, cfgs, "eval") == results
    os.makedirs(os.path.dirname(results))
    with open(results, "w") as f:
        f.write('{"stored_proposals": ')
    assert broken_output(cfg, cfgs, "eval") == results
    with open(results, "w") as f:
        f.write('{"stored_proposals": {}}')
    assert broken_output(cfg, cfgs, "eval") is None


def test_the_schedule_is_four_records_and_the_names_and_folders_are_views_of_them():
    """Appendix B's four stages, typed in by hand: their order, folders (what a finished run left
    on disk must still be found) and the network config each trains or is marked with."""
    assert [(st.number, st.name, st.folder, st.network, st.trains) for st in SCHEDULE] == [
        (1, "rpn", "stage1_rpn", "rpn", True),
        (2, "proposals", "stage2_proposals", "rpn", False),
        (3, "fast_rcnn", "stage3_fast_rcnn", "fast_rcnn", True),
        (4, "eval", "stage4_eval", "fast_rcnn", False),
    ]
    assert STAGES == ("rpn", "proposals", "fast_rcnn", "eval")
    assert STAGE_DIRS == {"rpn": "stage1_rpn", "proposals": "stage2_proposals",
                          "fast_rcnn": "stage3_fast_rcnn", "eval": "stage4_eval"}  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        SCHEDULE[0].folder = "elsewhere"
