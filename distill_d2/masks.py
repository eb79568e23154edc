"""Spatial weight masks for feature distillation, per FPN level.

Every builder in ``MASK_REGISTRY`` (registered under its function name) has the signature
``fn(gt_boxes, level_shapes, cfg) -> {level: (N, H_l, W_l) float tensor}`` with
``gt_boxes`` a list (one per image) of (K_i, 4) XYXY boxes in input-tensor
pixels (``Instances.gt_boxes.tensor``), ``level_shapes`` an ordered
``{level: (stride, H_l, W_l)}`` and ``cfg`` the ``DISTILL.FEAT`` node. Cell
(i, j) of a level with stride s covers pixels [j*s, (j+1)*s) and has its
centre at ((j+0.5)*s, (i+0.5)*s). Padding cells are 0 because no box reaches them.

All builders are vectorized over boxes (no Python loop over boxes, no host
sync): the Gaussian is separable and is maximised over boxes in chunks of
at most ``GAUSSIAN_CHUNK_ELEMENTS`` elements; binary masks are unions of
axis-aligned cell rectangles, painted with a 2-D difference array.
"""
import torch
import torch.nn.functional as F

from .registry import MASK_REGISTRY

# Most elements of the (boxes, H, W) outer-product block that gaussian_mask allocates at once
# (one box per block when a single grid is larger).
GAUSSIAN_CHUNK_ELEMENTS = 2**22
# Tighter cap on CPU: a block that fits the L2 cache (2 MB of float32) is about 2x faster there.
GAUSSIAN_CPU_CHUNK_ELEMENTS = 2**19


def _cell_centres(n, like):
    """(n,) cell-centre coordinates 0.5, 1.5, ... in grid units."""
    return torch.arange(n, device=like.device, dtype=like.dtype) + 0.5


def _gaussian_factors(b, centres, lo, hi, rho, truncate):
    """(K, n) 1-D factor exp(-(c - mid)^2 / (2 (rho size)^2)) along one axis, 0 outside [lo, hi) if truncate."""
    mid = (b[:, lo] + b[:, hi]) / 2
    size = (b[:, hi] - b[:, lo]).clamp(min=1e-3)
    g = torch.exp(-((centres[None, :] - mid[:, None]) ** 2 / (2 * (rho * size[:, None]) ** 2)))
    if truncate:
        inside = (centres[None, :] >= b[:, lo : lo + 1]) & (centres[None, :] < b[:, hi : hi + 1])
        g = g * inside
    return g


def gaussian_mask(boxes, stride, height, width, rho=1.0 / 6.0, truncate=True):
    """TAR/FGFI-style Gaussian mask of one image on one level.

    ``G_k(x, y) = exp(-((x-cx)^2 / (2 (rho w)^2) + (y-cy)^2 / (2 (rho h)^2)))``
    with centre (cx, cy) and size (w, h) of box k in grid units, evaluated at
    cell centres; with ``truncate`` G_k is 0 at cells whose centre lies outside
    box k (so a box smaller than a cell may vanish on a coarse level, where its
    untruncated Gaussian would underflow anyway). Result: max_k G_k.

    G_k is separable, G_k(i, j) = gy_k(i) gx_k(j) with the truncation folded
    into the 1-D factors, so the max over boxes is taken over outer products,
    a chunk of boxes at a time: at most ``GAUSSIAN_CHUNK_ELEMENTS`` elements
    per chunk (``GAUSSIAN_CPU_CHUNK_ELEMENTS`` on CPU), one box per chunk if a
    single grid is larger. No (K, H, W) tensor for large K, no host sync.

    Args:
        boxes: (K, 4) XYXY in pixels.
    Returns:
        (height, width) tensor in [0, 1].
    """
    k = boxes.shape[0]
    if boxes.numel() == 0:
        return boxes.new_zeros((height, width))
    b = boxes / stride
    gx = _gaussian_factors(b, _cell_centres(width, b), 0, 2, rho, truncate)  # (K, W)
    gy = _gaussian_factors(b, _cell_centres(height, b), 1, 3, rho, truncate)  # (K, H)
    budget = GAUSSIAN_CHUNK_ELEMENTS
    if boxes.device.type == "cpu":
        budget = min(budget, GAUSSIAN_CPU_CHUNK_ELEMENTS)
    chunk = max(1, budget // max(1, height * width))
    out = None
    for k0 in range(0, k, chunk):
        m = (gy[k0 : k0 + chunk, :, None] * gx[k0 : k0 + chunk, None, :]).amax(dim=0)
        out = m if out is None else torch.maximum(out, m, out=out)
    return out


def _cat_boxes(gt_boxes):
    """All images' boxes as one (K, 4) tensor and the (K,) image index of each (no host sync).
    With no images: an empty float32 CPU tensor, as the per-image builders give."""
    if not len(gt_boxes):
        return torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long)
    dev = gt_boxes[0].device
    img = [torch.full((b.shape[0],), n, dtype=torch.long, device=dev) for n, b in enumerate(gt_boxes)]
    return torch.cat(list(gt_boxes)), torch.cat(img)


def _clamp_xy_(t, width, height):
    """Clamp the x columns (0, 2) of a (K, 4) tensor to [0, width] and the y columns to [0, height], in place."""
    t.clamp_(min=0)
    t[:, 0::2].clamp_(max=width)
    t[:, 1::2].clamp_(max=height)
    return t


def _paint_rects(img, rects, num_images, height, width, dtype, weight=None):
    """(num_images, height, width) binary mask: union of cell rectangles via a 2-D difference array.

    Rectangle k covers cols [rects[k, 0], rects[k, 2]) x rows [rects[k, 1], rects[k, 3]) of image
    img[k]; ``rects`` (K, 4) long, already in [0, width] / [0, height] with hi >= lo (an empty
    rectangle then cancels out). ``weight`` (K,) bool drops rectangles. No host sync.
    """
    w1 = width + 1
    diff = torch.zeros((num_images, height + 1, w1), dtype=torch.int32, device=img.device)
    # +1 at corners (r0, c0) and (r1, c1), -1 at (r0, c1) and (r1, c0); flat indices into diff
    rows = rects[:, 1::2] * w1 + (img * ((height + 1) * w1))[:, None]  # (K, 2): r0, r1
    flat = (rows[:, :, None] + rects[:, None, 0::2]).reshape(-1)  # (K, 2, 2): (r0, r1) x (c0, c1)
    sign = torch.ones((2, 2), dtype=torch.int32, device=img.device)
    sign[0, 1] = -1
    sign[1, 0] = -1
    vals = sign.expand(rects.shape[0], 2, 2) if weight is None else sign * weight[:, None, None]
    diff.view(-1).index_add_(0, flat, vals.reshape(-1))
    cover = diff.cumsum_(2).cumsum_(1)[:, :height, :width]  # rectangles covering each cell, >= 0
    return cover.to(dtype).clamp_(max=1)  # (a bool -> float cast is several times slower on CPU)


def _centre_inside_rects(b, height, width):
    """(K, 4) long [c0, r0, c1, r1]: the cells whose centre is inside each box (grid units).

    Counting centres j + 0.5 < edge gives exactly the cells with lo <= centre < hi.
    """
    centres = _cell_centres(max(height, width), b)
    rects = _clamp_xy_(torch.searchsorted(centres, b.contiguous(), side="left"), width, height)
    rects[:, 2:] = torch.maximum(rects[:, 2:], rects[:, :2])  # inverted box: empty
    return rects


def _centre_cells(b, height, width):
    """(K, 4) long [j, i, j+1, i+1]: the cell holding each box centre (clamped into the grid)."""
    c = _clamp_xy_(((b[:, :2] + b[:, 2:]) / 2).floor(), width - 1, height - 1).long()
    return torch.cat([c, c + 1], dim=1)


def _box_cell_rects(boxes, stride, height, width):
    """The ``box`` rule's cells of each box on one grid: ``(inside, centre, empty)``.

    ``inside`` (K, 4) long: the cells whose centre is inside the box (:func:`_centre_inside_rects`);
    ``centre`` (K, 4) long: the cell holding the box centre (:func:`_centre_cells`); ``empty`` (K,)
    bool: ``inside`` holds no cell, so the box's cells are ``centre`` (else they are ``inside``).
    """
    b = boxes / stride
    inside = _centre_inside_rects(b, height, width)
    empty = (inside[:, 2] == inside[:, 0]) | (inside[:, 3] == inside[:, 1])
    return inside, _centre_cells(b, height, width), empty


def _box_masks(img, boxes, num_images, stride, height, width):
    """(num_images, height, width) binary box masks of all images' boxes (``box_mask`` rule)."""
    inside, centre, empty = _box_cell_rects(boxes, stride, height, width)
    weight = torch.cat([torch.ones_like(empty), empty])  # a centre cell only for a box holding no centre
    return _paint_rects(torch.cat([img, img]), torch.cat([inside, centre]), num_images, height, width,
                        boxes.dtype, weight)


@MASK_REGISTRY.register()
def gaussian(gt_boxes, level_shapes, cfg):
    return {
        lv: torch.stack([gaussian_mask(b, s, h, w, cfg.GAUSSIAN_RHO, cfg.GAUSSIAN_TRUNCATE) for b in gt_boxes])
        for lv, (s, h, w) in level_shapes.items()
    }


def box_mask(boxes, stride, height, width):
    """(height, width) binary mask: 1 at cells whose centre is inside any box
    (a box containing no cell centre marks the cell holding its centre)."""
    img = torch.zeros((boxes.shape[0],), dtype=torch.long, device=boxes.device)
    return _box_masks(img, boxes, 1, stride, height, width)[0]


@MASK_REGISTRY.register()
def box(gt_boxes, level_shapes, cfg):
    """Binary gt-box mask on every level."""
    boxes, img = _cat_boxes(gt_boxes)
    return {lv: _box_masks(img, boxes, len(gt_boxes), s, h, w) for lv, (s, h, w) in level_shapes.items()}


@MASK_REGISTRY.register()
def full(gt_boxes, level_shapes, cfg):
    """All-ones masks (FitNet-style full-map imitation, padding included)."""
    n = len(gt_boxes)
    ref = gt_boxes[0] if n else torch.zeros(0)
    return {lv: ref.new_ones((n, h, w)) for lv, (s, h, w) in level_shapes.items()}


def build_masks(name, gt_boxes, level_shapes, cfg):
    """Look ``name`` up in MASK_REGISTRY and build the masks."""
    try:
        fn = MASK_REGISTRY.get(name)
    except KeyError:
        raise ValueError(f"Unknown DISTILL.FEAT.MASK '{name}'; registered: {sorted(k for k, _ in MASK_REGISTRY)}")
    return fn(gt_boxes, level_shapes, cfg)


def defeat_levels(boxes, num_levels, canonical=56.0):
    """DeFeat's level of each box (index 0 = finest distilled level).

    ``s = sqrt((w+1)(h+1))``, ``level = clamp(floor(log2(s/canonical + 1e-6)), 0, L-1)``.

    Args:
        boxes: (K, 4) XYXY pixels.
    Returns:
        (K,) long tensor.
    """
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    s = torch.sqrt((w + 1) * (h + 1))
    return torch.floor(torch.log2(s / canonical + 1e-6)).clamp(0, num_levels - 1).long()


@MASK_REGISTRY.register()
def defeat(gt_boxes, level_shapes, cfg):
    """DeFeat's binary decoupled mask: each box on its single level (official code).

    On its level (stride s) a box covers rows [floor(y1/s), floor(y2/s)) and
    cols [floor(x1/s), floor(x2/s)) (clamped to the grid, so negative
    coordinates clamp at 0); a box collapsing to zero width or height marks
    the single cell (floor(y1/s), floor(x1/s)), clamped into the grid. Levels
    are taken in ``level_shapes`` order (finest first).
    """
    names = list(level_shapes)
    boxes, img = _cat_boxes(gt_boxes)
    levels = defeat_levels(boxes, len(names), cfg.DEFEAT_CANONICAL_SIZE)
    out = {}
    for li, lv in enumerate(names):
        s, h, w = level_shapes[lv]
        out[lv] = _floor_box_masks(img, boxes, len(gt_boxes), s, h, w, weight=levels == li)
    return out


def _floor_rects(boxes, stride, height, width):
    """(K, 4) long [c0, r0, c1, r1] of each box by DeFeat's floor rule (see :func:`defeat`)."""
    f = torch.div(boxes, stride, rounding_mode="floor")
    degenerate = (f[:, 2:] <= f[:, :2]).any(dim=1, keepdim=True)
    rects = _clamp_xy_(f.clone(), width, height)
    cell = _clamp_xy_(rects[:, :2].clone(), width - 1, height - 1)
    return torch.where(degenerate, torch.cat([cell, cell + 1], dim=1), rects).long()


def _floor_box_masks(img, boxes, num_images, stride, height, width, weight=None):
    """(num_images, height, width) binary masks by DeFeat's floor rule; ``weight`` (K,) bool selects boxes."""
    rects = _floor_rects(boxes, stride, height, width)
    return _paint_rects(img, rects, num_images, height, width, boxes.dtype, weight)


def floor_box_mask(boxes, stride, height, width):
    """(height, width) binary mask by DeFeat's floor rule for all ``boxes`` on one grid
    (ranges clamped to the grid, see :func:`defeat`)."""
    img = torch.zeros((boxes.shape[0],), dtype=torch.long, device=boxes.device)
    return _floor_box_masks(img, boxes, 1, stride, height, width)[0]


def defeat_backbone_masks(gt_boxes, level_shapes, base_stride=4):
    """DeFeat's backbone mask: all gt boxes on the stride-4 grid, nearest-resized to each level.

    Args:
        gt_boxes: list of (K_i, 4) XYXY pixel boxes.
        level_shapes: {level: (stride, H_l, W_l)}.
    Returns:
        {level: (N, H_l, W_l)} binary masks.
    """
    s0, h0, w0 = min(level_shapes.values())
    h0, w0 = h0 * s0 // base_stride, w0 * s0 // base_stride
    boxes, img = _cat_boxes(gt_boxes)
    base = _floor_box_masks(img, boxes, len(gt_boxes), base_stride, h0, w0)[:, None]
    return {lv: F.interpolate(base, size=(h, w), mode="nearest")[:, 0] for lv, (s, h, w) in level_shapes.items()}


def box_membership(boxes, stride, height, width):
    """(K, H, W) bool: the cells of each box by the ``box`` mask rule (cells whose centre is inside
    the box; a box containing no centre: the cell holding its centre)."""
    inside, centre, empty = _box_cell_rects(boxes, stride, height, width)
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)

    def cover(r):
        ry = (rows[None] >= r[:, 1:2]) & (rows[None] < r[:, 3:4])
        cx = (cols[None] >= r[:, 0:1]) & (cols[None] < r[:, 2:3])
        return ry[:, :, None] & cx[:, None, :]

    return cover(inside) | (cover(centre) & empty[:, None, None])


def area_balanced_box_mask(boxes, stride, height, width):
    """(H, W) foreground weights in which every box has the same total weight.

    A cell's weight is ``max_k 1/A_k`` over the boxes k covering it (A_k: cells of box k, ``box``
    rule), rescaled so the weights sum to the number of foreground cells: the foreground's total
    weight equals the binary mask's, but small boxes get as much of it as large ones.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros((height, width))
    member = box_membership(boxes, stride, height, width)
    inv_area = 1.0 / member.sum(dim=(1, 2)).clamp(min=1).to(boxes.dtype)
    w = (member * inv_area[:, None, None]).amax(dim=0)
    return w * ((w > 0).sum() / w.sum().clamp(min=1e-12))
