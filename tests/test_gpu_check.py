"""make gpu-check (distill_d2/gpu_check.py): what a CPU machine can check of it."""
import os

import pytest

from conftest import SYN


def test_gpu_check_skips_cleanly_without_cuda(tmp_path, capsys):
    import torch

    from distill_d2.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: run the check itself (make gpu-check)")
    assert main(["--out", str(tmp_path / "gpu")]) == 0
    out = capsys.readouterr().out
    assert "[gpu-check] skipped: no CUDA device (torch " in out and "nothing was written" in out
    assert not (tmp_path / "gpu").exists()


def test_gpu_check_covers_every_synthetic_preset_teachers_first():
    from distill_d2.gpu_check import synthetic_presets

    presets = synthetic_presets()
    assert sorted(presets) == sorted(f for f in os.listdir(SYN) if f.endswith(".yaml") and not f.startswith("Base-"))
    assert presets[:2] == ["faster_rcnn_R34_teacher.yaml", "retinanet_R34_teacher.yaml"]
    assert set(presets[2:4]) == {"faster_rcnn_R18_student.yaml", "retinanet_R18_student.yaml"}
