import pytest
from detectron2.config import get_cfg

from distill_d2.config import add_distill_config
from distill_d2.errors import DistillConfigError
from distill_d2.schedule import kd_weight


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
    with pytest.raises(DistillConfigError, match="Unknown DISTILL.DECAY.TYPE 'exp'"):
        kd_weight(0, 10, decay(TYPE="exp"))


class _FakeTrainer:
    def __init__(self, storage, start_iter=0):
        self.storage, self.start_iter, self.iter, self.model = storage, start_iter, start_iter, None


def _guard(*opts, config="tar_R34_to_R18.yaml"):
    """The LossGuard hook of a preset with ``opts`` (KEY, VALUE, ...)."""
    from conftest import tiny_cfg

    from distill_d2.hooks import LossGuard

    return LossGuard(tiny_cfg(config, *[str(o) for o in opts]))


def _step(guard, trainer, it, lam, **losses):
    """What one training step leaves in the storage (detectron2 logs the losses, KDWeightScheduler lambda)."""
    trainer.iter = it
    trainer.storage.iter = it
    trainer.storage.put_scalar("kd_weight", lam)
    for k, v in losses.items():
        trainer.storage.put_scalar(k, v)
    guard.after_step()


def test_guard_trips_on_the_ratio_to_detection_at_the_first_iteration():
    from detectron2.utils.events import EventStorage

    with EventStorage() as storage:
        g, tr = _guard("DISTILL.GUARD.MAX_RATIO_TO_DET", 100.0), _FakeTrainer(storage)
        g.trainer = tr
        with pytest.raises(FloatingPointError, match=r"loss_kd_feat = 1000 at iteration 0 is 200x the detection.*"
                                                     r"at the first iterations.*teacher weights"):
            _step(g, tr, 0, 0.5, loss_cls=2.0, loss_box_reg=3.0, loss_kd_feat=500.0)  # 500 / lambda 0.5 = 1000
    with EventStorage() as storage:
        g, tr = _guard("DISTILL.GUARD.MAX_RATIO_TO_DET", 100.0), _FakeTrainer(storage)
        g.trainer = tr
        _step(g, tr, 0, 0.5, loss_cls=2.0, loss_box_reg=3.0, loss_kd_feat=240.0)  # 480 < 500: fine
        with pytest.raises(FloatingPointError, match=r"loss_kd_feat = 1200 \(median of the last 2 iterations\) at "
                                                     r"iteration 1 is 240x"):  # magnitudes: median(480, 1920)
            _step(g, tr, 1, 1.0, loss_cls=2.0, loss_box_reg=3.0, loss_kd_feat=-1920.0)


def test_guard_trips_on_growth_after_warmup_and_warns_once(caplog):
    import logging

    from detectron2.utils.events import EventStorage

    opts = ("GUARD.WINDOW", 1, "DISTILL.GUARD.WARMUP_ITERS", 3, "DISTILL.GUARD.MAX_GROWTH", 10.0,
            "DISTILL.GUARD.GROWTH_FLOOR", 0.0)
    with EventStorage() as storage:
        g, tr = _guard(*opts), _FakeTrainer(storage)
        g.trainer = tr
        for it, v in enumerate([1.0, 2.0, 3.0, 19.0]):  # median 2: 19 < 20
            _step(g, tr, it, 1.0, loss_cls=1.0, loss_kd_cls=v)
        _step(g, tr, 4, 0.1, loss_cls=1.0, loss_kd_cls=1.9)  # lambda 0.1: unweighted 19, still fine
        with pytest.raises(FloatingPointError, match=r"loss_kd_cls rose to 21 .* at iteration 5, 10.5x its reference"
                                                     r".*while the detection losses are in scale"):
            _step(g, tr, 5, 1.0, loss_cls=1.0, loss_kd_cls=21.0)
    with EventStorage() as storage:
        g, tr = _guard(*opts[:2], "DISTILL.GUARD.WARMUP_ITERS", 1, *opts[4:], "DISTILL.GUARD.ACTION", "warn"), \
            _FakeTrainer(storage)
        g.trainer = tr
        with caplog.at_level(logging.WARNING):
            for it, v in enumerate([1.0, 50.0, 60.0]):
                _step(g, tr, it, 1.0, loss_cls=1.0, loss_kd_cls=v)
        assert caplog.text.count("Distillation loss out of scale") == 1
    with pytest.raises(ValueError, match="DISTILL.GUARD.ACTION"):
        _guard("DISTILL.GUARD.ACTION", "stop")
    with pytest.raises(ValueError, match="GUARD.ACTION"):
        _guard("GUARD.ACTION", "stop", config="faster_rcnn_R18_student.yaml")
    with pytest.raises(ValueError, match=r"GUARD.WINDOW must be >= 1, got 0"):
        _guard("GUARD.WINDOW", 0, config="faster_rcnn_R18_student.yaml")
    with pytest.raises(ValueError, match=r"DISTILL.GUARD.GROWTH_FLOOR must be >= 0, got -0.1"):
        _guard("DISTILL.GUARD.GROWTH_FLOOR", -0.1)
