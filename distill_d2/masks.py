"""Spatial weight masks for feature distillation, per FPN level.

Every builder in ``MASK_REGISTRY`` (registered under its function name) has the signature
``fn(gt_boxes, level_shapes, cfg) -> {level: (N, H_l, W_l) float tensor}`` with
``gt_boxes`` a list (one per image) of (K_i, 4) XYXY boxes in input-tensor
pixels (``Instances.gt_boxes.tensor``), ``level_shapes`` an ordered
``{level: (stride, H_l, W_l)}`` and ``cfg`` the ``DISTILL.FEAT`` node. Cell
(i, j) of a level with stride s covers pixels [j*s, (j+1)*s) and has its
centre at ((j+0.5)*s, (i+0.5)*s). Padding cells are 0 because no box reaches them.
"""
import torch
from fvcore.common.registry import Registry

MASK_REGISTRY = Registry("DISTILL_MASK")
MASK_REGISTRY.__doc__ = "Feature-distillation masks: fn(gt_boxes, level_shapes, cfg) -> {level: (N,H,W)}."


def gaussian_mask(boxes, stride, height, width, rho=1.0 / 6.0, truncate=True):
    """TAR/FGFI-style Gaussian mask of one image on one level.

    ``G_k(x, y) = exp(-((x-cx)^2 / (2 (rho w)^2) + (y-cy)^2 / (2 (rho h)^2)))``
    with centre (cx, cy) and size (w, h) of box k in grid units, evaluated at
    cell centres; with ``truncate`` G_k is 0 at cells whose centre lies outside
    box k (so a box smaller than a cell may vanish on a coarse level, where its
    untruncated Gaussian would underflow anyway). Result: max_k G_k.

    Args:
        boxes: (K, 4) XYXY in pixels.
    Returns:
        (height, width) tensor in [0, 1].
    """
    out = boxes.new_zeros((height, width))
    if boxes.numel() == 0:
        return out
    b = boxes / stride
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = (b[:, 2] - b[:, 0]).clamp(min=1e-3), (b[:, 3] - b[:, 1]).clamp(min=1e-3)
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    dx = (xs[None, :] - cx[:, None]) ** 2 / (2 * (rho * w[:, None]) ** 2)  # (K, W)
    dy = (ys[None, :] - cy[:, None]) ** 2 / (2 * (rho * h[:, None]) ** 2)  # (K, H)
    g = torch.exp(-(dy[:, :, None] + dx[:, None, :]))  # (K, H, W)
    if truncate:
        g = g * _inside(b, xs, ys)
    return g.max(dim=0).values


def _inside(b, xs, ys):
    """(K, H, W) bool: cell centre inside box (grid units, half-open)."""
    in_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] < b[:, 2:3])
    in_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] < b[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def _centre_cell(cx, cy, height, width):
    """(K, H, W) bool: the cell that contains each box centre."""
    k = cx.shape[0]
    m = torch.zeros((k, height, width), dtype=torch.bool, device=cx.device)
    i = cy.floor().long().clamp(0, height - 1)
    j = cx.floor().long().clamp(0, width - 1)
    m[torch.arange(k, device=cx.device), i, j] = True
    return m


@MASK_REGISTRY.register()
def gaussian(gt_boxes, level_shapes, cfg):
    return {
        lv: torch.stack([gaussian_mask(b, s, h, w, cfg.GAUSSIAN_RHO, cfg.GAUSSIAN_TRUNCATE) for b in gt_boxes])
        for lv, (s, h, w) in level_shapes.items()
    }


def box_mask(boxes, stride, height, width):
    """(height, width) binary mask: 1 at cells whose centre is inside any box
    (a box containing no cell centre marks the cell holding its centre)."""
    out = boxes.new_zeros((height, width))
    if boxes.numel() == 0:
        return out
    b = boxes / stride
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    m = _inside(b, xs, ys) | _centre_cell(cx, cy, height, width)
    return m.any(dim=0).to(boxes.dtype)


@MASK_REGISTRY.register()
def box(gt_boxes, level_shapes, cfg):
    """Binary gt-box mask on every level."""
    return {lv: torch.stack([box_mask(b, s, h, w) for b in gt_boxes]) for lv, (s, h, w) in level_shapes.items()}


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
    cols [floor(x1/s), floor(x2/s)); a box collapsing to zero width or height
    marks the single cell (floor(y1/s), floor(x1/s)). Levels are taken in
    ``level_shapes`` order (finest first).
    """
    names = list(level_shapes)
    out = {}
    for lv in names:
        s, h, w = level_shapes[lv]
        ref = gt_boxes[0] if gt_boxes else torch.zeros(0)
        out[lv] = ref.new_zeros((len(gt_boxes), h, w))
    for n, boxes in enumerate(gt_boxes):
        if boxes.numel() == 0:
            continue
        levels = defeat_levels(boxes, len(names), cfg.DEFEAT_CANONICAL_SIZE)
        for li, lv in enumerate(names):
            s, h, w = level_shapes[lv]
            sel = boxes[levels == li]
            if len(sel):
                out[lv][n] = floor_box_mask(sel, s, h, w)
    return out


def floor_box_mask(boxes, stride, height, width):
    """(height, width) binary mask by DeFeat's floor rule for all ``boxes`` on one grid."""
    m = boxes.new_zeros((height, width))
    for b in boxes.tolist():
        x0, y0, x1, y1 = (int(v // stride) for v in b)
        if x1 <= x0 or y1 <= y0:
            m[min(y0, height - 1), min(x0, width - 1)] = 1.0
        else:
            m[y0:y1, x0:x1] = 1.0
    return m


def defeat_backbone_masks(gt_boxes, level_shapes, base_stride=4):
    """DeFeat's backbone mask: all gt boxes on the stride-4 grid, nearest-resized to each level.

    Args:
        gt_boxes: list of (K_i, 4) XYXY pixel boxes.
        level_shapes: {level: (stride, H_l, W_l)}.
    Returns:
        {level: (N, H_l, W_l)} binary masks.
    """
    import torch.nn.functional as F

    s0, h0, w0 = min(level_shapes.values())
    h0, w0 = h0 * s0 // base_stride, w0 * s0 // base_stride
    base = torch.stack([floor_box_mask(b, base_stride, h0, w0) for b in gt_boxes])[:, None]
    return {lv: F.interpolate(base, size=(h, w), mode="nearest")[:, 0] for lv, (s, h, w) in level_shapes.items()}
