"""Tests of resnext_det/checkpoint/loading.py, the strict loading of MODEL.WEIGHTS
(``ResNeXtCheckpointer``): raw or unconverted files refused with the command to convert
them, weights that disagree with the config refused naming the keys, files read as
Detectron2 reads them, detector checkpoints of other projects (Detectron2's model zoo), what
require="backbone" / "all" load; and the checkpoints a training writes and resumes from: only
the main rank saves, the newest complete file is resumed, the weights record
(``WeightsRecord``) holds the config's values. The tensor matching behind its errors:
tests/test_checkpoint_matching.py."""
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from resnext_det.checkpoint import ResNeXtCheckpointer, WeightsConfigError, config_pairs
from resnext_det.checkpoint.loading import attach_weights_record
from resnext_det.checkpoint.readers import CheckpointReadError

from reliability_helpers import _tiny_model
from weights_helpers import (
    FAIR_BGR_LINES,
    _record_cfg_model,
    assert_same_predictions,
    convert_to,
    detector_cfg,
    load_detector,
    names,
    our_detector_cfg,
    predict,
    tiny_cfg,
    tv_to_caffe2_blobs,
)


# --------------------------------------------------------------------------
# Files that are no detector checkpoint of this config: refused naming the keys or the
# command that fixes them
# --------------------------------------------------------------------------
def test_raw_torchvision_file_as_model_weights_is_refused(tv26):
    _, d, r = tv26
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(d / "tv26.pth")))
    with pytest.raises(WeightsConfigError, match="(?s)raw torchvision ImageNet weights.*tools/convert_pretrained.py"):
        load_detector(cfg)


def test_unconverted_files_name_the_convert_command_with_an_output_name(tmp_path, tv26):
    """The command printed for a raw or unrecorded file is the input file and an output named
    after it (*-d2.pth, a name save_converted accepts)."""
    tv, d, r = tv26
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(d / "tv26.pth")))
    with pytest.raises(WeightsConfigError) as e:
        load_detector(cfg)
    assert f"tools/convert_pretrained.py {d / 'tv26.pth'} tv26-d2.pth" in str(e.value)
    torch.save({"model": r.state_dict}, tmp_path / "backbone.v2.pth")  # Detectron2 names, nothing recorded
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(tmp_path / "backbone.v2.pth")))
    with pytest.raises(WeightsConfigError) as e:
        load_detector(cfg)
    msg = str(e.value)
    assert f"tools/convert_pretrained.py {tmp_path / 'backbone.v2.pth'} backbone.v2-d2.pth" in msg
    assert names(msg, "--format") and names(msg, "detectron2") and names(msg, "--convention")


def test_bgr_weights_with_rgb_config_are_refused(tmp_path, tv26):
    tv, _, _ = tv26
    with open(tmp_path / "X-26.pkl", "wb") as f:
        pickle.dump(tv_to_caffe2_blobs(tv.state_dict()), f, protocol=2)
    r = convert_to(tmp_path / "X-26.pkl", tmp_path / "bgr.pth", convention="fair")
    pairs = [p for p in config_pairs(r.metadata, str(tmp_path / "bgr.pth")) if not p[0].startswith(("INPUT", "MODEL.PIXEL"))]
    cfg = detector_cfg("FPN", pairs)  # the base's RGB / torchvision mean and std
    with pytest.raises(WeightsConfigError) as e:
        load_detector(cfg)
    msg = str(e.value)
    assert "INPUT.FORMAT: the weights were trained on BGR input, the config feeds RGB" in msg
    assert "--to-rgb" in msg and "MODEL.PIXEL_MEAN" in msg and "MODEL.PIXEL_STD" in msg
    assert "INPUT.FORMAT BGR MODEL.PIXEL_MEAN '[103.53, 116.28, 123.675]'" in msg


def test_architecture_mismatch_at_load_names_the_keys(tv26):
    _, d, r = tv26
    pairs = config_pairs(r.metadata, str(d / "tv26-d2.pth"))
    cfg = detector_cfg("C4", pairs, "MODEL.RESNEXT.CARDINALITY", 8, "MODEL.RESNEXT.BOTTLENECK_WIDTH", 2)
    with pytest.raises(WeightsConfigError, match=r"C=4, d=4.*config builds.*C=8, d=2") as e:
        load_detector(cfg)
    assert "MODEL.RESNEXT.CARDINALITY 4 MODEL.RESNEXT.BOTTLENECK_WIDTH 4" in str(e.value)
    assert "(MODEL.RESNEXT.PRESET / DEPTH / STAGE_BLOCKS / CARDINALITY / BOTTLENECK_WIDTH)" in str(e.value)
    cfg = detector_cfg("FPN", pairs, "MODEL.RESNEXT.STRIDE_IN_1X1", True)
    with pytest.raises(WeightsConfigError, match="MODEL.RESNEXT.STRIDE_IN_1X1") as e:
        load_detector(cfg)
    # torchvision puts the stride on the 3x3 conv: the fix line sets the key back to False.
    assert "trained with the stride on the 3x3 conv, the config puts it on the first 1x1 conv" in str(e.value)
    assert str(e.value).splitlines()[-1].split() == ["MODEL.RESNEXT.STRIDE_IN_1X1", "False"]


def test_group_norm_warning_only_for_weights_trained_with_bn(tmp_path, caplog):
    """GN keeps no running statistics: a BN-trained checkpoint loaded into a GN config is
    warned about (GN takes BN's scale and bias, the statistics are dropped); a GN model's
    own checkpoint, loaded into the config it was trained with, is not."""
    gn = ["MODEL.RESNEXT.BOTTLENECK_WIDTH", 16, "MODEL.RESNEXT.RES2_OUT_CHANNELS", 64, "MODEL.RESNEXT.STEM_OUT_CHANNELS", 32]

    def saved(norm):
        cfg = tiny_cfg("FPN", *gn, "MODEL.RESNEXT.NORM", norm)
        model = build_model(cfg)
        ck = ResNeXtCheckpointer(model, str(tmp_path / norm))  # as the trainer writes model_final.pth
        attach_weights_record(ck, cfg)
        ck.save("model_final")
        return str(tmp_path / norm / "model_final.pth")

    cfg = tiny_cfg("FPN", *gn, "MODEL.RESNEXT.NORM", "GN")
    for path, warned in ((saved("GN"), False), (saved("FrozenBN"), True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="resnext_det"):
            ResNeXtCheckpointer(build_model(cfg), cfg=cfg, require="all").load(path)
        lines = [r.getMessage() for r in caplog.records if "with BN-trained weights" in r.getMessage()]
        assert len(lines) == int(warned), (path, lines)
        if warned:
            assert names(lines[0], "MODEL.RESNEXT.NORM") and "'GN'" in lines[0]


# --------------------------------------------------------------------------
# Files read as Detectron2 reads them (.pkl, .pyth), and the ones that cannot be read
# --------------------------------------------------------------------------
def test_pkl_files_are_read_as_detectron2_reads_them(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    files = {
        "zoo.pkl": {"model": {"backbone.w": w}, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True},
        "caffe2.pkl": {"blobs": {"conv1_w": w, "conv1_w_momentum": w * 0, "res2_0_branch2a_w": w}},
        "flat.pkl": {"conv1_w": w, "fc1000_w_momentum": w * 0},
        "model_only.pkl": {"model": {"conv1_w": w}},  # no __author__: Detectron2 takes it for Caffe2's
    }
    for name, data in files.items():
        with open(tmp_path / name, "wb") as f:
            pickle.dump(data, f, protocol=2)
        ref = DetectionCheckpointer(nn.Linear(1, 1))._load_file(str(tmp_path / name))
        ours = ResNeXtCheckpointer(nn.Linear(1, 1))._load_file(str(tmp_path / name))
        assert {k: v for k, v in ours.items() if k != "model"} == {k: v for k, v in ref.items() if k != "model"}, name
        assert ours["model"].keys() == ref["model"].keys(), name
        for k, v in ref["model"].items():
            assert type(ours["model"][k]) is type(v) and (not isinstance(v, np.ndarray) or np.array_equal(ours["model"][k], v))


@pytest.mark.usefixtures("one_thread")
def test_pyth_files_load_with_and_without_model_state(tmp_path):
    """pycls .pyth files ({"model_state": ...}) load as Detectron2 loads them (name-matching
    heuristics: a head saved under a shorter name still lands); a .pyth that is a bare state
    dict loads too (Detectron2 asserted)."""
    from detectron2.checkpoint import DetectionCheckpointer

    cfg, trained = _record_cfg_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    sd = dict(trained.state_dict())
    short = "box_predictor.cls_score.weight"  # the model's roi_heads.box_predictor.cls_score.weight
    sd[short] = sd.pop("roi_heads." + short)
    torch.save({"model_state": sd, "epoch": 3}, tmp_path / "wrapped.pyth")
    ref = _record_cfg_model()[1]
    DetectionCheckpointer(ref).load(str(tmp_path / "wrapped.pyth"))
    ours = _record_cfg_model()[1]
    ResNeXtCheckpointer(ours, cfg=cfg).load(str(tmp_path / "wrapped.pyth"))
    want = trained.state_dict()
    assert torch.equal(ref.state_dict()["roi_heads." + short], want["roi_heads." + short])  # the reference
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    torch.save(dict(trained.state_dict()), tmp_path / "bare.pyth")
    bare = _record_cfg_model()[1]
    ResNeXtCheckpointer(bare, cfg=cfg, require="all").load(str(tmp_path / "bare.pyth"))
    assert all(torch.equal(v, want[k]) for k, v in bare.state_dict().items())


def _two_checkpoints(tmp_path):
    cfg, model = _tiny_model(tmp_path)
    ck = ResNeXtCheckpointer(model, str(tmp_path), cfg=cfg)
    ck.save("model_0000001", iteration=1)
    ck.save("model_0000003", iteration=3)
    return cfg, model


@pytest.mark.usefixtures("one_thread")
def test_truncated_weights_are_one_line_not_oserror(tmp_path):
    cfg, model = _two_checkpoints(tmp_path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "model_0000003.pth").read_bytes()[: 24 * 1024])
    with pytest.raises(CheckpointReadError, match="truncated"):
        ResNeXtCheckpointer(model, cfg=cfg).load(str(cut))


@pytest.mark.usefixtures("one_thread")
def test_an_unreadable_weights_file_says_what_the_reader_found(tmp_path):
    """MODEL.WEIGHTS that is not a pickle at all: the one-line error names the file and
    carries the reader's own error (its type and text, as pickle reports it)."""
    data = b"not a pickle at all"
    (tmp_path / "w.pkl").write_bytes(data)
    try:
        pickle.loads(data)
    except Exception as err:  # noqa: BLE001  the reference: what pickle says
        ref = f"{type(err).__name__}: {err}"
    with pytest.raises(CheckpointReadError) as e:
        ResNeXtCheckpointer(torch.nn.Linear(1, 1)).load(str(tmp_path / "w.pkl"))
    assert ref in str(e.value) and repr(str(tmp_path / "w.pkl")) in str(e.value)


@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_with_a_non_tensor_entry_names_the_file_and_the_entry(tmp_path):
    """{"model": {"fc.weight": "oops"}} (a string where a tensor belongs): refused naming
    MODEL.WEIGHTS' file and the entry, not an empty message."""
    path = str(tmp_path / "odd.pth")
    torch.save({"model": {"fc.weight": "oops", "fc.bias": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointReadError) as e:
        ResNeXtCheckpointer(torch.nn.Linear(2, 2)).load(path)
    assert repr(path) in str(e.value) and "fc.weight" in str(e.value)


# --------------------------------------------------------------------------
# What require="backbone" (fine-tuning) and require="all" (evaluation) load
# --------------------------------------------------------------------------
def _save_detector(tmp_path, cfg, model, name="model_final", drop=()):
    """A checkpoint as the trainer writes it (with its WeightsRecord), minus the keys in ``drop``."""
    from resnext_det.checkpoint.loading import attach_weights_record

    ck = ResNeXtCheckpointer(model, str(tmp_path))
    attach_weights_record(ck, cfg)
    ck.save(name)
    path = tmp_path / f"{name}.pth"
    data = torch.load(path, weights_only=True)
    data["model"] = {k: v for k, v in data["model"].items() if k not in drop}
    torch.save(data, path)
    return str(path)


@pytest.mark.usefixtures("one_thread")
def test_require_backbone_loads_the_trunk_and_names_what_is_missing(tmp_path):
    """require="backbone" (fine-tuning): a detector file without its heads loads, the trunk
    from the file, the heads left as they were; a trunk tensor missing is refused naming it.
    require="all" (evaluation) refuses the headless file naming a head tensor. BN's
    num_batches_tracked is never required."""
    cfg, trained = _record_cfg_model("MODEL.RESNEXT.NORM", "BN")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # the file's values differ from any fresh model's
    heads = [k for k in trained.state_dict() if k.startswith("roi_heads.")]
    counters = [k for k in trained.state_dict() if k.endswith("num_batches_tracked")]
    assert heads and counters
    path = _save_detector(tmp_path, cfg, trained, drop=heads + counters)
    model = _record_cfg_model("MODEL.RESNEXT.NORM", "BN")[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ResNeXtCheckpointer(model, cfg=cfg).load(path)
    got, file_sd = model.state_dict(), trained.state_dict()
    assert all(torch.equal(got[k], file_sd[k]) for k in got if k.startswith("backbone.bottom_up.")
               and not k.endswith("num_batches_tracked"))
    assert all(torch.equal(got[k], before[k]) for k in heads)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(_record_cfg_model("MODEL.RESNEXT.NORM", "BN")[1], cfg=cfg, require="all").load(path)
    msg = str(e.value)
    assert f"{len(heads)} of the" in msg and "model tensors" in msg and heads[0] in msg and "MODEL.WEIGHTS" in msg
    gone = "backbone.bottom_up.res3.0.conv2.weight"
    path = _save_detector(tmp_path, cfg, trained, name="holey", drop=[gone])
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(_record_cfg_model("MODEL.RESNEXT.NORM", "BN")[1], cfg=cfg).load(path)
    msg = str(e.value)
    assert "1 of the" in msg and "backbone tensors" in msg and repr(gone) in msg and "holey.pth" in msg


@pytest.mark.usefixtures("one_thread")
def test_a_backbone_file_for_evaluation_points_at_a_detector_checkpoint(tmp_path):
    """require="all" with a converted backbone (heads would stay random): refused, and the
    message says to use a trained detector checkpoint (model_final.pth)."""
    from resnext_det.checkpoint.metadata import METADATA_KEY, metadata_from_model

    cfg, model = _record_cfg_model()
    trunk = {k[len("backbone.bottom_up."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    meta = metadata_from_model(model, cfg, kind="backbone").to_dict()
    torch.save({"model": trunk, METADATA_KEY: meta}, tmp_path / "trunk-d2.pth")
    ResNeXtCheckpointer(model, cfg=cfg).load(str(tmp_path / "trunk-d2.pth"))  # fine-tuning: loads
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(model, cfg=cfg, require="all").load(str(tmp_path / "trunk-d2.pth"))
    assert "point MODEL.WEIGHTS at a trained detector checkpoint" in str(e.value) and "model_final.pth" in str(e.value)


# --------------------------------------------------------------------------
# Detector checkpoints from other projects (Detectron2's model zoo)
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_zoo_detector_into_rgb_config_is_refused_with_the_key_lines(zoo_detector):
    _, _, path = zoo_detector
    cfg = our_detector_cfg(path)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(build_model(cfg).eval(), cfg=cfg, require="all").load(cfg.MODEL.WEIGHTS)
    msg = str(e.value)
    assert "INPUT.FORMAT: the weights were trained on BGR input, the config feeds RGB" in msg
    assert "INPUT.FORMAT BGR MODEL.PIXEL_MEAN '[103.53, 116.28, 123.675]' MODEL.PIXEL_STD '[57.375, 57.12, 58.395]'" in msg
    assert "--to-rgb" in msg


@pytest.mark.usefixtures("one_thread")
def test_zoo_detector_with_the_printed_lines_predicts_as_detectron2(zoo_detector, bgr_image):
    d2_cfg, d2_model, path = zoo_detector
    cfg = our_detector_cfg(path, *FAIR_BGR_LINES)
    model = build_model(cfg).eval()
    ResNeXtCheckpointer(model, cfg=cfg, require="all").load(cfg.MODEL.WEIGHTS)
    assert_same_predictions(predict(model, bgr_image), predict(d2_model, bgr_image))


@pytest.mark.usefixtures("one_thread")
def test_detector_without_a_known_convention_loads_with_one_warning_line(zoo_detector, tmp_path, caplog):
    _, _, path = zoo_detector
    sd = pickle.load(open(path, "rb"))["model"]
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "someones_model.pth")
    cfg = our_detector_cfg(tmp_path / "someones_model.pth")
    with caplog.at_level(logging.WARNING, logger="resnext_det"):
        ResNeXtCheckpointer(build_model(cfg).eval(), cfg=cfg, require="all").load(cfg.MODEL.WEIGHTS)
    lines = [r.getMessage() for r in caplog.records if "does not tell" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    for key in ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.RESNEXT.STRIDE_IN_1X1"):
        assert key in lines[0]


# --------------------------------------------------------------------------
# A training's checkpoints: saved by the main rank, resumed from the newest complete one,
# with the record of the config's input convention
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_save_on_a_worker_rank_writes_nothing(tmp_path, monkeypatch):
    """Only the main process writes checkpoints (Detectron2's save_to_disk): a worker rank
    of a multi-GPU run saving too raced the main rank on model_final.pth / last_checkpoint."""
    import detectron2.utils.comm as comm

    monkeypatch.chdir(tmp_path)  # where a save without save_dir would land
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    out = tmp_path / "out"
    out.mkdir()
    ck = ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(out))
    ck.save("model_final", iteration=7)
    assert os.listdir(out) == [] and sorted(os.listdir(tmp_path)) == ["out"]
    # The main rank writes the file whole and tags it; without a save_dir nothing is written.
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    monkeypatch.setattr(comm, "get_rank", lambda: 0)
    ResNeXtCheckpointer(torch.nn.Linear(2, 2), "").save("model_final", iteration=7)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    model = torch.nn.Linear(2, 2)
    ResNeXtCheckpointer(model, str(out)).save("model_final", iteration=7, note="x")
    assert sorted(os.listdir(out)) == ["last_checkpoint", "model_final.pth"]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    data = torch.load(out / "model_final.pth", weights_only=True)
    assert data["iteration"] == 7 and data["note"] == "x"
    assert data["model"].keys() == model.state_dict().keys()
    assert all(torch.equal(data["model"][k], v) for k, v in model.state_dict().items())


@pytest.mark.usefixtures("one_thread")
def test_resume_or_load_resumes_by_default_as_detectron2_does(tmp_path):
    """Detectron2's resume_or_load(path) resumes unless resume=False: a default of False
    restarted every resumed run from MODEL.WEIGHTS."""
    ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).save("model_0000005", iteration=5)
    assert ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).resume_or_load("")["iteration"] == 5
    assert ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).resume_or_load("", resume=False) == {}


@pytest.mark.usefixtures("one_thread")
def test_resume_candidates_are_the_named_file_then_the_newest_each_once(tmp_path):
    """last_checkpoint's file first, then model_final.pth, then model_NNNNNNN.pth newest
    first, each once; temporaries and other files are never candidates."""
    for name in ("model_0000001.pth", "model_0000009.pth", "model_0000010.pth", "model_final.pth",
                 ".model_0000011.pth.tmp-ab", "model_0000012.pth.tmp", "model_best.pth", "metrics.json"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    ck = ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    want = ["model_0000009.pth", "model_final.pth", "model_0000010.pth", "model_0000001.pth"]
    assert ck._resume_candidates() == [str(tmp_path / f) for f in want]
    (tmp_path / "last_checkpoint").write_text("model_gone.pth")  # names a deleted file
    assert ck._resume_candidates() == [str(tmp_path / f) for f in
                                       ["model_final.pth", "model_0000010.pth", "model_0000009.pth", "model_0000001.pth"]]


@pytest.mark.usefixtures("one_thread")
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    cfg, model = _two_checkpoints(tmp_path)
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[: 20000])  # what an old, non-atomic writer left
    with caplog.at_level(logging.WARNING):
        got = ResNeXtCheckpointer(model, str(tmp_path), cfg=cfg).resume_or_load("", resume=True)
    assert got["iteration"] == 1
    assert "model_0000003.pth" in caplog.text
    # An empty last_checkpoint: the newest complete file too.
    (tmp_path / "last_checkpoint").write_text("")
    assert ResNeXtCheckpointer(model, str(tmp_path), cfg=cfg).resume_or_load("", resume=True)["iteration"] == 1
    # Nothing complete left: one line that says how to start over.
    os.remove(tmp_path / "model_0000001.pth")
    with pytest.raises(CheckpointReadError, match="no complete checkpoint.*Delete .*last_checkpoint"):
        ResNeXtCheckpointer(model, str(tmp_path), cfg=cfg).resume_or_load("", resume=True)


@pytest.mark.usefixtures("one_thread")
def test_resume_takes_the_file_last_checkpoint_names_else_the_newest_complete(tmp_path):
    """Of model_0000001..3 with the newest cut short: the run resumes from 2, the newest
    complete one (not the oldest); a last_checkpoint naming an intact older file is obeyed,
    as Detectron2 does; when nothing is complete, the message names the file to delete."""
    cfg, model = _tiny_model(tmp_path)
    ck = ResNeXtCheckpointer(model, str(tmp_path), cfg=cfg)
    for it in (1, 2, 3):
        ck.save(f"model_{it:07d}", iteration=it)
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[: 20000])
    resume = lambda: ResNeXtCheckpointer(model, str(tmp_path), cfg=cfg).resume_or_load("", resume=True)  # noqa: E731
    assert resume()["iteration"] == 2
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    assert resume()["iteration"] == 1
    for it in (1, 2):
        os.remove(tmp_path / f"model_{it:07d}.pth")
    with pytest.raises(CheckpointReadError) as e:
        resume()
    assert f"Delete {tmp_path / 'last_checkpoint'} " in str(e.value)


@pytest.mark.usefixtures("one_thread")
def test_weights_record_stores_the_config_and_names_the_resumed_checkpoint(tmp_path):
    """The record a training writes holds the config's INPUT.FORMAT / PIXEL_MEAN / PIXEL_STD
    as the config has them (not the model's float32 copies) with the metadata version; on
    resume, a config that changed them is refused naming OUTPUT_DIR's checkpoint and the key."""
    from resnext_det.checkpoint.loading import WeightsRecord
    from resnext_det.checkpoint.metadata import METADATA_VERSION

    cfg, model = _record_cfg_model("MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675])
    rec = WeightsRecord(cfg, model).state_dict()
    assert rec["version"] == METADATA_VERSION and rec["kind"] == "detector"
    assert rec["input"]["format"] == cfg.INPUT.FORMAT
    assert list(rec["input"]["pixel_mean"]) == [103.53, 116.28, 123.675]
    assert list(rec["input"]["pixel_std"]) == list(cfg.MODEL.PIXEL_STD)
    changed = cfg.clone()
    changed.MODEL.PIXEL_MEAN = [0.0, 0.0, 0.0]
    with pytest.raises(WeightsConfigError) as e:
        WeightsRecord(changed, model).load_state_dict(rec)
    assert "OUTPUT_DIR" in str(e.value) and "MODEL.PIXEL_MEAN" in str(e.value)
    WeightsRecord(cfg, model).load_state_dict(rec)  # the same config resumes


@pytest.mark.usefixtures("one_thread")
def test_the_trainers_record_holds_the_configs_values_not_the_models_copies(tmp_path):
    """attach_weights_record records the config's convention: PIXEL_MEAN exactly as typed
    (103.53, not the model's float32 103.52999877...), and for a model that does not say its
    convention (no input_format) still the config's; attached once, the first record stays."""
    from resnext_det.checkpoint.loading import WeightsRecord, attach_weights_record
    from resnext_det.checkpoint.metadata import METADATA_KEY

    mean = [103.53, 116.28, 123.675]
    cfg, model = _record_cfg_model("MODEL.PIXEL_MEAN", mean, "INPUT.FORMAT", "BGR")
    assert float(torch.tensor(103.53, dtype=torch.float32)) != 103.53  # the model's copy differs
    path = _save_detector(tmp_path, cfg, model)
    rec = torch.load(path, weights_only=True)[METADATA_KEY]
    assert rec["input"]["format"] == "BGR" and list(rec["input"]["pixel_mean"]) == mean
    ck = ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    attach_weights_record(ck, cfg)
    first = ck.checkpointables[METADATA_KEY]
    assert isinstance(first, WeightsRecord) and first.state_dict()["input"]["format"] == "BGR"
    assert list(first.state_dict()["input"]["pixel_std"]) == list(cfg.MODEL.PIXEL_STD)
    attach_weights_record(ck, None)
    assert ck.checkpointables[METADATA_KEY] is first
