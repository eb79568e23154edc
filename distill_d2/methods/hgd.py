"""HGD (Qin et al., ICME 2021, "Hands-on Guidance for Distilling Object Detectors"): all-stage features.

Only the abstract is public: distil the whole feature hierarchy with (a)
correspondence between stages, (b) a hands-on imitation loss and (c) micro and
macro re-weighting. Everything below is our reconstruction (../shared/METHODS.md
section 2), every choice a key of ``DISTILL.HGD``; docs/methods/HGD.md.

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
import torch.nn.functional as F
from detectron2.config import CfgNode as CN

from ..losses import channel_normalized_loss
from ..masks import area_balanced_box_mask, box
from ..terms import DISTILL_TERM_REGISTRY, DistillConfigError, DistillTerm, check_choice, distilled_levels, level_adapters

MACRO = ("fixed", "running_mean")


@DISTILL_TERM_REGISTRY.register()
class HierarchicalFeatureKD(DistillTerm):
    reads = ("HGD.*",)

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
        super().__init__(cfg, ctx)
        h = cfg.DISTILL.HGD
        check_choice("DISTILL.HGD.MACRO", h.MACRO, MACRO)
        self.levels = distilled_levels(ctx, h.LEVELS, "DISTILL.HGD.LEVELS")
        self.adapters = level_adapters(ctx, h.ADAPTER, self.levels, "DISTILL.HGD.ADAPTER")
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

    def weights(self, rec):
        """{stage: (N, H, W)} micro weights W on each stage's grid."""
        h = self.h
        # on the teacher's grid: the adapted student map is resized to it when the sizes differ
        shapes = {lv: (rec.strides[lv], *rec.t_features[lv].shape[-2:]) for lv in self.levels}
        binary = box(rec.gt_boxes, shapes, None)
        out = {}
        for lv, (s, hh, ww) in shapes.items():
            m = binary[lv]
            fg = (torch.stack([area_balanced_box_mask(b, s, hh, ww) for b in rec.gt_boxes]) if h.AREA_BALANCE
                  else m)
            out[lv] = h.FG_WEIGHT * fg + h.BG_WEIGHT * (1 - m)
        return out

    def adapted(self, rec):
        """{stage: adapter(S)} resized to the teacher's map when the sizes differ."""
        out = {}
        for lv in self.levels:
            a, t = self.adapters[lv](rec.features[lv]), rec.t_features[lv]
            out[lv] = a if a.shape[-2:] == t.shape[-2:] else F.interpolate(a, size=t.shape[-2:], mode="bilinear",
                                                                          align_corners=False)
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
        w, a = self.weights(rec), self.adapted(rec)
        losses = torch.stack([channel_normalized_loss(a[lv], rec.t_features[lv], w[lv]) for lv in self.levels])
        scales = self.macro_scales(losses)
        scalars = {f"kd/hgd_{lv}": losses[i].detach() for i, lv in enumerate(self.levels)}
        scalars.update({f"kd/hgd_scale_{lv}": scales[i].detach() for i, lv in enumerate(self.levels)})
        return {"loss_kd_hgd": self.h.WEIGHT * (scales * losses).mean()}, scalars

    def explain(self, rec):
        return {"maps": {"hgd_weight": self.weights(rec)}}
