"""Automatic loss balancing (``DISTILL.BALANCE``): calibrate each term's weight once, then freeze it.

Published weights do not transfer between codebases, resolutions or teachers (MGD and FGD sum over
pixels; PKD and CWD are means), so a user's first run is often a KD term thousands of times the
detection loss, or one too small to matter. With ``DISTILL.BALANCE.ENABLED``:

1. after the LR warm-up (``START``; default ``SOLVER.WARMUP_ITERS``), every ``EVERY`` iterations of a
   ``WINDOW``-iteration calibration window, the step measures (:func:`measure`) the gradient norm on
   the student's FPN output convs (:func:`reference_params`) of the detection loss and of each term
   (mode ``grad``; mode ``loss``: their values), averaged over processes first;
2. at the window's last iteration each term gets the factor (:func:`choose_factors`)
   ``f_k = clip(r_k median(g_det) / median(g_k), MIN_FACTOR, MAX_FACTOR)``, ``r_k = TARGET / #terms``,
   so the distillation gradient as a whole is ``TARGET`` x the detection gradient; a term whose
   gradient is below ``FLOOR`` x the detection gradient (an inherited student, a term that does not
   reach the reference parameters) keeps factor 1 and is warned about instead of exploding;
3. the factors are frozen: they multiply the term's losses (its config weights already in them) and
   lambda(iter) multiplies the product as before. They are saved in every checkpoint
   (:class:`BalanceState`), so a resumed run does not recalibrate and resumes exactly;
4. optional drift guard (``DRIFT.PERIOD`` > 0, off): every ``PERIOD`` iterations, re-measured over
   ``DRIFT.SAMPLES`` iterations; a term whose ratio to its target left [1/2, 2] is corrected by
   ``clip(sqrt(target / ratio), 1/2, 2)``; never after the last LR step or once lambda is 0.

This is the "calibrate, then freeze" design of ../shared/METHODS_NEWER.md section 7.2: a per-step ratio
would make a term's gradient ``r L_det grad(log l_k)``, which grows as the term goes to 0 (F1 there).
The hook is :class:`distill_d2.hooks.KDBalancer`; ``python -m distill_d2.preflight`` reports the same
measurement before a run.
"""
import logging
import math
import statistics

import torch
from detectron2.utils import comm

from .errors import DistillConfigError

logger = logging.getLogger(__name__)

MODES = ("grad", "loss")
UNITS = ("term", "loss")


def check_balance_cfg(cfg):
    """DistillConfigError for impossible ``DISTILL.BALANCE`` settings (checked at build time, enabled or not)."""
    b = cfg.DISTILL.BALANCE
    if b.MODE not in MODES:
        raise DistillConfigError(f"DISTILL.BALANCE.MODE must be one of {MODES}, got {b.MODE!r}.")
    if b.UNIT not in UNITS:
        raise DistillConfigError(f"DISTILL.BALANCE.UNIT must be one of {UNITS}, got {b.UNIT!r}.")
    for key in ("WINDOW", "EVERY"):
        if int(b[key]) < 1:
            raise DistillConfigError(f"DISTILL.BALANCE.{key} must be >= 1, got {b[key]}.")
    if not (b.TARGET > 0 and math.isfinite(b.TARGET)):
        raise DistillConfigError(f"DISTILL.BALANCE.TARGET (total KD / detection) must be > 0, got {b.TARGET}.")
    if not (0 < b.MIN_FACTOR <= b.MAX_FACTOR):
        raise DistillConfigError(f"DISTILL.BALANCE needs 0 < MIN_FACTOR <= MAX_FACTOR, got {b.MIN_FACTOR}, "
                                 f"{b.MAX_FACTOR}.")
    if b.FLOOR < 0:
        raise DistillConfigError(f"DISTILL.BALANCE.FLOOR must be >= 0, got {b.FLOOR}.")
    if b.DRIFT.PERIOD < 0 or b.DRIFT.SAMPLES < 1:
        raise DistillConfigError(f"DISTILL.BALANCE.DRIFT needs PERIOD >= 0 (0 = off) and SAMPLES >= 1, got "
                                 f"{b.DRIFT.PERIOD}, {b.DRIFT.SAMPLES}.")
    if b.DRIFT.PERIOD > 0 and b.DRIFT.SAMPLES > b.DRIFT.PERIOD:
        raise DistillConfigError(f"DISTILL.BALANCE.DRIFT.SAMPLES ({b.DRIFT.SAMPLES}) must not exceed DRIFT.PERIOD "
                                 f"({b.DRIFT.PERIOD}).")
    if b.ENABLED:
        start, end = calibration_window(cfg)
        if end > cfg.SOLVER.MAX_ITER:
            raise DistillConfigError(
                f"DISTILL.BALANCE calibrates over iterations [{start}, {end}) but SOLVER.MAX_ITER is "
                f"{cfg.SOLVER.MAX_ITER}: lower DISTILL.BALANCE.START (-1 = SOLVER.WARMUP_ITERS = "
                f"{cfg.SOLVER.WARMUP_ITERS}) or WINDOW ({b.WINDOW}), or train longer.")


def calibration_window(cfg):
    """[start, end) iterations of the calibration window."""
    b = cfg.DISTILL.BALANCE
    start = int(b.START) if b.START >= 0 else int(cfg.SOLVER.WARMUP_ITERS)
    return start, start + int(b.WINDOW)


def reference_params(model, prefixes=()):
    """[(name, Parameter)] of the student the gradients are measured on: its FPN output convs
    (``backbone.fpn_output*``, and ``backbone.top_block.*``: RetinaNet's p6/p7), or the trainable
    parameters whose names start with one of ``prefixes`` (``DISTILL.BALANCE.PARAMS``). Terms' own
    modules (``kd_terms.*``: adapters, generators) are never included (they can cut a loss without
    changing the student). DistillConfigError when none match."""
    prefixes = tuple(prefixes) or ("backbone.fpn_output", "backbone.top_block.")
    params = [(n, p) for n, p in model.named_parameters()
              if p.requires_grad and n.startswith(prefixes) and not n.startswith("kd_terms.")]
    if not params:
        raise DistillConfigError(
            f"DISTILL.BALANCE: no trainable student parameter starts with {list(prefixes)}; set "
            "DISTILL.BALANCE.PARAMS to module names of parameters every term and the detection losses reach "
            "(e.g. ['backbone.fpn_output'] for an FPN).")
    return params


def _mean_over_processes(x):
    """``x`` (a float tensor) averaged over the launched processes (identity with one)."""
    if comm.get_world_size() > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= comm.get_world_size()
    return x


def measure(model, det_losses, term_losses, mode="grad", params=None):
    """One calibration sample: {"det": g_det, <term>: g_k} (floats, identical on every process).

    mode "grad": L2 norm over ``params`` (default :func:`reference_params`) of the gradient of the summed
    ``det_losses`` and of each ``term_losses`` value (``torch.autograd.grad`` with the graph kept, in float32;
    the gradients are averaged over processes before the norm, as DDP averages them, so 1 and N processes
    give the same numbers). mode "loss": the detached values, averaged over processes. The training step's
    own backward is unchanged (no ``.grad`` is written)."""
    names = ["det"] + list(term_losses)
    losses = [sum(det_losses.values())] + [term_losses[k] for k in term_losses]
    if mode == "loss":
        vals = torch.stack([v.detach().float().reshape(()) for v in losses])
        return dict(zip(names, _mean_over_processes(vals).tolist()))
    if mode != "grad":
        raise DistillConfigError(f"DISTILL.BALANCE.MODE must be one of {MODES}, got {mode!r}.")
    ps = [p for _, p in (params or reference_params(model))]
    rows = []
    for loss in losses:
        if not loss.requires_grad:
            rows.append(torch.zeros(sum(p.numel() for p in ps), device=ps[0].device))
            continue
        grads = torch.autograd.grad(loss.float(), ps, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                               for g, p in zip(grads, ps)]))
    g = _mean_over_processes(torch.stack(rows))
    return dict(zip(names, g.norm(dim=1).tolist()))


def choose_factors(samples, terms, target=1.0, min_factor=1e-3, max_factor=1e3, floor=1e-3):
    """{term: {"factor", "det", "value", "ratio", "note"}} from calibration ``samples`` (dicts of
    :func:`measure`): ``det``/``value`` are the medians of the detection's and the term's measure,
    ``ratio`` = value / det before balancing, ``factor`` = clip(target / len(terms) * det / value,
    min_factor, max_factor). A term with value < floor x det keeps factor 1.0 (balancing would blow up
    noise; the note says why). Raises FloatingPointError on a non-finite sample."""
    if not samples:
        raise ValueError("choose_factors needs at least one calibration sample")
    r = target / max(1, len(terms))
    det = statistics.median(s["det"] for s in samples)
    if not (math.isfinite(det) and det > 0):
        raise FloatingPointError(f"DISTILL.BALANCE: the detection loss's measure is {det} (median over "
                                 f"{len(samples)} samples); nothing can be balanced against it.")
    out = {}
    for k in terms:
        v = statistics.median(s[k] for s in samples)
        if not math.isfinite(v):
            raise FloatingPointError(f"DISTILL.BALANCE: term {k}'s measure is {v} during calibration (a NaN/inf "
                                     "loss): check the teacher weights and the term's inputs.")
        ratio = v / det
        if v < floor * det:
            f, note = 1.0, (f"kept its configured weight: {ratio:.2g} x the detection's, below FLOOR {floor:g} "
                            "(inherited student, empty masks, or it does not reach DISTILL.BALANCE.PARAMS)")
        else:
            f = r * det / v
            note = ""
            if f > max_factor or f < min_factor:
                note = f"clamped from {f:.3g} to [{min_factor:g}, {max_factor:g}]"
                f = min(max(f, min_factor), max_factor)
        out[k] = {"factor": f, "det": det, "value": v, "ratio": ratio, "note": note}
    return out


def drift_correction(ratio, target):
    """Drift-guard multiplier of a factor whose term now measures ``ratio`` x the detection (factor
    applied) against its ``target`` share: 1 inside [target/2, 2 target], else clip(sqrt(target / ratio),
    1/2, 2)."""
    if ratio <= 0 or target / 2 <= ratio <= 2 * target:
        return 1.0
    return min(max(math.sqrt(target / ratio), 0.5), 2.0)


def balance_table(chosen, mode, weights=None):
    """Markdown table of :func:`choose_factors`' result (``weights``: {term: its configured weight text})."""
    unit = "gradient norm on the reference parameters" if mode == "grad" else "loss value"
    lines = [f"| term | {unit} | x detection | factor | note |", "|---|---|---|---|---|"]
    for k, c in chosen.items():
        w = f" (weight {weights[k]})" if weights and k in weights else ""
        lines.append(f"| {k}{w} | {c['value']:.4g} | {c['ratio']:.3g} | {c['factor']:.4g} | {c['note']} |")
    det = next(iter(chosen.values()))["det"] if chosen else float("nan")
    lines.append(f"| detection losses | {det:.4g} | 1 | | |")
    return "\n".join(lines)


class BalanceState:
    """Checkpointable (``distill_balance`` in every checkpoint) of the balancer: the model's factors
    (``model.kd_balance``), whether calibration is done, its samples so far (a resume inside the window
    continues it) and the drift samples."""

    def __init__(self, model):
        self.model = model
        self.calibrated = False
        self.samples = []
        self.drift_samples = []
        self.chosen = {}

    def state_dict(self):
        return {"factors": dict(self.model.kd_balance), "calibrated": self.calibrated, "samples": list(self.samples),
                "drift_samples": list(self.drift_samples), "chosen": dict(self.chosen)}

    def load_state_dict(self, state):
        self.model.kd_balance.update(state["factors"])
        self.calibrated = bool(state["calibrated"])
        self.samples = list(state["samples"])
        self.drift_samples = list(state.get("drift_samples", []))
        self.chosen = dict(state.get("chosen", {}))
        if self.calibrated:
            logger.info("DISTILL.BALANCE: factors from the checkpoint (not recalibrated): %s",
                        ", ".join(f"{k} {v:.4g}" for k, v in self.model.kd_balance.items()))
