"""DistillRetinaNet, DeFeat presets, heterogeneous and cross-family pairs (real tiny models, CPU)."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import adapters, tiny_cfg
from distill_d2.export import export_student, student_cfg_from
from distill_d2.errors import TeacherError
from distill_d2.errors import DistillConfigError
from test_distill_rcnn import batches, train_steps


@pytest.fixture(scope="module")
def retina_teacher(make_ckpt):
    return make_ckpt("retinanet_R34_teacher.yaml")


def test_dense_kd_shapes_losses_and_train_step(retina_teacher):
    cfg = tiny_cfg("tar_retinanet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", retina_teacher)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model).__name__ == "DistillRetinaNet"
    assert list(adapters(model).keys()) == ["p3", "p4", "p5", "p6", "p7"]
    t_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    a_state = {k: v.clone() for k, v in adapters(model).state_dict().items()}
    losses, storage = train_steps(model, batches(cfg, 2))
    assert {"loss_cls", "loss_box_reg", "loss_kd_feat", "loss_kd_cls", "loss_kd_box"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_kd_cls"].item() >= 0  # binary KL
    assert 0 <= storage.histories()["kd/box_gate_frac"].latest() <= 1
    assert all(torch.equal(v, t_state[k]) for k, v in model.teacher.state_dict().items())
    # (coarse levels of a 128 px image may hold no box centre, hence no gradient)
    assert not torch.equal(adapters(model)["p3"].weight, a_state["p3.weight"])


def test_dense_cls_kd_is_zero_when_student_equals_teacher(retina_teacher):
    # student built from the teacher's own config and weights: identical predictions
    cfg = tiny_cfg("tar_retinanet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", retina_teacher,
                   "MODEL.RESNETS.DEPTH", 34, "MODEL.RETINANET.NUM_CONVS", 4, "DISTILL.FEAT.ADAPTER", "identity")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(retina_teacher)
    model.train()
    model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)  # same BN stats as teacher
    with EventStorage():
        losses = model(batches(cfg, 1)[0])
    assert losses["loss_kd_cls"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_kd_feat"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_kd_box"].item() == pytest.approx(0.0, abs=1e-6)


def test_retinanet_export_round_trip(retina_teacher, tmp_path):
    cfg = tiny_cfg("tar_retinanet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", retina_teacher)
    model = build_model(cfg)
    train_steps(model, batches(cfg, 1))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("d")
    export_student(cfg, str(tmp_path / "d.pth"), str(tmp_path / "s.pth"))
    student = build_model(student_cfg_from(cfg))
    assert type(student).__name__ == "RetinaNet"
    sd = torch.load(tmp_path / "s.pth", weights_only=False)["model"]
    assert set(sd) == set(student.state_dict())
    DetectionCheckpointer(student).load(str(tmp_path / "s.pth"))
    model.eval()
    student.eval()
    batch = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], student(batch)[0]["instances"]
    assert len(a) > 0 and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


def test_anchor_mismatch_aborts(retina_teacher):
    cfg = tiny_cfg("tar_retinanet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", retina_teacher,
                   "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]")
    model = build_model(cfg)
    with pytest.raises(TeacherError, match="anchors differ.*MODEL.ANCHOR_GENERATOR"):
        model.setup_teacher()


@pytest.mark.parametrize("preset", ["defeat_R34_to_R18.yaml", "defeat_retinanet_R34_to_R18.yaml"])
def test_defeat_presets_train(preset, teacher_ckpt, retina_teacher):
    w = retina_teacher if "retinanet" in preset else teacher_ckpt
    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", w)
    model = build_model(cfg)
    w0 = adapters(model)["p3"].weight.detach().clone()
    assert w0.abs().max() <= 2e-4
    losses, _ = train_steps(model, batches(cfg, 2))
    assert {"loss_kd_feat_fg", "loss_kd_feat_bg"} <= set(losses) and "loss_kd_cls" not in losses
    assert all(torch.isfinite(v) for v in losses.values())


def test_defeat_decoupled_proposals_and_backbone_kd(make_ckpt):
    r50 = ["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256]  # a bottleneck R50 teacher
    cfg = tiny_cfg("defeat_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", make_ckpt("faster_rcnn_R34_teacher.yaml", *r50),
                   "DISTILL.TEACHER.OPTS", str(r50),
                   "DISTILL.TERMS", "['DecoupledFeatureKD', 'DecoupledProposalKD', 'DecoupledBackboneKD']")
    model = build_model(cfg)
    # R18 res3..res5 have 128/256/512 channels, R50 512/1024/2048
    assert [adapters(model, "DecoupledBackboneKD")[k][0].weight.shape[:2] for k in ("res3", "res4", "res5")] == [
        (512, 128), (1024, 256), (2048, 512)]
    losses, _ = train_steps(model, batches(cfg, 1))
    for k in ("loss_kd_cls_fg", "loss_kd_cls_bg", "loss_kd_backbone_fg", "loss_kd_backbone_bg"):
        assert k in losses and torch.isfinite(losses[k]), k


def test_heterogeneous_widths(make_ckpt):
    # student: R18 with a 64-channel FPN; teacher: R34 with the synthetic 128-channel FPN
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", make_ckpt("faster_rcnn_R34_teacher.yaml"),
                   "MODEL.FPN.OUT_CHANNELS", 64)
    model = build_model(cfg)
    assert all(tuple(a.weight.shape[:2]) == (128, 64) for a in adapters(model).values())
    losses, _ = train_steps(model, batches(cfg, 1))
    assert torch.isfinite(losses["loss_kd_feat"]) and "loss_kd_box" in losses
    with pytest.raises(ValueError, match="'identity' needs equal channels, got student 64 vs teacher 128"):
        build_model(tiny_cfg("tar_R34_to_R18.yaml", "MODEL.FPN.OUT_CHANNELS", 64, "DISTILL.FEAT.ADAPTER", "identity"))


@pytest.mark.parametrize("preset,teacher_config", [
    ("cross_retinanet_R34_to_frcnn_R18.yaml", "retinanet_R34_teacher.yaml"),
    ("cross_frcnn_R34_to_retinanet_R18.yaml", "faster_rcnn_R34_teacher.yaml"),
])
def test_cross_family_feature_kd(preset, teacher_config, make_ckpt):
    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher_config))
    model = build_model(cfg)
    assert not model.needs_heads
    head_term = "RoIClsKD" if "frcnn_R18" in preset else "DenseClsKD"
    with pytest.raises(DistillConfigError, match=rf"{head_term} compares the two detectors' head outputs.*not of the "
                                                 r"student's family"):
        build_model(tiny_cfg(preset, "DISTILL.TERMS", f"['{cfg.DISTILL.TERMS[0]}', '{head_term}']"))
    if "frcnn_R18" in preset:  # terms that run the teacher's RPN need a Faster R-CNN teacher too
        for term in ("DecoupledProposalKD", "ReverseRoIClsKD", "TaskDecoupledFeatureKD"):
            with pytest.raises(DistillConfigError, match=rf"{term} runs the teacher's own RPN.*not of the student"):
                build_model(tiny_cfg(preset, "DISTILL.TERMS", f"['{cfg.DISTILL.TERMS[0]}', '{term}']",
                                     "DISTILL.UNUSED_KEYS", "warn"))
    losses, _ = train_steps(model, batches(cfg, 2))
    assert not any(k in losses for k in ("loss_kd_cls", "loss_kd_box"))
    assert any(k.startswith("loss_kd_feat") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_cross_family_unmatched_levels_are_named(make_ckpt):
    with pytest.raises(TeacherError, match=r"\['p2'\].*student has.*teacher has \['p3', 'p4', 'p5', 'p6', 'p7', 'res3'"):
        build_model(tiny_cfg("cross_retinanet_R34_to_frcnn_R18.yaml", "DISTILL.FEAT.LEVELS",
                             "['p2', 'p3', 'p4', 'p5', 'p6']"))
