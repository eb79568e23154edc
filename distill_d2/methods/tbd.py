"""TBD (Tang et al. 2022, "Task-Balanced Distillation for Object Detection"): harmony and task-decoupled features.

The paper's abstract names a Harmony Score (HS: how well a prediction's class
score agrees with its localisation quality, taken from the teacher) used to
distil classification ("harmony distillation") and a Task-decoupled Feature
Distillation (TFD) whose region selection balances the classification and
regression tasks. No formulas are public: what follows is our reconstruction
(../shared/METHODS.md section 4), every choice a key of ``DISTILL.TBD``;
docs/methods/TBD.md.

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
from detectron2.structures import Boxes, pairwise_iou
from detectron2.structures.boxes import matched_pairwise_iou

from ..losses import (batch_normalize, class_deltas, harmony_score, masked_feature_loss, sigmoid_kl_to,
                      softmax_kl_rows_to, with_gt_prob)
from ..modeling.retinanet import dense_level_sizes
from ..terms import DISTILL_TERM_REGISTRY, DistillConfigError, DistillTerm, check_choice, distilled_levels, level_adapters
from .generic import MaskedFeatureTerm, check_same_anchors, per_image

HS_FORMS = ("power", "tood", "agreement")


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


@DISTILL_TERM_REGISTRY.register()
class HarmonyClsKD(DistillTerm):
    needs = frozenset({"heads"})
    reads = ("TBD.HS_*", "TBD.HD_*", "TBD.TEMPERATURE")

    @classmethod
    def add_config(cls, d):
        add_tbd_config(d)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.t = cfg.DISTILL.TBD
        check_choice("DISTILL.TBD.HS_FORM", self.t.HS_FORM, HS_FORMS)
        self.family = ctx.family

    def check_teacher(self, student, teacher):
        if self.family == "dense":
            check_same_anchors(student, teacher)

    def _hs(self, score, iou):
        t = self.t
        return harmony_score(score, iou, t.HS_FORM, t.HS_ALPHA, t.HS_BETA)

    def harmony(self, rec):
        """(HS (R,) or (N, R), positive mask) from the teacher, no grad."""
        with torch.no_grad():
            if self.family == "rcnn":
                r = rec.rois
                pos = r.gt_classes < r.num_classes
                s = torch.softmax(r.t_logits, dim=1).gather(1, r.gt_classes[:, None])[:, 0]
                boxes = r.box2box_transform.apply_deltas(class_deltas(r.t_deltas, r.gt_classes), r.proposal_boxes)
                u = matched_pairwise_iou(Boxes(boxes), Boxes(r.gt_boxes))
            else:
                d = rec.dense
                pos = (d.labels >= 0) & (d.labels < d.num_classes)
                idx = d.labels.clamp(0, d.num_classes - 1)[..., None]
                s = torch.sigmoid(d.t_logits).gather(2, idx)[..., 0]
                u = dense_teacher_iou(d)
            hs = torch.where(pos, self._hs(s, u), torch.zeros_like(s))
        return hs, pos

    def forward(self, rec):
        t = self.t
        hs, pos = self.harmony(rec)
        if self.family == "rcnn":
            r = rec.rois
            target = torch.softmax(r.t_logits / t.TEMPERATURE, dim=1)
            if t.HS_TARGET:
                target = with_gt_prob(target, r.gt_classes, hs, pos)
            kl = softmax_kl_rows_to(r.logits, target, t.TEMPERATURE)
            w = torch.where(pos, hs, torch.full_like(hs, t.HD_BG_WEIGHT))
        else:
            d = rec.dense
            target = torch.sigmoid(d.t_logits / t.TEMPERATURE)
            if t.HS_TARGET:
                onehot = torch.nn.functional.one_hot(d.labels.clamp(0, d.num_classes - 1), d.num_classes).bool()
                target = torch.where(onehot & pos[..., None], hs[..., None], target)
            kl = sigmoid_kl_to(d.logits, target, t.TEMPERATURE).sum(dim=2)
            w = torch.where(pos, hs, torch.where(d.labels >= 0, torch.full_like(hs, t.HD_BG_WEIGHT),
                                                 torch.zeros_like(hs)))
        loss = batch_normalize((w * kl).sum(), hs.sum(), min_den=1)
        mean_hs = hs.sum() / pos.sum().clamp(min=1)
        return {"loss_kd_harmony": t.HD_WEIGHT * loss}, {"kd/harmony_mean": mean_hs}

    def explain(self, rec):
        hs, pos = self.harmony(rec)
        if self.family == "rcnn":
            r = rec.rois
            counts = [len(x) for x in r.instances]
            return {"boxes": {"harmony_rois": per_image(r.proposal_boxes, pos, counts)},
                    "box_values": {"harmony_rois": per_image(hs, pos, counts)}}
        return {"maps": {"harmony_score": per_location(hs, dense_level_sizes(rec))}}


@DISTILL_TERM_REGISTRY.register()
class TaskDecoupledFeatureKD(MaskedFeatureTerm):
    needs = frozenset({"same_family"})
    reads = ("TBD.LEVELS", "TBD.ADAPTER", "TBD.FEAT_WEIGHT", "TBD.*_MASK_WEIGHT", "TBD.CONF_THRESH")

    @classmethod
    def add_config(cls, d):
        add_tbd_config(d)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        t = cfg.DISTILL.TBD
        self.levels = distilled_levels(ctx, t.LEVELS, "DISTILL.TBD.LEVELS")
        tc = ctx.teacher_cfg.MODEL
        head_in = list(tc.RPN.IN_FEATURES if ctx.family == "rcnn" else tc.RETINANET.IN_FEATURES)
        bad = [lv for lv in self.levels if lv not in head_in]
        if bad:
            raise DistillConfigError(
                f"DISTILL.TBD.LEVELS {bad}: the task masks come from the teacher's "
                f"{'RPN' if ctx.family == 'rcnn' else 'RetinaNet head'}, which sees only {head_in}. "
                "List levels among those."
            )
        self.adapters = level_adapters(ctx, t.ADAPTER, self.levels, "DISTILL.TBD.ADAPTER")
        self.family = ctx.family
        if ctx.family == "dense":
            self.needs = frozenset({"heads", "same_family"})  # the teacher's dense head on the shared anchors
        self.t = t

    def check_teacher(self, student, teacher):
        if self.family == "dense":
            check_same_anchors(student, teacher)

    def task_masks(self, rec):
        """({level: M_cls (N, H, W)}, {level: M_reg (N, H, W)}) over ALL teacher head levels; no grad."""
        with torch.no_grad():
            if self.family == "rcnn":
                conf, iou, sizes = self._rpn_quality(rec)
            else:
                d = rec.dense
                conf = torch.sigmoid(d.t_logits).amax(dim=2)
                pos = (d.labels >= 0) & (d.labels < d.num_classes)
                u = dense_teacher_iou(d)
                iou = torch.where(pos, torch.nan_to_num(u, nan=0.0), torch.zeros_like(u))
                sizes = dense_level_sizes(rec)
            conf = torch.where(conf >= self.t.CONF_THRESH, conf, torch.zeros_like(conf))
            return per_location(conf, sizes), per_location(iou, sizes)

    @staticmethod
    def _rpn_quality(rec):
        """Teacher RPN on its own maps: per anchor (N, R) objectness sigmoid and IoU of the decoded box
        with the gt the RPN's matcher assigns (0 unless matched as foreground); {level: (H, W, A)}."""
        rpn = rec.teacher.proposal_generator
        feats = [rec.t_features[f] for f in rpn.in_features]
        logits, deltas = rpn.rpn_head(feats)
        anchors = rpn.anchor_generator(feats)
        sizes = {f: (*x.shape[-2:], o.shape[1]) for f, x, o in zip(rpn.in_features, feats, logits)}
        n = feats[0].shape[0]
        conf = torch.cat([o.permute(0, 2, 3, 1).flatten(1) for o in logits], dim=1).sigmoid()
        d = torch.cat([x.view(n, -1, 4, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas], dim=1)
        all_anchors = Boxes.cat(anchors)
        iou = torch.zeros_like(conf)
        for i, gt in enumerate(rec.gt_boxes):
            if gt.shape[0] == 0:
                continue
            matched, labels = rpn.anchor_matcher(pairwise_iou(Boxes(gt), all_anchors))
            boxes = rpn.box2box_transform.apply_deltas(d[i], all_anchors.tensor)
            u = matched_pairwise_iou(Boxes(boxes), Boxes(gt[matched]))
            iou[i] = torch.where(labels == 1, torch.nan_to_num(u, nan=0.0), torch.zeros_like(u))
        return conf, iou, sizes

    def masks(self, rec):
        """{level: M (N, H, W)} = b_cls M_cls + b_reg M_reg on the distilled levels."""
        m_cls, m_reg = self.task_masks(rec)
        t = self.t
        return {lv: t.CLS_MASK_WEIGHT * m_cls[lv] + t.REG_MASK_WEIGHT * m_reg[lv] for lv in self.levels}

    def forward(self, rec):
        adapted, target = self.adapted(rec), {lv: rec.t_features[lv] for lv in self.levels}
        loss = masked_feature_loss(adapted, target, self.masks(rec), "fgfi")
        return {"loss_kd_tfd": self.t.FEAT_WEIGHT * loss}, {}

    def explain(self, rec):
        m_cls, m_reg = self.task_masks(rec)
        keep = lambda m: {lv: m[lv] for lv in self.levels}  # noqa: E731
        return {"maps": {"tfd_cls_mask": keep(m_cls), "tfd_reg_mask": keep(m_reg), "tfd_mask": self.masks(rec)}}
