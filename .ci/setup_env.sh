#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv by default) with everything
# distill_d2 needs. Idempotent: packages already present are kept.
#   VENV=path   venv location (default .venv)
#   PYTHON=...  interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# Versions measured to work on a CPU-only machine (see README, "Install"):
# PyPI torchvision is built against the CUDA torch, which also runs on CPU.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
# The only registry distribution of detectron2 (upstream a59f0563 + 2 fixes).
D2_SPEC=${D2_SPEC:-"sal-detectron2==0.7.2"}

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

if $PY -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] keeping $($PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
else
    echo "[setup] installing $TORCH_SPEC (several GB with the CUDA runtime wheels)"
    free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "${free_gb:-99}" -lt 8 ]; then
        echo "[setup] WARNING: only ${free_gb} GB free for $VENV; torch with its CUDA wheels takes ~6 GB" \
             "and the tests ~1 GB more: free some space first if pip stops with 'No space left on device'" >&2
    fi
    $PIP install $TORCH_SPEC
fi

# numpy<2 and setuptools<81 first, so detectron2's imports below work.
$PIP install -q -r requirements.txt

if $PY -c "import detectron2" 2>/dev/null; then
    echo "[setup] keeping detectron2 $($PY -c 'import detectron2; print(detectron2.__version__)')"
else
    # The wheel is tagged cp310-none-any; its Python code runs on 3.11/3.12,
    # so install it with pip's cross-version --target mode (no deps: they are
    # in requirements.txt). Its compiled _C extension never loads here and
    # distill_d2 does not need it.
    SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "[setup] installing $D2_SPEC into $SP"
    $PIP install -q --no-deps --only-binary=:all: --python-version 3.10 \
        --implementation cp --target "$SP" --upgrade $D2_SPEC
fi

# Checked from outside the repo: from its root "import distill_d2" always works.
PY_ABS="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
if ! (cd / && "$PY_ABS" -c "import distill_d2" 2>/dev/null); then
    $PIP install -q --no-deps --no-build-isolation -e .
fi
$PY -c "import torch, torchvision, detectron2, fvcore, pycocotools, cv2, distill_d2; print('[setup] ok: torch', torch.__version__, '| torchvision', torchvision.__version__, '| detectron2', detectron2.__version__, '| cuda', torch.cuda.is_available())"
echo "[setup] done in $(( $(date +%s) - t0 )) s"
