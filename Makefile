# distill_d2: the two commands a user needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.distill_d2-setup

.PHONY: setup demo test bench bench-bccd clean-venv speed-vs

# Idempotent: re-runs only when the venv is missing or the install inputs changed.
setup: $(STAMP)
$(STAMP): .ci/setup_env.sh requirements.txt setup.py
	VENV=$(VENV) bash .ci/setup_env.sh
	touch $(STAMP)

# Main job: synthetic data -> R34 teacher (cached) -> R18 baseline + TAR student -> table + PNG (output/demo).
demo: setup
	$(PY) -m distill_d2.demo --out output/demo

# Unit + integration tests (real tiny detectron2 models, CPU).
test: setup
	$(PY) -m pytest -q tests

# Multi-seed synthetic benchmark behind docs/RESULTS.md (long: about 6 hours on 2 CPU cores,
# about 15 minutes on one GPU machine with JOBS=6; finished runs whose merged config is
# unchanged are reused and interrupted runs resume, so it can be run in pieces).
JOBS ?= 1
METHODS ?= TAR DeFeat Hinton FitNet HGD TBD
# every method on main (the BCCD / NEU-DET benchmarks; CWD_logit is RetinaNet's dense-logit CWD)
ALL_METHODS_FRCNN = $(METHODS) PKD CWD MGD FGD CrossKD
ALL_METHODS_RETINANET = $(METHODS) PKD CWD CWD_logit MGD FGD CrossKD
bench: setup
	$(PY) -m distill_d2.demo --out output/bench --methods $(METHODS) --seeds 0 1 --reuse-runs --jobs $(JOBS)
	$(PY) -m distill_d2.demo --out output/bench --suite retinanet --methods $(METHODS) --seeds 0 1 --reuse-runs --jobs $(JOBS)

# The real-data benchmark (BCCD, docs/RESULTS.md): Pascal-VOC folder given by DATA. Sized for
# 2 CPU cores (about 3 hours with JOBS=2 for 3 seeds: students two at a time, one thread each);
# finished runs are reused and interrupted ones resume, so it can be run in pieces
# (or one stage at a time: python -m distill_d2.demo ... --stage teacher|students|report).
DATA ?= ../shared/data/BCCD
SEEDS ?= 0 1 2
BCCD_OPTS = INPUT.MIN_SIZE_TRAIN "(256,)" INPUT.MAX_SIZE_TRAIN 256 INPUT.MIN_SIZE_TEST 256 INPUT.MAX_SIZE_TEST 256 \
	SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.01
bench-bccd: setup
	for s in frcnn retinanet; do $(PY) -m distill_d2.demo --data $(DATA) --data-name bccd --train-split trainval \
	  --eval-split test --suite $$s --methods $(METHODS) --seeds $(SEEDS) --jobs $(JOBS) --teacher-iters 1000 \
	  --student-iters 300 --reuse-runs --out output/bccd --opts $(BCCD_OPTS) || exit 1; done

clean-venv:
	rm -rf $(VENV)

# Train-step cost ratios of this checkout next to revision REV (A B A B, output/speed_vs/).
REV ?= HEAD~1
speed-vs: setup
	bash .ci/speed_vs.sh $(REV)

.PHONY: bench-neu bench-balance preflight-neu gpu-check

# The NEU-DET benchmark (docs/RESULTS.md): ../shared/data/NEU-DET (1,800 grayscale 200x200 steel-surface
# images, 6 classes, VOC layout; fixed splits train 1,200 + val 240 = trainval, test 360). Every method on
# main, both detectors, 3 seeds, the full protocol: same-iteration, same-compute and 3x baselines, the two
# best methods per detector on BCCD (docs/RESULTS.md, chosen before any NEU-DET number: Faster R-CNN TBD,
# DeFeat; RetinaNet Hinton, TAR) also distilled at 3x, 95 % paired-bootstrap intervals over the 360 test
# images, and the teacher's margin over the baselines on val (held out: training is on train; the only
# split any setting may be chosen on). Resumable and run-by-run cached like bench-bccd.
# Sizing, from cost alone before any NEU-DET result (2026-12-02, this 2-core machine, quiet, one torch
# thread per run as with --jobs 2; python -m distill_d2.speed --random-teacher, batch 4, 10 steps):
#   200 px (native): R18 Faster R-CNN step 0.91 s (TBD 1.39x), R18 RetinaNet 0.47 s (Hinton 1.61x);
#   160 px:          R18 Faster R-CNN step 0.62 s (TBD 1.32x), R18 RetinaNet 0.27 s (Hinton 1.51x);
#   step-cost ratios of the six methods at 200 px: Faster R-CNN 1.21-1.41 (sum 8.0), RetinaNet 1.41-1.58 (sum 8.9).
# Per seed, in 1x baseline-student schedules at 160 px (the ratios there ~0.95x those at 200 px): baseline 1
# + same-compute 1.3-1.5 + 3x 3 + six methods 7.6-8.4 + two 3x methods 8.0-8.7 = ~21 (Faster R-CNN) and ~23
# (RetinaNet); x 3 seeds = 63 + 68 schedules, two runs at a time. At 160 px and 300 iterations (one epoch of
# train): (63 x 300 x 0.62 + 68 x 300 x 0.27) / 2 = 2.4 h, plus the 66 student runs' start-ups and test
# evaluations (~40 s / ~28 s each, measured at 200 px, 2 at a time: 0.3 h), the two teachers (1,500
# iterations alone, two threads: 0.65 / 0.31 s measured at 160 px: 0.4 h), the step-cost measurements, val
# evaluations and bootstrap reports (~0.35 h): about 3.5 h, ~3.9 h with two runs contending for memory. At 200 px
# the same schedule is ~5 h, so: 160 px (boxes: median 54 px, 5th percentile 21 px, inside the 16-256 px
# anchors), students 300 iterations (3x: 900), teacher 1,500 (5 epochs, 1.7x the 3x baseline's, so that it
# can beat the 3x baseline on val; if it does not by >= 3 AP, raise NEU_TEACHER_ITERS, judging on val only).
NEU ?= ../shared/data/NEU-DET
NEU_METHODS_FRCNN ?= $(ALL_METHODS_FRCNN)
NEU_METHODS_RETINANET ?= $(ALL_METHODS_RETINANET)
NEU_LONG_FRCNN ?= TBD DeFeat
NEU_LONG_RETINANET ?= Hinton TAR
NEU_SIZE ?= 160
NEU_STUDENT_ITERS ?= 300
NEU_TEACHER_ITERS ?= 1500
NEU_JOBS ?= 2
NEU_OPTS = INPUT.MIN_SIZE_TRAIN "($(NEU_SIZE),)" INPUT.MAX_SIZE_TRAIN $(NEU_SIZE) INPUT.MIN_SIZE_TEST $(NEU_SIZE) \
	INPUT.MAX_SIZE_TEST $(NEU_SIZE) SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.01
NEU_ARGS = --data $(NEU) --data-name neu --train-split train --eval-split test --heldout-split val \
	--baselines iter compute long --seeds $(SEEDS) --jobs $(NEU_JOBS) \
	--teacher-iters $(NEU_TEACHER_ITERS) --student-iters $(NEU_STUDENT_ITERS) --reuse-runs --out output/neu
bench-neu: setup
	$(PY) -m distill_d2.demo --suite retinanet $(NEU_ARGS) --methods $(NEU_METHODS_RETINANET) \
	  --long-methods $(NEU_LONG_RETINANET) --opts $(NEU_OPTS)
	$(PY) -m distill_d2.demo --suite frcnn $(NEU_ARGS) --methods $(NEU_METHODS_FRCNN) \
	  --long-methods $(NEU_LONG_FRCNN) --opts $(NEU_OPTS)

# Pre-flight report of every preset of a suite on NEU-DET (val), with the bench-neu teacher
# (output/neu/teacher_<suite>/model_final.pth; run bench-neu's teacher stage first): each term's gradient
# against the detection losses' at the start of a real-data run, and the factors DISTILL.BALANCE would choose.
# Into output/preflight_neu/<suite>_<method>/, then one table (output/preflight_neu/summary_<suite>.md).
PF_SUITE ?= retinanet
PF_METHODS ?= $(if $(filter frcnn,$(PF_SUITE)),$(ALL_METHODS_FRCNN),$(ALL_METHODS_RETINANET))
PF_PATTERN = $(if $(filter frcnn,$(PF_SUITE)),%s_R34_to_R18.yaml,%s_retinanet_R34_to_R18.yaml)
PF_OPTS = $(NEU_OPTS) DATASETS.VOC "[['neu', '$(abspath $(NEU))']]" DATASETS.TRAIN "('neu_train',)" \
	DATASETS.TEST "('neu_val',)" MODEL.ROI_HEADS.NUM_CLASSES 6 MODEL.RETINANET.NUM_CLASSES 6 \
	DISTILL.TEACHER.WEIGHTS output/neu/teacher_$(PF_SUITE)/model_final.pth
preflight-neu: setup
	@mkdir -p output/preflight_neu; for m in $(PF_METHODS); do f=configs/synthetic/$$(printf '$(PF_PATTERN)' $$(echo $$m | tr A-Z a-z)); \
	  echo "[preflight-neu] $$m ($$f)"; \
	  $(PY) -m distill_d2.preflight --config-file $$f --out output/preflight_neu/$(PF_SUITE)_$$m --steps 6 \
	    --val-images 16 --time-steps 3 $(PF_OPTS) > output/preflight_neu/$(PF_SUITE)_$$m.log 2>&1 \
	    || echo "  exit $$? (red flag or error: see output/preflight_neu/$(PF_SUITE)_$$m/preflight.md)"; done
	$(PY) -m distill_d2.preflight summary $(foreach m,$(PF_METHODS),output/preflight_neu/$(PF_SUITE)_$(m)) \
	  | tee output/preflight_neu/summary_$(PF_SUITE).md

# DISTILL.BALANCE against the presets' weights (issue 20; docs/RESULTS.md): BCCD, both detectors, every
# method M as its preset and as M:balance (the preset + calibrate-then-freeze balancing, its window moved
# forward to fit the 300-iteration students), 3 seeds, the same protocol and folder as bench-bccd (the
# preset runs are shared with it). The report adds each variant's gain over its method, with intervals.
# About 2 x the cost of bench-bccd with every method (~7 h on 2 CPU cores; resumable).
BALANCE_VARIANT = balance DISTILL.BALANCE.ENABLED True DISTILL.BALANCE.START 20 DISTILL.BALANCE.WINDOW 40 \
	DISTILL.BALANCE.EVERY 4
BALANCE_ARGS = --data $(DATA) --data-name bccd --train-split trainval --eval-split test --variant $(BALANCE_VARIANT) \
	--seeds $(SEEDS) --jobs $(JOBS) --teacher-iters 1000 --student-iters 300 --reuse-runs --out output/bccd
bench-balance: setup
	$(PY) -m distill_d2.demo --suite frcnn $(BALANCE_ARGS) --methods $(foreach m,$(ALL_METHODS_FRCNN),$(m) $(m):balance) \
	  --opts $(BCCD_OPTS)
	$(PY) -m distill_d2.demo --suite retinanet $(BALANCE_ARGS) \
	  --methods $(foreach m,$(ALL_METHODS_RETINANET),$(m) $(m):balance) --opts $(BCCD_OPTS)

# GPU check (distill_d2/gpu_check.py, about 6 minutes on one H100/H200): every synthetic preset 20 iterations
# on CUDA under SOLVER.AMP, step-cost ratios on CUDA, peak GPU memory, into GPU_OUT. Only where a GPU is lent;
# elsewhere it says so and does nothing. No `setup` here: the device machine has no network (wheels from
# .ci/gpu_wheels.sh, installed there by .ci/gpu_install.sh; its python3 holds torch).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_OUT ?= output/gpu_check
gpu-check:
	$(GPU_PY) -m distill_d2.gpu_check --out $(GPU_OUT)
