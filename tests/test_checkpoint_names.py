"""Tests of resnext_det/checkpoint/names.py: MODEL.WEIGHTS names (issue #13) resolved to the
real public files (``resolve_source``, ``named_sources``) and their place in the cache, without
any network. References are independent of the code under test: the published URLs and hashes
as written in torchvision / Detectron2 / facebookresearch/ResNeXt, and the sources' own code and
configs. The downloads of those files (resnext_det/checkpoint/sources.py):
tests/test_checkpoint_sources.py."""
import os
import sys

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import LazyConfig, get_cfg

from resnext_det import add_resnext_config
from resnext_det.checkpoint import CONVENTIONS, WeightsSourceError, resolve_source
from resnext_det.checkpoint.names import named_sources
from resnext_det.checkpoint.sources import cached_paths

from weights_helpers import PUBLISHED, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------
# Names resolve to the real public files (no network)
# --------------------------------------------------------------------------
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


def test_a_url_with_a_url_in_its_query_is_one_file():
    """A download link may carry another URL in its query (a signed or redirecting
    link): it is still the URL of one file, not a malformed name. Catches splitting
    the name at every '://'."""
    name = "https://files.example.org/get/x26.pth?from=https://mirror.example.org/x26.pth"
    src = resolve_source(name)
    assert (src.url, src.filename, src.sha256) == (name, "x26.pth", "")


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
