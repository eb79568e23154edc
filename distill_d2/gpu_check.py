"""GPU check (``make gpu-check``): what only a CUDA machine can show, written to one folder.

    python -m distill_d2.gpu_check --out output/gpu_check            # on a machine with a CUDA GPU

1. Every preset of configs/synthetic (the ``Base-*`` files excepted) trains ``--iters`` (20)
   iterations on CUDA with ``SOLVER.AMP.ENABLED True`` (detectron2's AMPTrainer: float16 autocast +
   GradScaler), in this process, teachers first (a distillation preset's teacher is its trained
   20-iteration teacher, or a random one of the right architecture when its teacher config is not a
   preset here). Per preset: every training step's losses finite, the dtype of each ``loss_kd_*``
   (must be float32: the KD terms run outside autocast), peak GPU memory (allocated / reserved by
   torch's caching allocator, MiB), s/iter. The loss guards only warn (GUARD.ACTION, DISTILL.GUARD.ACTION
   warn): a 20-iteration teacher is far off the student's scale, and this is a numerics check.
2. Train-step cost of each distillation preset relative to its plain student, on CUDA, side by side
   (one step of every model on the same batch in turn, ``torch.cuda.synchronize`` around each),
   in float32 and under AMP, per detector family: the CUDA counterpart of ``python -m distill_d2.speed``.

Writes ``<out>/gpu_check.md`` (the tables), ``gpu_check.json`` (the same, raw) and ``gpu_check.log``
(the training logs); checkpoints go to ``--work`` (a temporary folder by default), not to ``<out>``.
Stops starting new presets after ``--max-minutes`` (the rest are listed as not run). Without CUDA it
prints why and exits with status 0, writing nothing.
"""
import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = os.path.join(REPO, "configs", "synthetic")
TEACHERS = ("faster_rcnn_R34_teacher.yaml", "retinanet_R34_teacher.yaml")

logger = logging.getLogger("distill_d2.gpu_check")


def synthetic_presets():
    """The preset files of configs/synthetic (not the ``Base-*`` ones), teachers first, then plain
    students, then distillation presets (they need a teacher checkpoint)."""
    files = sorted(f for f in os.listdir(SYN) if f.endswith(".yaml") and not f.startswith("Base-"))
    rank = {f: 0 if f in TEACHERS else 1 if f.endswith("_student.yaml") else 2 for f in files}
    return sorted(files, key=lambda f: (rank[f], f))


def cuda_unavailable_reason():
    """None when a CUDA device can be used, else why not (one line)."""
    try:
        import torch
    except ImportError as e:
        return f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        return (f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False; "
                f"CUDA build: {torch.version.cuda or 'none'})")
    return None


def _random_teacher(cfg, work):
    """Path of a randomly initialised checkpoint of ``cfg``'s teacher architecture."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from .teacher import get_teacher_cfg

    d = tempfile.mkdtemp(dir=work, prefix="random_teacher_")
    tcfg = get_teacher_cfg(cfg)
    tcfg.defrost()
    tcfg.MODEL.DEVICE = "cpu"
    DetectionCheckpointer(build_model(tcfg), save_dir=d).save("model")
    return os.path.join(d, "model.pth")


def train_preset(name, work, iters, opts, teachers):
    """Train configs/synthetic/``name`` ``iters`` iterations on CUDA under SOLVER.AMP; returns its row.
    ``teachers``: {teacher config path: trained checkpoint}, filled with the teachers trained here."""
    import torch

    from .config import is_distiller_arch, load_cfg
    from .engine import Trainer
    from .hooks import unwrap

    path = os.path.join(SYN, name)
    run_dir = os.path.join(work, name.replace(".yaml", ""))
    base = list(opts) + ["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", iters,
                         "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", min(10, iters), "SOLVER.CHECKPOINT_PERIOD",
                         10 * iters, "DATASETS.TEST", "()", "OUTPUT_DIR", run_dir, "GUARD.ACTION", "warn"]
    cfg = load_cfg(path, base)
    if is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
        t = os.path.realpath(cfg.DISTILL.TEACHER.CONFIG_FILE)
        weights = teachers.get(t) or _random_teacher(cfg, work)
        # a 20-iteration (or random) teacher's features are far off the student's scale: the guards would
        # stop the run, and this check is about numerics (finite losses under AMP), not about learning
        cfg = load_cfg(path, base + ["DISTILL.TEACHER.WEIGHTS", weights, "DISTILL.GUARD.ACTION", "warn"])
        teacher_note = "trained here" if t in teachers else "random (its teacher config is not a preset here)"
    else:
        teacher_note = ""
    steps = []  # per step: {loss name: (dtype, finite)}

    def record(module, inputs, output):
        if module.training and isinstance(output, dict):
            steps.append({k: (str(v.dtype).replace("torch.", ""), bool(torch.isfinite(v).all())) for k, v in output.items()})

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    hook = unwrap(trainer.model).register_forward_hook(record)
    try:
        trainer.train()
    finally:
        hook.remove()
    torch.cuda.synchronize()
    wall = time.time() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20)
    s_iter = trainer.storage.history("time").median(iters) if "time" in trainer.storage.histories() else float("nan")
    last = trainer.storage.history("total_loss").latest() if "total_loss" in trainer.storage.histories() else float("nan")
    if name in TEACHERS:
        teachers[os.path.realpath(path)] = os.path.join(run_dir, "model_final.pth")
    del trainer
    gc.collect()
    kd = sorted({f"{k}: {d}" for s in steps for k, (d, _) in s.items() if k.startswith("loss_kd")})
    return {"preset": name, "status": "ok", "steps": len(steps), "finite": all(f for s in steps for _, f in s.values()),
            "kd_float32": all(d == "float32" for s in steps for k, (d, _) in s.items() if k.startswith("loss_kd")),
            "kd_dtypes": kd, "total_loss": last, "peak_alloc_mib": peak[0], "peak_reserved_mib": peak[1],
            "s_iter": s_iter, "wall_s": wall, "teacher": teacher_note}


def cuda_step_costs(configs, opts, iters=20, warmup=5, amp=False):
    """Median CUDA train-step time of each config (full step: forward, backward, SGD step; under
    ``amp``: float16 autocast + a GradScaler per model), interleaved on the same batches, with
    ``torch.cuda.synchronize`` before and after each step; random teachers. Returns [(config file
    name, median s)], the first config first."""
    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from .config import is_distiller_arch, load_cfg
    from .engine import Trainer

    work = tempfile.mkdtemp(prefix="gpu_check_costs_")
    models, data_cfg = [], None
    for path in configs:
        cfg = load_cfg(path, list(opts) + ["MODEL.DEVICE", "cuda"])
        if is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
            cfg = load_cfg(path, list(opts) + ["MODEL.DEVICE", "cuda", "DISTILL.TEACHER.WEIGHTS", _random_teacher(cfg, work)])
        data_cfg = data_cfg or cfg
        torch.manual_seed(0)
        model = build_model(cfg)
        if hasattr(model, "setup_teacher"):
            model.setup_teacher()
        model.train()
        models.append((os.path.basename(path), model, Trainer.build_optimizer(cfg, model),
                       torch.amp.GradScaler("cuda", enabled=amp)))
    data = iter(build_detection_train_loader(data_cfg))
    times = {name: [] for name, *_ in models}
    with EventStorage():
        for i in range(warmup + iters):
            batch = next(data)
            for name, model, opt, scaler in models:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    loss = sum(model(batch).values())
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    del models
    gc.collect()
    torch.cuda.empty_cache()
    return [(name, statistics.median(t)) for name, t in times.items()]


def _fmt_rows(rows):
    lines = ["| preset | status | steps | losses finite | KD losses float32 | KD loss dtypes | final total loss | "
             "peak GPU MiB (allocated / reserved) | s/iter | wall s | teacher |", "|---|" + "---|" * 10]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['preset']} | {r['status']} |" + " |" * 9)
            continue
        lines.append(f"| {r['preset']} | ok | {r['steps']} | {'yes' if r['finite'] else 'NO'} | "
                     f"{'yes' if r['kd_float32'] else 'NO'} | {', '.join(r['kd_dtypes']) or '-'} | {r['total_loss']:.3f} | "
                     f"{r['peak_alloc_mib']:.0f} / {r['peak_reserved_mib']:.0f} | {r['s_iter']:.3f} | {r['wall_s']:.0f} | "
                     f"{r['teacher'] or '-'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "output", "gpu_check"), help="the folder of the results")
    p.add_argument("--work", default=None, help="checkpoints and run folders (default: a temporary folder)")
    p.add_argument("--iters", type=int, default=20, help="training iterations per preset")
    p.add_argument("--presets", nargs="*", default=None, help="configs/synthetic file names (default: all)")
    p.add_argument("--cost-iters", type=int, default=20, help="timed steps of the step-cost ratios (0: skip them)")
    p.add_argument("--cost-warmup", type=int, default=5)
    p.add_argument("--max-minutes", type=float, default=7.0,
                   help="start no new preset or timing after this many minutes (what is left is listed as not run)")
    p.add_argument("--opts", nargs="*", default=["DATALOADER.NUM_WORKERS", "4"], help="KEY VALUE overrides for every run")
    args = p.parse_args(argv)
    why = cuda_unavailable_reason()
    if why:
        print(f"[gpu-check] skipped: {why}. It runs only where a CUDA GPU is lent (the device tool's `status`); "
              "nothing was written.", flush=True)
        return 0

    import torch
    from detectron2.utils.logger import setup_logger

    import distill_d2  # noqa: F401  (registers meta-archs and datasets)

    from .demo import SUITES, suite_presets

    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    log_file = os.path.join(args.out, "gpu_check.log")
    for name in ("detectron2", "distill_d2", "fvcore"):
        setup_logger(log_file, name=name, abbrev_name=name[:4], color=False)
    presets = args.presets or synthetic_presets()
    unknown = [x for x in presets if not os.path.isfile(os.path.join(SYN, x))]
    if unknown:
        p.error(f"no such preset(s) in configs/synthetic: {unknown}")
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M"), "iters": args.iters}
    print(f"[gpu-check] {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}): {len(presets)} presets x "
          f"{args.iters} iterations under SOLVER.AMP, then step-cost ratios; results in {args.out}", flush=True)

    def over_budget():
        return (time.time() - t_start) / 60 > args.max_minutes

    rows, teachers = [], {}
    for name in presets:
        if over_budget():
            rows.append({"preset": name, "status": f"not run (past --max-minutes {args.max_minutes:g})"})
            continue
        try:
            rows.append(train_preset(name, work, args.iters, args.opts, teachers))
        except Exception as e:  # one failing preset is a result, not the end of the check
            logger.exception("preset %s failed", name)
            rows.append({"preset": name, "status": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        r = rows[-1]
        print(f"[gpu-check] {name}: {r['status']}"
              + (f", finite {r['finite']}, KD float32 {r['kd_float32']}, peak {r['peak_alloc_mib']:.0f} MiB, "
                 f"{r['s_iter']:.3f} s/iter" if r["status"] == "ok" else ""), flush=True)
        gc.collect()
        torch.cuda.empty_cache()

    costs = {}
    for suite, (_, student, _) in SUITES.items():
        for amp in (False, True):
            key = f"{suite}, {'AMP (float16)' if amp else 'float32'}"
            if not args.cost_iters:
                continue
            if over_budget():
                costs[key] = f"not run (past --max-minutes {args.max_minutes:g})"
                continue
            configs = [os.path.join(SYN, student)] + [os.path.join(SYN, f) for f in suite_presets(suite).values()]
            try:
                costs[key] = cuda_step_costs(configs, args.opts, args.cost_iters, args.cost_warmup, amp)
            except Exception as e:
                logger.exception("step costs %s failed", key)
                costs[key] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"[gpu-check] step costs {key}: done", flush=True)

    md = [f"# gpu-check, {env['date']}: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}",
          f"## Every synthetic preset, {args.iters} iterations on CUDA, SOLVER.AMP.ENABLED True (float16 autocast + "
          "GradScaler)", _fmt_rows(rows)]
    for key, res in costs.items():
        md.append(f"## Train-step cost on CUDA, side by side, {key} ({args.cost_iters} steps after {args.cost_warmup} "
                  "warm-up, same batches, random teachers)")
        if isinstance(res, str):
            md.append(res)
            continue
        base = res[0][1]
        md.append("| config | median s/iter | ratio to the student |\n|---|---|---|\n"
                  + "\n".join(f"| {n} | {t:.4f} | {t / base:.2f} |" for n, t in res))
    bad = [r["preset"] for r in rows if r["status"] == "ok" and not (r["finite"] and r["kd_float32"])]
    failed = [r["preset"] for r in rows if r["status"] != "ok"]
    md.append(f"Total {time.time() - t_start:.0f} s. Presets with a non-finite loss or a KD loss not in float32: "
              f"{', '.join(bad) or 'none'}; failed or not run: {', '.join(failed) or 'none'}.")
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n\n".join(md) + "\n")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"env": env, "presets": rows, "step_costs": costs}, f, indent=1, default=str)
    print("\n\n".join(md), flush=True)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
