"""The compute-sanitizer driver (bench/sanitize_cases.py) and its record (bench/sanitize_report.py):
every Triton kernel is found and launched by the case list, under the interpreter here; the
record reads sanitizer output right."""
from __future__ import annotations

import json

import pytest
import torch

from bench import sanitize_cases, sanitize_report

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_kernels_and_helpers_are_told_apart():
    found = sanitize_cases.find_kernels()
    # launched from the host
    for name in ("attn_fwd_kernel", "stats_kernel", "grouped_mm_kernel", "_ln_fwd_kernel", "_route_kernel"):
        assert name in found.kernels, name
    # called from kernels, or passed to tl.reduce (the tile map's combine function)
    for name in ("_similarity_tile", "softmax_lse", "_or", "_act_fwd"):
        assert name in found.helpers, name
    assert not set(found.kernels) & set(found.helpers)
    assert all(q.startswith("mmkernels.") and q.endswith("." + n) for n, q in found.kernels.items())


def test_coverage_check_names_the_kernels_a_run_missed(tmp_path):
    out = tmp_path / "run.json"
    data = sanitize_cases.run(["layer_norm"], _device(), str(out), check_coverage=True, log=lambda *a, **k: None)
    assert [c["status"] for c in data["cases"]] == ["ok"]
    assert {"_ln_fwd_kernel", "_ln_bwd_kernel", "_ln_dw_reduce_kernel", "_route_kernel"} <= set(data["launches"])
    assert "attn_fwd_kernel" in data["never_launched"]
    assert set(data["never_launched"]) == set(data["kernels"]) - set(data["launches"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))


def test_a_failing_case_is_recorded_and_the_rest_run(monkeypatch):
    def broken(device):
        raise ValueError("planted failure")

    monkeypatch.setitem(sanitize_cases.CASES, "broken", broken)
    data = sanitize_cases.run(["broken", "layer_norm"], _device(), log=lambda *a, **k: None)
    assert [c["status"] for c in data["cases"]] == ["error", "ok"]
    assert "planted failure" in data["cases"][0]["error"]


def test_cases_in_parallel_processes_merge_into_one_summary(tmp_path):
    out = tmp_path / "run.json"
    data = sanitize_cases.run_parallel(["siglip", "layer_norm"], _device(), 2, str(out),
                                       check_coverage=True, log=lambda *a, **k: None)
    assert [(c["name"], c["status"]) for c in data["cases"]] == [("siglip", "ok"), ("layer_norm", "ok")]
    assert {"siglip_rows_kernel", "siglip_grads_kernel", "siglip_sum_kernel", "_ln_fwd_kernel"} <= set(data["launches"])
    assert "attn_fwd_kernel" in data["never_launched"]
    assert json.loads(out.read_text())["launches"] == data["launches"]


@pytest.mark.slow
def test_every_kernel_is_launched_by_the_case_list():
    data = sanitize_cases.run(list(sanitize_cases.CASES), _device(), check_coverage=True,
                              log=lambda *a, **k: None)
    failed = {c["name"]: c["error"] for c in data["cases"] if c["status"] != "ok"}
    assert not failed, failed
    assert data["never_launched"] == [], f"kernels without a case: {data['never_launched']}"
    assert data["unknown_launches"] == []


def test_list_prints_every_case_and_kernel(capsys):
    assert sanitize_cases.main(["--list", "--device", _device().type]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in sanitize_cases.CASES)
    assert "mmkernels.attention.kernels.jit.attn_bwd_dq_kernel" in text


# ----------------------------------------------------------------------------- the record

MEMCHECK_LOG = """\
case attention ...
========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 2 bytes
=========     at attn_fwd_kernel+0x1b0 in mmkernels/attention/kernels/jit.py:140
=========     by thread (3,0,0) in block (1,0,0)
=========     Address 0x7f0000001000 is out of bounds
=========
========= ERROR SUMMARY: 1 error
"""

RACECHECK_CLEAN_LOG = """\
========= COMPUTE-SANITIZER
case layer_norm: ok in 0.4 s, 4 launches of 4 kernels
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""

REFUSED_LOG = """\
========= COMPUTE-SANITIZER
========= Error: Device not supported
RuntimeError: CUDA error: unspecified launch failure
"""


def _step(tmp_path, name, log, rc, cases=(("layer_norm", "ok"),), never=()):
    (tmp_path / f"{name}.log").write_text(log)
    (tmp_path / f"{name}.meta").write_text(f"rc={rc}\nseconds=12\nlimit=40\ncommand=cs --tool {name}\n")
    driver = {"cases": [{"name": n, "status": st, "error": "" if st == "ok" else "Traceback\nRuntimeError: boom"}
                        for n, st in cases],
              "launches": {"_ln_fwd_kernel": 1}, "kernels": {"_ln_fwd_kernel": "m._ln_fwd_kernel"},
              "never_launched": list(never)}
    (tmp_path / f"{name}.json").write_text(json.dumps(driver))
    return sanitize_report.read_step(tmp_path, name)


def test_record_reads_a_memcheck_error(tmp_path):
    step = _step(tmp_path, "memcheck", MEMCHECK_LOG, 86, cases=(("attention", "error"),))
    assert step.errors == 1
    assert step.status.startswith("fail: 1 sanitizer error(s)") and "attention" in step.status
    assert any("Invalid __global__ write" in line for line in step.first_reports)
    assert not any("SUMMARY" in line for line in step.first_reports)


def test_record_reads_a_clean_racecheck_and_a_refused_device(tmp_path):
    clean = _step(tmp_path, "racecheck", RACECHECK_CLEAN_LOG, 0)
    assert (clean.status, clean.errors, clean.warnings) == ("pass", 0, 0)
    refused = _step(tmp_path, "memcheck", REFUSED_LOG, 1, cases=(("contrastive", "error"),))
    assert refused.status == "sanitizer unavailable: Error: Device not supported"
    assert sanitize_report.exit_status([clean.status, refused.status]) == 0


def test_record_timeouts_skips_and_missing_kernels(tmp_path):
    timed_out = _step(tmp_path, "memcheck", "case attention ...\n", 124)
    assert timed_out.status == "timeout" and timed_out.tail == ["case attention ..."]
    missed = _step(tmp_path, "plain", "", 3, never=("new_kernel",))
    assert missed.status == "fail: never launched: new_kernel"
    (tmp_path / "racecheck.meta").write_text("skip=not run (dry run)\n")
    assert sanitize_report.read_step(tmp_path, "racecheck").status == "not run (dry run)"
    assert sanitize_report.exit_status(["pass", timed_out.status, missed.status]) == 3
    text = sanitize_report.render([missed, timed_out], {"kernels": "27"})
    record = json.loads(text.split("```json\n")[1].split("\n```")[0])
    assert [s["status"] for s in record["steps"]] == [missed.status, "timeout"]
    assert "| memcheck | timeout |" in text
