# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""``MODEL.WEIGHTS`` by name: weights downloaded once, checked, converted, cached.

What a name (``torchvision://...``, ``timm://...``, ``detectron2://...``,
``catalog://...``, ``torch7://...``, a URL) resolves to is :mod:`.names`'
business; this module gets the file. It is downloaded once per machine (one
process downloads, the others of a multi-process run wait on a file lock, as
Detectron2's PathManager does), checked against the sha256 the source publishes
where it publishes one, converted by
:func:`~resnext_det.checkpoint.convert.convert_weights` (what
``tools/convert_pretrained.py`` runs) with its input convention recorded, and
cached. :class:`~resnext_det.checkpoint.ResNeXtCheckpointer` then loads the
cached file and checks it against the config like any converted file.

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
from typing import Dict, Iterator, List, Optional

import portalocker
import torch
from tqdm import tqdm

from ..utils.io import atomic_open, remove_stale_folders
from .convert import ConversionError, convert_weights, save_converted
from .names import WeightsSource, WeightsSourceError, is_source_name, named_sources, resolve_source
from .readers import CheckpointReadError, key_family, read_weights_file

__all__ = [
    "CACHE_ENV",
    "MIRROR_ENV",
    "cache_dir",
    "cached_paths",
    "fetch_weights",
    # what a name resolves to (:mod:`.names`), also importable from here
    "WeightsSourceError",
    "WeightsSource",
    "is_source_name",
    "resolve_source",
    "named_sources",
]

logger = logging.getLogger(__name__)

#: The cache folder (default ``$XDG_CACHE_HOME/resnext_det``, i.e. ``~/.cache/resnext_det``).
CACHE_ENV = "RESNEXT_DET_CACHE"
#: A mirror serving ``https://HOST/PATH`` of every named source as ``$RESNEXT_DET_MIRROR/HOST/PATH``.
MIRROR_ENV = "RESNEXT_DET_MIRROR"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_LOCK_TIMEOUT_S = 4 * 3600.0


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
        remove_stale_folders(folder, stale)  # left by a killed process (we hold the lock)
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
