#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.py needs on a GPU machine that has torch, numpy, pandas, scipy, safetensors,
# onnx and nvidia-ml-py but no network and none of these: Optuna and its storage stack, and torchao (one of the
# engine's INT8 backends). Ray is left out on purpose: its wheel is ~80 MB, and the check runs the local executor.
#
#   bash benchmarks/gpu_wheels.sh [DIR]          # default DIR: .whl (ignored by git)
# There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
mkdir -p "$dest"
# Pinned: what the project's own install resolves to today (pyproject.toml), so the check runs the code CI tests.
# --no-deps: each dependency is named here. SQLAlchemy 2.1 needs greenlet only for asyncio, which dsnas does not use.
wheels=(
    optuna==5.1.0 alembic==1.20.1 colorlog==6.12.0 mako==1.4.3 sqlalchemy==2.1.9
    # torchao's pure-Python INT8 path (torch._int_mm) runs on any torch >= 2.7; its C++ extensions are built for one
    # torch release and fail to load on another, which torchao reports and works around.
    torchao==0.18.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "${wheels[@]}"
du -sh "$dest"
ls "$dest"
