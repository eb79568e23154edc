"""``DistillRetinaNet``: a RetinaNet student distilled from a frozen teacher.

Training step: detectron2's own ``RetinaNet.forward`` runs unchanged; for head
terms, ``losses`` (overridden only to record its inputs) keeps the anchors, the
matcher's labels and matched boxes and the student's transposed predictions,
and the teacher's head runs on its own FPN maps, which share the anchor grid
(checked by the head terms). At inference the model is exactly the student.
"""
import torch
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import Boxes

from ..record import DenseRecord, provider
from .distiller import DistillerMixin


def dense_predictions(model, features):
    """(logits (N, R, K), deltas (N, R, 4)) of a RetinaNet-like ``model`` on its feature dict
    (the teacher's head, laid out as ``RetinaNet.forward_training`` lays out the student's)."""
    feats = [features[f] for f in model.head_in_features]
    logits, deltas = model._transpose_dense_predictions(model.head(feats), [model.num_classes, 4])
    return cat(logits, dim=1), cat(deltas, dim=1)


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillerMixin, RetinaNet):
    STUDENT_META_ARCH = "RetinaNet"
    FAMILY = "dense"

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """RetinaNet.losses, recording its inputs for the head terms."""
        if self._rec is not None and self.needs_heads:
            self._rec["dense"] = (anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        return super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)

    def _record_heads(self, rec, raw):
        anchors, logits, gt_labels, deltas, gt_boxes = raw["dense"]
        with torch.no_grad():
            t_logits, t_deltas = dense_predictions(self._teacher, rec.t_features)
        rec.dense = DenseRecord(
            anchors=Boxes.cat(anchors).tensor, labels=torch.stack(gt_labels), gt_boxes=torch.stack(gt_boxes),
            logits=cat(logits, dim=1), deltas=cat(deltas, dim=1), t_logits=t_logits, t_deltas=t_deltas,
            num_classes=self.num_classes, box2box_transform=self.box2box_transform,
            loss_normalizer=float(self.loss_normalizer),
        )


@provider(families=("dense",), same_family=False)
def dense_level_sizes(rec, need):
    """{level: (H, W, A)} of the student's head levels, in the order of the anchors of ``rec.dense``."""
    model = rec.models.student
    return {f: (*rec.features[f].shape[-2:], a)
            for f, a in zip(model.head_in_features, model.anchor_generator.num_anchors)}
