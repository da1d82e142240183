"""Tile-configuration sweeps of the Triton kernels on a GPU.

    python -m bench.tune_gpu [--only attention|contrastive|cross_attention|experts] [--out FILE] [--save FILE]
    TRITON_INTERPRET=1 python -m bench.tune_gpu --smoke                     # tiny sizes, CPU

Each kernel's candidate configurations are timed (median of CUDA events after a warm-up that
includes compilation) at a real model size, in one Markdown table per kernel with the
heuristic's choice marked. ``--save`` writes the fastest experts settings as a
:mod:`mmkernels.tuning` file. A configuration that fails is reported, not fatal. ``--smoke``
runs the same code on tiny shapes through the interpreter, to check the script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Iterator

import torch

from mmkernels import tuning
from mmkernels._triton import input_precision


def _time_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    fn()  # compile / warm up
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _table(title: str, rows: list[tuple[str, float | str, float | None, bool]], unit: str) -> list[str]:
    out = [f"## {title}", "", f"| config | median ms | {unit} | heuristic |", "| --- | ---: | ---: | --- |"]
    timed = [r for r in rows if isinstance(r[1], float)]
    best = min(timed, key=lambda r: r[1])[0] if timed else None
    for name, ms, rate, is_heur in rows:
        mark = ("**best** " if name == best else "") + ("current" if is_heur else "")
        if isinstance(ms, float):
            out.append(f"| {name} | {ms:.3f} | {rate:.0f} | {mark} |")
        else:
            out.append(f"| {name} | {ms} | - | {mark} |")
    return out + [""]


def _err(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


# ----------------------------------------------------------------------------- attention

FWD_CANDIDATES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                  (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3)]
DKDV_CANDIDATES = [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (16, 64, 4, 3),
                   (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 8, 2)]
DQ_CANDIDATES = [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (64, 128, 8, 2),
                 (64, 64, 4, 3), (128, 128, 8, 2)]


def tune_attention(device: str, smoke: bool, reps: int) -> list[str]:
    from mmkernels.attention import MultimodalMask
    from mmkernels.attention import kernels as K
    b, h, s, d = (1, 2, 64, 32) if smoke else (2, 16, 8192, 128)
    dtype = torch.bfloat16
    mask = MultimodalMask.causal(b, s, device=device)
    meta = mask.metadata()
    q, k, v, dout = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(4))
    scale = 1 / math.sqrt(d)
    flop_fwd = 4 * b * h * s * (s + 1) / 2 * d
    prec = K.input_precision(dtype)
    lines = [f"# attention, causal B={b} H={h} S={s} D={d} bf16", ""]
    cands = FWD_CANDIDATES[:2] if smoke else FWD_CANDIDATES

    def cfg(t):
        return K.AttnConfig(*t)

    rows = []
    heur = K.heuristic_config("fwd", dtype, d, prec, True)
    for c in cands:
        try:
            ms = _time_ms(lambda: K.attention_fwd_triton(q, k, v, meta, scale, config=cfg(c)), device, reps)
            rows.append((str(c), ms, flop_fwd / ms / 1e9, cfg(c) == heur))
        except Exception as exc:  # noqa: BLE001 - report every failure, keep sweeping
            rows.append((str(c), _err(exc), None, cfg(c) == heur))
    lines += _table("forward kernel (visible FLOPs)", rows, "TFLOP/s")

    out, _, row_max, row_sum = K.attention_fwd_triton(q, k, v, meta, scale)
    for kind, cands in (("bwd_dkdv", DKDV_CANDIDATES), ("bwd_dq", DQ_CANDIDATES)):
        heur = K.heuristic_config(kind, dtype, d, prec, True)
        rows = []
        for c in (cands[:2] if smoke else cands):
            try:
                ms = _time_ms(lambda: K.attention_bwd_triton(q, k, v, out, row_max, row_sum, dout, meta, scale,
                                                             config={kind: cfg(c)}), device, reps)
                rows.append((str(c), ms, 2.5 * flop_fwd / ms / 1e9, cfg(c) == heur))
            except Exception as exc:  # noqa: BLE001
                rows.append((str(c), _err(exc), None, cfg(c) == heur))
        lines += _table(f"whole backward, varying {kind} (BLOCK_M, BLOCK_N, warps, stages)", rows, "TFLOP/s")
    return lines


# ----------------------------------------------------------------------------- contrastive

def tune_contrastive(device: str, smoke: bool, reps: int) -> list[str]:
    from mmkernels.contrastive import kernels as K
    n, d = (64, 32) if smoke else (32768, 768)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=-1).to(dtype)
    scale = torch.tensor(1 / 0.07, device=device)
    targets = torch.arange(n, device=device)
    prec = K.input_precision(dtype)
    heur = K.resolve_config(dtype, d, prec, None)
    cands = list(K.autotune_configs(dtype, d, prec))
    if heur is not None and heur not in cands:
        cands.insert(0, heur)
    if smoke:
        cands = cands[:1]
    lines = [f"# contrastive forward statistics, N=M={n} D={d} bf16 (2 N^2 D FLOPs per pass)", ""]
    for mode, passes in (("one_pass", 1), ("two_pass", 2)):
        rows = []
        with tuning.scope():
            tuning.set_option("contrastive.forward", mode)
            for c in cands:
                try:
                    ms = _time_ms(lambda: K.contrastive_stats_triton(q, k, scale, targets, True, config=c),
                                  device, reps)
                    rows.append((str(tuple(c)), ms, passes * 2 * n * n * d / ms / 1e9, c == heur))
                except Exception as exc:  # noqa: BLE001
                    rows.append((str(tuple(c)), _err(exc), None, c == heur))
        lines += _table(f"{mode} (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)", rows, "TFLOP/s of the launches")
    return lines


# ----------------------------------------------------------------------------- cross_attention

# (BLOCK_M, BLOCK_N, warps, stages); BLOCK_M 32 covers the Q-Former's 32 queries in one block
XATTN_FWD_CANDIDATES = [(32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 2), (32, 128, 8, 2), (32, 32, 4, 2),
                        (64, 64, 4, 2)]
XATTN_BWD_CANDIDATES = [(32, 64, 4, 1), (32, 64, 4, 2), (32, 32, 4, 1), (32, 128, 4, 1), (32, 64, 8, 1),
                        (16, 64, 4, 1)]
# CoCa's pooler (256 queries, D = 96 padded to 128): several query blocks
COCA_FWD_CANDIDATES = [(128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2)]
COCA_BWD_CANDIDATES = [(16, 64, 4, 1), (16, 64, 8, 1), (32, 64, 8, 1), (16, 32, 4, 1), (32, 32, 4, 1)]
XATTN_PAIRS = (1, 2, 4, 8)


def _xattn_sweep(device: str, smoke: bool, reps: int, title: str, shape: tuple, fwd_cands: list,
                 bwd_cands: list, pairs_sweep: tuple) -> list[str]:
    """Forward and backward tiles at ``shape = (B, H, Lq, Lk, D)`` (bf16, k/v strided views of one
    projection, no padding, no dropout), then (b, h) pairs per program at the heuristic's tiles."""
    from mmkernels.cross_attention import kernels as K
    b, h, lq, lk, d = shape
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, lq, d, device=device, generator=g).to(dtype)
    kv = torch.randn(b, lk, 2, h, d, device=device, generator=g).to(dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # the fused projection's views
    dout = torch.randn_like(q)
    scale = d ** -0.5
    flops = {"fwd": 4 * b * h * lq * lk * d, "bwd": 2.5 * 4 * b * h * lq * lk * d}
    prec = K.input_precision(dtype)
    lines = [f"# cross_attention {title}, B={b} H={h} Lq={lq} Lk={lk} D={d} bf16, k/v strided views", ""]
    out, _, row_max, row_sum = K.cross_attention_fwd_triton(q, k, v, None, None, scale, 0.0)

    def launch(kind, **kw):
        if kind == "fwd":
            return lambda: K.cross_attention_fwd_triton(q, k, v, None, None, scale, 0.0, **kw)
        return lambda: K.cross_attention_bwd_triton(q, k, v, out, row_max, row_sum, dout, None, None, scale,
                                                    0.0, **kw)

    for kind, cands in (("fwd", fwd_cands), ("bwd", bwd_cands)):
        heur = K.heuristic_config(kind, dtype, d, prec, lq)
        rows = []
        for c in (cands[:2] if smoke else cands):
            cfg = K.XAttnConfig(*c)
            try:
                ms = _time_ms(launch(kind, config={kind: cfg}), device, reps)
                rows.append((str(c), ms, flops[kind] / ms / 1e9, cfg == heur))
            except Exception as exc:  # noqa: BLE001 - report every failure, keep sweeping
                rows.append((str(c), _err(exc), None, cfg == heur))
        lines += _table(f"{kind} kernel (BLOCK_M, BLOCK_N, warps, stages)", rows, "TFLOP/s")
    for kind in ("fwd", "bwd") if pairs_sweep else ():
        heur_pairs = K.pairs_per_program(b * h, 1 if kind == "bwd" else -(-lq // K.heuristic_config(
            "fwd", dtype, d, prec, lq).BLOCK_M), q.device)
        rows = []
        for pairs in (pairs_sweep[:2] if smoke else pairs_sweep):
            try:
                ms = _time_ms(launch(kind, pairs=pairs), device, reps)
                rows.append((f"pairs={pairs}", ms, flops[kind] / ms / 1e9, pairs == heur_pairs))
            except Exception as exc:  # noqa: BLE001
                rows.append((f"pairs={pairs}", _err(exc), None, pairs == heur_pairs))
        lines += _table(f"{kind}: (b, h) pairs per program at the heuristic tiles", rows, "TFLOP/s")
    return lines


def tune_cross_attention(device: str, smoke: bool, reps: int) -> list[str]:
    """BLIP-2 cross-attention (B=128, H=12, 32 queries, 257 image tokens, D=64) with a pairs sweep,
    and CoCa's attentional pooler (B=128, H=8, 256 queries, 257 tokens, D=96)."""
    blip2 = (2, 2, 32, 40, 64) if smoke else (128, 12, 32, 257, 64)
    coca = (1, 2, 40, 24, 96) if smoke else (128, 8, 256, 257, 96)
    return (_xattn_sweep(device, smoke, reps, "BLIP-2", blip2, XATTN_FWD_CANDIDATES, XATTN_BWD_CANDIDATES,
                         XATTN_PAIRS)
            + _xattn_sweep(device, smoke, reps, "CoCa pooler", coca, COCA_FWD_CANDIDATES, COCA_BWD_CANDIDATES, ()))


# ----------------------------------------------------------------------------- experts

# (BLOCK_N, BLOCK_K, BLOCK_T, warps, stages) of the weight-gradient kernel; the heuristic's is first.
# Below 5 stages the gathered reduction is not software-pipelined (sm_90a PTX: every
# cp.async.wait_group drains all copies); the 3-stage row measures what that costs.
WGRAD_CANDIDATES = [(128, 128, 64, 8, 5), (128, 128, 64, 8, 3), (128, 128, 32, 8, 6), (64, 128, 64, 8, 5),
                    (64, 128, 64, 4, 5), (128, 128, 64, 8, 6)]
WGRAD_CHUNKS = ("0", "auto", "1024", "2048", "4096")
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, register cap (0: none)[, epilogue split]]) of the
# grouped GEMM (the VLMo FFN's four launches). A 4-way epilogue split keeps 128 x 128 tiles with
# an activation at 107-122 registers (sm_90a, two programs per SM, no spills), where the whole
# tile took 184-255; the capped row is the other way to two per SM (256-660 bytes of spills);
# 128 x 256 runs one program per SM (184-236 registers with the split, no spills).
# Nine configs a kind (each a compile on the GPU, ~2 s): the experts sweep must fit its limit.
MM_CANDIDATES = [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3, 0, 4),
                 (128, 128, 64, 8, 3, 0, 2), (128, 256, 64, 8, 3), (128, 256, 64, 8, 3, 0, 4),
                 (64, 128, 64, 4, 4), (128, 128, 64, 8, 3, 128)]


def _mm_name(cfg) -> str:
    """``cfg`` as the tuple the tables and the tuning file use: the five tile fields,
    then the register cap and the epilogue split only as far as they differ from the defaults."""
    fields = tuple(cfg)
    while len(fields) > 5 and fields[-1] == type(cfg)._field_defaults[type(cfg)._fields[len(fields) - 1]]:
        fields = fields[:-1]
    return str(fields)


def _vlmo_inputs(device: str, smoke: bool):
    from mmkernels.experts.routing_kernels import route_triton
    b, t_text, t_img, h, f = (2, 8, 24, 64, 128) if smoke else (64, 40, 197, 768, 3072)
    from bench.cases.experts import layout_ids
    ids = layout_ids(f"vlmo:{t_text}+{t_img}", b, device)
    perm, offsets = route_triton(ids.reshape(-1), 2)
    return (b, t_text, t_img, h, f), ids.numel(), perm, offsets


def _tune_wgrad(device: str, smoke: bool, reps: int, best: dict) -> list[str]:
    from mmkernels.experts.grouped_mm.kernels import configs as C
    from mmkernels.experts.grouped_mm import kernels as K
    (b, t_text, t_img, h, f), t, perm, offsets = _vlmo_inputs(device, smoke)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    dh = torch.randn(t, f, device=device, generator=g).to(dtype)
    x = torch.randn(t, h, device=device, generator=g).to(dtype)
    dw = torch.empty(2, f, h, device=device, dtype=dtype)
    db = torch.empty(2, f, device=device, dtype=dtype)
    flop = 2 * t * f * h
    lines = [f"# experts weight gradient, VLMo FFN dW_in: T={t} ({b} x {t_text}+{t_img}), N={f}, K={h}, bf16", ""]
    heur = C.heuristic_config("wgrad_ffn_in", dtype, input_precision(dtype), False, f, True)
    rows = []
    with tuning.scope():
        tuning.set_option(C.WGRAD_CHUNK_OPTION, 0)
        for c in (WGRAD_CANDIDATES[:2] if smoke else WGRAD_CANDIDATES):
            cfg = C.WGradConfig(*c)
            fn = lambda: K.launch_wgrad("wgrad_ffn_in", dh, x, dw, db, perm, offsets, config=cfg)  # noqa: E731
            try:
                ms = _time_ms(fn, device, reps)
                rows.append((str(c), ms, flop / ms / 1e9, cfg == heur))
            except Exception as exc:  # noqa: BLE001 - report every failure, keep sweeping
                rows.append((str(c), _err(exc), None, cfg == heur))
    lines += _table("tiles, one program per dW tile (BLOCK_N, BLOCK_K, BLOCK_T, warps, stages)", rows, "TFLOP/s")
    best["wgrad_ffn_in"] = _fastest(rows)
    rows = []
    for chunk in (WGRAD_CHUNKS[:2] if smoke else WGRAD_CHUNKS):
        with tuning.scope():
            tuning.set_option(C.WGRAD_CHUNK_OPTION, chunk)
            fn = lambda: K.launch_wgrad("wgrad_ffn_in", dh, x, dw, db, perm, offsets)  # noqa: E731
            try:
                ms = _time_ms(fn, device, reps)
                rows.append((f"chunk={chunk}", ms, flop / ms / 1e9, chunk == "auto"))
            except Exception as exc:  # noqa: BLE001
                rows.append((f"chunk={chunk}", _err(exc), None, chunk == "auto"))
    lines += _table("token chunks at the heuristic tiles (fp32 atomics when > 0; auto = the default)",
                    rows, "TFLOP/s")
    best["chunk"] = _fastest(rows)
    lines += _cublas_line(lambda: torch.mm(dh.t(), x), device, reps, flop, "dh^T @ x, both experts' tokens")
    return lines


def _cublas_line(fn, device: str, reps: int, flop: float, what: str) -> list[str]:
    """The same FLOPs as one dense cuBLAS ``torch.mm`` (no routing): the rate to reach."""
    try:
        ms = _time_ms(fn, device, reps)
        return [f"cuBLAS `torch.mm` ({what}): {ms:.3f} ms, {flop / ms / 1e9:.0f} TFLOP/s", ""]
    except Exception as exc:  # noqa: BLE001
        return [f"cuBLAS `torch.mm` ({what}): {_err(exc)}", ""]


def _tune_mm(device: str, smoke: bool, reps: int, best: dict) -> Iterator[list[str]]:
    from mmkernels.experts.grouped_mm.kernels import configs as C
    from mmkernels.experts.grouped_mm import kernels as K
    (b, t_text, t_img, h, f), t, perm, offsets = _vlmo_inputs(device, smoke)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(t, h, device=device, generator=g).to(dtype)
    w_in = (0.02 * torch.randn(2, f, h, device=device, generator=g)).to(dtype)
    w_out = (0.02 * torch.randn(2, h, f, device=device, generator=g)).to(dtype)
    b_in = torch.zeros(2, f, device=device, dtype=dtype)
    b_out = torch.zeros(2, h, device=device, dtype=dtype)
    a = torch.empty(t, f, device=device, dtype=dtype)
    hid = torch.empty(t, f, device=device, dtype=dtype)
    y = torch.empty(t, h, device=device, dtype=dtype)
    flop = 2 * t * f * h
    dy = torch.randn(t, h, device=device, generator=g).to(dtype)
    dh = torch.empty(t, f, device=device, dtype=dtype)
    dx = torch.empty(t, h, device=device, dtype=dtype)
    yield [f"# experts grouped GEMM, VLMo FFN forward and backward: T={t}, H={h}, F={f}, bf16 (gelu)", ""]
    launches = {
        "ffn_fwd_in": lambda cfg: K.launch_grouped_mm("ffn_fwd_in", x, w_in, K.weight_t_strides(w_in), b_in, a, hid, perm, offsets,
                                                f, h, C.ACT_GELU, config=cfg),
        "ffn_fwd_out": lambda cfg: K.launch_grouped_mm("ffn_fwd_out", a, w_out, K.weight_t_strides(w_out), b_out, y, None, perm,
                                                 offsets, h, f, C.ACT_NONE, config=cfg),
        "ffn_bwd_dh": lambda cfg: K.launch_grouped_mm("ffn_bwd_dh", dy, w_out, K.weight_strides(w_out), None, dh, hid, perm,
                                                offsets, f, h, C.ACT_GELU, config=cfg),
        "ffn_bwd_dx": lambda cfg: K.launch_grouped_mm("ffn_bwd_dx", dh, w_in, K.weight_strides(w_in), None, dx, None, perm,
                                                offsets, h, f, C.ACT_NONE, config=cfg),
    }
    # the same product for one expert's weights over all tokens, as cuBLAS runs it
    dense = {"ffn_fwd_in": lambda: torch.mm(x, w_in[0].t()), "ffn_fwd_out": lambda: torch.mm(a, w_out[0].t()),
             "ffn_bwd_dh": lambda: torch.mm(dy, w_out[0]), "ffn_bwd_dx": lambda: torch.mm(dh, w_in[0])}
    for kind, launch in launches.items():
        n = f if kind in ("ffn_fwd_in", "ffn_bwd_dh") else h
        heur = C.heuristic_config(kind, dtype, input_precision(dtype), False, n, True)
        lines, best[kind] = _mm_table(kind, launch, heur, flop, dense[kind], device, smoke, reps)
        yield lines


def _mm_table(kind: str, launch, heur, flop: float, dense, device: str, smoke: bool, reps: int):
    """``launch(cfg)`` timed at the heuristic's ``heur`` and every ``MM_CANDIDATES`` config, then
    ``dense()`` (cuBLAS, the same FLOPs): ``(the table's lines, the fastest config's name)``."""
    from mmkernels.experts.grouped_mm.kernels.configs import MMConfig
    cands = [heur] + [MMConfig(*c) for c in MM_CANDIDATES if MMConfig(*c) != heur]
    rows = []
    for cfg in (cands[:2] if smoke else cands):
        name = _mm_name(cfg)
        try:
            ms = _time_ms(lambda: launch(cfg), device, reps)
            rows.append((name, ms, flop / ms / 1e9, cfg == heur))
        except Exception as exc:  # noqa: BLE001
            rows.append((name, _err(exc), None, cfg == heur))
    title = f"{kind} tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, register cap[, epilogue split]])"
    return (_table(title, rows, "TFLOP/s") + _cublas_line(dense, device, reps, flop, "same shape, one weight"),
            _fastest(rows))


def _tune_swiglu(device: str, smoke: bool, reps: int) -> Iterator[list[str]]:
    """The CogVLM MLP's two swiglu launches (4 x (1226 image + 300 text) tokens, H 4096, F 11008,
    bf16), the GEMMs of most of its FLOPs: ``ffn_fwd_in`` (a B tile of gate and up columns) and
    ``ffn_bwd_dh`` (swiglu's backward epilogue). For reading only: the settings above come from
    the VLMo tables and apply to every activation."""
    from mmkernels.experts.grouped_mm.kernels import configs as C
    from mmkernels.experts.grouped_mm import kernels as K
    from mmkernels.experts.routing_kernels import route_triton
    b, t_img, t_text, h, f = (1, 24, 8, 64, 96) if smoke else (4, 1226, 300, 4096, 11008)
    from bench.cases.experts import layout_ids
    ids = layout_ids(f"cogvlm:{t_img}+{t_text}", b, device)  # [BOS] + image (expert 1) + text
    t = ids.numel()
    perm, offsets = route_triton(ids.reshape(-1), 2)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(t, h, device=device, generator=g).to(dtype)
    w_in = (0.02 * torch.randn(2, 2 * f, h, device=device, generator=g)).to(dtype)
    w_out = (0.02 * torch.randn(2, h, f, device=device, generator=g)).to(dtype)
    hid = torch.empty(t, 2 * f, device=device, dtype=dtype)
    a = torch.empty(t, f, device=device, dtype=dtype)
    dy = torch.randn(t, h, device=device, generator=g).to(dtype)
    dh = torch.empty(t, 2 * f, device=device, dtype=dtype)
    yield [f"# experts grouped GEMM, CogVLM MLP swiglu launches: T={t}, H={h}, F={f}, bf16 (reading only)", ""]
    launches = {
        "ffn_fwd_in": (lambda cfg: K.launch_grouped_mm("ffn_fwd_in", x, w_in, K.weight_t_strides(w_in), None, a, hid, perm, offsets,
                                                 f, h, C.ACT_SWIGLU, config=cfg),
                       4 * t * h * f, lambda: torch.mm(x, w_in[0].t())),
        "ffn_bwd_dh": (lambda cfg: K.launch_grouped_mm("ffn_bwd_dh", dy, w_out, K.weight_strides(w_out), None, dh, hid, perm,
                                                 offsets, f, h, C.ACT_SWIGLU, config=cfg),
                       2 * t * h * f, lambda: torch.mm(dy, w_out[0])),
    }
    for kind, (launch, flop, dense) in launches.items():
        heur = C.heuristic_config(kind, dtype, input_precision(dtype), True, f, True)
        lines, _ = _mm_table(f"{kind} swiglu", launch, heur, flop, dense, device, smoke, reps)
        yield lines


def tune_experts(device: str, smoke: bool, reps: int) -> Iterator[list[str]]:
    """The VLMo FFN (64 x (40 text + 197 image) tokens, H 768, F 3072, bf16): the weight gradient
    of its first layer (dW_in [2, 3072, 768]) over tiles at the plain grid, then over token
    chunks (fp32 atomics, the option ``experts.wgrad_chunk``) at the heuristic tiles; then the
    four grouped GEMMs of its forward and backward over tiles. Each table ends with cuBLAS on
    the same FLOPs (one dense ``torch.mm``), the rate the routed kernels aim at; then the
    fastest of each table as the settings that select them; last, the CogVLM MLP's two swiglu
    launches over the same tiles (read only). Yields one section at a time (``main`` rewrites
    ``--out`` and ``--save`` after each: a timeout keeps the finished tables)."""
    best: dict = {}
    yield _tune_wgrad(device, smoke, reps, best)
    yield from _tune_mm(device, smoke, reps, best)
    yield _settings_lines(best)
    yield from _tune_swiglu(device, smoke, reps)


def _fastest(rows) -> str | None:
    """The name of the fastest timed row (None when none ran)."""
    timed = [r for r in rows if isinstance(r[1], float)]
    return min(timed, key=lambda r: r[1])[0] if timed else None


TUNED: dict = {}  # the tuning file of the fastest settings found (``--save`` writes it)


def _settings_lines(best: dict) -> list[str]:
    """The fastest configs as a :mod:`mmkernels.tuning` file (kept in ``TUNED`` for ``--save``):
    each tile for every launch of its kind, the chunk as the option ``experts.wgrad_chunk``."""
    import ast
    from mmkernels.experts.grouped_mm.kernels.configs import WGRAD_CHUNK_OPTION
    with tuning.scope():
        tuning.reset()
        for kind, name in best.items():
            if kind != "chunk" and name:
                tuning.set_config("experts", kind, ast.literal_eval(name))
        if best.get("chunk"):
            tuning.set_option(WGRAD_CHUNK_OPTION, best["chunk"].split("=", 1)[1])
        TUNED.clear()
        TUNED.update(tuning.to_dict())
    return (["## the fastest of each table, as a tuning file (`--save FILE` writes it)", "", "```json",
             json.dumps(TUNED, indent=1), "```", ""])


SWEEPS = {"contrastive": tune_contrastive, "attention": tune_attention,
          "cross_attention": tune_cross_attention, "experts": tune_experts}


def _families(only: str | None) -> list[str]:
    if not only:
        return list(SWEEPS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        raise SystemExit(f"tune_gpu: unknown family {unknown}; choose from {', '.join(SWEEPS)}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated families, in this order (default all: {', '.join(SWEEPS)})")
    ap.add_argument("--out", help="also write the tables to this file (rewritten after each family, so a "
                                  "timed-out run keeps what it measured)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one or two configs (checks the script)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--save", help="write the fastest settings found to this mmkernels.tuning file "
                                   "(run the bench with them: MMKERNELS_TUNING_FILE=FILE python -m bench ...)")
    args = ap.parse_args(argv)
    families = _families(args.only)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("tune_gpu: no CUDA device (use --smoke to check the script on a CPU)", file=sys.stderr)
        return 1
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # read when triton and mmkernels are imported: setting it here would come too late
        print("tune_gpu --smoke on a CPU: run it with TRITON_INTERPRET=1", file=sys.stderr)
        return 1
    reps = 2 if args.smoke else args.reps
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    lines = [f"# mmkernels tile sweeps on {name}", ""]
    for family in families:
        for new in _sections(SWEEPS[family], family, device, args.smoke, reps):
            lines += new
            print("\n".join(new), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")
            if args.save and TUNED:
                with open(args.save, "w") as f:
                    json.dump(TUNED, f, indent=1)
                    f.write("\n")
    return 0


def _sections(sweep, family: str, device: str, smoke: bool, reps: int) -> Iterator[list[str]]:
    """A sweep's output as sections: its list of lines, or each list a generator sweep yields;
    an exception ends the family with an error line (one family failing must not hide the others)."""
    try:
        out = sweep(device, smoke, reps)
        if isinstance(out, list):
            yield out
            return
        yield from out
    except Exception as exc:  # noqa: BLE001
        yield [f"# {family}", _err(exc), ""]


if __name__ == "__main__":
    sys.exit(main())
