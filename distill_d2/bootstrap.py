"""Paired bootstrap over test images for differences of COCO box AP (95 % intervals for gains).

A gain "method minus baseline" measured on one test set of n images has sampling noise: another n
images from the same distribution would give another gain. The paired bootstrap estimates that
noise: draw n image ids with replacement (a resample), evaluate *both* models on the same resample,
take the difference; repeat B times; the 2.5 and 97.5 percentiles of the B differences are the 95 %
interval. With several seeds per model (runs paired by seed: same data order and initialisation),
each resample's gain is the mean over seeds of the per-seed differences on that resample, so the
interval is that of the seed-mean gain the report prints; it covers test-image sampling only (the
seed-to-seed spread is shown by the per-seed gains beside it).

How AP is computed on a resample: COCOeval matches detections to ground truth per (image, class)
(``evaluateImg``), independently of every other image, and ``accumulate`` then pools the per-image
matches of the images evaluated. So one ``COCOeval.evaluate()`` per model on the full test set
(:func:`image_evals`) is enough: the AP of a multiset of images, image ``i`` drawn ``counts[i]``
times, pools each image's matches ``counts[i]`` times (:meth:`ImageEvals.ap`). This is what COCOeval
gives on a ground-truth/detection set in which every drawn copy is a separate image with a new id
(tested against exactly that), at the cost of one accumulate per resample instead of a full
evaluation. (Detections of *different* images with exactly equal scores may be pooled in another
order than COCOeval's concatenation order; with float scores this does not happen in practice.)

    from distill_d2.bootstrap import image_evals, paired_gain
    base = [image_evals(gt_json, f"{d}/coco_instances_results.json") for d in baseline_run_dirs]
    meth = [image_evals(gt_json, f"{d}/coco_instances_results.json") for d in method_run_dirs]
    g = paired_gain(meth, base, n_resamples=500, seed=0)   # {"gain": 3.1, "lo": 1.2, "hi": 5.0, ...}
"""
import contextlib
import copy
import io
import json

import numpy as np

__all__ = ["ImageEvals", "image_evals", "resample_counts", "bootstrap_aps", "paired_gain"]


class ImageEvals:
    """Per-image COCO matches of one model's detections on one ground-truth set (area range "all",
    the last maxDets, every IoU threshold), arranged for fast pooling over any multiset of images.

    ``img_ids``: the evaluated image ids (COCOeval's order: sorted, unique). Per class ``k``:
    ``det_img[k]`` (D,) image index of each detection, sorted by descending score (ties: image
    order, then the image's own order); ``tp[k]`` / ``fp[k]`` (T, D) bool, a true / false positive at
    each IoU threshold (ignored detections are neither); ``npos[k]`` (I,) non-ignored ground-truth
    boxes per image. ``rec_thrs`` (R,): COCO's 101 recall thresholds; ``iou_thrs`` (T,)."""

    def __init__(self, img_ids, det_img, tp, fp, npos, rec_thrs, iou_thrs):
        self.img_ids, self.det_img, self.tp, self.fp, self.npos = list(img_ids), det_img, tp, fp, npos
        self.rec_thrs, self.iou_thrs = np.asarray(rec_thrs), np.asarray(iou_thrs)

    @classmethod
    def from_cocoeval(cls, ev):
        """From a pycocotools ``COCOeval`` after ``evaluate()`` (``accumulate`` not needed)."""
        p = ev.params
        img_ids, n_img, n_area = list(p.imgIds), len(p.imgIds), len(p.areaRng)
        max_det, n_thr = p.maxDets[-1], len(p.iouThrs)
        cat_ids = p.catIds if p.useCats else [-1]
        det_img, tp, fp, npos = [], [], [], []
        for k in range(len(cat_ids)):
            imgs, scores, m, ig = [], [], [], []
            pos = np.zeros(n_img, np.int64)
            for i in range(n_img):
                e = ev.evalImgs[k * n_area * n_img + i]  # area range 0 = "all"
                if e is None:
                    continue
                s = np.asarray(e["dtScores"][:max_det], dtype=float)
                imgs.append(np.full(len(s), i))
                scores.append(s)
                m.append(np.asarray(e["dtMatches"])[:, :max_det].reshape(n_thr, len(s)))
                ig.append(np.asarray(e["dtIgnore"])[:, :max_det].reshape(n_thr, len(s)).astype(bool))
                pos[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            if scores:
                s = np.concatenate(scores)
                order = np.argsort(-s, kind="mergesort")  # as COCOeval.accumulate: stable in image order
                mm, ii = np.concatenate(m, 1)[:, order], np.concatenate(ig, 1)[:, order]
                det_img.append(np.concatenate(imgs)[order])
                tp.append((mm != 0) & ~ii)  # (a match holds the gt id, 0 = none)
                fp.append((mm == 0) & ~ii)
            else:
                det_img.append(np.zeros(0, np.int64))
                tp.append(np.zeros((n_thr, 0), bool))
                fp.append(np.zeros((n_thr, 0), bool))
            npos.append(pos)
        return cls(img_ids, det_img, tp, fp, npos, p.recThrs, p.iouThrs)

    def ap(self, counts=None, iou=None):
        """COCO AP in % (as detectron2 reports it) of the multiset with ``counts[i]`` copies of image
        ``img_ids[i]`` (default: each image once = plain COCOeval). ``iou``: one IoU threshold
        (0.5 -> AP50) instead of the mean over all. NaN when no class has a ground-truth box."""
        n_img = len(self.img_ids)
        c = np.ones(n_img, np.int64) if counts is None else np.asarray(counts)
        if c.shape != (n_img,):
            raise ValueError(f"counts must have one entry per image ({n_img}), got shape {c.shape}")
        thr = slice(None) if iou is None else [int(np.argmin(np.abs(self.iou_thrs - iou)))]
        per_class = []
        for det_img, tp, fp, npos in zip(self.det_img, self.tp, self.fp, self.npos):
            n_pos = int(c @ npos)
            if n_pos == 0:
                continue  # COCOeval: precision -1, left out of the mean
            w = c[det_img]
            keep = w > 0
            w = w[keep].astype(float)
            tp_sum = np.cumsum(tp[thr][:, keep] * w, axis=1)
            fp_sum = np.cumsum(fp[thr][:, keep] * w, axis=1)
            q = np.zeros((tp_sum.shape[0], len(self.rec_thrs)))
            if tp_sum.shape[1]:
                rc = tp_sum / n_pos
                pr = tp_sum / (tp_sum + fp_sum + np.spacing(1))
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
                for t in range(len(rc)):
                    inds = np.searchsorted(rc[t], self.rec_thrs, side="left")
                    ok = inds < len(rc[t])
                    q[t, ok] = pr[t, inds[ok]]
            per_class.append(q.mean())
        return 100.0 * float(np.mean(per_class)) if per_class else float("nan")


def _load_gt(gt):
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(gt)


def image_evals(gt, dt, max_dets=(1, 10, 100)):
    """Per-image COCO box matches of detections ``dt`` (a COCO results json path, as detectron2's
    COCOEvaluator writes it to ``coco_instances_results.json``, or that list of dicts) against ground
    truth ``gt`` (a COCO json path or a pycocotools ``COCO``). One ``COCOeval.evaluate()`` over every
    image of ``gt``; ``max_dets`` as detectron2's (AP uses the last)."""
    from pycocotools.cocoeval import COCOeval

    gt = _load_gt(gt)
    if isinstance(dt, str):
        with open(dt) as f:
            dt = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        if dt:
            res = gt.loadRes(copy.deepcopy(dt))  # (loadRes adds keys to the dicts)
        else:  # no detection at all (pycocotools' loadRes cannot take an empty list): AP 0 on every class
            from pycocotools.coco import COCO

            res = COCO()
            res.dataset = {"images": gt.dataset["images"], "categories": copy.deepcopy(gt.dataset["categories"]),
                           "annotations": []}
            res.createIndex()
        ev = COCOeval(gt, res, "bbox")
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
    return ImageEvals.from_cocoeval(ev)


def resample_counts(n_images, n_resamples, seed=0):
    """(n_resamples, n_images) int array: row b counts how often each image is drawn in resample b
    (n_images draws with replacement, numpy ``default_rng(seed)``: fixed seed, same resamples for
    every model compared)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n_resamples, n_images))
    return np.stack([np.bincount(d, minlength=n_images) for d in draws])


def bootstrap_aps(evals, counts, iou=None):
    """(B,) AP (%) of ``evals`` (an :class:`ImageEvals`) on each resample row of ``counts``."""
    return np.array([evals.ap(c, iou) for c in counts])


def paired_gain(a, b, n_resamples=500, seed=0, level=0.95, iou=None, counts=None):
    """Gain of model A over model B, paired by seed, with its paired-bootstrap interval.

    ``a``, ``b``: one entry per seed, ``a[s]`` paired with ``b[s]``, all on the same test images:
    :class:`ImageEvals`, or precomputed ``(full-set AP, (B,) APs on the rows of counts)`` pairs (then
    all on the same resamples). Resamples: ``counts`` if given, else :func:`resample_counts`
    (``n_resamples``, ``seed``). Returns ``{"gain": mean over seeds of AP(a_s) - AP(b_s) on the full
    test set, "lo", "hi": the ``level`` percentile interval of the per-resample seed-mean gains,
    "n_resamples", "n_seeds", "frac_above_zero": share of resamples with a gain > 0}``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_gain needs the same number (>= 1) of runs on both sides (by seed), "
                         f"got {len(a)} and {len(b)}")
    evals = [x for x in list(a) + list(b) if isinstance(x, ImageEvals)]
    if any(e.img_ids != evals[0].img_ids for e in evals):
        raise ValueError("paired_gain: the runs were evaluated on different image sets; pair runs of one test set")
    if counts is None:
        if not evals:
            raise ValueError("paired_gain: precomputed resample APs need the counts they were computed on")
        counts = resample_counts(len(evals[0].img_ids), n_resamples, seed)

    def full_and_boot(x):
        return (x.ap(None, iou), bootstrap_aps(x, counts, iou)) if isinstance(x, ImageEvals) else x

    fa, fb = [full_and_boot(x) for x in a], [full_and_boot(x) for x in b]
    gain = float(np.mean([x[0] - y[0] for x, y in zip(fa, fb)]))
    boot = np.mean([np.asarray(x[1]) - np.asarray(y[1]) for x, y in zip(fa, fb)], axis=0)
    if boot.shape != (len(counts),):
        raise ValueError(f"paired_gain: {boot.shape[0]} resample APs but {len(counts)} resamples in counts")
    lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return {"gain": gain, "lo": float(lo), "hi": float(hi), "n_resamples": int(len(boot)), "n_seeds": len(a),
            "frac_above_zero": float(np.mean(boot > 0))}
