"""``DistillGeneralizedRCNN``: a GeneralizedRCNN student distilled from a frozen teacher.

Training step (TAR region-proposal sharing): detectron2's own
``GeneralizedRCNN.forward`` runs unchanged (RPN, ``label_and_sample_proposals``
once, box/mask/keypoint heads, their losses). For head terms, forward hooks
record the RoIs it sampled (the output of ``roi_heads``) and the student's box
predictions on them (the output of ``box_predictor``); the teacher's
``box_pooler`` + box head then score the *same* RoIs on the teacher's own FPN
maps. At inference the model is exactly the student (GeneralizedRCNN.inference).
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage

from ..errors import TeacherError
from ..record import RoIRecord, RPNRecord, provider
from .distiller import DistillerMixin


def score_rois(model, features, proposals):
    """Pool ``proposals`` on ``model``'s own features and run its box head + predictor.

    The first three lines of ``StandardROIHeads._forward_box``: detectron2 has no
    entry point that scores given RoIs without sampling them or post-processing.

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


def roi_record(student, rois, logits, deltas, t_logits, t_deltas):
    """:class:`RoIRecord` of sampled ``rois`` (list of Instances) and both heads' predictions on them."""
    return RoIRecord(
        instances=rois, proposal_boxes=Boxes.cat([r.proposal_boxes for r in rois]).tensor,
        gt_boxes=torch.cat([_gt_boxes(r) for r in rois]), gt_classes=torch.cat([r.gt_classes for r in rois]),
        logits=logits, deltas=deltas, t_logits=t_logits, t_deltas=t_deltas,
        num_classes=student.roi_heads.num_classes, box2box_transform=student.roi_heads.box_predictor.box2box_transform,
    )


def score_teacher_rois(rec, sampler):
    """:class:`RoIRecord` of the teacher's RPN proposals sampled by ``sampler`` (the student's or the
    teacher's ``roi_heads``), scored by both box heads (the student's with grad)."""
    student, teacher = rec.models.student, rec.models.teacher
    with torch.no_grad():
        rois = sample_teacher_rois(teacher, sampler, rec.t_images, rec.t_features, rec.gt_instances)
        t_logits, t_deltas = score_rois(teacher, rec.t_features, rois)
    logits, deltas = score_rois(student, rec.features, rois)
    return roi_record(student, rois, logits, deltas, t_logits, t_deltas)


@provider(families=("rcnn",))
def reverse_rois(rec, need):
    """The teacher's RPN proposals sampled by the *student's* sampler, scored by both box heads
    (TAR's reverse proposal sharing): a :class:`RoIRecord`."""
    return score_teacher_rois(rec, rec.models.student.roi_heads)


@provider(families=("rcnn",))
def teacher_rois(rec, need):
    """The teacher's RPN proposals sampled by the *teacher's* sampler, scored by both box heads (DeFeat's
    decoupled proposals): a :class:`RoIRecord` whose labels are the teacher's."""
    return score_teacher_rois(rec, rec.models.teacher.roi_heads)


@provider(families=("rcnn",))
def teacher_rpn(rec, need):
    """:class:`RPNRecord`: the teacher's RPN on its own maps, per anchor, with the anchors its matcher
    assigns (``anchor_matcher`` on IoU with the gt; no subsampling). No grad."""
    rpn = rec.models.teacher.proposal_generator
    with torch.no_grad():
        feats = [rec.t_features[f] for f in rpn.in_features]
        logits, deltas = rpn.rpn_head(feats)
        anchors = Boxes.cat(rpn.anchor_generator(feats))
        n = feats[0].shape[0]
        sizes = {f: (*x.shape[-2:], o.shape[1]) for f, x, o in zip(rpn.in_features, feats, logits)}
        # as RPN.forward lays them out: (N, A, H, W) -> (N, H*W*A); (N, A*4, H, W) -> (N, H*W*A, 4)
        logits = torch.cat([o.permute(0, 2, 3, 1).flatten(1) for o in logits], dim=1)
        deltas = torch.cat([x.view(n, -1, 4, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas],
                           dim=1)
        labels = torch.zeros_like(logits, dtype=torch.long)
        gt_boxes = torch.zeros_like(deltas)
        for i, gt in enumerate(rec.gt_boxes):
            if gt.shape[0] == 0:
                continue
            matched, labels[i] = rpn.anchor_matcher(pairwise_iou(Boxes(gt), anchors))
            gt_boxes[i] = gt[matched]
    return RPNRecord(logits=logits, deltas=deltas, anchors=anchors.tensor, labels=labels, gt_boxes=gt_boxes,
                     sizes=sizes, box2box_transform=rpn.box2box_transform)


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillerMixin, GeneralizedRCNN):
    STUDENT_META_ARCH = "GeneralizedRCNN"
    FAMILY = "rcnn"

    def _check_head_terms_supported(self, names):
        rh = self.roi_heads
        for attr in ("box_pooler", "box_head", "box_predictor", "box_in_features", "label_and_sample_proposals"):
            if not hasattr(rh, attr):
                raise TeacherError(
                    f"Head terms {names} need StandardROIHeads-style heads, but {type(rh).__name__} has no '{attr}' "
                    "(cascade heads are not supported). Use feature terms only (FeatureKD, DecoupledFeatureKD)."
                )
        if isinstance(rh, StandardROIHeads) and type(rh).forward is not StandardROIHeads.forward:
            raise TeacherError(
                f"Head terms {names} record the RoIs and box predictions of StandardROIHeads.forward, but "
                f"{type(rh).__name__} overrides forward(), so what its box head saw cannot be recorded reliably. "
                "Use feature terms only, or register a meta-arch that records your heads."
            )
        if getattr(rh, "train_on_pred_boxes", False):
            raise TeacherError("MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES rewrites the sampled RoIs in place; head "
                               f"terms {names} do not support it.")

    def _record_hooks(self, raw):
        def predictions(out):
            raw.setdefault("box_predictions", []).append(out)

        return [(self.roi_heads, lambda out: raw.__setitem__("rois", out[0])),
                (self.roi_heads.box_predictor, predictions)]

    def _record_heads(self, rec, raw):
        rois, preds = raw["rois"], raw.get("box_predictions", [])
        if len(preds) != 1:
            raise RuntimeError(f"The student's box predictor ran {len(preds)} times in one step (expected 1): "
                               "its ROI heads do not follow StandardROIHeads.")
        logits, deltas = preds[0]
        with torch.no_grad():
            t_logits, t_deltas = score_rois(self._teacher, rec.t_features, rois)
        rec.rois = roi_record(self, rois, logits, deltas, t_logits, t_deltas)
