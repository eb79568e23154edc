"""What a checkpoint knows about its data (``model_meta``): recorded by every trainer checkpoint and by
export; --eval-only and export stop on a checkpoint that does not fit the config or the evaluation data;
fine-tuning from other classes only warns; old / model-zoo checkpoints without it still load."""
import os
import pickle
import shutil

import pytest
import torch
from detectron2.engine import default_argument_parser

from conftest import SYN, tiny_cfg, TINY_OPTS
from test_own_data import coco_json
from distill_d2.checkpoint import CheckpointFitError

STUDENT = "faster_rcnn_R18_student.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATASETS.COCO opts: raccoon_train / raccoon_val (1 class), dog_val (the same images, 1 class named
    'dog'), two_train / two_val (raccoon, dog)."""
    d = tmp_path_factory.mktemp("own")
    img = d / "images"
    specs = [("raccoon_train", "raccoon.json", [{"id": 1, "name": "raccoon"}]),
             ("dog_val", "dog.json", [{"id": 1, "name": "dog"}]),
             ("two_train", "two.json", [{"id": 4, "name": "raccoon"}, {"id": 9, "name": "dog"}])]
    for _, js, cats in specs:
        coco_json(d / js, img, 4, cats)
    reg = [[n, str(d / js), str(img)] for n, js, _ in specs]
    reg += [["raccoon_val", str(d / "raccoon.json"), str(img)], ["two_val", str(d / "two.json"), str(img)]]
    return ["DATASETS.COCO", str(reg)]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A plain R18 student trained 2 iterations on raccoon_train (1 class), a checkpoint every iteration."""
    from distill_d2.engine import Trainer

    out = tmp_path_factory.mktemp("raccoon_run")
    cfg = tiny_cfg(STUDENT, *data, "DATASETS.TRAIN", "('raccoon_train',)", "DATASETS.TEST", "()",
                   "MODEL.ROI_HEADS.NUM_CLASSES", 1, "SOLVER.CHECKPOINT_PERIOD", 1, "OUTPUT_DIR", str(out))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return out


def eval_only(config, weights, out, *opts):
    from distill_d2.engine import main

    argv = ["--config-file", os.path.join(SYN, config), "--eval-only"] + TINY_OPTS + [
        "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(weights)] + [str(o) for o in opts]
    return main(default_argument_parser().parse_args(argv))


def test_every_trainer_checkpoint_records_the_data(trained):
    files = sorted(p.name for p in trained.glob("model_*.pth"))
    assert files == ["model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    for f in files:
        ck = torch.load(trained / f, weights_only=False)
        meta = ck["model_meta"]
        assert meta["thing_classes"] == ["raccoon"] and meta["num_classes"] == 1
        assert meta["num_classes_key"] == "MODEL.ROI_HEADS.NUM_CLASSES"
        assert meta["meta_architecture"] == "GeneralizedRCNN" and meta["datasets"] == ["raccoon_train"]
        assert meta["input"] == {"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
                                 "MODEL.PIXEL_STD": [1.0, 1.0, 1.0], "INPUT.MIN_SIZE_TEST": 128,
                                 "INPUT.MAX_SIZE_TEST": 128}
        assert {"trainer", "training_state", "iteration"} <= set(ck)  # resume entries untouched


def test_eval_only_stops_on_another_class_count_class_names_or_input(trained, data, tmp_path):
    w = trained / "model_final.pth"
    val = ["DATASETS.TEST", "('raccoon_val',)"]
    # README's literal command on own data: the plain YAML still says 6 classes (was: exit 0, AP 0.005)
    with pytest.raises(CheckpointFitError, match=r"model_final.pth predicts 1 class \(raccoon\) but "
                       r"MODEL.ROI_HEADS.NUM_CLASSES is 6: set MODEL.ROI_HEADS.NUM_CLASSES 1 \(and DATASETS.TEST"):
        eval_only(STUDENT, w, tmp_path / "a", *data, *val)
    one = ["MODEL.ROI_HEADS.NUM_CLASSES", 1]
    with pytest.raises(CheckpointFitError, match=r"trained on 1 class \(raccoon\) but dataset 'dog_val' has "
                       r"1 class \(dog\)"):
        eval_only(STUDENT, w, tmp_path / "b", *data, *one, "DATASETS.TEST", "('dog_val',)")
    with pytest.raises(CheckpointFitError, match=r"INPUT.FORMAT is 'RGB', trained with 'BGR'.*Set INPUT.FORMAT BGR"):
        eval_only(STUDENT, w, tmp_path / "c", *data, *one, *val, "INPUT.FORMAT", "RGB")
    res = eval_only(STUDENT, w, tmp_path / "d", *data, *one, *val)
    assert res["bbox"]["AP"] == res["bbox"]["AP"] and (tmp_path / "d" / "eval_results.json").is_file()


def test_checkpoints_without_meta_still_load_and_get_the_shape_checks(trained, data, tmp_path):
    """An older checkpoint and a detectron2 model-zoo style .pkl (numpy arrays, no model_meta)."""
    ck = torch.load(trained / "model_final.pth", weights_only=False)
    old = {k: v for k, v in ck.items() if k != "model_meta"}
    torch.save(old, tmp_path / "old.pth")
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in ck["model"].items()}, "__author__": "Detectron2 Model Zoo"}, f)
    right = [*data, "MODEL.ROI_HEADS.NUM_CLASSES", 1, "DATASETS.TEST", "('raccoon_val',)"]
    aps = [eval_only(STUDENT, w, tmp_path / n, *right)["bbox"]
           for n, w in (("new", trained / "model_final.pth"), ("old", tmp_path / "old.pth"), ("zoo", tmp_path / "zoo.pkl"))]
    assert all(set(a) == set(aps[0]) and all(a[k] == aps[0][k] or a[k] != a[k] for k in a) for a in aps)  # (NaN: APl)
    from detectron2.modeling import build_model

    from distill_d2.checkpoint import DistillCheckpointer

    cfg = tiny_cfg(STUDENT, *right)
    model = build_model(cfg)
    DistillCheckpointer(model).expect_fit(cfg).load(str(tmp_path / "zoo.pkl"))
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    # no recorded names: the class count is read off the box predictor's shape
    with pytest.raises(CheckpointFitError, match=r"old.pth predicts 1 class but MODEL.ROI_HEADS.NUM_CLASSES is 6: "
                       r"set MODEL.ROI_HEADS.NUM_CLASSES 1.*roi_heads.box_predictor.cls_score.weight \(checkpoint \(2, "):
        eval_only(STUDENT, tmp_path / "old.pth", tmp_path / "e", *data, "DATASETS.TEST", "('raccoon_val',)")
    # fits the config, but the evaluation data has another class count
    with pytest.raises(CheckpointFitError, match=r"Dataset 'two_val' \(DATASETS.TEST\) has 2 classes \(raccoon, dog\) "
                       r"but MODEL.ROI_HEADS.NUM_CLASSES is 1"):
        eval_only(STUDENT, tmp_path / "old.pth", tmp_path / "f", *data, "MODEL.ROI_HEADS.NUM_CLASSES", 1,
                  "DATASETS.TEST", "('two_val',)")


def test_fine_tuning_on_other_classes_warns_and_resume_must_fit(trained, data, tmp_path, caplog):
    from distill_d2.engine import Trainer

    two = [*data, "DATASETS.TRAIN", "('two_train',)", "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", 2]
    # MODEL.WEIGHTS of another class count: the backbone loads, the class-dependent head is re-initialised, loudly
    trainer = Trainer(tiny_cfg(STUDENT, *two, "MODEL.WEIGHTS", str(trained / "model_final.pth"),
                               "OUTPUT_DIR", str(tmp_path / "ft")))
    with caplog.at_level("WARNING", logger="distill_d2.checkpoint"):
        trainer.resume_or_load(resume=False)
    assert "predicts 1 class (raccoon), the model 2 (MODEL.ROI_HEADS.NUM_CLASSES)" in caplog.text
    assert "roi_heads.box_predictor.bbox_pred.weight (checkpoint (4, 256) vs model (8, 256))" in caplog.text
    sd = torch.load(trained / "model_final.pth", weights_only=False)["model"]
    m = trainer.model
    assert torch.equal(m.backbone.bottom_up.res5[1].conv2.weight, sd["backbone.bottom_up.res5.1.conv2.weight"])
    assert m.roi_heads.box_predictor.cls_score.weight.shape[0] == 3

    # --resume: the run's own checkpoint must fit (the config changed: an error) ...
    run = tmp_path / "run"
    run.mkdir()
    for f in ("model_final.pth", "last_checkpoint"):
        shutil.copy(trained / f, run / f)
    with pytest.raises(CheckpointFitError, match="The config changed since this run's checkpoint was written"):
        Trainer(tiny_cfg(STUDENT, *two, "OUTPUT_DIR", str(run))).resume_or_load(resume=True)
    # ... and with the run's config it resumes, model_meta read back
    resumed = Trainer(tiny_cfg(STUDENT, *data, "DATASETS.TRAIN", "('raccoon_train',)", "DATASETS.TEST", "()",
                               "MODEL.ROI_HEADS.NUM_CLASSES", 1, "OUTPUT_DIR", str(run)))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert resumed.checkpointer.checkpointables["model_meta"].loaded["thing_classes"] == ["raccoon"]


def test_distillation_export_carries_the_meta(data, make_ckpt, tmp_path):
    from distill_d2.engine import Trainer
    from distill_d2.export import export_student

    teacher = make_ckpt("faster_rcnn_R34_teacher.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "1")
    opts = [*data, "DATASETS.TRAIN", "('raccoon_train',)", "DATASETS.TEST", "()", "DISTILL.TEACHER.WEIGHTS", teacher]
    cfg = tiny_cfg("tar_R34_to_R18.yaml", *opts, "MODEL.ROI_HEADS.NUM_CLASSES", 1, "OUTPUT_DIR", str(tmp_path / "d"))
    Trainer(cfg).checkpointer.save("distill")  # what every checkpoint of this run carries
    distill = tmp_path / "d" / "distill.pth"
    export_student(cfg, str(distill), str(tmp_path / "student.pth"))
    meta = torch.load(tmp_path / "student.pth", weights_only=False)["model_meta"]
    assert meta["thing_classes"] == ["raccoon"] and meta["num_classes"] == 1
    assert meta["meta_architecture"] == "GeneralizedRCNN" and meta["trained_meta_architecture"] == "DistillGeneralizedRCNN"
    # export with a config of another class count: an error naming the key (was: a file the plain YAML mis-loads)
    with pytest.raises(CheckpointFitError, match=r"distill.pth predicts 1 class \(raccoon\) but "
                       r"MODEL.ROI_HEADS.NUM_CLASSES is 6: set MODEL.ROI_HEADS.NUM_CLASSES 1"):
        export_student(tiny_cfg("tar_R34_to_R18.yaml", *opts), str(distill), str(tmp_path / "x.pth"))
    # the exported student with the plain YAML that still says 6 classes
    with pytest.raises(CheckpointFitError, match=r"student.pth predicts 1 class \(raccoon\) but MODEL.ROI_HEADS"):
        eval_only(STUDENT, tmp_path / "student.pth", tmp_path / "e", *data, "DATASETS.TEST", "('raccoon_val',)")
    # the distillation checkpoint evaluated with its own config checks the same
    with pytest.raises(CheckpointFitError, match=r"trained on 1 class \(raccoon\) but dataset 'dog_val'"):
        eval_only("tar_R34_to_R18.yaml", distill, tmp_path / "f", *data, "MODEL.ROI_HEADS.NUM_CLASSES", 1,
                  "DATASETS.TEST", "('dog_val',)")
    # a distillation checkpoint of an older run (no model_meta): export records the config's
    old = torch.load(distill, weights_only=False)
    del old["model_meta"]
    torch.save(old, tmp_path / "old.pth")
    export_student(cfg, str(tmp_path / "old.pth"), str(tmp_path / "s_old.pth"))
    meta = torch.load(tmp_path / "s_old.pth", weights_only=False)["model_meta"]
    assert meta["num_classes"] == 1 and meta["thing_classes"] == ["raccoon"] and "from the config" in meta["recorded_by"]
