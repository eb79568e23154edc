"""Distillation loss pieces shared by all methods (plain tensors in, scalars out).

Normalisers taken over the batch (mask sums, positive / gated counts) go
through :func:`batch_normalize`, which sums them over all processes: N
processes with B/N images each give the same loss (and gradient, after DDP's
averaging) as one process with B images.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from fvcore.nn import smooth_l1_loss


def batch_normalize(num, den, min_den=None, eps=0.0):
    """``num / den`` for a denominator ``den`` summed over the local batch, made process-count invariant.

    With W processes, returns ``W * num / (sum_p den_p)`` (``den`` all-reduced; clamped to
    ``min_den`` and offset by ``eps`` after the reduction): DDP averages the W gradients and
    detectron2 averages the W logged values, so both equal ``sum_p num_p / sum_p den_p``, the
    single-process value on the whole batch. With one process it is ``num / den``.

    Args:
        num: 0-dim tensor (with grad).
        den: 0-dim tensor or number (no grad needed; detached).
    """
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device).detach()
    w = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if w > 1:
        den = den.clone()
        dist.all_reduce(den)
    if min_den is not None:
        den = den.clamp(min=min_den)
    return num * w / (den + eps) if eps else num * w / den


def masked_feature_loss(student, teacher, masks, norm="fgfi", eps=1e-6):
    """Mask-weighted imitation of teacher feature maps.

    Args:
        student: {level: (N, C, H, W)} adapted student features.
        teacher: {level: (N, C, H, W)} teacher features (no grad).
        masks: {level: (N, H, W)} weights >= 0.
        norm: "fgfi": sum_l sum M*(S-T)^2 / (2 * sum_l sum M + eps), channel sum
            in the numerator only (TAR/FGFI); "mean": per level
            sum M*(S-T)^2 / (C * N*H*W), averaged over levels.
    Returns:
        scalar loss (0 with a graph when the masks are all zero).
    """
    num, den, means = 0.0, 0.0, []
    for lv, s in student.items():
        t, m = teacher[lv], masks[lv]
        if s.shape != t.shape:
            raise ValueError(f"Feature KD level {lv}: student {tuple(s.shape)} vs teacher {tuple(t.shape)} after adapter.")
        se = ((s - t) ** 2 * m[:, None]).sum()
        if norm == "fgfi":
            num = num + se
            den = den + m.sum()
        elif norm == "mean":
            means.append(batch_normalize(se, s.numel()))
        else:
            raise ValueError(f"Unknown DISTILL.FEAT.NORM '{norm}': use 'fgfi' or 'mean'.")
    if norm == "fgfi":
        return batch_normalize(num, 2 * den, eps=eps)
    return sum(means) / max(len(means), 1)


def decoupled_feature_loss(student, teacher, masks):
    """DeFeat's decoupled imitation, pooled over the local batch.

    Per level ``fg_l = sum M (S-T)^2 / max(1, 2 C sum M)`` and ``bg_l`` the same
    with ``1 - M`` (M broadcast over the C channels, sums over N, H, W).

    Args: as :func:`masked_feature_loss`, masks binary.
    Returns:
        (mean_l fg_l, mean_l bg_l), unweighted.
    """
    fg, bg = [], []
    for lv, s in student.items():
        t, m = teacher[lv], masks[lv][:, None]
        c = s.shape[1]
        se = (s - t) ** 2
        fg.append(batch_normalize((se * m).sum(), 2 * c * m.sum(), min_den=1))
        bg.append(batch_normalize((se * (1 - m)).sum(), 2 * c * (1 - m).sum(), min_den=1))
    return sum(fg) / len(fg), sum(bg) / len(bg)


def kl_rows(student_logits, teacher_logits, temperature=1.0):
    """Per-row KL(softmax(t/T) || softmax(s/T)) * T^2.

    Args:
        student_logits, teacher_logits: (R, K+1).
    Returns:
        (R,) tensor.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * t * t


def teacher_better_cls_gate(student_logits, teacher_logits, gt_classes):
    """(R,) bool: the teacher's softmax probability of the gt class exceeds the student's."""
    idx = gt_classes[:, None]
    p_s = F.softmax(student_logits.detach(), dim=1).gather(1, idx)[:, 0]
    p_t = F.softmax(teacher_logits, dim=1).gather(1, idx)[:, 0]
    return p_t > p_s


def cls_kd_gate(student_logits, teacher_logits, gt_classes, num_classes, rois="positive", gate="none"):
    """The RoIs of :func:`cls_kd_loss`: ``(sel, keep)``, (R,) bool each.

    ``sel``: positive RoIs (``gt_classes < num_classes``) or all (``rois``); ``keep``: those of
    ``sel`` that pass ``gate`` ("teacher_better": :func:`teacher_better_cls_gate`; "none").
    """
    if rois not in ("positive", "all"):
        raise ValueError(f"Unknown DISTILL.CLS.ROIS '{rois}': use 'positive' or 'all'.")
    sel = gt_classes < num_classes if rois == "positive" else torch.ones_like(gt_classes, dtype=torch.bool)
    keep = sel
    if gate == "teacher_better":
        keep = sel & teacher_better_cls_gate(student_logits, teacher_logits, gt_classes)
    elif gate != "none":
        raise ValueError(f"Unknown DISTILL.CLS.GATE '{gate}': use 'none' or 'teacher_better'.")
    return sel, keep


def cls_kd_loss(student_logits, teacher_logits, gt_classes, num_classes, temperature=1.0, rois="positive",
                gate="none"):
    """TAR classification KD on the shared RoIs.

    ``T^2 / |R| * sum_{r in R, gate} KL(p_t || p_s)`` where R is the set of
    positive RoIs (``gt_classes < num_classes``) or all RoIs.

    Returns:
        (loss, fraction of R passing the gate as a 0-dim tensor; 0 when R is empty).
    """
    sel, keep = cls_kd_gate(student_logits, teacher_logits, gt_classes, num_classes, rois, gate)
    loss = batch_normalize((kl_rows(student_logits, teacher_logits, temperature) * keep).sum(), sel.sum(), min_den=1)
    return loss, keep.sum() / sel.sum().clamp(min=1)


def class_deltas(deltas, classes):
    """(R, 4) deltas of ``classes`` from class-specific (R, 4K) or agnostic (R, 4) deltas.

    ``classes`` outside [0, K) (background, ignored) read class 0; callers mask those rows.
    """
    if deltas.shape[1] == 4:
        return deltas
    r = deltas.shape[0]
    k = deltas.shape[1] // 4
    idx = torch.where((classes >= 0) & (classes < k), classes, torch.zeros_like(classes))
    return deltas.view(r, k, 4).gather(1, idx.view(r, 1, 1).expand(r, 1, 4))[:, 0]


def box_kd_gate(student_deltas, teacher_deltas, proposals, gt_boxes, gt_classes, num_classes, box2box_transform,
                gate="teacher_vs_proposal"):
    """The rows of :func:`box_kd_loss` (same arguments): ``(pos, keep)``, (R,) bool each.

    ``pos``: positive RoIs/anchors (``0 <= gt_classes < num_classes``); ``keep``: those of ``pos``
    passing ``gate`` (computed without grad, no host sync).
    """
    if gate not in ("teacher_vs_proposal", "teacher_vs_student", "none"):
        raise ValueError(f"Unknown DISTILL.BOX.GATE '{gate}': use teacher_vs_proposal, teacher_vs_student or none.")
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
        raise ValueError(f"Unknown DISTILL.BOX.NORMALIZER '{normalizer}': use num_rois, num_pos or num_gated.")
    d_s = class_deltas(student_deltas, gt_classes)
    d_t = class_deltas(teacher_deltas, gt_classes)
    per_roi = smooth_l1_loss(d_s, d_t, beta, reduction="none").sum(dim=1)
    loss = torch.where(keep, per_roi, torch.zeros_like(per_roi)).sum()
    num_pos, num_kept = pos.sum(), keep.sum()
    denom = {"num_rois": gt_classes.numel(), "num_pos": num_pos, "num_gated": num_kept}[normalizer]
    return batch_normalize(loss, denom, min_den=1), num_kept / num_pos.clamp(min=1)


def sigmoid_kd_loss(student_logits, teacher_logits, valid, normalizer, temperature=1.0):
    """Dense (RetinaNet) classification KD on sigmoid outputs.

    Soft binary cross-entropy of the student's per-class sigmoid to the
    teacher's probabilities, minus the teacher's own entropy (so it is the
    binary KL: 0 when they agree; same gradient as plain soft BCE), times T^2,
    summed over ``valid`` anchors and classes, divided by ``normalizer``.

    Args:
        student_logits, teacher_logits: (N, R, K).
        valid: (N, R) bool (anchors not ignored by the matcher).
        normalizer: number of foreground anchors (int or 0-dim tensor; clamped to >= 1).
    """
    t = temperature
    s, q = student_logits / t, teacher_logits / t
    p_t = torch.sigmoid(q)
    kl = F.binary_cross_entropy_with_logits(s, p_t, reduction="none") - F.binary_cross_entropy_with_logits(
        q, p_t, reduction="none")
    kl = torch.where(valid[..., None], kl, torch.zeros_like(kl))
    return batch_normalize(kl.sum() * t * t, normalizer, min_den=1)


def decoupled_kl_loss(student_logits, teacher_logits, labels, num_classes, temperature=1.0, bg_temperature=None):
    """DeFeat's decoupled-proposal KD: separate KL terms on foreground and background RoIs.

    Each is ``T^2 * mean KL(p_t || p_s)`` over its own RoIs (0 when there are none).

    Args:
        labels: (R,) the teacher's RoI labels in [0, K] (K = background).
    Returns:
        (fg loss, bg loss).
    """
    fg = (labels < num_classes).to(student_logits.dtype)
    bg_t = temperature if bg_temperature is None or bg_temperature <= 0 else bg_temperature
    rows_fg = kl_rows(student_logits, teacher_logits, temperature)
    rows_bg = rows_fg if bg_t == temperature else kl_rows(student_logits, teacher_logits, bg_t)
    return (batch_normalize((rows_fg * fg).sum(), fg.sum(), min_den=1),
            batch_normalize((rows_bg * (1 - fg)).sum(), (1 - fg).sum(), min_den=1))


# ------------------------------------------------------------------ HGD
def channel_normalized_loss(student, teacher, weights, eps=1e-6):
    """HGD's hands-on imitation of one stage: ``sum W (S-T)^2 / (C_t * sum W + eps)``.

    Dividing by the teacher's channel count makes stages of 64 and 2048 channels comparable
    (the loss is a weighted per-element mean). Sums over the local batch; the denominator
    goes through :func:`batch_normalize`.

    Args:
        student: (N, C_t, H, W) adapted student map; teacher: (N, C_t, H, W); weights: (N, H, W) >= 0.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"HGD stage: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)} after adapter.")
    num = ((student - teacher) ** 2 * weights[:, None]).sum()
    return batch_normalize(num, teacher.shape[1] * weights.sum(), eps=eps)


# ------------------------------------------------------------------ TBD
def harmony_score(score, iou, form="power", alpha=0.5, beta=6.0):
    """TBD's Harmony Score of predictions from their class score ``s`` and localisation IoU ``u``.

    ``power``: ``s^alpha * u^(1-alpha)``; ``tood``: ``s^alpha * u^beta`` (TOOD's alignment
    metric, alpha 1, beta 6 there); ``agreement``: ``1 - |s - u|``. Inputs clamped to [0, 1]
    (an IoU of a degenerate box may be NaN: read as 0). Returns a tensor shaped like ``score``.
    """
    s = score.clamp(0, 1)
    u = torch.nan_to_num(iou, nan=0.0).clamp(0, 1)
    if form == "power":
        return s.pow(alpha) * u.pow(1 - alpha)
    if form == "tood":
        return s.pow(alpha) * u.pow(beta)
    if form == "agreement":
        return 1 - (s - u).abs()
    raise ValueError(f"Unknown DISTILL.TBD.HS_FORM '{form}': use power, tood or agreement.")


def softmax_kl_rows_to(student_logits, target_probs, temperature=1.0):
    """Per-row ``KL(p || softmax(s/T)) * T^2`` for a given target distribution ``p`` (R, K+1)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return (torch.xlogy(target_probs, target_probs) - target_probs * log_p_s).sum(dim=1) * temperature ** 2


def with_gt_prob(probs, classes, value, pos):
    """Softmax targets whose gt-class probability is ``value`` on rows ``pos``, the other classes
    rescaled to sum to ``1 - value`` (rows not in ``pos`` unchanged). probs (R, K+1), classes/value/pos (R,)."""
    idx = classes.clamp(0, probs.shape[1] - 1)[:, None]
    p_gt = probs.gather(1, idx)[:, 0]
    scale = ((1 - value) / (1 - p_gt).clamp(min=1e-6))[:, None]
    new = (probs * scale).scatter(1, idx, value[:, None])
    return torch.where(pos[:, None], new, probs)


def sigmoid_kl_to(student_logits, target_probs, temperature=1.0):
    """Elementwise binary ``KL(p || sigma(s/T)) * T^2`` for target probabilities ``p`` (any shape)."""
    p = target_probs
    ent = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))
    return (F.binary_cross_entropy_with_logits(student_logits / temperature, p, reduction="none") - ent) * temperature ** 2
