"""DistillGeneralizedRCNN with a real (tiny-input) R34 teacher and R18 student on CPU."""
import copy
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import REPO, SYN, TINY_OPTS, adapters, tiny_cfg
from distill_d2.export import export_student, student_cfg_from
from distill_d2.errors import TeacherError

TAR = "tar_R34_to_R18.yaml"


def distill_cfg(teacher_ckpt, *opts):
    return tiny_cfg(TAR, "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, *opts)


def batches(cfg, n):
    it = iter(build_detection_train_loader(cfg))
    return [next(it) for _ in range(n)]


def train_steps(model, data, lr=0.002):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    with EventStorage() as storage:
        for batch in data:
            losses = model(batch)
            opt.zero_grad()
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # random teacher: large feature KD
            opt.step()
            model.log_kd_scalars(storage)
            storage.step()
    return losses, storage


@pytest.fixture(scope="module")
def model_and_data(teacher_ckpt):
    cfg = distill_cfg(teacher_ckpt)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.setup_teacher()
    return cfg, model, batches(cfg, 3)


def test_teacher_is_outside_module_tree(model_and_data):
    cfg, model, _ = model_and_data
    keys = model.state_dict().keys()
    assert not any("teacher" in k for k in keys)
    assert any(k.startswith("kd_terms.FeatureKD.adapters.p2") for k in keys)
    teacher_params = {id(p) for p in model.teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model.train()
    model.teacher.train()
    assert not model.teacher.training and not any(m.training for m in model.teacher.modules())


def test_losses_named_and_teacher_frozen_student_trained(model_and_data):
    cfg, model, data = model_and_data
    t_state = copy.deepcopy(model.teacher.state_dict())  # params and BN buffers
    s_state = copy.deepcopy({k: v for k, v in model.state_dict().items() if not k.startswith("kd_")})
    a_state = copy.deepcopy(adapters(model).state_dict())
    losses, storage = train_steps(model, data)
    assert {"loss_kd_feat", "loss_kd_cls", "loss_kd_box", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k
    assert any("running_mean" in k for k in t_state)
    changed = [k for k, v in model.state_dict().items() if k in s_state and not torch.equal(v, s_state[k])]
    assert any(k.startswith("backbone.bottom_up") for k in changed) and any(k.startswith("roi_heads") for k in changed)
    assert all(not torch.equal(v, a_state[k]) for k, v in adapters(model).state_dict().items())
    hist = storage.histories()
    assert "kd/cls_gate_frac" in hist and "kd/box_gate_frac" in hist
    assert 0.0 <= hist["kd/box_gate_frac"].latest() <= 1.0


def test_teacher_scores_exactly_the_students_sampled_rois(model_and_data):
    cfg, model, data = model_and_data
    seen = {}
    orig = model.roi_heads.label_and_sample_proposals

    def spy_sample(*a, **k):
        seen["student"] = orig(*a, **k)
        return seen["student"]

    def spy_pool(mod, args):
        seen.setdefault("teacher", [b.tensor.clone() for b in args[1]])

    h = model.teacher.roi_heads.box_pooler.register_forward_pre_hook(spy_pool)
    model.roi_heads.label_and_sample_proposals = spy_sample
    try:
        train_steps(model, data[:1])
    finally:
        del model.roi_heads.label_and_sample_proposals
        h.remove()
    s = [r.proposal_boxes.tensor for r in seen["student"]]
    assert len(s) == len(seen["teacher"]) == cfg.SOLVER.IMS_PER_BATCH
    for a, b in zip(s, seen["teacher"]):
        assert torch.equal(a, b)


def test_kd_weight_scales_every_kd_term(model_and_data):
    cfg, model, data = model_and_data
    model.train()
    with EventStorage():
        torch.manual_seed(1)
        full = model(data[0])
        model.kd_weight = 0.25
        torch.manual_seed(1)
        quarter = model(data[0])
        model.kd_weight = 1.0
    for k in ("loss_kd_feat", "loss_kd_cls", "loss_kd_box"):
        assert quarter[k].item() == pytest.approx(0.25 * full[k].item(), rel=1e-4, abs=1e-7)


def test_reverse_proposals_add_a_term(teacher_ckpt):
    cfg = distill_cfg(teacher_ckpt, "DISTILL.TERMS", "['FeatureKD', 'RoIClsKD', 'RoIBoxKD', 'ReverseRoIClsKD']")
    model = build_model(cfg)
    losses, _ = train_steps(model, batches(cfg, 1))
    assert "loss_kd_cls_reverse" in losses and torch.isfinite(losses["loss_kd_cls_reverse"])


def test_inference_is_exactly_the_student_and_export_round_trip(model_and_data, tmp_path):
    cfg, model, _ = model_and_data
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("distill")
    out = tmp_path / "student.pth"
    n = export_student(cfg, str(tmp_path / "distill.pth"), str(out))
    student = build_model(student_cfg_from(cfg))
    assert type(student).__name__ == "GeneralizedRCNN"
    ck = DetectionCheckpointer(student)
    incompatible = {}
    orig = ck._log_incompatible_keys
    ck._log_incompatible_keys = lambda inc: (incompatible.update(inc=inc), orig(inc))
    ck.load(str(out))
    inc = incompatible["inc"]
    assert not inc.missing_keys and not inc.unexpected_keys and not inc.incorrect_shapes
    assert n == len(student.state_dict())
    model.eval()
    student.eval()
    batch = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], student(batch)[0]["instances"]
    assert len(a) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


def test_export_rejects_a_foreign_checkpoint(teacher_ckpt, tmp_path):
    cfg = distill_cfg(teacher_ckpt)
    with pytest.raises(KeyError, match="missing"):
        export_student(cfg, teacher_ckpt, str(tmp_path / "x.pth"))  # an R34 checkpoint for an R18 student


# ----------------------------------------------------------------------- errors
def test_wrong_teacher_weights_abort_naming_keys(teacher_ckpt, tmp_path):
    student = build_model(tiny_cfg("faster_rcnn_R18_student.yaml"))
    DetectionCheckpointer(student, save_dir=str(tmp_path)).save("r18")
    cfg = distill_cfg(str(tmp_path / "r18.pth"))
    model = build_model(cfg)
    with pytest.raises(TeacherError, match=r"does not match.*(missing keys|unexpected keys).*backbone.bottom_up"):
        model.setup_teacher()


def test_non_strict_teacher_load_only_warns(teacher_ckpt, tmp_path, caplog):
    sd = torch.load(teacher_ckpt, weights_only=False)
    sd["model"]["extra.weight"] = torch.zeros(1)
    del sd["model"]["roi_heads.box_predictor.bbox_pred.bias"]
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(TeacherError, match="unexpected keys: extra.weight"):
        build_model(distill_cfg(str(tmp_path / "t.pth"))).setup_teacher()
    model = build_model(distill_cfg(str(tmp_path / "t.pth"), "DISTILL.TEACHER.STRICT_LOAD", "False"))
    with caplog.at_level(logging.WARNING):
        model.setup_teacher()
    assert "roi_heads.box_predictor.bbox_pred.bias" in caplog.text


def test_class_count_mismatch(teacher_ckpt):
    with pytest.raises(TeacherError, match="Class-count mismatch: the student predicts 6 classes but the teacher 5"):
        build_model(distill_cfg(teacher_ckpt, "DISTILL.TEACHER.OPTS", "['MODEL.ROI_HEADS.NUM_CLASSES', '5']"))


def test_missing_levels_and_stride_mismatch(teacher_ckpt):
    with pytest.raises(TeacherError, match=r"\['p2'\].*not produced by both"):
        build_model(distill_cfg(teacher_ckpt, "DISTILL.TEACHER.OPTS",
                                "['MODEL.FPN.IN_FEATURES', ['res3', 'res4', 'res5']]"))
    # plain ResNet outputs: dilated res5 has stride 16 in the teacher, 32 in the student
    plain = ["MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RPN.IN_FEATURES", "['res4']",
             "MODEL.ROI_HEADS.IN_FEATURES", "['res4']", "MODEL.RESNETS.OUT_FEATURES", "['res4', 'res5']",
             "MODEL.ANCHOR_GENERATOR.SIZES", "[[32, 64]]"]
    t_opts = str(plain + ["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "MODEL.RESNETS.RES5_DILATION", 2])
    with pytest.raises(TeacherError, match=r"Stride mismatch on feature level\(s\) res5 \(student stride 32, teacher 16\)"):
        build_model(distill_cfg(teacher_ckpt, *plain, "DISTILL.FEAT.LEVELS", "['res5']", "DISTILL.TEACHER.OPTS", t_opts))


def test_missing_files_and_empty_weights(teacher_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="Train the teacher first"):
        build_model(distill_cfg(str(tmp_path / "none.pth"))).setup_teacher()
    with pytest.raises(FileNotFoundError, match="Teacher config 'nope.yaml' not found"):
        tiny_cfg(TAR, "DISTILL.TEACHER.CONFIG_FILE", "nope.yaml")
    model = build_model(tiny_cfg(TAR, "DISTILL.TEACHER.WEIGHTS", ""))  # teacher yaml has MODEL.WEIGHTS ""
    with pytest.raises(TeacherError, match="The teacher has no weights"):
        model.setup_teacher()


def test_box_coder_mismatch(teacher_ckpt):
    model = build_model(distill_cfg(teacher_ckpt, "DISTILL.TEACHER.OPTS",
                                    "['MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS', (1.0, 1.0, 1.0, 1.0)]"))
    with pytest.raises(TeacherError, match="BBOX_REG_WEIGHTS"):
        model.setup_teacher()


def test_two_process_cpu_launch_of_distillation(teacher_ckpt, tmp_path, datasets_dir):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2", "--config-file",
           os.path.join(SYN, TAR)] + TINY_OPTS + ["SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR",
                                                  str(tmp_path), "DISTILL.TEACHER.WEIGHTS", teacher_ckpt,
                                                  "DISTILL.GUARD.ACTION", "warn"]  # random teacher: off scale
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "World size: 2" in log and "loss_kd_feat" in log
    sd = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert any(k.startswith("kd_terms.FeatureKD.adapters") for k in sd) and not any("teacher" in k for k in sd)


# ------------------------------------------------------------ trainer / train_net
def test_trainer_decay_logging_resume_teacher_eval_and_eval_only(teacher_ckpt, tmp_path, caplog):
    from detectron2.engine import default_argument_parser

    from distill_d2.engine import Trainer, main
    from distill_d2.schedule import kd_weight

    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2, "DISTILL.GUARD.ACTION", "warn", "OUTPUT_DIR", str(out),
            "DISTILL.TEACHER.EVAL_BEFORE_TRAIN", "True"]
    cfg = distill_cfg(teacher_ckpt, *opts)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with caplog.at_level(logging.INFO, logger="distill_d2.hooks"):
        trainer.train()
    assert re.search(r"iter: 3  kd_weight: 0.25  kd/box_gate_frac: [\d.]+  kd/cls_gate_frac: [\d.]+", caplog.text)
    got = {it: v for v, it in trainer.storage.history("kd_weight").values()}
    assert got == {i: pytest.approx(kd_weight(i, 4, cfg.DISTILL.DECAY)) for i in range(4)}
    assert got[2] == pytest.approx(0.5)
    assert "teacher/synthetic_tiny_val/AP" in trainer.storage.histories()
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()

    # resume from iteration 2: lambda continues exactly where it was
    (out / "last_checkpoint").write_text("model_0000001.pth")
    resumed = Trainer(distill_cfg(teacher_ckpt, *opts[:-2]))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    got2 = {it: v for v, it in resumed.storage.history("kd_weight").values()}
    assert got2 == {2: pytest.approx(0.5), 3: pytest.approx(0.25)}

    # --eval-only: distill config + distill checkpoint == student config + exported checkpoint
    def eval_only(config, weights, sub, *extra):
        argv = ["--config-file", os.path.join(SYN, config), "--eval-only"] + TINY_OPTS + [
            "OUTPUT_DIR", str(tmp_path / sub), "MODEL.WEIGHTS", weights] + list(extra)
        return main(default_argument_parser().parse_args(argv))["bbox"]

    a = eval_only(TAR, str(out / "model_final.pth"), "ev_distill")
    # inference never needs the teacher: its config and weights may be gone
    a2 = eval_only(TAR, str(out / "model_final.pth"), "ev_no_teacher", "DISTILL.TEACHER.CONFIG_FILE",
                   str(tmp_path / "gone.yaml"), "DISTILL.TEACHER.WEIGHTS", str(tmp_path / "gone.pth"))
    export_student(cfg, str(out / "model_final.pth"), str(tmp_path / "student.pth"))
    b = eval_only("faster_rcnn_R18_student.yaml", str(tmp_path / "student.pth"), "ev_student")
    def same(x, y):  # equal, NaN (metric without objects, e.g. APl on tiny val) matching NaN
        return x == y or (x != x and y != y)

    assert set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    assert set(a2) == set(a) and all(same(a[k], a2[k]) for k in a)
    from distill_d2.export import main as export_main

    export_main(["--config-file", os.path.join(SYN, TAR), "--input", str(out / "model_final.pth"), "--output",
                 str(tmp_path / "student2.pth"), "DISTILL.TEACHER.CONFIG_FILE", str(tmp_path / "gone.yaml")] + TINY_OPTS)
    s1 = torch.load(tmp_path / "student.pth", weights_only=False)["model"]
    s2 = torch.load(tmp_path / "student2.pth", weights_only=False)["model"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert a["AP"] == a["AP"]  # AP itself is a number


def test_off_scale_kd_loss_stops_the_run(teacher_ckpt, tmp_path):
    """A random teacher's features give loss_kd_feat thousands of times the detection losses: stop at once."""
    from detectron2.engine import default_argument_parser

    from distill_d2.engine import main

    argv = ["--config-file", os.path.join(SYN, TAR)] + TINY_OPTS + [
        "OUTPUT_DIR", str(tmp_path), "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DATASETS.TEST", "()"]
    with pytest.raises(FloatingPointError, match=r"loss_kd_feat = .* at iteration 0 is .*x the detection losses.*"
                                                 r"teacher weights"):
        main(default_argument_parser().parse_args(argv))
    assert not (tmp_path / "model_final.pth").exists()
