"""DeFeat (Guo et al. 2021, "Distilling Object Detectors via Decoupled Features"): decoupled fg/bg features and
decoupled proposals. Its own keys are ``DISTILL.DEFEAT.*`` (old names: ``FEAT.FG_WEIGHT`` / ``FEAT.BG_WEIGHT``,
``BACKBONE.*``, ``DEFEAT_CLS.*``); the neck term shares ``FEAT.LEVELS`` / ``MASK`` / ``ADAPTER`` / ``WEIGHT``
with ``FeatureKD``. Method card: docs/methods/DeFeat.md.

* ``DecoupledFeatureKD`` -> ``loss_kd_feat_fg``, ``loss_kd_feat_bg``: per level
  ``fg_l = sum M d^2 / max(1, 2 C sum M)``, ``bg_l`` the same with ``1 - M``
  (sums over the local batch), averaged over levels, times
  ``FEAT.WEIGHT * DEFEAT.FG_WEIGHT`` / ``DEFEAT.BG_WEIGHT``. M is ``FEAT.MASK``
  (``defeat``: each box on one level by its size).
* ``DecoupledBackboneKD`` -> ``loss_kd_backbone_fg/bg``: the same loss on the
  bottom-up stages ``DEFEAT.BACKBONE_LEVELS`` with one mask from all gt boxes on the
  stride-4 grid (floor rule), nearest-resized to each stage.
* ``DecoupledProposalKD`` (Faster R-CNN) -> ``loss_kd_cls_fg/bg``: the teacher's
  RPN proposals sampled by the teacher's sampler (the record's ``"teacher_rois"``),
  scored by both box heads, separate KL means on the teacher's fg and bg RoIs, times
  ``DEFEAT.CLS_FG_WEIGHT`` / ``CLS_BG_WEIGHT``.

Presets: ``configs/synthetic/defeat_*.yaml``, ``configs/COCO-Detection/defeat_*.yaml``.
"""
from detectron2.config import CfgNode as CN

from ..losses import batch_normalize, kl_rows
from ..masks import defeat_backbone_masks
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, FeatureTerm


def add_defeat_config(d):
    """DISTILL.DEFEAT, shared by the three DeFeat terms."""
    if "DEFEAT" in d:
        return
    d.DEFEAT = CN()
    # Neck fg / bg weights (DecoupledFeatureKD; 3/12 VOC-style, 4/16 COCO-style).
    d.DEFEAT.FG_WEIGHT = 4.0
    d.DEFEAT.BG_WEIGHT = 16.0
    # Optional decoupled backbone KD (DecoupledBackboneKD): bottom-up stages, adapter, fg/bg weights.
    d.DEFEAT.BACKBONE_LEVELS = ["res3", "res4", "res5"]
    d.DEFEAT.BACKBONE_ADAPTER = "conv3x3_relu"
    d.DEFEAT.BACKBONE_FG_WEIGHT = 4.0
    d.DEFEAT.BACKBONE_BG_WEIGHT = 16.0
    # Decoupled proposals (DecoupledProposalKD): fg/bg KL weights, temperature, and a separate
    # background temperature [choice] (<= 0 means CLS_TEMPERATURE).
    d.DEFEAT.CLS_FG_WEIGHT = 2.0
    d.DEFEAT.CLS_BG_WEIGHT = 2.0
    d.DEFEAT.CLS_TEMPERATURE = 1.0
    d.DEFEAT.CLS_BG_TEMPERATURE = -1.0


class _DeFeatTerm(DistillTerm):
    @classmethod
    def add_config(cls, d):
        add_defeat_config(d)


# ------------------------------------------------------------------ loss formulas
def decoupled_feature_loss(student, teacher, masks):
    """DeFeat's decoupled imitation, pooled over the local batch.

    Per level ``fg_l = sum M (S-T)^2 / max(1, 2 C sum M)`` and ``bg_l`` the same
    with ``1 - M`` (M broadcast over the C channels, sums over N, H, W).

    Args: as :func:`masked_feature_loss`, masks binary.
    Returns:
        (mean_l fg_l, mean_l bg_l), unweighted.
    """
    fg, bg = [], []
    for lv, s in student.items():
        t, m = teacher[lv], masks[lv][:, None]
        c = s.shape[1]
        se = (s - t) ** 2
        fg.append(batch_normalize((se * m).sum(), 2 * c * m.sum(), min_den=1))
        bg.append(batch_normalize((se * (1 - m)).sum(), 2 * c * (1 - m).sum(), min_den=1))
    return sum(fg) / len(fg), sum(bg) / len(bg)


def decoupled_kl_loss(student_logits, teacher_logits, labels, num_classes, temperature=1.0, bg_temperature=None):
    """DeFeat's decoupled-proposal KD: separate KL terms on foreground and background RoIs.

    Each is ``T^2 * mean KL(p_t || p_s)`` over its own RoIs (0 when there are none).

    Args:
        labels: (R,) the teacher's RoI labels in [0, K] (K = background).
    Returns:
        (fg loss, bg loss).
    """
    fg = (labels < num_classes).to(student_logits.dtype)
    bg_t = temperature if bg_temperature is None or bg_temperature <= 0 else bg_temperature
    rows_fg = kl_rows(student_logits, teacher_logits, temperature)
    rows_bg = rows_fg if bg_t == temperature else kl_rows(student_logits, teacher_logits, bg_t)
    return (batch_normalize((rows_fg * fg).sum(), fg.sum(), min_den=1),
            batch_normalize((rows_bg * (1 - fg)).sum(), (1 - fg).sum(), min_den=1))


class _DecoupledFeatures(FeatureTerm, _DeFeatTerm):
    """(fg, bg) of :func:`decoupled_feature_loss` on the term's levels and masks."""

    def decoupled(self, rec):
        return decoupled_feature_loss(self.adapted(rec), self.targets(rec), self.masks(rec))


@DISTILL_TERM_REGISTRY.register()
class DecoupledFeatureKD(_DecoupledFeatures):
    reads = ("FEAT.LEVELS", "FEAT.MASK", "FEAT.GAUSSIAN_*", "FEAT.DEFEAT_*", "FEAT.ADAPTER", "FEAT.WEIGHT",
             "DEFEAT.FG_WEIGHT", "DEFEAT.BG_WEIGHT")
    renamed = {"FEAT.FG_WEIGHT": "DEFEAT.FG_WEIGHT", "FEAT.BG_WEIGHT": "DEFEAT.BG_WEIGHT"}
    legacy_prefix = "kd_adapters"
    mask_key = "FEAT.MASK"
    mask_picture = "defeat_fg_mask"  # (the background mask is 1 - M)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = cfg.DISTILL
        self.fg_weight, self.bg_weight = d.FEAT.WEIGHT * d.DEFEAT.FG_WEIGHT, d.FEAT.WEIGHT * d.DEFEAT.BG_WEIGHT

    def forward(self, rec):
        fg, bg = self.decoupled(rec)
        return {"loss_kd_feat_fg": self.fg_weight * fg, "loss_kd_feat_bg": self.bg_weight * bg}, {}


@DISTILL_TERM_REGISTRY.register()
class DecoupledBackboneKD(_DecoupledFeatures):
    reads = ("DEFEAT.BACKBONE_*",)
    renamed = {f"BACKBONE.{k}": f"DEFEAT.BACKBONE_{k}" for k in ("LEVELS", "ADAPTER", "FG_WEIGHT", "BG_WEIGHT")}
    legacy_prefix = "kd_bb_adapters"
    levels_key, adapter_key = "DEFEAT.BACKBONE_LEVELS", "DEFEAT.BACKBONE_ADAPTER"
    mask_picture = "backbone_fg_mask"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = cfg.DISTILL.DEFEAT
        self.fg_weight, self.bg_weight = d.BACKBONE_FG_WEIGHT, d.BACKBONE_BG_WEIGHT

    def masks(self, rec):
        return defeat_backbone_masks(rec.gt_boxes, self.grid(rec))

    def forward(self, rec):
        fg, bg = self.decoupled(rec)
        return {"loss_kd_backbone_fg": self.fg_weight * fg, "loss_kd_backbone_bg": self.bg_weight * bg}, {}


@DISTILL_TERM_REGISTRY.register()
class DecoupledProposalKD(_DeFeatTerm):
    families = ("rcnn",)
    needs = frozenset({"teacher_rois"})
    reads = ("DEFEAT.CLS_*",)
    renamed = {f"DEFEAT_CLS.{k}": f"DEFEAT.CLS_{k}" for k in ("FG_WEIGHT", "BG_WEIGHT", "TEMPERATURE", "BG_TEMPERATURE")}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.d = cfg.DISTILL.DEFEAT

    def forward(self, rec):
        d, r = self.d, rec.get("teacher_rois")  # the teacher's proposals, sampled by the teacher's sampler
        fg, bg = decoupled_kl_loss(r.logits, r.t_logits, r.gt_classes, r.num_classes, d.CLS_TEMPERATURE,
                                   d.CLS_BG_TEMPERATURE)
        return {"loss_kd_cls_fg": d.CLS_FG_WEIGHT * fg, "loss_kd_cls_bg": d.CLS_BG_WEIGHT * bg}, {}
