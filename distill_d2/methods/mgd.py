"""MGD (Yang et al., ECCV 2022, "Masked Generative Distillation"): regenerate the teacher's FPN maps from
randomly masked student maps, as the reference code does it (yzd-v/MGD, MMRazor); the method card
docs/methods/MGD.md is the reference.

* ``MaskedGenerativeKD`` -> ``loss_kd_mgd``. Its settings are the student's detector node,
  ``DISTILL.MGD.RCNN`` (Faster R-CNN) or ``DISTILL.MGD.RETINANET`` (RetinaNet), plus the shared
  ``MGD.ALIGN`` / ``MGD.INHERIT``. Per FPN level l of ``<node>.LEVELS``:

      S'_l = A_l(S_l)              A_l: 1x1 conv with bias where C_S != C_T, none where equal (ALIGN "auto")
      M_l  = 1[u <= 1 - MASK_RATIO], u ~ U[0, 1) of shape (N, 1, H, W), drawn every step from the
             default generator of the features' device (the training RNG, saved in checkpoints)
      G_l  = Conv3x3(C_T, C_T) -> ReLU -> Conv3x3(C_T, C_T)     (trainable; default init)
      L_l  = sum_{n,c,i,j} (G_l(S'_l * M_l) - T_l)^2 / N       (N = images, summed over processes)

  ``loss_kd_mgd = <node>.WEIGHT * sum_l L_l``; logs ``kd/mgd_<level>`` = L_l (unweighted). The aligners
  and generators are saved as ``kd_terms.MaskedGenerativeKD.{adapters,generators}.*`` and dropped on export.
  ``MGD.INHERIT`` (off) copies the teacher's neck and heads into the student when the teacher is built
  (MGD's "inheriting"; logged as a warning, and checked again at the first step).

Presets: ``configs/synthetic/mgd_*.yaml``, ``configs/COCO-Detection/mgd_*.yaml``.
"""
import logging
import math

import torch
import torch.nn as nn
from detectron2.config import CfgNode as CN

from ..adapters import conv1x1
from ..config import changed_keys, default_distill_node
from ..errors import DistillConfigError, TeacherError
from ..losses import batch_normalize
from ..registry import ADAPTER_REGISTRY
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, check_choice, distilled_levels, level_adapters

logger = logging.getLogger(__name__)

#: student family -> its node under DISTILL.MGD
FAMILY_NODE = {"rcnn": "RCNN", "dense": "RETINANET"}


# ------------------------------------------------------------------ pieces
def spatial_mask(n, h, w, ratio, device, generator=None):
    """(n, 1, h, w) float mask, the same for every channel: 0 (masked) where u > 1 - ``ratio``, else 1,
    with u ~ U[0, 1) from ``generator`` (default: the default generator of ``device``). About ``ratio``
    of the cells are masked; exactly those whose draw exceeds the threshold."""
    u = torch.rand((n, 1, h, w), device=device, generator=generator)
    return (u <= 1 - ratio).to(torch.float32)


def mgd_generator(channels):
    """MGD's generator of one level: Conv3x3(C, C) -> ReLU -> Conv3x3(C, C), PyTorch's default init."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


def mgd_level_loss(aligned, teacher, mask, generator):
    """``sum (G(S' * M) - T)^2 / N`` of one level (N: the images of the whole batch, over processes).

    Args:
        aligned: (N, C_t, H, W) aligned student map S'; teacher: (N, C_t, H, W) T (no grad);
        mask: (N, 1, H, W) of 0/1; generator: the level's G.
    """
    if aligned.shape != teacher.shape:
        raise ValueError(f"MGD level: aligned student {tuple(aligned.shape)} vs teacher {tuple(teacher.shape)}.")
    if mask.shape != (aligned.shape[0], 1, *aligned.shape[2:]):
        raise ValueError(f"MGD level: mask {tuple(mask.shape)} for a map {tuple(aligned.shape)}: "
                         "expected (N, 1, H, W).")
    generated = generator(aligned * mask)
    return batch_normalize(((generated - teacher) ** 2).sum(), aligned.shape[0])


def align_modules(ctx, kind, levels, key="DISTILL.MGD.ALIGN"):
    """{level: S_l -> C_t aligner}: ``kind`` "auto" = a 1x1 conv with bias where the channel counts differ
    and ``nn.Identity`` where they are equal (the reference's rule); else an ADAPTER_REGISTRY kind on every level."""
    check_choice(key, kind, ["auto"] + sorted(k for k, _ in ADAPTER_REGISTRY))
    if kind != "auto":
        return level_adapters(ctx, kind, levels, key)
    cs = {lv: ctx.student_shapes[lv].channels for lv in levels}
    ct = {lv: ctx.teacher_shapes[lv].channels for lv in levels}
    return nn.ModuleDict({lv: conv1x1(cs[lv], ct[lv]) if cs[lv] != ct[lv] else nn.Identity() for lv in levels})


def inherit_neck_and_head(student, teacher):
    """Copy into ``student`` every teacher tensor of the neck (``backbone.*`` outside ``backbone.bottom_up``)
    and of the heads (every key outside ``backbone.``: RPN + RoI heads, or the dense head) that the student
    has under the same name and shape; ``kd_terms.*`` and the bottom-up network are never touched.

    Returns:
        (copied names, {skipped name: reason}).
    """
    s_state, t_state = student.state_dict(), teacher.state_dict()
    s_fpn = getattr(student.backbone, "bottom_up", None) is not None

    def inheritable(k):
        if k.startswith("kd_terms."):
            return False
        if k.startswith("backbone."):  # the neck: FPN laterals / outputs / top block
            return s_fpn and not k.startswith("backbone.bottom_up.")
        return True

    copied, skipped = [], {}
    with torch.no_grad():
        for k in filter(inheritable, s_state):
            if k not in t_state:
                skipped[k] = "not in the teacher"
            elif t_state[k].shape != s_state[k].shape:
                skipped[k] = f"shape {tuple(s_state[k].shape)} vs the teacher's {tuple(t_state[k].shape)}"
            else:
                s_state[k].copy_(t_state[k])
                copied.append(k)
    return copied, skipped


def _checksum(t):
    return float(t.detach().double().sum())


# ------------------------------------------------------------------ the term
@DISTILL_TERM_REGISTRY.register()
class MaskedGenerativeKD(DistillTerm):
    """MGD on the FPN levels of the student's node (see the module docstring). Features only: works with a
    teacher of either family (cross-family pairs distil the levels both have)."""

    reads = ("MGD.*",)

    @classmethod
    def add_config(cls, d):
        d.MGD = CN()
        # Faster R-CNN student ([code] yzd-v/MGD cascade_mask_rcnn_rx101 -> faster_rcnn_r50 configs):
        d.MGD.RCNN = CN()
        # FPN levels (mmdet fpn_convs 0-3); p6 (a max-pool, no conv in mmdet) is skipped [code].
        d.MGD.RCNN.LEVELS = ["p2", "p3", "p4", "p5"]
        # alpha: weight of the summed squared error / N (unitless) [code: alpha_mgd 5e-7]. mmdet's value; a
        # Detectron2 teacher's feature scale differs: calibrate (docs/methods/MGD.md).
        d.MGD.RCNN.WEIGHT = 5e-7
        # lambda: fraction of the cells masked, in [0, 1] [code: lambda_mgd 0.45].
        d.MGD.RCNN.MASK_RATIO = 0.45
        # RetinaNet student ([code] yzd-v/MGD retina_rx101 -> retina_r50 config):
        d.MGD.RETINANET = CN()
        # FPN levels (mmdet fpn_convs 0-4 = p3-p7) [code].
        d.MGD.RETINANET.LEVELS = ["p3", "p4", "p5", "p6", "p7"]
        # alpha [code: alpha_mgd 2e-5]; see RCNN.WEIGHT.
        d.MGD.RETINANET.WEIGHT = 2e-5
        # lambda [code: lambda_mgd 0.65].
        d.MGD.RETINANET.MASK_RATIO = 0.65
        # Student -> teacher channel aligner per level: "auto" = 1x1 conv with bias where the channel counts
        # differ, none where equal [code]; or an ADAPTER_REGISTRY kind applied on every level.
        d.MGD.ALIGN = "auto"
        # Copy the teacher's neck (FPN) and heads into the student when the teacher is built, tensor by tensor
        # where name and shape match (MGD's "inheriting", init_student=True in the reference RetinaNet
        # config) [choice: off; it changes what the baseline comparison means].
        d.MGD.INHERIT = False

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        m = cfg.DISTILL.MGD
        node = FAMILY_NODE[ctx.family]
        other = next(v for k, v in FAMILY_NODE.items() if k != ctx.family)
        stray = changed_keys(m[other], default_distill_node().MGD[other])
        if stray:
            raise DistillConfigError(
                f"{', '.join(f'DISTILL.MGD.{other}.{k}' for k in stray)} is set, but the student is "
                f"{cfg.MODEL.META_ARCHITECTURE}: MaskedGenerativeKD reads DISTILL.MGD.{node}.* for it. Set the "
                f"value there instead (or remove it).")
        f = m[node]
        self.key = f"DISTILL.MGD.{node}"
        if not (isinstance(f.MASK_RATIO, (int, float)) and 0.0 <= f.MASK_RATIO <= 1.0):
            raise DistillConfigError(f"{self.key}.MASK_RATIO = {f.MASK_RATIO!r}: the fraction of masked cells "
                                     "must be in [0, 1] (MGD: 0.45 Faster R-CNN, 0.65 RetinaNet).")
        self.levels = distilled_levels(ctx, f.LEVELS, f"{self.key}.LEVELS")
        self.adapters = align_modules(ctx, m.ALIGN, self.levels)
        self.generators = nn.ModuleDict({lv: mgd_generator(ctx.teacher_shapes[lv].channels) for lv in self.levels})
        self.weight, self.ratio, self.inherit = f.WEIGHT, f.MASK_RATIO, m.INHERIT
        self._inherited = []  # [(name, student parameter, checksum after the copy)], checked at the first step

    # ---------------------------------------------------------- inheriting
    def check_teacher(self, student, teacher):
        """With ``MGD.INHERIT``: copy the teacher's neck and heads into ``student`` (name and shape match)."""
        if not self.inherit:
            return
        copied, skipped = inherit_neck_and_head(student, teacher)
        if not copied:
            raise TeacherError(
                "DISTILL.MGD.INHERIT True, but no tensor of the teacher's neck or heads matches the student's by "
                f"name and shape ({len(skipped)} student tensors checked, e.g. "
                f"{'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])}). Inheriting needs the same "
                "FPN width and heads: use such a teacher, or set DISTILL.MGD.INHERIT False.")
        params, state = dict(student.named_parameters()), student.state_dict()
        self._inherited = [(k, params[k], _checksum(params[k])) for k in copied if k in params]
        n = sum(state[k].numel() for k in copied)
        logger.warning(
            "DISTILL.MGD.INHERIT True: copied %d teacher tensors (%d values: neck %d, heads %d tensors) into the "
            "student before training (MGD's 'inheriting'). The student no longer starts from its own "
            "initialisation, so its gain over a baseline trained from that start is NOT comparable with a "
            "cold-start method. %d student tensors kept their own values%s", len(copied), n,
            sum(k.startswith("backbone.") for k in copied), sum(not k.startswith("backbone.") for k in copied),
            len(skipped), (": " + "; ".join(f"{k} ({v})" for k, v in list(skipped.items())[:8])
                           + (" ..." if len(skipped) > 8 else "")) if skipped else ".")

    def _check_inherited(self):
        """First step after inheriting: say how many inherited tensors were replaced since (MODEL.WEIGHTS or a
        resumed checkpoint is loaded after the teacher is built)."""
        items, self._inherited = self._inherited, []
        changed = [k for k, p, s in items if not math.isclose(_checksum(p), s, rel_tol=1e-9, abs_tol=1e-12)]
        if changed:
            logger.warning(
                "DISTILL.MGD.INHERIT: %d of the %d inherited parameters were replaced before the first step (by "
                "MODEL.WEIGHTS or a resumed checkpoint, loaded after inheriting; expected with --resume): %s%s",
                len(changed), len(items), ", ".join(changed[:8]), " ..." if len(changed) > 8 else "")
        else:
            logger.info("DISTILL.MGD.INHERIT: all %d inherited parameters still hold the teacher's values at the "
                        "first step.", len(items))

    # ---------------------------------------------------------- the loss
    def draw_masks(self, rec, generator=None):
        """{level: (N, 1, H, W)} fresh masks on the student's grids (one ``torch.rand`` per level, finest
        first), from ``generator`` or the default generator of the features' device."""
        out = {}
        for lv in self.levels:
            n, _, h, w = rec.features[lv].shape
            out[lv] = spatial_mask(n, h, w, self.ratio, rec.features[lv].device, generator)
        return out

    def losses(self, rec, masks):
        """(``{"loss_kd_mgd": WEIGHT * sum_l L_l}``, ``{"kd/mgd_<level>": L_l}``) with the given ``masks``."""
        per = {lv: mgd_level_loss(self.adapters[lv](rec.features[lv]), rec.t_features[lv], masks[lv],
                                  self.generators[lv]) for lv in self.levels}
        return ({"loss_kd_mgd": self.weight * sum(per.values())},
                {f"kd/mgd_{lv}": v.detach() for lv, v in per.items()})

    def forward(self, rec):
        if self._inherited:
            self._check_inherited()
        return self.losses(rec, self.draw_masks(rec))

    def explain(self, rec):
        """A mask drawn from a generator seeded 0 (the training RNG is left alone) and the error it leaves:
        ``mgd_mask`` (1 = kept) and ``mgd_error`` = mean_c (G(S' * M) - T)^2, per level (N, H, W)."""
        dev = rec.features[self.levels[0]].device
        masks = self.draw_masks(rec, torch.Generator(device=dev).manual_seed(0))
        err = {lv: ((self.generators[lv](self.adapters[lv](rec.features[lv]) * masks[lv]) - rec.t_features[lv]) ** 2)
               .mean(dim=1) for lv in self.levels}
        return {"maps": {"mgd_mask": {lv: m[:, 0] for lv, m in masks.items()}, "mgd_error": err}}
