"""Training hooks: setting the KD weight lambda(iter) (``schedule.kd_weight``) each step, the loss scale
guard and a one-off teacher evaluation."""
import logging
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from .balance import balance_table, calibration_window, choose_factors, drift_correction
from .config import default_distill_node, flat_items, is_distiller_arch
from .errors import DistillConfigError
from .schedule import kd_weight
from .teacher import evaluate_teacher
from .terms import check_choice

logger = logging.getLogger(__name__)


def unwrap(model):
    """The model a trainer trains: ``model.module`` of a DistributedDataParallel wrapper, else ``model``."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class KDWeightScheduler(HookBase):
    """Sets ``model.kd_weight = lambda(iter)`` before each step and logs it as ``kd_weight``;
    after the step, logs the terms' scalars (gate pass rates, ...)."""

    def __init__(self, decay_cfg, max_iter, print_period=20):
        self._cfg = decay_cfg
        self._max_iter = max_iter
        self._period = print_period

    def before_step(self):
        lam = kd_weight(self.trainer.iter, self._max_iter, self._cfg)
        unwrap(self.trainer.model).kd_weight = lam
        self.trainer.storage.put_scalar("kd_weight", lam, smoothing_hint=False)

    def after_step(self):
        storage = self.trainer.storage
        unwrap(self.trainer.model).log_kd_scalars(storage)
        it = self.trainer.iter
        if comm.is_main_process() and ((it + 1) % self._period == 0 or it + 1 == self._max_iter):
            # detectron2's console printer shows losses only: lambda and the terms' scalars go here
            h = storage.histories()
            extra = "  ".join(f"{k}: {h[k].median(self._period):.4g}" for k in sorted(h) if k.startswith("kd/"))
            logger.info("iter: %d  kd_weight: %.4g  %s", it, h["kd_weight"].latest(), extra)


class KDBalancer(HookBase):
    """``DISTILL.BALANCE`` (:mod:`distill_d2.balance`): tells the model which steps measure, collects the
    samples, sets the frozen factors at the end of the calibration window (``model.kd_balance``), runs the
    optional drift guard, and logs the factors as ``kd/balance/<unit>``. Its state is the trainer
    checkpointer's ``distill_balance`` (:class:`~distill_d2.balance.BalanceState`). Put it before the
    checkpointer, so a checkpoint holds the samples of its own step."""

    def __init__(self, cfg, state):
        self.cfg, self.b, self.state = cfg, cfg.DISTILL.BALANCE, state
        self.start, self.end = calibration_window(cfg)
        self.last_lr_step = max(cfg.SOLVER.STEPS, default=cfg.SOLVER.MAX_ITER)

    def _drift_on(self, it):
        """May the drift guard measure / correct at ``it``?"""
        p = self.b.DRIFT.PERIOD
        return (p > 0 and it >= self.end and it < self.last_lr_step
                and kd_weight(it, self.cfg.SOLVER.MAX_ITER, self.cfg.DISTILL.DECAY) > 0)

    def _measures(self, it):
        if not self.state.calibrated:
            return self.start <= it < self.end and (it - self.start) % self.b.EVERY == 0
        p = self.b.DRIFT.PERIOD
        return self._drift_on(it) and (it - self.end) % p >= p - self.b.DRIFT.SAMPLES

    def before_train(self):
        if not self.state.calibrated and self.trainer.start_iter >= self.end:
            logger.warning("DISTILL.BALANCE: the run starts at iteration %d, after the calibration window "
                           "[%d, %d), with no calibrated factors in the checkpoint: balancing does nothing in this "
                           "run (the terms keep their configured weights).", self.trainer.start_iter, self.start,
                           self.end)

    def before_step(self):
        unwrap(self.trainer.model)._balance_mode = self.b.MODE if self._measures(self.trainer.iter) else None

    def after_step(self):
        model, it = unwrap(self.trainer.model), self.trainer.iter
        sample, model._balance_sample, model._balance_mode = model._balance_sample, None, None
        if sample is not None:
            (self.state.drift_samples if self.state.calibrated else self.state.samples).append(sample)
        if not self.state.calibrated and it == self.end - 1 and self.state.samples:
            self._calibrate(model, it)
        elif self.state.calibrated and self.b.DRIFT.PERIOD > 0 and (it - self.end) % self.b.DRIFT.PERIOD == \
                self.b.DRIFT.PERIOD - 1 and it >= self.end:
            samples, self.state.drift_samples = self.state.drift_samples, []
            if samples and self._drift_on(it):
                self._drift(model, it, samples)
        for k, f in model.kd_balance.items():
            self.trainer.storage.put_scalar(f"kd/balance/{k}", f, smoothing_hint=False)

    def _calibrate(self, model, it):
        units = [k for k in self.state.samples[0] if k != "det"]
        chosen = choose_factors(self.state.samples, units, self.b.TARGET, self.b.MIN_FACTOR, self.b.MAX_FACTOR,
                                self.b.FLOOR)
        model.kd_balance.update({k: c["factor"] for k, c in chosen.items()})
        self.state.calibrated, self.state.chosen = True, chosen
        if comm.is_main_process():
            logger.info("DISTILL.BALANCE (%s mode, %d samples over iterations [%d, %d), target %g x the detection "
                        "in total) calibrated at iteration %d; factors frozen from now on (pin them with the "
                        "terms' weight keys x factor):\n%s", self.b.MODE, len(self.state.samples), self.start,
                        self.end, self.b.TARGET, it, balance_table(chosen, self.b.MODE))
            for k, c in chosen.items():
                if c["note"]:
                    logger.warning("DISTILL.BALANCE: %s %s", k, c["note"])

    def _drift(self, model, it, samples):
        units = [k for k in samples[0] if k != "det"]
        det = statistics.median(s["det"] for s in samples)
        target = self.b.TARGET / max(1, len(units))
        for k in units:
            f = model.kd_balance.get(k, 1.0)
            ratio = f * statistics.median(s[k] for s in samples) / det  # (the factor is not in the measure)
            c = drift_correction(ratio, target)
            if c != 1.0:
                model.kd_balance[k] = f * c
                if comm.is_main_process():
                    logger.info("DISTILL.BALANCE drift guard at iteration %d: %s measured %.3g x the detection "
                                "(target %.3g); factor %.4g -> %.4g", it, k, ratio, target, f, f * c)


def is_det_loss(name):
    """A detection loss of the logged dict (``loss_*`` but not a distillation term's ``loss_kd_*``)."""
    return name.startswith("loss_") and not name.startswith("loss_kd_")


#: a distillation trip is diagnosed as the detector diverging once the detection losses grew this much
DET_GROWN = 2.0
#: iterations before det has a level (then the median of the last 5 .. GUARD.WINDOW): a divergence that
#: starts within the first window must not set the reference
MIN_SAMPLES = 5


@dataclass
class Trip:
    """One decision of :class:`LossScaleGuard`."""
    kind: str  #: "diverges" (the detection losses grew), "kd_ratio" or "kd_growth" (a distillation term)
    term: Optional[str]  #: the distillation loss that tripped (None for "diverges")
    iteration: int
    action_key: str  #: the config key whose value (error / warn) decides what happens
    message: str


class LossScaleGuard:
    """The loss guard's decisions: a pure function of the series of logged loss dicts.

    Feed :meth:`update` the losses detectron2 logged at each iteration, in order from the
    run's (or resume's) first one; it returns the checks that trip (``GUARD`` and
    ``DISTILL.GUARD`` in distill_d2/config.py). Levels are medians of magnitudes over the last
    ``window`` iterations (from the 5th iteration on: a divergence that starts within the first
    window must not become the reference); every limit is relative to a level that cannot be near 0:

    * the detector diverges: det (the summed detection losses; a dense detector's net of the drift
      of its loss normaliser) above ``max_growth`` x the lowest level it had reached (at least
      ``min_level``);
    * a distillation term (divided by lambda) above ``kd["max_ratio_to_det"]`` x det (at its
      first iteration: its value), or above ``kd["max_growth"]`` x the larger of its own early
      median and ``kd["growth_floor"]`` x det's first level (a gated term rising from ~0 is fine).

    Args:
        window, max_growth, min_level: ``GUARD.*``.
        det_check: check the detector's divergence (``GUARD.ACTION`` not off).
        kd: None (no distillation checks) or ``DISTILL.GUARD`` settings as a dict:
            ``max_ratio_to_det``, ``warmup_iters``, ``max_growth``, ``growth_floor``.
        weight_note: the distillation weights the config raises above their defaults
            (:func:`kd_weight_note`), quoted in a distillation term's diagnosis.
    """

    def __init__(self, window=20, max_growth=5.0, min_level=0.2, det_check=True, kd=None, weight_note=""):
        checks = [("GUARD.WINDOW", window, 1), ("GUARD.MAX_GROWTH", max_growth, 1), ("GUARD.MIN_LEVEL", min_level, 0)]
        if kd is not None:
            checks += [(f"DISTILL.GUARD.{k.upper()}", kd[k], lo) for k, lo in (
                ("max_ratio_to_det", 1), ("warmup_iters", 1), ("max_growth", 1), ("growth_floor", 0))]
        for key, v, lo in checks:
            if not v >= lo:
                raise DistillConfigError(f"{key} must be >= {lo}, got {v}.")
        self.window, self.max_growth, self.min_level = int(window), max_growth, min_level
        self.det_check, self.kd, self.weight_note = det_check, kd, weight_note
        self._det = deque(maxlen=self.window)  # det of the last `window` iterations (rescaled, see update)
        self._parts = defaultdict(lambda: deque(maxlen=self.window))  # each detection loss
        self._first = None  # det's first level (median of its first MIN_SAMPLES iterations)
        self._low = None  # (det's lowest level, iteration, {loss: level} then)
        self._norm0 = None  # a dense detector's first loss_normalizer
        self._kd_early = defaultdict(list)
        self._kd = defaultdict(lambda: deque(maxlen=self.window))
        #: the last update's judged quantities, each next to its limit: "det_growth" (None during the first
        #: window), {term: ratio to det} "kd_ratio", {term: level / reference} "kd_growth"
        self.last = {}

    def _levels(self, d):
        return {k: statistics.median(v) for k, v in sorted(d.items()) if v}

    def update(self, iteration, losses, kd_weight=1.0, loss_normalizer=None):
        """Add one iteration's logged losses; return the list of :class:`Trip` (empty: in scale).

        Args:
            iteration: the trainer's iteration (quoted in the messages).
            losses: {name: float} as logged (``loss_kd_*`` multiplied by lambda).
            kd_weight: lambda of this iteration; the distillation terms are divided by it
                (lambda <= 0: they are not checked).
            loss_normalizer: a dense detector's ``loss_normalizer`` (the EMA of positive anchors its
                losses are divided by, started at 100 by RetinaNet) after this step, or None. The
                detection losses are judged x its value over its first one, so its drift does not
                count (one object per image: it falls ~10x in the first ~30 iterations).
        """
        det_parts = {k: abs(float(v)) for k, v in losses.items() if is_det_loss(k)}
        if not det_parts:
            return []
        if loss_normalizer is not None:
            self._norm0 = self._norm0 or float(loss_normalizer)
            det_parts = {k: v * float(loss_normalizer) / self._norm0 for k, v in det_parts.items()}
        self._det.append(sum(det_parts.values()))
        for k, v in det_parts.items():
            self._parts[k].append(v)
        growth = None
        if len(self._det) >= min(MIN_SAMPLES, self.window):  # a level: the median of 5 to `window` iterations
            level = statistics.median(self._det)
            if self._first is None:
                self._first = level
            if self._low is None or level < self._low[0]:
                self._low = (level, iteration, self._levels(self._parts))
            growth = level / max(self._low[0], self.min_level)
        self.last = {"det_growth": growth, "kd_ratio": {}, "kd_growth": {}}

        kd = {}
        if self.kd is not None and kd_weight > 0:
            kd = {k: abs(float(v)) / kd_weight for k, v in losses.items() if k.startswith("loss_kd_")}
        for k, v in kd.items():
            if len(self._kd_early[k]) < self.kd["warmup_iters"]:
                self._kd_early[k].append(v)
            self._kd[k].append(v)
        if self.det_check and growth is not None and growth > self.max_growth:
            # the detector diverges: that is the diagnosis, whatever the terms do
            return [Trip("diverges", None, iteration, "GUARD.ACTION", self._diverges_msg(iteration, growth))]
        trips = []
        det_now = statistics.median(self._det)
        for k in sorted(kd):
            now, n = statistics.median(self._kd[k]), len(self._kd[k])
            ratio = now / det_now if det_now > 0 else 0.0
            self.last["kd_ratio"][k] = ratio
            if ratio > self.kd["max_ratio_to_det"]:
                what = f"{k} = {now:.4g}" + (f" (median of the last {n} iterations)" if n > 1 else "")
                trips.append(self._kd_trip("kd_ratio", k, iteration, growth, (
                    f"{what} at iteration {iteration} is {ratio:.3g}x the detection losses ({det_now:.4g}; limit "
                    f"DISTILL.GUARD.MAX_RATIO_TO_DET = {self.kd['max_ratio_to_det']:g})")))
                continue
            if self._first is None or len(self._kd_early[k]) < self.kd["warmup_iters"]:
                continue
            early = statistics.median(self._kd_early[k])
            ref = max(early, self.kd["growth_floor"] * self._first)
            self.last["kd_growth"][k] = now / ref
            if now > self.kd["max_growth"] * ref:
                trips.append(self._kd_trip("kd_growth", k, iteration, growth, (
                    f"{k} rose to {now:.4g} (median of the last {n} iterations) at iteration {iteration}, "
                    f"{now / ref:.3g}x its reference level {ref:.4g}, the larger of its median over its first "
                    f"{self.kd['warmup_iters']} iterations ({early:.4g}) and DISTILL.GUARD.GROWTH_FLOOR = "
                    f"{self.kd['growth_floor']:g} x the detection losses' first level ({self._first:.4g}) "
                    f"(limit DISTILL.GUARD.MAX_GROWTH = {self.kd['max_growth']:g})")))
        return trips

    # -------------------------------------------------------------- messages
    def _growth_parts(self):
        """'loss_cls 0.52 -> 17' for each detection loss: its level at det's low point -> now."""
        then, now = self._low[2], self._levels(self._parts)
        return ", ".join(f"{k} {then[k]:.3g} -> {v:.3g}" for k, v in now.items() if k in then)

    _FIX_DET = ("lower SOLVER.BASE_LR (or lengthen SOLVER.WARMUP_ITERS; keep SOLVER.CLIP_GRADIENTS on) and check "
                "the data (boxes, class ids: DATALOADER.CHECK)")

    def _diverges_msg(self, iteration, growth):
        low, low_it, _ = self._low
        msg = (f"Training diverges: the detection losses rose to {statistics.median(self._det):.4g} at iteration "
               f"{iteration} "
               f"(sum of the loss_* terms, median of the last {len(self._det)} iterations), {growth:.3g}x the lowest "
               f"level they had reached ({low:.4g} at iteration {low_it}"
               + (f", floor GUARD.MIN_LEVEL = {self.min_level:g}" if low < self.min_level else "")
               + f"; limit GUARD.MAX_GROWTH = {self.max_growth:g}): {self._growth_parts()}"
               + (f" (x loss_normalizer / its first value {self._norm0:.3g}, so its drift does not count)"
                  if self._norm0 else "") + ".")
        kd = self._levels(self._kd)
        if kd:
            msg += " Distillation terms now (divided by lambda): " + ", ".join(f"{k} {v:.3g}" for k, v in kd.items())
            msg += "."
        msg += " The detector itself diverges: " + self._FIX_DET
        if kd:
            msg += ("; a distillation term weight far too large can drive the student off too"
                    + (f" ({self.weight_note})" if self.weight_note else ""))
        return msg + ". Set GUARD.ACTION warn (or off) to train on anyway."

    def _kd_trip(self, kind, term, iteration, growth, what):
        if growth is not None and growth >= DET_GROWN:
            msg = (f"Training diverges: {what}, but the detection losses grew too ({growth:.3g}x the lowest level "
                   f"they had reached: {self._growth_parts()}): the detector itself diverges and the distillation "
                   f"term follows. {self._FIX_DET[0].upper()}{self._FIX_DET[1:]}.")
        else:
            seen = ("at the first iterations (the detection losses have no level yet)" if growth is None else
                    f"while the detection losses are in scale ({growth:.2g}x the lowest level they had reached)")
            teacher = ("teacher weights that do not belong to DISTILL.TEACHER.CONFIG_FILE (or loaded with "
                       "DISTILL.TEACHER.STRICT_LOAD False), a missing or wrong adapter")
            causes = (f"a term weight far too large ({self.weight_note}), or {teacher}" if self.weight_note
                      else f"{teacher}, or a term weight far too large")  # what the config shows comes first
            msg = f"Distillation loss out of scale: {what}, {seen}. Likely causes: {causes}."
        return Trip(kind, term, iteration, "DISTILL.GUARD.ACTION",
                    msg + " Set DISTILL.GUARD.ACTION warn (or off) to train on anyway.")


def kd_weight_note(cfg):
    """'the config sets DISTILL.FEAT.WEIGHT = 100 (default 1)': the DISTILL weights raised above
    their defaults, for a distillation term's diagnosis ("" when none)."""
    default = dict(flat_items(default_distill_node()))
    raised = [f"DISTILL.{k} = {v:g} (default {default[k]:g})" for k, v in flat_items(cfg.DISTILL)
              if k.split(".")[-1].endswith("WEIGHT") and isinstance(v, (int, float)) and k in default
              and v > default[k]]
    return ("the config sets " + ", ".join(raised)) if raised else ""


def guard_from_cfg(cfg):
    """The :class:`LossScaleGuard` of a training config (distillation checks for a distiller)."""
    g = cfg.GUARD
    check_choice("GUARD.ACTION", g.ACTION, ACTIONS)
    kd = None
    if is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
        d = cfg.DISTILL.GUARD
        check_choice("DISTILL.GUARD.ACTION", d.ACTION, ACTIONS)
        if d.ACTION != "off":
            kd = dict(max_ratio_to_det=d.MAX_RATIO_TO_DET, warmup_iters=d.WARMUP_ITERS, max_growth=d.MAX_GROWTH,
                      growth_floor=d.GROWTH_FLOOR)
    return LossScaleGuard(g.WINDOW, g.MAX_GROWTH, g.MIN_LEVEL, det_check=g.ACTION != "off", kd=kd,
                          weight_note=kd_weight_note(cfg) if kd else "")


ACTIONS = ("error", "warn", "off")


class LossGuard(HookBase):
    """Runs :class:`LossScaleGuard` on the losses logged at each step; stops the run (``FloatingPointError``)
    or warns once per check and term, as ``GUARD.ACTION`` / ``DISTILL.GUARD.ACTION`` say.

    Only the main process sees the logged losses: with several processes its decision is shared
    (one small all_gather per step, when an action is "error"), so every process raises the same
    error at the same iteration instead of the others waiting in the next step's all-reduce.
    """

    def __init__(self, cfg):
        self.guard = guard_from_cfg(cfg)
        self._actions = {"GUARD.ACTION": cfg.GUARD.ACTION}
        if self.guard.kd is not None:
            self._actions["DISTILL.GUARD.ACTION"] = cfg.DISTILL.GUARD.ACTION
        self._active = self.guard.det_check or self.guard.kd is not None
        self._sync = "error" in self._actions.values()
        self._warned = set()

    def after_step(self):
        if not self._active:
            return
        trip = None
        if comm.is_main_process():
            it = self.trainer.iter
            latest = {k: v for k, (v, i) in self.trainer.storage.latest().items() if i == it}
            losses = {k: v for k, v in latest.items() if k.startswith("loss_")}
            if losses:
                # dense detectors' EMA (each process has its own; the main one's stands for all)
                model = unwrap(self.trainer.model)
                norm = getattr(model, "loss_normalizer", None)
                if getattr(model, "kd_balance", None):  # judged at the configured weights, as lambda is divided out
                    losses = {k: v / model.balance_factor(k) if k.startswith("loss_kd_") else v
                              for k, v in losses.items()}
                trips = self.guard.update(it, losses, latest.get("kd_weight", 1.0), norm)
                trip = next((t for t in trips if self._actions[t.action_key] == "error"), trips[0] if trips else None)
        if self._sync and comm.get_world_size() > 1:
            trip = next((t for t in comm.all_gather(trip) if t is not None), None)
        if trip is None:
            return
        if self._actions[trip.action_key] == "error":
            raise FloatingPointError(trip.message)
        if (trip.kind, trip.term) not in self._warned:  # warn once per check and term
            self._warned.add((trip.kind, trip.term))
            logger.warning(trip.message)



class TeacherEvalHook(HookBase):
    """Evaluates the (frozen) teacher once before training; logs ``teacher/<dataset>/<metric>``."""

    def before_train(self):
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
