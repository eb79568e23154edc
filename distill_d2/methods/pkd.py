"""PKD (Cao et al., NeurIPS 2022, "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient"), as MMRazor's ``PKDLoss`` (the reference).
Method card: docs/methods/PKD.md.

* ``PearsonFeatureKD`` -> ``loss_kd_pkd``: per FPN level l of ``PKD.LEVELS`` (paired by name, equal
  strides checked at build), both maps standardised per channel over (N, H, W),
  ``X^ = (X - mu_c) / (sigma_c + 1e-6)`` (sigma the unbiased std), then
  ``L_l = mean_{n,c,h,w} (S^ - T^)^2 / 2`` (about 1 - the Pearson r of each channel, in [0, 2], blind to
  the features' scale); ``loss = PKD.WEIGHT * sum_l L_l``. ``PKD.STATS global`` (default) takes mu and
  sigma over the whole batch of all processes (the moments are all-reduced, differentiably), so N
  processes optimise the single-process objective; ``per_process`` takes them over each process's
  images, as the reference does per GPU. The student's map goes through ``PKD.ADAPTER`` (``identity``:
  the reference has none) and is resized (bilinear) to the teacher's size if they differ.
  Logs ``kd/pkd_<level>`` (each L_l, unweighted).

Presets: ``configs/synthetic/pkd_*.yaml``, ``configs/COCO-Detection/pkd_*.yaml``.
"""
from detectron2.config import CfgNode as CN

from ..errors import DistillConfigError
from ..losses import batch_normalize, standardize_channels
from ..terms import DISTILL_TERM_REGISTRY, FeatureTerm, check_choice, distilled_levels

STATS = ("global", "per_process")


# ------------------------------------------------------------------ loss formula
def pearson_feature_losses(student, teacher, stats="global", eps=1e-6):
    """PKD per level: ``L_l = mean_{n,c,h,w} (S^ - T^)^2 / 2`` on per-channel standardised maps.

    Args:
        student, teacher: {level: (N, C, H, W)} of equal shapes (student adapted and resized).
        stats: "global": statistics and the element count of the mean over all processes' images
            (:func:`channel_moments` with sync, :func:`~distill_d2.losses.batch_normalize`);
            "per_process": both over this process's images only (the reference's per-GPU behaviour).
    Returns:
        {level: 0-dim loss}.
    """
    check_choice("DISTILL.PKD.STATS", stats, STATS)
    levels = list(student)
    for lv in levels:
        if student[lv].shape != teacher[lv].shape:
            raise ValueError(f"PKD level {lv}: student {tuple(student[lv].shape)} vs teacher "
                             f"{tuple(teacher[lv].shape)} after the adapter (DISTILL.PKD.ADAPTER).")
    sync = stats == "global"
    maps = standardize_channels([student[lv] for lv in levels] + [teacher[lv] for lv in levels], eps, sync=sync)
    out = {}
    for i, lv in enumerate(levels):
        se = ((maps[i] - maps[len(levels) + i]) ** 2).sum() / 2
        out[lv] = batch_normalize(se, student[lv].numel()) if sync else se / student[lv].numel()
    return out


@DISTILL_TERM_REGISTRY.register()
class PearsonFeatureKD(FeatureTerm):
    """loss_kd_pkd = PKD.WEIGHT * sum_l mean (S^_l - T^_l)^2 / 2, X^ = per-channel standardised X."""

    reads = ("PKD.*",)
    levels_key, adapter_key = "PKD.LEVELS", "PKD.ADAPTER"
    resize = True  # the reference resizes the student's map to the teacher's (bilinear) when sizes differ

    @classmethod
    def add_config(cls, d):
        d.PKD = CN()
        # FPN levels, paired by name (equal strides checked at build), finest first. Default: the
        # reference's Faster R-CNN levels, mmdet neck outputs 0-3 = p2-p5 [code: MMRazor pkd configs];
        # RetinaNet presets p3-p6 (the reference skips p7), p7 may be added.
        d.PKD.LEVELS = ["p2", "p3", "p4", "p5"]
        # Student->teacher adapter per level (ADAPTER_REGISTRY). "identity": the reference has none and
        # needs equal channels [code]; "conv1x1" for pairs of unequal widths [choice].
        d.PKD.ADAPTER = "identity"
        # Weight of loss_kd_pkd (each level carries the full weight, summed over levels): 6 is the
        # reference's Faster R-CNN weight, 10 its RetinaNet one [code: MMRazor pkd configs].
        d.PKD.WEIGHT = 6.0
        # Where the per-channel mean / std come from: "global" = the whole batch over all processes
        # (moments all-reduced: the same objective on any number of processes) [choice];
        # "per_process" = each process's own images (the reference: per GPU, batch 2) [code].
        d.PKD.STATS = "global"

    def __init__(self, cfg, ctx):
        p = cfg.DISTILL.PKD
        check_choice("DISTILL.PKD.STATS", p.STATS, STATS)
        if p.ADAPTER == "identity":
            levels = distilled_levels(ctx, p.LEVELS, "DISTILL.PKD.LEVELS")
            bad = [f"{lv} (student {ctx.student_shapes[lv].channels}, teacher {ctx.teacher_shapes[lv].channels})"
                   for lv in levels if ctx.student_shapes[lv].channels != ctx.teacher_shapes[lv].channels]
            if bad:
                raise DistillConfigError(
                    "DISTILL.PKD.ADAPTER identity needs equal channel counts (PKD has no adapter in the reference), "
                    f"but they differ on {', '.join(bad)}: set DISTILL.PKD.ADAPTER conv1x1.")
        super().__init__(cfg, ctx)
        self.weight, self.stats = p.WEIGHT, p.STATS

    def level_losses(self, rec):
        """{level: L_l} (unweighted) on ``rec``."""
        return pearson_feature_losses(self.adapted(rec), self.targets(rec), self.stats)

    def forward(self, rec):
        losses = self.level_losses(rec)
        scalars = {f"kd/pkd_{lv}": v.detach() for lv, v in losses.items()}
        return {"loss_kd_pkd": self.weight * sum(losses.values())}, scalars

    def explain(self, rec):
        """``pkd_error``: {level: (N, H, W)} mean over channels of (S^ - T^)^2 / 2 (what L_l averages)."""
        s, t = self.adapted(rec), self.targets(rec)
        maps = standardize_channels([s[lv] for lv in self.levels] + [t[lv] for lv in self.levels],
                                    sync=self.stats == "global")
        k = len(self.levels)
        return {"maps": {"pkd_error": {lv: ((maps[i] - maps[k + i]) ** 2).mean(dim=1) / 2
                                       for i, lv in enumerate(self.levels)}}}
