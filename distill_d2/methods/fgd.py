"""FGD (Yang et al., CVPR 2022, "Focal and Global Knowledge Distillation for Detectors") on FPN levels.

Implemented as the reference code does it (yzd-v/FGD c03a6cf3, ``mmdet/distillation/losses/fgd.py`` and
its configs); the method card docs/methods/FGD.md is the reference.

* ``FocalGlobalKD`` -> ``loss_kd_fgd_fg``, ``loss_kd_fgd_bg``, ``loss_kd_fgd_att``, ``loss_kd_fgd_global``.
  Per level l of ``FGD.<F>.LEVELS`` (F = ``RCNN`` or ``RETINANET``, the student's family), with
  S = align_l(student map) (``FGD.ADAPTER``: a 1x1 conv where the channel counts differ) and T the
  teacher's map, both (N, C, H, W):

  - attention (tau = ``TEMPERATURE``): ``A_s(X) = H W softmax_hw(mean_c |X| / tau)`` (N, H, W),
    ``A_c(X) = C softmax_c(mean_hw |X| / tau)`` (N, C), each of mean 1;
  - masks from the gt boxes (:func:`fgd_masks`): ``M_fg`` = 1/area of a box on its cells (the max
    where boxes overlap), ``M_bg`` = 1 on the other cells divided by their count, per image;
  - ``fg = sum M_fg A_s(T) A_c(T) (S - T)^2 / N``, ``bg`` the same with ``M_bg`` (the teacher's
    attention on both sides);
  - ``att = sum |A_c(S) - A_c(T)| / N + sum |A_s(S) - A_s(T)| / N``;
  - ``global = sum (GC_s(S) - GC_t(T))^2 / N`` with ``GC(X) = X + channel_add(context(X))``, one
    trainable :class:`GcBlock` per side and level (zero-initialised last layer: identity at the start).

  Each piece is summed over the levels and weighted ``WEIGHT * {FG,BG,ATT,GLOBAL}_WEIGHT`` (alpha,
  beta, gamma, lambda of the paper); N is the batch (all-reduced over processes). Logs
  ``kd/fgd_<level>``: that level's weighted total.

Presets: ``configs/synthetic/fgd_*.yaml``, ``configs/COCO-Detection/fgd_*.yaml``.
"""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import CfgNode as CN

from ..config import changed_keys, default_distill_node
from ..errors import DistillConfigError
from ..losses import batch_normalize
from ..masks import _cat_boxes
from ..registry import ADAPTER_REGISTRY
from ..terms import DISTILL_TERM_REGISTRY, FAMILY_NAMES, FeatureTerm, check_choice

logger = logging.getLogger(__name__)

#: student family -> the DISTILL.FGD node of its per-detector settings
FAMILY_NODES = {"rcnn": "RCNN", "dense": "RETINANET"}
BOX_SCALES = ("stride", "fgd_legacy")
#: most elements of the (boxes, H, W) block the foreground mask builds at once (more boxes: chunks)
FG_CHUNK_ELEMENTS = 2**22


@ADAPTER_REGISTRY.register()
def fgd_align(cin, cout):
    """FGD's ``align``: a 1x1 conv with bias (PyTorch's default init) where the channel counts differ, else none."""
    return nn.Identity() if cin == cout else nn.Conv2d(cin, cout, kernel_size=1)


# ------------------------------------------------------------------ masks
def box_cell_ranges(gt_boxes, image_sizes, stride, height, width, box_scale="stride", dtype=None):
    """FGD's cells of every gt box on one (height, width) grid of ``stride``: ``(img, rects, area)``.

    A box (XYXY, input pixels) is clipped to its image's unpadded size (h_i, w_i), then put in grid
    units: ``x / stride`` ("stride") or ``x / w_i * width`` and ``y / h_i * height`` ("fgd_legacy":
    the reference's padded feature size over the unpadded image size). Its cells are cols
    ``floor(x1) .. ceil(x2)`` and rows ``floor(y1) .. ceil(y2)``, both ends included. ``area``: the
    reference's ``(r1 - r0 + 1)(c1 - c0 + 1)`` with "fgd_legacy"; with "stride" the number of those
    cells inside the grid (at least 1), so a box's weights always sum to 1.

    Args:
        gt_boxes: list over images of (K_i, 4) boxes; image_sizes: list over images of (h_i, w_i).
    Returns:
        img (K,) long; rects (K, 4) long [c0, r0, c1, r1] inclusive, not clamped to the grid; area (K,).
    """
    boxes, img = _cat_boxes(gt_boxes)
    boxes = boxes.to(dtype or boxes.dtype)
    hw = torch.as_tensor(image_sizes, dtype=boxes.dtype).reshape(-1, 2).to(boxes.device)[img]  # (K, 2) h, w
    wh = torch.stack([hw[:, 1], hw[:, 0]], dim=1).repeat(1, 2)  # (K, 4) w, h, w, h
    b = torch.minimum(boxes.clamp(min=0), wh)
    if box_scale == "stride":
        g = b / stride
    elif box_scale == "fgd_legacy":
        g = b / wh * b.new_tensor([width, height, width, height])
    else:
        raise ValueError(f"Unknown DISTILL.FGD.BOX_SCALE '{box_scale}': use one of {list(BOX_SCALES)}.")
    rects = torch.cat([g[:, :2].floor(), g[:, 2:].ceil()], dim=1).long()
    c0, r0, c1, r1 = rects.unbind(1)
    if box_scale == "fgd_legacy":
        area = (r1 - r0 + 1) * (c1 - c0 + 1)
    else:
        area = ((r1.clamp(max=height - 1) - r0 + 1).clamp(min=0)
                * (c1.clamp(max=width - 1) - c0 + 1).clamp(min=0)).clamp(min=1)
    return img, rects, area.to(boxes.dtype)


def fgd_masks(gt_boxes, image_sizes, level_shapes, box_scale="stride", dtype=None):
    """FGD's foreground and background masks on every level: ``({level: M_fg}, {level: M_bg})``, (N, H, W) each.

    ``M_fg`` holds ``1 / area`` of a box on its cells (:func:`box_cell_ranges`), the largest such value
    where boxes overlap, 0 elsewhere. ``M_bg`` is 1 where ``M_fg == 0`` divided by that cell count,
    per image (padding cells included; all 0 when no such cell). No Python loop over boxes: the boxes
    of all images are painted at once (in chunks of at most ``FG_CHUNK_ELEMENTS`` box cells).

    Args:
        gt_boxes: list over images of (K_i, 4) XYXY input pixels; image_sizes: list of unpadded (h_i, w_i);
        level_shapes: ordered {level: (stride, H, W)}.
    """
    n = len(gt_boxes)
    fgs, bgs = {}, {}
    for lv, (s, h, w) in level_shapes.items():
        img, rects, area = box_cell_ranges(gt_boxes, image_sizes, s, h, w, box_scale, dtype)
        dev, dt = rects.device, area.dtype
        rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_rows = (rows[None] >= rects[:, 1:2]) & (rows[None] <= rects[:, 3:4])  # (K, H)
        in_cols = (cols[None] >= rects[:, 0:1]) & (cols[None] <= rects[:, 2:3])  # (K, W)
        inv = 1.0 / area
        out = torch.zeros(n * h * w, dtype=dt, device=dev)
        cells = torch.arange(h * w, device=dev)
        chunk = max(1, FG_CHUNK_ELEMENTS // (h * w))
        for k0 in range(0, rects.shape[0], chunk):
            k = slice(k0, k0 + chunk)
            vals = (in_rows[k, :, None] & in_cols[k, None, :]).to(dt) * inv[k, None, None]  # (k, H, W)
            out.scatter_reduce_(0, (img[k, None] * (h * w) + cells[None]).reshape(-1), vals.reshape(-1), "amax")
        fg = out.view(n, h, w)
        bg = (fg == 0).to(dt)
        fgs[lv], bgs[lv] = fg, bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)
    return fgs, bgs


# ------------------------------------------------------------------ loss pieces
def attention(x, temperature):
    """FGD's attention of a map x (N, C, H, W): ``(spatial, channel)``.

    ``spatial = H W softmax_hw(mean_c |x| / T)`` (N, H, W) and ``channel = C softmax_c(mean_hw |x| / T)``
    (N, C): each has mean 1 per image.
    """
    n, c, h, w = x.shape
    a = x.abs()
    spatial = h * w * F.softmax((a.mean(dim=1) / temperature).reshape(n, h * w), dim=1).reshape(n, h, w)
    channel = c * F.softmax(a.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial, channel


def focal_sums(student, teacher, fg, bg, temperature):
    """One level's focal and attention sums over the local batch (not divided by N): ``(fg, bg, att)``.

    ``fg = sum_{n,c,h,w} M_fg A_s(T) A_c(T) (S - T)^2``, ``bg`` the same with ``M_bg`` (the teacher's
    attention weighs both), ``att = sum |A_c(S) - A_c(T)| + sum |A_s(S) - A_s(T)|``.

    Args:
        student, teacher: (N, C, H, W) (the student aligned); fg, bg: (N, H, W) masks.
    """
    sp_t, ch_t = attention(teacher, temperature)
    sp_s, ch_s = attention(student, temperature)
    err = ((student - teacher) ** 2 * ch_t[:, :, None, None]).sum(dim=1) * sp_t  # (N, H, W)
    att = (ch_s - ch_t).abs().sum() + (sp_s - sp_t).abs().sum()
    return (err * fg).sum(), (err * bg).sum(), att


class GcBlock(nn.Module):
    """GCNet's global context block as FGD applies it: ``GC(x) = x + channel_add(context(x))``, x (N, C, H, W).

    ``context(x) = sum_hw x * softmax_hw(conv_mask(x))`` (N, C, 1, 1), conv_mask a 1x1 conv C -> 1;
    ``channel_add`` = 1x1 conv C -> C/2, LayerNorm([C/2, 1, 1]), ReLU, 1x1 conv C/2 -> C (broadcast over
    H, W). Initialised as the reference: conv_mask kaiming-normal (fan_in, ReLU gain) with bias 0, the
    last conv all zero, so the block starts as the identity.
    """

    def __init__(self, channels):
        super().__init__()
        if channels < 2:
            raise ValueError(f"FGD's GcBlock needs at least 2 teacher channels, got {channels}.")
        planes = channels // 2
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, planes, kernel_size=1), nn.LayerNorm([planes, 1, 1]), nn.ReLU(inplace=True),
            nn.Conv2d(planes, channels, kernel_size=1))
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def context(self, x):
        """(N, C, 1, 1): the softmax(conv_mask)-weighted sum of x over the H * W cells."""
        n, c, h, w = x.shape
        p = F.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=2)
        return torch.bmm(x.reshape(n, c, h * w), p.transpose(1, 2)).reshape(n, c, 1, 1)

    def forward(self, x):
        return x + self.channel_add(self.context(x))


# ------------------------------------------------------------------ the term
def add_fgd_config(d):
    if "FGD" in d:
        return
    d.FGD = CN()
    # Overall factor of the four pieces: scales alpha..lambda together, keeping their ratios (the author's
    # tuning rule, FGD#11) [choice: 1 = the reference's weights; the synthetic presets raise it].
    d.FGD.WEIGHT = 1.0
    # Student->teacher align per level (ADAPTER_REGISTRY): "fgd_align" = 1x1 conv where C differs, else none [code].
    d.FGD.ADAPTER = "fgd_align"
    # Box to grid scaling: "stride" = x / stride [spec 3.3, default]; "fgd_legacy" = x / w_img * W_feat, the
    # reference's unpadded image size against the padded map (boxes stretched by up to the padding) [code].
    d.FGD.BOX_SCALE = "stride"
    # Per-detector settings (the reference configs, spec table 3.2; its docstring defaults differ, e.g. gamma
    # 1e-3); the student's family picks the node: Faster R-CNN -> RCNN, RetinaNet -> RETINANET.
    d.FGD.RCNN = CN()
    d.FGD.RCNN.LEVELS = ["p2", "p3", "p4", "p5"]  # FPN levels [code: mmdet neck outputs 0-3]
    d.FGD.RCNN.TEMPERATURE = 0.5  # tau of the attention softmaxes [code]
    d.FGD.RCNN.FG_WEIGHT = 5e-5  # alpha, foreground feature term [code: Faster R-CNN configs]
    d.FGD.RCNN.BG_WEIGHT = 2.5e-5  # beta, background feature term [code]
    d.FGD.RCNN.ATT_WEIGHT = 5e-5  # gamma, attention L1 term [code]
    d.FGD.RCNN.GLOBAL_WEIGHT = 5e-7  # lambda, GcBlock global term (0: no GcBlocks are built) [code]
    d.FGD.RETINANET = CN()
    d.FGD.RETINANET.LEVELS = ["p3", "p4", "p5", "p6", "p7"]  # [code: all five neck outputs]
    d.FGD.RETINANET.TEMPERATURE = 0.5  # [code]
    d.FGD.RETINANET.FG_WEIGHT = 1e-3  # alpha [code: RetinaNet configs]
    d.FGD.RETINANET.BG_WEIGHT = 5e-4  # beta [code]
    d.FGD.RETINANET.ATT_WEIGHT = 5e-4  # gamma [code]
    d.FGD.RETINANET.GLOBAL_WEIGHT = 5e-6  # lambda [code]


class FocalGlobalKD(FeatureTerm):
    """FGD's focal (fg/bg, attention) and global (GcBlock) feature distillation; see the module docstring."""

    reads = ("FGD.*",)
    adapter_key = "FGD.ADAPTER"
    mask_picture = "fgd_fg_mask"
    node = None  #: "RCNN" / "RETINANET", set by the family's subclass
    pieces = ("fg", "bg", "att", "global")

    @classmethod
    def add_config(cls, d):
        add_fgd_config(d)

    def __init__(self, cfg, ctx):
        d, node = cfg.DISTILL.FGD, self.node
        f = d[node]
        check_choice("DISTILL.FGD.BOX_SCALE", d.BOX_SCALE, BOX_SCALES)
        if not f.TEMPERATURE > 0:
            raise DistillConfigError(f"DISTILL.FGD.{node}.TEMPERATURE = {f.TEMPERATURE!r}: the attention "
                                     "temperature must be > 0 (the reference uses 0.5).")
        self._check_other_family(cfg, ctx)
        super().__init__(cfg, ctx)
        self.box_scale, self.temperature = d.BOX_SCALE, float(f.TEMPERATURE)
        self.weights = {k: d.WEIGHT * w for k, w in zip(self.pieces, (f.FG_WEIGHT, f.BG_WEIGHT, f.ATT_WEIGHT,
                                                                       f.GLOBAL_WEIGHT))}
        self.gc_student = self.gc_teacher = None
        if self.weights["global"] > 0:  # (no idle parameters when the global term is off)
            ch = {lv: ctx.teacher_shapes[lv].channels for lv in self.levels}
            self.gc_student = nn.ModuleDict({lv: GcBlock(c) for lv, c in ch.items()})
            self.gc_teacher = nn.ModuleDict({lv: GcBlock(c) for lv, c in ch.items()})

    def _check_other_family(self, cfg, ctx):
        """A key of the other detector's node (DISTILL.FGD.RCNN / RETINANET) changed is never read: refuse it."""
        default = default_distill_node().FGD
        for other in FAMILY_NODES.values():
            changed = [] if other == self.node else changed_keys(cfg.DISTILL.FGD[other], default[other])
            if not changed:
                continue
            msg = (f"DISTILL.FGD.{other}.{', DISTILL.FGD.{other}.'.join(changed)} set, but the student is "
                   f"{FAMILY_NAMES[ctx.family]}, which reads DISTILL.FGD.{self.node}.*: set "
                   f"DISTILL.FGD.{self.node}.{changed[0]} instead (or DISTILL.UNUSED_KEYS warn to go on).")
            if cfg.DISTILL.UNUSED_KEYS == "warn":
                logger.warning(msg)
            else:
                raise DistillConfigError(msg)

    def focal_masks(self, rec):
        """({level: M_fg}, {level: M_bg}), (N, H, W) each, on the distilled grids (:func:`fgd_masks`)."""
        sizes = [tuple(x.image_size) for x in rec.gt_instances]
        dtype = rec.features[self.levels[0]].dtype
        return fgd_masks(rec.gt_boxes, sizes, self.grid(rec), self.box_scale, dtype)

    def masks(self, rec):
        return self.focal_masks(rec)[0]

    def forward(self, rec):
        student, teacher = self.adapted(rec), self.targets(rec)
        fg, bg = self.focal_masks(rec)
        n = student[self.levels[0]].shape[0]
        per_level = []  # (L, P) sums over the local batch, P pieces (no "global" without GcBlocks)
        for lv in self.levels:
            s, t = student[lv], teacher[lv]
            if s.shape != t.shape:
                raise ValueError(f"FGD level {lv}: student {tuple(s.shape)} vs teacher {tuple(t.shape)} after align.")
            level = list(focal_sums(s, t, fg[lv], bg[lv], self.temperature))
            if self.gc_student is not None:
                level.append(((self.gc_student[lv](s) - self.gc_teacher[lv](t)) ** 2).sum())
            per_level.append(torch.stack(level))
        per_level = torch.stack(per_level)
        keys = self.pieces[:per_level.shape[1]]
        w = per_level.new_tensor([self.weights[k] for k in keys])
        # one all-reduce of N for the pieces (summed over levels) and the per-level weighted totals
        normed = batch_normalize(torch.cat([per_level.sum(dim=0), (per_level.detach() * w).sum(dim=1)]), n)
        losses = {f"loss_kd_fgd_{k}": w[i] * normed[i] for i, k in enumerate(keys)}
        scalars = {f"kd/fgd_{lv}": normed[len(keys) + i].detach() for i, lv in enumerate(self.levels)}
        return losses, scalars

    def explain(self, rec):
        fg, bg = self.focal_masks(rec)
        att = {lv: attention(t, self.temperature)[0] for lv, t in self.targets(rec).items()}
        return {"maps": {"fgd_fg_mask": fg, "fgd_bg_mask": bg, "fgd_teacher_attention": att}}


class RCNNFocalGlobalKD(FocalGlobalKD):
    node = "RCNN"
    levels_key = "FGD.RCNN.LEVELS"


class RetinaNetFocalGlobalKD(FocalGlobalKD):
    node = "RETINANET"
    levels_key = "FGD.RETINANET.LEVELS"


FocalGlobalKD.by_family = {"rcnn": RCNNFocalGlobalKD, "dense": RetinaNetFocalGlobalKD}
DISTILL_TERM_REGISTRY.register(FocalGlobalKD)
