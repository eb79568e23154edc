"""Every shipped config loads; vendored model-zoo configs match the installed detectron2."""
import glob
import os
from argparse import Namespace

import pytest
from detectron2 import model_zoo
from detectron2.modeling import build_model

from conftest import REPO, adapters
from distill_d2.config import setup_cfg

VENDORED = ["Base-RCNN-FPN.yaml", "Base-RetinaNet.yaml"] + [
    os.path.join("COCO-Detection", f + ".yaml")
    for f in ("faster_rcnn_R_101_FPN_3x", "faster_rcnn_R_50_FPN_1x", "retinanet_R_50_FPN_1x", "retinanet_R_101_FPN_3x")
]


@pytest.mark.parametrize("rel", VENDORED)
def test_vendored_model_zoo_configs_are_verbatim(rel):
    with open(os.path.join(REPO, "configs", rel)) as a, open(model_zoo.get_config_file(rel)) as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)))
def test_every_config_loads(path):
    cfg = setup_cfg(Namespace(config_file=path, opts=[]))
    assert cfg.MODEL.META_ARCHITECTURE
    if cfg.MODEL.META_ARCHITECTURE.startswith("Distill"):
        assert os.path.isabs(cfg.DISTILL.TEACHER.CONFIG_FILE) and os.path.isfile(cfg.DISTILL.TEACHER.CONFIG_FILE)


COCO_PRESETS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "COCO-Detection", "*.yaml"))
                      if os.path.basename(p).startswith(("tar_", "defeat_")))


@pytest.mark.parametrize("path", COCO_PRESETS, ids=os.path.basename)
def test_full_size_coco_presets_build(path):
    cfg = setup_cfg(Namespace(config_file=path, opts=["MODEL.DEVICE", "cpu"]))
    model = build_model(cfg)
    assert type(model).__name__ in ("DistillGeneralizedRCNN", "DistillRetinaNet")
    assert model.teacher_cfg.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RESNETS.DEPTH == 50
    assert list(adapters(model).keys()) == list(cfg.DISTILL.FEAT.LEVELS)
    assert model.teacher_cfg.MODEL.WEIGHTS.startswith("detectron2://COCO-Detection/")
