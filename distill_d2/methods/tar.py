"""TAR (Sun et al. 2020): teacher-better box KD and the reverse direction of proposal sharing.

TAR's feature term is ``FeatureKD`` with ``FEAT.MASK gaussian`` and its
classification term ``RoIClsKD`` / ``DenseClsKD`` (module ``generic``); the
presets are ``configs/synthetic/tar_*.yaml``.

* ``RoIBoxKD`` (Faster R-CNN) / ``DenseBoxKD`` (RetinaNet) -> ``loss_kd_box``:
  smooth-L1 between student and teacher deltas of the gt class on positive
  RoIs/anchors where the teacher localises better (``BOX.GATE``), summed and
  divided by ``BOX.NORMALIZER``. Logs ``kd/box_gate_frac``.
* ``ReverseRoIClsKD`` (Faster R-CNN) -> ``loss_kd_cls_reverse``: the teacher's
  RPN proposals, sampled by the student's sampler, scored by both heads, KL as
  ``RoIClsKD`` (same CLS.* keys).
"""
import torch
from detectron2.config import CfgNode as CN

from ..losses import box_kd_gate, box_kd_loss, cls_kd_loss
from ..modeling.rcnn import score_teacher_rois
from ..teacher import TeacherError
from ..terms import DISTILL_TERM_REGISTRY, DistillTerm, check_choice
from .generic import RoIClsKD, check_same_anchors, per_image

BOX_READS = ("BOX.WEIGHT", "BOX.GATE", "BOX.BETA", "BOX.NORMALIZER")


class _BoxKD(DistillTerm):
    needs = frozenset({"heads"})
    reads = BOX_READS
    #: what BOX.NORMALIZER "auto" means for this family
    auto_normalizer = None

    @classmethod
    def add_config(cls, d):
        if "BOX" in d:  # shared by RoIBoxKD and DenseBoxKD
            return
        d.BOX = CN()
        d.BOX.WEIGHT = 1.0
        # TAR teacher-better gate on positive RoIs/anchors: IoU(teacher box, gt) greater than
        # IoU(proposal or anchor, gt) ("teacher_vs_proposal", default), than IoU(student box,
        # gt) ("teacher_vs_student"), or "none" (all positives).
        d.BOX.GATE = "teacher_vs_proposal"
        # smooth-L1 beta between student and teacher deltas (0 = L1).
        d.BOX.BETA = 0.0
        # Divide the summed loss by "num_rois" (all sampled RoIs, like detectron2's
        # box loss), "num_pos" (positive RoIs/anchors, like RetinaNet's loss),
        # "num_gated" (those passing the gate) or "auto" (num_rois for Faster
        # R-CNN, num_pos for RetinaNet) [choice].
        d.BOX.NORMALIZER = "auto"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        b = cfg.DISTILL.BOX
        check_choice("DISTILL.BOX.GATE", b.GATE, ("teacher_vs_proposal", "teacher_vs_student", "none"))
        check_choice("DISTILL.BOX.NORMALIZER", b.NORMALIZER, ("auto", "num_rois", "num_pos", "num_gated"))
        self.b = b
        self.normalizer = self.auto_normalizer if b.NORMALIZER == "auto" else b.NORMALIZER

    @staticmethod
    def _check_coders(s_t, t_t, key):
        if tuple(s_t.weights) != tuple(t_t.weights):
            raise TeacherError(
                f"Box KD compares deltas, but the student encodes boxes with weights {s_t.weights} and the teacher "
                f"with {t_t.weights}: set the same {key} or remove the box term from DISTILL.TERMS."
            )

    def _inputs(self, rec):
        """``box_kd_loss``'s first arguments (deltas, proposals/anchors, gt, classes, coder; rows of all
        images), and the number of rows per image."""
        raise NotImplementedError

    def forward(self, rec):
        b = self.b
        args, _ = self._inputs(rec)
        loss, frac = box_kd_loss(*args, b.GATE, b.BETA, self.normalizer)
        return {"loss_kd_box": b.WEIGHT * loss}, {"kd/box_gate_frac": frac}

    def explain(self, rec):
        args, counts = self._inputs(rec)
        _, keep = box_kd_gate(*args, self.b.GATE)
        return {"boxes": {"box_gate_passed": per_image(args[2], keep, counts)}}


@DISTILL_TERM_REGISTRY.register()
class RoIBoxKD(_BoxKD):
    """Box KD on the student's sampled RoIs (proposal = the RoI box); "auto" normaliser: all sampled RoIs."""

    families = ("rcnn",)
    auto_normalizer = "num_rois"

    def check_teacher(self, student, teacher):
        self._check_coders(student.roi_heads.box_predictor.box2box_transform,
                           teacher.roi_heads.box_predictor.box2box_transform, "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS")

    def _inputs(self, rec):
        r = rec.rois
        return ((r.deltas, r.t_deltas, r.proposal_boxes, r.gt_boxes, r.gt_classes, r.num_classes, r.box2box_transform),
                [len(x) for x in r.instances])


@DISTILL_TERM_REGISTRY.register()
class DenseBoxKD(_BoxKD):
    """Box KD on gt-matched anchors (proposal = the anchor); "auto" normaliser: foreground anchors."""

    families = ("dense",)
    auto_normalizer = "num_pos"

    def check_teacher(self, student, teacher):
        check_same_anchors(student, teacher)
        self._check_coders(student.box2box_transform, teacher.box2box_transform, "MODEL.RETINANET.BBOX_REG_WEIGHTS")

    def _inputs(self, rec):
        d = rec.dense
        n, r = d.labels.shape
        anchors = d.anchors[None].expand(n, -1, -1).reshape(-1, 4)
        return ((d.deltas.reshape(-1, 4), d.t_deltas.reshape(-1, 4), anchors, d.gt_boxes.reshape(-1, 4),
                 d.labels.reshape(-1), d.num_classes, d.box2box_transform), [r] * n)


@DISTILL_TERM_REGISTRY.register()
class ReverseRoIClsKD(RoIClsKD):
    """Reverse proposal sharing [choice]: KL on the teacher's own RPN proposals sampled by the student's
    sampler (``CLS.TEMPERATURE``, ``CLS.ROIS``, ``CLS.GATE``, ``CLS.WEIGHT`` as RoIClsKD)."""

    needs = frozenset({"same_family"})

    def forward(self, rec):
        c = self.c
        s_scores, t_scores, labels, _ = score_teacher_rois(rec, rec.student.roi_heads)
        loss, _ = cls_kd_loss(s_scores, t_scores, labels, rec.student.roi_heads.num_classes, c.TEMPERATURE, c.ROIS,
                              c.GATE)
        return {"loss_kd_cls_reverse": c.WEIGHT * loss}, {}

    def explain(self, rec):
        # a fresh sample of the teacher's proposals (the sampler is random), as forward draws one
        s_scores, t_scores, labels, rois = score_teacher_rois(rec, rec.student.roi_heads)
        return self._explain_rois("reverse_cls_kd_rois", s_scores, t_scores, labels, rec.student.roi_heads.num_classes,
                                  torch.cat([r.proposal_boxes.tensor for r in rois]), [len(r) for r in rois])
