# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Inspect a user's COCO folder: what is there, what is missing, where to get it.

The paper's detection setup (Appendix B) trains on COCO 2014 train + the 35k
"valminusminival" subset of val and tests on the 5k "minival" (Detectron2 names:
``coco_2014_train``, ``coco_2014_valminusminival``, ``coco_2014_minival``); the
Detectron2 model-zoo style configs use ``coco_2017_train`` / ``coco_2017_val``.
File names and image folders are Detectron2's own (``_PREDEFINED_SPLITS_COCO`` in
``detectron2/data/datasets/builtin.py``), under ``$DETECTRON2_DATASETS/coco``.

The check is cheap on real COCO: JSON files up to ``full_parse_max_bytes`` are
parsed; larger ones (instances_train2014.json is ~330 MB) are streamed once, checking
the outer braces and the top-level keys and counting the ``"file_name"`` entries, one
per image. Image folders are counted with ``os.scandir``. Nothing is ever downloaded.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import ConfigError

__all__ = [
    "APPENDIX_B_DATASETS",
    "ZOO_DATASETS",
    "COCO_DATASETS",
    "EXPECTED_IMAGES",
    "SOURCES",
    "CheckItem",
    "coco_dataset_files",
    "inspect_json",
    "inspect_image_dir",
    "check_coco",
    "resolve_datasets",
    "format_report",
]

#: Appendix B: train on coco_2014_train + coco_2014_valminusminival, test on coco_2014_minival.
APPENDIX_B_DATASETS: Tuple[str, ...] = (
    "coco_2014_train",
    "coco_2014_valminusminival",
    "coco_2014_minival",
)
#: Detectron2 model-zoo style configs (configs/Base-ResNeXt-*.yaml).
ZOO_DATASETS: Tuple[str, ...] = ("coco_2017_train", "coco_2017_val")
#: Every COCO instances dataset this checker knows.
COCO_DATASETS: Tuple[str, ...] = APPENDIX_B_DATASETS + ("coco_2014_val",) + ZOO_DATASETS

#: Number of images in each file / folder, relative to the coco folder.
EXPECTED_IMAGES: Dict[str, int] = {
    "annotations/instances_train2014.json": 82783,
    "annotations/instances_val2014.json": 40504,
    "annotations/instances_minival2014.json": 5000,
    "annotations/instances_valminusminival2014.json": 35504,
    "annotations/instances_train2017.json": 118287,
    "annotations/instances_val2017.json": 5000,
    "train2014": 82783,
    "val2014": 40504,
    "train2017": 118287,
    "val2017": 5000,
}

_COCO_SITE = "https://cocodataset.org/#download"
_DETECTRON_MINIVAL = (
    "Detectron's coco_annotations_minival.tgz "
    "(https://dl.fbaipublicfiles.com/detectron/coco/coco_annotations_minival.tgz; "
    "it unpacks into annotations/)"
)
#: Where each file comes from (described, never fetched).
SOURCES: Dict[str, str] = {
    "annotations/instances_train2014.json": f"annotations_trainval2014.zip from {_COCO_SITE}",
    "annotations/instances_val2014.json": f"annotations_trainval2014.zip from {_COCO_SITE}",
    "annotations/instances_minival2014.json": _DETECTRON_MINIVAL,
    "annotations/instances_valminusminival2014.json": _DETECTRON_MINIVAL,
    "annotations/instances_train2017.json": f"annotations_trainval2017.zip from {_COCO_SITE}",
    "annotations/instances_val2017.json": f"annotations_trainval2017.zip from {_COCO_SITE}",
    "train2014": f"train2014.zip (2014 Train images, 13 GB) from {_COCO_SITE}",
    "val2014": f"val2014.zip (2014 Val images, 6 GB) from {_COCO_SITE}",
    "train2017": f"train2017.zip (2017 Train images, 18 GB) from {_COCO_SITE}",
    "val2017": f"val2017.zip (2017 Val images, 1 GB) from {_COCO_SITE}",
}

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class CheckItem:
    """The state of one file or folder of the COCO tree.

    Attributes:
        path: relative to the coco folder ("annotations/instances_minival2014.json").
        kind: "json" or "images".
        needed: True when a requested dataset uses it.
        status: "ok", "missing", "corrupt" (JSON that does not parse / is not COCO),
            "wrong-count" (JSON with another number of images than expected), or
            "incomplete" (an image folder with fewer images than expected).
        detail: a human-readable line (counts, size, the parse error).
        datasets: the Detectron2 dataset names that use it.
    """

    path: str
    kind: str
    needed: bool
    status: str = "missing"
    detail: str = ""
    datasets: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def source(self) -> str:
        return SOURCES.get(self.path, "the official COCO site, " + _COCO_SITE)


def coco_dataset_files(name: str) -> Tuple[str, str]:
    """(image folder, json file) of a Detectron2 COCO dataset, relative to the coco
    folder, from Detectron2's own table of builtin datasets."""
    from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO

    splits = _PREDEFINED_SPLITS_COCO["coco"]
    if name not in splits or name not in COCO_DATASETS:
        raise ConfigError(
            f"Unknown COCO dataset {name!r} (--datasets): choose among {', '.join(COCO_DATASETS)}, "
            "or the groups 'appendix-b', 'zoo', 'all'"
        )
    image_root, json_file = splits[name]
    strip = lambda p: p[len("coco/"):] if p.startswith("coco/") else p  # noqa: E731
    return strip(image_root), strip(json_file)


def _count_stream(path: str, chunk: int = 8 << 20) -> Tuple[int, bytes, bytes, Dict[bytes, bool]]:
    pattern = b'"file_name"'
    keys = {b'"images"': False, b'"annotations"': False, b'"categories"': False}
    keep = max(len(k) for k in list(keys) + [pattern]) - 1
    count, tail, head, first = 0, b"", b"", True
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            if first:
                head, first = buf[:64], False
            data = tail + buf
            count += data.count(pattern)
            for k in keys:
                keys[k] = keys[k] or k in data
            # the previous chunk's last bytes are prepended so that a pattern cut by
            # the chunk edge is found; one lying wholly in them was counted already
            count -= tail.count(pattern)
            tail = data[-keep:]
    return count, head, tail, keys


def inspect_json(
    path: str, expected_images: Optional[int] = None, *, full_parse_max_bytes: int = 64 << 20
) -> Tuple[str, str]:
    """Check one COCO instances JSON.

    Args:
        path: the file.
        expected_images: the number of images it must list (None: not checked).
        full_parse_max_bytes: files up to this size are parsed with ``json``; larger
            ones are streamed (a structural check and an image count).

    Returns:
        (status, detail): status is "ok", "missing", "corrupt" or "wrong-count".
    """
    if not os.path.isfile(path):
        return "missing", "not found"
    size = os.path.getsize(path)
    mb = f"{size / 1e6:.1f} MB"
    if size <= full_parse_max_bytes:
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            return "corrupt", f"does not parse as JSON ({e}); {mb}: re-extract it"
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            return "corrupt", f"parses but has no 'images' list: not a COCO instances file ({mb})"
        missing = [k for k in ("annotations", "categories") if k not in data]
        if missing:
            return "corrupt", f"parses but lacks {missing}: not a COCO instances file ({mb})"
        n, how = len(data["images"]), "parsed"
    else:
        n, head, tail, keys = _count_stream(path)
        if not head.lstrip().startswith(b"{") or not tail.rstrip().endswith(b"}"):
            return "corrupt", f"does not start with '{{' and end with '}}': truncated? ({mb}); re-extract it"
        missing = [k.decode().strip('"') for k, v in keys.items() if not v]
        if missing:
            return "corrupt", f"lacks the keys {missing}: not a COCO instances file ({mb})"
        how = "streamed"
    detail = f"{n} images ({how}, {mb})"
    if expected_images is not None and n != expected_images:
        return "wrong-count", f"{n} images, expected {expected_images}: another file under this name? ({how}, {mb})"
    return "ok", detail


def inspect_image_dir(path: str, expected_images: Optional[int] = None) -> Tuple[str, str]:
    """Check one image folder by counting its image files (os.scandir, no decoding).

    Returns:
        (status, detail): "ok", "missing" or "incomplete" (fewer images than expected).
    """
    if not os.path.isdir(path):
        return "missing", "not found"
    with os.scandir(path) as it:
        n = sum(1 for e in it if e.name.lower().endswith(_IMAGE_EXTS))
    if expected_images is not None and n < expected_images:
        return "incomplete", f"{n} images, expected {expected_images}: extraction unfinished?"
    extra = f" (expected {expected_images})" if expected_images is not None and n != expected_images else ""
    return "ok", f"{n} images{extra}"


def resolve_datasets(names: Iterable[str]) -> List[str]:
    """Expand the groups 'appendix-b', 'zoo', 'all' and check the names."""
    groups = {"appendix-b": APPENDIX_B_DATASETS, "zoo": ZOO_DATASETS, "all": COCO_DATASETS}
    out: List[str] = []
    for n in names:
        for m in groups.get(n, (n,)):
            coco_dataset_files(m)  # raises on unknown names
            if m not in out:
                out.append(m)
    return out


def check_coco(
    coco_dir: str,
    *,
    datasets: Sequence[str] = APPENDIX_B_DATASETS,
    full_parse_max_bytes: int = 64 << 20,
) -> List[CheckItem]:
    """Inspect every COCO 2014/2017 file this project knows, under ``coco_dir``.

    Args:
        coco_dir: the coco folder (``$DETECTRON2_DATASETS/coco``).
        datasets: Detectron2 dataset names (or groups 'appendix-b', 'zoo', 'all')
            whose files are *needed*; the others are reported as optional.
        full_parse_max_bytes: see :func:`inspect_json`.

    Returns:
        One :class:`CheckItem` per file or folder, needed ones first.
    """
    wanted = resolve_datasets(datasets)
    items: Dict[str, CheckItem] = {}
    for name in COCO_DATASETS:
        image_dir, json_file = coco_dataset_files(name)
        for rel, kind in ((json_file, "json"), (image_dir, "images")):
            item = items.setdefault(rel, CheckItem(path=rel, kind=kind, needed=False))
            item.datasets.append(name)
            item.needed = item.needed or name in wanted
    for item in items.values():
        path = os.path.join(coco_dir, item.path)
        expected = EXPECTED_IMAGES.get(item.path)
        if item.kind == "json":
            item.status, item.detail = inspect_json(
                path, expected, full_parse_max_bytes=full_parse_max_bytes
            )
        else:
            item.status, item.detail = inspect_image_dir(path, expected)
    return sorted(items.values(), key=lambda i: (not i.needed, i.kind != "json", i.path))


def format_report(items: Sequence[CheckItem], coco_dir: str, *, datasets: Sequence[str]) -> str:
    """The report printed by ``datasets/prepare_coco.py --check``.

    Args:
        items: from :func:`check_coco`.
        coco_dir: the folder that was checked.
        datasets: the dataset names that were requested (shown in the header).
    """
    needed = [i for i in items if i.needed]
    names = resolve_datasets(datasets)
    lines = [f"COCO folder: {coco_dir}", f"Needed for: {', '.join(names) or '(nothing)'}", ""]
    for title, group in (("Needed", needed), ("Optional", [i for i in items if not i.needed])):
        if not group:
            continue
        lines.append(f"{title}:")
        for i in group:
            tag = "ok" if i.ok else i.status.upper()
            lines.append(f"  [{tag:>11}] {i.path:<48} {i.detail}")
            if not i.ok and (i.needed or i.status != "missing"):
                lines.append(f"  {'':>13} used by {', '.join(i.datasets)}; get it: {i.source}")
        lines.append("")
    bad = [i for i in needed if not i.ok]
    if bad:
        lines.append(f"NOT READY: {len(bad)} of {len(needed)} needed files/folders are missing or bad: "
                     + ", ".join(i.path for i in bad))
    else:
        lines.append(f"READY: all {len(needed)} needed files/folders are present and look right.")
    return "\n".join(lines)

