# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Drawing one image of the synthetic "shapes" dataset, and its annotations.

This module owns the pixels and the geometry (:func:`render_image`): the classes
(``circle``, ``ellipse``, ``triangle``), the sizes and counts of objects, the textured
backgrounds, the occlusion rules and the exact polygons of the visible parts. Writing
the dataset to disk, its completion marker and its registration are :mod:`.shapes`,
which re-exports these names (import them from there).
"""
from typing import List, Tuple

import numpy as np

__all__ = [
    "SHAPES_CLASSES",
    "IMAGE_SIZE",
    "MIN_SIZE",
    "MAX_SIZE",
    "MAX_OBJECTS",
    "render_image",
]

#: Class names, in category-id order (COCO ids 1, 2, 3). ``circle`` and ``ellipse``
#: are the confusable pair.
SHAPES_CLASSES: Tuple[str, ...] = ("circle", "ellipse", "triangle")
#: Images are IMAGE_SIZE x IMAGE_SIZE pixels.
IMAGE_SIZE = 256
#: Longer side of every object's (visible) box, in pixels, lies in [MIN_SIZE, MAX_SIZE].
MIN_SIZE = 16
MAX_SIZE = 96
#: Objects per image lie in [1, MAX_OBJECTS].
MAX_OBJECTS = 6

_SS = 4  # supersampling factor of the label map
_MIN_VISIBLE = 0.5  # an occluded object keeps at least this fraction of its area
_MIN_COLOR_DIST = 90.0  # RGB distance to the background and to overlapping objects
_ELLIPSE_RATIO = (0.5, 0.75)  # minor / major axis of an ellipse
_PLACEMENT_TRIES = 60


def _unit_polygon(rng: np.random.Generator, cls: int) -> np.ndarray:
    """Vertices (K, 2) of a shape of class ``cls``, any scale, centred near 0."""
    theta = rng.uniform(0.0, 2.0 * np.pi)
    if cls == 2:  # triangle: near-equilateral, vertex angles jittered by +-12 deg
        t = np.deg2rad(90.0 + np.array([0.0, 120.0, 240.0]) + rng.uniform(-12.0, 12.0, 3))
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    else:  # circle (ratio 1) or ellipse: 72-gon, at most 0.05 px from the true curve
        ratio = 1.0 if cls == 0 else rng.uniform(*_ELLIPSE_RATIO)
        t = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
        pts = np.stack([np.cos(t), ratio * np.sin(t)], axis=1)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return pts @ rot.T


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A noisy textured background, float32 (size, size, 3) in 0-255 (RGB)."""
    import cv2

    r = np.arange(size, dtype=np.float32) / size - 0.5
    # 1. a linear gradient between two random colours, in a random direction
    c1, c2 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    g = (np.float32(np.sin(a)) * r[:, None] + np.float32(np.cos(a)) * r[None, :]) / 1.42 + 0.5
    img = c1 + (c2 - c1) * g[..., None]
    # 2. low-frequency colour blotches
    k = int(rng.integers(3, 9))
    blot = rng.normal(0.0, rng.uniform(10, 35), (k, k, 3)).astype(np.float32)
    img += cv2.resize(blot, (size, size), interpolation=cv2.INTER_CUBIC)
    # 3. stripes of a random period (5-28 px) and orientation
    period, b = rng.uniform(5, 28), rng.uniform(0, np.pi)
    f = np.float32(2 * np.pi * size / period)
    phase = f * (np.float32(np.sin(b)) * r[:, None] + np.float32(np.cos(b)) * r[None, :])
    amp = np.float32(rng.uniform(5, 30))
    tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    img += (amp * np.sin(phase + np.float32(rng.uniform(0, 2 * np.pi))))[..., None] * tint
    img = np.ascontiguousarray(img, dtype=np.float32)
    # 4. distractor lines (not annotated)
    for _ in range(int(rng.integers(1, 7))):
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), col, int(rng.integers(1, 3)),
                 cv2.LINE_AA)
    return img


def _contours(vis: np.ndarray):
    """Outer contours *and* holes of a uint8 mask (cv2.findContours, RETR_CCOMP): a
    single entry means one piece without holes, which one COCO polygon describes."""
    import cv2

    return cv2.findContours(vis, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)[0]


def render_image(rng: np.random.Generator, *, size: int = IMAGE_SIZE):
    """Draw one image and its objects.

    Args:
        rng: the generator that decides everything about this image.
        size: image side in pixels.

    Returns:
        (image, objects): ``image`` is uint8 (size, size, 3) **RGB**; ``objects`` is a
        list of dicts with ``category`` (0-based index into :data:`SHAPES_CLASSES`),
        ``polygon`` (flat list, continuous pixel coordinates), ``bbox`` (XYWH, the
        extent of the visible mask) and ``area`` (visible pixels, exact to 1/16 px).
    """
    import cv2

    S, big = _SS, size * _SS
    img = _background(rng, size)
    label = np.zeros((big, big), np.uint8)  # 0 = background, k+1 = object k
    objs: List[dict] = []  # per object: cls, colour, box4 (x0, y0, x1, y1), area4
    n_target = int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(n_target):
        for _try in range(_PLACEMENT_TRIES):
            cls = int(rng.integers(0, len(SHAPES_CLASSES)))
            pts = _unit_polygon(rng, cls)
            ext = pts.max(0) - pts.min(0)
            s = float(np.exp(rng.uniform(np.log(MIN_SIZE + 0.5), np.log(MAX_SIZE - 0.5))))
            pts = (pts - pts.min(0)) * (s / ext.max())
            w, h = pts.max(0)
            off = np.array([rng.uniform(1, size - 1 - w), rng.uniform(1, size - 1 - h)])
            pts = pts + off
            # fillPoly puts integer coordinates on pixel centres: continuous x -> 4x - 0.5
            ipts = np.round((pts * S - 0.5) * 16).astype(np.int32)  # shift=4
            new = label.copy()
            k = len(objs) + 1
            cv2.fillPoly(new, [ipts], k, lineType=cv2.LINE_8, shift=4)
            rx0, ry0 = (max(int(v), 0) for v in np.floor(pts.min(0) * S) - 2)
            rx1, ry1 = (min(int(v), big) for v in np.ceil(pts.max(0) * S) + 2)
            ys, xs = np.nonzero(new[ry0:ry1, rx0:rx1] == k)
            if len(xs) == 0:
                continue
            box4 = (int(xs.min()) + rx0, int(ys.min()) + ry0, int(xs.max()) + 1 + rx0,
                    int(ys.max()) + 1 + ry0)
            colour = rng.uniform(0, 255, 3)
            x0, y0, x1, y1 = (v // S for v in box4)
            bg_mean = img[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3).mean(0)
            if np.linalg.norm(colour - bg_mean) < _MIN_COLOR_DIST:
                continue
            ok = True
            for j, o in enumerate(objs):
                if not _boxes_overlap(box4, o["box4"]):
                    continue
                if np.linalg.norm(colour - o["colour"]) < _MIN_COLOR_DIST:
                    ok = False
                    break
                a0, b0, a1, b1 = o["box4"]
                vis = (new[b0:b1, a0:a1] == j + 1).astype(np.uint8)
                area = int(vis.sum())
                if area < _MIN_VISIBLE * o["area4"]:
                    ok = False
                    break
                if len(_contours(vis)) != 1:  # split in pieces, or a hole: not one polygon
                    ok = False
                    break
                vy, vx = np.nonzero(vis)
                if max(vx.max() - vx.min() + 1, vy.max() - vy.min() + 1) < MIN_SIZE * S:
                    ok = False
                    break
            if not ok:
                continue
            label = new
            objs.append(dict(cls=cls, colour=colour, box4=box4, area4=len(xs),
                             shade=rng.uniform(-0.2, 0.2, 2)))
            break
    # composite: per-pixel coverage of each object from the 4x label map (anti-aliasing)
    out_objs = []
    for j, o in enumerate(objs):
        a0, b0, a1, b1 = o["box4"]
        # align the region to the 4x grid
        a0, b0 = (a0 // S) * S, (b0 // S) * S
        a1, b1 = -(-a1 // S) * S, -(-b1 // S) * S
        vis = (label[b0:b1, a0:a1] == j + 1).astype(np.uint8)
        if vis.sum() == 0:  # cannot happen (visibility is checked), kept for safety
            continue
        cov = cv2.resize(vis.astype(np.float32), ((a1 - a0) // S, (b1 - b0) // S),
                         interpolation=cv2.INTER_AREA)[..., None]
        x0, y0 = a0 // S, b0 // S
        hh, ww = cov.shape[:2]
        gy, gx = np.mgrid[0:hh, 0:ww].astype(np.float32)
        shade = 1.0 + o["shade"][0] * (gx / max(ww, 1) - 0.5) + o["shade"][1] * (gy / max(hh, 1) - 0.5)
        fg = o["colour"][None, None, :] * shade[..., None]
        region = img[y0 : y0 + hh, x0 : x0 + ww]
        img[y0 : y0 + hh, x0 : x0 + ww] = region * (1 - cov) + fg * cov
        contours = _contours(vis)
        c = cv2.approxPolyDP(contours[0], 0.5, True).reshape(-1, 2)  # 1/8 px tolerance
        if len(c) < 3:
            c = contours[0].reshape(-1, 2)
        poly = (c + np.array([a0, b0]) + 0.5) / S  # 4x pixel centres -> continuous coords
        vy, vx = np.nonzero(vis)
        bx0, by0 = (vx.min() + a0) / S, (vy.min() + b0) / S
        bx1, by1 = (vx.max() + 1 + a0) / S, (vy.max() + 1 + b0) / S
        out_objs.append(dict(
            category=o["cls"],
            polygon=[float(v) for v in poly.reshape(-1)],
            bbox=[float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0)],
            area=float(vis.sum()) / (S * S),
        ))
    img += np.float32(rng.uniform(3.0, 12.0)) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), out_objs


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
