import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform

from distill_d2.losses import cls_kd_loss, kl_rows, masked_feature_loss, teacher_better_cls_gate
from distill_d2.methods.tar import box_kd_loss


def test_masked_feature_loss_fgfi_by_hand():
    s = {"p2": torch.zeros(1, 2, 2, 3), "p3": torch.zeros(1, 2, 1, 2)}  # H != W
    t = {"p2": torch.ones(1, 2, 2, 3), "p3": torch.full((1, 2, 1, 2), 2.0)}
    m = {"p2": torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.0, 0.25]]]), "p3": torch.tensor([[[1.0, 0.0]]])}
    # numerator: p2: (1 + 0.5 + 0.25) * 2 channels * 1^2 = 3.5; p3: 1 * 2 channels * 4 = 8 -> 11.5
    # denominator: 2 * (1.75 + 1) = 5.5
    assert masked_feature_loss(s, t, m, "fgfi").item() == pytest.approx(11.5 / 5.5, rel=1e-5)
    # mean: p2 3.5 / 12 elements, p3 8 / 4 -> (3.5 / 12 + 2) / 2
    assert masked_feature_loss(s, t, m, "mean").item() == pytest.approx((3.5 / 12 + 2) / 2, rel=1e-6)


def test_masked_feature_loss_zero_mask_is_zero_and_shape_mismatch_raises():
    s = {"p2": torch.randn(1, 2, 2, 2, requires_grad=True)}
    assert masked_feature_loss(s, {"p2": torch.randn(1, 2, 2, 2)}, {"p2": torch.zeros(1, 2, 2)}).item() == 0
    with pytest.raises(ValueError, match="p2"):
        masked_feature_loss(s, {"p2": torch.randn(1, 3, 2, 2)}, {"p2": torch.ones(1, 2, 2)})


def test_kl_rows_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_t = [0.75, 0.25], p_s = [0.5, 0.5]
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_rows(s, t, 1.0).item() == pytest.approx(want, rel=1e-5)
    # temperature 2: softmax of halved logits, times 4
    pt = torch.softmax(t / 2, 1)[0]
    want2 = 4 * float((pt * (pt / 0.5).log()).sum())
    assert kl_rows(s, t, 2.0).item() == pytest.approx(want2, rel=1e-5)


def test_cls_kd_positive_rois_and_teacher_better_gate():
    k = 2  # classes 0,1; background 2
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [0.0, 4.0, 0.0], [5.0, 0.0, 0.0]])
    gt = torch.tensor([0, 1, 2])  # third RoI is background
    rows = kl_rows(s, t)
    loss, frac = cls_kd_loss(s, t, gt, k)
    assert loss.item() == pytest.approx(float(rows[:2].sum() / 2), rel=1e-5) and frac == 1.0
    gate = teacher_better_cls_gate(s, t, gt)
    assert gate.tolist() == [False, True, False]  # RoI 0: teacher worse on gt class 0
    loss_g, frac_g = cls_kd_loss(s, t, gt, k, gate="teacher_better")
    assert loss_g.item() == pytest.approx(float(rows[1] / 2), rel=1e-5) and frac_g == 0.5
    loss_all, _ = cls_kd_loss(s, t, gt, k, rois="all")
    assert loss_all.item() == pytest.approx(float(rows.sum() / 3), rel=1e-5)


def _deltas_for(box, proposal, t):
    return t.get_deltas(torch.tensor([proposal]), torch.tensor([box]))[0]


def test_box_kd_gate_on_constructed_boxes():
    t = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    gt = [10.0, 10.0, 50.0, 50.0]
    props = torch.tensor([[12.0, 12.0, 52.0, 52.0], [10.0, 10.0, 50.0, 50.0], [0.0, 0.0, 20.0, 20.0]])
    gts = torch.tensor([gt, gt, gt])
    k = 2
    # class-specific deltas (R, 2*4); gt class 1 for RoIs 0,1 and background for RoI 2
    gt_classes = torch.tensor([1, 1, 2])
    dt = torch.zeros(3, 8)
    ds = torch.zeros(3, 8)
    dt[0, 4:] = _deltas_for(gt, props[0].tolist(), t)  # RoI 0: teacher decodes exactly onto gt -> better
    dt[1, 4:] = _deltas_for([14.0, 14.0, 50.0, 50.0], props[1].tolist(), t)  # RoI 1: proposal already exact -> worse
    ds[0, 4:] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    ds[1, 4:] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    loss, frac = box_kd_loss(ds, dt, props, gts, gt_classes, k, t, "teacher_vs_proposal", 0.0, "num_rois")
    want = float((ds[0, 4:] - dt[0, 4:]).abs().sum()) / 3  # only RoI 0 passes; divided by all 3 RoIs
    assert loss.item() == pytest.approx(want, rel=1e-5) and frac == 0.5
    loss_n, _ = box_kd_loss(ds, dt, props, gts, gt_classes, k, t, "teacher_vs_proposal", 0.0, "num_gated")
    assert loss_n.item() == pytest.approx(want * 3, rel=1e-5)
    loss_none, frac_none = box_kd_loss(ds, dt, props, gts, gt_classes, k, t, "none", 0.0, "num_rois")
    assert frac_none == 1.0
    assert loss_none.item() == pytest.approx(float((ds[:2, 4:] - dt[:2, 4:]).abs().sum()) / 3, rel=1e-5)
    # teacher_vs_student: student deltas of RoI 0 already decode exactly -> teacher not better there
    ds2 = ds.clone()
    ds2[0, 4:] = dt[0, 4:]
    ds2[1, 4:] = _deltas_for([30.0, 30.0, 60.0, 60.0], props[1].tolist(), t)  # student worse than teacher
    _, frac_s = box_kd_loss(ds2, dt, props, gts, gt_classes, k, t, "teacher_vs_student", 0.0, "num_rois")
    assert frac_s == 0.5


def test_box_kd_class_agnostic_and_no_positives():
    t = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    loss, frac = box_kd_loss(torch.ones(1, 4, requires_grad=True), torch.zeros(1, 4), props, props,
                             torch.tensor([3]), 3, t)
    assert loss.item() == 0 and frac == 0.0 and loss.requires_grad
    loss, _ = box_kd_loss(torch.ones(1, 4), torch.zeros(1, 4), props, props, torch.tensor([0]), 3, t, "none")
    assert loss.item() == pytest.approx(4.0)


def naive_kl(s, t, temp):
    ps, pt = [math.exp(v / temp) for v in s], [math.exp(v / temp) for v in t]
    zs, zt = sum(ps), sum(pt)
    return temp * temp * sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt))


def test_decoupled_kl_loss_means_per_group_by_hand():
    from distill_d2.methods.defeat import decoupled_kl_loss

    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.5, -1.0, 0.2]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1, 2])  # K = 2: fg rows 0, 3; bg rows 1, 2, 4
    rows = lambda idx, temp: [naive_kl(s[i].tolist(), t[i].tolist(), temp) for i in idx]  # noqa: E731
    fg, bg = decoupled_kl_loss(s, t, labels, 2, temperature=1.0, bg_temperature=3.0)
    assert fg.item() == pytest.approx(sum(rows([0, 3], 1.0)) / 2, rel=1e-5)
    assert bg.item() == pytest.approx(sum(rows([1, 2, 4], 3.0)) / 3, rel=1e-5)
    fg2, bg2 = decoupled_kl_loss(s, t, labels, 2, temperature=2.0)  # bg temperature <= 0 / None: the fg one
    assert bg2.item() == pytest.approx(sum(rows([1, 2, 4], 2.0)) / 3, rel=1e-5)
    only_bg = decoupled_kl_loss(s, t, torch.full((5,), 2), 2)
    assert only_bg[0].item() == 0 and only_bg[1].item() == pytest.approx(sum(rows(range(5), 1.0)) / 5, rel=1e-5)
