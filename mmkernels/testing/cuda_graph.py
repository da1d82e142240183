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
