"""TBD (Tang et al. 2022, "Task-Balanced Distillation for Object Detection"): harmony and task-decoupled features.

The paper's abstract names a Harmony Score (HS: how well a prediction's class
score agrees with its localisation quality, taken from the teacher) used to
distil classification ("harmony distillation") and a Task-decoupled Feature
Distillation (TFD) whose region selection balances the classification and
regression tasks. No formulas are public: what follows is our reconstruction
every choice a key of ``DISTILL.TBD``; the method card docs/methods/TBD.md
is the reference.

* ``HarmonyClsKD`` -> ``loss_kd_harmony``: per positive RoI (Faster R-CNN,
  the student's sampled RoIs scored by both heads) or positive anchor
  (RetinaNet), ``HS = f(s, u)`` with s the teacher's probability of the gt class
  and u = IoU(teacher's decoded box, gt) (``HS_FORM``). Weights ``w = HS`` on
  positives, ``HD_BG_WEIGHT`` on background rows (ignored anchors 0); KD rows
  are the softmax KL over K+1 classes (Faster R-CNN) or the binary KL summed
  over K classes (RetinaNet), times T^2, optionally with HS as the target
  probability of the gt class (``HS_TARGET``).
  ``loss = HD_WEIGHT * sum_r w_r KL_r / max(1, sum_{r positive} HS_r)``.
  Logs ``kd/harmony_mean`` (mean HS over positives).
* ``TaskDecoupledFeatureKD`` -> ``loss_kd_tfd``: per level two teacher masks,
  ``M_cls`` = the teacher's classification confidence per location (max over
  anchors of the RPN objectness sigmoid for Faster R-CNN, of the class sigmoids
  for RetinaNet), zeroed below ``CONF_THRESH``, and ``M_reg`` = the IoU of the
  teacher's decoded box with its assigned gt (the detector's own anchor matcher;
  0 for anchors not matched), max over the anchors of a location;
  ``M = CLS_MASK_WEIGHT * M_cls + REG_MASK_WEIGHT * M_reg``;
  ``loss = FEAT_WEIGHT * sum_l sum M (A(S)-T)^2 / (2 sum_l sum M + eps)`` (the
  FGFI normalisation of the Gaussian feature term).

Presets: ``configs/synthetic/tbd_*.yaml``, ``configs/COCO-Detection/tbd_*.yaml``.
"""
import torch
from detectron2.config import CfgNode as CN
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou

import torch.nn.functional as F

from ..config import lookup
from ..errors import DistillConfigError
from ..losses import batch_normalize, class_deltas, masked_feature_loss
from ..teacher import check_same_anchors
from ..terms import DISTILL_TERM_REGISTRY, FeatureTerm, check_choice
from .generic import LogitTerm, per_image

HS_FORMS = ("power", "tood", "agreement")


# ------------------------------------------------------------------ loss formulas
def harmony_score(score, iou, form="power", alpha=0.5, beta=6.0):
    """TBD's Harmony Score of predictions from their class score ``s`` and localisation IoU ``u``.

    ``power``: ``s^alpha * u^(1-alpha)``; ``tood``: ``s^alpha * u^beta`` (TOOD's alignment
    metric, alpha 1, beta 6 there); ``agreement``: ``1 - |s - u|``. Inputs clamped to [0, 1]
    (an IoU of a degenerate box may be NaN: read as 0). Returns a tensor shaped like ``score``.
    """
    s = score.clamp(0, 1)
    u = torch.nan_to_num(iou, nan=0.0).clamp(0, 1)
    if form == "power":
        return s.pow(alpha) * u.pow(1 - alpha)
    if form == "tood":
        return s.pow(alpha) * u.pow(beta)
    if form == "agreement":
        return 1 - (s - u).abs()
    raise ValueError(f"Unknown DISTILL.TBD.HS_FORM '{form}': use power, tood or agreement.")


def softmax_kl_rows_to(student_logits, target_probs, temperature=1.0):
    """Per-row ``KL(p || softmax(s/T)) * T^2`` for a given target distribution ``p`` (R, K+1)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return (torch.xlogy(target_probs, target_probs) - target_probs * log_p_s).sum(dim=1) * temperature ** 2


def with_gt_prob(probs, classes, value, pos):
    """Softmax targets whose gt-class probability is ``value`` on rows ``pos``, the other classes
    rescaled to sum to ``1 - value`` (rows not in ``pos`` unchanged). probs (R, K+1), classes/value/pos (R,)."""
    idx = classes.clamp(0, probs.shape[1] - 1)[:, None]
    p_gt = probs.gather(1, idx)[:, 0]
    scale = ((1 - value) / (1 - p_gt).clamp(min=1e-6))[:, None]
    new = (probs * scale).scatter(1, idx, value[:, None])
    return torch.where(pos[:, None], new, probs)


def sigmoid_kl_to(student_logits, target_probs, temperature=1.0):
    """Elementwise binary ``KL(p || sigma(s/T)) * T^2`` for target probabilities ``p`` (any shape)."""
    p = target_probs
    ent = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))
    return (F.binary_cross_entropy_with_logits(student_logits / temperature, p, reduction="none") - ent) * temperature ** 2


def add_tbd_config(d):
    if "TBD" in d:
        return
    d.TBD = CN()
    # Harmony Score form [choice]: "power" s^a u^(1-a), "tood" s^a u^b, "agreement" 1-|s-u|.
    d.TBD.HS_FORM = "power"
    d.TBD.HS_ALPHA = 0.5  # a
    d.TBD.HS_BETA = 6.0  # b ("tood" only; TOOD uses a=1, b=6)
    # Harmony distillation: weight, temperature, weight of background RoIs/anchors [choice],
    # and HS as the gt class's target probability [choice, off].
    d.TBD.HD_WEIGHT = 1.0
    d.TBD.TEMPERATURE = 1.0
    d.TBD.HD_BG_WEIGHT = 0.0
    d.TBD.HS_TARGET = False
    # Task-decoupled feature distillation: levels (must be the teacher head's inputs), adapter,
    # weight, task-mask weights b_cls / b_reg and the confidence threshold of M_cls [choices].
    d.TBD.LEVELS = ["p2", "p3", "p4", "p5", "p6"]
    d.TBD.ADAPTER = "conv1x1"
    d.TBD.FEAT_WEIGHT = 0.01
    d.TBD.CLS_MASK_WEIGHT = 1.0
    d.TBD.REG_MASK_WEIGHT = 1.0
    d.TBD.CONF_THRESH = 0.05


def dense_teacher_iou(d):
    """(N, R) IoU of the teacher's decoded box of every anchor with the anchor's matched gt box
    (meaningful on foreground anchors; NaN possible for degenerate boxes). ``d``: a DenseRecord."""
    n = d.labels.shape[0]
    anchors = d.anchors[None].expand(n, -1, -1).reshape(-1, 4)
    boxes = d.box2box_transform.apply_deltas(d.t_deltas.reshape(-1, 4), anchors)
    return matched_pairwise_iou(Boxes(boxes), Boxes(d.gt_boxes.reshape(-1, 4))).view(n, -1)


def per_location(values, sizes):
    """{level: (N, H, W)} max over the A anchors of each location of per-anchor ``values`` (N, R)
    laid out level by level, each (H, W, A) (detectron2's anchor order); ``sizes``: {level: (H, W, A)}."""
    out, start = {}, 0
    for lv, (h, w, a) in sizes.items():
        n = h * w * a
        out[lv] = values[:, start:start + n].reshape(values.shape[0], h, w, a).amax(dim=3)
        start += n
    return out


class HarmonyClsKD(LogitTerm):
    """Harmony distillation (one subclass per detector family: ``RoIHarmonyClsKD``, ``DenseHarmonyClsKD``)."""

    reads = ("TBD.HS_*", "TBD.HD_*", "TBD.TEMPERATURE")

    @classmethod
    def add_config(cls, d):
        add_tbd_config(d)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.t = cfg.DISTILL.TBD
        check_choice("DISTILL.TBD.HS_FORM", self.t.HS_FORM, HS_FORMS)

    def _hs(self, score, iou):
        t = self.t
        return harmony_score(score, iou, t.HS_FORM, t.HS_ALPHA, t.HS_BETA)

    def harmony(self, rec):
        """(HS (R,) or (N, R), positive mask) from the teacher, no grad."""
        raise NotImplementedError

    def kl_and_weights(self, rec, hs, pos):
        """(per-row KL with the temperature and HS target, row weights): shaped like ``hs``."""
        raise NotImplementedError

    def forward(self, rec):
        hs, pos = self.harmony(rec)
        kl, w = self.kl_and_weights(rec, hs, pos)
        loss = batch_normalize((w * kl).sum(), hs.sum(), min_den=1)
        mean_hs = hs.sum() / pos.sum().clamp(min=1)
        return {"loss_kd_harmony": self.t.HD_WEIGHT * loss}, {"kd/harmony_mean": mean_hs}


class RoIHarmonyClsKD(HarmonyClsKD):
    """Faster R-CNN: HS on the student's sampled RoIs scored by both heads; softmax KL over K+1 classes."""

    def harmony(self, rec):
        r = rec.get("heads")
        with torch.no_grad():
            pos = r.gt_classes < r.num_classes
            s = torch.softmax(r.t_logits, dim=1).gather(1, r.gt_classes[:, None])[:, 0]
            boxes = r.box2box_transform.apply_deltas(class_deltas(r.t_deltas, r.gt_classes), r.proposal_boxes)
            u = matched_pairwise_iou(Boxes(boxes), Boxes(r.gt_boxes))
            return torch.where(pos, self._hs(s, u), torch.zeros_like(s)), pos

    def kl_and_weights(self, rec, hs, pos):
        r, t = rec.get("heads"), self.t
        target = torch.softmax(r.t_logits / t.TEMPERATURE, dim=1)
        if t.HS_TARGET:
            target = with_gt_prob(target, r.gt_classes, hs, pos)
        kl = softmax_kl_rows_to(r.logits, target, t.TEMPERATURE)
        return kl, torch.where(pos, hs, torch.full_like(hs, t.HD_BG_WEIGHT))

    def explain(self, rec):
        hs, pos = self.harmony(rec)
        r = rec.get("heads")
        return {"boxes": {"harmony_rois": per_image(r.proposal_boxes, pos, r.counts)},
                "box_values": {"harmony_rois": per_image(hs, pos, r.counts)}}


class DenseHarmonyClsKD(HarmonyClsKD):
    """RetinaNet: HS on the shared anchors; binary KL summed over the K classes; ignored anchors weigh 0."""

    needs = frozenset({"heads", "dense_level_sizes"})

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher, "HarmonyClsKD")

    def harmony(self, rec):
        d = rec.get("heads")
        with torch.no_grad():
            pos = (d.labels >= 0) & (d.labels < d.num_classes)
            idx = d.labels.clamp(0, d.num_classes - 1)[..., None]
            s = torch.sigmoid(d.t_logits).gather(2, idx)[..., 0]
            u = dense_teacher_iou(d)
            return torch.where(pos, self._hs(s, u), torch.zeros_like(s)), pos

    def kl_and_weights(self, rec, hs, pos):
        d, t = rec.get("heads"), self.t
        target = torch.sigmoid(d.t_logits / t.TEMPERATURE)
        if t.HS_TARGET:
            onehot = F.one_hot(d.labels.clamp(0, d.num_classes - 1), d.num_classes).bool()
            target = torch.where(onehot & pos[..., None], hs[..., None], target)
        kl = sigmoid_kl_to(d.logits, target, t.TEMPERATURE).sum(dim=2)
        w = torch.where(pos, hs, torch.where(d.labels >= 0, torch.full_like(hs, t.HD_BG_WEIGHT), torch.zeros_like(hs)))
        return kl, w

    def explain(self, rec):
        hs, _ = self.harmony(rec)
        return {"maps": {"harmony_score": per_location(hs, rec.get("dense_level_sizes"))}}


HarmonyClsKD.by_family = {"rcnn": RoIHarmonyClsKD, "dense": DenseHarmonyClsKD}
DISTILL_TERM_REGISTRY.register(HarmonyClsKD)


class TaskDecoupledFeatureKD(FeatureTerm):
    """TFD (one subclass per detector family: ``RPNTaskDecoupledFeatureKD``, ``DenseTaskDecoupledFeatureKD``)."""

    reads = ("TBD.LEVELS", "TBD.ADAPTER", "TBD.FEAT_WEIGHT", "TBD.*_MASK_WEIGHT", "TBD.CONF_THRESH")
    levels_key, adapter_key = "TBD.LEVELS", "TBD.ADAPTER"
    mask_picture = "tfd_mask"
    #: the teacher head whose inputs the levels must be, and its IN_FEATURES key
    head_name, head_in_key = None, None

    @classmethod
    def add_config(cls, d):
        add_tbd_config(d)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        t = cfg.DISTILL.TBD
        head_in = list(lookup(ctx.teacher_cfg.MODEL, self.head_in_key))
        bad = [lv for lv in self.levels if lv not in head_in]
        if bad:
            raise DistillConfigError(
                f"DISTILL.TBD.LEVELS {bad}: the task masks come from the teacher's {self.head_name}, which sees "
                f"only {head_in} (MODEL.{self.head_in_key}). List levels among those."
            )
        self.t = t

    def teacher_quality(self, rec):
        """Per anchor (N, R): the teacher's classification confidence and the IoU of its decoded box with
        its assigned gt (0 unless matched as foreground); {level: (H, W, A)} in anchor order. No grad."""
        raise NotImplementedError

    def task_masks(self, rec):
        """({level: M_cls (N, H, W)}, {level: M_reg (N, H, W)}) over ALL teacher head levels; no grad."""
        with torch.no_grad():
            conf, iou, sizes = self.teacher_quality(rec)
            conf = torch.where(conf >= self.t.CONF_THRESH, conf, torch.zeros_like(conf))
            return per_location(conf, sizes), per_location(iou, sizes)

    def masks(self, rec):
        """{level: M (N, H, W)} = b_cls M_cls + b_reg M_reg on the distilled levels."""
        m_cls, m_reg = self.task_masks(rec)
        t = self.t
        return {lv: t.CLS_MASK_WEIGHT * m_cls[lv] + t.REG_MASK_WEIGHT * m_reg[lv] for lv in self.levels}

    def forward(self, rec):
        loss = masked_feature_loss(self.adapted(rec), self.targets(rec), self.masks(rec), "fgfi")
        return {"loss_kd_tfd": self.t.FEAT_WEIGHT * loss}, {}

    def explain(self, rec):
        m_cls, m_reg = self.task_masks(rec)
        keep = lambda m: {lv: m[lv] for lv in self.levels}  # noqa: E731
        return {"maps": {"tfd_cls_mask": keep(m_cls), "tfd_reg_mask": keep(m_reg), "tfd_mask": self.masks(rec)}}


class RPNTaskDecoupledFeatureKD(TaskDecoupledFeatureKD):
    """Faster R-CNN: the masks from the teacher's RPN on its own maps (the record's ``"teacher_rpn"``)."""

    needs = frozenset({"teacher_rpn"})
    head_name, head_in_key = "RPN", "RPN.IN_FEATURES"

    def teacher_quality(self, rec):
        rpn = rec.get("teacher_rpn")
        n = rpn.logits.shape[0]
        anchors = rpn.anchors[None].expand(n, -1, -1).reshape(-1, 4)
        boxes = rpn.box2box_transform.apply_deltas(rpn.deltas.reshape(-1, 4), anchors)
        u = matched_pairwise_iou(Boxes(boxes), Boxes(rpn.gt_boxes.reshape(-1, 4))).view(n, -1)
        iou = torch.where(rpn.labels == 1, torch.nan_to_num(u, nan=0.0), torch.zeros_like(u))
        return rpn.logits.sigmoid(), iou, rpn.sizes


class DenseTaskDecoupledFeatureKD(TaskDecoupledFeatureKD):
    """RetinaNet: the masks from the teacher's dense head on the shared anchors."""

    needs = frozenset({"heads", "dense_level_sizes"})
    head_name, head_in_key = "RetinaNet head", "RETINANET.IN_FEATURES"

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher, "TaskDecoupledFeatureKD")

    def teacher_quality(self, rec):
        d = rec.get("heads")
        pos = (d.labels >= 0) & (d.labels < d.num_classes)
        u = dense_teacher_iou(d)
        iou = torch.where(pos, torch.nan_to_num(u, nan=0.0), torch.zeros_like(u))
        return torch.sigmoid(d.t_logits).amax(dim=2), iou, rec.get("dense_level_sizes")


TaskDecoupledFeatureKD.by_family = {"rcnn": RPNTaskDecoupledFeatureKD, "dense": DenseTaskDecoupledFeatureKD}
DISTILL_TERM_REGISTRY.register(TaskDecoupledFeatureKD)
