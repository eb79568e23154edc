"""FGD (``FocalGlobalKD``, distill_d2/methods/fgd.py): the fg/bg masks, every loss piece and the GcBlock
against naive per-element loops written from the formulas of docs/methods/FGD.md (float64, non-square maps,
channel-mismatched student/teacher through the 1x1 align), the GcBlock's zero start, per-detector defaults,
build-time errors, 1 vs 2 processes, and one real training step from each synthetic preset."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from conftest import in_processes
from distill_d2.errors import DistillConfigError, TeacherError
from distill_d2.methods import fgd
from distill_d2.methods.fgd import FocalGlobalKD, GcBlock, fgd_masks
from distill_d2.record import StepRecord
from distill_d2.terms import BuildContext, build_terms
from test_methods import cfg_with

# padded input 24 x 40 px (H x W): p2 (stride 4) 6 x 10 cells, p3 (stride 8) 3 x 5 cells; H != W everywhere
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
SIZES = {"p2": (6, 10), "p3": (3, 5)}
PADDED_HW = (24, 40)
# unpadded image sizes (h, w): the first is smaller than the padded batch ("fgd_legacy" scaling and the
# clipping to the image differ from plain stride scaling there)
IMAGE_SIZES = [(21, 37), (24, 40), (24, 40), (24, 40)]
IMAGE_BOXES = [
    [[2.0, 3.0, 10.0, 9.0],      # small box inside
     [6.0, 5.0, 22.0, 17.0],     # overlaps the first
     [28.0, 14.0, 37.0, 21.0],   # on the image's right and bottom border (not the padded map's)
     [-6.0, 10.0, 5.0, 30.0],    # partly outside (negative x, beyond the bottom): clipped to the image
     [17.0, 1.0, 18.5, 2.5]],    # smaller than a cell
    [],                          # an image without gt
    [[32.0, 16.0, 40.0, 24.0],   # on the padded map's corner: ceil reaches one cell beyond the grid
     [30.2, 2.1, 30.9, 2.6]],    # smaller than a cell
    [[4.0, 4.0, 12.0, 12.0]],
]


def grid(levels):
    return {lv: (STRIDES[lv], *SIZES[lv]) for lv in levels}


def fgd_ctx(cfg, family="rcnn", cs=3, ct=4, teacher_strides=None):
    s = {k: ShapeSpec(channels=cs, stride=v) for k, v in STRIDES.items()}
    t = {k: ShapeSpec(channels=ct, stride=v) for k, v in {**STRIDES, **(teacher_strides or {})}.items()}
    return BuildContext(cfg=cfg, teacher_cfg=cfg, family=family, teacher_family=family, student_shapes=s,
                        teacher_shapes=t, student=None)


def fgd_term(family="rcnn", cs=3, ct=4, **keys):
    keys.setdefault("FGD__RCNN__LEVELS", ["p2", "p3"])
    cfg = cfg_with(**keys)
    return FocalGlobalKD(cfg, fgd_ctx(cfg, family, cs, ct))


def fgd_record(images=(0, 1, 2), cs=3, ct=4, dtype=torch.float64):
    """StepRecord of the listed images (each from its own seed: a batch split in two gives the same
    images); student maps are leaves with grad."""
    feats, t_feats, gts = {}, {}, []
    for i in images:
        g = torch.Generator().manual_seed(1000 + i)
        for lv, (h, w) in SIZES.items():
            feats.setdefault(lv, []).append(torch.randn(1, cs, h, w, generator=g, dtype=dtype))
            t_feats.setdefault(lv, []).append(1.5 * torch.randn(1, ct, h, w, generator=g, dtype=dtype) + 0.3)
        inst = Instances(IMAGE_SIZES[i])
        inst.gt_boxes = Boxes(torch.tensor(IMAGE_BOXES[i]).reshape(-1, 4))
        inst.gt_classes = torch.zeros(len(IMAGE_BOXES[i]), dtype=torch.long)
        gts.append(inst)
    return StepRecord(images=None, t_images=None, gt_instances=gts,
                      features={k: torch.cat(v).requires_grad_() for k, v in feats.items()},
                      t_features={k: torch.cat(v) for k, v in t_feats.items()}, strides=dict(STRIDES))


# ------------------------------------------------------------------ naive reference loops
def naive_masks(boxes, image_hw, s, h, w, scale):
    """(fg, bg) as nested lists, box by box and cell by cell (the card's rule)."""
    ih, iw = image_hw
    fg = [[0.0] * w for _ in range(h)]
    for x1, y1, x2, y2 in boxes:
        x1, x2 = (min(max(v, 0.0), iw) for v in (x1, x2))
        y1, y2 = (min(max(v, 0.0), ih) for v in (y1, y2))
        if scale == "stride":
            gx1, gy1, gx2, gy2 = x1 / s, y1 / s, x2 / s, y2 / s
        else:
            gx1, gy1, gx2, gy2 = x1 / iw * w, y1 / ih * h, x2 / iw * w, y2 / ih * h
        c0, r0, c1, r1 = math.floor(gx1), math.floor(gy1), math.ceil(gx2), math.ceil(gy2)
        cells = [(i, j) for i in range(r0, r1 + 1) for j in range(c0, c1 + 1) if 0 <= i < h and 0 <= j < w]
        area = (r1 - r0 + 1) * (c1 - c0 + 1) if scale == "fgd_legacy" else max(len(cells), 1)
        for i, j in cells:
            fg[i][j] = max(fg[i][j], 1.0 / area)
    n_bg = sum(v == 0 for row in fg for v in row)
    bg = [[(1.0 / n_bg if v == 0 else 0.0) for v in row] for row in fg]
    return fg, bg


def naive_attention(x, tau):
    """x: (C, H, W) nested lists -> (spatial H x W, channel C), each H W softmax / C softmax."""
    c, h, w = len(x), len(x[0]), len(x[0][0])
    sp = [[sum(abs(x[k][i][j]) for k in range(c)) / c / tau for j in range(w)] for i in range(h)]
    z = sum(math.exp(v) for row in sp for v in row)
    sp = [[h * w * math.exp(v) / z for v in row] for row in sp]
    ch = [sum(abs(x[k][i][j]) for i in range(h) for j in range(w)) / (h * w) / tau for k in range(c)]
    z = sum(math.exp(v) for v in ch)
    return sp, [c * math.exp(v) / z for v in ch]


def naive_conv1x1(conv, x):
    """(C_in, H, W) nested lists through a 1x1 conv (explicit sum over input channels)."""
    wt, b = conv.weight[:, :, 0, 0].tolist(), conv.bias.tolist()
    h, w = len(x[0]), len(x[0][0])
    return [[[b[o] + sum(wt[o][k] * x[k][i][j] for k in range(len(x))) for j in range(w)] for i in range(h)]
            for o in range(len(wt))]


def naive_gc(block, x):
    """GcBlock on (C, H, W) nested lists: x + channel_add(sum_hw x softmax_hw(conv_mask x))."""
    c, h, w = len(x), len(x[0]), len(x[0][0])
    wm, bm = block.conv_mask.weight[0, :, 0, 0].tolist(), float(block.conv_mask.bias[0])
    logit = [[bm + sum(wm[k] * x[k][i][j] for k in range(c)) for j in range(w)] for i in range(h)]
    z = sum(math.exp(v) for row in logit for v in row)
    ctx = [sum(x[k][i][j] * math.exp(logit[i][j]) / z for i in range(h) for j in range(w)) for k in range(c)]
    conv1, ln, _, conv2 = block.channel_add
    w1, b1 = conv1.weight[:, :, 0, 0].tolist(), conv1.bias.tolist()
    y = [b1[q] + sum(w1[q][k] * ctx[k] for k in range(c)) for q in range(len(b1))]
    mu = sum(y) / len(y)
    var = sum((v - mu) ** 2 for v in y) / len(y)
    g, beta = ln.weight.flatten().tolist(), ln.bias.flatten().tolist()
    y = [max(0.0, (v - mu) / math.sqrt(var + ln.eps) * g[q] + beta[q]) for q, v in enumerate(y)]
    w2, b2 = conv2.weight[:, :, 0, 0].tolist(), conv2.bias.tolist()
    add = [b2[k] + sum(w2[k][q] * y[q] for q in range(len(y))) for k in range(c)]
    return [[[x[k][i][j] + add[k] for j in range(w)] for i in range(h)] for k in range(c)]


def naive_pieces(term, rec, images, scale, tau):
    """{piece: sum over levels / N} by loops over n, c, i, j."""
    out = {"fg": 0.0, "bg": 0.0, "att": 0.0, "global": 0.0}
    n_img = len(images)
    for lv in term.levels:
        s_all, t_all = rec.features[lv].tolist(), rec.t_features[lv].tolist()
        h, w = SIZES[lv]
        for n, i_img in enumerate(images):
            a = naive_conv1x1(term.adapters[lv], s_all[n])
            t = t_all[n]
            fg, bg = naive_masks(IMAGE_BOXES[i_img], IMAGE_SIZES[i_img], STRIDES[lv], h, w, scale)
            sp_t, ch_t = naive_attention(t, tau)
            sp_s, ch_s = naive_attention(a, tau)
            for k in range(len(t)):
                for i in range(h):
                    for j in range(w):
                        e = sp_t[i][j] * ch_t[k] * (a[k][i][j] - t[k][i][j]) ** 2
                        out["fg"] += fg[i][j] * e
                        out["bg"] += bg[i][j] * e
            out["att"] += sum(abs(p - q) for p, q in zip(ch_s, ch_t))
            out["att"] += sum(abs(sp_s[i][j] - sp_t[i][j]) for i in range(h) for j in range(w))
            gs, gt = naive_gc(term.gc_student[lv], a), naive_gc(term.gc_teacher[lv], t)
            out["global"] += sum((gs[k][i][j] - gt[k][i][j]) ** 2
                                 for k in range(len(t)) for i in range(h) for j in range(w))
    return {k: v / n_img for k, v in out.items()}


def randomize_gc(term, seed=0):
    """Non-zero last layers and LayerNorm affines, so the GcBlocks are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in list(term.gc_student.values()) + list(term.gc_teacher.values()):
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("scale", ["stride", "fgd_legacy"])
def test_masks_match_naive_loop(scale, monkeypatch):
    images = [0, 1, 2, 3]
    boxes = [torch.tensor(IMAGE_BOXES[i]).reshape(-1, 4) for i in images]
    sizes = [IMAGE_SIZES[i] for i in images]
    for chunk in (fgd.FG_CHUNK_ELEMENTS, 1):  # all boxes at once, and one box per chunk
        monkeypatch.setattr(fgd, "FG_CHUNK_ELEMENTS", chunk)
        fg, bg = fgd_masks(boxes, sizes, grid(["p2", "p3"]), scale, torch.float64)
        for lv in ("p2", "p3"):
            h, w = SIZES[lv]
            assert fg[lv].shape == bg[lv].shape == (4, h, w)
            for n, i in enumerate(images):
                want_fg, want_bg = naive_masks(IMAGE_BOXES[i], IMAGE_SIZES[i], STRIDES[lv], h, w, scale)
                f64 = dict(dtype=torch.float64)
                torch.testing.assert_close(fg[lv][n], torch.tensor(want_fg, **f64), rtol=0, atol=1e-12,
                                           msg=f"M_fg {scale} {lv} image {n}")
                torch.testing.assert_close(bg[lv][n], torch.tensor(want_bg, **f64), rtol=0, atol=1e-12,
                                           msg=f"M_bg {scale} {lv} image {n}")


def test_masks_by_hand():
    boxes = [torch.tensor(IMAGE_BOXES[i]).reshape(-1, 4) for i in range(3)]
    fg, bg = fgd_masks(boxes, IMAGE_SIZES[:3], grid(["p2", "p3"]), "stride", torch.float64)
    m = fg["p2"][0]
    # small box [2, 3, 10, 9] / 4 -> cols 0..3 (floor .5, ceil 2.5), rows 0..3: 16 cells; big box [6, 5, 22, 17]
    # -> cols 1..6, rows 1..5: 30 cells. Overlap (1, 1): the larger 1/area
    assert m[0, 0].item() == pytest.approx(1 / 16) and m[1, 1].item() == pytest.approx(1 / 16)
    assert m[4, 5].item() == pytest.approx(1 / 30)
    # border box [28, 14, 37, 21] (the image's border, inside the padded map): cols 7..ceil(9.25)=10, rows 3..6;
    # col 10 and row 6 lie outside the 6 x 10 grid: 3 x 3 cells inside, each 1/9
    assert m[3:6, 7:10].flatten().tolist() == pytest.approx([1 / 9] * 9)
    # partly outside [-6, 10, 5, 30] -> clipped to [0, 10, 5, 21]: cols 0..2, rows 2..6 -> 3 x 4 cells inside
    # (2, 2) lies in the small box (1/16), the big one (1/30) and this one: the max, 1/12
    assert m[5, 0].item() == pytest.approx(1 / 12) and m[2, 2].item() == pytest.approx(1 / 12)
    # sub-cell box [17, 1, 18.5, 2.5] -> cols 4..5, rows 0..1: 4 cells (the small box's 1/16 is smaller)
    assert m[0, 4].item() == pytest.approx(1 / 4) and m[1, 5].item() == pytest.approx(1 / 4)
    # the image without gt: no foreground, a uniform background summing to 1
    assert fg["p2"][1].abs().sum() == 0 and torch.allclose(bg["p2"][1], torch.full((6, 10), 1 / 60, dtype=torch.float64))
    for lv in ("p2", "p3"):  # background: 1 / (number of background cells) of its own image
        for n in range(3):
            nb = (fg[lv][n] == 0).sum().item()
            assert bg[lv][n].sum().item() == pytest.approx(1.0 if nb else 0.0)
            assert torch.equal(bg[lv][n] > 0, fg[lv][n] == 0)
    # "fgd_legacy": x / 37 * 10, y / 21 * 6 and the reference's area (cells beyond the grid counted):
    # border box -> cols floor(7.57)=7..ceil(10)=10, rows 4..6: area 4 x 3 = 12, painted cols 7..9 x rows 4..5
    lfg, _ = fgd_masks(boxes, IMAGE_SIZES[:3], grid(["p2"]), "fgd_legacy", torch.float64)
    assert lfg["p2"][0, 4:6, 7:10].flatten().tolist() == pytest.approx([1 / 12] * 6)
    assert lfg["p2"][0, 3, 9].item() == 0.0
    # a box over the whole image: no background cell, M_bg all 0
    fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 40.0, 24.0]])], [PADDED_HW], grid(["p3"]), "stride", torch.float64)
    assert torch.allclose(fg["p3"], torch.full((1, 3, 5), 1 / 15, dtype=torch.float64)) and bg["p3"].sum() == 0


# ------------------------------------------------------------------ loss pieces
@pytest.mark.parametrize("scale", ["stride", "fgd_legacy"])
def test_every_piece_matches_naive_loop(scale):
    """Student 3 channels -> teacher 4 through the 1x1 align, random (non-identity) GcBlocks, non-default
    temperature and weights; float64."""
    w = dict(FG_WEIGHT=0.3, BG_WEIGHT=0.7, ATT_WEIGHT=0.11, GLOBAL_WEIGHT=0.013)
    term = fgd_term(FGD__BOX_SCALE=scale, FGD__WEIGHT=2.0, FGD__RCNN__TEMPERATURE=0.7,
                    **{f"FGD__RCNN__{k}": v for k, v in w.items()}).double()
    assert isinstance(term.adapters["p2"], torch.nn.Conv2d) and term.adapters["p2"].in_channels == 3
    randomize_gc(term)
    images = [0, 1, 2]
    rec = fgd_record(images)
    losses, scalars = term(rec)
    want = naive_pieces(term, rec, images, scale, 0.7)
    assert want["fg"] > 0 and want["bg"] > 0 and want["att"] > 0 and want["global"] > 0
    for piece, key in zip(("fg", "bg", "att", "global"), ("FG_WEIGHT", "BG_WEIGHT", "ATT_WEIGHT", "GLOBAL_WEIGHT")):
        assert losses[f"loss_kd_fgd_{piece}"].item() == pytest.approx(2.0 * w[key] * want[piece], rel=1e-9), piece
    assert sum(scalars.values()).item() == pytest.approx(sum(v.item() for v in losses.values()), rel=1e-9)
    assert set(scalars) == {"kd/fgd_p2", "kd/fgd_p3"}


def test_gradients_reach_the_student_align_and_both_gcblocks_not_the_teacher():
    term = fgd_term().double()
    rec = fgd_record()
    sum(term(rec)[0].values()).backward()
    assert rec.features["p2"].grad.abs().sum() > 0 and rec.t_features["p2"].grad is None
    assert term.adapters["p2"].weight.grad.abs().sum() > 0
    for side in (term.gc_student, term.gc_teacher):
        assert side["p3"].channel_add[-1].weight.grad.abs().sum() > 0


def test_gcblock_starts_as_identity_and_learns():
    torch.manual_seed(0)
    block = GcBlock(256)
    last = block.channel_add[-1]
    assert last.weight.abs().sum() == 0 and last.bias.abs().sum() == 0
    x = torch.randn(2, 256, 5, 7)
    assert torch.equal(block(x), x)
    # the context mask: kaiming-normal, fan_in, ReLU gain (std sqrt(2 / 256)), bias 0
    assert block.conv_mask.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.15)
    assert block.conv_mask.bias.item() == 0.0
    # in the term: at the start the global term is sum (S - T)^2 / N (both blocks the identity)
    term = fgd_term(FGD__RCNN__GLOBAL_WEIGHT=1.0).double()
    rec = fgd_record()
    losses, _ = term(rec)
    want = sum(((term.adapters[lv](rec.features[lv]) - rec.t_features[lv]) ** 2).sum() for lv in term.levels) / 3
    assert losses["loss_kd_fgd_global"].item() == pytest.approx(want.item(), rel=1e-12)
    # only the last layer gets a gradient at the start (the earlier ones sit behind its zero weights) ...
    losses["loss_kd_fgd_global"].backward()
    gc = term.gc_student["p2"]
    assert gc.channel_add[-1].weight.grad.abs().sum() > 0 and gc.channel_add[0].weight.grad.abs().sum() == 0
    # ... and one step makes the block differ from the identity
    with torch.no_grad():
        for p in term.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    x = rec.t_features["p2"]
    assert not torch.allclose(term.gc_student["p2"](x), x)


def test_gcblock_matches_naive_loop():
    torch.manual_seed(0)
    block = GcBlock(6).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype))
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    got = block(x)
    for n in range(2):
        torch.testing.assert_close(got[n], torch.tensor(naive_gc(block, x[n].tolist()), dtype=torch.float64),
                                   rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ configuration
def test_defaults_per_detector_are_the_reference_configs():
    cfg = cfg_with()
    rcnn = FocalGlobalKD(cfg, fgd_ctx(cfg, "rcnn", cs=4, ct=4))
    dense = FocalGlobalKD(cfg, fgd_ctx(cfg, "dense", cs=4, ct=4))
    assert rcnn.levels == ["p2", "p3", "p4", "p5"] and dense.levels == ["p3", "p4", "p5", "p6", "p7"]
    assert rcnn.weights == pytest.approx({"fg": 5e-5, "bg": 2.5e-5, "att": 5e-5, "global": 5e-7})
    assert dense.weights == pytest.approx({"fg": 1e-3, "bg": 5e-4, "att": 5e-4, "global": 5e-6})
    assert rcnn.temperature == dense.temperature == 0.5 and rcnn.box_scale == "stride"
    assert isinstance(rcnn.adapters["p2"], torch.nn.Identity)  # equal channels: no align, as the reference
    assert set(rcnn.gc_student) == set(rcnn.gc_teacher) == set(rcnn.levels)
    # lambda 0: no GcBlocks (no idle parameters) and no global loss
    term = fgd_term(FGD__RCNN__GLOBAL_WEIGHT=0.0).double()
    assert term.gc_student is None and not any("gc_" in k for k, _ in term.named_parameters())
    assert set(term(fgd_record())[0]) == {"loss_kd_fgd_fg", "loss_kd_fgd_bg", "loss_kd_fgd_att"}


def test_build_time_errors_name_the_key():
    cfg = cfg_with(FGD__RCNN__LEVELS=["p2", "p3"])
    with pytest.raises(TeacherError, match="Stride mismatch.*p3.*DISTILL.FGD.RCNN.LEVELS"):
        FocalGlobalKD(cfg, fgd_ctx(cfg, teacher_strides={"p3": 16}))
    with pytest.raises(TeacherError, match=r"\['p9'\].*DISTILL.FGD.RCNN.LEVELS"):
        fgd_term(FGD__RCNN__LEVELS=["p2", "p9"])
    with pytest.raises(DistillConfigError, match="Unknown DISTILL.FGD.BOX_SCALE 'padded'"):
        fgd_term(FGD__BOX_SCALE="padded")
    with pytest.raises(DistillConfigError, match="DISTILL.FGD.RCNN.TEMPERATURE = 0.0"):
        fgd_term(FGD__RCNN__TEMPERATURE=0.0)
    with pytest.raises(ValueError, match="Unknown DISTILL.FGD.ADAPTER"):
        fgd_term(FGD__ADAPTER="conv1x2")
    # a RetinaNet setting with a Faster R-CNN student is never read
    with pytest.raises(DistillConfigError, match=r"DISTILL.FGD.RETINANET.FG_WEIGHT set.*set DISTILL.FGD.RCNN.FG_WEIGHT"):
        fgd_term(FGD__RETINANET__FG_WEIGHT=1.0)
    assert fgd_term(FGD__RETINANET__FG_WEIGHT=1.0, UNUSED_KEYS="warn").weights["fg"] == pytest.approx(5e-5)
    cfg = cfg_with(TERMS=["FocalGlobalKD"], FGD__RCNN__LEVELS=["p2", "p3"], FGD__RCNN__BG_WEIGHT=-1.0)
    with pytest.raises(DistillConfigError, match="DISTILL.FGD.RCNN.BG_WEIGHT = -1.0 is negative"):
        build_terms(cfg, fgd_ctx(cfg))


def test_explain_shows_masks_and_teacher_attention():
    term = fgd_term().double()
    maps = term.explain(fgd_record())["maps"]
    assert set(maps) == {"fgd_fg_mask", "fgd_bg_mask", "fgd_teacher_attention"}
    att = maps["fgd_teacher_attention"]["p3"]
    assert att.shape == (3, 3, 5) and att.mean(dim=(1, 2)).tolist() == pytest.approx([1.0] * 3)


# ------------------------------------------------------------------ 1 vs 2 processes
def run_case(images):
    """{"losses", "inputs" (student-map gradients), "params" (term gradients)} on ``images`` of the fixed batch."""
    torch.manual_seed(0)
    term = fgd_term(FGD__WEIGHT=100.0).double()
    randomize_gc(term)
    rec = fgd_record(images)
    losses, _ = term(rec)
    sum(losses.values()).backward()
    return {"losses": {k: v.item() for k, v in losses.items()},
            "inputs": {k: v.grad.numpy().copy() for k, v in rec.features.items()},
            "params": {k: p.grad.numpy().copy() for k, p in term.named_parameters() if p.grad is not None}}


def _case_on_own_half(rank, world):
    return run_case([2 * rank, 2 * rank + 1])


def test_one_and_two_processes_give_the_same_losses_and_gradients():
    two = in_processes(_case_on_own_half)
    one = run_case([0, 1, 2, 3])
    assert set(one["losses"]) == {"loss_kd_fgd_fg", "loss_kd_fgd_bg", "loss_kd_fgd_att", "loss_kd_fgd_global"}
    for k, v in one["losses"].items():
        assert v > 0 and (two[0]["losses"][k] + two[1]["losses"][k]) / 2 == pytest.approx(v, rel=1e-9), k
        assert two[0]["losses"][k] != pytest.approx(two[1]["losses"][k], rel=1e-3)  # the halves differ
    for k, g in one["inputs"].items():  # each process's gradient on its own images, / W (DDP's average)
        for r in range(2):
            torch.testing.assert_close(torch.from_numpy(two[r]["inputs"][k]) / 2, torch.from_numpy(g[2 * r:2 * r + 2]))
    assert one["params"]
    for k, g in one["params"].items():
        torch.testing.assert_close(torch.from_numpy((two[0]["params"][k] + two[1]["params"][k]) / 2),
                                   torch.from_numpy(g))


# ------------------------------------------------------------------ real tiny models from the presets
@pytest.mark.parametrize("preset,teacher", [("fgd_R34_to_R18.yaml", "faster_rcnn_R34_teacher.yaml"),
                                            ("fgd_retinanet_R34_to_R18.yaml", "retinanet_R34_teacher.yaml")])
def test_preset_trains_one_step(preset, teacher, make_ckpt):
    """A random-weight teacher of the preset's architecture; one forward/backward of the real detectors."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from conftest import tiny_cfg
    from test_distill_rcnn import batches

    cfg = tiny_cfg(preset, "DISTILL.TEACHER.WEIGHTS", make_ckpt(teacher), "DISTILL.GUARD.ACTION", "off")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batches(cfg, 1)[0])
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_")}
    assert set(kd) == {"loss_kd_fgd_fg", "loss_kd_fgd_bg", "loss_kd_fgd_att", "loss_kd_fgd_global"}
    assert all(torch.isfinite(v) and v > 0 for v in kd.values()), kd
    sum(losses.values()).backward()
    term = model.kd_terms["FocalGlobalKD"]
    assert term.levels == list(cfg.DISTILL.FGD["RETINANET" if "retinanet" in preset else "RCNN"].LEVELS)
    assert term.gc_teacher[term.levels[0]].channel_add[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("name,node", [("fgd_R101_to_R50_FPN_1x.yaml", "RCNN"), ("fgd_retinanet_R101_to_R50_1x.yaml", "RETINANET")])
def test_coco_presets_build_with_the_reference_settings(name, node):
    """Built on CPU without weights (the teacher is not loaded): R50 <- R101, 256 channels on both sides."""
    import os
    from argparse import Namespace

    from detectron2.modeling import build_model

    from conftest import REPO
    from distill_d2.config import setup_cfg

    cfg = setup_cfg(Namespace(config_file=os.path.join(REPO, "configs", "COCO-Detection", name),
                              opts=["MODEL.DEVICE", "cpu"]))
    term = build_model(cfg).kd_terms["FocalGlobalKD"]
    ref = {"RCNN": (["p2", "p3", "p4", "p5"], 5e-5, 2.5e-5, 5e-5, 5e-7),
           "RETINANET": (["p3", "p4", "p5", "p6", "p7"], 1e-3, 5e-4, 5e-4, 5e-6)}[node]
    assert term.levels == ref[0] and list(term.weights.values()) == pytest.approx(list(ref[1:]))
    assert all(isinstance(a, torch.nn.Identity) for a in term.adapters.values())  # 256 -> 256: no align
    assert term.gc_student[ref[0][0]].conv_mask.in_channels == 256
