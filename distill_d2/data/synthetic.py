"""A bundled, generated detection dataset ("synthetic shapes").

Six shape classes with random rotation and size (about 10 to 128 px on a
256x256 image, so COCO small/medium/large all occur) and a colour that is
usually (70%) near the class's hue and otherwise random, so colour is a cue
but shape decides; on varied low-saturation backgrounds (gradients,
low-frequency noise, stripes, checkerboards), with unlabelled clutter (lines,
irregular blobs of any colour) and occlusion between objects. Box
annotations are the *visible* extent of each object (objects less than 35%
visible are dropped). The ``ring`` vs ``circle`` and ``square`` vs ``cross``
pairs need shape detail, so capacity matters: a larger detector beats a
smaller one on it (measured numbers in docs/RESULTS.md).

Generation is deterministic given (split seed, count, size, version) and
takes a few seconds; the result is cached as COCO json + jpgs under
``$DETECTRON2_DATASETS/synthetic/<split>`` (default ``datasets/synthetic``).
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

logger = logging.getLogger(__name__)

SYNTHETIC_CLASSES = ["circle", "ring", "triangle", "square", "star", "cross"]
GENERATOR_VERSION = 3
# name -> (number of images, seed): the bundled default dataset, and a tiny
# version of it for smoke tests and quick schedules.
DEFAULT_SPLITS = {
    "synthetic_train": (1000, 1),
    "synthetic_val": (200, 2),
    "synthetic_tiny_train": (16, 3),
    "synthetic_tiny_val": (8, 4),
}
IMAGE_SIZE = (256, 256)  # (height, width)
MIN_VISIBLE_FRACTION = 0.35
# Probability that an object has its class's hue (else a random hue).
CLASS_HUE_PROB = 0.7


def _hsv_to_bgr(h, s, v):
    """One colour from hue in degrees [0, 360), saturation and value in [0, 1] to BGR 0..255."""
    px = np.uint8([[[int(h / 2) % 180, int(s * 255), int(v * 255)]]])
    return cv2.cvtColor(px, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng, h, w):
    """(h, w, 3) float32 background of low saturation: gradient, low-frequency noise,
    stripes or checkerboard."""
    kind = rng.integers(4)
    c0 = _hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0, 0.35), rng.uniform(0.15, 0.95))
    c1 = _hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0, 0.35), rng.uniform(0.15, 0.95))
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:  # linear gradient in a random direction
        ang = rng.uniform(0, 2 * np.pi)
        t = (np.cos(ang) * xx + np.sin(ang) * yy) / (h + w) + 0.5
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    elif kind == 1:  # low-frequency noise between the two colours
        g = rng.integers(2, 6)
        t = cv2.resize(rng.uniform(0, 1, (g, g)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    elif kind == 2:  # low-contrast stripes
        period = rng.integers(8, 40)
        ang = rng.uniform(0, np.pi)
        t = ((np.cos(ang) * xx + np.sin(ang) * yy) // period) % 2
        img = np.where(t[..., None] > 0, c0, c0 * 0.6 + c1 * 0.4)
    else:  # low-contrast checkerboard
        cell = rng.integers(10, 48)
        t = ((yy // cell) + (xx // cell)) % 2
        img = np.where(t[..., None] > 0, c0, c0 * 0.6 + c1 * 0.4)
    img = img + rng.normal(0, rng.uniform(2, 10), (h, w, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _object_colour(rng, cls_id, background):
    """Colour of an object: usually its class's hue (+-20 deg), sometimes (CLASS_HUE_PROB)
    any hue, so colour is a cue but shape decides; at least ~80 (L2) from ``background``."""
    for _ in range(20):
        if rng.uniform() < CLASS_HUE_PROB:
            hue = cls_id * 360.0 / len(SYNTHETIC_CLASSES) + rng.uniform(-20, 20)
        else:
            hue = rng.uniform(0, 360)
        c = _hsv_to_bgr(hue, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
        if np.linalg.norm(c - background) > 80:
            return c
    return 255.0 - background


def _regular_polygon(cx, cy, r, n, rot, inner=None):
    """Vertices of a regular polygon (or star if ``inner`` radius given)."""
    pts = []
    k = 2 * n if inner is not None else n
    for i in range(k):
        a = rot + 2 * np.pi * i / k
        rr = inner if (inner is not None and i % 2) else r
        pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return np.round(np.array(pts) * 16).astype(np.int32)  # 4 bits sub-pixel


def _draw_shape(mask, cls, cx, cy, r, rot, rng):
    """Draw class ``cls`` of radius ``r`` (px) into a uint8 mask."""
    sh = 4  # cv2 sub-pixel shift matching _regular_polygon's *16
    if cls == "circle":
        cv2.circle(mask, (int(cx * 16), int(cy * 16)), int(r * 16), 1, -1, cv2.LINE_8, sh)
    elif cls == "ring":
        cv2.circle(mask, (int(cx * 16), int(cy * 16)), int(r * 16), 1, -1, cv2.LINE_8, sh)
        cv2.circle(mask, (int(cx * 16), int(cy * 16)), int(r * rng.uniform(0.45, 0.65) * 16), 0, -1, cv2.LINE_8, sh)
    elif cls == "triangle":
        cv2.fillPoly(mask, [_regular_polygon(cx, cy, r, 3, rot)], 1, cv2.LINE_8, sh)
    elif cls == "square":
        cv2.fillPoly(mask, [_regular_polygon(cx, cy, r, 4, rot)], 1, cv2.LINE_8, sh)
    elif cls == "star":
        cv2.fillPoly(mask, [_regular_polygon(cx, cy, r, 5, rot, inner=r * 0.45)], 1, cv2.LINE_8, sh)
    elif cls == "cross":
        t = r * rng.uniform(0.28, 0.4)
        c, s = np.cos(rot), np.sin(rot)
        for dx, dy in ((r, t), (t, r)):
            corners = np.array([[-dx, -dy], [dx, -dy], [dx, dy], [-dx, dy]])
            rotd = corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
            cv2.fillPoly(mask, [np.round(rotd * 16).astype(np.int32)], 1, cv2.LINE_8, sh)
    else:
        raise ValueError(cls)


def _clutter(img, rng, h, w):
    """Unlabelled distractors: thin lines and small irregular blobs (not a class)."""
    for _ in range(rng.integers(0, 4)):
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(img, p1, p2, tuple(float(c) for c in rng.uniform(0, 255, 3)), int(rng.integers(1, 3)))
    for _ in range(rng.integers(0, 4)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 20)
        n = rng.integers(6, 10)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.4, 1.0, n)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], tuple(float(c) for c in rng.uniform(0, 255, 3)))


def render_image(rng, height=IMAGE_SIZE[0], width=IMAGE_SIZE[1]):
    """Render one image.

    Returns:
        img (H, W, 3) uint8 BGR, list of annotations (dicts with bbox XYWH in
        pixels, category_id 0..5, area of the visible mask in pixels).
    """
    img = _background(rng, height, width)
    _clutter(img, rng, height, width)
    owner = np.full((height, width), -1, np.int32)  # which object a pixel shows
    objs = []
    n = int(rng.integers(2, 9))
    for _ in range(n):
        cls_id = int(rng.integers(len(SYNTHETIC_CLASSES)))
        # log-uniform radius: 5..64 px -> boxes from ~10 to ~128 px
        r = float(np.exp(rng.uniform(np.log(5.0), np.log(64.0))))
        cx, cy = rng.uniform(-0.3 * r, width + 0.3 * r), rng.uniform(-0.3 * r, height + 0.3 * r)
        mask = np.zeros((height, width), np.uint8)
        _draw_shape(mask, SYNTHETIC_CLASSES[cls_id], cx, cy, r, rng.uniform(0, 2 * np.pi), rng)
        m = mask.astype(bool)
        if m.sum() < 12:
            continue
        color = _object_colour(rng, cls_id, img[m].mean(axis=0))
        if rng.uniform() < 0.3:  # textured fill
            shade = rng.uniform(0.6, 1.0, (height, width, 1))
            img[m] = (color * shade)[m]
        else:
            img[m] = color
        owner[m] = len(objs)
        objs.append((cls_id, int(m.sum())))
    if rng.uniform() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)

    annos = []
    for i, (cls_id, full_area) in enumerate(objs):
        ys, xs = np.nonzero(owner == i)
        if len(xs) < 12 or len(xs) < MIN_VISIBLE_FRACTION * full_area:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        annos.append(
            {
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "category_id": cls_id,
                "area": float(len(xs)),
                "iscrowd": 0,
            }
        )
    return img, annos


def _fingerprint(num_images, seed, height, width):
    key = f"v{GENERATOR_VERSION}-{num_images}-{seed}-{height}x{width}"
    return key + "-" + hashlib.sha1(key.encode()).hexdigest()[:8]


def generate_synthetic(out_dir, num_images, seed, height=IMAGE_SIZE[0], width=IMAGE_SIZE[1]):
    """Generate (or reuse) a split in ``out_dir``; returns its COCO json path.

    The split is written to a temporary directory and renamed into place, so
    concurrent callers (e.g. several launched processes) never see a partial
    split; a cache whose fingerprint differs is regenerated.
    """
    fp = _fingerprint(num_images, seed, height, width)
    json_path = os.path.join(out_dir, "annotations.json")
    if os.path.isfile(json_path):
        with open(json_path) as f:
            if json.load(f).get("info", {}).get("fingerprint") == fp:
                return json_path
        logger.info("Regenerating %s: fingerprint changed", out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_synth_", dir=parent)
    os.makedirs(os.path.join(tmp, "images"))
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for idx in range(num_images):
        img, annos = render_image(rng, height, width)
        fname = f"{idx:06d}.jpg"
        cv2.imwrite(os.path.join(tmp, "images", fname), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": idx + 1, "file_name": fname, "height": height, "width": width})
        for a in annos:
            a.update(id=len(annotations) + 1, image_id=idx + 1, category_id=a["category_id"] + 1)
            annotations.append(a)
    coco = {
        "info": {"description": "distill_d2 synthetic shapes", "fingerprint": fp},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SYNTHETIC_CLASSES)],
    }
    with open(os.path.join(tmp, "annotations.json"), "w") as f:
        json.dump(coco, f)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process won the race with identical content
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Generated %d synthetic images (%d boxes) in %s", num_images, len(annotations), out_dir)
    return json_path


def _synthetic_root():
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "synthetic")


def register_synthetic(name, num_images, seed, root=None, height=IMAGE_SIZE[0], width=IMAGE_SIZE[1]):
    """Register ``name`` (generated on first use) in DatasetCatalog/MetadataCatalog.

    ``root`` defaults to ``$DETECTRON2_DATASETS/synthetic`` (read at call time).
    """
    split_dir = os.path.join(root or _synthetic_root(), name)

    def _load():
        json_path = generate_synthetic(split_dir, num_images, seed, height, width)
        return load_coco_json(json_path, os.path.join(split_dir, "images"), name)

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(
        thing_classes=list(SYNTHETIC_CLASSES),
        json_file=os.path.join(split_dir, "annotations.json"),
        image_root=os.path.join(split_dir, "images"),
        evaluator_type="coco",
    )


def register_default_synthetic():
    for name, (n, seed) in DEFAULT_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_synthetic(name, n, seed)
