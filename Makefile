# distill_d2: the two commands a user needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.distill_d2-setup

.PHONY: setup demo test bench clean-venv

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

# Multi-seed benchmark behind docs/RESULTS.md (long: about 3.5 hours on 2 CPU cores;
# finished runs whose merged config is unchanged are reused, so it can be resumed).
bench: setup
	$(PY) -m distill_d2.demo --out output/bench --methods TAR DeFeat Hinton FitNet --seeds 0 1 --reuse-runs
	$(PY) -m distill_d2.demo --out output/bench --suite retinanet --methods TAR DeFeat --seeds 0 1 --reuse-runs

clean-venv:
	rm -rf $(VENV)
