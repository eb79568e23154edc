"""Config keys of distill_d2: ``add_distill_config(cfg)`` declares them all.

A distillation config is the *student's own* detectron2 YAML (``_BASE_``) plus
``MODEL.META_ARCHITECTURE: DistillGeneralizedRCNN`` (or ``DistillRetinaNet``)
and a ``DISTILL`` block naming the teacher and the terms. Every method (TAR,
DeFeat, baselines) is a preset: a list of terms (``DISTILL.TERMS``) and their
settings; keys marked [choice] are reasoned defaults where the papers are
silent (see docs/METHODS.md). Keys used by one method only are declared by
its terms (``add_config`` in ``distill_d2/methods/``).

Loading (end of this file): ``load_cfg(config_file, opts)`` / ``setup_cfg(args)`` give the frozen
config of a command line (defaults + YAML + ``KEY VALUE`` overrides, typo'd keys explained, the
teacher's YAML path resolved); ``schedule_warnings`` flags SOLVER/DECAY steps past MAX_ITER.
"""
import contextlib
import difflib
import logging
import os
import re

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from .cli import check_overrides
from .data.own import register_from_cfg, resolve_num_classes
from .errors import DistillConfigError, TeacherError
from .registry import DISTILL_TERM_REGISTRY

logger = logging.getLogger(__name__)


def flat_items(node, prefix=""):
    """(dotted key, value) of every leaf of a config node, e.g. ("MODEL.RPN.NMS_THRESH", 0.7)."""
    for k, v in node.items():
        if isinstance(v, dict):
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def num_classes_key(cfg):
    """The key holding the detector's class count: RetinaNet's, else the R-CNN box head's."""
    if cfg.MODEL.META_ARCHITECTURE.endswith("RetinaNet"):
        return "MODEL.RETINANET.NUM_CLASSES"
    return "MODEL.ROI_HEADS.NUM_CLASSES"


def num_classes(cfg):
    """The detector's class count (the value of :func:`num_classes_key`)."""
    if cfg.MODEL.META_ARCHITECTURE.endswith("RetinaNet"):
        return cfg.MODEL.RETINANET.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def registered_terms():
    """(name, class) of every registered distillation term, sorted by name."""
    return sorted(DISTILL_TERM_REGISTRY, key=lambda kv: kv[0])


def renamed_keys():
    """{old DISTILL key: new DISTILL key} declared by the registered terms (``renamed``)."""
    return {old: new for _, cls in registered_terms() for old, new in getattr(cls, "renamed", {}).items()}


def add_term_configs(distill_node):
    """Let every registered term declare its keys (``add_config``) in the DISTILL node, then declare the old
    names of renamed keys (defaults: the new keys'), so a config that still sets them loads; they are moved
    to the new names (with a warning) by :func:`migrate_renamed_keys`."""
    for _, cls in registered_terms():
        add = getattr(cls, "add_config", None)
        if add is not None:
            add(distill_node)
    for old, new in renamed_keys().items():
        node, *path = old.split(".")[::-1]
        parent = distill_node
        for part in reversed(path):
            parent = parent.setdefault(part, CN())
        parent[node] = lookup(distill_node, new)


def lookup(node, key):
    """``node``'s value at dotted ``key`` (e.g. ``lookup(cfg.DISTILL, "HGD.LEVELS")``)."""
    for part in key.split("."):
        node = node[part]
    return node


def _set(node, key, value):
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value


def migrate_renamed_keys(cfg, dry_run=False):
    """Move the values of old (renamed) DISTILL keys to their new names, warning once per key, and drop the
    old keys from ``cfg`` (unfrozen). An old key left at its default is dropped silently. Raises
    DistillConfigError when an old key and its new name are both set to different values.

    Returns:
        [(old, new)] of the keys whose value moved (with ``dry_run``: those that would move, nothing changed;
        an old key merely present counts too).
    """
    import logging

    table = renamed_keys()
    present = [old for old in table if _has(cfg.DISTILL, old)]
    if dry_run:
        return [(old, table[old]) for old in present]
    defaults = {}
    for old in present:
        new = table[old]
        if new not in defaults:
            defaults[new] = _default(new)
        value, new_value = lookup(cfg.DISTILL, old), lookup(cfg.DISTILL, new)
        if _same(value, defaults[new]):
            continue
        if not _same(new_value, defaults[new]) and not _same(new_value, value):
            raise DistillConfigError(f"DISTILL.{old} (old name) = {value!r} and DISTILL.{new} = {new_value!r} are "
                                     f"both set: {old} was renamed to {new}; keep only DISTILL.{new}.")
        logging.getLogger(__name__).warning("DISTILL.%s was renamed to DISTILL.%s: read from the old name (rename "
                                            "it in your config; the old name will go)", old, new)
        _set(cfg.DISTILL, new, value)
    moved = [(old, table[old]) for old in present if not _same(lookup(cfg.DISTILL, old), defaults[table[old]])]
    for old in present:
        *path, last = old.split(".")
        parent = cfg.DISTILL
        for part in path:
            parent = parent[part]
        del parent[last]
        if path and not parent:  # an emptied old node (e.g. DISTILL.BOX)
            grand = cfg.DISTILL
            for part in path[:-1]:
                grand = grand[part]
            del grand[path[-1]]
    return moved


def _has(node, key):
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _same(a, b):
    """Equal config values (a list and a tuple of equal items are equal)."""
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return norm(a) == norm(b)


_DEFAULTS = {}


def _default(key):
    """Default of DISTILL ``key`` (a fresh config; cached)."""
    if not _DEFAULTS:
        _DEFAULTS.update(flat_items(default_distill_node()))
    return _DEFAULTS[key]


def add_distill_config(cfg):
    """Add the ``DISTILL`` block and ``TEST.EVALUATOR`` to a detectron2 config (in place)."""
    # Which evaluator train_net builds: "auto" (the dataset metadata's
    # evaluator_type), "coco" (COCO AP incl. APs/m/l, works for any dataset),
    # "pascal_voc", or "coco+pascal_voc" (both; VOC's under "voc_bbox").
    cfg.TEST.EVALUATOR = "auto"

    # Check of the training set before training (distill_d2/data/checks.py):
    # missing image files, boxes with negative/zero or sub-pixel size or outside
    # the image, class ids outside [0, NUM_CLASSES), objects a loader left out
    # (e.g. a class not in a DATASETS.VOC class list), and in a VOC folder whose
    # classes are the names found, a very rare name (a likely typo). Image errors
    # met while training always name their file.
    cfg.DATALOADER.CHECK = CN()
    cfg.DATALOADER.CHECK.ENABLED = True
    # Decode every image (finds truncated/corrupt files and images whose size is
    # not the annotation's, which would stop training when first met), in parallel
    # threads shared out over the launched processes, with a progress line:
    # measured ~750 images/s for 500x375 JPEGs with 2 threads on a busy 2-core
    # machine (a full PIL decode: ~340), so ~30 s for 20,000 images.
    cfg.DATALOADER.CHECK.DECODE = True
    # Threads per process of that pass; 0 = one per usable core (up to 8).
    cfg.DATALOADER.CHECK.DECODE_WORKERS = 0
    # "error" (stop before training, listing the problems) or "drop" (drop the
    # bad annotations and images, log one warning, train on the rest).
    cfg.DATALOADER.CHECK.ACTION = "error"
    # Smallest box width/height in pixels; smaller boxes are problems.
    cfg.DATALOADER.CHECK.MIN_BOX_SIZE = 1.0

    # Resume exactly: seeded training batches, a pure function of (seed, iteration)
    # with ASPECT_RATIO_GROUPING too, that continue at the checkpoint's batch, with
    # per-sample augmentation seeds, and the RNG states saved in
    # every checkpoint (distill_d2/data/resumable.py). Needs SAMPLER_TRAIN
    # TrainingSampler; False = detectron2's own loader (a resumed run then sees
    # other images and flips than the run it continues).
    cfg.DATALOADER.EXACT_RESUME = True
    # Keep only the newest N periodic checkpoints (0 = all, detectron2's behaviour).
    cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0

    from .data.own import add_dataset_config

    add_dataset_config(cfg)  # DATASETS.COCO / DATASETS.VOC: own datasets without Python

    _C = cfg.DISTILL = CN()

    # ---------------------------------------------------------------- teacher
    _C.TEACHER = CN()
    # The teacher's own detectron2 YAML. A relative path is looked up next to
    # the YAML that sets it (in a _BASE_ chain: that file), then from the working
    # directory; given on the command line, from the working directory first.
    _C.TEACHER.CONFIG_FILE = ""
    # Teacher weights; "" means the MODEL.WEIGHTS of the teacher's config.
    _C.TEACHER.WEIGHTS = ""
    # Extra "KEY VALUE" overrides applied to the teacher config (a list).
    _C.TEACHER.OPTS = []
    # Missing/unexpected/mis-shaped keys in the teacher checkpoint abort
    # training (True) or are only logged as warnings (False).
    _C.TEACHER.STRICT_LOAD = True
    # Evaluate the teacher once on DATASETS.TEST before training and log its AP.
    _C.TEACHER.EVAL_BEFORE_TRAIN = False
    # Checkpoints record the teacher (config + weights sha256); --resume with a
    # different teacher stops the run unless this is True (then it warns).
    _C.TEACHER.ALLOW_CHANGE_ON_RESUME = False

    # ------------------------------------------------------------------ terms
    # The distillation terms to train with (names in DISTILL_TERM_REGISTRY, see
    # distill_d2/methods/). A method = a list of terms + their settings, e.g.
    # TAR: [FeatureKD, RoIClsKD, RoIBoxKD] (Faster R-CNN) or [FeatureKD,
    # DenseClsKD, DenseBoxKD] (RetinaNet); DeFeat: [DecoupledFeatureKD] (+
    # DecoupledProposalKD, DecoupledBackboneKD); Hinton: [RoIClsKD]; FitNet:
    # [FeatureKD]. Each term returns loss_kd_* values; all are summed and times
    # lambda(iter). A key below that differs from its default but is read by
    # no listed term is an error (it would be silently ignored).
    _C.TERMS = []
    # What a DISTILL key that differs from its default but that no listed term
    # reads does: "error" (stop at build time, naming the key) or "warn" (log
    # it loudly and go on, e.g. when ablating a preset by removing a term).
    _C.UNUSED_KEYS = "error"

    # ------------------------------------------------------ feature (neck) KD
    # Read by FeatureKD and DecoupledFeatureKD.
    _C.FEAT = CN()
    _C.FEAT.WEIGHT = 1.0
    # Feature levels to distil (names of backbone/FPN outputs present in both
    # models with equal stride).
    _C.FEAT.LEVELS = ["p2", "p3", "p4", "p5", "p6"]
    # Spatial weight mask (MASK_REGISTRY): "gaussian" (TAR), "box" (1 inside
    # gt boxes), "full" (all ones: FitNet-style full-map imitation), "defeat"
    # (each box on one level by its size, DeFeat).
    _C.FEAT.MASK = "gaussian"
    # Gaussian std as a fraction of the box size in each axis [choice: 1/6].
    _C.FEAT.GAUSSIAN_RHO = 1.0 / 6.0
    # Zero the Gaussian outside its box [choice: True].
    _C.FEAT.GAUSSIAN_TRUNCATE = True
    # FeatureKD's normalisation [choice]: "fgfi": sum_l sum M*d^2 / (2*sum_l sum M + eps)
    # (TAR/FGFI); "mean": mean over all mask-weighted elements of each level,
    # averaged over levels (FitNet). (DeFeat's decoupled loss is the term
    # DecoupledFeatureKD.)
    _C.FEAT.NORM = "fgfi"
    # DeFeat level rule (mask "defeat"): level = floor(log2(sqrt((w+1)(h+1)) / this + 1e-6)), clamped.
    _C.FEAT.DEFEAT_CANONICAL_SIZE = 56.0
    # Student->teacher channel adapter per level (ADAPTER_REGISTRY):
    # "conv1x1", "conv3x3", "conv3x3_defeat" (DeFeat's ~1e-4 init),
    # "conv3x3_relu", "identity" (needs equal channels).
    _C.FEAT.ADAPTER = "conv1x1"

    # ------------------------------------------------ classification head KD
    # Read by RoIClsKD / ReverseRoIClsKD (Faster R-CNN: softmax KL on RoIs) and
    # DenseClsKD (RetinaNet: sigmoid binary KL on the shared anchors,
    # normalised by the number of foreground anchors; reads WEIGHT and
    # TEMPERATURE only). Head terms need a teacher of the student's family.
    _C.CLS = CN()
    _C.CLS.WEIGHT = 1.0
    # Softmax temperature T (loss is scaled by T^2) [choice: 1].
    _C.CLS.TEMPERATURE = 1.0
    # RoIs the KL is applied to: "positive" (TAR) or "all" (Hinton-style).
    _C.CLS.ROIS = "positive"
    # TAR "adaptive" gate [choice, off]: only RoIs where the teacher's
    # probability of the gt class exceeds the student's. "none" | "teacher_better".
    _C.CLS.GATE = "none"

    # Keys of the other terms (DISTILL.BOX, DISTILL.DEFEAT_CLS,
    # DISTILL.BACKBONE, FEAT.FG_WEIGHT/BG_WEIGHT, ...) are declared by the
    # terms themselves (their add_config, in distill_d2/methods/*.py).
    # (importing distill_d2 registers them: distill_d2/__init__.py imports distill_d2.methods)
    add_term_configs(_C)

    # ------------------------------------------------------ loss scale guard
    # distill_d2/hooks.py LossScaleGuard, on every detector (plain ones too):
    # gradient clipping keeps a diverging run finite, so detectron2's NaN check
    # never fires. A level is the median over the last GUARD.WINDOW iterations
    # (from the 5th on; a lone spike never counts) of magnitudes (abs); det = the
    # sum of the detection losses (loss_*, not loss_kd_*; RetinaNet's x its
    # loss_normalizer EMA / its first value, so the EMA's drift does not count).
    # Every limit is relative to a level that cannot be near 0. Levels restart
    # on --resume.
    #
    # GUARD: the detector diverges. Trips when det's level exceeds MAX_GROWTH x
    # the lowest level det had reached in this run (at least MIN_LEVEL).
    cfg.GUARD = CN()
    # "error" (stop, saying what grew), "warn" (log it once and go on) or "off".
    cfg.GUARD.ACTION = "error"
    cfg.GUARD.WINDOW = 20
    cfg.GUARD.MAX_GROWTH = 5.0
    # Floor of the lowest level (a well-fitted model's det can get near 0).
    cfg.GUARD.MIN_LEVEL = 0.2
    #
    # DISTILL.GUARD: a distillation term off scale (values divided by lambda, so
    # the decay does not count; typical causes: wrong teacher weights, a missing
    # adapter, a term weight far too large). Trips when a term's level (at its
    # first iteration: its value) exceeds MAX_RATIO_TO_DET x det's, or exceeds
    # MAX_GROWTH x max(its median over its first WARMUP_ITERS iterations,
    # GROWTH_FLOOR x det's first level): a gated term that starts near 0 (few
    # RoIs pass the gate) may rise freely up to MAX_GROWTH x GROWTH_FLOOR x det.
    # When det grew too, the message says the detector diverges (LR, data).
    _C.GUARD = CN()
    # "error", "warn" or "off" for these checks (the detector's: GUARD.ACTION).
    _C.GUARD.ACTION = "error"
    _C.GUARD.MAX_RATIO_TO_DET = 1000.0
    _C.GUARD.WARMUP_ITERS = 10
    _C.GUARD.MAX_GROWTH = 100.0
    _C.GUARD.GROWTH_FLOOR = 0.05

    # ------------------------------------------------------- KD weight decay
    _C.DECAY = CN()
    # lambda(iter) multiplying every KD term: "linear" (1 -> END_VALUE at
    # SOLVER.MAX_ITER, TAR), "cosine", "step" (x GAMMA at each of STEPS),
    # "constant".
    _C.DECAY.TYPE = "linear"
    _C.DECAY.END_VALUE = 0.0
    _C.DECAY.STEPS = []
    _C.DECAY.GAMMA = 0.1
    # Linear warm-up of lambda from 0 over the first WARMUP_ITERS iterations.
    _C.DECAY.WARMUP_ITERS = 0
    # lambda = 0 from this iteration on (-1: never).
    _C.DECAY.STOP_ITER = -1

    # ------------------------------------------------- automatic loss balancing
    # distill_d2/balance.py, ../shared/METHODS_NEWER.md section 7.2 ("calibrate, then freeze"): over a
    # calibration window after the LR warm-up, measure each term's gradient norm on the student's FPN
    # output convs against the detection losses' (all-reduced over processes), give each term the factor
    # that makes it TARGET / (number of terms) of the detection gradient, clamp, freeze. The factor
    # multiplies the term's losses (its config weights stay in them), lambda(iter) the product. Logged
    # (kd/balance/<term>, a table at calibration), saved in checkpoints (resume does not recalibrate).
    _C.BALANCE = CN()
    # Off by default: the presets' weights are what their results were measured with.
    _C.BALANCE.ENABLED = False
    # "grad" (gradient norms on PARAMS; sum- and mean-reduced losses compare fairly) or "loss" (loss
    # values; cheaper, but a sum over pixels and a mean differ by their element count).
    _C.BALANCE.MODE = "grad"
    # What gets one factor: "term" (each DISTILL.TERMS entry, its parts keep their configured ratios)
    # or "loss" (each loss_kd_* key, e.g. each of FGD's four parts) [choice: term].
    _C.BALANCE.UNIT = "term"
    # First iteration of the window; -1 = SOLVER.WARMUP_ITERS (at iteration 0 the detection loss is
    # at its peak and the heads are random).
    _C.BALANCE.START = -1
    # Window length and measuring period (iterations): WINDOW / EVERY samples, their medians are used.
    _C.BALANCE.WINDOW = 100
    _C.BALANCE.EVERY = 10
    # Total distillation / detection gradient (or loss) after balancing, split evenly over the units.
    _C.BALANCE.TARGET = 1.0
    # Clamp of a factor (relative to the configured weight).
    _C.BALANCE.MIN_FACTOR = 1e-3
    _C.BALANCE.MAX_FACTOR = 1e3
    # A unit measuring below FLOOR x the detection keeps factor 1 (and is warned about): it is ~0 (an
    # inherited student, empty masks) or does not reach PARAMS; scaling it up would amplify noise.
    _C.BALANCE.FLOOR = 1e-3
    # Name prefixes of the student parameters measured on; [] = the FPN output convs
    # (backbone.fpn_output*, backbone.top_block.*), which every term and detection loss reaches.
    _C.BALANCE.PARAMS = []
    # Bounded drift correction [off]: every PERIOD iterations (0 = never) re-measure over SAMPLES
    # iterations; a unit outside [1/2, 2] x its target gets x clip(sqrt(target / ratio), 1/2, 2).
    # Never after the last SOLVER.STEPS entry nor once lambda is 0.
    _C.BALANCE.DRIFT = CN()
    _C.BALANCE.DRIFT.PERIOD = 0
    _C.BALANCE.DRIFT.SAMPLES = 5

    # Keys of the pre-registry layout: each switch became a term in DISTILL.TERMS.
    for old, term in (("FEAT.ENABLED", "FeatureKD or DecoupledFeatureKD"), ("CLS.ENABLED", "RoIClsKD or DenseClsKD"),
                      ("BOX.ENABLED", "RoIBoxKD or DenseBoxKD"), ("PROPOSALS", "ReverseRoIClsKD"),
                      ("PROPOSALS.REVERSE", "ReverseRoIClsKD"),
                      ("DEFEAT_CLS.ENABLED", "DecoupledProposalKD"), ("BACKBONE.ENABLED", "DecoupledBackboneKD")):
        cfg.register_renamed_key(f"DISTILL.{old}", "DISTILL.TERMS",
                                 f"list {term} in DISTILL.TERMS to enable it (omit it to disable).")
    return cfg


# ------------------------------------------------------------------ loading a command line's config
def setup_cfg(args):
    """Config from the command line's ``args.config_file`` + ``args.opts`` (``--eval-only`` does not
    need the teacher's config file to exist)."""
    return load_cfg(args.config_file, args.opts, need_teacher=not getattr(args, "eval_only", False))


@contextlib.contextmanager
def _explain_unknown_keys(cfg, config_file):
    """yacs reports a typo'd key as ``AssertionError: Non-existent key``: say where and suggest keys."""
    try:
        yield
    except (KeyError, AssertionError) as e:
        m = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(e))
        if not m:
            raise
        key = m.group(1)
        close = difflib.get_close_matches(key, [k for k, _ in flat_items(cfg)], n=3, cutoff=0.8)
        raise KeyError(f"Unknown config key {key} (in {config_file} or the command line)"
                       + (f"; did you mean {' or '.join(close)}?" if close else ".")) from None


def load_cfg(config_file, opts=(), need_teacher=True):
    """Frozen config: detectron2 defaults + DISTILL keys, ``config_file``, then ``opts``
    (KEY VALUE pairs, any value type); the teacher's config path is resolved to absolute
    (a missing teacher config is an error only with ``need_teacher``)."""
    opts = check_overrides(opts)  # pairs, no flag among them (else: put flags before KEY VALUE overrides)
    cfg = get_cfg()
    add_distill_config(cfg)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file '{config_file}' not found.")
    with _explain_unknown_keys(cfg, config_file):
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(opts)
    register_from_cfg(cfg)  # DATASETS.COCO / DATASETS.VOC, in every process that loads this config
    resolve_num_classes(cfg)  # NUM_CLASSES -1: the training data's class count
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        logger.warning("CUDA is not available: running on CPU (MODEL.DEVICE=cpu).")
        cfg.MODEL.DEVICE = "cpu"
    if is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
        try:
            # relative: next to the YAML of the _BASE_ chain that sets it; set in opts: from the cwd first
            cfg.DISTILL.TEACHER.CONFIG_FILE = resolve_teacher_config_file(
                cfg.DISTILL.TEACHER.CONFIG_FILE, config_file, opts)
        except (FileNotFoundError, TeacherError):
            if need_teacher:
                raise
    migrate_renamed_keys(cfg)  # old names of renamed DISTILL keys: moved to the new ones, with a warning
    if not is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
        check_no_distill_block(cfg)
    cfg.freeze()
    return cfg


def is_distiller_arch(name):
    """True when META_ARCH_REGISTRY's ``name`` is a distillation meta-architecture (``is_distiller``);
    False for a plain detector or an unregistered name."""
    try:
        return getattr(META_ARCH_REGISTRY.get(name), "is_distiller", False)
    except KeyError:
        return False


def default_distill_node():
    """The DISTILL node of a fresh config: every key at its default (terms' keys included)."""
    return add_distill_config(get_cfg()).DISTILL


def changed_keys(node, default):
    """Dotted keys (relative to ``node``) whose value differs from ``default``'s (or that it lacks);
    a list and a tuple of equal items are equal."""
    d = dict(flat_items(default))
    return [k for k, v in flat_items(node) if k not in d or not _same(v, d[k])]


def check_no_distill_block(cfg):
    """A DISTILL setting on a plain detector would train a plain student without a word: refuse."""
    changed = changed_keys(cfg.DISTILL, default_distill_node())
    if changed:
        raise DistillConfigError(
            f"The config sets DISTILL.{', DISTILL.'.join(changed)} but MODEL.META_ARCHITECTURE is "
            f"'{cfg.MODEL.META_ARCHITECTURE}', a plain detector that ignores them (no distillation would happen). "
            "Set MODEL.META_ARCHITECTURE to DistillGeneralizedRCNN or DistillRetinaNet, or remove the DISTILL block."
        )


def resolve_config_path(path, config_dir=None):
    """Absolute path of the teacher's YAML ``path``: tried next to ``config_dir`` (a folder or a list of
    folders, in order) first, then from the cwd, then as a detectron2 model-zoo name."""
    if not path:
        raise TeacherError(
            "DISTILL.TEACHER.CONFIG_FILE is empty: set it to the teacher's detectron2 YAML."
        )
    candidates = [path] if os.path.isabs(path) else []
    if not candidates:
        dirs = [config_dir] if isinstance(config_dir, str) else list(config_dir or [])
        candidates = [os.path.join(d, path) for d in dirs if d]
        if os.path.abspath(path) not in map(os.path.abspath, candidates):
            candidates.append(os.path.abspath(path))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    try:  # a detectron2 model-zoo name, e.g. COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml
        from detectron2 import model_zoo

        return model_zoo.get_config_file(path)
    except RuntimeError:
        pass
    raise FileNotFoundError(
        f"Teacher config '{path}' not found (looked at: {', '.join(candidates)}, and the detectron2 model zoo). "
        "Fix DISTILL.TEACHER.CONFIG_FILE."
    )


def file_that_sets(config_file, key):
    """The file of ``config_file``'s ``_BASE_`` chain whose value of the dotted ``key`` the merged config
    holds: the file itself if it sets it, else its bases (the last listed first, as detectron2 merges
    them), recursively. None when no file sets it (or a base cannot be read)."""
    import yaml

    try:
        with open(config_file) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    node = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            break
    else:
        return config_file
    bases = data.get("_BASE_") if isinstance(data, dict) else None
    for base in reversed(bases if isinstance(bases, list) else [bases] if bases else []):
        base = os.path.expanduser(str(base))
        if base.startswith(("http://", "https://")):
            continue
        found = file_that_sets(os.path.join(os.path.dirname(config_file), base), key)
        if found:
            return found
    return None


def resolve_teacher_config_file(path, config_file, opts=()):
    """Absolute path of DISTILL.TEACHER.CONFIG_FILE ``path`` of the config ``config_file`` + ``opts``.

    A relative path is looked up next to the YAML that sets it (in a ``_BASE_`` chain, the file the
    value comes from, so a user YAML with ``_BASE_: <a preset>`` keeps the preset's teacher), then
    from the cwd; given in the command-line ``opts``, from the cwd first, then next to ``config_file``.
    """
    keys = [str(k) for k in list(opts)[0::2]]
    config_dir = os.path.dirname(os.path.abspath(config_file))
    if "DISTILL.TEACHER.CONFIG_FILE" in keys:
        return resolve_config_path(path, [os.getcwd(), config_dir])
    setter = file_that_sets(os.path.abspath(config_file), "DISTILL.TEACHER.CONFIG_FILE")
    return resolve_config_path(path, os.path.dirname(setter) if setter else config_dir)


def schedule_warnings(cfg, config_file=None):
    """Messages for learning-rate (``SOLVER.STEPS``) and step-decay lambda (``DISTILL.DECAY.STEPS``) steps
    at or after ``SOLVER.MAX_ITER``, which never happen (typically MAX_ITER lowered on the command line
    and STEPS kept), each with the steps to set: the config file's steps scaled to the new MAX_ITER, or
    75% / 92% of it."""
    max_iter = cfg.SOLVER.MAX_ITER
    file_max_iter, file_steps = None, {}
    if config_file:
        try:
            file_cfg = add_distill_config(get_cfg())
            file_cfg.merge_from_file(config_file)
            file_max_iter = file_cfg.SOLVER.MAX_ITER
            file_steps = {"SOLVER.STEPS": list(file_cfg.SOLVER.STEPS),
                          "DISTILL.DECAY.STEPS": list(file_cfg.DISTILL.DECAY.STEPS)}
        except Exception:  # (only for the suggestion)
            pass
    out = []
    checks = [("SOLVER.STEPS", list(cfg.SOLVER.STEPS), "the learning rate never decays",
               "the learning rate skips the decay step(s)")]
    if "DISTILL" in cfg and cfg.DISTILL.DECAY.TYPE == "step":
        checks.append(("DISTILL.DECAY.STEPS", list(cfg.DISTILL.DECAY.STEPS), "the distillation weight never decays",
                       "the distillation weight skips the decay step(s)"))
    for key, steps, never, some in checks:
        late = [s for s in steps if s >= max_iter]
        if not late:
            continue
        if (file_max_iter and file_max_iter != max_iter and steps == file_steps.get(key)
                and all(s < file_max_iter for s in steps)):  # MAX_ITER changed, the file's steps kept
            new = sorted({max(1, int(round(s * max_iter / file_max_iter))) for s in steps} - {max_iter})
            how = f"the config file's steps scaled by {max_iter}/{file_max_iter}"
        else:
            new = sorted({max(1, int(max_iter * 0.75)), max(1, int(max_iter * 0.92))} - {max_iter})
            how = "at 75% and 92% of MAX_ITER"
        fix = "(" + ", ".join(map(str, new)) + ("," if len(new) == 1 else "") + ")"
        out.append(
            f"SOLVER.MAX_ITER is {max_iter} but {key} {tuple(steps)} has step(s) {late} at or after it: "
            f"{never if len(late) == len(steps) else some} {late}. Set {key} \"{fix}\" ({how}) on the command "
            "line with SOLVER.MAX_ITER.")
    return out
