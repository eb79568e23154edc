"""The dataset check before training (distill_d2/data/checks.py) and file names in loading errors."""
import json
import logging
import os
import re
import uuid

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.structures import BoxMode

from conftest import SYN, TINY_OPTS, in_processes
from distill_d2.data.checks import NamedErrors, check_dataset_dicts

NUM_CLASSES = 2  # the json has 3 categories: its 3rd (id 7) maps to contiguous id 2, out of range
SIZE = 64
LOGGER = "distill_d2.data.checks"

# file -> [(bbox XYWH, json category id, iscrowd)]
ANNOTATIONS = {
    "img0.jpg": [
        ([10, 10, 20, 20], 1, 0),
        ([44, 0, 20, 64], 3, 0),  # touches the right, top and bottom border: valid
        ([50, 50, 14.5, 10], 1, 0),  # 0.5 px beyond the border: within the 1 px tolerance
        ([0, 0, 0, 0], 3, 1),  # crowd: only its class is checked
    ],
    "img1.jpg": [
        ([30, 30, -5, 10], 1, 0),  # negative width
        ([5, 5, 0.5, 0.5], 1, 0),  # sub-pixel
        ([40, 10, 25.5, 10], 3, 0),  # x2 = 65.5: 1.5 px beyond the border
        ([20, 20, 10, 10], 3, 0),
    ],
    "img2.jpg": [
        ([8, 8, 30, 30], 7, 0),  # contiguous id 2 >= NUM_CLASSES
        ([30, 30, 20, 20], 3, 0),
    ],
    "img3.jpg": [([12, 12, 30, 30], 1, 0)],  # truncated file
}


def _write_coco(root, files):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, f in enumerate(files, 1):
        path = os.path.join(root, f)
        cv2.imwrite(path, rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        if f == "img3.jpg":
            data = open(path, "rb").read()
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
        images.append({"id": i, "file_name": f, "width": SIZE, "height": SIZE})
        for box, cat, crowd in ANNOTATIONS[f]:
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": box, "category_id": cat, "iscrowd": crowd,
                         "area": abs(box[2] * box[3])})
    cats = [{"id": c, "name": n} for c, n in ((1, "a"), (3, "b"), (7, "c"))]
    json_file = os.path.join(root, "annotations.json")
    with open(json_file, "w") as fh:
        json.dump({"images": images, "annotations": anns, "categories": cats}, fh)
    name = f"checks_{os.path.basename(root)}_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, json_file, root)
    return name


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    """Name of a registered COCO set with one problem of each kind (img0 is clean)."""
    return _write_coco(str(tmp_path_factory.mktemp("bad")), sorted(ANNOTATIONS))


@pytest.fixture(scope="module")
def truncated_set(tmp_path_factory):
    """Name of a registered COCO set whose only image is truncated (its annotation is fine)."""
    return _write_coco(str(tmp_path_factory.mktemp("trunc")), ["img3.jpg"])


def _problems(msg):
    """{(file basename, annotation index or None, kind)} listed in a check's error message."""
    return {(os.path.basename(f), int(j) if j else None, kind)
            for f, j, kind in re.findall(r"^  (\S+?)(?: annotation #(\d+))?: (\w+): ", msg, re.M)}


# --------------------------------------------------------------------------- rules, one annotation at a time
@pytest.fixture
def image_file(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"not decoded unless decode=True")
    return str(p)


def _kinds(image_file, ann, **record):
    rec = dict({"file_name": image_file, "image_id": 1, "width": SIZE, "height": SIZE}, **record)
    rec["annotations"] = [dict({"category_id": 0, "bbox_mode": BoxMode.XYXY_ABS}, **ann)]
    try:
        assert check_dataset_dicts([rec], NUM_CLASSES) == [rec]
        return set()
    except ValueError as e:
        return {kind for _, _, kind in _problems(str(e))}


XYWH = BoxMode.XYWH_ABS


@pytest.mark.parametrize("ann, expected", [
    ({"bbox": [0, 0, 64, 64]}, set()),  # the whole image
    ({"bbox": [-1, -1, 65, 65]}, set()),  # exactly the tolerance
    ({"bbox": [-1.5, 0, 10, 10]}, {"outside_image"}),
    ({"bbox": [0, 0, 65.5, 10]}, {"outside_image"}),  # 1.5 px beyond
    ({"bbox": [0, 10, 10, 65.5]}, {"outside_image"}),
    ({"bbox": [60, 60, 10, 10], "bbox_mode": XYWH}, {"outside_image"}),  # XYWH converted: x2 = 70
    ({"bbox": [10, 10, 5, 20]}, {"nonpositive_size"}),  # x2 < x1
    ({"bbox": [10, 10, 0, 5], "bbox_mode": XYWH}, {"nonpositive_size"}),  # zero width
    ({"bbox": [10, 10, 5, -3], "bbox_mode": XYWH}, {"nonpositive_size"}),
    ({"bbox": [10, 10, 0.9, 5], "bbox_mode": XYWH}, {"too_small"}),
    ({"bbox": [10, 10, 1.0, 1.0], "bbox_mode": XYWH}, set()),  # exactly MIN_BOX_SIZE
    ({"bbox": [32, 32, 10, 10, 0], "bbox_mode": BoxMode.XYWHA_ABS}, set()),
    ({"bbox": [10, 10, 20]}, {"invalid_box"}),
    ({"bbox": [10, 10, float("nan"), 20]}, {"invalid_box"}),
    ({"bbox": [10, 10, 20, 20], "category_id": -1}, {"bad_category"}),
    ({"bbox": [10, 10, 20, 20], "category_id": NUM_CLASSES}, {"bad_category"}),
    ({"bbox": [10, 10, 20, 20], "category_id": NUM_CLASSES - 1}, set()),
    ({"bbox": [10, 10, 20, 20], "category_id": np.int64(1)}, set()),
    ({"bbox": [50, 50, 5, 5], "category_id": 5}, {"bad_category", "nonpositive_size"}),
    ({"bbox": [30, 30, -5, 99], "iscrowd": 1}, set()),  # crowd: box not checked
    ({"bbox": [30, 30, 40, 40], "iscrowd": 1, "category_id": 5}, {"bad_category"}),
])
def test_annotation_rules(image_file, ann, expected):
    assert _kinds(image_file, ann) == expected


def test_no_image_size_skips_only_the_inside_check(image_file):
    rec = {"file_name": image_file, "annotations": [{"bbox": [0, 0, 500, 0.5], "bbox_mode": XYWH, "category_id": 0}]}
    with pytest.raises(ValueError) as e:
        check_dataset_dicts([rec], NUM_CLASSES)
    assert {k for _, _, k in _problems(str(e.value))} == {"too_small"}


def test_min_box_size_is_configurable(image_file):
    ann = {"bbox": [10, 10, 3, 3], "bbox_mode": XYWH}
    assert _kinds(image_file, ann) == set()
    rec = {"file_name": image_file, "annotations": [dict(ann, category_id=0)]}
    with pytest.raises(ValueError, match="too_small"):
        check_dataset_dicts([rec], NUM_CLASSES, min_box_size=4)


def test_unknown_action_is_an_error(image_file):
    with pytest.raises(ValueError, match="DATALOADER.CHECK.ACTION"):
        check_dataset_dicts([{"file_name": image_file}], NUM_CLASSES, action="warn")


# --------------------------------------------------------------------------- a registered COCO set
def test_error_names_every_problem(bad_set):
    dicts = DatasetCatalog.get(bad_set)
    with pytest.raises(ValueError) as e:
        check_dataset_dicts(dicts, NUM_CLASSES, decode=True, dataset_name=bad_set)
    msg = str(e.value)
    assert _problems(msg) == {
        ("img1.jpg", 0, "nonpositive_size"), ("img1.jpg", 1, "too_small"), ("img1.jpg", 2, "outside_image"),
        ("img2.jpg", 0, "bad_category"), ("img3.jpg", None, "unreadable_image"),
    }  # img0 (border box, 0.5 px beyond, crowd) is clean
    assert bad_set in msg
    for part in ("1 x nonpositive_size", "1 x too_small", "1 x outside_image", "1 x bad_category",
                 "1 x unreadable_image", "bbox=[30, 30, -5, 10] (XYWH_ABS)", "bbox=[5, 5, 0.5, 0.5]",
                 "category_id=2 not in [0, 2)", "truncated", "DATALOADER.CHECK.ACTION drop"):
        assert part in msg, part


def test_without_decode_a_missing_file_is_caught_but_not_a_truncated_one(bad_set, tmp_path):
    dicts = DatasetCatalog.get(bad_set)
    missing = dict(dicts[0], file_name=str(tmp_path / "gone.jpg"), image_id=99)
    with pytest.raises(ValueError) as e:
        check_dataset_dicts(dicts + [missing], NUM_CLASSES, decode=False, dataset_name=bad_set)
    problems = _problems(str(e.value))
    assert ("gone.jpg", None, "missing_file") in problems
    assert not any(f == "img3.jpg" for f, _, _ in problems)
    assert "unreadable_image" not in str(e.value) and "1 x missing_file" in str(e.value)


def test_error_lists_at_most_20(image_file):
    rec = {"file_name": image_file, "annotations": [{"bbox": [0, 0, 0, 0], "category_id": 0}] * 25}
    with pytest.raises(ValueError) as e:
        check_dataset_dicts([rec], NUM_CLASSES)
    assert len(_problems(str(e.value))) == 20 and "25 x nonpositive_size" in str(e.value)
    assert "... and 5 more" in str(e.value)


def test_drop_filters_and_logs(bad_set, caplog):
    dicts = DatasetCatalog.get(bad_set)
    before = [len(d["annotations"]) for d in dicts]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = check_dataset_dicts(dicts, NUM_CLASSES, decode=True, action="drop", dataset_name=bad_set)
    assert [os.path.basename(d["file_name"]) for d in out] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert out[0] is dicts[0]  # untouched record
    assert [a["bbox"] for a in out[1]["annotations"]] == [[20, 20, 10, 10]]
    assert [a["category_id"] for a in out[2]["annotations"]] == [1]
    assert [len(d["annotations"]) for d in dicts] == before  # input not modified
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    line = records[0].getMessage()
    for part in (bad_set, "1 x unreadable_image", "1 x nonpositive_size", "1 x too_small", "1 x outside_image",
                 "1 x bad_category", "dropped 1 of 4 images", "5 of 11 annotations (4 bad, 1 on dropped images)"):
        assert part in line, part


def test_clean_dicts_pass_unchanged(bad_set, caplog):
    clean = check_dataset_dicts(DatasetCatalog.get(bad_set), NUM_CLASSES, decode=True, action="drop")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert check_dataset_dicts(clean, NUM_CLASSES, decode=True, dataset_name="clean") is clean
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert re.search(r"3 images, 6 annotations, images decoded in [\d.]+ s: \d+ images/s, \d+ thread\(s\), "
                     "no problems", records[0].getMessage())


def test_named_errors():
    def mapper(d):
        if d["image_id"] == 2:
            raise OSError("image file is truncated")
        return d["image_id"]

    m = NamedErrors(mapper)
    assert m({"file_name": "a.jpg", "image_id": 1}) == 1
    with pytest.raises(RuntimeError, match=r"Failed to load or augment image b\.jpg \(image_id 2\): "
                                           r"OSError: image file is truncated") as e:
        m({"file_name": "b.jpg", "image_id": 2})
    assert isinstance(e.value.__cause__, OSError)


# --------------------------------------------------------------------------- end to end through train_net
def run_main(out, dataset, *extra):
    from distill_d2.engine import main

    argv = ["--config-file", os.path.join(SYN, "faster_rcnn_R18_student.yaml")] + TINY_OPTS + [
        "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES),
        "OUTPUT_DIR", str(out)] + list(extra)
    return main(default_argument_parser().parse_args(argv))


def test_train_stops_before_training_on_bad_data(bad_set, tmp_path):
    with pytest.raises(ValueError) as e:
        run_main(tmp_path, bad_set)
    assert {k for _, _, k in _problems(str(e.value))} == {
        "nonpositive_size", "too_small", "outside_image", "bad_category", "unreadable_image"}  # DECODE: on by default
    assert not (tmp_path / "metrics.json").exists()  # no iteration ran


def test_train_with_drop_trains(bad_set, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_main(tmp_path, bad_set, "DATALOADER.CHECK.ACTION", "drop", "DATALOADER.CHECK.DECODE", "True")
    assert (tmp_path / "model_final.pth").is_file()
    assert any("dropped 1 of 4 images" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_train_without_check_names_the_corrupt_file(truncated_set, tmp_path):
    with pytest.raises(RuntimeError, match=r"Failed to load or augment image \S+img3\.jpg .*truncated") as e:
        run_main(tmp_path, truncated_set, "DATALOADER.CHECK.ENABLED", "False", "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    assert isinstance(e.value.__cause__, OSError)


def test_train_rejects_an_unknown_action(tmp_path):
    with pytest.raises(ValueError, match="DATALOADER.CHECK.ACTION must be one of"):
        run_main(tmp_path, "synthetic_tiny_train", "DATALOADER.CHECK.ACTION", "warn")


# --------------------------------------------------------------------------- decoding (DATALOADER.CHECK.DECODE)
def _pil_full_load_fails(path):
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
        return False
    except Exception:
        return True


@pytest.mark.parametrize("ext, params", [(".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", [])])
def test_fast_decode_finds_a_truncation_wherever_a_full_decode_does(tmp_path, ext, params):
    from distill_d2.data.checks import decode_image
    from messy_data import draw

    good = str(tmp_path / f"good{ext}")
    cv2.imwrite(good, draw(200, 150, [(0, (20, 30, 90, 100)), (1, (100, 20, 180, 120))], 0), params)
    assert decode_image(good) == (None, (200, 150))
    data = open(good, "rb").read()
    failed = 0
    for k, frac in enumerate(np.linspace(0.02, 0.995, 40)):
        cut = str(tmp_path / f"cut{k}{ext}")
        with open(cut, "wb") as f:
            f.write(data[: int(len(data) * frac)])
        reason, _ = decode_image(cut)
        assert (reason is not None) == _pil_full_load_fails(cut), (frac, reason)  # what training's reader does
        failed += reason is not None
    assert failed >= 35  # (a JPEG cut within its last bytes may still decode fully, as in PIL)


def test_size_mismatch_and_exif_orientation(tmp_path):
    """An image whose size is not its record's is a problem (detectron2 would stop mid-run); an EXIF-rotated
    photo is measured upright, as detectron2 reads it."""
    from messy_data import make_voc

    v = make_voc(str(tmp_path / "v"), n=6, exif_rotated=5, png_every=0)
    rotated, plain = v.images[v.ids[5]], v.images[v.ids[0]]
    from PIL import Image

    assert Image.open(rotated).size == (96, 128) and v.sizes[v.ids[5]] == (128, 96)  # stored sideways
    recs = [{"file_name": rotated, "width": 128, "height": 96, "annotations": []},
            {"file_name": plain, "width": 96, "height": 128, "annotations": []}]  # (plain is 128x96)
    with pytest.raises(ValueError) as e:
        check_dataset_dicts(recs, NUM_CLASSES, decode=True, dataset_name="sizes")
    assert _problems(str(e.value)) == {("img_000.jpg", None, "size_mismatch")}
    assert "the image is 128x96 (width x height) but the record says 96x128" in str(e.value)
    assert "resized or rotated after it was annotated" in str(e.value)
    out = check_dataset_dicts(recs, NUM_CLASSES, decode=True, action="drop")
    assert [d["file_name"] for d in out] == [rotated]


def test_decode_threads_agree_and_log_progress(tmp_path, monkeypatch, caplog):
    from distill_d2.data import checks
    from messy_data import make_jpegs

    paths = make_jpegs(str(tmp_path / "j"), 12, size=(64, 48))
    data = open(paths[3], "rb").read()
    open(paths[3], "wb").write(data[:300])
    one = checks.decode_all(paths, workers=1)
    monkeypatch.setattr(checks, "PROGRESS_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        three = checks.decode_all(paths, workers=3)
    assert one == three and [r is None for r, _ in one] == [i != 3 for i in range(12)]
    assert "Decoding images to check them (DATALOADER.CHECK.DECODE): 12 / 12" in caplog.text


def _sharded_check(rank, world, dicts):
    """The message of the ValueError the distributed check raises in this process ("no error" if none)."""
    try:
        check_dataset_dicts(dicts, NUM_CLASSES, decode=True, distributed=True, dataset_name="sharded")
        return "no error"
    except ValueError as e:
        return str(e)


def test_launched_processes_share_the_decoding_and_all_report_every_problem(tmp_path):
    from messy_data import make_jpegs

    paths = make_jpegs(str(tmp_path / "j"), 6, size=(64, 48))
    for i in (1, 2):  # one in each process's share
        open(paths[i], "wb").write(open(paths[i], "rb").read()[:200])
    dicts = [{"file_name": p, "width": 64, "height": 48, "annotations": []} for p in paths]
    got = in_processes(_sharded_check, dicts)
    for rank in (0, 1):
        assert _problems(got[rank]) == {("00001.jpg", None, "unreadable_image"),
                                        ("00002.jpg", None, "unreadable_image")}, got[rank]
        assert "thread(s) in each of 2 processes" in got[rank]


def test_named_errors_point_image_errors_to_the_check():
    def mapper(d):
        raise (OSError("image file is truncated") if d["image_id"] == 1 else KeyError("annotations"))

    with pytest.raises(RuntimeError) as e:
        NamedErrors(mapper)({"file_name": "a.jpg", "image_id": 1})
    assert "DATALOADER.CHECK.DECODE True" in str(e.value) and "DATALOADER.CHECK.ACTION drop" in str(e.value)
    with pytest.raises(RuntimeError) as e:
        NamedErrors(mapper)({"file_name": "a.jpg", "image_id": 2})
    assert "DATALOADER.CHECK" not in str(e.value)  # not an image error: no misleading hint


def _messy_train(tmp_path, prefix, **kw):
    """DATASETS.VOC options for a messy VOC folder whose 'train' split is every image."""
    from messy_data import make_voc

    n = kw.pop("n", 6)
    v = make_voc(str(tmp_path / prefix), n=n, splits={"train": range(n)}, **kw)
    return v, ["DATASETS.VOC", str([[prefix, v.root]]), "MODEL.ROI_HEADS.NUM_CLASSES", "-1"]


def test_truncated_jpeg_stops_before_training_by_default(tmp_path):
    v, opts = _messy_train(tmp_path, "trunc_voc", truncate=4)
    with pytest.raises(ValueError) as e:
        run_main(tmp_path / "out", "trunc_voc_train", *opts)
    assert _problems(str(e.value)) == {(os.path.basename(v.truncated), None, "unreadable_image")}
    assert "truncated" in str(e.value) and v.truncated in str(e.value)
    assert not (tmp_path / "out" / "metrics.json").exists()  # no iteration ran


def test_without_decode_the_runtime_error_names_the_keys(tmp_path):
    v, opts = _messy_train(tmp_path, "trunc_only", n=1, truncate=0)  # the training set is the truncated image
    with pytest.raises(RuntimeError) as e:
        run_main(tmp_path / "out", "trunc_only_train", *opts, "DATALOADER.CHECK.DECODE", "False")
    msg = str(e.value)
    assert v.truncated in msg and "truncated" in msg
    assert "DATALOADER.CHECK.DECODE True" in msg and "DATALOADER.CHECK.ACTION drop" in msg
