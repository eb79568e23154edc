"""The loss scale guard (distill_d2/hooks.py LossScaleGuard; GUARD, DISTILL.GUARD).

Replays loss series recorded from real tiny runs on the synthetic data
(tests/data/guard_series/*.json, written by tests/data/record_guard_series.py:
the runs' logged loss dicts, the guard off) through the guard each preset
builds: a correct run passes, each broken run stops with its own diagnosis.
Plus the rules on hand-made series, the stop under two processes and one real
plain run at a huge learning rate.
"""
import json
import os
import statistics

import pytest

from conftest import REPO, SYN, TINY_OPTS, in_processes

SERIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "guard_series")


def recorded(name):
    with open(os.path.join(SERIES, f"{name}.json")) as f:
        return json.load(f)


def preset_guard(rec, *opts):
    """The guard of the recorded run's config and opts with both guards on (their default), + ``opts``."""
    from distill_d2.config import load_cfg
    from distill_d2.hooks import guard_from_cfg

    o = rec["opts"]
    pairs = [(k, v) for k, v in zip(o[::2], o[1::2]) if k not in ("GUARD.ACTION", "DISTILL.GUARD.ACTION")]
    cfg = load_cfg(os.path.join(REPO, rec["config_file"]), [x for p in pairs for x in p] + list(opts))
    assert cfg.GUARD.ACTION == "error" and cfg.DISTILL.GUARD.ACTION == "error"
    return guard_from_cfg(cfg)


def peaks(guard, series):
    """Replay the series; return the largest value each judged quantity took (``LossScaleGuard.last``)
    and the first Trip (None: the run trains through)."""
    top, first = {}, None
    for row in series:
        trips = guard.update(row["iter"], {k: v for k, v in row.items() if k.startswith("loss_")},
                             row.get("kd_weight", 1.0), row.get("normalizer"))
        first = first or (trips[0] if trips else None)
        last = guard.last
        for name, v in [("det_growth", last["det_growth"])] + [
                (f"{q}/{k}", v) for q in ("kd_ratio", "kd_growth") for k, v in last[q].items()]:
            if v is not None:
                top[name] = max(top.get(name, 0.0), v)
    return top, first


def replay(guard, series):
    return peaks(guard, series)[1]


def det(row):
    return sum(abs(v) for k, v in row.items() if k.startswith("loss_") and not k.startswith("loss_kd_"))


def old_guard_trip(series, warmup=10, max_growth=100.0, max_ratio=1000.0):
    """The guard before issue 16 (its rules, for the record): (iteration, term) of its first trip."""
    early = {}
    for row in series:
        lam = row["kd_weight"]
        for k in sorted(k for k in row if k.startswith("loss_kd_")):
            v = row[k] / lam
            if row["iter"] == 0 and v > max_ratio * det(row):
                return row["iter"], k
            e = early.setdefault(k, [])
            if len(e) < warmup:
                e.append(v)
            elif statistics.median(e) > 0 and v > max_growth * statistics.median(e):
                return row["iter"], k
    return None


def gate_opening(series, start=1 / 16, shut=10, until=40):
    """The series with loss_kd_box as if RoIBoxKD's gate passed ``start`` x the RoIs it passed for the first
    ``shut`` iterations, then opened linearly to all of them by iteration ``until`` (constructed from a real
    run: on the synthetic data the recorded gates pass 15-30% of the positives from the start)."""
    out = []
    for row in series:
        f = start + (1 - start) * min(1.0, max(0.0, (row["iter"] - shut) / (until - shut)))
        out.append(dict(row, loss_kd_box=row["loss_kd_box"] * f))
    return out


# ------------------------------------------------------------------ replayed real runs
@pytest.mark.parametrize("name", ["tar_correct", "tar_correct_teacher150", "plain_correct",
                                  "retinanet_correct_one_object"])
def test_replayed_correct_runs_train_on(name):
    """Correct runs never trip, with margins: the measured peaks stay far below the limits."""
    rec = recorded(name)
    top, trip = peaks(preset_guard(rec), rec["series"])
    assert trip is None, trip.message
    assert top["det_growth"] < 5.0 / 1.5, top  # GUARD.MAX_GROWTH 5
    for k, v in top.items():
        if k.startswith("kd_ratio/"):
            assert v < 1000 / 10, top  # DISTILL.GUARD.MAX_RATIO_TO_DET 1000
        if k.startswith("kd_growth/"):
            assert v < 100 / 10, top  # DISTILL.GUARD.MAX_GROWTH 100


def test_a_gated_box_term_rising_from_near_zero_trains_on_where_the_old_guard_stopped():
    """Issue 16: the old guard judged growth against the term's own early median, ~0 while few RoIs
    pass the gate, and stopped a correct run; the box term rising ~100x is fine against the floor."""
    rec = recorded("tar_correct_teacher150")
    series = gate_opening(rec["series"])
    early = statistics.median(r["loss_kd_box"] / r["kd_weight"] for r in series[:10])
    late = statistics.median(r["loss_kd_box"] / r["kd_weight"] for r in series[-20:])
    assert early < 0.002 and late / early > 100 and early / det(series[0]) < 1e-3  # the issue's situation
    assert old_guard_trip(series)[1] == "loss_kd_box"  # ... which stopped the old guard
    top, trip = peaks(preset_guard(rec), series)
    assert trip is None, trip.message
    assert top["kd_growth/loss_kd_box"] < 10, top


def test_replayed_random_teacher_stops_at_the_first_iteration():
    rec = recorded("tar_random_teacher")
    t = replay(preset_guard(rec), rec["series"])
    assert (t.kind, t.term, t.iteration) == ("kd_ratio", "loss_kd_feat", 0), t
    assert t.message.startswith("Distillation loss out of scale: loss_kd_feat = ")
    assert "x the detection losses" in t.message and "Likely causes: teacher weights that do not belong" in t.message
    assert "the config sets" not in t.message and "diverges" not in t.message  # no weight raised: not named


@pytest.mark.parametrize("name", ["tar_lr_x10", "plain_lr_x10"])
def test_replayed_lr_x10_stops_as_divergence(name):
    """LR x10: the detector itself diverges (what the message says, not "teacher weights"), before any
    distillation check; the old guard (distillation runs only) would have trained on or blamed the teacher."""
    rec = recorded(name)
    t = replay(preset_guard(rec), rec["series"])
    assert t is not None and t.message.startswith("Training diverges"), t
    assert "The detector itself diverges: lower SOLVER.BASE_LR" in t.message or \
        "the detector itself diverges and the distillation term follows. Lower SOLVER.BASE_LR" in t.message
    assert "teacher weights" not in t.message
    assert t.iteration < len(rec["series"]) - 20  # early enough to matter


def test_replayed_weight_x1e4_stops_naming_the_weight():
    """DISTILL.FEAT.WEIGHT x1e4: loss_kd_feat ~2e5x the detection losses at iteration 0; the message leads
    with the weight the config raises (a random teacher's, with no weight raised, leads with the teacher)."""
    rec = recorded("tar_feat_weight_x1e4")
    t = replay(preset_guard(rec), rec["series"])
    assert (t.kind, t.term, t.iteration) == ("kd_ratio", "loss_kd_feat", 0), t
    assert ("Likely causes: a term weight far too large (the config sets DISTILL.FEAT.WEIGHT = 100 (default 1)), "
            "or teacher weights") in t.message


def test_replayed_gated_box_weight_x1e4_needs_a_tighter_ratio():
    """DISTILL.TAR.BOX_WEIGHT x1e4 on the gated box term: it stays 30-300x the detection losses (their level
    unchanged), below the default DISTILL.GUARD.MAX_RATIO_TO_DET 1000 (TAR's own feature term is ~20-40x in a
    correct run); MAX_RATIO_TO_DET 100 stops it, naming the weight, and still passes the correct runs."""
    rec = recorded("tar_box_weight_x1e4")
    top, trip = peaks(preset_guard(rec), rec["series"])
    assert trip is None and 100 < top["kd_ratio/loss_kd_box"] < 1000 and top["det_growth"] < 2, top
    t = replay(preset_guard(rec, "DISTILL.GUARD.MAX_RATIO_TO_DET", "100.0"), rec["series"])
    assert (t.kind, t.term) == ("kd_ratio", "loss_kd_box"), t
    assert "a term weight far too large (the config sets DISTILL.TAR.BOX_WEIGHT = 10000 (default 1))" in t.message
    for name in ("tar_correct", "tar_correct_teacher150"):
        assert replay(preset_guard(recorded(name), "DISTILL.GUARD.MAX_RATIO_TO_DET", "100.0"),
                      recorded(name)["series"]) is None


def test_a_dense_detector_is_judged_net_of_its_loss_normaliser():
    """RetinaNet divides its losses by an EMA of the positive anchors started at 100: with one object per
    image it falls to ~10 and the logged losses rise ~6x in a correct run, which raw levels would stop."""
    rec = recorded("retinanet_correct_one_object")
    assert rec["series"][0]["normalizer"] > 80 and rec["series"][-1]["normalizer"] < 15
    raw = [{k: v for k, v in r.items() if k != "normalizer"} for r in rec["series"]]
    assert replay(preset_guard(rec), raw).kind == "diverges"
    assert replay(preset_guard(rec), rec["series"]) is None  # (the hook passes the model's loss_normalizer)


# ------------------------------------------------------------------ rules, on hand-made series
def _feed(guard, rows, lam=1.0):
    """Feed rows of {loss: value}; return the first Trip (or None)."""
    for it, row in enumerate(rows):
        trips = guard.update(it, row, lam)
        if trips:
            return trips[0]
    return None


def test_detector_divergence_is_judged_against_the_lowest_level_with_a_floor():
    from distill_d2.hooks import LossScaleGuard

    # falls 3 -> 1, then rises to 4.5 (< 5x the low 1): trains on; at 5.5 it stops, saying what rose
    rows = [{"loss_cls": 2.0, "loss_box_reg": 1.0}] * 3 + [{"loss_cls": 0.8, "loss_box_reg": 0.2}] * 3
    rows += [{"loss_cls": 4.0, "loss_box_reg": 0.5}] * 3
    assert _feed(LossScaleGuard(window=3), rows) is None
    t = _feed(LossScaleGuard(window=3), rows + [{"loss_cls": 5.0, "loss_box_reg": 0.5}] * 2)
    assert t.kind == "diverges" and t.iteration == 10 and t.action_key == "GUARD.ACTION"
    assert ("rose to 5.5 at iteration 10 (sum of the loss_* terms, median of the last 3 iterations), 5.5x the lowest "
            "level they had reached (1 at iteration 4; limit GUARD.MAX_GROWTH = 5): loss_box_reg 0.2 -> 0.5, "
            "loss_cls 0.8 -> 5.") in t.message
    assert "The detector itself diverges: lower SOLVER.BASE_LR" in t.message and "teacher" not in t.message
    # magnitudes: a negative loss counts as its size; a lone spike (one iteration x1000) is not a level
    assert _feed(LossScaleGuard(window=3), [{"loss_cls": -1.0}] * 3 + [{"loss_cls": -6.0}] * 2).kind == "diverges"
    assert _feed(LossScaleGuard(window=3), [{"loss_cls": 1.0}] * 5 + [{"loss_cls": 1000.0}] + [{"loss_cls": 1.0}] * 5) \
        is None
    # a well-fitted model's 0.01 rising to 0.5 is 50x, but the floor GUARD.MIN_LEVEL 0.2 makes it 2.5x
    low = [{"loss_cls": 0.01}] * 3 + [{"loss_cls": 0.5}] * 3
    assert _feed(LossScaleGuard(window=3), low) is None
    assert _feed(LossScaleGuard(window=3, min_level=0.01), low).kind == "diverges"
    t = _feed(LossScaleGuard(window=3), low + [{"loss_cls": 1.5}] * 2)
    assert "7.5x the lowest level they had reached (0.01 at iteration 2, floor GUARD.MIN_LEVEL = 0.2;" in t.message
    assert _feed(LossScaleGuard(window=3, det_check=False), rows + [{"loss_cls": 50.0}] * 3) is None


KD = dict(max_ratio_to_det=1000.0, warmup_iters=3, max_growth=100.0, growth_floor=0.05)


def test_a_gated_term_rising_from_zero_is_judged_against_a_fraction_of_the_detection_losses():
    from distill_d2.hooks import LossScaleGuard

    # loss_kd_box 0.0012 -> 0.15 is 125x its own early median (the old guard stopped here), but only
    # 1.2x the floor 0.05 x det's first level 2.5
    rows = [{"loss_cls": 2.0, "loss_rpn_cls": 0.5, "loss_kd_box": 0.0012}] * 5
    rows += [{"loss_cls": 1.0, "loss_rpn_cls": 0.3, "loss_kd_box": v} for v in (0.0, 0.05, 0.15, 0.15, 0.15)]
    assert _feed(LossScaleGuard(window=3, kd=KD), rows) is None
    # ... up to MAX_GROWTH x that floor: at 12.5 it is off scale, while the detection losses are in scale
    t = _feed(LossScaleGuard(window=3, kd=KD, weight_note="the config sets DISTILL.TAR.BOX_WEIGHT = 10000 (default 1)"),
              rows + [{"loss_cls": 1.0, "loss_rpn_cls": 0.3, "loss_kd_box": 13.0}] * 2)
    assert (t.kind, t.term, t.iteration, t.action_key) == ("kd_growth", "loss_kd_box", 11, "DISTILL.GUARD.ACTION")
    assert ("loss_kd_box rose to 13 (median of the last 3 iterations) at iteration 11, 104x its reference level "
            "0.125, the larger of its median over its first 3 iterations (0.0012) and DISTILL.GUARD.GROWTH_FLOOR = "
            "0.05 x the detection losses' first level (2.5) (limit DISTILL.GUARD.MAX_GROWTH = 100), while the "
            "detection losses are in scale (1x the lowest level they had reached)") in t.message
    assert "a term weight far too large (the config sets DISTILL.TAR.BOX_WEIGHT = 10000 (default 1))" in t.message
    # lambda: the terms are judged undecayed (x 1/lambda); lambda 0 is not judged
    assert _feed(LossScaleGuard(window=3, kd=KD), rows, lam=0.001).term == "loss_kd_box"  # 150 > 12.5
    assert _feed(LossScaleGuard(window=3, kd=KD), [{"loss_cls": 1.0, "loss_kd_feat": 1e9}] * 3, lam=0.0) is None


def test_the_issue_16_numbers():
    """The reported stop: loss_kd_box median 0.001192 over the first 10 iterations, 0.1517 at iteration 13
    (127x: the old guard stopped the correct run); judged against 5% of the detection losses it is ~1x."""
    from distill_d2.hooks import LossScaleGuard

    box = [0.0011, 0.0013, 0.0009, 0.001184, 0.0014, 0.0011, 0.001204, 0.0012, 0.0015, 0.0010, 0.03, 0.08, 0.11, 0.1517]
    rows = [{"iter": i, "kd_weight": 1.0, "loss_cls": 1.6, "loss_box_reg": 0.3, "loss_rpn_cls": 0.5,
             "loss_kd_box": v} for i, v in enumerate(box)]
    assert statistics.median(box[:10]) == pytest.approx(0.001192) and old_guard_trip(rows) == (13, "loss_kd_box")
    guard = LossScaleGuard(kd=dict(max_ratio_to_det=1000.0, warmup_iters=10, max_growth=100.0, growth_floor=0.05))
    assert _feed(guard, [{k: v for k, v in r.items() if k.startswith("loss_")} for r in rows]) is None
    assert guard.last["kd_growth"]["loss_kd_box"] < 1.0  # level 0.0012..0.03 vs 0.05 x 2.4


def test_a_term_that_grows_with_the_detection_losses_is_diagnosed_as_divergence():
    from distill_d2.hooks import LossScaleGuard

    # LR x10: loss_kd_box follows the detector (x1000 while det grows 4x, below its own limit 5x)
    rows = [{"loss_cls": 2.0, "loss_kd_box": 0.001}] * 3 + [{"loss_cls": 8.0, "loss_kd_box": 33.0}] * 2
    t = _feed(LossScaleGuard(window=3, kd=KD), rows)
    assert t.kind == "kd_growth" and t.message.startswith("Training diverges: loss_kd_box rose to 33")
    assert ("but the detection losses grew too (4x the lowest level they had reached: loss_cls 2 -> 8): the detector "
            "itself diverges and the distillation term follows. Lower SOLVER.BASE_LR") in t.message
    assert "teacher weights" not in t.message
    # the detector's own check, when it trips, is the diagnosis (whatever the terms do)
    t = _feed(LossScaleGuard(window=3, kd=KD), rows[:3] + [{"loss_cls": 17.0, "loss_kd_box": 33.0}] * 2)
    assert t.kind == "diverges" and "Distillation terms now (divided by lambda): loss_kd_box 33." in t.message


# ------------------------------------------------------------------ the hook in a run
def _guard_run(rank, world):
    """(iteration, message) of the FloatingPointError the hook raises in this process ((None, "trained on"): none)."""
    from detectron2.utils.events import EventStorage

    from conftest import tiny_cfg
    from distill_d2.hooks import LossGuard

    hook = LossGuard(tiny_cfg("faster_rcnn_R18_student.yaml", "GUARD.WINDOW", "1"))

    class Trainer:  # what the hook reads of detectron2's trainer
        iter, storage, model = 0, None, None

    hook.trainer = Trainer()
    with EventStorage() as storage:
        hook.trainer.storage = storage
        try:
            for it, loss in enumerate([2.0, 1.0, 1.2, 9.0, 1.0]):
                hook.trainer.iter = storage.iter = it
                if rank == 0:  # as in detectron2: only the main process logs the (gathered) losses
                    storage.put_scalar("loss_cls", loss)
                hook.after_step()
            return None, "trained on"
        except FloatingPointError as e:
            return it, str(e)


def test_every_process_stops_at_the_same_iteration():
    """Only the main process sees the logged losses: its decision reaches the others, which raise the
    same error at the same step instead of waiting in the next all-reduce."""
    got = in_processes(_guard_run)
    assert got[0] == got[1] and got[0][0] == 3, got
    assert got[0][1].startswith("Training diverges: the detection losses rose to 9 at iteration 3")


def test_a_plain_detector_at_a_huge_learning_rate_stops(tmp_path):
    """A real plain Faster R-CNN at SOLVER.BASE_LR 5: gradient clipping keeps the losses finite (no NaN),
    the guard (on by default) stops it within a few iterations, saying the detector diverges."""
    from detectron2.engine import default_argument_parser

    from distill_d2.engine import main

    argv = ["--config-file", os.path.join(SYN, "faster_rcnn_R18_student.yaml")] + TINY_OPTS + [
        "OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", "()", "SOLVER.BASE_LR", "5.0", "SOLVER.MAX_ITER", "12",
        "SEED", "0", "GUARD.WINDOW", "3"]
    with pytest.raises(FloatingPointError, match=r"(?s)^Training diverges: the detection losses rose to .* at "
                                                 r"iteration \d+ .*x the lowest level.*The detector itself diverges: "
                                                 r"lower SOLVER.BASE_LR"):
        main(default_argument_parser().parse_args(argv))
    assert not (tmp_path / "model_final.pth").exists()
