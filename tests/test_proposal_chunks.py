"""Stage 2 of the Appendix B schedule (``dump_proposals``) saves its work in chunks: a run killed
or preempted loses at most one chunk of images per process, and the rerun computes only the rest.

Every run here is on the 16-image test set of tests/unshared_runs.py with an untrained tiny RPN,
on one process (two ranks are played one after the other by patching Detectron2's ``comm``), and
is checked against what Detectron2's own ``build_detection_test_loader`` and ``ProposalNetwork``
give for the same weights, and against Detectron2's ``InferenceSampler`` for the split of the
images over processes.
"""
import copy
import glob
import logging
import os
import pickle
import signal

import numpy as np
import pytest
import torch

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data.samplers import InferenceSampler
from detectron2.modeling import build_model

from resnext_det.engine import preemption, setup_cfg
from resnext_det.errors import ConfigError
from resnext_det.unshared import dump_proposals, run_schedule, stage_configs
from resnext_det.unshared.proposals import _remaining_dicts
from unshared_runs import DET, N_IMAGES, TEST_DS, _stage1_done, tiny_cfg

PRE, POST = 300, 50  # the test top-k of TINY
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_stop_flag():
    """No stop request leaks into or out of a test."""
    preemption.reset()
    yield
    preemption.reset()


@pytest.fixture(scope="module")
def rpn(tmp_path_factory):
    """The tiny RPN's config, a model with random weights, and the reference: Detectron2's
    ProposalNetwork with those weights (loaded from a checkpoint into a model built again) on
    Detectron2's test loader, ``{image_id: (boxes, logits)}``."""
    folder = tmp_path_factory.mktemp("rpn")
    rpn_cfg = stage_configs(tiny_cfg(folder))["rpn"]
    assert (rpn_cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, rpn_cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (PRE, POST)
    torch.manual_seed(0)
    model = build_model(rpn_cfg).eval()
    DetectionCheckpointer(model, str(folder)).save("rpn")
    ref_model = build_model(rpn_cfg).eval()
    DetectionCheckpointer(ref_model).load(os.path.join(folder, "rpn.pth"))
    ref = {}
    with torch.no_grad():
        for inputs in build_detection_test_loader(rpn_cfg, TEST_DS):
            for inp, out in zip(inputs, ref_model(inputs)):
                p = out["proposals"]
                ref[inp["image_id"]] = (p.proposal_boxes.tensor.numpy(), p.objectness_logits.numpy())
    ids = [d["image_id"] for d in DatasetCatalog.get(TEST_DS)]
    assert len(ids) == N_IMAGES == len(ref) and sorted(map(str, ids)) == sorted(map(str, ref))
    return {"cfg": rpn_cfg, "model": model, "ref": ref, "ids": ids}


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it is computed or written."""


class Seen:
    """A copy of the model whose forward records the image ids it is given; after the image
    number ``stop_after`` it asks for a stop (as a SIGUSR2 would), after ``die_after`` it raises
    (as a SIGKILL would end the process, before that image's output is kept)."""

    def __init__(self, model, stop_after=None, die_after=None):
        self.model, self.ids = copy.deepcopy(model), []
        forward = self.model.forward

        def counting_forward(inputs):
            if die_after is not None and len(self.ids) + len(inputs) > die_after:
                raise Killed()
            self.ids += [inp["image_id"] for inp in inputs]
            out = forward(inputs)
            if stop_after is not None and len(self.ids) >= stop_after:
                preemption.request_stop(signal.SIGUSR2)
            return out

        self.model.forward = counting_forward


def _dump(rpn, model, out_file, *, chunk=3, post=POST, **kw):
    return dump_proposals(model, rpn["cfg"], TEST_DS, str(out_file), pre_nms_topk=PRE,
                          post_nms_topk=post, meta={"rpn": "tiny"}, recall=False,
                          chunk_images=chunk, **kw)  # fmt: skip


def _parts(out_file, rank=0, world=1):
    return sorted(glob.glob(f"{out_file}.shard{rank}of{world}.part*"))


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _assert_as_detectron2(rpn, out_file):
    """``out_file`` holds, in the dataset's order, what Detectron2's ProposalNetwork gives, and
    no chunk or shard is left beside it."""
    data = _load(out_file)
    assert data["ids"] == rpn["ids"]
    assert len(data["boxes"]) == len(data["objectness_logits"]) == N_IMAGES
    for i, boxes, logits in zip(data["ids"], data["boxes"], data["objectness_logits"]):
        ref_boxes, ref_logits = rpn["ref"][i]
        assert boxes.dtype == logits.dtype == np.float32
        np.testing.assert_allclose(boxes, ref_boxes, rtol=0, atol=1e-3, err_msg=str(i))
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=str(i))
    assert not glob.glob(f"{out_file}.shard*"), glob.glob(f"{out_file}.shard*")


def _assert_part_holds(rpn, path, ids):
    part = _load(path)
    assert part["ids"] == ids, path
    for i, boxes in zip(part["ids"], part["boxes"]):
        np.testing.assert_allclose(boxes, rpn["ref"][i][0], rtol=0, atol=1e-3)


@pytest.mark.parametrize("stop_after, sizes", [(7, [3, 3, 1]), (6, [3, 3])])
def test_a_stopped_run_keeps_its_chunks_and_the_rerun_computes_only_the_rest(
    rpn, tmp_path, caplog, stop_after, sizes
):
    """A stop request after image 7 (chunks of 3): the run writes the partial chunk, raises
    Preempted saying what it saved, leaves 3 + 3 + 1 images in chunk files (6 = two full chunks,
    nothing more to write) and no proposal file. The rerun gives the model only the other
    images, in the dataset's order, and writes the file an uninterrupted run gives."""
    out_file = tmp_path / "props.pkl"
    ids = rpn["ids"]
    first = Seen(rpn["model"], stop_after=stop_after)
    with pytest.raises(preemption.Preempted) as e:
        _dump(rpn, first.model, out_file)
    assert e.value.signum == signal.SIGUSR2
    assert f"{stop_after} of the {N_IMAGES} images of {TEST_DS}" in e.value.saved
    assert f"{out_file}.shard0of1.part*" in e.value.saved
    assert first.ids == ids[:stop_after]
    assert not out_file.exists()
    parts = _parts(out_file)
    assert [os.path.basename(p) for p in parts] == [f"props.pkl.shard0of1.part{k:05d}" for k in range(len(sizes))]
    start = 0
    for path, n in zip(parts, sizes):
        _assert_part_holds(rpn, path, ids[start:start + n])
        start += n
    assert start == stop_after

    preemption.reset()
    rerun = Seen(rpn["model"])
    with caplog.at_level(logging.INFO, logger="resnext_det.unshared.proposals"):
        stats = _dump(rpn, rerun.model, out_file)
    assert rerun.ids == ids[stop_after:]
    assert stats["images"] == N_IMAGES
    assert f"{stop_after} of its {N_IMAGES} images found done" in caplog.text
    assert f"{N_IMAGES - stop_after} remain" in caplog.text
    _assert_as_detectron2(rpn, out_file)


def test_a_kill_loses_at_most_the_chunk_being_computed_and_broken_chunks_are_recomputed(rpn, tmp_path):
    """Killed while computing image 10 (chunks of 3): images 1-9 are in three chunk files. One
    chunk cut short (half its bytes) and one overwritten with garbage are ignored: the rerun
    computes their images and the ones never computed, and nothing else."""
    out_file = tmp_path / "props.pkl"
    ids = rpn["ids"]
    killed = Seen(rpn["model"], die_after=9)
    with pytest.raises(Killed):
        _dump(rpn, killed.model, out_file)
    parts = _parts(out_file)
    assert len(parts) == 3
    for k, path in enumerate(parts):
        _assert_part_holds(rpn, path, ids[3 * k:3 * k + 3])
    with open(parts[0], "rb") as f:
        data = f.read()
    with open(parts[0], "wb") as f:
        f.write(data[: len(data) // 2])
    with open(parts[2], "wb") as f:
        f.write(b"not a pickle at all")

    rerun = Seen(rpn["model"])
    _dump(rpn, rerun.model, out_file)
    assert rerun.ids == ids[0:3] + ids[6:]
    _assert_as_detectron2(rpn, out_file)


def test_chunks_of_other_settings_or_another_world_size_are_not_reused(rpn, tmp_path):
    """Chunks of a run with another post-NMS top-k, and chunks with the same settings written
    by process 0 of a 2-process run, are not used by a 1-process run with this top-k: it
    computes every image, and removes them all at the end."""
    out_file = tmp_path / "props.pkl"
    # process 0 of 2 (its share: the first 8 images), stopped after 3 images
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comm, "get_world_size", lambda: 2)
        with pytest.raises(preemption.Preempted):
            _dump(rpn, Seen(rpn["model"], stop_after=3).model, out_file)
    assert len(_parts(out_file, 0, 2)) == 1
    preemption.reset()
    # another top-k, 1 process, stopped after 6 images
    other_topk = Seen(rpn["model"], stop_after=6)
    with pytest.raises(preemption.Preempted):
        _dump(rpn, other_topk.model, out_file, post=20)
    head = other_topk.model.proposal_generator  # its own test top-k again, after the stop
    assert (head.pre_nms_topk[False], head.post_nms_topk[False]) == (PRE, POST)
    other = _parts(out_file)
    assert len(other) == 2 and all(_load(p)["meta"]["post_nms_topk"] == 20 for p in other)
    preemption.reset()

    rerun = Seen(rpn["model"])
    _dump(rpn, rerun.model, out_file)
    assert rerun.ids == rpn["ids"]
    _assert_as_detectron2(rpn, out_file)  # the top-50 boxes; every .shard* file removed


def test_a_whole_share_left_by_the_previous_version_is_reused(rpn, tmp_path):
    """Before chunks, a process wrote its whole share as ``output_file.shard{rank}of{world}``
    at its end: such a file of the same settings (here: the first 4 images) is still reused."""
    out_file = tmp_path / "props.pkl"
    with pytest.raises(preemption.Preempted):
        _dump(rpn, Seen(rpn["model"], stop_after=4).model, out_file, chunk=4)
    (part,) = _parts(out_file)
    os.rename(part, f"{out_file}.shard0of1")
    preemption.reset()
    rerun = Seen(rpn["model"])
    _dump(rpn, rerun.model, out_file)
    assert rerun.ids == rpn["ids"][4:]
    _assert_as_detectron2(rpn, out_file)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 17])
def test_each_process_computes_the_images_detectron2s_inference_sampler_gives_it(monkeypatch, n, world):
    dicts = [{"image_id": f"img{i}"} for i in range(n)]
    done = ["img1", "img4", "img10", "not-in-the-dataset"]
    shares = []
    for rank in range(world):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        monkeypatch.setattr(comm, "get_world_size", lambda: world)
        expected = [dicts[i] for i in InferenceSampler(n)]
        share, remaining = _remaining_dicts(dicts, done, rank, world)
        assert share == expected
        assert remaining == [d for d in expected if d["image_id"] not in done]
        shares += share
    assert shares == dicts


def test_two_processes_each_compute_their_share_and_the_main_one_gathers_them(rpn, tmp_path, monkeypatch):
    """Two processes played one after the other: process 1 (not the main one) is stopped after
    3 of its images, rerun, and computes exactly the rest of the 8 images InferenceSampler gives
    it; then process 0 computes its 8 and gathers both shares into the uninterrupted file."""
    out_file = tmp_path / "props.pkl"
    ids = rpn["ids"]
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    share1 = [ids[i] for i in InferenceSampler(N_IMAGES)]
    assert share1 == ids[8:]
    first = Seen(rpn["model"], stop_after=3)
    with pytest.raises(preemption.Preempted):
        _dump(rpn, first.model, out_file, chunk=2)
    assert first.ids == share1[:3]
    assert [len(_load(p)["ids"]) for p in _parts(out_file, 1, 2)] == [2, 1]
    preemption.reset()
    rerun = Seen(rpn["model"])
    assert _dump(rpn, rerun.model, out_file, chunk=2) == {}  # not the main process
    assert rerun.ids == share1[3:]

    monkeypatch.setattr(comm, "get_rank", lambda: 0)
    share0 = [ids[i] for i in InferenceSampler(N_IMAGES)]
    main = Seen(rpn["model"])
    assert _dump(rpn, main.model, out_file, chunk=2)["images"] == N_IMAGES
    assert main.ids == share0 == ids[:8]
    _assert_as_detectron2(rpn, out_file)


def test_chunk_images_comes_from_the_config_and_must_be_positive(tmp_path, monkeypatch):
    """UNSHARED.PROPOSALS.CHUNK_IMAGES (default 1000) is what stage 2 gives dump_proposals for
    every dataset; a value below 1 is refused naming the key; it is not part of what the
    proposals are made from (a finished stage 2 is not reported as made with another config)."""
    from resnext_det.unshared import stages

    assert tiny_cfg(tmp_path).UNSHARED.PROPOSALS.CHUNK_IMAGES == 1000
    cfg = setup_cfg(os.path.join(DET, "faster_rcnn_X_101_32x4d_C4_appendixB.yaml"),
                    ["OUTPUT_DIR", str(tmp_path), "UNSHARED.PROPOSALS.CHUNK_IMAGES", "7"])  # fmt: skip
    asked = {}

    def record(model, cfg_, name, path, **kw):
        asked[name] = kw.get("chunk_images")
        return {"file": path}

    monkeypatch.setattr(stages, "load_model", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(stages, "dump_proposals", record)
    _stage1_done(cfg)
    run_schedule(cfg, stage="proposals")
    assert asked == {"coco_2014_train": 7, "coco_2014_valminusminival": 7, "coco_2014_minival": 7}

    stage_configs(tiny_cfg(tmp_path, "UNSHARED.PROPOSALS.CHUNK_IMAGES", "1"))
    for bad in ("0", "-3"):
        with pytest.raises(ConfigError, match=rf"UNSHARED\.PROPOSALS\.CHUNK_IMAGES .*got {bad}"):
            stage_configs(tiny_cfg(tmp_path, "UNSHARED.PROPOSALS.CHUNK_IMAGES", bad))
        with pytest.raises(ConfigError, match=r"UNSHARED\.PROPOSALS\.CHUNK_IMAGES"):
            run_schedule(tiny_cfg(tmp_path, "UNSHARED.PROPOSALS.CHUNK_IMAGES", bad))
    with pytest.raises(ValueError, match="chunk_images"):
        dump_proposals(torch.nn.Identity(), cfg, TEST_DS, str(tmp_path / "x.pkl"),
                       pre_nms_topk=1, post_nms_topk=1, chunk_images=0)  # fmt: skip

    cfgs = stage_configs(cfg)
    assert "UNSHARED.PROPOSALS.CHUNK_IMAGES" not in stages.config_identity(cfgs["rpn"], "proposals")
    assert "UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK" in stages.config_identity(cfgs["rpn"], "proposals")
