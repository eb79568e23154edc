"""What both models saw in one training step: the record every distillation term reads.

The meta-architecture fills one :class:`StepRecord` per step (both backbones
run once); terms (:mod:`distill_d2.terms`) only read it. Head outputs on the
shared samples (:class:`RoIRecord`, :class:`DenseRecord`) are filled only when
an enabled term declares ``needs = {"heads"}``.
"""
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch
from detectron2.structures import ImageList, Instances


@dataclass
class RoIRecord:
    """Faster R-CNN: the student's sampled RoIs, scored by both box heads.

    R = RoIs of the whole batch (images concatenated), K = number of classes.
    """
    instances: List[Instances]  #: per image: proposal_boxes, gt_classes (+ gt_boxes when the image has gt)
    proposal_boxes: torch.Tensor  #: (R, 4) XYXY, input pixels
    gt_boxes: torch.Tensor  #: (R, 4) matched gt box (zeros for an image without gt)
    gt_classes: torch.Tensor  #: (R,) in [0, K]; K = background
    logits: torch.Tensor  #: (R, K+1) student class logits (with grad)
    deltas: torch.Tensor  #: (R, 4K) or (R, 4) student box deltas (with grad)
    t_logits: torch.Tensor  #: (R, K+1) teacher class logits on the same RoIs (no grad)
    t_deltas: torch.Tensor  #: teacher box deltas, shaped like ``deltas``'s class layout of the teacher
    num_classes: int
    box2box_transform: object  #: the student's Box2BoxTransform (equal to the teacher's, checked)


@dataclass
class DenseRecord:
    """RetinaNet: predictions of both dense heads on the shared anchor grid.

    R = anchors of all levels of one image (concatenated, finest level first).
    """
    anchors: torch.Tensor  #: (R, 4) XYXY, input pixels
    labels: torch.Tensor  #: (N, R) matcher labels: -1 ignored, [0, K) gt class, K background
    gt_boxes: torch.Tensor  #: (N, R, 4) matched gt box per anchor
    logits: torch.Tensor  #: (N, R, K) student (with grad)
    deltas: torch.Tensor  #: (N, R, 4) student (with grad)
    t_logits: torch.Tensor  #: (N, R, K) teacher (no grad)
    t_deltas: torch.Tensor  #: (N, R, 4) teacher (no grad)
    num_classes: int
    box2box_transform: object

    @property
    def num_pos(self):
        """0-dim tensor: foreground anchors in the batch (not clamped)."""
        return ((self.labels >= 0) & (self.labels != self.num_classes)).sum()


@dataclass
class StepRecord:
    """One training step of both models. Feature dicts hold every named output
    (bottom-up stages ``res2..res5`` and FPN levels ``p2..p7``) as (N, C, H, W);
    the student's carry grad, the teacher's do not."""
    student: torch.nn.Module  #: the distillation meta-arch (for terms that run extra passes)
    teacher: torch.nn.Module  #: the frozen teacher
    images: ImageList  #: the student's preprocessed, padded batch
    t_images: ImageList  #: the same batch preprocessed by the teacher (same padded size)
    gt_instances: List[Instances]
    features: Dict[str, torch.Tensor]
    t_features: Dict[str, torch.Tensor]
    strides: Dict[str, int]  #: stride of every student output (distilled levels: equal in the teacher)
    rois: Optional[RoIRecord] = None
    dense: Optional[DenseRecord] = None

    @property
    def gt_boxes(self):
        """List of (K_i, 4) XYXY gt boxes per image, input pixels."""
        return [x.gt_boxes.tensor for x in self.gt_instances]

    def float32(self):
        """A copy whose feature maps and head outputs are float32 (under mixed precision the
        models ran in float16/bfloat16; the terms compute their losses in float32)."""
        def f(x):
            return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

        heads = {}
        for name in ("rois", "dense"):
            r = getattr(self, name)
            if r is not None:
                heads[name] = replace(r, logits=f(r.logits), deltas=f(r.deltas), t_logits=f(r.t_logits),
                                      t_deltas=f(r.t_deltas))
        return replace(self, features={k: f(v) for k, v in self.features.items()},
                       t_features={k: f(v) for k, v in self.t_features.items()}, **heads)

    def level_shapes(self, levels):
        """Ordered {level: (stride, H, W)} of the student's maps (the mask builders' input)."""
        return {lv: (self.strides[lv], *self.features[lv].shape[-2:]) for lv in levels}
