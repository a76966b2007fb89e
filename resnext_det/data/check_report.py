# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What the check of one dataset found, and how it is told.

This module owns the report of :func:`~.checks.check_datasets`: :class:`DatasetCheck`
(the counts, the missing and unusable images, the error; its one-line
:meth:`~DatasetCheck.summary` for the log of a run and its :meth:`~DatasetCheck.lines` for
``datasets/prepare_coco.py --check``), :func:`format_checks` (every dataset, then READY or
NOT READY) and :func:`shown_paths` (a list of files cut to a few, as log lines show it).
The check itself is :mod:`.checks`, which re-exports these names.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import UserError
from .image_checks import ImageProblem

__all__ = ["SHOWN", "shown_paths", "DatasetCheck", "format_checks"]

#: How many file names a log line shows.
SHOWN = 3


def shown_paths(paths: Sequence[str], n: int = SHOWN) -> str:
    """The first ``n`` of ``paths``, comma-separated, and how many more there are."""
    more = f", ... ({len(paths) - n} more)" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


@dataclass
class DatasetCheck:
    """What :func:`check_datasets` found in one dataset.

    Attributes:
        name: the dataset name.
        json_file, image_root: from its metadata (None when it has none).
        num_images, num_boxes: images, and annotations with a box (crowd ones included).
        classes: its class names (``thing_classes``), None when unknown.
        empty_images: images without a non-crowd annotation (training leaves them out).
        missing: image files not on disk.
        unusable: with ``verify_images``: the images that decode badly, have more than 8 bits
            per channel, or another size than their json entry.
        boxes, box_images: :func:`box_problems`.
        error: why the dataset cannot be used at all (a missing json, an unknown category,
            most of its images missing); None when it can.
        verified: whether every image was decoded.
        seconds: what the check took.
    """

    name: str
    json_file: Optional[str] = None
    image_root: Optional[str] = None
    num_images: int = 0
    num_boxes: int = 0
    classes: Optional[List[str]] = None
    empty_images: int = 0
    missing: List[str] = field(default_factory=list)
    unusable: List[ImageProblem] = field(default_factory=list)
    boxes: Dict[str, int] = field(default_factory=dict)
    box_images: List[str] = field(default_factory=list)
    error: Optional[UserError] = None
    verified: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Usable as it is: no error, no missing and no unusable image."""
        return self.error is None and not self.missing and not self.unusable

    def summary(self) -> str:
        """One line: the counts, and what a run leaves out."""
        if self.error is not None:
            return str(self.error)
        cls = "" if self.classes is None else f", {len(self.classes)} categories"
        parts = [f"{self.num_images} images, {self.num_boxes} boxes{cls}"]
        if self.missing:
            parts.append(f"{len(self.missing)} image file(s) missing")
        if self.unusable:
            parts.append(f"{len(self.unusable)} unusable image(s)")
        if self.boxes:
            parts.append(f"{sum(self.boxes.values())} boxes training drops")
        if self.empty_images:
            parts.append(f"{self.empty_images} images without annotations")
        if not self.missing and not self.unusable:
            parts.append("every image decodes" if self.verified else "every image file is present")
        where = f" ({self.json_file})" if self.json_file else ""
        return f"dataset {self.name!r}{where}: " + ", ".join(parts) + f" ({self.seconds:.2f} s)"

    def lines(self) -> List[str]:
        """The report ``datasets/prepare_coco.py --check`` prints for this dataset."""
        head = f"Dataset {self.name}"
        if self.json_file or self.image_root:
            head += f": json {self.json_file or '-'}, images in {self.image_root or '-'}"
        out = [head]
        tag = lambda t: f"  [{t:>11}]"  # noqa: E731
        if self.error is not None:
            return out + [f"{tag('ERROR')} {self.error}"]
        names = ""
        if self.classes:
            names = ": " + ", ".join(map(str, self.classes[:8])) + (", ..." if len(self.classes) > 8 else "")
        out.append(f"{tag('ok' if self.ok else 'NOT OK')} {self.num_images} images, {self.num_boxes} boxes, "
                   f"{'?' if self.classes is None else len(self.classes)} categories{names}")
        if self.missing:
            out.append(f"{tag('MISSING')} {len(self.missing)} of {self.num_images} image files are not on disk "
                       f"(a run leaves them out): {shown_paths(self.missing, 10)}")
        for p in self.unusable[:20]:
            out.append(f"{tag(p.kind.upper())} {p.path}: {p.reason}")
        if len(self.unusable) > 20:
            out.append(f"{tag('')} ... and {len(self.unusable) - 20} more unusable images")
        if self.boxes:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.boxes.items()))
            out.append(f"{tag('BOXES')} {sum(self.boxes.values())} boxes training drops ({kinds}; COCO "
                       f"evaluation counts them): in {shown_paths(self.box_images, 5)}")
        if self.empty_images:
            out.append(f"{tag('EMPTY')} {self.empty_images} images without annotations (training leaves them out)")
        if not self.verified:
            out.append(f"{tag('')} images not decoded: --verify-images decodes each one")
        return out


def format_checks(reports: Sequence[DatasetCheck]) -> str:
    """The report of ``datasets/prepare_coco.py --check --register-coco``: each dataset's
    :meth:`DatasetCheck.lines`, then READY or NOT READY."""
    lines: List[str] = []
    for r in reports:
        lines += r.lines() + [""]
    bad = [r for r in reports if not r.ok]
    if bad:
        lines.append(f"NOT READY: {len(bad)} of {len(reports)} datasets have missing or unusable files or "
                     "cannot be loaded: " + ", ".join(r.name for r in bad))
    else:
        how = "decoded" if all(r.verified for r in reports) else "present"
        lines.append(f"READY: all {len(reports)} datasets load and every image file is {how}.")
    return "\n".join(lines)
