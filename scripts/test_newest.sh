#!/usr/bin/env bash
# The test suite on the newest releases the package index serves: torch 2.15.x (the PyPI
# build, run on the CPU) and Triton 3.9.x with the newest numpy, in a virtual environment of
# its own (.venv-newest, removed afterwards unless KEEP_VENV=1). Extra pytest arguments pass
# through, e.g. `bash scripts/test_newest.sh -m quick`.
#
# PIP_CONSTRAINT=/dev/null: a machine-wide pip constraint may cap torch at an older release.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-newest
[ "${KEEP_VENV:-0}" = 1 ] || trap 'rm -rf "$venv"' EXIT
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$venv"
py="$venv/bin/python"
echo "== test_newest.sh: torch 2.15.x, triton 3.9.x, newest numpy"
"$py" -m pip install --progress-bar off -q --upgrade "pip>=23" "setuptools>=77"
"$py" -m pip install --progress-bar off "torch>=2.15,<2.16" "triton>=3.9,<3.10" "numpy>=2.3"
PYTHON="$py" bash scripts/install.sh test
"$py" -m pytest "$@"
