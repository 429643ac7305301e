#!/usr/bin/env bash
# One prepared GPU measurement for issue 13 (see benchmarks/gpu_check.py for what it measures).
#
#   bash benchmarks/gpu_check.sh                        # on a GPU machine: under 8 minutes
#   bash benchmarks/gpu_check.sh --device cpu --quick   # every code path on CPU, under a minute (CI)
#
# It installs nothing but the project itself, and only when embedpipe is not importable yet:
# torch (a CUDA build on a GPU machine) and the rest are whatever that install already brings.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# timm is imported through embedpipe's shim: a torchvision built for another torch still imports.
if ! "$PYTHON" -c "from embedpipe._compat import ensure_torchvision_importable as e; e(); import timm, h5py, click" 2>/dev/null; then
    echo "gpu_check: installing the project (pip install -e .)" >&2
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e .
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
