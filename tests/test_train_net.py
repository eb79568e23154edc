"""train_net.py end to end on tiny synthetic data: train, checkpoint, eval-only, 2-process CPU launch."""
import json
import os
import subprocess
import sys

import pytest
from detectron2.engine import default_argument_parser

from conftest import REPO, SYN, TINY_OPTS

CONFIGS = [
    "faster_rcnn_R18_student.yaml",
    "faster_rcnn_R34_teacher.yaml",
    "retinanet_R18_student.yaml",
    "retinanet_R34_teacher.yaml",
]


def run_main(config, out, *extra, eval_only=False, weights=None):
    from distill_d2.engine import main

    argv = ["--config-file", os.path.join(SYN, config)] + (["--eval-only"] if eval_only else [])
    argv += TINY_OPTS + ["OUTPUT_DIR", str(out)] + list(extra)
    if weights:
        argv += ["MODEL.WEIGHTS", weights]
    return main(default_argument_parser().parse_args(argv))


@pytest.mark.parametrize("config", CONFIGS)
def test_train_then_eval_only(config, tmp_path):
    res = run_main(config, tmp_path)
    ckpt = tmp_path / "model_final.pth"
    assert ckpt.is_file()
    assert set(res["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "results.json").is_file()
    res2 = run_main(config, tmp_path / "ev", eval_only=True, weights=str(ckpt))
    assert res2["bbox"]["AP"] == pytest.approx(res["bbox"]["AP"], abs=1e-6)
    assert json.loads((tmp_path / "ev" / "eval_results.json").read_text())["bbox"]["AP"] == pytest.approx(
        res2["bbox"]["AP"], abs=1e-6)


def test_eval_only_without_weights_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        run_main("faster_rcnn_R18_student.yaml", tmp_path, eval_only=True)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        run_main("nope.yaml", tmp_path)


def launch_cmd(config, out, *extra):
    return [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2", "--config-file",
            os.path.join(SYN, config)] + TINY_OPTS + ["SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()",
                                                      "OUTPUT_DIR", str(out)] + list(extra)


def test_two_process_cpu_launch(tmp_path, datasets_dir):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    p = subprocess.run(launch_cmd("faster_rcnn_R18_student.yaml", tmp_path), env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "model_final.pth").is_file()
    assert "World size: 2" in p.stdout + p.stderr
