"""HGD (``HierarchicalFeatureKD``, our reconstruction): stage pairing from real configs, the
channel-normalised imitation against a naive loop, micro weights (fg/bg, per-box 1/area) and
macro weights (fixed, running mean) on hand-made tensors."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec

from distill_d2.methods.hgd import channel_normalized_loss
from distill_d2.masks import area_balanced_box_mask
from distill_d2.methods.hgd import HierarchicalFeatureKD
from distill_d2.errors import DistillConfigError
from distill_d2.terms import BuildContext
from test_methods import BOXES, SIZES, STRIDES, cfg_with, ctx, record


def hgd_term(**keys):
    keys.setdefault("HGD__LEVELS", ["p2", "p3"])
    keys.setdefault("HGD__ADAPTER", "conv1x1")
    cfg = cfg_with(**keys)
    return HierarchicalFeatureKD(cfg, ctx(cfg))


def naive_box_cells(box, s, h, w):
    """Cells of one box by the card's ``box`` rule: the cells whose centre is inside the box; only for a
    box holding no cell centre, the cell holding the box centre (clamped into the grid)."""
    x0, y0, x1, y1 = (v / s for v in box)
    cells = {(i, j) for i in range(h) for j in range(w) if x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1}
    if cells:
        return cells
    return {(min(max(math.floor((y0 + y1) / 2), 0), h - 1), min(max(math.floor((x0 + x1) / 2), 0), w - 1))}


def naive_weights(boxes, s, h, w, fg_w, bg_w, balance):
    cells = [naive_box_cells(b, s, h, w) for b in boxes.tolist()]
    fg = [[0.0] * w for _ in range(h)]
    for c in cells:
        for i, j in c:
            fg[i][j] = max(fg[i][j], 1.0 / len(c) if balance else 1.0)
    if balance:
        n_fg = sum(1 for row in fg for v in row if v > 0)
        tot = sum(sum(row) for row in fg)
        fg = [[v * n_fg / tot if tot else 0.0 for v in row] for row in fg]
    return [[fg_w * fg[i][j] + bg_w * (0.0 if fg[i][j] > 0 else 1.0) for j in range(w)] for i in range(h)]


# ------------------------------------------------------------------ pairing from real configs
@pytest.mark.parametrize("student,teacher,channels", [
    # R18 student (synthetic config, 128-channel FPN) <- R50 teacher (model-zoo config, 256-channel FPN)
    ("configs/synthetic/faster_rcnn_R18_student.yaml", "configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
     {"res2": (64, 256), "res3": (128, 512), "res4": (256, 1024), "res5": (512, 2048), "p2": (128, 256),
      "p6": (128, 256)}),
    # R50 <- R101: same channels everywhere
    ("configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "configs/COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
     {"res2": (256, 256), "res3": (512, 512), "res4": (1024, 1024), "res5": (2048, 2048), "p2": (256, 256)}),
])
def test_stage_pairing_and_adapter_channels_from_configs(student, teacher, channels, tmp_path):
    """Built from the configs on the meta device: no weights needed."""
    from detectron2.modeling import build_model

    from distill_d2.config import load_cfg

    cfg = load_cfg(student, ["MODEL.META_ARCHITECTURE", "DistillGeneralizedRCNN", "MODEL.DEVICE", "cpu",
                             "MODEL.WEIGHTS", "", "DISTILL.TEACHER.CONFIG_FILE", teacher,
                             "DISTILL.TEACHER.WEIGHTS", str(tmp_path / "unused.pth"),
                             "DISTILL.TERMS", "['HierarchicalFeatureKD']", "OUTPUT_DIR", str(tmp_path)], need_teacher=False)
    term = build_model(cfg).kd_terms["HierarchicalFeatureKD"]
    pairs = {lv: (stride, cs, ct) for lv, stride, cs, ct in term.pairs}
    assert list(pairs) == ["res2", "p2", "res3", "p3", "res4", "p4", "res5", "p5", "p6"]  # by stride
    for lv, (cs, ct) in channels.items():
        assert pairs[lv][1:] == (cs, ct)
        conv, bn = term.adapters[lv]
        assert (conv.in_channels, conv.out_channels, bn.num_features) == (cs, ct, ct)
    assert [pairs[lv][0] for lv in ("res2", "res3", "res4", "res5", "p6")] == [4, 8, 16, 32, 64]


def test_stage_with_another_stride_or_missing_is_an_error():
    cfg = cfg_with(HGD__LEVELS=["p2", "p3"])
    c = ctx(cfg)
    bad = BuildContext(**{**c.__dict__, "teacher_shapes": {**c.teacher_shapes, "p3": ShapeSpec(channels=2, stride=16)}})
    with pytest.raises(Exception, match="Stride mismatch.*p3"):
        HierarchicalFeatureKD(cfg, bad)
    cfg = cfg_with(HGD__LEVELS=["p2", "p9"])
    with pytest.raises(Exception, match="p9.*DISTILL.HGD.LEVELS"):
        HierarchicalFeatureKD(cfg, ctx(cfg))
    with pytest.raises(DistillConfigError, match="STAGE_WEIGHTS has 3 values for 2 stages"):
        hgd_term(HGD__MACRO="fixed", HGD__STAGE_WEIGHTS=[1.0, 2.0, 3.0])
    with pytest.raises(DistillConfigError, match="only used with MACRO 'fixed'"):
        hgd_term(HGD__STAGE_WEIGHTS=[1.0, 2.0])


# ------------------------------------------------------------------ imitation + micro weights
def test_channel_normalized_loss_hand_computed():
    s = torch.zeros(1, 2, 1, 2)
    t = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # channel 0: (1, 2), channel 1: (3, 0)
    w = torch.tensor([[[1.0, 0.5]]])
    # sum W d^2 = 1*(1+9) + 0.5*(4+0) = 12; C_t * sum W = 2 * 1.5 = 3
    assert channel_normalized_loss(s, t, w).item() == pytest.approx(12 / 3, rel=1e-6)
    # 64 vs 2048 channels of the same per-element error give the same loss
    a = channel_normalized_loss(torch.zeros(1, 64, 2, 2), torch.ones(1, 64, 2, 2), torch.ones(1, 2, 2))
    b = channel_normalized_loss(torch.zeros(1, 2048, 2, 2), torch.ones(1, 2048, 2, 2), torch.ones(1, 2, 2))
    assert a.item() == pytest.approx(1.0, rel=1e-6) and b.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("balance", [False, True])
def test_fixed_macro_matches_naive_loop(balance):
    term = hgd_term(HGD__FG_WEIGHT=2.0, HGD__BG_WEIGHT=0.25, HGD__AREA_BALANCE=balance, HGD__MACRO="fixed",
                    HGD__STAGE_WEIGHTS=[1.0, 3.0], HGD__WEIGHT=0.5)
    rec = record()
    got = term(rec)[0]["loss_kd_hgd"].item()
    per_stage = []
    for lv, sw in zip(["p2", "p3"], [1.0, 3.0]):
        h, w = SIZES[lv]
        a = term.adapters[lv](rec.features[lv])
        num = den = 0.0
        for n in range(2):
            wt = naive_weights(BOXES[n], STRIDES[lv], h, w, 2.0, 0.25, balance)
            for i in range(h):
                for j in range(w):
                    num += wt[i][j] * float(((a[n, :, i, j] - rec.t_features[lv][n, :, i, j]) ** 2).sum())
                    den += wt[i][j]
        per_stage.append(sw * num / (2 * den + 1e-6))  # C_t = 2
    assert got == pytest.approx(0.5 * sum(per_stage) / 2, rel=1e-5)


def test_area_balance_gives_every_box_the_same_weight():
    # at stride 8 on a 6 x 10 grid: 4 x 4 = 16 cells, 1 cell, and a sub-cell box (its centre's cell, (1, 8))
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [40.0, 40.0, 48.0, 48.0], [66.0, 9.0, 70.0, 13.0]])
    w = area_balanced_box_mask(boxes, 8, 6, 10)
    big, small, tiny = w[:4, :4].sum().item(), w[5, 5].item(), w[1, 8].item()
    assert big == pytest.approx(small, rel=1e-6) and tiny == pytest.approx(small, rel=1e-6)
    assert w.sum().item() == pytest.approx(18.0, rel=1e-6)  # total = the binary mask's 16 + 1 + 1 cells
    assert (w > 0).sum().item() == 18
    # overlapping boxes: a shared cell takes the larger of the two 1/area weights
    over = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 16.0, 16.0]])  # 4 cells and 1 cell, sharing (1, 1)
    w = area_balanced_box_mask(over, 8, 6, 10)
    raw = torch.zeros(6, 10)
    raw[:2, :2] = 0.25
    raw[1, 1] = 1.0
    assert torch.allclose(w, raw * 4 / raw.sum())
    assert area_balanced_box_mask(torch.zeros((0, 4)), 8, 6, 10).sum() == 0


# ------------------------------------------------------------------ macro: running means
def scaled_record(scales, seed=0):
    """A record whose stage errors differ by the factors ``scales`` (identity adapters)."""
    rec = record(cs=2, ct=2, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    for lv, k in scales.items():
        f = rec.features[lv]
        rec.t_features[lv] = f + k * torch.randn(f.shape, generator=g)
    return rec


def test_running_mean_macro_balances_stages():
    cfg = cfg_with(HGD__LEVELS=["p2", "p3"], HGD__ADAPTER="identity", HGD__MOMENTUM=0.9)
    term = HierarchicalFeatureKD(cfg, ctx(cfg, cs=2, ct=2))
    term.train()
    scales = {"p2": 1.0, "p3": 30.0}  # stage losses ~1 and ~900
    for step in range(40):  # warm-up on varying batches, then steady losses
        out, scalars = term(scaled_record(scales, seed=step if step < 10 else 10))
    raw = torch.stack([scalars["kd/hgd_p2"], scalars["kd/hgd_p3"]])
    c = torch.stack([scalars["kd/hgd_scale_p2"], scalars["kd/hgd_scale_p3"]])
    weighted = c * raw
    assert raw[1] / raw[0] > 100  # unbalanced before the macro weights
    assert (weighted.max() / weighted.min()).item() < 1.10  # after warm-up: within 10% of each other
    # the total keeps the raw scale: mean of the running means
    m = term.running
    assert out["loss_kd_hgd"].item() == pytest.approx((m.mean() / m * raw).mean().item(), rel=1e-5)
    before = term.running.clone()
    term.eval()  # explain/eval: no update
    term(scaled_record(scales, seed=99))
    assert torch.equal(term.running, before)


def test_running_mean_first_steps_hand_computed():
    cfg = cfg_with(HGD__LEVELS=["p2", "p3"], HGD__ADAPTER="identity", HGD__MOMENTUM=0.75)
    term = HierarchicalFeatureKD(cfg, ctx(cfg, cs=2, ct=2)).train()
    l1 = torch.tensor([2.0, 8.0])
    c = term.macro_scales(l1)  # m = 0.25 * l1 -> c = mean(m) / m
    assert c.tolist() == pytest.approx([5.0 / 2.0, 5.0 / 8.0])
    l2 = torch.tensor([4.0, 8.0])
    c = term.macro_scales(l2)  # m = 0.75 * 0.25 * l1 + 0.25 * l2
    m = 0.1875 * l1 + 0.25 * l2
    assert c.tolist() == pytest.approx((m.mean() / m).tolist())
    term.eval()
    assert term.macro_scales(torch.tensor([1.0, 1.0])).tolist() == pytest.approx((m.mean() / m).tolist())


def test_explain_shows_the_micro_weights():
    term = hgd_term(HGD__FG_WEIGHT=1.0, HGD__BG_WEIGHT=0.5)
    rec = record()
    maps = term.explain(rec)["maps"]["hgd_weight"]
    assert set(maps) == {"p2", "p3"}
    assert maps["p2"][1].unique().tolist() == [0.5]  # the image without gt: background only
    assert maps["p2"][0].max().item() == 1.0


def naive_bilinear(x, h2, w2):
    """(h2, w2) bilinear resize of a 2-D list ``x`` with half-pixel centres (align_corners False), edges clamped."""
    h, w = len(x), len(x[0])
    out = [[0.0] * w2 for _ in range(h2)]
    for i in range(h2):
        for j in range(w2):
            sy, sx = max((i + 0.5) * h / h2 - 0.5, 0.0), max((j + 0.5) * w / w2 - 0.5, 0.0)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            out[i][j] = ((1 - fy) * ((1 - fx) * x[y0][x0] + fx * x[y0][x1])
                         + fy * ((1 - fx) * x[y1][x0] + fx * x[y1][x1]))
    return out


def test_adapted_map_of_another_size_is_resized_bilinearly_to_the_teachers():
    """FeatureTerm.resize (HGD): a student stage of another spatial size (e.g. another stem) is resized to
    the teacher's grid with bilinear interpolation, half-pixel centres; the weights live on that grid."""
    term = hgd_term(HGD__LEVELS=["p3"])
    rec = record()
    rec.t_features["p3"] = torch.randn(2, 2, 6, 10)  # the teacher's p3: twice the student's (3, 5)
    a = term.adapted(rec)["p3"]
    assert a.shape == (2, 2, 6, 10)
    raw = term.adapters["p3"](rec.features["p3"])
    for n in range(2):
        for c in range(2):
            want = naive_bilinear(raw[n, c].tolist(), 6, 10)
            assert torch.allclose(a[n, c], torch.tensor(want), atol=1e-5)
    assert term.masks(rec)["p3"].shape == (2, 6, 10)
