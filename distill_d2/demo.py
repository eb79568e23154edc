"""The end-to-end demo (``make demo``) and the benchmark behind docs/RESULTS.md.

    python -m distill_d2.demo                      # Faster R-CNN: teacher, baseline, TAR -> output/demo
    python -m distill_d2.demo --methods TAR DeFeat --seeds 0 1 --out output/bench
    python -m distill_d2.demo --suite retinanet --methods TAR DeFeat --seeds 0 1 --out output/bench
    python -m distill_d2.demo --data /data/BCCD --data-name bccd ...           # a Pascal-VOC folder
    python -m distill_d2.demo --coco-train train.json images/ --coco-eval val.json images/ ...  # COCO json

Steps: generate the synthetic dataset; train the R34 teacher (cached: skipped
when ``<out>/teacher_<suite>`` holds a finished run of the same settings); train
the R18 baseline student and each distilled student on the same schedule, once
per seed (reused too with ``--reuse-runs``); evaluate; print and write a table
(``results_<suite>.md`` / ``.json``: AP, AP50, AP75, APs/m/l, train s/iter) and
``predictions_<suite>.png`` (one column per model on val images, distilled
students exported to plain checkpoints first). Every run is a ``train_net.py``
subprocess whose log is ``<run>/log.txt`` (its whole console output, tracebacks included:
``<run>/console.txt``); progress lines (with ETA) are echoed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = os.path.join(REPO, "configs", "synthetic")
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def finished_with_config(config, out_dir, opts):
    """True when ``out_dir`` holds a finished run (results.json) whose saved config.yaml
    equals the merged config of ``config`` + ``opts`` now (so editing a YAML, or one of
    its ``_BASE_`` files, invalidates the cached run)."""
    return os.path.isfile(os.path.join(out_dir, "results.json")) and same_config(config, out_dir, opts)


def same_config(config, out_dir, opts):
    """True when ``out_dir/config.yaml`` (written when a run starts) equals the merged config now."""
    import yaml

    from .config import default_distill_node, load_cfg

    saved = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(saved):
        return False
    cfg = load_cfg(config, list(opts) + ["OUTPUT_DIR", out_dir])
    with open(saved) as f:
        old = yaml.safe_load(f)
    new = yaml.safe_load(cfg.dump())
    # DISTILL keys declared by terms registered in this process only (e.g. a plug-in method
    # imported here but not by the run's train_net.py) do not count while at their default
    default = yaml.safe_load(default_distill_node().dump())
    for k in set(new.get("DISTILL", {})) - set(old.get("DISTILL", {})):
        if new["DISTILL"][k] == default.get(k):
            del new["DISTILL"][k]
    return old == new


def run_train_net(config, out_dir, opts, label, cache=True, threads=None):
    """Run train_net.py; returns (results["bbox"], s/iter).

    ``threads``: torch CPU threads of the run (``OMP_NUM_THREADS``; an ``OMP_NUM_THREADS``
    set by the user wins). Several runs at once on C cores should get C / runs each, not C.

    With ``cache``, a finished run in ``out_dir`` with the same merged config is
    reused instead of retrained. An interrupted run (a checkpoint, no results) of the
    same config is resumed from its last checkpoint (exactly, see docs/ROBUSTNESS.md).
    """
    argv = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config,
            "OUTPUT_DIR", out_dir] + [str(o) for o in opts]
    res_file = os.path.join(out_dir, "results.json")
    if (os.path.isfile(os.path.join(out_dir, "last_checkpoint")) and not os.path.isfile(res_file)
            and same_config(config, out_dir, opts)):
        argv.insert(2, "--resume")  # an interrupted run of the same settings: continue it exactly
    if cache and finished_with_config(config, out_dir, opts):
        print(f"[demo] {label}: cached in {out_dir} (delete it to retrain)", flush=True)
    else:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.isfile(res_file):
            os.remove(res_file)  # a stale result must not survive a failed retrain
        how = "resuming from its last checkpoint" if "--resume" in argv else "training"
        print(f"[demo] {label}: {how} ({' '.join(map(str, opts))})", flush=True)
        t0 = time.time()
        # the whole console output (tracebacks included) goes to console.txt; train_net.py itself writes the
        # run's log to log.txt (both writing log.txt garbled it: lines overwritten, lost or twice)
        console = os.path.join(out_dir, "console.txt")
        with open(console, "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, argv))}\n")
            env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they happen
            if threads and "OMP_NUM_THREADS" not in os.environ:
                env["OMP_NUM_THREADS"] = str(threads)
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                    env=env)
            for line in proc.stdout:
                log.write(line)
                if "eta:" in line or "Traceback" in line or "Error" in line or "Overall training speed" in line:
                    print(f"  [{label}] " + line.split("]: ", 1)[-1].strip()[:160], flush=True)
            if proc.wait() != 0:
                raise RuntimeError(f"{label} failed; see {console} (its whole output; the run's log is "
                                   f"{os.path.join(out_dir, 'log.txt')})")
        print(f"[demo] {label}: done in {time.time() - t0:.0f} s", flush=True)
    with open(res_file) as f:
        raw = json.load(f)
    results = dict(raw["bbox"])
    if "voc_bbox" in raw:  # TEST.EVALUATOR coco+pascal_voc
        results["VOC_AP50"] = raw["voc_bbox"]["AP50"]
    return results, seconds_per_iter(out_dir)


def coco_class_count(train_json, eval_json):
    """Number of categories of a COCO training json; the evaluation json must have the same ones."""
    cats = []
    for path in (train_json, eval_json):
        if not os.path.isfile(path):
            raise SystemExit(f"[demo] COCO json '{path}' does not exist.")
        with open(path) as f:
            cats.append(sorted((c["id"], c["name"]) for c in json.load(f).get("categories", [])))
    if not cats[0]:
        raise SystemExit(f"[demo] {train_json} has no 'categories': cannot tell the class count.")
    if cats[0] != cats[1]:
        raise SystemExit(f"[demo] the training and evaluation jsons list different categories:\n  {train_json}: "
                         f"{cats[0]}\n  {eval_json}: {cats[1]}\nboth must use the same (id, name) list.")
    return len(cats[0])


def seconds_per_iter(out_dir):
    """Median of detectron2's logged per-iteration ``time`` (first logged window skipped)."""
    times = []
    with open(os.path.join(out_dir, "metrics.json")) as f:
        for line in f:
            rec = json.loads(line)
            if "time" in rec and rec.get("iteration", 0) >= 20:
                times.append(rec["time"])
    return statistics.median(times) if times else float("nan")


def fmt_table(rows):
    """Markdown table: mean ± std over seeds per metric (VOC AP50 when evaluated), AP gain over the
    ``baseline`` row, median train s/iter."""
    metrics = METRICS + (["VOC_AP50"] if all("VOC_AP50" in r for _, runs in rows for r in runs) else [])
    base = [statistics.mean(r["AP"] for r in runs) for name, runs in rows if name.startswith("baseline")]
    head = "| model | seeds | " + " | ".join(m.replace("_", " ") for m in metrics) + " | AP gain | train s/iter |"
    sep = "|" + "---|" * (len(metrics) + 4)
    lines = [head, sep]
    for name, runs in rows:
        cells = []
        for m in metrics + ["s_iter"]:
            vals = [r[m] for r in runs]
            mean = statistics.mean(vals)
            sd = f" ± {statistics.stdev(vals):.{3 if m == 's_iter' else 1}f}" if len(vals) > 1 else ""
            cells.append(f"{mean:.{3 if m == 's_iter' else 1}f}{sd}")
        gain = f"{statistics.mean(r['AP'] for r in runs) - base[0]:+.1f}" if base else ""
        cells.insert(len(metrics), gain)
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_seed_gains(rows, seeds):
    """Markdown table: each method's AP gain over the baseline run of the same seed (same data
    order and initialisation), per seed, their mean, and the gain of the mean VOC AP50 when
    evaluated. ``rows``: (name, runs in ``seeds`` order) as for fmt_table; teacher rows skipped."""
    base = next(runs for name, runs in rows if name.startswith("baseline"))
    voc = all("VOC_AP50" in r for _, runs in rows for r in runs)
    lines = ["| method | " + " | ".join(f"gain seed {s}" for s in seeds) + " | mean gain |"
             + (" VOC AP50 gain |" if voc else ""), "|---|" + "---|" * (len(seeds) + 1 + voc)]
    for name, runs in rows:
        if name.startswith(("teacher", "baseline")):
            continue
        gains = [r["AP"] - b["AP"] for r, b in zip(runs, base, strict=True)]
        cells = [f"{g:+.1f}" for g in gains] + [f"{statistics.mean(gains):+.1f}"]
        if voc:
            cells.append(f"{statistics.mean(r['VOC_AP50'] for r in runs) - statistics.mean(b['VOC_AP50'] for b in base):+.1f}")
        lines.append(f"| {name.split()[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(runs, out_png, title):
    """Grouped bar chart (matplotlib PNG): AP, AP50, AP75, APs/m/l per model, mean with std whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(runs)
    x = np.arange(len(METRICS))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(names):
        vals = np.array([[r[m] for m in METRICS] for r in runs[name]])
        err = vals.std(axis=0, ddof=1) if len(vals) > 1 else None
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals.mean(axis=0), width, yerr=err, capsize=3,
               label=f"{name} (n={len(vals)})")
    ax.set_xticks(x, METRICS)
    ax.set_ylabel("COCO AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def draw_predictions(cfg_file, weights_by_name, out_png, n_images=3, score_thresh=0.5, opts=()):
    """Side-by-side PNG of predictions (one column per model) on the first val images."""
    import cv2
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.visualizer import Visualizer

    from .config import load_cfg

    cfg = load_cfg(cfg_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    name = cfg.DATASETS.TEST[0]
    dicts, meta = DatasetCatalog.get(name)[:n_images], MetadataCatalog.get(name)
    columns = []
    for label, weights in weights_by_name.items():
        model = build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        model.eval()
        tiles = []
        for d in dicts:
            img = cv2.imread(d["file_name"])
            with torch.no_grad():
                inst = model([{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()),
                               "height": d["height"], "width": d["width"]}])[0]["instances"]
            inst = inst[inst.scores >= score_thresh].to("cpu")
            scale = min(2.0, 512 / max(img.shape[:2]))  # tiles of 512 px (a 256 px image x2), whatever the data
            vis = Visualizer(img[:, :, ::-1], meta, scale=scale).draw_instance_predictions(inst).get_image()
            cv2.putText(vis, f"{label} (score >= {score_thresh:g})", (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                        (255, 255, 255), 2)
            tiles.append(vis)
        columns.append(tiles)
    cv2.imwrite(out_png, tile_grid(columns)[:, :, ::-1])


def tile_grid(columns, fill=0):
    """One image from ``columns`` (lists of HxWx3 uint8 tiles, one per row, the same count in each): every
    tile centred in a cell of the largest tile's height and width, so images of mixed sizes and
    orientations line up (the empty margin is ``fill``)."""
    import numpy as np

    tiles = [t for col in columns for t in col]
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    grid = np.full((h * len(columns[0]), w * len(columns), 3), fill, dtype=np.uint8)
    for j, col in enumerate(columns):
        for i, t in enumerate(col):
            y, x = i * h + (h - t.shape[0]) // 2, j * w + (w - t.shape[1]) // 2
            grid[y:y + t.shape[0], x:x + t.shape[1]] = t
    return grid


# suite -> teacher config, baseline student config, {method: distillation config}
SUITES = {
    "frcnn": ("faster_rcnn_R34_teacher.yaml", "faster_rcnn_R18_student.yaml", {
        "TAR": "tar_R34_to_R18.yaml",
        "DeFeat": "defeat_R34_to_R18.yaml",
        "Hinton": "hinton_R34_to_R18.yaml",
        "FitNet": "fitnet_R34_to_R18.yaml",
        "HGD": "hgd_R34_to_R18.yaml",
        "TBD": "tbd_R34_to_R18.yaml",
    }),
    "retinanet": ("retinanet_R34_teacher.yaml", "retinanet_R18_student.yaml", {
        "TAR": "tar_retinanet_R34_to_R18.yaml",
        "DeFeat": "defeat_retinanet_R34_to_R18.yaml",
        "Hinton": "hinton_retinanet_R34_to_R18.yaml",
        "FitNet": "fitnet_retinanet_R34_to_R18.yaml",
        "HGD": "hgd_retinanet_R34_to_R18.yaml",
        "TBD": "tbd_retinanet_R34_to_R18.yaml",
    }),
}
# Score threshold of the predictions PNG: focal-loss (RetinaNet) scores run lower than softmax ones.
VIS_THRESH = {"frcnn": 0.5, "retinanet": 0.3}


def export_distilled_student(config, run_dir, teacher_w, opts=()):
    """Export a distillation run's student (kd_* adapters dropped) to ``<run_dir>/student.pth``."""
    from .config import load_cfg
    from .export import export_student

    cfg = load_cfg(config, list(opts) + ["DISTILL.TEACHER.WEIGHTS", teacher_w, "MODEL.DEVICE", "cpu"])
    out = os.path.join(run_dir, "student.pth")
    export_student(cfg, os.path.join(run_dir, "model_final.pth"), out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "output", "demo"))
    p.add_argument("--suite", choices=sorted(SUITES), default="frcnn", help="detector family")
    p.add_argument("--methods", nargs="*", default=["TAR"], help="distillation presets of the suite (none: baseline only)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--student-iters", type=int, default=None, help="default: the student config's SOLVER.MAX_ITER")
    p.add_argument("--teacher-iters", type=int, default=None, help="default: the teacher config's SOLVER.MAX_ITER")
    p.add_argument("--reuse-runs", action="store_true",
                   help="also reuse finished student runs with the same settings (the teacher always is)")
    p.add_argument("--data", default=None, help="a Pascal-VOC folder to run on instead of the synthetic data "
                   "(registered as <data-name>_train/_val: its ImageSets/Main splits, or a seeded 80/20 split)")
    p.add_argument("--coco-train", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None,
                   help="COCO-format data instead of --data: the training json and its image folder "
                        "(registered as <data-name>_train)")
    p.add_argument("--coco-eval", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None,
                   help="with --coco-train: the json evaluated after each run (<data-name>_eval)")
    p.add_argument("--data-name", default="data", help="dataset name prefix for --data / --coco-*")
    p.add_argument("--train-split", default="train", help="--data split to train on (ImageSets/Main/<split>.txt)")
    p.add_argument("--eval-split", default="val", help="--data split to evaluate on (e.g. test, keeping val for "
                   "choosing settings)")
    p.add_argument("--stage", choices=["all", "teacher", "students", "report"], default="all",
                   help="teacher: train only the teacher; students: the students (the teacher must be finished); "
                        "report: only tables and pictures from finished runs")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides for every run (e.g. INPUT sizes)")
    p.add_argument("--jobs", type=int, default=1,
                   help="student runs trained at the same time (a GPU machine fits several small runs)")
    args = p.parse_args(argv)
    teacher_yaml, student_yaml, presets = SUITES[args.suite]
    unknown = [m for m in args.methods if m not in presets]
    if unknown:
        p.error(f"unknown method(s) {unknown} for suite {args.suite}; choose from {sorted(presets)}")
    if (args.coco_train is None) != (args.coco_eval is None):
        p.error("--coco-train and --coco-eval go together (training json + images, evaluation json + images)")
    if args.coco_train and args.data:
        p.error("give either --data (a Pascal-VOC folder) or --coco-train/--coco-eval, not both")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    from detectron2.data import DatasetCatalog

    import distill_d2  # noqa: F401

    data_opts = list(args.opts)
    n = args.data_name
    if args.data:  # a Pascal-VOC folder: <n>_<split> for each of its splits
        from .data.builtin import voc_class_names

        k = len(voc_class_names(args.data))
        tr, ev = f"{n}_{args.train_split}", f"{n}_{args.eval_split}"
        register = ["DATASETS.VOC", str([[n, os.path.abspath(args.data)]]), "TEST.EVALUATOR", "coco+pascal_voc"]
        src, where, title = args.data, f"{args.data} ({ev})", f"{n} {args.eval_split}"
    elif args.coco_train:  # two COCO jsons: <n>_train, <n>_eval
        k = coco_class_count(args.coco_train[0], args.coco_eval[0])
        tr, ev = f"{n}_train", f"{n}_eval"
        specs = [[tr] + [os.path.abspath(x) for x in args.coco_train], [ev] + [os.path.abspath(x) for x in args.coco_eval]]
        register = ["DATASETS.COCO", str(specs), "TEST.EVALUATOR", "coco"]
        src = f"COCO json {args.coco_train[0]}, {args.coco_eval[0]}"
        where, title = f"{args.coco_eval[0]} ({ev})", f"{n} eval"
    else:
        where, title = "Synthetic val (200 images)", "synthetic val"
        t0 = time.time()
        for split in ("synthetic_train", "synthetic_val"):
            DatasetCatalog.get(split)
        print(f"[demo] synthetic dataset ready ({time.time() - t0:.1f} s)", flush=True)
    if args.data or args.coco_train:
        data_opts += register + ["DATASETS.TRAIN", f"('{tr}',)", "DATASETS.TEST", f"('{ev}',)",
                                 "MODEL.ROI_HEADS.NUM_CLASSES", k, "MODEL.RETINANET.NUM_CLASSES", k]
        print(f"[demo] data: {src} ({k} classes): train {tr}, evaluate {ev}", flush=True)
    total = 1 + len(args.seeds) * (1 + len(args.methods))
    progress = {"done": 0, "trained_s": []}
    lock = threading.Lock()

    # students run --jobs at a time, so each gets its share of the cores (the teacher, alone, gets all)
    student_threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def run(config, out_dir, opts, label, cache=True, threads=None):
        """run_train_net + the stage rules + suite progress with ETA (thread-safe, for --jobs)."""
        opts = data_opts + list(opts)
        if args.stage == "report" or (args.stage == "students" and label.startswith("teacher")):
            if not finished_with_config(config, out_dir, opts):
                raise SystemExit(f"[demo] --stage {args.stage}: {label} has no finished run in {out_dir}; "
                                 "run its stage first.")
            cache = True
        t = time.time()
        r = run_train_net(config, out_dir, opts, label, cache, threads)
        with lock:
            progress["done"] += 1
            if os.path.getmtime(os.path.join(out_dir, "results.json")) >= t:  # trained now (not cached)
                progress["trained_s"].append(time.time() - t)
            left = total - progress["done"]
            eta = (f"ETA ~{statistics.mean(progress['trained_s']) * left / max(1, args.jobs) / 60:.0f} min"
                   if progress["trained_s"] else "ETA after the first trained run" if left else "ETA 0 min")
        print(f"[suite] {progress['done']}/{total} runs done, elapsed {time.time() - t_start:.0f} s, {eta}",
              flush=True)
        return r

    def sched(iters):
        if iters is None:
            return []
        return ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", f"({int(iters * 0.75)}, {int(iters * 0.92)})"]

    t_name = teacher_yaml.replace(".yaml", "").replace("_teacher", "")
    s_name = student_yaml.replace(".yaml", "").replace("_student", "")
    teacher_dir = os.path.join(out, f"teacher_{args.suite}")
    t_res, t_speed = run(os.path.join(SYN, teacher_yaml), teacher_dir,
                         sched(args.teacher_iters) + ["SEED", 0], f"teacher {t_name}")
    if args.stage == "teacher":
        return
    teacher_w = os.path.join(teacher_dir, "model_final.pth")
    runs = {f"teacher {t_name}": [dict(t_res, s_iter=t_speed)], f"baseline {s_name}": []}
    runs.update({f"{m} {s_name}": [] for m in args.methods})
    jobs = []  # (row name, method or None, config, run dir, opts, label), seed by seed
    for seed in args.seeds:
        opts = sched(args.student_iters) + ["SEED", seed]
        jobs.append((f"baseline {s_name}", None, os.path.join(SYN, student_yaml),
                     os.path.join(out, f"{args.suite}_baseline_seed{seed}"), opts, f"baseline seed {seed}"))
        for m in args.methods:
            jobs.append((f"{m} {s_name}", m, os.path.join(SYN, presets[m]), os.path.join(out, f"{args.suite}_{m}_seed{seed}"),
                         opts + ["DISTILL.TEACHER.WEIGHTS", teacher_w], f"{m} seed {seed}"))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda j: run(j[2], j[3], j[4], j[5], args.reuse_runs, student_threads), jobs))
    last = {}
    for (row, m, cfg_file, d, _, _), (r, s) in zip(jobs, results):
        runs[row].append(dict(r, s_iter=s))
        last[m or "baseline"] = (export_distilled_student(cfg_file, d, teacher_w, data_opts) if m
                                 else os.path.join(d, "model_final.pth"))

    table = fmt_table(list(runs.items()))
    table += ("\n\nPer-seed AP gain over the baseline of the same seed:\n\n"
              + fmt_seed_gains(list(runs.items()), args.seeds))
    note = (f"{where}, COCO bbox AP, mean ± std over seeds {args.seeds} (teacher: seed 0). "
            f"Same student schedule for the baseline and every method. s/iter: median logged train step time "
            f"on this machine ({os.cpu_count()} CPUs). Date {time.strftime('%Y-%m-%d')}. "
            f"Total {time.time() - t_start:.0f} s.\nCommand: python -m distill_d2.demo "
            + " ".join(argv if argv is not None else sys.argv[1:]))
    print("\n" + table + "\n\n" + note, flush=True)
    with open(os.path.join(out, f"results_{args.suite}.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    with open(os.path.join(out, f"results_{args.suite}.json"), "w") as f:
        json.dump(runs, f, indent=2)
    plot_results(runs, os.path.join(out, f"results_{args.suite}.png"),
                 f"{title}, {args.suite}")
    png = os.path.join(out, f"predictions_{args.suite}.png")
    draw_predictions(os.path.join(SYN, student_yaml), last, png, score_thresh=VIS_THRESH[args.suite], opts=data_opts)
    print(f"[demo] wrote results_{args.suite}.md/.json/.png and predictions_{args.suite}.png in {out}", flush=True)


if __name__ == "__main__":
    main()
