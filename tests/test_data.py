import hashlib
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from distill_d2.data import SYNTHETIC_CLASSES, generate_synthetic, register_voc, voc_class_names
from distill_d2.data.synthetic import render_image


def _digest(folder):
    h = hashlib.sha1()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path):
    a = generate_synthetic(str(tmp_path / "a"), 6, seed=7)
    b = generate_synthetic(str(tmp_path / "b"), 6, seed=7)
    c = generate_synthetic(str(tmp_path / "c"), 6, seed=8)
    assert _digest(os.path.dirname(a)) == _digest(os.path.dirname(b))
    assert _digest(os.path.dirname(a)) != _digest(os.path.dirname(c))


def test_cache_reused_and_regenerated_on_change(tmp_path):
    out = str(tmp_path / "s")
    p = generate_synthetic(out, 4, seed=1)
    mtime = os.path.getmtime(p)
    assert generate_synthetic(out, 4, seed=1) == p and os.path.getmtime(p) == mtime
    generate_synthetic(out, 5, seed=1)  # different size -> regenerated
    assert len(os.listdir(os.path.join(out, "images"))) == 5


def test_dataset_statistics_are_a_fair_task():
    rng = np.random.default_rng(0)
    sizes, classes, per_img = [], [], []
    for _ in range(150):
        img, annos = render_image(rng)
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        per_img.append(len(annos))
        for a in annos:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 256 and y + h <= 256 and w > 0 and h > 0
            sizes.append(np.sqrt(w * h))
            classes.append(a["category_id"])
    sizes = np.array(sizes)
    # COCO small (<32), medium, large (>96) all present in quantity
    # measured on this sample: ~49% small, ~47% medium, ~4% large
    assert (sizes < 32).mean() > 0.3 and (sizes > 96).mean() > 0.03 and ((sizes >= 32) & (sizes <= 96)).mean() > 0.3
    assert set(classes) == set(range(len(SYNTHETIC_CLASSES)))
    assert np.mean(per_img) > 2


def test_registered_and_loadable():
    for name in ("synthetic_train", "synthetic_val", "synthetic_tiny_train", "synthetic_tiny_val"):
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).thing_classes == SYNTHETIC_CLASSES
        assert MetadataCatalog.get(name).evaluator_type == "coco"
    dicts = DatasetCatalog.get("synthetic_tiny_train")
    assert len(dicts) == 16
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert sum(len(d["annotations"]) for d in dicts) > 16


def _write_voc(root, classes, n=4):
    import cv2

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = [f"img{i}" for i in range(n)]
    for i, iid in enumerate(ids):
        cv2.imwrite(os.path.join(root, "JPEGImages", iid + ".jpg"), np.full((60, 80, 3), 127, np.uint8))
        objs = "".join(
            f"<object><name>{classes[(i + k) % len(classes)]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{5 + k}</xmin><ymin>6</ymin><xmax>{30 + k}</xmax><ymax>40</ymax></bndbox></object>"
            for k in range(2)
        )
        with open(os.path.join(root, "Annotations", iid + ".xml"), "w") as f:
            f.write(f"<annotation><filename>{iid}.jpg</filename><size><width>80</width><height>60</height>"
                    f"<depth>3</depth></size>{objs}</annotation>")
    with open(os.path.join(root, "ImageSets/Main/train.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def test_voc_registration_with_own_classes(tmp_path):
    root = str(tmp_path / "voc")
    _write_voc(root, ["WBC", "RBC", "Platelets"])
    assert voc_class_names(root) == ["Platelets", "RBC", "WBC"]
    register_voc("tiny_voc_train", root, "train")
    dicts = DatasetCatalog.get("tiny_voc_train")
    meta = MetadataCatalog.get("tiny_voc_train")
    assert meta.thing_classes == ["Platelets", "RBC", "WBC"] and meta.evaluator_type == "pascal_voc"
    assert len(dicts) == 4 and all(len(d["annotations"]) == 2 for d in dicts)
    first = dicts[0]["annotations"][0]
    assert meta.thing_classes[first["category_id"]] == "WBC"
    # detectron2's VOC loader converts 1-based VOC pixels to 0-based
    assert first["bbox"] == [4.0, 5.0, 30.0, 40.0]


def test_voc_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        os.makedirs(tmp_path / "v" / "Annotations")
        os.makedirs(tmp_path / "v" / "JPEGImages")
        register_voc("broken_voc", str(tmp_path / "v"), "train")


def test_builtin_bccd_registration(datasets_dir):
    root = os.path.join(str(datasets_dir), "BCCD")
    _write_voc(root, ["RBC", "WBC", "Platelets"], n=3)
    meta = MetadataCatalog.get("bccd_train")
    assert meta.dirname == root and meta.thing_classes == ["RBC", "WBC", "Platelets"]
    assert meta.evaluator_type == "pascal_voc"
    assert len(DatasetCatalog.get("bccd_train")) == 3
