"""A small embedded demo dataset, generated deterministically (no download).

Every image shows a few simple shapes (circles, squares, triangles) in random
colours on one of several kinds of background (flat colour, gradient, stripes,
checkerboard, smooth noise). The same scenes are written in two real formats:

* detection / instance segmentation, COCO style::

      <root>/coco/train/000000.jpg ...
      <root>/coco/val/000000.jpg ...
      <root>/coco/annotations/instances_train.json   (polygons, bbox, area)
      <root>/coco/annotations/instances_val.json

  read by ``mmdet.datasets.CocoDataset`` with ``metainfo=dict(classes=DET_CLASSES)``.

* semantic segmentation, ADE20K style::

      <root>/ade/images/training/000000.jpg ...
      <root>/ade/images/validation/...
      <root>/ade/annotations/training/000000.png ...   (uint8 label maps)
      <root>/ade/annotations/validation/...

  As in ADE20K, label 0 means "unlabelled" and the classes are numbered from 1
  (1 = background, 2 = circle, 3 = square, 4 = triangle), so the data is read by
  ``mmseg.datasets.BaseSegDataset`` with ``reduce_zero_label=True`` and
  ``metainfo=dict(classes=SEG_CLASSES)``.

Each image is drawn from its own ``numpy`` generator seeded with
``(seed, split, index)``, so a dataset is reproducible bit for bit and an image
does not depend on how many others were asked for. A ``demo_data.json`` stamp
is written last; :func:`ensure_demo_data` regenerates whenever it is missing or
records other settings.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    'DET_CLASSES', 'SEG_CLASSES', 'DET_PALETTE', 'SEG_PALETTE',
    'DEFAULT_ROOT', 'FORMAT_VERSION', 'make_scene', 'generate_demo_data',
    'ensure_demo_data', 'is_complete'
]

#: Object categories (COCO category ids are 1, 2, 3 in this order).
DET_CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle')
#: Semantic classes after ``reduce_zero_label`` (PNG values are index + 1).
SEG_CLASSES: Tuple[str, ...] = ('background', ) + DET_CLASSES
DET_PALETTE: List[Tuple[int, int, int]] = [(220, 20, 60), (0, 120, 255),
                                           (255, 180, 0)]
SEG_PALETTE: List[Tuple[int, int, int]] = [(80, 80, 80)] + DET_PALETTE

DEFAULT_ROOT = 'data/demo'
#: Bump when the drawing changes, so stale data on disk gets regenerated.
FORMAT_VERSION = 1
STAMP_NAME = 'demo_data.json'

_SPLIT_IDS = {'train': 0, 'val': 1}
_ADE_SPLIT = {'train': 'training', 'val': 'validation'}


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _far_colour(rng: np.random.Generator, avoid: Sequence[np.ndarray],
                min_dist: float = 160.) -> np.ndarray:
    """A saturated colour at least ``min_dist`` (RGB L2) from all of ``avoid``.

    Falls back to the best of the candidates tried, so it always returns.
    """
    best, best_d = None, -1.
    for _ in range(64):
        hsv = np.array([[[
            rng.integers(0, 180),
            rng.integers(150, 256),
            rng.integers(120, 256)
        ]]], dtype=np.uint8)
        c = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
        d = min(float(np.linalg.norm(c - a)) for a in avoid)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _background(rng: np.random.Generator, h: int,
                w: int) -> Tuple[np.ndarray, List[np.ndarray]]:
    """A float32 HxWx3 (BGR) background and its dominant colours."""
    kind = int(rng.integers(0, 5))
    c1, c2 = _random_colour(rng), _random_colour(rng)
    # Keep the two background colours apart from each other only mildly,
    # and low in saturation-ish so shapes stand out.
    c1 = 0.6 * c1 + 0.4 * 128
    c2 = 0.6 * c2 + 0.4 * 128
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # flat
        img = np.broadcast_to(c1, (h, w, 3)).copy()
        return img, [c1]
    if kind == 1:  # linear gradient in a random direction
        theta = rng.uniform(0, 2 * np.pi)
        t = (np.cos(theta) * xx + np.sin(theta) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        return img, [c1, c2, (c1 + c2) / 2]
    if kind == 2:  # stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(12, 40)
        t = (np.cos(theta) * xx + np.sin(theta) * yy) / period
        m = (np.floor(t) % 2)[..., None]
        img = c1 * (1 - m) + c2 * m
        return img, [c1, c2]
    if kind == 3:  # checkerboard
        cell = rng.uniform(10, 36)
        m = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2)[..., None]
        img = c1 * (1 - m) + c2 * m
        return img, [c1, c2]
    # smooth noise: upsampled random grid
    g = int(rng.integers(3, 8))
    grid = rng.uniform(0, 1, size=(g, g, 1)).astype(np.float32)
    t = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    t = np.clip(t, 0, 1)[..., None] if t.ndim == 2 else np.clip(t, 0, 1)
    img = c1 * (1 - t) + c2 * t
    return img, [c1, c2, (c1 + c2) / 2]


def _shape_polygon(rng: np.random.Generator, label: int, cx: float, cy: float,
                   r: float) -> np.ndarray:
    """Vertices (N, 2), float, of a shape of circumradius ``r``."""
    if label == 0:  # circle, as a 32-gon so mask and polygon agree exactly
        n, rot = 32, 0.
    elif label == 1:  # square, randomly rotated
        n, rot = 4, rng.uniform(0, np.pi / 2)
    else:  # equilateral triangle, randomly rotated
        n, rot = 3, rng.uniform(0, 2 * np.pi / 3)
    ang = rot + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], axis=1)


def make_scene(rng: np.random.Generator,
               size: Tuple[int, int] = (256, 256),
               max_objects: int = 4,
               radius_range: Tuple[float, float] = (0.08, 0.2)):
    """Draw one scene.

    Args:
        rng: the generator to draw from.
        size: ``(height, width)`` of the image.
        max_objects: at most this many shapes (at least one).
        radius_range: circumradius range, as fractions of ``min(h, w)``.

    Returns:
        tuple: ``(image, objects)``; ``image`` is HxWx3 uint8 BGR and
        ``objects`` a list of ``(label, polygon)`` with ``label`` an index into
        :data:`DET_CLASSES` and ``polygon`` an (N, 2) float array, in drawing
        order. Shapes do not overlap, so each polygon is the object's visible
        region.
    """
    h, w = size
    img, bg_colours = _background(rng, h, w)
    n_obj = int(rng.integers(1, max_objects + 1))
    side = min(h, w)
    placed: List[Tuple[float, float, float]] = []
    objects = []
    for _ in range(n_obj):
        for _attempt in range(50):
            r = rng.uniform(*radius_range) * side
            cx = rng.uniform(r + 2, w - r - 2)
            cy = rng.uniform(r + 2, h - r - 2)
            if all((cx - px)**2 + (cy - py)**2 > (r + pr + 4)**2
                   for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        label = int(rng.integers(0, len(DET_CLASSES)))
        poly = _shape_polygon(rng, label, cx, cy, r)
        colour = _far_colour(rng, bg_colours)
        pts = np.round(poly * 16).astype(np.int32)  # 4 fractional bits
        cv2.fillPoly(img, [pts], colour.tolist(), lineType=cv2.LINE_AA,
                     shift=4)
        objects.append((label, poly))
    # mild sensor noise so the flat regions are not perfectly flat
    img = img + rng.normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), objects


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _label_map(objects, h: int, w: int) -> np.ndarray:
    """ADE20K-style uint8 label map: 1 background, 2.. the shapes."""
    seg = np.ones((h, w), dtype=np.uint8)
    for label, poly in objects:
        pts = np.round(poly * 16).astype(np.int32)
        cv2.fillPoly(seg, [pts], int(label) + 2, lineType=cv2.LINE_8, shift=4)
    return seg


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------
def _settings(num_train: int, num_val: int, size: Tuple[int, int],
              seed: int) -> dict:
    return dict(
        version=FORMAT_VERSION,
        num_train=int(num_train),
        num_val=int(num_val),
        size=[int(size[0]), int(size[1])],
        seed=int(seed),
        det_classes=list(DET_CLASSES),
        seg_classes=list(SEG_CLASSES))


def is_complete(root: str = DEFAULT_ROOT, **settings) -> bool:
    """Whether ``root`` holds a finished dataset made with these settings
    (:func:`generate_demo_data`'s keyword defaults apply)."""
    stamp = osp.join(root, STAMP_NAME)
    if not osp.isfile(stamp):
        return False
    try:
        with open(stamp) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    return found == _settings(**{**_DEFAULTS, **settings})


_DEFAULTS = dict(num_train=600, num_val=100, size=(256, 256), seed=0)


def generate_demo_data(root: str = DEFAULT_ROOT,
                       num_train: int = _DEFAULTS['num_train'],
                       num_val: int = _DEFAULTS['num_val'],
                       size: Tuple[int, int] = _DEFAULTS['size'],
                       seed: int = _DEFAULTS['seed'],
                       formats: Sequence[str] = ('coco', 'ade'),
                       jpeg_quality: int = 95) -> Dict[str, str]:
    """Write the demo dataset under ``root`` (replacing what is there).

    Args:
        root: output folder.
        num_train / num_val: images per split.
        size: ``(height, width)`` of every image.
        seed: base seed; the same seed gives the same files.
        formats: which of ``'coco'`` and ``'ade'`` to write.
        jpeg_quality: JPEG quality of the images.

    Returns:
        dict: the written folders, ``{'coco': ..., 'ade': ...}``.
    """
    size = (int(size[0]), int(size[1]))
    h, w = size
    os.makedirs(root, exist_ok=True)
    stamp = osp.join(root, STAMP_NAME)
    if osp.exists(stamp):
        os.remove(stamp)
    out = {}
    coco_root, ade_root = osp.join(root, 'coco'), osp.join(root, 'ade')
    for fmt, path in (('coco', coco_root), ('ade', ade_root)):
        if fmt in formats:
            shutil.rmtree(path, ignore_errors=True)
            out[fmt] = path
    enc = [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)]

    for split, count in (('train', num_train), ('val', num_val)):
        images, anns = [], []
        if 'coco' in formats:
            os.makedirs(osp.join(coco_root, split), exist_ok=True)
        if 'ade' in formats:
            os.makedirs(osp.join(ade_root, 'images', _ADE_SPLIT[split]),
                        exist_ok=True)
            os.makedirs(osp.join(ade_root, 'annotations', _ADE_SPLIT[split]),
                        exist_ok=True)
        for idx in range(count):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], idx])
            img, objects = make_scene(rng, size)
            name = f'{idx:06d}'
            if 'coco' in formats:
                ok = cv2.imwrite(
                    osp.join(coco_root, split, name + '.jpg'), img, enc)
                assert ok, 'could not write an image under ' + coco_root
                image_id = idx + 1
                images.append(
                    dict(id=image_id, file_name=name + '.jpg', width=w,
                         height=h))
                for label, poly in objects:
                    x0, y0 = poly.min(axis=0)
                    x1, y1 = poly.max(axis=0)
                    anns.append(
                        dict(
                            id=len(anns) + 1,
                            image_id=image_id,
                            category_id=label + 1,
                            segmentation=[[
                                round(float(v), 2) for v in poly.reshape(-1)
                            ]],
                            area=round(_polygon_area(poly), 2),
                            bbox=[
                                round(float(x0), 2),
                                round(float(y0), 2),
                                round(float(x1 - x0), 2),
                                round(float(y1 - y0), 2)
                            ],
                            iscrowd=0))
            if 'ade' in formats:
                ok = cv2.imwrite(
                    osp.join(ade_root, 'images', _ADE_SPLIT[split],
                             name + '.jpg'), img, enc)
                ok = ok and cv2.imwrite(
                    osp.join(ade_root, 'annotations', _ADE_SPLIT[split],
                             name + '.png'), _label_map(objects, h, w))
                assert ok, 'could not write an image under ' + ade_root
        if 'coco' in formats:
            os.makedirs(osp.join(coco_root, 'annotations'), exist_ok=True)
            coco = dict(
                info=dict(
                    description='mmtransnext demo shapes',
                    version=str(FORMAT_VERSION)),
                licenses=[],
                images=images,
                annotations=anns,
                categories=[
                    dict(id=i + 1, name=c, supercategory='shape')
                    for i, c in enumerate(DET_CLASSES)
                ])
            with open(
                    osp.join(coco_root, 'annotations',
                             f'instances_{split}.json'), 'w') as f:
                json.dump(coco, f)

    if set(formats) >= {'coco', 'ade'}:
        with open(stamp, 'w') as f:
            json.dump(_settings(num_train, num_val, size, seed), f, indent=1)
    return out


def ensure_demo_data(root: str = DEFAULT_ROOT,
                     logger: Optional[callable] = print,
                     **settings) -> str:
    """Generate the demo data under ``root`` unless it is already there."""
    if not is_complete(root, **settings):
        if logger is not None:
            logger(f'Generating the demo dataset under {root} ...')
        generate_demo_data(root, **settings)
    return root
