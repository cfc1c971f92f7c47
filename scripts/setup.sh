#!/usr/bin/env bash
# Installs everything prance needs, idempotently: the Debian Fashion-MNIST package (where
# apt exists), a virtual environment in .venv, and the package with its test extra.
# Usage: bash scripts/setup.sh    (then use .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    echo "setup: installing Debian package dataset-fashion-mnist" >&2
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
        echo "setup: could not install dataset-fashion-mnist; prance will try torchvision's download instead" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
STAMP=.venv/.prance-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "setup: installing prance and its dependencies into .venv (torch, timm, ray, mlflow, ...; a few minutes the first time)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    touch "$STAMP"
fi
