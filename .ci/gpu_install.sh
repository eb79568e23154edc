#!/usr/bin/env bash
# On the device machine (no network), from the repo root: install the wheels of .ci/gpu_wheels.sh
# (carried in .whl/) into /tmp/site (SITE=... for another folder). Then: export PYTHONPATH=/tmp/site:$PWD (the repo root holds distill_d2).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip --disable-pip-version-check install -q --no-index --no-deps --no-compile --no-cache-dir --target ${SITE:-/tmp/site}"
$PIP $(ls .whl/*.whl | grep -v sal_detectron2)
# (tagged cp310-none-any: pip's cross-version --target mode, as .ci/setup_env.sh does)
$PIP --upgrade --python-version 3.10 --implementation cp --only-binary=:all: .whl/sal_detectron2-*.whl
echo "[gpu-install] ok: $(ls ${SITE:-/tmp/site} | grep -c dist-info) packages in ${SITE:-/tmp/site}"
