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
(``results_<suite>.md`` / ``.json``: AP, AP50, AP75, APs/m/l, train s/iter, wall
minutes) and ``predictions_<suite>.png`` (one column per model on val images,
distilled students exported to plain checkpoints first). Every run is a
``train_net.py`` subprocess whose log is ``<run>/log.txt`` (its whole console
output, tracebacks included: ``<run>/console.txt``; its wall time:
``<run>/wall_time.json``); progress lines (with ETA) are echoed.

The benchmark protocol (``--baselines``; all three by default on ``--data`` / ``--coco-*``):
besides the same-iteration baseline, a same-compute baseline (as many iterations
as the dearest method's training compute: iterations x its train-step cost / the
baseline's, measured side by side by ``distill_d2.speed`` at the start of the
students stage and cached in ``<out>/step_costs_<suite>.json``) and a long one
(``--long-factor`` x, default 3x, LR steps at the same fractions), plus long
distilled runs of ``--long-methods``. The report gives each method's gain over
every baseline with a 95 % paired-bootstrap interval over the test images
(``distill_d2.bootstrap``, from each run's COCO detections), whether the baseline
has plateaued (1x -> long) and whether each long method's gain holds, the
teacher's margin on ``--heldout-split``, and ``gains_<suite>.png`` / ``.json``.
Runs are trained longest first (``--jobs`` at a time); a method's preset is
``configs/synthetic/<method>_R34_to_R18.yaml`` (``<method>_retinanet_R34_to_R18.yaml``),
so a new preset file joins ``--methods`` by its name.
"""
import argparse
import contextlib
import io
import json
import os
import re
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
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they happen
        if threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        finished = False
        try:
            with open(console, "a") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, argv))}\n")
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                        env=env)
                for line in proc.stdout:
                    log.write(line)
                    if "eta:" in line or "Traceback" in line or "Error" in line or "Overall training speed" in line:
                        print(f"  [{label}] " + line.split("]: ", 1)[-1].strip()[:160], flush=True)
                if proc.wait() != 0:
                    raise RuntimeError(f"{label} failed; see {console} (its whole output; the run's log is "
                                       f"{os.path.join(out_dir, 'log.txt')})")
            finished = True
        finally:  # a resumed run's wall time is the sum of its segments (an interrupted one included)
            record_wall_time(out_dir, t0, time.time(), env.get("OMP_NUM_THREADS"), finished, "--resume" in argv)
        print(f"[demo] {label}: done in {time.time() - t0:.0f} s", flush=True)
    with open(res_file) as f:
        raw = json.load(f)
    results = dict(raw["bbox"])
    if "voc_bbox" in raw:  # TEST.EVALUATOR coco+pascal_voc
        results["VOC_AP50"] = raw["voc_bbox"]["AP50"]
    return results, seconds_per_iter(out_dir)


WALL_FILE = "wall_time.json"


def record_wall_time(out_dir, start, end, threads, finished, resumed):
    """Append one training segment (a train_net.py process: start/end in s since the epoch) to
    ``<out_dir>/wall_time.json``; :func:`wall_seconds` sums them."""
    path = os.path.join(out_dir, WALL_FILE)
    segments = []
    if os.path.isfile(path):
        with open(path) as f:
            segments = json.load(f).get("segments", [])
    if not resumed:
        segments = []  # a fresh start (retrain): earlier segments belong to another run
    segments.append({"start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                     "seconds": round(end - start, 1), "threads": threads, "finished": finished})
    with open(path, "w") as f:
        json.dump({"seconds": round(sum(x["seconds"] for x in segments), 1), "segments": segments}, f, indent=1)


def wall_seconds(out_dir):
    """Wall time (s) the run took: its train_net.py processes from start to exit (training, evaluation,
    start-up), summed over resumed segments (``wall_time.json``, written by :func:`run_train_net`);
    for a run trained before that file existed, detectron2's logged "Total training time" (training
    only, last segment); NaN when neither is there."""
    path = os.path.join(out_dir, WALL_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return float(json.load(f)["seconds"])
    log = os.path.join(out_dir, "log.txt")
    found = re.findall(r"Total training time: (?:(\d+) days?, )?(\d+):(\d\d):(\d\d)",
                       open(log).read()) if os.path.isfile(log) else []
    if not found:
        return float("nan")
    d, h, m, sec = found[-1]
    return float((int(d or 0) * 24 + int(h)) * 3600 + int(m) * 60 + int(sec))


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
    first ``baseline`` row, median train s/iter, and wall minutes per run when the runs have ``wall_s``."""
    metrics = METRICS + (["VOC_AP50"] if all("VOC_AP50" in r for _, runs in rows for r in runs) else [])
    base = [statistics.mean(r["AP"] for r in runs) for name, runs in rows if name.startswith("baseline")]
    wall = any("wall_s" in r for _, runs in rows for r in runs)
    head = ("| model | seeds | " + " | ".join(m.replace("_", " ") for m in metrics) + " | AP gain | train s/iter |"
            + (" wall min |" if wall else ""))
    sep = "|" + "---|" * (len(metrics) + 4 + wall)
    lines = [head, sep]
    for name, runs in rows:
        cells = []
        for m in metrics + ["s_iter"] + (["wall_s"] if wall else []):
            vals = [r.get(m, float("nan")) / (60 if m == "wall_s" else 1) for r in runs]
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


# suite -> teacher config, baseline student config, file name of a method's distillation preset in
# configs/synthetic ("{}" = the method's name in lower case): a new preset named that way joins the
# suite's --methods without any change here.
SUITES = {
    "frcnn": ("faster_rcnn_R34_teacher.yaml", "faster_rcnn_R18_student.yaml", "{}_R34_to_R18.yaml"),
    "retinanet": ("retinanet_R34_teacher.yaml", "retinanet_R18_student.yaml", "{}_retinanet_R34_to_R18.yaml"),
}


def suite_presets(suite):
    """{method name in lower case: preset file name} of every distillation preset of ``suite`` in
    configs/synthetic (the files matching its name pattern; e.g. frcnn: tar_R34_to_R18.yaml -> "tar",
    retinanet: tar_retinanet_R34_to_R18.yaml -> "tar")."""
    prefix, suffix = SUITES[suite][2].split("{}")
    others = [pat.split("{}")[1] for name, (_, _, pat) in SUITES.items() if name != suite]
    found = {}
    for f in sorted(os.listdir(SYN)):
        if f.startswith(prefix) and f.endswith(suffix):
            # a longer pattern of another suite that also ends like this one's (retinanet's ends like frcnn's)
            if any(len(o) > len(suffix) and f.endswith(o) for o in others):
                continue
            found[f[len(prefix):len(f) - len(suffix)]] = f
    return found


def parse_variants(specs):
    """{name: [KEY, VALUE, ...]} from ``--variant NAME KEY VALUE ...`` lists; ValueError on a bad one."""
    out = {}
    for spec in specs:
        name, kv = spec[0], spec[1:]
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--variant name {name!r}: use letters, digits, '-' or '_' (it names run folders)")
        if not kv or len(kv) % 2:
            raise ValueError(f"--variant {name}: give KEY VALUE pairs after the name (got {kv})")
        if name in out:
            raise ValueError(f"--variant {name} given twice")
        out[name] = list(kv)
    return out


def split_variant(method, variants):
    """("TAR", "balance") for "TAR:balance", ("TAR", None) for "TAR"; ValueError for an undeclared variant."""
    base, _, var = method.partition(":")
    if var and var not in variants:
        raise ValueError(f"method {method!r}: no --variant {var} declared (declared: {', '.join(variants) or 'none'})")
    return base, var or None


def preset_path(suite, method):
    """configs/synthetic path of ``method``'s preset in ``suite`` (name matched case-insensitively);
    SystemExit listing the available ones when there is none."""
    presets = suite_presets(suite)
    if method.lower() not in presets:
        raise SystemExit(f"[demo] no preset for method '{method}' in suite {suite} (looked for "
                         f"configs/synthetic/{SUITES[suite][2].format(method.lower())}); available: "
                         f"{', '.join(sorted(presets))}")
    return os.path.join(SYN, presets[method.lower()])


# Score threshold of the predictions PNG: focal-loss (RetinaNet) scores run lower than softmax ones.
VIS_THRESH = {"frcnn": 0.5, "retinanet": 0.3}


def steps_str(steps):
    """SOLVER.STEPS as a config string: ``(450, 550)``, ``(450,)`` or ``()``."""
    steps = [int(x) for x in steps]
    return "(" + ", ".join(map(str, steps)) + ("," if len(steps) == 1 else "") + ")"


def scaled_schedule(iters, steps, n):
    """SOLVER overrides of an ``n``-iteration schedule shaped like the ``iters``-iteration one with LR
    ``steps``: the steps at the same fractions of training (warm-up iterations unchanged; a linear
    distillation-weight decay follows SOLVER.MAX_ITER by itself)."""
    return ["SOLVER.MAX_ITER", n, "SOLVER.STEPS", steps_str(round(x * n / iters) for x in steps)]


STEP_COSTS_FILE = "step_costs_{}.json"


def parse_speed_table(text):
    """{config file name: median s/iter} from the table ``python -m distill_d2.speed`` prints."""
    found = dict(re.findall(r"^\| (\S+\.yaml) \| ([0-9.]+) \|", text, re.M))
    if not found:
        raise RuntimeError(f"could not read distill_d2.speed's table (its format changed?) in:\n{text[-2000:]}")
    return {k: float(v) for k, v in found.items()}


def step_costs(cache, student_cfg, method_cfgs, opts, threads=None, iters=20, warmup=3, measure=True):
    """Train-step cost of each distillation preset relative to the plain student, {method: {"ratio",
    "s_iter", "baseline_s_iter", "config", "date"}}: the median step times of ``distill_d2.speed``
    (interleaved steps of the student and the presets on the same batches, so load on the machine
    hits them alike; a random teacher of the right architecture, whose values do not change the
    cost), ``iters`` timed steps after ``warmup``, with ``threads`` torch threads (a run's share
    of the cores; default: this process's count) and the runs' ``opts``.

    Cached in ``cache`` (json, with the speed table as printed): a method measured before with the
    same preset file, opts and threads is not measured again; missing ones are measured together,
    beside the student. ``measure=False`` (the report stage): SystemExit when one is missing.
    Delete the file to measure everything again."""
    import torch

    from . import speed

    threads = int(threads or torch.get_num_threads())
    key = {"student": os.path.basename(student_cfg), "opts": [str(o) for o in opts], "threads": threads}
    saved = {}
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
    if {k: saved.get(k) for k in key} != key:
        saved = dict(key, methods={}, tables=[])
    missing = [m for m, c in method_cfgs.items() if saved["methods"].get(m, {}).get("config") != os.path.basename(c)]
    if missing:
        if not measure:
            raise SystemExit(f"[demo] the step costs of {missing} are not in {cache} (with these --opts and "
                             f"{threads} thread(s)); run --stage students first, which measures them.")
        print(f"[demo] measuring train-step costs side by side (distill_d2.speed, {iters} steps, {threads} "
              f"thread(s)): {os.path.basename(student_cfg)} + {', '.join(missing)}", flush=True)
        argv = (["--configs", student_cfg] + [method_cfgs[m] for m in missing]
                + ["--iters", str(iters), "--warmup", str(warmup), "--random-teacher", "--opts"]
                + [str(o) for o in opts])
        old, buf = torch.get_num_threads(), io.StringIO()
        torch.set_num_threads(threads)
        try:
            with contextlib.redirect_stdout(buf):
                speed.main(argv)
        finally:
            torch.set_num_threads(old)
        t = parse_speed_table(buf.getvalue())
        base = t[os.path.basename(student_cfg)]
        for m in missing:
            name = os.path.basename(method_cfgs[m])
            saved["methods"][m] = {"config": name, "s_iter": t[name], "baseline_s_iter": base,
                                   "ratio": t[name] / base, "date": time.strftime("%Y-%m-%d %H:%M")}
        saved["tables"].append(buf.getvalue().strip())
        with open(cache, "w") as f:
            json.dump(saved, f, indent=1)
        print("\n".join(ln for ln in buf.getvalue().splitlines() if ln.startswith("|")), flush=True)
    return {m: saved["methods"][m] for m in method_cfgs}


def detections_of(run_dir, dataset):
    """(ground-truth COCO json, detections json) of a run's COCO evaluation on ``dataset`` (what
    detectron2's COCOEvaluator writes to ``<run>/inference/<dataset>/``: coco_instances_results.json,
    and <dataset>_coco_format.json for a dataset it converted; a COCO-json dataset is evaluated against
    its own json), or None when the run has no such detections."""
    d = os.path.join(run_dir, "inference", dataset)
    dt = os.path.join(d, "coco_instances_results.json")
    if not os.path.isfile(dt):
        return None
    gt = os.path.join(d, f"{dataset}_coco_format.json")
    if not os.path.isfile(gt):
        from detectron2.data import MetadataCatalog

        gt = MetadataCatalog.get(dataset).get("json_file", None)
        if not gt or not os.path.isfile(gt):
            return None
    return gt, dt


def run_bootstrap(run_dir, dataset, counts):
    """(full-set AP, list of AP per resample row of ``counts``) of a run's detections on ``dataset``
    (:mod:`distill_d2.bootstrap`), or None without detections. Cached next to the detections in
    bootstrap.json, keyed by the detections file (size, mtime) and the resamples."""
    import hashlib

    import numpy as np

    from .bootstrap import bootstrap_aps, image_evals

    files = detections_of(run_dir, dataset)
    if files is None:
        return None
    gt, dt = files
    st = os.stat(dt)
    key = {"detections": [st.st_size, st.st_mtime_ns],
           "counts": hashlib.sha1(np.ascontiguousarray(counts, dtype=np.int64).tobytes()).hexdigest()}
    cache = os.path.join(os.path.dirname(dt), "bootstrap.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["ap"], saved["aps"]
    ev = image_evals(gt, dt)
    if len(ev.img_ids) != counts.shape[1]:
        raise ValueError(f"{dt}: {len(ev.img_ids)} evaluated images, but the resamples are of {counts.shape[1]}")
    ap, aps = ev.ap(), bootstrap_aps(ev, counts).tolist()
    with open(cache, "w") as f:
        json.dump({"key": key, "ap": ap, "aps": aps}, f)
    return ap, aps


def gain_of(runs_a, runs_b, boots_a, boots_b, counts):
    """AP gain of row A over row B, paired by seed: {"gain", "lo", "hi", ...} from
    :func:`distill_d2.bootstrap.paired_gain` when every run has bootstrap APs, else the mean gain
    from results.json alone ("lo"/"hi" None)."""
    from .bootstrap import paired_gain

    if len(runs_a) != len(runs_b):
        return None
    if counts is not None and all(b is not None for b in list(boots_a) + list(boots_b)):
        return paired_gain(list(boots_a), list(boots_b), counts=counts)
    return {"gain": statistics.mean(a["AP"] - b["AP"] for a, b in zip(runs_a, runs_b)), "lo": None, "hi": None,
            "n_seeds": len(runs_a)}


def fmt_gain(g):
    """``+3.1 [+1.2, +5.0]`` (gain and 95 % interval, AP points); ``n/a`` for None."""
    if g is None:
        return "n/a"
    return f"{g['gain']:+.1f}" + (f" [{g['lo']:+.1f}, {g['hi']:+.1f}]" if g.get("lo") is not None else "")


def fmt_gains(gains, columns):
    """Markdown table: one row per method, one column per comparison. ``gains``: {method: {column
    key: gain dict or None}}; ``columns``: [(column key, header)]."""
    lines = ["| method | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---|" * len(columns)]
    for m, g in gains.items():
        lines.append(f"| {m} | " + " | ".join(fmt_gain(g.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def fmt_wall(rows, seeds):
    """Markdown table of each run's wall time in minutes (rows: (name, runs in ``seeds`` order))."""
    lines = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " | total |", "|---|" + "---|" * (len(seeds) + 1)]
    for name, runs in rows:
        cells = [f"{r.get('wall_s', float('nan')) / 60:.1f}" for r in runs] + [""] * (len(seeds) - len(runs))
        total = sum(r.get("wall_s", float("nan")) for r in runs) / 60
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total:.1f} |")
    return "\n".join(lines)


PLATEAU_AP = 1.0  # the baseline has plateaued when the long schedule adds less than this (AP points)


def protocol_lines(base_gain, long_gains, short_gains, factor):
    """Plain-text verdicts of a suite: has the baseline plateaued (its AP change from the 1x to the
    long schedule, ``base_gain``), and does each long method's gain (``long_gains``: {method: gain of
    its long run over the long baseline}; ``short_gains``: the same method's gain at 1x) hold."""
    f = f"{factor:g}x"
    lines = []
    if base_gain is not None:
        verdict = ("has plateaued" if base_gain["gain"] < PLATEAU_AP else "has not plateaued")
        lines.append(f"- Baseline 1x -> {f}: AP change {fmt_gain(base_gain)}: it {verdict} "
                     f"(threshold {PLATEAU_AP:g} AP).")
    for m, g in long_gains.items():
        if g is None:
            continue
        if g.get("lo") is None:
            verdict = "holds (mean > 0; no interval)" if g["gain"] > 0 else "does not hold (mean <= 0; no interval)"
        elif g["lo"] > 0:
            verdict = "holds (95 % interval above 0)"
        elif g["hi"] < 0:
            verdict = "is reversed (95 % interval below 0)"
        else:
            verdict = "is not shown (95 % interval includes 0)"
        lines.append(f"- {m}: gain {fmt_gain(short_gains.get(m))} at 1x over the 1x baseline, {fmt_gain(g)} "
                     f"at {f} over the {f} baseline: the gain {verdict}.")
    return lines


def plot_gains(gains, columns, out_png, title):
    """Matplotlib PNG of the gains with their 95 % intervals: one line per method, one marker per
    comparison (``gains``/``columns`` as for :func:`fmt_gains`), a vertical line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(gains)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.55 * len(methods) * max(1, len(columns)) ** 0.5))
    for j, (key, header) in enumerate(columns):
        for i, m in enumerate(methods):
            g = gains[m].get(key)
            if g is None:
                continue
            y = i + (j - (len(columns) - 1) / 2) * 0.8 / max(1, len(columns))
            err = None if g.get("lo") is None else [[g["gain"] - g["lo"]], [g["hi"] - g["gain"]]]
            ax.errorbar(g["gain"], y, xerr=err, fmt="o", capsize=3, color=f"C{j}", label=header if i == 0 else None)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("AP gain (COCO AP points), 95 % paired-bootstrap interval over test images")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def evaluate_on(config, run_dir, opts, dataset, label, weights, compute=True, threads=None):
    """COCO AP of a finished run's weights on ``dataset`` (``train_net.py --eval-only`` into
    ``<run>/eval_<dataset>``, reused while newer than the weights); returns (results["bbox"],
    that folder). ``compute=False``: SystemExit when it is not there yet. ``threads``: as for
    :func:`run_train_net` (several evaluations at once on C cores: C / evaluations each; measured:
    two torch threads per evaluation beside other work ran 10x slower than one)."""
    out_dir = os.path.join(run_dir, f"eval_{dataset}")
    res = os.path.join(out_dir, "eval_results.json")
    if not (os.path.isfile(res) and os.path.getmtime(res) >= os.path.getmtime(weights)):
        if not compute:
            raise SystemExit(f"[demo] {label} has no evaluation on {dataset} in {out_dir}; run --stage students.")
        os.makedirs(out_dir, exist_ok=True)
        argv = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config, "--eval-only",
                "OUTPUT_DIR", out_dir] + [str(o) for o in opts] + ["MODEL.WEIGHTS", weights,
                                                                  "DATASETS.TEST", f"('{dataset}',)"]
        print(f"[demo] {label}: evaluating on {dataset}", flush=True)
        env = dict(os.environ)
        if threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(os.path.join(out_dir, "console.txt"), "a") as log:
            if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode != 0:
                raise RuntimeError(f"{label}: evaluation on {dataset} failed; see {out_dir}/console.txt")
    with open(res) as f:
        return json.load(f)["bbox"], out_dir


def row_name(kind, s_name, method=None, schedule="1x", iters=None, factor=3):
    """Table row name: ``baseline faster_rcnn_R18``, ``baseline faster_rcnn_R18 same-compute (390 it)``,
    ``TAR faster_rcnn_R18 3x (900 it)``, ..."""
    head = f"{method if kind == 'method' else kind} {s_name}"
    if schedule == "compute":
        return f"{head} same-compute ({iters} it)"
    if schedule == "long":
        return f"{head} {factor:g}x ({iters} it)"
    return head


def write_report(out, suite, rows, seeds, dataset, title, note, *, factor=3.0, n_resamples=500, boot_seed=0,
                 heldout=None):
    """Tables, verdicts and charts of a finished suite in ``out``: results_<suite>.md/.json/.png and
    gains_<suite>.png/.json; returns the markdown.

    ``rows``: dicts with "name", "kind" (teacher, baseline, method), "method", "schedule" (1x,
    compute, long), "iters", "dirs" (run folder per seed, ``seeds`` order; the teacher: one) and
    "runs" (results["bbox"] + s_iter, wall_s per run). ``dataset``: the evaluated dataset, whose
    per-image detections (<run>/inference/<dataset>/) give each gain its paired-bootstrap 95 %
    interval (``n_resamples`` resamples of the test images, numpy seed ``boot_seed``; 0: means only).
    ``heldout``: (dataset name, {row name: [(results, eval folder) per run]}) for the teacher's margin
    over the baselines on a split that is not the test split."""
    from .bootstrap import resample_counts

    by = {(r["kind"], r["method"], r["schedule"]): r for r in rows}
    teacher = next((r for r in rows if r["kind"] == "teacher"), None)
    methods = [r["method"] for r in rows if r["kind"] == "method" and r["schedule"] == "1x"]
    long_methods = [r["method"] for r in rows if r["kind"] == "method" and r["schedule"] == "long"]
    counts, n_img = None, None
    if n_resamples and dataset:
        first = next((detections_of(d, dataset) for r in rows for d in r["dirs"] if detections_of(d, dataset)), None)
        if first:
            n_img = _n_images(first[0])
            counts = resample_counts(n_img, n_resamples, boot_seed)

    def boots(row, dirs=None, ds=dataset):
        return [run_bootstrap(d, ds, counts) if counts is not None else None for d in (dirs or row["dirs"])]

    for r in rows:
        r["boots"] = boots(r)
        for d, run, b in zip(r["dirs"], r["runs"], r["boots"]):
            if b is not None and abs(b[0] - run["AP"]) > 0.05:  # (NaN in results.json: no detections at all)
                print(f"[demo] WARNING: {d}: AP {b[0]:.2f} from its saved detections but {run['AP']:.2f} in "
                      "results.json (detections of another evaluation?); the intervals use the detections.", flush=True)

    def gain(a, b):
        if a is None or b is None:
            return None
        return gain_of(a["runs"], b["runs"], a["boots"], b["boots"], counts)

    f = f"{factor:g}x"
    base = {s: by.get(("baseline", None, s)) for s in ("1x", "compute", "long")}
    columns = [(s, f"vs {h} baseline ({base[s]['iters']} it)") for s, h in
               (("1x", "same-iteration"), ("compute", "same-compute"), ("long", f)) if base[s] is not None]
    if long_methods:
        columns.append(("long run", f"{f} run vs {f} baseline"))
    gains = {}
    for m in methods:
        gains[m] = {s: gain(by[("method", m, "1x")], base[s]) for s, _ in columns if s != "long run"}
        if m in long_methods:
            gains[m]["long run"] = gain(by[("method", m, "long")], base["long"])
    for m in long_methods:
        if m not in gains:
            gains[m] = {"long run": gain(by[("method", m, "long")], base["long"])}
    base_change = gain(base["long"], base["1x"]) if base["long"] is not None else None
    # a variant (method "M:NAME", --variant) against its method M, same schedule, same seeds
    var_gains = {m: {s: gain(by.get(("method", m, s)), by.get(("method", m.partition(":")[0], s)))
                     for s in ("1x", "long")} for m in dict.fromkeys(methods + long_methods) if ":" in m}
    var_gains = {m: g for m, g in var_gains.items() if any(v is not None for v in g.values())}

    table_rows = [(r["name"], r["runs"]) for r in rows]
    md = [fmt_table(table_rows)]
    one_x = [(r["name"], r["runs"]) for r in rows if r["schedule"] == "1x" and r["kind"] != "teacher"]
    md.append("Per-seed AP gain over the baseline of the same seed:\n\n" + fmt_seed_gains(one_x, seeds))
    if long_methods:
        longs = [(r["name"], r["runs"]) for r in rows if r["schedule"] == "long"]
        md.append(f"Per-seed AP gain of the {f} runs over the {f} baseline of the same seed:\n\n"
                  + fmt_seed_gains(longs, seeds))
    if gains:
        how = (f"95 % paired-bootstrap interval over the {n_img} test images ({n_resamples} resamples, seed "
               f"{boot_seed}; both models on each resample, gains averaged over seeds {seeds})"
               if counts is not None else "no per-image detections, so no intervals")
        md.append(f"AP gain of each method over each baseline (mean over seeds; {how}):\n\n"
                  + fmt_gains(gains, columns))
    if var_gains:
        cols = [(s, f"{h} vs its method {h}") for s, h in (("1x", "1x"), ("long", f))
                if any(g[s] is not None for g in var_gains.values())]
        md.append("AP gain of each variant over its method (same schedule and seeds; paired as above):\n\n"
                  + fmt_gains(var_gains, cols).replace("| method |", "| variant |", 1))
    verdicts = protocol_lines(base_change, {m: gains[m].get("long run") for m in long_methods},
                              {m: gains[m].get("1x") for m in long_methods}, factor)
    if verdicts:
        md.append(f"Does the gain last ({suite}):\n\n" + "\n".join(verdicts))
    if heldout:
        md += heldout_lines(heldout, teacher, rows, seeds, n_resamples, boot_seed)
    md.append("Wall time of each run (minutes, from the start of its train_net.py to its exit, resumed segments "
              "summed):\n\n" + fmt_wall(table_rows, seeds))
    text = "\n\n".join(md) + "\n\n" + note
    with open(os.path.join(out, f"results_{suite}.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out, f"results_{suite}.json"), "w") as fh:
        json.dump({r["name"]: r["runs"] for r in rows}, fh, indent=2)
    with open(os.path.join(out, f"gains_{suite}.json"), "w") as fh:
        json.dump({"columns": columns, "gains": gains, "variants": var_gains, "baseline_1x_to_long": base_change,
                   "n_images": n_img,
                   "n_resamples": n_resamples if counts is not None else 0, "seed": boot_seed, "seeds": seeds},
                  fh, indent=2)
    plot_results({r["name"]: r["runs"] for r in rows}, os.path.join(out, f"results_{suite}.png"), f"{title}, {suite}")
    if gains:
        plot_gains(gains, columns, os.path.join(out, f"gains_{suite}.png"),
                   f"{title}, {suite}: AP gain over the baselines")
    for r in rows:
        r.pop("boots", None)
    return text


def _n_images(gt_json):
    with open(gt_json) as f:
        return len(json.load(f)["images"])


def heldout_lines(heldout, teacher, rows, seeds, n_resamples, boot_seed):
    """Report paragraph: the teacher's AP margin over each baseline row on the held-out split
    ``heldout`` = (dataset, {row name: [(results, eval folder) per run]}), with a bootstrap interval
    over that split's images (the one teacher run paired with each baseline seed)."""
    from .bootstrap import resample_counts

    ds, evals = heldout
    t = evals.get(teacher["name"]) if teacher else None
    if not t:
        return []
    counts = None
    files = detections_of(t[0][1], ds)
    if n_resamples and files:
        counts = resample_counts(_n_images(files[0]), n_resamples, boot_seed)
    boot = (lambda d: run_bootstrap(d, ds, counts)) if counts is not None else (lambda d: None)
    t_res, t_boot = t[0][0], boot(t[0][1])
    lines = []
    for r in rows:
        if r["kind"] != "baseline" or r["name"] not in evals:
            continue
        res = [x for x, _ in evals[r["name"]]]
        g = gain_of([t_res] * len(res), res, [t_boot] * len(res), [boot(d) for _, d in evals[r["name"]]], counts)
        aps = [x["AP"] for x in res]
        lines.append(f"- teacher {t_res['AP']:.1f} AP vs {r['name']} {statistics.mean(aps):.1f}"
                     f"{f' ± {statistics.stdev(aps):.1f}' if len(aps) > 1 else ''}: margin {fmt_gain(g)} "
                     f"({'>=' if g['gain'] >= 3 else '<'} 3 AP)")
    return [f"Teacher margin on the held-out split {ds} (not the test split; COCO AP; baseline seeds {seeds}):\n\n"
            + "\n".join(lines)] if lines else []


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
    p.add_argument("--baselines", nargs="+", choices=["iter", "compute", "long"], default=None,
                   help="baseline students to train (iter, the same iterations as the methods, always is); compute = as many "
                        "iterations as the dearest method's training compute (its measured step cost / the "
                        "baseline's, see --cost-iters); long = --long-factor x the iterations. Default: all three "
                        "with --data / --coco-*, iter alone on the synthetic data (make demo)")
    p.add_argument("--long-methods", nargs="*", default=[],
                   help="methods also distilled on the long schedule (--long-factor x), compared with the long "
                        "baseline")
    p.add_argument("--long-factor", type=float, default=3.0, help="length of the long schedule (x the student's)")
    p.add_argument("--cost-iters", type=int, default=20,
                   help="timed steps of the side-by-side step-cost measurement (distill_d2.speed, at the start of "
                        "the students stage, cached in <out>/step_costs_<suite>.json)")
    p.add_argument("--compute-ratio", type=float, default=None,
                   help="use this step-cost ratio (dearest method / baseline) instead of measuring it")
    p.add_argument("--bootstrap", type=int, default=500,
                   help="resamples of the test images for the gains' 95 %% intervals (0: no intervals)")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--heldout-split", default=None,
                   help="with --data: a split that is not --eval-split (e.g. val) on which the teacher and the "
                        "baselines are also evaluated: the teacher's margin, for choosing settings without the "
                        "test split")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY VALUE"),
                   help="a named set of overrides, trained as method 'M:NAME' (e.g. --variant balance "
                        "DISTILL.BALANCE.ENABLED True --methods FitNet FitNet:balance); the report adds each "
                        "variant's gain over its method. Repeatable")
    args = p.parse_args(argv)
    teacher_yaml, student_yaml, _ = SUITES[args.suite]
    try:
        variants = parse_variants(args.variant)
        methods = dict.fromkeys(args.methods + args.long_methods)
        presets = {m: preset_path(args.suite, split_variant(m, variants)[0]) for m in methods}
    except ValueError as e:
        p.error(str(e))
    baselines = list(args.baselines or (["iter", "compute", "long"] if args.data or args.coco_train else ["iter"]))
    if args.long_methods and "long" not in baselines:
        baselines.append("long")  # a long method is compared with the long baseline
    if args.heldout_split and (not args.data or args.heldout_split == args.eval_split):
        p.error("--heldout-split needs --data and a split other than --eval-split (e.g. --eval-split test "
                "--heldout-split val)")
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
    progress = {"done": 0, "trained_s": 0.0, "trained_units": 0.0, "units_left": 0.0}
    lock = threading.Lock()
    total = 1  # runs of the suite: the teacher, then the student runs once they are planned

    # students run --jobs at a time, so each gets its share of the cores (the teacher, alone, gets all)
    student_threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def run(config, out_dir, opts, label, cache=True, threads=None, units=0.0):
        """run_train_net + the stage rules + suite progress with ETA (thread-safe, for --jobs). ``units``:
        the run's estimated cost (baseline-student iterations) for the ETA."""
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
            progress["units_left"] -= units
            if os.path.getmtime(os.path.join(out_dir, "results.json")) >= t and units:  # trained now (not cached)
                progress["trained_s"] += time.time() - t
                progress["trained_units"] += units
            left = total - progress["done"]
            per_unit = progress["trained_s"] / progress["trained_units"] if progress["trained_units"] else None
            eta = (f"ETA ~{per_unit * progress['units_left'] / max(1, args.jobs) / 60:.0f} min" if per_unit
                   else "ETA after the first trained run" if left else "ETA 0 min")
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
    teacher_cfg = os.path.join(SYN, teacher_yaml)
    t_res, t_speed = run(teacher_cfg, teacher_dir, sched(args.teacher_iters) + ["SEED", 0], f"teacher {t_name}")
    if args.stage == "teacher":
        return
    teacher_w = os.path.join(teacher_dir, "model_final.pth")
    student_cfg = os.path.join(SYN, student_yaml)

    # the student schedule (1x) and the longer ones, shaped like it; the evaluated dataset
    from .config import load_cfg

    c = load_cfg(student_cfg, data_opts + sched(args.student_iters))
    iters, steps = c.SOLVER.MAX_ITER, tuple(c.SOLVER.STEPS)
    ev_name = c.DATASETS.TEST[0] if c.DATASETS.TEST else None
    costs, compute_note = {}, ""
    if "compute" in baselines and args.methods:
        if args.compute_ratio:
            costs = {m: {"ratio": args.compute_ratio} for m in args.methods}
            compute_note = f"{args.compute_ratio:g} (the step-cost ratio given with --compute-ratio)"
        else:
            cache = os.path.join(out, STEP_COSTS_FILE.format(args.suite))
            base = {m: split_variant(m, variants)[0] for m in presets}  # a variant costs what its method does
            costs = step_costs(cache, student_cfg, {b: presets[m] for m, b in base.items()}, data_opts,
                               student_threads, args.cost_iters, measure=args.stage != "report")
            costs = {m: costs[b] for m, b in base.items()}
    compute_iters = iters
    if "compute" in baselines and costs:
        dearest = max(args.methods, key=lambda m: costs[m]["ratio"])
        compute_iters = max(iters, round(iters * costs[dearest]["ratio"]))
        compute_note = compute_note or (
            f"{costs[dearest]['ratio']:.2f} ({dearest}'s median train step over the baseline's, measured side by side "
            f"by distill_d2.speed, {costs[dearest]['date']}, {args.cost_iters} steps, {student_threads or 'all'} "
            f"thread(s): {STEP_COSTS_FILE.format(args.suite)})")
        compute_note = f"same-compute baseline: {iters} x {compute_note} = {compute_iters} iterations"
    long_iters = round(iters * args.long_factor)

    jobs = {}  # run dir -> (config, opts, label, estimated cost in baseline student iterations), unique

    def add_row(kind, method, schedule, n):
        config = presets[method] if method else student_cfg
        name = row_name(kind, s_name, method, schedule, n, args.long_factor)
        dirs = []
        extra = variants[split_variant(method, variants)[1]] if method and ":" in method else []
        for seed in args.seeds:
            tag = method.replace(":", "-") if method else "baseline"
            if n == iters:  # the 1x schedule (the same-compute baseline may fall on it, or on the long one)
                d, opts = os.path.join(out, f"{args.suite}_{tag}_seed{seed}"), sched(args.student_iters)
            else:
                d, opts = os.path.join(out, f"{args.suite}_{tag}_{n}it_seed{seed}"), scaled_schedule(iters, steps, n)
            opts = opts + ["SEED", seed] + (["DISTILL.TEACHER.WEIGHTS", teacher_w] if method else []) + extra
            jobs.setdefault(d, (config, opts, f"{tag}{'' if n == iters else f' {n} it'} seed {seed}",
                                n * costs.get(method, {}).get("ratio", 1.3 if method else 1.0)))
            dirs.append(d)
        return {"name": name, "kind": kind, "method": method, "schedule": schedule, "iters": n, "config": config,
                "dirs": dirs}

    rows = [{"name": f"teacher {t_name}", "kind": "teacher", "method": None, "schedule": "teacher",
             "iters": args.teacher_iters, "config": teacher_cfg, "dirs": [teacher_dir]}]
    rows.append(add_row("baseline", None, "1x", iters))
    if "compute" in baselines:
        rows.append(add_row("baseline", None, "compute", compute_iters))
    if "long" in baselines:
        rows.append(add_row("baseline", None, "long", long_iters))
    rows += [add_row("method", m, "1x", iters) for m in args.methods]
    rows += [add_row("method", m, "long", long_iters) for m in args.long_methods]
    # longest first (they set the suite's end when run --jobs at a time), in seed order among equals
    order = sorted(jobs, key=lambda d: -jobs[d][3])
    total = 1 + len(order)
    progress["units_left"] = sum(j[3] for j in jobs.values())
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = dict(zip(order, pool.map(lambda d: run(jobs[d][0], d, jobs[d][1], jobs[d][2], args.reuse_runs,
                                                      student_threads, jobs[d][3]), order)))
    rows[0]["runs"] = [dict(t_res, s_iter=t_speed, wall_s=wall_seconds(teacher_dir), iters=args.teacher_iters)]
    for r in rows[1:]:
        r["runs"] = [dict(done[d][0], s_iter=done[d][1], wall_s=wall_seconds(d), iters=r["iters"]) for d in r["dirs"]]

    heldout = None
    if args.heldout_split:
        ds = f"{args.data_name}_{args.heldout_split}"
        evals = {d: r for r in rows if r["kind"] in ("teacher", "baseline") for d in r["dirs"]}  # (no teacher needed)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # --jobs at a time, as the students
            res = dict(zip(evals, pool.map(lambda d: evaluate_on(
                evals[d]["config"], d, data_opts, ds, f"{evals[d]['name']} ({os.path.basename(d)})",
                os.path.join(d, "model_final.pth"), args.stage != "report", student_threads), evals)))
        heldout = (ds, {r["name"]: [res[d] for d in r["dirs"]] for r in rows if r["kind"] in ("teacher", "baseline")})

    last = {}
    for r in rows:
        if r["schedule"] == "1x":  # the predictions PNG: the last seed's same-iteration runs
            d = r["dirs"][-1]
            last[r["method"] or "baseline"] = (export_distilled_student(r["config"], d, teacher_w, data_opts)
                                               if r["method"] else os.path.join(d, "model_final.pth"))
    protocol = (f"Baselines: same-iteration ({iters} it)"
                + (f", {compute_note}" if "compute" in baselines else "")
                + (f", {args.long_factor:g}x ({long_iters} it, LR steps at the same fractions)"
                   if "long" in baselines else "")
                + (f"; distilled {args.long_factor:g}x runs: {', '.join(args.long_methods)}"
                   if args.long_methods else "")
                + ". ")
    note = (f"{where}, COCO bbox AP, mean ± std over seeds {args.seeds} (teacher: seed 0). {protocol}"
            f"s/iter: median logged train step time on this machine ({os.cpu_count()} CPUs); wall: minutes per "
            f"run ({args.jobs} at a time). Date {time.strftime('%Y-%m-%d')}. "
            f"Total {time.time() - t_start:.0f} s.\nCommand: python -m distill_d2.demo "
            + " ".join(argv if argv is not None else sys.argv[1:]))
    text = write_report(out, args.suite, rows, args.seeds, ev_name, title, note, factor=args.long_factor,
                        n_resamples=args.bootstrap, boot_seed=args.bootstrap_seed, heldout=heldout)
    print("\n" + text, flush=True)
    png = os.path.join(out, f"predictions_{args.suite}.png")
    draw_predictions(student_cfg, last, png, score_thresh=VIS_THRESH[args.suite], opts=data_opts)
    print(f"[demo] wrote results_{args.suite}.md/.json/.png, gains_{args.suite}.png/.json and "
          f"predictions_{args.suite}.png in {out}", flush=True)


if __name__ == "__main__":
    main()
