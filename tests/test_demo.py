"""The demo's building blocks: a cached train_net run, timing, the results table."""
import json
import os
import re

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
    import pytest

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
    common = ["--out", str(out), "--data", str(voc), "--data-name", "tinyvoc", "--methods", "Hinton", "--seeds", "0",
              "--opts"] + opts
    main(["--stage", "teacher"] + common)
    assert (out / "teacher_frcnn" / "model_final.pth").is_file() and not (out / "frcnn_baseline_seed0").exists()
    with pytest.raises(SystemExit, match="--stage report: baseline seed 0 has no finished run"):
        main(["--stage", "report"] + common)
    main(common)
    table = (out / "results_frcnn.md").read_text()
    assert "| Hinton faster_rcnn_R18 |" in table and "tinyvoc_val" in table
    assert (out / "predictions_frcnn.png").stat().st_size > 0


def test_benchmark_on_coco_jsons(tmp_path, datasets_dir):
    import pytest

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
    common = ["--out", str(out), "--data-name", "tinycoco", "--methods", "--seeds", "0", "--opts"] + opts
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
