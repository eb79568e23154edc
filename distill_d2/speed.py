"""Side-by-side train-step timing of several configs (interleaved, same batches).

    python -m distill_d2.speed --configs configs/synthetic/faster_rcnn_R18_student.yaml \\
        configs/synthetic/tar_R34_to_R18.yaml --iters 30 \\
        --opts DISTILL.TEACHER.WEIGHTS output/demo/teacher_frcnn/model_final.pth

Each iteration runs one full train step (forward, backward, SGD step) of every
model on the same batch, in turn, so machine noise hits all models alike;
reports the median step time of each and its ratio to the first config.
``--random-teacher`` times distillation configs with a randomly initialised
teacher of the right architecture (the cost does not depend on its values).
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
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--random-teacher", action="store_true")
    p.add_argument("--teacher-forward", action="store_true",
                   help="also time the first distillation config's teacher in inference mode")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides for every config")
    args = p.parse_args(argv)

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import distill_d2  # noqa: F401

    from .engine import Trainer, load_cfg
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
    times = {name: [] for name, _, _ in models}
    times["teacher forward"] = []
    with EventStorage():
        for i in range(args.warmup + args.iters):
            batch = next(data)
            for name, model, opt in models:
                t0 = time.perf_counter()
                loss = sum(model(batch).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            if teacher is not None:
                t0 = time.perf_counter()
                with torch.no_grad():
                    teacher([{k: v for k, v in x.items() if k != "instances"} for x in batch])
                if i >= args.warmup:
                    times["teacher forward"].append(time.perf_counter() - t0)
            if i >= args.warmup and (i - args.warmup + 1) % 10 == 0:
                print(f"[speed] {i - args.warmup + 1}/{args.iters} iterations", flush=True)
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


if __name__ == "__main__":
    main()
