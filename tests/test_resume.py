"""Exact resume: a run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SYN, TINY_OPTS
from distill_d2.data.resumable import ReseededMapDataset, ResumableTrainingSampler


def test_sampler_positions_and_start():
    s = ResumableTrainingSampler(5, seed=3)
    it = iter(s)
    full = [next(it) for _ in range(13)]
    assert [p for _, p in full] == list(range(13))
    assert sorted(i for i, _ in full[:5]) == list(range(5)) and sorted(i for i, _ in full[5:10]) == list(range(5))
    s.start = 7  # resumed mid-epoch: the same stream from position 7
    it = iter(s)
    assert [next(it) for _ in range(6)] == full[7:13]
    assert full != [next(iter(ResumableTrainingSampler(5, seed=4))) for _ in range(13)]


def test_reseeded_mapping_depends_on_the_position_only():
    import numpy as np

    def mapper(d):
        return d["x"] + np.random.rand() + torch.rand(1).item()

    ds = ReseededMapDataset([{"x": 0}, {"x": 10}], mapper, seed=1)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = ds[(1, 5)]
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is untouched
    assert ds[(1, 5)] == a and ds[(1, 6)] != a and ds[(0, 5)] == pytest.approx(a - 10)


def _cmd(out, *extra, flags=()):
    return [sys.executable, os.path.join(REPO, "train_net.py"), *flags, "--config-file",
            os.path.join(SYN, "tar_R34_to_R18.yaml")] + TINY_OPTS + ["SOLVER.MAX_ITER", "14", "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()",
                             "SEED", "5", "DISTILL.GUARD.ACTION", "off", "OUTPUT_DIR", str(out)] + list(extra)


def test_sigkill_then_resume_matches_an_uninterrupted_run(teacher_ckpt, tmp_path, datasets_dir):
    # random flips on (TINY_OPTS keep detectron2's default horizontal flip), RPN/RoI sampling, KD terms
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    w = ["DISTILL.TEACHER.WEIGHTS", teacher_ckpt]
    a = subprocess.run(_cmd(tmp_path / "a", *w), env=env, capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]

    b_out = tmp_path / "b"
    p = subprocess.Popen(_cmd(b_out, *w), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (b_out / "last_checkpoint").exists():  # the iteration-3 checkpoint is complete
        assert p.poll() is None and time.time() - t0 < 300, "run ended before its first checkpoint"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = (b_out / "last_checkpoint").read_text()
    assert not (b_out / "model_final.pth").exists(), "killed too late"
    b = subprocess.run(_cmd(b_out, *w, flags=["--resume"]), env=env, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "Resuming the data stream at sample" in b.stdout + b.stderr, killed_at

    sa = torch.load(tmp_path / "a" / "model_final.pth", weights_only=False)
    sb = torch.load(b_out / "model_final.pth", weights_only=False)
    assert sa["iteration"] == sb["iteration"] == 13
    diff = {k: (sa["model"][k].float() - sb["model"][k].float()).abs().max().item() for k in sa["model"]}
    assert max(diff.values()) == 0, sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    # only the newest 2 periodic checkpoints are kept (SOLVER.CHECKPOINT_MAX_TO_KEEP in the synthetic presets)
    assert sorted(f.name for f in (tmp_path / "a").glob("model_0*.pth")) == ["model_0000008.pth", "model_0000011.pth"]
