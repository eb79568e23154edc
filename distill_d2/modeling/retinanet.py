"""``DistillRetinaNet``: a RetinaNet student distilled from a frozen teacher.

Teacher and student share the anchor grid (checked), so dense-head KD compares
predictions anchor by anchor: ``loss_kd_cls`` (sigmoid binary KL to the
teacher's probabilities on anchors not ignored by the matcher, normalised by
the number of foreground anchors), ``loss_kd_box`` (deltas of anchors matched
to a gt, gated by teacher-better IoU as in TAR) and feature KD on P3-P7 with
any mask. At inference the model is exactly the student (RetinaNet.forward).
"""
import torch
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import Boxes

from ..losses import box_kd_loss, sigmoid_kd_loss
from ..teacher import TeacherError
from .distiller import DistillerMixin


def dense_predictions(model, features):
    """(logits (N, R, K), deltas (N, R, 4)) of a RetinaNet-like ``model`` on its feature dict."""
    feats = [features[f] for f in model.head_in_features]
    logits, deltas = model._transpose_dense_predictions(model.head(feats), [model.num_classes, 4])
    return cat(logits, dim=1), cat(deltas, dim=1), feats


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillerMixin, RetinaNet):
    STUDENT_META_ARCH = "RetinaNet"

    def _same_family(self, teacher):
        return hasattr(teacher, "head") and hasattr(teacher, "anchor_generator")

    def _check_heads(self, teacher):
        """Dense-head KD needs the same anchors on the same levels and the same box coder."""
        s_ag, t_ag = self.anchor_generator, teacher.anchor_generator
        s_levels = [self.backbone.output_shape()[f].stride for f in self.head_in_features]
        t_levels = [teacher.backbone.output_shape()[f].stride for f in teacher.head_in_features]
        same = (
            s_levels == t_levels
            and list(s_ag.strides) == list(t_ag.strides)
            and s_ag.offset == t_ag.offset
            and len(s_ag.cell_anchors) == len(t_ag.cell_anchors)
            and all(a.shape == b.shape and torch.allclose(a.cpu(), b.cpu())
                    for a, b in zip(s_ag.cell_anchors, t_ag.cell_anchors))
        )
        if not same:
            raise TeacherError(
                "RetinaNet head KD compares predictions anchor by anchor, but teacher and student anchors differ "
                f"(student head strides {s_levels}, teacher {t_levels}; cell anchors per level "
                f"{[tuple(a.shape) for a in s_ag.cell_anchors]} vs {[tuple(a.shape) for a in t_ag.cell_anchors]}). "
                "Use the same MODEL.ANCHOR_GENERATOR (SIZES, ASPECT_RATIOS, OFFSET) and MODEL.RETINANET.IN_FEATURES, "
                "or disable DISTILL.CLS and DISTILL.BOX."
            )
        if self.distill_cfg.BOX.ENABLED and tuple(self.box2box_transform.weights) != tuple(teacher.box2box_transform.weights):
            raise TeacherError(
                f"Box KD compares deltas, but the box coders differ ({self.box2box_transform.weights} vs "
                f"{teacher.box2box_transform.weights}): set the same MODEL.RETINANET.BBOX_REG_WEIGHTS."
            )

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        dc = self.distill_cfg
        b = self.run_backbones(batched_inputs)
        logits, deltas, feats = dense_predictions(self, b["features"])
        anchors = self.anchor_generator(feats)
        gt_labels, gt_boxes = self.label_anchors(anchors, b["gt_instances"])
        split = [a.tensor.shape[0] for a in anchors]
        losses = self.losses(anchors, list(logits.split(split, 1)), gt_labels, list(deltas.split(split, 1)), gt_boxes)
        kd = self.feature_kd_losses(**b)
        scalars = {}
        if self.head_kd:
            with torch.no_grad():
                t_logits, t_deltas, _ = dense_predictions(self._teacher, b["t_features"])
                self.check_finite("class logits", t_logits)
            labels = torch.stack(gt_labels)  # (N, R) in {-1, 0..K-1, K}
            valid = labels >= 0
            num_pos = int(((labels >= 0) & (labels != self.num_classes)).sum())
            if dc.CLS.ENABLED:
                kd["loss_kd_cls"] = dc.CLS.WEIGHT * sigmoid_kd_loss(logits, t_logits, valid, num_pos,
                                                                    dc.CLS.TEMPERATURE)
            if dc.BOX.ENABLED:
                n = labels.shape[0]
                all_anchors = Boxes.cat(anchors).tensor[None].expand(n, -1, -1).reshape(-1, 4)
                loss, frac = box_kd_loss(
                    deltas.reshape(-1, 4), t_deltas.reshape(-1, 4), all_anchors, torch.stack(gt_boxes).reshape(-1, 4),
                    labels.reshape(-1), self.num_classes, self.box2box_transform, dc.BOX.GATE, dc.BOX.BETA,
                    self.box_normalizer(True),
                )
                kd["loss_kd_box"] = dc.BOX.WEIGHT * loss
                scalars["kd/box_gate_frac"] = frac
        losses.update(self.weigh_kd(kd, scalars))
        return losses
