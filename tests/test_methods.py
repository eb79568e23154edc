"""Every registered term against a naive per-element loop on small hand-made records.

Terms are built directly from a config and a BuildContext with small shapes
(no detector), fed a StepRecord of random tensors, and compared with plain
Python loops written from the formulas in docs/METHODS.md. Edge cases: maps
with H != W on every level, an image without gt, overlapping boxes, boxes on
the border, partly outside and smaller than a cell, a single RoI.
"""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances

from distill_d2.config import add_distill_config
from distill_d2.methods.defeat import DecoupledBackboneKD, DecoupledFeatureKD
from distill_d2.methods.generic import DenseClsKD, FeatureKD, RoIClsKD
from distill_d2.methods.tar import DenseBoxKD, RoIBoxKD
from distill_d2.record import DenseRecord, RoIRecord, StepRecord
from distill_d2.terms import BuildContext

# two images of 24 x 40 px (H x W, padded); p2/res2 stride 4: 6 x 10 cells, p3/res3 stride 8: 3 x 5 cells
# (H != W on every level, so a swapped axis shows); C = 3 student, 2 teacher channels
IMAGE_HW = (24, 40)
STRIDES = {"p2": 4, "p3": 8, "res2": 4, "res3": 8}
SIZES = {"p2": (6, 10), "p3": (3, 5), "res2": (6, 10), "res3": (3, 5)}  # (H, W)
BOXES = [
    torch.tensor([[2.0, 3.0, 14.0, 9.0],      # small box inside
                  [8.0, 5.0, 30.0, 21.0],     # overlaps the first (DeFeat: the next level at canonical size 8)
                  [28.0, 16.0, 40.0, 24.0],   # on the bottom-right border
                  [-6.0, 10.0, 5.0, 30.0],    # partly outside (negative x, beyond the bottom)
                  [17.0, 1.0, 18.5, 2.5]]),   # smaller than a cell (holds no cell centre at stride 4)
    torch.zeros((0, 4)),                      # an image without gt
]


def cfg_with(**keys):
    cfg = get_cfg()
    add_distill_config(cfg)
    for k, v in keys.items():
        node = cfg.DISTILL
        parts = k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return cfg


def ctx(cfg, family="rcnn", cs=3, ct=2):
    s = {k: ShapeSpec(channels=cs, stride=v) for k, v in STRIDES.items()}
    t = {k: ShapeSpec(channels=ct, stride=v) for k, v in STRIDES.items()}
    return BuildContext(cfg=cfg, teacher_cfg=cfg, family=family, teacher_family=family, student_shapes=s,
                        teacher_shapes=t, student=None)


def record(cs=3, ct=2, seed=0, boxes=BOXES):
    g = torch.Generator().manual_seed(seed)
    n = len(boxes)
    feats = {k: torch.randn(n, cs, h, w, generator=g) for k, (h, w) in SIZES.items()}
    t_feats = {k: torch.randn(n, ct, h, w, generator=g) for k, (h, w) in SIZES.items()}
    gts = []
    for b in boxes:
        inst = Instances(IMAGE_HW)
        inst.gt_boxes = Boxes(b)
        inst.gt_classes = torch.zeros(len(b), dtype=torch.long)
        gts.append(inst)
    return StepRecord(images=None, t_images=None, gt_instances=gts, features=feats,
                      t_features=t_feats, strides=dict(STRIDES))


def conv1x1_naive(adapter, x, n, i, j):
    """Adapter output at (n, :, i, j) by an explicit sum over input channels."""
    w, b = adapter.weight[:, :, 0, 0], adapter.bias
    return [float(b[o] + sum(w[o, c] * x[n, c, i, j] for c in range(x.shape[1]))) for o in range(w.shape[0])]


# ------------------------------------------------------------------ naive masks
def naive_gaussian(boxes, s, h, w, rho=1 / 6):
    m = [[0.0] * w for _ in range(h)]
    for x0, y0, x1, y1 in boxes.tolist():
        bx0, by0, bx1, by1 = x0 / s, y0 / s, x1 / s, y1 / s
        cx, cy, bw, bh = (bx0 + bx1) / 2, (by0 + by1) / 2, max(bx1 - bx0, 1e-3), max(by1 - by0, 1e-3)
        for i in range(h):
            for j in range(w):
                px, py = j + 0.5, i + 0.5
                if not (bx0 <= px < bx1 and by0 <= py < by1):
                    continue
                g = math.exp(-((px - cx) ** 2 / (2 * (rho * bw) ** 2) + (py - cy) ** 2 / (2 * (rho * bh) ** 2)))
                m[i][j] = max(m[i][j], g)
    return m


def naive_floor(boxes, s, h, w):
    """DeFeat floor rule with negative coordinates clamped at 0."""
    m = [[0.0] * w for _ in range(h)]
    for x0, y0, x1, y1 in boxes.tolist():
        c0, r0, c1, r1 = (math.floor(v / s) for v in (x0, y0, x1, y1))
        if c1 <= c0 or r1 <= r0:
            m[min(max(r0, 0), h - 1)][min(max(c0, 0), w - 1)] = 1.0
            continue
        for i in range(max(r0, 0), min(r1, h)):
            for j in range(max(c0, 0), min(c1, w)):
                m[i][j] = 1.0
    return m


def naive_defeat_level(box, num_levels, canonical=56.0):
    w, h = box[2] - box[0], box[3] - box[1]
    return min(max(math.floor(math.log2(math.sqrt((w + 1) * (h + 1)) / canonical + 1e-6)), 0), num_levels - 1)


# ------------------------------------------------------------------ feature terms
@pytest.mark.parametrize("norm", ["fgfi", "mean"])
def test_feature_kd_matches_naive_loop(norm):
    cfg = cfg_with(FEAT__LEVELS=["p3", "p2"], FEAT__NORM=norm, FEAT__WEIGHT=0.5)  # order: finest first
    term = FeatureKD(cfg, ctx(cfg))
    assert term.levels == ["p2", "p3"]
    rec = record()
    got = term(rec)[0]["loss_kd_feat"].item()
    num = den = 0.0
    means = []
    for lv in term.levels:
        s, t = rec.features[lv], rec.t_features[lv]
        h, w = SIZES[lv]
        se = 0.0
        for n in range(2):
            m = naive_gaussian(BOXES[n], STRIDES[lv], h, w)
            for i in range(h):
                for j in range(w):
                    a = conv1x1_naive(term.adapters[lv], s, n, i, j)
                    se += m[i][j] * sum((a[c] - float(t[n, c, i, j])) ** 2 for c in range(2))
                    den += m[i][j]
        num += se
        means.append(se / t.numel())
    want = num / (2 * den + 1e-6) if norm == "fgfi" else sum(means) / len(means)
    assert got == pytest.approx(0.5 * want, rel=1e-4)


def test_feature_kd_zero_without_gt_and_full_mask_covers_padding():
    cfg = cfg_with(FEAT__LEVELS=["p2"])
    term = FeatureKD(cfg, ctx(cfg))
    empty = record(boxes=[torch.zeros((0, 4)), torch.zeros((0, 4))])
    assert term(empty)[0]["loss_kd_feat"].item() == 0
    cfg = cfg_with(FEAT__LEVELS=["p2"], FEAT__MASK="full", FEAT__NORM="mean")
    term = FeatureKD(cfg, ctx(cfg))
    rec = record(boxes=[torch.zeros((0, 4)), torch.zeros((0, 4))])
    a = term.adapters["p2"](rec.features["p2"])
    assert term(rec)[0]["loss_kd_feat"].item() == pytest.approx(float(((a - rec.t_features["p2"]) ** 2).mean()),
                                                                rel=1e-5)


def test_decoupled_feature_kd_matches_naive_loop():
    cfg = cfg_with(FEAT__LEVELS=["p2", "p3"], FEAT__MASK="defeat", DEFEAT__FG_WEIGHT=3.0, DEFEAT__BG_WEIGHT=12.0,
                   FEAT__WEIGHT=2.0, FEAT__DEFEAT_CANONICAL_SIZE=8.0)
    term = DecoupledFeatureKD(cfg, ctx(cfg))
    rec = record()
    out = term(rec)[0]
    fg_l, bg_l = [], []
    for li, lv in enumerate(["p2", "p3"]):
        s, t, (h, w) = rec.features[lv], rec.t_features[lv], SIZES[lv]
        fg = bg = msum = bsum = 0.0
        for n in range(2):
            mine = [b for b in BOXES[n] if naive_defeat_level(b.tolist(), 2, 8.0) == li]
            m = naive_floor(torch.stack(mine), STRIDES[lv], h, w) if mine else [[0.0] * w for _ in range(h)]
            for i in range(h):
                for j in range(w):
                    d2 = float(((term.adapters[lv](s[n:n + 1])[0, :, i, j] - t[n, :, i, j]) ** 2).sum())
                    fg += m[i][j] * d2
                    bg += (1 - m[i][j]) * d2
                    msum += m[i][j]
                    bsum += 1 - m[i][j]
        fg_l.append(fg / max(1.0, 2 * 2 * msum))  # C = 2 teacher channels
        bg_l.append(bg / max(1.0, 2 * 2 * bsum))
    assert out["loss_kd_feat_fg"].item() == pytest.approx(2.0 * 3.0 * sum(fg_l) / 2, rel=1e-5)
    assert out["loss_kd_feat_bg"].item() == pytest.approx(2.0 * 12.0 * sum(bg_l) / 2, rel=1e-5)
    assert fg_l[0] > 0 and fg_l[1] > 0  # the constructed boxes reach both levels


def test_decoupled_backbone_kd_uses_the_stride4_mask():
    cfg = cfg_with(DEFEAT__BACKBONE_LEVELS=["res3", "res2"], DEFEAT__BACKBONE_ADAPTER="conv1x1")
    term = DecoupledBackboneKD(cfg, ctx(cfg))
    rec = record()
    out = term(rec)[0]
    h2, w2 = SIZES["res2"]
    base = [naive_floor(b, 4, h2, w2) if len(b) else [[0.0] * w2 for _ in range(h2)] for b in BOXES]
    fg_l, bg_l = [], []
    for lv in ["res2", "res3"]:
        s, (h, w) = STRIDES[lv], SIZES[lv]
        a = term.adapters[lv](rec.features[lv])
        d2 = ((a - rec.t_features[lv]) ** 2).sum(1)  # (N, H, W)
        fg = bg = msum = bsum = 0.0
        for n in range(2):
            for i in range(h):
                for j in range(w):
                    m = base[n][i * s // 4][j * s // 4]  # nearest: the stride-4 cell at the same top-left pixel
                    fg += m * float(d2[n, i, j])
                    bg += (1 - m) * float(d2[n, i, j])
                    msum += m
                    bsum += 1 - m
        fg_l.append(fg / max(1.0, 2 * 2 * msum))
        bg_l.append(bg / max(1.0, 2 * 2 * bsum))
    assert out["loss_kd_backbone_fg"].item() == pytest.approx(4.0 * sum(fg_l) / 2, rel=1e-5)
    assert out["loss_kd_backbone_bg"].item() == pytest.approx(16.0 * sum(bg_l) / 2, rel=1e-5)


# ------------------------------------------------------------------ R-CNN head terms
K = 3  # classes; background = 3
T = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))


# sampled RoIs of record()'s image 0 (24 x 40 px): overlapping, the whole image, partly outside (below),
# smaller than a cell, over the bottom-right border; gt classes (K = background)
ROI_PROPOSALS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 22.0], [0.0, 0.0, 40.0, 24.0],
                              [10.0, 12.0, 14.0, 30.0], [1.0, 2.0, 3.0, 4.0], [30.0, 14.0, 44.0, 26.0]])
ROI_CLASSES = torch.tensor([0, 2, K, 1, K, 0])
# image 1 (no gt): background RoIs only, matched gt boxes zero (as detectron2 gives an image without gt)
ROI_PROPOSALS_NO_GT = torch.tensor([[8.0, 8.0, 24.0, 20.0], [20.0, 4.0, 36.0, 16.0]])


def roi_record(r=None, agnostic=False, seed=0):
    """record() + a RoIRecord: image 0's RoIs (the first ``r`` of ROI_PROPOSALS, all by default; gt boxes
    = the RoIs + noise) and, when ``r`` is None, image 1's 2 background RoIs (else image 1 has none)."""
    g = torch.Generator().manual_seed(seed)
    props0, cls0 = ROI_PROPOSALS[:r], ROI_CLASSES[:r]
    gt0 = props0 + torch.randn(props0.shape, generator=g).clamp(-2, 2)
    props1 = ROI_PROPOSALS_NO_GT if r is None else ROI_PROPOSALS_NO_GT[:0]
    cls1 = torch.full((len(props1),), K)
    props, gt_boxes = torch.cat([props0, props1]), torch.cat([gt0, torch.zeros_like(props1)])
    gt_classes, n = torch.cat([cls0, cls1]), len(props0) + len(props1)
    nd = 4 if agnostic else 4 * K
    rec = record()
    inst = [Instances(IMAGE_HW, proposal_boxes=Boxes(props0), gt_classes=cls0, gt_boxes=Boxes(gt0)),
            Instances(IMAGE_HW, proposal_boxes=Boxes(props1), gt_classes=cls1)]
    rec.rois = RoIRecord(instances=inst, proposal_boxes=props, gt_boxes=gt_boxes, gt_classes=gt_classes,
                         logits=torch.randn(n, K + 1, generator=g), deltas=torch.randn(n, nd, generator=g) * 0.3,
                         t_logits=torch.randn(n, K + 1, generator=g) * 2, t_deltas=torch.randn(n, nd, generator=g) * 0.3,
                         num_classes=K, box2box_transform=T)
    return rec


def naive_kl(s, t, temp):
    ps = [math.exp(v / temp) for v in s]
    pt = [math.exp(v / temp) for v in t]
    zs, zt = sum(ps), sum(pt)
    return temp * temp * sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt))


def naive_softmax(x, k):
    e = [math.exp(v) for v in x]
    return e[k] / sum(e)


@pytest.mark.parametrize("rois,gate,temp", [("positive", "none", 1.0), ("all", "none", 2.0),
                                            ("positive", "teacher_better", 1.5)])
def test_roi_cls_kd_matches_naive_loop(rois, gate, temp):
    cfg = cfg_with(CLS__ROIS=rois, CLS__GATE=gate, CLS__TEMPERATURE=temp, CLS__WEIGHT=0.7)
    term = RoIClsKD(cfg, ctx(cfg))
    rec = roi_record()
    r = rec.rois
    losses, scalars = term(rec)
    total, count, kept = 0.0, 0, 0
    for i in range(len(r.gt_classes)):
        c = int(r.gt_classes[i])
        if rois == "positive" and c == K:
            continue
        count += 1
        s, t = r.logits[i].tolist(), r.t_logits[i].tolist()
        if gate == "teacher_better" and not naive_softmax(t, c) > naive_softmax(s, c):
            continue
        kept += 1
        total += naive_kl(s, t, temp)
    assert losses["loss_kd_cls"].item() == pytest.approx(0.7 * total / count, rel=1e-5)
    assert scalars["kd/cls_gate_frac"].item() == pytest.approx(kept / count)
    if gate == "teacher_better":
        assert 0 < kept < count  # the constructed logits exercise both outcomes


def naive_decode(d, box, w=(10.0, 10.0, 5.0, 5.0)):
    x0, y0, x1, y1 = box
    pw, ph = x1 - x0, y1 - y0
    cx, cy = x0 + 0.5 * pw, y0 + 0.5 * ph
    dx, dy, dw, dh = d[0] / w[0], d[1] / w[1], min(d[2] / w[2], math.log(1000 / 16)), min(d[3] / w[3], math.log(1000 / 16))
    ncx, ncy, nw, nh = dx * pw + cx, dy * ph + cy, math.exp(dw) * pw, math.exp(dh) * ph
    return [ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2]


def naive_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("gate,normalizer,agnostic", [
    ("teacher_vs_proposal", "num_rois", False), ("teacher_vs_student", "num_gated", False),
    ("none", "num_pos", True), ("teacher_vs_proposal", "auto", True)])
def test_roi_box_kd_matches_naive_loop(gate, normalizer, agnostic):
    cfg = cfg_with(TAR__BOX_GATE=gate, TAR__BOX_NORMALIZER=normalizer, TAR__BOX_WEIGHT=1.5, TAR__BOX_BETA=0.1)
    term = RoIBoxKD(cfg, ctx(cfg))
    rec = roi_record(agnostic=agnostic, seed=3)
    r = rec.rois
    losses, scalars = term(rec)
    total, pos, kept = 0.0, 0, 0
    for i in range(len(r.gt_classes)):
        c = int(r.gt_classes[i])
        if c >= K:
            continue
        pos += 1
        sl = slice(0, 4) if agnostic else slice(4 * c, 4 * c + 4)
        ds, dt = r.deltas[i, sl].tolist(), r.t_deltas[i, sl].tolist()
        prop, gt = r.proposal_boxes[i].tolist(), r.gt_boxes[i].tolist()
        iou_t = naive_iou(naive_decode(dt, prop), gt)
        ref = {"teacher_vs_proposal": naive_iou(prop, gt), "teacher_vs_student": naive_iou(naive_decode(ds, prop), gt),
               "none": -1.0}[gate]
        if not iou_t > ref:
            continue
        kept += 1
        total += sum(0.5 * (a - b) ** 2 / 0.1 if abs(a - b) < 0.1 else abs(a - b) - 0.05 for a, b in zip(ds, dt))
    denom = {"num_rois": len(r.gt_classes), "auto": len(r.gt_classes), "num_pos": pos, "num_gated": max(kept, 1)}
    assert losses["loss_kd_box"].item() == pytest.approx(1.5 * total / denom[normalizer], rel=1e-4, abs=1e-7)
    assert scalars["kd/box_gate_frac"].item() == pytest.approx(kept / pos)
    assert gate == "none" or 0 < kept < pos  # the constructed deltas exercise both outcomes


def test_single_roi_and_background_only():
    cfg = cfg_with(TAR__BOX_GATE="none")
    rec = roi_record(r=1)  # one positive RoI of class 0
    r = rec.rois
    want = float((r.deltas[0, :4] - r.t_deltas[0, :4]).abs().sum())
    assert RoIBoxKD(cfg, ctx(cfg))(rec)[0]["loss_kd_box"].item() == pytest.approx(want, rel=1e-5)
    assert RoIClsKD(cfg, ctx(cfg))(rec)[0]["loss_kd_cls"].item() == pytest.approx(
        naive_kl(r.logits[0].tolist(), r.t_logits[0].tolist(), 1.0), rel=1e-5)
    r.gt_classes = torch.full_like(r.gt_classes, K)  # background only: zero loss, zero pass rate, grad defined
    r.logits.requires_grad_(True)
    loss, scalars = RoIClsKD(cfg, ctx(cfg))(rec)
    assert loss["loss_kd_cls"].item() == 0 and scalars["kd/cls_gate_frac"].item() == 0
    loss["loss_kd_cls"].backward()


# ------------------------------------------------------------------ dense head terms
def dense_record(seed=0):
    g = torch.Generator().manual_seed(seed)
    # anchors on record()'s 24 x 40 px images: overlapping, the whole image, partly outside, smaller
    # than a cell, over the right border
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 20.0, 12.0], [0.0, 0.0, 40.0, 24.0],
                            [32.0, 16.0, 48.0, 30.0], [2.0, 2.0, 4.0, 4.0], [12.0, 2.0, 28.0, 18.0]])
    labels = torch.tensor([[0, K, -1, 1, 2, 0], [K, K, K, -1, K, K]])  # image 1: no foreground (no gt)
    n, r = labels.shape
    gt_boxes = anchors[None].repeat(n, 1, 1) + torch.randn(n, r, 4, generator=g).clamp(-2, 2)
    gt_boxes[1] = 0  # (detectron2's matched boxes of an image without gt)
    rec = record()
    rec.dense = DenseRecord(anchors=anchors, labels=labels, gt_boxes=gt_boxes,
                            logits=torch.randn(n, r, K, generator=g), deltas=torch.randn(n, r, 4, generator=g) * 0.3,
                            t_logits=torch.randn(n, r, K, generator=g) * 2, t_deltas=torch.randn(n, r, 4, generator=g) * 0.3,
                            num_classes=K, box2box_transform=T)
    return rec


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dense_cls_kd_matches_naive_loop():
    cfg = cfg_with(CLS__TEMPERATURE=2.0, CLS__WEIGHT=0.5)
    rec = dense_record()
    d = rec.dense
    got = DenseClsKD(cfg, ctx(cfg, "dense"))(rec)[0]["loss_kd_cls"].item()
    total, num_fg = 0.0, 0
    for n in range(2):
        for a in range(d.labels.shape[1]):
            lab = int(d.labels[n, a])
            num_fg += 0 <= lab < K
            if lab < 0:
                continue
            for k in range(K):
                p, q = sig(float(d.t_logits[n, a, k]) / 2), sig(float(d.logits[n, a, k]) / 2)
                total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert got == pytest.approx(0.5 * 4 * total / num_fg, rel=1e-5)


def test_dense_box_kd_matches_naive_loop():
    cfg = cfg_with(TAR__BOX_GATE="teacher_vs_proposal")  # NORMALIZER auto = foreground anchors
    rec = dense_record(seed=5)
    d = rec.dense
    losses, scalars = DenseBoxKD(cfg, ctx(cfg, "dense"))(rec)
    total, pos, kept = 0.0, 0, 0
    for n in range(2):
        for a in range(d.labels.shape[1]):
            if not 0 <= int(d.labels[n, a]) < K:
                continue
            pos += 1
            anc, gt = d.anchors[a].tolist(), d.gt_boxes[n, a].tolist()
            if naive_iou(naive_decode(d.t_deltas[n, a].tolist(), anc), gt) > naive_iou(anc, gt):
                kept += 1
                total += float((d.deltas[n, a] - d.t_deltas[n, a]).abs().sum())
    assert losses["loss_kd_box"].item() == pytest.approx(total / pos, rel=1e-5, abs=1e-7)
    assert scalars["kd/box_gate_frac"].item() == pytest.approx(kept / pos)
    assert 0 < kept < pos


# ------------------------------------------------------------------ terms that sample their own RoIs
@pytest.mark.parametrize("term,sampler", [("DecoupledProposalKD", "teacher"), ("ReverseRoIClsKD", "student")])
def test_teacher_proposal_terms_sample_and_weigh(term, sampler, teacher_ckpt, monkeypatch):
    from detectron2.modeling import build_model

    from conftest import tiny_cfg
    from distill_d2.methods import defeat, generic
    from distill_d2.modeling import rcnn
    from test_distill_rcnn import batches, train_steps

    module = defeat if term == "DecoupledProposalKD" else generic  # (ReverseRoIClsKD is a RoIClsKD)
    seen = {}
    loss_name = "decoupled_kl_loss" if term == "DecoupledProposalKD" else "cls_kd_loss"
    real_sample, real_loss = rcnn.sample_teacher_rois, getattr(module, loss_name)

    def spy_sample(teacher, smp, *a):
        seen["sampler"] = smp
        seen["rois"] = real_sample(teacher, smp, *a)
        return seen["rois"]

    def spy_loss(s, t, labels, *a):
        seen["args"] = (s.detach(), t, labels)
        seen["out"] = real_loss(s, t, labels, *a)
        return seen["out"]

    monkeypatch.setattr(rcnn, "sample_teacher_rois", spy_sample)
    monkeypatch.setattr(module, loss_name, spy_loss)
    if term == "DecoupledProposalKD":
        cfg = tiny_cfg("defeat_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DISTILL.TERMS",
                       "['DecoupledFeatureKD', 'DecoupledProposalKD']", "DISTILL.DEFEAT.CLS_FG_WEIGHT", "3.0",
                       "DISTILL.DEFEAT.CLS_BG_WEIGHT", "5.0", "DISTILL.DECAY.TYPE", "constant")
    else:
        cfg = tiny_cfg("hinton_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DISTILL.TERMS",
                       "['ReverseRoIClsKD']", "DISTILL.CLS.WEIGHT", "3.0")
    model = build_model(cfg)
    losses, _ = train_steps(model, batches(cfg, 1))
    want_sampler = model.teacher.roi_heads if sampler == "teacher" else model.roi_heads
    assert seen["sampler"] is want_sampler
    s, t, labels = seen["args"]
    assert len(labels) == sum(len(r) for r in seen["rois"]) and torch.equal(
        labels, torch.cat([r.gt_classes for r in seen["rois"]]))
    if term == "DecoupledProposalKD":
        fg, bg = seen["out"]
        assert losses["loss_kd_cls_fg"].item() == pytest.approx(3.0 * fg.item(), rel=1e-6)
        assert losses["loss_kd_cls_bg"].item() == pytest.approx(5.0 * bg.item(), rel=1e-6)
    else:  # Hinton settings: all RoIs, T = 2, lambda constant
        assert losses["loss_kd_cls_reverse"].item() == pytest.approx(3.0 * seen["out"][0].item(), rel=1e-6)
        want = sum(naive_kl(s[i].tolist(), t[i].tolist(), 2.0) for i in range(len(labels))) / len(labels)
        assert seen["out"][0].item() == pytest.approx(want, rel=1e-4)


def test_dense_box_kd_reads_each_images_anchors():
    # four disjoint anchors, positives in both images, a perfect teacher: every positive passes the gate
    # only if its own anchor is used (a wrong anchor decodes far from the gt: IoU 0, not better)
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [40.0, 0.0, 52.0, 10.0], [0.0, 40.0, 6.0, 50.0],
                            [40.0, 40.0, 60.0, 64.0]])
    labels = torch.tensor([[0, 3, 1, 3], [3, 2, 3, 0]])
    gt = anchors[None].repeat(2, 1, 1) + torch.tensor([1.0, -1.0, 2.0, 1.0])
    t_deltas = torch.stack([T.get_deltas(anchors, gt[n]) for n in range(2)])
    g = torch.Generator().manual_seed(0)
    s_deltas = t_deltas + torch.randn(2, 4, 4, generator=g) * 0.1
    rec = record()
    rec.dense = DenseRecord(anchors=anchors, labels=labels, gt_boxes=gt, logits=torch.zeros(2, 4, K),
                            deltas=s_deltas, t_logits=torch.zeros(2, 4, K), t_deltas=t_deltas, num_classes=K,
                            box2box_transform=T)
    cfg = cfg_with(TAR__BOX_GATE="teacher_vs_proposal")
    losses, scalars = DenseBoxKD(cfg, ctx(cfg, "dense"))(rec)
    pos = (labels >= 0) & (labels < K)
    want = float((s_deltas - t_deltas).abs().sum(-1)[pos].sum()) / int(pos.sum())
    assert scalars["kd/box_gate_frac"].item() == 1.0
    assert losses["loss_kd_box"].item() == pytest.approx(want, rel=1e-5)


def test_cls_gate_near_tie():
    # K = 1: p(gt) = softmax over [class 0, background]; teacher 0.5 vs student 0.52 -> not better;
    # teacher 0.53 vs student 0.52 -> better
    z = math.log(0.52 / 0.48)
    s = torch.tensor([[z, 0.0], [z, 0.0]])
    t = torch.tensor([[0.0, 0.0], [math.log(0.53 / 0.47), 0.0]])
    cfg = cfg_with(CLS__GATE="teacher_better")
    rec = record()
    rec.rois = RoIRecord(instances=[], proposal_boxes=torch.zeros(2, 4), gt_boxes=torch.zeros(2, 4),
                         gt_classes=torch.tensor([0, 0]), logits=s, deltas=torch.zeros(2, 4), t_logits=t,
                         t_deltas=torch.zeros(2, 4), num_classes=1, box2box_transform=T)
    losses, scalars = RoIClsKD(cfg, ctx(cfg))(rec)
    assert scalars["kd/cls_gate_frac"].item() == 0.5
    # (near-equal distributions: float32 cancellation in the KL, hence rel 1e-3)
    assert losses["loss_kd_cls"].item() == pytest.approx(naive_kl(s[1].tolist(), t[1].tolist(), 1.0) / 2, rel=1e-3)
