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
from resnext_det.checkpoint.readers import CheckpointReadError
from resnext_det.data.robust import SkipUnreadableImages, training_dataset_dicts, unusable_boxes
from resnext_det.engine import Trainer, setup_cfg
from resnext_det.engine.cli import run_tool
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
    from resnext_det.engine.cli import cli
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
