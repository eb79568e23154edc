"""MGD (``MaskedGenerativeKD``, distill_d2/methods/mgd.py): the random spatial mask (ratio, exact threshold,
redrawn every step, reproduced from a restored RNG state), the loss against a naive per-element loop with a
fixed mask, aligner / generator shapes from real configs, build-time errors, 1 vs 2 processes with the same
masks, inheriting the teacher's neck and heads, and one real training step from each synthetic preset."""
import logging

import pytest
import torch
import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import in_processes, tiny_cfg
from distill_d2.data.resumable import TrainingState
from distill_d2.errors import DistillConfigError, TeacherError
from distill_d2.export import student_state_dict
from distill_d2.methods.mgd import MaskedGenerativeKD, spatial_mask
from distill_d2.terms import BuildContext, build_terms
from test_distill_rcnn import batches
from test_methods import SIZES, STRIDES, cfg_with, ctx, record

RCNN = ("mgd_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml")
RETINA = ("mgd_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml")


def mgd_term(family="rcnn", cs=3, ct=2, **keys):
    node = "RCNN" if family == "rcnn" else "RETINANET"
    keys.setdefault(f"MGD__{node}__LEVELS", ["p3", "p2"])
    cfg = cfg_with(**keys)
    return MaskedGenerativeKD(cfg, ctx(cfg, family, cs=cs, ct=ct))


def fixed_masks(n, ratio, seed=5, levels=("p2", "p3")):
    g = torch.Generator().manual_seed(seed)
    return {lv: spatial_mask(n, *SIZES[lv], ratio, "cpu", g) for lv in levels}


# ------------------------------------------------------------------ naive formula (Python floats)
def conv_naive(weight, bias, x, k):
    """Conv2d with a k x k kernel, stride 1, zero padding k // 2, on nested lists x[c][i][j]."""
    cin, h, w, p = len(x), len(x[0]), len(x[0][0]), k // 2
    out = []
    for o in range(len(weight)):
        rows = []
        for i in range(h):
            row = []
            for j in range(w):
                v = bias[o]
                for c in range(cin):
                    for di in range(k):
                        for dj in range(k):
                            ii, jj = i + di - p, j + dj - p
                            if 0 <= ii < h and 0 <= jj < w:
                                v += weight[o][c][di][dj] * x[c][ii][jj]
                row.append(v)
            rows.append(row)
        out.append(rows)
    return out


def naive_mgd(term, rec, masks):
    """{level: sum_{n,c,i,j} (G(A(S) * M) - T)^2 / N} by explicit loops, in double precision."""
    out = {}
    for lv in term.levels:
        s, t, m = rec.features[lv].tolist(), rec.t_features[lv].tolist(), masks[lv].tolist()
        a = term.adapters[lv]
        g0, g2 = term.generators[lv][0], term.generators[lv][2]
        total = 0.0
        for n in range(len(s)):
            h, w = len(s[n][0]), len(s[n][0][0])
            if isinstance(a, nn.Identity):
                x = s[n]
            else:
                x = conv_naive(a.weight.tolist(), a.bias.tolist(), s[n], 1)
            x = [[[x[c][i][j] * m[n][0][i][j] for j in range(w)] for i in range(h)] for c in range(len(x))]
            y = conv_naive(g0.weight.tolist(), g0.bias.tolist(), x, 3)
            y = [[[max(v, 0.0) for v in row] for row in ch] for ch in y]
            y = conv_naive(g2.weight.tolist(), g2.bias.tolist(), y, 3)
            total += sum((y[c][i][j] - t[n][c][i][j]) ** 2 for c in range(len(y)) for i in range(h) for j in range(w))
        out[lv] = total / len(s)
    return out


# ------------------------------------------------------------------ the mask
@pytest.mark.parametrize("ratio", [0.45, 0.65])
def test_mask_ratio_and_exact_threshold(ratio):
    # many draws: the masked fraction is lambda (98304 cells: 6 sigma ~ 0.01)
    m = spatial_mask(64, 32, 48, ratio, "cpu")
    assert m.shape == (64, 1, 32, 48) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert 1 - m.mean().item() == pytest.approx(ratio, abs=0.01)
    # per draw: exactly the cells whose uniform draw exceeds 1 - lambda, one (N, 1, H, W) draw per level
    term = mgd_term(**{"MGD__RCNN__MASK_RATIO": ratio})
    rec = record()
    torch.manual_seed(3)
    masks = term.draw_masks(rec)
    torch.manual_seed(3)
    for lv in ["p2", "p3"]:  # finest first
        u = torch.rand(2, 1, *SIZES[lv])
        assert torch.equal(masks[lv], (u <= 1 - ratio).float()), lv
    assert list(masks) == ["p2", "p3"]
    assert torch.equal(mgd_term(**{"MGD__RCNN__MASK_RATIO": 0.0}).draw_masks(rec)["p2"], torch.ones(2, 1, 6, 10))


def test_masks_are_redrawn_every_step_and_follow_the_saved_rng_state():
    term = mgd_term().train()
    rec = record()
    state = TrainingState(term).state_dict()  # what the checkpointer saves (DATALOADER.EXACT_RESUME)
    first, _ = term(rec)
    m1 = term.draw_masks(rec)
    second, _ = term(rec)
    m2 = term.draw_masks(rec)
    assert not torch.equal(m1["p2"], m2["p2"])  # fresh masks every forward
    assert first["loss_kd_mgd"].item() != pytest.approx(second["loss_kd_mgd"].item(), rel=1e-4)
    TrainingState(term).load_state_dict(state)  # as --resume restores it
    again, _ = term(rec)
    assert again["loss_kd_mgd"].item() == first["loss_kd_mgd"].item()
    assert torch.equal(term.draw_masks(rec)["p2"], m1["p2"])


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("family,cs", [("rcnn", 3), ("rcnn", 2), ("dense", 3)])
def test_loss_matches_naive_loop_with_a_fixed_mask(family, cs):
    node = "RCNN" if family == "rcnn" else "RETINANET"
    term = mgd_term(family, cs=cs, **{f"MGD__{node}__WEIGHT": 0.3, f"MGD__{node}__MASK_RATIO": 0.5})
    assert isinstance(term.adapters["p2"], nn.Identity) == (cs == 2)  # aligner only where channels differ
    rec = record(cs=cs)  # maps with H != W; the second image has no gt (MGD does not read boxes)
    masks = fixed_masks(2, 0.5)
    assert 0 < masks["p2"].mean() < 1
    losses, scalars = term.losses(rec, masks)
    want = naive_mgd(term, rec, masks)
    for lv in ("p2", "p3"):
        assert scalars[f"kd/mgd_{lv}"].item() == pytest.approx(want[lv], rel=1e-5)
    assert losses["loss_kd_mgd"].item() == pytest.approx(0.3 * (want["p2"] + want["p3"]), rel=1e-5)


def test_explain_leaves_the_training_rng_alone():
    term = mgd_term()
    rec = record()
    before = torch.get_rng_state()
    with torch.no_grad():
        maps = term.explain(rec)["maps"]
    assert torch.equal(torch.get_rng_state(), before)
    assert maps["mgd_mask"]["p3"].shape == (2, 3, 5) and maps["mgd_error"]["p2"].shape == (2, 6, 10)
    want = fixed_masks(2, 0.45, seed=0)["p2"][:, 0]  # seed 0, p2 drawn first
    assert torch.equal(maps["mgd_mask"]["p2"], want)


# ------------------------------------------------------------------ shapes from real configs, errors
@pytest.mark.parametrize("student,teacher,levels", [
    ("configs/synthetic/faster_rcnn_R18_student.yaml", "configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
     ["p2", "p3", "p4", "p5"]),
    ("configs/synthetic/retinanet_R18_student.yaml", "configs/COCO-Detection/retinanet_R_50_FPN_1x.yaml",
     ["p3", "p4", "p5", "p6", "p7"]),
])
def test_aligner_and_generator_shapes_from_configs(student, teacher, levels, tmp_path):
    """R18 student (128-channel FPN) <- R50 teacher (256 channels), teacher on the meta device; defaults."""
    from distill_d2.config import load_cfg

    arch = "DistillGeneralizedRCNN" if "rcnn" in student else "DistillRetinaNet"
    cfg = load_cfg(student, ["MODEL.META_ARCHITECTURE", arch, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                             "DISTILL.TEACHER.CONFIG_FILE", teacher, "DISTILL.TEACHER.WEIGHTS", str(tmp_path / "x.pth"),
                             "DISTILL.TERMS", "['MaskedGenerativeKD']", "OUTPUT_DIR", str(tmp_path)], need_teacher=False)
    model = build_model(cfg)
    term = model.kd_terms["MaskedGenerativeKD"]
    assert term.levels == levels
    for lv in levels:
        a, (c1, relu, c2) = term.adapters[lv], term.generators[lv]
        assert (a.in_channels, a.out_channels, a.kernel_size, a.bias is not None) == (128, 256, (1, 1), True)
        assert isinstance(relu, nn.ReLU)
        for c in (c1, c2):
            assert (c.in_channels, c.out_channels, c.kernel_size, c.padding) == (256, 256, (3, 3), (1, 1))
    keys = model.state_dict()
    assert f"kd_terms.MaskedGenerativeKD.generators.{levels[0]}.2.weight" in keys
    assert f"kd_terms.MaskedGenerativeKD.adapters.{levels[-1]}.bias" in keys
    assert not any("MaskedGenerativeKD" in k for k in student_state_dict(keys))  # dropped on export


def test_build_errors_name_the_key():
    cfg = cfg_with(MGD__RCNN__LEVELS=["p2", "p3"])
    c = ctx(cfg)
    bad = BuildContext(**{**c.__dict__, "teacher_shapes": {**c.teacher_shapes, "p3": ShapeSpec(channels=2, stride=16)}})
    with pytest.raises(TeacherError, match="Stride mismatch.*p3.*DISTILL.MGD.RCNN.LEVELS"):
        MaskedGenerativeKD(cfg, bad)
    with pytest.raises(TeacherError, match="p9.*DISTILL.MGD.RCNN.LEVELS"):
        mgd_term(MGD__RCNN__LEVELS=["p2", "p9"])
    with pytest.raises(DistillConfigError, match="DISTILL.MGD.RCNN.LEVELS is empty"):
        mgd_term(MGD__RCNN__LEVELS=[])
    with pytest.raises(DistillConfigError, match=r"DISTILL.MGD.RETINANET.MASK_RATIO = 1.5.*\[0, 1\]"):
        mgd_term("dense", MGD__RETINANET__MASK_RATIO=1.5)
    with pytest.raises(DistillConfigError, match="Unknown DISTILL.MGD.ALIGN 'conv9'.*'auto'"):
        mgd_term(MGD__ALIGN="conv9")
    with pytest.raises(ValueError, match="DISTILL.MGD.ALIGN: 'identity' needs equal channels"):
        mgd_term(MGD__ALIGN="identity")
    with pytest.raises(DistillConfigError, match="DISTILL.MGD.RETINANET.WEIGHT is set.*reads DISTILL.MGD.RCNN"):
        mgd_term(MGD__RETINANET__WEIGHT=1.0)
    with pytest.raises(DistillConfigError, match="DISTILL.MGD.RCNN.WEIGHT = -1.0 is negative"):
        cfg = cfg_with(MGD__RCNN__WEIGHT=-1.0, TERMS=["MaskedGenerativeKD"])
        build_terms(cfg, ctx(cfg))
    assert mgd_term(MGD__ALIGN="conv3x3").adapters["p2"].kernel_size == (3, 3)  # any registry kind


# ------------------------------------------------------------------ 1 vs 2 processes, same masks
# Unequal shares (1 and 3 images): the loss divides by the images of the whole batch, so dividing by a
# process's own count would show (with equal shares the two happen to coincide).
SPLIT = [[0], [1, 2, 3]]


def images_record(images):
    """StepRecord of the listed images of a fixed 4-image batch (each image from its own seed), float64; student
    maps are leaves with grad."""
    from detectron2.structures import Boxes, Instances

    from distill_d2.record import StepRecord

    feats, t_feats, gts = {}, {}, []
    for i in images:
        g = torch.Generator().manual_seed(1000 + i)
        for lv in ("p2", "p3"):
            feats.setdefault(lv, []).append(torch.randn(1, 3, *SIZES[lv], generator=g))
            t_feats.setdefault(lv, []).append(torch.randn(1, 2, *SIZES[lv], generator=g))
        inst = Instances((24, 40))
        inst.gt_boxes, inst.gt_classes = Boxes(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long)
        gts.append(inst)
    return StepRecord(images=None, t_images=None, gt_instances=gts,
                      features={k: torch.cat(v).double().requires_grad_() for k, v in feats.items()},
                      t_features={k: torch.cat(v).double() for k, v in t_feats.items()}, strides=dict(STRIDES))


def run_images(images):
    """(loss, {input: grad}, {param: grad}) of the term on ``images`` with the masks of the fixed 4-image batch."""
    torch.manual_seed(0)  # the same aligners and generators in every process
    term = mgd_term(**{"MGD__RCNN__WEIGHT": 0.5}).double().train()  # (float64: sums in another order agree)
    rec = images_record(images)
    masks = {lv: m[images] for lv, m in fixed_masks(4, 0.45).items()}
    losses, _ = term.losses(rec, masks)
    losses["loss_kd_mgd"].backward()
    return (losses["loss_kd_mgd"].item(), {k: v.grad.numpy().copy() for k, v in rec.features.items()},
            {k: p.grad.numpy().copy() for k, p in term.named_parameters()})


def _own_share(rank, world):
    return run_images(SPLIT[rank])


def test_one_and_two_processes_agree_with_the_same_masks():
    two = in_processes(_own_share)
    loss, inputs, params = run_images([0, 1, 2, 3])
    assert (two[0][0] + two[1][0]) / 2 == pytest.approx(loss, rel=1e-10)  # what detectron2 logs / DDP optimises
    assert two[0][0] != pytest.approx(two[1][0], rel=1e-3)  # the shares differ
    for k, g in inputs.items():  # each process's gradient on its own images, / W
        for r in range(2):
            torch.testing.assert_close(torch.from_numpy(two[r][1][k]) / 2, torch.from_numpy(g[SPLIT[r]]),
                                       rtol=1e-9, atol=1e-12)
    assert set(params) == {k for k, _ in mgd_term().named_parameters()}
    for k, g in params.items():  # DDP averages the generator / aligner gradients
        torch.testing.assert_close(torch.from_numpy((two[0][2][k] + two[1][2][k]) / 2), torch.from_numpy(g),
                                   rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ real tiny models
def distiller(pair, make_ckpt, *opts):
    preset, teacher = pair
    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher), *opts)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def train_step(model, cfg):
    model.train()
    with EventStorage() as storage:
        losses = model(batches(cfg, 1)[0])
        sum(losses.values()).backward()
        model.log_kd_scalars(storage)
    return losses, storage


def check_step(model, cfg, levels):
    """One training step: loss_kd_mgd finite and > 0, gradients in every generator and the student's FPN, none in
    the teacher, ``kd/mgd_<level>`` logged; returns the losses."""
    losses, storage = train_step(model, cfg)
    kd = losses["loss_kd_mgd"]
    assert torch.isfinite(kd) and kd.item() > 0
    term = model.kd_terms["MaskedGenerativeKD"]
    assert term.levels == levels
    assert all(isinstance(a, nn.Identity) for a in term.adapters.values())  # R18 and R34 FPNs: 128 channels
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.generators.parameters())
    fpn = model.backbone.fpn_output3.weight.grad
    assert fpn is not None and fpn.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert set(k for k in storage.latest() if k.startswith("kd/mgd_")) == {f"kd/mgd_{lv}" for lv in levels}
    return losses


def test_one_training_step_of_the_retinanet_preset(make_ckpt):
    check_step(*distiller(RETINA, make_ckpt), ["p3", "p4", "p5", "p6", "p7"])


def test_faster_rcnn_preset_with_inheriting(make_ckpt, caplog):
    """The Faster R-CNN preset with DISTILL.MGD.INHERIT True: the teacher's neck and heads copied where the shapes
    match, said loudly; a tensor replaced before the first step reported; then one training step."""
    model, cfg = distiller(RCNN, make_ckpt, "DISTILL.MGD.INHERIT", "True")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="distill_d2.methods.mgd"):
        teacher = model.setup_teacher()
    t, s = teacher.state_dict(), model.state_dict()
    copied = [k for k in s if not k.startswith(("kd_terms.", "backbone.bottom_up.")) and k in t and t[k].shape == s[k].shape]
    assert "backbone.fpn_lateral2.weight" in copied and "proposal_generator.rpn_head.conv.weight" in copied
    assert all(torch.equal(s[k], t[k]) for k in copied)
    assert not torch.equal(before["backbone.fpn_lateral2.weight"], s["backbone.fpn_lateral2.weight"])
    # the R34 teacher's box head is 512 wide, the student's 256: kept; the bottom-up network and KD modules too
    for k in ["roi_heads.box_head.fc1.weight", "backbone.bottom_up.res2.0.conv1.weight",
              "kd_terms.MaskedGenerativeKD.generators.p2.0.weight"]:
        assert torch.equal(s[k], before[k]), k
    msg = caplog.text
    assert f"copied {len(copied)} teacher tensors" in msg and "NOT comparable" in msg
    assert "roi_heads.box_head.fc1.weight (shape (256, 6272) vs the teacher's (512, 6272))" in msg
    # a tensor replaced after inheriting (as MODEL.WEIGHTS would) is reported at the first step
    with torch.no_grad():
        model.backbone.fpn_output2.bias.add_(1.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill_d2.methods.mgd"):
        check_step(model, cfg, ["p2", "p3", "p4", "p5"])
    assert "1 of the" in caplog.text and "backbone.fpn_output2.bias" in caplog.text


def test_inheriting_without_a_matching_tensor_is_an_error():
    student = build_model(tiny_cfg("retinanet_R18_student.yaml"))
    # another FPN width, class count and anchor set: no tensor of the neck or head has the student's shape
    teacher = build_model(tiny_cfg("retinanet_R18_student.yaml", "MODEL.FPN.OUT_CHANNELS", "64",
                                   "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]"))
    term = mgd_term("dense", MGD__INHERIT=True)
    with pytest.raises(TeacherError, match="DISTILL.MGD.INHERIT True, but no tensor.*DISTILL.MGD.INHERIT False"):
        term.check_teacher(student, teacher)
    mgd_term("dense").check_teacher(student, teacher)  # off: nothing checked or copied
