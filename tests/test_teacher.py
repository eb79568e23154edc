"""Teacher fingerprint: a checkpoint records its teacher; --resume with another teacher is refused."""
import logging
import os

import pytest
import torch

from conftest import tiny_cfg
from distill_d2.engine import Trainer
from distill_d2.errors import TeacherError


def run(cfg, resume=False):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def test_resume_with_a_different_teacher_is_refused(teacher_ckpt, tmp_path, caplog):
    out = str(tmp_path / "run")
    base = ["OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", 1, "DATASETS.TEST", "()", "DISTILL.GUARD.ACTION", "off"]
    run(tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, *base))
    sd = torch.load(f"{out}/model_final.pth", weights_only=False)
    assert len(sd["distill_teacher"]["weights_sha256"]) == 64 and sd["distill_teacher"]["config"]["MODEL.RESNETS.DEPTH"] == 34
    # same teacher: resumes (nothing left to train, but the checkpoint is accepted)
    run(tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, *base), resume=True)
    # other weights of the same architecture
    sd_t = torch.load(teacher_ckpt, weights_only=False)
    sd_t["model"]["backbone.fpn_output3.bias"] += 1.0
    other = str(tmp_path / "other_teacher.pth")
    torch.save(sd_t, other)
    cfg = tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", other, *base, "SOLVER.MAX_ITER", 3)
    with pytest.raises(TeacherError, match=r"different teacher.*weights: checkpoint trained with .*sha256.*now "
                                           r".*ALLOW_CHANGE_ON_RESUME"):
        run(cfg, resume=True)
    # same weights, changed teacher config
    cfg = tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, *base, "SOLVER.MAX_ITER", 3,
                   "DISTILL.TEACHER.OPTS", "['MODEL.RPN.NMS_THRESH', 0.5]")
    with pytest.raises(TeacherError, match=r"teacher settings: MODEL.RPN.NMS_THRESH: 0.7 -> 0.5"):
        run(cfg, resume=True)
    cfg = tiny_cfg("fitnet_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", other, *base, "SOLVER.MAX_ITER", 3,
                   "DISTILL.TEACHER.ALLOW_CHANGE_ON_RESUME", "True")
    with caplog.at_level(logging.WARNING):
        trainer = run(cfg, resume=True)
    assert trainer.start_iter == 2 and "different teacher" in caplog.text
    # --eval-only with another teacher configured: a warning (inference does not use the teacher)
    from detectron2.engine import default_argument_parser

    from conftest import SYN, TINY_OPTS
    from distill_d2.engine import main

    caplog.clear()
    argv = ["--config-file", os.path.join(SYN, "fitnet_R34_to_R18.yaml"), "--eval-only"] + TINY_OPTS + [
        "MODEL.WEIGHTS", f"{out}/model_0000001.pth", "DISTILL.TEACHER.WEIGHTS", other, "OUTPUT_DIR", str(tmp_path / "ev")]
    with caplog.at_level(logging.WARNING):
        main(default_argument_parser().parse_args(argv))
    assert "different teacher" in caplog.text and "--eval-only does not use the teacher" in caplog.text


def test_teacher_config_by_model_zoo_name():
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.CONFIG_FILE", "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml")
    assert cfg.DISTILL.TEACHER.CONFIG_FILE.endswith("COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml")
    assert os.path.isfile(cfg.DISTILL.TEACHER.CONFIG_FILE)
    with pytest.raises(FileNotFoundError, match="and the detectron2 model zoo"):
        tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.CONFIG_FILE", "COCO-Detection/nope.yaml")


def test_unreachable_teacher_url_is_one_clear_error():
    from detectron2.modeling import build_model

    model = build_model(tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", "http://127.0.0.1:9/teacher.pth"))
    with pytest.raises(TeacherError, match=r"Cannot fetch teacher weights 'http://127.0.0.1:9/teacher.pth'.*"
                                           r"DISTILL.TEACHER.WEIGHTS /path/to/"):
        model.setup_teacher()


def test_classes_datasets_and_sizes_follow_the_student(teacher_ckpt):
    from detectron2.modeling import build_model

    from distill_d2.teacher import get_teacher_cfg

    cfg = tiny_cfg("tar_R34_to_R18.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", 3, "DATASETS.TRAIN", "('bccd_train',)",
                   "INPUT.MIN_SIZE_TEST", 96)
    t = get_teacher_cfg(cfg)  # the teacher YAML says 6 classes, synthetic data, 256 px
    assert (t.MODEL.ROI_HEADS.NUM_CLASSES, t.DATASETS.TRAIN, t.INPUT.MIN_SIZE_TEST) == (3, ("bccd_train",), 96)
    build_model(cfg)  # no class-count mismatch
    cfg = tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.OPTS", "['MODEL.ROI_HEADS.NUM_CLASSES', 4]")
    with pytest.raises(TeacherError, match="student predicts 6 classes but the teacher 4.*DISTILL.TEACHER.OPTS"):
        build_model(cfg)
