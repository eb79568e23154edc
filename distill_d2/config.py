"""Config keys of distill_d2: ``add_distill_config(cfg)`` declares them all.

A distillation config is the *student's own* detectron2 YAML (``_BASE_``) plus
``MODEL.META_ARCHITECTURE: DistillGeneralizedRCNN`` (or ``DistillRetinaNet``)
and a ``DISTILL`` block naming the teacher and the terms. Every method (TAR,
DeFeat, baselines) is a preset: a list of terms (``DISTILL.TERMS``) and their
settings; keys marked [choice] are reasoned defaults where the papers are
silent (see docs/METHODS.md). Keys used by one method only are declared by
its terms (``add_config`` in ``distill_d2/methods/``).
"""
from detectron2.config import CfgNode as CN


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
    from . import methods  # noqa: F401  (registers the terms)
    from .terms import add_term_configs

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

    # Keys of the pre-registry layout: each switch became a term in DISTILL.TERMS.
    for old, term in (("FEAT.ENABLED", "FeatureKD or DecoupledFeatureKD"), ("CLS.ENABLED", "RoIClsKD or DenseClsKD"),
                      ("BOX.ENABLED", "RoIBoxKD or DenseBoxKD"), ("PROPOSALS", "ReverseRoIClsKD"),
                      ("PROPOSALS.REVERSE", "ReverseRoIClsKD"),
                      ("DEFEAT_CLS.ENABLED", "DecoupledProposalKD"), ("BACKBONE.ENABLED", "DecoupledBackboneKD")):
        cfg.register_renamed_key(f"DISTILL.{old}", "DISTILL.TERMS",
                                 f"list {term} in DISTILL.TERMS to enable it (omit it to disable).")
    return cfg
