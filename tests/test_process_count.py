"""The distillation objective does not depend on the number of processes.

Every normaliser taken over the batch (mask sums, positive / gated counts) is
summed over processes (``losses.batch_normalize``): 2 processes with 2 images
each give the same loss_kd_* values as 1 process with the same 4 images.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SYN, TINY_OPTS


def _worker(rank, world, port, q):
    import torch.distributed as dist

    from distill_d2.losses import batch_normalize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    num = torch.tensor([3.0, 5.0])[rank].requires_grad_()
    den = torch.tensor([1.0, 7.0])[rank]
    out = batch_normalize(num, den, min_den=1, eps=0.5)
    out.backward()
    q.put((rank, out.item(), num.grad.item()))
    dist.destroy_process_group()


def test_batch_normalize_sums_the_denominator_over_processes():
    import torch.multiprocessing as mp

    from detectron2.engine.launch import _find_free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _find_free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (v, g)) for r, v, g in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
    # single process over both halves: (3 + 5) / (1 + 7 + 0.5); each process returns 2 * num_p / (8 + 0.5)
    assert (got[0][0] + got[1][0]) / 2 == pytest.approx(8 / 8.5, rel=1e-6)
    assert got[0][0] == pytest.approx(2 * 3 / 8.5) and got[1][1] == pytest.approx(2 / 8.5)  # averaged by DDP: 1/8.5
    from distill_d2.losses import batch_normalize

    assert batch_normalize(torch.tensor(8.0), torch.tensor(8.0), eps=0.5).item() == pytest.approx(8 / 8.5)


def last_metrics(out):
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    return lines[-1]


@pytest.mark.parametrize("preset,teacher", [("tar_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml"),
                                            ("defeat_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml")])
def test_one_and_two_processes_give_the_same_kd_losses(preset, teacher, make_ckpt, tmp_path, datasets_dir):
    # FrozenBN student and no flip: the two runs see the same 4 images with the same features
    # (trainable BN would normalise over 2 vs 4 images, a difference no loss normaliser can remove).
    opts = TINY_OPTS + ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()", "SEED", "3",
                        "INPUT.RANDOM_FLIP", "none", "MODEL.RESNETS.NORM", "FrozenBN",
                        "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher), "DISTILL.GUARD.ACTION", "off"]
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    res = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", str(n), "--config-file",
               os.path.join(SYN, preset)] + opts + ["OUTPUT_DIR", str(out)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        res[n] = last_metrics(out)
    kd = sorted(k for k in res[1] if k.startswith("loss_kd_"))
    assert kd and kd == sorted(k for k in res[2] if k.startswith("loss_kd_"))
    for k in kd:
        assert res[2][k] == pytest.approx(res[1][k], rel=1e-5), (k, res[1][k], res[2][k])
