"""Communication the multi-process losses share, on ``torch.distributed`` only (NCCL on CUDA
tensors, gloo on CPU tensors).

* :func:`resolve`: the process group, this process's rank and the world size, checked against
  what a drop-in's constructor was told.
* :func:`check_equal_rows`: every rank's batch has as many rows as this one (a ``ValueError`` on
  CPU; an asynchronous device assert on CUDA, so no host synchronisation).
* :func:`all_gather`: the ranks' ``[n, D]`` tensors stacked to ``[W * n, D]``, with the backward
  a loss needs: the sum of every rank's gradient (``"sum"``, reduce-scatter), the own slice only
  (``"local"``) or none.
* :func:`broadcast`: one rank's tensor on every rank; its backward sums the gradients on it.
* :class:`Ring`: neighbour exchanges (``batch_isend_irecv``) for passing blocks around the ranks
  while the current block is computed, forward and backward (:func:`ring_forward`,
  :func:`ring_backward`), holding a bounded number of blocks whatever the world size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist


# the single-tensor collectives' names in newer torch (the older names are deprecated there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def resolve(group=None, rank: int | None = None, world_size: int | None = None):
    """``(group, rank, world_size)`` of ``group`` (None: the default group).

    ``rank`` / ``world_size``, when given (an OpenCLIP-style constructor's arguments), must
    equal the group's: a mismatch would silently pair the wrong rows.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("this loss runs on several processes: initialise torch.distributed "
                           "first (torch.distributed.init_process_group), or use world_size=1")
    g = group if group is not None else dist.group.WORLD
    r, w = dist.get_rank(g), dist.get_world_size(g)
    if world_size is not None and int(world_size) != w:
        raise ValueError(f"world_size={world_size} but the process group has {w} ranks")
    if rank is not None and int(rank) != r:
        raise ValueError(f"rank={rank} but this process is rank {r} of its process group")
    return g, r, w


def check_backend(x: torch.Tensor, group) -> None:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones through the host)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and x.device.type != "cuda":
        raise ValueError(f"the process group's backend is NCCL but the features are on {x.device}; "
                         "use CUDA tensors (or a gloo group for CPU tensors)")


def check_equal_rows(x: torch.Tensor, name: str, group, world_size: int) -> None:
    """Every rank's ``x`` has ``x.shape[0]`` rows (the losses pair row i of rank r with global row
    ``r * n + i``, so unequal batches would pair the wrong rows)."""
    n = torch.full((1,), x.shape[0], dtype=torch.int64, device=x.device)
    sizes = torch.empty(world_size, dtype=torch.int64, device=x.device)
    _all_gather_single(sizes, n, group=group)
    if x.device.type == "cpu":
        got = sizes.tolist()
        if any(s != got[0] for s in got):
            raise ValueError(f"every rank needs the same number of {name} rows; the ranks have "
                             f"{got} (drop the last incomplete batch, e.g. DataLoader(drop_last=True))")
    else:
        torch._assert_async((sizes == n).all(), f"every rank needs the same number of {name} rows")


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world_size: int, grad: str):
        ctx.group, ctx.rank, ctx.world_size, ctx.grad = group, rank, world_size, grad
        x = x.contiguous()
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.grad == "none":
            return None, None, None, None, None
        n = g.shape[0] // ctx.world_size
        if ctx.grad == "local":
            return g[ctx.rank * n:(ctx.rank + 1) * n], None, None, None, None
        g = g.contiguous()
        if "nccl" in str(dist.get_backend(ctx.group)).lower():
            out = g.new_empty((n, *g.shape[1:]))
            _reduce_scatter_single(out, g, group=ctx.group)
            return out, None, None, None, None
        # gloo has no reduce-scatter: a sum over all ranks, then this rank's slice
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * n:(ctx.rank + 1) * n], None, None, None, None


def all_gather(x: torch.Tensor, group, rank: int, world_size: int, grad: str = "sum") -> torch.Tensor:
    """``[W * n, ...]``: every rank's ``x [n, ...]`` in rank order. ``grad``: the backward gives
    ``x`` the sum of all ranks' gradients of its slice (``"sum"``, as
    ``torch.distributed.nn.all_gather``), this rank's gradient of its slice (``"local"``), or
    nothing (``"none"``)."""
    if grad not in ("sum", "local", "none"):
        raise ValueError(f"grad must be 'sum', 'local' or 'none', got {grad!r}")
    return _AllGather.apply(x, group, rank, world_size, grad)


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, src: int, group, rank: int):
        ctx.src, ctx.group, ctx.rank = src, group, rank
        out = x.detach().clone().contiguous() if rank == src else torch.empty_like(x).contiguous()
        dist.broadcast(out, dist.get_global_rank(group, src), group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.reduce(g, dist.get_global_rank(ctx.group, ctx.src), group=ctx.group)
        return (g if ctx.rank == ctx.src else torch.zeros_like(g)), None, None, None


def broadcast(x: torch.Tensor, src: int, group, rank: int) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank (``x`` of the same shape everywhere); the backward
    sums every rank's gradient into ``src``'s ``x``."""
    return _Broadcast.apply(x, src, group, rank)


class Ring:
    """Neighbour exchanges within ``group``: direction ``+1`` sends to the next rank and receives
    from the previous one, ``-1`` the reverse."""

    def __init__(self, group, rank: int, world_size: int):
        self.group, self.rank, self.size = group, rank, world_size
        self._nccl = "nccl" in str(dist.get_backend(group)).lower()

    def _peer(self, step: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + step) % self.size)

    def shift(self, pairs: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> list:
        """Post, in one batch, for each ``(direction, send, recv)``: ``send`` to the neighbour in
        ``direction`` and ``recv`` from the one opposite. Returns the requests to wait on."""
        if not pairs:
            return []
        if self.size == 1:
            for _, send, recv in pairs:
                recv.copy_(send)
            return []
        if not self._nccl:
            # gloo: plain asynchronous sends and receives (each rank posts them in one order)
            works = []
            for tag, (direction, send, recv) in enumerate(pairs):
                works.append(dist.isend(send, self._peer(direction), self.group, tag))
                works.append(dist.irecv(recv, self._peer(-direction), self.group, tag))
            return works
        ops = []
        for tag, (direction, send, recv) in enumerate(pairs):
            ops.append(dist.P2POp(dist.isend, send, self._peer(direction), self.group, tag))
            ops.append(dist.P2POp(dist.irecv, recv, self._peer(-direction), self.group, tag))
        # NCCL: one group per exchange, so no rank's send waits on a receive posted later
        return dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for w in works:
        w.wait()


def ring_forward(ring: Ring, block: torch.Tensor, steps: dict[int, int],
                 fn: Callable[[int, int, torch.Tensor], None], *,
                 block_is_scratch: bool = False) -> dict[int, torch.Tensor]:
    """Visit this rank's ``block`` and, for each direction ``d`` of ``steps`` (``{d: T_d}``), the
    blocks of the ranks ``d * 1, ..., d * T_d`` behind it (direction +1 visits the previous
    ranks' blocks, which travel forward). ``fn(direction, step, block)`` runs on each (step 0:
    the own block, direction 0) while the next blocks are already in flight. Holds two blocks per
    direction (``block_is_scratch``: ``block`` is the caller's temporary, reused as one of them
    once sent). Returns each direction's last block (what :func:`ring_backward` starts from)."""
    block = block.contiguous()
    cur = {d: block for d in steps}
    nxt = {d: torch.empty_like(block) for d in steps if steps[d] > 0}
    t_max = max(steps.values(), default=0)
    works = ring.shift([(d, cur[d], nxt[d]) for d in steps if steps[d] >= 1])
    fn(0, 0, block)
    for t in range(1, t_max + 1):
        _wait(works)
        active = [d for d in steps if steps[d] >= t]
        for d in active:
            fresh = cur[d] is block and not (block_is_scratch and len(steps) == 1)
            cur[d], nxt[d] = nxt[d], (torch.empty_like(block) if fresh else cur[d])
        works = ring.shift([(d, cur[d], nxt[d]) for d in active if steps[d] >= t + 1])
        for d in active:
            fn(d, t, cur[d])
    _wait(works)
    return {d: cur[d] for d in steps}


def ring_backward(ring: Ring, last: dict[int, torch.Tensor], steps: dict[int, int],
                  grad_fn: Callable[[int, int, torch.Tensor], Sequence[torch.Tensor]]
                  ) -> torch.Tensor | None:
    """The reverse of :func:`ring_forward`'s visits other than the own block: from each
    direction's last block back to step 1, blocks travel back towards their owners, and with
    them the sum of the gradients every rank computed for them. ``grad_fn(direction, step,
    block)`` returns this rank's gradient of the block as parts (float32) whose concatenation
    along dim 0 has the block's shape. Holds, per direction, two blocks and two float32 sums.
    Returns the sum that reached this rank for its own block (None when there are no other
    ranks' blocks)."""
    t_max = max(steps.values(), default=0)
    if t_max == 0:
        return None
    cur = dict(last)
    nxt = {d: torch.empty_like(b) for d, b in last.items()}
    # per direction, one buffer for the sum being sent and one for the sum being received
    acc_send: dict[int, torch.Tensor] = {}
    acc_recv: dict[int, torch.Tensor] = {}
    acc_works: list = []
    for t in range(t_max, 0, -1):
        active = [d for d in steps if steps[d] >= t]
        works = ring.shift([(-d, cur[d], nxt[d]) for d in active if t > 1])
        contrib = {d: grad_fn(d, t, cur[d]) for d in active}
        _wait(acc_works)
        for d in active:
            if d not in acc_send:
                shape = (cur[d].shape[0], *contrib[d][0].shape[1:])
                acc_send[d] = contrib[d][0].new_empty(shape)
                acc_recv[d] = contrib[d][0].new_empty(shape)
            r0 = 0
            for part in contrib[d]:
                r1 = r0 + part.shape[0]
                if t < steps[d]:
                    torch.add(part, acc_recv[d][r0:r1], out=acc_send[d][r0:r1])
                else:
                    acc_send[d][r0:r1].copy_(part)
                r0 = r1
        del contrib
        acc_works = ring.shift([(-d, acc_send[d], acc_recv[d]) for d in active])
        _wait(works)
        for d in active:
            if t > 1:
                cur[d], nxt[d] = nxt[d], cur[d]
    _wait(acc_works)
    own = None
    for d in steps:
        if steps[d] >= 1:
            own = acc_recv[d] if own is None else own + acc_recv[d]
    return own
