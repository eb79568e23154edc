"""The demo's building blocks: a cached train_net run, timing, the results table."""
import json
import math
import os
import re

import pytest

from conftest import SYN, TINY_OPTS
from distill_d2.demo import (draw_predictions, finished_with_config, fmt_seed_gains, fmt_table, plot_results,
                             run_train_net, seconds_per_iter, tile_grid)


def test_seconds_per_iter_skips_first_window(tmp_path):
    with open(tmp_path / "metrics.json", "w") as f:
        for it, t in ((19, 9.0), (39, 1.0), (59, 2.0), (79, 3.0)):
            f.write(json.dumps({"iteration": it, "time": t}) + "\n")
        f.write(json.dumps({"iteration": 79, "bbox/AP": 1.0}) + "\n")
    assert seconds_per_iter(str(tmp_path)) == 2.0


def test_table_has_mean_and_std_over_seeds():
    runs = [dict(AP=10.0, AP50=20, AP75=5, APs=1, APm=2, APl=3, s_iter=0.5),
            dict(AP=12.0, AP50=22, AP75=7, APs=1, APm=2, APl=3, s_iter=0.7)]
    table = fmt_table([("baseline", runs)])
    assert "| baseline | 2 | 11.0 ± 1.4 | 21.0 ± 1.4 |" in table
    assert "0.600 ± 0.141 |" in table


def test_seed_gains_pair_each_seed_with_its_baseline():
    def r(ap, voc):
        return dict(AP=ap, AP50=0, AP75=0, APs=0, APm=0, APl=0, VOC_AP50=voc, s_iter=1.0)

    rows = [("teacher R34", [r(60.0, 90.0)]), ("baseline R18", [r(40.0, 80.0), r(50.0, 84.0)]),
            ("TAR R18", [r(45.0, 83.0), r(51.0, 86.0)])]
    table = fmt_seed_gains(rows, [3, 7])
    assert table.splitlines()[0] == "| method | gain seed 3 | gain seed 7 | mean gain | VOC AP50 gain |"
    assert table.splitlines()[2] == "| TAR | +5.0 | +1.0 | +3.0 | +2.5 |" and len(table.splitlines()) == 3


def test_plot_results_writes_a_png(tmp_path):
    r = dict(AP=10.0, AP50=20, AP75=5, APs=1, APm=2, APl=3, s_iter=0.5)
    plot_results({"teacher": [r], "baseline": [r, dict(r, AP=12.0)]}, str(tmp_path / "p.png"), "t")
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_train_net_trains_then_reuses(tmp_path, datasets_dir, monkeypatch):
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "3"]
    out = str(tmp_path / "run")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    res, s_iter = run_train_net(os.path.join(SYN, "faster_rcnn_R18_student.yaml"), out, opts, "tiny", threads=1)
    assert set(res) >= {"AP", "AP50", "APl"} and os.path.isfile(os.path.join(out, "log.txt"))
    log = open(os.path.join(out, "log.txt")).read()
    assert "torch CPU threads: 1" in log  # its share of the cores, not all
    # log.txt has one writer (train_net.py's logger): each line once, in the file format, no colour codes;
    # the demo's capture of the whole console output (tracebacks included) is console.txt
    records = [ln for ln in log.splitlines() if ln.startswith("[")]
    assert len(records) > 20 and len(set(records)) == len(records)
    assert all(re.match(r"\[\d\d/\d\d \d\d:\d\d:\d\d\] \S+ [A-Z]+: ", ln) for ln in records), records[:3]
    assert log.count("Starting training from iteration 0") == 1 and "\x1b[" not in log
    console = open(os.path.join(out, "console.txt")).read()
    assert "Command Line Args:" in console and "\x1b[" not in console
    mtime = os.path.getmtime(os.path.join(out, "model_final.pth"))
    res2, _ = run_train_net(os.path.join(SYN, "faster_rcnn_R18_student.yaml"), out, opts, "tiny")
    assert res2 == res and os.path.getmtime(os.path.join(out, "model_final.pth")) == mtime
    # the cache key is the merged config, so any changed setting (here in the opts) invalidates it
    cfg_file = os.path.join(SYN, "faster_rcnn_R18_student.yaml")
    assert finished_with_config(cfg_file, out, opts)
    assert not finished_with_config(cfg_file, out, opts + ["SOLVER.BASE_LR", "0.5"])
    assert not finished_with_config(os.path.join(SYN, "faster_rcnn_R34_teacher.yaml"), out, opts)


def test_speed_side_by_side(capsys):
    from distill_d2.speed import main

    main(["--configs", os.path.join(SYN, "faster_rcnn_R18_student.yaml"), os.path.join(SYN, "tar_R34_to_R18.yaml"),
          "--iters", "2", "--warmup", "1", "--random-teacher", "--opts"] + TINY_OPTS)
    out = capsys.readouterr().out
    assert "| faster_rcnn_R18_student.yaml |" in out and "| 1.00 |" in out
    assert "| tar_R34_to_R18.yaml |" in out


def test_speed_mask_builders(capsys):
    from distill_d2.speed import time_masks

    rows = time_masks(images=1, boxes_per_image=3, size=(64, 96), reps=1)
    assert [r[0] for r in rows] == ["gaussian", "box", "defeat", "backbone"] and all(t > 0 for _, t in rows)
    assert "| gaussian |" in capsys.readouterr().out


def test_interrupted_run_is_resumed_from_its_checkpoint(tmp_path, datasets_dir):
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
    out = tmp_path / "run"
    cfg = os.path.join(SYN, "faster_rcnn_R18_student.yaml")
    run_train_net(cfg, str(out), opts, "tiny")
    # simulate a crash after the iteration-2 checkpoint: no final model, no results
    for f in ("model_final.pth", "results.json"):
        (out / f).unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    res, _ = run_train_net(cfg, str(out), opts, "tiny", cache=False)
    log = (out / "log.txt").read_text()
    assert "Resuming the data stream at batch 2" in log and (out / "model_final.pth").is_file() and "AP" in res


def test_benchmark_on_a_voc_folder_by_stage(tmp_path, datasets_dir):
    from distill_d2.demo import main
    from test_own_data import _image

    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for i in range(8):
        _image(voc / "JPEGImages" / f"i{i}.jpg", i)
        (voc / "Annotations" / f"i{i}.xml").write_text(
            f"<annotation><filename>i{i}.jpg</filename><size><width>128</width><height>96</height><depth>3</depth>"
            "</size><object><name>cell</name><pose>U</pose><truncated>0</truncated><difficult>0</difficult>"
            "<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>70</ymax></bndbox></object></annotation>")
    out = tmp_path / "bench"
    opts = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
            "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", "2",
            "SOLVER.STEPS", "()"]
    # the whole protocol (the default on a VOC folder): same-iteration, same-compute and 3x baselines, and
    # Hinton also at 3x; the step-cost ratio given (3: the same-compute baseline is the 3x one, trained once)
    # and a variant of Hinton (its preset + overrides, as method Hinton:t4), compared with Hinton
    common = ["--out", str(out), "--data", str(voc), "--data-name", "tinyvoc", "--methods", "Hinton", "Hinton:t4",
              "--seeds", "0", "--variant", "t4", "DISTILL.CLS.TEMPERATURE", "4.0", "--long-methods", "Hinton",
              "--compute-ratio", "3", "--bootstrap", "50", "--opts"] + opts
    main(["--stage", "teacher"] + common)
    assert (out / "teacher_frcnn" / "model_final.pth").is_file() and not (out / "frcnn_baseline_seed0").exists()
    with pytest.raises(SystemExit, match="--stage report: Hinton 6 it seed 0 has no finished run"):
        main(["--stage", "report"] + common)  # (the longest run is checked, and trained, first)
    main(common)
    assert sorted(p.name for p in out.glob("frcnn_*")) == ["frcnn_Hinton-t4_seed0", "frcnn_Hinton_6it_seed0",
                                                           "frcnn_Hinton_seed0", "frcnn_baseline_6it_seed0",
                                                           "frcnn_baseline_seed0"]
    assert "TEMPERATURE: 4.0" in (out / "frcnn_Hinton-t4_seed0" / "config.yaml").read_text()
    assert "TEMPERATURE: 2.0" in (out / "frcnn_Hinton_seed0" / "config.yaml").read_text()
    assert "MAX_ITER: 6" in (out / "frcnn_baseline_6it_seed0" / "config.yaml").read_text()
    table = (out / "results_frcnn.md").read_text()
    assert "| Hinton faster_rcnn_R18 |" in table and "tinyvoc_val" in table
    for row in ("baseline faster_rcnn_R18 same-compute (6 it)", "baseline faster_rcnn_R18 3x (6 it)",
                "Hinton faster_rcnn_R18 3x (6 it)"):
        assert f"| {row} | 1 |" in table, row
    assert "same-compute baseline: 2 x 3 (the step-cost ratio given with --compute-ratio) = 6 iterations" in table
    # gains over the three baselines with 95 % intervals (detections of each run's COCO evaluation), verdicts
    assert re.search(r"\| Hinton \| [+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] \|", table), table
    assert "- Baseline 1x -> 3x: AP change" in table and "- Hinton: gain" in table
    gains = json.loads((out / "gains_frcnn.json").read_text())
    assert gains["n_resamples"] == 50 and set(gains["gains"]["Hinton"]) == {"1x", "compute", "long", "long run"}
    v = gains["variants"]["Hinton:t4"]
    assert v["long"] is None and v["1x"]["gain"] == pytest.approx(
        gains["gains"]["Hinton:t4"]["1x"]["gain"] - gains["gains"]["Hinton"]["1x"]["gain"], abs=1e-6)
    assert "AP gain of each variant over its method" in table and "| Hinton:t4 | " in table
    wall = json.loads((out / "frcnn_baseline_6it_seed0" / "wall_time.json").read_text())
    assert wall["seconds"] > 0 and wall["segments"][0]["finished"]
    for png in ("predictions_frcnn.png", "gains_frcnn.png"):
        assert (out / png).stat().st_size > 0


def test_benchmark_on_coco_jsons(tmp_path, datasets_dir):
    from distill_d2.demo import main
    from test_own_data import coco_json

    cats = [{"id": 3, "name": "cell"}, {"id": 7, "name": "dot"}]
    tr = coco_json(tmp_path / "train.json", tmp_path / "img", 6, cats)
    ev = coco_json(tmp_path / "val.json", tmp_path / "img", 3, cats)
    out = tmp_path / "bench"
    opts = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
            "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", "2",
            "SOLVER.STEPS", "()"]
    common = ["--out", str(out), "--data-name", "tinycoco", "--methods", "--seeds", "0", "--baselines", "iter",
              "--opts"] + opts
    main(["--coco-train", tr, str(tmp_path / "img"), "--coco-eval", ev, str(tmp_path / "img")] + common)
    cfg = (out / "frcnn_baseline_seed0" / "config.yaml").read_text()
    assert "tinycoco_train" in cfg and "NUM_CLASSES: 2" in cfg
    table = (out / "results_frcnn.md").read_text()
    assert "| baseline faster_rcnn_R18 |" in table and "val.json (tinycoco_eval)" in table

    # the evaluation json must list the same categories; the two options go together
    other = coco_json(tmp_path / "other.json", tmp_path / "img", 2, [{"id": 3, "name": "cell"}, {"id": 8, "name": "dot"}])
    with pytest.raises(SystemExit, match="different categories"):
        main(["--coco-train", tr, str(tmp_path / "img"), "--coco-eval", other, str(tmp_path / "img")] + common)
    with pytest.raises(SystemExit):
        main(["--coco-train", tr, str(tmp_path / "img")] + common)


def test_tile_grid_centres_tiles_of_mixed_sizes():
    import numpy as np

    a, b, c = (np.full((h, w, 3), v, np.uint8) for h, w, v in ((4, 6, 10), (6, 2, 20), (2, 2, 30)))
    grid = tile_grid([[a, b], [c, a]])
    assert grid.shape == (12, 12, 3)  # cells of the largest height (6) and width (6)
    assert (grid[1:5, 0:6] == 10).all() and (grid[0] == 0).all()  # a, centred vertically in its cell
    assert (grid[6:12, 2:4] == 20).all() and (grid[6:12, 0:2] == 0).all()  # b, centred horizontally
    assert (grid[2:4, 8:10] == 30).all() and (grid[7:11, 6:12] == 10).all()


def test_draw_predictions_on_images_of_mixed_sizes(tmp_path, make_ckpt):
    """Portrait, landscape and small images (.png and .jpg): one column per model, rows aligned."""
    import cv2
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "demo_mixed_sizes_val"
    dicts = []
    for i, (w, h, ext) in enumerate(((96, 128, "png"), (128, 96, "jpg"), (60, 40, "png"))):
        img = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = str(tmp_path / f"IMG_{i}.{ext}")
        cv2.imwrite(path, img)
        dicts.append({"file_name": path, "image_id": i, "height": h, "width": w, "annotations": []})
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=[f"c{k}" for k in range(6)])
    ckpt = make_ckpt("faster_rcnn_R18_student.yaml")
    out = str(tmp_path / "pred.png")
    draw_predictions(os.path.join(SYN, "faster_rcnn_R18_student.yaml"), {"baseline": ckpt, "TAR": ckpt}, out,
                     n_images=3, score_thresh=0.0, opts=TINY_OPTS + ["DATASETS.TEST", f"('{name}',)"])
    # tiles: 192x256, 256x192, 120x80 (x2, at most 512 px) -> cells of 256 x 256, 3 rows x 2 columns
    assert cv2.imread(out).shape == (3 * 256, 2 * 256, 3)


# ------------------------------------------------ the benchmark protocol: baselines, costs, intervals, report

def test_methods_map_to_presets_by_file_name():
    from distill_d2.demo import preset_path, suite_presets

    fr, rn = suite_presets("frcnn"), suite_presets("retinanet")
    assert fr["tar"] == "tar_R34_to_R18.yaml" and rn["tar"] == "tar_retinanet_R34_to_R18.yaml"
    # naive: every R34 -> R18 preset file belongs to exactly one suite (the cross-family ones to none)
    named = {f for f in os.listdir(SYN) if f.endswith("_R34_to_R18.yaml")}
    assert set(fr.values()) | set(rn.values()) == named and not set(fr.values()) & set(rn.values())
    assert preset_path("frcnn", "DeFeat") == os.path.join(SYN, "defeat_R34_to_R18.yaml")
    with pytest.raises(SystemExit, match=r"no preset for method 'Nope' in suite retinanet .*available: .*tar"):
        preset_path("retinanet", "Nope")


def test_scaled_schedule_keeps_the_lr_steps_at_the_same_fractions():
    from distill_d2.demo import scaled_schedule

    assert scaled_schedule(300, (225, 276), 900) == ["SOLVER.MAX_ITER", 900, "SOLVER.STEPS", "(675, 828)"]
    assert scaled_schedule(600, (450,), 1000)[3] == "(750,)" and scaled_schedule(2, (), 6)[3] == "()"


def test_wall_time_sums_resumed_segments(tmp_path):
    from distill_d2.demo import record_wall_time, wall_seconds

    d = str(tmp_path)
    record_wall_time(d, 100.0, 160.0, "1", False, resumed=False)  # interrupted
    record_wall_time(d, 200.0, 230.5, "1", True, resumed=True)
    assert wall_seconds(d) == 90.5
    record_wall_time(d, 300.0, 310.0, None, True, resumed=False)  # retrained from scratch
    assert wall_seconds(d) == 10.0
    (tmp_path / "old").mkdir()  # a run from before wall_time.json: detectron2's logged training time
    (tmp_path / "old" / "log.txt").write_text("[12/01 10:00:00] d2 INFO: Total training time: 0:02:40 (0:00:09 on hooks)\n")
    assert wall_seconds(str(tmp_path / "old")) == 160.0
    assert math.isnan(wall_seconds(str(tmp_path / "none")))


def test_step_costs_measured_side_by_side_then_cached(tmp_path, datasets_dir):
    from distill_d2.demo import parse_speed_table, step_costs

    cache = str(tmp_path / "step_costs_frcnn.json")
    student, hinton = os.path.join(SYN, "faster_rcnn_R18_student.yaml"), os.path.join(SYN, "hinton_R34_to_R18.yaml")
    costs = step_costs(cache, student, {"Hinton": hinton}, TINY_OPTS, threads=1, iters=2, warmup=1)
    c = costs["Hinton"]
    assert c["config"] == "hinton_R34_to_R18.yaml" and c["ratio"] == pytest.approx(c["s_iter"] / c["baseline_s_iter"])
    saved = json.loads(open(cache).read())
    assert saved["threads"] == 1 and saved["student"] == "faster_rcnn_R18_student.yaml"
    assert parse_speed_table(saved["tables"][0]) == {"faster_rcnn_R18_student.yaml": c["baseline_s_iter"],
                                                     "hinton_R34_to_R18.yaml": c["s_iter"]}
    # cached: the same answer, nothing measured (measure=False stops when it would have to measure)
    assert step_costs(cache, student, {"Hinton": hinton}, TINY_OPTS, threads=1, measure=False) == costs
    with pytest.raises(SystemExit, match=r"step costs of \['Hinton'\] are not in .*2 thread\(s\)"):
        step_costs(cache, student, {"Hinton": hinton}, TINY_OPTS, threads=2, measure=False)
    with pytest.raises(RuntimeError, match="could not read distill_d2.speed's table"):
        parse_speed_table("no table here")


def _ap_missing(k, n=40):
    """By hand: COCO AP (%) of n one-box images found exactly (one class), k of them missed: precision 1
    up to recall (n - k) / n, then nothing, so the recall thresholds 0, 0.01, ... up to it count."""
    return 100 * (int(100 * (n - k) / n + 1e-9) + 1) / 101


def _fake_run(run_dir, dataset, missed, n=40):
    """A run folder with the files the report reads: COCO detections of ``dataset`` as detectron2's
    COCOEvaluator writes them (n one-box images; every box found exactly except on ``missed``)."""
    gt = {"images": [{"id": i, "width": 200, "height": 200} for i in range(n)],
          "categories": [{"id": 1, "name": "defect"}],
          "annotations": [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [20, 30, 60, 50], "area": 3000,
                           "iscrowd": 0} for i in range(n)]}
    dets = [{"image_id": i, "category_id": 1, "bbox": [20, 30, 60, 50], "score": 0.9} for i in range(n) if i not in missed]
    d = run_dir / "inference" / dataset
    d.mkdir(parents=True)
    (d / f"{dataset}_coco_format.json").write_text(json.dumps(gt))
    (d / "coco_instances_results.json").write_text(json.dumps(dets))
    return dict(AP=_ap_missing(len(missed), n), AP50=0.0, AP75=0.0, APs=0.0, APm=0.0, APl=0.0, s_iter=1.0, wall_s=60.0)


def test_variants_are_parsed_and_checked():
    from distill_d2.demo import main, parse_variants, split_variant

    v = parse_variants([["balance", "DISTILL.BALANCE.ENABLED", "True"], ["w2", "A", "1", "B", "2"]])
    assert v == {"balance": ["DISTILL.BALANCE.ENABLED", "True"], "w2": ["A", "1", "B", "2"]}
    assert split_variant("TAR:balance", v) == ("TAR", "balance") and split_variant("TAR", v) == ("TAR", None)
    for bad, msg in (([["odd", "A"]], "KEY VALUE pairs"), ([["x"]], "KEY VALUE pairs"),
                     ([["a/b", "A", "1"]], "letters, digits"), ([["d", "A", "1"], ["d", "B", "2"]], "twice")):
        with pytest.raises(ValueError, match=msg):
            parse_variants(bad)
    with pytest.raises(ValueError, match="no --variant bal declared"):
        split_variant("TAR:bal", v)
    with pytest.raises(SystemExit):  # an undeclared variant stops the benchmark before anything runs
        main(["--methods", "TAR:nope", "--out", "/nonexistent/never"])


def test_report_gains_over_three_baselines_with_intervals_and_verdicts(tmp_path):
    """Fake finished runs, 2 seeds, 40 test images with known APs: gains, 95 % intervals (excluding 0 for a
    real gain, including it for a method as good as the baseline), plateau and 'gain holds' lines, held-out
    teacher margin, wall times, charts."""
    from distill_d2.demo import write_report

    ds, seeds = "fake_test", [0, 1]

    def row(name, kind, method, schedule, iters, misses):  # misses: the missed image ids per seed
        dirs = [tmp_path / f"{name.replace(' ', '_')}_seed{s}" for s in seeds[:len(misses)]]
        runs = [_fake_run(d, ds, m) for d, m in zip(dirs, misses)]
        return {"name": name, "kind": kind, "method": method, "schedule": schedule, "iters": iters,
                "dirs": [str(d) for d in dirs], "runs": runs}

    rows = [row("teacher R34", "teacher", None, "teacher", 900, [()]),
            row("baseline R18", "baseline", None, "1x", 300, [range(20), range(20, 40)]),
            row("baseline R18 same-compute (420 it)", "baseline", None, "compute", 420, [range(16), range(24, 40)]),
            row("baseline R18 3x (900 it)", "baseline", None, "long", 900, [range(16), range(24, 40)]),
            row("TAR R18", "method", "TAR", "1x", 300, [range(8), range(32, 40)]),
            row("HGD R18", "method", "HGD", "1x", 300, [range(10, 30), range(5, 25)]),
            row("TAR R18 3x (900 it)", "method", "TAR", "long", 900, [range(4), range(36, 40)]),
            row("HGD R18 3x (900 it)", "method", "HGD", "long", 900, [range(10, 26), range(12, 28)])]
    held = tmp_path / "held"
    t_eval, b_eval = held / "teacher", [held / "b0", held / "b1"]
    heldout = ("fake_val", {"teacher R34": [(_fake_run(t_eval, "fake_val", ()), str(t_eval))],
                            "baseline R18 3x (900 it)": [(_fake_run(d, "fake_val", range(16)), str(d)) for d in b_eval]})
    text = write_report(str(tmp_path), "frcnn", rows, seeds, ds, "fake", "the note", n_resamples=200, heldout=heldout)

    g = json.loads((tmp_path / "gains_frcnn.json").read_text())
    tar, hgd = g["gains"]["TAR"], g["gains"]["HGD"]
    assert tar["1x"]["gain"] == pytest.approx(_ap_missing(8) - _ap_missing(20))  # +29.7
    assert tar["compute"]["gain"] == pytest.approx(_ap_missing(8) - _ap_missing(16))
    assert tar["long run"]["gain"] == pytest.approx(_ap_missing(4) - _ap_missing(16))
    assert 0 < tar["1x"]["lo"] < tar["1x"]["gain"] < tar["1x"]["hi"]
    assert hgd["1x"]["gain"] == pytest.approx(0) and hgd["1x"]["lo"] < 0 < hgd["1x"]["hi"]
    assert g["n_images"] == 40 and g["n_resamples"] == 200
    assert f"| TAR | {tar['1x']['gain']:+.1f} [{tar['1x']['lo']:+.1f}, {tar['1x']['hi']:+.1f}] |" in text
    base_change = _ap_missing(16) - _ap_missing(20)  # +9.9: the baseline still improves at 3x
    assert f"- Baseline 1x -> 3x: AP change {base_change:+.1f} [" in text and "it has not plateaued" in text
    assert re.search(r"- TAR: gain \+29\.7 \[.*\] at 1x .*, \+29\.7 \[.*\] at 3x over the 3x baseline: the gain holds "
                     r"\(95 % interval above 0\)", text), text
    assert "- HGD: gain +0.0 [" in text and "the gain is not shown (95 % interval includes 0)" in text
    margin = 100 - _ap_missing(16)
    assert f"- teacher 100.0 AP vs baseline R18 3x (900 it) {_ap_missing(16):.1f} ± 0.0: margin {margin:+.1f} [" in text
    assert "(>= 3 AP)" in text
    assert "| TAR R18 | 1.0 | 1.0 | 2.0 |" in text and "| teacher R34 | 1.0 |  | 1.0 |" in text  # wall minutes
    for png in ("gains_frcnn.png", "results_frcnn.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results_frcnn.md").read_text() == text + "\n"
    # the per-run bootstrap APs are cached next to the detections; a second report reads them
    assert (tmp_path / "TAR_R18_seed0" / "inference" / ds / "bootstrap.json").is_file()
    assert write_report(str(tmp_path), "frcnn", rows, seeds, ds, "fake", "the note", n_resamples=200,
                        heldout=heldout) == text
