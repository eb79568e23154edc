"""CWD (``ChannelWiseFeatureKD``, ``ChannelWiseLogitKD``, distill_d2/methods/cwd.py): the divergence
against a naive per-element loop (non-square maps, tau != 1, a 3 -> 2 channel pair through a conv1x1
adapter), the affine-free normalisation against a hand computation, the logit variant on tapped
(N, A*K, H, W) head logits, build-time errors, 1 vs 2 processes, and one real training step from each
preset (the logit variant's gradient reaches the student's classifier, never the teacher)."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec

from conftest import in_processes
from distill_d2.errors import DistillConfigError, TeacherError
from distill_d2.methods.cwd import ChannelWiseFeatureKD, ChannelWiseLogitKD, channel_wise_divergence
from distill_d2.record import Tap
from distill_d2.terms import BuildContext, build_terms
from test_methods import SIZES, cfg_with, conv1x1_naive, ctx, record

HEAD_SIZES = {"p3": (3, 5), "p4": (2, 3)}  # (H, W) of two head levels
AK = 6  # A * K channels of the class logits (2 anchors x 3 classes)


def naive_cwd(s, t, tau):
    """tau^2 * sum_{n,c} sum_hw p_T (log p_T - log p_S) / (N C), softmax over the H*W positions, by loops."""
    n, c, h, w = s.shape
    tot = 0.0
    for a in range(n):
        for cc in range(c):
            xs = [float(s[a, cc, i, j]) / tau for i in range(h) for j in range(w)]
            xt = [float(t[a, cc, i, j]) / tau for i in range(h) for j in range(w)]
            zs, zt = sum(math.exp(v) for v in xs), sum(math.exp(v) for v in xt)
            for vs, vt in zip(xs, xt):
                pt = math.exp(vt) / zt
                tot += pt * (math.log(pt) - (vs - math.log(zs)))
    return tau ** 2 * tot / (n * c)


def naive_affine_free(x, eps=1e-5):
    """x (N, C, H, W) -> per channel (x - mean) / sqrt(biased var + eps) over (n, i, j), by Python arithmetic."""
    n, c, h, w = x.shape
    out = torch.zeros(x.shape, dtype=torch.float64)
    for cc in range(c):
        vals = [float(x[a, cc, i, j]) for a in range(n) for i in range(h) for j in range(w)]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)
        for a in range(n):
            for i in range(h):
                for j in range(w):
                    out[a, cc, i, j] = (float(x[a, cc, i, j]) - mean) / math.sqrt(var + eps)
    return out


def feature_term(cs=2, ct=2, **keys):
    keys.setdefault("CWD__LEVELS", ["p3", "p2"])
    keys.setdefault("CWD__ADAPTER", "identity" if cs == ct else "conv1x1")
    cfg = cfg_with(**keys)
    return ChannelWiseFeatureKD(cfg, ctx(cfg, cs=cs, ct=ct))


def logit_term(**keys):
    cfg = cfg_with(**keys)
    cfg.MODEL.RETINANET.IN_FEATURES = list(HEAD_SIZES)
    return ChannelWiseLogitKD(cfg, ctx(cfg, "dense"))


def adapted_naive(term, rec, lv):
    s = rec.features[lv]
    h, w = SIZES[lv]
    return torch.tensor([[[conv1x1_naive(term.adapters[lv], s, n, i, j) for j in range(w)] for i in range(h)]
                         for n in range(s.shape[0])]).permute(0, 3, 1, 2)


# ------------------------------------------------------------------ the divergence against a naive loop
@pytest.mark.parametrize("cs,ct,tau", [(2, 2, 1.0), (3, 2, 2.0)])
def test_feature_cwd_matches_naive_loop(cs, ct, tau):
    term = feature_term(cs, ct, CWD__TAU=tau, CWD__WEIGHT=3.0)
    assert term.levels == ["p2", "p3"]
    rec = record(cs=cs, ct=ct)
    rec.t_features = {k: 3 * v for k, v in rec.t_features.items()}  # peaked teacher distributions
    out, scalars = term(rec)
    want = {}
    for lv in term.levels:
        s = adapted_naive(term, rec, lv) if cs != ct else rec.features[lv]
        want[lv] = naive_cwd(s, rec.t_features[lv], tau)
        assert scalars[f"kd/cwd_{lv}"].item() == pytest.approx(want[lv], rel=1e-5)
    assert out["loss_kd_cwd"].item() == pytest.approx(3.0 * (want["p2"] + want["p3"]), rel=1e-5)


def test_divergence_properties():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 3, 5, generator=g)
    assert channel_wise_divergence(t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 3, 3, 5, generator=g)
    shift = torch.randn(2, 3, 1, 1, generator=g) * 5  # a constant per (n, c): the softmax ignores it
    assert channel_wise_divergence(s + shift, t - shift).item() == pytest.approx(channel_wise_divergence(s, t).item(),
                                                                                 rel=1e-5)
    with pytest.raises(ValueError, match=r"student \(2, 3, 3, 5\) vs teacher \(2, 3, 5, 3\)"):
        channel_wise_divergence(s, t.transpose(2, 3))


def test_affine_free_normalisation_matches_hand_computation():
    term = feature_term(3, 2, CWD__NORM="affine_free", CWD__TAU=0.5)
    rec = record(cs=3, ct=2)
    rec.features = {k: 4 * v + 1 for k, v in rec.features.items()}
    rec.t_features = {k: 0.2 * v - 3 for k, v in rec.t_features.items()}
    pairs = term.pairs(rec)
    out, scalars = term(rec)
    for lv in term.levels:
        s, t = naive_affine_free(adapted_naive(term, rec, lv)), naive_affine_free(rec.t_features[lv])
        assert torch.allclose(pairs[lv][0].double(), s, atol=1e-5)
        assert torch.allclose(pairs[lv][1].double(), t, atol=1e-5)
        assert scalars[f"kd/cwd_{lv}"].item() == pytest.approx(naive_cwd(s, t, 0.5), rel=1e-4)


def test_explain_shows_the_divergence_per_position():
    term = feature_term()
    rec = record(cs=2, ct=2)
    maps = term.explain(rec)["maps"]["cwd_divergence"]
    for lv, m in maps.items():  # summed over positions and averaged over images: the level's loss
        assert m.shape == (2, *SIZES[lv])
        assert m.sum(dim=(1, 2)).mean().item() == pytest.approx(term(rec)[1][f"kd/cwd_{lv}"].item(), rel=1e-5)


# ------------------------------------------------------------------ the logit variant (RetinaNet)
def logit_record(images=(0, 1), grad=False):
    """A record whose taps hold student / teacher class logits per head level, (N, A*K, H, W)."""
    s, t = [], []
    for lv, (h, w) in HEAD_SIZES.items():
        xs, xt = [], []
        for i in images:
            g = torch.Generator().manual_seed(700 + 10 * i + h)
            xs.append(torch.randn(1, AK, h, w, generator=g) - 2)
            xt.append(2 * torch.randn(1, AK, h, w, generator=g) - 4)
        s.append(torch.cat(xs).requires_grad_(grad))
        t.append(torch.cat(xt))
    rec = record()
    rec.taps = {Tap("student", "head.cls_score"): [(x, x._version) for x in s],
                Tap("teacher", "head.cls_score"): [(x, x._version) for x in t]}
    return rec, s, t


def test_logit_cwd_matches_naive_loop():
    term = logit_term(CWD__LOGIT_WEIGHT=2.0, CWD__LOGIT_TAU=1.5)
    assert term.levels == ["p3", "p4"] and "heads" in term.needs
    rec, s, t = logit_record()
    out, scalars = term(rec)
    want = [naive_cwd(a, b, 1.5) for a, b in zip(s, t)]
    assert [scalars[f"kd/cwd_logit_{lv}"].item() for lv in term.levels] == pytest.approx(want, rel=1e-5)
    assert out["loss_kd_cwd_logit"].item() == pytest.approx(2.0 * sum(want), rel=1e-5)
    maps = term.explain(rec)["maps"]["cwd_logit_divergence"]
    assert {lv: tuple(m.shape) for lv, m in maps.items()} == {"p3": (2, 3, 5), "p4": (2, 2, 3)}


# ------------------------------------------------------------------ build-time errors
def test_build_errors_name_the_key():
    cfg = cfg_with(CWD__LEVELS=["p2", "p3"])
    c = ctx(cfg, cs=2, ct=2)
    bad = BuildContext(**{**c.__dict__, "teacher_shapes": {**c.teacher_shapes, "p2": ShapeSpec(channels=2, stride=8)}})
    with pytest.raises(TeacherError, match=r"Stride mismatch.*p2 \(student stride 4, teacher 8\).*DISTILL.CWD.LEVELS"):
        ChannelWiseFeatureKD(cfg, bad)
    with pytest.raises(DistillConfigError, match=r"CWD.ADAPTER identity needs equal channel counts.*p2 \(student 3, "
                                                  r"teacher 2\).*set DISTILL.CWD.ADAPTER conv1x1"):
        feature_term(3, 2, CWD__ADAPTER="identity")
    with pytest.raises(DistillConfigError, match=r"DISTILL.CWD.TAU = 0.0: the softmax temperature must be > 0"):
        feature_term(CWD__TAU=0.0)
    with pytest.raises(DistillConfigError, match=r"DISTILL.CWD.LOGIT_TAU = -1.0"):
        logit_term(CWD__LOGIT_TAU=-1.0)
    with pytest.raises(DistillConfigError, match=r"Unknown DISTILL.CWD.NORM 'bn'.*'none', 'affine_free'"):
        feature_term(CWD__NORM="bn")
    cfg = cfg_with(TERMS=["ChannelWiseLogitKD"])
    with pytest.raises(DistillConfigError, match=r"ChannelWiseLogitKD does not work with a Faster R-CNN"):
        build_terms(cfg, ctx(cfg, "rcnn"))
    # a logit setting with only the feature term listed would be ignored: an error naming its reader
    cfg = cfg_with(TERMS=["ChannelWiseFeatureKD"], CWD__LOGIT_WEIGHT=1.0, CWD__LEVELS=["p2"])
    with pytest.raises(DistillConfigError, match=r"DISTILL.CWD.LOGIT_WEIGHT = 1.0 \(read by: ChannelWiseLogitKD\)"):
        build_terms(cfg, ctx(cfg, "rcnn", cs=2, ct=2))


# ------------------------------------------------------------------ 1 vs 2 processes
CASES = {"none": dict(CWD__NORM="none", CWD__TAU=2.0), "affine_free": dict(CWD__NORM="affine_free")}


def images_record(images):
    from test_pkd import images_record as pkd_images

    return pkd_images(images)


def run_case(case, images):
    torch.manual_seed(0)
    if case == "logit":
        term = logit_term(CWD__LOGIT_TAU=2.0)
        rec, s, _ = logit_record(images, grad=True)
        inputs = {lv: x for lv, x in zip(term.levels, s)}
    else:
        term = feature_term(3, 2, CWD__LEVELS=["p2", "p3"], **CASES[case])
        rec = images_record(images)
        inputs = rec.features
    losses, _ = term(rec)
    sum(losses.values()).backward()
    return {"loss": sum(v.item() for v in losses.values()),
            "inputs": {k: v.grad.clone() for k, v in inputs.items()},
            "params": {k: p.grad.clone() for k, p in term.named_parameters()}}


def _cases_on_own_half(rank, world):
    """{case: run_case(case, this process's 2 images)} with numpy gradients."""
    res = {c: run_case(c, [2 * rank, 2 * rank + 1]) for c in ("none", "affine_free", "logit")}
    return {c: {k: ({n: g.numpy() for n, g in v.items()} if isinstance(v, dict) else v) for k, v in r.items()}
            for c, r in res.items()}


def test_one_and_two_processes():
    two = in_processes(_cases_on_own_half)
    for case in ("none", "affine_free", "logit"):
        one = run_case(case, [0, 1, 2, 3])
        g = [two[r][case] for r in range(2)]
        assert (g[0]["loss"] + g[1]["loss"]) / 2 == pytest.approx(one["loss"], rel=1e-5), case
        assert g[0]["loss"] != pytest.approx(g[1]["loss"], rel=1e-3)
        for k, grad in one["inputs"].items():
            for r in range(2):
                torch.testing.assert_close(torch.from_numpy(g[r]["inputs"][k]) / 2, grad[2 * r:2 * r + 2], rtol=1e-4,
                                           atol=1e-8, msg=f"{case}: gradient of {k}, rank {r}")
        for k, grad in one["params"].items():
            mean = torch.from_numpy(g[0]["params"][k] + g[1]["params"][k]) / 2
            if k.endswith("bias"):  # a per-channel shift changes no spatial softmax: zero up to rounding
                assert grad.abs().max() < 1e-5 and mean.abs().max() < 1e-5, (case, k)
                continue
            torch.testing.assert_close(mean, grad, rtol=1e-4, atol=1e-8, msg=f"{case}: gradient of {k}")
        assert any(not k.endswith("bias") for k in one["params"]) or case == "logit"


# ------------------------------------------------------------------ real tiny models from the presets
@pytest.mark.parametrize("preset,teacher,loss", [
    ("cwd_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml", "loss_kd_cwd"),
    ("cwd_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml", "loss_kd_cwd"),
    ("cwd_logit_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml", "loss_kd_cwd_logit"),
])
def test_preset_trains_one_step(preset, teacher, loss, make_ckpt):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from conftest import tiny_cfg
    from test_distill_rcnn import batches, train_steps

    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher))
    torch.manual_seed(0)
    model = build_model(cfg)
    data = batches(cfg, 1)
    if loss == "loss_kd_cwd_logit":  # its gradient: the student's classifier and FPN, no teacher parameter
        model.train()
        with EventStorage():
            kd = model(data[0])[loss]
        kd.backward()
        assert model.head.cls_score.weight.grad.abs().sum() > 0
        assert model.backbone.fpn_output3.weight.grad.abs().sum() > 0
        assert model.head.bbox_pred.weight.grad is None  # (the box branch does not reach the class logits)
        assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
        model.zero_grad()
    losses, storage = train_steps(model, data)
    value = losses[loss].item()
    assert math.isfinite(value) and value > 0
    levels = model.kd_terms[next(iter(model.kd_terms))].levels
    prefix = "kd/cwd_logit_" if loss == "loss_kd_cwd_logit" else "kd/cwd_"
    per_level = [storage.history(prefix + lv).latest() for lv in levels]
    weight = cfg.DISTILL.CWD.LOGIT_WEIGHT if loss == "loss_kd_cwd_logit" else cfg.DISTILL.CWD.WEIGHT
    # (at 128 px RetinaNet's p7 is 1 x 1: a one-position softmax is 1 for both models, that level gives 0)
    assert all(v >= 0 for v in per_level) and per_level[0] > 0
    assert value == pytest.approx(weight * sum(per_level), rel=1e-4)
