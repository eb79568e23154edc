"""TAR (Sun et al. 2020, "Distilling Object Detectors with Task Adaptive Regularization"): its own pieces.

TAR = ``FeatureKD`` with ``FEAT.MASK gaussian`` (module ``generic``; the
Gaussian mask in ``distill_d2/masks.py``) + ``RoIClsKD`` / ``DenseClsKD``
(``generic``, shared with Hinton) + the teacher-better box KD below; the
presets are ``configs/synthetic/tar_*.yaml``; method card docs/methods/TAR.md.
TAR's own keys are ``DISTILL.TAR.*`` (``DISTILL.BOX.*`` is their old name).

* ``RoIBoxKD`` (Faster R-CNN) / ``DenseBoxKD`` (RetinaNet) -> ``loss_kd_box``:
  smooth-L1 between student and teacher deltas of the gt class on positive
  RoIs/anchors where the teacher localises better (``TAR.BOX_GATE``), summed and
  divided by ``TAR.BOX_NORMALIZER``. Logs ``kd/box_gate_frac``.
* ``ReverseRoIClsKD`` (Faster R-CNN) -> ``loss_kd_cls_reverse``: the teacher's
  RPN proposals, sampled by the student's sampler, scored by both heads, KL as
  ``RoIClsKD`` (same CLS.* keys).
"""
import torch
from detectron2.config import CfgNode as CN
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from fvcore.nn import smooth_l1_loss

from ..errors import DistillConfigError
from ..losses import batch_normalize, class_deltas
from ..teacher import check_same_anchors, check_same_box_coders
from ..terms import DISTILL_TERM_REGISTRY, check_choice
from .generic import LogitTerm, RoIClsKD, per_image

# ------------------------------------------------------------------ loss formulas
def box_kd_gate(student_deltas, teacher_deltas, proposals, gt_boxes, gt_classes, num_classes, box2box_transform,
                gate="teacher_vs_proposal"):
    """The rows of :func:`box_kd_loss` (same arguments): ``(pos, keep)``, (R,) bool each.

    ``pos``: positive RoIs/anchors (``0 <= gt_classes < num_classes``); ``keep``: those of ``pos``
    passing ``gate`` (computed without grad, no host sync).
    """
    if gate not in ("teacher_vs_proposal", "teacher_vs_student", "none"):
        raise DistillConfigError(f"Unknown DISTILL.TAR.BOX_GATE '{gate}': use teacher_vs_proposal, teacher_vs_student or none.")
    pos = (gt_classes >= 0) & (gt_classes < num_classes)
    if gate == "none":
        return pos, pos
    with torch.no_grad():
        d_t = class_deltas(teacher_deltas, gt_classes)
        iou_t = matched_pairwise_iou(Boxes(box2box_transform.apply_deltas(d_t, proposals)), Boxes(gt_boxes))
        if gate == "teacher_vs_proposal":
            ref = matched_pairwise_iou(Boxes(proposals), Boxes(gt_boxes))
        else:
            d_s = class_deltas(student_deltas.detach(), gt_classes)
            ref = matched_pairwise_iou(Boxes(box2box_transform.apply_deltas(d_s, proposals)), Boxes(gt_boxes))
    return pos, pos & (iou_t > ref)  # NaN IoUs of background rows compare False


def box_kd_loss(student_deltas, teacher_deltas, proposals, gt_boxes, gt_classes, num_classes, box2box_transform,
                gate="teacher_vs_proposal", beta=0.0, normalizer="num_rois"):
    """TAR box-regression KD on positive RoIs where the teacher localises better.

    Every row is computed and masked (no indexing by a data-dependent count,
    so no host sync).

    Args:
        student_deltas, teacher_deltas: (R, 4K) or (R, 4) predicted deltas.
        proposals, gt_boxes: (R, 4) XYXY proposal/anchor and matched gt boxes.
        gate: "teacher_vs_proposal": IoU(decode(d_t), gt) > IoU(proposal, gt);
            "teacher_vs_student": ... > IoU(decode(d_s), gt); "none".
        gt_classes: (R,) in [0, K] (K = background); -1 (ignored anchors) is skipped.
        normalizer: "num_rois" (all R, like detectron2's box loss), "num_pos"
            (positive RoIs/anchors, like RetinaNet's) or "num_gated".
    Returns:
        (loss, fraction of positive RoIs passing the gate as a 0-dim tensor; 0 without positives).
    """
    pos, keep = box_kd_gate(student_deltas, teacher_deltas, proposals, gt_boxes, gt_classes, num_classes,
                            box2box_transform, gate)
    if normalizer not in ("num_rois", "num_pos", "num_gated"):
        raise DistillConfigError(f"Unknown DISTILL.TAR.BOX_NORMALIZER '{normalizer}': use num_rois, num_pos or num_gated.")
    d_s = class_deltas(student_deltas, gt_classes)
    d_t = class_deltas(teacher_deltas, gt_classes)
    per_roi = smooth_l1_loss(d_s, d_t, beta, reduction="none").sum(dim=1)
    loss = torch.where(keep, per_roi, torch.zeros_like(per_roi)).sum()
    num_pos, num_kept = pos.sum(), keep.sum()
    denom = {"num_rois": gt_classes.numel(), "num_pos": num_pos, "num_gated": num_kept}[normalizer]
    return batch_normalize(loss, denom, min_den=1), num_kept / num_pos.clamp(min=1)


def add_tar_config(d):
    """DISTILL.TAR: the box term's keys (shared by RoIBoxKD and DenseBoxKD)."""
    if "TAR" in d:
        return
    d.TAR = CN()
    d.TAR.BOX_WEIGHT = 1.0
    # Teacher-better gate on positive RoIs/anchors: IoU(teacher box, gt) greater than
    # IoU(proposal or anchor, gt) ("teacher_vs_proposal", default), than IoU(student box,
    # gt) ("teacher_vs_student"), or "none" (all positives).
    d.TAR.BOX_GATE = "teacher_vs_proposal"
    # smooth-L1 beta between student and teacher deltas (0 = L1).
    d.TAR.BOX_BETA = 0.0
    # Divide the summed loss by "num_rois" (all sampled RoIs, like detectron2's
    # box loss), "num_pos" (positive RoIs/anchors, like RetinaNet's loss),
    # "num_gated" (those passing the gate) or "auto" (num_rois for Faster
    # R-CNN, num_pos for RetinaNet) [choice].
    d.TAR.BOX_NORMALIZER = "auto"


class _BoxKD(LogitTerm):
    reads = ("TAR.BOX_*",)
    renamed = {f"BOX.{k}": f"TAR.BOX_{k}" for k in ("WEIGHT", "GATE", "BETA", "NORMALIZER")}
    #: what TAR.BOX_NORMALIZER "auto" means for this family
    auto_normalizer = None

    @classmethod
    def add_config(cls, d):
        add_tar_config(d)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        t = cfg.DISTILL.TAR
        check_choice("DISTILL.TAR.BOX_GATE", t.BOX_GATE, ("teacher_vs_proposal", "teacher_vs_student", "none"))
        check_choice("DISTILL.TAR.BOX_NORMALIZER", t.BOX_NORMALIZER, ("auto", "num_rois", "num_pos", "num_gated"))
        self.weight, self.gate, self.beta = t.BOX_WEIGHT, t.BOX_GATE, t.BOX_BETA
        self.normalizer = self.auto_normalizer if t.BOX_NORMALIZER == "auto" else t.BOX_NORMALIZER

    def check_teacher(self, student, teacher):
        check_same_box_coders(student, teacher, "the box term")

    def _inputs(self, rec):
        """``box_kd_loss``'s first arguments (deltas, proposals/anchors, gt, classes, coder; rows of all
        images), and the number of rows per image."""
        raise NotImplementedError

    def forward(self, rec):
        args, _ = self._inputs(rec)
        loss, frac = box_kd_loss(*args, self.gate, self.beta, self.normalizer)
        return {"loss_kd_box": self.weight * loss}, {"kd/box_gate_frac": frac}

    def explain(self, rec):
        args, counts = self._inputs(rec)
        _, keep = box_kd_gate(*args, self.gate)
        return {"boxes": {"box_gate_passed": per_image(args[2], keep, counts)}}


@DISTILL_TERM_REGISTRY.register()
class RoIBoxKD(_BoxKD):
    """Box KD on the student's sampled RoIs (proposal = the RoI box); "auto" normaliser: all sampled RoIs."""

    families = ("rcnn",)
    auto_normalizer = "num_rois"

    def _inputs(self, rec):
        r = rec.get("heads")
        return ((r.deltas, r.t_deltas, r.proposal_boxes, r.gt_boxes, r.gt_classes, r.num_classes, r.box2box_transform),
                r.counts)


@DISTILL_TERM_REGISTRY.register()
class DenseBoxKD(_BoxKD):
    """Box KD on gt-matched anchors (proposal = the anchor); "auto" normaliser: foreground anchors."""

    families = ("dense",)
    auto_normalizer = "num_pos"

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher, "the head terms (DenseClsKD, DenseBoxKD)")
        super().check_teacher(student, teacher)

    def _inputs(self, rec):
        d = rec.get("heads")
        n, r = d.labels.shape
        anchors = d.anchors[None].expand(n, -1, -1).reshape(-1, 4)
        return ((d.deltas.reshape(-1, 4), d.t_deltas.reshape(-1, 4), anchors, d.gt_boxes.reshape(-1, 4),
                 d.labels.reshape(-1), d.num_classes, d.box2box_transform), [r] * n)


@DISTILL_TERM_REGISTRY.register()
class ReverseRoIClsKD(RoIClsKD):
    """Reverse proposal sharing [choice]: KL on the teacher's own RPN proposals sampled by the student's
    sampler (``CLS.TEMPERATURE``, ``CLS.ROIS``, ``CLS.GATE``, ``CLS.WEIGHT`` as RoIClsKD). Its pictures show
    the sample its loss used in the same step (the record's ``"reverse_rois"``)."""

    needs = frozenset({"reverse_rois"})
    rois = "reverse_rois"
    loss_name, picture, scalar = "loss_kd_cls_reverse", "reverse_cls_kd_rois", None
