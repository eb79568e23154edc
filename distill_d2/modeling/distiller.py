"""Machinery shared by the distillation meta-architectures.

``DistillerMixin`` holds the frozen teacher outside the module tree (so it is
in no optimizer, no DDP sync and no checkpoint), the per-level adapters
(``kd_adapters``, saved with the student, dropped on export), the KD weight
lambda set by :class:`distill_d2.hooks.KDWeightScheduler`, and the feature KD.
"""
import logging

import torch
from detectron2.modeling import build_backbone
from detectron2.utils.events import get_event_storage

from ..adapters import build_adapters
from ..losses import decoupled_feature_loss, masked_feature_loss
from ..masks import build_masks
from ..teacher import TeacherError, build_teacher, check_compatible, get_teacher_cfg

logger = logging.getLogger(__name__)


def teacher_backbone_shapes(teacher_cfg):
    """Teacher backbone output shapes, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        backbone = build_backbone(teacher_cfg)
    return backbone, backbone.output_shape()


class DistillerMixin:
    """Mixin for a detectron2 meta-arch subclass; call ``_init_distiller(cfg)`` after ``super().__init__``."""

    is_distiller = True
    #: META_ARCHITECTURE of the plain student (used by export)
    STUDENT_META_ARCH = None

    def _init_distiller(self, cfg):
        self.distill_cfg = cfg.DISTILL
        self.kd_weight = 1.0
        self.teacher_cfg = get_teacher_cfg(cfg)
        self._student_cfg = cfg
        object.__setattr__(self, "_teacher", None)  # not a registered submodule, on purpose
        t_backbone, t_shapes = teacher_backbone_shapes(self.teacher_cfg)
        feat = cfg.DISTILL.FEAT
        self.kd_levels = list(feat.LEVELS) if feat.ENABLED else []
        check_compatible(self.backbone, t_backbone, self.kd_levels, cfg, self.teacher_cfg)
        s_shapes = self.backbone.output_shape()
        self.kd_levels.sort(key=lambda lv: s_shapes[lv].stride)  # finest first (DeFeat's level index)
        if self.kd_levels:
            self.kd_adapters = build_adapters(
                feat.ADAPTER, self.kd_levels,
                {lv: s_shapes[lv].channels for lv in self.kd_levels},
                {lv: t_shapes[lv].channels for lv in self.kd_levels},
            )
        self._kd_strides = {lv: s_shapes[lv].stride for lv in self.kd_levels}

    # ------------------------------------------------------------ teacher
    def setup_teacher(self):
        """Build, load, freeze and check the teacher (idempotent); returns it."""
        if self._teacher is None:
            teacher, _ = build_teacher(self._student_cfg)
            check_compatible(self.backbone, teacher.backbone, self.kd_levels, self._student_cfg, self.teacher_cfg)
            self._check_heads(teacher)
            object.__setattr__(self, "_teacher", teacher.to(self.device))
        return self._teacher

    @property
    def teacher(self):
        return self.setup_teacher()

    def _check_heads(self, teacher):
        """Meta-arch specific teacher/student head checks (override)."""

    def _apply(self, fn, *args, **kwargs):
        # keep the unregistered teacher on the student's device/dtype
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def teacher_inputs(self, batched_inputs):
        """The same batch for the teacher, with channels flipped if its INPUT.FORMAT differs."""
        t_fmt, s_fmt = self._teacher.input_format, self.input_format
        if t_fmt == s_fmt:
            return batched_inputs
        if {t_fmt, s_fmt} != {"RGB", "BGR"}:
            raise TeacherError(f"Cannot convert student input format {s_fmt} to the teacher's {t_fmt}.")
        return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]

    def teacher_preprocess(self, batched_inputs, images):
        """Teacher's own normalisation of the batch; padded size must equal the student's."""
        t_images = self._teacher.preprocess_image(self.teacher_inputs(batched_inputs))
        if t_images.tensor.shape[-2:] != images.tensor.shape[-2:]:
            raise TeacherError(
                f"Teacher and student pad the batch differently ({tuple(t_images.tensor.shape[-2:])} vs "
                f"{tuple(images.tensor.shape[-2:])}); use backbones with equal size_divisibility."
            )
        return t_images

    # ------------------------------------------------------------ feature KD
    def feature_kd_losses(self, s_features, t_features, gt_instances):
        """Feature imitation on ``kd_levels`` under DISTILL.FEAT.MASK.

        Returns:
            {"loss_kd_feat": scalar} or, with NORM "decoupled",
            {"loss_kd_feat_fg", "loss_kd_feat_bg"}; weighted by the config
            weights but not by lambda.
        """
        feat = self.distill_cfg.FEAT
        shapes = {lv: (self._kd_strides[lv], *s_features[lv].shape[-2:]) for lv in self.kd_levels}
        masks = build_masks(feat.MASK, [x.gt_boxes.tensor for x in gt_instances], shapes, feat)
        adapted = {lv: self.kd_adapters[lv](s_features[lv]) for lv in self.kd_levels}
        target = {lv: t_features[lv] for lv in self.kd_levels}
        if feat.NORM == "decoupled":
            fg, bg = decoupled_feature_loss(adapted, target, masks)
            return {"loss_kd_feat_fg": feat.WEIGHT * feat.FG_WEIGHT * fg,
                    "loss_kd_feat_bg": feat.WEIGHT * feat.BG_WEIGHT * bg}
        return {"loss_kd_feat": feat.WEIGHT * masked_feature_loss(adapted, target, masks, feat.NORM)}

    @staticmethod
    def check_finite(name, tensor):
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(
                f"The teacher produced non-finite {name}: its weights are broken or do not match its config "
                "(check DISTILL.TEACHER.WEIGHTS / CONFIG_FILE)."
            )

    def weigh_kd(self, kd_losses, scalars):
        """Scale ``loss_kd_*`` terms by their config weight and by lambda; log ``scalars``."""
        lam = self.kd_weight
        out = {k: v * lam for k, v in kd_losses.items()}
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a trainer (e.g. a unit test without EventStorage)
            return out
        for k, v in scalars.items():
            storage.put_scalar(k, v)
        return out
