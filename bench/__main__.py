"""python -m bench: run the benchmark suite and write results.json, results.md, plot.png.

Examples::

    python -m bench                         # every family, full sizes, default device
    python -m bench --quick                 # the short suite (GPU: N 4096/32768, D 768 + mm probe)
    python -m bench --family contrastive --device cpu --out /tmp/b
    python -m bench --providers reference,mmkernels --size N=4096,8192 --size D=512
    python -m bench --list                  # the plan, without running it
    python -m bench --family models --op train_clip --quick --device cpu   # one model's training step
    python -m bench --family experts --profile pytest --device cpu   # one family at tiny sizes
    python -m bench --dispatch-table bench/results/RUN --write       # regenerate the dispatch tables

Exit status: 0 when the run completed (skips and peer failures are results),
3 when an mmkernels measurement failed with an error, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import sys
import time

import torch

from bench import harness, report
from bench.cases import FAMILIES, PROFILES, collect, notes as family_notes


def _sizes(values: list) -> dict:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--size wants KEY=V1,V2 (got {item!r})")
        k, v = item.split("=", 1)
        out[k.strip()] = [int(x) for x in v.split(",") if x.strip()]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short suite (same as --profile quick)")
    ap.add_argument("--profile", choices=PROFILES, default=None, help="size profile (default full; pytest = tiny CPU sizes)")
    ap.add_argument("--family", action="append", default=None, help=f"op family, repeatable or comma-separated (default: all of {', '.join(FAMILIES)})")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/<timestamp>)")
    ap.add_argument("--op", default=None, help="comma-separated ops to run (e.g. train_clip); default: all of the families'")
    ap.add_argument("--providers", default=None, help="comma-separated providers to run (torch.mm probes always run)")
    ap.add_argument("--size", action="append", default=None, metavar="KEY=V1,V2", help="override a shape list, e.g. N=4096,8192 or D=768")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S", help="start no new measurement after S seconds (results so far are kept)")
    iso = ap.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None, help="one subprocess per measurement (default on CPU: needed for memory numbers)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="measure in this process (CPU: no memory numbers)")
    ap.add_argument("--timeout", type=float, default=900.0, metavar="S", help="limit per isolated measurement (default 900)")
    ap.add_argument("--threads", type=int, default=None, metavar="T", help="torch CPU threads (default: torch's default)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--dispatch-table", metavar="RUN", help="(first argument) regenerate the dispatch "
                    "tables from results folders: python -m bench --dispatch-table RUN... [--write]")
    args = ap.parse_args(argv)
    if args.profile is None:
        args.profile = "quick" if args.quick else "full"
    elif args.quick and args.profile != "quick":
        ap.error("--quick conflicts with --profile " + args.profile)
    fams = []
    for f in args.family or list(FAMILIES):
        fams.extend(x.strip() for x in f.split(",") if x.strip())
    for f in fams:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}; known: {', '.join(FAMILIES)}")
    args.family = fams
    args.providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    args.op = {o.strip() for o in args.op.split(",") if o.strip()} if args.op else None
    try:
        args.size = _sizes(args.size)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        ap.error(str(exc))
    if args.device is None:
        args.device = harness.default_device()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    if args.isolate is None:
        args.isolate = args.device == "cpu"
    return args


class _Terminated(Exception):
    pass


def _on_sigterm(signum, _frame):
    raise _Terminated(f"signal {signum}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--dispatch-table"]:
        from bench import dispatch_table
        return dispatch_table.main(argv[1:])
    args = parse_args(argv)
    cases = collect(args.family, args.device, args.profile, args.size)
    if args.op is not None:
        unknown = args.op - {c.op for c in cases}
        if unknown:
            print(f"--op: no case of the chosen families and profile is {sorted(unknown)}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.op in args.op]
    pairs = harness.plan(cases, args.providers)
    notes = family_notes(args.family, args.device, args.profile)

    if args.list:
        for case, prov in pairs:
            print(f"{case.id:<44} {prov.name}")
        print(f"{len(pairs)} measurements on {args.device} (profile {args.profile})")
        return 0

    out_dir = args.out or os.path.join(
        harness.REPO_ROOT, "bench", "out", _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    os.makedirs(out_dir, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = harness.environment(args.device)
    env["profile"] = args.profile
    env["families"] = args.family
    opts = harness.RunOptions(isolate=args.isolate, timeout_s=args.timeout, threads=args.threads)
    if args.profile == "quick":
        opts.budget_ms, opts.cpu_budget_ms = 500.0, 2000.0

    print(f"bench: {len(pairs)} measurements on {env['device_name']} ({args.device}, profile {args.profile}"
          f"{', one subprocess each' if args.isolate else ''}) -> {out_dir}", flush=True)
    for n in notes:
        print(f"  note: {n}", flush=True)

    t_start = time.monotonic()
    deadline = t_start + args.time_budget if args.time_budget else None
    results: list = []
    old = signal.signal(signal.SIGTERM, _on_sigterm)

    def save(res):
        results[:] = res
        report.write_json(os.path.join(out_dir, report.RESULTS_JSON), env, res, notes)
        report.write_markdown(os.path.join(out_dir, report.RESULTS_MD), env, res, notes)

    try:
        harness.run(
            cases,
            opts,
            providers=args.providers,
            deadline=deadline,
            on_result=save,
            log=lambda s: print(s, flush=True),
        )
    except (KeyboardInterrupt, _Terminated) as exc:
        env["interrupted"] = str(exc) or type(exc).__name__
        print(f"bench: interrupted ({env['interrupted']}); writing partial results", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
        env["wall_s"] = round(time.monotonic() - t_start, 1)
        env["loadavg_end"] = harness._loadavg()
        if env.get("gpu"):
            env["gpu"]["state_end"] = harness.gpu_state()
        paths = report.write_all(out_dir, env, results, notes, plot=not args.no_plot)

    print()
    summary = report.summary_text(env, results, notes)
    if summary:
        print(summary)
        print()
    for kind, p in paths.items():
        print(f"wrote {p}")
    n_ok = sum(r["status"] == "ok" for r in results)
    n_skip = sum(r["status"] == "skipped" for r in results)
    n_err = sum(r["status"] == "error" for r in results)
    print(f"bench: {n_ok} ok, {n_skip} skipped, {n_err} errors in {env['wall_s']} s")
    if any(r["status"] == "error" and r["provider"] == harness.BASELINE for r in results):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
