"""Distillation loss pieces shared by two or more methods (plain tensors in, scalars out); a formula used by
one method lives in its file under ``distill_d2/methods/``.

Normalisers taken over the batch (mask sums, positive / gated counts) go
through :func:`batch_normalize`, which sums them over all processes: N
processes with B/N images each give the same loss (and gradient, after DDP's
averaging) as one process with B images.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


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


# ------------------------------------------------------------------ per-channel batch statistics (PKD, CWD, CrossKD)
class _SumOverProcesses(torch.autograd.Function):
    """all_reduce (sum) whose backward all-reduces the gradient (the gradient of every process's loss
    reaches the inputs of every process)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_processes(x, sync=True):
    """``x`` summed over all processes when ``sync`` and more than one process run, else ``x``.

    Differentiable: the backward sums the gradients over processes too, so each process gets the
    gradient of the sum of all processes' losses through the shared statistics (as SyncBatchNorm does).
    """
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _SumOverProcesses.apply(x)
    return x


def channel_moments(maps, unbiased=True, sync=True):
    """Per-channel mean and variance over (N, H, W) of each map, in two passes (mean, then the centred
    sum of squares: no cancellation in float32). With ``sync`` the sums and element counts of every
    pass are all-reduced over processes, all maps in one call, so the statistics are those of the
    whole batch.

    Args:
        maps: list of (N, C_i, H_i, W_i) tensors (one dtype).
        unbiased: divide the centred sum by count - 1 (torch's default std), else by count; the
            divisor is clamped to >= 1 (a single element has variance 0, not NaN).
    Returns:
        list of (mean (C_i,), var (C_i,)).
    """
    dt, dev = maps[0].dtype, maps[0].device
    chans = [m.shape[1] for m in maps]
    counts = torch.tensor([float(m.shape[0] * m.shape[2] * m.shape[3]) for m in maps], dtype=dt, device=dev)
    first = sum_over_processes(torch.cat([m.sum(dim=(0, 2, 3)) for m in maps] + [counts]), sync)
    sums, counts = first[:-len(maps)].split(chans), first[-len(maps):].detach()
    means = [s / n for s, n in zip(sums, counts)]
    centred = torch.cat([((m - mu.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) for m, mu in zip(maps, means)])
    centred = sum_over_processes(centred, sync).split(chans)
    div = [(n - 1 if unbiased else n).clamp(min=1) for n in counts]
    return [(mu, c / d) for mu, c, d in zip(means, centred, div)]


def standardize_channels(maps, eps=1e-6, unbiased=True, sync=True, eps_inside=False):
    """Each (N, C, H, W) map standardised per channel with :func:`channel_moments`.

    ``eps_inside`` False: ``(X - mu) / (sqrt(var) + eps)`` (PKD); True: ``(X - mu) / sqrt(var + eps)``
    (an affine-free BatchNorm in training mode, with its biased var when ``unbiased`` False).
    The variance is clamped at 1e-24 under the square root (a constant channel gets a zero, not a NaN,
    gradient there).
    """
    out = []
    for x, (mu, var) in zip(maps, channel_moments(maps, unbiased, sync)):
        sd = (var + eps).sqrt() if eps_inside else var.clamp(min=1e-24).sqrt() + eps
        out.append((x - mu.view(1, -1, 1, 1)) / sd.view(1, -1, 1, 1))
    return out
