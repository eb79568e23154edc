"""DeFeat (Guo et al. 2021): decoupled foreground/background features and decoupled proposals.

* ``DecoupledFeatureKD`` -> ``loss_kd_feat_fg``, ``loss_kd_feat_bg``: per level
  ``fg_l = sum M d^2 / max(1, 2 C sum M)``, ``bg_l`` the same with ``1 - M``
  (sums over the local batch), averaged over levels, times
  ``FEAT.WEIGHT * FEAT.FG_WEIGHT`` / ``FEAT.BG_WEIGHT``. M is ``FEAT.MASK``
  (``defeat``: each box on one level by its size).
* ``DecoupledBackboneKD`` -> ``loss_kd_backbone_fg/bg``: the same loss on the
  bottom-up stages ``BACKBONE.LEVELS`` with one mask from all gt boxes on the
  stride-4 grid (floor rule), nearest-resized to each stage.
* ``DecoupledProposalKD`` (Faster R-CNN) -> ``loss_kd_cls_fg/bg``: the teacher's
  RPN proposals sampled by the teacher's sampler, scored by both box heads,
  separate KL means on the teacher's fg and bg RoIs, times ``DEFEAT_CLS.*_WEIGHT``.

Presets: ``configs/synthetic/defeat_*.yaml``, ``configs/COCO-Detection/defeat_*.yaml``.
"""
from detectron2.config import CfgNode as CN

from ..losses import decoupled_feature_loss, decoupled_kl_loss
from ..masks import defeat_backbone_masks
from ..modeling.rcnn import score_teacher_rois
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, distilled_levels, level_adapters
from .generic import MaskedFeatureTerm, check_mask


def _decoupled(term, rec):
    """(fg, bg) of :func:`decoupled_feature_loss` on ``term``'s levels with ``term.masks(rec)``."""
    return decoupled_feature_loss(term.adapted(rec), {lv: rec.t_features[lv] for lv in term.levels}, term.masks(rec))


@DISTILL_TERM_REGISTRY.register()
class DecoupledFeatureKD(MaskedFeatureTerm):
    reads = ("FEAT.LEVELS", "FEAT.MASK", "FEAT.GAUSSIAN_*", "FEAT.DEFEAT_*", "FEAT.ADAPTER", "FEAT.WEIGHT",
             "FEAT.FG_WEIGHT", "FEAT.BG_WEIGHT")
    legacy_prefix = "kd_adapters"
    mask_picture = "defeat_fg_mask"  # (the background mask is 1 - M)

    @classmethod
    def add_config(cls, d):
        # DeFeat foreground / background weights (3/12 VOC-style, 4/16 COCO-style).
        d.FEAT.FG_WEIGHT = 4.0
        d.FEAT.BG_WEIGHT = 16.0

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        f = cfg.DISTILL.FEAT
        check_mask("DISTILL.FEAT.MASK", f.MASK)
        self.levels = distilled_levels(ctx, f.LEVELS, "DISTILL.FEAT.LEVELS")
        self.adapters = level_adapters(ctx, f.ADAPTER, self.levels, "DISTILL.FEAT.ADAPTER")
        self.cfg = f

    def forward(self, rec):
        f = self.cfg
        fg, bg = _decoupled(self, rec)
        return {"loss_kd_feat_fg": f.WEIGHT * f.FG_WEIGHT * fg, "loss_kd_feat_bg": f.WEIGHT * f.BG_WEIGHT * bg}, {}


@DISTILL_TERM_REGISTRY.register()
class DecoupledBackboneKD(MaskedFeatureTerm):
    reads = ("BACKBONE.*",)
    legacy_prefix = "kd_bb_adapters"
    mask_picture = "backbone_fg_mask"

    @classmethod
    def add_config(cls, d):
        # DeFeat's optional decoupled backbone KD: bottom-up stages, adapters and fg/bg weights.
        d.BACKBONE = CN()
        d.BACKBONE.LEVELS = ["res3", "res4", "res5"]
        d.BACKBONE.ADAPTER = "conv3x3_relu"
        d.BACKBONE.FG_WEIGHT = 4.0
        d.BACKBONE.BG_WEIGHT = 16.0

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        b = cfg.DISTILL.BACKBONE
        self.levels = distilled_levels(ctx, b.LEVELS, "DISTILL.BACKBONE.LEVELS")
        self.adapters = level_adapters(ctx, b.ADAPTER, self.levels, "DISTILL.BACKBONE.ADAPTER")
        self.b = b

    def masks(self, rec):
        return defeat_backbone_masks(rec.gt_boxes, rec.level_shapes(self.levels))

    def forward(self, rec):
        fg, bg = _decoupled(self, rec)
        return {"loss_kd_backbone_fg": self.b.FG_WEIGHT * fg, "loss_kd_backbone_bg": self.b.BG_WEIGHT * bg}, {}


@DISTILL_TERM_REGISTRY.register()
class DecoupledProposalKD(DistillTerm):
    families = ("rcnn",)
    needs = frozenset({"same_family"})
    reads = ("DEFEAT_CLS.*",)

    @classmethod
    def add_config(cls, d):
        # DeFeat decoupled proposals: fg/bg KL weights, temperature, and a separate
        # background temperature [choice] (<= 0 means TEMPERATURE).
        d.DEFEAT_CLS = CN()
        d.DEFEAT_CLS.FG_WEIGHT = 2.0
        d.DEFEAT_CLS.BG_WEIGHT = 2.0
        d.DEFEAT_CLS.TEMPERATURE = 1.0
        d.DEFEAT_CLS.BG_TEMPERATURE = -1.0

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.d = cfg.DISTILL.DEFEAT_CLS

    def forward(self, rec):
        d = self.d
        s_scores, t_scores, labels, _ = score_teacher_rois(rec, rec.teacher.roi_heads)  # the teacher's sampler
        fg, bg = decoupled_kl_loss(s_scores, t_scores, labels, rec.student.roi_heads.num_classes, d.TEMPERATURE,
                                   d.BG_TEMPERATURE)
        return {"loss_kd_cls_fg": d.FG_WEIGHT * fg, "loss_kd_cls_bg": d.BG_WEIGHT * bg}, {}
