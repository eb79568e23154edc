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
* ``needs``: what it reads beyond the features (:mod:`distill_d2.record`):
  ``"heads"`` for ``record.rois`` / ``record.dense`` (both heads on the shared
  samples), names of ``RECORD_REGISTRY`` entries (teacher passes, e.g.
  ``"teacher_rois"``), :class:`~distill_d2.record.Tap` and
  :class:`~distill_d2.record.CrossPass` objects; read with ``record.get(need)``.
  Set it in ``__init__`` when it depends on the config. Head outputs and
  teacher passes require a same-family teacher (``"same_family"`` says so alone);
* ``reads``: the ``DISTILL`` keys it uses (fnmatch patterns such as
  ``"FEAT.*"``). A key changed from its default that no enabled term reads is
  an error, so a setting cannot be silently ignored;
* ``add_config(distill_node)`` (optional classmethod): declares the term's own
  keys with defaults; called by ``add_distill_config`` for every registered term.
* ``nonnegative``: ``DISTILL`` keys (patterns) that must be finite and >= 0 beyond
  the ones every term gets checked: any key named ``*WEIGHT`` / ``*WEIGHTS``;
* ``renamed``: ``{old key: new key}`` (relative to ``DISTILL``) of keys the term
  moved; an old name still works, with a warning (:func:`distill_d2.config.migrate_renamed_keys`);
* ``by_family``: for a term with one implementation per detector family,
  ``{"rcnn": subclass, "dense": subclass}`` (``Term(cfg, ctx)`` builds the
  student's one).

See docs/ADDING_A_METHOD.md for a worked example.
"""
import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Dict

import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from .adapters import build_adapters
from .config import changed_keys, default_distill_node, flat_items, lookup, migrate_renamed_keys
from .errors import DistillConfigError, TeacherError
from .masks import build_masks
from .record import BUILTIN_NEEDS, CrossPass, Tap
from .registry import DISTILL_TERM_REGISTRY, MASK_REGISTRY, RECORD_REGISTRY

logger = logging.getLogger(__name__)

FAMILY_NAMES = {"rcnn": "Faster R-CNN (DistillGeneralizedRCNN)", "dense": "RetinaNet (DistillRetinaNet)"}
#: DISTILL keys every distiller reads itself (not owned by a term).
COMMON_KEYS = ("TEACHER.*", "DECAY.*", "GUARD.*", "BALANCE.*", "TERMS", "UNUSED_KEYS")
#: DISTILL keys that must be finite and >= 0 besides every key whose name ends with WEIGHT or WEIGHTS
#: (loss weights, checked for every term): the decay's end value and step factor. A term declares
#: more in its ``nonnegative`` attribute (fnmatch patterns).
NONNEGATIVE_KEYS = ("DECAY.END_VALUE", "DECAY.GAMMA")


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
    #: {old DISTILL key: new DISTILL key} of keys this term moved (old names read with a warning)
    renamed = {}
    #: {family: subclass} for a term implemented once per detector family: ``Term(cfg, ctx)`` builds the
    #: subclass of ``ctx.family``
    by_family = None

    def __new__(cls, cfg=None, ctx=None, *args, **kwargs):
        if cls.by_family and ctx is not None:
            cls = cls.by_family[ctx.family]
        return super().__new__(cls)

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


def check_mask(key, name):
    check_choice(key, name, sorted(k for k, _ in MASK_REGISTRY))


class FeatureTerm(DistillTerm):
    """Base of the per-level feature terms: student maps S_l through an adapter A_l towards the teacher's T_l.

    A subclass names its keys (dotted under ``DISTILL``): ``levels_key`` (the distilled levels, validated
    against both models: present, equal strides; kept finest first in ``levels``) and ``adapter_key``
    (ADAPTER_REGISTRY kind; adapters in ``adapters``, saved as ``kd_terms.<Term>.adapters.*``). With
    ``resize``, an adapted map whose size differs from the teacher's is resized to it (bilinear) and the
    masks are built on the teacher's grid. ``masks`` defaults to ``mask_key`` (MASK_REGISTRY) from the gt
    boxes, with the node of ``mask_key`` as its settings; ``explain`` shows them as ``mask_picture``.
    """

    levels_key = "FEAT.LEVELS"
    adapter_key = "FEAT.ADAPTER"
    mask_key = None
    mask_picture = "feat_mask"
    resize = False

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = cfg.DISTILL
        self.levels = distilled_levels(ctx, lookup(d, self.levels_key), f"DISTILL.{self.levels_key}")
        self.adapters = level_adapters(ctx, lookup(d, self.adapter_key), self.levels, f"DISTILL.{self.adapter_key}")
        if self.mask_key:
            check_mask(f"DISTILL.{self.mask_key}", lookup(d, self.mask_key))
            self.mask_name = lookup(d, self.mask_key)
            self.mask_cfg = lookup(d, self.mask_key.rsplit(".", 1)[0]) if "." in self.mask_key else d

    def grid(self, rec):
        """Ordered {level: (stride, H, W)} of the grids the loss is computed on (the teacher's with ``resize``)."""
        maps = rec.t_features if self.resize else rec.features
        return {lv: (rec.strides[lv], *maps[lv].shape[-2:]) for lv in self.levels}

    def adapted(self, rec):
        """{level: A_l(S_l)} (N, C_t, H, W), the student's maps in the teacher's channels (resized with ``resize``)."""
        out = {}
        for lv in self.levels:
            a = self.adapters[lv](rec.features[lv])
            t = rec.t_features[lv]
            if self.resize and a.shape[-2:] != t.shape[-2:]:
                a = F.interpolate(a, size=t.shape[-2:], mode="bilinear", align_corners=False)
            out[lv] = a
        return out

    def targets(self, rec):
        """{level: T_l} (N, C_t, H, W), the teacher's maps (no grad)."""
        return {lv: rec.t_features[lv] for lv in self.levels}

    def masks(self, rec):
        """{level: (N, H_l, W_l)} spatial weights on :meth:`grid`."""
        return build_masks(self.mask_name, rec.gt_boxes, self.grid(rec), self.mask_cfg)

    def explain(self, rec):
        return {"maps": {self.mask_picture: self.masks(rec)}}


# ------------------------------------------------------------------ building and checking
def check_needs(name, cls, needs, ctx):
    """The ``needs`` of term ``name`` can be served for this student/teacher pair (names, families)."""
    registered = sorted(k for k, _ in RECORD_REGISTRY if k != "cross_pass")
    same_family = ctx.teacher_family == ctx.family
    for need in needs:
        if isinstance(need, (Tap, CrossPass)):
            if isinstance(need, CrossPass) and not same_family:
                raise DistillConfigError(
                    f"DISTILL.TERMS: {name} runs the student's features through the teacher's head (a cross "
                    f"pass), but the teacher ({ctx.teacher_cfg.MODEL.META_ARCHITECTURE}) is not of the student's "
                    f"family ({FAMILY_NAMES[ctx.family]}). Use a teacher of the same family.")
            continue
        if need in BUILTIN_NEEDS:
            fn = None
        else:
            try:
                fn = RECORD_REGISTRY.get(need)
            except KeyError:
                raise DistillConfigError(f"Term {name} needs '{need}', which the step record cannot supply: use "
                                         f"'heads', a Tap, a CrossPass or one of {registered}.") from None
            if ctx.family not in fn.families:
                raise DistillConfigError(f"DISTILL.TERMS: {name} needs '{need}', which only a "
                                         f"{' or '.join(FAMILY_NAMES[f] for f in fn.families)} student has.")
        if (fn is None or fn.same_family) and not same_family:
            what = ("compares the two detectors' head outputs" if need == "heads"
                    else "runs the teacher's own RPN or heads")
            raise DistillConfigError(
                f"DISTILL.TERMS: {name} {what}, but the teacher "
                f"({ctx.teacher_cfg.MODEL.META_ARCHITECTURE}) is not of the student's family "
                f"({FAMILY_NAMES[ctx.family]}). Use a teacher of the same family, or only feature terms "
                "(e.g. FeatureKD, DecoupledFeatureKD) for cross-family pairs."
            )


def build_terms(cfg, ctx):
    """Build the terms of ``cfg.DISTILL.TERMS`` after checking names, families, needs and unread keys
    (old names of renamed keys are read, with a warning).

    Returns:
        nn.ModuleDict {term name: term}, in the order listed.
    """
    if migrate_renamed_keys(cfg, dry_run=True):
        cfg = cfg.clone()
        cfg.defrost()
        migrate_renamed_keys(cfg)
        cfg.freeze()
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
        variant = cls.by_family[ctx.family] if cls.by_family else cls
        check_needs(n, variant, variant.needs, ctx)
    variants = [cls.by_family[ctx.family] if cls.by_family else cls for cls in classes]
    check_weights(cfg.DISTILL, variants)
    check_unread_keys(cfg, names, variants)
    terms = {}
    for n, cls in zip(names, classes):
        term = terms[n] = cls(cfg, ctx)
        check_needs(n, cls, term.needs, ctx)  # (a term may set its needs from the config)
    return nn.ModuleDict(terms)


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


def check_unread_keys(cfg, names, classes):
    """Abort (or warn, with ``DISTILL.UNUSED_KEYS warn``) when a DISTILL key differs from its
    default but no enabled term reads it."""
    check_choice("DISTILL.UNUSED_KEYS", cfg.DISTILL.UNUSED_KEYS, ("error", "warn"))
    patterns = list(COMMON_KEYS) + [p for c in classes for p in c.reads]
    unread = [k for k in changed_keys(cfg.DISTILL, default_distill_node())
              if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if not unread:
        return
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
