#!/usr/bin/env bash
# Train-step cost ratios of this checkout next to another revision (default: HEAD~1), side by side.
#   bash .ci/speed_vs.sh REV [ITERS] [ROUNDS]      (make speed-vs REV=<commit>)
# Each round runs `python -m distill_d2.speed --random-teacher --teacher-forward` on the Faster R-CNN and
# the RetinaNet presets in REV's tree, then in this tree (A B A B ...); each run reports every config's step
# over (student step + teacher forward) measured within that run, so machine drift cancels in the ratios.
# Output: one table per run under output/speed_vs/ (REV tree: a git worktree under output/speed_vs/rev).
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-HEAD~1}; ITERS=${2:-10}; ROUNDS=${3:-2}
PY=${PY:-$PWD/.venv/bin/python}
OUT=output/speed_vs; mkdir -p "$OUT"
rm -rf "$OUT/rev"; git worktree prune; git worktree add --detach "$OUT/rev" "$REV" >/dev/null
S=configs/synthetic
FRCNN="$S/faster_rcnn_R18_student.yaml $S/tar_R34_to_R18.yaml $S/defeat_R34_to_R18.yaml $S/hgd_R34_to_R18.yaml $S/tbd_R34_to_R18.yaml"
RETINA="$S/retinanet_R18_student.yaml $S/tar_retinanet_R34_to_R18.yaml $S/hgd_retinanet_R34_to_R18.yaml $S/tbd_retinanet_R34_to_R18.yaml"
for r in $(seq 1 "$ROUNDS"); do
  for tree in rev this; do
    dir=$([ $tree = rev ] && echo "$OUT/rev" || echo .)
    for suite in frcnn retina; do
      cfgs=$([ $suite = frcnn ] && echo "$FRCNN" || echo "$RETINA")
      echo "== round $r, $tree ($( [ $tree = rev ] && echo "$REV" || git rev-parse --short HEAD)+worktree), $suite" | tee -a "$OUT/log.txt"
      (cd "$dir" && "$PY" -m distill_d2.speed --random-teacher --teacher-forward --iters "$ITERS" --configs $cfgs 2>/dev/null) \
        | grep '^|\|interleaved' | tee "$OUT/round${r}_${tree}_${suite}.md" | tee -a "$OUT/log.txt"
    done
  done
done
git worktree remove --force "$OUT/rev"
