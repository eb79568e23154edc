"""Machinery shared by the distillation meta-architectures.

``DistillerMixin`` holds the frozen teacher outside the module tree (so it is
in no optimizer, no DDP sync and no checkpoint), the per-level adapters
(``kd_adapters`` / ``kd_bb_adapters``, saved with the student, dropped on
export), the KD weight lambda set by :class:`distill_d2.hooks.KDWeightScheduler`,
and the feature KD (neck and, optionally, bottom-up backbone).
"""
import contextlib
import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import build_backbone
from detectron2.utils.events import get_event_storage

from ..adapters import build_adapters
from ..losses import decoupled_feature_loss, masked_feature_loss
from ..masks import build_masks, defeat_backbone_masks
from ..teacher import TeacherError, build_teacher, check_compatible, get_teacher_cfg

logger = logging.getLogger(__name__)


def teacher_backbone_shapes(teacher_cfg):
    """Teacher backbone built on the meta device (no memory, no weights) and its output shapes."""
    with torch.device("meta"):
        backbone = build_backbone(teacher_cfg)
    return backbone, backbone.output_shape()


def bottom_up(backbone):
    """The bottom-up network of an FPN backbone (the backbone itself otherwise)."""
    return getattr(backbone, "bottom_up", backbone)


@contextlib.contextmanager
def capture_outputs(module, store, enabled=True):
    """Record ``module``'s forward output into ``store["out"]`` while inside the block."""
    if not enabled:
        yield store
        return
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("out", o))
    try:
        yield store
    finally:
        handle.remove()


class DistillerMixin:
    """Mixin put before a detectron2 meta-arch: ``class X(DistillerMixin, RetinaNet)``.

    The student is built exactly as the plain meta-arch from the same config;
    then ``_check_student`` (override) and the distillation parts.
    """

    is_distiller = True
    #: META_ARCHITECTURE of the plain student (used by export)
    STUDENT_META_ARCH = None

    @configurable
    def __init__(self, *, cfg, **kwargs):
        super().__init__(**kwargs)
        self._check_student(cfg)
        self._init_distiller(cfg)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["cfg"] = cfg
        return ret

    def _check_student(self, cfg):
        """Abort if the student cannot be distilled by this meta-arch (override)."""

    def _init_distiller(self, cfg):
        self.distill_cfg = cfg.DISTILL
        self.kd_weight = 1.0
        self.head_kd = cfg.DISTILL.CLS.ENABLED or cfg.DISTILL.BOX.ENABLED  # revisited once the teacher exists
        self.teacher_cfg = get_teacher_cfg(cfg)
        self._student_cfg = cfg
        object.__setattr__(self, "_teacher", None)  # not a registered submodule, on purpose
        t_backbone, t_shapes = teacher_backbone_shapes(self.teacher_cfg)
        s_shapes = self.backbone.output_shape()
        feat = cfg.DISTILL.FEAT
        self.kd_levels = list(feat.LEVELS) if feat.ENABLED else []
        check_compatible(self.backbone, t_backbone, self.kd_levels, cfg, self.teacher_cfg)
        self.kd_levels.sort(key=lambda lv: s_shapes[lv].stride)  # finest first (DeFeat's level index)
        if self.kd_levels:
            self.kd_adapters = build_adapters(
                feat.ADAPTER, self.kd_levels,
                {lv: s_shapes[lv].channels for lv in self.kd_levels},
                {lv: t_shapes[lv].channels for lv in self.kd_levels},
            )
        self._kd_strides = {lv: s_shapes[lv].stride for lv in self.kd_levels}

        bb = cfg.DISTILL.BACKBONE
        self.kd_bb_levels = list(bb.LEVELS) if bb.ENABLED else []
        if self.kd_bb_levels:
            s_bu, t_bu = bottom_up(self.backbone), bottom_up(t_backbone)
            check_compatible(s_bu, t_bu, self.kd_bb_levels, cfg, self.teacher_cfg)
            s_bu_shapes, t_bu_shapes = s_bu.output_shape(), t_bu.output_shape()
            self.kd_bb_adapters = build_adapters(
                bb.ADAPTER, self.kd_bb_levels,
                {lv: s_bu_shapes[lv].channels for lv in self.kd_bb_levels},
                {lv: t_bu_shapes[lv].channels for lv in self.kd_bb_levels},
            )
            self._kd_bb_strides = {lv: s_bu_shapes[lv].stride for lv in self.kd_bb_levels}

    # ------------------------------------------------------------ teacher
    def setup_teacher(self):
        """Build, load, freeze and check the teacher (idempotent); returns it."""
        if self._teacher is None:
            # levels/strides/classes were checked in _init_distiller on the same teacher config
            teacher, _ = build_teacher(self._student_cfg)
            if self.head_kd and not self._same_family(teacher):
                logger.warning(
                    "Head KD (DISTILL.CLS / DISTILL.BOX) disabled: the teacher is a %s and the student a %s; "
                    "only feature KD on %s runs.", type(teacher).__name__, type(self).__name__,
                    self.kd_levels + self.kd_bb_levels,
                )
                self.head_kd = False
            if self.head_kd:
                self._check_heads(teacher)
            object.__setattr__(self, "_teacher", teacher.to(self.device))
        return self._teacher

    @property
    def teacher(self):
        return self.setup_teacher()

    def _same_family(self, teacher):
        """Whether the teacher's heads produce what the student's head KD compares (override)."""
        return True

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

    def run_backbones(self, batched_inputs):
        """Preprocess the batch for both models; student backbone (grad) and teacher backbone (no grad).

        Returns:
            dict with ``images``, ``t_images`` (ImageList), ``gt_instances``, ``features``,
            ``t_features`` ({level: (N,C,H,W)}) and ``s_bottom_up``, ``t_bottom_up`` (the
            bottom-up outputs, only with DISTILL.BACKBONE; else None).
        """
        self.setup_teacher()
        images = self.preprocess_image(batched_inputs)
        t_images = self.teacher_preprocess(batched_inputs, images)
        need = bool(self.kd_bb_levels)
        s_cap, t_cap = {}, {}
        with capture_outputs(bottom_up(self.backbone), s_cap, need):
            s_feat = self.backbone(images.tensor)
        with torch.no_grad(), capture_outputs(bottom_up(self._teacher.backbone), t_cap, need):
            t_feat = self._teacher.backbone(t_images.tensor)
        return dict(images=images, t_images=t_images, features=s_feat, t_features=t_feat,
                    gt_instances=[x["instances"].to(self.device) for x in batched_inputs],
                    s_bottom_up=s_cap.get("out"), t_bottom_up=t_cap.get("out"))

    # ------------------------------------------------------------ feature KD
    def feature_kd_losses(self, features, t_features, gt_instances, s_bottom_up=None, t_bottom_up=None, **unused):
        """Neck (and optionally backbone) feature imitation; takes :meth:`run_backbones`'s dict as kwargs.

        Returns:
            {"loss_kd_feat"} or, with FEAT.NORM "decoupled", {"loss_kd_feat_fg",
            "loss_kd_feat_bg"}; plus {"loss_kd_backbone_fg", "loss_kd_backbone_bg"}
            with DISTILL.BACKBONE. Weighted by the config weights, not by lambda.
        """
        dc = self.distill_cfg
        feat = dc.FEAT
        gt_boxes = [x.gt_boxes.tensor for x in gt_instances]
        out = {}
        if self.kd_levels:
            shapes = {lv: (self._kd_strides[lv], *features[lv].shape[-2:]) for lv in self.kd_levels}
            masks = build_masks(feat.MASK, gt_boxes, shapes, feat)
            adapted = {lv: self.kd_adapters[lv](features[lv]) for lv in self.kd_levels}
            target = {lv: t_features[lv] for lv in self.kd_levels}
            if feat.NORM == "decoupled":
                fg, bg = decoupled_feature_loss(adapted, target, masks)
                out["loss_kd_feat_fg"] = feat.WEIGHT * feat.FG_WEIGHT * fg
                out["loss_kd_feat_bg"] = feat.WEIGHT * feat.BG_WEIGHT * bg
            else:
                out["loss_kd_feat"] = feat.WEIGHT * masked_feature_loss(adapted, target, masks, feat.NORM)
        if self.kd_bb_levels:
            shapes = {lv: (self._kd_bb_strides[lv], *s_bottom_up[lv].shape[-2:]) for lv in self.kd_bb_levels}
            masks = defeat_backbone_masks(gt_boxes, shapes)
            adapted = {lv: self.kd_bb_adapters[lv](s_bottom_up[lv]) for lv in self.kd_bb_levels}
            fg, bg = decoupled_feature_loss(adapted, {lv: t_bottom_up[lv] for lv in self.kd_bb_levels}, masks)
            out["loss_kd_backbone_fg"] = dc.BACKBONE.FG_WEIGHT * fg
            out["loss_kd_backbone_bg"] = dc.BACKBONE.BG_WEIGHT * bg
        return out

    @staticmethod
    def check_finite(name, tensor):
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(
                f"The teacher produced non-finite {name}: its weights are broken or do not match its config "
                "(check DISTILL.TEACHER.WEIGHTS / CONFIG_FILE)."
            )

    def box_normalizer(self, dense):
        n = self.distill_cfg.BOX.NORMALIZER
        if n == "auto":
            return "num_pos" if dense else "num_rois"
        return n

    def weigh_kd(self, kd_losses, scalars):
        """Scale ``loss_kd_*`` terms by lambda; log ``scalars`` (when an EventStorage is active)."""
        lam = self.kd_weight
        out = {k: v * lam for k, v in kd_losses.items()}
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a trainer (e.g. a unit test without EventStorage)
            return out
        for k, v in scalars.items():
            storage.put_scalar(k, v)
        return out
