#!/usr/bin/env bash
# Download the benchmark peers' wheels for the lent GPU machine into .whl/ (repo root).
#
# The GPU image (Python 3.12, x86-64, torch 2.11, triton 3.6) cannot reach any
# package registry and has neither open_clip nor inf-cl. This fetches, for
# Python 3.12 / manylinux x86-64, with no dependency resolution:
#   open_clip_torch  the OpenCLIP ClipLoss peer; `import open_clip` also needs
#                    ftfy and wcwidth, which the image lacks (it has torch,
#                    torchvision, timm, regex, tqdm, huggingface_hub, safetensors)
#   inf-cl           the Inf-CL peer (needs numpy and triton: both in the image)
#
# Then carry them: device run(command="bash bench/gpu_check.sh", carry=[".whl"]);
# gpu_check.sh installs them with pip --no-index into /tmp/site.
# .whl/ is git-ignored; delete it when done: rm -rf .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PKGS=(
  "open-clip-torch==${OPEN_CLIP_VERSION:-3.3.0}"
  "ftfy==${FTFY_VERSION:-6.3.1}"
  "wcwidth==${WCWIDTH_VERSION:-0.9.4}"
  "inf-cl==${INF_CL_VERSION:-1.2.1}"
)
mkdir -p .whl
git check-ignore -q .whl/probe.whl 2>/dev/null || echo "warning: .whl/ is not git-ignored here" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PKGS[@]}"
# one version of each: two stop the whole install on the GPU machine
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "error: several versions of: $dups (remove the extra wheels from .whl/)" >&2
  exit 1
fi
ls -l .whl/*.whl
du -sh .whl
