# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Weights names: what a ``MODEL.WEIGHTS`` name resolves to, without the network.

A name says where the file is published; :func:`resolve_source` turns it into a
:class:`WeightsSource` (the URL, the file's place in the cache, the sha256 the
source publishes, and what is known of the weights before download: input
convention, architecture, top-1). :mod:`.sources` downloads, checks, converts
and caches it.

==============================================  =========================================
name                                            resolves to
==============================================  =========================================
``torchvision://resnext101_32x8d[.TAG]``        torchvision's weights enum: TAG is
                                                ``IMAGENET1K_V1``, ``IMAGENET1K_V2`` or
                                                ``DEFAULT`` (torchvision's default)
``timm://resnext50_32x4d.a1h_in1k``             timm's ``pretrained_cfg``: the Hugging Face
                                                Hub file and its mean/std
``detectron2://ImageNetPretrained/...pkl``      Detectron2's file server, as in Detectron2's
                                                own configs (also its zoo detectors)
``catalog://ImageNetPretrained/FAIR/X-...``     Detectron2's ``ModelCatalog`` (Detectron v1
                                                ImageNet files)
``torch7://resnext_101_32x4d``                  the paper's Torch7 release
``https://...[#sha256=HEX]``                    any file the converter reads, or a detector
                                                checkpoint (kept as it is)
==============================================  =========================================

A URL of a catalogued file is that file (the same cache entry, sha256, convention
and architecture).
"""
import dataclasses
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torchvision

from detectron2.checkpoint.catalog import ModelCatalog

from ..errors import UserError
from ..presets import PRESETS

__all__ = [
    "SCHEMES",
    "WeightsSourceError",
    "WeightsSource",
    "is_source_name",
    "resolve_source",
    "named_sources",
]

SCHEMES = ("torchvision", "timm", "detectron2", "catalog", "torch7", "http", "https")
_NAME = re.compile(r"^(%s)://" % "|".join(SCHEMES))

TORCHVISION_URL = "https://download.pytorch.org/models"
HF_URL = "https://huggingface.co"
DETECTRON2_URL = "https://dl.fbaipublicfiles.com/detectron2"
#: Detectron (v1)'s file server: Detectron2's ``ModelCatalog.S3_C2_DETECTRON_PREFIX``.
DETECTRON_URL = "https://dl.fbaipublicfiles.com/detectron"
#: The paper's Torch7 release (facebookresearch/ResNeXt README).
TORCH7_URL = "https://dl.fbaipublicfiles.com/resnext/imagenet_models"

#: Detectron2's ImageNet files (``detectron2://ImageNetPretrained/...``): their
#: input convention (a :data:`~resnext_det.checkpoint.metadata.CONVENTIONS` name,
#: as Detectron2's configs use them) and architecture. Caffe2 files do not say.
DETECTRON2_IMAGENET: Dict[str, Tuple[str, str]] = {
    "ImageNetPretrained/MSRA/R-50.pkl": ("msra", "R-50"),
    "ImageNetPretrained/MSRA/R-101.pkl": ("msra", "R-101"),
    "ImageNetPretrained/FAIR/X-101-32x8d.pkl": ("fair", "X-101-32x8d"),
    "ImageNetPretrained/torchvision/R-50.pkl": ("torchvision", "R-50"),
}
#: Detectron (v1)'s ImageNet files by their ``ModelCatalog`` name
#: (``catalog://ImageNetPretrained/<name>``); ModelCatalog: "MSRA models have
#: STRIDE_IN_1X1=True ... all models here use PIXEL_STD=[1,1,1]".
CATALOG_IMAGENET: Dict[str, Tuple[str, str]] = {
    "MSRA/R-50": ("msra", "R-50"),
    "MSRA/R-101": ("msra", "R-101"),
    "FAIR/X-101-32x8d": ("detectron1", "X-101-32x8d"),
    "FAIR/X-101-64x4d": ("detectron1", "X-101-64x4d"),
    "FAIR/X-152-32x8d-IN5k": ("detectron1", "X-152-32x8d"),
}
#: The paper's Torch7 release: architecture and top-1 (100 - the README's top-1 error).
TORCH7_RELEASE: Dict[str, Tuple[str, float]] = {
    "resnext_50_32x4d": ("X-50-32x4d", 77.8),
    "resnext_101_32x4d": ("X-101-32x4d", 78.8),
    "resnext_101_64x4d": ("X-101-64x4d", 79.6),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
#: torch.hub's rule: a file name ``<name>-<sha256 prefix>.<ext>`` carries its hash.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
_HEX = re.compile(r"[0-9a-f]{8,64}")


class WeightsSourceError(UserError):
    """A weights name that is unknown, or a download that failed or was refused;
    one line that names the URL and what to do."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a named file is published, and what is known of it before download.

    Attributes:
        name: the name as written in ``MODEL.WEIGHTS``.
        url: where the source publishes the file.
        key: its place in the cache, ``<source>/<path>``.
        sha256: the sha256 (or its prefix) the source publishes; "" for none.
        convention: its input convention, a ``CONVENTIONS`` name; None: the
            file format's own (torchvision, timm, Torch7), or unknown.
        pixel_mean: a mean/std other than the convention's (0-255 scale), e.g.
            from a timm ``pretrained_cfg``.
        pixel_std: likewise.
        arch: the :data:`~resnext_det.presets.PRESETS` name it holds; "" unknown.
        top1: ImageNet-1k top-1 (%) the source reports, or None.
        what: the source's own name for it.
    """

    name: str
    url: str
    key: str
    sha256: str = ""
    convention: Optional[str] = None
    pixel_mean: Optional[Tuple[float, float, float]] = None
    pixel_std: Optional[Tuple[float, float, float]] = None
    arch: str = ""
    top1: Optional[float] = None
    what: str = ""

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def named(self) -> bool:
        """A catalogued name (not a plain URL): the mirror applies."""
        return not self.name.startswith(("http://", "https://"))


def is_source_name(path: str) -> bool:
    """Whether ``path`` is a name this module resolves (``torchvision://``,
    ``timm://``, ``detectron2://``, ``catalog://``, ``torch7://``, ``http(s)://``)."""
    return isinstance(path, str) and _NAME.match(path) is not None


def _preset_of(model_name: str) -> str:
    """torchvision/timm model name -> PRESETS name ("resnext101_32x8d" -> "X-101-32x8d")."""
    m = re.fullmatch(r"resnext(\d+)_(\d+)x(\d+)d", model_name)
    name = f"X-{m[1]}-{m[2]}x{m[3]}d" if m else ""
    m = re.fullmatch(r"resnet(\d+)", model_name)
    name = f"R-{m[1]}" if m else name
    return name if name in PRESETS else ""


# --------------------------------------------------------------------------
# Names -> sources (no network)
# --------------------------------------------------------------------------
def _torchvision(name: str, rest: str) -> WeightsSource:
    model, _, tag = rest.partition(".")
    try:
        enum = torchvision.models.get_model_weights(model)
    except (ValueError, KeyError):
        raise WeightsSourceError(
            f"{name!r}: torchvision has no model {model!r} with weights; ResNeXt/ResNet ones are "
            "resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, resnet50, resnet101, resnet152"
        ) from None
    try:
        w = enum[tag or "DEFAULT"]
    except KeyError:
        raise WeightsSourceError(
            f"{name!r}: torchvision's {enum.__name__} has no {tag!r}; it has {list(enum.__members__)}"
        ) from None
    filename = w.url.rsplit("/", 1)[-1]
    m = _HASH_IN_NAME.search(filename)
    top1 = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return WeightsSource(
        name, w.url, f"torchvision/{filename}", sha256=m[1] if m else "", convention="torchvision",
        arch=_preset_of(model), top1=top1, what=f"torchvision {enum.__name__}.{w.name}",
    )


def _timm(name: str, rest: str) -> WeightsSource:
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        raise WeightsSourceError(f"{name!r}: timm:// names need timm (pip install timm)") from None
    try:
        cfg = get_pretrained_cfg(rest)
    except RuntimeError:  # an architecture it knows, with a tag it does not
        cfg = None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise WeightsSourceError(
            f"{name!r}: timm has no pretrained weights {rest!r} on the Hugging Face Hub "
            "(list them with timm.list_pretrained('resnext*'))"
        )
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    base = os.environ.get("HF_ENDPOINT", HF_URL).rstrip("/")
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    imagenet = all(abs(a - b) < 1e-6 for a, b in zip(mean + std, _IMAGENET_MEAN + _IMAGENET_STD))
    return WeightsSource(
        name,
        f"{base}/{cfg.hf_hub_id}/resolve/main/{filename}",
        f"huggingface/{cfg.hf_hub_id}/{filename}",
        convention="torchvision",
        pixel_mean=None if imagenet else tuple(round(255 * v, 6) for v in mean),
        pixel_std=None if imagenet else tuple(round(255 * v, 6) for v in std),
        arch=_preset_of(rest.split(".")[0]),
        what=f"timm {rest} (Hub {cfg.hf_hub_id})",
    )


def _detectron2(name: str, path: str) -> WeightsSource:
    convention, arch = DETECTRON2_IMAGENET.get(path, (None, ""))
    return WeightsSource(
        name, f"{DETECTRON2_URL}/{path}", f"detectron2/{path}", convention=convention, arch=arch,
        what=f"Detectron2 {path}",
    )


def _catalog(name: str, rest: str) -> WeightsSource:
    prefix = "ImageNetPretrained/"
    sub = rest[len(prefix):] if rest.startswith(prefix) else None
    if sub not in ModelCatalog.C2_IMAGENET_MODELS:
        raise WeightsSourceError(
            f"{name!r}: Detectron2's ModelCatalog names ImageNet files "
            f"{['catalog://' + prefix + k for k in ModelCatalog.C2_IMAGENET_MODELS]}"
        )
    path = ModelCatalog.C2_IMAGENET_MODELS[sub]
    convention, arch = CATALOG_IMAGENET.get(sub, (None, ""))
    return WeightsSource(
        name, f"{DETECTRON_URL}/{path}", f"detectron/{path}", convention=convention, arch=arch,
        what=f"Detectron {path}",
    )


def _torch7(name: str, rest: str) -> WeightsSource:
    base = rest[: -len(".t7")] if rest.endswith(".t7") else rest
    if base not in TORCH7_RELEASE:
        raise WeightsSourceError(f"{name!r}: the Torch7 release has {sorted(TORCH7_RELEASE)}")
    arch, top1 = TORCH7_RELEASE[base]
    return WeightsSource(
        name, f"{TORCH7_URL}/{base}.t7", f"torch7/{base}.t7", convention="torchvision", arch=arch,
        top1=top1, what=f"facebookresearch/ResNeXt {base}.t7",
    )


def _published(url: str) -> Optional[WeightsSource]:
    """The catalogued source published at ``url``, if any."""
    if url.startswith(TORCHVISION_URL + "/"):
        filename = url[len(TORCHVISION_URL) + 1:]
        m = _HASH_IN_NAME.search(filename)
        model = re.match(r"(resnext\d+_\d+x\d+d|resnet\d+)-", filename)
        return WeightsSource(
            url, url, f"torchvision/{filename}", sha256=m[1] if m else "", convention="torchvision",
            arch=_preset_of(model[1]) if model else "",
        )
    if url.startswith(DETECTRON2_URL + "/"):
        return _detectron2(url, url[len(DETECTRON2_URL) + 1:])
    for sub, path in ModelCatalog.C2_IMAGENET_MODELS.items():
        if url == f"{DETECTRON_URL}/{path}":
            return _catalog(url, "ImageNetPretrained/" + sub)
    if url.startswith(TORCH7_URL + "/"):
        return _torch7(url, url[len(TORCH7_URL) + 1:])
    return None


def _url(name: str) -> WeightsSource:
    parts = urllib.parse.urlsplit(name)
    fragment = dict(urllib.parse.parse_qsl(parts.fragment))
    sha = fragment.get("sha256", "").lower()
    if parts.fragment and not _HEX.fullmatch(sha):
        raise WeightsSourceError(f"{name!r}: the only fragment understood is #sha256=<8 to 64 hex digits>")
    url = urllib.parse.urlunsplit(parts._replace(fragment=""))
    segments = [s for s in parts.path.split("/") if s not in ("", ".")]
    if not parts.netloc or not segments or ".." in segments:
        raise WeightsSourceError(f"{name!r} is not the URL of a file")
    known = _published(url)
    if known is not None:
        return dataclasses.replace(known, name=name, sha256=sha or known.sha256)
    host = parts.netloc.replace(":", "_")
    return WeightsSource(name, url, "/".join(["url", host, *segments]), sha256=sha, what=url)


_RESOLVERS = {
    "torchvision": _torchvision,
    "timm": _timm,
    "detectron2": _detectron2,
    "catalog": _catalog,
    "torch7": _torch7,
}


def resolve_source(name: str) -> WeightsSource:
    """What ``name`` resolves to, without touching the network or the cache."""
    if not is_source_name(name):
        raise WeightsSourceError(
            f"{name!r} is not a weights name: use {', '.join(s + '://' for s in SCHEMES)} (see docs/weights.md)"
        )
    scheme, rest = name.split("://", 1)
    if scheme in ("http", "https"):
        return _url(name)
    if not rest:
        raise WeightsSourceError(f"{name!r}: nothing after {scheme}://")
    if ".." in rest.split("/"):  # the name becomes a path in the cache: it must stay inside
        raise WeightsSourceError(f"{name!r}: a '..' part is not allowed in a weights name")
    return _RESOLVERS[scheme](name, rest)


def named_sources() -> List[WeightsSource]:
    """The ResNeXt/ResNet ImageNet weights of every source, by name (for the docs
    and the tests)."""
    names = [
        f"torchvision://{m}.{t}"
        for m, tags in (
            ("resnext50_32x4d", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
            ("resnext101_32x8d", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
            ("resnext101_64x4d", ("IMAGENET1K_V1",)),
            ("resnet50", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
            ("resnet101", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
            ("resnet152", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
        )
        for t in tags
    ]
    names += [f"detectron2://{p}" for p in DETECTRON2_IMAGENET]
    names += [f"catalog://ImageNetPretrained/{k}" for k in CATALOG_IMAGENET]
    names += [f"torch7://{k}" for k in TORCH7_RELEASE]
    return [resolve_source(n) for n in names]

