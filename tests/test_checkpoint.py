"""torchvision ImageNet ResNets load into detectron2 students and teachers (offline: random weights)."""
import pytest
import torch
import torchvision
from detectron2.modeling import build_model

from conftest import tiny_cfg
from distill_d2.checkpoint import DistillCheckpointer, convert_torchvision_resnet
from distill_d2.errors import DistillConfigError


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def tv_features(tv, x):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    out = {}
    for i, layer in enumerate([tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
        x = layer(x)
        out[f"res{i + 2}"] = x
    return out


@pytest.mark.parametrize("depth,res2", [(18, 64), (34, 64), (50, 256)])
def test_torchvision_resnet_loads_exactly(depth, res2, tmp_path):
    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    with torch.no_grad():
        _randomise_bn(tv, depth)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    cfg = tiny_cfg("faster_rcnn_R18_student.yaml", "MODEL.RESNETS.DEPTH", depth, "MODEL.RESNETS.RES2_OUT_CHANNELS",
                   res2, "MODEL.RESNETS.STRIDE_IN_1X1", "False", "INPUT.FORMAT", "RGB",
                   "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]", "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]")
    model = build_model(cfg).eval()
    DistillCheckpointer(model).load(str(tmp_path / "tv.pth"))
    d2 = model.backbone.bottom_up
    converted = convert_torchvision_resnet(tv.state_dict())
    d2_sd = d2.state_dict()
    assert set(converted) <= set(d2_sd) and len(converted) == len([k for k in d2_sd if "num_batches" not in k])
    for k, v in converted.items():
        assert torch.equal(d2_sd[k], v), k
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = tv_features(tv, x), d2(x)
    for k in ("res2", "res3", "res4", "res5"):
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_bottleneck_stride_mismatch_is_named(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "tv50.pth")
    cfg = tiny_cfg("faster_rcnn_R18_student.yaml", "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256)
    with pytest.raises(DistillConfigError, match="STRIDE_IN_1X1 False"):
        DistillCheckpointer(build_model(cfg)).load(str(tmp_path / "tv50.pth"))


def test_student_and_teacher_weights_from_torchvision(tmp_path, teacher_ckpt):
    """MODEL.WEIGHTS (student, through the trainer) and DISTILL.TEACHER.WEIGHTS accept torchvision files."""
    from distill_d2.engine import Trainer

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    cfg = tiny_cfg("faster_rcnn_R18_student.yaml", "MODEL.WEIGHTS", str(tmp_path / "r18.pth"),
                   "OUTPUT_DIR", str(tmp_path / "out"))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    assert torch.equal(trainer.model.backbone.bottom_up.res5[1].conv2.weight, tv.layer4[1].conv2.weight)
    # a torchvision file as the teacher: the backbone loads, the detector heads are reported missing (strict)
    from distill_d2.errors import TeacherError

    model = build_model(tiny_cfg("tar_R34_to_R18.yaml", "DISTILL.TEACHER.WEIGHTS", str(tmp_path / "r18.pth"),
                                 "DISTILL.TEACHER.OPTS", "['MODEL.RESNETS.DEPTH', 18]"))
    with pytest.raises(TeacherError, match="missing keys: .*roi_heads"):
        model.setup_teacher()


def test_retinanet_class_count_is_read_off_the_head_and_named(make_ckpt, caplog):
    """No model_meta (a plain DetectionCheckpointer file): the count comes from cls_score (anchors x K rows)."""
    from distill_d2.checkpoint import CheckpointFitError

    two = make_ckpt("retinanet_R18_student.yaml", "MODEL.RETINANET.NUM_CLASSES", "2")
    cfg = tiny_cfg("retinanet_R18_student.yaml")  # 6 classes
    with pytest.raises(CheckpointFitError, match=r"predicts 2 classes but MODEL.RETINANET.NUM_CLASSES is 6: "
                       r"set MODEL.RETINANET.NUM_CLASSES 2.*head.cls_score.weight \(checkpoint \(18, "):
        DistillCheckpointer(build_model(cfg)).expect_fit(cfg, datasets=()).load(two)
    # while training (fine-tuning on other classes) the same file only warns, and the rest loads
    model = build_model(cfg)
    with caplog.at_level("WARNING", logger="distill_d2.checkpoint"):
        DistillCheckpointer(model).expect_fit(cfg, cfg.DATASETS.TRAIN, mode="train").load(two)
    assert "predicts 2 classes, the model 6 (MODEL.RETINANET.NUM_CLASSES)" in caplog.text
    sd = torch.load(two, weights_only=False)["model"]
    assert torch.equal(model.head.bbox_pred.weight, sd["head.bbox_pred.weight"])
