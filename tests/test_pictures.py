"""``python -m distill_d2.pictures``: every term's pictures for Faster R-CNN and RetinaNet presets, on an
image file and on a dataset sample, each PNG of the original image's size; explain() shows forward's mask."""
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from conftest import SYN, TINY_OPTS, tiny_cfg
import distill_d2.methods.generic as generic
from distill_d2 import pictures

H, W = 120, 160  # the image file's size (the synthetic dataset's images are 256 x 256)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = (rng.uniform(0, 60, (H, W, 3)) + np.linspace(60, 180, W)[None, :, None]).astype(np.uint8)
    cv2.circle(img, (60, 50), 25, (20, 200, 40), -1)
    cv2.rectangle(img, (100, 70), (150, 110), (200, 40, 40), -1)
    path = str(tmp_path_factory.mktemp("img") / "photo.png")
    cv2.imwrite(path, img)
    return path


def run(preset, teacher, out, *args, opts=()):
    argv = ["--config-file", os.path.join(SYN, preset), "--out", str(out), *args,
            "--opts", *TINY_OPTS, "DISTILL.TEACHER.WEIGHTS", teacher, *opts]
    return pictures.main(argv)


def check_pngs(written, out, names, hw, overview=True):
    assert {os.path.basename(p) for p in written} == set(names) | ({"overview.png"} if overview else set())
    for name in names:
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 0, name
        assert cv2.imread(path).shape[:2] == hw, name
    assert (cv2.imread(os.path.join(out, "overview.png")) is not None) == overview


def maps(term, picture, levels):
    return [f"{term}_{picture}_{lv}.png" for lv in levels]


P2_P6, P3_P7 = ["p2", "p3", "p4", "p5", "p6"], ["p3", "p4", "p5", "p6", "p7"]


def test_faster_rcnn_tar_on_an_image_and_a_dataset_sample(make_ckpt, image_file, tmp_path):
    teacher = make_ckpt("faster_rcnn_R34_teacher.yaml")
    names = (["gt.png", "RoIClsKD_cls_kd_rois.png", "RoIBoxKD_box_gate_passed.png"]
             + maps("FeatureKD", "feat_mask", P2_P6) + maps("FeatureKD", "feature_error", P2_P6))
    written = run("tar_R34_to_R18.yaml", teacher, tmp_path / "img", "--image", image_file)
    check_pngs(written, tmp_path / "img", names, (H, W))
    # a distillation checkpoint (student + adapters) and a gt sample of the tiny val set (256 x 256)
    model = pictures.build_distiller(tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("distilled")
    written = run("tar_R34_to_R18.yaml", teacher, tmp_path / "ds", "--weights", str(tmp_path / "distilled.pth"),
                  "--dataset", "synthetic_tiny_val", "--index", "1", "--no-contact-sheet")
    check_pngs(written, tmp_path / "ds", names, (256, 256), overview=False)


@pytest.mark.parametrize("preset,terms", [
    ("tar_retinanet_R34_to_R18.yaml", ["DenseBoxKD_box_gate_passed.png"] + maps("FeatureKD", "feat_mask", P3_P7)
     + maps("FeatureKD", "feature_error", P3_P7)),
    ("defeat_retinanet_R34_to_R18.yaml", maps("DecoupledFeatureKD", "defeat_fg_mask", P3_P7)
     + maps("DecoupledFeatureKD", "feature_error", P3_P7)),
])
def test_retinanet_presets(preset, terms, make_ckpt, image_file, tmp_path):
    teacher = make_ckpt("retinanet_R34_teacher.yaml")
    written = run(preset, teacher, tmp_path, "--image", image_file)
    check_pngs(written, tmp_path, ["gt.png"] + terms, (H, W))
    if preset.startswith("defeat"):  # (the default dataset: DATASETS.TEST[0], sample 0)
        written = run(preset, teacher, tmp_path / "ds")
        check_pngs(written, tmp_path / "ds", ["gt.png"] + terms, (256, 256))


def test_explained_mask_is_the_mask_forward_uses_and_nothing_changes(make_ckpt, monkeypatch):
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", make_ckpt("faster_rcnn_R34_teacher.yaml"))
    d, img, _ = pictures.load_sample(cfg, dataset="synthetic_tiny_val", index=1)
    inputs = [pictures.model_input(cfg, d)]
    model = pictures.build_distiller(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec, explained = pictures.explain_all(model, inputs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics included
    term = model.kd_terms["FeatureKD"]
    seen = {}
    real = generic.masked_feature_loss

    def spy(student, teacher, masks, norm):
        seen["m"] = masks
        return real(student, teacher, masks, norm)

    monkeypatch.setattr(generic, "masked_feature_loss", spy)
    with torch.no_grad():
        term(rec)
    mask = explained["FeatureKD"]["maps"]["feat_mask"]
    assert set(mask) == set(seen["m"]) == set(term.levels)
    assert all(torch.equal(mask[lv], seen["m"][lv]) for lv in term.levels)
    # the Gaussian mask: > 0 at each gt box centre, 0 at cells outside every box
    boxes, m, s = rec.gt_boxes[0], mask["p2"][0], rec.strides["p2"]
    assert len(boxes) > 0
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2 / s).long()
    assert (m[centres[:, 1], centres[:, 0]] > 0).all()
    ys, xs = (torch.arange(n) * s + s / 2 for n in m.shape)
    inside = torch.zeros_like(m, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        inside |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    assert (m[~inside] == 0).all() and (m[inside] > 0).any()
    # the gated boxes are per image, in input pixels
    rois = explained["RoIClsKD"]["boxes"]["cls_kd_rois"]
    assert len(rois) == 1 and rois[0].shape[1] == 4
    assert len(explained["RoIClsKD"]["box_values"]["cls_kd_rois"][0]) == len(rois[0])


@pytest.mark.parametrize("preset,args,err,match", [
    ("fitnet_R34_to_R18.yaml", ["--image", "nope.jpg"], FileNotFoundError, "Image file 'nope.jpg' not found"),
    ("fitnet_R34_to_R18.yaml", ["--dataset", "synthetic_tiny_val", "--index", "8"], IndexError,
     r"has 8 samples \(0..7\)"),
    ("fitnet_R34_to_R18.yaml", ["--dataset", "no_such_set"], KeyError, "'no_such_set' is not registered"),
    ("faster_rcnn_R18_student.yaml", [], ValueError, "not a distillation config"),
])
def test_clear_errors(preset, args, err, match, tmp_path):
    with pytest.raises(err, match=match):
        pictures.main(["--config-file", os.path.join(SYN, preset), "--out", str(tmp_path), *args, "--opts", *TINY_OPTS])


def test_explained_rois_are_the_ones_the_gates_pass(make_ckpt):
    from test_regression import steer_gates

    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", make_ckpt("faster_rcnn_R34_teacher.yaml"),
                   "DISTILL.CLS.GATE", "teacher_better", "DISTILL.TAR.BOX_GATE", "teacher_vs_student")
    d, _, _ = pictures.load_sample(cfg, dataset="synthetic_tiny_val", index=1)
    model = pictures.build_distiller(cfg)
    steer_gates(model)  # so that the teacher wins on some RoIs
    rec, explained = pictures.explain_all(model, [pictures.model_input(cfg, d)])
    num_pos = int((rec.rois.gt_classes < rec.rois.num_classes).sum())
    for term, picture, frac in [("RoIClsKD", "cls_kd_rois", "kd/cls_gate_frac"),
                                ("RoIBoxKD", "box_gate_passed", "kd/box_gate_frac")]:
        with torch.no_grad():
            _, scalars = model.kd_terms[term](rec)
        n = len(explained[term]["boxes"][picture][0])
        assert 0 < n == round(float(scalars[frac]) * num_pos), term
