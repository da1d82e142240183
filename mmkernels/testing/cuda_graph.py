"""CUDA-graph capture for the GPU tiers of the tests (one helper for every family)."""
from __future__ import annotations

import torch


def capture(step):
    """``(graph, outputs)`` of ``step()`` captured in a CUDA graph, after two warm-up calls on a
    side stream (compilation and allocator warm-up stay outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def sync_free(step):
    """``step()`` run under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation
    inside it raises. A first call outside the check warms up (Triton compilation, allocator),
    as a model's first step would; the checked second call's outputs are returned."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
