"""Installing as a user does: a fresh copy of the project, ``pip install`` with default settings
into a fresh virtual environment that already has torch, then ops run from outside the checkout.
Also the wheel ``pip wheel`` builds. Slow (a torch install and a C++ build): marked ``slow``."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# Runs in the fresh environment, from a folder outside the checkout: one op of three families on
# the C++ backend, forward and backward, against the reference backend.
USER_SCRIPT = r"""
import sys, torch, mmkernels
assert "site-packages" in mmkernels.__file__, mmkernels.__file__
from mmkernels import _ext

def run(backend):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(37, 24, generator=g, requires_grad=True)
    txt = torch.randn(37, 24, generator=g, requires_grad=True)
    q, k, v = (torch.randn(2, 3, 21, 16, generator=g, requires_grad=True) for _ in range(3))
    x = torch.randn(2, 19, 24, generator=g, requires_grad=True)
    w_in, w_out = torch.randn(2, 40, 24, generator=g) / 5, torch.randn(2, 24, 40, generator=g) / 5
    ids = torch.randint(0, 2, (2, 19), generator=g)
    mask = mmkernels.MultimodalMask.prefix_lm([5, 9], [21, 14], 21)
    with mmkernels.backend(backend):
        loss = mmkernels.contrastive_loss(img, txt, 10.0)
        att = mmkernels.multimodal_attention(q, k, v, mask)
        ffn = mmkernels.modality_ffn(x, ids, w_in, None, w_out, None, activation="gelu")
        (loss + att.square().mean() + ffn.square().mean()).backward()
    return [loss, att, ffn, img.grad, txt.grad, q.grad, k.grad, v.grad, x.grad]

ours, ref = run("cpu"), run("reference")
assert _ext.C is not None and "site-packages" not in _ext.C.__file__
for a, b in zip(ours, ref):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
print("ok", _ext.C.__file__)
"""


def _copy_of_project(dest: Path) -> Path:
    """The files a clone would have: tracked and untracked-but-not-ignored, nothing built."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode == 0 and listed.stdout:
        for rel in listed.stdout.decode().split("\0"):
            if rel and (ROOT / rel).is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    else:  # not a git checkout (an unpacked sdist): copy the tree without build products
        shutil.copytree(ROOT, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                                      "__pycache__", "bench/out", "*.so"))
    return dest


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _torch_version() -> str:
    """The running torch's distribution version (``2.13.0+cpu``; PyPI's CUDA builds say ``2.15.0``
    where ``torch.__version__`` says ``2.15.0+cu132``)."""
    return importlib.metadata.version("torch")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the install test runs on Linux")
def test_pip_install_into_fresh_env_with_torch_then_ops_run_outside_checkout(tmp_path):
    src = _copy_of_project(tmp_path / "src")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMKERNELS_", "TRITON_", "PYTHON"))}
    _run(pip + ["install", f"torch=={_torch_version()}"], env=env, timeout=1800)

    # default pip settings: build isolation on, no --no-deps, not editable
    _run(pip + ["install", str(src)], env=env, timeout=900)
    shown = _run([py, "-c", "import importlib.metadata as m; print(m.version('torch'));"
                  "print(sum(d.metadata['Name'].lower() == 'torch' for d in m.distributions()))"], env=env)
    assert shown.stdout.split() == [_torch_version(), "1"], "pip changed or duplicated torch"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_env = dict(env, MMKERNELS_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    first = _run([py, "-c", USER_SCRIPT], cwd=elsewhere, env=run_env, timeout=1800)
    assert first.stdout.startswith("ok")
    assert "compiling the C++ CPU kernels" in first.stderr and "kernels built in" in first.stderr

    # a second process loads the cached library: no compiler needed, nothing printed
    second = _run([py, "-c", USER_SCRIPT], cwd=elsewhere, env=dict(run_env, CXX=str(tmp_path / "no-cxx")),
                  timeout=600)
    assert second.stdout == first.stdout
    assert "compiling" not in second.stderr


def test_wheel_is_pure_python_with_sources_license_and_torch_range(tmp_path):
    src = _copy_of_project(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMKERNELS_", "TRITON_"))}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w",
          str(tmp_path / "wheels"), str(src)], env=env, timeout=900)
    (wheel,) = (tmp_path / "wheels").glob("mmkernels-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    sources = {Path(n).name for n in names if n.startswith("mmkernels/csrc/")}
    assert sources == {p.name for p in (ROOT / "mmkernels" / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    assert not [n for n in names if n.endswith((".so", ".pyd", ".o"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires == ["Requires-Dist: torch<2.16,>=2.11"], requires
    assert "License-Expression: BSD-3-Clause" in metadata
