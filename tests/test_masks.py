import math

import pytest
import torch
from detectron2.config import CfgNode

import distill_d2.masks as masks_mod
from distill_d2.masks import box_mask, build_masks, gaussian_mask


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
    boxes = torch.tensor([[4.0, 14.0, 24.0, 22.0]])  # centre (14, 18) px = cell centre (3.5, 4.5) at stride 4
    m = gaussian_mask(boxes, 4, 8, 10)
    assert m[4, 3].item() == pytest.approx(1.0) and m.argmax().item() == 4 * 10 + 3


def test_gaussian_overlapping_boxes_take_the_max():
    a, b = torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[16.0, 16.0, 72.0, 48.0]])
    ma, mb = gaussian_mask(a, 4, 12, 20), gaussian_mask(b, 4, 12, 20)
    both = gaussian_mask(torch.cat([a, b]), 4, 12, 20)
    assert torch.equal(both, torch.maximum(ma, mb)) and ((ma > 0) & (mb > 0)).any()  # they overlap


def test_gaussian_untruncated_is_positive_everywhere():
    m = gaussian_mask(torch.tensor([[8.0, 8.0, 24.0, 24.0]]), 4, 8, 12, truncate=False)
    assert m.shape == (8, 12) and (m > 0).all()


def test_box_smaller_than_a_cell():
    tiny = torch.tensor([[9.0, 9.0, 11.0, 11.0]])
    assert gaussian_mask(tiny, 8, 4, 6).sum() == 0  # no cell centre inside: nothing on this level
    fine = gaussian_mask(tiny, 2, 16, 12)  # grid [4.5, 5.5): only cell (4, 4) has its centre inside
    assert fine[4, 4] > 0 and fine.gt(0).sum() == 1
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True})
    m = build_masks("box", [tiny], {"p3": (8, 4, 6), "p1": (2, 16, 12)}, cfg)
    assert m["p3"][0].sum() == 1 and m["p3"][0, 1, 1] == 1  # the binary box mask keeps the centre cell
    assert m["p1"][0].sum() == 1 and m["p1"][0, 4, 4] == 1  # (a centre inside: that cell only)


def test_padding_region_is_zero_on_every_level_and_mask_type():
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True})
    # image 40 (H) x 56 (W) padded to 48x64; one box touching the image's bottom-right border
    gt = [torch.tensor([[20.0, 20.0, 56.0, 40.0]])]
    shapes = {"p2": (4, 12, 16), "p3": (8, 6, 8), "p4": (16, 3, 4)}
    for kind in ("gaussian", "box"):
        masks = build_masks(kind, gt, shapes, cfg)
        for lv, (s, h, w) in shapes.items():
            rows, cols = -(-40 // s), -(-56 // s)  # cells that hold image pixels
            assert masks[lv].shape == (1, h, w)
            assert (masks[lv][0, rows:, :] == 0).all() and (masks[lv][0, :, cols:] == 0).all()
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


# ---------------------------------------------------------------- naive references
# Straight per-box, per-cell loops from the rules in distill_d2/masks.py (grid
# coordinates are the boxes divided by the stride, as the module does in float32).

GRIDS = [(4, 17, 23), (8, 9, 12), (3, 11, 7), (16, 5, 6), (32, 1, 3)]


def random_boxes(seed, k, stride, height, width):
    """(k, 4) boxes in pixels: general boxes (some partly or fully outside the image, some
    with negative coordinates), zero-width / zero-height, sub-cell, inverted, and boxes
    with edges on cell boundaries and on cell centres."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = height * stride, width * stride
    x0 = torch.rand(k, generator=g) * 1.6 * wp - 0.3 * wp
    y0 = torch.rand(k, generator=g) * 1.6 * hp - 0.3 * hp
    bw = torch.rand(k, generator=g) ** 2 * 0.9 * wp
    bh = torch.rand(k, generator=g) ** 2 * 0.9 * hp
    b = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
    q = k // 8
    b[0:q, 2] = b[0:q, 0]  # zero width
    b[q : 2 * q, 3] = b[q : 2 * q, 1]  # zero height
    b[2 * q : 3 * q, 2:] = b[2 * q : 3 * q, :2] + torch.rand(q, 2, generator=g) * 0.9 * stride  # sub-cell
    b[3 * q : 5 * q] = (b[3 * q : 5 * q] / (stride / 2)).round() * (stride / 2)  # edges on boundaries/centres
    b[5 * q : 5 * q + 1, 2:] = b[5 * q : 5 * q + 1, :2] - stride  # inverted
    b[5 * q + 1 : 5 * q + 2, 2:] = b[5 * q + 1 : 5 * q + 2, :2] - 3.3 * stride  # inverted by several cells
    b[5 * q + 2 : 5 * q + 3, 2] = b[5 * q + 2 : 5 * q + 3, 0] - 2.6 * stride  # inverted in x only
    return b


def ref_gaussian(boxes, stride, height, width, rho, truncate):
    out = [[0.0] * width for _ in range(height)]
    for x0, y0, x1, y1 in (boxes / stride).tolist():
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        w, h = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
        for i in range(height):
            for j in range(width):
                x, y = j + 0.5, i + 0.5
                if truncate and not (x0 <= x < x1 and y0 <= y < y1):
                    continue
                g = math.exp(-((x - cx) ** 2 / (2 * (rho * w) ** 2) + (y - cy) ** 2 / (2 * (rho * h) ** 2)))
                out[i][j] = max(out[i][j], g)
    return torch.tensor(out, dtype=torch.float64)


def ref_box_cells(box, height, width):
    """Cells (i, j) of one box (grid units) by the card's rule (docs/methods/HGD.md): the cells whose
    centre is inside the box; only when there is none, the cell holding the box centre (clamped)."""
    x0, y0, x1, y1 = box
    cells = {(i, j) for i in range(height) for j in range(width) if x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1}
    if not cells:
        ci, cj = math.floor((y0 + y1) / 2), math.floor((x0 + x1) / 2)
        cells = {(min(max(ci, 0), height - 1), min(max(cj, 0), width - 1))}
    return cells


def ref_box(boxes, stride, height, width):
    out = torch.zeros(height, width)
    for box in (boxes / stride).tolist():
        for i, j in ref_box_cells(box, height, width):
            out[i, j] = 1
    return out


def ref_area_balanced(boxes, stride, height, width):
    """max over the boxes covering a cell of 1/(cells of the box), rescaled to sum to the foreground cell count."""
    w = [[0.0] * width for _ in range(height)]
    for box in (boxes / stride).tolist():
        cells = ref_box_cells(box, height, width)
        for i, j in cells:
            w[i][j] = max(w[i][j], 1.0 / len(cells))
    n_fg, tot = sum(v > 0 for row in w for v in row), sum(map(sum, w))
    return torch.tensor([[v * n_fg / tot if tot else 0.0 for v in row] for row in w], dtype=torch.float64)


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("stride,height,width", GRIDS)
def test_gaussian_matches_naive_loop(stride, height, width, truncate):
    for seed, k in ((0, 40), (1, 9), (2, 1), (3, 0)):
        boxes = random_boxes(seed, k, stride, height, width)
        for rho in (1 / 6, 0.4):
            got = gaussian_mask(boxes, stride, height, width, rho, truncate)
            want = ref_gaussian(boxes, stride, height, width, rho, truncate)
            assert got.shape == (height, width) and got.dtype == boxes.dtype
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-12)
            if truncate:
                assert torch.equal(got > 0, want > 0)
    # registry builder: one image empty
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": truncate})
    gt = [random_boxes(4, 24, stride, height, width), torch.zeros((0, 4))]
    m = build_masks("gaussian", gt, {"p": (stride, height, width)}, cfg)["p"]
    torch.testing.assert_close(m[0].double(), ref_gaussian(gt[0], stride, height, width, 1 / 6, truncate),
                               rtol=1e-4, atol=1e-12)
    assert m.shape == (2, height, width) and m[1].sum() == 0


@pytest.mark.parametrize("stride,height,width", GRIDS)
def test_box_mask_matches_naive_loop(stride, height, width):
    for seed, k in ((10, 40), (11, 9), (12, 1), (13, 0)):
        boxes = random_boxes(seed, k, stride, height, width)
        got = box_mask(boxes, stride, height, width)
        assert got.dtype == boxes.dtype
        assert torch.equal(got, ref_box(boxes, stride, height, width))
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True})
    gt = [torch.zeros((0, 4)), random_boxes(14, 30, stride, height, width), random_boxes(15, 5, stride, height, width)]
    m = build_masks("box", gt, {"p": (stride, height, width)}, cfg)["p"]
    assert m.shape == (3, height, width) and m[0].sum() == 0
    assert torch.equal(m[1], ref_box(gt[1], stride, height, width))
    assert torch.equal(m[2], ref_box(gt[2], stride, height, width))


def test_box_centre_cell_only_when_no_cell_centre_is_inside():
    # [2, 6) px at stride 4 = [0.5, 1.5) cells: cell 0's centre 0.5 is inside, cell 1's 1.5 is not; the box
    # centre (1, 1) lies in cell (1, 1), which is NOT marked: the box already holds a cell centre
    want = torch.zeros(3, 4)
    want[0, 0] = 1
    assert torch.equal(box_mask(torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 4, 3, 4), want)
    # no cell centre inside ([2.25, 2.75) x [0.25, 0.75) cells): the cell holding the centre, (0, 2)
    want = torch.zeros(3, 4)
    want[0, 2] = 1
    assert torch.equal(box_mask(torch.tensor([[9.0, 1.0, 11.0, 3.0]]), 4, 3, 4), want)
    # both boxes at once, and per box (membership): the second box does not add (1, 1) to the first
    both = torch.tensor([[2.0, 2.0, 6.0, 6.0], [9.0, 1.0, 11.0, 3.0]])
    member = masks_mod.box_membership(both, 4, 3, 4)
    assert member.sum(dim=(1, 2)).tolist() == [1, 1] and member[0, 0, 0] and member[1, 0, 2]


@pytest.mark.parametrize("stride,height,width", GRIDS)
def test_box_membership_and_area_balance_match_naive_loop(stride, height, width):
    """Per-box cells (``box`` rule), their union (= the binary mask) and the area-balanced weights
    (max over covering boxes of 1/area, rescaled to the foreground cell count) on overlapping boxes."""
    for seed, k in ((40, 30), (41, 6), (42, 1)):
        boxes = random_boxes(seed, k, stride, height, width)
        member = masks_mod.box_membership(boxes, stride, height, width)
        assert member.shape == (k, height, width)
        for box, m in zip((boxes / stride).tolist(), member):
            want = torch.zeros(height, width, dtype=torch.bool)
            for i, j in ref_box_cells(box, height, width):
                want[i, j] = True
            assert torch.equal(m, want), box
        assert torch.equal(member.any(dim=0).to(boxes.dtype), box_mask(boxes, stride, height, width))
        got = masks_mod.area_balanced_box_mask(boxes, stride, height, width)
        torch.testing.assert_close(got.double(), ref_area_balanced(boxes, stride, height, width), rtol=1e-5, atol=1e-6)
        assert torch.equal(got > 0, box_mask(boxes, stride, height, width) > 0)


@pytest.mark.parametrize("k,height,width", [(300, 200, 336), (37, 20, 30)])
def test_gaussian_chunking_does_not_change_the_result(monkeypatch, k, height, width):
    """Small chunk budgets (a few boxes per chunk, chunks not dividing K, one box per chunk
    on the small grid) give exactly the single-chunk max."""
    boxes = random_boxes(20, k, 4, height, width)
    budgets = (7 * height * width, 2**16 * 3 + 5) if k > 100 else (1, 5 * height * width - 1)
    for truncate in (True, False):
        monkeypatch.setattr(masks_mod, "GAUSSIAN_CHUNK_ELEMENTS", 2**40)  # one chunk
        monkeypatch.setattr(masks_mod, "GAUSSIAN_CPU_CHUNK_ELEMENTS", 2**40)
        whole = gaussian_mask(boxes, 4, height, width, truncate=truncate)
        assert whole.max() > 0.9
        for budget in budgets:
            monkeypatch.setattr(masks_mod, "GAUSSIAN_CHUNK_ELEMENTS", budget)
            assert torch.equal(gaussian_mask(boxes, 4, height, width, truncate=truncate), whole)


def test_gaussian_mask_never_allocates_boxes_times_grid():
    """Default budget: no allocation anywhere near (300, 200, 336) floats (80 MB)."""
    from torch.profiler import ProfilerActivity, profile

    boxes = random_boxes(21, 300, 4, 200, 336)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        gaussian_mask(boxes, 4, 200, 336)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= masks_mod.GAUSSIAN_CPU_CHUNK_ELEMENTS * 4 * 1.1
    assert masks_mod.GAUSSIAN_CPU_CHUNK_ELEMENTS <= masks_mod.GAUSSIAN_CHUNK_ELEMENTS <= 2**22


def test_masks_keep_box_dtype_and_make_no_host_syncs(monkeypatch):
    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True, "DEFEAT_CANONICAL_SIZE": 56.0})
    gt = [random_boxes(30, 20, 4, 32, 48).double(), torch.zeros((0, 4), dtype=torch.float64)]
    shapes = {"p2": (4, 32, 48), "p3": (8, 16, 24), "p4": (16, 8, 12)}

    def sync(*a, **k):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = {kind: build_masks(kind, gt, shapes, cfg) for kind in ("gaussian", "box", "defeat", "full")}
    out["backbone"] = masks_mod.defeat_backbone_masks(gt, shapes)
    monkeypatch.undo()
    for kind, m in out.items():
        for lv, (s, h, w) in shapes.items():
            assert m[lv].shape == (2, h, w) and m[lv].dtype == torch.float64, (kind, lv)
        assert sum(m[lv][0].sum() for lv in shapes) > 0, kind
