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
