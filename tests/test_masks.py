import math

import pytest
import torch
from detectron2.config import CfgNode

from distill_d2.masks import build_masks, gaussian_mask


def test_gaussian_peak_at_box_centre_and_zero_outside():
    # box covering cells 2..5 x 4..7 at stride 4: pixels [8,24) x [16,32)
    boxes = torch.tensor([[8.0, 16.0, 24.0, 32.0]])
    m = gaussian_mask(boxes, stride=4, height=12, width=10)
    assert m.shape == (12, 10)
    inside = torch.zeros_like(m, dtype=torch.bool)
    inside[4:8, 2:6] = True
    assert (m[~inside] == 0).all()
    assert (m[inside] > 0).all()
    # box centre (4, 6) in grid units lies between cells; the 4 central cells tie for the max
    top = m[5:7, 3:5]
    assert torch.allclose(top, top.max().expand_as(top)) and m.max() == top.max()
    # value at cell centre (3.5, 5.5): dx = 0.5 / (rho * w = 4/6), dy = 0.5 / (4/6)
    sig = 4 / 6
    assert m[5, 3].item() == pytest.approx(math.exp(-(0.25 / (2 * sig**2)) * 2), rel=1e-5)


def test_gaussian_exact_peak_is_one_when_centre_on_cell_centre():
    boxes = torch.tensor([[4.0, 4.0, 24.0, 24.0]])  # centre 14 px = 3.5 cells at stride 4
    m = gaussian_mask(boxes, 4, 8, 8)
    assert m[3, 3].item() == pytest.approx(1.0) and m.argmax().item() == 3 * 8 + 3


def test_gaussian_overlapping_boxes_take_the_max():
    a, b = torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    ma, mb = gaussian_mask(a, 4, 16, 16), gaussian_mask(b, 4, 16, 16)
    both = gaussian_mask(torch.cat([a, b]), 4, 16, 16)
    assert torch.equal(both, torch.maximum(ma, mb))


def test_gaussian_untruncated_is_positive_everywhere():
    m = gaussian_mask(torch.tensor([[8.0, 8.0, 24.0, 24.0]]), 4, 8, 8, truncate=False)
    assert (m > 0).all()


def test_box_smaller_than_a_cell():
    tiny = torch.tensor([[9.0, 9.0, 11.0, 11.0]])
    assert gaussian_mask(tiny, 8, 4, 4).sum() == 0  # no cell centre inside: nothing on this level
    fine = gaussian_mask(tiny, 2, 16, 16)  # grid [4.5, 5.5): only cell (4, 4) has its centre inside
    assert fine[4, 4] > 0 and fine.gt(0).sum() == 1
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True})
    m = build_masks("box", [tiny], {"p3": (8, 4, 4)}, cfg)["p3"][0]
    assert m.sum() == 1 and m[1, 1] == 1  # the binary box mask keeps the centre cell


def test_padding_region_is_zero_on_every_level_and_mask_type():
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True})
    # image 40x40 padded to 64x64; one box touching the image border
    gt = [torch.tensor([[20.0, 20.0, 40.0, 40.0]])]
    shapes = {"p2": (4, 16, 16), "p3": (8, 8, 8), "p4": (16, 4, 4)}
    for kind in ("gaussian", "box"):
        masks = build_masks(kind, gt, shapes, cfg)
        for lv, (s, h, w) in shapes.items():
            valid = 40 // s if 40 % s == 0 else 40 // s + 1
            assert masks[lv].shape == (1, h, w)
            assert (masks[lv][0, valid:, :] == 0).all() and (masks[lv][0, :, valid:] == 0).all()
            assert masks[lv].max() > 0


def test_box_and_full_masks_and_empty_images():
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True})
    gt = [torch.tensor([[0.0, 0.0, 16.0, 8.0]]), torch.zeros((0, 4))]
    m = build_masks("box", gt, {"p2": (4, 4, 6)}, cfg)["p2"]
    assert m[0].sum() == 4 * 2 and m[0, :2, :4].sum() == 8
    assert m[1].sum() == 0
    assert build_masks("gaussian", gt, {"p2": (4, 4, 6)}, cfg)["p2"][1].sum() == 0
    assert build_masks("full", gt, {"p2": (4, 4, 6)}, cfg)["p2"].sum() == 2 * 24
    with pytest.raises(ValueError, match="Unknown DISTILL.FEAT.MASK"):
        build_masks("nope", gt, {"p2": (4, 4, 6)}, cfg)
