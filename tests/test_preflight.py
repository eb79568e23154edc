"""python -m distill_d2.preflight (distill_d2/preflight.py): the report's tables, flags and the end-to-end run."""
import json
import os

import pytest
import torch

from conftest import SYN, TINY_OPTS
from distill_d2 import preflight
from distill_d2.preflight import RED, YELLOW, scale_flags, scale_table


# ------------------------------------------------------------------ tables and flags on constructed numbers
def _sample(det_g, grads, det_vals, vals):
    return {"measure": {"det": det_g, **grads}, "values": vals, "det_values": det_vals}


def test_scale_table_takes_medians_and_shares_of_the_summed_norms():
    samples = [_sample(2.0, {"a": 6.0, "b": 1.0}, {"loss_cls": 1.0, "loss_box_reg": 0.5}, {"a": 10.0, "b": 0.1}),
               _sample(7.0, {"a": 2.0, "b": 1.0}, {"loss_cls": 2.0, "loss_box_reg": 1.0}, {"a": 30.0, "b": 0.3}),
               _sample(3.0, {"a": 100.0, "b": 1.0}, {"loss_cls": 1.5, "loss_box_reg": 1.5}, {"a": 20.0, "b": 0.2})]
    chosen = {"a": {"ratio": 2.0, "factor": 0.25, "note": ""}, "b": {"ratio": 1 / 3, "factor": 1.5, "note": "x"}}
    rows = scale_table(samples, chosen)
    det, a, b = rows
    # medians: det grad 3, a grad 6, b grad 1 -> total 10; det value median of (1.5, 3, 3) = 3
    assert det["term"] == "detection losses" and det["grad"] == 3.0 and det["value"] == 3.0
    assert det["share"] == pytest.approx(0.3) and a["share"] == pytest.approx(0.6) and b["share"] == pytest.approx(0.1)
    assert a["value"] == 20.0 and b["value"] == pytest.approx(0.2) and a["grad"] == 6.0
    assert (a["ratio"], a["factor"], b["note"]) == (2.0, 0.25, "x")  # passed through from choose_factors
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def _row(term, ratio, value=1.0, grad=1.0, factor=1.0):
    return {"term": term, "value": value, "grad": grad, "share": 0.5, "ratio": ratio, "factor": factor, "note": ""}


def test_scale_flags_thresholds():
    det = _row("detection losses", 1.0)
    rows = [det, _row("ok", 1.0), _row("edge_hi", 10.0), _row("hi", 10.5), _row("lo", 0.09), _row("huge", 101.0),
            _row("tiny", 0.009), _row("edge_red", 100.0), _row("nan", 1.0, value=float("nan")),
            _row("inf", 1.0, grad=float("inf")), _row("nograd", 0.0, grad=0.0)]
    got = {t.split()[1].rstrip("'s"): lvl for lvl, t in scale_flags(rows, balancing=False)}
    assert got == {"hi": YELLOW, "lo": YELLOW, "huge": RED, "tiny": RED, "edge_red": YELLOW, "nan": RED,
                   "inf": RED, "nograd": YELLOW}
    # balancing on: the weights will be calibrated, so no ratio flags; broken terms are still flagged
    got_b = {t.split()[1].rstrip("'s"): lvl for lvl, t in scale_flags(rows, balancing=True)}
    assert got_b == {"nan": RED, "inf": RED, "nograd": YELLOW}


def test_swamping_flag_names_the_factor_and_the_direction():
    (lvl, text), = scale_flags([_row("d", 1.0), _row("big", 2500.0, factor=4e-4)], balancing=False)
    assert lvl == RED and "2.5e+03 x" in text and "swamp" in text and "by ~0.0004" in text
    (lvl, text), = scale_flags([_row("d", 1.0), _row("small", 0.001, factor=500.0)], balancing=False)
    assert lvl == RED and "do nothing" in text and "500" in text


# ------------------------------------------------------------------ end to end on tiny synthetic configs
MGD = os.path.join(SYN, "mgd_retinanet_R34_to_R18.yaml")


def _run(tmp_path, ckpt, *opts, val_images=4, time_steps=1, name="out"):
    out = str(tmp_path / name)
    code = preflight.main(["--config-file", MGD, "--out", out, "--steps", "2", "--time-steps", str(time_steps),
                           "--val-images", str(val_images), *TINY_OPTS, "DISTILL.TEACHER.WEIGHTS", ckpt, *opts])
    with open(os.path.join(out, "preflight.md")) as f:
        page = f.read()
    with open(os.path.join(out, "preflight.json")) as f:
        data = json.load(f)
    return code, out, page, data


def test_random_teacher_is_red_and_the_page_and_plot_are_written(tmp_path, make_ckpt):
    ckpt = make_ckpt("retinanet_R34_teacher.yaml")
    code, out, page, data = _run(tmp_path, ckpt)
    assert code == 2
    assert "teacher's AP on the first 4 images" in page and "Verdict: **RED**" in page
    assert data["teacher_ap"]["images"] == 4 and data["teacher_ap"]["AP"] < 5.0
    assert "no detections" in page  # a random teacher scores below its 0.05 threshold everywhere
    assert data["teacher_keys"]["missing"] == [] and data["teacher_keys"]["shapes"] == []
    # every section ran: the loss-scale table has the detection row and MGD's term, the cost a ratio
    for title in ("## Teacher checkpoint", "## Build", "## Teacher AP", "## Loss scale", "## Cost"):
        assert title in page
    terms = [r["term"] for r in data["scale"]]
    assert terms[0] == "detection losses" and terms[1:] == ["MaskedGenerativeKD"]
    assert all(r["grad"] > 0 for r in data["scale"])
    assert sum(r["share"] for r in data["scale"]) == pytest.approx(1.0)
    assert data["cost"]["ratio"] > 0 and os.path.getsize(os.path.join(out, "preflight_grad_shares.png")) > 1000
    # several reports in one table (python -m distill_d2.preflight summary DIR ...)
    mgd = data["scale"][1]
    row = preflight.summary_table([out]).splitlines()[2]
    assert row.startswith(f"| `mgd_retinanet_R34_to_R18.yaml` | MaskedGenerativeKD | {mgd['value']:.3g} | "
                          f"{mgd['ratio']:.3g} | {100 * mgd['share']:.0f}% | {mgd['factor']:.3g} | "
                          f"{data['cost']['ratio']:.2f}x | red: the teacher's AP")


def test_missing_key_and_a_swamping_weight_are_red(tmp_path, make_ckpt):
    sd = torch.load(make_ckpt("retinanet_R34_teacher.yaml"), map_location="cpu", weights_only=False)
    dropped = "head.cls_score.weight"
    assert dropped in sd["model"]
    del sd["model"][dropped]
    bad = str(tmp_path / "teacher_missing.pth")
    torch.save(sd, bad)
    code, out, page, data = _run(tmp_path, bad, "DISTILL.MGD.RETINANET.WEIGHT", "1.0", val_images=0,
                                 time_steps=0)
    assert code == 2
    assert data["teacher_keys"]["missing"] == [dropped] and dropped in page
    red = " | ".join(t for lvl, t in data["flags"] if lvl == RED)
    assert "1 missing" in red and "swamp" in red  # MGD's sum at weight 1.0 is ~1e6 x detection
    mgd = data["scale"][1]
    assert mgd["ratio"] > 100 and mgd["factor"] < 0.01
    # balancing on: the same weight is calibrated, so it is no longer a ratio flag
    code, out, page, data = _run(tmp_path, bad, "DISTILL.MGD.RETINANET.WEIGHT", "1.0", "DISTILL.BALANCE.ENABLED",
                                 "True", val_images=0, time_steps=0, name="balanced")
    assert not any("swamp" in t for _, t in data["flags"]) and any("1 missing" in t for _, t in data["flags"])


def test_a_run_that_would_fail_is_red_with_the_reason(tmp_path, make_ckpt):
    out = str(tmp_path / "o")
    # the data has 6 classes, the model 5: the training loader's data check stops it (after the checkpoint
    # report: the teacher follows the student's class count, so its class head no longer fits either)
    rep = preflight.run(MGD, TINY_OPTS + ["DISTILL.TEACHER.WEIGHTS", make_ckpt("retinanet_R34_teacher.yaml"),
                                          "MODEL.RETINANET.NUM_CLASSES", "5"], out, steps=1, val_images=0)
    assert len(rep.red) == 2 and "2 wrongly-shaped" in rep.red[0]
    assert "synthetic_tiny_train" in rep.red[1] and "problems" in rep.red[1]
    with open(os.path.join(out, "preflight.md")) as f:
        assert "## Traceback" in f.read()
