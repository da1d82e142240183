#!/usr/bin/env bash
# Install mmkernels for development into the active Python environment.
#
#   bash scripts/install.sh test    # + test dependencies
#   bash scripts/install.sh bench   # + benchmark dependencies
#
# torch is installed only when none is importable (pinned to $MMKERNELS_TORCH,
# default 2.13.0), so an existing torch is never replaced by a second one.
# The C++ CPU kernels are then compiled against that torch
# (--no-build-isolation). Triton is installed only when none is importable:
# 3.6.0 by default ($MMKERNELS_TRITON), the version of the project's GPU image,
# with numpy < 2.3, which its interpreter needs.
set -euo pipefail
extra="${1:-test}"
case "$extra" in test|bench) ;; *) echo "usage: $0 test|bench" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

pip_install --upgrade "pip>=23" "setuptools>=64" wheel ninja
if ! "$py" -c "import torch" 2>/dev/null; then
    pip_install "torch==${MMKERNELS_TORCH:-2.13.0}"
fi
if ! "$py" -c "import triton" 2>/dev/null; then
    pip_install "triton==${MMKERNELS_TRITON:-3.6.0}" "numpy<2.3"
fi
pip_install --no-build-isolation -e ".[$extra]"
"$py" -m mmkernels.env
