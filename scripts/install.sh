#!/usr/bin/env bash
# Install this checkout for development into the active Python environment.
#
#   bash scripts/install.sh test    # + test dependencies
#   bash scripts/install.sh bench   # + benchmark dependencies
#
# torch is installed only when none is importable (pinned to $MMKERNELS_TORCH, default
# 2.13.0), so an existing torch is never replaced by a second one; likewise Triton
# (3.6.0 by default, $MMKERNELS_TRITON, the GPU image's version, with numpy < 2.3: the pinned
# toolchain of CI). The checkout is then installed editable with pip's default
# settings, and the C++ CPU kernels are compiled for that torch (progress printed), so the
# first test does not pay for the build.
set -euo pipefail
extra="${1:-test}"
case "$extra" in test|bench) ;; *) echo "usage: $0 test|bench" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
pip_install() { "$py" -m pip install --disable-pip-version-check --progress-bar off "$@"; }

step() { echo "== install.sh: $*"; }
step "pip, setuptools"
pip_install -q --upgrade "pip>=23" "setuptools>=77"
if ! "$py" -c "import torch" 2>/dev/null; then
    step "torch ${MMKERNELS_TORCH:-2.13.0} (none was importable)"
    pip_install "torch==${MMKERNELS_TORCH:-2.13.0}"
fi
if ! "$py" -c "import triton" 2>/dev/null; then
    step "triton ${MMKERNELS_TRITON:-3.6.0} (none was importable)"
    pip_install "triton==${MMKERNELS_TRITON:-3.6.0}" "numpy<2.3"
fi
step "mmkernels[$extra] (editable)"
pip_install -e ".[$extra]"
step "open_clip_torch 3.3.0 without its dependencies (the drop-ins' peer: only its loss.py is loaded)"
pip_install --no-deps "open_clip_torch==3.3.0"
step "the C++ CPU kernels (python -m mmkernels.build)"
"$py" -m mmkernels.build
"$py" -m mmkernels.env
