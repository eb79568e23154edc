"""Generic terms shared by several methods.

* ``FeatureKD``: mask-weighted imitation of teacher feature maps through
  per-level adapters (TAR/FGFI with the Gaussian mask, FitNet with the full
  mask) -> ``loss_kd_feat``.
* ``RoIClsKD``: softmax KL on the student's sampled RoIs, scored by both box
  heads (TAR on positive RoIs, Hinton on all) -> ``loss_kd_cls``.
* ``DenseClsKD``: sigmoid (binary KL) KD on the shared anchors of RetinaNet
  -> ``loss_kd_cls``.
"""
from ..losses import cls_kd_gate, cls_kd_loss, kl_rows, masked_feature_loss, sigmoid_kd_loss
from ..masks import MASK_REGISTRY, build_masks
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, check_choice, distilled_levels, level_adapters


def check_mask(key, name):
    check_choice(key, name, sorted(k for k, _ in MASK_REGISTRY))


def per_image(rows, keep, counts):
    """List over images of the rows of ``rows`` (R, ...) where ``keep`` (R,); ``counts``: rows per image."""
    return [x[k] for x, k in zip(rows.split(counts), keep.split(counts))]


class MaskedFeatureTerm(DistillTerm):
    """Base of the feature terms: ``levels``, ``adapters``, the ``FEAT`` node ``cfg`` (set by the subclass) and
    a spatial mask per level (``masks``), which ``explain`` shows as the picture ``mask_picture``."""

    mask_picture = "feat_mask"

    def masks(self, rec):
        """{level: (N, H_l, W_l)}: ``cfg.MASK`` (MASK_REGISTRY) from the gt boxes."""
        return build_masks(self.cfg.MASK, rec.gt_boxes, rec.level_shapes(self.levels), self.cfg)

    def adapted(self, rec):
        """{level: adapter_l(S_l)}, the student's maps in the teacher's channels."""
        return {lv: self.adapters[lv](rec.features[lv]) for lv in self.levels}

    def explain(self, rec):
        return {"maps": {self.mask_picture: self.masks(rec)}}


@DISTILL_TERM_REGISTRY.register()
class FeatureKD(MaskedFeatureTerm):
    """``loss_kd_feat = FEAT.WEIGHT * imitation(adapter_l(S_l), T_l, M_l)`` over ``FEAT.LEVELS``.

    M_l is ``FEAT.MASK`` (MASK_REGISTRY) from the gt boxes on level l; the
    normalisation is ``FEAT.NORM`` ("fgfi": sum_l sum M d^2 / (2 sum_l sum M + eps),
    "mean": per-level mean of M d^2 over N*C*H*W, averaged over levels).
    """

    reads = ("FEAT.LEVELS", "FEAT.MASK", "FEAT.GAUSSIAN_*", "FEAT.DEFEAT_*", "FEAT.NORM", "FEAT.ADAPTER", "FEAT.WEIGHT")
    legacy_prefix = "kd_adapters"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        f = cfg.DISTILL.FEAT
        check_mask("DISTILL.FEAT.MASK", f.MASK)
        if f.NORM == "decoupled":
            raise ValueError("DISTILL.FEAT.NORM 'decoupled' is DeFeat's term: list DecoupledFeatureKD in "
                             "DISTILL.TERMS instead of FeatureKD.")
        check_choice("DISTILL.FEAT.NORM", f.NORM, ("fgfi", "mean"))
        self.levels = distilled_levels(ctx, f.LEVELS, "DISTILL.FEAT.LEVELS")
        self.adapters = level_adapters(ctx, f.ADAPTER, self.levels, "DISTILL.FEAT.ADAPTER")
        self.cfg, self.weight, self.norm = f, f.WEIGHT, f.NORM

    def forward(self, rec):
        target = {lv: rec.t_features[lv] for lv in self.levels}
        return {"loss_kd_feat": self.weight * masked_feature_loss(self.adapted(rec), target, self.masks(rec),
                                                                  self.norm)}, {}


@DISTILL_TERM_REGISTRY.register()
class RoIClsKD(DistillTerm):
    """``loss_kd_cls = CLS.WEIGHT * T^2/|R| sum_{r in R, gate} KL(softmax(z_t/T) || softmax(z_s/T))``.

    R: positive sampled RoIs (``CLS.ROIS positive``, TAR) or all (``all``, Hinton);
    ``CLS.GATE teacher_better`` keeps RoIs where the teacher's gt-class
    probability beats the student's (still divided by |R|). Logs ``kd/cls_gate_frac``.
    """

    families = ("rcnn",)
    needs = frozenset({"heads"})
    reads = ("CLS.WEIGHT", "CLS.TEMPERATURE", "CLS.ROIS", "CLS.GATE")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        c = cfg.DISTILL.CLS
        check_choice("DISTILL.CLS.ROIS", c.ROIS, ("positive", "all"))
        check_choice("DISTILL.CLS.GATE", c.GATE, ("none", "teacher_better"))
        self.c = c

    def forward(self, rec):
        r, c = rec.rois, self.c
        loss, frac = cls_kd_loss(r.logits, r.t_logits, r.gt_classes, r.num_classes, c.TEMPERATURE, c.ROIS, c.GATE)
        return {"loss_kd_cls": c.WEIGHT * loss}, {"kd/cls_gate_frac": frac}

    def explain(self, rec):
        r = rec.rois
        return self._explain_rois("cls_kd_rois", r.logits, r.t_logits, r.gt_classes, r.num_classes,
                                  r.proposal_boxes, [len(x) for x in r.instances])

    def _explain_rois(self, name, logits, t_logits, gt_classes, num_classes, boxes, counts):
        """The RoIs distilled on (CLS.ROIS, passing CLS.GATE) per image, labelled with their KL."""
        c = self.c
        _, keep = cls_kd_gate(logits, t_logits, gt_classes, num_classes, c.ROIS, c.GATE)
        kl = kl_rows(logits, t_logits, c.TEMPERATURE)
        return {"boxes": {name: per_image(boxes, keep, counts)}, "box_values": {name: per_image(kl, keep, counts)}}


@DISTILL_TERM_REGISTRY.register()
class DenseClsKD(DistillTerm):
    """``loss_kd_cls = CLS.WEIGHT * T^2 * sum_{anchors not ignored, classes} binKL(sigma(q/T) || sigma(s/T)) / max(1, #fg)``."""

    families = ("dense",)
    needs = frozenset({"heads"})
    reads = ("CLS.WEIGHT", "CLS.TEMPERATURE")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.c = cfg.DISTILL.CLS

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher)

    def forward(self, rec):
        d = rec.dense
        loss = sigmoid_kd_loss(d.logits, d.t_logits, d.labels >= 0, d.num_pos, self.c.TEMPERATURE)
        return {"loss_kd_cls": self.c.WEIGHT * loss}, {}


def check_same_anchors(student, teacher):
    """Dense-head KD compares predictions anchor by anchor: same anchors on the same levels."""
    import torch

    from ..teacher import TeacherError

    s_ag, t_ag = student.anchor_generator, teacher.anchor_generator
    s_levels = [student.backbone.output_shape()[f].stride for f in student.head_in_features]
    t_levels = [teacher.backbone.output_shape()[f].stride for f in teacher.head_in_features]
    same = (
        s_levels == t_levels
        and list(s_ag.strides) == list(t_ag.strides)
        and s_ag.offset == t_ag.offset
        and len(s_ag.cell_anchors) == len(t_ag.cell_anchors)
        and all(a.shape == b.shape and torch.allclose(a.cpu(), b.cpu())
                for a, b in zip(s_ag.cell_anchors, t_ag.cell_anchors))
    )
    if not same:
        raise TeacherError(
            "RetinaNet head KD compares predictions anchor by anchor, but teacher and student anchors differ "
            f"(student head strides {s_levels}, teacher {t_levels}; cell anchors per level "
            f"{[tuple(a.shape) for a in s_ag.cell_anchors]} vs {[tuple(a.shape) for a in t_ag.cell_anchors]}). "
            "Use the same MODEL.ANCHOR_GENERATOR (SIZES, ASPECT_RATIOS, OFFSET) and MODEL.RETINANET.IN_FEATURES, "
            "or remove the head terms (DenseClsKD, DenseBoxKD) from DISTILL.TERMS."
        )
