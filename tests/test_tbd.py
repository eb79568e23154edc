"""TBD (our reconstruction): Harmony Score variants on constructed scores and IoUs, harmony
distillation against naive loops for both detector families, and the task-decoupled feature
masks (zero where the teacher is neither confident nor matched to a gt)."""
import math

import pytest
import torch
from detectron2.structures import Boxes

from distill_d2.methods.tbd import HarmonyClsKD, TaskDecoupledFeatureKD, harmony_score, per_location, with_gt_prob
from distill_d2.record import DenseRecord, StepRecord
from test_methods import K, cfg_with, ctx, dense_record, naive_decode, naive_iou, roi_record, sig


# ------------------------------------------------------------------ Harmony Score
@pytest.mark.parametrize("form,alpha,beta,s,u,want", [
    ("power", 0.5, 6.0, 0.64, 0.25, 0.4),  # sqrt(0.64 * 0.25)
    ("power", 0.25, 6.0, 0.0625, 1.0, 0.5),  # 0.0625^0.25 * 1^0.75
    ("power", 0.25, 6.0, 0.0625, 0.5, 0.5 * 0.5 ** 0.75),
    ("tood", 1.0, 6.0, 0.5, 0.9, 0.5 * 0.9 ** 6),
    ("agreement", 0.5, 6.0, 0.64, 0.25, 0.61),
    ("agreement", 0.5, 6.0, 0.3, 0.3, 1.0),
    ("power", 0.5, 6.0, 0.9, float("nan"), 0.0),  # degenerate box: IoU NaN reads as 0
    ("tood", 1.0, 6.0, 1.3, 0.5, 0.5 ** 6),  # scores clamped to [0, 1]
])
def test_harmony_score_variants(form, alpha, beta, s, u, want):
    got = harmony_score(torch.tensor([s]), torch.tensor([u]), form, alpha, beta)
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_unknown_form_is_an_error():
    with pytest.raises(ValueError, match="HS_FORM 'hm'"):
        harmony_score(torch.ones(1), torch.ones(1), "hm")
    cfg = cfg_with(TBD__HS_FORM="hm")
    with pytest.raises(ValueError, match="DISTILL.TBD.HS_FORM"):
        HarmonyClsKD(cfg, ctx(cfg))


def naive_hs(s, u, form="power", a=0.5, b=6.0):
    u = 0.0 if math.isnan(u) else u
    return {"power": s ** a * u ** (1 - a), "tood": s ** a * u ** b, "agreement": 1 - abs(s - u)}[form]


# ------------------------------------------------------------------ harmony distillation
def naive_softmax_probs(x, temp=1.0):
    e = [math.exp(v / temp) for v in x]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("form,bg,temp,target", [("power", 0.0, 1.0, False), ("tood", 0.5, 2.0, False),
                                                 ("agreement", 0.0, 1.0, True)])
def test_roi_harmony_kd_matches_naive_loop(form, bg, temp, target):
    cfg = cfg_with(TBD__HS_FORM=form, TBD__HS_ALPHA=1.0 if form == "tood" else 0.5, TBD__HD_BG_WEIGHT=bg,
                   TBD__TEMPERATURE=temp, TBD__HS_TARGET=target, TBD__HD_WEIGHT=0.7)
    rec = roi_record(seed=4)
    r = rec.rois
    losses, scalars = HarmonyClsKD(cfg, ctx(cfg))(rec)
    num = hs_sum = 0.0
    n_pos = 0
    for i in range(r.gt_classes.shape[0]):
        c = int(r.gt_classes[i])
        pt = naive_softmax_probs(r.t_logits[i].tolist(), temp)
        if c < K:
            s = naive_softmax_probs(r.t_logits[i].tolist())[c]
            d = r.t_deltas[i, 4 * c:4 * c + 4].tolist()
            u = naive_iou(naive_decode(d, r.proposal_boxes[i].tolist()), r.gt_boxes[i].tolist())
            hs = naive_hs(s, u, form, 1.0 if form == "tood" else 0.5)
            w, hs_sum, n_pos = hs, hs_sum + hs, n_pos + 1
            if target:  # gt class gets HS, the rest rescaled to 1 - HS
                pt = [hs if k == c else p * (1 - hs) / (1 - pt[c]) for k, p in enumerate(pt)]
        else:
            w = bg
        ps = naive_softmax_probs(r.logits[i].tolist(), temp)
        kl = temp * temp * sum(p * math.log(p / q) for p, q in zip(pt, ps) if p > 0)
        num += w * kl
    assert n_pos == 4
    assert losses["loss_kd_harmony"].item() == pytest.approx(0.7 * num / max(1.0, hs_sum), rel=1e-5)
    assert scalars["kd/harmony_mean"].item() == pytest.approx(hs_sum / n_pos, rel=1e-5)


@pytest.mark.parametrize("bg,target", [(1.0, False), (0.0, True)])
def test_dense_harmony_kd_matches_naive_loop(bg, target):
    cfg = cfg_with(TBD__HD_BG_WEIGHT=bg, TBD__HS_TARGET=target, TBD__TEMPERATURE=1.0)
    rec = dense_record(seed=2)
    d = rec.dense
    losses, _ = HarmonyClsKD(cfg, ctx(cfg, "dense"))(rec)
    num = hs_sum = 0.0
    for n in range(2):
        for a in range(d.labels.shape[1]):
            lab = int(d.labels[n, a])
            if lab < 0:
                continue  # ignored anchors weigh 0
            pt = [sig(float(v)) for v in d.t_logits[n, a]]
            if lab < K:
                u = naive_iou(naive_decode(d.t_deltas[n, a].tolist(), d.anchors[a].tolist()), d.gt_boxes[n, a].tolist())
                w = naive_hs(pt[lab], u)
                hs_sum += w
                if target:
                    pt[lab] = w
            else:
                w = bg
            kl = 0.0
            for k in range(K):
                p, q = pt[k], sig(float(d.logits[n, a, k]))
                kl += (p * math.log(p / q) if p > 0 else 0.0) + (1 - p) * math.log((1 - p) / (1 - q))
            num += w * kl
    assert hs_sum > 0
    assert losses["loss_kd_harmony"].item() == pytest.approx(num / max(1.0, hs_sum), rel=1e-5)


def test_with_gt_prob_sums_to_one():
    probs = torch.softmax(torch.randn(4, 5), dim=1)
    cls = torch.tensor([0, 2, 4, 1])
    val = torch.tensor([0.9, 0.1, 0.5, 0.3])
    pos = torch.tensor([True, True, False, True])
    out = with_gt_prob(probs, cls, val, pos)
    assert out.sum(1).tolist() == pytest.approx([1.0] * 4)
    assert out[[0, 1, 3], [0, 2, 1]].tolist() == pytest.approx([0.9, 0.1, 0.3])
    assert torch.equal(out[2], probs[2])


# ------------------------------------------------------------------ task-decoupled feature masks
GRID_H, GRID_W, GRID_A = 2, 3, 2  # grid_dense_record's level: H != W


def anchor_index(y, x, a, w=GRID_W, num_anchors=GRID_A):
    """Index of anchor a of cell (y, x) in detectron2's per-level order (H, W, A)."""
    return (y * w + x) * num_anchors + a


def grid_dense_record():
    """RetinaNet-like record on one level 'p3' of 2 x 3 cells, A = 2 anchors per cell, K = 3, 2 images."""
    n, h, w, a = 2, GRID_H, GRID_W, GRID_A
    r = h * w * a
    # anchor a of cell (y, x): [8x, 8y, 8x + 8(a + 1), 8y + 8] (stride 8)
    anchors = torch.tensor([[8 * x, 8 * y, 8 * x + 8 * (k + 1), 8 * y + 8] for y in range(h) for x in range(w)
                            for k in range(a)], dtype=torch.float)
    labels = torch.full((n, r), K)  # background
    labels[0, anchor_index(0, 1, 1)] = 2  # image 0: anchor 1 of cell (0, 1) matched to a gt
    labels[0, anchor_index(1, 1, 0)] = -1  # ignored
    gt = anchors[None].repeat(n, 1, 1) + 1.0
    t_logits = torch.full((n, r, K), -10.0)  # not confident anywhere ...
    t_logits[1, anchor_index(1, 2, 1), 0] = 3.0  # ... but image 1, anchor 1 of cell (1, 2): sigmoid(3) = 0.95
    t_deltas = torch.zeros(n, r, 4)
    from detectron2.modeling.box_regression import Box2BoxTransform

    dense = DenseRecord(anchors=anchors, labels=labels, gt_boxes=gt, logits=None, deltas=None, t_logits=t_logits,
                        t_deltas=t_deltas, num_classes=K, box2box_transform=Box2BoxTransform((1.0, 1.0, 1.0, 1.0)))
    # (the record's "dense_level_sizes" entry, which a detector's record computes from its head: given here)
    return StepRecord(images=None, t_images=None, gt_instances=[], features={"p3": torch.zeros(n, 3, h, w)},
                      t_features={"p3": torch.zeros(n, 3, h, w)}, strides={"p3": 8}, dense=dense,
                      cache={"dense_level_sizes": {"p3": (h, w, a)}})


def dense_tfd_term(**keys):
    """TaskDecoupledFeatureKD for a RetinaNet pair whose head reads only 'p3' (grid_dense_record)."""
    cfg = cfg_with(TBD__LEVELS=["p3"], **keys)
    c = ctx(cfg, "dense")
    c.teacher_cfg.MODEL.RETINANET.IN_FEATURES = ["p3"]
    return TaskDecoupledFeatureKD(cfg, c)


def test_tfd_masks_zero_where_teacher_not_confident_and_no_gt():
    term = dense_tfd_term(TBD__CONF_THRESH=0.05, TBD__CLS_MASK_WEIGHT=2.0, TBD__REG_MASK_WEIGHT=0.5)
    rec = grid_dense_record()
    m_cls, m_reg = term.task_masks(rec)
    iou = naive_iou([8, 0, 24, 8], [9, 1, 25, 9])  # zero deltas: the decoded box is the anchor
    want_reg, want_cls = torch.zeros(2, GRID_H, GRID_W), torch.zeros(2, GRID_H, GRID_W)
    want_reg[0, 0, 1] = iou  # image 0, cell (0, 1)
    want_cls[1, 1, 2] = sig(3.0)  # image 1, cell (1, 2)
    assert torch.allclose(m_reg["p3"], want_reg) and torch.allclose(m_cls["p3"], want_cls)
    m = term.masks(rec)["p3"]
    assert torch.allclose(m, 0.5 * want_reg + 2.0 * want_cls)
    assert (m == 0).sum().item() == 2 * GRID_H * GRID_W - 2  # everywhere else exactly zero
    # a confident location below the threshold is dropped
    term = dense_tfd_term(TBD__CONF_THRESH=0.99)
    assert term.task_masks(rec)[0]["p3"].sum().item() == 0


def test_per_location_takes_the_max_over_anchors_in_detectron2_order():
    v = torch.arange(16.0).view(1, 16)  # level a: 2 x 3 cells x A = 2 (values 0..11); level b: 1 x 2 x 2
    out = per_location(v, {"a": (2, 3, 2), "b": (1, 2, 2)})
    assert out["a"].tolist() == [[[1.0, 3.0, 5.0], [7.0, 9.0, 11.0]]]
    assert out["b"].tolist() == [[[13.0, 15.0]]]


def test_tfd_levels_must_be_the_teacher_head_inputs():
    from distill_d2.errors import DistillConfigError

    cfg = cfg_with(TBD__LEVELS=["res2"])
    with pytest.raises(DistillConfigError, match="RPN, which sees only"):
        TaskDecoupledFeatureKD(cfg, ctx(cfg))


def test_tfd_rcnn_uses_the_teacher_rpn(make_ckpt):
    """Faster R-CNN: M_cls from the teacher RPN's objectness, M_reg only at anchors its matcher
    assigns to a gt; with no gt and an unreachable threshold the mask is zero."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from conftest import tiny_cfg
    from test_regression import fixed_batch

    cfg = tiny_cfg("tbd_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", make_ckpt("faster_rcnn_R34_teacher.yaml"),
                   "DISTILL.GUARD.ACTION", "off")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.setup_teacher()
    batch = fixed_batch(cfg)
    rpn = model.teacher.proposal_generator
    def small_deltas(module, inputs, out):
        """A random teacher's boxes miss every gt: small deltas that vary by anchor, coordinate, row
        and column (not symmetric in rows and columns), so decoded boxes stay near their anchors."""
        logits, deltas = out
        new = []
        for d in deltas:
            n, c, h, w = d.shape
            ch = torch.linspace(0.2, 1.0, c).view(1, c, 1, 1)
            yx = (torch.arange(h).view(1, 1, h, 1) - 2.0 * torch.arange(w).view(1, 1, 1, w)) / max(h, w)
            new.append((0.1 * ch * yx).expand(n, c, h, w).contiguous())
        return logits, new

    rpn.rpn_head.register_forward_hook(small_deltas)
    with EventStorage(), torch.no_grad():
        model.train()
        rec = model.record_step(batch)
    term = model.kd_terms["TaskDecoupledFeatureKD"]
    m_cls, m_reg = term.task_masks(rec)
    for lv in term.levels:
        assert m_cls[lv].shape == rec.features[lv].shape[:1] + rec.features[lv].shape[2:]
        assert (m_reg[lv] >= 0).all() and (m_reg[lv] <= 1).all()
    # M_reg is nonzero somewhere exactly for the images with gt (a matched anchor: IoU >= 0.3)
    has_gt = [len(b) > 0 for b in rec.gt_boxes]
    total = sum(m_reg[lv].sum(dim=(1, 2)) for lv in term.levels)
    assert all((t > 0) == g for t, g in zip(total.tolist(), has_gt)) and any(has_gt)
    # naive check of M_cls on the coarsest level: max over anchors of sigmoid(objectness)
    lv = term.levels[-1]
    obj = rpn.rpn_head([rec.t_features[f] for f in rpn.in_features])[0][rpn.in_features.index(lv)]
    want = torch.sigmoid(obj).amax(dim=1)
    want = torch.where(want >= cfg.DISTILL.TBD.CONF_THRESH, want, torch.zeros_like(want))
    assert torch.allclose(m_cls[lv], want, atol=1e-6)
    # M_reg by a naive loop on every level: IoU of the decoded box with the matched gt
    from detectron2.structures import pairwise_iou

    i = has_gt.index(True)
    anchors = rpn.anchor_generator([rec.t_features[f] for f in rpn.in_features])
    all_anchors = Boxes.cat(anchors)
    matched, labels = rpn.anchor_matcher(pairwise_iou(Boxes(rec.gt_boxes[i]), all_anchors))
    assert sum(check_reg_cells(rpn, rec, anchors, matched, labels, i, lv, m_reg) for lv in term.levels) > 0


def check_reg_cells(rpn, rec, anchors, matched, labels, i, lv, m_reg):
    li = rpn.in_features.index(lv)
    offset = sum(len(a) for a in anchors[:li])
    deltas = rpn.rpn_head([rec.t_features[f] for f in rpn.in_features])[1][li][i]  # (A*4, H, W)
    a_per = deltas.shape[0] // 4
    h, w = deltas.shape[-2:]
    nonzero = 0
    for y in range(h):
        for x in range(w):
            best = 0.0
            for a in range(a_per):
                idx = offset + (y * w + x) * a_per + a
                if labels[idx] != 1:
                    continue
                d = deltas[4 * a:4 * a + 4, y, x]
                box = rpn.box2box_transform.apply_deltas(d[None], anchors[li].tensor[idx - offset][None])[0]
                best = max(best, naive_iou(box.tolist(), rec.gt_boxes[i][matched[idx]].tolist()))
            assert m_reg[lv][i, y, x].item() == pytest.approx(best, abs=1e-5)
            nonzero += best > 0
    return nonzero


def test_tfd_loss_matches_naive_loop():
    """loss_kd_tfd = FEAT_WEIGHT * sum M d^2 / (2 sum M + eps), d = adapter(S) - T, channels summed."""
    term = dense_tfd_term(TBD__FEAT_WEIGHT=0.3, TBD__CLS_MASK_WEIGHT=2.0, TBD__REG_MASK_WEIGHT=0.5)
    rec = grid_dense_record()
    g = torch.Generator().manual_seed(0)
    rec.features = {"p3": torch.randn(2, 3, GRID_H, GRID_W, generator=g)}
    rec.t_features = {"p3": torch.randn(2, 2, GRID_H, GRID_W, generator=g)}
    got = term(rec)[0]["loss_kd_tfd"].item()
    m = term.masks(rec)["p3"]
    a = term.adapters["p3"](rec.features["p3"])
    num = den = 0.0
    for n in range(2):
        for i in range(GRID_H):
            for j in range(GRID_W):
                num += float(m[n, i, j]) * sum((float(a[n, k, i, j]) - float(rec.t_features["p3"][n, k, i, j])) ** 2
                                               for k in range(2))
                den += float(m[n, i, j])
    assert den > 0
    assert got == pytest.approx(0.3 * num / (2 * den + 1e-6), rel=1e-5)
