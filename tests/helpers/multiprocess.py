"""Run a function on several processes joined by torch.distributed (gloo over the loopback
address, a free port), bounded in time; each rank's return value comes back to the test.

``run_ranks(world_size, fn, *args)``: ``fn(rank, world_size, *args)`` must be a module-level
function (the ranks are spawned); its result is saved with ``torch.save`` and returned as a list
in rank order. A rank that raises fails the call with its traceback; a run past ``timeout``
seconds is killed and raises ``TimeoutError``.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, folder: str, args: tuple) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(folder, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, folder, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        errors = []
        for r in range(world_size):
            path = os.path.join(folder, f"{r}.err")
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(f"rank {r}:\n{f.read()}")
        if errors:
            raise RuntimeError("\n".join(errors))
        if alive:
            raise TimeoutError(f"{len(alive)} of {world_size} ranks still ran after {timeout} s")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks exited with errors: {bad}")
        return [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(world_size)]
