"""The dispatch-table generator (``bench/dispatch_table.py``): recorded winners come first."""
from __future__ import annotations

import json
import os

from bench import dispatch_table as gen
from bench.harness import REPO_ROOT

H200_RUN = os.path.join(REPO_ROOT, "bench", "results", "2026-11-27-h200-quick-2")


def _row(op, case, provider, shape, time_ms, dtype="float32", status="ok"):
    return {"op": op, "case": case, "provider": provider, "shape": shape, "dtype": dtype,
            "status": status, "time_ms": time_ms if status == "ok" else None}


def _run(tmp_path, rows, device="cpu", capability=None):
    env = {"device": device}
    if capability:
        env["gpu"] = {"capability": capability}
    folder = tmp_path / f"run-{device}"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"schema": 1, "env": env, "results": rows}))
    return str(folder)


def test_per_path_providers_rank_the_paths(tmp_path):
    shape = {"N": 512, "D": 64}
    rows = [_row("contrastive_loss", "c1", p, shape, t) for p, t in
            (("mmkernels", 1.0), ("mmkernels:kernel", 3.0), ("mmkernels:blockwise", 1.0),
             ("mmkernels:materialized", 2.0), ("open_clip", 0.5))]
    rows.append(_row("contrastive_loss", "c2", "mmkernels:blockwise", {"N": 1024, "D": 64}, 4.0))
    rows.append(_row("contrastive_loss", "c2", "mmkernels:kernel", {"N": 1024, "D": 64}, 2.0))
    rows.append(_row("contrastive_loss", "c2", "mmkernels:materialized", {"N": 1024, "D": 64}, None,
                     status="skipped"))
    measured = gen.measured_orders([_run(tmp_path, rows)])
    from mmkernels.contrastive.paths import shape_class
    key = ("contrastive_loss", "cpu", "float32", shape_class(512, 512, 64))
    assert shape_class(1024, 1024, 64) == key[3]  # both cases in one group
    order, source = measured["contrastive"][key]
    # geometric means of time / fastest: blockwise sqrt(1 * 2), kernel sqrt(3 * 1), materialized 2
    assert order == ("blockwise", "kernel", "materialized")
    assert "2 case(s)" in source and "proxies" not in source  # peers never stand in for paths


def test_legacy_h200_run_gives_its_winners():
    """The H200 record (before per-path providers): OpenCLIP's loss, which computes what the
    materialized path computes, beat the kernels at both sizes; compiled FlexAttention beat
    them on causal S = 8192, the kernels won BLIP-2 ITG (attention rerun)."""
    measured = gen.measured_orders([H200_RUN])
    rows = measured["contrastive"]
    assert rows, "no contrastive rows from the H200 record"
    for (op, kind, dtype, _), (order, source) in rows.items():
        assert (op, kind, dtype) == ("contrastive_loss", "cuda-sm90", "bfloat16")
        assert order.index("materialized") < order.index("kernel")
        assert "open_clip for materialized" in source
    rerun = os.path.join(REPO_ROOT, "bench", "results", "2026-11-27-h200-attention-rerun")
    att = gen.measured_orders([rerun])["attention"]
    from mmkernels.attention.paths import shape_class
    causal = att[("multimodal_attention", "cuda-sm90", "bfloat16", shape_class("causal", 8192, 8192, 128))]
    assert causal[0][0] == "flex"
    itg = att[("multimodal_attention", "cuda-sm90", "bfloat16", shape_class("blip2", 160, 160, 64))]
    assert itg[0][0] == "kernel"


def test_merge_keeps_priors_of_unmeasured_paths():
    assert gen.merge_order(("blockwise", "materialized", "kernel"), ("materialized", "kernel")) == \
        ("blockwise", "materialized", "kernel")
    assert gen.merge_order(("kernel", "blockwise"), ("blockwise", "materialized", "kernel")) == \
        ("blockwise", "materialized", "kernel")
    assert gen.merge_order((), ("sdpa",)) == ("sdpa", "kernel")


def test_written_table_round_trips(tmp_path, monkeypatch):
    """--write renders a module whose TABLE holds the measured rows and keeps the others."""
    rows = [_row("contrastive_loss", "c1", p, {"N": 64, "D": 16}, t) for p, t in
            (("mmkernels:kernel", 2.0), ("mmkernels:blockwise", 1.0))]
    run = _run(tmp_path, rows)
    target = tmp_path / "dispatch_table.py"
    monkeypatch.setattr(gen, "table_path", lambda family: str(target))
    assert gen.main([run, "--write"]) == 0
    ns = {}
    exec(target.read_text(), ns)
    before = gen.current_table("contrastive")
    assert set(before) <= set(ns["TABLE"])
    from mmkernels.contrastive.paths import shape_class
    order, _ = ns["TABLE"][("contrastive_loss", "cpu", "float32", shape_class(64, 64, 16))]
    assert order[0] == "blockwise" and "kernel" in order


def test_device_kinds_of_runs():
    assert gen.device_kind({"device": "cpu"}) == "cpu"
    assert gen.device_kind({"device": "cuda", "gpu": {"capability": "9.0"}}) == "cuda-sm90"
    assert gen.device_kind({"device": "cuda", "gpu": {"capability": "8.0"}}) == "cuda"


def test_no_rows_is_an_error(tmp_path):
    run = _run(tmp_path, [_row("mm", "m", "torch.mm", {"M": 1}, 1.0)])
    assert gen.main([run]) == 1
