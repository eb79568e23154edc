"""CWD (Shu et al., ICCV 2021, "Channel-wise Knowledge Distillation for Dense Prediction"), as MMRazor's
``ChannelWiseDivergence`` (the reference code). The method card docs/methods/CWD.md is the reference.

Each channel's spatial map is a distribution: for S, T of shape (N, C, H, W),
``p = softmax over the H*W positions of X_{n,c} / tau`` and

    CWD(S, T) = tau^2 * sum_{n,c} sum_{hw} p_T (log p_T - log p_S) / (N C)

(forward KL(T || S), summed over pixels, averaged over images and channels; the N C normaliser is
summed over processes, :func:`~distill_d2.losses.batch_normalize`).

* ``ChannelWiseFeatureKD`` -> ``loss_kd_cwd`` (both detectors): ``CWD.WEIGHT * sum_l CWD(A_l(S_l), T_l)``
  over the FPN levels ``CWD.LEVELS`` (paired by name, equal strides checked at build; the maps must
  have equal sizes). ``CWD.ADAPTER``: ``identity`` (the reference has none) or a 1x1 conv for unequal
  widths. ``CWD.NORM affine_free``: both maps first go through an affine-free BatchNorm in training mode
  (per channel over (N, H, W), biased variance, eps 1e-5; statistics of the whole batch over all
  processes), as DAMO-YOLO does before CWD. Logs ``kd/cwd_<level>``.
* ``ChannelWiseLogitKD`` -> ``loss_kd_cwd_logit`` (RetinaNet): the same divergence on the two heads'
  class logits per head level, (N, A*K, H, W) (each of the A*K channels a map), tapped from
  ``head.cls_score`` of both models: ``CWD.LOGIT_WEIGHT * sum_l CWD(S_l, T_l)`` at ``CWD.LOGIT_TAU``.
  Logs ``kd/cwd_logit_<level>``.

Presets: ``configs/synthetic/cwd_*.yaml``, ``configs/COCO-Detection/cwd_*.yaml``.
"""
import torch.nn.functional as F
from detectron2.config import CfgNode as CN

from ..errors import DistillConfigError
from ..losses import batch_normalize, standardize_channels
from ..record import Tap
from ..teacher import check_same_anchors
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, FeatureTerm, check_choice, distilled_levels

NORMS = ("none", "affine_free")
#: eps of the affine-free normalisation (BatchNorm2d's default, inside the square root) [code: DAMO-YOLO]
BN_EPS = 1e-5


def add_cwd_config(d):
    """DISTILL.CWD, shared by the two CWD terms."""
    if "CWD" in d:
        return
    d.CWD = CN()
    # Feature variant (ChannelWiseFeatureKD). FPN levels, paired by name (equal strides checked at build).
    # Default: all five neck outputs of Faster R-CNN, p2-p6 (p6 the max-pooled level) [code: MMRazor 1.x cwd
    # configs, neck outputs 0-4]; RetinaNet presets p3-p7.
    d.CWD.LEVELS = ["p2", "p3", "p4", "p5", "p6"]
    # Student->teacher adapter per level (ADAPTER_REGISTRY). "identity": the reference has none and needs
    # equal channels [code]; "conv1x1" for pairs of unequal widths [choice].
    d.CWD.ADAPTER = "identity"
    # Temperature tau of the spatial softmax (the loss is multiplied by tau^2) [code: MMRazor, tau 1].
    d.CWD.TAU = 1.0
    # Weight of loss_kd_cwd; every level carries the full weight (summed over levels) [code: MMRazor 1.x
    # FPN configs, 10 per level; Paddle's RetinaNet uses 5].
    d.CWD.WEIGHT = 10.0
    # Normalisation of both maps before the softmax: "none" (MMRazor) [code] or "affine_free" (an
    # affine-free BatchNorm in training mode, per channel over (N, H, W), whole batch of all processes:
    # DAMO-YOLO's BatchNorm2d(affine=False) on student and teacher) [code: DAMO-YOLO]. Only the per-channel
    # scale matters (the softmax ignores a per-channel shift): it evens out teacher/student magnitudes.
    d.CWD.NORM = "none"
    # Logit variant (ChannelWiseLogitKD, RetinaNet): weight of loss_kd_cwd_logit, every head level carrying
    # the full weight [code: MMRazor 0.x cwd_cls_head_gfl config, 5 on GFL's class logits], and its
    # temperature [code: 1].
    d.CWD.LOGIT_WEIGHT = 5.0
    d.CWD.LOGIT_TAU = 1.0


def check_tau(key, tau):
    if not tau > 0:
        raise DistillConfigError(f"{key} = {tau!r}: the softmax temperature must be > 0 (the reference uses 1.0).")


# ------------------------------------------------------------------ loss formula
def channel_wise_divergence(student, teacher, tau=1.0):
    """CWD of one tensor pair: ``tau^2 * sum_{n,c,hw} p_T (log p_T - log p_S) / (N C)``.

    Args:
        student, teacher: (N, C, H, W), equal shapes (teacher without grad).
        tau: temperature of the softmax over the H*W positions of each (n, c).
    Returns:
        0-dim loss (the N C normaliser summed over processes).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"CWD: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}: the maps must "
                         "have equal shapes (channels: a student adapter, DISTILL.CWD.ADAPTER; sizes: equal strides "
                         "and padded inputs).")
    n, c = student.shape[:2]
    log_p_s = F.log_softmax(student.flatten(2) / tau, dim=2)
    log_p_t = F.log_softmax(teacher.flatten(2) / tau, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() * tau ** 2
    return batch_normalize(kl, n * c)


def pixel_divergence(student, teacher, tau=1.0):
    """(N, H, W): ``tau^2 * mean_c p_T (log p_T - log p_S)`` per position (what CWD sums, for pictures)."""
    log_p_s = F.log_softmax(student.flatten(2) / tau, dim=2)
    log_p_t = F.log_softmax(teacher.flatten(2) / tau, dim=2)
    per = (log_p_t.exp() * (log_p_t - log_p_s)).mean(dim=1) * tau ** 2
    return per.view(student.shape[0], *student.shape[2:])


class _CWDTerm(DistillTerm):
    @classmethod
    def add_config(cls, d):
        add_cwd_config(d)


@DISTILL_TERM_REGISTRY.register()
class ChannelWiseFeatureKD(FeatureTerm, _CWDTerm):
    """loss_kd_cwd = CWD.WEIGHT * sum_l CWD(A_l(S_l), T_l) on FPN levels (optionally both affine-free normalised)."""

    reads = ("CWD.LEVELS", "CWD.ADAPTER", "CWD.TAU", "CWD.WEIGHT", "CWD.NORM")
    levels_key, adapter_key = "CWD.LEVELS", "CWD.ADAPTER"

    def __init__(self, cfg, ctx):
        c = cfg.DISTILL.CWD
        check_tau("DISTILL.CWD.TAU", c.TAU)
        check_choice("DISTILL.CWD.NORM", c.NORM, NORMS)
        if c.ADAPTER == "identity":
            levels = distilled_levels(ctx, c.LEVELS, "DISTILL.CWD.LEVELS")
            bad = [f"{lv} (student {ctx.student_shapes[lv].channels}, teacher {ctx.teacher_shapes[lv].channels})"
                   for lv in levels if ctx.student_shapes[lv].channels != ctx.teacher_shapes[lv].channels]
            if bad:
                raise DistillConfigError(
                    "DISTILL.CWD.ADAPTER identity needs equal channel counts (CWD has no adapter in the reference), "
                    f"but they differ on {', '.join(bad)}: set DISTILL.CWD.ADAPTER conv1x1.")
        super().__init__(cfg, ctx)
        self.weight, self.tau, self.norm = c.WEIGHT, c.TAU, c.NORM

    def pairs(self, rec):
        """{level: (student, teacher)} as compared: adapted, and normalised with ``NORM affine_free``."""
        s, t = self.adapted(rec), self.targets(rec)
        if self.norm == "none":
            return {lv: (s[lv], t[lv]) for lv in self.levels}
        k = len(self.levels)
        maps = standardize_channels([s[lv] for lv in self.levels] + [t[lv] for lv in self.levels], eps=BN_EPS,
                                    unbiased=False, eps_inside=True)
        return {lv: (maps[i], maps[k + i]) for i, lv in enumerate(self.levels)}

    def forward(self, rec):
        losses = {lv: channel_wise_divergence(s, t, self.tau) for lv, (s, t) in self.pairs(rec).items()}
        scalars = {f"kd/cwd_{lv}": v.detach() for lv, v in losses.items()}
        return {"loss_kd_cwd": self.weight * sum(losses.values())}, scalars

    def explain(self, rec):
        """``cwd_divergence``: {level: (N, H, W)} per-position divergence, mean over channels."""
        return {"maps": {"cwd_divergence": {lv: pixel_divergence(s, t, self.tau)
                                            for lv, (s, t) in self.pairs(rec).items()}}}


@DISTILL_TERM_REGISTRY.register()
class ChannelWiseLogitKD(_CWDTerm):
    """loss_kd_cwd_logit = CWD.LOGIT_WEIGHT * sum_l CWD(cls_score_S(l), cls_score_T(l)) over the head levels."""

    families = ("dense",)
    reads = ("CWD.LOGIT_*",)
    student_logits = Tap("student", "head.cls_score")
    teacher_logits = Tap("teacher", "head.cls_score")
    # "heads": the teacher's head runs (its cls_score is tapped in that pass)
    needs = frozenset({"heads", student_logits, teacher_logits})

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        c = cfg.DISTILL.CWD
        check_tau("DISTILL.CWD.LOGIT_TAU", c.LOGIT_TAU)
        self.weight, self.tau = c.LOGIT_WEIGHT, c.LOGIT_TAU
        self.levels = list(cfg.MODEL.RETINANET.IN_FEATURES)  # the head's levels, in its call order

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher, "ChannelWiseLogitKD")

    def logit_pairs(self, rec):
        """{head level: (student logits, teacher logits)}, (N, A*K, H, W) each."""
        s, t = rec.get(self.student_logits), rec.get(self.teacher_logits)
        if not len(s) == len(t) == len(self.levels):
            raise RuntimeError(f"ChannelWiseLogitKD: {len(s)} student and {len(t)} teacher cls_score outputs for "
                               f"the head levels {self.levels}.")
        return dict(zip(self.levels, zip(s, t)))

    def forward(self, rec):
        losses = {lv: channel_wise_divergence(s, t, self.tau) for lv, (s, t) in self.logit_pairs(rec).items()}
        scalars = {f"kd/cwd_logit_{lv}": v.detach() for lv, v in losses.items()}
        return {"loss_kd_cwd_logit": self.weight * sum(losses.values())}, scalars

    def explain(self, rec):
        """``cwd_logit_divergence``: {head level: (N, H, W)} per-position divergence, mean over the A*K channels."""
        return {"maps": {"cwd_logit_divergence": {lv: pixel_divergence(s, t, self.tau)
                                                  for lv, (s, t) in self.logit_pairs(rec).items()}}}
