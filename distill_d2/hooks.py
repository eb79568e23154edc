"""Training hooks: the KD weight schedule lambda(iter) and a one-off teacher evaluation."""
import logging
import math
import statistics
from collections import defaultdict

from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def kd_weight(it, max_iter, decay_cfg):
    """lambda(it), a pure function of the iteration (so resuming is exact).

    Args:
        it: 0-based iteration of the step about to run.
        max_iter: SOLVER.MAX_ITER.
        decay_cfg: the ``DISTILL.DECAY`` config node.
    Returns:
        float >= 0 multiplying every distillation loss term.
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
        raise ValueError(f"Unknown DISTILL.DECAY.TYPE '{t}': use linear, cosine, step or constant.")
    if decay_cfg.WARMUP_ITERS > 0 and it < decay_cfg.WARMUP_ITERS:
        lam *= it / decay_cfg.WARMUP_ITERS
    if 0 <= decay_cfg.STOP_ITER <= it:
        lam = 0.0
    return lam


class KDWeightScheduler(HookBase):
    """Sets ``model.kd_weight = lambda(iter)`` before each step and logs it as ``kd_weight``;
    after the step, logs the terms' scalars (gate pass rates, ...)."""

    def __init__(self, decay_cfg, max_iter, print_period=20):
        self._cfg = decay_cfg
        self._max_iter = max_iter
        self._period = print_period

    def before_step(self):
        from .engine import unwrap

        lam = kd_weight(self.trainer.iter, self._max_iter, self._cfg)
        unwrap(self.trainer.model).kd_weight = lam
        self.trainer.storage.put_scalar("kd_weight", lam, smoothing_hint=False)

    def after_step(self):
        from .engine import unwrap

        storage = self.trainer.storage
        unwrap(self.trainer.model).log_kd_scalars(storage)
        it = self.trainer.iter
        if comm.is_main_process() and ((it + 1) % self._period == 0 or it + 1 == self._max_iter):
            # detectron2's console printer shows losses only: lambda and the terms' scalars go here
            h = storage.histories()
            extra = "  ".join(f"{k}: {h[k].median(self._period):.4g}" for k in sorted(h) if k.startswith("kd/"))
            logger.info("iter: %d  kd_weight: %.4g  %s", it, h["kd_weight"].latest(), extra)


class KDLossGuard(HookBase):
    """Stops (``DISTILL.GUARD.ACTION error``) or warns when a ``loss_kd_*`` term is off scale.

    Reads the losses detectron2 logged for the step (main process; values divided by
    lambda): at iteration 0 a term above ``MAX_RATIO_TO_DET`` x the summed detection
    losses trips; after ``WARMUP_ITERS`` iterations a term above ``MAX_GROWTH`` x its
    median over the warm-up trips.
    """

    def __init__(self, guard_cfg):
        from .terms import check_choice

        check_choice("DISTILL.GUARD.ACTION", guard_cfg.ACTION, ("error", "warn", "off"))
        self._cfg = guard_cfg
        self._early = defaultdict(list)
        self._tripped = set()

    def after_step(self):
        if self._cfg.ACTION == "off" or not comm.is_main_process():
            return
        it = self.trainer.iter
        latest = {k: v for k, (v, i) in self.trainer.storage.latest().items() if i == it}
        lam = latest.get("kd_weight", 0.0)
        if lam <= 0:
            return
        kd = {k: v / lam for k, v in latest.items() if k.startswith("loss_kd_")}
        det = sum(v for k, v in latest.items() if k.startswith("loss_") and not k.startswith("loss_kd_"))
        c = self._cfg
        for k, v in kd.items():
            if it == self.trainer.start_iter and det > 0 and v > c.MAX_RATIO_TO_DET * det:
                self._trip(k, f"{k} = {v:.4g} at iteration {it} is {v / det:.3g}x the detection losses ({det:.4g}; "
                              f"limit DISTILL.GUARD.MAX_RATIO_TO_DET = {c.MAX_RATIO_TO_DET:g})")
            if len(self._early[k]) < c.WARMUP_ITERS:
                self._early[k].append(v)
                continue
            base = statistics.median(self._early[k])
            if base > 0 and v > c.MAX_GROWTH * base:
                self._trip(k, f"{k} = {v:.4g} at iteration {it} is {v / base:.3g}x its median over the first "
                              f"{c.WARMUP_ITERS} iterations ({base:.4g}; limit DISTILL.GUARD.MAX_GROWTH = {c.MAX_GROWTH:g})")

    def _trip(self, term, what):
        msg = (f"Distillation loss out of scale: {what}. Likely causes: teacher weights that do not belong to "
               "DISTILL.TEACHER.CONFIG_FILE (or loaded with STRICT_LOAD False), a missing or wrong adapter, a "
               "term weight far too large. Set DISTILL.GUARD.ACTION warn (or off) to train on anyway.")
        if self._cfg.ACTION == "error":
            raise FloatingPointError(msg)
        if term not in self._tripped:  # warn once per term
            self._tripped.add(term)
            logger.warning(msg)


class TeacherEvalHook(HookBase):
    """Evaluates the (frozen) teacher once before training; logs ``teacher/<dataset>/<metric>``."""

    def before_train(self):
        from .engine import unwrap
        from .teacher import evaluate_teacher

        trainer = self.trainer
        model = unwrap(trainer.model)
        results = evaluate_teacher(
            model.teacher, model.teacher_cfg, trainer.cfg.DATASETS.TEST,
            build_evaluator=lambda name: trainer.build_evaluator(trainer.cfg, name),
            build_test_loader=trainer.build_test_loader,
        )
        if comm.is_main_process():
            for name, res in results.items():
                for k, v in res.get("bbox", {}).items():
                    trainer.storage.put_scalar(f"teacher/{name}/{k}", v, smoothing_hint=False)
        comm.synchronize()
