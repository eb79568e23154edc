import pytest
from detectron2.config import get_cfg

from distill_d2.config import add_distill_config
from distill_d2.hooks import kd_weight


def decay(**kw):
    cfg = get_cfg()
    add_distill_config(cfg)
    for k, v in kw.items():
        setattr(cfg.DISTILL.DECAY, k, v)
    return cfg.DISTILL.DECAY


def test_linear_is_the_default_and_reaches_zero():
    d = decay()
    assert d.TYPE == "linear"
    assert [kd_weight(i, 100, d) for i in (0, 25, 50, 100, 150)] == pytest.approx([1, 0.75, 0.5, 0, 0])
    assert kd_weight(50, 100, decay(END_VALUE=0.2)) == pytest.approx(0.6)


def test_cosine_step_constant_warmup_stop():
    assert [kd_weight(i, 100, decay(TYPE="cosine")) for i in (0, 50, 100)] == pytest.approx([1, 0.5, 0])
    st = decay(TYPE="step", STEPS=[10, 20], GAMMA=0.5)
    assert [kd_weight(i, 100, st) for i in (0, 9, 10, 19, 20, 99)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    assert kd_weight(77, 100, decay(TYPE="constant")) == 1.0
    wu = decay(TYPE="constant", WARMUP_ITERS=10)
    assert [kd_weight(i, 100, wu) for i in (0, 5, 10)] == pytest.approx([0, 0.5, 1])
    stop = decay(TYPE="constant", STOP_ITER=30)
    assert kd_weight(29, 100, stop) == 1.0 and kd_weight(30, 100, stop) == 0.0
    with pytest.raises(ValueError, match="DISTILL.DECAY.TYPE"):
        kd_weight(0, 10, decay(TYPE="exp"))
