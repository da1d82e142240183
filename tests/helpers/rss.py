"""Peak resident memory of one call, measured in a fresh subprocess (shared by the memory-bound tests).

``peak_extra(body, *args)`` runs ``body`` (Python source defining ``setup(*args) -> state`` and
``run(state)``) in a new interpreter with glibc told to return every allocation >= 64 KiB to the
OS, so RSS follows live tensors. ``run`` is called once to warm up at full size (allocator pools,
BLAS workspaces, thread pools), then the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``), and the peak growth of a second call over the RSS before it is
returned in bytes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_DRIVER = textwrap.dedent("""
    import gc, json, sys

    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key + " not in /proc/self/status")

    exec(sys.argv[1])
    state = setup(*sys.argv[2:])
    run(state)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    result = run(state)
    print(json.dumps({"extra": _status("VmHWM") - base, "result": result}))
""")


def peak_extra(body: str, *args) -> dict:
    """``{"extra": bytes, "result": run's return value}`` for the second call of ``run``."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _DRIVER, textwrap.dedent(body), *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
