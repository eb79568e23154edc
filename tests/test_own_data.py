"""A user's own data from the command line only: COCO json + folder, VOC folder without split files."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from conftest import REPO, SYN, TINY_OPTS
from distill_d2.data.own import voc_split_files

CLASSES = ["cell", "dot"]


def _image(path, seed):
    rng = np.random.default_rng(seed)
    img = np.full((96, 128, 3), 40, np.uint8)
    cv2.rectangle(img, (10, 20), (50, 70), (0, 0, 220), -1)
    cv2.circle(img, (90, 40), 12, (0, 200, 0), -1)
    img = (img + rng.integers(0, 20, img.shape)).astype(np.uint8)
    cv2.imwrite(str(path), img)


def coco_json(path, image_dir, n, cats):
    """A tiny COCO json of ``n`` generated images under ``image_dir``: a box per category (up to two:
    the image's rectangle, then its circle), category ids as given (need not be contiguous)."""
    image_dir.mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        _image(image_dir / f"{i}.jpg", i)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 128, "height": 96})
        boxes = ([10, 20, 40, 50], [78, 28, 24, 24])
        anns += [{"id": len(anns) + j + 1, "image_id": i + 1, "category_id": c["id"], "bbox": b,
                  "area": b[2] * b[3], "iscrowd": 0} for j, (c, b) in enumerate(zip(cats, boxes))]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    coco_json(d / "train.json", d / "images", 6, [{"id": 3, "name": "cell"}, {"id": 7, "name": "dot"}])
    return d


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("voc")
    (d / "Annotations").mkdir()
    (d / "JPEGImages").mkdir()
    for i in range(10):
        _image(d / "JPEGImages" / f"img{i:02d}.jpg", i)
        objs = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                       f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                       for n, b in (("dot", (79, 29, 102, 52)), ("cell", (11, 21, 50, 70))))
        (d / "Annotations" / f"img{i:02d}.xml").write_text(
            f"<annotation><filename>img{i:02d}.jpg</filename><size><width>128</width><height>96</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
    return d


def run_main(out, *extra):
    from distill_d2.engine import main

    argv = ["--config-file", os.path.join(SYN, "faster_rcnn_R18_student.yaml")] + TINY_OPTS + [
        "OUTPUT_DIR", str(out)] + [str(x) for x in extra]
    return main(default_argument_parser().parse_args(argv))


def test_coco_from_the_command_line(coco_dir, tmp_path):
    coco = str([["own_coco_train", str(coco_dir / "train.json"), str(coco_dir / "images")]])
    res = run_main(tmp_path, "DATASETS.COCO", coco, "DATASETS.TRAIN", "('own_coco_train',)",
                   "DATASETS.TEST", "('own_coco_train',)", "MODEL.ROI_HEADS.NUM_CLASSES", 2)
    assert MetadataCatalog.get("own_coco_train").thing_classes == CLASSES
    assert (tmp_path / "model_final.pth").is_file() and "AP" in res["bbox"]
    with pytest.raises(ValueError, match=r"'own_coco_train' has 2 classes \(cell, dot\) but "
                                         r"MODEL.ROI_HEADS.NUM_CLASSES is 6: set MODEL.ROI_HEADS.NUM_CLASSES 2"):
        run_main(tmp_path / "b", "DATASETS.COCO", coco, "DATASETS.TRAIN", "('own_coco_train',)", "DATASETS.TEST", "()")


def test_voc_without_split_files_gets_a_seeded_split(voc_dir):
    a = voc_split_files(str(voc_dir), 0.2, 0)
    b = voc_split_files(str(voc_dir), 0.2, 0)
    c = voc_split_files(str(voc_dir), 0.2, 1)
    read = lambda f: open(f).read().split()  # noqa: E731
    assert {k: read(v) for k, v in a.items()} == {k: read(v) for k, v in b.items()}
    assert len(read(a["val"])) == 2 and len(read(a["train"])) == 8
    assert sorted(read(a["val"]) + read(a["train"])) == [f"img{i:02d}" for i in range(10)]
    assert read(a["val"]) != read(c["val"])  # the seed matters
    assert not (voc_dir / "ImageSets").exists()  # nothing written into the data


def test_voc_folder_trains_and_evaluates_through_launch(voc_dir, tmp_path, datasets_dir):
    opts = TINY_OPTS + ["DATASETS.VOC", str([["ownvoc", str(voc_dir)]]), "DATASETS.TRAIN", "('ownvoc_train',)",
                        "DATASETS.TEST", "('ownvoc_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
                        "OUTPUT_DIR", str(tmp_path)]
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2", "--config-file",
           os.path.join(SYN, "faster_rcnn_R18_student.yaml")] + opts
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert "AP50" in res["bbox"]  # PascalVOCDetectionEvaluator ran on the generated val split
    # in this process too: class names from the xml files, 8 / 2 images
    from distill_d2.data.own import register_voc_folder

    register_voc_folder("ownvoc", str(voc_dir))
    assert MetadataCatalog.get("ownvoc_train").thing_classes == CLASSES
    assert len(DatasetCatalog.get("ownvoc_train")) == 8 and len(DatasetCatalog.get("ownvoc_val")) == 2
