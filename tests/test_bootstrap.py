"""Paired bootstrap of AP gains (distill_d2/bootstrap.py) on fake COCO result sets."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distill_d2.bootstrap import image_evals, paired_gain, resample_counts


def _coco(images, anns, cats):
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 200, "height": 200} for i in images], "categories": cats,
                  "annotations": [dict(a, id=j + 1, area=a["bbox"][2] * a["bbox"][3], iscrowd=a.get("iscrowd", 0))
                                  for j, a in enumerate(anns)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _cocoeval_stats(gt, dt):
    """(AP, AP50) in % from pycocotools as detectron2 runs it (maxDets 1, 10, 100)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dt]), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100 * ev.stats[0], 100 * ev.stats[1]


def _random_set(n_images=30, seed=0):
    """Ground truth (3 classes, 0-4 boxes per image, one crowd box, one empty image) and detections
    (jittered hits, misses, false positives; continuous scores, so no ties)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 5)]
    anns, dets = [], []
    for i in range(n_images):
        for _ in range(0 if i == 3 else rng.integers(1, 5)):
            x, y, w, h = rng.uniform(0, 120), rng.uniform(0, 120), rng.uniform(8, 80), rng.uniform(8, 80)
            c = int(rng.choice([1, 2, 5]))
            anns.append({"image_id": i, "category_id": c, "bbox": [x, y, w, h], "iscrowd": int(i == 7)})
            if rng.random() < 0.75:
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                dets.append({"image_id": i, "category_id": c, "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                             "score": float(rng.uniform(0.05, 1))})
        for _ in range(rng.integers(0, 3)):  # false positives (also on the empty image)
            dets.append({"image_id": i, "category_id": int(rng.choice([1, 2, 5])),
                         "bbox": list(rng.uniform(0, 100, 4) + [0, 0, 10, 10]), "score": float(rng.uniform(0.05, 1))})
    return list(range(n_images)), anns, dets, cats


def test_resampled_ap_equals_cocoeval_on_renumbered_copies():
    """A resample's AP pools each drawn image's matches once per draw: the same as COCOeval on a set in
    which every copy is a separate image with a new id (duplicates count twice)."""
    images, anns, dets, cats = _random_set()
    gt = _coco(images, anns, cats)
    ev = image_evals(gt, dets)
    assert ev.ap() == pytest.approx(_cocoeval_stats(gt, dets)[0], abs=1e-9)  # each image once: plain COCOeval
    for counts in resample_counts(len(images), 3, seed=1):
        assert counts.max() >= 2 and (counts == 0).any()  # duplicates and left-out images
        new_images, new_anns, new_dets, nid = [], [], [], 0
        for i, c in zip(ev.img_ids, counts):
            for _ in range(c):
                new_images.append(nid)
                new_anns += [dict(a, image_id=nid) for a in anns if a["image_id"] == i]
                new_dets += [dict(d, image_id=nid) for d in dets if d["image_id"] == i]
                nid += 1
        ref_ap, ref_ap50 = _cocoeval_stats(_coco(new_images, new_anns, cats), new_dets)
        assert ev.ap(counts) == pytest.approx(ref_ap, abs=1e-9)
        assert ev.ap(counts, iou=0.5) == pytest.approx(ref_ap50, abs=1e-9)


def _one_box_per_image(n, missed):
    """n images with one class-1 box each; detections: that box exactly (score 0.9), except on ``missed``."""
    anns = [{"image_id": i, "category_id": 1, "bbox": [20, 30, 60, 50]} for i in range(n)]
    dets = [dict(a, score=0.9) for a in anns if a["image_id"] not in missed]
    return _coco(range(n), anns, [{"id": 1, "name": "defect"}]), dets


def test_interval_covers_a_known_gain_and_excludes_zero():
    gt, perfect = _one_box_per_image(50, missed=())
    _, misses_10 = _one_box_per_image(50, missed=range(10))
    a, b = image_evals(gt, perfect), image_evals(gt, misses_10)
    # by hand: A finds every box (precision 1 at every recall) -> 100; B stops at recall 40/50 = 0.8, so
    # precision 1 for the recall thresholds 0, 0.01, ..., 0.80 (81 of 101) and 0 above -> 100 * 81 / 101
    assert a.ap() == pytest.approx(100.0) and b.ap() == pytest.approx(100 * 81 / 101)
    g = paired_gain([a], [b], n_resamples=300, seed=0)
    assert g["gain"] == pytest.approx(100 - 100 * 81 / 101)  # +19.8
    assert 0 < g["lo"] < g["gain"] < g["hi"], g
    assert g["n_resamples"] == 300 and g["frac_above_zero"] == 1.0
    # the resamples are fixed by the seed
    assert paired_gain([a], [b], n_resamples=300, seed=0) == g
    assert paired_gain([a], [b], n_resamples=300, seed=1)["lo"] != g["lo"]


def test_interval_includes_zero_when_the_models_are_as_good():
    gt, first_missed = _one_box_per_image(50, missed=range(10))
    _, other_missed = _one_box_per_image(50, missed=range(10, 20))
    a, b = image_evals(gt, first_missed), image_evals(gt, other_missed)
    g = paired_gain([a], [b], n_resamples=300, seed=0)
    assert g["gain"] == pytest.approx(0.0, abs=1e-12)  # same AP on the full set, errors on other images
    assert g["lo"] < 0 < g["hi"], g


def test_seeds_are_pooled_per_resample():
    """Two seeds: the gain is the mean of the per-seed gains; a seed with no gain on any resample
    halves every resample's gain, so the interval's ends halve too (same resamples)."""
    gt, perfect = _one_box_per_image(40, missed=())
    _, misses = _one_box_per_image(40, missed=range(8))
    a, b = image_evals(gt, perfect), image_evals(gt, misses)
    one = paired_gain([a], [b], n_resamples=200, seed=3)
    two = paired_gain([a, b], [b, b], n_resamples=200, seed=3)
    assert two["gain"] == pytest.approx(one["gain"] / 2) and two["n_seeds"] == 2
    assert two["lo"] == pytest.approx(one["lo"] / 2) and two["hi"] == pytest.approx(one["hi"] / 2)
    # precomputed (full AP, resample APs) pairs on the same counts give the same answer
    counts = resample_counts(40, 200, seed=3)
    pre = [(e.ap(), np.array([e.ap(c) for c in counts])) for e in (a, b)]
    assert paired_gain([pre[0], pre[1]], [pre[1], pre[1]], counts=counts) == two


def test_no_detections_and_mismatched_image_sets():
    gt, _ = _one_box_per_image(5, missed=())
    assert image_evals(gt, []).ap() == 0.0
    counts = resample_counts(5, 4, seed=0)
    assert counts.shape == (4, 5) and (counts.sum(1) == 5).all()
    other, dets = _one_box_per_image(6, missed=())
    with pytest.raises(ValueError, match="different image sets"):
        paired_gain([image_evals(gt, [])], [image_evals(other, dets)], n_resamples=2)
