"""A user's own data from the command line only: COCO json + folder, VOC folders (without split files,
in the layouts found in the wild, with typos), NUM_CLASSES -1."""
import json
import logging
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from conftest import REPO, SYN, TINY_OPTS, tiny_cfg
from distill_d2.data.own import voc_split_files
from messy_data import make_voc

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
                                         r"MODEL.ROI_HEADS.NUM_CLASSES is 6: set MODEL.ROI_HEADS.NUM_CLASSES 2, or -1"):
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


# --------------------------------------------------------------------------- VOC folders as found in the wild
def test_messy_voc_layout_trains_and_evaluates(tmp_path):
    """lowercase annotations/ + images/, .png and .jpg, landscape and portrait, xml files without <size>
    (read from the header), float coordinates, no <pose>/<truncated>: trains through train_net's main with
    NUM_CLASSES -1 and is evaluated by COCO and Pascal-VOC AP."""
    v = make_voc(str(tmp_path / "raccoons"), n=10)
    res = run_main(tmp_path / "out", "DATASETS.VOC", str([["messy", v.root]]), "DATASETS.TRAIN", "('messy_train',)",
                   "DATASETS.TEST", "('messy_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", -1,
                   "TEST.EVALUATOR", "coco+pascal_voc")
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert "AP50" in res["bbox"] and "AP50" in res["voc_bbox"]
    assert "NUM_CLASSES: 2" in (tmp_path / "out" / "config.yaml").read_text()  # resolved from the data
    dicts = DatasetCatalog.get("messy_train") + DatasetCatalog.get("messy_val")
    assert MetadataCatalog.get("messy_train").thing_classes == ["dog", "raccoon"]
    assert sorted(d["image_id"] for d in dicts) == v.ids
    assert {os.path.splitext(d["file_name"])[1] for d in dicts} == {".jpg", ".png"}
    assert all((d["width"], d["height"]) == v.sizes[d["image_id"]] for d in dicts)  # 2 of 10 xml without <size>
    assert {d["width"] > d["height"] for d in dicts} == {True, False}
    assert all(len(d["annotations"]) == 2 for d in dicts)


def _tidy_and_messy(tmp_path, n=8):
    """The same boxes twice: as detectron2's VOC reader needs them, and messy (any layout distill_d2 reads)."""
    split = {"test": range(n)}
    tidy = make_voc(str(tmp_path / "tidy"), n=n, annotations="Annotations", images="JPEGImages", png_every=0,
                    no_size_every=0, splits=split, tidy=True)
    messy = make_voc(str(tmp_path / "messy"), n=n, annotations="xml", images="Images", splits=split)
    return tidy, messy


def test_loader_and_evaluator_equal_detectron2_on_a_standard_folder(tmp_path):
    import torch
    from detectron2.data.datasets.pascal_voc import load_voc_instances, register_pascal_voc
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    from distill_d2.data import register_voc
    from distill_d2.data.voc import VOCEvaluator

    tidy, messy = _tidy_and_messy(tmp_path)
    classes = ["dog", "raccoon"]
    register_voc("std_ours", tidy.root, "test", class_names=classes)
    register_voc("messy_ours", messy.root, "test", class_names=classes)
    register_pascal_voc("std_d2", tidy.root, "test", 2012, classes)
    ours = DatasetCatalog.get("std_ours")
    assert ours == load_voc_instances(tidy.root, "test", classes)  # the same dicts as detectron2's loader

    rng = np.random.default_rng(0)
    preds = []
    for d in ours:  # jittered gt boxes, some with the wrong class, plus a false positive
        boxes = [a["bbox"] for a in d["annotations"]] + [[1, 1, 20, 20]]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes) + torch.tensor(rng.normal(0, 2, (len(boxes), 4)), dtype=torch.float32))
        inst.scores = torch.tensor(rng.uniform(0, 1, len(boxes)), dtype=torch.float32)
        inst.pred_classes = torch.tensor([a["category_id"] if rng.uniform() < 0.8 else 1 - a["category_id"]
                                          for a in d["annotations"]] + [0])
        preds.append(({"image_id": d["image_id"]}, {"instances": inst}))
    results = {}
    for name, ev in (("d2", PascalVOCDetectionEvaluator("std_d2")), ("ours", VOCEvaluator("std_ours")),
                     ("messy", VOCEvaluator("messy_ours"))):
        ev.reset()
        for inp, out in preds:
            ev.process([inp], [out])
        results[name] = ev.evaluate()["bbox"]
    assert 10 < results["d2"]["AP50"] < 100
    assert results["ours"] == results["d2"]
    assert results["messy"] == results["d2"]  # float coordinates, missing tags, other folders: same gt


def test_layouts_are_found_or_named(tmp_path):
    from distill_d2.data.own import register_voc_folder
    from distill_d2.data.voc import voc_layout

    for ann, img in (("Annotations", "JPEGImages"), ("annotations", "images"), ("ANNOTATIONS", "Imgs"), ("", "")):
        root = tmp_path / f"v_{ann}_{img}"
        make_voc(str(root), n=3, annotations=ann, images=img)
        assert voc_layout(str(root)) == (str(root / ann) if ann else str(root), str(root / img) if img else str(root))
    root = tmp_path / "odd"
    make_voc(str(root), n=4, annotations="my_boxes", images="frames")
    with pytest.raises(FileNotFoundError, match=r"no annotation \(\.xml\) folder .*its sub-folders: frames, my_boxes "
                                                r"\(my_boxes has annotation files\).*\{'annotations': 'my_boxes'\}"):
        register_voc_folder("odd", str(root))
    cfg = tiny_cfg("faster_rcnn_R18_student.yaml", "DATASETS.VOC",
                   str([["odd", str(root), {"annotations": "my_boxes", "images": "frames"}]]),
                   "DATASETS.TRAIN", "('odd_train',)", "MODEL.ROI_HEADS.NUM_CLASSES", "-1")
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2 and len(DatasetCatalog.get("odd_train")) == 3
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'image'; the options are 'classes', 'annotations', "
                                         r"'images'"):
        tiny_cfg("faster_rcnn_R18_student.yaml", "DATASETS.VOC", str([["odd", str(root), {"image": "frames"}]]))
    if not os.path.exists(str(tmp_path / "v_annotations_images" / "Annotations")):  # a case-sensitive file system
        both = tmp_path / "v_annotations_images"
        make_voc(str(both), n=3, annotations="Annotations", images="images")
        with pytest.raises(ValueError, match=r"several annotation \(\.xml\) folders \(Annotations, annotations\)"):
            voc_layout(str(both))


def test_explicit_class_list_names_the_unknown_class_and_its_file(tmp_path, caplog):
    v = make_voc(str(tmp_path / "typo"), n=8, typo=(2, "racoon"), splits={"train": range(6), "val": [6, 7]})
    entry = str([["typo", v.root, {"classes": ["dog", "raccoon"]}]])
    opts = ("DATASETS.VOC", entry, "DATASETS.TRAIN", "('typo_train',)", "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", -1)
    with pytest.raises(ValueError) as e:
        run_main(tmp_path / "a", *opts)
    msg = str(e.value)
    for part in ("1 x unknown_class", f"class 'racoon' (in {v.typo_xml}) is not in the class list of 'typo_train' "
                 "(dog, raccoon); did you mean 'raccoon'?", v.images[v.ids[2]], "DATALOADER.CHECK.ACTION drop",
                 "add them to the class list (the 'classes' of the DATASETS.VOC entry)"):
        assert part in msg, part
    assert not (tmp_path / "a" / "metrics.json").exists()
    with caplog.at_level(logging.WARNING):
        run_main(tmp_path / "b", *opts, "DATALOADER.CHECK.ACTION", "drop")  # the way on: without that object
    assert (tmp_path / "b" / "model_final.pth").is_file()
    assert "the loader left out 1" in caplog.text and "1 x unknown_class" in caplog.text


def test_rare_class_without_a_list_is_a_likely_typo(tmp_path):
    v = make_voc(str(tmp_path / "typo"), n=12, typo=(2, "racoon"), splits={"train": range(12)})
    with pytest.raises(ValueError) as e:
        run_main(tmp_path / "a", "DATASETS.VOC", str([["rare", v.root]]), "DATASETS.TRAIN", "('rare_train',)",
                 "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", -1)
    msg = str(e.value)
    assert f"'racoon': 1 instance(s), in {v.typo_xml}" in msg and "likely a typo" in msg
    assert "the largest class: 'raccoon', 12" in msg
    assert not (tmp_path / "a" / "metrics.json").exists()
    # the fix it names: the class list as a DATASETS.VOC entry (then the typo is an unknown class, reported)
    entry = re.search(r'DATASETS.VOC "(.*?)"', msg).group(1)
    cfg = tiny_cfg("faster_rcnn_R18_student.yaml", "DATASETS.VOC", entry, "DATASETS.TRAIN", "('rare_train',)",
                   "MODEL.ROI_HEADS.NUM_CLASSES", "-1")
    assert MetadataCatalog.get("rare_train").thing_classes == ["dog", "raccoon"]
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2


def test_num_classes_minus_one_is_taken_from_the_data(tmp_path, coco_dir):
    from distill_d2.teacher import get_teacher_cfg

    assert tiny_cfg("faster_rcnn_R18_student.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "-1").MODEL.ROI_HEADS.NUM_CLASSES == 6
    retina = tiny_cfg("retinanet_R18_student.yaml", "MODEL.RETINANET.NUM_CLASSES", "-1")
    assert retina.MODEL.RETINANET.NUM_CLASSES == 6
    coco = str([["minus_coco", str(coco_dir / "train.json"), str(coco_dir / "images")]])  # classes read from the json
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DATASETS.COCO", coco, "DATASETS.TRAIN", "('minus_coco',)",
                   "MODEL.ROI_HEADS.NUM_CLASSES", "-1")
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2
    assert get_teacher_cfg(cfg).MODEL.ROI_HEADS.NUM_CLASSES == 2  # the teacher follows the student
    with pytest.raises(ValueError, match=r"NUM_CLASSES is -1 \(from the data\) but DATASETS.TRAIN and DATASETS.TEST "
                                         "are empty"):
        tiny_cfg("faster_rcnn_R18_student.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "-1", "DATASETS.TRAIN", "()",
                 "DATASETS.TEST", "()")
    with pytest.raises(ValueError, match=r"different class counts \('synthetic_tiny_train': 6, 'minus_coco': 2\)"):
        tiny_cfg("faster_rcnn_R18_student.yaml", "DATASETS.COCO", coco, "MODEL.ROI_HEADS.NUM_CLASSES", "-1",
                 "DATASETS.TRAIN", "('synthetic_tiny_train', 'minus_coco')")
    with pytest.raises(ValueError, match=r"MODEL.RETINANET.NUM_CLASSES must be a positive class count or -1"):
        tiny_cfg("retinanet_R18_student.yaml", "MODEL.RETINANET.NUM_CLASSES", "0")


def test_a_number_that_differs_from_the_data_is_still_an_error(tmp_path):
    v = make_voc(str(tmp_path / "v"), n=6)
    with pytest.raises(ValueError, match=r"'num_train' has 2 classes \(dog, raccoon\) but MODEL.ROI_HEADS.NUM_CLASSES "
                                         r"is 3: set MODEL.ROI_HEADS.NUM_CLASSES 2, or -1"):
        run_main(tmp_path / "a", "DATASETS.VOC", str([["num", v.root]]), "DATASETS.TRAIN", "('num_train',)",
                 "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", 3)


def test_voc_evaluator_on_a_messy_folder_scores_perfect_predictions_100(tmp_path):
    """Ground truth from float coordinates, xml without <pose>, lowercase folders, .png, an id with a space."""
    import torch
    from detectron2.structures import Boxes, Instances

    from distill_d2.data import register_voc
    from distill_d2.data.voc import VOCEvaluator

    v = make_voc(str(tmp_path / "m"), n=6, splits={"test": range(6)})
    for ext in (".xml", os.path.splitext(v.images[v.ids[0]])[1]):  # img_000 -> "img 000"
        folder = "annotations" if ext == ".xml" else "images"
        os.rename(os.path.join(v.root, folder, "img_000" + ext), os.path.join(v.root, folder, "img 000" + ext))
    split = os.path.join(v.root, "ImageSets", "Main", "test.txt")
    text = open(split).read()
    open(split, "w").write(text.replace("img_000", "img 000"))
    register_voc("messy_eval", v.root, "test")
    ev = VOCEvaluator("messy_eval")
    ev.reset()
    dicts = DatasetCatalog.get("messy_eval")
    assert "img 000" in {d["image_id"] for d in dicts}
    for d in dicts:
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32))
        inst.scores = torch.ones(len(d["annotations"]))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        ev.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = ev.evaluate()["bbox"]
    assert res["AP50"] == pytest.approx(100) and res["AP75"] == pytest.approx(100)
