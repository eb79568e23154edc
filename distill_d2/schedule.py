"""The KD weight schedule lambda(iter) (``DISTILL.DECAY``): the factor on every distillation loss.

A pure function of the iteration, so a resumed run gets exactly the values of an uninterrupted one.
The meta-architecture multiplies the summed ``loss_kd_*`` terms by it; ``hooks.KDWeightScheduler``
sets it before each step and logs it as ``kd_weight``. Imports nothing of distill_d2 but its errors.
"""
import math

from .errors import DistillConfigError


def kd_weight(it, max_iter, decay_cfg):
    """lambda(it), a pure function of the iteration (so resuming is exact).

    Args:
        it: 0-based iteration of the step about to run.
        max_iter: SOLVER.MAX_ITER.
        decay_cfg: the ``DISTILL.DECAY`` config node.
    Returns:
        float >= 0 multiplying every distillation loss term.
    Raises:
        DistillConfigError: an unknown ``DISTILL.DECAY.TYPE``.
    """
    t = decay_cfg.TYPE
    end = decay_cfg.END_VALUE
    frac = min(max(it / max(max_iter, 1), 0.0), 1.0)
    if t == "linear":
        lam = 1.0 - (1.0 - end) * frac
    elif t == "cosine":
        lam = end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    elif t == "step":
        lam = decay_cfg.GAMMA ** sum(1 for s in decay_cfg.STEPS if it >= s)
    elif t == "constant":
        lam = 1.0
    else:
        raise DistillConfigError(f"Unknown DISTILL.DECAY.TYPE '{t}': use linear, cosine, step or constant.")
    if decay_cfg.WARMUP_ITERS > 0 and it < decay_cfg.WARMUP_ITERS:
        lam *= it / decay_cfg.WARMUP_ITERS
    if 0 <= decay_cfg.STOP_ITER <= it:
        lam = 0.0
    return lam
