"""Issue #12, as a hostile and an unlucky user meet the project: files that would run code,
runs killed while a checkpoint is written, stale results, bad images, full disks."""
import errno
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

import resnext_det  # noqa: F401  registrations
from resnext_det.checkpoint import ResNeXtCheckpointer
from resnext_det.checkpoint.metadata import WeightsConfigError
from resnext_det.checkpoint.readers import CheckpointReadError
from resnext_det.data.robust import SkipUnreadableImages, training_dataset_dicts, unusable_boxes
from resnext_det.engine import Trainer, setup_cfg
from resnext_det.cli.tool import run_tool
from resnext_det.errors import ConfigError, UserError
from resnext_det.unshared.proposals import load_proposal_file
from resnext_det.utils.io import atomic_write, atomic_write_bytes, remove_stale_temporaries
from resnext_det.visualize import run_on_files

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

pytestmark = pytest.mark.usefixtures("one_thread")


class _Evil:
    """A pickle that runs a shell command when loaded (what a hostile .pkl does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": np.zeros(1, np.float32)}, "__author__": "x", "y": _Evil(marker)}, f)


def _tiny_model(tmp_path):
    cfg = setup_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(tmp_path)])
    return cfg, Trainer.build_model(cfg)


# --------------------------------------------------------------------------- security
def test_a_weights_pickle_never_runs_its_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    _evil_pickle(evil, marker)
    cfg, model = _tiny_model(tmp_path)
    with pytest.raises(CheckpointReadError, match="refused to unpickle.*RESNEXT_DET_TRUST_PICKLE"):
        ResNeXtCheckpointer(model, cfg=cfg).load(str(evil))
    assert not marker.exists()
    # ... nor through a .pth (torch.save of an object that runs code when loaded).
    evil_pth = tmp_path / "evil.pth"
    torch.save({"model": {}, "y": _Evil(marker)}, evil_pth)
    with pytest.raises(CheckpointReadError, match="RESNEXT_DET_TRUST_PICKLE"):
        ResNeXtCheckpointer(model, cfg=cfg).load(str(evil_pth))
    assert not marker.exists()
    # ... nor a proposal file.
    with pytest.raises(CheckpointReadError, match="refused"):
        load_proposal_file(str(evil))
    assert not marker.exists()


@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_train_net_refuses_a_code_running_pickle_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    _evil_pickle(evil, marker)
    for extra in ([], ["--eval-only"]):
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", CONFIG, *extra,
             *TINY, "MODEL.WEIGHTS", str(evil), "OUTPUT_DIR", str(tmp_path / "o")],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert r.returncode == 2, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("train_net.py: error:") and "refused to unpickle" in last, last
        assert "Traceback" not in r.stderr
        assert not marker.exists()


# --------------------------------------------------------------------------- crash and resume
_KILLER = textwrap.dedent(
    """
    import os, signal, sys, torch
    real_save = torch.save
    def save(obj, f, *a, **k):
        name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
        if "model_final" in name:
            f.write(b"PK\\x03\\x04 a few bytes of the start")  # then the machine dies
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save
    from resnext_det.cli.train_net import cli
    cli(sys.argv[1:])
    """
)


@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_a_kill_while_model_final_is_written_leaves_a_run_that_resumes(tmp_path):
    """SOLVER.CHECKPOINT_PERIOD divides MAX_ITER (as in `make demo`): killed inside the write
    of model_final.pth, the run resumes at MAX_ITER, writes a complete model_final.pth and
    leaves no temporary file; before, model_final.pth was truncated for good."""
    out = tmp_path / "run"
    args = ["--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
            "OUTPUT_DIR", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _KILLER, *args], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (out / "model_final.pth").exists()  # never a prefix under the real name
    assert [f for f in os.listdir(out) if ".tmp-" in f]  # the killed write's temporary
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--resume", *args],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 1 and "backbone.bottom_up.stem.conv1.weight" in final["model"]
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # cleaned on the next start


def _two_checkpoints(tmp_path):
    cfg, model = _tiny_model(tmp_path)
    ck = ResNeXtCheckpointer(model, str(tmp_path), cfg=cfg)
    ck.save("model_0000001", iteration=1)
    ck.save("model_0000003", iteration=3)
    return cfg, model


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


def test_trusting_a_pickle_is_the_users_explicit_choice(tmp_path, monkeypatch):
    """RESNEXT_DET_TRUST_PICKLE=1, and only "1", lets a pickle that runs code load (here a
    harmless `touch`), through a .pkl and a .pth alike."""
    from resnext_det.checkpoint.readers import safe_pickle_load, torch_load_weights

    marker = tmp_path / "ran"
    _evil_pickle(tmp_path / "evil.pkl", marker)
    torch.save({"model": {}, "y": _Evil(marker)}, tmp_path / "evil.pth")
    for value in ("0", "true"):
        monkeypatch.setenv("RESNEXT_DET_TRUST_PICKLE", value)
        for load in (safe_pickle_load, torch_load_weights):
            with pytest.raises(CheckpointReadError):
                load(str(tmp_path / ("evil.pkl" if load is safe_pickle_load else "evil.pth")))
    assert not marker.exists()
    monkeypatch.setenv("RESNEXT_DET_TRUST_PICKLE", "1")
    assert "model" in safe_pickle_load(str(tmp_path / "evil.pkl")) and marker.exists()
    marker.unlink()
    assert "model" in torch_load_weights(str(tmp_path / "evil.pth")) and marker.exists()


def test_truncated_weights_are_one_line_not_oserror(tmp_path):
    cfg, model = _two_checkpoints(tmp_path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "model_0000003.pth").read_bytes()[: 24 * 1024])
    with pytest.raises(CheckpointReadError, match="truncated"):
        ResNeXtCheckpointer(model, cfg=cfg).load(str(cut))


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


def test_interrupted_writes_leave_no_temporaries(tmp_path):
    target = tmp_path / "model_final.pth"
    target.write_bytes(b"old")

    def dies(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), dies)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model_final.pth"]
    # What a kill -9 leaves (ours, and the 0.1 writer's names) goes at the next start.
    for name in (".model_final.pth.tmp-x1y2", "config.yaml.tmp4242", ".model_0000001.pth.tmp-ab"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == 3
    assert os.listdir(tmp_path) == ["model_final.pth"]


def test_a_full_disk_is_one_line(tmp_path, capsys):
    def write():
        def no_space(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model_final.pth"))

        atomic_write(str(tmp_path / "model_final.pth"), no_space)

    assert run_tool(write, "train_net.py") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_net.py: error: no space left") and "model_final.pth" in err
    assert os.listdir(tmp_path) == []


def test_cuda_without_a_gpu_runs_on_the_cpu_and_says_so(caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with caplog.at_level(logging.WARNING):
        cfg = setup_cfg(CONFIG, ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == "cpu" and "no CUDA device" in caplog.text


# --------------------------------------------------------------------------- bad data
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


def _dict(path):
    return {"file_name": str(path), "height": 64, "width": 64, "image_id": 0,
            "annotations": [{"bbox": [4, 4, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]}


def test_unreadable_training_images_are_skipped_by_name(tmp_path, caplog):
    good, cut, noise, deep = _images(tmp_path)
    cfg = setup_cfg(CONFIG, TINY)
    mapper = SkipUnreadableImages(DatasetMapper(cfg, True))
    assert mapper(_dict(good))["image"].shape[0] == 3
    with caplog.at_level(logging.WARNING):
        for bad in (cut, noise, deep):
            assert mapper(_dict(bad)) is None
    for bad in (cut, noise, deep):
        assert str(bad) in caplog.text
    assert "more than 8 bits" in caplog.text  # the 16-bit PNG is named as such, not trained white
    assert len(mapper.skipped) == 3


def test_dropped_boxes_are_counted_per_dataset(tmp_path, caplog):
    good = _images(tmp_path)[0]
    anns = [
        {"bbox": [4, 4, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [4, 4, 0, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},  # zero width
        {"bbox": [30, 30, 10, 10], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # negative
        {"bbox": [70, 70, 90, 90], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # outside 64x64
        {"bbox": [0, 0, 0, 0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 1},
    ]
    d = dict(_dict(good), annotations=anns)
    assert unusable_boxes([d]) == {"zero-area or negative size": 2, "outside the image": 1}
    name = "reliability_boxes"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [dict(d)])
        MetadataCatalog.get(name).thing_classes = ["a"]
    cfg = setup_cfg(CONFIG, TINY + ["DATASETS.TRAIN", f"('{name}',)"])
    with caplog.at_level(logging.WARNING):
        assert len(training_dataset_dicts(cfg)) == 1
    assert f"{name}: training drops 3 box(es)" in caplog.text


class _FakePredictor:
    metadata = MetadataCatalog.get("reliability_fake")

    def __call__(self, image):
        inst = Instances(image.shape[:2])
        inst.pred_boxes = Boxes(torch.tensor([[1.0, 1.0, 10.0, 10.0], [2.0, 2.0, 5.0, 5.0]]))
        inst.scores = torch.tensor([0.9, 0.1])
        inst.pred_classes = torch.tensor([0, 0])
        return {"instances": inst}


def test_demo_skips_a_corrupt_image_and_goes_on(tmp_path, caplog):
    good, cut, noise, _ = _images(tmp_path)
    files = [str(noise), str(good)]
    outputs = {f: str(tmp_path / "out" / os.path.basename(f)) for f in files}
    with caplog.at_level(logging.INFO):
        records, skipped = run_on_files(_FakePredictor(), files, outputs, threshold=0.5)
    assert skipped == [str(noise)] and [r["file"] for r in records] == [str(good)]
    assert len(records[0]["instances"]) == 1  # the 0.1 detection is below the threshold ...
    assert "1 more below --confidence-threshold 0.5" in caplog.text  # ... and the log says so
    assert os.path.isfile(outputs[str(good)])


@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_prepare_coco_finds_the_images_training_would_skip(tmp_path):
    val = tmp_path / "coco" / "val2017"
    val.mkdir(parents=True)
    good, cut, noise, deep = _images(val)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "datasets", "prepare_coco.py"), "--check", "--root", str(tmp_path),
         "--datasets", "coco_2017_val", "--verify-images"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    unreadable = [line for line in r.stdout.splitlines() if "UNREADABLE" in line]
    assert sorted(os.path.basename(line.split(": ")[0].split()[-1]) for line in unreadable) == [
        "cut.jpg", "deep.png", "noise.jpg"]
    assert "3 image(s) that training would skip" in r.stdout


# --------------------------------------------------------------------------- checkpoint loading (issue #16)
def _record_cfg_model(*opts):
    """A tiny FPN detector (tests/test_convert_pretrained.py's tiny_cfg) and its config."""
    from detectron2.modeling import build_model

    from test_convert_pretrained import tiny_cfg

    cfg = tiny_cfg("FPN", *opts)
    return cfg, build_model(cfg)


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


def test_resume_or_load_resumes_by_default_as_detectron2_does(tmp_path):
    """Detectron2's resume_or_load(path) resumes unless resume=False: a default of False
    restarted every resumed run from MODEL.WEIGHTS."""
    ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).save("model_0000005", iteration=5)
    assert ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).resume_or_load("")["iteration"] == 5
    assert ResNeXtCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).resume_or_load("", resume=False) == {}


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


# --------------------------------------------------------------------------- metadata (issue #16)
def test_metadata_round_trips_with_its_version_and_refuses_a_newer_one():
    """to_dict records METADATA_VERSION under "version" and from_dict reads back the same
    record (input, architecture, norm kind, provenance); a record of a newer resnext_det is
    refused, telling to update."""
    import dataclasses

    from resnext_det.checkpoint.metadata import CONVENTIONS, METADATA_VERSION, WeightsMetadata, spec_of_model

    cfg, model = _record_cfg_model()
    for norm in ("BN", "affine", "GN"):
        meta = WeightsMetadata(kind="backbone", input=CONVENTIONS["msra"][0], arch=spec_of_model(model),
                               source={"format": "caffe2", "sha256": "ab"}, weights_norm=norm)
        d = meta.to_dict()
        assert d["version"] == METADATA_VERSION == 1
        back = WeightsMetadata.from_dict(d)
        assert back.to_dict() == d and back.input == meta.input and back.weights_norm == norm
        assert back.arch.same_shapes(meta.arch) and back.source == {"format": "caffe2", "sha256": "ab"}
    with pytest.raises(ValueError, match="update resnext_det"):
        WeightsMetadata.from_dict(dict(d, version=METADATA_VERSION + 1))
    # The stride's place survives the trip; nothing known is null, and reads back as nothing.
    arch = dataclasses.replace(spec_of_model(model), stride_in_1x1=True)
    d = WeightsMetadata(kind="backbone", input=None, arch=arch, weights_norm="affine").to_dict()
    assert d["arch"]["stride_in_1x1"] is True and WeightsMetadata.from_dict(d).arch.stride_in_1x1 is True
    bare = WeightsMetadata(kind="detector", input=None, arch=None)
    assert bare.to_dict() == {"version": 1, "kind": "detector", "input": None, "arch": None, "source": None}
    assert WeightsMetadata.from_dict(bare.to_dict()) == bare
    # A record written before "version" and "norm" existed: version 1, BN-trained weights.
    old = {"kind": "backbone", "input": None, "arch": {k: v for k, v in d["arch"].items() if k != "norm"}}
    back = WeightsMetadata.from_dict(old)
    assert back.weights_norm == "BN" and back.arch.stride_in_1x1 is True and back.arch.same_shapes(arch)
    for bad in ({"version": 1, "input": None}, ["kind"], None):
        with pytest.raises(ValueError, match="not resnext_det weights metadata"):
            WeightsMetadata.from_dict(bad)


def test_metadata_from_a_model_records_its_convention_and_norm_kind():
    """The config's (or, without one, the model's own) input convention on the 0-255 scale,
    the trunk's architecture, and GN weights recorded as GN, BN-family ones as BN; a model
    without these attributes records nothing."""
    from resnext_det.checkpoint.metadata import metadata_from_model, spec_of_model

    opts = ["MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0], "MODEL.PIXEL_STD", [4.0, 5.0, 6.0], "INPUT.FORMAT", "RGB"]
    cfg, model = _record_cfg_model(*opts)
    for m in (metadata_from_model(model, cfg, kind="backbone"), metadata_from_model(model)):
        assert (m.input.format, m.input.scale, m.input.pixel_mean, m.input.pixel_std) == (
            "RGB", "0-255", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
        assert m.arch is spec_of_model(model) and m.weights_norm == "BN"
    assert metadata_from_model(model, cfg, kind="backbone").kind == "backbone"
    assert metadata_from_model(model).kind == "detector"
    gn = ["MODEL.RESNEXT.BOTTLENECK_WIDTH", 16, "MODEL.RESNEXT.RES2_OUT_CHANNELS", 64,
          "MODEL.RESNEXT.STEM_OUT_CHANNELS", 32, "MODEL.RESNEXT.NORM", "GN"]
    cfg, model = _record_cfg_model(*gn)
    assert metadata_from_model(model, cfg).weights_norm == "GN"
    nothing = metadata_from_model(torch.nn.Linear(2, 2))
    assert (nothing.input, nothing.arch, nothing.weights_norm) == (None, None, "BN")


def test_flipped_conventions_swap_the_channel_order_and_back():
    """RGB <-> BGR with mean and std reversed (hand values: torchvision's x 255)."""
    from resnext_det.checkpoint.metadata import InputConvention

    rgb = InputConvention("RGB", "0-1", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    bgr = rgb.flipped()
    assert (bgr.format, bgr.scale, bgr.pixel_mean, bgr.pixel_std) == (
        "BGR", "0-1", (103.53, 116.28, 123.675), (57.375, 57.12, 58.395))
    assert bgr.flipped() == rgb and bgr.flipped().format == "RGB"


def test_opt_values_read_back_as_yacs_parses_them():
    """Each value, as one command-line item, is what yacs' merge_from_list decodes back:
    the strings "True"/"False"/"None"/"" stay strings, booleans stay booleans."""
    from yacs.config import CfgNode

    from resnext_det.checkpoint.metadata import _opt_value

    values = ["True", "False", "None", "", "w.pth", "3x", "-x", "[a]", "1e5", "[1, 2]", "-5", "(1,)", "'q'", "BGR",
              True, False, None, 3, 1.5,
              [1.0, 2.5, 3.0], [], ["a", "b"], [True]]
    for v in values:
        s = _opt_value(v)
        assert isinstance(s, str)
        back = CfgNode._decode_cfg_value(s)
        assert back == v and type(back) is type(v), (v, s, back)


def test_config_yaml_without_a_header_has_no_comment():
    """config_yaml(pairs) with no header: the yaml starts with the keys (no stray comment)."""
    from resnext_det.checkpoint.metadata import config_yaml

    text = config_yaml([("MODEL.WEIGHTS", "w.pth"), ("INPUT.FORMAT", "BGR")])
    assert text.splitlines()[0] == "MODEL:" and "#" not in text
    assert config_yaml([("INPUT.FORMAT", "BGR")], header="made by x").splitlines()[0] == "# made by x"


def test_close_tolerates_rounding_not_another_value():
    """Means/stds match within 1e-4 relative or 1e-3 absolute (hand values at each edge),
    and only with as many channels."""
    from resnext_det.checkpoint.metadata import _close

    assert _close([0.0, 1.0, 100.0], [0.0009, 1.0009, 100.009])
    assert not _close([0.0], [0.0011])  # outside 1e-3 near zero
    assert not _close([100.0], [100.011])  # outside 1e-4 relative
    assert _close([57.375], [57.3794])  # inside 1e-4 * 57.38 = 0.0057
    assert not _close([1.0, 2.0], [1.0, 2.0, 3.0]) and not _close([1.0, 2.0, 3.0], [1.0, 2.0])


def _mismatch(meta, cfg, model):
    from resnext_det.checkpoint.metadata import check_weights_against_config

    with pytest.raises(WeightsConfigError) as e:
        check_weights_against_config(meta, cfg, model=model)
    problems, _, fix = str(e.value).partition("\nSet in the config (or append to the command line):\n")
    assert problems.startswith("The checkpoint ")  # no file given: not "MODEL.WEIGHTS = ''"
    import shlex

    return problems, shlex.split(fix)  # as a shell splits the line appended to a command


def test_each_disagreement_names_its_key_and_the_printed_fix_makes_it_agree():
    """Stride placement, channel order, mean and std: the problem line names the key and
    the stride's place, and the printed KEY VALUE line, merged into the config (the model
    rebuilt), passes the check; an agreeing record passes with no warning."""
    import dataclasses

    from detectron2.modeling import build_model

    from resnext_det.checkpoint.metadata import check_weights_against_config, metadata_from_model

    cfg, model = _record_cfg_model()
    meta = metadata_from_model(model, cfg)
    assert check_weights_against_config(meta, cfg, model=model) == []
    flip = dataclasses.replace(meta.arch, stride_in_1x1=not meta.arch.stride_in_1x1)
    cases = {
        "MODEL.RESNEXT.STRIDE_IN_1X1": dataclasses.replace(meta, arch=flip),
        "INPUT.FORMAT": dataclasses.replace(meta, input=meta.input.flipped()),
        "MODEL.PIXEL_MEAN": dataclasses.replace(meta, input=dataclasses.replace(meta.input, pixel_mean=(1, 2, 3))),
        "MODEL.PIXEL_STD": dataclasses.replace(meta, input=dataclasses.replace(meta.input, pixel_std=(4, 5, 6))),
    }
    for key, bad in cases.items():
        problems, fix = _mismatch(bad, cfg, model)
        assert key in problems and key in fix, (key, problems, fix)
        fixed = cfg.clone()
        fixed.merge_from_list(fix)
        check_weights_against_config(bad, fixed, model=build_model(fixed))  # no error
    # Channel order both ways; BGR weights under an RGB config also get the --to-rgb way out.
    for weights_fmt in ("RGB", "BGR"):
        c, m = _record_cfg_model("INPUT.FORMAT", "BGR" if weights_fmt == "RGB" else "RGB")
        wm = metadata_from_model(m, c)
        other_order = dataclasses.replace(wm, input=dataclasses.replace(wm.input, format=weights_fmt))
        problems, fix = _mismatch(other_order, c, m)
        assert fix == ["INPUT.FORMAT", weights_fmt] and ("--to-rgb" in problems) == (weights_fmt == "BGR")
        assert f"trained on {weights_fmt} input, the config feeds {c.INPUT.FORMAT}" in problems
        assert weights_fmt == "BGR" or problems.endswith(f"the config feeds {c.INPUT.FORMAT}")  # no hint
    # Both ways: the weights' place of the stride and the config's, each named.
    cfg2, model2 = _record_cfg_model("MODEL.RESNEXT.STRIDE_IN_1X1", not meta.arch.stride_in_1x1)
    for weights_meta, c, m in ((cases["MODEL.RESNEXT.STRIDE_IN_1X1"], cfg, model), (meta, cfg2, model2)):
        problems, _ = _mismatch(weights_meta, c, m)
        w, here = ("first 1x1", "3x3") if weights_meta.arch.stride_in_1x1 else ("3x3", "first 1x1")
        assert f"trained with the stride on the {w} conv, the config puts it on the {here} conv" in problems
    other = dataclasses.replace(meta, arch=dataclasses.replace(meta.arch, cardinality=4, bottleneck_width=2))
    problems, fix = _mismatch(other, cfg, model)
    assert "STRIDE_IN_1X1" not in problems + " ".join(fix)  # the stride's place agrees: not named
    assert "MODEL.RESNEXT.PRESET" in problems and "CARDINALITY" in problems
    assert fix[fix.index("MODEL.RESNEXT.CARDINALITY") + 1] == "4"


def test_a_config_input_format_without_a_known_convention_is_refused_unless_no_config():
    """A config feeding another INPUT.FORMAT than RGB/BGR (YUV) with weights trained on BGR:
    refused naming INPUT.FORMAT and the config's value. Without a config, a model that does
    not say its input convention cannot be checked: no error."""
    from resnext_det.checkpoint.metadata import CONVENTIONS, WeightsMetadata, check_weights_against_config

    cfg, model = _record_cfg_model()
    meta = WeightsMetadata(kind="backbone", input=CONVENTIONS["fair"][0], arch=None)
    yuv = cfg.clone()
    yuv.INPUT.FORMAT = "YUV-BT.601"
    problems, fix = _mismatch(meta, yuv, model)
    assert "INPUT.FORMAT" in problems and "'YUV-BT.601'" in problems and fix == ["INPUT.FORMAT", "BGR"]
    assert check_weights_against_config(meta, None, model=torch.nn.Linear(2, 2)) == []


def test_the_printed_fix_line_can_be_appended_to_a_command_line():
    """The message says to append its KEY VALUE line to the command line: split as a shell
    splits it, a list value ([1.0, 2.0, 3.0]) must stay one item for merge_from_list."""
    import dataclasses
    import shlex

    from resnext_det.checkpoint.metadata import check_weights_against_config, metadata_from_model

    cfg, model = _record_cfg_model()
    meta = metadata_from_model(model, cfg)
    bad = dataclasses.replace(meta, input=dataclasses.replace(meta.input, pixel_mean=(1.0, 2.0, 3.0)))
    with pytest.raises(WeightsConfigError) as e:
        check_weights_against_config(bad, cfg, model=model)
    line = str(e.value).splitlines()[-1]
    fixed = cfg.clone()
    fixed.merge_from_list(shlex.split(line))
    assert list(fixed.MODEL.PIXEL_MEAN) == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- readers (issue #16)
def _global_pickle(module, name, protocol=2):
    """A pickle that asks for the class module.name (GLOBAL / STACK_GLOBAL opcode), as a
    hostile file does before it calls it."""
    if protocol >= 4:
        m, n = module.encode(), name.encode()
        return b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93."
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


def test_the_safe_unpickler_refuses_every_class_outside_its_list(tmp_path):
    """Only numpy arrays and plain containers: names differing by case, a dotted name under
    an allowed module (protocol 4 resolves it), or a lookalike module are refused without
    being imported; the allowed ones load."""
    import collections

    from resnext_det.checkpoint.readers import safe_pickle_load

    refused = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "getattr"),
               ("numpy", "NDARRAY"), ("Numpy", "ndarray"), ("numpy", "load"), ("numpy.core.multiarray", "Scalar"),
               ("numpy", "core.multiarray._reconstruct"), ("numpy.core.multiarray ", "_reconstruct"),
               ("collections", "OrderedDict.__init__"), ("_codecs", "decode"), ("builtins", "Set"),
               ("detectron2.structures.boxes", "Boxes"), ("subprocess", "Popen")]  # fmt: skip
    for i, (module, name) in enumerate(refused):
        for protocol in (2, 4):
            path = tmp_path / f"g{i}_{protocol}.pkl"
            path.write_bytes(_global_pickle(module, name, protocol))
            with pytest.raises(CheckpointReadError) as e:
                safe_pickle_load(str(path))
            assert f"{module}.{name}" in str(e.value) and repr(str(path)) in str(e.value)
    for module, name, want in [("collections", "OrderedDict", collections.OrderedDict), ("builtins", "set", set),
                               ("builtins", "frozenset", frozenset), ("numpy", "ndarray", np.ndarray)]:
        path = tmp_path / "ok.pkl"
        path.write_bytes(_global_pickle(module, name))
        assert safe_pickle_load(str(path)) is want


def test_a_refused_pickle_names_the_class_the_file_and_the_opt_in(tmp_path):
    """Loading (MODEL.WEIGHTS) and converting (read_weights_file) a pickle that would run
    code: refused naming what it wanted to create, the file and how to allow it; never
    called truncated (it is a complete file), and nothing runs."""
    from resnext_det.checkpoint.readers import read_weights_file, safe_pickle_load

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    _evil_pickle(evil, marker)
    wanted = f"{os.system.__module__}.system"  # posix.system
    with pytest.raises(CheckpointReadError) as e:
        safe_pickle_load(str(evil), what="MODEL.WEIGHTS = 'evil.pkl'")
    msg = str(e.value)
    assert msg.startswith("MODEL.WEIGHTS = 'evil.pkl'") and wanted in msg and "RESNEXT_DET_TRUST_PICKLE=1" in msg
    assert "--trust-pickle" not in msg  # tools/train_net.py has no such flag: the variable is the way
    with pytest.raises(CheckpointReadError) as e:
        read_weights_file(str(evil))
    msg = str(e.value)
    assert repr(str(evil)) in msg and wanted in msg and "--trust-pickle" in msg and "truncated" not in msg
    assert not marker.exists()


def test_python2_pickles_read_their_byte_strings_as_latin1(tmp_path):
    """Detectron (Python 2) .pkl files hold byte strings: read as latin-1, as Detectron2's
    own checkpointer reads them (pickle.load(f, encoding="latin1"))."""
    from detectron2.checkpoint import DetectionCheckpointer

    from resnext_det.checkpoint.readers import read_weights_file, safe_pickle_load

    # protocol 2, {b"caf\xe9": 1, "__author__": b"Detectron", "model": {b"conv1_w": <ndarray>}}
    arr = pickle.dumps(np.arange(3, dtype=np.float32), protocol=2)[2:-1]  # the array, no header / STOP
    data = (b"\x80\x02}(U\x04caf\xe9K\x01U\n__author__U\tDetectronU\x05model}U\x07conv1_w" + arr + b"su.")
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    ref = pickle.loads(data, encoding="latin1")
    assert ref["caf\xe9"] == 1  # what latin-1 gives, by hand
    got = safe_pickle_load(str(path))
    assert got.keys() == ref.keys() and np.array_equal(got["model"]["conv1_w"], np.arange(3, dtype=np.float32))
    ours = ResNeXtCheckpointer(torch.nn.Linear(1, 1))._load_file(str(path))
    theirs = DetectionCheckpointer(torch.nn.Linear(1, 1))._load_file(str(path))
    assert ours.keys() == theirs.keys() and ours["model"].keys() == theirs["model"].keys()
    assert read_weights_file(str(path)).tensors.keys() == {"conv1_w"}


def test_containers_are_sniffed_from_their_first_bytes(tmp_path):
    """Hand-made starts of each format; anything else (an HTML page, a byte that only looks
    like a pickle protocol in second place, a 1-byte file) is "unknown"."""
    from resnext_det.checkpoint.readers import sniff_container

    cases = {
        "zip": b"PK\x03\x04" + b"\0" * 30,
        "pickle": b"\x80\x02}q\x00.",
        "safetensors": (2).to_bytes(8, "little") + b"{}",  # header length, then the JSON header
        "t7": np.array([4, 1], "<i4").tobytes() + b"\0" * 8,
        "unknown": b"<html>404</html>",
    }
    for want, data in cases.items():
        (tmp_path / want).write_bytes(data)
        assert sniff_container(str(tmp_path / want)) == want, want
    # The edges: an empty zip archive, pickle protocols 2..5 (a 2-byte start too), the shortest
    # safetensors file (1-byte header), an 8-byte Torch7 start.
    edges = {b"PK\x05\x06" + b"\0" * 18: "zip", b"\x80\x02": "pickle", b"\x80\x05\x95": "pickle",
             b"\x80\x06\x95": "unknown", (1).to_bytes(8, "little") + b"{": "safetensors",
             (2).to_bytes(8, "little") + b"{": "unknown", np.array([3, 1], "<i4").tobytes(): "t7",
             np.array([3, 2], "<i4").tobytes(): "unknown", np.array([7, 1], "<i4").tobytes(): "unknown"}
    for data, want in edges.items():
        (tmp_path / "x").write_bytes(data)
        assert sniff_container(str(tmp_path / "x")) == want, data
    for data in (b"<\x02html not a pickle", b"A\x05", b"\x02", b"\x80"):
        (tmp_path / "x").write_bytes(data)
        assert sniff_container(str(tmp_path / "x")) == "unknown", data


def test_read_weights_file_errors_name_the_file(tmp_path):
    """Missing, a folder, empty, unknown, a corrupt Torch7 file, keys that are not names,
    no tensors: each a CheckpointReadError that names the file and what is wrong."""
    from resnext_det.checkpoint.readers import read_weights_file

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "page.pth").write_bytes(b"<html>404 Not Found</html>")
    (tmp_path / "bad.t7").write_bytes(np.array([3, 1, 1, 99, 0, 0], "<i4").tobytes())
    torch.save({1: torch.zeros(1)}, tmp_path / "intkeys.pth")
    torch.save({"epoch": 3}, tmp_path / "none.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases = {"missing.pth": "does not exist", ".": "not a file", "empty.pth": "empty (0 bytes)",
             "page.pth": "starts with b'<html>", "bad.t7": "T7ReaderException", "intkeys.pth": "key 1 ",
             "none.pth": "no tensors", "list.pth": "holds a list"}  # fmt: skip
    for name, says in cases.items():
        path = str(tmp_path / name) if name != "." else str(tmp_path)
        with pytest.raises(CheckpointReadError) as e:
            read_weights_file(path)
        assert repr(path) in str(e.value) and says in str(e.value), (name, str(e.value))


def test_read_failure_message_for_a_missing_file_and_a_long_error():
    """A path that is not (or no longer) a file has 0 bytes; the error's text is cut at 300
    characters so that the message stays one readable line."""
    from resnext_det.checkpoint.readers import describe_read_failure

    msg = describe_read_failure("/nonexistent/w.pth", EOFError("Ran out of input"))
    assert msg.startswith("'/nonexistent/w.pth' (0 bytes)") and "EOFError: Ran out of input" in msg
    msg = describe_read_failure("/nonexistent/w.pth", ValueError("Q" * 300 + "Z" * 50), what="MODEL.WEIGHTS = 'w'")
    assert msg.startswith("MODEL.WEIGHTS = 'w' (0 bytes)") and "Q" * 300 in msg and "Z" not in msg


def test_a_wrapper_entry_that_is_not_a_dict_is_skipped(tmp_path):
    """{"model": "resnext50_32x4d", "model_state": {...}} (a name next to the weights): the
    weights are model_state's, the name an extra entry."""
    from resnext_det.checkpoint.readers import read_weights_file

    sd = {"conv1.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    torch.save({"model": "resnext50_32x4d", "model_state": sd, "epoch": 3}, tmp_path / "w.pth")
    got = read_weights_file(str(tmp_path / "w.pth"))
    assert got.tensors.keys() == sd.keys() and got.extra == {"model": "resnext50_32x4d", "epoch": 3}


def test_weights_are_found_inside_each_usual_wrapper_and_ema_only_when_asked():
    """timm's EMA entries only with --use-ema (and then first); otherwise state_dict, model,
    model_state, blobs (Caffe2), module (DataParallel), else the dict itself; --use-ema on a
    file without EMA weights, or a file that is not a dict, is an error naming the file."""
    from resnext_det.checkpoint.readers import _unwrap

    w, ema = {"a": 1}, {"a": 2}
    for key in ("state_dict", "model", "model_state", "blobs", "module"):
        assert _unwrap({key: w, "epoch": 3}, "f.pth", use_ema=False) is w, key
        assert _unwrap({key: w, "state_dict_ema": ema}, "f.pth", use_ema=False) is w, key
    for key in ("state_dict_ema", "model_ema"):
        assert _unwrap({"state_dict": w, key: ema}, "f.pth", use_ema=True) is ema, key
    assert _unwrap({"model": w, "state_dict": ema}, "f.pth", use_ema=False) is ema  # state_dict first
    assert _unwrap({"model_state": w, "blobs": ema}, "f.pth", use_ema=False) is w
    flat = {"conv1.weight": 0}
    assert _unwrap(flat, "f.pth", use_ema=False) is flat
    with pytest.raises(CheckpointReadError, match=r"--use-ema: 'f.pth' has no EMA weights \(no 'state_dict_ema'"):
        _unwrap(flat, "f.pth", use_ema=True)
    with pytest.raises(CheckpointReadError, match=r"'f.pth' holds a list, not a dict"):
        _unwrap([w], "f.pth", use_ema=False)


def test_use_ema_on_a_checkpoint_without_ema_weights_is_refused():
    """--use-ema asks for timm's EMA weights: a checkpoint holding only "state_dict" must be
    refused (as a bare state dict is), not converted from its non-EMA weights."""
    from resnext_det.checkpoint.readers import _unwrap

    with pytest.raises(CheckpointReadError) as e:
        _unwrap({"state_dict": {"a": 1}, "epoch": 3}, "f.pth", use_ema=True)
    msg = str(e.value)
    assert "'state_dict_ema'" in msg and "'state_dict', 'epoch'" in msg and "leave out --use-ema" in msg


def test_heads_only_weights_are_a_detector_checkpoint_and_errors_name_the_file(tmp_path):
    """A dict of head tensors (no trunk) is a detector's, not a backbone; a fresh
    checkpointer reading a bad file names that file."""
    from resnext_det.checkpoint.loading import classify_checkpoint

    t = torch.zeros(1)
    assert classify_checkpoint({"roi_heads.box_predictor.cls_score.weight": t}) == "detector"
    assert classify_checkpoint({"res2.0.conv1.weight": t, "stem.conv1.weight": t}) == "backbone"
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointReadError) as e:
        ResNeXtCheckpointer(torch.nn.Linear(1, 1))._load_file(str(tmp_path / "cut.pth"))
    assert repr(str(tmp_path / "cut.pth")) in str(e.value)


def test_shape_fixes_name_the_key_and_the_value_the_files_shapes_imply():
    """Hand-made shapes for each head: the class count the file was trained for (K + 1
    scores, 4 K boxes, K masks, K keypoints, anchors x K RetinaNet scores), the
    class-agnostic switches (4 boxes, 1 mask), the width keys when only the input width
    differs, the FPN width alone for the heads that follow it, each fix once."""
    from resnext_det.checkpoint.loading import _shape_fixes

    z = torch.zeros

    def fixes(file, model):
        return _shape_fixes(list(file), file, model)

    def one(file, model):
        got = fixes(file, model)
        assert len(got) == 1 and "None" not in got[0], got
        return got[0]

    cls = "roi_heads.box_predictor.cls_score.weight"
    assert one({cls: z(6, 16)}, {cls: z(4, 16)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 5 ")
    cascade = "roi_heads.box_predictor.2.cls_score.bias"
    assert one({cascade: z(9)}, {cascade: z(4)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 8 ")
    assert one({cls: z(4, 32)}, {cls: z(4, 16)}).startswith("MODEL.ROI_BOX_HEAD.FC_DIM ")
    box = "roi_heads.box_predictor.bbox_pred.weight"
    assert one({box: z(4, 16)}, {box: z(12, 16)}) == "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True"
    assert one({box: z(20, 16)}, {box: z(12, 16)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 5 ")
    mask = "roi_heads.mask_head.predictor.weight"
    assert one({mask: z(1, 8, 1, 1)}, {mask: z(3, 8, 1, 1)}) == "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True"
    assert one({mask: z(7, 8, 1, 1)}, {mask: z(3, 8, 1, 1)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 7 ")
    assert one({mask: z(3, 16, 1, 1)}, {mask: z(3, 8, 1, 1)}).startswith("MODEL.ROI_MASK_HEAD.CONV_DIM ")
    kp, kpb = "roi_heads.keypoint_head.score_lowres.weight", "roi_heads.keypoint_head.score_lowres.bias"
    assert one({kp: z(8, 17, 4, 4)}, {kp: z(8, 5, 4, 4)}).startswith("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 17 ")
    assert one({kpb: z(17)}, {kpb: z(5)}).startswith("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 17 ")
    assert one({kp: z(16, 17, 4, 4)}, {kp: z(8, 17, 4, 4)}).startswith("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS ")
    rc, rb = "head.cls_score.weight", "head.bbox_pred.weight"
    assert one({rc: z(45, 16, 3, 3), rb: z(36, 16, 3, 3)},
               {rc: z(27, 16, 3, 3), rb: z(36, 16, 3, 3)}).startswith("MODEL.RETINANET.NUM_CLASSES 5 ")
    anchors = one({rc: z(45, 16, 3, 3), rb: z(36, 16, 3, 3)}, {rc: z(15, 16, 3, 3), rb: z(12, 16, 3, 3)})
    assert anchors.startswith("MODEL.ANCHOR_GENERATOR.") and "9 anchors" in anchors and "model 3)" in anchors
    assert "MODEL.RETINANET.NUM_CLASSES" in one({rc: z(45, 16, 3, 3)}, {rc: z(27, 16, 3, 3), rb: z(36, 16, 3, 3)})
    assert one({rc: z(45, 32, 3, 3), rb: z(36, 32, 3, 3)},
               {rc: z(45, 16, 3, 3), rb: z(36, 16, 3, 3)}).startswith("MODEL.FPN.OUT_CHANNELS / MODEL.RETINANET.NUM_CONVS")
    sem = "sem_seg_head.predictor.weight"
    assert one({sem: z(54, 32, 1, 1)}, {sem: z(10, 32, 1, 1)}).startswith("MODEL.SEM_SEG_HEAD.NUM_CLASSES 54 ")
    assert one({sem: z(10, 64, 1, 1)}, {sem: z(10, 32, 1, 1)}).startswith("MODEL.SEM_SEG_HEAD.CONVS_DIM ")
    trunk = "backbone.bottom_up.res3.0.conv2.weight"
    assert one({trunk: z(8, 2, 3, 3)}, {trunk: z(16, 4, 3, 3)}).startswith("MODEL.RESNEXT.PRESET / DEPTH / CARDINALITY")
    assert one({"roi_heads.res5.0.conv1.weight": z(8, 4, 1, 1)},
               {"roi_heads.res5.0.conv1.weight": z(16, 4, 1, 1)}).startswith("MODEL.RESNEXT.")
    rpn = "proposal_generator.rpn_head.objectness_logits.weight"
    assert one({rpn: z(3, 16, 1, 1)}, {rpn: z(1, 16, 1, 1)}).startswith("MODEL.ANCHOR_GENERATOR.SIZES")
    for key, fix in [("roi_heads.box_head.fc1.weight", "MODEL.ROI_BOX_HEAD.FC_DIM"),
                     ("roi_heads.mask_head.mask_fcn1.weight", "MODEL.ROI_MASK_HEAD.CONV_DIM"),
                     ("roi_heads.keypoint_head.conv_fcn1.weight", "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS")]:
        assert one({key: z(16, 8)}, {key: z(32, 8)}).startswith(fix + " "), key
    assert one({"pixel_decoder.proj.weight": z(2)}, {"pixel_decoder.proj.weight": z(3)}).startswith(
        "the keys that build pixel_decoder.proj ")
    assert one({"pixel_decoder.scale": z(())}, {"pixel_decoder.scale": z(1)}).startswith(  # a 0-d tensor
        "the keys that build pixel_decoder ")
    # The FPN's width decides the RPN's and the box head's: only the width is named for them,
    # the mask head's own width stays; a fix needed by several tensors is named once.
    fpn = {"backbone.fpn_lateral2.weight": z(16, 8, 1, 1), "backbone.fpn_output2.weight": z(16, 16, 3, 3),
           rpn: z(3, 16, 1, 1), "roi_heads.box_head.fc1.weight": z(16, 784), mask: z(3, 16, 1, 1)}
    model = {"backbone.fpn_lateral2.weight": z(32, 8, 1, 1), "backbone.fpn_output2.weight": z(32, 32, 3, 3),
             rpn: z(3, 32, 1, 1), "roi_heads.box_head.fc1.weight": z(16, 1568), mask: z(3, 32, 1, 1)}
    got = fixes(fpn, model)
    assert len(got) == 2 and got[0].startswith("MODEL.FPN.OUT_CHANNELS 16 ") and got[1].startswith("MODEL.ROI_MASK_HEAD.")
    assert fixes({rpn: z(3, 16, 1, 1), "roi_heads.box_head.fc1.weight": z(16, 8)},
                 {rpn: z(1, 16, 1, 1), "roi_heads.box_head.fc1.weight": z(32, 8)})[1].startswith("MODEL.ROI_BOX_HEAD.FC_DIM")


def test_read_weights_file_reads_each_container_and_trusts_only_when_told(tmp_path):
    """A zip (torch.save), a Caffe2 pickle, safetensors: the same tensors, the container
    named, DataParallel's module. prefix dropped and the entries next to the weights kept.
    A file with another Python object (a date) reads with trust_pickle=True only."""
    import datetime

    from safetensors.torch import save_file

    from resnext_det.checkpoint.readers import read_weights_file

    sd = {"conv1.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.ones(2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "arch": "x"}, tmp_path / "a.pth")
    with open(tmp_path / "b.pkl", "wb") as f:
        pickle.dump({"blobs": {k: v.numpy() for k, v in sd.items()}, "__author__": "c2"}, f, protocol=2)
    save_file(sd, str(tmp_path / "c.safetensors"))
    for name, container, extra in (("a.pth", "zip", {"arch": "x"}), ("b.pkl", "pickle", {"__author__": "c2"}),
                                   ("c.safetensors", "safetensors", {})):
        got = read_weights_file(str(tmp_path / name))
        assert (got.path, got.container, got.extra) == (str(tmp_path / name), container, extra), name
        assert got.tensors.keys() == sd.keys() and all(torch.equal(got.tensors[k], v) for k, v in sd.items()), name
    when = datetime.date(2017, 4, 11)
    torch.save({"state_dict": sd, "date": when}, tmp_path / "d.pth")
    with open(tmp_path / "e.pkl", "wb") as f:
        pickle.dump({"blobs": {k: v.numpy() for k, v in sd.items()}, "date": when}, f, protocol=2)
    for name in ("d.pth", "e.pkl"):
        with pytest.raises(CheckpointReadError):
            read_weights_file(str(tmp_path / name))
        got = read_weights_file(str(tmp_path / name), trust_pickle=True)
        assert got.extra == {"date": when} and got.tensors.keys() == sd.keys(), name


# --------------------------------------------------------------------------- round 2 (issue #16)
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


def test_python2_pickles_read_as_latin1_when_trusted_too(tmp_path, monkeypatch):
    """RESNEXT_DET_TRUST_PICKLE=1 (and trust_pickle=True) read a Detectron (Python 2) .pkl as
    the safe path does: its byte strings as latin-1 (pickle's default, ASCII, fails on them)."""
    from resnext_det.checkpoint.readers import read_weights_file, safe_pickle_load

    arr = pickle.dumps(np.arange(3, dtype=np.float32), protocol=2)[2:-1]
    data = (b"\x80\x02}(U\x04caf\xe9K\x01U\n__author__U\tDetectronU\x05model}U\x07conv1_w" + arr + b"su.")
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # the default encoding cannot read them
    monkeypatch.setenv("RESNEXT_DET_TRUST_PICKLE", "1")
    got = safe_pickle_load(str(path))
    assert got["caf\xe9"] == 1 and got["__author__"] == "Detectron"
    assert np.array_equal(got["model"]["conv1_w"], np.arange(3, dtype=np.float32))
    w = read_weights_file(str(path), trust_pickle=True)
    assert w.tensors.keys() == {"conv1_w"} and w.extra["caf\xe9"] == 1


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


def test_a_checkpoint_with_a_non_tensor_entry_names_the_file_and_the_entry(tmp_path):
    """{"model": {"fc.weight": "oops"}} (a string where a tensor belongs): refused naming
    MODEL.WEIGHTS' file and the entry, not an empty message."""
    path = str(tmp_path / "odd.pth")
    torch.save({"model": {"fc.weight": "oops", "fc.bias": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointReadError) as e:
        ResNeXtCheckpointer(torch.nn.Linear(2, 2)).load(path)
    assert repr(path) in str(e.value) and "fc.weight" in str(e.value)


def test_an_unknown_format_shows_only_the_files_first_bytes(tmp_path):
    """A large file of an unknown format: the message quotes its first 16 bytes, not the
    whole file (an HTML page or a video dumped into one error line)."""
    from resnext_det.checkpoint.readers import read_weights_file

    head = b"GARBAGE-HEAD-16b"
    (tmp_path / "big.bin").write_bytes(head + b"x" * 20000 + b"TAIL")
    with pytest.raises(CheckpointReadError) as e:
        read_weights_file(str(tmp_path / "big.bin"))
    msg = str(e.value)
    assert repr(head) in msg and "TAIL" not in msg and len(msg) < 1000


def test_config_pairs_of_a_custom_depth_give_its_depth_and_blocks():
    """A trunk with a non-standard block table (1, 2, 1, 1): DEPTH 3 x 5 + 2 = 17 (the
    paper's count) and STAGE_BLOCKS [1, 2, 1, 1]; a standard one (3, 4, 6, 3): DEPTH 50 and
    no STAGE_BLOCKS. Merged into a config, the pairs build the same trunk."""
    from detectron2.config import get_cfg

    from resnext_det import add_resnext_config
    from resnext_det.checkpoint.metadata import WeightsMetadata, config_pairs, format_opts
    from resnext_det.modeling.spec import ResNeXtSpec

    for blocks, depth, table in (((1, 2, 1, 1), 17, [1, 2, 1, 1]), ((3, 4, 6, 3), 50, [])):
        spec = ResNeXtSpec(stage_blocks=blocks, cardinality=2, bottleneck_width=4)
        pairs = dict(config_pairs(WeightsMetadata("backbone", None, spec)))
        assert pairs["MODEL.RESNEXT.DEPTH"] == depth and pairs["MODEL.RESNEXT.STAGE_BLOCKS"] == table
        cfg = get_cfg()
        add_resnext_config(cfg)
        cfg.merge_from_list(format_opts(list(pairs.items())))
        assert ResNeXtSpec.from_config(cfg).same_shapes(spec)


def test_the_written_yaml_takes_keys_added_as_in_the_projects_configs():
    """config_yaml indents by 2 spaces, as Detectron2's and this project's configs do: a
    block copied from configs/*.yaml into the written file (here ROI_HEADS under MODEL)
    still reads back."""
    import yaml

    from resnext_det.checkpoint.metadata import config_yaml

    pairs = [("MODEL.RESNEXT.CARDINALITY", 4), ("MODEL.PIXEL_STD", [1.0, 2.0, 3.0]), ("INPUT.FORMAT", "BGR")]
    with open(os.path.join(ROOT, "configs", "Base-ResNeXt-C4.yaml")) as f:
        assert "\n  RESNEXT:\n    " in f.read()  # the project's indentation
    lines = config_yaml(pairs).splitlines()
    at = lines.index("MODEL:") + 1
    edited = "\n".join(lines[:at] + ["  ROI_HEADS:", "    NUM_CLASSES: 3"] + lines[at:])
    got = yaml.safe_load(edited)
    assert got["MODEL"]["ROI_HEADS"] == {"NUM_CLASSES": 3} and got["MODEL"]["RESNEXT"] == {"CARDINALITY": 4}
    assert got["MODEL"]["PIXEL_STD"] == [1.0, 2.0, 3.0] and got["INPUT"] == {"FORMAT": "BGR"}
