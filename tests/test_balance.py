"""DISTILL.BALANCE (distill_d2/balance.py, hooks.KDBalancer): calibrate-then-freeze loss balancing."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SYN, TINY_OPTS, tiny_cfg
from distill_d2.balance import (BalanceState, check_balance_cfg, choose_factors, drift_correction, measure,
                                reference_params)
from distill_d2.errors import DistillConfigError


# ------------------------------------------------------------------ choosing the factors
def test_known_ratios_give_the_expected_factors():
    # term a: gradient 4x the detection's, b: 0.01x; two terms share target 1.0 -> 0.5 each
    samples = [{"det": 2.0, "a": 8.0, "b": 0.02}, {"det": 2.0, "a": 8.0, "b": 0.02}]
    got = choose_factors(samples, ["a", "b"], target=1.0)
    assert got["a"]["factor"] == pytest.approx(0.5 * 2.0 / 8.0) and got["a"]["ratio"] == pytest.approx(4.0)
    assert got["b"]["factor"] == pytest.approx(0.5 * 2.0 / 0.02)
    # after balancing each term is target / n of the detection: factor x ratio = 0.5
    assert all(c["factor"] * c["ratio"] == pytest.approx(0.5) for c in got.values())
    one = choose_factors(samples, ["a"], target=0.3)  # one term takes the whole target
    assert one["a"]["factor"] == pytest.approx(0.3 * 2.0 / 8.0)


def test_medians_not_means_nor_the_first_sample():
    # the first sample is the inflated start (F2); an outlier must not move the factor
    samples = [{"det": 100.0, "a": 1.0}, {"det": 2.0, "a": 1.0}, {"det": 3.0, "a": 1.0}, {"det": 4.0, "a": 1.0},
               {"det": 2.5, "a": 50.0}]
    got = choose_factors(samples, ["a"], target=1.0)
    assert got["a"]["det"] == 3.0 and got["a"]["value"] == 1.0 and got["a"]["factor"] == pytest.approx(3.0)


def test_clamps_and_a_term_near_zero_does_not_explode():
    samples = [{"det": 1.0, "big": 1e7, "tiny": 1e-9, "small": 2e-3, "zero": 0.0}]
    got = choose_factors(samples, ["big", "tiny", "small", "zero"], target=4.0, min_factor=1e-3, max_factor=1e2,
                         floor=1e-3)
    assert got["big"]["factor"] == 1e-3 and "clamped from 1e-07" in got["big"]["note"]
    assert got["tiny"]["factor"] == 1.0 and got["zero"]["factor"] == 1.0 and "FLOOR" in got["tiny"]["note"]
    # above the floor: balanced, clamped to MAX_FACTOR (1.0 / 2e-3 = 500 > 100)
    assert got["small"]["factor"] == 1e2 and "clamped" in got["small"]["note"]


def test_non_finite_samples_stop_with_the_term_named():
    with pytest.raises(FloatingPointError, match="term a's measure is nan"):
        choose_factors([{"det": 1.0, "a": float("nan")}], ["a"])
    with pytest.raises(FloatingPointError, match="detection loss's measure is 0"):
        choose_factors([{"det": 0.0, "a": 1.0}], ["a"])


def test_drift_correction_is_bounded_and_only_outside_the_band():
    assert drift_correction(0.5, 0.5) == 1.0 and drift_correction(0.26, 0.5) == 1.0 and drift_correction(1.0, 0.5) == 1.0
    assert drift_correction(2.0, 0.5) == pytest.approx(0.5)  # sqrt(0.25) = 0.5
    assert drift_correction(1.5, 0.5) == pytest.approx(math.sqrt(1 / 3))
    assert drift_correction(100.0, 0.5) == 0.5 and drift_correction(1e-6, 0.5) == 2.0


def test_bad_settings_are_refused_with_the_key_named():
    cfg = tiny_cfg("tar_R34_to_R18.yaml")
    cfg.defrost()
    cfg.DISTILL.BALANCE.ENABLED = True
    cfg.SOLVER.MAX_ITER = 50
    cfg.SOLVER.WARMUP_ITERS = 10
    with pytest.raises(DistillConfigError, match=r"\[10, 110\) but SOLVER.MAX_ITER is 50"):
        check_balance_cfg(cfg)
    cfg.DISTILL.BALANCE.WINDOW = 20
    check_balance_cfg(cfg)
    cfg.DISTILL.BALANCE.MODE = "grads"
    with pytest.raises(DistillConfigError, match="BALANCE.MODE"):
        check_balance_cfg(cfg)


# ------------------------------------------------------------------ measuring on a real model
@pytest.fixture(scope="module")
def tar_model_and_batch(teacher_ckpt):
    from detectron2.modeling import build_model

    from distill_d2.engine import Trainer

    # (a random teacher's boxes pass no TAR gate: without one, every term has a gradient)
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DISTILL.TAR.BOX_GATE", "none")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = next(iter(Trainer.build_train_loader(cfg)))
    _step(model, batch)  # (the first step differs slightly from the next ones on the same batch)
    return cfg, model, batch


def _step(model, batch):
    from detectron2.utils.events import EventStorage

    torch.manual_seed(1)  # the same RoI / anchor samples every call
    with EventStorage(0):
        return model.training_losses(batch)


def test_grad_measure_is_the_gradient_norm_on_the_fpn_output_convs(tar_model_and_batch):
    cfg, model, batch = tar_model_and_batch
    params = reference_params(model)
    names = {n for n, _ in params}
    assert names and all(n.startswith("backbone.fpn_output") for n in names), names  # (no top_block in R-CNN)
    det, terms, _ = _step(model, batch)
    assert set(terms) == {"FeatureKD", "RoIClsKD", "RoIBoxKD"}
    got = measure(model, det, terms, "grad", params)
    # independently: .backward() of each loss into .grad, then the norm over those parameters
    for key, loss in [("det", None)] + list(terms.items()):
        d, t, _ = _step(model, batch)
        model.zero_grad(set_to_none=True)
        (sum(d.values()) if key == "det" else t[key]).backward()
        want = torch.sqrt(sum((p.grad.float() ** 2).sum() for _, p in params if p.grad is not None))
        assert got[key] == pytest.approx(want.item(), rel=1e-4), key
    model.zero_grad(set_to_none=True)
    assert all(got[k] > 0 for k in got)
    # loss mode: the values themselves
    vals = measure(model, det, terms, "loss")
    assert vals["det"] == pytest.approx(sum(v.item() for v in det.values()), rel=1e-6)
    assert vals["FeatureKD"] == pytest.approx(terms["FeatureKD"].item(), rel=1e-6)


def test_the_factors_multiply_each_terms_losses(tar_model_and_batch):
    from detectron2.utils.events import EventStorage

    cfg, model, batch = tar_model_and_batch

    def kd():
        torch.manual_seed(1)
        with EventStorage(0):
            return {k: v.item() for k, v in model(batch).items() if k.startswith("loss_kd_")}

    model.kd_weight = 0.5
    plain = kd()
    model.kd_balance.update({"FeatureKD": 3.0, "RoIClsKD": 0.25})
    try:
        scaled = kd()
    finally:
        model.kd_balance.clear()
        model.kd_weight = 1.0
    term = model._key_term
    want = {"FeatureKD": 3.0, "RoIClsKD": 0.25, "RoIBoxKD": 1.0}
    for k in plain:
        assert scaled[k] == pytest.approx(plain[k] * want[term[k]], rel=1e-5), k


def test_reference_params_can_be_chosen_and_a_wrong_name_is_refused(tar_model_and_batch):
    _, model, _ = tar_model_and_batch
    assert {n for n, _ in reference_params(model, ["backbone.fpn_lateral5"])} == {
        "backbone.fpn_lateral5.weight", "backbone.fpn_lateral5.bias"}
    with pytest.raises(DistillConfigError, match="DISTILL.BALANCE.PARAMS"):
        reference_params(model, ["backbone.fpn_typo"])
    assert not any(n.startswith("kd_terms.") for n, _ in reference_params(model, ["kd_terms.", "backbone."]))


def _toy_measure(rank, world):
    """measure() on a toy student (a parameter named like an FPN output conv) with each process's share of
    4 samples; the losses are means over the process's samples, as detectron2's are."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.fpn_output2 = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    y = torch.randn(4, 2)
    n = 4 // world
    xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    out = model.backbone.fpn_output2(xs)
    det = {"loss_a": ((out - ys) ** 2).mean()}
    terms = {"T": (out ** 3).mean(), "U": out.abs().mean()}
    return measure(model, det, terms, "grad"), measure(model, det, terms, "loss")


def test_one_and_two_processes_measure_the_same():
    from conftest import in_processes

    one = _toy_measure(0, 1)
    got = in_processes(_toy_measure)
    for r in (0, 1):
        for mode in (0, 1):
            assert got[r][mode] == pytest.approx(one[mode], rel=1e-6), (r, mode, got[r][mode], one[mode])
    # (a norm of per-process gradients instead of their mean would differ)
    assert one[0]["T"] > 0 and one[0]["det"] > 0


# ------------------------------------------------------------------ train_net: calibrate, freeze, resume
BALANCE_OPTS = ["DISTILL.BALANCE.ENABLED", "True", "DISTILL.BALANCE.START", "1", "DISTILL.BALANCE.WINDOW", "4",
                "DISTILL.BALANCE.EVERY", "2", "SOLVER.MAX_ITER", "7", "SOLVER.CHECKPOINT_PERIOD", "3",
                "DATASETS.TEST", "()", "DISTILL.DECAY.TYPE", "constant", "DISTILL.TAR.BOX_GATE", "none",
                "DISTILL.GUARD.ACTION", "off"]  # (a random teacher: loss_kd_feat ~1e5 x the detection)


def _train(out, teacher_ckpt, datasets_dir, *extra, resume=False):
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(SYN, "tar_R34_to_R18.yaml")]
    cmd += (["--resume"] if resume else []) + TINY_OPTS + BALANCE_OPTS + [
        "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "OUTPUT_DIR", str(out)] + list(extra)
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr


def test_calibrates_once_freezes_logs_and_resumes_exactly(teacher_ckpt, datasets_dir, tmp_path):
    full = tmp_path / "full"
    log = _train(full, teacher_ckpt, datasets_dir)
    assert "DISTILL.BALANCE (grad mode, 2 samples over iterations [1, 5)" in log and "calibrated at iteration 4" in log
    ck = torch.load(full / "model_final.pth", map_location="cpu", weights_only=False)
    st = ck["distill_balance"]
    assert st["calibrated"] and len(st["samples"]) == 2 and set(st["factors"]) == {"FeatureKD", "RoIClsKD", "RoIBoxKD"}
    want = choose_factors(st["samples"], ["FeatureKD", "RoIClsKD", "RoIBoxKD"])
    assert st["factors"] == pytest.approx({k: c["factor"] for k, c in want.items()})
    assert len({round(f, 6) for f in st["factors"].values()}) == 3  # really balanced, not all 1
    rows = [json.loads(x) for x in (full / "metrics.json").read_text().splitlines()]
    last = rows[-1]
    assert last["kd/balance/FeatureKD"] == pytest.approx(st["factors"]["FeatureKD"])
    # the checkpoint of iteration 2 (mid-window: one sample) resumes to the same factors and weights
    res = tmp_path / "resumed"
    res.mkdir()
    shutil.copy(full / "model_0000002.pth", res / "model_0000002.pth")
    (res / "last_checkpoint").write_text("model_0000002.pth")
    mid = torch.load(res / "model_0000002.pth", map_location="cpu", weights_only=False)["distill_balance"]
    assert not mid["calibrated"] and len(mid["samples"]) == 1
    _train(res, teacher_ckpt, datasets_dir, resume=True)
    ck2 = torch.load(res / "model_final.pth", map_location="cpu", weights_only=False)
    assert ck2["distill_balance"]["factors"] == st["factors"]
    for k, v in ck["model"].items():
        assert torch.equal(v, ck2["model"][k]), k
    # resumed after calibration: not recalibrated
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(full / "model_0000005.pth", again / "model_0000005.pth")
    (again / "last_checkpoint").write_text("model_0000005.pth")
    log = _train(again, teacher_ckpt, datasets_dir, resume=True)
    assert "calibrated at iteration" not in log and "factors from the checkpoint (not recalibrated)" in log
    assert torch.load(again / "model_final.pth", map_location="cpu",
                      weights_only=False)["distill_balance"]["factors"] == st["factors"]


def test_which_iterations_measure(tar_model_and_batch):
    from distill_d2.hooks import KDBalancer

    cfg, model, _ = tar_model_and_batch
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 100, 10, (80,)
    cfg.DISTILL.BALANCE.merge_from_list(["ENABLED", True, "WINDOW", 20, "EVERY", 5, "DRIFT.PERIOD", 15,
                                         "DRIFT.SAMPLES", 3])
    cfg.DISTILL.DECAY.STOP_ITER = 90
    check_balance_cfg(cfg)
    h = KDBalancer(cfg, BalanceState(model))
    assert [i for i in range(100) if h._measures(i)] == [10, 15, 20, 25]  # START = WARMUP_ITERS
    h.state.calibrated = True
    # drift windows end at 30 + 15k - 1: [42, 45), [57, 60), [72, 75); none from the last LR step (80) on
    assert [i for i in range(100) if h._measures(i)] == [42, 43, 44, 57, 58, 59, 72, 73, 74]
    cfg.DISTILL.BALANCE.DRIFT.PERIOD = 0
    off = KDBalancer(cfg, BalanceState(model))
    off.state.calibrated = True
    assert not any(off._measures(i) for i in range(100))
