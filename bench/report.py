"""Reports of a benchmark run: results.json, results.md and plot.png.

Every function takes the environment dict (``bench.harness.environment``),
the list of measurement records (``bench.harness.measure``) and the report
notes, so a report can be rebuilt from a results.json alone::

    python -m bench.report bench/results/<run>/results.json
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import OrderedDict
from typing import Optional

from bench.harness import BASELINE, DTYPE_SHORT, MiB, fmt_bytes, path_label

SCHEMA = 1
MEM_FLOOR = 1 * MiB  # memory ratios divide by max(mmkernels extra, this)
# family -> the provider that is its speed of light; the summary adds a table of time / its time
SPEED_OF_LIGHT = {"experts": "dense"}
RESULTS_JSON, RESULTS_MD, PLOT_PNG = "results.json", "results.md", "plot.png"


# --------------------------------------------------------------------------
# Derived numbers
# --------------------------------------------------------------------------


def _ok(r: dict) -> bool:
    return r.get("status") == "ok"


def by_case(results: list) -> "OrderedDict[str, dict]":
    """case id -> {provider -> record}, in run order."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for r in results:
        out.setdefault(r["case"], {})[r["provider"]] = r
    return out


def mm_rate(results: list, dtype: str, k: Optional[int]) -> Optional[dict]:
    """The torch.mm probe of ``dtype`` with inner dimension ``k`` (else the fastest probe)."""
    probes = [r for r in results if r.get("rate_probe") and _ok(r) and r["dtype"] == dtype and r.get("tflops")]
    if not probes:
        return None
    same_k = [r for r in probes if k is not None and r["shape"].get("K") == k and r["shape"].get("M", 0) >= 1024]
    pool = same_k or probes
    return max(pool, key=lambda r: r["tflops"])


def ratios(rec: dict, base: Optional[dict]) -> tuple:
    """(speedup, memory ratio) of a peer record against the mmkernels record."""
    if base is None or not _ok(base) or not _ok(rec) or rec["provider"] == BASELINE:
        return None, None
    speed = rec["time_ms"] / base["time_ms"] if base["time_ms"] else None
    mem = None
    if rec.get("mem_extra_bytes") is not None and base.get("mem_extra_bytes") is not None:
        if rec["mem_extra_bytes"] >= MEM_FLOOR or base["mem_extra_bytes"] >= MEM_FLOOR:
            mem = max(rec["mem_extra_bytes"], 0) / max(base["mem_extra_bytes"], MEM_FLOOR)
    return speed, mem


def pct_of_mm(rec: dict, results: list) -> Optional[float]:
    if not _ok(rec) or not rec.get("tflops") or rec.get("rate_probe"):
        return None
    probe = mm_rate(results, rec["dtype"], rec["shape"].get("D"))
    if probe is None:
        return None
    return 100.0 * rec["tflops"] / probe["tflops"]


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------


def write_json(path: str, env: dict, results: list, notes: list) -> None:
    doc = {"schema": SCHEMA, "env": env, "notes": notes, "results": results}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> tuple:
    with open(path) as f:
        doc = json.load(f)
    return doc["env"], doc["results"], doc.get("notes", [])


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------


def _scaled(v: Optional[float], one_decimal_from: float, small: str, suffix: str = "") -> str:
    """``v`` with no decimals from 100, one from ``one_decimal_from``, format ``small`` below; "-" for None."""
    if v is None:
        return "-"
    fmt = ".0f" if v >= 100 else ".1f" if v >= one_decimal_from else small
    return f"{v:{fmt}}{suffix}"


def _x(v: Optional[float], nd: int = 2) -> str:
    return _scaled(v, 10, f".{nd}f", "x")


def _num(v: Optional[float]) -> str:
    return _scaled(v, 1, ".3g")


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _head(cols: list) -> list:
    """A Markdown table's header and separator lines."""
    return ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]


def _shape_cells(recs: dict, keys: list) -> list:
    """A case's shape values and dtype, the first cells of its rows (``recs``: provider -> record)."""
    r = next(iter(recs.values()))
    return [str(r["shape"][k]) for k in keys] + [DTYPE_SHORT.get(r["dtype"], r["dtype"])]


def _cell(r: Optional[dict], fmt) -> str:
    """A peer's table cell: "-" when not run, its status when not ok, else ``fmt(r)``."""
    if r is None:
        return "-"
    return fmt(r) if _ok(r) else r["status"]


def _ratio_cell(r: dict, base: Optional[dict]) -> str:
    s, m = ratios(r, base)
    return f"{_x(s)} / {_x(m)}" if s is not None else f"{_ms(r['time_ms'])} ms"


def _status(r: dict) -> str:
    if r["status"] == "ok":
        extra = [x for x in (path_label(r), f"{r['launches']} launches" if r.get("launches") else "") if x]
        return f"ok ({'; '.join(extra)})" if extra else "ok"
    reason = (r.get("reason") or "").replace("|", "\\|")
    return f"{r['status']}: {reason}"


def _device_line(env: dict) -> str:
    gpu = env.get("gpu")
    if gpu:
        return (
            f"{gpu['name']} (CUDA {gpu.get('cuda')}, sm {gpu['capability']}, {gpu['sm_count']} SMs, "
            f"{fmt_bytes(gpu['total_memory_bytes'])})"
        )
    return f"CPU: {env.get('device_name')}, {env.get('torch_threads')} torch threads"


def _gpu_state(s: Optional[dict]) -> str:
    if not s:
        return "-"
    return (
        f"SM {s.get('clocks.sm')} (max {s.get('clocks.max.sm')}), mem {s.get('clocks.mem')}, "
        f"{s.get('temperature.gpu')} C, {s.get('power.draw')} / {s.get('power.limit')}"
    )


def overhead(rec: dict, sol: Optional[dict]) -> Optional[float]:
    """time / the speed-of-light provider's time of the same case (1.0 = no overhead)."""
    if sol is None or not _ok(sol) or not _ok(rec) or not sol.get("time_ms"):
        return None
    return rec["time_ms"] / sol["time_ms"]


def _overhead_tables(ops: dict, cases: dict) -> list:
    """Per op of a family in SPEED_OF_LIGHT: every provider's time over the speed of light's."""
    L = []
    for (op, mode), cids in ops.items():
        first = next(iter(cases[cids[0]].values()))
        sol_name = SPEED_OF_LIGHT.get(first.get("family"))
        if sol_name is None or not any(sol_name in cases[c] for c in cids):
            continue
        provs = []
        for cid in cids:
            for p in cases[cid]:
                if p != sol_name and p not in provs:
                    provs.append(p)
        keys = list(first["shape"].keys())
        L.append(f"**{op}: routing overhead** (time / {sol_name} time; {sol_name} = one dense layer over all "
                 f"tokens with one expert's weights, 1.00x = the speed of light)")
        L.append("")
        L += _head([*keys, "dtype", f"{sol_name} ms", *provs])
        for cid in cids:
            recs = cases[cid]
            sol = recs.get(sol_name)
            row = _shape_cells(recs, keys)
            row.append(_ms(sol["time_ms"]) if sol is not None and _ok(sol) else (sol["status"] if sol else "not run"))
            row += [_cell(recs.get(p), lambda r: _x(overhead(r, sol))) for p in provs]
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    return L


def markdown(env: dict, results: list, notes: list) -> str:
    L = []
    commit = env.get("git_commit") or "unknown"
    dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
    L.append(f"# mmkernels benchmark: {env.get('device_name')}")
    L.append("")
    L.append("| | |")
    L.append("| --- | --- |")
    L.append(f"| device | {_device_line(env)} |")
    L.append(
        f"| versions | python {env.get('python')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"numpy {env.get('numpy')} |"
    )
    L.append(f"| mmkernels | {env.get('mmkernels')} |")
    L.append(f"| commit | {commit}{dirty} |")
    L.append(f"| date | {env.get('date')} |")
    L.append(f"| command | `{' '.join(env.get('argv') or [])}` (profile: {env.get('profile', '?')}) |")
    if env.get("gpu"):
        L.append(f"| GPU state at start | {_gpu_state(env['gpu'].get('state_start'))} |")
        L.append(f"| GPU state at end | {_gpu_state(env['gpu'].get('state_end'))} |")
    if not env.get("gpu") and env.get("loadavg_start") is not None:
        L.append(
            f"| load average (1/5/15 min) | start {env.get('loadavg_start')}, end {env.get('loadavg_end')} "
            f"on {env.get('cpu_count')} cores (CPU times are inflated when the load exceeds the cores) |"
        )
    if env.get("env_vars"):
        L.append("| environment | " + ", ".join(f"`{k}={v}`" for k, v in sorted(env["env_vars"].items())) + " |")
    if env.get("interrupted"):
        L.append(f"| note | run interrupted ({env['interrupted']}): results are partial |")
    L.append("")

    L.append("## How to read")
    L.append("")
    gpu = bool(env.get("gpu"))
    if gpu:
        L.append(
            "- **time**: median (and min) over repeats of one call, forward + backward (`loss.backward()`), timed with a pair "
            "of CUDA events per repeat after warm-up (which includes compilation/autotuning), L2 flushed (256 MiB "
            "write) before each repeat, gradients set to None between repeats, no host sync inside the timed region."
        )
        L.append(
            "- **extra memory**: `torch.cuda.max_memory_allocated()` during one forward + backward (after "
            "`reset_peak_memory_stats`) minus the memory allocated before the call (the inputs) minus the inputs' "
            "gradients. It is the memory the op needs beyond its inputs and their gradients."
        )
    else:
        L.append(
            "- **time**: median (and min) wall time (`time.perf_counter`) over repeats of one call, forward + backward "
            "(`loss.backward()`), after a warm-up call; fewer repeats at big sizes (at least 3)."
        )
        L.append(
            "- **extra memory**: peak RSS growth of one forward + backward, measured in a fresh subprocess per "
            "(case, provider): inputs built, one warm-up call, gradients freed, kernel peak-RSS mark reset "
            "(`/proc/self/clear_refs`), RSS recorded, one call, peak read from `VmHWM`; minus the inputs' "
            "gradients. glibc is told to return every allocation >= 64 KiB to the OS on free "
            "(`MALLOC_MMAP_THRESHOLD_=65536`) so that RSS follows live tensors. Page granularity: +-1 MiB."
        )
    L.append(
        f"- **speedup** = peer time / mmkernels time (> 1: mmkernels is faster). **memory ratio** = peer extra "
        f"memory / mmkernels extra memory (> 1: mmkernels needs less; the denominator is floored at "
        f"{fmt_bytes(MEM_FLOOR)}, and the ratio is left out (-) when both are under it)."
    )
    L.append(
        "- **TFLOP/s** = nominal FLOPs of the op (formula in the table) / time; **% mm** = that rate over the "
        "torch.mm rate of the same dtype and inner dimension measured in this run (table at the end)."
    )
    L.append("- Skips are decided before running (not importable, unsupported device or shape, memory estimate over free memory) or from an out-of-memory error.")
    for n in notes:
        L.append(f"- {n}")
    L.append("")

    cases = by_case(results)
    ops = OrderedDict()
    for cid, provs in cases.items():
        first = next(iter(provs.values()))
        if first.get("rate_probe"):
            continue
        ops.setdefault((first["op"], first["mode"]), []).append(cid)

    # summary: one row per case, one column per peer
    if ops:
        L.append("## Summary: mmkernels against each peer")
        L.append("")
        L.append("Cells: speedup / memory ratio (peer divided by mmkernels; > 1 favours mmkernels). "
                 "`mmkernels` is backend auto (the path its dispatch table chose: `auto path`); "
                 "`mmkernels:<path>` is the same call with that path forced (`kernel`: our kernels).")
        L.append("")
        for (op, mode), cids in ops.items():
            peers = []
            for cid in cids:
                for p in cases[cid]:
                    if p != BASELINE and p not in peers:
                        peers.append(p)
            keys = list(cases[cids[0]][next(iter(cases[cids[0]]))]["shape"].keys())
            L.append(f"**{op}** ({mode})")
            L.append("")
            L += _head([*keys, "dtype", "mmkernels ms", "mmkernels extra", "% mm", "auto path",
                        *(f"vs {p}" for p in peers)])
            for cid in cids:
                provs = cases[cid]
                base = provs.get(BASELINE)
                row = _shape_cells(provs, keys)
                if base is not None and _ok(base):
                    pm = pct_of_mm(base, results)
                    row += [_ms(base["time_ms"]), fmt_bytes(base.get("mem_extra_bytes")),
                            f"{pm:.0f}%" if pm is not None else "-", path_label(base) or "-"]
                else:
                    why = base["status"] if base is not None else "not run"
                    row += [why, "-", "-", "-"]
                row += [_cell(provs.get(p), lambda r: _ratio_cell(r, base)) for p in peers]
                L.append("| " + " | ".join(row) + " |")
            L.append("")
        L.extend(_overhead_tables(ops, cases))

    # full tables, one per op
    for (op, mode), cids in ops.items():
        first = next(iter(cases[cids[0]].values()))
        keys = list(first["shape"].keys())
        L.append(f"## {op} ({mode}; FLOPs = {first.get('flops_formula') or '-'})")
        L.append("")
        L.append(
            "| " + " | ".join(keys) + " | dtype | provider | time ms | min ms | reps | extra memory | TFLOP/s | % mm | loss | speedup | memory ratio | status |"
        )
        L.append("|" + " --- |" * (len(keys) + 13))
        for cid in cids:
            provs = cases[cid]
            base = provs.get(BASELINE)
            for p, r in provs.items():
                s, m = ratios(r, base)
                pm = pct_of_mm(r, results)
                row = [str(r["shape"][k]) for k in keys] + [
                    DTYPE_SHORT.get(r["dtype"], r["dtype"]),
                    p,
                    _ms(r.get("time_ms")),
                    _ms(r.get("time_ms_min")),
                    str(r.get("reps") or "-"),
                    fmt_bytes(r.get("mem_extra_bytes")),
                    _num(r.get("tflops")),
                    f"{pm:.0f}%" if pm is not None else "-",
                    f"{r['loss']:.6g}" if r.get("loss") is not None else "-",
                    "base" if p == BASELINE and _ok(r) else _x(s),
                    "base" if p == BASELINE and _ok(r) else _x(m),
                    _status(r),
                ]
                L.append("| " + " | ".join(row) + " |")
        L.append("")

    probes = [r for r in results if r.get("rate_probe")]
    if probes:
        L.append("## torch.mm rate on this device")
        L.append("")
        L.append("| M | K | N | dtype | time ms | TFLOP/s | status |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in probes:
            sh = r["shape"]
            tf = _num(r.get("tflops"))
            dt = DTYPE_SHORT.get(r["dtype"], r["dtype"])
            L.append(f"| {sh['M']} | {sh['K']} | {sh['N']} | {dt} | {_ms(r.get('time_ms'))} | {tf} | {_status(r)} |")
        L.append("")

    seen = OrderedDict()
    for r in results:
        if not r.get("rate_probe") and r.get("note"):
            seen.setdefault((r["op"], r["provider"]), r["note"])
    if seen:
        L.append("## Providers")
        L.append("")
        for (op, p), note in seen.items():
            L.append(f"- `{p}` ({op}): {note}")
        L.append("")
    return "\n".join(L)


def write_markdown(path: str, env: dict, results: list, notes: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(markdown(env, results, notes))
        f.write("\n")
    os.replace(tmp, path)


def summary_text(env: dict, results: list, notes: list) -> str:
    """The summary section of the Markdown, for the end of the console output."""
    md = markdown(env, results, notes)
    start = md.find("## Summary")
    if start < 0:
        return ""
    end = md.find("\n## ", start + 5)
    return md[start : end if end > 0 else None].strip()


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------

_COLORS = {"mmkernels": "#d62728", "reference": "#1f77b4", "open_clip": "#2ca02c", "inf_cl": "#9467bd"}


def _si(v: float) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if v >= size and v % size == 0:
            return f"{v // size:d}{unit}"
    return f"{v:g}"


PLOT_COLUMNS = 4


def write_plot(path: str, env: dict, results: list) -> bool:
    """Time and extra memory against the x shape key, one column per (op, other dims, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in results:
        if r.get("rate_probe"):
            continue
        xk = r.get("x") or "N"
        rest = tuple((k, v) for k, v in r["shape"].items() if k != xk)
        groups.setdefault((r["op"], xk, rest, r["dtype"]), []).append(r)

    # one (time, memory) pair of panels per group, at most PLOT_COLUMNS pairs per row of the figure
    ncol = max(min(len(groups), PLOT_COLUMNS), 1)
    nrow = 2 * max(math.ceil(len(groups) / ncol), 1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(4.6 * ncol, 7.0), 4.2 * nrow), squeeze=False)
    for extra in range(len(groups), (nrow // 2) * ncol):  # unused panels of the last row
        axes[2 * (extra // ncol)][extra % ncol].axis("off")
        axes[2 * (extra // ncol) + 1][extra % ncol].axis("off")
    title = (
        f"mmkernels bench: {env.get('device_name')}\n"
        f"commit {str(env.get('git_commit'))[:10]}  |  {env.get('date')}  |  profile {env.get('profile', '?')}"
    )
    fig.suptitle(title, fontsize=10)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no measurements", ha="center", va="center")
    for index, ((op, xk, rest, dtype), recs) in enumerate(groups.items()):
        ax_t, ax_m = axes[2 * (index // ncol)][index % ncol], axes[2 * (index // ncol) + 1][index % ncol]
        provs = []
        for r in recs:
            if r["provider"] not in provs:
                provs.append(r["provider"])
        xs_all = sorted({r["shape"][xk] for r in recs})
        for i, p in enumerate(provs):
            pr = sorted((r for r in recs if r["provider"] == p), key=lambda r: r["shape"][xk])
            ok = [r for r in pr if _ok(r)]
            n_skip = len(pr) - len(ok)
            label = p + (f" ({n_skip} not run)" if n_skip else "")
            color = _COLORS.get(p, f"C{i + 4}")
            if ok:
                ax_t.plot([r["shape"][xk] for r in ok], [r["time_ms"] for r in ok], "o-", color=color, label=label)
                mem = [(r["shape"][xk], r["mem_extra_bytes"]) for r in ok if r.get("mem_extra_bytes") is not None]
                if mem:
                    ax_m.plot([m[0] for m in mem], [max(m[1], 1024) for m in mem], "o-", color=color, label=label)
            else:
                ax_t.plot([], [], "o-", color=color, label=label)
        dims = ", ".join(f"{k}={v}" for k, v in rest)
        ax_t.set_title(f"{op}  {dims}  {DTYPE_SHORT.get(dtype, dtype)}", fontsize=10)
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs_all)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _si(int(v))))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xk)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_ylabel("time (ms, median)")
        ax_t.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax_t.yaxis.set_minor_formatter(NullFormatter())
        ax_m.set_yscale("log", base=2)
        ax_m.set_ylabel("extra memory (peak - inputs - grads)")
        ax_m.yaxis.set_major_locator(LogLocator(base=2, subs=(1.0,), numticks=10))
        ax_m.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v).replace(".00 ", " ")))
        ax_m.yaxis.set_minor_formatter(NullFormatter())
        ax_t.legend(fontsize=8)
        if ax_m.lines:
            ax_m.legend(fontsize=8)
        else:
            ax_m.text(0.5, 0.5, "no memory numbers", ha="center", va="center", transform=ax_m.transAxes)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(out_dir: str, env: dict, results: list, notes: list, *, plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, RESULTS_JSON), "md": os.path.join(out_dir, RESULTS_MD)}
    write_json(paths["json"], env, results, notes)
    write_markdown(paths["md"], env, results, notes)
    if plot:
        paths["png"] = os.path.join(out_dir, PLOT_PNG)
        try:
            write_plot(paths["png"], env, results)
        except Exception as exc:  # a report without a plot beats no report
            print(f"plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            paths.pop("png")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bench.report RESULTS_JSON  (rewrites results.md and plot.png beside it)", file=sys.stderr)
        sys.exit(2)
    env, results, notes = read_json(sys.argv[1])
    out = write_all(os.path.dirname(os.path.abspath(sys.argv[1])), env, results, notes)
    print("\n".join(out.values()))
