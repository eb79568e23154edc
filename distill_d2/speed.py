"""Side-by-side train-step timing of several configs (interleaved, same batches).

    python -m distill_d2.speed --configs configs/synthetic/faster_rcnn_R18_student.yaml \\
        configs/synthetic/tar_R34_to_R18.yaml --iters 30 \\
        --opts DISTILL.TEACHER.WEIGHTS output/demo/teacher_frcnn/model_final.pth

Each iteration runs one full train step (forward, backward, SGD step) of every
model on the same batch, in turn, so machine noise hits all models alike;
reports the median step time of each and its ratio to the first config.
``--random-teacher`` times distillation configs with a randomly initialised
teacher of the right architecture (the cost does not depend on its values).
``--masks`` instead times the feature-mask builders alone (2 images x 50 boxes
on the FPN levels of an 800x1344 input, the per-step cost of the masks).
``--teacher-forward`` also times the teacher's inference forward (eval mode,
no grad) on the same batch and reports each distillation step over
(student step + teacher forward): the price of distillation beyond running
both models (1.0 = nothing extra).
"""
import argparse
import os
import statistics
import tempfile
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+")
    p.add_argument("--masks", action="store_true", help="time the mask builders (no model)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--random-teacher", action="store_true")
    p.add_argument("--teacher-forward", action="store_true",
                   help="also time the first distillation config's teacher in inference mode")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides for every config")
    args = p.parse_args(argv)
    if args.masks:
        return time_masks()
    if not args.configs:
        p.error("--configs is required (or --masks)")

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import distill_d2  # noqa: F401

    from .config import load_cfg
    from .engine import Trainer
    from .teacher import get_teacher_cfg

    models, tmp, data_cfg = [], tempfile.mkdtemp(), None
    for path in args.configs:
        cfg = load_cfg(path, list(args.opts) + ["MODEL.DEVICE", "cpu"])
        data_cfg = data_cfg or cfg  # the batches come from the first config
        if args.random_teacher and cfg.MODEL.META_ARCHITECTURE.startswith("Distill"):
            teacher = build_model(get_teacher_cfg(cfg))
            w = os.path.join(tmp, f"teacher{len(models)}")
            os.makedirs(w)
            DetectionCheckpointer(teacher, save_dir=w).save("model")
            cfg.defrost()
            cfg.DISTILL.TEACHER.WEIGHTS = os.path.join(w, "model.pth")
            cfg.freeze()
        torch.manual_seed(0)
        model = build_model(cfg)
        if hasattr(model, "setup_teacher"):
            model.setup_teacher()
        model.train()
        models.append((os.path.basename(path), model, Trainer.build_optimizer(cfg, model)))
    teacher = None
    if args.teacher_forward:
        teacher = next((m.setup_teacher() for _, m, _ in models if hasattr(m, "setup_teacher")), None)
        if teacher is None:
            raise SystemExit("--teacher-forward needs a distillation config among --configs")
    data = iter(build_detection_train_loader(data_cfg))
    steps = [(name, train_step(model, opt)) for name, model, opt in models]
    if teacher is not None:
        steps.append(("teacher forward", inference_step(teacher)))

    def progress(n):
        if n % 10 == 0:
            print(f"[speed] {n}/{args.iters} iterations", flush=True)

    with EventStorage():
        times = time_interleaved(steps, (next(data) for _ in range(args.warmup + args.iters)), args.warmup, progress)
    base = statistics.median(times[models[0][0]])
    t_fwd = statistics.median(times["teacher forward"]) if teacher is not None else None
    extra = f" ratio to {models[0][0]} + teacher forward |" if t_fwd else ""
    print(f"\n| config | median s/iter | ratio to {models[0][0]} |{extra}\n|---|---|---|{'---|' if t_fwd else ''}")
    for name, _, _ in models:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {med / base:.2f} |" + (f" {med / (base + t_fwd):.2f} |" if t_fwd else ""))
    if t_fwd:
        print(f"| teacher forward (inference, no grad) | {t_fwd:.3f} | {t_fwd / base:.2f} | |")
    print(f"\n{args.iters} interleaved iterations after {args.warmup} warm-up, batch from {args.configs[0]}, "
          f"torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}.")


def train_step(model, optimizer):
    """fn(batch): one full train step of ``model`` (forward in its current mode, backward, ``optimizer`` step;
    call it inside an EventStorage)."""
    def step(batch):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def inference_step(model):
    """fn(batch): ``model``'s inference forward on ``batch`` without its annotations (no grad)."""
    def step(batch):
        with torch.no_grad():
            model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    return step


def time_interleaved(steps, batches, warmup=0, progress=None):
    """Run every ``(name, fn(batch))`` of ``steps`` in turn on each batch of ``batches`` (an iterable), so
    machine noise hits them alike; returns {name: [seconds of each batch after the first ``warmup``]}
    (wall clock, CUDA synchronised). ``progress(n)`` is called after the n-th timed batch."""
    times = {name: [] for name, _ in steps}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i, batch in enumerate(batches):
        for name, fn in steps:
            sync()
            t0 = time.perf_counter()
            fn(batch)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
        if i >= warmup and progress is not None:
            progress(i - warmup + 1)
    return times


def time_masks(images=2, boxes_per_image=50, size=(800, 1344), reps=21):
    """Median time of each MASK_REGISTRY builder on random boxes (sides 12..550 px) at the
    FPN levels (strides 4..64) of a ``size`` input."""
    from detectron2.config import CfgNode

    from .masks import build_masks, defeat_backbone_masks

    cfg = CfgNode({"GAUSSIAN_RHO": 1 / 6, "GAUSSIAN_TRUNCATE": True, "DEFEAT_CANONICAL_SIZE": 56.0})
    g = torch.Generator().manual_seed(0)
    h, w = size
    gt = []
    for _ in range(images):
        wh = torch.exp(torch.empty(boxes_per_image, 2).uniform_(2.5, 6.3, generator=g))  # 12..550 px
        c = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w, h])
        gt.append(torch.cat([c - wh / 2, c + wh / 2], 1).clamp(min=0).minimum(torch.tensor([w, h, w, h])))
    shapes = {f"p{i}": (2**i, -(-h // 2**i), -(-w // 2**i)) for i in range(2, 7)}
    bb_shapes = {f"res{i}": (2**i, -(-h // 2**i), -(-w // 2**i)) for i in range(3, 6)}
    rows = []
    for name in ("gaussian", "box", "defeat", "backbone"):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if name == "backbone":
                defeat_backbone_masks(gt, bb_shapes)
            else:
                build_masks(name, gt, shapes, cfg)
            ts.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(ts)))
    print(f"\n| mask builder | median ms per batch ({images} images x {boxes_per_image} boxes, {h}x{w}, P2-P6) |\n|---|---|")
    for name, t in rows:
        print(f"| {name} | {1000 * t:.1f} |")
    print(f"\n{reps} runs, torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}.")
    return rows


if __name__ == "__main__":
    main()
