"""Record the per-iteration loss dicts that tests/test_guard.py replays through the loss guard.

Trains tiny real runs on the synthetic data (128 px inputs, CPU) with the guard off, and saves
each run's logged losses (``loss_*`` as logged, ``kd_weight``, ``kd/*``, ``lr``) as a small JSON
file in tests/data/guard_series/. Not run by the test suite; rerun it after a change to the
models or losses that should move the recorded scales:

    .venv/bin/python tests/data/record_guard_series.py              # all runs (~1 h on 2 busy cores)
    .venv/bin/python tests/data/record_guard_series.py --runs tar_lr_x10 --iters 150

The teachers are R34 Faster R-CNNs trained a few dozen iterations (cached in --work; see RUNS);
"random teacher" is the same architecture with random weights.
"""
import argparse
import datetime
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(REPO, "tests", "data", "guard_series")
SYN = os.path.join(REPO, "configs", "synthetic")

#: settings of every recorded run: 128 px inputs, CPU, no evaluation, a 20-iteration LR warm-up, the guards off
COMMON = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
          "INPUT.MAX_SIZE_TEST", "128", "DATASETS.TRAIN", "('synthetic_train',)", "DATASETS.TEST", "()",
          "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SOLVER.CHECKPOINT_PERIOD", "100000",
          "SOLVER.WARMUP_ITERS", "20", "GUARD.ACTION", "off"]
KD_OFF = ["DISTILL.GUARD.ACTION", "off"]
TAR = "tar_R34_to_R18.yaml"
PLAIN = "faster_rcnn_R18_student.yaml"

#: name -> (what it shows, config, extra opts, teacher, iterations); teacher: None (plain run), "random"
#: (right architecture, random weights) or N (trained N iterations: a weak teacher whose box deltas are
#: small, so RoIBoxKD starts near 0 and rises as the student's regression develops)
RUNS = {
    "tar_correct": ("TAR with the right (weak) teacher: a correct run; RoIBoxKD's gated box term starts near 0",
                    TAR, [], 40, 150),
    "tar_correct_teacher150": ("TAR with the right teacher trained longer: a correct run (box term not near 0)",
                               TAR, [], 150, 150),
    "tar_random_teacher": ("TAR with a random-weight teacher of the right architecture", TAR, [], "random", 40),
    "tar_lr_x10": ("TAR with the right teacher at SOLVER.BASE_LR x10 (0.1): the detector diverges",
                   TAR, ["SOLVER.BASE_LR", "0.1"], 40, 100),
    "tar_feat_weight_x1e4": ("TAR with the right teacher and DISTILL.FEAT.WEIGHT x1e4 (0.01 -> 100)",
                             TAR, ["DISTILL.FEAT.WEIGHT", "100.0"], 40, 40),
    "tar_box_weight_x1e4": ("TAR with the right teacher and DISTILL.TAR.BOX_WEIGHT x1e4 (1 -> 1e4): the gated term",
                            TAR, ["DISTILL.TAR.BOX_WEIGHT", "10000.0"], 40, 80),
    "plain_correct": ("plain R18 Faster R-CNN student at the preset's LR: a correct run", PLAIN, [], None, 100),
    "plain_lr_x10": ("plain R18 Faster R-CNN student at SOLVER.BASE_LR x10 (0.1)", PLAIN,
                     ["SOLVER.BASE_LR", "0.1"], None, 100),
    # RetinaNet divides its losses by an EMA of the positive anchors started at 100: with one object per
    # image and 2 images per batch (~10 positives) the losses' scale rises ~5x over the first ~30 iterations
    "retinanet_correct_one_object": (
        "plain R18 RetinaNet, one object per image, 2 images per batch: a correct run whose losses rise at first "
        "(the loss normaliser, an EMA started at 100 positive anchors, falls to ~10)", "retinanet_R18_student.yaml",
        ["DATASETS.TRAIN", "('synthetic_train_one_object',)", "SOLVER.IMS_PER_BATCH", "2"], None, 150),
}


def register_one_object():
    """``synthetic_train_one_object``: synthetic_train with only the first object of each image."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if "synthetic_train_one_object" not in DatasetCatalog.list():
        DatasetCatalog.register("synthetic_train_one_object", lambda: [
            dict(d, annotations=d["annotations"][:1]) for d in DatasetCatalog.get("synthetic_train")])
        meta = MetadataCatalog.get("synthetic_train")
        MetadataCatalog.get("synthetic_train_one_object").set(thing_classes=meta.thing_classes, evaluator_type="coco")


def _round(v):
    return float(f"{v:.5g}")


def train_teacher(work, iters, seed):
    """Path of the R34 teacher trained ``iters`` iterations (cached)."""
    from distill_d2.config import load_cfg
    from distill_d2.engine import Trainer

    out = os.path.join(work, f"teacher_{iters}_seed{seed}")
    path = os.path.join(out, "model_final.pth")
    if not os.path.isfile(path):
        cfg = load_cfg(os.path.join(SYN, "faster_rcnn_R34_teacher.yaml"), COMMON + [
            "SOLVER.MAX_ITER", iters, "SOLVER.STEPS", "()", "SEED", seed, "OUTPUT_DIR", out])
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    return path


def random_teacher(work):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from distill_d2.config import load_cfg

    out = os.path.join(work, "teacher_random")
    path = os.path.join(out, "model_final.pth")
    if not os.path.isfile(path):
        os.makedirs(out, exist_ok=True)
        torch.manual_seed(0)
        model = build_model(load_cfg(os.path.join(SYN, "faster_rcnn_R34_teacher.yaml"), COMMON))
        DetectionCheckpointer(model, save_dir=out).save("model_final")
    return path


def record(name, work, iters, seed):
    from detectron2.engine import HookBase

    from distill_d2.config import load_cfg
    from distill_d2.engine import Trainer
    from distill_d2.hooks import unwrap

    what, config, extra, teacher, default_iters = RUNS[name]
    iters = iters or default_iters
    opts = COMMON + ["SOLVER.MAX_ITER", iters, "SEED", seed] + extra
    if teacher:
        opts += KD_OFF + ["DISTILL.TEACHER.WEIGHTS", random_teacher(work) if teacher == "random"
                          else train_teacher(work, teacher, seed)]
    cfg = load_cfg(os.path.join(SYN, config), opts + ["OUTPUT_DIR", os.path.join(work, name)])
    series = []

    class Record(HookBase):
        def after_step(self):
            it = self.trainer.iter
            row = {k: _round(v) for k, (v, i) in self.trainer.storage.latest().items() if i == it
                   and (k.startswith(("loss_", "kd/")) or k in ("kd_weight", "lr"))}
            norm = getattr(unwrap(self.trainer.model), "loss_normalizer", None)  # dense detectors' EMA
            if norm is not None:
                row["normalizer"] = _round(norm)
            series.append({"iter": it, **row})

    trainer = Trainer(cfg)
    trainer.register_hooks([Record()])
    trainer.resume_or_load(resume=False)
    trainer.train()
    import detectron2
    import torch

    pairs = zip(opts[::2], opts[1::2])  # (the teacher's path on this machine left out)
    shown = [str(x) for k, v in pairs if not str(v).startswith(work) for x in (k, v)]
    data = {"name": name, "what": what, "config_file": f"configs/synthetic/{config}", "opts": shown,
            "teacher": None if teacher is None else "R34 random weights (torch.manual_seed(0))" if teacher == "random"
            else f"R34 trained {teacher} iterations (128 px, seed {seed})",
            "recorded": datetime.date.today().isoformat(), "torch": torch.__version__,
            "detectron2": detectron2.__version__, "series": series}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
    print(f"{name}: {len(series)} iterations -> {os.path.join(OUT, name + '.json')}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--iters", type=int, default=0, help="iterations of each recorded run (default: the run's own)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", default=os.path.join(REPO, "output", "guard_series"),
                   help="datasets, teachers and run outputs (not the recorded series)")
    a = p.parse_args(argv)
    os.environ["DETECTRON2_DATASETS"] = os.path.join(a.work, "datasets")  # before distill_d2 registers them
    sys.path.insert(0, REPO)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="distill_d2")
    import distill_d2  # noqa: F401  (registers the synthetic datasets)

    register_one_object()
    for name in a.runs:
        record(name, a.work, a.iters, a.seed)


if __name__ == "__main__":
    main()
