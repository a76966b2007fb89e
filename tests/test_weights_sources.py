"""Weights from anywhere (issue #13): names resolved to the real public files,
downloaded once, checked, converted and cached; detector checkpoints of other
projects checked against the config.

Offline: every file is made here and served by an HTTP server on 127.0.0.1 that
the test starts and stops (``RESNEXT_DET_MIRROR`` points the named sources at
it). References are independent of the code under test: the published URLs and
hashes as written in torchvision / Detectron2 / facebookresearch/ResNeXt, the
source networks (torchvision, timm), and Detectron2's own detector."""
import contextlib
import errno
import hashlib
import http.server
import io
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from detectron2 import model_zoo
from detectron2.config import LazyConfig, get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone
from detectron2.layers import ShapeSpec

from resnext_det import add_resnext_config
from resnext_det.checkpoint import (
    CONVENTIONS,
    ResNeXtCheckpointer,
    WeightsConfigError,
    WeightsSourceError,
    detector_convention,
    fetch_weights,
    resolve_source,
)
from resnext_det.checkpoint.sources import cached_paths, named_sources

from test_convert_pretrained import (
    ROOT,
    STAGES,
    TOL,
    detector_cfg,
    detector_stages,
    load_detector,
    normalized_input,
    randomize_bn,
    rel_err,
    run_tool,
    tv_resnext,
    tv_stages,
    tv_to_caffe2_blobs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# The trunk of tv_resnext(): depth 26 ([2, 2, 2, 2]), C=4, d=4, torchvision widths.
X26_LINES = [
    ("MODEL.RESNEXT.PRESET", ""), ("MODEL.RESNEXT.STAGE_BLOCKS", [2, 2, 2, 2]),
    ("MODEL.RESNEXT.CARDINALITY", 4), ("MODEL.RESNEXT.BOTTLENECK_WIDTH", 4),
]
RGB_LINES = [("INPUT.FORMAT", "RGB"), ("MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53]),
             ("MODEL.PIXEL_STD", [58.395, 57.12, 57.375])]
FAIR_BGR_LINES = [("INPUT.FORMAT", "BGR"), ("MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675]),
                  ("MODEL.PIXEL_STD", [57.375, 57.12, 58.395])]


# --------------------------------------------------------------------------
# A file server on 127.0.0.1, started and stopped by the test
# --------------------------------------------------------------------------
class FileServer:
    """Serves ``files`` ({path: bytes}) over HTTP on 127.0.0.1; counts GETs per
    path. ``headers`` adds response headers per path; ``truncate`` paths send a
    Content-Length of the whole file but close after half of it; ``delay_s``
    slows every file down (sleep between 64 kB chunks). It stops itself after
    ``lifetime_s`` in any case."""

    def __init__(self, files, *, headers=None, truncate=(), delay_s=0.0, lifetime_s=300.0):
        self.files, self.headers, self.truncate, self.delay_s = dict(files), headers or {}, set(truncate), delay_s
        self.hits = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                for k, v in server.headers.get(path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                body = data[: len(data) // 2] if path in server.truncate else data
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i: i + (1 << 16)])
                    if server.delay_s:
                        time.sleep(server.delay_s)
                if path in server.truncate:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime_s, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def stop(self):
        self.timer.cancel()
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join(timeout=5)
        self.httpd.server_close()


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


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


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


# --------------------------------------------------------------------------
# Names resolve to the real public files (no network)
# --------------------------------------------------------------------------
# As published by torchvision (models/resnet.py weights enums), Detectron2
# (configs, ModelCatalog), timm (Hub ids) and facebookresearch/ResNeXt (README).
PUBLISHED = {
    "torchvision://resnext50_32x4d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
    "torchvision://resnext50_32x4d.IMAGENET1K_V2": "https://download.pytorch.org/models/resnext50_32x4d-1a0047aa.pth",
    "torchvision://resnext101_32x8d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth",
    "torchvision://resnext101_32x8d": "https://download.pytorch.org/models/resnext101_32x8d-110c445d.pth",  # DEFAULT = V2
    "torchvision://resnext101_64x4d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_64x4d-173b62eb.pth",
    "torchvision://resnet50.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "torchvision://resnet101.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "timm://resnext50_32x4d.a1h_in1k": "https://huggingface.co/timm/resnext50_32x4d.a1h_in1k/resolve/main/model.safetensors",
    "timm://resnext101_32x8d.fb_wsl_ig1b_ft_in1k": "https://huggingface.co/timm/resnext101_32x8d.fb_wsl_ig1b_ft_in1k/resolve/main/model.safetensors",
    "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl": "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/FAIR/X-101-32x8d.pkl",
    "detectron2://ImageNetPretrained/MSRA/R-50.pkl": "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl",
    "catalog://ImageNetPretrained/FAIR/X-152-32x8d-IN5k": "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/25093814/X-152-32x8d-IN5k.pkl",
    "catalog://ImageNetPretrained/FAIR/X-101-64x4d": "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/FBResNeXt/X-101-64x4d.pkl",
    "torch7://resnext_101_32x4d": "https://dl.fbaipublicfiles.com/resnext/imagenet_models/resnext_101_32x4d.t7",
    "torch7://resnext_50_32x4d.t7": "https://dl.fbaipublicfiles.com/resnext/imagenet_models/resnext_50_32x4d.t7",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_names_resolve_to_the_published_urls(name):
    src = resolve_source(name)
    assert src.url == PUBLISHED[name]
    if name.startswith("torchvision://"):  # torch.hub's rule: the name carries a sha256 prefix
        assert src.sha256 == PUBLISHED[name].rsplit("-", 1)[1].split(".")[0]


def test_known_conventions_of_named_sources():
    # Caffe2 files do not say their convention; the name does.
    fair = resolve_source("detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl")
    assert fair.convention == "fair" and CONVENTIONS["fair"][0].format == "BGR"
    assert CONVENTIONS["fair"][0].pixel_std == (57.375, 57.12, 58.395)
    assert resolve_source("detectron2://ImageNetPretrained/MSRA/R-50.pkl").convention == "msra"
    assert resolve_source("catalog://ImageNetPretrained/FAIR/X-152-32x8d-IN5k").convention == "detectron1"
    for name in ("torchvision://resnext50_32x4d", "timm://resnext50_32x4d.a1h_in1k", "torch7://resnext_101_64x4d"):
        assert resolve_source(name).convention == "torchvision"


@pytest.mark.parametrize("name,match", [
    ("torchvision://resnext77_1x1d", "no model 'resnext77_1x1d'"),
    ("torchvision://resnext50_32x4d.IMAGENET1K_V9", "has no 'IMAGENET1K_V9'"),
    ("timm://resnext50_32x4d.no_such_tag", "no pretrained weights"),
    ("torch7://resnext_152_64x4d", "the Torch7 release has"),
    ("catalog://ImageNetPretrained/FAIR/X-999", "ModelCatalog names"),
    ("https://example.com/a.pth#md5=00", "#sha256="),
    ("detectron2://", "nothing after detectron2://"),
    # The name becomes a path under the cache folder: a '..' part would leave it.
    ("detectron2://ImageNetPretrained/../../../../tmp/x.pkl", "'..' part is not allowed"),
    ("catalog://ImageNetPretrained/..", "'..' part is not allowed"),
    ("weights/x26.pth", "use torchvision://, timm://"),  # a path is no name (the error says which are)
])
def test_unknown_names_are_refused_in_one_line(name, match):
    with pytest.raises(WeightsSourceError, match=match) as e:
        resolve_source(name)
    assert "\n" not in str(e.value)


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


# --------------------------------------------------------------------------
# Corrupt downloads never enter the cache
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



# --------------------------------------------------------------------------
# The shipped configs name sources that the resolver knows
# --------------------------------------------------------------------------
def _shipped_weights():
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "configs")):
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, "configs"))
            if f.endswith(".yaml") and not f.startswith("Base-"):
                cfg = get_cfg()
                add_resnext_config(cfg)
                cfg.merge_from_file(os.path.join(dirpath, f))
                if cfg.MODEL.WEIGHTS and not rel.startswith("quickstart"):
                    r = cfg.MODEL.RESNEXT
                    out.append((rel, cfg.MODEL.WEIGHTS, r.PRESET, r.STRIDE_IN_1X1, cfg.INPUT.FORMAT,
                                cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD))
            elif f.endswith(".py"):
                c = LazyConfig.load(os.path.join(dirpath, f))
                if c.train.init_checkpoint:
                    s = c.model.backbone.bottom_up.spec
                    preset = {((3, 4, 6, 3), 32, 4): "X-50-32x4d", ((3, 4, 23, 3), 32, 8): "X-101-32x8d"}[
                        (tuple(s.stage_blocks), s.cardinality, s.bottleneck_width)]
                    out.append((rel, c.train.init_checkpoint, preset, s.stride_in_1x1, c.model.input_format,
                                list(c.model.pixel_mean), list(c.model.pixel_std)))
    return out


SHIPPED = _shipped_weights()


def test_every_shipped_zoo_config_names_a_source():
    assert len(SHIPPED) > 60
    assert all("://" in w for _, w, *_ in SHIPPED), [r for r, w, *_ in SHIPPED if "://" not in w]


@pytest.mark.parametrize("rel,weights,preset,stride,fmt,mean,std", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_config_source_is_known_and_matches_the_config(rel, weights, preset, stride, fmt, mean, std):
    src = resolve_source(weights)
    assert src.url == PUBLISHED.get(weights, src.url)
    assert src.arch == preset, (src.arch, preset)
    inp, conv_stride = CONVENTIONS[src.convention]
    assert (inp.format, bool(conv_stride)) == (fmt, bool(stride))
    assert list(inp.pixel_mean) == pytest.approx(mean, abs=1e-3)
    assert list(inp.pixel_std) == pytest.approx(std, abs=1e-3)


def test_shipped_names_are_among_the_published_files():
    assert {w for _, w, *_ in SHIPPED} <= set(PUBLISHED)


# --------------------------------------------------------------------------
# Detector checkpoints from other projects (Detectron2's model zoo)
# --------------------------------------------------------------------------
TINY_HEADS = [
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
    "MODEL.ROI_HEADS.NUM_CLASSES", 20, "MODEL.DEVICE", "cpu", "MODEL.RPN.PRE_NMS_TOPK_TEST", 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 20,
]


@pytest.fixture(scope="module")
def zoo_detector(tmp_path_factory):
    """Detectron2's own mask_rcnn_X_101_32x8d_FPN_3x, tiny (depth 50, C=2, d=4),
    random weights and FrozenBN statistics, saved as Detectron2's model zoo saves
    its files (a pickle of numpy arrays with "__author__")."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml"))
    cfg.merge_from_list([
        "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.NUM_GROUPS", 2, "MODEL.RESNETS.WIDTH_PER_GROUP", 4,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32, *TINY_HEADS,
    ])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        # Heads with large weights: well separated scores, so that predictions are stable.
        for name, p in model.named_parameters():
            if any(k in name for k in ("cls_score", "objectness_logits")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "weight" in name else 0.1))
    d = tmp_path_factory.mktemp("zoo")
    path = d / "model_final_tiny.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo"}, f)
    return cfg, model, path


def our_detector_cfg(weights, *lines):
    """Our shipped mask_rcnn_X_101_32x8d_FPN_3x.yaml (RGB) at the zoo detector's tiny sizes."""
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "COCO-InstanceSegmentation", "mask_rcnn_X_101_32x8d_FPN_3x.yaml"))
    cfg.merge_from_list([
        "MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.STAGE_BLOCKS", [3, 4, 6, 3], "MODEL.RESNEXT.CARDINALITY", 2,
        "MODEL.RESNEXT.BOTTLENECK_WIDTH", 4, "MODEL.RESNEXT.STEM_OUT_CHANNELS", 16,
        "MODEL.RESNEXT.RES2_OUT_CHANNELS", 32, *TINY_HEADS, "MODEL.WEIGHTS", str(weights),
    ])
    for k, v in lines:
        cfg.merge_from_list([k, v])
    return cfg


@torch.no_grad()
def predict(model, image):
    h, w = image.shape[-2:]
    return model([{"image": image, "height": h, "width": w}])[0]["instances"]


def assert_same_predictions(a, b):
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3, rtol=0)
    assert torch.allclose(a.scores, b.scores, atol=1e-5, rtol=0)
    assert torch.allclose(a.pred_masks.float(), b.pred_masks.float(), atol=0) or (
        (a.pred_masks != b.pred_masks).float().mean() < 1e-3
    )


@pytest.fixture(scope="module")
def bgr_image():
    return torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(2)).float()


def test_zoo_detector_into_rgb_config_is_refused_with_the_key_lines(zoo_detector):
    _, _, path = zoo_detector
    cfg = our_detector_cfg(path)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(build_model(cfg).eval(), cfg=cfg, require="all").load(cfg.MODEL.WEIGHTS)
    msg = str(e.value)
    assert "INPUT.FORMAT: the weights were trained on BGR input, the config feeds RGB" in msg
    assert "INPUT.FORMAT BGR MODEL.PIXEL_MEAN '[103.53, 116.28, 123.675]' MODEL.PIXEL_STD '[57.375, 57.12, 58.395]'" in msg
    assert "--to-rgb" in msg


def test_zoo_detector_with_the_printed_lines_predicts_as_detectron2(zoo_detector, bgr_image):
    d2_cfg, d2_model, path = zoo_detector
    cfg = our_detector_cfg(path, *FAIR_BGR_LINES)
    model = build_model(cfg).eval()
    ResNeXtCheckpointer(model, cfg=cfg, require="all").load(cfg.MODEL.WEIGHTS)
    assert_same_predictions(predict(model, bgr_image), predict(d2_model, bgr_image))


def test_zoo_detector_converted_to_rgb_loads_into_the_shipped_config_and_predicts_as_detectron2(
    zoo_detector, bgr_image, tmp_path
):
    _, d2_model, path = zoo_detector
    out = tmp_path / "mask_rcnn_rgb.pth"
    p = run_tool(path, out, "--to-rgb", "--verify", "--verify-size", 64)
    assert "--verify passed" in p.stdout and "INPUT.FORMAT" in p.stdout and "RGB" in p.stdout
    cfg = our_detector_cfg(out)  # the shipped RGB convention, unchanged
    model = build_model(cfg).eval()
    ResNeXtCheckpointer(model, cfg=cfg, require="all").load(cfg.MODEL.WEIGHTS)
    # Only the stem's input channels changed.
    src = pickle.load(open(path, "rb"))["model"]
    conv = torch.load(out, weights_only=True)["model"]
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(conv[stem], torch.from_numpy(src[stem]).flip(1))
    assert all(torch.equal(conv[k], torch.from_numpy(v)) for k, v in src.items() if k != stem)
    # RGB in (the same image, channels reversed) gives Detectron2's predictions on BGR ...
    ref = predict(d2_model, bgr_image)
    assert_same_predictions(predict(model, bgr_image.flip(0)), ref)
    # ... and the channel order matters: BGR into the RGB model predicts otherwise.
    wrong = predict(model, bgr_image)
    assert not torch.equal(wrong.pred_classes, ref.pred_classes)


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


@pytest.mark.parametrize("zoo_config", [
    "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",
    "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml",
    "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml",
    "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml",
])
def test_zoo_convention_from_the_key_layout_is_detectron2s_config(zoo_config):
    """What the file's author and trunk tell equals Detectron2's own config of that
    model; for its ResNets, std and stride are reported unknown (they vary)."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4  # same tensors for the trunk's shapes
    with torch.device("meta"):
        trunk = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    sd = {f"backbone.bottom_up.{k}": v for k, v in trunk.state_dict().items()}
    found = detector_convention(sd, {"__author__": "Detectron2 Model Zoo"})
    assert found.format == cfg.INPUT.FORMAT
    assert list(found.pixel_mean) == pytest.approx(cfg.MODEL.PIXEL_MEAN)
    if cfg.MODEL.RESNETS.NUM_GROUPS > 1:
        assert found.unknown_keys() == []
        assert list(found.pixel_std) == pytest.approx(cfg.MODEL.PIXEL_STD)
        assert found.stride_in_1x1 == cfg.MODEL.RESNETS.STRIDE_IN_1X1
    else:
        assert found.unknown_keys() == ["MODEL.PIXEL_STD", "MODEL.RESNEXT.STRIDE_IN_1X1"]


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


# --------------------------------------------------------------------------
# Every catalogued name, and the same files by URL, against what each source
# publishes (issue #16: mutation testing of sources.py)
# --------------------------------------------------------------------------
# torchvision's ResNeXt/ResNet weights enums (torchvision/models/resnet.py), with the
# preset each trunk is. Their ImageNet-1K acc@1 as torchvision's weights tables publish
# them (docs: pytorch.org/vision/stable/models.html; "_metrics" in the enums' meta).
TV_MODELS = {
    "resnext50_32x4d": "X-50-32x4d", "resnext101_32x8d": "X-101-32x8d", "resnext101_64x4d": "X-101-64x4d",
    "resnet50": "R-50", "resnet101": "R-101", "resnet152": "R-152",
}
TV_TOP1 = {
    "resnext50_32x4d.IMAGENET1K_V1": 77.618, "resnext50_32x4d.IMAGENET1K_V2": 81.198,
    "resnext101_32x8d.IMAGENET1K_V1": 79.312, "resnext101_32x8d.IMAGENET1K_V2": 82.834,
    "resnext101_64x4d.IMAGENET1K_V1": 83.246,
    "resnet50.IMAGENET1K_V1": 76.13, "resnet50.IMAGENET1K_V2": 80.858,
    "resnet101.IMAGENET1K_V1": 77.374, "resnet101.IMAGENET1K_V2": 81.886,
    "resnet152.IMAGENET1K_V1": 78.312, "resnet152.IMAGENET1K_V2": 82.284,
}
# Detectron2's ImageNet files (its configs' MODEL.WEIGHTS; MODEL_ZOO.md for torchvision/R-50).
D2_IMAGENET = {
    "ImageNetPretrained/MSRA/R-50.pkl": "R-50", "ImageNetPretrained/MSRA/R-101.pkl": "R-101",
    "ImageNetPretrained/FAIR/X-101-32x8d.pkl": "X-101-32x8d", "ImageNetPretrained/torchvision/R-50.pkl": "R-50",
}
# Detectron (v1)'s ResNe(X)t ImageNet files in Detectron2's ModelCatalog (the GN ones are
# not plain ResNets), with the architecture their names say.
CATALOG_ARCH = {
    "MSRA/R-50": "R-50", "MSRA/R-101": "R-101", "FAIR/X-101-32x8d": "X-101-32x8d",
    "FAIR/X-101-64x4d": "X-101-64x4d", "FAIR/X-152-32x8d-IN5k": "X-152-32x8d",
}
# facebookresearch/ResNeXt README: the Torch7 models and their top-1 error (%).
TORCH7_ERR = {"resnext_50_32x4d": 22.2, "resnext_101_32x4d": 21.2, "resnext_101_64x4d": 20.4}


def _expected_named_sources():
    """{name: (url, sha256, arch, top1, the source's own name)} from the sources' own code and docs."""
    import torchvision
    from detectron2.checkpoint.catalog import ModelCatalog

    out = {}
    for model, arch in TV_MODELS.items():
        enum = torchvision.models.get_model_weights(model)
        for w in enum:  # the members, without the DEFAULT alias
            filename = w.url.rsplit("/", 1)[-1]
            out[f"torchvision://{model}.{w.name}"] = (
                w.url, torch.hub.HASH_REGEX.search(filename).group(1), arch, TV_TOP1[f"{model}.{w.name}"],
                f"{enum.__name__}.{w.name}",
            )
    for path, arch in D2_IMAGENET.items():
        out[f"detectron2://{path}"] = (f"https://dl.fbaipublicfiles.com/detectron2/{path}", "", arch, None, path)
    for sub, arch in CATALOG_ARCH.items():
        url = ModelCatalog.get(f"ImageNetPretrained/{sub}")
        out[f"catalog://ImageNetPretrained/{sub}"] = (url, "", arch, None, url.split("/detectron/", 1)[1])
    for name, err in TORCH7_ERR.items():
        arch = "X-{}-{}".format(*name.split("_")[1:])
        out[f"torch7://{name}"] = (
            f"https://dl.fbaipublicfiles.com/resnext/imagenet_models/{name}.t7", "", arch, round(100 - err, 1),
            f"{name}.t7",
        )
    return out


def test_named_sources_are_every_published_resnext_file_as_its_source_describes_it():
    expected = _expected_named_sources()
    got = {s.name: s for s in named_sources()}
    assert sorted(got) == sorted(expected)
    for name, (url, sha, arch, top1, own_name) in expected.items():
        src = got[name]
        assert (src.url, src.sha256, src.arch) == (url, sha, arch), name
        assert src.top1 == (pytest.approx(top1) if top1 is not None else None), name
        assert own_name in src.what, (name, src.what)
        assert src.filename == url.rsplit("/", 1)[-1], name


@pytest.mark.parametrize("zoo_config", [
    "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
    "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml",
])
def test_detectron2_imagenet_name_has_the_convention_and_trunk_of_detectron2s_config(zoo_config):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    src = resolve_source(cfg.MODEL.WEIGHTS)  # the name as Detectron2's own config writes it
    r = cfg.MODEL.RESNETS
    assert src.arch == (f"X-{r.DEPTH}-{r.NUM_GROUPS}x{r.WIDTH_PER_GROUP}d" if r.NUM_GROUPS > 1 else f"R-{r.DEPTH}")
    inp, stride = CONVENTIONS[src.convention]
    assert inp.format == cfg.INPUT.FORMAT and bool(stride) == r.STRIDE_IN_1X1
    assert list(inp.pixel_mean) == pytest.approx(cfg.MODEL.PIXEL_MEAN, abs=1e-3)
    assert list(inp.pixel_std) == pytest.approx(cfg.MODEL.PIXEL_STD, abs=1e-3)


def test_published_urls_resolve_as_the_names_of_those_files(tmp_path):
    """A catalogued file written as its URL is that file: the same cache entry
    (downloads/<source>/<path>), published sha256, convention and architecture."""
    expected = _expected_named_sources()
    root = str(tmp_path)
    for name, (url, sha, arch, _, _) in expected.items():
        src = resolve_source(url)
        host_path = url.split("://", 1)[1].split("/", 1)[1]
        key = {
            "torchvision": "torchvision/" + url.rsplit("/", 1)[-1],
            "detectron2": "detectron2/" + host_path[len("detectron2/"):],
            "catalog": "detectron/" + host_path[len("detectron/"):],
            "torch7": "torch7/" + url.rsplit("/", 1)[-1],
        }[name.split("://")[0]]
        assert (src.name, src.url, src.sha256, src.arch) == (url, url, sha, arch), url
        assert cached_paths(src, root)["download"] == os.path.join(root, "downloads", key), url
        conv = resolve_source(name).convention  # checked above against the sources' configs
        assert src.convention == conv and conv is not None, url
    # A sha256 given in the URL is the one checked, and the name stays as written.
    tv = "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth"
    full = "7cdf4587" + "0" * 56
    src = resolve_source(f"{tv}#sha256={full.upper()}")
    assert (src.name, src.url, src.sha256, src.arch) == (f"{tv}#sha256={full.upper()}", tv, full, "X-50-32x4d")
    src = resolve_source("https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/FAIR/X-101-32x8d.pkl#sha256=abcdef01")
    assert (src.sha256, src.convention, src.arch) == ("abcdef01", "fair", "X-101-32x8d")
    # torchvision's quantized files carry no hash by torch.hub's rule, and hold no preset's trunk.
    q = "https://download.pytorch.org/models/quantized/resnet50_fbgemm_bf931d71.pth"
    assert torch.hub.HASH_REGEX.search(q.rsplit("/", 1)[-1]) is None
    src = resolve_source(q)
    assert (src.url, src.sha256, src.arch) == (q, "", "")
    assert resolve_source("torchvision://quantized_resnet50.IMAGENET1K_FBGEMM_V1").sha256 == ""
    # Another file of torchvision's server (not a ResNe(X)t): its hash, no preset.
    src = resolve_source("https://download.pytorch.org/models/vgg16-397923af.pth")
    assert (src.sha256, src.arch, src.convention) == ("397923af", "", "torchvision")


def test_plain_url_cache_key_sha256_and_refusals(tmp_path):
    name = "http://127.0.0.1:8000/w/./v1/x26.pth#sha256=ABCDEF12"
    src = resolve_source(name)
    assert (src.name, src.url, src.sha256) == (name, "http://127.0.0.1:8000/w/./v1/x26.pth", "abcdef12")
    assert src.what == src.url and src.filename == "x26.pth"  # messages name the URL
    assert src.key == "url/127.0.0.1_8000/w/v1/x26.pth"
    assert cached_paths(src, str(tmp_path))["download"] == os.path.join(
        str(tmp_path), "downloads", "url", "127.0.0.1_8000", "w", "v1", "x26.pth")
    assert resolve_source("https://example.com/x26.pth").url == "https://example.com/x26.pth"
    for bad in ("https://example.com/", "https://example.com", "https:///x26.pth", "https://example.com/w/../x26.pth"):
        with pytest.raises(WeightsSourceError) as e:
            resolve_source(bad)
        assert repr(bad) in str(e.value) and "URL of a file" in str(e.value), bad


def test_torchvision_names_other_models_and_refusals():
    import torchvision

    # resnet18 (BasicBlock) is no preset's trunk; a detector's weights report no ImageNet top-1.
    src = resolve_source("torchvision://resnet18")
    assert (src.url, src.arch) == (torchvision.models.ResNet18_Weights.DEFAULT.url, "")
    src = resolve_source("torchvision://fasterrcnn_resnet50_fpn")
    assert (src.url, src.top1) == (torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.url, None)
    with pytest.raises(WeightsSourceError) as e:
        resolve_source("torchvision://resnext101_32x4d")  # a paper model torchvision does not publish
    for model in TV_MODELS:  # the message names the ones it has
        assert model in str(e.value)
        torchvision.models.get_model_weights(model)


def test_timm_names_follow_timms_pretrained_cfg(monkeypatch):
    from huggingface_hub import hf_hub_url
    from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from timm.models import PretrainedCfg

    src = resolve_source("timm://resnext50_32x4d.a1h_in1k")
    assert (src.arch, src.pixel_mean, src.pixel_std) == ("X-50-32x4d", None, None)  # ImageNet mean/std
    assert "resnext50_32x4d.a1h_in1k" in src.what
    # OpenAI CLIP's mean/std (timm.data.constants), on the 0-255 scale.
    src = resolve_source("timm://resnet50_clip.openai")
    assert src.arch == "" and src.convention == "torchvision"
    assert src.pixel_mean == pytest.approx([255 * v for v in OPENAI_CLIP_MEAN], abs=1e-5)
    assert src.pixel_std == pytest.approx([255 * v for v in OPENAI_CLIP_STD], abs=1e-5)
    # huggingface_hub's HF_ENDPOINT (a Hub mirror), with or without a trailing slash.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/hub/")
    ref = hf_hub_url("timm/resnext50_32x4d.a1h_in1k", "model.safetensors", endpoint="http://127.0.0.1:9/hub")
    assert resolve_source("timm://resnext50_32x4d.a1h_in1k").url == ref
    monkeypatch.delenv("HF_ENDPOINT")
    # A pretrained_cfg naming its Hub file (as timm's open_clip weights did).
    import timm.models

    cfg = PretrainedCfg(hf_hub_id="laion/CLIP-ViT-B-16-laion2B-s34B-b88K", hf_hub_filename="open_clip_pytorch_model.bin")
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: cfg)
    src = resolve_source("timm://vit_base_patch16_clip_224.laion2b")
    assert src.url == hf_hub_url(cfg.hf_hub_id, cfg.hf_hub_filename)
    assert src.filename == "open_clip_pytorch_model.bin"
    monkeypatch.undo()


@pytest.mark.parametrize("name", ["timm://legacy_seresnet50.in1k", "timm://resnext50_32x4d.no_such_tag"])
def test_timm_weights_without_a_hub_file_are_refused_naming_how_to_list_them(name):
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name[len("timm://"):])
    except RuntimeError:
        cfg = None
    assert cfg is None or not cfg.hf_hub_id  # timm publishes no Hub file for it
    with pytest.raises(WeightsSourceError) as e:
        resolve_source(name)
    assert repr(name) in str(e.value) and "timm.list_pretrained(" in str(e.value)


def test_timm_name_without_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.models", None)  # import fails
    with pytest.raises(WeightsSourceError) as e:
        resolve_source("timm://resnext50_32x4d.a1h_in1k")
    assert "pip install timm" in str(e.value) and "timm://resnext50_32x4d.a1h_in1k" in str(e.value)


def test_catalog_and_detectron2_names_as_detectron2_resolves_them():
    from detectron2.checkpoint.catalog import ModelCatalog

    # A ModelCatalog file of no preset (a GroupNorm trunk): its URL, nothing else known.
    src = resolve_source("catalog://ImageNetPretrained/FAIR/R-50-GN")
    assert (src.url, src.convention, src.arch) == (ModelCatalog.get("ImageNetPretrained/FAIR/R-50-GN"), None, "")
    assert src.name == "catalog://ImageNetPretrained/FAIR/R-50-GN"
    assert src.key == "detectron/" + src.url.split("/detectron/", 1)[1]
    # ModelCatalog's names are case-sensitive: refused as Detectron2 refuses it, naming the right one.
    with pytest.raises(RuntimeError):
        ModelCatalog.get("imagenetpretrained/FAIR/X-101-32x8d")
    with pytest.raises(WeightsSourceError) as e:
        resolve_source("catalog://imagenetpretrained/FAIR/X-101-32x8d")
    assert "'catalog://ImageNetPretrained/FAIR/X-101-32x8d'" in str(e.value)
    # A Detectron2 zoo detector: the file model_zoo names, no ImageNet convention or trunk.
    zoo = model_zoo.get_checkpoint_url("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
    src = resolve_source("detectron2://" + zoo.split("/detectron2/", 1)[1])
    assert (src.url, src.convention, src.arch) == (zoo, None, "")


# --------------------------------------------------------------------------
# Offline: the printed command is one tools/convert_pretrained.py accepts,
# with the options the name knows
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name,arch,convention,mean_std", [
    ("torchvision://resnext50_32x4d.IMAGENET1K_V2", "X-50-32x4d", None, None),  # the tool tells torchvision files
    ("detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl", "X-101-32x8d", "fair", None),
    ("catalog://ImageNetPretrained/MSRA/R-101", "R-101", "msra", None),
    ("timm://resnet50_clip.openai", None, None, "clip"),
    ("URL/w/x26.pth", None, None, None),  # a plain URL: unknown; maybe a detector
])
def test_offline_message_gives_a_command_the_converter_accepts(monkeypatch, tmp_path, name, arch, convention, mean_std):
    from test_convert_pretrained import _load_tool

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


# --------------------------------------------------------------------------
# A sha256 published on a redirect (the Hugging Face Hub's X-Linked-Etag)
# --------------------------------------------------------------------------
class LocalServer:
    """127.0.0.1, for what FileServer does not do: GET /hub/<f> answers 302 to /cdn/<f>
    with ``etag`` as X-Linked-Etag (as the Hub redirects to its CDN); /cdn/<f> serves
    ``data``; /nolength/<f> serves it without Content-Length (the end of the body is
    the end of the connection); /hangup closes without an answer. ``requests``: the
    headers of every request."""

    def __init__(self, data, etag=""):
        server = self
        self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                if self.path.startswith("/hub/"):
                    self.send_response(302)
                    self.send_header("Location", "/cdn/" + self.path[len("/hub/"):])
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path.startswith(("/cdn/", "/nolength/")):
                    self.send_response(200)
                    if self.path.startswith("/cdn/"):
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.close_connection = True
                elif self.path == "/hangup":
                    self.close_connection = True
                else:
                    self.send_error(404)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.thread.join(timeout=5)
        self.httpd.server_close()


@pytest.fixture(scope="module")
def x26_bytes():
    return torch_bytes(tv_resnext(seed=1).state_dict())


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


# --------------------------------------------------------------------------
# Staging, conversion options and detector checkpoints of a download
# (issue #16: mutation survivors of fetch_weights/_install)
# --------------------------------------------------------------------------
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


class StallingServer:
    """127.0.0.1: answers every request with ``head`` (bytes: nothing, or a status
    line, headers and the start of a body) and then stalls, the connection held
    open, until stop()."""

    def __init__(self, head):
        self.head, self.conns, self.done = head, [], threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(self.head)

    def stop(self):
        self.done.set()
        self.thread.join(timeout=5)
        for c in self.conns:
            c.close()
        self.sock.close()


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


def test_a_url_with_a_url_in_its_query_is_one_file():
    """A download link may carry another URL in its query (a signed or redirecting
    link): it is still the URL of one file, not a malformed name. Catches splitting
    the name at every '://'."""
    name = "https://files.example.org/get/x26.pth?from=https://mirror.example.org/x26.pth"
    src = resolve_source(name)
    assert (src.url, src.filename, src.sha256) == (name, "x26.pth", "")


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
