"""train_net.py end to end on tiny synthetic data: train, checkpoint, eval-only, 2-process CPU launch, a
redirected run's logs (plain text, each line once, the LR-schedule warning)."""
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


def record_lines(text):
    """The log-record lines of a detectron2 log ('[05/01 12:00:00] d2.engine INFO: ...')."""
    return [ln for ln in text.splitlines() if ln.startswith("[") and "] " in ln]


def test_redirected_run_is_plain_text_logged_once_and_warns_about_the_lr_schedule(tmp_path, datasets_dir):
    """stdout to a pipe (like `> log`): no terminal escape codes on it nor in log.txt (detectron2 colours
    the config dump it logs), every log line once in log.txt; the overrides after --opts; MAX_ITER
    below SOLVER.STEPS is a warning with the steps to set."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    for k in ("FORCE_COLOR", "NO_COLOR", "ANSI_COLORS_DISABLED"):
        env.pop(k, None)
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
           os.path.join(SYN, "faster_rcnn_R18_student.yaml"), "--opts"] + TINY_OPTS + [
        "DATASETS.TEST", "()", "SOLVER.STEPS", "(5, 8)", "OUTPUT_DIR", str(tmp_path)]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert p.stdout.count("\x1b[") == 0 and log.count("\x1b[") == 0
    assert "Running with full config:" in log and "torch CPU threads: 1" in log
    records = record_lines(log)
    dup = sorted({ln for ln in records if records.count(ln) > 1})
    assert len(records) > 20 and not dup, dup
    warning = ("SOLVER.MAX_ITER is 2 but SOLVER.STEPS (5, 8) has step(s) [5, 8] at or after it: the learning "
               "rate never decays [5, 8]. Set SOLVER.STEPS \"(1,)\" (at 75% and 92% of MAX_ITER)")
    assert warning in p.stdout and warning in log


def test_plain_console_formatter_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    """detectron2's default_setup configures its stdout handlers with colour whatever stdout is."""
    import logging

    monkeypatch.delenv("FORCE_COLOR", raising=False)

    from detectron2.utils.logger import _ColorfulFormatter, setup_logger

    from distill_d2.cli import plain_console_logs, use_color

    assert not use_color()  # (pytest captures stdout)
    logger = setup_logger(name="distill_d2_colour_probe", color=True)
    assert isinstance(logger.handlers[0].formatter, _ColorfulFormatter)
    plain_console_logs(names=("distill_d2_colour_probe",))
    assert type(logger.handlers[0].formatter) is logging.Formatter
    logger.warning("careful")
    assert "distill_d2_colour_probe WARNING: careful" in capsys.readouterr().out
