"""The distillation objective does not depend on the number of processes.

Every normaliser taken over the batch (mask sums, positive / gated counts) is
summed over processes (``losses.batch_normalize``), and HGD's running means
are averaged over them: 2 processes with 2 images each give the same loss_kd_*
values as 1 process with the same 4 images (gloo on CPU). Checked term by term
on hand-made records (every term that takes a batch statistic, with its input
and adapter gradients), and end to end through ``train_net.py --num-gpus 2``
with every term of each detector family at once.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SYN, TINY_OPTS, in_processes


def _normalize_own_half(rank, world):
    """(value, gradient of the numerator) of batch_normalize on this process's numerator / denominator."""
    from distill_d2.losses import batch_normalize

    num = torch.tensor([3.0, 5.0])[rank].requires_grad_()
    den = torch.tensor([1.0, 7.0])[rank]
    out = batch_normalize(num, den, min_den=1, eps=0.5)
    out.backward()
    return out.item(), num.grad.item()


def test_batch_normalize_sums_the_denominator_over_processes():
    got = in_processes(_normalize_own_half)
    # single process over both halves: (3 + 5) / (1 + 7 + 0.5); each process returns 2 * num_p / (8 + 0.5)
    assert (got[0][0] + got[1][0]) / 2 == pytest.approx(8 / 8.5, rel=1e-6)
    assert got[0][0] == pytest.approx(2 * 3 / 8.5) and got[1][1] == pytest.approx(2 / 8.5)  # averaged by DDP: 1/8.5
    from distill_d2.losses import batch_normalize

    assert batch_normalize(torch.tensor(8.0), torch.tensor(8.0), eps=0.5).item() == pytest.approx(8 / 8.5)


# ------------------------------------------------------------------ every batch-statistic term, 1 vs 2 processes
# Hand-made 4-image records (maps with H != W; image 1 without gt; overlapping, border, partly-outside and
# sub-cell boxes); one process gets images 0-3, two processes images 0-1 and 2-3. Each process's loss is
# W * (its part of the numerator) / (the all-reduced denominator), so the mean over processes (what
# detectron2 logs, and what DDP's gradient averaging optimises) equals the single-process loss, and each
# process's gradient on its own images' inputs, divided by W, equals the single-process gradient there.

A = 2  # anchors per cell
IMAGE_BOXES = [
    [[2.0, 3.0, 14.0, 9.0], [8.0, 5.0, 30.0, 21.0], [28.0, 16.0, 40.0, 24.0], [-6.0, 10.0, 5.0, 30.0],
     [17.0, 1.0, 18.5, 2.5]],
    [],  # no gt
    [[20.0, 2.0, 38.0, 12.0], [22.0, 4.0, 30.0, 20.0], [0.0, 12.0, 9.0, 26.0]],
    [[33.0, 9.0, 34.5, 10.5]],  # one box smaller than a cell
]
ROIS_PER_IMAGE = [8, 3, 10, 6]


def _grid_anchors(stride, h, w):
    """(h * w * A, 4) anchors of one level in detectron2's (H, W, A) order."""
    return torch.tensor([[stride * (x + 0.5) - stride * (a + 1) / 2, stride * (y + 0.5) - stride * (a + 1) / 2,
                          stride * (x + 0.5) + stride * (a + 1) / 2, stride * (y + 0.5) + stride * (a + 1) / 2]
                         for y in range(h) for x in range(w) for a in range(A)])


def _labels(g, n, has_gt, num_fg, bg, ignored=True):
    """(n,) matcher-style labels: -1 ignored (if ``ignored``), ``bg`` background, and only with gt a
    foreground class in [0, num_fg) (``num_fg`` 0: the label 1, as the RPN's)."""
    u = torch.rand(n, generator=g)
    fg = torch.randint(0, num_fg, (n,), generator=g) if num_fg else torch.ones(n, dtype=torch.long)
    out = torch.where((u < 0.15) & ignored, torch.full_like(fg, -1), torch.full_like(fg, bg))
    return torch.where(u > 0.55, fg, out) if has_gt else out


def process_record(images):
    """(StepRecord, DenseRecord) of the listed images (each generated from its own seed): the record holds
    RoIs ("heads" for Faster R-CNN), "teacher_rois" (= "reverse_rois"), "teacher_rpn" and
    "dense_level_sizes"; the DenseRecord has predictions on p3's anchors. Student tensors are leaves with grad."""
    from detectron2.structures import Boxes, Instances

    from distill_d2.record import DenseRecord, RoIRecord, RPNRecord, StepRecord
    from test_methods import IMAGE_HW, K, SIZES, STRIDES, T

    feats, t_feats, gts, rois, t_rois, dense, rpn = {}, {}, [], [], [], [], []
    d_anchors = _grid_anchors(8, *SIZES["p3"])
    rpn_anchors = torch.cat([_grid_anchors(STRIDES[lv], *SIZES[lv]) for lv in ("p2", "p3")])
    for i in images:
        g = torch.Generator().manual_seed(1000 + i)
        for lv, (h, w) in SIZES.items():
            feats.setdefault(lv, []).append(torch.randn(1, 3, h, w, generator=g))
            t_feats.setdefault(lv, []).append(torch.randn(1, 2, h, w, generator=g))
        boxes = torch.tensor(IMAGE_BOXES[i]).reshape(-1, 4)
        has_gt = len(boxes) > 0
        inst = Instances(IMAGE_HW)
        inst.gt_boxes, inst.gt_classes = Boxes(boxes), torch.zeros(len(boxes), dtype=torch.long)
        gts.append(inst)
        for out in (rois, t_rois):
            r = ROIS_PER_IMAGE[i]
            xy = torch.rand(r, 2, generator=g) * torch.tensor([40.0, 24.0]) - 4
            props = torch.cat([xy, xy + 2 + torch.rand(r, 2, generator=g) * 20], 1)
            cls = _labels(g, r, has_gt, K, K, ignored=False)
            if has_gt:
                cls[0] = 0  # a positive RoI in every image with gt
            gt = props + torch.randn(r, 4, generator=g).clamp(-2, 2) if has_gt else torch.zeros(r, 4)
            out.append((props, gt, cls, torch.randn(r, K + 1, generator=g), torch.randn(r, 4 * K, generator=g) * 0.3,
                        torch.randn(r, K + 1, generator=g) * 2, torch.randn(r, 4 * K, generator=g) * 0.3))
        ra = len(d_anchors)
        lab = _labels(g, ra, has_gt, K, K)
        gt = d_anchors + torch.randn(ra, 4, generator=g).clamp(-2, 2) if has_gt else torch.zeros(ra, 4)
        dense.append((lab, gt, torch.randn(ra, K, generator=g), torch.randn(ra, 4, generator=g) * 0.3,
                      torch.randn(ra, K, generator=g) * 2, torch.randn(ra, 4, generator=g) * 0.3))
        rr = len(rpn_anchors)
        lab = _labels(g, rr, has_gt, 0, 0)  # 1 fg, 0 bg, -1 ignored
        gt = rpn_anchors + torch.randn(rr, 4, generator=g).clamp(-2, 2) if has_gt else torch.zeros(rr, 4)
        rpn.append((torch.randn(rr, generator=g) * 2, torch.randn(rr, 4, generator=g) * 0.2, lab, gt))

    def leaf(x):
        return x.detach().requires_grad_(True)

    def roi_record(parts):
        props, gt, cls, s_log, s_del, t_log, t_del = (torch.cat(x) for x in zip(*parts))
        inst = [Instances(IMAGE_HW, proposal_boxes=Boxes(p[0]), gt_classes=p[2]) for p in parts]
        return RoIRecord(instances=inst, proposal_boxes=props, gt_boxes=gt, gt_classes=cls, logits=leaf(s_log),
                         deltas=leaf(s_del), t_logits=t_log, t_deltas=t_del, num_classes=K, box2box_transform=T)

    lab, gt, s_log, s_del, t_log, t_del = (torch.stack(x) for x in zip(*dense))
    dense_rec = DenseRecord(anchors=d_anchors, labels=lab, gt_boxes=gt, logits=leaf(s_log), deltas=leaf(s_del),
                            t_logits=t_log, t_deltas=t_del, num_classes=K, box2box_transform=T)
    logits, deltas, labels, gt = (torch.stack(x) for x in zip(*rpn))
    rpn_rec = RPNRecord(logits=logits, deltas=deltas, anchors=rpn_anchors, labels=labels, gt_boxes=gt,
                        sizes={lv: (*SIZES[lv], A) for lv in ("p2", "p3")}, box2box_transform=T)
    cache = {"teacher_rois": roi_record(t_rois), "teacher_rpn": rpn_rec, "dense_level_sizes": {"p3": (*SIZES["p3"], A)}}
    cache["reverse_rois"] = cache["teacher_rois"]  # (the same RoIs, sampled by the other sampler in a detector)
    rec = StepRecord(images=None, t_images=None, gt_instances=gts, strides=dict(STRIDES),
                     features={k: leaf(torch.cat(v)) for k, v in feats.items()},
                     t_features={k: torch.cat(v) for k, v in t_feats.items()}, rois=roi_record(rois), cache=cache)
    return rec, dense_rec


# name -> (term, family, DISTILL keys as in test_methods.cfg_with)
TERM_CASES = {
    "FeatureKD_fgfi": ("FeatureKD", "rcnn", dict(FEAT__LEVELS=["p2", "p3"])),
    "FeatureKD_mean_box": ("FeatureKD", "rcnn", dict(FEAT__LEVELS=["p2", "p3"], FEAT__NORM="mean", FEAT__MASK="box")),
    "DecoupledFeatureKD": ("DecoupledFeatureKD", "rcnn", dict(FEAT__LEVELS=["p2", "p3"], FEAT__MASK="defeat",
                                                              FEAT__DEFEAT_CANONICAL_SIZE=8.0)),
    "DecoupledBackboneKD": ("DecoupledBackboneKD", "rcnn", dict(DEFEAT__BACKBONE_LEVELS=["res2", "res3"])),
    "RoIClsKD_gated": ("RoIClsKD", "rcnn", dict(CLS__GATE="teacher_better", CLS__TEMPERATURE=2.0)),
    "RoIClsKD_all": ("RoIClsKD", "rcnn", dict(CLS__ROIS="all")),
    "RoIBoxKD_num_rois": ("RoIBoxKD", "rcnn", dict(TAR__BOX_GATE="teacher_vs_proposal")),
    "RoIBoxKD_num_gated": ("RoIBoxKD", "rcnn", dict(TAR__BOX_GATE="teacher_vs_student",
                                                    TAR__BOX_NORMALIZER="num_gated")),
    "DecoupledProposalKD": ("DecoupledProposalKD", "rcnn", dict(DEFEAT__CLS_BG_TEMPERATURE=2.0)),
    "ReverseRoIClsKD": ("ReverseRoIClsKD", "rcnn", dict(CLS__GATE="teacher_better")),
    "DenseClsKD": ("DenseClsKD", "dense", dict(CLS__TEMPERATURE=2.0)),
    "DenseBoxKD": ("DenseBoxKD", "dense", dict(TAR__BOX_GATE="none")),
    "HarmonyClsKD_rcnn": ("HarmonyClsKD", "rcnn", dict(TBD__HD_BG_WEIGHT=0.5, TBD__HS_TARGET=True)),
    "HarmonyClsKD_dense": ("HarmonyClsKD", "dense", dict(TBD__HD_BG_WEIGHT=0.5)),
    "TaskDecoupledFeatureKD_rcnn": ("TaskDecoupledFeatureKD", "rcnn", dict(TBD__LEVELS=["p2", "p3"])),
    "TaskDecoupledFeatureKD_dense": ("TaskDecoupledFeatureKD", "dense", dict(TBD__LEVELS=["p3"])),
    # (the default conv1x1_bn adapter: its BatchNorm takes the statistics of every process's images)
    "HGD_running_mean": ("HierarchicalFeatureKD", "rcnn", dict(HGD__LEVELS=["res2", "p2", "res3", "p3"],
                                                               HGD__MOMENTUM=0.5)),
    "HGD_fixed_area_balance": ("HierarchicalFeatureKD", "rcnn", dict(HGD__LEVELS=["p2", "p3"], HGD__ADAPTER="conv1x1",
                                                                     HGD__MACRO="fixed", HGD__STAGE_WEIGHTS=[1.0, 3.0],
                                                                     HGD__AREA_BALANCE=True)),
}


def run_term_case(name, images):
    """{"losses": {loss: float}, "inputs": {input: grad}, "params": {param: grad}, "running": buffer} of one
    case on ``images`` (HGD: two training steps, the second one's losses, gradient of the sum)."""
    from distill_d2.registry import DISTILL_TERM_REGISTRY
    from test_methods import cfg_with, ctx

    term_name, family, keys = TERM_CASES[name]
    cfg = cfg_with(**keys)
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3"]
    torch.manual_seed(0)
    term = DISTILL_TERM_REGISTRY.get(term_name)(cfg, ctx(cfg, family)).train()
    rec, dense = process_record(images)
    if family == "dense":
        rec.rois, rec.dense = None, dense
    steps = 2 if term_name == "HierarchicalFeatureKD" else 1
    total = 0
    for _ in range(steps):
        losses, _ = term(rec)
        total = total + sum(losses.values())
    total.backward()
    heads = rec.get("heads")
    inputs = {f"features.{k}": v for k, v in rec.features.items()}
    inputs.update({"logits": heads.logits, "deltas": heads.deltas,
                   "teacher_rois.logits": rec.cache["teacher_rois"].logits})
    return {"losses": {k: v.item() for k, v in losses.items()},
            "inputs": {k: v.grad for k, v in inputs.items() if v.grad is not None},
            "params": {k: p.grad for k, p in term.named_parameters() if p.grad is not None},
            "running": term.running.clone() if hasattr(term, "running") else None,
            "rows": {"logits": heads.counts if family == "rcnn" else None,
                     "deltas": heads.counts if family == "rcnn" else None,
                     "teacher_rois.logits": rec.cache["teacher_rois"].counts}}


def _to_numpy(x):
    """``x`` with every tensor (in nested dicts) replaced by a numpy copy."""
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    return x.detach().numpy().copy() if torch.is_tensor(x) else x


def _term_cases_on_own_half(rank, world):
    """{case: run_term_case(case, this process's 2 images)} with numpy gradients."""
    res = {name: run_term_case(name, [2 * rank, 2 * rank + 1]) for name in TERM_CASES}
    return _to_numpy(res)  # (numpy: pickled by value, not through shared memory)


@pytest.fixture(scope="module")
def two_process_terms():
    """{rank: {case: run_term_case(...)}} of two gloo CPU processes on images 0-1 and 2-3."""
    got = in_processes(_term_cases_on_own_half)
    tensors = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
    return {r: {c: dict(v, inputs=tensors(v["inputs"]), params=tensors(v["params"]),
                        running=None if v["running"] is None else torch.from_numpy(v["running"]))
                for c, v in res.items()} for r, res in enumerate(got)}


def _own_rows(grad, rank, rows):
    """The part of a full-batch gradient that belongs to ``rank``'s two images (rows: RoIs per image)."""
    if rows is None:  # per image along dim 0
        return grad[2 * rank:2 * rank + 2]
    start = sum(rows[:2 * rank])
    return grad[start:start + sum(rows[2 * rank:2 * rank + 2])]


@pytest.mark.parametrize("case", sorted(TERM_CASES))
def test_every_batch_statistic_term_is_process_count_invariant(case, two_process_terms):
    one = run_term_case(case, [0, 1, 2, 3])
    two = [two_process_terms[r][case] for r in range(2)]
    assert one["losses"] and all(v > 0 for v in one["losses"].values()), one["losses"]  # (nothing vacuous)
    for k, v in one["losses"].items():
        mean = (two[0]["losses"][k] + two[1]["losses"][k]) / 2
        assert mean == pytest.approx(v, rel=1e-5), (k, v, [t["losses"][k] for t in two])
        assert two[0]["losses"][k] != pytest.approx(two[1]["losses"][k], rel=1e-3)  # the halves differ
    assert one["inputs"]
    for k, g in one["inputs"].items():
        for r in range(2):
            torch.testing.assert_close(two[r]["inputs"][k] / 2, _own_rows(g, r, one["rows"].get(k)),
                                       rtol=1e-4, atol=1e-7, msg=f"{case}: gradient of {k}, rank {r}")
    for k, g in one["params"].items():  # DDP averages the parameter gradients
        torch.testing.assert_close((two[0]["params"][k] + two[1]["params"][k]) / 2, g, rtol=1e-4, atol=1e-7)
    if one["running"] is not None:  # HGD: every process holds the single-process running means
        for r in range(2):
            torch.testing.assert_close(two[r]["running"], one["running"], rtol=1e-5, atol=0)


def last_metrics(out):
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    return lines[-1]


# Every term of the family at once on top of a preset (HGD with a conv1x1 adapter: conv1x1_bn's BatchNorm,
# like a trainable-BN student, normalises over each process's own images).
E2E_CASES = {
    "retinanet": ("tar_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml", [
        "DISTILL.TERMS", "['FeatureKD', 'DenseClsKD', 'DenseBoxKD', 'HarmonyClsKD', 'TaskDecoupledFeatureKD', "
                         "'HierarchicalFeatureKD']",
        "DISTILL.TBD.LEVELS", "['p3', 'p4', 'p5', 'p6', 'p7']", "DISTILL.TBD.HD_BG_WEIGHT", "0.5",
        "DISTILL.HGD.LEVELS", "['res3', 'res4', 'res5', 'p3', 'p4', 'p5', 'p6', 'p7']",
        "DISTILL.HGD.ADAPTER", "conv1x1"]),
    # BATCH_SIZE_PER_IMAGE above the proposal count: every RoI is kept, so the sampled set does not depend
    # on each process's random stream (detectron2 seeds process r with SEED + r)
    "rcnn": ("defeat_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml", [
        "DISTILL.TERMS", "['DecoupledFeatureKD', 'DecoupledBackboneKD', 'RoIClsKD', 'RoIBoxKD', 'HarmonyClsKD', "
                         "'TaskDecoupledFeatureKD', 'HierarchicalFeatureKD']",
        "DISTILL.DEFEAT.BACKBONE_LEVELS", "['res2', 'res3', 'res4']", "DISTILL.HGD.ADAPTER", "conv1x1",
        # (a random teacher's boxes pass no gate and score HS 0: all positives, background weight 0.5)
        "DISTILL.TAR.BOX_GATE", "none", "DISTILL.TBD.HD_BG_WEIGHT", "0.5",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "1024"]),
}


@pytest.mark.parametrize("case", sorted(E2E_CASES))
def test_one_and_two_processes_give_the_same_kd_losses(case, make_ckpt, tmp_path, datasets_dir):
    preset, teacher, extra = E2E_CASES[case]
    # FrozenBN student and no flip: the two runs see the same 4 images with the same features
    # (trainable BN would normalise over 2 vs 4 images, a difference no loss normaliser can remove).
    opts = TINY_OPTS + ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()", "SEED", "3",
                        "INPUT.RANDOM_FLIP", "none", "MODEL.RESNETS.NORM", "FrozenBN",
                        "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher), "DISTILL.GUARD.ACTION", "off"] + extra
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
    assert len(kd) == {"retinanet": 6, "rcnn": 9}[case] and all(res[1][k] > 0 for k in kd), res[1]
    for k in kd:
        assert res[2][k] == pytest.approx(res[1][k], rel=1e-5), (k, res[1][k], res[2][k])
