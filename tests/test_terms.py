"""The term registry: build-time checks, a toy term trained through train_net's code path,
what the meta-architecture records (and does not compute), legacy checkpoints."""
import json
import os

import pytest
import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode as CN
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.utils.events import EventStorage

from conftest import SYN, TINY_OPTS, tiny_cfg
from distill_d2.engine import main
from distill_d2.errors import TeacherError
from distill_d2.errors import DistillConfigError
from distill_d2.terms import DISTILL_TERM_REGISTRY, DistillTerm, distilled_levels
from test_distill_rcnn import batches, train_steps
from test_regression import fixed_batch


# --------------------------------------------------------------- a toy method from this file
@DISTILL_TERM_REGISTRY.register()
class ToyMeanMatchKD(DistillTerm):
    """Toy term: squared difference of the per-channel means of one level, through a 1x1 adapter."""

    reads = ("TOY.*",)

    @classmethod
    def add_config(cls, d):
        d.TOY = CN()
        d.TOY.LEVEL = "p3"
        d.TOY.WEIGHT = 1.0

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.level, self.weight = cfg.DISTILL.TOY.LEVEL, cfg.DISTILL.TOY.WEIGHT
        distilled_levels(ctx, [self.level], "DISTILL.TOY.LEVEL")
        s, t = ctx.student_shapes[self.level].channels, ctx.teacher_shapes[self.level].channels
        self.adapter = nn.Conv2d(s, t, 1)

    def forward(self, rec):
        s = self.adapter(rec.features[self.level]).mean(dim=(2, 3))
        t = rec.t_features[self.level].mean(dim=(2, 3))
        return {"loss_kd_toy": self.weight * ((s - t) ** 2).mean()}, {"kd/toy_gap": (s - t).abs().mean()}


def test_toy_term_trains_through_train_net(teacher_ckpt, tmp_path):
    preset = tmp_path / "toy_R34_to_R18.yaml"
    preset.write_text(
        f'_BASE_: "{os.path.join(SYN, "faster_rcnn_R18_student.yaml")}"\n'
        'MODEL:\n  META_ARCHITECTURE: "DistillGeneralizedRCNN"\n'
        f'DISTILL:\n  TEACHER:\n    CONFIG_FILE: "{os.path.join(SYN, "faster_rcnn_R34_teacher.yaml")}"\n'
        '  TERMS: ["ToyMeanMatchKD"]\n  TOY:\n    LEVEL: "p4"\n    WEIGHT: 2.0\n')
    argv = ["--config-file", str(preset)] + TINY_OPTS + [
        "OUTPUT_DIR", str(tmp_path / "out"), "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DATASETS.TEST", "()",
        "DISTILL.GUARD.ACTION", "off"]
    main(default_argument_parser().parse_args(argv))
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    last = metrics[-1]
    assert last["iteration"] == 1 and last["loss_kd_toy"] > 0 and "kd/toy_gap" in last
    sd = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)["model"]
    assert "kd_terms.ToyMeanMatchKD.adapter.weight" in sd


# --------------------------------------------------------------- build-time errors
@pytest.mark.parametrize("opts,match", [
    (["DISTILL.TERMS", "[]"], "DISTILL.TERMS is empty"),
    (["DISTILL.TERMS", "['FeatureKD', 'NoSuchKD']"], "Unknown distillation term 'NoSuchKD'"),
    (["DISTILL.TERMS", "['FeatureKD', 'FeatureKD']"], r"lists \['FeatureKD'\] more than once"),
    (["DISTILL.FEAT.MASK", "gausian"], "Unknown DISTILL.FEAT.MASK 'gausian'"),
    (["DISTILL.FEAT.NORM", "l2"], "Unknown DISTILL.FEAT.NORM 'l2'"),
    (["DISTILL.FEAT.NORM", "decoupled"], "list DecoupledFeatureKD in DISTILL.TERMS"),
    (["DISTILL.FEAT.ADAPTER", "conv5x5"], "Unknown DISTILL.FEAT.ADAPTER 'conv5x5'"),
    (["DISTILL.FEAT.LEVELS", "[]"], "DISTILL.FEAT.LEVELS is empty"),
    (["DISTILL.CLS.GATE", "better"], "Unknown DISTILL.CLS.GATE 'better'"),
    (["DISTILL.CLS.ROIS", "some"], "Unknown DISTILL.CLS.ROIS 'some'"),
    (["DISTILL.TAR.BOX_GATE", "iou"], "Unknown DISTILL.TAR.BOX_GATE 'iou'"),
    (["DISTILL.TAR.BOX_NORMALIZER", "n"], "Unknown DISTILL.TAR.BOX_NORMALIZER 'n'"),
    (["DISTILL.DECAY.TYPE", "exp"], "Unknown DISTILL.DECAY.TYPE 'exp'"),
    (["DISTILL.TERMS", "['FeatureKD', 'DenseClsKD']"], "DenseClsKD does not work with a Faster R-CNN"),
    (["DISTILL.DEFEAT.CLS_FG_WEIGHT", "3.0"], r"DISTILL.DEFEAT.CLS_FG_WEIGHT = 3.0 \(read by: DecoupledProposalKD\)"),
    (["DISTILL.DEFEAT.BACKBONE_LEVELS", "['res4']"], "DISTILL.DEFEAT.BACKBONE_LEVELS"),
])
def test_bad_settings_fail_at_build(opts, match):
    cfg = tiny_cfg("tar_R34_to_R18.yaml", *opts)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


@pytest.mark.parametrize("key,value", [("DISTILL.CLS.ROIS", "all"), ("DISTILL.CLS.GATE", "teacher_better"),
                                       ("DISTILL.DEFEAT.CLS_BG_TEMPERATURE", "2.0"),
                                       ("DISTILL.FEAT.NORM", "mean")])
def test_keys_the_retinanet_preset_ignores_are_errors(key, value):
    cfg = tiny_cfg("defeat_retinanet_R34_to_R18.yaml" if key.endswith("NORM") else "tar_retinanet_R34_to_R18.yaml",
                   key, value)
    with pytest.raises(DistillConfigError, match=rf"{key} = .*silently ignored|silently ignored.*{key}"):
        build_model(cfg)


def test_unused_keys_can_be_downgraded_to_a_warning(caplog):
    import logging

    cfg = tiny_cfg("tar_retinanet_R34_to_R18.yaml", "DISTILL.TERMS", "['DenseClsKD', 'DenseBoxKD']",
                   "DISTILL.UNUSED_KEYS", "warn")  # an ablation: the preset's FEAT settings go unused
    with caplog.at_level(logging.WARNING):
        model = build_model(cfg)
    assert "DISTILL.FEAT.WEIGHT = 0.01" in caplog.text and list(model.kd_terms) == ["DenseClsKD", "DenseBoxKD"]
    with pytest.raises(DistillConfigError, match="Unknown DISTILL.UNUSED_KEYS 'maybe'"):
        build_model(tiny_cfg("tar_retinanet_R34_to_R18.yaml", "DISTILL.UNUSED_KEYS", "maybe"))


@pytest.mark.parametrize("old,term", [("DISTILL.FEAT.ENABLED", "FeatureKD"), ("DISTILL.CLS.ENABLED", "RoIClsKD"),
                                      ("DISTILL.PROPOSALS.REVERSE", "ReverseRoIClsKD"),
                                      ("DISTILL.DEFEAT_CLS.ENABLED", "DecoupledProposalKD"),
                                      ("DISTILL.BACKBONE.ENABLED", "DecoupledBackboneKD")])
def test_old_switches_name_the_term(old, term):
    with pytest.raises(KeyError, match=rf"renamed to DISTILL.TERMS.*{term}"):
        tiny_cfg("tar_R34_to_R18.yaml", old, "True")


def test_distill_block_on_a_plain_detector_is_an_error():
    with pytest.raises(ValueError, match=r"DISTILL.TEACHER.WEIGHTS.*'GeneralizedRCNN', a plain detector"):
        tiny_cfg("faster_rcnn_R18_student.yaml", "DISTILL.TEACHER.WEIGHTS", "teacher.pth")
    with pytest.raises(ValueError, match="plain detector"):
        tiny_cfg("tar_R34_to_R18.yaml", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN")


@ROI_HEADS_REGISTRY.register()
class OwnForwardROIHeads(StandardROIHeads):
    def forward(self, images, features, proposals, targets=None):
        return super().forward(images, features, proposals, targets)


def test_roi_heads_that_override_forward(teacher_ckpt):
    opts = ["DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "MODEL.ROI_HEADS.NAME", "OwnForwardROIHeads"]
    with pytest.raises(TeacherError, match=r"OwnForwardROIHeads overrides forward\(\)"):
        build_model(tiny_cfg("tar_R34_to_R18.yaml", *opts))
    cfg = tiny_cfg("fitnet_R34_to_R18.yaml", *opts)  # feature terms only: any ROI heads, their own logic runs
    losses, _ = train_steps(build_model(cfg), batches(cfg, 1))
    assert "loss_kd_feat" in losses and "loss_cls" in losses


# --------------------------------------------------------------- what is (not) computed
def count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize("preset,teacher_head_calls", [("fitnet_R34_to_R18.yaml", 0), ("tar_R34_to_R18.yaml", 1),
                                                       ("hinton_R34_to_R18.yaml", 1)])
def test_teacher_head_runs_only_for_head_terms(preset, teacher_head_calls, teacher_ckpt):
    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", teacher_ckpt)
    model = build_model(cfg)
    t = model.setup_teacher()
    t_box, h1 = count_calls(t.roi_heads.box_predictor)
    t_bb, h2 = count_calls(t.backbone)
    s_bb, h3 = count_calls(model.backbone)
    try:
        train_steps(model, batches(cfg, 1))
    finally:
        for h in (h1, h2, h3):
            h.remove()
    assert len(t_box) == teacher_head_calls and len(t_bb) == 1 and len(s_bb) == 1


def test_record_holds_bottom_up_and_fpn_of_both_models(teacher_ckpt):
    seen = {}

    @DISTILL_TERM_REGISTRY.register()
    class SpyRecordKD(DistillTerm):
        def forward(self, rec):
            seen["rec"] = rec
            return {}, {}

    cfg = tiny_cfg("hinton_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DISTILL.TERMS",
                   "['RoIClsKD', 'SpyRecordKD']")
    model = build_model(cfg)
    train_steps(model, batches(cfg, 1))
    rec = seen["rec"]
    names = ["res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"]
    assert all(k in rec.features and k in rec.t_features for k in names)
    assert rec.features["res2"].requires_grad and not rec.t_features["res2"].requires_grad
    assert rec.strides["res2"] == 4 and rec.strides["p6"] == 64
    r = rec.rois
    assert r.logits.shape == r.t_logits.shape == (len(r.gt_classes), 7) and r.logits.requires_grad
    assert r.proposal_boxes.shape == r.gt_boxes.shape == (len(r.gt_classes), 4)


def test_teacher_gets_the_batch_in_its_channel_order(teacher_ckpt):
    # student BGR (synthetic configs), teacher RGB: the teacher must see the channels flipped
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt,
                   "DISTILL.TEACHER.OPTS", "['INPUT.FORMAT', 'RGB', 'MODEL.PIXEL_MEAN', [1.0, 2.0, 3.0]]")
    model = build_model(cfg)
    t = model.setup_teacher()
    batch = fixed_batch(cfg)
    images = model.preprocess_image(batch)
    t_images = model.teacher_preprocess(batch, images)
    x = batch[0]["image"].float()
    want = (x.flip(0) - torch.tensor([1.0, 2.0, 3.0])[:, None, None]) / t.pixel_std
    h, w = x.shape[1:]
    assert torch.allclose(t_images.tensor[0, :, :h, :w], want)
    assert not torch.allclose(t_images.tensor[0, :, :h, :w], (x - torch.tensor([1.0, 2.0, 3.0])[:, None, None]) / t.pixel_std)


def test_first_step_checks_teacher_outputs_are_finite(teacher_ckpt, tmp_path):
    sd = torch.load(teacher_ckpt, weights_only=False)
    sd["model"]["backbone.fpn_output3.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    cfg = tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", str(tmp_path / "nan.pth"))
    with pytest.raises(FloatingPointError, match="teacher produced non-finite feature map p3"):
        train_steps(build_model(cfg), batches(cfg, 1))


def test_old_layout_checkpoint_loads_adapters_into_their_term(teacher_ckpt, tmp_path):
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt)
    model = build_model(cfg)
    sd = {k.replace("kd_terms.FeatureKD.adapters.", "kd_adapters."): v.clone() + 1
          for k, v in model.state_dict().items()}
    assert "kd_adapters.p2.weight" in sd
    torch.save({"model": sd}, tmp_path / "old.pth")
    fresh = build_model(cfg)
    DetectionCheckpointer(fresh).load(str(tmp_path / "old.pth"))
    assert torch.equal(fresh.kd_terms["FeatureKD"].adapters["p2"].weight, sd["kd_adapters.p2.weight"])


def test_term_loss_names_must_not_clash(teacher_ckpt):
    @DISTILL_TERM_REGISTRY.register()
    class ClashKD(DistillTerm):
        def forward(self, rec):
            return {"loss_cls": rec.features["p2"].sum() * 0}, {}

    cfg = tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt,
                   "DISTILL.TERMS", "['FeatureKD', 'ClashKD']")
    model = build_model(cfg)
    model.train()
    with EventStorage(), pytest.raises(ValueError, match="ClashKD returned.*must start with 'loss_kd_'"):
        model(batches(cfg, 1)[0])


def guide_example(i, tmp_path):
    """The i-th worked example of docs/ADDING_A_METHOD.md: its term file executed (registering the term)
    and its preset written to ``tmp_path`` (the _BASE_ and teacher paths made absolute). Returns the preset."""
    import re

    from conftest import REPO

    text = open(os.path.join(REPO, "docs", "ADDING_A_METHOD.md")).read()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[i]
    yaml_text = re.findall(r"```yaml\n(.*?)```", text, re.S)[i]
    term = re.search(r"^class (\w+)\(", code, re.M).group(1)
    if term not in DISTILL_TERM_REGISTRY:
        exec(compile(code, "ADDING_A_METHOD.md", "exec"), {"__name__": f"guide_{term}"})
    name = re.search(r"`configs/synthetic/(\w+\.yaml)`", text[text.index(code):]).group(1)
    assert not os.path.exists(os.path.join(SYN, name)), "the guide's preset must not be shipped as an untested method"
    for f in re.findall(r'"(\w+\.yaml)"', yaml_text):  # relative to configs/synthetic
        yaml_text = yaml_text.replace(f'"{f}"', f'"{os.path.join(SYN, f)}"')
    preset = tmp_path / name
    preset.write_text(yaml_text)
    return str(preset)


def test_adding_a_method_guide_works(teacher_ckpt, tmp_path):
    """docs/ADDING_A_METHOD.md: its first term file and preset, exactly as written, train two iterations."""
    preset = guide_example(0, tmp_path)
    argv = ["--config-file", preset] + TINY_OPTS + [
        "OUTPUT_DIR", str(tmp_path / "out"), "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DATASETS.TEST", "()"]
    main(default_argument_parser().parse_args(argv))
    last = [json.loads(x) for x in (tmp_path / "out" / "metrics.json").read_text().splitlines()][-1]
    assert last["iteration"] == 1 and last["loss_kd_at"] > 0


def test_guide_cross_pass_term_trains_the_right_layers(make_ckpt, tmp_path):
    """The guide's second example (a tap + a cross pass through the teacher's head) trains through train_net,
    and its loss reaches the student's first head conv and FPN, not the layers after the tap, nor the teacher."""
    preset = guide_example(1, tmp_path)
    ckpt = make_ckpt("retinanet_R34_teacher.yaml")
    argv = ["--config-file", preset] + TINY_OPTS + [
        "OUTPUT_DIR", str(tmp_path / "out"), "DISTILL.TEACHER.WEIGHTS", ckpt, "DATASETS.TEST", "()"]
    main(default_argument_parser().parse_args(argv))
    last = [json.loads(x) for x in (tmp_path / "out" / "metrics.json").read_text().splitlines()][-1]
    assert last["iteration"] == 1 and last["loss_kd_cross"] > 0

    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", ckpt)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        loss = model(batches(cfg, 1)[0])["loss_kd_cross"]
    named = dict(model.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
    reached = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert {"head.cls_subnet.0.weight", "backbone.fpn_output3.weight"} <= reached
    assert not reached & {"head.cls_subnet.3.weight", "head.cls_score.weight", "head.cls_score.bias",
                          "head.bbox_subnet.0.weight", "head.bbox_pred.weight"}
    teacher = model.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training and not any(m.training for m in teacher.modules())


@pytest.mark.parametrize("preset,teacher", [("tar_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml"),
                                            ("tar_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml")])
def test_mixed_precision_teacher_in_autocast_kd_losses_in_float32(preset, teacher, make_ckpt):
    """SOLVER.AMP on CPU (what CPU can check: bfloat16 autocast; detectron2's AMPTrainer itself needs CUDA).
    The box gate is off: its hard teacher-better decisions flip for borderline anchors under a bfloat16
    teacher (measured on an AMD EPYC: RetinaNet loss_kd_box 0.124 vs 0.092 in float32, a discrete jump,
    not an AMP error); the gates are tested in float32 in test_methods.py."""
    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher), "DISTILL.TAR.BOX_GATE", "none")
    torch.manual_seed(0)
    model = build_model(cfg)
    t = model.setup_teacher()
    model.train()
    batch = fixed_batch(cfg)
    dtypes, adapter_dtypes = [], []
    h = t.backbone.register_forward_hook(lambda m, i, o: dtypes.append(next(iter(o.values())).dtype))
    h2 = model.kd_terms["FeatureKD"].adapters["p3"].register_forward_hook(
        lambda m, i, o: adapter_dtypes.append(o.dtype))
    try:
        with EventStorage():
            torch.manual_seed(1)
            ref = model(batch)
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                amp = model(batch)
    finally:
        h.remove()
        h2.remove()
    assert dtypes == [torch.float32, torch.bfloat16]  # the teacher ran under autocast
    assert adapter_dtypes == [torch.float32, torch.float32]  # the terms (adapters included) did not
    kd = [k for k in ref if k.startswith("loss_kd_")]
    assert len(kd) == 3
    for k in kd:
        assert amp[k].dtype == torch.float32, k
        assert amp[k].item() == pytest.approx(ref[k].item(), rel=0.03, abs=1e-3), k
    sum(amp.values()).backward()
    grads = [p.grad for p in model.kd_terms["FeatureKD"].adapters.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_typo_in_a_key_is_an_error():
    with pytest.raises(KeyError, match="Unknown config key DISTILL.FEAT.MAKS .*did you mean DISTILL.FEAT.MASK"):
        tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.FEAT.MAKS", "box")


def test_nan_term_stops_the_run_naming_it(teacher_ckpt, tmp_path):
    @DISTILL_TERM_REGISTRY.register()
    class NaNAfterOneStepKD(DistillTerm):
        def forward(self, rec):
            return {"loss_kd_nan": rec.features["p2"].sum() * float("nan")}, {}

    argv = ["--config-file", os.path.join(SYN, "fitnet_R34_to_R18.yaml")] + TINY_OPTS + [
        "OUTPUT_DIR", str(tmp_path), "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DATASETS.TEST", "()",
        "DISTILL.TERMS", "['FeatureKD', 'NaNAfterOneStepKD']", "DISTILL.GUARD.ACTION", "off"]
    with pytest.raises(FloatingPointError, match=r"(?s)Loss became infinite or NaN.*loss_kd_nan': nan"):
        main(default_argument_parser().parse_args(argv))


# --------------------------------------------------------------- weights must be finite and >= 0
def test_every_weight_key_of_every_term_is_checked():
    """Found by name (``*WEIGHT``, ``*WEIGHTS``) + the declared list, so a new term's weights are covered
    (the toy term of this file included); each one negative, NaN or infinite is refused naming it."""
    from distill_d2.config import flat_items
    from distill_d2.config import default_distill_node
    from distill_d2.terms import check_weights, is_weight_key

    node = default_distill_node()
    keys = {k for k, v in flat_items(node) if is_weight_key(k) and not isinstance(v, str)}
    assert keys >= {
        "FEAT.WEIGHT", "DEFEAT.FG_WEIGHT", "DEFEAT.BG_WEIGHT", "CLS.WEIGHT", "TAR.BOX_WEIGHT",
        "DEFEAT.BACKBONE_FG_WEIGHT", "DEFEAT.BACKBONE_BG_WEIGHT", "DEFEAT.CLS_FG_WEIGHT", "DEFEAT.CLS_BG_WEIGHT",
        "HGD.WEIGHT", "HGD.FG_WEIGHT",
        "HGD.BG_WEIGHT", "HGD.STAGE_WEIGHTS", "TBD.HD_WEIGHT", "TBD.HD_BG_WEIGHT", "TBD.FEAT_WEIGHT",
        "TBD.CLS_MASK_WEIGHT", "TBD.REG_MASK_WEIGHT", "DECAY.END_VALUE", "DECAY.GAMMA", "TOY.WEIGHT"}
    assert not keys & {"CLS.TEMPERATURE", "DEFEAT.CLS_BG_TEMPERATURE", "GUARD.MAX_RATIO_TO_DET", "DECAY.STOP_ITER",
                       "TEACHER.WEIGHTS"}  # (a file)
    check_weights(node)  # the defaults pass
    for key in sorted(keys):
        for bad, match in ((-0.5, "is negative"), (float("nan"), "is not finite"), (float("inf"), "is not finite")):
            n = node.clone()
            parent, leaf = n, key.split(".")
            for part in leaf[:-1]:
                parent = parent[part]
            parent[leaf[-1]] = [1.0, bad] if isinstance(parent[leaf[-1]], list) else bad
            with pytest.raises(DistillConfigError, match=rf"DISTILL\.{key} = .* {match}"):
                check_weights(n)


@pytest.mark.parametrize("opts,match", [
    (["DISTILL.FEAT.WEIGHT", "-0.5"], r"DISTILL.FEAT.WEIGHT = -0.5 is negative: a negative weight rewards"),
    (["DISTILL.TAR.BOX_WEIGHT", "1e999"], r"DISTILL.TAR.BOX_WEIGHT = inf is not finite"),
    (["DISTILL.DECAY.END_VALUE", "-0.1"], r"DISTILL.DECAY.END_VALUE = -0.1 is negative"),
    (["DISTILL.DECAY.TYPE", "step", "DISTILL.DECAY.STEPS", "(1,)", "DISTILL.DECAY.GAMMA", "-1.0"],
     r"DISTILL.DECAY.GAMMA = -1.0 is negative"),
])
def test_negative_or_non_finite_weights_stop_the_build(opts, match):
    with pytest.raises(DistillConfigError, match=match):
        build_model(tiny_cfg("tar_R34_to_R18.yaml", *opts))


def test_nan_weight_in_a_yaml_and_a_term_declared_key(tmp_path):
    """YAML's ``.nan`` reaches the config as a float (the command line cannot: yacs refuses 'nan'); a term's
    ``nonnegative`` patterns cover keys not named *WEIGHT; lists are checked element by element."""
    preset = tmp_path / "my_hgd.yaml"
    preset.write_text(f'_BASE_: "{os.path.join(SYN, "tar_R34_to_R18.yaml")}"\nDISTILL:\n  CLS:\n    WEIGHT: .nan\n')
    with pytest.raises(DistillConfigError, match=r"DISTILL.CLS.WEIGHT = nan is not finite"):
        build_model(tiny_cfg(str(preset)))
    with pytest.raises(DistillConfigError, match=r"DISTILL.HGD.STAGE_WEIGHTS = \[1.0, -2.0.*is negative"):
        build_model(tiny_cfg("hgd_R34_to_R18.yaml", "DISTILL.HGD.MACRO", "fixed", "DISTILL.HGD.STAGE_WEIGHTS",
                             "[1.0, -2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]"))

    from distill_d2.config import default_distill_node
    from distill_d2.terms import check_weights

    class ScaledKD(DistillTerm):
        nonnegative = ("TOY.LEVEL_SCALE",)

    node = default_distill_node()
    node.TOY.LEVEL_SCALE = -3.0
    check_weights(node)  # no term declares it
    with pytest.raises(DistillConfigError, match=r"DISTILL.TOY.LEVEL_SCALE = -3.0 is negative"):
        check_weights(node, [ScaledKD])


# --------------------------------------------------------------- renamed keys
def test_old_key_names_still_work_with_a_warning(caplog):
    """DISTILL.BOX.* / FEAT.FG_WEIGHT / DEFEAT_CLS.* / BACKBONE.* moved under DISTILL.TAR / DISTILL.DEFEAT: a config
    that sets an old name trains the same (value moved to the new key), says so, and keeps no old key."""
    with caplog.at_level("WARNING"):
        cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.BOX.GATE", "none", "DISTILL.BOX.WEIGHT", "2.5")
    assert cfg.DISTILL.TAR.BOX_GATE == "none" and cfg.DISTILL.TAR.BOX_WEIGHT == 2.5 and "BOX" not in cfg.DISTILL
    assert "DISTILL.BOX.GATE was renamed to DISTILL.TAR.BOX_GATE" in caplog.text
    cfg = tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.FEAT.FG_WEIGHT", "7.0", "DISTILL.DEFEAT_CLS.BG_TEMPERATURE", "2.0",
                   "DISTILL.BACKBONE.LEVELS", "['res4']")
    d = cfg.DISTILL
    assert (d.DEFEAT.FG_WEIGHT, d.DEFEAT.CLS_BG_TEMPERATURE, list(d.DEFEAT.BACKBONE_LEVELS)) == (7.0, 2.0, ["res4"])
    assert "FG_WEIGHT" not in d.FEAT and "DEFEAT_CLS" not in d and "BACKBONE" not in d
    with pytest.raises(DistillConfigError, match=r"DISTILL.BOX.GATE \(old name\) = 'none' and DISTILL.TAR.BOX_GATE = "
                                                 r"'teacher_vs_student' are both set"):
        tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.BOX.GATE", "none", "DISTILL.TAR.BOX_GATE", "teacher_vs_student")


def test_old_key_names_in_a_config_built_without_load_cfg(teacher_ckpt):
    """The detectron2 way (get_cfg + add_distill_config + merge): the model build moves the old names too."""
    from detectron2.config import get_cfg

    from distill_d2.config import add_distill_config

    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(os.path.join(SYN, "tar_R34_to_R18.yaml"))
    cfg.merge_from_list(TINY_OPTS + ["DISTILL.TEACHER.CONFIG_FILE", os.path.join(SYN, "faster_rcnn_R34_teacher.yaml"),
                                     "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DISTILL.BOX.WEIGHT", "3.0"])
    model = build_model(cfg)
    assert model.kd_terms["RoIBoxKD"].weight == 3.0
