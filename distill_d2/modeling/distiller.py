"""Machinery shared by the distillation meta-architectures.

``DistillerMixin`` is put before a detectron2 meta-arch
(``class DistillRetinaNet(DistillerMixin, RetinaNet)``). A training step:

1. the *unchanged* detectron2 forward of the student runs (its own losses),
   while forward hooks record what it saw: the preprocessed batch, every
   named backbone output (bottom-up stages and FPN levels), the outputs of
   the modules the terms tap and, for the head terms, the samples and head
   outputs (subclass ``_record_hooks`` / ``_record_heads``);
2. the frozen teacher preprocesses the same batch and runs its backbone once
   (no grad), and, only when an enabled term needs them, its head on the
   student's samples (its taps recorded likewise);
3. every term in ``kd_terms`` (``DISTILL.TERMS``) reads that
   :class:`~distill_d2.record.StepRecord` (and what it declared in ``needs``,
   computed on first use: teacher passes, taps, cross passes) and returns ``loss_kd_*`` values;
   they are multiplied by lambda(iter) (``kd_weight``, :mod:`distill_d2.schedule`,
   set by :class:`distill_d2.hooks.KDWeightScheduler`).

The teacher is held outside the module tree (in no optimizer, DDP sync or
checkpoint); the terms' adapters are saved with the student as
``kd_terms.*`` and dropped on export. At inference the model is exactly the
student.
"""
import contextlib
import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch import DenseDetector, GeneralizedRCNN

from ..balance import check_balance_cfg, measure, reference_params
from ..errors import TeacherError
from ..record import CrossPass, ModelPair, StepRecord, Tap
from ..schedule import kd_weight
from ..teacher import build_teacher, check_compatible, get_teacher_cfg
from ..terms import BuildContext, build_terms
from .heads import check_taps, tap_hooks

logger = logging.getLogger(__name__)


def teacher_structure(teacher_cfg, backbone_only=True):
    """The teacher's backbone (or, with ``backbone_only=False``, its whole meta-arch) built on the meta device:
    no memory, no weights, its modules and output shapes only, for build-time checks."""
    with torch.device("meta"):
        if backbone_only:
            return build_backbone(teacher_cfg)
        return META_ARCH_REGISTRY.get(teacher_cfg.MODEL.META_ARCHITECTURE)(teacher_cfg)


def bottom_up(backbone):
    """The bottom-up network of an FPN backbone (the backbone itself otherwise)."""
    return getattr(backbone, "bottom_up", backbone)


def all_output_shapes(backbone):
    """{name: ShapeSpec} of every named output: bottom-up stages and the backbone's own outputs."""
    return {**bottom_up(backbone).output_shape(), **backbone.output_shape()}


def family_of(meta_arch_name):
    """"rcnn", "dense" or "other" for a registered META_ARCHITECTURE name."""
    cls = META_ARCH_REGISTRY.get(meta_arch_name)
    if issubclass(cls, GeneralizedRCNN):
        return "rcnn"
    if issubclass(cls, DenseDetector):
        return "dense"
    return "other"


@contextlib.contextmanager
def forward_hooks(pairs):
    """Register ``(module, fn(output))`` forward hooks for the duration of the block."""
    handles = [m.register_forward_hook(lambda mod, inp, out, fn=fn: fn(out)) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class DistillerMixin:
    """Mixin put before a detectron2 meta-arch: ``class X(DistillerMixin, RetinaNet)``.

    The student is built exactly as the plain meta-arch from the same config;
    then the terms (built and checked now, not at the first step).
    """

    is_distiller = True
    #: META_ARCHITECTURE of the plain student (used by export)
    STUDENT_META_ARCH = None
    #: "rcnn" or "dense": which head terms apply
    FAMILY = None

    @configurable
    def __init__(self, *, cfg, **kwargs):
        super().__init__(**kwargs)
        self._init_distiller(cfg)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["cfg"] = cfg
        return ret

    def _init_distiller(self, cfg):
        self.distill_cfg = cfg.DISTILL
        self.kd_weight = 1.0
        kd_weight(0, 1, cfg.DISTILL.DECAY)  # unknown DISTILL.DECAY.TYPE fails now
        check_balance_cfg(cfg)
        #: DISTILL.BALANCE factors, {term name (UNIT term) or loss_kd_* key (UNIT loss): float}; 1.0 if absent
        self.kd_balance = {}
        self._balance_unit = cfg.DISTILL.BALANCE.UNIT
        self._balance_mode = None  # set by hooks.KDBalancer for a step that measures ("grad" / "loss")
        self._balance_sample = None  # that step's balance.measure result
        self._key_term = {}  # loss_kd_* key -> the term that returned it
        self.teacher_cfg = get_teacher_cfg(cfg)
        self._student_cfg = cfg
        object.__setattr__(self, "_teacher", None)  # not a registered submodule, on purpose
        self._rec = None  # raw recordings of the step in progress
        self._pending_scalars = []
        self._teacher_checked = False
        t_backbone = teacher_structure(self.teacher_cfg)
        check_compatible(self.backbone, t_backbone, cfg, self.teacher_cfg)  # classes, padding
        ctx = BuildContext(cfg=cfg, teacher_cfg=self.teacher_cfg, family=self.FAMILY,
                           teacher_family=family_of(self.teacher_cfg.MODEL.META_ARCHITECTURE),
                           student_shapes=all_output_shapes(self.backbone),
                           teacher_shapes=all_output_shapes(t_backbone), student=self)
        self.kd_terms = build_terms(cfg, ctx)
        #: everything the terms declared: the record serves these (and refuses others)
        self.needs = frozenset().union(*(t.needs for t in self.kd_terms.values()))
        if any(isinstance(n, (Tap, CrossPass)) for n in self.needs):  # module paths: check them in both models
            check_taps(self.needs, self, teacher_structure(self.teacher_cfg, backbone_only=False), self.FAMILY)
        self.needs_heads = "heads" in self.needs
        taps = {n for n in self.needs if isinstance(n, Tap)} | {c.tap for c in self.needs if isinstance(c, CrossPass)}
        self._declared = self.needs | taps  # (a cross pass reads its tap)
        self._taps = {m: sorted((t for t in taps if t.model == m), key=str) for m in ("student", "teacher")}
        head_terms = [n for n, t in self.kd_terms.items() if any(isinstance(x, str) for x in t.needs)]
        if head_terms:  # the head outputs, or a teacher pass through the heads
            self._check_head_terms_supported(head_terms)
        self._register_load_state_dict_pre_hook(self._upgrade_legacy_keys)
        self._balance_params = None
        if cfg.DISTILL.BALANCE.ENABLED:  # (a wrong PARAMS fails now, not after the warm-up)
            self._balance_params = reference_params(self, cfg.DISTILL.BALANCE.PARAMS)

    def _check_head_terms_supported(self, names):
        """Abort if the student's heads cannot be recorded for head terms ``names`` (override)."""

    def _upgrade_legacy_keys(self, state_dict, prefix, *args):
        """Checkpoints from before the term registry saved adapters as ``kd_adapters.*`` /
        ``kd_bb_adapters.*``: load them into the term that owns them now."""
        for name, term in self.kd_terms.items():
            old = f"{prefix}{term.legacy_prefix}." if term.legacy_prefix else None
            for k in [k for k in state_dict if old and k.startswith(old)]:
                new = f"{prefix}kd_terms.{name}.adapters.{k[len(old):]}"
                logger.warning("Checkpoint key %s (old layout) loaded as %s", k, new)
                state_dict[new] = state_dict.pop(k)

    # ------------------------------------------------------------ teacher
    def setup_teacher(self):
        """Build, load, freeze and check the teacher (idempotent); returns it."""
        if self._teacher is None:
            teacher, _ = build_teacher(self._student_cfg, self.teacher_cfg)
            for term in self.kd_terms.values():
                term.check_teacher(self, teacher)
            object.__setattr__(self, "_teacher", teacher.to(self.device))
        return self._teacher

    @property
    def teacher(self):
        return self.setup_teacher()

    def _apply(self, fn, *args, **kwargs):
        # keep the unregistered teacher on the student's device/dtype
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def teacher_inputs(self, batched_inputs):
        """The same batch for the teacher, with channels flipped if its INPUT.FORMAT differs."""
        t_fmt, s_fmt = self._teacher.input_format, self.input_format
        if t_fmt == s_fmt:
            return batched_inputs
        if {t_fmt, s_fmt} != {"RGB", "BGR"}:
            raise TeacherError(f"Cannot convert student input format {s_fmt} to the teacher's {t_fmt}.")
        return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]

    def teacher_preprocess(self, batched_inputs, images):
        """Teacher's own normalisation of the batch; padded size must equal the student's."""
        t_images = self._teacher.preprocess_image(self.teacher_inputs(batched_inputs))
        if t_images.tensor.shape[-2:] != images.tensor.shape[-2:]:
            raise TeacherError(
                f"Teacher and student pad the batch differently ({tuple(t_images.tensor.shape[-2:])} vs "
                f"{tuple(images.tensor.shape[-2:])}); use backbones with equal size_divisibility."
            )
        return t_images

    # ------------------------------------------------------------ one step
    def preprocess_image(self, batched_inputs):
        images = super().preprocess_image(batched_inputs)
        if self._rec is not None:
            self._rec["images"] = images
        return images

    def _record_hooks(self, raw):
        """(module, fn(output)) pairs recording the student's head outputs into ``raw`` (override)."""
        return []

    def _record_heads(self, rec, raw):
        """Fill ``rec.rois`` / ``rec.dense`` from ``raw`` and the teacher's head (override)."""

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        # under SOLVER.AMP both models (teacher included) run in the trainer's autocast
        amp = torch.is_autocast_enabled(self.device.type)
        losses, rec = self._training_step(batched_inputs)
        with torch.autocast(self.device.type, enabled=False):  # KD losses in float32 (SOLVER.AMP)
            kd, scalars = self._run_terms(rec.float32() if amp else rec, losses)
            if self._balance_mode:  # a calibration step of DISTILL.BALANCE (unscaled losses, float32)
                self._balance_sample = measure(self, losses, self.balance_units(kd), self._balance_mode,
                                               self._balance_params)
        losses.update(self.weigh_kd(kd, scalars))
        return losses

    def training_losses(self, batched_inputs):
        """(detection losses {loss_*}, {balance unit: its summed loss_kd_* values, config weights applied,
        without lambda or balance factors}, scalars) of a training step: ``forward``'s code path, for
        ``python -m distill_d2.preflight``. A unit is a term (``DISTILL.BALANCE.UNIT term``) or a loss key."""
        losses, rec = self._training_step(batched_inputs)
        kd, scalars = self._run_terms(rec, losses)
        return losses, self.balance_units(kd), scalars

    def balance_units(self, kd_losses):
        """``kd_losses`` ({loss_kd_*: tensor}) grouped as DISTILL.BALANCE balances them: {term: sum of its
        losses} (UNIT term) or unchanged (UNIT loss)."""
        if self._balance_unit == "loss":
            return dict(kd_losses)
        out = {}
        for k, v in kd_losses.items():
            t = self._key_term[k]
            out[t] = out[t] + v if t in out else v
        return out

    def balance_factor(self, key):
        """The DISTILL.BALANCE factor of loss ``key`` (1.0 before calibration or when balancing is off)."""
        return self.kd_balance.get(key if self._balance_unit == "loss" else self._key_term.get(key), 1.0)

    def record_step(self, batched_inputs):
        """The :class:`StepRecord` of a training step on ``batched_inputs`` (the same code path as
        ``forward``, without the KD terms), e.g. for ``term.explain``. The model must be in training
        mode (detectron2's training forward runs, with its RoI/anchor sampling) inside an EventStorage;
        call it under ``torch.no_grad()`` with BN layers in eval mode to change nothing."""
        if not self.training:
            raise RuntimeError("record_step runs the training forward: call model.train() first.")
        return self._training_step(batched_inputs)[1]

    def _training_step(self, batched_inputs):
        """(detectron2's detection losses, the step record) of one training forward of both models."""
        teacher = self.setup_teacher()
        raw = {}
        hooks = [(self.backbone, lambda out: raw.__setitem__("features", out))]
        if bottom_up(self.backbone) is not self.backbone:
            hooks.append((bottom_up(self.backbone), lambda out: raw.__setitem__("bottom_up", out)))
        if self.needs_heads:
            hooks += self._record_hooks(raw)
        taps = {}
        hooks += tap_hooks(self._taps["student"], self, taps)
        self._rec = raw
        try:
            with forward_hooks(hooks):
                losses = super().forward(batched_inputs)  # detectron2's own training forward
        finally:
            self._rec = None
        with forward_hooks(tap_hooks(self._taps["teacher"], teacher, taps)):  # its backbone and head passes
            rec = self._record_teacher(batched_inputs, raw, teacher, taps)
            if self.needs_heads:
                self._record_heads(rec, raw)
        if not self._teacher_checked:
            self._check_teacher_outputs(rec)
        return losses, rec

    def _run_terms(self, rec, losses):
        """{loss_kd_*}, {scalars} of every term on ``rec``."""
        kd, scalars = {}, {}
        for name, term in self.kd_terms.items():
            t_losses, t_scalars = term(rec)
            clash = set(t_losses) & (set(kd) | set(losses))
            if clash or not all(k.startswith("loss_kd_") for k in t_losses):
                raise ValueError(f"Term {name} returned {sorted(t_losses)}: names must start with 'loss_kd_' and "
                                 f"not repeat another term's or a detection loss ({sorted(clash)}).")
            kd.update(t_losses)
            scalars.update(t_scalars)
            self._key_term.update(dict.fromkeys(t_losses, name))
        return kd, scalars

    def _record_teacher(self, batched_inputs, raw, teacher, taps):
        """The step record: the student's recorded outputs + the teacher's backbone on the same batch."""
        images = raw["images"]
        t_images = self.teacher_preprocess(batched_inputs, images)
        t_raw = {}
        t_hooks = []
        if bottom_up(teacher.backbone) is not teacher.backbone:
            t_hooks.append((bottom_up(teacher.backbone), lambda out: t_raw.__setitem__("bottom_up", out)))
        with torch.no_grad(), forward_hooks(t_hooks):
            t_feat = teacher.backbone(t_images.tensor)
        strides = {k: v.stride for k, v in all_output_shapes(self.backbone).items()}
        return StepRecord(
            images=images, t_images=t_images,
            gt_instances=[x["instances"].to(self.device) for x in batched_inputs],
            features={**raw.get("bottom_up", {}), **raw["features"]},
            t_features={**t_raw.get("bottom_up", {}), **t_feat}, strides=strides,
            models=ModelPair(self, teacher), taps=taps, declared=self._declared,
        )

    def _check_teacher_outputs(self, rec):
        """First step only (a host sync): the teacher's outputs must be finite."""
        heads = []
        if rec.rois is not None:
            heads.append(("class logits", rec.rois.t_logits))
        if rec.dense is not None:
            heads.append(("class logits", rec.dense.t_logits))
        for name, t in [(f"feature map {k}", v) for k, v in rec.t_features.items()] + heads:
            if not torch.isfinite(t).all():
                raise FloatingPointError(
                    f"The teacher produced non-finite {name}: its weights are broken or do not match its config "
                    "(check DISTILL.TEACHER.WEIGHTS / CONFIG_FILE)."
                )
        self._teacher_checked = True

    def weigh_kd(self, kd_losses, scalars):
        """Scale ``loss_kd_*`` terms by lambda x their DISTILL.BALANCE factor; keep ``scalars`` (tensors)
        for :meth:`log_kd_scalars`."""
        lam = self.kd_weight
        if scalars:
            self._pending_scalars.append({k: v.detach() if torch.is_tensor(v) else v for k, v in scalars.items()})
        return {k: v * (lam * self.balance_factor(k)) for k, v in kd_losses.items()}

    def log_kd_scalars(self, storage):
        """Write the scalars of the steps since the last call to ``storage`` (the only host sync for them;
        called by KDWeightScheduler after the step). With gradient accumulation the last step's values win."""
        pending, self._pending_scalars = self._pending_scalars, []
        for scalars in pending:
            for k, v in scalars.items():
                storage.put_scalar(k, v)

    def describe_terms(self):
        """One line per term: name, what it needs, trainable parameters (for the log)."""
        return [f"{name}: needs {sorted(map(str, t.needs)) or 'features only'}, "
                f"{sum(p.numel() for p in t.parameters())} trainable parameters"
                for name, t in self.kd_terms.items()]

