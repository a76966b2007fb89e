# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""``MODEL.WEIGHTS`` by name: weights downloaded once, checked, converted, cached.

A name says where the file is published; the file is downloaded once per
machine (one process downloads, the others of a multi-process run wait on a
file lock, as Detectron2's PathManager does), checked against the sha256 the
source publishes where it publishes one, converted by
:func:`~resnext_det.checkpoint.convert.convert_weights` (what
``tools/convert_pretrained.py`` runs) with its input convention recorded, and
cached. :class:`~resnext_det.checkpoint.ResNeXtCheckpointer` then loads the
cached file and checks it against the config like any converted file.

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

The cache is ``$RESNEXT_DET_CACHE`` (default ``~/.cache/resnext_det``):
``downloads/`` (the published files), ``converted/`` (Detectron2 checkpoints with
their convention), ``detectors/`` (detector checkpoints, as published). A file
enters it only whole and checked: it is downloaded into a temporary folder
beside it, its length and sha256 checked, read and converted there, and only
then renamed into place. ``$RESNEXT_DET_MIRROR`` makes every named source
download ``https://HOST/PATH`` from ``$RESNEXT_DET_MIRROR/HOST/PATH`` instead
(a mirror for machines without internet; the tests).
"""
import contextlib
import dataclasses
import errno
import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import portalocker
import torch
import torchvision
from tqdm import tqdm

from detectron2.checkpoint.catalog import ModelCatalog

from ..errors import UserError
from ..presets import PRESETS
from ..utils.io import atomic_open
from .convert import ConversionError, convert_weights, save_converted
from .readers import CheckpointReadError, key_family, read_weights_file

__all__ = [
    "CACHE_ENV",
    "MIRROR_ENV",
    "SCHEMES",
    "WeightsSourceError",
    "WeightsSource",
    "is_source_name",
    "resolve_source",
    "cache_dir",
    "cached_paths",
    "fetch_weights",
    "named_sources",
]

logger = logging.getLogger(__name__)

#: The cache folder (default ``$XDG_CACHE_HOME/resnext_det``, i.e. ``~/.cache/resnext_det``).
CACHE_ENV = "RESNEXT_DET_CACHE"
#: A mirror serving ``https://HOST/PATH`` of every named source as ``$RESNEXT_DET_MIRROR/HOST/PATH``.
MIRROR_ENV = "RESNEXT_DET_MIRROR"
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
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_LOCK_TIMEOUT_S = 4 * 3600.0


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


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------
def cache_dir() -> str:
    """``$RESNEXT_DET_CACHE``, else ``$XDG_CACHE_HOME/resnext_det`` (``~/.cache/resnext_det``)."""
    d = os.environ.get(CACHE_ENV)
    if d:
        return os.path.abspath(os.path.expanduser(d))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnext_det")


def cached_paths(src: WeightsSource, root: Optional[str] = None) -> Dict[str, str]:
    """Where ``src`` lives in the cache: "download" (the published file),
    "converted" (the Detectron2 checkpoint), "detector" (a detector checkpoint,
    as published), "lock"."""
    root = root or cache_dir()
    return {
        "download": os.path.join(root, "downloads", src.key),
        "converted": os.path.join(root, "converted", os.path.splitext(src.key)[0] + ".pth"),
        "detector": os.path.join(root, "detectors", src.key),
        "lock": os.path.join(root, "locks", src.key + ".lock"),
    }


@contextlib.contextmanager
def _locked(path: str, what: str) -> Iterator[None]:
    """An exclusive file lock (portalocker, as Detectron2's PathManager uses)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = portalocker.Lock(path, timeout=0, fail_when_locked=True)
    try:
        lock.acquire()
    except portalocker.exceptions.LockException:
        logger.info("%s: another process is downloading or converting it; waiting ...", what)
        lock = portalocker.Lock(path, timeout=_LOCK_TIMEOUT_S, check_interval=0.5)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual_steps(src: WeightsSource, paths: Dict[str, str]) -> str:
    out = f"{src.arch or os.path.splitext(src.filename)[0]}.pth"
    cmd = f"python tools/convert_pretrained.py {src.filename} {out}"
    if src.arch:
        cmd += f" --arch {src.arch}"
    if src.convention and src.convention != "torchvision":
        cmd += f" --convention {src.convention}"
    for flag, v in (("--pixel-mean", src.pixel_mean), ("--pixel-std", src.pixel_std)):
        if v:
            cmd += f" {flag} {' '.join(f'{x:g}' for x in v)}"
    # Only a URL, detectron2:// or catalog:// name may be a detector checkpoint; the other
    # sources publish ImageNet classifiers only.
    classifier = src.arch or src.name.split("://", 1)[0] in ("torchvision", "timm", "torch7")
    detector = "" if classifier else " (a detector checkpoint needs no conversion: set MODEL.WEIGHTS to the file)"
    return (
        f"without internet, fetch that file on a machine with it and put it at {paths['download']} "
        f"(converted here on the next run), or convert it yourself: {cmd}, then set MODEL.WEIGHTS "
        f"to {out}{detector}"
    )


# --------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------
class _Refused(Exception):
    pass


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of every redirect (the Hugging Face Hub sends the file's
    sha256 as ``X-Linked-Etag`` on the redirect to its CDN)."""

    def __init__(self):
        super().__init__()
        self.headers: List[object] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download_url(src: WeightsSource) -> str:
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    if not mirror or not src.named:
        return src.url
    parts = urllib.parse.urlsplit(src.url)
    return f"{mirror}/{parts.netloc}{parts.path}"


def _download(src: WeightsSource, dest: str, *, what: str, paths: Dict[str, str], progress: bool) -> None:
    """``src`` into ``dest``, whole and checked, or an error and no ``dest``."""
    url = _download_url(src)
    logger.info("%s: downloading %s ...", what, url)
    redirects = _RecordRedirects()
    opener = urllib.request.build_opener(redirects)
    request = urllib.request.Request(url, headers={"User-Agent": "resnext_det", "Accept-Encoding": "identity"})
    try:
        response = opener.open(request, timeout=_TIMEOUT_S)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsSourceError(
            f"{what}: cannot download {url} ({type(e).__name__}: {reason}); {_manual_steps(src, paths)}"
        ) from e
    checks = []
    if src.sha256:
        checks.append((src.sha256, f"{src.what or 'the source'} publishes sha256 {src.sha256}"))
    for headers in [*redirects.headers, response.headers]:
        etag = str(headers.get("X-Linked-Etag") or "").strip().strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            checks.append((etag, f"the server publishes sha256 {etag[:16]}... (X-Linked-Etag)"))
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        h, n = hashlib.sha256(), 0
        try:
            with atomic_open(dest, "wb") as f, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=src.filename,
                disable=not progress, mininterval=1.0, leave=False,
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
                if total is not None and n != total:
                    raise _Refused(f"the transfer ended after {n} of its {total} bytes")
                digest = h.hexdigest()
                for expected, origin in checks:
                    if not digest.startswith(expected):
                        raise _Refused(f"its sha256 is {digest[:16]}..., {origin}")
        except _Refused as e:
            raise WeightsSourceError(
                f"{what}: refused the file downloaded from {url}: {e}. Nothing was cached; run again "
                "(if it happens again, the server or mirror holds a corrupt copy)"
            ) from None
        except (http.client.HTTPException, OSError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise
            raise WeightsSourceError(
                f"{what}: the download of {url} broke off after {n} bytes ({type(e).__name__}: {e}). "
                "Nothing was cached; run again"
            ) from e
    logger.info("%s: downloaded %s (%.1f MB), sha256 %s", what, src.filename, n / 2**20, digest[:16])


# --------------------------------------------------------------------------
# Fetch: cache, or download + check + convert
# --------------------------------------------------------------------------
def _install(
    src: WeightsSource, path: str, paths: Dict[str, str], *, what: str, progress: bool, origin: str
) -> str:
    """Read ``path``: a detector goes to ``detectors/`` as it is; ImageNet weights
    are converted into ``converted/``. Returns the file to load."""
    try:
        data = read_weights_file(path)
    except CheckpointReadError as e:
        raise WeightsSourceError(f"{what}: {origin} is not a weight file: {e}") from None
    if data.container != "t7" and key_family(data.tensors) == "detector":
        os.makedirs(os.path.dirname(paths["detector"]), exist_ok=True)
        os.replace(path, paths["detector"])
        logger.info("%s: a detector checkpoint, cached as %s", what, paths["detector"])
        return paths["detector"]
    try:
        result = convert_weights(
            path, convention=src.convention, pixel_mean=src.pixel_mean, pixel_std=src.pixel_std,
            progress=progress, source=data,
        )
    except ConversionError as e:
        raise WeightsSourceError(
            f"{what}: cannot convert {origin}: {e} (a name cannot carry these options: convert the "
            "file with tools/convert_pretrained.py and set MODEL.WEIGHTS to its output)"
        ) from None
    record = dict(result.metadata.source or {}, name=src.name, url=src.url)
    result = dataclasses.replace(result, metadata=dataclasses.replace(result.metadata, source=record))
    save_converted(result, paths["converted"])
    logger.info(
        "%s: converted %s (%s, %s) to %s", what, src.filename, result.metadata.arch.describe(),
        result.metadata.input.describe(), paths["converted"],
    )
    return paths["converted"]


def _local_copies(src: WeightsSource, paths: Dict[str, str]) -> List[str]:
    """Files of ``src`` already on this machine: our download, or torchvision's
    (``torch.hub`` cache) for torchvision files."""
    out = [paths["download"]]
    if src.key.startswith("torchvision/"):
        out.append(os.path.join(torch.hub.get_dir(), "checkpoints", src.filename))
    return [p for p in out if os.path.isfile(p)]


def fetch_weights(name: str, *, progress: bool = True, what: str = "") -> str:
    """The local file for weights ``name``: from the cache, or downloaded, checked,
    converted and cached (once per machine, under a file lock). Returns a
    converted checkpoint (``.pth``, its input convention recorded) or, for a
    detector checkpoint, the file as published.

    Args:
        name: a weights name (:func:`is_source_name`).
        progress: show download and conversion progress bars.
        what: how messages name it (default ``MODEL.WEIGHTS = '<name>'``).
    """
    what = what or f"MODEL.WEIGHTS = {name!r}"
    src = resolve_source(name)
    paths = cached_paths(src)
    for kind in ("converted", "detector"):
        if os.path.isfile(paths[kind]):
            logger.info("%s: using the cached %s", what, paths[kind])
            return paths[kind]
    with _locked(paths["lock"], what):
        for kind in ("converted", "detector"):  # another process made it while we waited
            if os.path.isfile(paths[kind]):
                logger.info("%s: using the cached %s", what, paths[kind])
                return paths[kind]
        local = _local_copies(src, paths)
        if local:
            if src.sha256 and not _sha256(local[0]).startswith(src.sha256):
                raise WeightsSourceError(
                    f"{what}: {local[0]} is not the published file (its sha256 does not start with "
                    f"{src.sha256}): delete it and run again"
                )
            logger.info("%s: converting the local copy %s", what, local[0])
            origin = f"the local copy {local[0]} (delete it and run again)"
            return _install(src, local[0], paths, what=what, progress=progress, origin=origin)
        folder = os.path.dirname(paths["download"])
        os.makedirs(folder, exist_ok=True)
        stale = f".{src.filename}.tmp-"
        for entry in os.listdir(folder):  # left by a killed process (we hold the lock)
            if entry.startswith(stale):
                shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=stale, dir=folder)
        try:
            tmp = os.path.join(staging, src.filename)
            _download(src, tmp, what=what, paths=paths, progress=progress)
            origin = f"the file downloaded from {_download_url(src)} (nothing was cached)"
            out = _install(src, tmp, paths, what=what, progress=progress, origin=origin)
            if out == paths["converted"]:
                os.replace(tmp, paths["download"])  # keep the published file, checked
            return out
        finally:
            shutil.rmtree(staging, ignore_errors=True)
