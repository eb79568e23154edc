"""CrossKD (Wang et al., CVPR 2024, "CrossKD: Cross-Head Knowledge Distillation for Object Detection").

The student's head features, taken from *inside* its head, run through the rest of the *teacher's* head (a
cross pass, with gradient through the frozen teacher layers into the student's earlier layers); the cross
predictions are pulled to the teacher's own. The student's later head layers and predictors get no KD
gradient. One registered term, ``CrossKD``, with one implementation per detector family; keys
``DISTILL.CROSSKD.*``; method card docs/methods/CrossKD.md (the reference); presets
``configs/*/crosskd_*.yaml``.

* RetinaNet (``DenseCrossKD``) -> ``loss_kd_cross_cls``, ``loss_kd_cross_reg``: per branch b (cls, bbox) and
  level l, the student's pre-ReLU output of the head conv before the reused ones, re-standardised per channel
  to the teacher's statistics at the same point (``align_scale``), then the teacher's last
  ``NUM_CONVS - REUSED_HEAD_IDX`` convs and predictor. Classification: quality-focal KD
  ``BCE(x, sigma(t)) |sigma(x) - sigma(t)|^BETA`` over valid anchors (matcher label >= 0) and classes;
  regression: ``w (1 - GIoU(decode(x), decode(t)))`` with ``w = max_k sigma(t)`` on valid anchors; both
  summed and divided by ``NORMALIZER`` (detectron2's ``loss_normalizer`` by default, like its detection
  losses).
* Faster R-CNN (``RoICrossKD``, the reference's untuned two-stage branch) -> ``loss_kd_cross_cls``,
  ``loss_kd_cross_reg``: the student's pooled RoI features (its own box pooler on its FPN maps and its
  sampled RoIs) through the teacher's box head and predictor; ``T^2 KL(softmax(t/T) || softmax(x/T))`` summed
  over K+1 classes, mean over RoIs; L1 on the deltas of the teacher's argmax foreground class, weighted by
  that class's teacher probability, divided by ``4 sum w``.
"""
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from fvcore.nn import giou_loss

from ..errors import DistillConfigError, TeacherError
from ..losses import batch_normalize, channel_moments, class_deltas, kl_rows, standardize_channels
from ..record import CrossPass, Tap
from ..teacher import check_same_anchors
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, check_choice

STD_EPS = 1e-6  # added to the per-channel std (reference)


# ------------------------------------------------------------------ loss formulas
def align_scale(student, teacher, stats="global"):
    """``(S - mu_S) / (sigma_S + eps) * sigma_T + mu_T`` per channel, moments over (N, H, W), unbiased std:
    the student's tensor with the teacher's per-channel statistics, in float32. student, teacher: (N, C, H, W).

    ``stats`` "global": moments of the whole batch over every process (all-reduced, differentiably, as
    :func:`~distill_d2.losses.channel_moments` does); "local": this process's images (the reference, per GPU).
    """
    sync = stats == "global"
    s_hat, = standardize_channels([student.float()], eps=STD_EPS, sync=sync)
    with torch.no_grad():
        (mu_t, var_t), = channel_moments([teacher.float()], sync=sync)
    return s_hat * var_t.clamp(min=1e-24).sqrt().view(1, -1, 1, 1) + mu_t.view(1, -1, 1, 1)


def quality_focal_kd(logits, t_logits, valid, beta=1.0):
    """Sum over valid rows and classes of ``BCE(x, sigma(t)) * |sigma(x) - sigma(t)|^beta``.
    logits, t_logits: (..., K); valid: (...) bool."""
    p_t = torch.sigmoid(t_logits)
    loss = F.binary_cross_entropy_with_logits(logits, p_t, reduction="none") * (torch.sigmoid(logits) - p_t).abs().pow(beta)
    return torch.where(valid[..., None], loss, torch.zeros_like(loss)).sum()


def weighted_giou_kd(deltas, t_deltas, t_logits, anchors, valid, box2box_transform):
    """Sum over valid anchors of ``max_k sigma(t_k) * (1 - GIoU(decode(deltas), decode(t_deltas)))``.
    deltas, t_deltas: (N, R, 4); t_logits: (N, R, K); anchors: (R, 4) XYXY; valid: (N, R) bool."""
    n = deltas.shape[0]
    a = anchors[None].expand(n, -1, -1).reshape(-1, 4)
    boxes = box2box_transform.apply_deltas(deltas.reshape(-1, 4), a)
    with torch.no_grad():
        t_boxes = box2box_transform.apply_deltas(t_deltas.reshape(-1, 4), a)
        w = torch.sigmoid(t_logits).amax(dim=-1).reshape(-1)
    per = giou_loss(boxes, t_boxes, reduction="none")
    return torch.where(valid.reshape(-1), w * per, torch.zeros_like(per)).sum()


def roi_cross_losses(logits, deltas, t_logits, t_deltas, num_classes, temperature=3.0):
    """(cls, reg) of the two-stage branch on R RoIs: ``sum_r T^2 KL(p_t || p_x)(T) / R`` and
    ``sum_r w_r |d_x - d_t|_1 / (4 sum_r w_r)`` on the deltas of c_r = argmax_{k<K} p_t (softmax over K+1),
    w_r = p_t[c_r]. logits, t_logits: (R, K+1); deltas, t_deltas: (R, 4K) or (R, 4). Sums over processes."""
    cls = batch_normalize(kl_rows(logits, t_logits, temperature).sum(), logits.shape[0], min_den=1)
    with torch.no_grad():
        w, c = torch.softmax(t_logits, dim=1)[:, :num_classes].max(dim=1)
    l1 = (class_deltas(deltas, c) - class_deltas(t_deltas, c)).abs().sum(dim=1)
    reg = batch_normalize((w * l1).sum(), 4 * w.sum(), eps=1e-12)
    return cls, reg


# ------------------------------------------------------------------ terms
def add_crosskd_config(d):
    d.CROSSKD = CN()
    # Weights of loss_kd_cross_cls / loss_kd_cross_reg (RetinaNet reference 1.0 / 1.0; the Faster R-CNN
    # branch uses 0.5 / 1.0: its presets set CLS_WEIGHT 0.5).
    d.CROSSKD.CLS_WEIGHT = 1.0
    d.CROSSKD.REG_WEIGHT = 1.0
    # RetinaNet: focusing exponent of the quality-focal KD (reference 1).
    d.CROSSKD.BETA = 1.0
    # RetinaNet: the first teacher head conv the cross pass reuses (0-based; -1 = the last one, as the
    # reference's reused_teacher_head_idx 3 of 4 convs). The student crosses after the conv before the same
    # number of last convs of its own head [choice when the depths differ].
    d.CROSSKD.REUSED_HEAD_IDX = -1
    # RetinaNet: moments of align_scale over "global" (the whole batch across processes, so N processes give
    # the single-process objective [choice]) or "local" (this process's images, the reference's per-GPU).
    d.CROSSKD.STATS = "global"
    # RetinaNet: denominator of both sums: "loss_normalizer" (detectron2's EMA of the foreground count, the
    # denominator of its own detection losses [choice]) or "num_pos" (this batch's foreground anchors,
    # summed over processes, the reference's avg_factor).
    d.CROSSKD.NORMALIZER = "loss_normalizer"
    # Faster R-CNN: KL temperature (reference branch 3).
    d.CROSSKD.TEMPERATURE = 3.0


class CrossKD(DistillTerm):
    """CrossKD (one subclass per detector family: ``DenseCrossKD``, ``RoICrossKD``)."""

    reads = ("CROSSKD.CLS_WEIGHT", "CROSSKD.REG_WEIGHT")

    @classmethod
    def add_config(cls, d):
        add_crosskd_config(d)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        k = cfg.DISTILL.CROSSKD
        self.k, self.cls_weight, self.reg_weight = k, k.CLS_WEIGHT, k.REG_WEIGHT

    def weigh(self, cls, reg):
        return {"loss_kd_cross_cls": self.cls_weight * cls, "loss_kd_cross_reg": self.reg_weight * reg}, {}


def _block(norm):
    """Layers per conv of a RetinaNetHead subnet: conv, (norm,) ReLU."""
    return 3 if norm else 2


class DenseCrossKD(CrossKD):
    """RetinaNet: cls and bbox branches cross after the student conv before the reused teacher convs."""

    reads = CrossKD.reads + ("CROSSKD.BETA", "CROSSKD.REUSED_HEAD_IDX", "CROSSKD.STATS", "CROSSKD.NORMALIZER")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        k = self.k
        check_choice("DISTILL.CROSSKD.STATS", k.STATS, ("global", "local"))
        check_choice("DISTILL.CROSSKD.NORMALIZER", k.NORMALIZER, ("loss_normalizer", "num_pos"))
        s, t = ctx.cfg.MODEL.RETINANET, ctx.teacher_cfg.MODEL.RETINANET
        idx = k.REUSED_HEAD_IDX if k.REUSED_HEAD_IDX >= 0 else t.NUM_CONVS + k.REUSED_HEAD_IDX
        if not 1 <= idx < t.NUM_CONVS:
            raise DistillConfigError(
                f"DISTILL.CROSSKD.REUSED_HEAD_IDX {k.REUSED_HEAD_IDX}: the teacher's head has {t.NUM_CONVS} convs "
                f"(MODEL.RETINANET.NUM_CONVS of the teacher); reuse from conv 1 to {t.NUM_CONVS - 1} (0-based).")
        js = s.NUM_CONVS - (t.NUM_CONVS - idx) - 1  # student conv whose output crosses
        if js < 0:
            raise DistillConfigError(
                f"DISTILL.CROSSKD.REUSED_HEAD_IDX {k.REUSED_HEAD_IDX} replaces the last {t.NUM_CONVS - idx} head "
                f"convs, but the student's head has only {s.NUM_CONVS} (MODEL.RETINANET.NUM_CONVS): reuse fewer.")
        self._check_tails(ctx)
        bs, bt = _block(s.NORM), _block(t.NORM)
        s_hold, t_hold = bs * js + bs - 2, bt * (idx - 1) + bt - 2  # the pre-ReLU output of that conv
        self.teacher_hold, self.cross = {}, {}
        for branch, sub in (("cls", "cls_subnet"), ("bbox", "bbox_subnet")):
            self.teacher_hold[branch] = Tap("teacher", f"head.{sub}.{t_hold}")
            prepare = self._align_cls if branch == "cls" else self._align_bbox
            self.cross[branch] = CrossPass(Tap("student", f"head.{sub}.{s_hold}"), branch, t_hold + 1, prepare)
        self.needs = frozenset({"heads", *self.teacher_hold.values(), *self.cross.values()})

    @staticmethod
    def _check_tails(ctx):
        """The cross pass feeds the student's tensor to the teacher's layers: same classes, anchors per
        location and head width (= the FPN width of the head levels)."""
        s, t = ctx.cfg.MODEL, ctx.teacher_cfg.MODEL
        diffs = [f"{key}: student {a}, teacher {b}" for key, a, b in (
            ("MODEL.RETINANET.NUM_CLASSES", s.RETINANET.NUM_CLASSES, t.RETINANET.NUM_CLASSES),
            ("MODEL.RETINANET.IN_FEATURES", list(s.RETINANET.IN_FEATURES), list(t.RETINANET.IN_FEATURES)),
            ("MODEL.ANCHOR_GENERATOR.SIZES", list(map(list, s.ANCHOR_GENERATOR.SIZES)),
             list(map(list, t.ANCHOR_GENERATOR.SIZES))),
            ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", list(map(list, s.ANCHOR_GENERATOR.ASPECT_RATIOS)),
             list(map(list, t.ANCHOR_GENERATOR.ASPECT_RATIOS))),
        ) if a != b]
        lv = list(s.RETINANET.IN_FEATURES)
        widths = [(ctx.student_shapes[f].channels, ctx.teacher_shapes[f].channels) for f in lv
                  if f in ctx.teacher_shapes]
        if any(a != b for a, b in widths):
            diffs.append(f"head width (FPN channels, MODEL.FPN.OUT_CHANNELS): student {widths[0][0]}, "
                         f"teacher {widths[0][1]}")
        if diffs:
            raise TeacherError("CrossKD runs the student's head features through the teacher's head, whose tail must "
                               "match the student's: " + "; ".join(diffs) + ". Make them equal or use another term.")

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher, "CrossKD")

    def _align(self, branch, rec, i, x):
        return align_scale(x, rec.get(self.teacher_hold[branch])[i], self.k.STATS)

    def _align_cls(self, rec, i, x):
        return self._align("cls", rec, i, x)

    def _align_bbox(self, rec, i, x):
        return self._align("bbox", rec, i, x)

    def forward(self, rec):
        d, k = rec.get("heads"), self.k
        logits = torch.cat([permute_to_N_HWA_K(x, d.num_classes) for x in rec.get(self.cross["cls"])], dim=1)
        deltas = torch.cat([permute_to_N_HWA_K(x, 4) for x in rec.get(self.cross["bbox"])], dim=1)
        valid = d.labels >= 0
        cls = quality_focal_kd(logits, d.t_logits, valid, k.BETA)
        reg = weighted_giou_kd(deltas, d.t_deltas, d.t_logits, d.anchors, valid, d.box2box_transform)
        if k.NORMALIZER == "num_pos":
            return self.weigh(batch_normalize(cls, d.num_pos, min_den=1), batch_normalize(reg, d.num_pos, min_den=1))
        return self.weigh(cls / d.loss_normalizer, reg / d.loss_normalizer)


class RoICrossKD(CrossKD):
    """Faster R-CNN: the student's pooled RoI features (its sampled RoIs) through the teacher's box head."""

    reads = CrossKD.reads + ("CROSSKD.TEMPERATURE",)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        s, t = ctx.cfg.MODEL, ctx.teacher_cfg.MODEL
        diffs = [f"{key}: student {a}, teacher {b}" for key, a, b in (
            ("MODEL.ROI_HEADS.NUM_CLASSES", s.ROI_HEADS.NUM_CLASSES, t.ROI_HEADS.NUM_CLASSES),
            ("MODEL.ROI_HEADS.IN_FEATURES", list(s.ROI_HEADS.IN_FEATURES), list(t.ROI_HEADS.IN_FEATURES)),
            ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", s.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG,
             t.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG),
            *[(f"MODEL.ROI_BOX_HEAD.{x}", s.ROI_BOX_HEAD[x], t.ROI_BOX_HEAD[x])
              for x in ("POOLER_RESOLUTION", "POOLER_SAMPLING_RATIO", "POOLER_TYPE")],
        ) if a != b]
        widths = {(ctx.student_shapes[f].channels, ctx.teacher_shapes[f].channels) for f in s.ROI_HEADS.IN_FEATURES
                  if f in ctx.teacher_shapes}
        if any(a != b for a, b in widths):
            diffs.append(f"FPN channels (MODEL.FPN.OUT_CHANNELS): student/teacher {sorted(widths)}")
        if diffs:
            raise TeacherError("CrossKD runs the student's pooled RoI features through the teacher's box head, which "
                               "must take them as its own: " + "; ".join(diffs) + ". Make them equal or use another "
                               "term.")
        self.cross = CrossPass(Tap("student", "roi_heads.box_pooler"), "box", 0)
        self.needs = frozenset({"heads", self.cross})

    def forward(self, rec):
        r = rec.get("heads")
        (logits, deltas), = rec.get(self.cross)  # the box pooler runs once per training step
        cls, reg = roi_cross_losses(logits, deltas, r.t_logits, r.t_deltas, r.num_classes, self.k.TEMPERATURE)
        return self.weigh(cls, reg)


CrossKD.by_family = {"dense": DenseCrossKD, "rcnn": RoICrossKD}
DISTILL_TERM_REGISTRY.register(CrossKD)
