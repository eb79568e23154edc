"""DeFeat pieces: level assignment, decoupled mask, fg/bg normalisation, adapter init."""
import pytest
import torch
from detectron2.config import CfgNode

from distill_d2.adapters import build_adapters
from distill_d2.losses import decoupled_feature_loss
from distill_d2.masks import build_masks, defeat_levels

CFG = CfgNode({"DEFEAT_CANONICAL_SIZE": 56.0})
SHAPES = {"p2": (4, 64, 64), "p3": (8, 32, 32), "p4": (16, 16, 16), "p5": (32, 8, 8), "p6": (64, 4, 4)}


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
    want = torch.zeros(64, 64)
    want[5:9, 2:12] = 1  # rows floor(20/4)=5 .. floor(37/4)=9, cols floor(10/4)=2 .. floor(50/4)=12
    assert torch.equal(m["p2"][0], want)
    assert all(m[lv].sum() == 0 for lv in ("p3", "p4", "p5", "p6"))
    big = torch.tensor([[8.0, 40.0, 130.0, 200.0]])  # s = sqrt(123*161) ~ 140.7 -> level 1 (p3, stride 8)
    m = build_masks("defeat", [big], SHAPES, CFG)
    want = torch.zeros(32, 32)
    want[5:25, 1:16] = 1  # rows 40//8=5 .. 200//8=25; cols 8//8=1 .. 130//8=16
    assert torch.equal(m["p3"][0], want) and m["p2"].sum() == 0


def test_degenerate_box_marks_one_cell():
    thin = torch.tensor([[9.0, 9.0, 11.0, 30.0]])  # cols floor(9/4)=2 .. floor(11/4)=2: zero width
    m = build_masks("defeat", [thin], SHAPES, CFG)["p2"][0]
    assert m.sum() == 1 and m[2, 2] == 1
    m2 = build_masks("defeat", [thin, torch.zeros((0, 4))], SHAPES, CFG)["p2"]
    assert m2.shape == (2, 64, 64) and m2[1].sum() == 0


def test_fg_bg_normalisation_by_hand():
    s = {"p2": torch.zeros(2, 3, 2, 2), "p3": torch.zeros(2, 3, 1, 1)}
    t = {"p2": torch.ones(2, 3, 2, 2), "p3": torch.full((2, 3, 1, 1), 2.0)}
    t["p2"][1] = 3.0
    m = {"p2": torch.zeros(2, 2, 2), "p3": torch.zeros(2, 1, 1)}
    m["p2"][0, 0, 0] = 1  # one fg cell in image 0; image 1 all background
    fg, bg = decoupled_feature_loss(s, t, m)
    # p2 fg: 3 channels * 1^2 / (2*3*1) = 0.5 ; p3 fg: no fg -> 0 / max(1, 0) = 0
    assert fg.item() == pytest.approx((0.5 + 0.0) / 2)
    # p2 bg: image 0: 3 cells * 3 ch * 1 = 9; image 1: 4 cells * 3 ch * 9 = 108 -> 117 / (2*3*7)
    # p3 bg: 2 cells * 3 ch * 4 = 24 / (2*3*2)
    assert bg.item() == pytest.approx((117 / 42 + 24 / 12) / 2)


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
