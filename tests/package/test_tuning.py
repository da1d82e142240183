"""mmkernels.tuning, the one typed mechanism for launch configurations: matching, errors, options,
scopes, the JSON file and ``MMKERNELS_TUNING_FILE``. Uses a kind and an option of its own (no
kernels, no triton); the families' launchers are tested with it in their own folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from mmkernels import tuning

FAMILY = "tuning_test"


class Cfg(NamedTuple):
    BLOCK: int
    num_warps: int
    split: bool = False


tuning.register_kind(FAMILY, "k", Cfg, keys=("dtype", "n", "flag"))


def _check_mode(v):
    if v not in ("a", "b"):
        raise ValueError(f"mode must be 'a' or 'b', got {v!r}")
    return v


tuning.register_option(f"{FAMILY}.mode", "a", _check_mode, "a test option")


@pytest.fixture(autouse=True)
def _scoped():
    with tuning.scope():
        yield


def _lookup(**case):
    return tuning.lookup(FAMILY, "k", **{"dtype": torch.float32, "n": 64, "flag": True, **case})


def test_no_override_is_none():
    assert _lookup() is None


def test_most_specific_match_wins():
    tuning.set_config(FAMILY, "k", Cfg(16, 4))
    tuning.set_config(FAMILY, "k", Cfg(32, 4), dtype=torch.bfloat16)
    tuning.set_config(FAMILY, "k", Cfg(64, 8), dtype="bfloat16", n=128)
    assert _lookup() == Cfg(16, 4)
    assert _lookup(dtype=torch.bfloat16) == Cfg(32, 4)
    assert _lookup(dtype=torch.bfloat16, n=128) == Cfg(64, 8)
    # among equally specific matches the newest wins; the same match replaces the old entry
    tuning.set_config(FAMILY, "k", Cfg(8, 2), n=128)
    assert _lookup(dtype=torch.bfloat16, n=128) == Cfg(64, 8)
    assert _lookup(n=128) == Cfg(8, 2)
    tuning.set_config(FAMILY, "k", {"BLOCK": 128, "num_warps": 4}, n=128)
    assert _lookup(n=128) == Cfg(128, 4)


def test_config_forms():
    tuning.set_config(FAMILY, "k", (16, 4, True), n=1)
    tuning.set_config(FAMILY, "k", {"BLOCK": 32, "num_warps": 2}, n=2)
    assert _lookup(n=1) == Cfg(16, 4, True)
    assert _lookup(n=2) == Cfg(32, 2, False)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: tuning.set_config(FAMILY, "nope", Cfg(16, 4)), ValueError, "unknown launch kind"),
    (lambda: tuning.set_config("nofamily", "k", Cfg(16, 4)), ValueError, "unknown launch kind"),
    (lambda: tuning.set_config(FAMILY, "k", {"BLOCK": 16, "warps": 4}), ValueError, "unknown config fields"),
    (lambda: tuning.set_config(FAMILY, "k", {"BLOCK": 16}), TypeError, "num_warps"),
    (lambda: tuning.set_config(FAMILY, "k", {"BLOCK": "16", "num_warps": 4}), TypeError, "BLOCK must be int"),
    (lambda: tuning.set_config(FAMILY, "k", {"BLOCK": 16, "num_warps": 4, "split": 1}), TypeError,
     "split must be bool"),
    (lambda: tuning.set_config(FAMILY, "k", {"BLOCK": True, "num_warps": 4}), TypeError, "BLOCK must be int"),
    (lambda: tuning.set_config(FAMILY, "k", 16), TypeError, "a config is a Cfg"),
    (lambda: tuning.set_config(FAMILY, "k", Cfg(16, 4), head_dim=64), ValueError, "matches on"),
    (lambda: tuning.set_option(f"{FAMILY}.nope", 1), ValueError, "unknown tuning option"),
    (lambda: tuning.set_option(f"{FAMILY}.mode", "c"), ValueError, "mode must be"),
])
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
    assert _lookup() is None


def test_options():
    name = f"{FAMILY}.mode"
    assert tuning.option(name) == "a"
    assert tuning.options()[name] == {"default": "a", "value": "a", "doc": "a test option"}
    tuning.set_option(name, "b")
    assert tuning.option(name) == "b" and tuning.options()[name]["value"] == "b"
    tuning.set_option(name, None)
    assert tuning.option(name) == "a"


def test_kinds_lists_fields_and_keys():
    assert tuning.kinds()[f"{FAMILY}/k"] == {"fields": ("BLOCK", "num_warps", "split"),
                                              "keys": ("dtype", "n", "flag")}


def test_scope_restores():
    tuning.set_config(FAMILY, "k", Cfg(16, 4))
    tuning.set_option(f"{FAMILY}.mode", "b")
    with tuning.scope():
        tuning.set_config(FAMILY, "k", Cfg(32, 4))
        tuning.set_config(FAMILY, "k", Cfg(64, 4), n=64)
        tuning.set_option(f"{FAMILY}.mode", "a")
        assert _lookup() == Cfg(64, 4)
        tuning.reset()
        assert _lookup() is None
    assert _lookup() == Cfg(16, 4)
    assert tuning.option(f"{FAMILY}.mode") == "b"
    with pytest.raises(RuntimeError), tuning.scope():  # restored on an exception too
        tuning.set_config(FAMILY, "k", Cfg(128, 8))
        raise RuntimeError
    assert _lookup() == Cfg(16, 4)


def test_json_round_trip(tmp_path):
    tuning.set_config(FAMILY, "k", Cfg(16, 4, True), dtype=torch.bfloat16, n=64, flag=False)
    tuning.set_config(FAMILY, "k", Cfg(32, 8))
    tuning.set_option(f"{FAMILY}.mode", "b")
    path = tmp_path / "tuned.json"
    tuning.save(str(path))
    saved = json.loads(path.read_text())
    assert saved["version"] == 1
    assert {"family": FAMILY, "kind": "k", "match": {"dtype": "bfloat16", "n": 64, "flag": False},
            "config": {"BLOCK": 16, "num_warps": 4, "split": True}} in saved["configs"]
    before = tuning.to_dict()
    tuning.reset()
    assert _lookup() is None and tuning.option(f"{FAMILY}.mode") == "a"
    tuning.load(str(path))
    assert tuning.to_dict() == before
    assert _lookup(dtype=torch.bfloat16, flag=False) == Cfg(16, 4, True)
    assert _lookup() == Cfg(32, 8)
    assert tuning.option(f"{FAMILY}.mode") == "b"
    with pytest.raises(ValueError, match="version"):
        tuning.load({"version": 2})


def test_environment_file_is_loaded_at_first_lookup(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"version": 1, "options": {f"{FAMILY}.mode": "b"}, "configs": [
        {"family": FAMILY, "kind": "k", "match": {"dtype": "float16"}, "config": {"BLOCK": 16, "num_warps": 2}}]}))
    code = (
        "import torch, sys; sys.path.insert(0, %r); import test_tuning as t; from mmkernels import tuning\n"
        "with tuning.scope():\n"  # a scope entered first keeps the file's settings on exit
        "    pass\n"
        "print(tuning.lookup(t.FAMILY, 'k', dtype=torch.float16, n=1, flag=True), tuning.option(t.FAMILY + '.mode'))\n"
        % os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MMKERNELS_TUNING_FILE=str(path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[-2] == "Cfg(BLOCK=16, num_warps=2, split=False) b", res.stdout
