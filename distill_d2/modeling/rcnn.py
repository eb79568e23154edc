"""``DistillGeneralizedRCNN``: a GeneralizedRCNN student distilled from a frozen teacher.

Training step (TAR region-proposal sharing):
  1. student RPN -> proposals -> ``label_and_sample_proposals`` (once);
  2. the sampled RoIs are pooled by the student's and by the teacher's
     ``box_pooler`` on their own FPN maps and scored by both box heads;
  3. detection losses as in GeneralizedRCNN + ``loss_kd_feat`` (or
     ``loss_kd_feat_fg/bg``), ``loss_kd_cls``, ``loss_kd_box`` and the optional
     ``loss_kd_cls_reverse``, ``loss_kd_cls_fg/bg`` (DeFeat decoupled
     proposals), ``loss_kd_backbone_fg/bg``, each times lambda(iter).
At inference the model is exactly the student (GeneralizedRCNN.inference).
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage, get_event_storage

from ..losses import box_kd_loss, cls_kd_loss, decoupled_kl_loss
from ..teacher import TeacherError
from .distiller import DistillerMixin


def score_rois(model, features, proposals):
    """Pool ``proposals`` on ``model``'s own features and run its box head + predictor.

    Returns:
        (class logits (R, K+1), box deltas (R, 4K) or (R, 4)).
    """
    rh = model.roi_heads
    x = rh.box_pooler([features[f] for f in rh.box_in_features], [p.proposal_boxes for p in proposals])
    return rh.box_predictor(rh.box_head(x))


def sample_teacher_rois(teacher, sampler, t_images, t_features, gt_instances):
    """The teacher's RPN proposals (eval mode: its test-time top-k) sampled by ``sampler``'s
    ``label_and_sample_proposals`` (without logging its sampling statistics)."""
    t_props, _ = teacher.proposal_generator(t_images, t_features, None)
    with EventStorage():
        return sampler.label_and_sample_proposals(t_props, gt_instances)


def _gt_boxes(rois):
    """(R, 4) matched gt boxes of sampled RoIs (zeros for an image without gt)."""
    if rois.has("gt_boxes"):
        return rois.gt_boxes.tensor
    return rois.proposal_boxes.tensor.new_zeros((len(rois), 4))


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillerMixin, GeneralizedRCNN):
    STUDENT_META_ARCH = "GeneralizedRCNN"

    def _check_student(self, cfg):
        for attr in ("box_pooler", "box_head", "box_predictor", "label_and_sample_proposals"):
            if not hasattr(self.roi_heads, attr):
                raise TeacherError(
                    f"{type(self.roi_heads).__name__} has no '{attr}': DistillGeneralizedRCNN supports "
                    "StandardROIHeads-style heads (not cascade)."
                )
        if getattr(self.roi_heads, "train_on_pred_boxes", False):
            raise TeacherError("MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported by DistillGeneralizedRCNN.")

    def _init_distiller(self, cfg):
        super()._init_distiller(cfg)
        self.head_kd = self.head_kd or cfg.DISTILL.DEFEAT_CLS.ENABLED or cfg.DISTILL.PROPOSALS.REVERSE

    def _same_family(self, teacher):
        return hasattr(teacher, "roi_heads") and hasattr(teacher.roi_heads, "box_predictor")

    def _check_heads(self, teacher):
        s_t = self.roi_heads.box_predictor.box2box_transform.weights
        t_t = teacher.roi_heads.box_predictor.box2box_transform.weights
        if self.distill_cfg.BOX.ENABLED and tuple(s_t) != tuple(t_t):
            raise TeacherError(
                f"Box KD compares deltas, but the student encodes boxes with weights {s_t} and the teacher with "
                f"{t_t}: set the same MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS or disable DISTILL.BOX."
            )

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        b = self.run_backbones(batched_inputs)
        images, features, gt_instances = b["images"], b["features"], b["gt_instances"]
        proposals, losses = self.proposal_generator(images, features, gt_instances)
        rois = self.roi_heads.label_and_sample_proposals(proposals, gt_instances)
        s_pred = score_rois(self, features, rois)
        losses.update(self.roi_heads.box_predictor.losses(s_pred, rois))
        losses.update(self.roi_heads._forward_mask(features, rois))
        losses.update(self.roi_heads._forward_keypoint(features, rois))
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)

        kd = self.feature_kd_losses(**b)
        scalars = {}
        if self.head_kd:
            self._head_kd(kd, scalars, features, b["t_features"], b["t_images"], rois, s_pred, gt_instances)
        losses.update(self.weigh_kd(kd, scalars))
        return losses

    def _head_kd(self, kd, scalars, features, t_features, t_images, rois, s_pred, gt_instances):
        """TAR cls/box KD on the shared RoIs (+ reverse / DeFeat decoupled proposals); fills ``kd``."""
        dc, teacher = self.distill_cfg, self._teacher
        k = self.roi_heads.num_classes
        if dc.CLS.ENABLED or dc.BOX.ENABLED:
            with torch.no_grad():
                t_pred = score_rois(teacher, t_features, rois)
                self.check_finite("class logits", t_pred[0])
        gt_classes = torch.cat([r.gt_classes for r in rois])
        if dc.CLS.ENABLED:
            loss, frac = cls_kd_loss(s_pred[0], t_pred[0], gt_classes, k, dc.CLS.TEMPERATURE, dc.CLS.ROIS, dc.CLS.GATE)
            kd["loss_kd_cls"] = dc.CLS.WEIGHT * loss
            scalars["kd/cls_gate_frac"] = frac
        if dc.BOX.ENABLED:
            loss, frac = box_kd_loss(
                s_pred[1], t_pred[1], Boxes.cat([r.proposal_boxes for r in rois]).tensor,
                torch.cat([_gt_boxes(r) for r in rois]), gt_classes, k,
                self.roi_heads.box_predictor.box2box_transform, dc.BOX.GATE, dc.BOX.BETA, self.box_normalizer(False),
            )
            kd["loss_kd_box"] = dc.BOX.WEIGHT * loss
            scalars["kd/box_gate_frac"] = frac
        for name, sampler, enabled in (("reverse", self.roi_heads, dc.PROPOSALS.REVERSE),
                                       ("defeat", teacher.roi_heads, dc.DEFEAT_CLS.ENABLED)):
            if not enabled:
                continue
            with torch.no_grad():
                t_rois = sample_teacher_rois(teacher, sampler, t_images, t_features, gt_instances)
                t_scores = score_rois(teacher, t_features, t_rois)[0]
            s_scores = score_rois(self, features, t_rois)[0]
            labels = torch.cat([r.gt_classes for r in t_rois])
            if name == "reverse":
                loss, _ = cls_kd_loss(s_scores, t_scores, labels, k, dc.CLS.TEMPERATURE, dc.CLS.ROIS, dc.CLS.GATE)
                kd["loss_kd_cls_reverse"] = dc.CLS.WEIGHT * loss
            else:
                d = dc.DEFEAT_CLS
                fg, bg = decoupled_kl_loss(s_scores, t_scores, labels, k, d.TEMPERATURE, d.BG_TEMPERATURE)
                kd["loss_kd_cls_fg"] = d.FG_WEIGHT * fg
                kd["loss_kd_cls_bg"] = d.BG_WEIGHT * bg
