#!/usr/bin/env bash
# The wheels `make gpu-check` needs on the device machine (its python3 is 3.12 with torch, torchvision,
# numpy, opencv, matplotlib, pyyaml, tabulate, tqdm, tensorboard; no network there): downloaded or built
# here into .whl/ (git-ignored; the device tool carries it with `carry: [".whl"]`). About 8 MB.
# Install them there with .ci/gpu_install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PIP="$PY -m pip --disable-pip-version-check"
mkdir -p .whl
# binary wheels for CPython 3.12 on x86-64 Linux
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pycocotools==2.0.11 omegaconf==2.3.1 hydra-core==1.3.8 yacs==0.1.8 termcolor==3.3.0
# detectron2's registry wheel is tagged cp310-none-any (pure Python here; see .ci/setup_env.sh)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp -d .whl sal-detectron2==0.7.2
# published as source only: pure-Python wheels built here
$PIP wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 antlr4-python3-runtime==4.9.3
ls -la .whl
du -sh .whl
