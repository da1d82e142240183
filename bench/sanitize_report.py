"""The record of one ``bench/gpu_sanitize.sh`` run: ``sanitizer.md``, one file.

::

    python -m bench.sanitize_report --work DIR --out OUT/sanitizer.md [--sanitizer PATH --version TEXT]

``DIR`` holds, for each step (``plain``, then one per compute-sanitizer tool), what the script
left: ``<step>.meta`` (``key=value`` lines: ``rc``, ``seconds``, ``limit``, ``command``, and
``skip``, the status of a step that did not run, e.g. ``not run (dry run)``), ``<step>.log``
(the run's output: the sanitizer's report and the driver's lines) and ``<step>.json`` (the
summary ``python -m bench.sanitize_cases --json`` wrote). The record gives, per step, a
status (``pass``, ``fail``, ``timeout``, ``sanitizer unavailable: <message>`` or the skip),
the sanitizer's error count, its first reports, the cases and the kernels launched; a JSON
block at its end holds the same for programs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

FIRST_REPORT_LINES = 40
TAIL_LINES = 15  # of the log of a step that failed or timed out

_SUMMARY_ERRORS = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
# the sanitizer refusing the device or failing itself, as opposed to reporting the program
_UNAVAILABLE = re.compile(r"Device not supported|not supported on this|Internal Sanitizer Error|"
                          r"Unable to (?:start|connect|find)|Failed to (?:initialize|connect|launch)|"
                          r"(?:tool|injection) .*not (?:found|load)|error 999", re.IGNORECASE)
_PREFIX = "========="


@dataclass
class Step:
    """One step of the script: its tool, what ran and what came of it."""

    name: str
    status: str = ""
    errors: int | None = None  # the sanitizer's count (None: no summary line)
    warnings: int | None = None
    rc: int | None = None
    seconds: float | None = None
    limit: float | None = None
    command: str = ""
    cases_ok: int = 0
    cases: int = 0
    failed_cases: list[str] = field(default_factory=list)
    launches: dict[str, int] = field(default_factory=dict)
    never_launched: list[str] | None = None
    first_reports: list[str] = field(default_factory=list)
    driver_errors: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)


def _meta(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _number(text: str | None, kind=float):
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


def sanitizer_reports(log: str) -> list[str]:
    """The sanitizer's own report lines (``=========`` prefix), without its banner, blank
    lines and summary."""
    out = []
    for line in log.splitlines():
        if not line.startswith(_PREFIX):
            continue
        body = line[len(_PREFIX):].strip()
        if not body or body == "COMPUTE-SANITIZER" or "SUMMARY:" in body:
            continue
        out.append(line.rstrip())
    return out


def error_counts(log: str) -> tuple[int | None, int | None]:
    """(errors, warnings) from the sanitizer's summary lines (None where it printed none)."""
    errors = warnings = None
    for m in _SUMMARY_ERRORS.finditer(log):
        errors = max(errors or 0, int(m.group(1)))
    for m in _RACE_SUMMARY.finditer(log):
        errors = max(errors or 0, int(m.group(1)))
        warnings = max(warnings or 0, int(m.group(2)))
    return errors, warnings


def read_step(work: Path, name: str) -> Step:
    """The :class:`Step` ``name`` from what the script left in ``work``."""
    meta = _meta(work / f"{name}.meta")
    log_path, json_path = work / f"{name}.log", work / f"{name}.json"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    step = Step(name, rc=_number(meta.get("rc"), int), seconds=_number(meta.get("seconds")),
                limit=_number(meta.get("limit")), command=meta.get("command", ""))
    if meta.get("skip"):
        step.status = meta["skip"]
        return step
    driver = {}
    if json_path.exists():
        try:
            driver = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            driver = {}
    cases = driver.get("cases", [])
    step.cases = len(cases)
    step.cases_ok = sum(c["status"] == "ok" for c in cases)
    step.failed_cases = [c["name"] for c in cases if c["status"] != "ok"]
    step.driver_errors = [f"{c['name']}: {c['error'].strip().splitlines()[-1]}" for c in cases
                          if c.get("error", "").strip()]
    step.launches = driver.get("launches", {})
    step.never_launched = driver.get("never_launched")
    step.errors, step.warnings = error_counts(log)
    reports = sanitizer_reports(log)
    step.first_reports = reports[:FIRST_REPORT_LINES]
    step.status = _status(step, log, reports, driver)
    if not passed(step.status):
        step.tail = [line.rstrip() for line in log.splitlines() if line.strip()][-TAIL_LINES:]
    return step


def _status(step: Step, log: str, reports: list[str], driver: dict) -> str:
    if step.rc in (124, 137):
        return "timeout"
    refused = [r for r in reports if _UNAVAILABLE.search(r)]
    if refused and not step.cases_ok:
        message = refused[0][len(_PREFIX):].strip()
        return f"sanitizer unavailable: {message}"
    if step.rc is None:
        return "fail: no exit status (the step did not finish)"
    why = []
    if step.errors:
        why.append(f"{step.errors} sanitizer error(s)")
    if step.failed_cases:
        why.append(f"cases failed: {', '.join(step.failed_cases)}")
    if step.never_launched:
        why.append(f"never launched: {', '.join(step.never_launched)}")
    if driver.get("error"):
        why.append(f"driver: {driver['error']}")
    elif not driver:
        why.append("the driver wrote no summary")
    if step.rc != 0 and not why:
        why.append(f"exit status {step.rc}")
    return "fail: " + "; ".join(why) if why else "pass"


def passed(status: str) -> bool:
    """Whether a step's status is no failure (a pass, a skip, an unavailable sanitizer)."""
    return not (status.startswith("fail") or status == "timeout")


def exit_status(statuses: list[str]) -> int:
    """The script's exit status, a sum of: 1 a step failed (a sanitizer error, a failing case,
    a kernel never launched); 2 a step timed out."""
    return (1 if any(st.startswith("fail") for st in statuses) else 0) + \
        (2 if "timeout" in statuses else 0)


def render(steps: list[Step], header: dict[str, str]) -> str:
    """The Markdown record."""
    lines = ["# compute-sanitizer over every Triton kernel (bench/gpu_sanitize.sh)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if v]
    lines += ["", "| step | status | sanitizer errors | cases ok | kernels launched | time (s) | limit (s) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    n_kernels = header.get("kernels", "")
    for s in steps:
        errors = "" if s.errors is None else str(s.errors) + (f" (+{s.warnings} warnings)" if s.warnings else "")
        cases = f"{s.cases_ok}/{s.cases}" if s.cases else ""
        launched = f"{len(s.launches)}/{n_kernels}" if s.launches else ""
        lines.append(f"| {s.name} | {s.status} | {errors} | {cases} | {launched} | "
                     f"{'' if s.seconds is None else round(s.seconds)} | {'' if s.limit is None else round(s.limit)} |")
    for s in steps:
        if s.first_reports:
            lines += ["", f"## {s.name}: the sanitizer's first reports", "", "```text", *s.first_reports, "```"]
        if s.driver_errors:
            lines += ["", f"## {s.name}: failed cases", "", "```text", *s.driver_errors, "```"]
        if s.tail:
            lines += ["", f"## {s.name}: the end of its log", "", "```text", *s.tail, "```"]
        if s.never_launched:
            lines += ["", f"## {s.name}: kernels never launched (add a case to bench/sanitize_cases.py)", "",
                      ", ".join(s.never_launched)]
    ran = [s for s in steps if s.launches]
    if ran:
        names = sorted({k for s in ran for k in s.launches})
        lines += ["", "## Launches per kernel", "",
                  "| kernel | " + " | ".join(s.name for s in ran) + " |",
                  "| --- |" + " --- |" * len(ran)]
        lines += [f"| {k} | " + " | ".join(str(s.launches.get(k, 0)) for s in ran) + " |" for k in names]
    commands = [s for s in steps if s.command]
    if commands:
        lines += ["", "## Commands", "", "```bash", *(s.command for s in commands), "```"]
    record = {"header": header, "steps": [asdict(s) for s in steps]}
    lines += ["", "## Record", "", "```json", json.dumps(record, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sanitize_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the folder the script's steps wrote to")
    p.add_argument("--out", required=True, help="the record to write (sanitizer.md)")
    p.add_argument("--steps", default="plain memcheck racecheck", help="the steps, in order")
    p.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                   help="a line of the record's header (repeatable)")
    args = p.parse_args(argv)
    work = Path(args.work)
    steps = [read_step(work, name) for name in args.steps.split()]
    header = dict(h.partition("=")[::2] for h in args.header)
    driver = next((json.loads((work / f"{s.name}.json").read_text()) for s in steps
                   if (work / f"{s.name}.json").exists()), {})
    if driver:
        header.setdefault("driver device", driver.get("device", ""))
        header.setdefault("torch / triton", f"{driver.get('torch', '')} / {driver.get('triton', '')}")
        header["kernels"] = str(len(driver.get("kernels", {})))
    Path(args.out).write_text(render(steps, header))
    for s in steps:
        print(f"{s.name}: {s.status}")
    return exit_status([s.status for s in steps])


if __name__ == "__main__":
    sys.exit(main())
