"""Checkpoint loading: torchvision ImageNet ResNets, and what a checkpoint records about its data.

The detectron2 model zoo has no ResNet-18/34, so students (and small teachers)
start from torchvision's ImageNet weights: a plain ``state_dict`` saved by
``torch.save(torchvision.models.resnet18(weights=...).state_dict(), "r18.pth")``.
:class:`DistillCheckpointer` converts such a file on load to detectron2's
ResNet naming (``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
``layerK.i`` -> ``res{K+1}.i``, ``bnJ`` -> ``convJ.norm``, ``downsample`` ->
``shortcut``; ``fc`` dropped) and lets detectron2's name matching put it
under ``backbone.bottom_up.``. Use it as ``MODEL.WEIGHTS /path/r18.pth``
(student) or ``DISTILL.TEACHER.WEIGHTS`` (teacher).

torchvision's bottleneck ResNets (50/101) stride in the 3x3 conv: the config
needs ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (checked). Their input is RGB
normalised with the ImageNet mean/std: ``INPUT.FORMAT RGB``,
``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]``, ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``
(a warning names them when the model uses others).

Every checkpoint the trainer writes (and every exported student) also records
what the model was trained for, under ``model_meta`` (:func:`model_meta`):
the class names and count, the class-count key, the input settings and the
student's META_ARCHITECTURE. On load (:meth:`DistillCheckpointer.expect_fit`):

- ``--eval-only`` ("eval"): a checkpoint that does not fit the model
  (mis-shaped or missing tensors), whose recorded class names differ from an
  evaluation dataset's, or whose input format / pixel statistics differ from
  the config, is an error naming the key to set; so is an evaluation dataset
  with another class count than the model. Checkpoints without ``model_meta``
  (older ones, the detectron2 model zoo, torchvision) get the shape and
  class-count checks. Export checks the shapes the same way.
- training from ``MODEL.WEIGHTS`` ("train"): mis-shaped tensors are normal when
  fine-tuning a model of other classes (a COCO model on your data): they keep
  their initialisation and one warning names them and the class counts.
- ``--resume`` ("resume"): the run's own checkpoint must fit (an error
  otherwise: the config changed since it was written).
"""
import copy
import logging
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys

from .config import num_classes, num_classes_key
from .data.own import dataset_class_names
from .errors import DistillConfigError

logger = logging.getLogger(__name__)

TORCHVISION_PIXEL_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_PIXEL_STD = [58.395, 57.12, 57.375]


def is_torchvision_resnet(state_dict):
    return "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict and "bn1.running_mean" in state_dict


def convert_torchvision_resnet(state_dict):
    """torchvision ResNet ``state_dict`` -> detectron2 ``ResNet`` names (``fc`` and ``num_batches_tracked`` dropped)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if k.startswith("conv1."):
            nk = "stem.conv1." + k[len("conv1."):]
        elif k.startswith("bn1."):
            nk = "stem.conv1.norm." + k[len("bn1."):]
        else:
            m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", k)
            if m is None:
                raise KeyError(f"Unexpected key {k} in a torchvision ResNet checkpoint.")
            rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", m[3])
            rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
            nk = f"res{int(m[1]) + 1}.{m[2]}.{rest}"
        out[nk] = v
    return out


# ------------------------------------------------------------------ model_meta
#: the input settings recorded in ``model_meta["input"]``; a difference at evaluation is an error for
#: the first three (the weights expect that input), a warning for the test sizes (a legitimate choice)
INPUT_KEYS = ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST")
STRICT_INPUT_KEYS = INPUT_KEYS[:3]


class CheckpointFitError(ValueError):
    """A checkpoint that does not fit the model, the evaluation data or the input settings."""


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, (list, tuple)) else cfg


def student_meta_arch(cfg):
    """The plain detector's META_ARCHITECTURE (the student's, for a distillation config)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    try:
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError:
        return cfg.MODEL.META_ARCHITECTURE
    return getattr(arch, "STUDENT_META_ARCH", None) or cfg.MODEL.META_ARCHITECTURE


def model_meta(cfg, classes=None, recorded_by="distill_d2 trainer"):
    """What a checkpoint's model was trained for: class names (``classes``, default: the first
    DATASETS.TRAIN dataset whose metadata has them, without loading data), class count and its key,
    the input settings (:data:`INPUT_KEYS`) and the student's META_ARCHITECTURE."""
    if classes is None:
        classes = next((c for c in (dataset_class_names(n, load=False) for n in cfg.DATASETS.TRAIN) if c), None)
    return {
        "meta_architecture": student_meta_arch(cfg),
        "trained_meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "num_classes_key": num_classes_key(cfg),
        "num_classes": int(num_classes(cfg)),
        "thing_classes": None if classes is None else [str(c) for c in classes],
        "datasets": list(cfg.DATASETS.TRAIN),
        "input": {k: _get(cfg, k) for k in INPUT_KEYS},
        "recorded_by": recorded_by,
    }


class ModelMeta:
    """Checkpointable saved as ``model_meta`` in every trainer checkpoint (:func:`model_meta` of the
    run's config, taken when the trainer is built); on ``--resume`` the saved one is kept as ``loaded``
    (the checks are the checkpointer's)."""

    def __init__(self, cfg):
        self.meta, self.loaded = model_meta(cfg), None

    def state_dict(self):
        return copy.deepcopy(self.meta)

    def load_state_dict(self, saved):
        self.loaded = saved


def _classes_text(n, names=None, limit=20):
    text = f"{n} class{'' if n == 1 else 'es'}"
    if names:
        text += f" ({', '.join(map(str, names[:limit]))}{', ...' if len(names) > limit else ''})"
    return text


def head_class_counts(incorrect_shapes, model):
    """(class-count key, classes in the checkpoint, classes in the model) read off a mis-shaped
    class-score layer (R-CNN box predictor: K + 1 rows; RetinaNet: anchors x K), or None."""
    for k, ck, md in incorrect_shapes:
        if re.search(r"(^|\.)roi_heads\.box_predictor(\.\d+)?\.cls_score\.weight$", k):
            return "MODEL.ROI_HEADS.NUM_CLASSES", ck[0] - 1, md[0] - 1
        if re.search(r"(^|\.)head\.cls_score\.weight$", k):
            km = getattr(model, "num_classes", None)
            if km and md[0] % km == 0 and ck[0] % (md[0] // km) == 0:
                return "MODEL.RETINANET.NUM_CLASSES", ck[0] // (md[0] // km), km
    return None


def misfit_message(name, incorrect_shapes, missing, model, meta=None, cfg=None, mode="eval"):
    """One message for a checkpoint ``name`` whose tensors do not fit ``model``: the class counts and
    the key to set first (when the class-score layer is mis-shaped), then the tensors."""
    parts, lead = [], ""
    skipped = {k for k, _, _ in incorrect_shapes}
    missing = [k for k in missing if k not in skipped]  # (fvcore reports a mis-shaped tensor as missing too)
    counts = head_class_counts(incorrect_shapes, model)
    if counts:
        key, k_ckpt, k_model = counts
        if cfg is not None:
            key, k_model = num_classes_key(cfg), num_classes(cfg)
        names = (meta or {}).get("thing_classes")
        k_ckpt = (meta or {}).get("num_classes", k_ckpt)
        what = _classes_text(k_ckpt, names)
        if mode == "train":
            lead = (f"{name} predicts {what}, the model {k_model} ({key}): its class-dependent head "
                    "tensors were not loaded and start from their initialisation (normal when fine-tuning a model "
                    f"trained on other classes, e.g. a COCO model; otherwise set {key} {k_ckpt}). ")
        else:
            data = "DATASETS.TEST" if mode == "eval" else "DATASETS.TRAIN"
            lead = (f"{name} predicts {what} but {key} is {k_model}: set {key} {k_ckpt} (and {data} to data with "
                    f"{'these' if names else 'as many'} classes). ")
    if incorrect_shapes:
        parts.append(f"{len(incorrect_shapes)} mis-shaped tensor(s): " + ", ".join(
            f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in incorrect_shapes[:8])
            + (", ..." if len(incorrect_shapes) > 8 else ""))
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the checkpoint: " + ", ".join(missing[:8])
                     + (", ..." if len(missing) > 8 else ""))
    arch = (meta or {}).get("meta_architecture")
    if arch and cfg is not None and arch != student_meta_arch(cfg):
        parts.append(f"{name} is a {arch} checkpoint, the config builds {student_meta_arch(cfg)} "
                     "(MODEL.META_ARCHITECTURE)")
    return (lead or f"{name} does not fit the model built from the config: ") + "; ".join(parts) + "."


def check_meta(meta, cfg, datasets, name, mode="eval"):
    """Compare a checkpoint's recorded ``model_meta`` with the config and ``datasets`` (their class
    names, in order, and count; the input settings). "eval": a difference is a
    :class:`CheckpointFitError` naming both sides (the test sizes only warn); "train" / "resume":
    warnings. Without ``meta`` only the datasets' class counts are checked ("eval")."""
    key, k = num_classes_key(cfg), num_classes(cfg)
    recorded = (meta or {}).get("thing_classes")
    for ds in datasets:
        classes = dataset_class_names(ds, load=mode == "eval")
        if classes is None:
            continue
        if recorded and classes != recorded:
            msg = (f"{name} was trained on {_classes_text(len(recorded), recorded)} but dataset '{ds}' has "
                   f"{_classes_text(len(classes), classes)}")
            if mode == "eval":
                raise CheckpointFitError(
                    msg + ": evaluate on data with the checkpoint's classes in that order (DATASETS.TEST; "
                    "class ids are positions in these lists), or use the checkpoint trained on this data.")
            logger.log(logging.WARNING if mode == "resume" else logging.INFO, "%s (%s).", msg,
                       "resumed on other data" if mode == "resume" else "fine-tuning on other classes")
        elif mode == "eval" and len(classes) != k:
            raise CheckpointFitError(
                f"Dataset '{ds}' (DATASETS.TEST) has {_classes_text(len(classes), classes)} but {key} is {k} "
                f"(and {name} fits that): evaluate on data with the model's classes, or a checkpoint trained on this "
                "data with its class count.")
    saved = (meta or {}).get("input") or {}
    diffs = [(kk, saved[kk], _get(cfg, kk)) for kk in INPUT_KEYS
             if kk in saved and _norm(saved[kk]) != _norm(_get(cfg, kk))]
    strict = [d for d in diffs if d[0] in STRICT_INPUT_KEYS]
    if strict and mode == "eval":
        raise CheckpointFitError(
            f"{name} was trained on other input than the config gives: "
            + "; ".join(f"{kk} is {now!r}, trained with {was!r}" for kk, was, now in strict)
            + ". Set " + " ".join(f"{kk} {_opt(was)}" for kk, was, _ in strict) + ".")
    for kk, was, now in diffs:
        logger.warning("%s was trained with %s %r; this run uses %r.", name, kk, was, now)


def _norm(v):
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def _opt(v):
    """A value as a command-line override."""
    return f'"{list(v)}"' if isinstance(v, (list, tuple)) else str(v)


class DistillCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer + torchvision ResNet state dicts (converted on load) + the fit checks of
    the module doc (:meth:`expect_fit`). After a load: ``loaded_meta`` (the file's ``model_meta`` or
    None) and ``incompatible`` (fvcore's missing / unexpected / mis-shaped keys)."""

    fit_cfg = None  #: config to check loaded checkpoints against (None: no checks but on resume)
    fit_datasets = ()  #: datasets whose class names must match the checkpoint's
    fit_mode = "train"  #: "eval" | "train" (resume_or_load makes it "resume" when resuming)
    fit_ignore_missing = ()  #: name prefixes of model tensors a checkpoint may lack ("eval")
    loaded_meta = None
    incompatible = None
    _loading = ""

    def expect_fit(self, cfg, datasets=None, mode="eval", ignore_missing=()):
        """Check every checkpoint loaded from now on against ``cfg`` and ``datasets`` (default: DATASETS.TEST
        for "eval"), as ``mode`` says (module doc); model tensors whose names start with one of
        ``ignore_missing`` (e.g. "kd_": a student checkpoint in a distillation model) may be absent. Returns self."""
        if mode not in ("eval", "train"):
            raise ValueError(f"expect_fit mode must be 'eval' or 'train', got {mode!r}.")
        self.fit_cfg, self.fit_mode, self.fit_ignore_missing = cfg, mode, tuple(ignore_missing)
        self.fit_datasets = tuple(cfg.DATASETS.TEST if datasets is None and mode == "eval" else datasets or ())
        return self

    def resume_or_load(self, path, *, resume=True):
        mode = self.fit_mode
        if resume and mode == "train" and self.has_checkpoint():
            self.fit_mode = "resume"
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self.fit_mode = mode

    def _load_model(self, checkpoint):
        self.loaded_meta = checkpoint.get("model_meta")
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible):
        super()._log_incompatible_keys(incompatible)
        self.incompatible = incompatible
        self._check_fit(incompatible)

    def _check_fit(self, incompatible):
        mode, cfg, meta = self.fit_mode, self.fit_cfg, self.loaded_meta
        if cfg is None and mode == "train":
            return  # no expect_fit (e.g. the teacher's loader, which has its own checks): fvcore's log only
        name = self._loading or "the checkpoint"
        shapes = list(incompatible.incorrect_shapes)
        missing = [] if mode == "train" else [
            k for k in _filter_reused_missing_keys(self.model, list(incompatible.missing_keys))
            if not k.startswith(self.fit_ignore_missing)]
        if shapes or missing:
            msg = misfit_message(name, shapes, missing, self.model, meta, cfg, mode)
            if mode == "eval":
                raise CheckpointFitError(msg + " --eval-only and export need a checkpoint of this config.")
            if mode == "resume":
                raise CheckpointFitError(
                    msg + " The config changed since this run's checkpoint was written: resume with the run's own "
                    "config, or start a new run (another OUTPUT_DIR, or MODEL.WEIGHTS without --resume).")
            logger.warning(msg)
        if cfg is not None:
            check_meta(meta, cfg, self.fit_datasets, name, mode)

    def _load_file(self, filename):
        self._loading = filename
        data = super()._load_file(filename)
        sd = data.get("model")
        if isinstance(sd, dict) and is_torchvision_resnet(sd):
            self._check_torchvision_compatible(sd)
            logger.info("%s is a torchvision ResNet: converted to detectron2's ResNet names", filename)
            data = {"model": convert_torchvision_resnet(sd), "__author__": "torchvision", "matching_heuristics": True}
        return data

    def _check_torchvision_compatible(self, sd):
        model = self.model
        bottleneck = "layer1.0.conv3.weight" in sd
        if bottleneck:
            conv = next((m for n, m in model.named_modules() if n.endswith("res3.0.conv1")), None)
            if conv is not None and tuple(conv.stride) != (1, 1):
                raise DistillConfigError(
                    "torchvision's bottleneck ResNets put the stride in the 3x3 conv, but this model strides in the "
                    "1x1 conv: set MODEL.RESNETS.STRIDE_IN_1X1 False to load torchvision weights."
                )
        mean = getattr(model, "pixel_mean", None)
        if mean is not None and not torch.allclose(mean.flatten().cpu().float(),
                                                   torch.tensor(TORCHVISION_PIXEL_MEAN), atol=1.0):
            logger.warning(
                "torchvision ResNets were trained on RGB input normalised with the ImageNet mean/std; this model "
                "uses PIXEL_MEAN %s. Consider INPUT.FORMAT RGB, MODEL.PIXEL_MEAN %s, MODEL.PIXEL_STD %s.",
                mean.flatten().tolist(), TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD)
