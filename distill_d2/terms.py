"""Distillation terms: registered modules that turn a :class:`~distill_d2.record.StepRecord` into losses.

A method is a set of terms listed in ``DISTILL.TERMS`` (names in
``DISTILL_TERM_REGISTRY``) plus their settings. Each term

* is built once from the config and a :class:`BuildContext` (both models'
  output shapes and families) and validates its keys there, so a typo or an
  impossible combination stops the build, not iteration 0;
* owns its trainable parts (adapters), saved as ``kd_terms.<Name>.*`` in the
  distillation checkpoint and dropped on export;
* returns ``({"loss_kd_*": 0-dim tensor}, {"kd/<scalar>": 0-dim tensor})``
  weighted by its config weights; the meta-architecture multiplies the losses
  by lambda(iter) and logs the scalars.

Class attributes a term declares:

* ``families``: student detector families it supports ("rcnn", "dense");
* ``needs``: ``{"heads"}`` if it reads ``record.rois`` / ``record.dense`` (both
  heads on the shared samples; a same-family teacher is then required);
* ``reads``: the ``DISTILL`` keys it uses (fnmatch patterns such as
  ``"FEAT.*"``). A key changed from its default that no enabled term reads is
  an error, so a setting cannot be silently ignored;
* ``add_config(distill_node)`` (optional classmethod): declares the term's own
  keys with defaults; called by ``add_distill_config`` for every registered term.
* ``nonnegative``: ``DISTILL`` keys (patterns) that must be finite and >= 0 beyond
  the ones every term gets checked: any key named ``*WEIGHT`` / ``*WEIGHTS``.

See docs/ADDING_A_METHOD.md for a worked example.
"""
import fnmatch
import logging
from dataclasses import dataclass
from typing import Dict

import torch.nn as nn
from detectron2.layers import ShapeSpec
from fvcore.common.registry import Registry

from .adapters import build_adapters
from .teacher import TeacherError

logger = logging.getLogger(__name__)

DISTILL_TERM_REGISTRY = Registry("DISTILL_TERM")
DISTILL_TERM_REGISTRY.__doc__ = """
Distillation terms (``nn.Module``): ``Term(cfg, ctx)``; ``forward(record) -> (losses, scalars)``.
"""

FAMILY_NAMES = {"rcnn": "Faster R-CNN (DistillGeneralizedRCNN)", "dense": "RetinaNet (DistillRetinaNet)"}
#: DISTILL keys every distiller reads itself (not owned by a term).
COMMON_KEYS = ("TEACHER.*", "DECAY.*", "GUARD.*", "TERMS", "UNUSED_KEYS")
#: DISTILL keys that must be finite and >= 0 besides every key whose name ends with WEIGHT or WEIGHTS
#: (loss weights, checked for every term): the decay's end value and step factor. A term declares
#: more in its ``nonnegative`` attribute (fnmatch patterns).
NONNEGATIVE_KEYS = ("DECAY.END_VALUE", "DECAY.GAMMA")


class DistillConfigError(ValueError):
    """A DISTILL setting that cannot work; the message names the key and the fix."""


@dataclass
class BuildContext:
    """What a term may look at when it is built (no weights: the teacher is built on the meta device)."""
    cfg: object  #: the full (student) config
    teacher_cfg: object
    family: str  #: student family: "rcnn" or "dense"
    teacher_family: str  #: "rcnn", "dense" or "other"
    student_shapes: Dict[str, ShapeSpec]  #: every named student output (bottom-up stages + FPN levels)
    teacher_shapes: Dict[str, ShapeSpec]
    student: nn.Module  #: the student meta-arch being built (for structural checks only)


class DistillTerm(nn.Module):
    """Base class of registered distillation terms (see the module docstring)."""

    families = ("rcnn", "dense")
    needs = frozenset()
    reads = ()
    #: DISTILL keys (fnmatch patterns) that must be finite and >= 0, beyond the ``*WEIGHT(S)`` keys
    nonnegative = ()
    #: old checkpoint prefix of this term's adapters (``kd_adapters`` / ``kd_bb_adapters``), upgraded on load
    legacy_prefix = None

    def __init__(self, cfg, ctx):
        super().__init__()

    def check_teacher(self, student, teacher):
        """Checks that need the real teacher (box coders, anchors); raise TeacherError."""

    def forward(self, record):
        raise NotImplementedError

    def explain(self, record):
        """What this term weighs on ``record``, for ``python -m distill_d2.pictures`` (called under no_grad).

        Returns a dict with any of:

        * ``"maps"``: {picture name: {level: (N, H_l, W_l) tensor}}, spatial weights or scores on
          each level's grid (e.g. the feature mask);
        * ``"boxes"``: {picture name: list over images of (M_i, 4) XYXY boxes in input pixels}
          (e.g. the RoIs or anchors that passed a gate);
        * ``"box_values"``: {picture name: list over images of (M_i,) tensors}, a value per box
          drawn as its label (e.g. a Harmony Score).

        The default explains nothing.
        """
        return {}


# ------------------------------------------------------------------ helpers for terms
def distilled_levels(ctx, levels, key):
    """Validate feature ``levels`` named by config ``key`` against both models; return them finest first.

    Raises DistillConfigError / TeacherError naming the key when the list is
    empty, a level is missing in either model, or the strides differ.
    """
    levels = list(levels)
    if not levels:
        raise DistillConfigError(f"{key} is empty: list the feature maps to distil (e.g. ['p2', 'p3']).")
    s, t = ctx.student_shapes, ctx.teacher_shapes
    missing = [lv for lv in levels if lv not in s or lv not in t]
    if missing:
        raise TeacherError(
            f"Feature level(s) {missing} requested in {key} are not produced by both models "
            f"(student has {sorted(s)}, teacher has {sorted(t)}). Distil only common levels."
        )
    bad = [f"{lv} (student stride {s[lv].stride}, teacher {t[lv].stride})" for lv in levels if s[lv].stride != t[lv].stride]
    if bad:
        raise TeacherError(
            "Stride mismatch on feature level(s) " + ", ".join(bad)
            + f": maps must align cell by cell. Distil only levels of equal stride ({key})."
        )
    return sorted(levels, key=lambda lv: s[lv].stride)


def level_adapters(ctx, kind, levels, key):
    """``nn.ModuleDict`` of student->teacher adapters for ``levels`` (kind from ADAPTER_REGISTRY)."""
    return build_adapters(kind, levels, {lv: ctx.student_shapes[lv].channels for lv in levels},
                          {lv: ctx.teacher_shapes[lv].channels for lv in levels}, key=key)


def check_choice(key, value, choices):
    if value not in choices:
        raise DistillConfigError(f"Unknown {key} '{value}': use one of {list(choices)}.")


# ------------------------------------------------------------------ building and checking
def add_term_configs(distill_node):
    """Let every registered term declare its keys (``add_config``) in the DISTILL node."""
    for _, cls in sorted(DISTILL_TERM_REGISTRY, key=lambda kv: kv[0]):
        add = getattr(cls, "add_config", None)
        if add is not None:
            add(distill_node)


def build_terms(cfg, ctx):
    """Build the terms of ``cfg.DISTILL.TERMS`` after checking names, families and unread keys.

    Returns:
        nn.ModuleDict {term name: term}, in the order listed.
    """
    names = list(cfg.DISTILL.TERMS)
    registered = sorted(k for k, _ in DISTILL_TERM_REGISTRY)
    if not names:
        raise DistillConfigError(
            "DISTILL.TERMS is empty: list the distillation terms to train with (registered: "
            f"{registered}), or use a preset under configs/ (e.g. tar_R34_to_R18.yaml)."
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DistillConfigError(f"DISTILL.TERMS lists {dup} more than once.")
    classes = []
    for n in names:
        try:
            classes.append(DISTILL_TERM_REGISTRY.get(n))
        except KeyError:
            raise DistillConfigError(f"Unknown distillation term '{n}' in DISTILL.TERMS; registered: {registered}.")
    for n, cls in zip(names, classes):
        if ctx.family not in cls.families:
            raise DistillConfigError(
                f"DISTILL.TERMS: {n} does not work with a {FAMILY_NAMES[ctx.family]} student "
                f"(it supports {[FAMILY_NAMES[f] for f in cls.families]}). "
                + _alternatives(n, ctx.family)
            )
        if cls.needs & {"heads", "same_family"} and ctx.teacher_family != ctx.family:
            what = ("compares the two detectors' head outputs" if "heads" in cls.needs
                    else "runs the teacher's own RPN or heads")
            raise DistillConfigError(
                f"DISTILL.TERMS: {n} {what}, but the teacher "
                f"({ctx.teacher_cfg.MODEL.META_ARCHITECTURE}) is not of the student's family "
                f"({FAMILY_NAMES[ctx.family]}). Use a teacher of the same family, or only feature terms "
                "(e.g. FeatureKD, DecoupledFeatureKD) for cross-family pairs."
            )
    check_weights(cfg.DISTILL, classes)
    check_unread_keys(cfg, names, classes)
    return nn.ModuleDict({n: cls(cfg, ctx) for n, cls in zip(names, classes)})


def is_weight_key(key, classes=()):
    """True for a DISTILL ``key`` that must be finite and >= 0: its name ends with WEIGHT or WEIGHTS, or it
    matches NONNEGATIVE_KEYS or the ``nonnegative`` patterns of a term class in ``classes``."""
    name = key.rsplit(".", 1)[-1]
    patterns = list(NONNEGATIVE_KEYS) + [p for c in classes for p in getattr(c, "nonnegative", ())]
    return name.endswith(("WEIGHT", "WEIGHTS")) or any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_weights(distill_node, classes=()):
    """Every weight of every DISTILL key (:func:`is_weight_key`; lists element by element; file paths such as
    TEACHER.WEIGHTS skipped) is a finite number >= 0, else DistillConfigError naming the key: a negative weight turns a loss into a reward
    the optimizer drives to -inf (the total loss falls without bound while training looks fine)."""
    import math

    from .config import flat_items

    for key, value in flat_items(distill_node):
        if not is_weight_key(key, classes) or isinstance(value, str):  # (a str: a file, TEACHER.WEIGHTS)
            continue
        for x in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise DistillConfigError(f"DISTILL.{key} = {value!r}: a weight must be a number >= 0.")
            if not math.isfinite(x):
                raise DistillConfigError(f"DISTILL.{key} = {value!r} is not finite: set a weight >= 0 "
                                         "(0 switches the term's part off).")
            if x < 0:
                raise DistillConfigError(
                    f"DISTILL.{key} = {value!r} is negative: a negative weight rewards the loss it scales (the "
                    "optimizer drives it to -inf). Set a weight >= 0 (0 switches that part off; to weaken a term, "
                    "use a smaller positive weight).")


def _alternatives(name, family):
    same_reads = [k for k, c in DISTILL_TERM_REGISTRY
                  if family in c.families and k != name
                  and set(c.reads) & set(DISTILL_TERM_REGISTRY.get(name).reads)]
    return f"Terms for this family that read the same settings: {sorted(same_reads)}." if same_reads else ""


def changed_keys(node, default):
    """Dotted keys (relative to ``node``) whose value differs from ``default``'s (or that it lacks)."""
    from .config import flat_items

    d = dict(flat_items(default))
    return [k for k, v in flat_items(node) if k not in d or _norm(v) != _norm(d[k])]


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def default_distill_node():
    from detectron2.config import get_cfg

    from .config import add_distill_config

    return add_distill_config(get_cfg()).DISTILL


def check_unread_keys(cfg, names, classes):
    """Abort (or warn, with ``DISTILL.UNUSED_KEYS warn``) when a DISTILL key differs from its
    default but no enabled term reads it."""
    check_choice("DISTILL.UNUSED_KEYS", cfg.DISTILL.UNUSED_KEYS, ("error", "warn"))
    patterns = list(COMMON_KEYS) + [p for c in classes for p in c.reads]
    unread = [k for k in changed_keys(cfg.DISTILL, default_distill_node())
              if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if not unread:
        return
    from .config import flat_items

    values, lines = dict(flat_items(cfg.DISTILL)), []
    for k in unread:
        readers = sorted(n for n, c in DISTILL_TERM_REGISTRY if any(fnmatch.fnmatchcase(k, p) for p in c.reads))
        value = values[k]
        lines.append(f"DISTILL.{k} = {value!r} (read by: {', '.join(readers) or 'no registered term'})")
    msg = (
        f"These settings would be silently ignored: no term in DISTILL.TERMS = {names} reads them "
        f"(student {cfg.MODEL.META_ARCHITECTURE}): " + "; ".join(lines)
        + ". Remove them, or add a term that uses them to DISTILL.TERMS (a term only available for the "
        "other detector family cannot be used with this student), or set DISTILL.UNUSED_KEYS warn to go on "
        "(e.g. when ablating a preset by removing a term)."
    )
    if cfg.DISTILL.UNUSED_KEYS == "warn":
        logger.warning(msg)
    else:
        raise DistillConfigError(msg)
