"""Exact resume: a run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SYN, TINY_OPTS
from distill_d2.data import resumable
from distill_d2.data.resumable import (ReseededMapDataset, ResumableBatchSampler, ResumableTrainingSampler,
                                       aspect_ratio_groups, build_resumable_train_loader)


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


def test_a_mapper_that_changes_the_orientation_is_warned_about_once(caplog):
    def rotating_mapper(d):  # e.g. a custom mapper that rotates images by 90 degrees and says so
        return dict(d, width=d["height"], height=d["width"])

    dicts = [{"file_name": f"{i}.png", "width": 40, "height": 30} for i in range(3)]
    ds = ReseededMapDataset(dicts, rotating_mapper, seed=1, groups=aspect_ratio_groups(dicts))
    with caplog.at_level("WARNING", logger="distill_d2.data.resumable"):
        assert [d["width"] for d in ds[[(0, 0), (1, 1), (2, 2)]]] == [30, 30, 30]
    warned = [r.getMessage() for r in caplog.records if "another orientation" in r.getMessage()]
    assert len(warned) == 1 and "width 30, height 40 for 0.png" in warned[0], warned


# (height, width) of the mixed-orientation set: landscape, portrait and square images of several sizes, as a
# camera roll has them; detectron2 groups w > h vs the rest, so buckets hold samples across batch boundaries
MIXED_SIZES = [(96, 128), (128, 96), (120, 160), (150, 100), (100, 100), (90, 140),
               (140, 90), (112, 128), (128, 112), (96, 160), (160, 96), (110, 150)]


@pytest.fixture(scope="module")
def mixed_coco(tmp_path_factory):
    """A COCO json + folder of generated shapes images (the synthetic classes) in MIXED_SIZES, a third .png."""
    import json

    import cv2
    import numpy as np

    from distill_d2.data.synthetic import SYNTHETIC_CLASSES, render_image

    d = tmp_path_factory.mktemp("mixed")
    (d / "images").mkdir()
    rng = np.random.default_rng(11)
    images, anns = [], []
    for i, (h, w) in enumerate(MIXED_SIZES):
        img, annos = render_image(rng, h, w)
        name = f"img_{i:02d}." + ("png" if i % 3 == 2 else "jpg")
        cv2.imwrite(str(d / "images" / name), img)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for a in annos:
            anns.append(dict(a, id=len(anns) + 1, image_id=i + 1, category_id=a["category_id"] + 1))
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(SYNTHETIC_CLASSES)]
    (d / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return d


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_batches_are_detectron2s_and_resume_at_any_batch(world, monkeypatch):
    from detectron2.data.common import AspectRatioGroupedDataset

    dicts = [{"width": w, "height": h} for h, w in MIXED_SIZES]
    groups = aspect_ratio_groups(dicts)
    assert groups == [0 if w > h else 1 for h, w in MIXED_SIZES] and 0 < sum(groups) < len(groups)
    bs = 4 // world  # SOLVER.IMS_PER_BATCH 4 over `world` processes
    monkeypatch.setattr(resumable.comm, "get_world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(resumable.comm, "get_rank", lambda: rank)
        full = _take(ResumableBatchSampler(ResumableTrainingSampler(12, seed=7), bs, groups), 40)
        assert all(len(b) == bs and len({groups[i] for i, _ in b}) == 1 for b in full)  # one orientation each
        pos = [p for b in full for _, p in b]
        assert len(set(pos)) == len(pos) and all(p % world == rank for p in pos)  # this process's samples
        own = range(rank, max(pos) + 1, world)  # every sample of the stream so far, but what the buckets hold
        assert len(set(own) - set(pos)) <= 2 * (bs - 1) and {i for b in full for i, _ in b} == set(range(12))
        # = detectron2's AspectRatioGroupedDataset over this process's stream of samples
        stream = ({"width": dicts[i]["width"], "height": dicts[i]["height"], "key": (i, p)}
                  for i, p in ResumableTrainingSampler(12, seed=7))
        d2 = AspectRatioGroupedDataset(stream, bs)
        assert [[d["key"] for d in b] for b in _take(d2, 40)] == full
        for k in (1, 5, 13):  # resumed at batch k: the same batches as the uninterrupted stream from k
            resumed = ResumableBatchSampler(ResumableTrainingSampler(12, seed=7), bs, groups)
            resumed.start = k
            assert _take(resumed, 10) == full[k:k + 10]
        # without grouping (or one group only): consecutive samples, resumed without replay
        plain = _take(ResumableBatchSampler(ResumableTrainingSampler(12, seed=7), bs), 12)
        assert [p for b in plain for _, p in b] == list(range(rank, 12 * bs * world, world))
        one = ResumableBatchSampler(ResumableTrainingSampler(12, seed=7), bs, [1] * 12)
        one.start = 5
        assert one.groups is None and _take(one, 7) == plain[5:12]
    if world == 2:
        with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH \(3\) must be a positive multiple of the number "
                                             r"of processes \(2\)"):
            build_resumable_train_loader(dicts, None, 3, 0, True, 0)


def test_grouping_by_the_dicts_is_detectron2s_grouping_of_the_mapped_images(mixed_coco, tmp_path):
    """detectron2 groups the mapped dicts by their width/height: DatasetMapper keeps the dataset dict's (checked
    against the decoded image), and resize + flip keep the orientation; a dict without them: the file's header,
    EXIF rotation applied, as read_image does. Batches with data workers equal those without."""
    from detectron2.data import DatasetMapper
    from detectron2.data.common import AspectRatioGroupedDataset
    from detectron2.data.datasets import load_coco_json
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    from conftest import tiny_cfg

    dicts = load_coco_json(str(mixed_coco / "train.json"), str(mixed_coco / "images"))
    groups = aspect_ratio_groups(dicts)
    mapper = DatasetMapper(tiny_cfg("faster_rcnn_R18_student.yaml", "INPUT.MIN_SIZE_TRAIN", "(96, 128)",
                                    "INPUT.MAX_SIZE_TRAIN", "160"), True)  # random resize + flip
    ds = ReseededMapDataset(dicts, mapper, seed=3, groups=groups)
    for i, p in [(i, p) for i in range(len(dicts)) for p in (0, 1, 2)]:
        out = ds[(i, p)]
        _, h, w = out["image"].shape
        assert groups[i] == (0 if out["width"] > out["height"] else 1) == (0 if w > h else 1), dicts[i]["file_name"]

    def ids_and_images(loader):
        return [[(d["image_id"], d["image"]) for d in b] for b in _take(loader, 12)]

    def same(x, y):
        return all(a[0] == b[0] and torch.equal(a[1], b[1]) for bx, by in zip(x, y) for a, b in zip(bx, by))

    loader = build_resumable_train_loader(dicts, mapper, 2, 3, True, 0)
    assert loader.resumable[0].groups == groups
    ours = ids_and_images(loader)
    stream = (ds[k] for k in ResumableTrainingSampler(len(dicts), seed=3))  # detectron2's grouping of them
    assert same(ours, ids_and_images(AspectRatioGroupedDataset(stream, 2)))
    assert same(ours, ids_and_images(build_resumable_train_loader(dicts, mapper, 2, 3, True, 2)))  # 2 workers

    rotated = tmp_path / "exif6.jpg"  # stored 40 wide x 30 high, shown rotated: portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(rotated, exif=exif)
    png = tmp_path / "wide.png"
    Image.new("RGB", (40, 30)).save(png)
    assert read_image(str(rotated)).shape[:2] == (40, 30)
    assert aspect_ratio_groups([{"file_name": str(rotated)}, {"file_name": str(png)}]) == [1, 0]


def _cmd(out, config, iters, *extra, flags=()):
    return [sys.executable, os.path.join(REPO, "train_net.py"), *flags, "--config-file", os.path.join(SYN, config)] + \
        TINY_OPTS + ["SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()",
                     "SEED", "5", "OUTPUT_DIR", str(out)] + list(extra)


@pytest.mark.parametrize("data", ["synthetic", "mixed_orientations"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(data, teacher_ckpt, tmp_path, datasets_dir, request):
    """synthetic: distillation (KD terms, teacher) with random flips (TINY_OPTS keep detectron2's default
    horizontal flip), RPN/RoI sampling; mixed_orientations: aspect-ratio grouping (on by default) with landscape,
    portrait and square images of several sizes (the student alone, for time)."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    if data == "synthetic":
        args = ("tar_R34_to_R18.yaml", 14, "DISTILL.TEACHER.WEIGHTS", teacher_ckpt, "DISTILL.GUARD.ACTION", "off")
    else:
        d = request.getfixturevalue("mixed_coco")
        args = ("faster_rcnn_R18_student.yaml", 8, "DATASETS.COCO",
                str([["mixed_train", str(d / "train.json"), str(d / "images")]]), "DATASETS.TRAIN", "('mixed_train',)",
                "DATALOADER.ASPECT_RATIO_GROUPING", "True")
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    with open(tmp_path / "a.log", "w") as log:  # the uninterrupted run, beside the one to kill (2 processes)
        a = subprocess.Popen(_cmd(a_out, *args), env=env, stdout=log, stderr=subprocess.STDOUT)
        p = subprocess.Popen(_cmd(b_out, *args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while not (b_out / "last_checkpoint").exists():  # the iteration-3 checkpoint is complete
            assert p.poll() is None and time.time() - t0 < 300, "run ended before its first checkpoint"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed_at = (b_out / "last_checkpoint").read_text()
        assert not (b_out / "model_final.pth").exists(), "killed too late"
        b = subprocess.run(_cmd(b_out, *args, flags=["--resume"]), env=env, capture_output=True, text=True,
                           timeout=600)
        assert a.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert b.returncode == 0, b.stderr[-3000:]
    assert "Resuming the data stream at batch" in b.stdout + b.stderr, killed_at

    sa = torch.load(a_out / "model_final.pth", weights_only=False)
    sb = torch.load(b_out / "model_final.pth", weights_only=False)
    assert sa["iteration"] == sb["iteration"] == args[1] - 1
    diff = {k: (sa["model"][k].float() - sb["model"][k].float()).abs().max().item() for k in sa["model"]}
    differ = sorted(((v, k) for k, v in diff.items() if v), reverse=True)
    assert not differ, f"{len(differ)} of {len(diff)} tensors differ, largest: {differ[:5]}"
    if data == "synthetic":  # only the newest 2 periodic checkpoints are kept (SOLVER.CHECKPOINT_MAX_TO_KEEP)
        assert sorted(f.name for f in a_out.glob("model_0*.pth")) == ["model_0000008.pth", "model_0000011.pth"]
