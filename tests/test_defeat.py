"""DeFeat pieces: level assignment, decoupled mask, fg/bg normalisation, adapter init."""
import math

import pytest
import torch
from detectron2.config import CfgNode

from distill_d2.adapters import build_adapters
from distill_d2.methods.defeat import decoupled_feature_loss
from distill_d2.masks import build_masks, defeat_backbone_masks, defeat_levels, floor_box_mask

CFG = CfgNode({"DEFEAT_CANONICAL_SIZE": 56.0})
# a 192 x 256 px (H x W) batch: H != W on every level
SHAPES = {"p2": (4, 48, 64), "p3": (8, 24, 32), "p4": (16, 12, 16), "p5": (32, 6, 8), "p6": (64, 3, 4)}


def sq(w, x0=0.0, y0=0.0):
    return [x0, y0, x0 + w, y0 + w]


def test_level_assignment_boundaries():
    # s = sqrt((w+1)(h+1)); level = clamp(floor(log2(s/56 + 1e-6)), 0, 4)
    boxes = torch.tensor([sq(10), sq(55), sq(110), sq(111), sq(222), sq(223), sq(447), sq(895), sq(5000)])
    assert defeat_levels(boxes, 5).tolist() == [0, 0, 0, 1, 1, 2, 3, 4, 4]
    # the +1: w = h = 111 gives s = 112 = 2 * 56 exactly -> level 1 (w = 112 would be needed without it)
    # the 1e-6: s/56 == 2 exactly must not round down to level 0 through log2 error
    assert defeat_levels(torch.tensor([[0.0, 0.0, 111.0, 111.0]]), 5).item() == 1
    # non-square: w=223, h=55 -> s = sqrt(224 * 56) = 112 -> level 1
    assert defeat_levels(torch.tensor([[0.0, 0.0, 223.0, 55.0]]), 5).item() == 1
    # clamp to the levels that exist
    assert defeat_levels(torch.tensor([sq(5000)]), 3).item() == 2


def test_decoupled_mask_floor_rule_and_single_level():
    box = torch.tensor([[10.0, 20.0, 50.0, 37.0]])  # w=40, h=17 -> s ~ 31.6 -> level 0 (p2, stride 4)
    m = build_masks("defeat", [box], SHAPES, CFG)
    want = torch.zeros(48, 64)
    want[5:9, 2:12] = 1  # rows floor(20/4)=5 .. floor(37/4)=9, cols floor(10/4)=2 .. floor(50/4)=12
    assert torch.equal(m["p2"][0], want)
    assert all(m[lv].sum() == 0 for lv in ("p3", "p4", "p5", "p6"))
    big = torch.tensor([[8.0, 40.0, 130.0, 200.0]])  # s = sqrt(123*161) ~ 140.7 -> level 1 (p3, stride 8)
    m = build_masks("defeat", [big], SHAPES, CFG)
    want = torch.zeros(24, 32)
    want[5:24, 1:16] = 1  # rows 40//8=5 .. 200//8=25 clamped to the 24 rows; cols 8//8=1 .. 130//8=16
    assert torch.equal(m["p3"][0], want) and m["p2"].sum() == 0


def test_degenerate_box_marks_one_cell():
    thin = torch.tensor([[9.0, 9.0, 11.0, 30.0]])  # cols floor(9/4)=2 .. floor(11/4)=2: zero width
    m = build_masks("defeat", [thin], SHAPES, CFG)["p2"][0]
    assert m.sum() == 1 and m[2, 2] == 1
    m2 = build_masks("defeat", [thin, torch.zeros((0, 4))], SHAPES, CFG)["p2"]
    assert m2.shape == (2, 48, 64) and m2[1].sum() == 0


def test_fg_bg_normalisation_by_hand():
    s = {"p2": torch.zeros(2, 3, 2, 3), "p3": torch.zeros(2, 3, 1, 2)}
    t = {"p2": torch.ones(2, 3, 2, 3), "p3": torch.full((2, 3, 1, 2), 2.0)}
    t["p2"][1] = 3.0
    m = {"p2": torch.zeros(2, 2, 3), "p3": torch.zeros(2, 1, 2)}
    m["p2"][0, 0, 2] = 1  # one fg cell in image 0; image 1 all background
    fg, bg = decoupled_feature_loss(s, t, m)
    # p2 fg: 3 channels * 1^2 / (2*3*1) = 0.5 ; p3 fg: no fg -> 0 / max(1, 0) = 0
    assert fg.item() == pytest.approx((0.5 + 0.0) / 2)
    # p2 bg: image 0: 5 cells * 3 ch * 1 = 15; image 1: 6 cells * 3 ch * 9 = 162 -> 177 / (2*3*11)
    # p3 bg: 4 cells * 3 ch * 4 = 48 / (2*3*4)
    assert bg.item() == pytest.approx((177 / 66 + 48 / 24) / 2)


def test_defeat_adapter_initialisation_statistics():
    torch.manual_seed(0)
    ad = build_adapters("conv3x3_defeat", ["p2"], {"p2": 256}, {"p2": 256})["p2"]
    w = ad.weight.detach()
    assert w.shape == (256, 256, 3, 3)
    assert w.abs().max() <= 2e-4 + 1e-12
    # a N(0,1) truncated at +-2 has std 0.8796
    assert w.std().item() == pytest.approx(0.8796e-4, rel=0.02) and abs(w.mean().item()) < 2e-6
    x = torch.randn(1, 256, 8, 8)
    assert ad(x).sub(ad.bias[None, :, None, None]).abs().max() < 0.05  # near-zero output at start


# ---------------------------------------------------------------- vectorized floor rule vs naive loop

def random_boxes(seed, k, stride, height, width):
    """(k, 4) pixel boxes: general (some partly or fully outside the grid, negative
    coordinates), zero-size, sub-cell, inverted, and cell-aligned boxes."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = height * stride, width * stride
    x0 = torch.rand(k, generator=g) * 1.6 * wp - 0.3 * wp
    y0 = torch.rand(k, generator=g) * 1.6 * hp - 0.3 * hp
    b = torch.stack([x0, y0, x0 + torch.rand(k, generator=g) ** 2 * 0.9 * wp,
                     y0 + torch.rand(k, generator=g) ** 2 * 0.9 * hp], 1)
    q = k // 8
    b[0:q, 2] = b[0:q, 0]  # zero width
    b[q : 2 * q, 3] = b[q : 2 * q, 1]  # zero height
    b[2 * q : 3 * q, 2:] = b[2 * q : 3 * q, :2] + torch.rand(q, 2, generator=g) * 0.9 * stride  # sub-cell
    b[3 * q : 5 * q] = (b[3 * q : 5 * q] / stride).round() * stride  # on cell boundaries
    b[5 * q : 5 * q + 1, 2:] = b[5 * q : 5 * q + 1, :2] - stride  # inverted
    b[5 * q + 1 : 5 * q + 2, 2:] = b[5 * q + 1 : 5 * q + 2, :2] - 3.3 * stride  # inverted by several cells
    b[5 * q + 2 : 5 * q + 3, 2] = b[5 * q + 2 : 5 * q + 3, 0] - 2.6 * stride  # inverted in x only
    return b


def ref_floor(boxes, stride, height, width):
    """DeFeat floor rule, one box and one cell at a time, with the clamp to the grid."""
    out = torch.zeros(height, width)
    for x0, y0, x1, y1 in boxes.tolist():
        c0, r0, c1, r1 = (math.floor(v / stride) for v in (x0, y0, x1, y1))
        if c1 <= c0 or r1 <= r0:
            out[min(max(r0, 0), height - 1), min(max(c0, 0), width - 1)] = 1
            continue
        for i in range(height):
            for j in range(width):
                if r0 <= i < r1 and c0 <= j < c1:
                    out[i, j] = 1
    return out


@pytest.mark.parametrize("stride,height,width", [(4, 17, 23), (8, 9, 12), (3, 11, 7), (16, 5, 6), (32, 1, 3)])
def test_floor_box_mask_matches_naive_loop(stride, height, width):
    for seed, k in ((0, 40), (1, 9), (2, 1), (3, 0)):
        boxes = random_boxes(seed, k, stride, height, width)
        got = floor_box_mask(boxes, stride, height, width)
        assert got.shape == (height, width) and got.dtype == boxes.dtype
        assert torch.equal(got, ref_floor(boxes, stride, height, width))


def test_negative_coordinates_clamp_at_zero():
    # floor(-10/4) = -3, floor(9/4) = 2: cols [0, 2); floor(-6/4) = -2, floor(13/4) = 3: rows [0, 3)
    m = floor_box_mask(torch.tensor([[-10.0, -6.0, 9.0, 13.0]]), 4, 8, 10)
    want = torch.zeros(8, 10)
    want[0:3, 0:2] = 1
    assert torch.equal(m, want)  # a Python slice [-3:2] would have marked nothing
    # degenerate at negative coordinates: the clamped cell (1, 0), not column -3 = 7
    m = floor_box_mask(torch.tensor([[-10.0, 5.0, -9.0, 20.0]]), 4, 8, 10)
    assert m.sum() == 1 and m[1, 0] == 1
    # entirely above-left of the grid: nothing (a slice [-5:-2] would mark cells at the far end)
    assert floor_box_mask(torch.tensor([[-20.0, -20.0, -5.0, -5.0]]), 4, 8, 10).sum() == 0
    # and through the registry builder (same floor rule on the box's level)
    m = build_masks("defeat", [torch.tensor([[-10.0, -6.0, 9.0, 13.0]])], SHAPES, CFG)["p2"][0]
    assert m.sum() == 6 and m[0:3, 0:2].sum() == 6


def test_defeat_builder_matches_naive_loop():
    shapes = {"p2": (4, 40, 52), "p3": (8, 20, 26), "p4": (16, 10, 13), "p5": (32, 5, 7), "p6": (64, 3, 4)}
    gt = [random_boxes(10, 60, 4, 40, 52) * 1.5, torch.zeros((0, 4)), random_boxes(11, 25, 8, 20, 26),
          torch.tensor([[0.0, 0.0, 900.0, 700.0], [-50.0, -40.0, 300.0, 220.0]])]
    m = build_masks("defeat", gt, shapes, CFG)
    names = list(shapes)
    hit = set()
    for n, boxes in enumerate(gt):
        levels = defeat_levels(boxes, len(names), 56.0)
        for li, lv in enumerate(names):
            s, h, w = shapes[lv]
            want = ref_floor(boxes[levels == li], s, h, w)
            assert m[lv].shape == (len(gt), h, w)
            assert torch.equal(m[lv][n], want), (n, lv)
            if want.sum() > 0:
                hit.add(lv)
    assert m["p2"][1].sum() == 0 and len(hit) >= 4  # boxes landed on most levels


def test_defeat_backbone_masks_match_naive_loop():
    shapes = {"res2": (4, 24, 40), "res3": (8, 12, 20), "res4": (16, 6, 10), "res5": (32, 3, 5)}
    gt = [random_boxes(20, 30, 4, 24, 40), torch.zeros((0, 4)), random_boxes(21, 8, 16, 6, 10)]
    m = defeat_backbone_masks(gt, shapes)
    for n, boxes in enumerate(gt):
        base = ref_floor(boxes, 4, 24, 40)
        for lv, (s, h, w) in shapes.items():
            r = s // 4  # nearest resize of the stride-4 grid: cell (i, j) takes base cell (r i, r j)
            want = torch.tensor([[base[r * i, r * j].item() for j in range(w)] for i in range(h)])
            assert m[lv].shape == (len(gt), h, w)
            assert torch.equal(m[lv][n], want), (n, lv)
    assert m["res2"][0].sum() > 0 and m["res2"][1].sum() == 0
