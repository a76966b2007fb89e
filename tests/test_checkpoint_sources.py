"""Tests of resnext_det/checkpoint/sources.py: the weights of a MODEL.WEIGHTS name
(``fetch_weights``) downloaded once, checked, converted and cached (issue #13); corrupt downloads
never enter the cache; offline, one line with the manual steps; the cache folder.

Offline: every file is made here and served by an HTTP server on 127.0.0.1 that the test
starts and stops (tests/file_servers.py; ``RESNEXT_DET_MIRROR`` points the named sources at
it). What the names resolve to (resnext_det/checkpoint/names.py): tests/test_checkpoint_names.py."""
import contextlib
import errno
import hashlib
import io
import logging
import os
import pickle
import re
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from resnext_det.checkpoint import WeightsConfigError, WeightsSourceError, fetch_weights, resolve_source
from resnext_det.checkpoint.sources import cached_paths

from file_servers import FileServer, LocalServer, StallingServer, closed_port
from weights_helpers import (
    FAIR_BGR_LINES,
    PUBLISHED,
    RGB_LINES,
    ROOT,
    STAGES,
    TOL,
    X26_LINES,
    detector_cfg,
    detector_stages,
    load_detector,
    normalized_input,
    randomize_bn,
    rel_err,
    tv_resnext,
    tv_stages,
    tv_to_caffe2_blobs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """``serve(files, ...)`` -> a running FileServer that every named source
    downloads from (the mirror), with an empty cache in ``tmp_path``."""
    servers = []
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))

    def start(files, **kw):
        s = FileServer(files, **kw)
        monkeypatch.setenv("RESNEXT_DET_MIRROR", s.url)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def cache_files(tmp_path):
    root = tmp_path / "cache"
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "locks" not in p.parts
    ) if root.exists() else []


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def x26_bytes():
    return torch_bytes(tv_resnext(seed=1).state_dict())


# --------------------------------------------------------------------------
# Download once, convert with the converter, cache; then the cache only
# --------------------------------------------------------------------------
def test_first_use_downloads_converts_caches_and_second_use_reads_only_the_cache(serve, tmp_path, caplog):
    from timm.models.resnet import Bottleneck, ResNet

    torch.manual_seed(3)
    tm = randomize_bn(ResNet(block=Bottleneck, layers=[2, 2, 2, 2], cardinality=4, base_width=4), 3).eval()
    data = safetensors_bytes({k: v.contiguous() for k, v in tm.state_dict().items()})
    path = "/huggingface.co/timm/resnext50_32x4d.a1h_in1k/resolve/main/model.safetensors"
    server = serve({path: data}, headers={path: {"X-Linked-Etag": f'"{sha256(data)}"'}})  # the Hub's sha256
    name = "timm://resnext50_32x4d.a1h_in1k"
    cfg = detector_cfg("FPN", [("MODEL.WEIGHTS", name), *X26_LINES, *RGB_LINES])
    x = normalized_input(seed=5)
    ref = tv_stages(tm, x)  # timm's own network

    with caplog.at_level(logging.INFO, logger="resnext_det"):
        ours = detector_stages(load_detector(cfg), x)
    assert server.hits == {path: 1}
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, s
    src = resolve_source(name)
    paths = cached_paths(src, str(tmp_path / "cache"))
    assert open(paths["download"], "rb").read() == data  # the published file, kept
    ckpt = torch.load(paths["converted"], weights_only=True)
    meta = ckpt["resnext_det"]
    assert meta["input"]["format"] == "RGB" and meta["source"]["name"] == name
    assert meta["source"]["url"] == PUBLISHED[name] and meta["source"]["sha256"] == sha256(data)
    assert cache_files(tmp_path) == sorted(
        ["downloads/huggingface/timm/resnext50_32x4d.a1h_in1k/model.safetensors",
         "converted/huggingface/timm/resnext50_32x4d.a1h_in1k/model.pth"]
    )
    assert "downloading" in caplog.text and "converted" in caplog.text

    server.stop()  # the second run: no network needed, nothing downloaded
    ours = detector_stages(load_detector(cfg), x)
    assert server.hits == {path: 1}
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, s


def test_torch7_release_name_is_converted_on_the_fly(serve, tmp_path):
    from test_weights_torch7 import resnext_t7_from_torchvision, write_t7

    tv = tv_resnext(seed=6)
    write_t7(tmp_path / "made.t7", resnext_t7_from_torchvision(tv))
    path = "/dl.fbaipublicfiles.com/resnext/imagenet_models/resnext_101_32x4d.t7"
    serve({path: (tmp_path / "made.t7").read_bytes()})
    cfg = detector_cfg("C4", [("MODEL.WEIGHTS", "torch7://resnext_101_32x4d"), *X26_LINES, *RGB_LINES])
    x = normalized_input(seed=2)
    ours, ref = detector_stages(load_detector(cfg), x), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, s


def test_detectron2_fair_name_records_bgr_and_is_checked_against_the_config(serve, tmp_path):
    tv = tv_resnext(seed=7)
    blobs = tv_to_caffe2_blobs(tv.state_dict())
    path = "/dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/FAIR/X-101-32x8d.pkl"
    serve({path: pickle.dumps({"blobs": blobs}, protocol=2)})
    name = "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"
    # The shipped RGB base: refused, with the lines to set.
    cfg = detector_cfg("FPN", [("MODEL.WEIGHTS", name), *X26_LINES])
    with pytest.raises(WeightsConfigError) as e:
        load_detector(cfg)
    assert "INPUT.FORMAT BGR MODEL.PIXEL_MEAN '[103.53, 116.28, 123.675]' MODEL.PIXEL_STD '[57.375, 57.12, 58.395]'" in str(e.value)
    # With them: the features of the source on the same (BGR) input.
    cfg = detector_cfg("FPN", [("MODEL.WEIGHTS", name), *X26_LINES, *FAIR_BGR_LINES])
    x = normalized_input(seed=4)
    ours, ref = detector_stages(load_detector(cfg), x), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, s


def test_timm_mean_std_and_the_names_provenance_reach_the_converted_file(serve, monkeypatch):
    """A timm pretrained_cfg's mean/std (0-1 scale) are the input convention of the
    converted file, on Detectron2's 0-255 scale, and the file records the name and
    the URL it came from. Catches a mean or std not handed to the converter."""
    import timm.models
    from timm.models import PretrainedCfg

    cfg = PretrainedCfg(hf_hub_id="timm/resnext50_32x4d.test_in1k", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: cfg)
    tv = tv_resnext(seed=4)
    path = "/huggingface.co/timm/resnext50_32x4d.test_in1k/resolve/main/model.safetensors"
    serve({path: safetensors_bytes({k: v.contiguous() for k, v in tv.state_dict().items()})})
    name = "timm://resnext50_32x4d.test_in1k"
    meta = torch.load(fetch_weights(name, progress=False), weights_only=True)["resnext_det"]
    assert meta["input"]["format"] == "RGB"
    assert meta["input"]["pixel_mean"] == pytest.approx([127.5, 127.5, 127.5])  # 255 * 0.5
    assert meta["input"]["pixel_std"] == pytest.approx([63.75, 127.5, 255.0])  # 255 * (0.25, 0.5, 1)
    assert meta["source"]["name"] == name
    assert meta["source"]["url"] == "https://huggingface.co" + path[len("/huggingface.co"):]


def test_detector_checkpoint_by_url_is_cached_as_published_and_then_read_from_the_cache(serve, tmp_path):
    """A detector checkpoint (keys 'backbone.*') is not converted: it goes to
    detectors/ byte for byte, nothing in downloads/ or converted/, and the next
    run takes it from the cache without the network."""
    data = torch_bytes({"model": {"backbone.bottom_up.stem.conv1.weight": torch.randn(4, 3, 3, 3),
                                  "roi_heads.box_predictor.cls_score.bias": torch.randn(3)}})
    server = serve({"/zoo/det.pth": data, "/zoo/det2.pth": data})
    name = f"{server.url}/zoo/det.pth"
    out = fetch_weights(name, progress=False)
    assert out == cached_paths(resolve_source(name), str(tmp_path / "cache"))["detector"]
    assert open(out, "rb").read() == data
    folder = f"detectors/url/127.0.0.1_{server.url.rsplit(':', 1)[1]}/zoo"
    assert cache_files(tmp_path) == [f"{folder}/det.pth"]
    # A second detector of the same server folder joins the first.
    assert open(fetch_weights(f"{server.url}/zoo/det2.pth", progress=False), "rb").read() == data
    assert cache_files(tmp_path) == [f"{folder}/det.pth", f"{folder}/det2.pth"]
    server.stop()
    assert fetch_weights(name, progress=False) == out
    assert server.hits == {"/zoo/det.pth": 1, "/zoo/det2.pth": 1}


def test_download_is_staged_beside_its_cache_entry_and_a_killed_runs_staging_is_removed(
    serve, tmp_path, monkeypatch, x26_bytes
):
    """The module's contract: a file is downloaded "into a temporary folder beside
    it" (the cache folder, so the final rename is atomic on one filesystem, not a
    copy across filesystems from /tmp), and the folder a killed run left for that
    file is removed by the next run, while another file's (whose download may be
    running under its own lock) is kept. Catches staging in the system temp
    folder, an unrecognisable staging name, and a clean-up that removes too much,
    too little, or fails on an entry that is not a folder."""
    from resnext_det.checkpoint import sources

    server = serve({"/w/x26.pth": x26_bytes})
    name = f"{server.url}/w/x26.pth"
    paths = cached_paths(resolve_source(name), str(tmp_path / "cache"))
    folder = os.path.dirname(paths["download"])
    staged = []
    real = sources._download

    def spy(src, dest, **kw):
        staged.append(dest)
        return real(src, dest, **kw)

    monkeypatch.setattr(sources, "_download", spy)
    os.makedirs(folder)
    killed = os.path.join(folder, ".x26.pth.tmp-killed")  # left by a run of this file, killed
    os.makedirs(os.path.join(killed, "sub"))
    open(os.path.join(killed, "x26.pth"), "wb").write(b"partial")
    other = os.path.join(folder, ".x50.pth.tmp-running")  # another file's download
    os.makedirs(other)
    not_a_folder = os.path.join(folder, ".x26.pth.tmp-copy")  # e.g. an interrupted copy's temporary file
    open(not_a_folder, "wb").write(b"")

    out = fetch_weights(name, progress=False)
    assert out == paths["converted"] and len(staged) == 1
    staging, filename = os.path.split(staged[0])
    assert filename == "x26.pth" and os.path.dirname(staging) == folder, staged
    assert open(paths["download"], "rb").read() == x26_bytes
    assert sorted(os.listdir(folder)) == sorted(["x26.pth", ".x50.pth.tmp-running", ".x26.pth.tmp-copy"])

    # A run killed while downloading leaves its staging folder: the next run removes it.
    os.makedirs(staging)
    open(staged[0], "wb").write(x26_bytes[:100])
    os.unlink(paths["download"])
    os.unlink(paths["converted"])
    assert fetch_weights(name, progress=False) == paths["converted"]
    assert len(staged) == 2 and server.hits == {"/w/x26.pth": 2}
    assert sorted(os.listdir(folder)) == sorted(["x26.pth", ".x50.pth.tmp-running", ".x26.pth.tmp-copy"])


_FETCH = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from resnext_det.checkpoint import fetch_weights
open(sys.argv[2], "w").close()
while not all(os.path.exists(p) for p in sys.argv[3:]):  # start together
    time.sleep(0.01)
print(fetch_weights(sys.argv[1], progress=False))
"""


@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_two_processes_starting_together_download_once(tmp_path):
    data = torch_bytes(tv_resnext(seed=2).state_dict())
    server = FileServer({"/w/x26.pth": data}, delay_s=1.5 / (len(data) >> 16))  # 1.5 s per download
    try:
        env = dict(os.environ, RESNEXT_DET_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
        ready = [str(tmp_path / f"ready{i}") for i in range(2)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _FETCH, f"{server.url}/w/x26.pth", ready[i], *ready],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        server.stop()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1 and os.path.isfile(paths.pop())
    assert server.hits == {"/w/x26.pth": 1}
    logs = [o[1] for o in outs]
    assert sum(f": downloading {server.url}" in log for log in logs) == 1, logs
    assert sum("another process is downloading or converting it; waiting" in log for log in logs) == 1, logs


def test_a_file_another_process_is_fetching_is_waited_for_and_other_files_are_not(serve, tmp_path, x26_bytes, caplog):
    """The file lock is per file (as Detectron2's PathManager locks each file): a run
    that needs the file another process is fetching waits, then takes what that
    process cached, downloading nothing; a run that needs another file does not wait.
    Catches one lock for the whole cache and a missing re-check after the wait."""
    import portalocker

    caplog.set_level(logging.INFO, logger="resnext_det")
    server = serve({"/w/a.pth": x26_bytes, "/w/b.pth": x26_bytes})
    a, b = f"{server.url}/w/a.pth", f"{server.url}/w/b.pth"
    pa = cached_paths(resolve_source(a), str(tmp_path / "cache"))
    waiting = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            if "another process is downloading or converting it; waiting" in record.getMessage():
                waiting.set()

    seen = Seen()
    logging.getLogger("resnext_det").addHandler(seen)
    os.makedirs(os.path.dirname(pa["lock"]))
    other = portalocker.Lock(pa["lock"], timeout=0, fail_when_locked=True)
    other.acquire()  # another process is fetching a.pth
    results = {}

    def fetch(name):
        results[name] = fetch_weights(name, progress=False)

    threads = [threading.Thread(target=fetch, args=(n,), daemon=True) for n in (b, a)]
    try:
        threads[0].start()
        threads[0].join(timeout=20)
        assert b in results and not waiting.is_set(), "another file's fetch waited for a.pth's lock"
        threads[1].start()
        assert waiting.wait(timeout=20)
        # The other process finishes: a.pth converted and cached, then its lock released.
        os.makedirs(os.path.dirname(pa["converted"]), exist_ok=True)
        open(pa["converted"], "wb").write(open(results[b], "rb").read())
        other.release()
        threads[1].join(timeout=20)
        assert results.get(a) == pa["converted"]
        assert server.hits == {"/w/b.pth": 1}
    finally:
        with contextlib.suppress(Exception):
            other.release()
        logging.getLogger("resnext_det").removeHandler(seen)


# --------------------------------------------------------------------------
# Corrupt downloads never enter the cache; servers that misbehave end the run in one line
# --------------------------------------------------------------------------
def test_wrong_hash_truncated_and_non_weight_downloads_are_refused_and_leave_no_cache_entry(serve, tmp_path):
    good = torch_bytes(tv_resnext(seed=1).state_dict())
    tv_path = "/download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth"  # not the published bytes
    hub = "/huggingface.co/timm/resnext50_32x4d.a1h_in1k/resolve/main/model.safetensors"
    server = serve(
        {tv_path: good, hub: good, "/w/cut.pth": good, "/w/page.pth": b"<html>Sign in to continue</html>",
         "/w/good.pth": good},
        headers={hub: {"X-Linked-Etag": '"' + "0" * 64 + '"'}},
        truncate=["/w/cut.pth"],
    )
    cases = {
        "torchvision://resnext50_32x4d.IMAGENET1K_V1": "publishes sha256 7cdf4587",
        "timm://resnext50_32x4d.a1h_in1k": "X-Linked-Etag",
        f"{server.url}/w/cut.pth": "ended after|broke off",
        f"{server.url}/w/page.pth": "not a weight file",
        f"{server.url}/w/good.pth#sha256={'ab' * 32}": "publishes sha256 abab",
    }
    for name, pattern in cases.items():
        with pytest.raises(WeightsSourceError, match=pattern) as e:
            fetch_weights(name, progress=False)
        assert "\n" not in str(e.value) and "nothing was cached" in str(e.value).lower(), str(e.value)
        assert cache_files(tmp_path) == [], (name, cache_files(tmp_path))
    # The same file with its right hash is taken.
    assert fetch_weights(f"{server.url}/w/good.pth#sha256={sha256(good)}", progress=False).endswith(".pth")
    assert len(cache_files(tmp_path)) == 2


def test_caffe2_file_whose_convention_the_name_does_not_give_is_refused(serve, tmp_path, monkeypatch):
    """Refused in one line naming the converter and the key to set to its output; the lock
    taken meanwhile lies in the cache's locks/ folder, not in the working directory."""
    blobs = tv_to_caffe2_blobs(tv_resnext(seed=3).state_dict())
    server = serve({"/w/X-26.pkl": pickle.dumps({"blobs": blobs}, protocol=2)})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(WeightsSourceError, match="--convention fair.*tools/convert_pretrained.py") as e:
        fetch_weights(f"{server.url}/w/X-26.pkl", progress=False)
    assert "\n" not in str(e.value) and cache_files(tmp_path) == []
    assert "set MODEL.WEIGHTS to its output" in str(e.value)
    src = resolve_source(f"{server.url}/w/X-26.pkl")
    assert os.path.isfile(tmp_path / "cache" / "locks" / (src.key + ".lock"))
    assert os.listdir(tmp_path / "cwd") == []


def test_a_downloaded_file_that_is_not_a_weight_file_is_refused_naming_the_setting_and_the_url(serve, tmp_path):
    """A server that answers with a page instead of the file: the one line names the
    MODEL.WEIGHTS setting it is for and the URL, and nothing is cached. Catches a
    message that loses which setting it is about."""
    server = serve({"/w/page.pth": b"<html>Sign in to continue</html>"})
    name = f"{server.url}/w/page.pth"
    with pytest.raises(WeightsSourceError) as e:
        fetch_weights(name, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"MODEL.WEIGHTS = {name!r}: ") and f"downloaded from {name}" in msg, msg
    assert "not a weight file" in msg and "nothing was cached" in msg and cache_files(tmp_path) == []


def test_mirror_with_a_trailing_slash_and_the_source_named_on_a_wrong_file(serve, monkeypatch, tmp_path):
    import torchvision

    w = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1
    path = "/" + w.url.split("://", 1)[1]
    server = serve({path: b"not the published file"})
    monkeypatch.setenv("RESNEXT_DET_MIRROR", server.url + "/")
    with pytest.raises(WeightsSourceError) as e:
        fetch_weights("torchvision://resnext50_32x4d.IMAGENET1K_V1", progress=False)
    msg = str(e.value)
    assert server.hits == {path: 1} and f"downloaded from {server.url}{path}:" in msg
    sha = torch.hub.HASH_REGEX.search(w.url.rsplit("/", 1)[-1]).group(1)
    assert f"ResNeXt50_32X4D_Weights.IMAGENET1K_V1 publishes sha256 {sha}" in msg  # who says so
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("right", [False, True])
def test_sha256_published_on_a_redirect_is_checked(monkeypatch, tmp_path, x26_bytes, right):
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNEXT_DET_MIRROR", raising=False)
    data = x26_bytes
    server = LocalServer(data, sha256(data) if right else sha256(data + b"x"))
    try:
        if right:
            out = fetch_weights(f"{server.url}/hub/x26.pth", progress=False)
            assert torch.load(out, weights_only=True)["resnext_det"]["source"]["sha256"] == sha256(data)
            # The file as it is (no content coding, so its length and sha256 are the file's),
            # asked for by name.
            for h in server.requests:
                assert h["Accept-Encoding"].lower() == "identity" and "resnext_det" in h["User-Agent"], h
        else:
            with pytest.raises(WeightsSourceError, match="X-Linked-Etag") as e:
                fetch_weights(f"{server.url}/hub/x26.pth", progress=False)
            assert sha256(data + b"x")[:16] in str(e.value) and cache_files(tmp_path) == []
    finally:
        server.stop()
    assert [len(server.requests)] == [2]  # the redirect and the file


def test_timm_name_downloads_from_hf_endpoint_without_a_mirror(monkeypatch, tmp_path):
    from huggingface_hub import hf_hub_url

    hub = "timm/resnext50_32x4d.a1h_in1k"
    server = FileServer({f"/{hub}/resolve/main/model.safetensors": b"x" * 10},
                        headers={f"/{hub}/resolve/main/model.safetensors": {"X-Linked-Etag": "1" * 64}})
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNEXT_DET_MIRROR", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        with pytest.raises(WeightsSourceError, match="X-Linked-Etag") as e:
            fetch_weights("timm://resnext50_32x4d.a1h_in1k", progress=False)
    finally:
        server.stop()
    assert f"downloaded from {hf_hub_url(hub, 'model.safetensors', endpoint=server.url)}:" in str(e.value)


def test_download_without_content_length_and_a_server_that_hangs_up(monkeypatch, tmp_path, x26_bytes, caplog):
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNEXT_DET_MIRROR", raising=False)
    server = LocalServer(x26_bytes)
    try:
        name = f"{server.url}/nolength/x26.pth#sha256={sha256(x26_bytes)}"
        with caplog.at_level(logging.INFO, logger="resnext_det"):
            out = fetch_weights(name, progress=False, what="the test's weights")
        assert torch.load(out, weights_only=True)["resnext_det"]["source"]["sha256"] == sha256(x26_bytes)
        assert f"the test's weights: downloading {server.url}/nolength/x26.pth" in caplog.text
        with pytest.raises(WeightsSourceError) as e:
            fetch_weights(f"{server.url}/hangup", progress=False)
        assert f"cannot download {server.url}/hangup (RemoteDisconnected: " in str(e.value)
    finally:
        server.stop()
    url = f"http://127.0.0.1:{closed_port()}/w/x26.pth"
    with pytest.raises(WeightsSourceError) as e:
        fetch_weights(url, progress=False)
    refused = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"  # what the OS says
    assert f"cannot download {url} (URLError: {refused})" in str(e.value)


@pytest.mark.parametrize("stall", ["before_the_answer", "in_the_body"])
def test_a_server_that_stops_sending_ends_the_run_after_the_timeout(monkeypatch, tmp_path, stall):
    """A server (or mirror) that accepts the connection and then sends nothing more
    ends the run with one line naming the URL once the read timeout has passed
    (before the answer: with the manual steps; in the body: what broke off), nothing
    cached. Catches a download without a timeout, which waits forever."""
    from resnext_det.checkpoint import sources

    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNEXT_DET_MIRROR", raising=False)
    monkeypatch.setattr(sources, "_TIMEOUT_S", 0.3)
    head = b"" if stall == "before_the_answer" else b"HTTP/1.0 200 OK\r\nContent-Length: 4096\r\n\r\n" + b"x" * 100
    server = StallingServer(head)
    url = f"{server.url}/w/x26.pth"
    result = []

    def run():
        try:
            fetch_weights(url, progress=False)
        except WeightsSourceError as e:
            result.append(str(e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    ended = not thread.is_alive()
    server.stop()  # also ends a download that waits without a timeout
    thread.join(timeout=5)
    assert ended, "the download waited on a silent server without a timeout"
    assert len(result) == 1, result
    msg = result[0]
    assert "\n" not in msg and url in msg and "timed out" in msg, msg
    if stall == "before_the_answer":
        assert f"cannot download {url} (" in msg and "tools/convert_pretrained.py x26.pth" in msg, msg
    else:  # the exception that broke it off is named
        assert "broke off" in msg and "(TimeoutError: timed out)" in msg and "nothing was cached" in msg.lower(), msg
    assert cache_files(tmp_path) == []


# --------------------------------------------------------------------------
# Offline: one line with the manual steps, and the file put into the cache by hand
# --------------------------------------------------------------------------
def test_no_network_gives_one_line_naming_the_url_and_the_manual_command(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESNEXT_DET_MIRROR", f"http://127.0.0.1:{closed_port()}")
    cfg = detector_cfg("FPN", [("MODEL.WEIGHTS", "torchvision://resnext101_32x8d.IMAGENET1K_V1"), *X26_LINES])
    with pytest.raises(WeightsSourceError) as e:
        load_detector(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert "download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth" in msg
    assert "python tools/convert_pretrained.py resnext101_32x8d-8ba56ff5.pth X-101-32x8d.pth --arch X-101-32x8d" in msg
    assert str(tmp_path / "cache" / "downloads" / "torchvision" / "resnext101_32x8d-8ba56ff5.pth") in msg
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("name,arch,convention,mean_std", [
    ("torchvision://resnext50_32x4d.IMAGENET1K_V2", "X-50-32x4d", None, None),  # the tool tells torchvision files
    ("detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl", "X-101-32x8d", "fair", None),
    ("catalog://ImageNetPretrained/MSRA/R-101", "R-101", "msra", None),
    ("timm://resnet50_clip.openai", None, None, "clip"),
    ("URL/w/x26.pth", None, None, None),  # a plain URL: unknown; maybe a detector
])
def test_offline_message_gives_a_command_the_converter_accepts(monkeypatch, tmp_path, name, arch, convention, mean_std):
    from weights_helpers import _load_tool

    port = closed_port()
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESNEXT_DET_MIRROR", f"http://127.0.0.1:{port}")
    name = name.replace("URL", f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsSourceError) as e:
        fetch_weights(name, progress=False)
    msg = str(e.value)
    m = re.search(r"convert it yourself: python tools/convert_pretrained\.py (.*?), then set MODEL\.WEIGHTS to (.*)$", msg)
    assert m, msg
    args = _load_tool().parse_args(m[1].split())
    filename = resolve_source(name).url.rsplit("/", 1)[-1]
    out = f"{arch or os.path.splitext(filename)[0]}.pth"
    assert (args.input, args.output, args.arch, args.convention) == (filename, out, arch, convention), msg
    if mean_std == "clip":
        from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        assert args.pixel_mean == pytest.approx([255 * v for v in OPENAI_CLIP_MEAN], abs=1e-3)
        assert args.pixel_std == pytest.approx([255 * v for v in OPENAI_CLIP_STD], abs=1e-3)
    else:
        assert args.pixel_mean is None and args.pixel_std is None
    if arch or name.startswith("timm://"):  # ImageNet weights (timm has no detectors): the converted file
        assert m[2] == out, msg
    else:  # a trunk the name does not tell, perhaps a detector checkpoint: then the file itself
        assert m[2].startswith(out + " (") and "detector checkpoint" in m[2], msg
        assert m[2].endswith("set MODEL.WEIGHTS to the file)"), msg


def test_offline_a_file_put_into_the_cache_by_hand_is_converted(monkeypatch, tmp_path):
    """The offline route the error message gives: the published file, placed in
    downloads/, is hash-checked and converted without any network."""
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESNEXT_DET_MIRROR", f"http://127.0.0.1:{closed_port()}")
    tv = tv_resnext(seed=8)
    data = torch_bytes(tv.state_dict())
    src = resolve_source(f"https://files.example.org/x26.pth#sha256={sha256(data)[:12]}")
    dest = cached_paths(src)["download"]
    os.makedirs(os.path.dirname(dest))
    open(dest, "wb").write(data)
    out = fetch_weights(src.name, progress=False)
    assert torch.load(out, weights_only=True)["resnext_det"]["input"]["format"] == "RGB"
    open(dest, "wb").write(data[:-1] + b"x")  # not the published bytes: refused, named
    os.unlink(out)
    with pytest.raises(WeightsSourceError, match="is not the published file.*delete it"):
        fetch_weights(src.name, progress=False)


def test_a_local_copy_that_is_not_a_weight_file_is_refused_naming_the_setting_and_the_file(monkeypatch, tmp_path):
    """The offline route (a file put into downloads/ by hand) with the wrong file, e.g.
    a saved sign-in page: the error names the MODEL.WEIGHTS setting it is for and the
    file to delete. Catches a message that loses which setting it is about."""
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESNEXT_DET_MIRROR", f"http://127.0.0.1:{closed_port()}")
    name = "https://files.example.org/w/x26.pth"
    dest = cached_paths(resolve_source(name))["download"]
    os.makedirs(os.path.dirname(dest))
    open(dest, "wb").write(b"<html>Sign in to continue</html>")
    with pytest.raises(WeightsSourceError) as e:
        fetch_weights(name, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"MODEL.WEIGHTS = {name!r}: ") and dest in msg and "delete it" in msg, msg
    assert "\n" not in msg


def test_a_file_torchvision_already_downloaded_into_torch_hubs_cache_is_used_without_network(
    monkeypatch, tmp_path, x26_bytes
):
    """A torchvision file that torchvision itself downloaded (torch.hub's cache,
    $TORCH_HOME/hub/checkpoints/<file>) is checked and converted with no download and
    left where it is; a copy there that is not the published file is refused naming
    it. Catches the torch.hub cache not looked at, or its copy taken unchecked."""
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESNEXT_DET_MIRROR", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{closed_port()}")  # any download fails at once
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")  # torch.hub's documented place
    filename = "resnext50_32x4d-7cdf4587.pth"  # torchvision's ResNeXt50_32X4D_Weights.IMAGENET1K_V1
    hub_copy = tmp_path / "torch" / "hub" / "checkpoints" / filename
    hub_copy.parent.mkdir(parents=True)
    hub_copy.write_bytes(x26_bytes)
    # The file by its URL, with the sha256 of this copy: taken from torch.hub's cache.
    name = f"https://download.pytorch.org/models/{filename}#sha256={sha256(x26_bytes)}"
    out = fetch_weights(name, progress=False)
    assert out == str(tmp_path / "cache" / "converted" / "torchvision" / filename)
    assert torch.load(out, weights_only=True)["resnext_det"]["source"]["sha256"] == sha256(x26_bytes)
    assert hub_copy.read_bytes() == x26_bytes and cache_files(tmp_path) == [f"converted/torchvision/{filename}"]
    # By its name, with torchvision's published hash: this copy is not that file.
    os.unlink(out)
    assert not sha256(x26_bytes).startswith("7cdf4587")
    with pytest.raises(WeightsSourceError) as e:
        fetch_weights("torchvision://resnext50_32x4d.IMAGENET1K_V1", progress=False)
    msg = str(e.value)
    assert str(hub_copy) in msg and "7cdf4587" in msg and "delete it" in msg and "cannot download" not in msg, msg
    assert cache_files(tmp_path) == []


# --------------------------------------------------------------------------
# The cache folder
# --------------------------------------------------------------------------
def test_cache_folder_follows_resnext_det_cache_then_xdg_then_home(tmp_path, monkeypatch):
    """The documented order (docs/weights.md): $RESNEXT_DET_CACHE, else
    $XDG_CACHE_HOME/resnext_det, else ~/.cache/resnext_det, as the XDG base directory
    specification puts user caches."""
    from resnext_det.checkpoint.sources import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RESNEXT_DET_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "resnext_det")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "resnext_det")
    monkeypatch.setenv("RESNEXT_DET_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == str(tmp_path / "mine")


def test_cache_folder_variables_set_empty_count_as_unset_and_paths_are_expanded(tmp_path, monkeypatch):
    """As the XDG base directory specification says of $XDG_CACHE_HOME ("not set or
    empty": the default), an empty variable is no folder; RESNEXT_DET_CACHE may be
    written as a shell would not expand it (~/...) or relative to the working folder,
    and is the same absolute folder whatever the working folder is later."""
    from resnext_det.checkpoint.sources import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RESNEXT_DET_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "resnext_det")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "resnext_det")
    monkeypatch.setenv("RESNEXT_DET_CACHE", "~/weights")
    assert cache_dir() == str(tmp_path / "home" / "weights")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESNEXT_DET_CACHE", "rel/cache")
    assert cache_dir() == str(tmp_path / "rel" / "cache")


# --------------------------------------------------------------------------
# tools/train_net.py with a shipped config: from nothing, through its name
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_train_net_starts_from_nothing_with_a_shipped_config(tmp_path):
    """configs/COCO-Detection/faster_rcnn_X_101_32x4d_FPN_1x.yaml names
    torch7://resnext_101_32x4d; with a mirror serving (a small stand-in for) the
    release file, train_net downloads, converts and fine-tunes, once per cache;
    without network it ends with one line naming the URL and the manual command."""
    from test_weights_torch7 import resnext_t7_from_torchvision, write_t7
    from test_weights_train_net import TINY

    tv = tv_resnext(seed=9)
    write_t7(tmp_path / "made.t7", resnext_t7_from_torchvision(tv))
    path = "/dl.fbaipublicfiles.com/resnext/imagenet_models/resnext_101_32x4d.t7"
    server = FileServer({path: (tmp_path / "made.t7").read_bytes()})
    config = os.path.join(ROOT, "configs", "COCO-Detection", "faster_rcnn_X_101_32x4d_FPN_1x.yaml")
    arch = [str(v) for kv in X26_LINES for v in kv]

    def train(out, mirror):
        env = dict(os.environ, PYTHONPATH=ROOT, RESNEXT_DET_CACHE=str(tmp_path / "cache"), RESNEXT_DET_MIRROR=mirror)
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", config,
             *TINY, *arch, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out)],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
        )

    try:
        offline = train(tmp_path / "run0", f"http://127.0.0.1:{closed_port()}")
        p = train(tmp_path / "run1", server.url)
    finally:
        server.stop()
    assert offline.returncode == 2, offline.stderr[-3000:]
    last = offline.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net.py: error: MODEL.WEIGHTS = 'torch7://resnext_101_32x4d': cannot download")
    assert "resnext_101_32x4d.t7" in last and "tools/convert_pretrained.py resnext_101_32x4d.t7" in last
    assert p.returncode == 0, p.stderr[-3000:]
    assert server.hits == {path: 1}
    log = (tmp_path / "run1" / "log.txt").read_text()
    assert "Loaded all" in log and "torch7://resnext_101_32x4d" in log
    final = torch.load(tmp_path / "run1" / "model_final.pth", weights_only=True)
    assert torch.equal(final["model"]["backbone.bottom_up.stem.conv1.weight"], tv.state_dict()["conv1.weight"])
