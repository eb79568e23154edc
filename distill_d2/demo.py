"""The end-to-end demo (``make demo``): teacher, baseline student and TAR student.

    python -m distill_d2.demo                      # default: output/demo
    python -m distill_d2.demo --seeds 0 1 --out output/bench   # several seeds

Steps: generate the synthetic dataset; train the R50 teacher (cached: skipped
when ``<out>/teacher`` already holds a finished run of the same settings);
train the R18 baseline student and the TAR student on the same schedule,
once per seed; evaluate; print and write a table (``results.md``,
``results.json``) and ``predictions.png`` (baseline vs TAR on val images).
Every run is a ``train_net.py`` subprocess whose log is ``<run>/log.txt``.
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = os.path.join(REPO, "configs", "synthetic")
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def run_train_net(config, out_dir, opts, label):
    """Run train_net.py (cached by a stamp of its arguments); returns results dict + s/iter."""
    argv = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config,
            "OUTPUT_DIR", out_dir] + [str(o) for o in opts]
    stamp = hashlib.sha1(json.dumps([os.path.relpath(config, REPO), opts]).encode()).hexdigest()
    stamp_file = os.path.join(out_dir, "demo_stamp.txt")
    res_file = os.path.join(out_dir, "results.json")
    if os.path.isfile(res_file) and os.path.isfile(stamp_file) and open(stamp_file).read() == stamp:
        print(f"[demo] {label}: cached in {out_dir} (delete it to retrain)", flush=True)
    else:
        os.makedirs(out_dir, exist_ok=True)
        print(f"[demo] {label}: training ({' '.join(map(str, opts))})", flush=True)
        t0 = time.time()
        with open(os.path.join(out_dir, "log.txt"), "w") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
            for line in proc.stdout:
                log.write(line)
                if "eta:" in line or "Traceback" in line or "Error" in line or "Overall training speed" in line:
                    print(f"  [{label}] " + line.split("]: ", 1)[-1].strip()[:160], flush=True)
            if proc.wait() != 0:
                raise RuntimeError(f"{label} failed; see {os.path.join(out_dir, 'log.txt')}")
        with open(stamp_file, "w") as f:
            f.write(stamp)
        print(f"[demo] {label}: done in {time.time() - t0:.0f} s", flush=True)
    with open(res_file) as f:
        results = json.load(f)["bbox"]
    return results, seconds_per_iter(out_dir)


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
    head = "| model | seeds | " + " | ".join(METRICS) + " | train s/iter |"
    sep = "|" + "---|" * (len(METRICS) + 3)
    lines = [head, sep]
    for name, runs in rows:
        cells = []
        for m in METRICS + ["s_iter"]:
            vals = [r[m] for r in runs]
            mean = statistics.mean(vals)
            sd = f" ± {statistics.stdev(vals):.{3 if m == 's_iter' else 1}f}" if len(vals) > 1 else ""
            cells.append(f"{mean:.{3 if m == 's_iter' else 1}f}{sd}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_predictions(cfg_file, weights_by_name, out_png, n_images=3, score_thresh=0.5):
    """Side-by-side PNG of predictions (one column per model) on the first val images."""
    import cv2
    import numpy as np
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.visualizer import Visualizer

    from .engine import setup_cfg

    cfg = setup_cfg(argparse.Namespace(config_file=cfg_file, opts=["MODEL.DEVICE", "cpu"]))
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
            vis = Visualizer(img[:, :, ::-1], meta, scale=2.0).draw_instance_predictions(inst).get_image()
            cv2.putText(vis, label, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
            tiles.append(vis)
        columns.append(np.concatenate(tiles, axis=0))
    cv2.imwrite(out_png, np.concatenate(columns, axis=1)[:, :, ::-1])


def export_tar_student(run_dir, teacher_w):
    """Export the TAR run's student (kd_* adapters dropped) to ``<run_dir>/student.pth``."""
    from .engine import setup_cfg
    from .export import export_student

    cfg = setup_cfg(argparse.Namespace(config_file=os.path.join(SYN, "tar_R50_to_R18.yaml"),
                                       opts=["DISTILL.TEACHER.WEIGHTS", teacher_w, "MODEL.DEVICE", "cpu"]))
    out = os.path.join(run_dir, "student.pth")
    export_student(cfg, os.path.join(run_dir, "model_final.pth"), out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "output", "demo"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--student-iters", type=int, default=None, help="default: the student config's SOLVER.MAX_ITER")
    p.add_argument("--teacher-iters", type=int, default=None, help="default: the teacher config's SOLVER.MAX_ITER")
    p.add_argument("--skip-distill", action="store_true", help="teacher and baseline student only")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    from detectron2.data import DatasetCatalog

    import distill_d2  # noqa: F401

    t0 = time.time()
    for split in ("synthetic_train", "synthetic_val"):
        DatasetCatalog.get(split)
    print(f"[demo] synthetic dataset ready ({time.time() - t0:.1f} s)", flush=True)

    def sched(iters):
        if iters is None:
            return []
        return ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", f"({int(iters * 0.75)}, {int(iters * 0.92)})"]

    teacher_cfg = os.path.join(SYN, "faster_rcnn_R50_teacher.yaml")
    teacher_dir = os.path.join(out, "teacher")
    t_res, t_speed = run_train_net(teacher_cfg, teacher_dir, sched(args.teacher_iters) + ["SEED", 0], "teacher R50")
    rows = [("teacher R50-FPN", [dict(t_res, s_iter=t_speed)])]
    teacher_w = os.path.join(teacher_dir, "model_final.pth")

    base_runs, tar_runs, last = [], [], {}
    for seed in args.seeds:
        opts = sched(args.student_iters) + ["SEED", seed]
        d = os.path.join(out, f"student_seed{seed}")
        r, s = run_train_net(os.path.join(SYN, "faster_rcnn_R18_student.yaml"), d, opts, f"baseline R18 seed {seed}")
        base_runs.append(dict(r, s_iter=s))
        last["baseline R18"] = os.path.join(d, "model_final.pth")
        if not args.skip_distill:
            d = os.path.join(out, f"tar_seed{seed}")
            r, s = run_train_net(os.path.join(SYN, "tar_R50_to_R18.yaml"), d,
                                 opts + ["DISTILL.TEACHER.WEIGHTS", teacher_w], f"TAR R18 seed {seed}")
            tar_runs.append(dict(r, s_iter=s))
            last["TAR R18"] = export_tar_student(d, teacher_w)
    rows.append(("baseline student R18-FPN", base_runs))
    if tar_runs:
        rows.append(("TAR student R18-FPN", tar_runs))

    table = fmt_table(rows)
    note = (f"Synthetic val (200 images), COCO bbox AP. Seeds {args.seeds}; same student schedule for baseline "
            f"and TAR. s/iter: median logged train step time on this machine "
            f"({os.cpu_count()} CPUs). Date {time.strftime('%Y-%m-%d')}. Total {time.time() - t_start:.0f} s.")
    print("\n" + table + "\n\n" + note, flush=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({name: runs for name, runs in rows}, f, indent=2)
    png = os.path.join(out, "predictions.png")
    draw_predictions(os.path.join(SYN, "faster_rcnn_R18_student.yaml"), last, png)
    print(f"[demo] wrote {os.path.join(out, 'results.md')} and {png}", flush=True)


if __name__ == "__main__":
    main()
