# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Files written whole or not at all.

Every file resnext_det writes (checkpoints, proposals, configs, results, images)
goes through :func:`atomic_write`: the bytes go to a temporary name in the same
folder, are flushed and ``fsync``-ed, then renamed over the target with
``os.replace``. A reader (or a rerun after ``kill -9``) sees the old file or the
complete new one, never a prefix. A failed write removes its temporary file;
:func:`remove_stale_temporaries` removes those a killed process left behind.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

__all__ = [
    "TMP_MARK",
    "atomic_write",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "finite",
    "remove_stale_folders",
    "remove_stale_temporaries",
    "file_sha256",
]

#: Infix of the temporary names (``.model_final.pth.tmp-xxxx``), for clean-up.
TMP_MARK = ".tmp-"
_TMP_RE = re.compile(
    r"^\..+" + re.escape(TMP_MARK) + r"[^.]+(\.\w+)?$"  # ours: .model_final.pth.tmp-ab12cd
    r"|^.+\.tmp\d+$"  # resnext_det <= 0.1's: model_final.pth.tmp4242
)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is
    flushed, ``fsync``-ed and renamed to ``path``; on an exception it is removed
    and ``path`` is left as it was."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TMP_MARK}", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a binary file object and make its bytes ``path`` whole
    (e.g. ``atomic_write(p, lambda f: torch.save(obj, f))``)."""
    with atomic_open(path, "wb") as f:
        write(f)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    atomic_write_bytes(path, text.encode("utf-8"))


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats (e.g. COCO metrics of an empty area range) as None,
    recursively through dicts, lists and tuples: what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def atomic_write_json(path: str, obj: Any, *, indent: int = 2) -> None:
    """``obj`` as strict JSON (NaN/inf written as null, other objects as ``str``),
    written whole or not at all."""
    text = json.dumps(finite(obj), indent=indent, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def remove_stale_temporaries(folder: str) -> int:
    """Remove the temporary files that writes killed half way left in ``folder``
    (not recursive). Returns how many were removed. Only call it where no other
    process of the same run is writing (e.g. on the main process at start-up)."""
    if not os.path.isdir(folder):
        return 0
    n = 0
    for name in os.listdir(folder):
        if _TMP_RE.match(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                n += 1
    return n


def remove_stale_folders(parent: str, *prefixes: str) -> None:
    """Remove the folders in ``parent`` whose names start with one of ``prefixes``: the
    staging folders (``tempfile.mkdtemp(prefix=...)``) of writers killed before their
    rename. Files with those names are left alone. Only call it where no other process
    stages into ``parent`` (e.g. under a lock)."""
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(prefixes):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def file_sha256(path: str) -> str:
    """The sha256 hex digest of the file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
