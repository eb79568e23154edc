"""Command lines of train_net.py, export and pictures (overrides bare or after --opts, flags after them
named), the teacher YAML of a preset used as _BASE_, the LR-schedule warning. No training here."""
import importlib.util
import os
import re

import pytest

from conftest import REPO, SYN, TINY_OPTS
from distill_d2.cli import OverrideError, check_overrides, parse_args
from distill_d2.config import load_cfg, schedule_warnings


def train_net_parser():
    spec = importlib.util.spec_from_file_location("train_net_script", os.path.join(REPO, "train_net.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # (its launch is under __main__)
    return mod.get_parser()


CFG = os.path.join(SYN, "tar_R34_to_R18.yaml")


def test_train_net_takes_overrides_bare_or_after_opts():
    p = train_net_parser()
    bare = parse_args(p, ["--config-file", CFG, "--eval-only", "MODEL.WEIGHTS", "w.pth", "SEED", "3"])
    flag = parse_args(train_net_parser(), ["--config-file", CFG, "--eval-only", "--opts", "MODEL.WEIGHTS", "w.pth",
                                           "SEED", "3"])
    both = parse_args(train_net_parser(), ["--config-file", CFG, "--eval-only", "MODEL.WEIGHTS", "w.pth",
                                           "--opts", "SEED", "3"])
    assert bare.opts == flag.opts == both.opts == ["MODEL.WEIGHTS", "w.pth", "SEED", "3"]
    assert bare.eval_only and flag.eval_only and not hasattr(flag, "opts_flag")


@pytest.mark.parametrize("argv,match", [
    # detectron2's parser puts everything after the first KEY into the overrides: yacs said "odd length"
    (["--config-file", CFG, "MODEL.WEIGHTS", "w.pth", "--eval-only"],
     r"--eval-only appears among the KEY VALUE config overrides \(MODEL.WEIGHTS w.pth --eval-only\): put flags "
     r"before KEY VALUE overrides"),
    (["--config-file", CFG, "--opts", "SEED", "1", "--resume"], "--resume appears among .*put flags before"),
    (["--config-file", CFG, "MODEL.WEIGHTS", "w.pth", "SEED"], r"got 3 items .*the last KEY 'SEED' has no VALUE"),
    (["--config-file", CFG, "SEED", "1", "2", "MODEL.WEIGHTS", "w.pth"],
     r"'2' stands where a KEY is expected \(after SEED 1\)"),
])
def test_train_net_flag_after_overrides_says_put_flags_first(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(train_net_parser(), argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_export_takes_both_forms_and_names_a_late_flag(capsys, monkeypatch):
    from distill_d2 import export

    seen = []  # (the export itself is tested in test_export.py: here only the config it is given)
    monkeypatch.setattr(export, "export_student", lambda cfg, i, o: seen.append((cfg.SEED, cfg.SOLVER.IMS_PER_BATCH)) or 0)
    export.main(["--config-file", CFG, "--input", "in.pth", "--output", "out.pth", "SEED", "7",
                 "SOLVER.IMS_PER_BATCH", "3"])
    export.main(["--config-file", CFG, "--input", "in.pth", "--output", "out.pth", "--opts", "SEED", "7",
                 "SOLVER.IMS_PER_BATCH", "3"])
    with pytest.raises(SystemExit):  # --output swallowed by the overrides: argparse's error + our hint
        export.main(["--config-file", CFG, "--input", "in.pth", "SEED", "7", "--output", "out.pth"])
    assert seen == [(7, 3), (7, 3)]
    err = capsys.readouterr().err
    assert "required: --output" in err and "--output came after the KEY VALUE overrides: put flags before" in err


def test_pictures_takes_both_forms_and_names_a_late_flag(capsys):
    from distill_d2.pictures import parse_args as pictures_args

    bare = pictures_args(["--config-file", CFG, "--out", "o", "--no-contact-sheet"] + TINY_OPTS)
    flag = pictures_args(["--config-file", CFG, "--out", "o", "--no-contact-sheet", "--opts"] + TINY_OPTS)
    assert bare.opts == flag.opts == TINY_OPTS and not bare.contact_sheet
    with pytest.raises(SystemExit):
        pictures_args(["--config-file", CFG, "--opts", "SEED", "1", "--out", "o"])
    assert "--out came after the KEY VALUE overrides: put flags before" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pictures_args(["--config-file", CFG, "--out", "o", "SEED", "1", "--index", "2"])
    assert "--index appears among the KEY VALUE config overrides" in capsys.readouterr().err


def test_load_cfg_refuses_a_flag_among_overrides():
    """Programmatic callers (the demo's --opts, tests) get the same message instead of yacs's."""
    with pytest.raises(OverrideError, match="--eval-only appears among.*put flags before KEY VALUE overrides"):
        load_cfg(CFG, TINY_OPTS + ["--eval-only"])
    assert check_overrides(["SEED", 1, "DISTILL.FEAT.WEIGHT", "-0.5"]) == ["SEED", "1", "DISTILL.FEAT.WEIGHT", "-0.5"]


# ------------------------------------------------------------------ the teacher YAML of a _BASE_ preset
def test_relative_teacher_config_is_resolved_against_the_file_that_sets_it(tmp_path, monkeypatch):
    teacher = os.path.join(SYN, "faster_rcnn_R34_teacher.yaml")
    user = tmp_path / "my_experiments"
    user.mkdir()
    # a user YAML on top of a preset (whose CONFIG_FILE is relative to configs/synthetic), two levels deep
    (user / "my_tar.yaml").write_text(f'_BASE_: "{CFG}"\nSOLVER:\n  BASE_LR: 0.01\n')
    (user / "deeper.yaml").write_text('_BASE_: "my_tar.yaml"\nSEED: 3\n')
    (user / "list_base.yaml").write_text(f'_BASE_: ["{os.path.join(SYN, "faster_rcnn_R18_student.yaml")}", '
                                         '"my_tar.yaml"]\n')
    monkeypatch.chdir(tmp_path)  # not the repo: a cwd fallback cannot help
    for f in ("my_tar.yaml", "deeper.yaml", "list_base.yaml"):
        assert load_cfg(str(user / f)).DISTILL.TEACHER.CONFIG_FILE == teacher, f

    # the user's own YAML sets a relative teacher: next to the user's file, not the preset's
    (user / "my_teacher.yaml").write_text(f'_BASE_: "{teacher}"\nSEED: 5\n')
    (user / "own_teacher.yaml").write_text(
        '_BASE_: "deeper.yaml"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "my_teacher.yaml"\n')
    assert load_cfg(str(user / "own_teacher.yaml")).DISTILL.TEACHER.CONFIG_FILE == str(user / "my_teacher.yaml")

    # on the command line: from the cwd
    (tmp_path / "cwd_teacher.yaml").write_text(f'_BASE_: "{teacher}"\n')
    cfg = load_cfg(str(user / "deeper.yaml"), ["DISTILL.TEACHER.CONFIG_FILE", "cwd_teacher.yaml"])
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "cwd_teacher.yaml")

    # missing: the paths tried are named
    (user / "gone.yaml").write_text('_BASE_: "my_tar.yaml"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "nope.yaml"\n')
    with pytest.raises(FileNotFoundError, match=r"Teacher config 'nope.yaml' not found \(looked at: .*my_experiments"
                                                 r"/nope.yaml"):
        load_cfg(str(user / "gone.yaml"))


# ------------------------------------------------------------------ LR schedule
def test_max_iter_below_solver_steps_is_warned_with_the_fix():
    student = os.path.join(SYN, "faster_rcnn_R18_student.yaml")  # MAX_ITER 600, STEPS (450, 550)
    cfg = load_cfg(student, ["SOLVER.MAX_ITER", "100"])
    (msg,) = schedule_warnings(cfg, student)
    assert ("SOLVER.MAX_ITER is 100 but SOLVER.STEPS (450, 550) has step(s) [450, 550] at or after it: the "
            "learning rate never decays [450, 550]. Set SOLVER.STEPS \"(75, 92)\" (the config file's steps scaled "
            "by 100/600)") in msg
    cfg = load_cfg(student, ["SOLVER.MAX_ITER", "500"])
    assert "skips the decay step(s) [550]" in schedule_warnings(cfg, student)[0]
    assert schedule_warnings(load_cfg(student), student) == []
    assert schedule_warnings(load_cfg(student, ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(75, 92)"]), student) == []
    # steps set on the command line beyond MAX_ITER: 75% / 92% of it
    cfg = load_cfg(student, ["SOLVER.MAX_ITER", "1000", "SOLVER.STEPS", "(900, 2000)"])
    assert "Set SOLVER.STEPS \"(750, 920)\" (at 75% and 92% of MAX_ITER)" in schedule_warnings(cfg, student)[0]
    # the step decay of the distillation weight too
    cfg = load_cfg(CFG, ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(75,)", "DISTILL.DECAY.TYPE", "step",
                         "DISTILL.DECAY.STEPS", "(300,)"])
    (msg,) = schedule_warnings(cfg, CFG)
    assert "DISTILL.DECAY.STEPS (300,)" in msg and "distillation weight never decays" in msg
