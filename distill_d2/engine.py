"""The Trainer (detectron2's DefaultTrainer + distillation), evaluators and train_net.py's ``main``.

The config of a command line comes from :func:`distill_d2.config.setup_cfg` / ``load_cfg``.
"""
import contextlib
import json
import logging
import os

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.modeling import build_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm

from .balance import BalanceState
from .checkpoint import DistillCheckpointer, ModelMeta
from .cli import plain_config_dump, plain_console_logs, use_color
from .config import is_distiller_arch, num_classes, num_classes_key, schedule_warnings, setup_cfg
from .data.checks import ACTIONS as CHECK_ACTIONS, NamedErrors, check_dataset_dicts
from .data.own import check_class_names
from .data.resumable import TrainingState, build_resumable_train_loader
from .data.voc import VOCEvaluator, load_problems
from .errors import DistillConfigError, TeacherError
from .export import StudentCheckpointer, student_cfg_from
from .hooks import KDBalancer, KDWeightScheduler, LossGuard, TeacherEvalHook, unwrap
from .teacher import TeacherFingerprint, get_teacher_cfg

logger = logging.getLogger(__name__)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCOEvaluator or VOCEvaluator (detectron2's Pascal-VOC AP), chosen by ``cfg.TEST.EVALUATOR``.

    "auto" follows the dataset metadata's ``evaluator_type``; "coco" works
    for any dataset (detectron2 converts it to COCO json on the fly).
    """
    kind = cfg.TEST.EVALUATOR
    if kind == "auto":
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if kind == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_folder, tasks=("bbox",))
    if kind == "pascal_voc":  # (detectron2's, reading the annotations of any folder layout distill_d2 loads)
        return VOCEvaluator(dataset_name)
    if kind == "coco+pascal_voc":
        return DatasetEvaluators([COCOEvaluator(dataset_name, output_dir=output_folder, tasks=("bbox",)),
                                  VOCAsSecondEvaluator(dataset_name)])
    raise DistillConfigError(
        f"No evaluator for '{kind}' (dataset {dataset_name}): set TEST.EVALUATOR to 'coco', 'pascal_voc' "
        "or 'coco+pascal_voc' (the last needs a Pascal-VOC dataset)."
    )


class VOCAsSecondEvaluator(VOCEvaluator):
    """Pascal-VOC AP (AP50 = the VOC metric) reported under ``voc_bbox``, beside COCO's ``bbox``."""

    def evaluate(self):
        res = super().evaluate()
        return {"voc_bbox": res["bbox"]} if res else res


@contextlib.contextmanager
def _cpu_safe_ddp():
    """detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
    DistributedDataParallel rejects for a CPU model (several CPU processes with gloo).
    For the duration of ``DefaultTrainer.__init__`` it is swapped for one that omits
    ``device_ids`` when the model is not on CUDA (the only copied behaviour)."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model

    def create(model, **kwargs):
        if next(model.parameters()).device.type != "cuda":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    defaults.create_ddp_model = create
    try:
        yield
    finally:
        defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """DefaultTrainer with: CPU-safe DDP, evaluators from metadata, the teacher built (and
    checked) with the model, KD hooks."""

    def __init__(self, cfg):
        with _cpu_safe_ddp():
            super().__init__(cfg)
        # same checkpointer object (the periodic-checkpoint hook holds it), plus torchvision ResNet weights
        self.checkpointer.__class__ = DistillCheckpointer
        # MODEL.WEIGHTS of other classes (fine-tuning) only warns; a mis-fitting --resume checkpoint stops
        self.checkpointer.expect_fit(cfg, cfg.DATASETS.TRAIN, mode="train")
        model = unwrap(self.model)
        self.checkpointer.add_checkpointable(
            "training_state", TrainingState(model, getattr(self._trainer.data_loader, "resumable", None)))
        # class names and count, input settings (train datasets' metadata: loaded with the train loader)
        self.checkpointer.add_checkpointable("model_meta", ModelMeta(cfg))
        if getattr(model, "is_distiller", False):
            self.checkpointer.add_checkpointable("distill_teacher", TeacherFingerprint(
                model.teacher_cfg, cfg.DISTILL.TEACHER.ALLOW_CHANGE_ON_RESUME))
            if cfg.DISTILL.BALANCE.ENABLED:  # the calibrated factors (made in build_hooks): resume does not recalibrate
                self.checkpointer.add_checkpointable("distill_balance", self.balance_state)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if getattr(model, "is_distiller", False):
            model.setup_teacher()  # build + check the teacher now: errors surface before training
            for line in model.describe_terms():
                logger.info("Distillation term %s", line)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader, with the dataset checked first (``DATALOADER.CHECK``) and a
        mapper whose errors name the image file."""
        from detectron2.data import DatasetMapper, build_detection_train_loader
        from detectron2.data.build import _train_loader_from_config, filter_images_with_only_crowd_annotations

        check = cfg.DATALOADER.CHECK
        if check.ACTION not in CHECK_ACTIONS:
            raise DistillConfigError(f"DATALOADER.CHECK.ACTION must be one of {CHECK_ACTIONS}, got {check.ACTION!r}.")
        kwargs = _train_loader_from_config(cfg)
        if check.ENABLED:
            check_class_names(cfg.DATASETS.TRAIN)  # VOC classes found in the data: a very rare one is a likely typo
            dataset = check_dataset_dicts(
                kwargs["dataset"], num_classes(cfg), decode=check.DECODE, action=check.ACTION,
                min_box_size=check.MIN_BOX_SIZE, dataset_name=", ".join(cfg.DATASETS.TRAIN),
                extra_problems=[p for n in cfg.DATASETS.TRAIN for p in load_problems(n)],
                workers=check.DECODE_WORKERS, distributed=True)
            if dataset is not kwargs["dataset"]:  # dropped: images emptied by it go too; sampler re-sized
                if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
                    dataset = filter_images_with_only_crowd_annotations(dataset)
                if not dataset:
                    raise DistillConfigError(f"No training images left in {', '.join(cfg.DATASETS.TRAIN)} after dropping "
                                     "the bad ones (DATALOADER.CHECK.ACTION drop).")
                kwargs = _train_loader_from_config(cfg, kwargs["mapper"], dataset=dataset)
        if not (check.ENABLED and check.ACTION == "drop"):  # (drop: annotations of unknown classes are gone)
            check_class_count(cfg)
        kwargs["mapper"] = NamedErrors(kwargs["mapper"] or DatasetMapper(cfg, True))
        if not cfg.DATALOADER.EXACT_RESUME:
            return build_detection_train_loader(**kwargs)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise DistillConfigError(f"DATALOADER.EXACT_RESUME needs SAMPLER_TRAIN TrainingSampler (got "
                             f"{cfg.DATALOADER.SAMPLER_TRAIN}); set DATALOADER.EXACT_RESUME False to use it.")
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        # batches a pure function of (seed, iteration), aspect-ratio grouping included; loader.resumable is
        # moved to the resumed iteration by Trainer.resume_or_load
        return build_resumable_train_loader(
            kwargs["dataset"], kwargs["mapper"], kwargs["total_batch_size"], seed,
            kwargs["aspect_ratio_grouping"], kwargs["num_workers"])

    def resume_or_load(self, resume=True):
        """DefaultTrainer.resume_or_load; then the data stream continues where the checkpoint was taken
        (``DATALOADER.EXACT_RESUME``), with the RNG states of that moment (``TrainingState``)."""
        if resume and not self.checkpointer.has_checkpoint():
            logger.warning("--resume: no checkpoint in %s; starting from MODEL.WEIGHTS at iteration 0.",
                           self.cfg.OUTPUT_DIR)
        super().resume_or_load(resume=resume)
        res = getattr(self._trainer.data_loader, "resumable", None)
        if res is not None:  # (its seed was restored with the checkpoint's TrainingState)
            batches = res[0]
            batches.start = self.start_iter  # one batch per process per iteration
            if self.start_iter:
                logger.info("Resuming the data stream at batch %d (seed %d%s).", batches.start, batches.sampler._seed,
                            ", aspect-ratio groups refilled by replaying the stream" if batches.groups else "")

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        ret = super().build_hooks()
        model = unwrap(self.model)
        # every detector: divergence (GUARD), distillation terms off scale (DISTILL.GUARD); before the
        # checkpointer, so a tripped step is not saved
        ret.insert(0, LossGuard(self.cfg))
        if getattr(model, "is_distiller", False):
            # first: lambda must be set before the step's forward
            ret.insert(0, KDWeightScheduler(self.cfg.DISTILL.DECAY, self.cfg.SOLVER.MAX_ITER))
            if self.cfg.DISTILL.BALANCE.ENABLED:
                self.balance_state = BalanceState(model)  # (build_hooks runs inside DefaultTrainer.__init__)
                ret.insert(1, KDBalancer(self.cfg, self.balance_state))
            if self.cfg.DISTILL.TEACHER.EVAL_BEFORE_TRAIN:
                ret.insert(1, TeacherEvalHook())  # (before the balancer: a hook of before_train only)
        keep = self.cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP
        for h in ret:
            if isinstance(h, hooks.PeriodicCheckpointer) and keep > 0:
                h.max_to_keep = keep
        return ret


def _warn_if_other_teacher(cfg, saved):
    """--eval-only: compare the checkpoint's teacher fingerprint ``saved`` (or None) with the configured
    teacher (a warning: inference does not use the teacher, whose files may be gone)."""
    if saved is None:
        return
    try:
        teacher_cfg = get_teacher_cfg(cfg)
    except (FileNotFoundError, TeacherError):
        return
    TeacherFingerprint(teacher_cfg, allow_change="eval").load_state_dict(saved)


def check_class_count(cfg):
    """The model must predict as many classes as the training data has (after its dicts are loaded
    and DATALOADER.CHECK reported annotation problems, class ids out of range included)."""
    key, k = num_classes_key(cfg), num_classes(cfg)
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != k:
            raise DistillConfigError(
                f"Dataset '{name}' has {len(classes)} classes ({', '.join(map(str, classes[:10]))}"
                f"{', ...' if len(classes) > 10 else ''}) but {key} is {k}: set {key} {len(classes)}, or -1 "
                "to take it from the data (a distillation teacher follows the student's class count).")


def write_results(cfg, results, name="results.json"):
    """Write evaluation ``results`` as json to OUTPUT_DIR (main process only)."""
    if comm.is_main_process() and results:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, name), "w") as f:
            json.dump(results, f, indent=2)


def main(args):
    """Entry point of train_net.py (run in every launched process)."""
    from detectron2.utils.logger import setup_logger

    cfg = setup_cfg(args)
    with plain_config_dump():  # no terminal escape codes in log.txt
        default_setup(cfg, args)
    plain_console_logs()  # and none on a redirected stdout
    # the project's own log lines (teacher loaded, terms, resume, data checks) on the console and in log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="distill_d2", abbrev_name="distill_d2",
                 color=use_color())
    logging.getLogger("distill_d2").propagate = True  # (setup_logger turns it off; handlers of the root stay usable)
    for msg in schedule_warnings(cfg, args.config_file):  # e.g. MAX_ITER lowered below SOLVER.STEPS
        logger.warning(msg)
    logging.getLogger("distill_d2").info("torch CPU threads: %d", torch.get_num_threads())
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not args.resume:
            raise DistillConfigError("--eval-only needs weights: pass MODEL.WEIGHTS /path/to/model.pth (or --resume).")
        # inference never uses the teacher: a distillation config is evaluated as its plain student
        # (distill checkpoint with the kd_* entries dropped), so the teacher's files need not exist
        if is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
            student_cfg = student_cfg_from(cfg, keep_weights=True)
            model = build_model(student_cfg)
            # a checkpoint that does not fit the model, DATASETS.TEST's classes or the input settings stops
            checkpointer = StudentCheckpointer(model, save_dir=cfg.OUTPUT_DIR).expect_fit(student_cfg)
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            _warn_if_other_teacher(cfg, checkpointer.distill_teacher)
            cfg = student_cfg
        else:
            model = build_model(cfg)
            DistillCheckpointer(model, save_dir=cfg.OUTPUT_DIR).expect_fit(cfg).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        write_results(cfg, res, "eval_results.json")
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    res = getattr(trainer, "_last_eval_results", None)
    write_results(cfg, res)
    return res
