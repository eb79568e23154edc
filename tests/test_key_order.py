"""List-valued keys written in an order other than the natural one give the naturally ordered result.

Levels are kept finest first (by stride) whatever the order written, so a level-indexed rule (DeFeat's
box-to-level assignment, the stride-4 backbone mask, the teacher-head masks) cannot pick the wrong
level; HGD's STAGE_WEIGHTS follow LEVELS as written; DECAY.STEPS and DISTILL.TERMS are order-free.
Terms are compared with the same adapter weights (state dicts keyed by level / term name).
"""
import pytest
import torch

from distill_d2.methods.defeat import DecoupledBackboneKD, DecoupledFeatureKD
from distill_d2.methods.generic import FeatureKD
from distill_d2.methods.hgd import HierarchicalFeatureKD
from distill_d2.methods.tbd import TaskDecoupledFeatureKD
from test_methods import cfg_with, ctx, record


def build(cls, family="rcnn", like=None, **keys):
    """``cls`` built from ``keys``; with ``like``, its adapters take that term's weights."""
    cfg = cfg_with(**keys)
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    torch.manual_seed(0)
    term = cls(cfg, ctx(cfg, family))
    if like is not None:
        term.load_state_dict(like.state_dict())
    return term


def same_losses(a, b, rec):
    la, lb = a(rec)[0], b(rec)[0]
    assert sorted(la) == sorted(lb)
    for k in la:
        assert la[k].item() == pytest.approx(lb[k].item(), rel=1e-6), k
    return la


@pytest.mark.parametrize("cls,key,keys", [
    (FeatureKD, "FEAT__LEVELS", {}),
    (FeatureKD, "FEAT__LEVELS", {"FEAT__MASK": "box", "FEAT__NORM": "mean"}),
    # DeFeat puts each box on one level by its index among the levels: a wrong order moves boxes
    (DecoupledFeatureKD, "FEAT__LEVELS", {"FEAT__MASK": "defeat", "FEAT__DEFEAT_CANONICAL_SIZE": 8.0}),
    (DecoupledBackboneKD, "DEFEAT__BACKBONE_LEVELS", {"DEFEAT__BACKBONE_ADAPTER": "conv1x1"}),
])
def test_feature_levels_in_any_order(cls, key, keys):
    levels = ["res2", "res3"] if "BACKBONE" in key else ["p2", "p3"]
    natural = build(cls, **keys, **{key: levels})
    written = build(cls, like=natural, **keys, **{key: levels[::-1]})
    assert written.levels == natural.levels == levels
    out = same_losses(natural, written, record())
    assert all(v.item() > 0 for v in out.values())


def test_defeat_levels_follow_the_stride_not_the_written_order():
    """The mask of each level is the same (p2's boxes on p2), whichever order FEAT.LEVELS lists."""
    keys = {"FEAT__MASK": "defeat", "FEAT__DEFEAT_CANONICAL_SIZE": 8.0}
    rec = record()
    m1 = build(DecoupledFeatureKD, FEAT__LEVELS=["p2", "p3"], **keys).masks(rec)
    m2 = build(DecoupledFeatureKD, FEAT__LEVELS=["p3", "p2"], **keys).masks(rec)
    assert all(torch.equal(m1[lv], m2[lv]) for lv in ("p2", "p3"))
    assert m1["p2"][0].sum() > 0 and m1["p3"][0].sum() > 0  # boxes on both levels


def test_tbd_levels_in_any_order():
    from test_process_count import process_record

    rec, _ = process_record([0, 1, 2])
    natural = build(TaskDecoupledFeatureKD, TBD__LEVELS=["p2", "p3"])
    written = build(TaskDecoupledFeatureKD, like=natural, TBD__LEVELS=["p3", "p2"])
    assert written.levels == ["p2", "p3"]
    same_losses(natural, written, rec)
    m1, m2 = natural.masks(rec), written.masks(rec)
    assert all(torch.equal(m1[lv], m2[lv]) for lv in ("p2", "p3")) and m1["p3"].sum() > 0


def test_hgd_stage_weights_follow_levels_as_written():
    keys = dict(HGD__ADAPTER="conv1x1", HGD__MACRO="fixed")
    rec = record()
    natural = build(HierarchicalFeatureKD, HGD__LEVELS=["res2", "p2", "p3"], HGD__STAGE_WEIGHTS=[2.0, 1.0, 3.0], **keys)
    written = build(HierarchicalFeatureKD, like=natural, HGD__LEVELS=["p3", "res2", "p2"],
                    HGD__STAGE_WEIGHTS=[3.0, 2.0, 1.0], **keys)
    out, scalars = written(rec)
    assert [s for s, *_ in written.pairs] == ["res2", "p2", "p3"]  # processed finest first
    scales = {lv: scalars[f"kd/hgd_scale_{lv}"].item() for lv in ("res2", "p2", "p3")}
    assert scales == {"res2": 2.0, "p2": 1.0, "p3": 3.0}
    same_losses(natural, written, rec)
    # by hand: WEIGHT * mean_k(c_k L_k) with each weight on its own stage
    raw = {lv: scalars[f"kd/hgd_{lv}"].item() for lv in ("res2", "p2", "p3")}
    assert out["loss_kd_hgd"].item() == pytest.approx((2 * raw["res2"] + raw["p2"] + 3 * raw["p3"]) / 3, rel=1e-6)
    # the same weights read in stride order instead would weigh other stages (the losses differ)
    shuffled = build(HierarchicalFeatureKD, like=natural, HGD__LEVELS=["p3", "res2", "p2"],
                     HGD__STAGE_WEIGHTS=[2.0, 1.0, 3.0], **keys)
    assert shuffled(rec)[0]["loss_kd_hgd"].item() != pytest.approx(out["loss_kd_hgd"].item(), rel=1e-3)


def test_decay_steps_in_any_order():
    from detectron2.config import get_cfg

    from distill_d2.config import add_distill_config, schedule_warnings
    from distill_d2.schedule import kd_weight

    def decay(steps):
        cfg = add_distill_config(get_cfg())
        cfg.DISTILL.DECAY.TYPE, cfg.DISTILL.DECAY.STEPS, cfg.DISTILL.DECAY.GAMMA = "step", steps, 0.5
        cfg.SOLVER.MAX_ITER = 100
        return cfg

    natural, written = decay([10, 20, 70]), decay([70, 10, 20])
    lam = [kd_weight(i, 100, written.DISTILL.DECAY) for i in range(101)]
    assert lam == [kd_weight(i, 100, natural.DISTILL.DECAY) for i in range(101)]
    assert (lam[9], lam[10], lam[20], lam[69], lam[70]) == (1.0, 0.5, 0.25, 0.25, 0.125)
    # the "step after MAX_ITER" warning names the late step whatever the order
    (msg,) = [m for m in schedule_warnings(decay([150, 10])) if "DISTILL.DECAY.STEPS" in m]
    assert "[150]" in msg and "skips the decay step(s)" in msg


def test_terms_in_any_order_give_the_same_losses(teacher_ckpt):
    """The detector with DISTILL.TERMS reversed (same weights) gives the same loss dict."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from conftest import tiny_cfg
    from test_regression import fixed_batch

    terms = ["FeatureKD", "RoIClsKD", "RoIBoxKD", "HierarchicalFeatureKD", "TaskDecoupledFeatureKD"]
    losses, state = [], None
    for names in (terms, terms[::-1]):
        cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DISTILL.TERMS", str(names),
                       "DISTILL.TAR.BOX_GATE", "none", "DISTILL.GUARD.ACTION", "off")
        torch.manual_seed(0)
        model = build_model(cfg)
        model.setup_teacher()
        assert list(model.kd_terms) == names
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        model.train()
        with EventStorage():
            torch.manual_seed(1)
            losses.append({k: v.item() for k, v in model(fixed_batch(cfg)).items()})
    kd = sorted(k for k in losses[0] if k.startswith("loss_kd_"))
    assert kd == ["loss_kd_box", "loss_kd_cls", "loss_kd_feat", "loss_kd_hgd", "loss_kd_tfd"]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
