"""Regenerate the dispatch tables (``mmkernels/<family>/dispatch_table.py``) from benchmark runs.

    python -m bench.dispatch_table bench/results/RUN [RUN ...]          # print the new tables
    python -m bench.dispatch_table bench/results/RUN --write            # and rewrite the files
    python -m bench --dispatch-table bench/results/RUN [--write]        # the same

For each bench row of a dispatched op (a case: op, shape, dtype, on one device) the time of each
path comes from the ``mmkernels:<path>`` providers (the op with that path forced; ``mmkernels``
itself adds the path ``auto`` took). Runs recorded before those providers existed stand in with
peers that run the same PyTorch computation as a path (``LEGACY_PROXIES``: OpenCLIP's loss for
``materialized``, compiled FlexAttention for ``flex``...); the row's source says so. Rows are
grouped by (op, device kind, dtype, shape class); a group's order ranks the paths by the geometric
mean, over its cases, of each path's time over the case's fastest. Paths the runs did not measure
keep their place in the old row (a prior from how the path is built), the measured ones fill the
other places in measured order, and ``kernel`` is always kept.
Groups the runs do not cover keep their rows.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pprint
import sys
from collections import OrderedDict, defaultdict
from typing import Optional

from bench.harness import BASELINE, REPO_ROOT

#: bench op -> (family, dispatched op)
DISPATCHED = {
    "contrastive_loss": ("contrastive", "contrastive_loss"),
    "infonce_loss": ("contrastive", "infonce_loss"),
    "siglip_loss": ("contrastive", "siglip_loss"),
    # one rank's local loss: two infonce_loss calls of n queries against W * n keys
    "clip_local_loss": ("contrastive", "infonce_loss"),
    "albef_itc": ("contrastive", "itc_loss"),
    "blip2_itc": ("contrastive", "itc_loss"),
    "itm_negatives": ("contrastive", "itc_negatives"),
    "attention_fwd_bwd": ("attention", "multimodal_attention"),
    "attention_fwd": ("attention", "multimodal_attention"),
    "cross_attention": ("cross_attention", "cross_attention"),
    "modality_ffn": ("experts", "modality_ffn"),
    "modality_linear": ("experts", "modality_linear"),
}

#: runs without ``mmkernels:<path>`` providers: the peer that computes what a path computes
#: (``mmkernels`` there ran the kernels). Per bench op; a callable gets the row's shape.
LEGACY_PROXIES = {
    "contrastive_loss": {BASELINE: "kernel", "open_clip": "materialized"},
    "infonce_loss": {BASELINE: "kernel"},
    "attention_fwd_bwd": {BASELINE: "kernel", "flex": "flex", "sdpa_flash": "sdpa"},
    "attention_fwd": {BASELINE: "kernel", "flex": "flex", "sdpa_flash": "sdpa"},
    "cross_attention": {BASELINE: "kernel", "sdpa_flash": "sdpa", "sdpa_efficient": "sdpa",
                        "sdpa_cudnn": "sdpa", "sdpa_math": "sdpa"},
    "modality_ffn": {BASELINE: "kernel", "grouped_mm": "grouped_mm", "torchscale": "batched"},
    "modality_linear": {BASELINE: "kernel", "grouped_mm": "grouped_mm", "torchscale": "batched"},
}

_ATTENTION_MASK_KINDS = {"full": "none", "causal": "causal", "packed": "packed", "padding": "key_padding",
                         "key_padding": "key_padding"}
_SPLIT_LAYOUTS = ("vlmo", "beit3")


def shape_class(op: str, shape: dict) -> str:
    """The shape class of a bench row, from the family's own ``paths.shape_class``."""
    family, _ = DISPATCHED[op]
    if op == "clip_local_loss":
        from mmkernels.contrastive.paths import shape_class as cls
        return cls(shape["n"], shape["n"] * shape["W"], shape["D"])
    if family == "contrastive":
        from mmkernels.contrastive.paths import shape_class as cls
        if DISPATCHED[op][1].startswith("itc_"):  # bench/cases/itc.py names their sizes
            from bench.cases.itc import dispatch_dims
            return cls(*dispatch_dims(op, shape))
        return cls(shape["N"], shape.get("M", shape["N"]), shape["D"])
    if family == "attention":
        from mmkernels.attention.paths import shape_class as cls
        kind = _ATTENTION_MASK_KINDS.get(str(shape["mask"]).split(":")[0], "multimodal")
        return cls(kind, shape["S"], shape["S"], shape["D"])
    if family == "cross_attention":
        from mmkernels.cross_attention.paths import shape_class as cls
        return cls(shape["Lq"], shape["Lk"], shape["D"], False)
    from mmkernels.experts.grouped_mm.paths import shape_class as cls
    layout = "split" if str(shape["layout"]).split(":")[0] in _SPLIT_LAYOUTS else "ids"
    h = shape.get("H", shape.get("Hin"))
    f = shape.get("F", shape.get("Hout"))
    return cls(layout, shape["B"] * shape["S"], h, f)


def device_kind(env: dict) -> str:
    """The dispatch device kind of a run (``cpu``, ``cuda-sm90``, ``cuda``)."""
    if str(env.get("device", "cpu")).startswith("cuda"):
        cap = str((env.get("gpu") or {}).get("capability", ""))
        if not cap and "H100" in str(env.get("device_name", "")) + str(env.get("gpu", "")):
            cap = "9.0"
        if not cap and "H200" in str(env.get("device_name", "")) + str(env.get("gpu", "")):
            cap = "9.0"
        return "cuda-sm90" if cap.startswith("9.") else "cuda"
    return "cpu"


def _results_file(folder: str) -> str:
    if os.path.isfile(folder):
        return folder
    for name in sorted(os.listdir(folder)):
        if name.startswith("results") and name.endswith(".json"):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no results*.json in {folder}")


def path_times(rows: list) -> tuple[dict, set]:
    """``{path: time_ms}`` of one case's records (ok only), and the proxies used."""
    times, proxies = {}, set()
    forced = {r["provider"][len(BASELINE) + 1:]: r for r in rows
              if r["provider"].startswith(BASELINE + ":") and r["status"] == "ok"}
    if any(r["provider"].startswith(BASELINE + ":") for r in rows):
        for path, r in forced.items():
            times[path] = r["time_ms"]
        return times, proxies
    op = rows[0]["op"]
    for r in rows:
        path = LEGACY_PROXIES.get(op, {}).get(r["provider"])
        if path is None or r["status"] != "ok":
            continue
        if path == "sdpa" and op.startswith("attention") and not str(r["shape"].get("mask", "")).startswith(
                ("causal", "full")):
            continue  # a masked SDPA peer takes a dense mask: not what the sdpa path runs
        if path not in times or r["time_ms"] < times[path]:
            times[path] = r["time_ms"]
        if r["provider"] != BASELINE:
            proxies.add(f"{r['provider']} for {path}")
    return times, proxies


def measured_orders(folders: list) -> dict:
    """``{family: {(op, kind, dtype, class): (order, source)}}`` from the runs in ``folders``."""
    groups = defaultdict(lambda: {"ratios": defaultdict(list), "cases": [], "proxies": set(), "runs": set()})
    for folder in folders:
        with open(_results_file(folder)) as fh:
            data = json.load(fh)
        kind = device_kind(data["env"])
        run = os.path.basename(os.path.normpath(folder if os.path.isdir(folder) else os.path.dirname(folder)))
        by_case = OrderedDict()
        for r in data["results"]:
            if r["op"] in DISPATCHED:
                by_case.setdefault(r["case"], []).append(r)
        for cid, rows in by_case.items():
            times, proxies = path_times(rows)
            if not times:
                continue
            family, op = DISPATCHED[rows[0]["op"]]
            key = (family, op, kind, rows[0]["dtype"], shape_class(rows[0]["op"], rows[0]["shape"]))
            g = groups[key]
            best = min(times.values())
            for path, t in times.items():
                g["ratios"][path].append(t / best)
            g["cases"].append(cid)
            g["proxies"] |= proxies
            g["runs"].add(run)
    out = defaultdict(dict)
    for (family, op, kind, dtype, cls), g in groups.items():
        score = {p: math.exp(sum(math.log(x) for x in v) / len(v)) for p, v in g["ratios"].items()}
        order = tuple(sorted(score, key=lambda p: (score[p], p != "kernel")))
        source = f"{', '.join(sorted(g['runs']))}: {len(g['cases'])} case(s)"
        if g["proxies"]:
            source += "; proxies: " + ", ".join(sorted(g["proxies"]))
        out[family][(op, kind, dtype, cls)] = (order, source)
    return out


def current_table(family: str) -> dict:
    module = importlib.import_module(f"mmkernels.{family}.dispatch_table")
    importlib.reload(module)
    return dict(module.TABLE)


def merged_table(family: str, measured: dict) -> dict:
    """The family's table with the measured rows put in (unmeasured paths of an old row kept
    after the measured ones; ``kernel`` always present)."""
    table = current_table(family)
    for key, (order, source) in measured.items():
        old = table.get(key) or _fallback_row(table, key)
        table[key] = (merge_order(tuple(old[0]) if old else (), tuple(order)), source)
    return table


def merge_order(old: tuple, measured: tuple) -> tuple:
    """``old`` with the slots of the measured paths refilled in ``measured`` order: a path the
    run did not measure keeps its place (its prior), measured ones take the run's ranking;
    measured paths ``old`` lacks, then ``kernel``, go last."""
    pending = list(measured)
    out = [p if p not in measured else pending.pop(0) for p in old]
    out += [p for p in pending if p not in out]
    if "kernel" not in out:
        out.append("kernel")
    return tuple(out)


def _fallback_row(table: dict, key: tuple) -> Optional[tuple]:
    op, kind, dtype, cls = key
    for k in (kind, "cuda" if kind.startswith("cuda") else kind, "*"):
        for c in (cls, "*"):
            for d in (dtype, "*"):
                for o in (op, "*"):
                    if (o, k, d, c) in table:
                        return table[(o, k, d, c)]
    return None


def render(family: str, table: dict) -> str:
    """The text of ``mmkernels/<family>/dispatch_table.py`` for ``table``."""
    module = importlib.import_module(f"mmkernels.{family}.dispatch_table")
    doc = module.__doc__.strip("\n")
    lines = [f'"""{doc}\n"""', "", "TABLE = {"]
    for key in sorted(table, key=lambda k: tuple("~" if x == "*" else x for x in k)):
        order, source = table[key]
        lines.append(f"    {key!r}:")
        lines.append(f"        ({tuple(order)!r}, {source!r}),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def table_path(family: str) -> str:
    return os.path.join(REPO_ROOT, "mmkernels", family, "dispatch_table.py")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dispatch_table", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="results folders (or results*.json files)")
    ap.add_argument("--write", action="store_true", help="rewrite mmkernels/<family>/dispatch_table.py")
    args = ap.parse_args(argv)
    measured = measured_orders(args.runs)
    if not measured:
        print("no dispatched op with path timings in these runs", file=sys.stderr)
        return 1
    for family, rows in measured.items():
        text = render(family, merged_table(family, rows))
        if args.write:
            with open(table_path(family), "w") as fh:
                fh.write(text)
            print(f"wrote {table_path(family)} ({len(rows)} measured row(s))")
        else:
            print(f"# {table_path(family)}")
            pprint.pprint(rows, width=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
