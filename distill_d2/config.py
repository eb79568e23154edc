"""Config keys of distill_d2: ``add_distill_config(cfg)`` declares them all.

A distillation config is the *student's own* detectron2 YAML (``_BASE_``) plus
``MODEL.META_ARCHITECTURE: DistillGeneralizedRCNN`` and a ``DISTILL`` block
naming the teacher. Every method (TAR, DeFeat, baselines) is a preset over
these keys; keys marked [choice] are reasoned defaults where the papers are
silent (see docs/METHODS.md).
"""
from detectron2.config import CfgNode as CN


def add_distill_config(cfg):
    """Add the ``DISTILL`` block and ``TEST.EVALUATOR`` to a detectron2 config (in place)."""
    # Which evaluator train_net builds: "auto" (the dataset metadata's
    # evaluator_type), "coco" (COCO AP incl. APs/m/l, works for any dataset)
    # or "pascal_voc".
    cfg.TEST.EVALUATOR = "auto"

    _C = cfg.DISTILL = CN()

    # ---------------------------------------------------------------- teacher
    _C.TEACHER = CN()
    # The teacher's own detectron2 YAML. Relative paths are looked up next to
    # the distillation config first, then from the working directory.
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

    # ---------------------------------------------------- proposal sharing
    _C.PROPOSALS = CN()
    # TAR region-proposal sharing: the student's sampled RoIs are also
    # pooled and scored by the teacher's box head (always on for cls/box KD).
    # Reverse direction [choice]: additionally score the teacher's own
    # sampled RoIs (teacher RPN + the student's sampler) with both heads and
    # apply the cls KD on them too.
    _C.PROPOSALS.REVERSE = False

    # ------------------------------------------------------ feature (neck) KD
    _C.FEAT = CN()
    _C.FEAT.ENABLED = True
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
    # Loss normalisation [choice]: "fgfi": sum_l sum M*d^2 / (2*sum_l sum M + eps)
    # (TAR/FGFI) -> loss_kd_feat; "mean": mean over all mask-weighted elements
    # of each level, averaged over levels -> loss_kd_feat; "decoupled" (DeFeat):
    # per level sum M*d^2 / max(1, 2*C*sum M) and the same with 1-M, averaged
    # over levels -> loss_kd_feat_fg * FG_WEIGHT, loss_kd_feat_bg * BG_WEIGHT.
    _C.FEAT.NORM = "fgfi"
    # DeFeat foreground / background weights (3/12 VOC-style, 4/16 COCO-style).
    _C.FEAT.FG_WEIGHT = 4.0
    _C.FEAT.BG_WEIGHT = 16.0
    # DeFeat level rule: level = floor(log2(sqrt((w+1)(h+1)) / this + 1e-6)), clamped.
    _C.FEAT.DEFEAT_CANONICAL_SIZE = 56.0
    # Student->teacher channel adapter per level (ADAPTER_REGISTRY):
    # "conv1x1", "conv3x3", "conv3x3_defeat" (DeFeat's ~1e-4 init),
    # "conv3x3_relu", "identity" (needs equal channels).
    _C.FEAT.ADAPTER = "conv1x1"

    # ------------------------------------------------ classification head KD
    # (Faster R-CNN: softmax KL on RoIs; RetinaNet: sigmoid binary KL on the
    # shared anchors, normalised by the number of foreground anchors.) Head KD
    # needs a teacher of the same family; for cross-family pairs it is
    # switched off with a log line and only feature KD runs.
    _C.CLS = CN()
    _C.CLS.ENABLED = True
    _C.CLS.WEIGHT = 1.0
    # Softmax temperature T (loss is scaled by T^2) [choice: 1].
    _C.CLS.TEMPERATURE = 1.0
    # RoIs the KL is applied to: "positive" (TAR) or "all" (Hinton-style);
    # RetinaNet always uses all anchors not ignored by its matcher.
    _C.CLS.ROIS = "positive"
    # TAR "adaptive" gate [choice, off]: only RoIs where the teacher's
    # probability of the gt class exceeds the student's. "none" | "teacher_better".
    _C.CLS.GATE = "none"

    # ------------------------------------------------ box regression head KD
    _C.BOX = CN()
    _C.BOX.ENABLED = True
    _C.BOX.WEIGHT = 1.0
    # TAR teacher-better gate on positive RoIs: IoU(teacher box, gt) greater than
    # IoU(proposal, gt) ("teacher_vs_proposal", default), than IoU(student box,
    # gt) ("teacher_vs_student"), or "none" (all positive RoIs).
    _C.BOX.GATE = "teacher_vs_proposal"
    # smooth-L1 beta between student and teacher deltas (0 = L1).
    _C.BOX.BETA = 0.0
    # Divide the summed loss by "num_rois" (all sampled RoIs, like detectron2's
    # box loss), "num_pos" (positive RoIs/anchors, like RetinaNet's loss),
    # "num_gated" (those passing the gate) or "auto" (num_rois for Faster
    # R-CNN, num_pos for RetinaNet) [choice].
    _C.BOX.NORMALIZER = "auto"

    # ------------------------------------- DeFeat decoupled proposals (R-CNN)
    # The teacher's own RPN proposals, sampled by the teacher's sampler (its
    # ROI_HEADS.BATCH_SIZE_PER_IMAGE / POSITIVE_FRACTION, gt appended), scored by
    # both box heads; separate KL terms on the teacher's fg and bg RoIs, each
    # averaged over its RoIs, x T^2 -> loss_kd_cls_fg, loss_kd_cls_bg. Off by
    # default (the paper's authors are ambiguous about using it).
    _C.DEFEAT_CLS = CN()
    _C.DEFEAT_CLS.ENABLED = False
    _C.DEFEAT_CLS.FG_WEIGHT = 2.0
    _C.DEFEAT_CLS.BG_WEIGHT = 2.0
    _C.DEFEAT_CLS.TEMPERATURE = 1.0
    # Separate background temperature [choice]; <= 0 means TEMPERATURE.
    _C.DEFEAT_CLS.BG_TEMPERATURE = -1.0

    # ---------------------------------------- backbone (bottom-up) feature KD
    # DeFeat's optional decoupled backbone KD: one mask from all gt boxes on
    # the stride-4 grid (floor rule), nearest-resized to each level, loss as
    # FEAT.NORM "decoupled" -> loss_kd_backbone_fg / _bg. Off by default.
    _C.BACKBONE = CN()
    _C.BACKBONE.ENABLED = False
    _C.BACKBONE.LEVELS = ["res3", "res4", "res5"]
    _C.BACKBONE.ADAPTER = "conv3x3_relu"
    _C.BACKBONE.FG_WEIGHT = 4.0
    _C.BACKBONE.BG_WEIGHT = 16.0

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
    return cfg
