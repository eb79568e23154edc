"""HGD (Qin et al., ICME 2021, "Hands-on Guidance for Distilling Object Detectors"): all-stage features.

Only the abstract is public: distil the whole feature hierarchy with (a)
correspondence between stages, (b) a hands-on imitation loss and (c) micro and
macro re-weighting. Everything below is our reconstruction, every choice a key
of ``DISTILL.HGD``; the method card docs/methods/HGD.md is the reference.

* ``HierarchicalFeatureKD`` -> ``loss_kd_hgd``:
  (a) each stage in ``HGD.LEVELS`` (bottom-up ``res2..res5`` and FPN ``p2..p7``,
  captured from the one backbone pass) is paired with the teacher's stage of
  the same name and stride, through a per-stage adapter (``HGD.ADAPTER``,
  default 1x1 conv + BN: R18/R34 students have 64..512 channels, R50/R101
  teachers 256..2048); an adapted map of another size is resized (bilinear).
  (b) ``L_k = sum W_k (A_k(S_k) - T_k)^2 / (C_t sum W_k + eps)`` over the batch.
  (c) micro: ``W = FG_WEIGHT * M_fg + BG_WEIGHT * (1 - M)`` with M the binary
  gt-box mask and M_fg = M, or with ``AREA_BALANCE`` the per-box 1/area
  weights (every box the same total weight); macro: ``loss = WEIGHT *
  mean_k(c_k L_k)`` with ``c_k = STAGE_WEIGHTS[k]`` ("fixed") or ``c_k =
  mean_j(m_j) / m_k`` ("running_mean"), m_k a detached exponential running
  mean of L_k (momentum ``MOMENTUM``, averaged over processes), so every stage
  contributes alike while the total keeps the raw losses' scale.
  Logs ``kd/hgd_<stage>`` (each L_k) and ``kd/hgd_scale_<stage>`` (c_k).

Presets: ``configs/synthetic/hgd_*.yaml``, ``configs/COCO-Detection/hgd_*.yaml``.
"""
import torch
import torch.distributed as dist
from detectron2.config import CfgNode as CN

from ..errors import DistillConfigError
from ..losses import batch_normalize
from ..masks import area_balanced_box_mask, box
from ..terms import DISTILL_TERM_REGISTRY, FeatureTerm, check_choice

MACRO = ("fixed", "running_mean")


# ------------------------------------------------------------------ loss formulas
def channel_normalized_loss(student, teacher, weights, eps=1e-6):
    """HGD's hands-on imitation of one stage: ``sum W (S-T)^2 / (C_t * sum W + eps)``.

    Dividing by the teacher's channel count makes stages of 64 and 2048 channels comparable
    (the loss is a weighted per-element mean). Sums over the local batch; the denominator
    goes through :func:`batch_normalize`.

    Args:
        student: (N, C_t, H, W) adapted student map; teacher: (N, C_t, H, W); weights: (N, H, W) >= 0.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"HGD stage: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)} after adapter.")
    num = ((student - teacher) ** 2 * weights[:, None]).sum()
    return batch_normalize(num, teacher.shape[1] * weights.sum(), eps=eps)


@DISTILL_TERM_REGISTRY.register()
class HierarchicalFeatureKD(FeatureTerm):
    reads = ("HGD.*",)
    levels_key, adapter_key = "HGD.LEVELS", "HGD.ADAPTER"
    resize = True  # an adapted map of another size is resized to the teacher's (bilinear)
    mask_picture = "hgd_weight"

    @classmethod
    def add_config(cls, d):
        d.HGD = CN()
        # Stages to distil, paired with the teacher's stage of the same name and stride [choice]:
        # bottom-up res2..res5 and FPN levels (RetinaNet: res3..res5 + p3..p7).
        d.HGD.LEVELS = ["res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"]
        # Student->teacher adapter per stage (ADAPTER_REGISTRY) [choice: 1x1 conv + BN].
        d.HGD.ADAPTER = "conv1x1_bn"
        # Overall weight of loss_kd_hgd.
        d.HGD.WEIGHT = 1.0
        # Micro weights [choice]: W = FG_WEIGHT * M_fg + BG_WEIGHT * (1 - M), M the gt-box mask.
        d.HGD.FG_WEIGHT = 1.0
        d.HGD.BG_WEIGHT = 0.5
        # Per-box 1/area balancing of M_fg (every box the same total weight) [choice, off].
        d.HGD.AREA_BALANCE = False
        # Macro weights [choice]: "fixed" (STAGE_WEIGHTS) or "running_mean" (each stage divided by
        # a detached running mean of its own loss, times the mean of those means).
        d.HGD.MACRO = "running_mean"
        # "fixed": one weight per entry of LEVELS (empty: all 1).
        d.HGD.STAGE_WEIGHTS = []
        # "running_mean": momentum of the exponential running mean.
        d.HGD.MOMENTUM = 0.99

    def __init__(self, cfg, ctx):
        h = cfg.DISTILL.HGD
        check_choice("DISTILL.HGD.MACRO", h.MACRO, MACRO)
        super().__init__(cfg, ctx)
        #: (stage, stride, student channels, teacher channels), finest first
        self.pairs = [(lv, ctx.student_shapes[lv].stride, ctx.student_shapes[lv].channels,
                       ctx.teacher_shapes[lv].channels) for lv in self.levels]
        weights = list(h.STAGE_WEIGHTS) or [1.0] * len(self.levels)
        if len(weights) != len(self.levels):
            raise DistillConfigError(
                f"DISTILL.HGD.STAGE_WEIGHTS has {len(weights)} values for {len(self.levels)} stages "
                f"{list(h.LEVELS)}: give one per stage (in LEVELS order) or leave it empty."
            )
        if h.MACRO == "running_mean" and list(h.STAGE_WEIGHTS):
            raise DistillConfigError("DISTILL.HGD.STAGE_WEIGHTS is only used with MACRO 'fixed' (MACRO is "
                                     "'running_mean'): remove it or set MACRO fixed.")
        if not 0.0 <= h.MOMENTUM < 1.0:
            raise DistillConfigError(f"DISTILL.HGD.MOMENTUM must be in [0, 1), got {h.MOMENTUM}.")
        order = [list(h.LEVELS).index(lv) for lv in self.levels]  # weights follow LEVELS as written
        self.register_buffer("stage_weights", torch.tensor([float(weights[i]) for i in order]), persistent=False)
        # running means of the stage losses (saved in checkpoints: exact resume)
        self.register_buffer("running", torch.zeros(len(self.levels)))
        self.h = h

    def masks(self, rec):
        """{stage: (N, H, W)} micro weights W on each stage's grid (the teacher's)."""
        h = self.h
        shapes = self.grid(rec)
        binary = box(rec.gt_boxes, shapes, None)
        out = {}
        for lv, (s, hh, ww) in shapes.items():
            m = binary[lv]
            fg = (torch.stack([area_balanced_box_mask(b, s, hh, ww) for b in rec.gt_boxes]) if h.AREA_BALANCE
                  else m)
            out[lv] = h.FG_WEIGHT * fg + h.BG_WEIGHT * (1 - m)
        return out

    def macro_scales(self, stage_losses):
        """(K,) c_k. With "running_mean" in training, first updates the running means with the
        detached ``stage_losses`` (K,) averaged over processes."""
        if self.h.MACRO == "fixed":
            return self.stage_weights
        if self.training:
            vals = stage_losses.detach().clone()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(vals)
                vals /= dist.get_world_size()
            mom = self.h.MOMENTUM
            self.running.mul_(mom).add_(vals, alpha=1 - mom)
        # The EMA's start-up bias (1 - MOMENTUM^t) is the same factor for every stage and cancels
        # in the ratio; before any update (running 0) every c_k is 1.
        m = self.running.clamp(min=1e-12)
        return m.mean() / m

    def forward(self, rec):
        w, a, t = self.masks(rec), self.adapted(rec), self.targets(rec)
        losses = torch.stack([channel_normalized_loss(a[lv], t[lv], w[lv]) for lv in self.levels])
        scales = self.macro_scales(losses)
        scalars = {f"kd/hgd_{lv}": losses[i].detach() for i, lv in enumerate(self.levels)}
        scalars.update({f"kd/hgd_scale_{lv}": scales[i].detach() for i, lv in enumerate(self.levels)})
        return {"loss_kd_hgd": self.h.WEIGHT * (scales * losses).mean()}, scalars
