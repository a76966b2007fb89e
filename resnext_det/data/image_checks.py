# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What makes one image file unusable, and the pool of threads that checks many.

This module owns the per-file checks of :mod:`.checks`: :func:`image_problem` (missing,
unreadable, more than 8 bits per channel, another size than its json entry),
:func:`check_image_file` (the header-only check training makes for each image),
:func:`unreadable_images` (every image of a folder decoded) and :func:`thread_map`
(a pool of threads sized by the cores this process may use, for network file systems).
:mod:`.checks` re-exports the image checks: import them from there or from here.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image

from ..utils.cores import available_cores

__all__ = [
    "HIGH_BIT_MODES",
    "UnusableImage",
    "ImageProblem",
    "image_problem",
    "check_image_file",
    "unreadable_images",
    "thread_map",
]

#: PIL modes of images with more than 8 bits per channel: Detectron2's read_image
#: converts them to RGB by clipping at 255 (an all-white image). 16-bit RGB PNGs are
#: opened by PIL as 8-bit RGB (the high byte of each value) and are not among them.
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class UnusableImage(OSError):
    """An image file that training or evaluation cannot use as it is; the message says why."""


class ImageProblem(NamedTuple):
    """Why one image cannot be used.

    Attributes:
        path: the file.
        kind: "missing", "unreadable" (truncated, not an image), "high-bit" (more than 8
            bits per channel) or "wrong-size" (not the size of its json entry).
        reason: a sentence, with the fix where there is one.
    """

    path: str
    kind: str
    reason: str


def _high_bit_reason(mode: str) -> str:
    return (
        f"a {mode} (more than 8 bits per channel) image, which Detectron2 reads as all white: "
        "convert it to 8 bits (e.g. PIL: (array / 257).astype('uint8'))"
    )


def image_problem(
    path: str, width: Optional[int] = None, height: Optional[int] = None, *, decode: bool = True
) -> Optional[ImageProblem]:
    """What makes the image at ``path`` unusable, or None when it is usable.

    Args:
        path: the image file.
        width, height: the size its json entry gives (None: not compared). Compared after
            the EXIF orientation, as Detectron2's ``read_image`` applies it.
        decode: decode the pixels (finds truncated files: ~1-5 ms a photo); False reads the
            header only (finds missing, non-image and high-bit files, and wrong sizes).
    """
    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # Detectron2 ignores unreadable EXIF data too
                orientation = None
            if decode and mode not in HIGH_BIT_MODES:
                im.load()
    except FileNotFoundError:
        return ImageProblem(path, "missing", "not on disk")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL.UnidentifiedImageError and "image file is truncated" are OSErrors
        return ImageProblem(path, "unreadable", f"not an image PIL can read ({e})")
    if mode in HIGH_BIT_MODES:
        return ImageProblem(path, "high-bit", _high_bit_reason(mode))
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: width and height swap
        w, h = h, w
    if width is not None and height is not None and (w, h) != (width, height):
        return ImageProblem(
            path, "wrong-size",
            f"is {w}x{h} (width x height) but its json entry says {width}x{height}: correct "
            "'width'/'height' in the json (the boxes must be in the image's own pixels)",
        )  # fmt: skip
    return None


def check_image_file(path: str) -> None:
    """Raise :class:`UnusableImage` for a missing file, a file PIL cannot identify or a
    high-bit-depth image (reads only the header; truncation shows when the pixels are
    decoded, and a wrong size in Detectron2's ``check_image_size``)."""
    problem = image_problem(path, decode=False)
    if problem is not None:
        raise UnusableImage(problem.reason)


def unreadable_images(folder: str, *, exts: Sequence[str] = _IMAGE_EXTS) -> List[Tuple[str, str]]:
    """Decode every image of ``folder`` (not recursive) and return ``(file, reason)`` for
    each one training could not use: truncated, not an image, more than 8 bits. Slow on
    purpose (a full decode: about 5 ms a COCO image on one core)."""
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.name.lower().endswith(tuple(exts)))
    problems = thread_map(lambda n: image_problem(os.path.join(folder, n)), names, threads=len(names) >= 64)
    return [(p.path, p.reason) for p in problems if p is not None]


def thread_map(fn: Callable, items: Sequence, *, threads: bool, workers: Optional[int] = None,
               chunk: int = 256) -> List:
    """``[fn(x) for x in items]``; with ``threads``, by a pool of ``workers`` threads (default:
    4 per core this process may use, at most 32) in chunks of ``chunk`` items. For calls that
    wait (a stat or a read on a network file system): the threads wait together."""
    if not threads or len(items) <= chunk:
        return [fn(x) for x in items]
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(workers or min(32, 4 * available_cores())) as pool:
        return [y for ys in pool.map(lambda c: [fn(x) for x in c], chunks) for y in ys]
