"""Generic terms shared by several methods.

* ``FeatureKD``: mask-weighted imitation of teacher feature maps through
  per-level adapters (TAR/FGFI with the Gaussian mask, FitNet with the full
  mask and the "mean" normalisation) -> ``loss_kd_feat``.
* ``RoIClsKD``: softmax KL on the student's sampled RoIs, scored by both box
  heads (TAR on positive RoIs, Hinton on all) -> ``loss_kd_cls``.
* ``DenseClsKD``: sigmoid (binary KL) KD on the shared anchors of RetinaNet
  -> ``loss_kd_cls``.

Method cards: docs/methods/TAR.md, Hinton.md, FitNet.md.
"""
from ..errors import DistillConfigError
from ..losses import cls_kd_gate, cls_kd_loss, kl_rows, masked_feature_loss, sigmoid_kd_loss
from ..teacher import check_same_anchors
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, FeatureTerm, check_choice


def per_image(rows, keep, counts):
    """List over images of the rows of ``rows`` (R, ...) where ``keep`` (R,); ``counts``: rows per image."""
    return [x[k] for x, k in zip(rows.split(counts), keep.split(counts))]


@DISTILL_TERM_REGISTRY.register()
class FeatureKD(FeatureTerm):
    """``loss_kd_feat = FEAT.WEIGHT * imitation(adapter_l(S_l), T_l, M_l)`` over ``FEAT.LEVELS``.

    M_l is ``FEAT.MASK`` (MASK_REGISTRY) from the gt boxes on level l; the
    normalisation is ``FEAT.NORM`` ("fgfi": sum_l sum M d^2 / (2 sum_l sum M + eps),
    "mean": per-level mean of M d^2 over N*C*H*W, averaged over levels).
    """

    reads = ("FEAT.LEVELS", "FEAT.MASK", "FEAT.GAUSSIAN_*", "FEAT.DEFEAT_*", "FEAT.NORM", "FEAT.ADAPTER", "FEAT.WEIGHT")
    legacy_prefix = "kd_adapters"
    mask_key = "FEAT.MASK"

    def __init__(self, cfg, ctx):
        f = cfg.DISTILL.FEAT
        if f.NORM == "decoupled":
            raise DistillConfigError("DISTILL.FEAT.NORM 'decoupled' is DeFeat's term: list DecoupledFeatureKD in "
                                     "DISTILL.TERMS instead of FeatureKD.")
        check_choice("DISTILL.FEAT.NORM", f.NORM, ("fgfi", "mean"))
        super().__init__(cfg, ctx)
        self.weight, self.norm = f.WEIGHT, f.NORM

    def forward(self, rec):
        loss = masked_feature_loss(self.adapted(rec), self.targets(rec), self.masks(rec), self.norm)
        return {"loss_kd_feat": self.weight * loss}, {}


class LogitTerm(DistillTerm):
    """Base of the head terms: both models' head outputs on the shared samples (``rec.get("heads")``)."""

    needs = frozenset({"heads"})


@DISTILL_TERM_REGISTRY.register()
class RoIClsKD(LogitTerm):
    """``loss_kd_cls = CLS.WEIGHT * T^2/|R| sum_{r in R, gate} KL(softmax(z_t/T) || softmax(z_s/T))``.

    R: positive sampled RoIs (``CLS.ROIS positive``, TAR) or all (``all``, Hinton);
    ``CLS.GATE teacher_better`` keeps RoIs where the teacher's gt-class
    probability beats the student's (still divided by |R|). Logs ``kd/cls_gate_frac``.
    """

    families = ("rcnn",)
    reads = ("CLS.WEIGHT", "CLS.TEMPERATURE", "CLS.ROIS", "CLS.GATE")
    #: the record entry holding the RoIs (a RoIRecord): the student's sampled RoIs
    rois = "heads"
    loss_name, picture, scalar = "loss_kd_cls", "cls_kd_rois", "kd/cls_gate_frac"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        c = cfg.DISTILL.CLS
        check_choice("DISTILL.CLS.ROIS", c.ROIS, ("positive", "all"))
        check_choice("DISTILL.CLS.GATE", c.GATE, ("none", "teacher_better"))
        self.c = c

    def forward(self, rec):
        r, c = rec.get(self.rois), self.c
        loss, frac = cls_kd_loss(r.logits, r.t_logits, r.gt_classes, r.num_classes, c.TEMPERATURE, c.ROIS, c.GATE)
        return {self.loss_name: c.WEIGHT * loss}, ({self.scalar: frac} if self.scalar else {})

    def explain(self, rec):
        """The RoIs distilled on (CLS.ROIS, passing CLS.GATE) per image, labelled with their KL."""
        r, c = rec.get(self.rois), self.c
        _, keep = cls_kd_gate(r.logits, r.t_logits, r.gt_classes, r.num_classes, c.ROIS, c.GATE)
        kl = kl_rows(r.logits, r.t_logits, c.TEMPERATURE)
        return {"boxes": {self.picture: per_image(r.proposal_boxes, keep, r.counts)},
                "box_values": {self.picture: per_image(kl, keep, r.counts)}}


@DISTILL_TERM_REGISTRY.register()
class DenseClsKD(LogitTerm):
    """``loss_kd_cls = CLS.WEIGHT * T^2 * sum_{anchors not ignored, classes} binKL(sigma(q/T) || sigma(s/T)) / max(1, #fg)``."""

    families = ("dense",)
    reads = ("CLS.WEIGHT", "CLS.TEMPERATURE")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.c = cfg.DISTILL.CLS

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher, "the head terms (DenseClsKD, DenseBoxKD)")

    def forward(self, rec):
        d = rec.get("heads")
        loss = sigmoid_kd_loss(d.logits, d.t_logits, d.labels >= 0, d.num_pos, self.c.TEMPERATURE)
        return {"loss_kd_cls": self.c.WEIGHT * loss}, {}
