# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The synthetic "shapes" detection dataset: the embedded default for demos and tests.

The paper evaluates on COCO (Appendix B); a laptop-class CPU cannot. This module
draws a small COCO-format dataset instead, with the properties that make a detection
set non-trivial:

* three classes, two of them easy to confuse: ``circle`` and ``ellipse`` (axis ratio
  0.5-0.75, any rotation; a rotated ellipse can have a square box, like a circle), and
  ``triangle``;
* 1-6 objects per image, 16-96 px (longer side of the visible box) on 256x256 images,
  random colours with shading, that may overlap: later objects occlude earlier ones,
  and the annotation of an occluded object is its *visible* part (COCO's convention);
* noisy, textured backgrounds (colour gradients, low-frequency blotches, stripes,
  distractor lines, pixel noise).

Every annotation has a box, a polygon mask, its area and ``iscrowd = 0``. Shapes are
rasterised at 4x resolution, so images are anti-aliased and polygons are exact to
1/8 px. Generation is deterministic: the same seed gives byte-identical JSON and
images (each image has its own ``numpy`` generator seeded by ``(seed, split, index)``).

Layout under ``root`` (by default ``$DETECTRON2_DATASETS/shapes``, Detectron2's
convention, ``DETECTRON2_DATASETS`` defaulting to ``datasets``)::

    shapes/
      annotations/instances_train.json  annotations/instances_val.json
      train/000001.jpg ...              val/000001.jpg ...
      COMPLETE.json                     # written last: generator version and parameters

Generation is safe with several processes starting at once (``launch`` with N
processes): one process generates under a file lock into a temporary folder next to
``root`` and renames it into place; the others wait and reuse it. A folder without
``COMPLETE.json`` (a killed run) is never used: it is regenerated.

The drawing of one image (:func:`render_image`, the classes, sizes and counts of
objects) is :mod:`.shapes_draw`; this module owns the dataset on disk (its layout,
generation, completion marker) and its registration, and re-exports the drawing's names.
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Dict, Optional, Tuple

import numpy as np
from detectron2.data.catalog import Metadata

from ..errors import ConfigError
from ..utils.io import remove_stale_folders
from .shapes_draw import IMAGE_SIZE, MAX_OBJECTS, MAX_SIZE, MIN_SIZE, SHAPES_CLASSES, render_image

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "GENERATOR_VERSION",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_SEED",
    "IMAGE_SIZE",
    "MIN_SIZE",
    "MAX_SIZE",
    "MAX_OBJECTS",
    "default_shapes_root",
    "generate_shapes",
    "ensure_shapes",
    "read_marker",
    "shapes_json_file",
    "shapes_image_root",
    "load_shapes_json",
    "register_shapes",
    "ShapesMetadata",
    "render_image",
]

logger = logging.getLogger(__name__)

#: RGB colours for Detectron2's Visualizer (metadata ``thing_colors``).
SHAPES_COLORS: Tuple[Tuple[int, int, int], ...] = ((230, 57, 70), (29, 120, 230), (46, 180, 90))
#: Bump when the drawing changes: a dataset made by another version is regenerated.
GENERATOR_VERSION = 1
DEFAULT_NUM_TRAIN = 400
DEFAULT_NUM_VAL = 100
DEFAULT_SEED = 0

_SPLITS = ("train", "val")
_MARKER = "COMPLETE.json"
_JPEG_QUALITY = 92


# --------------------------------------------------------------------------- paths
def default_shapes_root() -> str:
    """``$DETECTRON2_DATASETS/shapes`` (``DETECTRON2_DATASETS`` defaults to
    ``datasets``, relative to the working directory, as in Detectron2), absolute.
    Read at call time, so setting the variable after ``import resnext_det`` works."""
    base = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return os.path.abspath(os.path.join(base, "shapes"))


def shapes_json_file(split: str, root: Optional[str] = None) -> str:
    """Path of the COCO json of ``split`` ("train" or "val") under ``root``."""
    _check_split(split)
    return os.path.join(root or default_shapes_root(), "annotations", f"instances_{split}.json")


def shapes_image_root(split: str, root: Optional[str] = None) -> str:
    """Folder of the images of ``split`` under ``root``."""
    _check_split(split)
    return os.path.join(root or default_shapes_root(), split)


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ConfigError(f"shapes split must be one of {_SPLITS}, got {split!r}")


# ------------------------------------------------------------------------- writing
def _split_seed(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLITS.index(split), int(index)])


def _write_split(tmp_root: str, split: str, num: int, seed: int) -> Dict[str, int]:
    import cv2

    img_dir = os.path.join(tmp_root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        image_id = i + 1
        img, objs = render_image(_split_seed(seed, split, i))
        fname = f"{image_id:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:  # pragma: no cover
            raise RuntimeError(f"OpenCV could not encode {fname}")
        with open(os.path.join(img_dir, fname), "wb") as f:
            f.write(buf.tobytes())
        images.append(dict(id=image_id, file_name=fname, height=img.shape[0], width=img.shape[1]))
        for o in objs:
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=o["category"] + 1,
                bbox=o["bbox"], area=o["area"], segmentation=[o["polygon"]], iscrowd=0,
            ))
    coco = dict(
        info=dict(description=f"resnext_det synthetic shapes, split {split}",
                  version=str(GENERATOR_VERSION), seed=int(seed)),
        licenses=[],
        categories=[dict(id=i + 1, name=n, supercategory="shape")
                    for i, n in enumerate(SHAPES_CLASSES)],
        images=images,
        annotations=annotations,
    )
    ann_dir = os.path.join(tmp_root, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    with open(os.path.join(ann_dir, f"instances_{split}.json"), "w") as f:
        f.write(json.dumps(coco, separators=(",", ":")))  # dumps: C encoder, fast
    return dict(images=len(images), annotations=len(annotations))


# ------------------------------------------------------------------ generation I/O
def read_marker(root: str) -> Optional[dict]:
    """The completion marker of a generated dataset, or None if ``root`` is not a
    complete dataset (missing, killed half way, or not ours)."""
    path = os.path.join(root, _MARKER)
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    for split in _SPLITS:
        if not os.path.isfile(shapes_json_file(split, root)):
            return None
    return marker


@contextlib.contextmanager
def _root_lock(root: str):
    """An exclusive inter-process lock for ``root``: fcntl.flock on a file in
    ``<tmp>/resnext_det_locks/``, so nothing is left in the dataset folder or in git's
    view; the OS releases it if the holder is killed. Where no lock can be had (no
    fcntl, an unwritable temp folder), only the atomic rename protects."""
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    lock_dir = os.path.join(tempfile.gettempdir(), "resnext_det_locks")
    try:
        import fcntl

        os.makedirs(lock_dir, exist_ok=True)
        f = open(os.path.join(lock_dir, f"shapes-{digest}.lock"), "a+")
    except (ImportError, OSError) as e:  # pragma: no cover - not POSIX / no temp folder
        logger.warning("No lock for generating %s (%s): relying on atomic rename only.", root, e)
        yield
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _clean_stale(root: str) -> None:
    parent, name = os.path.split(os.path.abspath(root))
    remove_stale_folders(parent, f".{name}.tmp-", f".{name}.old-")


def _matches(marker: Optional[dict], num_train: int, num_val: int, seed: int) -> bool:
    return marker is not None and marker.get("generator_version") == GENERATOR_VERSION and (
        marker.get("num_train"), marker.get("num_val"), marker.get("seed")
    ) == (num_train, num_val, seed)


def generate_shapes(
    root: Optional[str] = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
    force: bool = False,
) -> str:
    """Generate the shapes dataset into ``root``, atomically.

    A complete dataset already at ``root`` with the same generator version and
    parameters is kept (unless ``force``); anything else there is replaced. Safe to
    call from several processes at once: one generates, the others wait and reuse.

    Args:
        root: the dataset folder (default :func:`default_shapes_root`).
        num_train: images in the train split (>= 1).
        num_val: images in the val split (>= 1).
        seed: the seed; the same seed gives byte-identical files.
        force: regenerate even if a matching dataset exists.

    Returns:
        The absolute dataset folder.
    """
    root = os.path.abspath(root or default_shapes_root())
    for key, val in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ConfigError(f"generate_shapes: {key} (CLI --{key.replace('_', '-')}) must be "
                             f"an integer >= 1, got {val!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"generate_shapes: seed (CLI --seed) must be an integer >= 0, got {seed!r}")
    parent, name = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with _root_lock(root):
        if not force and _matches(read_marker(root), num_train, num_val, seed):
            return root
        _clean_stale(root)
        t0 = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            stats = {s: _write_split(tmp, s, n, seed) for s, n in (("train", num_train), ("val", num_val))}
            marker = dict(generator_version=GENERATOR_VERSION, num_train=int(num_train),
                          num_val=int(num_val), seed=int(seed), classes=list(SHAPES_CLASSES),
                          stats=stats)
            with open(os.path.join(tmp, _MARKER), "w") as f:  # written last
                json.dump(marker, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            old = None
            if os.path.lexists(root):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.replace(root, os.path.join(old, name))
            os.replace(tmp, root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Generated the shapes dataset in %s (%d train / %d val images) in %.1f s",
                    root, num_train, num_val, time.perf_counter() - t0)
    return root


def ensure_shapes(root: Optional[str] = None) -> str:
    """Make sure a complete shapes dataset exists at ``root`` and return its path.

    A complete dataset is used as it is, whatever its size and seed (so a bigger set
    made with ``datasets/generate_shapes.py`` is picked up); a missing or half-written
    one is generated with the defaults; one from another generator version is
    regenerated with its own parameters. Cheap when the dataset exists (one small
    file is read).
    """
    root = os.path.abspath(root or default_shapes_root())
    marker = read_marker(root)
    if marker is not None and marker.get("generator_version") == GENERATOR_VERSION:
        return root
    params = dict(num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, seed=DEFAULT_SEED)
    if marker is not None:
        params.update({k: marker[k] for k in params if isinstance(marker.get(k), int)})
        logger.warning("The shapes dataset in %s was made by generator version %s; "
                       "regenerating it with version %s.", root,
                       marker.get("generator_version"), GENERATOR_VERSION)
    with _root_lock(root):  # another process may have finished meanwhile
        marker = read_marker(root)
        if marker is not None and marker.get("generator_version") == GENERATOR_VERSION:
            return root
    return generate_shapes(root, force=False, **params)


# ------------------------------------------------------------------- registration
def load_shapes_json(split: str, dataset_name: Optional[str] = None, root: Optional[str] = None):
    """Detectron2 dataset dicts of a shapes split, generating the data on first use."""
    from detectron2.data.datasets import load_coco_json

    root = ensure_shapes(root)
    return load_coco_json(shapes_json_file(split, root), shapes_image_root(split, root),
                          dataset_name)


class ShapesMetadata(Metadata):
    """Detectron2 :class:`Metadata` whose ``json_file`` and ``image_root`` are resolved
    when read (following ``$DETECTRON2_DATASETS`` at that moment), and whose
    ``json_file`` generates the data first: COCOEvaluator reads it in its constructor,
    possibly before the dataset was ever loaded."""

    @property
    def json_file(self) -> str:
        root = ensure_shapes(self.__dict__.get("shapes_root"))
        return shapes_json_file(self.__dict__["shapes_split"], root)

    @property
    def image_root(self) -> str:
        return shapes_image_root(self.__dict__["shapes_split"], self.__dict__.get("shapes_root"))


def register_shapes(name: str, *, split: str, root: Optional[str] = None) -> None:
    """Register a shapes split in Detectron2's DatasetCatalog and MetadataCatalog.

    Args:
        name: the dataset name (``shapes_train``, ``shapes_val`` are registered on
            ``import resnext_det``).
        split: "train" or "val".
        root: the dataset folder; None follows ``$DETECTRON2_DATASETS`` at use time.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    _check_split(split)
    DatasetCatalog.register(name, lambda: load_shapes_json(split, name, root))
    meta = ShapesMetadata(name=name)
    # set through __dict__: the lazy properties above take the public names
    meta.__dict__.update(shapes_split=split, shapes_root=root)
    meta.set(
        thing_classes=list(SHAPES_CLASSES),
        thing_colors=[list(c) for c in SHAPES_COLORS],
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
        evaluator_type="coco",
    )
    MetadataCatalog[name] = meta


def register_all_shapes() -> None:
    """Register ``shapes_train`` and ``shapes_val`` (once; the images are generated on first
    use), as Detectron2's ``register_all_coco`` does for COCO's splits."""
    from detectron2.data import DatasetCatalog

    for split in _SPLITS:
        name = f"shapes_{split}"
        if name not in DatasetCatalog.list():
            register_shapes(name, split=split)
