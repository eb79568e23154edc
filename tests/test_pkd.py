"""PKD (``PearsonFeatureKD``, distill_d2/methods/pkd.py): the per-channel standardisation in float64
against a hand computation, the loss against a naive per-element loop (non-square maps, a 3 -> 2
channel pair through a conv1x1 adapter), its Pearson reading, build-time errors, 1 vs 2 processes
(global statistics: the single-process objective and gradient; per_process: the reference's per-GPU
loss), and one real training step from each preset."""
import math
import statistics

import pytest
import torch
from detectron2.layers import ShapeSpec

from conftest import in_processes
from distill_d2.errors import DistillConfigError, TeacherError
from distill_d2.losses import channel_moments, standardize_channels
from distill_d2.methods.pkd import PearsonFeatureKD, pearson_feature_losses
from distill_d2.terms import BuildContext
from test_methods import SIZES, cfg_with, conv1x1_naive, ctx, record

EPS = 1e-6


def pkd_term(cs=2, ct=2, **keys):
    keys.setdefault("PKD__LEVELS", ["p3", "p2"])
    keys.setdefault("PKD__ADAPTER", "identity" if cs == ct else "conv1x1")
    cfg = cfg_with(**keys)
    return PearsonFeatureKD(cfg, ctx(cfg, cs=cs, ct=ct))


def naive_standardize(x):
    """Nested lists [n][c][i][j] of x (N, C, H, W) standardised per channel by Python arithmetic:
    mean over (n, i, j), unbiased std, (x - mean) / (std + 1e-6)."""
    n, c, h, w = x.shape
    out = [[[[0.0] * w for _ in range(h)] for _ in range(c)] for _ in range(n)]
    for cc in range(c):
        vals = [float(x[a, cc, i, j]) for a in range(n) for i in range(h) for j in range(w)]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for a in range(n):
            for i in range(h):
                for j in range(w):
                    out[a][cc][i][j] = (float(x[a, cc, i, j]) - mean) / (sd + EPS)
    return out


def naive_level_loss(s, t):
    """mean over (n, c, i, j) of (S^ - T^)^2 / 2 by loops."""
    a, b = naive_standardize(s), naive_standardize(t)
    n, c, h, w = s.shape
    tot = sum((a[q][cc][i][j] - b[q][cc][i][j]) ** 2 for q in range(n) for cc in range(c) for i in range(h)
              for j in range(w))
    return tot / 2 / (n * c * h * w)


# ------------------------------------------------------------------ standardisation (float64, by hand)
def test_standardization_float64_hand_computed():
    x = torch.tensor([[[[1.0, 2.0, 4.0], [0.5, -1.0, 3.0]], [[10.0, 10.5, 9.0], [8.0, 12.0, 11.0]]],
                      [[[0.0, -2.0, 1.0], [2.5, 1.5, -0.5]], [[9.5, 10.0, 13.0], [7.0, 10.0, 10.0]]]],
                     dtype=torch.float64)  # (N 2, C 2, H 2, W 3)
    (mu0, var0), = [m for m in channel_moments([x[:, :1]])]
    vals = [1.0, 2.0, 4.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.0, 2.5, 1.5, -0.5]  # channel 0 over (n, h, w)
    assert mu0.item() == pytest.approx(sum(vals) / 12, rel=1e-15)
    assert var0.item() == pytest.approx(statistics.variance(vals), rel=1e-13)  # unbiased: / (12 - 1)
    got = standardize_channels([x])[0]
    assert got.dtype == torch.float64
    want = torch.tensor(naive_standardize(x), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    # biased variance, eps inside the square root (an affine-free BatchNorm, as CWD's NORM uses)
    bn = standardize_channels([x], eps=1e-5, unbiased=False, eps_inside=True)[0]
    m, v = sum(vals) / 12, statistics.pvariance(vals)
    assert bn[1, 0, 1, 2].item() == pytest.approx((-0.5 - m) / math.sqrt(v + 1e-5), rel=1e-12)
    assert torch.allclose(bn, torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5), atol=1e-12)
    # a single element or a constant channel: 0, not NaN, and a finite gradient
    one = torch.full((1, 2, 1, 1), 3.0, dtype=torch.float64, requires_grad=True)
    y = standardize_channels([one])[0]
    y.sum().backward()
    assert torch.equal(y.detach(), torch.zeros_like(y)) and torch.isfinite(one.grad).all()


# ------------------------------------------------------------------ the loss against a naive loop
@pytest.mark.parametrize("cs,ct,stats", [(2, 2, "global"), (3, 2, "global"), (3, 2, "per_process")])
def test_pkd_loss_matches_naive_loop(cs, ct, stats):
    """p2 (6 x 10) and p3 (3 x 5), levels listed coarse first; 3 -> 2 channels through conv1x1 (one
    process: both STATS give the same loss)."""
    term = pkd_term(cs, ct, PKD__WEIGHT=6.0, PKD__STATS=stats)
    assert term.levels == ["p2", "p3"]
    rec = record(cs=cs, ct=ct)
    rec.features = {k: v * 7.0 + 2.0 for k, v in rec.features.items()}  # a scale and offset of their own
    out, scalars = term(rec)
    want = {}
    for lv in term.levels:
        s = rec.features[lv]
        if cs != ct:
            h, w = SIZES[lv]
            s = torch.tensor([[[conv1x1_naive(term.adapters[lv], s, n, i, j) for j in range(w)] for i in range(h)]
                              for n in range(2)]).permute(0, 3, 1, 2)
        want[lv] = naive_level_loss(s.double(), rec.t_features[lv].double())
        assert scalars[f"kd/pkd_{lv}"].item() == pytest.approx(want[lv], rel=1e-5)
    assert out["loss_kd_pkd"].item() == pytest.approx(6.0 * (want["p2"] + want["p3"]), rel=1e-5)


def test_pkd_is_one_minus_pearson_and_ignores_scale():
    """Per level L = (M-1)/M * mean_c (1 - r_c), r_c the Pearson correlation of channel c over the batch's
    M = N H W values (up to the 1e-6 of the std); an affine change of either map changes nothing."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64)
    s = 0.6 * t + torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64)
    m = 2 * 3 * 5
    r = [statistics.correlation(s[:, c].flatten().tolist(), t[:, c].flatten().tolist()) for c in range(3)]
    got = pearson_feature_losses({"p3": s}, {"p3": t})["p3"].item()
    assert got == pytest.approx((m - 1) / m * sum(1 - x for x in r) / 3, rel=1e-5)
    assert pearson_feature_losses({"p3": 50 * s - 4}, {"p3": 0.5 * t + 9})["p3"].item() == pytest.approx(got, rel=1e-5)
    assert pearson_feature_losses({"p3": t}, {"p3": t})["p3"].item() == pytest.approx(0.0, abs=1e-9)
    assert pearson_feature_losses({"p3": -t}, {"p3": t})["p3"].item() == pytest.approx(2 * (m - 1) / m, rel=1e-5)


def test_student_map_of_another_size_is_resized_to_the_teachers():
    term = pkd_term(PKD__LEVELS=["p3"])
    rec = record(cs=2, ct=2)
    rec.t_features["p3"] = torch.randn(2, 2, 6, 10)  # the teacher's grid is twice as fine
    got = term(rec)[1]["kd/pkd_p3"].item()
    up = torch.nn.functional.interpolate(rec.features["p3"], size=(6, 10), mode="bilinear", align_corners=False)
    assert got == pytest.approx(naive_level_loss(up.double(), rec.t_features["p3"].double()), rel=1e-5)


def test_explain_shows_the_standardised_error_per_position():
    term = pkd_term()
    rec = record(cs=2, ct=2)
    maps = term.explain(rec)["maps"]["pkd_error"]
    assert list(maps) == ["p2", "p3"]
    for lv, m in maps.items():
        assert m.shape == (2, *SIZES[lv])
        assert m.mean().item() == pytest.approx(term(rec)[1][f"kd/pkd_{lv}"].item(), rel=1e-5)


# ------------------------------------------------------------------ build-time errors
def test_build_errors_name_the_key():
    cfg = cfg_with(PKD__LEVELS=["p2", "p3"])
    c = ctx(cfg, cs=2, ct=2)
    bad = BuildContext(**{**c.__dict__, "teacher_shapes": {**c.teacher_shapes, "p3": ShapeSpec(channels=2, stride=16)}})
    with pytest.raises(TeacherError, match=r"Stride mismatch.*p3 \(student stride 8, teacher 16\).*DISTILL.PKD.LEVELS"):
        PearsonFeatureKD(cfg, bad)
    with pytest.raises(TeacherError, match=r"\['p9'\] requested in DISTILL.PKD.LEVELS"):
        pkd_term(PKD__LEVELS=["p2", "p9"])
    with pytest.raises(DistillConfigError, match="DISTILL.PKD.LEVELS is empty"):
        pkd_term(PKD__LEVELS=[])
    with pytest.raises(DistillConfigError, match=r"ADAPTER identity needs equal channel counts.*p2 \(student 3, "
                                                  r"teacher 2\).*set DISTILL.PKD.ADAPTER conv1x1"):
        pkd_term(cs=3, ct=2, PKD__ADAPTER="identity")
    with pytest.raises(DistillConfigError, match=r"Unknown DISTILL.PKD.STATS 'per_gpu'.*'global', 'per_process'"):
        pkd_term(PKD__STATS="per_gpu")


# ------------------------------------------------------------------ 1 vs 2 processes
# 4 images, each from its own seed (maps with H != W); one process gets images 0-3, two processes 0-1 / 2-3.
def images_record(images, cs=3, ct=2):
    feats, t_feats = {}, {}
    for i in images:
        g = torch.Generator().manual_seed(500 + i)
        for lv, (h, w) in (("p2", (6, 10)), ("p3", (3, 5))):
            feats.setdefault(lv, []).append(torch.randn(1, cs, h, w, generator=g) * (1 + i))
            t_feats.setdefault(lv, []).append(torch.randn(1, ct, h, w, generator=g) + i)
    rec = record(cs=cs, ct=ct)
    rec.features = {k: torch.cat(v).requires_grad_(True) for k, v in feats.items()}
    rec.t_features = {k: torch.cat(v) for k, v in t_feats.items()}
    return rec


def run_case(stats, images):
    torch.manual_seed(0)  # the same adapter in every process
    term = pkd_term(3, 2, PKD__LEVELS=["p2", "p3"], PKD__STATS=stats)
    rec = images_record(images)
    losses, _ = term(rec)
    losses["loss_kd_pkd"].backward()
    return {"loss": losses["loss_kd_pkd"].item(), "inputs": {k: v.grad.clone() for k, v in rec.features.items()},
            "params": {k: p.grad.clone() for k, p in term.named_parameters()}}


def _both_stats_on_own_half(rank, world):
    """{stats: run_case(stats, this process's 2 images)} with numpy gradients."""
    res = {s: run_case(s, [2 * rank, 2 * rank + 1]) for s in ("global", "per_process")}
    return {s: {k: ({n: g.numpy() for n, g in v.items()} if isinstance(v, dict) else v) for k, v in r.items()}
            for s, r in res.items()}


def test_one_and_two_processes():
    two = in_processes(_both_stats_on_own_half)
    one = run_case("global", [0, 1, 2, 3])
    # global statistics: the mean over processes is the single-process loss, each process's input gradient
    # / 2 is the single-process gradient on its images, the averaged adapter gradient the single-process one
    g = [two[r]["global"] for r in range(2)]
    assert (g[0]["loss"] + g[1]["loss"]) / 2 == pytest.approx(one["loss"], rel=1e-5)
    assert g[0]["loss"] != pytest.approx(g[1]["loss"], rel=1e-3)  # (the halves differ)
    for k, grad in one["inputs"].items():
        for r in range(2):
            torch.testing.assert_close(torch.from_numpy(g[r]["inputs"][k]) / 2, grad[2 * r:2 * r + 2], rtol=1e-4,
                                       atol=1e-8, msg=f"gradient of {k}, rank {r}")
    assert sorted(one["params"]) == ["adapters.p2.bias", "adapters.p2.weight", "adapters.p3.bias", "adapters.p3.weight"]
    for k, grad in one["params"].items():
        mean = torch.from_numpy(g[0]["params"][k] + g[1]["params"][k]) / 2
        if k.endswith("bias"):  # the standardisation removes a per-channel shift: zero up to rounding
            assert grad.abs().max() < 1e-5 and mean.abs().max() < 1e-5, k
            continue
        torch.testing.assert_close(mean, grad, rtol=1e-4, atol=1e-8, msg=f"gradient of {k}")
    # per_process (the reference's per-GPU statistics): each process's loss is PKD on its own two images
    for r in range(2):
        own = run_case("per_process", [2 * r, 2 * r + 1])
        assert two[r]["per_process"]["loss"] == pytest.approx(own["loss"], rel=1e-5)
        assert own["loss"] != pytest.approx(g[r]["loss"], rel=1e-3)


# ------------------------------------------------------------------ real tiny models from the presets
@pytest.mark.parametrize("preset,teacher", [("pkd_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml"),
                                            ("pkd_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml")])
def test_preset_trains_one_step(preset, teacher, make_ckpt):
    from detectron2.modeling import build_model

    from conftest import tiny_cfg
    from test_distill_rcnn import batches, train_steps

    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher))
    torch.manual_seed(0)
    model = build_model(cfg)
    term = model.kd_terms["PearsonFeatureKD"]
    assert term.levels == list(cfg.DISTILL.PKD.LEVELS) and sum(p.numel() for p in term.parameters()) == 0
    losses, storage = train_steps(model, batches(cfg, 1))
    kd = losses["loss_kd_pkd"].item()
    # a random teacher: uncorrelated channels, each level near 1 - r = 1 (bounded by 2)
    assert math.isfinite(kd) and 0 < kd < 2 * len(term.levels) * cfg.DISTILL.PKD.WEIGHT
    for lv in term.levels:
        assert 0.5 < storage.history(f"kd/pkd_{lv}").latest() < 1.5
