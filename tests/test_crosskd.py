"""CrossKD (distill_d2/methods/crosskd.py): the formulas against naive loops, the split point, the
tails check, and where the gradient of the cross pass goes on real tiny models."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from conftest import in_processes, tiny_cfg
from distill_d2.errors import DistillConfigError, TeacherError
from distill_d2.methods.crosskd import (align_scale, quality_focal_kd, roi_cross_losses, weighted_giou_kd)
from distill_d2.record import CrossPass, Tap
from test_distill_rcnn import batches

RETINA = ("crosskd_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml")
FRCNN = ("crosskd_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml")


def sig(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------ formulas
def test_align_scale_against_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 1  # H != W
    t = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 0.5 - 2
    out = align_scale(s, t, "local")
    for c in range(3):
        def moments(x):
            vals = [float(x[n, c, i, j]) for n in range(2) for i in range(4) for j in range(5)]
            m = sum(vals) / len(vals)
            return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))  # unbiased
        (ms, ss), (mt, st) = moments(s), moments(t)
        for n, i, j in [(0, 0, 0), (1, 3, 4), (0, 2, 1)]:
            want = (float(s[n, c, i, j]) - ms) / (ss + 1e-6) * st + mt
            assert float(out[n, c, i, j]) == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert out.dtype == torch.float32  # computed in float32 (AMP-safe)
    const = align_scale(torch.full((1, 2, 3, 2), 4.0), t[:1, :2, :3, :2], "local")  # zero std: finite
    assert torch.isfinite(const).all()


def test_quality_focal_kd_against_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    valid = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    for beta in (1.0, 2.0):
        want = 0.0
        for n in range(2):
            for r in range(5):
                if not valid[n, r]:
                    continue
                for k in range(3):
                    p, q = sig(float(t[n, r, k])), sig(float(x[n, r, k]))
                    bce = -(p * math.log(q) + (1 - p) * math.log(1 - q))
                    want += bce * abs(q - p) ** beta
        assert quality_focal_kd(x, t, valid, beta).item() == pytest.approx(want, rel=1e-5)


def naive_decode(d, a):
    """(x1, y1, x2, y2) of deltas (dx, dy, dw, dh) on anchor a with weights (1, 1, 1, 1)."""
    w, h = a[2] - a[0], a[3] - a[1]
    cx, cy = a[0] + w / 2 + d[0] * w, a[1] + h / 2 + d[1] * h
    pw, ph = math.exp(d[2]) * w, math.exp(d[3]) * h
    return cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2


def naive_giou(a, b):
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_weighted_giou_kd_against_a_naive_loop():
    g = torch.Generator().manual_seed(2)
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 2.0, 20.0, 10.0], [30.0, 30.0, 34.0, 46.0]])
    d, td = torch.randn(2, 3, 4, generator=g) * 0.5, torch.randn(2, 3, 4, generator=g) * 0.5
    tl = torch.randn(2, 3, 4, generator=g)
    valid = torch.tensor([[True, True, False], [False, True, True]])
    want = 0.0
    for n in range(2):
        for r in range(3):
            if valid[n, r]:
                w = max(sig(float(v)) for v in tl[n, r])
                a = anchors[r].tolist()
                want += w * (1 - naive_giou(naive_decode(d[n, r].tolist(), a), naive_decode(td[n, r].tolist(), a)))
    got = weighted_giou_kd(d, td, tl, anchors, valid, Box2BoxTransform((1.0, 1.0, 1.0, 1.0)))
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("agnostic", [False, True])
def test_roi_cross_losses_against_a_naive_loop(agnostic):
    g = torch.Generator().manual_seed(3)
    r, k, temp = 5, 3, 3.0
    x, t = torch.randn(r, k + 1, generator=g), torch.randn(r, k + 1, generator=g)
    t[2, k] = 6.0  # a RoI the teacher calls background: still weighted by its best foreground class
    cols = 4 if agnostic else 4 * k
    dx, dt = torch.randn(r, cols, generator=g), torch.randn(r, cols, generator=g)
    cls, reg = roi_cross_losses(x, dx, t, dt, k, temp)
    kl = num = den = 0.0
    for i in range(r):
        def soft(v, tt):
            e = [math.exp(float(z) / tt) for z in v]
            return [z / sum(e) for z in e]
        p, q = soft(t[i], temp), soft(x[i], temp)
        kl += temp * temp * sum(a * math.log(a / b) for a, b in zip(p, q))
        pt = soft(t[i], 1.0)[:k]
        c = max(range(k), key=lambda j: pt[j])
        lo = 0 if agnostic else 4 * c
        num += pt[c] * sum(abs(float(dx[i, lo + j] - dt[i, lo + j])) for j in range(4))
        den += 4 * pt[c]
    assert cls.item() == pytest.approx(kl / r, rel=1e-5)
    assert reg.item() == pytest.approx(num / den, rel=1e-5)


# ------------------------------------------------------------------ split point and checks
def build(pair, make_ckpt, *opts):
    preset, teacher = pair
    return build_model(tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher), *opts))


def test_split_point_from_num_convs_and_norm(make_ckpt):
    """Student head: 2 GN convs; teacher: 4. Default: the teacher's last conv is reused, so the student's
    output after its 1st conv (GN, before the ReLU: subnet index 1) crosses at the teacher's ReLU after its
    3rd conv (index 8)."""
    model = build(RETINA, make_ckpt)
    crosses = sorted((c for c in model.needs if isinstance(c, CrossPass)), key=lambda c: c.branch)
    assert [(c.branch, c.tap.path, c.start) for c in crosses] == [("bbox", "head.bbox_subnet.1", 8),
                                                                 ("cls", "head.cls_subnet.1", 8)]
    assert Tap("teacher", "head.cls_subnet.7") in model.needs
    same = build(RETINA, make_ckpt, "DISTILL.CROSSKD.REUSED_HEAD_IDX", "3")  # = -1 for a 4-conv teacher
    assert {str(c) for c in same.needs} == {str(c) for c in model.needs}
    with pytest.raises(DistillConfigError, match=r"replaces the last 2 head convs, but the student's head has only 2"):
        build(RETINA, make_ckpt, "DISTILL.CROSSKD.REUSED_HEAD_IDX", "2")
    for idx in ("4", "0"):
        with pytest.raises(DistillConfigError, match=r"teacher's head has 4 convs"):
            build(RETINA, make_ckpt, "DISTILL.CROSSKD.REUSED_HEAD_IDX", idx)


def test_tails_that_differ_are_named(make_ckpt):
    with pytest.raises(TeacherError, match=r"MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION: student 7, teacher 5"):
        build(FRCNN, make_ckpt, "DISTILL.TEACHER.OPTS", "['MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION', '5']",
              "DISTILL.TEACHER.STRICT_LOAD", "False")
    with pytest.raises(TeacherError, match=r"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS: student"):
        build(RETINA, make_ckpt, "DISTILL.TEACHER.OPTS", "['MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS', '[[1.0]]']")


# ------------------------------------------------------------------ where the gradient goes
def kd_grads(model, cfg_pair, make_ckpt):
    cfg = tiny_cfg(cfg_pair[0], "DISTILL.TEACHER.WEIGHTS", make_ckpt(cfg_pair[1]))
    model.train()
    with EventStorage():
        losses = model(batches(cfg, 1)[0])
    kd = losses["loss_kd_cross_cls"] + losses["loss_kd_cross_reg"]
    assert torch.isfinite(kd) and kd > 0
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(kd, list(named.values()), allow_unused=True)
    return {n for n, g in zip(named, grads) if g is not None and g.abs().sum() > 0}


def test_retinanet_cross_pass_reaches_the_early_head_not_its_tail_nor_the_teacher(make_ckpt):
    model = build(RETINA, make_ckpt)
    reached = kd_grads(model, RETINA, make_ckpt)
    assert {"head.cls_subnet.0.weight", "head.bbox_subnet.0.weight", "backbone.fpn_output3.weight",
            "backbone.bottom_up.res3.0.conv1.weight"} <= reached
    # the student's own layers after the tap (its 2nd conv + norm) and its predictors get no KD gradient
    assert not reached & {"head.cls_subnet.3.weight", "head.cls_subnet.4.weight", "head.bbox_subnet.3.weight",
                          "head.cls_score.weight", "head.bbox_pred.weight"}
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_faster_rcnn_cross_pass_reaches_the_fpn_not_the_box_head_nor_the_teacher(make_ckpt):
    model = build(FRCNN, make_ckpt)
    reached = kd_grads(model, FRCNN, make_ckpt)
    assert {"backbone.fpn_output2.weight", "backbone.bottom_up.res2.0.conv1.weight"} <= reached
    assert not any(n.startswith(("roi_heads.", "proposal_generator.")) for n in reached)
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


# ------------------------------------------------------------------ 1 vs 2 processes
def _align_own_half(rank, world):
    """align_scale(..., "global") of this process's 2 of the 4 images, as a list."""
    s, t = _halves()
    return align_scale(s[2 * rank:2 * rank + 2], t[2 * rank:2 * rank + 2], "global").tolist()


def _halves():
    g = torch.Generator().manual_seed(4)
    return torch.randn(4, 3, 2, 5, generator=g) * 2 + 1, torch.randn(4, 3, 2, 5, generator=g)


def test_global_statistics_are_those_of_the_whole_batch_on_two_processes():
    """STATS global: 2 processes with 2 images each standardise with the 4-image moments (values equal the
    single-process ones). (The gradient flows through each process's own share of the moments only.)"""
    got = in_processes(_align_own_half)
    s, t = _halves()
    one = align_scale(s, t, "global")
    assert torch.allclose(torch.tensor(got[0] + got[1]), one, atol=1e-5)
    assert not torch.allclose(align_scale(s[:2], t[:2], "local"), one[:2], atol=1e-3)  # the halves' own differ


def test_retinanet_forward_puts_the_pieces_together(make_ckpt):
    """DenseCrossKD.forward on a recorded step = the formulas on the cross outputs laid out anchor by anchor
    (detectron2's (H, W, A) order, levels concatenated), over the anchors the matcher did not ignore, divided
    by the student's loss normaliser of the step (NORMALIZER num_pos: by the foreground count)."""
    for normalizer in ("loss_normalizer", "num_pos"):
        model = build(RETINA, make_ckpt, "DISTILL.CROSSKD.NORMALIZER", normalizer)
        cfg = tiny_cfg(RETINA[0], "DISTILL.TEACHER.WEIGHTS", make_ckpt(RETINA[1]))
        model.train()
        with EventStorage(), torch.no_grad():
            rec = model.record_step(batches(cfg, 1)[0])
            term = model.kd_terms["CrossKD"]
            losses, _ = term(rec)
        d = rec.get("heads")
        assert (d.labels == -1).any() and (d.labels >= 0).any()  # ignored anchors present
        k = d.num_classes

        def layout(maps, c):
            return torch.cat([x.view(x.shape[0], -1, c, *x.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(x.shape[0], -1, c)
                              for x in maps], dim=1)

        logits, deltas = layout(rec.get(term.cross["cls"]), k), layout(rec.get(term.cross["bbox"]), 4)
        valid = d.labels >= 0
        den = d.loss_normalizer if normalizer == "loss_normalizer" else max(float(d.num_pos), 1.0)
        assert d.loss_normalizer == pytest.approx(model.loss_normalizer)
        want_cls = quality_focal_kd(logits, d.t_logits, valid, 1.0) / den
        want_reg = weighted_giou_kd(deltas, d.t_deltas, d.t_logits, d.anchors, valid, d.box2box_transform) / den
        assert losses["loss_kd_cross_cls"].item() == pytest.approx(want_cls.item(), rel=1e-5)
        assert losses["loss_kd_cross_reg"].item() == pytest.approx(want_reg.item(), rel=1e-5)
