"""What both models saw in one training step: the record every distillation term reads.

The meta-architecture fills one :class:`StepRecord` per step (both backbones
run once); terms (:mod:`distill_d2.terms`) only read it. Beyond the fixed
fields, a term lists in its ``needs`` what else it reads, and gets it with
``rec.get(need)``; each entry is computed once per step, on first use, and
shared by every term that reads it:

* ``"heads"``: head outputs of both models on the student's samples
  (:class:`RoIRecord` in ``rec.rois``, :class:`DenseRecord` in ``rec.dense``),
  filled by the meta-architecture;
* a name in ``RECORD_REGISTRY`` (teacher passes such as ``"teacher_rois"``,
  ``"reverse_rois"``, ``"teacher_rpn"``, ``"dense_level_sizes"``; registered
  in ``distill_d2/modeling/``);
* a :class:`Tap`: the outputs of one module of the student or the teacher,
  captured by a forward hook in the step's single forward of that model;
* a :class:`CrossPass`: a slice of the *teacher's* head run on a tensor the
  term computes from the student's, with gradient to the student and none to
  the teacher.
"""
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch
from detectron2.structures import ImageList, Instances

from .registry import RECORD_REGISTRY

#: ``needs`` entries the meta-architecture handles itself (not in RECORD_REGISTRY)
BUILTIN_NEEDS = ("heads", "same_family")


def provider(families=("rcnn", "dense"), same_family=True):
    """Register ``fn(rec, need) -> value`` in RECORD_REGISTRY under its name: an entry of the record that
    works for student ``families`` and, with ``same_family``, needs a teacher of the student's family."""
    def register(fn):
        fn.families, fn.same_family = tuple(families), same_family
        RECORD_REGISTRY.register(fn)
        return fn

    return register


@dataclass(frozen=True)
class Tap:
    """A module's outputs in one model, in call order (a RetinaNet head module runs once per level).

    ``path`` is the dotted module name in the detector (``model.named_modules()``), e.g.
    ``"head.cls_subnet.4"`` (RetinaNet), ``"roi_heads.box_head.fc1"`` or ``"backbone.bottom_up.res3"``.
    ``rec.get(tap)`` returns a list of tensors (the student's with grad, the teacher's without).
    A teacher module of the head runs only when some term needs ``"heads"``.
    """
    model: str  #: "student" or "teacher"
    path: str

    def __str__(self):
        return f"{self.model}:{self.path}"


@dataclass(frozen=True)
class CrossPass:
    """The teacher's head from layer ``start`` of ``branch`` on, run on the student's outputs of ``tap``.

    ``branch``: ``"cls"`` / ``"bbox"`` (RetinaNet: ``head.cls_subnet[start:]`` then ``cls_score``, or
    ``bbox_subnet`` then ``bbox_pred``) or ``"box"`` (Faster R-CNN: the box head's layers from ``start`` on,
    then the box predictor: a (logits, deltas) pair); see :func:`distill_d2.modeling.run_head_from`.
    ``prepare(rec, i, x) -> x'`` (optional, e.g. a bound method of the term) maps the i-th tapped tensor
    before the teacher's layers (e.g. re-standardise it to the teacher's statistics).
    ``rec.get(cross)`` returns the list of outputs, one per tapped tensor: differentiable in the student's
    tensor, the teacher's parameters frozen (no gradient, BN in eval mode).
    """
    tap: Tap
    branch: str
    start: int
    prepare: Optional[object] = None

    def __str__(self):
        return f"cross:{self.tap}->teacher {self.branch}[{self.start}:]"


@dataclass
class RoIRecord:
    """Faster R-CNN: sampled RoIs, scored by both box heads.

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

    @property
    def counts(self):
        """RoIs per image (list of int)."""
        return [len(x) for x in self.instances]


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
    #: the student's RetinaNet loss normaliser this step (detectron2's EMA of the foreground count, the
    #: denominator of its detection losses)
    loss_normalizer: float = 1.0

    @property
    def num_pos(self):
        """0-dim tensor: foreground anchors in the batch (not clamped)."""
        return ((self.labels >= 0) & (self.labels != self.num_classes)).sum()


@dataclass
class RPNRecord:
    """Faster R-CNN: the teacher's RPN on its own maps, per anchor (``"teacher_rpn"``; no grad).

    R = anchors of all RPN levels (concatenated in the RPN's order, each level (H, W, A)).
    """
    logits: torch.Tensor  #: (N, R) objectness logits
    deltas: torch.Tensor  #: (N, R, 4) box deltas
    anchors: torch.Tensor  #: (R, 4) XYXY, input pixels
    labels: torch.Tensor  #: (N, R) the RPN matcher's labels: 1 foreground, 0 background, -1 ignored
    gt_boxes: torch.Tensor  #: (N, R, 4) the gt box each anchor is matched to (zeros for an image without gt)
    sizes: Dict[str, tuple]  #: {level: (H, W, A)} in anchor order
    box2box_transform: object  #: the RPN's box coder


@dataclass
class ModelPair:
    """The two detectors, for the record's providers (``distill_d2/modeling``); terms never touch them."""
    student: torch.nn.Module  #: the distillation meta-arch
    teacher: torch.nn.Module  #: the frozen teacher


@dataclass
class StepRecord:
    """One training step of both models. Feature dicts hold every named output
    (bottom-up stages ``res2..res5`` and FPN levels ``p2..p7``) as (N, C, H, W);
    the student's carry grad, the teacher's do not."""
    images: ImageList  #: the student's preprocessed, padded batch
    t_images: ImageList  #: the same batch preprocessed by the teacher (same padded size)
    gt_instances: List[Instances]
    features: Dict[str, torch.Tensor]
    t_features: Dict[str, torch.Tensor]
    strides: Dict[str, int]  #: stride of every student output (distilled levels: equal in the teacher)
    rois: Optional[RoIRecord] = None
    dense: Optional[DenseRecord] = None
    models: Optional[ModelPair] = None
    #: {Tap: [(output, its version at capture) in call order]} captured in this step
    taps: Dict[Tap, list] = field(default_factory=dict)
    #: what the enabled terms declared (``rec.get`` refuses anything else); None: anything
    declared: Optional[frozenset] = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def gt_boxes(self):
        """List of (K_i, 4) XYXY gt boxes per image, input pixels."""
        return [x.gt_boxes.tensor for x in self.gt_instances]

    def get(self, need):
        """What ``need`` (an entry of a term's ``needs``) holds in this step, computed once and cached."""
        if need == "heads":
            return self.rois if self.rois is not None else self.dense
        if self.declared is not None and need not in self.declared:
            raise KeyError(f"The step record was asked for {need!s}, which no enabled term lists in its `needs`: "
                           "add it to the term's needs (they are set up before the step runs).")
        if need not in self.cache:
            self.cache[need] = self._compute(need)
        return self.cache[need]

    def _compute(self, need):
        if isinstance(need, Tap):
            if need not in self.taps or not self.taps[need]:
                raise RuntimeError(
                    f"Tap {need} captured nothing in this step: that module did not run"
                    + (" (the teacher's head runs only when an enabled term needs 'heads')."
                       if need.model == "teacher" else "."))
            changed = [i for i, (x, v) in enumerate(self.taps[need]) if torch.is_tensor(x) and x._version != v]
            if changed:
                raise RuntimeError(f"Tap {need}: the module's output was modified in place after it was captured "
                                   "(e.g. by an in-place ReLU): tap the module that follows instead.")
            return [x for x, _ in self.taps[need]]
        return RECORD_REGISTRY.get("cross_pass" if isinstance(need, CrossPass) else need)(self, need)

    def float32(self):
        """A copy whose feature maps, head outputs and taps are float32 (under mixed precision the
        models ran in float16/bfloat16; the terms compute their losses in float32)."""
        def f(x):
            return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

        def tap(x, version):  # a converted copy is a fresh tensor: its own version counter
            y = f(x)
            return y, (version if y is x else y._version)

        heads = {}
        for name in ("rois", "dense"):
            r = getattr(self, name)
            if r is not None:
                heads[name] = replace(r, logits=f(r.logits), deltas=f(r.deltas), t_logits=f(r.t_logits),
                                      t_deltas=f(r.t_deltas))
        return replace(self, features={k: f(v) for k, v in self.features.items()},
                       t_features={k: f(v) for k, v in self.t_features.items()},
                       taps={k: [tap(x, v) for x, v in xs] for k, xs in self.taps.items()},
                       cache={}, **heads)

    def level_shapes(self, levels):
        """Ordered {level: (stride, H, W)} of the student's maps (the mask builders' input)."""
        return {lv: (self.strides[lv], *self.features[lv].shape[-2:]) for lv in levels}
