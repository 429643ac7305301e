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
# Found, not imported (importing torch twice would cost seconds of the budget).
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'timm', 'h5py', 'click', 'PIL')))"; then
    echo "gpu_check: installing the project (pip install -e .)" >&2
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e .
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
