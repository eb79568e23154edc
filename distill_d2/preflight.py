"""Pre-flight report of a distillation config: what would go wrong in a long run, found in minutes on CPU.

    python -m distill_d2.preflight --config-file configs/synthetic/mgd_retinanet_R34_to_R18.yaml \\
        --out output/preflight [--steps 6] [--val-images 16] [KEY VALUE ...]

Checks, in order (each section of ``preflight.md``; a red flag makes the exit status 2):

1. **build**: the config loads, the distiller builds and its teacher fits (class count, strides, anchors,
   box coders, channels: the build-time errors a training run would raise, with their messages), and the
   training loader passes the run's data checks (``DATALOADER.CHECK``: class count against the data,
   unreadable images, bad boxes);
2. **teacher checkpoint**: missing, unexpected and wrongly-shaped keys of ``DISTILL.TEACHER.WEIGHTS``
   against the teacher's config (red: any missing or wrongly-shaped key; the rest of the report then
   runs with ``DISTILL.TEACHER.STRICT_LOAD False`` so it shows what such a run would do);
3. **teacher AP** on the first ``--val-images`` images of ``DATASETS.TEST[0]`` (its own test-time
   settings; red below ``--min-teacher-ap``: a random or wrong-data teacher distils noise);
4. **loss scale**: ``--steps`` training steps (real SGD steps of the student, lambda = 1, balancing
   factors 1) measuring each KD term's raw value and gradient L2 norm on the reference parameters of
   ``DISTILL.BALANCE`` (:func:`distill_d2.balance.measure`), its share of the summed gradient norms
   (detection included), its ratio to the detection losses' gradient norm and the factor
   ``DISTILL.BALANCE`` would choose from these samples (:func:`distill_d2.balance.choose_factors`).
   With balancing off: red when a term's median ratio is > 100 or < 0.01, yellow outside [0.1, 10];
   red on a non-finite loss;
5. **cost**: the distillation train step against the plain student's, side by side on the same batches
   (:func:`distill_d2.speed.time_interleaved`), and peak memory (CUDA: max allocated; CPU: the process's
   peak resident set, both models and the data included).

Writes ``preflight.md``, ``preflight.json`` and ``preflight_grad_shares.png`` (bar chart of the shares)
into ``--out``. ``python -m distill_d2.preflight summary DIR ...`` prints one table of several reports.
"""
import argparse
import copy
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
import traceback

import torch

logger = logging.getLogger(__name__)

RED, YELLOW, OK = "red", "yellow", "ok"


class Report:
    """Sections of the report (markdown lines) and its flags [(level, text)]."""

    def __init__(self, config_file):
        self.config_file = config_file
        self.sections = []
        self.flags = []
        self.data = {}

    def section(self, title, lines):
        self.sections.append((title, list(lines)))

    def flag(self, level, text):
        self.flags.append((level, text))
        (logger.error if level == RED else logger.warning)("preflight %s flag: %s", level, text)

    @property
    def red(self):
        return [t for lvl, t in self.flags if lvl == RED]

    def markdown(self):
        verdict = ("**RED**: do not start the long run before fixing the red flags" if self.red else
                   "**yellow**: look at the flags" if self.flags else "**ok**: nothing found")
        lines = [f"# Pre-flight: `{self.config_file}`", "", f"{time.strftime('%Y-%m-%d %H:%M')}, torch "
                 f"{torch.__version__}, {torch.get_num_threads()} CPU threads. Verdict: {verdict}.", ""]
        if self.flags:
            lines += ["| flag | what |", "|---|---|"] + [f"| {lvl} | {t} |" for lvl, t in self.flags] + [""]
        for title, body in self.sections:
            lines += [f"## {title}", ""] + body + [""]
        return "\n".join(lines)


# ------------------------------------------------------------------ teacher
def teacher_key_report(cfg):
    """(teacher cfg, {"weights", "missing", "unexpected", "shapes"}) of ``DISTILL.TEACHER.WEIGHTS`` loaded
    into the teacher built from its config (never raises on a mismatch)."""
    from detectron2.modeling import build_model

    from .teacher import get_teacher_cfg, load_teacher_weights

    tcfg = get_teacher_cfg(cfg)
    model = build_model(tcfg)
    inc = load_teacher_weights(model, tcfg.MODEL.WEIGHTS, strict=False)
    return tcfg, {"weights": tcfg.MODEL.WEIGHTS, "missing": list(inc.missing_keys),
                  "unexpected": list(inc.unexpected_keys),
                  "shapes": [(k, tuple(a), tuple(b)) for k, a, b in inc.incorrect_shapes]}


def subset_dataset(name, n):
    """Register (once) and return the name of a dataset holding the first ``n`` images of ``name``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    sub = f"{name}__preflight{n}"
    if sub not in DatasetCatalog.list():
        DatasetCatalog.register(sub, lambda: copy.deepcopy(DatasetCatalog.get(name)[:n]))
        meta = {k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k not in ("name", "json_file")}
        MetadataCatalog.get(sub).set(**meta)
    return sub


@torch.no_grad()
def teacher_ap(teacher, tcfg, dataset, n, out_dir):
    """{"AP", "AP50" (COCO box, %), "note"} of ``teacher`` on the first ``n`` images of ``dataset`` (0 and a
    note when it detects nothing); through :func:`distill_d2.teacher.evaluate_teacher`, as TeacherEvalHook."""
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator

    from .teacher import evaluate_teacher

    sub = subset_dataset(dataset, n)
    res = evaluate_teacher(teacher, tcfg, [sub], build_test_loader=build_detection_test_loader,
                           build_evaluator=lambda name: COCOEvaluator(
                               name, tasks=("bbox",), output_dir=os.path.join(out_dir, "teacher_eval")))[sub]
    box = res.get("bbox") or {}
    if not box or not math.isfinite(box.get("AP", float("nan"))):  # COCOEvaluator's "no predictions": NaNs
        return {"AP": 0.0, "AP50": 0.0, "note": "no detections above the teacher's score threshold"}
    return {"AP": float(box["AP"]), "AP50": float(box["AP50"]), "note": ""}


# ------------------------------------------------------------------ loss scale
def measure_steps(model, optimizer, batches, mode="grad", params=None):
    """Run a training step on each of ``batches`` (det + KD losses summed, lambda 1, balancing factors 1)
    and return one sample per step: {"measure": balance.measure's dict, "values": {unit: raw loss},
    "det_values": {loss_*: value}}. Must run inside an EventStorage."""
    from .balance import measure

    samples = []
    for batch in batches:
        det, units, _ = model.training_losses(batch)
        m = measure(model, det, units, mode=mode, params=params)
        total = sum(det.values()) + sum(units.values())
        samples.append({"measure": m, "values": {k: float(v.detach()) for k, v in units.items()},
                        "det_values": {k: float(v.detach()) for k, v in det.items()}})
        if not torch.isfinite(total):
            break  # (the flag is raised from the recorded values)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return samples


def scale_table(samples, chosen):
    """Rows {term, value, grad, share, ratio, factor, note} (medians over ``samples``) and the detection row."""
    terms = list(chosen)
    med = lambda key, k: statistics.median(s[key][k] for s in samples)  # noqa: E731
    det_g = statistics.median(s["measure"]["det"] for s in samples)
    det_v = statistics.median(sum(s["det_values"].values()) for s in samples)
    grads = {k: med("measure", k) for k in terms}
    total = det_g + sum(grads.values())
    rows = [{"term": "detection losses", "value": det_v, "grad": det_g, "share": det_g / total if total else 0.0,
             "ratio": 1.0, "factor": None, "note": ""}]
    for k in terms:
        rows.append({"term": k, "value": med("values", k), "grad": grads[k],
                     "share": grads[k] / total if total else 0.0, "ratio": chosen[k]["ratio"],
                     "factor": chosen[k]["factor"], "note": chosen[k]["note"]})
    return rows


def scale_flags(rows, balancing):
    """[(level, text)] for the loss-scale rows: non-finite (red); with balancing off, ratio > 100 or < 0.01
    red, outside [0.1, 10] yellow; a term with no gradient at all on the reference parameters yellow."""
    out = []
    for r in rows[1:]:
        k, ratio = r["term"], r["ratio"]
        if not (math.isfinite(r["value"]) and math.isfinite(r["grad"])):
            out.append((RED, f"term {k} is not finite (value {r['value']}, gradient norm {r['grad']}): check the "
                             "teacher weights and the term's inputs"))
        elif r["grad"] == 0:
            out.append((YELLOW, f"term {k} sends no gradient to the reference parameters (DISTILL.BALANCE.PARAMS, "
                                "default the FPN output convs): it trains other parameters only, or nothing"))
        elif balancing:
            continue
        elif ratio > 100 or ratio < 0.01:
            out.append((RED, f"term {k}'s gradient is {ratio:.3g} x the detection losses' at the start: "
                             f"{'it will swamp detection' if ratio > 1 else 'it will do nothing'}; scale its "
                             f"weight by ~{r['factor']:.3g} (the factor balancing picks) or set "
                             "DISTILL.BALANCE.ENABLED True"))
        elif ratio > 10 or ratio < 0.1:
            out.append((YELLOW, f"term {k}'s gradient is {ratio:.3g} x the detection losses' at the start "
                                f"(balancing would scale its weight by {r['factor']:.3g})"))
    return out


def plot_shares(rows, path, title):
    """Horizontal bar chart of each row's share of the summed gradient norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["term"] for r in rows][::-1]
    shares = [100 * r["share"] for r in rows][::-1]
    colors = ["#888888" if n == "detection losses" else "#3b75af" for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    ax.barh(names, shares, color=colors)
    for y, s in enumerate(shares):
        ax.text(s, y, f" {s:.1f}%", va="center", fontsize=8)
    ax.set_xlabel("share of the summed gradient norms on the reference parameters (%)")
    ax.set_xlim(0, max(shares + [1]) * 1.2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x, spec=".4g"):
    return "" if x is None else format(x, spec)


# ------------------------------------------------------------------ main
def run(config_file, opts, out, steps=6, val_images=16, min_teacher_ap=5.0, time_steps=3):
    """Build the report (see the module docstring); returns it (``Report``) after writing the files."""
    os.makedirs(out, exist_ok=True)
    rep = Report(config_file)
    try:
        _run(rep, config_file, opts, out, steps, val_images, min_teacher_ap, time_steps)
    except Exception as e:  # a failure the run itself would hit: the report says where
        rep.flag(RED, f"{type(e).__name__}: {e}")
        rep.section("Traceback", ["```", traceback.format_exc().rstrip(), "```"])
    with open(os.path.join(out, "preflight.md"), "w") as f:
        f.write(rep.markdown())
    with open(os.path.join(out, "preflight.json"), "w") as f:
        json.dump({"config_file": config_file, "opts": list(opts), "flags": rep.flags, **rep.data}, f, indent=2,
                  default=str)
    return rep


def _run(rep, config_file, opts, out, steps, val_images, min_teacher_ap, time_steps):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from .balance import choose_factors, reference_params
    from .config import load_cfg, is_distiller_arch
    from .engine import Trainer
    from .export import student_cfg_from
    from .speed import time_interleaved, train_step

    opts = ["MODEL.DEVICE", "cpu"] + list(opts)
    cfg = load_cfg(config_file, opts)
    if not is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
        raise ValueError(f"{config_file} is not a distillation config (MODEL.META_ARCHITECTURE "
                         f"{cfg.MODEL.META_ARCHITECTURE}): the pre-flight checks a teacher/student pair.")

    # teacher checkpoint
    tcfg, keys = teacher_key_report(cfg)
    rep.data["teacher_keys"] = keys
    lines = [f"Weights `{keys['weights']}` into the teacher of `{cfg.DISTILL.TEACHER.CONFIG_FILE}`:", "",
             f"- missing keys ({len(keys['missing'])}): {', '.join(keys['missing'][:30]) or 'none'}",
             f"- unexpected keys ({len(keys['unexpected'])}): {', '.join(keys['unexpected'][:30]) or 'none'}",
             "- wrong shapes ({}): {}".format(len(keys["shapes"]), ", ".join(
                 f"{k} (checkpoint {a} vs model {b})" for k, a, b in keys["shapes"][:30]) or "none")]
    rep.section("Teacher checkpoint", lines)
    if keys["missing"] or keys["shapes"]:
        rep.flag(RED, f"the teacher checkpoint does not fit its config: {len(keys['missing'])} missing, "
                      f"{len(keys['shapes'])} wrongly-shaped keys (listed under 'Teacher checkpoint'); those "
                      "parameters would stay random. Check DISTILL.TEACHER.WEIGHTS / CONFIG_FILE")
    elif keys["unexpected"]:
        rep.flag(YELLOW, f"the teacher checkpoint has {len(keys['unexpected'])} keys its model does not use")
    if cfg.DISTILL.TEACHER.STRICT_LOAD and (keys["missing"] or keys["shapes"] or keys["unexpected"]):
        cfg = load_cfg(config_file, opts + ["DISTILL.TEACHER.STRICT_LOAD", "False"])  # report what such a run does

    # build: every build-time check of a training run (class count, strides, anchors, channels)
    torch.manual_seed(0)
    model = build_model(cfg)
    teacher = model.setup_teacher()
    rep.section("Build", ["The distiller built; its teacher passed the class, padding and per-term checks.", ""]
                + [f"- {line}" for line in model.describe_terms()])

    # teacher AP on a val subset
    if val_images > 0 and cfg.DATASETS.TEST:
        ds = cfg.DATASETS.TEST[0]
        ap = teacher_ap(teacher, tcfg, ds, val_images, out)
        rep.data["teacher_ap"] = {"dataset": ds, "images": val_images, **ap}
        rep.section("Teacher AP", [f"COCO box AP {ap['AP']:.1f}, AP50 {ap['AP50']:.1f} on the first {val_images} "
                                   f"images of `{ds}` (the teacher's test-time settings)"
                                   + (f": {ap['note']}." if ap["note"] else ".")])
        if not ap["AP"] >= min_teacher_ap:
            rep.flag(RED, f"the teacher's AP on the first {val_images} images of {ds} is {ap['AP']:.1f} < "
                          f"--min-teacher-ap {min_teacher_ap:g}: a random, unfinished or other-data teacher "
                          "distils noise. Train or fix the teacher first (or lower --min-teacher-ap if it is "
                          "known to be this weak)")

    # loss scale over a few real steps
    b = cfg.DISTILL.BALANCE
    params = reference_params(model, tuple(b.PARAMS))
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    data = iter(Trainer.build_train_loader(cfg))  # the training run's loader: its data checks, class count included
    with EventStorage():
        samples = measure_steps(model, optimizer, (next(data) for _ in range(steps)), mode=b.MODE, params=params)
    terms = list(samples[0]["values"])
    bad = [k for s in samples for k, v in s["values"].items() if not math.isfinite(v)]
    bad += [k for s in samples for k, v in s["det_values"].items() if not math.isfinite(v)]
    if bad:
        rep.flag(RED, f"non-finite losses in the first {len(samples)} steps: {sorted(set(bad))}")
        rep.data["samples"] = samples
        return
    chosen = choose_factors([s["measure"] for s in samples], terms, b.TARGET, b.MIN_FACTOR, b.MAX_FACTOR, b.FLOOR)
    rows = scale_table(samples, chosen)
    rep.data.update(samples=samples, scale=rows)
    unit = "gradient norm" if b.MODE == "grad" else "loss value (mode loss)"
    lines = [f"{len(samples)} training steps (student SGD steps, lambda 1, factors 1), medians; {unit} on "
             f"{len(params)} reference tensors ({params[0][0]}, ...). Share: of the summed norms. Factor: what "
             f"DISTILL.BALANCE (target {b.TARGET:g}, unit {b.UNIT}) would multiply the term's weight by.", "",
             "| term | raw value | gradient norm | share | x detection | balance factor | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['term']} | {_fmt(r['value'])} | {_fmt(r['grad'])} | {100 * r['share']:.1f}% | "
                     f"{_fmt(r['ratio'], '.3g')} | {_fmt(r['factor'])} | {r['note']} |")
    lines += ["", "Detection losses (medians): " + ", ".join(
        f"{k} {statistics.median(s['det_values'][k] for s in samples):.4g}" for k in samples[0]["det_values"]),
        "", "![gradient shares](preflight_grad_shares.png)"]
    rep.section("Loss scale", lines)
    for lvl, text in scale_flags(rows, b.ENABLED):
        rep.flag(lvl, text)
    plot_shares(rows, os.path.join(out, "preflight_grad_shares.png"),
                f"{os.path.basename(config_file)}: gradient shares at the start")

    # cost: distillation step vs the plain student's, side by side
    if time_steps < 1:
        return
    scfg = student_cfg_from(cfg)
    torch.manual_seed(0)
    student = build_model(scfg)
    student.train()
    s_opt = Trainer.build_optimizer(scfg, student)
    cuda = cfg.MODEL.DEVICE.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with EventStorage():
        times = time_interleaved([("student", train_step(student, s_opt)), ("distill", train_step(model, optimizer))],
                                 (next(data) for _ in range(1 + time_steps)), warmup=1)
    t_s, t_d = statistics.median(times["student"]), statistics.median(times["distill"])
    if cuda:
        peak = f"{torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB CUDA (max allocated)"
    else:
        peak = (f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (peak resident set of this "
                "process: both models, the optimizer and the data)")
    rep.data["cost"] = {"student_s": t_s, "distill_s": t_d, "ratio": t_d / t_s, "peak_memory": peak}
    rep.section("Cost", [f"Train step, median of {time_steps} side by side (same batches, "
                         f"{torch.get_num_threads()} threads): student {t_s:.3f} s, distillation {t_d:.3f} s, "
                         f"**ratio {t_d / t_s:.2f}** (a same-compute baseline trains {t_d / t_s:.2f}x the "
                         "iterations).", "", f"Peak memory: {peak}."])


def summary_table(dirs):
    """Markdown table, one row per pre-flight folder in ``dirs`` (their preflight.json): config, each term's
    ratio to the detection gradient and share, the factor balancing would choose, the flags."""
    lines = ["| config | term | raw value | x detection (gradient) | share | balance factor | step cost | flags |",
             "|---|---|---|---|---|---|---|---|"]
    for d in dirs:
        with open(os.path.join(d, "preflight.json")) as f:
            data = json.load(f)
        flags = "; ".join(f"{lvl}: {t.split(':')[0]}" for lvl, t in data["flags"]) or "none"
        name = f"`{os.path.basename(data['config_file'])}`"
        cost = f"{data['cost']['ratio']:.2f}x" if "cost" in data else ""
        for r in data.get("scale", [])[1:] or [{"term": "(no loss-scale rows)"}]:
            lines.append(f"| {name} | {r['term']} | {_fmt(r.get('value'), '.3g')} | {_fmt(r.get('ratio'), '.3g')} | "
                         f"{100 * r['share']:.0f}% | {_fmt(r.get('factor'), '.3g')} | {cost} | {flags} |"
                         if "share" in r else f"| {name} | {r['term']} | | | | | {cost} | {flags} |")
            name, flags, cost = "", "", ""
    return "\n".join(lines)


def parse_args(argv=None):
    from .cli import add_override_arguments, parse_args as parse_cli

    p = argparse.ArgumentParser(prog="python -m distill_d2.preflight", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a distillation config")
    p.add_argument("--out", default="output/preflight", help="folder for preflight.md/.json/_grad_shares.png")
    p.add_argument("--steps", type=int, default=6, help="training steps measured (default 6)")
    p.add_argument("--val-images", type=int, default=16,
                   help="images of DATASETS.TEST[0] the teacher is evaluated on (0: skip; default 16)")
    p.add_argument("--min-teacher-ap", type=float, default=5.0, help="teacher AP below this is a red flag")
    p.add_argument("--time-steps", type=int, default=3, help="side-by-side timed steps (0: skip; default 3)")
    add_override_arguments(p)
    args = parse_cli(p, argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv=None):
    """Exit status: 0 (ok / yellow), 2 (a red flag). ``summary DIR ...``: print the table of finished reports."""
    from detectron2.utils.logger import setup_logger

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["summary"]:
        print(summary_table(argv[1:]))
        return 0
    args = parse_args(argv)
    setup_logger(name="distill_d2")
    setup_logger(name="detectron2")
    rep = run(args.config_file, args.opts, args.out, args.steps, args.val_images, args.min_teacher_ap,
              args.time_steps)
    print(rep.markdown())
    print(f"[preflight] wrote {os.path.join(args.out, 'preflight.md')}")
    if rep.red:
        print("[preflight] RED: " + " | ".join(rep.red), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
