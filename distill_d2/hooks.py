"""Training hooks: the KD weight schedule lambda(iter) and a one-off teacher evaluation."""
import logging
import math

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

    def __init__(self, decay_cfg, max_iter):
        self._cfg = decay_cfg
        self._max_iter = max_iter

    def before_step(self):
        from .engine import unwrap

        lam = kd_weight(self.trainer.iter, self._max_iter, self._cfg)
        unwrap(self.trainer.model).kd_weight = lam
        self.trainer.storage.put_scalar("kd_weight", lam, smoothing_hint=False)

    def after_step(self):
        from .engine import unwrap

        unwrap(self.trainer.model).log_kd_scalars(self.trainer.storage)


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
