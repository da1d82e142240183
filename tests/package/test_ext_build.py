"""The C++ CPU kernels are compiled at first use for the running torch and cached per torch
version, Python and flags (mmkernels/_ext.py); a build that cannot happen is loud."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmkernels import _ext


def test_kernels_load_and_stamp_says_what_they_were_built_from():
    assert _ext.available(), _ext.LOAD_ERROR
    directory = _ext.build_dir()
    info = json.loads((directory / _ext.STAMP).read_text())
    assert info["torch"] == torch.__version__
    assert info["python"] == sys.implementation.cache_tag
    assert info["sources"] == _ext.sources_digest()
    assert os.path.samefile(sys.modules["mmkernels._C"].__file__, directory / _ext.LIBRARY)


def test_build_directory_is_per_torch_version_and_build_kind(monkeypatch):
    here = _ext.build_dir()
    assert here == _ext.build_dir() and here.parent == _ext.cache_root() / "cpu-kernels"
    assert torch.__version__ in here.name
    assert _ext.build_dir(debug=True) != here
    monkeypatch.setattr(torch, "__version__", "2.99.0+other")
    other = _ext.build_dir()
    assert other != here and "2.99.0+other" in other.name


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path / "c"))
    assert _ext.cache_root() == tmp_path / "c"
    monkeypatch.delenv("MMKERNELS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert _ext.cache_root() == tmp_path / "x" / "mmkernels"


def test_a_stamp_of_other_sources_or_without_library_is_stale(tmp_path):
    digest = _ext.sources_digest()
    (tmp_path / _ext.STAMP).write_text(json.dumps({"sources": digest}))
    assert not _ext.stamp_matches(tmp_path, digest)          # no library next to it
    (tmp_path / _ext.LIBRARY).write_bytes(b"")
    assert _ext.stamp_matches(tmp_path, digest)
    assert not _ext.stamp_matches(tmp_path, "0" * 64)        # the sources changed since


def test_sources_digest_covers_every_source_and_header():
    names = {p.name for p in _ext.source_files()}
    assert {"bindings.cpp", "cpu_math.h", "experts_common.h"} <= names
    assert all(p.suffix in (".cpp", ".h") for p in _ext.source_files())


@pytest.mark.skipif(shutil.which("readelf") is None or not sys.platform.startswith("linux"),
                    reason="reads ELF sections with binutils' readelf")
def test_release_library_is_stripped():
    assert _ext.available(), _ext.LOAD_ERROR
    out = subprocess.run(["readelf", "-S", "-W", str(_ext.build_dir() / _ext.LIBRARY)],
                         capture_output=True, text=True, check=True).stdout
    assert ".text" in out
    for section in (".debug_info", ".debug_line", ".symtab"):
        assert section not in out


def test_build_cli_prints_the_build_directory():
    out = subprocess.run([sys.executable, "-m", "mmkernels.build", "--dir"], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == str(_ext.build_dir())


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_failed_build_warns_once_falls_back_and_says_what_to_run(tmp_path):
    """No compiler: import is silent, the first CPU call warns once (with the command to run)
    and uses the reference backend; forcing the ``cpu`` backend raises the same text."""
    code = (
        "import warnings, torch, mmkernels\n"
        "from mmkernels import _backend\n"
        "x = torch.randn(6, 4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import mmkernels\n"
        "    assert not [m for m in w if 'C++' in str(m.message)], 'import must not build'\n"
        "    assert _backend.resolve(torch.device('cpu')) == 'reference'\n"
        "    a = float(mmkernels.contrastive_loss(x, x, 2.0))\n"
        "    b = float(mmkernels.contrastive_loss(x, x, 2.0))\n"
        "msgs = [str(m.message) for m in w if 'C++ CPU kernels are not available' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'python -m mmkernels.build' in msgs[0], msgs[0]\n"
        "with mmkernels.backend('cpu'):\n"
        "    try:\n"
        "        mmkernels.contrastive_loss(x, x, 2.0)\n"
        "    except RuntimeError as e:\n"
        "        assert 'python -m mmkernels.build' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('the cpu backend ran without kernels')\n"
        "print(a, b)\n"
    )
    out = _run(code, MMKERNELS_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert out.returncode == 0, out.stderr
    a, b = map(float, out.stdout.split())
    assert a == b and a > 0


def test_no_ext_switch_uses_the_reference_without_building(tmp_path):
    code = ("import torch, mmkernels\n"
            "from mmkernels import _backend, _ext\n"
            "assert _backend.resolve(torch.device('cpu')) == 'reference'\n"
            "assert 'MMKERNELS_NO_EXT' in _ext.LOAD_ERROR\n")
    out = _run(code, MMKERNELS_CACHE_DIR=str(tmp_path), MMKERNELS_NO_EXT="1")
    assert out.returncode == 0, out.stderr
    assert not any(tmp_path.iterdir())
