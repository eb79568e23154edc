"""Building, loading and freezing the teacher, and checking it fits the student.

The teacher is built from its own YAML + weights, frozen (no grad, eval mode
forever, BN included) and kept *outside* the student's module tree, so it is
never in the optimizer, in DDP's gradient sync or in the checkpoint.
"""
import hashlib
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from .checkpoint import DistillCheckpointer
from .config import add_distill_config, flat_items, num_classes, resolve_config_path
from .errors import TeacherError

logger = logging.getLogger(__name__)


#: teacher settings taken from the student config unless DISTILL.TEACHER.OPTS sets them
#: (the class count too: the student's, whatever the teacher's detector family)
FOLLOW_STUDENT = ("DATASETS.TRAIN", "DATASETS.TEST",
                  "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST")


def get_teacher_cfg(cfg):
    """The teacher's config: its YAML, then DISTILL.TEACHER.OPTS, weights override, student device."""
    tcfg = get_cfg()
    add_distill_config(tcfg)
    tcfg.merge_from_file(resolve_config_path(cfg.DISTILL.TEACHER.CONFIG_FILE))
    # what must agree with the student follows it (a teacher trained on the same data needs no
    # YAML edit); DISTILL.TEACHER.OPTS, applied after, still overrides any of these
    tcfg.MODEL.ROI_HEADS.NUM_CLASSES = tcfg.MODEL.RETINANET.NUM_CLASSES = num_classes(cfg)  # either family
    student = dict(flat_items(cfg))
    tcfg.merge_from_list([x for key in FOLLOW_STUDENT for x in (key, student[key])])
    tcfg.merge_from_list(list(cfg.DISTILL.TEACHER.OPTS))
    if cfg.DISTILL.TEACHER.WEIGHTS:
        tcfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER.WEIGHTS
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    if tcfg.MODEL.META_ARCHITECTURE.startswith("Distill"):
        raise TeacherError(
            f"The teacher config {cfg.DISTILL.TEACHER.CONFIG_FILE} is itself a distillation config "
            f"({tcfg.MODEL.META_ARCHITECTURE}); point DISTILL.TEACHER.CONFIG_FILE to the teacher's plain YAML."
        )
    tcfg.freeze()
    return tcfg


class _RecordingCheckpointer(DistillCheckpointer):
    """DistillCheckpointer (torchvision ResNets too) that keeps the incompatible keys it logs."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


def load_teacher_weights(model, weights, strict=True):
    """Load ``weights`` into ``model`` and fail loudly on any mismatch.

    Raises:
        TeacherError: no weights given, or (``strict``) missing / unexpected /
            wrongly-shaped keys; the message names the keys.
        FileNotFoundError: the weights file does not exist.
    """
    if not weights:
        raise TeacherError(
            "The teacher has no weights: set DISTILL.TEACHER.WEIGHTS (or MODEL.WEIGHTS in the teacher's "
            "config). Distilling from a randomly initialised teacher is never what you want."
        )
    checkpointer = _RecordingCheckpointer(model)
    try:
        local = checkpointer.path_manager.get_local_path(weights)
    except Exception as e:  # an unreachable URL / detectron2:// model-zoo file
        raise TeacherError(
            f"Cannot fetch teacher weights '{weights}' ({type(e).__name__}: {e}). Download the file on a machine "
            "with internet access and pass the local path: DISTILL.TEACHER.WEIGHTS /path/to/model_final.pkl"
        ) from None
    if not os.path.isfile(local):
        raise FileNotFoundError(
            f"Teacher weights '{weights}' not found. Train the teacher first (train_net.py with the "
            "teacher's config) or fix DISTILL.TEACHER.WEIGHTS."
        )
    logger.info("Loading teacher weights from %s", weights)
    checkpointer.load(local, checkpointables=[])
    incompatible = checkpointer.incompatible
    problems = []
    if incompatible.incorrect_shapes:
        problems.append(
            "wrong shapes: "
            + ", ".join(f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in incompatible.incorrect_shapes)
        )
    if incompatible.missing_keys:
        problems.append("missing keys: " + ", ".join(incompatible.missing_keys))
    if incompatible.unexpected_keys:
        problems.append("unexpected keys: " + ", ".join(incompatible.unexpected_keys))
    if problems:
        msg = (
            f"Teacher checkpoint '{weights}' does not match the teacher model built from its config: "
            + "; ".join(problems)
            + ". Check that DISTILL.TEACHER.WEIGHTS belongs to DISTILL.TEACHER.CONFIG_FILE "
            "(depth, FPN channels). The teacher's NUM_CLASSES follows the student's: a teacher with another "
            "class set (e.g. a COCO model) must be fine-tuned on your data first; if its config really "
            "differs, set it with DISTILL.TEACHER.OPTS. DISTILL.TEACHER.STRICT_LOAD False only warns."
        )
        if strict:
            raise TeacherError(msg)
        logger.warning(msg)
    return incompatible


def freeze(model):
    """Freeze ``model`` for good: no grads, eval mode, and ``.train()`` becomes a no-op."""
    model.requires_grad_(False)
    model.eval()
    model.train = lambda mode=True: model  # keep BN/dropout in eval even if someone calls .train()
    return model


def build_teacher(cfg, teacher_cfg=None):
    """Build, load and freeze the teacher described by ``cfg.DISTILL.TEACHER``; returns (model, teacher cfg).

    ``teacher_cfg``: the teacher's config when the caller already has it (``get_teacher_cfg(cfg)``),
    so it is built once per model build; None builds it here.
    """
    tcfg = get_teacher_cfg(cfg) if teacher_cfg is None else teacher_cfg
    model = build_model(tcfg)
    load_teacher_weights(model, tcfg.MODEL.WEIGHTS, strict=cfg.DISTILL.TEACHER.STRICT_LOAD)
    n = sum(p.numel() for p in model.parameters())
    logger.info("Teacher %s built from %s (%.2fM parameters, frozen)", tcfg.MODEL.META_ARCHITECTURE,
                cfg.DISTILL.TEACHER.CONFIG_FILE, n / 1e6)
    return freeze(model), tcfg


def check_compatible(student_backbone, teacher_backbone, student_cfg, teacher_cfg):
    """TeacherError when teacher and student cannot be distilled: class counts differ, or the backbones'
    ``size_divisibility`` (image padding) differs, so feature maps would not align.

    Per-level checks (a level both models produce, at equal stride) belong to the terms that distil
    the level, at their build.
    """
    s_k, t_k = num_classes(student_cfg), num_classes(teacher_cfg)
    if s_k != t_k:
        raise TeacherError(
            f"Class-count mismatch: the student predicts {s_k} classes but the teacher {t_k}. "
            "Distil from a teacher trained on the same label set (the teacher's NUM_CLASSES follows the "
            "student's unless DISTILL.TEACHER.OPTS sets it: remove it there, or set the student's "
            "MODEL.ROI_HEADS.NUM_CLASSES / MODEL.RETINANET.NUM_CLASSES)."
        )
    s_div, t_div = student_backbone.size_divisibility, teacher_backbone.size_divisibility
    if s_div != t_div:
        raise TeacherError(
            f"size_divisibility mismatch: student pads images to a multiple of {s_div}, the teacher to "
            f"{t_div}; feature maps would not align. Use backbones with the same padding (e.g. both FPN)."
        )


def file_sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class TeacherFingerprint:
    """Which teacher a run distils from: its model settings (:func:`teacher_settings`) and the
    sha256 of its weights file. A checkpointable of the trainer's checkpointer: saved in every
    checkpoint as ``distill_teacher``; on ``--resume`` a different teacher stops the run
    (``DISTILL.TEACHER.ALLOW_CHANGE_ON_RESUME True`` to go on on purpose, with a warning)."""

    def __init__(self, teacher_cfg, allow_change=False):
        self.teacher_cfg, self.allow_change = teacher_cfg, allow_change
        self._current = None

    def current(self):
        if self._current is None:
            weights = self.teacher_cfg.MODEL.WEIGHTS
            local = PathManager.get_local_path(weights) if weights else ""
            self._current = {
                "config": teacher_settings(self.teacher_cfg), "weights": weights,
                "weights_sha256": file_sha256(local) if local and os.path.isfile(local) else "",
            }
        return self._current

    def state_dict(self):
        return dict(self.current())

    def load_state_dict(self, saved):
        now = self.current()
        diffs = []
        if saved.get("weights_sha256") != now["weights_sha256"]:
            diffs.append(f"weights: checkpoint trained with {saved.get('weights')} (sha256 "
                         f"{saved.get('weights_sha256', '')[:12]}), now {now['weights']} (sha256 {now['weights_sha256'][:12]})")
        old = saved.get("config", {})
        changed = [f"{k}: {old[k]!r} -> {now['config'].get(k, '(absent)')!r}"
                   for k in sorted(old) if now["config"].get(k) != old[k]]
        if changed:  # keys added since the checkpoint (newer code) do not count
            diffs.append("teacher settings: " + "; ".join(changed[:10]))
        if not diffs:
            return
        if self.allow_change == "eval":
            logger.warning("This checkpoint was trained with a different teacher than the one configured now: %s. "
                           "--eval-only does not use the teacher (the results are the student's), but check that "
                           "this is the run you meant.", "; ".join(diffs))
            return
        msg = ("This checkpoint was trained with a different teacher than the one configured now: "
               + "; ".join(diffs) + ". Resuming would silently change the distillation target. Point "
               "DISTILL.TEACHER.CONFIG_FILE / WEIGHTS back to the original teacher, start a new run (new "
               "OUTPUT_DIR, or MODEL.WEIGHTS without --resume), or set DISTILL.TEACHER.ALLOW_CHANGE_ON_RESUME "
               "True to resume with the new teacher on purpose.")
        if not self.allow_change:
            raise TeacherError(msg)
        logger.warning(msg)


def teacher_settings(teacher_cfg):
    """{dotted key: value} of what defines the teacher's outputs: MODEL.* (but WEIGHTS, DEVICE) and INPUT.FORMAT."""
    out = {"INPUT.FORMAT": teacher_cfg.INPUT.FORMAT}
    out.update((k, list(v) if isinstance(v, tuple) else v) for k, v in flat_items(teacher_cfg.MODEL, "MODEL.")
               if k not in ("MODEL.WEIGHTS", "MODEL.DEVICE"))
    return out


@torch.no_grad()
def evaluate_teacher(teacher, teacher_cfg, dataset_names, build_evaluator, build_test_loader):
    """Run the teacher once on each dataset (its own test-time config); returns {dataset: results}.

    ``build_evaluator(name)`` and ``build_test_loader(cfg, name)`` come from the trainer.
    """
    from detectron2.evaluation import inference_on_dataset

    results = {}
    for name in dataset_names:
        loader = build_test_loader(teacher_cfg, name)
        results[name] = inference_on_dataset(teacher, loader, build_evaluator(name))
        logger.info("Teacher results on %s: %s", name, results[name])
    return results


# ------------------------------------------------------------------ head checks (called by the terms' check_teacher)
def check_same_anchors(student, teacher, terms="the head terms"):
    """Dense-head KD compares predictions anchor by anchor: same anchors on the same levels (RetinaNet pair)."""
    s_ag, t_ag = student.anchor_generator, teacher.anchor_generator
    s_levels = [student.backbone.output_shape()[f].stride for f in student.head_in_features]
    t_levels = [teacher.backbone.output_shape()[f].stride for f in teacher.head_in_features]
    same = (
        s_levels == t_levels
        and list(s_ag.strides) == list(t_ag.strides)
        and s_ag.offset == t_ag.offset
        and len(s_ag.cell_anchors) == len(t_ag.cell_anchors)
        and all(a.shape == b.shape and torch.allclose(a.cpu(), b.cpu())
                for a, b in zip(s_ag.cell_anchors, t_ag.cell_anchors))
    )
    if not same:
        raise TeacherError(
            "RetinaNet head KD compares predictions anchor by anchor, but teacher and student anchors differ "
            f"(student head strides {s_levels}, teacher {t_levels}; cell anchors per level "
            f"{[tuple(a.shape) for a in s_ag.cell_anchors]} vs {[tuple(a.shape) for a in t_ag.cell_anchors]}). "
            "Use the same MODEL.ANCHOR_GENERATOR (SIZES, ASPECT_RATIOS, OFFSET) and MODEL.RETINANET.IN_FEATURES, "
            f"or remove {terms} from DISTILL.TERMS."
        )


def check_same_box_coders(student, teacher, terms="the box term"):
    """Box KD compares (or decodes the teacher's) deltas with the student's coder: both must encode alike."""
    if hasattr(student, "roi_heads"):
        s_t, t_t = student.roi_heads.box_predictor.box2box_transform, teacher.roi_heads.box_predictor.box2box_transform
        key = "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"
    else:
        s_t, t_t, key = student.box2box_transform, teacher.box2box_transform, "MODEL.RETINANET.BBOX_REG_WEIGHTS"
    if tuple(s_t.weights) != tuple(t_t.weights):
        raise TeacherError(
            f"Box KD compares deltas, but the student encodes boxes with weights {s_t.weights} and the teacher "
            f"with {t_t.weights}: set the same {key} or remove {terms} from DISTILL.TERMS."
        )
