"""Plant small formula changes, one at a time, and check that the test suite notices each.

    .venv/bin/python .ci/plants.py            # all plants, prints a table (a few minutes)
    .venv/bin/python .ci/plants.py defeat     # only plants whose name contains "defeat"
    .venv/bin/python .ci/plants.py -masks.py  # all but the plants in files whose path contains "masks.py"

Each plant replaces one exact snippet in one file (the script fails loudly if
the snippet is gone, so the list cannot rot silently), runs the given test
files with ``pytest -x -q``, restores the file and records whether some test
failed ("caught") or all passed ("MISSED").
"""
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T_METHODS, T_LOSSES, T_MASKS, T_DEFEAT = "tests/test_methods.py", "tests/test_losses.py", "tests/test_masks.py", "tests/test_defeat.py"
T_TERMS, T_REG, T_HOOKS = "tests/test_terms.py", "tests/test_regression.py", "tests/test_hooks.py"
T_HGD, T_TBD, T_GUARD = "tests/test_hgd.py", "tests/test_tbd.py", "tests/test_guard.py"

# name, file, old snippet, new snippet, tests to run
PLANTS = [
    ("fgfi: no factor 2 in the denominator", "distill_d2/losses.py",
     "return batch_normalize(num, 2 * den, eps=eps)", "return batch_normalize(num, den, eps=eps)",
     [T_METHODS, T_LOSSES]),
    ("mean norm: divide by one image's elements", "distill_d2/losses.py",
     "means.append(batch_normalize(se, s.numel()))", "means.append(batch_normalize(se, s[0].numel()))", [T_METHODS, T_LOSSES]),
    ("KL: T^2 dropped", "distill_d2/losses.py",
     "(log_p_t - log_p_s)).sum(dim=1) * t * t", "(log_p_t - log_p_s)).sum(dim=1)", [T_METHODS, T_LOSSES]),
    ("KL: direction flipped (KL(p_s||p_t))", "distill_d2/losses.py",
     "return (log_p_t.exp() * (log_p_t - log_p_s))", "return (log_p_s.exp() * (log_p_s - log_p_t))",
     [T_METHODS, T_LOSSES]),
    ("cls KD: divide by gated count", "distill_d2/losses.py",
     "* keep).sum(), sel.sum(), min_den=1)", "* keep).sum(), keep.sum(), min_den=1)", [T_METHODS, T_LOSSES]),
    ("cls gate: student not detached -> >=", "distill_d2/losses.py",
     "    return p_t > p_s\n", "    return p_t >= p_s - 0.05\n", [T_METHODS, T_LOSSES]),
    ("box KD: gate compares >=", "distill_d2/losses.py",
     "return pos, pos & (iou_t > ref)", "return pos, pos & (iou_t >= ref - 0.05)", [T_METHODS, T_LOSSES]),
    ("box KD: num_rois normaliser counts positives", "distill_d2/losses.py",
     '{"num_rois": gt_classes.numel(),', '{"num_rois": num_pos,', [T_METHODS, T_LOSSES]),
    ("box KD: deltas of the next class", "distill_d2/losses.py",
     "idx = torch.where((classes >= 0) & (classes < k), classes, torch.zeros_like(classes))",
     "idx = torch.where((classes >= 0) & (classes < k - 1), classes + 1, torch.zeros_like(classes))",
     [T_METHODS, T_LOSSES]),
    ("box KD: smooth-L1 mean over coordinates", "distill_d2/losses.py",
     'per_roi = smooth_l1_loss(d_s, d_t, beta, reduction="none").sum(dim=1)',
     'per_roi = smooth_l1_loss(d_s, d_t, beta, reduction="none").mean(dim=1)', [T_METHODS, T_LOSSES]),
    ("sigmoid KD: ignored anchors counted", "distill_d2/methods/generic.py",
     "d.labels >= 0, d.num_pos", "d.labels >= -1, d.num_pos", [T_METHODS]),
    ("sigmoid KD: T^2 dropped", "distill_d2/losses.py",
     "return batch_normalize(kl.sum() * t * t, normalizer", "return batch_normalize(kl.sum(), normalizer", [T_METHODS]),
    ("dense box KD: anchors not repeated per image", "distill_d2/methods/tar.py",
     "anchors = d.anchors[None].expand(n, -1, -1).reshape(-1, 4)",
     "anchors = d.anchors.repeat_interleave(n, dim=0)", [T_METHODS]),
    ("decoupled features: C missing in the normaliser", "distill_d2/losses.py",
     "fg.append(batch_normalize((se * m).sum(), 2 * c * m.sum(), min_den=1))",
     "fg.append(batch_normalize((se * m).sum(), 2 * m.sum(), min_den=1))",
     [T_METHODS, T_DEFEAT]),
    ("decoupled features: bg uses the fg mask", "distill_d2/losses.py",
     "bg.append(batch_normalize((se * (1 - m)).sum()", "bg.append(batch_normalize((se * m).sum()", [T_METHODS, T_DEFEAT]),
    ("decoupled features: FEAT.WEIGHT ignored", "distill_d2/methods/defeat.py",
     '{"loss_kd_feat_fg": f.WEIGHT * f.FG_WEIGHT * fg', '{"loss_kd_feat_fg": f.FG_WEIGHT * fg', [T_METHODS]),
    ("DeFeat backbone mask on stride 16", "distill_d2/masks.py",
     "def defeat_backbone_masks(gt_boxes, level_shapes, base_stride=4):",
     "def defeat_backbone_masks(gt_boxes, level_shapes, base_stride=16):", [T_METHODS, T_DEFEAT]),
    ("DeFeat proposals: KL summed, not averaged", "distill_d2/losses.py",
     "batch_normalize((rows_fg * fg).sum(), fg.sum(), min_den=1)", "(rows_fg * fg).sum()", [T_LOSSES, T_METHODS]),
    ("DeFeat proposals: bg x7", "distill_d2/losses.py",
     "batch_normalize((rows_bg * (1 - fg)).sum(),", "batch_normalize(7 * (rows_bg * (1 - fg)).sum(),",
     [T_LOSSES, T_METHODS]),
    ("DeFeat proposals: bg temperature ignored", "distill_d2/losses.py",
     "rows_bg = rows_fg if bg_t == temperature else kl_rows(student_logits, teacher_logits, bg_t)",
     "rows_bg = rows_fg", [T_LOSSES, T_METHODS]),
    ("DeFeat proposals: student's sampler", "distill_d2/methods/defeat.py",
     "score_teacher_rois(rec, rec.teacher.roi_heads)", "score_teacher_rois(rec, rec.student.roi_heads)",
     [T_METHODS]),
    ("reverse: teacher's sampler", "distill_d2/methods/tar.py",
     "s_scores, t_scores, labels, _ = score_teacher_rois(rec, rec.student.roi_heads)",
     "s_scores, t_scores, labels, _ = score_teacher_rois(rec, rec.teacher.roi_heads)", [T_METHODS]),
    ("Gaussian: no factor 2 in the exponent", "distill_d2/masks.py",
     "(2 * (rho * size[:, None]) ** 2)", "((rho * size[:, None]) ** 2)", [T_MASKS, T_METHODS]),
    ("Gaussian: truncation half a cell too wide", "distill_d2/masks.py",
     "inside = (centres[None, :] >= b[:, lo : lo + 1])", "inside = (centres[None, :] >= b[:, lo : lo + 1] - 0.5)",
     [T_MASKS, T_METHODS]),
    ("box mask: centre cell rounded", "distill_d2/masks.py",
     "c = _clamp_xy_(((b[:, :2] + b[:, 2:]) / 2).floor(), width - 1, height - 1).long()",
     "c = _clamp_xy_(((b[:, :2] + b[:, 2:]) / 2).round(), width - 1, height - 1).long()", [T_MASKS]),
    ("DeFeat floor rule: negative coordinates not clamped", "distill_d2/masks.py",
     "    t.clamp_(min=0)\n", "", [T_DEFEAT, T_METHODS]),
    ("DeFeat level rule: +1 dropped", "distill_d2/masks.py",
     "s = torch.sqrt((w + 1) * (h + 1))", "s = torch.sqrt(w * h)", [T_DEFEAT, T_METHODS]),
    ("normalisers per process (no all-reduce)", "distill_d2/losses.py",
     "    if w > 1:\n        den = den.clone()\n        dist.all_reduce(den)\n", "    w = 1\n",
     ["tests/test_process_count.py"]),
    ("AMP: KD terms run under autocast", "distill_d2/modeling/distiller.py",
     "with torch.autocast(self.device.type, enabled=False):", "with torch.autocast(self.device.type, enabled=amp):",
     [T_TERMS]),
    ("torchvision conversion: stage index not shifted", "distill_d2/checkpoint.py",
     'nk = f"res{int(m[1]) + 1}.{m[2]}.{rest}"', 'nk = f"res{int(m[1])}.{m[2]}.{rest}"', ["tests/test_checkpoint.py"]),
    ("torchvision conversion: bn2 onto conv1's norm", "distill_d2/checkpoint.py",
     'rest = re.sub(r"^bn(\\d)\\.", r"conv\\1.norm.", m[3])',
     'rest = re.sub(r"^bn(\\d)\\.", r"conv1.norm.", m[3])', ["tests/test_checkpoint.py"]),
    ("teacher RGB/BGR flip removed", "distill_d2/modeling/distiller.py",
     'return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]', "return batched_inputs", [T_TERMS]),
    ("decay: linear from 1 to END_VALUE at half the schedule", "distill_d2/schedule.py",
     "lam = 1.0 - (1.0 - end) * frac", "lam = 1.0 - (1.0 - end) * min(1.0, 2 * frac)", [T_HOOKS]),
    # HGD (distill_d2/methods/hgd.py)
    ("hgd: no channel normalisation", "distill_d2/losses.py",
     "return batch_normalize(num, teacher.shape[1] * weights.sum(), eps=eps)",
     "return batch_normalize(num, weights.sum(), eps=eps)", [T_HGD]),
    ("hgd: background weight on the boxes", "distill_d2/methods/hgd.py",
     "h.FG_WEIGHT * fg + h.BG_WEIGHT * (1 - m)", "h.FG_WEIGHT * fg + h.BG_WEIGHT * m", [T_HGD]),
    ("hgd: area balance not rescaled", "distill_d2/masks.py",
     "return w * ((w > 0).sum() / w.sum().clamp(min=1e-12))", "return w", [T_HGD]),
    ("hgd: EMA momentum on the new value", "distill_d2/methods/hgd.py",
     "self.running.mul_(mom).add_(vals, alpha=1 - mom)", "self.running.mul_(1 - mom).add_(vals, alpha=mom)", [T_HGD]),
    ("hgd: macro scale inverted", "distill_d2/methods/hgd.py", "return m.mean() / m", "return m / m.mean()", [T_HGD]),
    ("hgd: stages summed, not averaged", "distill_d2/methods/hgd.py",
     "(scales * losses).mean()", "(scales * losses).sum()", [T_HGD]),
    ("hgd: fixed stage weights ignored", "distill_d2/methods/hgd.py",
     "            return self.stage_weights\n", "            return torch.ones_like(self.stage_weights)\n", [T_HGD]),
    # TBD (distill_d2/methods/tbd.py)
    ("tbd: HS power exponent of u", "distill_d2/losses.py",
     "return s.pow(alpha) * u.pow(1 - alpha)", "return s.pow(alpha) * u.pow(alpha)", [T_TBD]),
    ("tbd: HS agreement squared", "distill_d2/losses.py",
     "return 1 - (s - u).abs()", "return 1 - (s - u) ** 2", [T_TBD]),
    ("tbd: HD normalised by positive count", "distill_d2/methods/tbd.py",
     "batch_normalize((w * kl).sum(), hs.sum(), min_den=1)", "batch_normalize((w * kl).sum(), pos.sum(), min_den=1)",
     [T_TBD]),
    ("tbd: HD weighs ignored anchors", "distill_d2/methods/tbd.py",
     "torch.where(d.labels >= 0, torch.full_like(hs, t.HD_BG_WEIGHT)",
     "torch.where(d.labels >= -1, torch.full_like(hs, t.HD_BG_WEIGHT)", [T_TBD]),
    ("tbd: HS from the student's scores", "distill_d2/methods/tbd.py",
     "s = torch.softmax(r.t_logits, dim=1).gather(1, r.gt_classes[:, None])[:, 0]",
     "s = torch.softmax(r.logits, dim=1).gather(1, r.gt_classes[:, None])[:, 0]", [T_TBD]),
    ("tbd: HS target not renormalised", "distill_d2/losses.py",
     "scale = ((1 - value) / (1 - p_gt).clamp(min=1e-6))[:, None]", "scale = (1 - value)[:, None]", [T_TBD]),
    ("tbd: sigmoid KL without the teacher entropy", "distill_d2/losses.py",
     'p, reduction="none") - ent) * temperature ** 2', 'p, reduction="none")) * temperature ** 2', [T_TBD]),
    ("tbd: TFD confidence threshold dropped", "distill_d2/methods/tbd.py",
     "conf = torch.where(conf >= self.t.CONF_THRESH, conf, torch.zeros_like(conf))", "conf = conf", [T_TBD]),
    ("tbd: TFD regression mask on unmatched anchors", "distill_d2/methods/tbd.py",
     "iou = torch.where(pos, torch.nan_to_num(u, nan=0.0), torch.zeros_like(u))",
     "iou = torch.nan_to_num(u, nan=0.0)", [T_TBD]),
    ("tbd: per-location mean over anchors", "distill_d2/methods/tbd.py",
     ".reshape(values.shape[0], h, w, a).amax(dim=3)", ".reshape(values.shape[0], h, w, a).mean(dim=3)", [T_TBD]),
    ("tbd: RPN deltas with H and W swapped", "distill_d2/methods/tbd.py",
     "x.view(n, -1, 4, *x.shape[-2:]).permute(0, 3, 4, 1, 2)", "x.view(n, -1, 4, *x.shape[-2:]).permute(0, 4, 3, 1, 2)",
     [T_TBD]),
    ("tbd: RPN ignored anchors count as matched", "distill_d2/methods/tbd.py",
     "iou[i] = torch.where(labels == 1,", "iou[i] = torch.where(labels >= 0,", [T_TBD]),
    ("tbd: TFD mean normalisation", "distill_d2/methods/tbd.py",
     'masked_feature_loss(adapted, target, self.masks(rec), "fgfi")',
     'masked_feature_loss(adapted, target, self.masks(rec), "mean")',
     [T_TBD]),
    ("guard: KD growth judged against its early median only (no floor)", "distill_d2/hooks.py",
     'ref = max(early, self.kd["growth_floor"] * self._first)', "ref = early", [T_GUARD, T_HOOKS]),
    ("guard: KD values signed (no abs)", "distill_d2/hooks.py",
     "kd = {k: abs(float(v)) / kd_weight", "kd = {k: float(v) / kd_weight", [T_GUARD, T_HOOKS]),
    ("guard: KD ratio over det + 1", "distill_d2/hooks.py",
     "ratio = now / det_now if det_now > 0 else 0.0", "ratio = now / (det_now + 1.0) if det_now > 0 else 0.0",
     [T_GUARD, T_HOOKS]),
]


def run(tests):
    env = dict(os.environ, DETECTRON2_DATASETS=os.environ.get("DETECTRON2_DATASETS", "/tmp/d2data_plants"))
    p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly"] + tests, cwd=REPO,
                       capture_output=True, text=True, env=env)
    return p.returncode, (p.stdout.strip().splitlines() or [""])[-1]


def main(argv):
    inc = [a for a in argv if not a.startswith("-")]
    exc = [a[1:] for a in argv if a.startswith("-")]
    sel = [p for p in PLANTS if (not inc or any(a in p[0] for a in inc)) and not any(a in p[1] for a in exc)]
    rows = []
    for name, path, old, new, tests in sel:
        full = os.path.join(REPO, path)
        src = open(full).read()
        if src.count(old) != 1:
            raise SystemExit(f"plant '{name}': snippet found {src.count(old)} times in {path}; update .ci/plants.py")
        t0 = time.time()
        try:
            open(full, "w").write(src.replace(old, new))
            rc, last = run(tests)
        finally:
            open(full, "w").write(src)
        rows.append((name, path, "caught" if rc != 0 else "MISSED", last, time.time() - t0))
        print(f"[plants] {rows[-1][2]:6s} {name} ({last}, {rows[-1][4]:.0f} s)", flush=True)
    print("\n| plant | file | result |\n|---|---|---|")
    for name, path, res, _, _ in rows:
        print(f"| {name} | `{path}` | {res} |")
    missed = [r for r in rows if r[2] == "MISSED"]
    print(f"\n{len(rows) - len(missed)}/{len(rows)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
