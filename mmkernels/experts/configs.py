"""Launch configurations of the experts Triton kernels: the launch kinds and their flags, tile
configs (``heuristic_config``, the ``MMKERNELS_EXPERTS_CONFIGS`` overrides), register caps
(``launch_options``) and the weight gradient's token chunks (``MMKERNELS_EXPERTS_WGRAD_CHUNK``).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

# activation codes (constexpr ACT of the grouped GEMM)
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_RELU, ACT_SWIGLU = 0, 1, 2, 3, 4, 5
ACT_CODES = {"none": ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU,
             "relu": ACT_RELU, "swiglu": ACT_SWIGLU}
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "swiglu")


class MMConfig(NamedTuple):
    BLOCK_M: int  # slots per tile
    BLOCK_N: int  # output columns per tile
    BLOCK_K: int  # reduction step
    num_warps: int
    num_stages: int
    maxnreg: int = 0  # register cap per thread (ptxas .maxnreg; 0: none), see launch_options
    epilogue_split: int = 1  # the epilogue runs on 1, 2 or 4 column slices in turn (registers)


class WGradConfig(NamedTuple):
    BLOCK_N: int  # rows of dW per tile
    BLOCK_K: int  # columns of dW per tile
    BLOCK_T: int  # slots per reduction step
    num_warps: int
    num_stages: int


# the launches the four contract functions make (one compile-tier entry each)
KERNEL_KINDS = (
    "route",
    "linear_fwd",      # x (gather) @ W^T + b -> y (scatter)
    "linear_bwd_dx",   # dy (gather) @ W -> dx (scatter)
    "ffn_fwd_in",      # x (gather) @ W_in^T + b_in -> h, a = act(h) (sorted)
    "ffn_fwd_out",     # a (sorted) @ W_out^T + b_out -> y (scatter)
    "ffn_bwd_dh",      # dy (gather) @ W_out -> da; dh = da * act'(h) (sorted)
    "ffn_bwd_dx",      # dh (sorted) @ W_in -> dx (scatter)
    "wgrad_linear",    # dW = dy(gather)^T x(gather), db = sum dy
    "wgrad_ffn_out",   # dW_out = dy(gather)^T a(sorted), db_out = sum dy
    "wgrad_ffn_in",    # dW_in = dh(sorted)^T x(gather), db_in = sum dh
)
MM_KINDS = ("linear_fwd", "linear_bwd_dx", "ffn_fwd_in", "ffn_fwd_out", "ffn_bwd_dh", "ffn_bwd_dx")
WGRAD_KINDS = ("wgrad_linear", "wgrad_ffn_out", "wgrad_ffn_in")
# kind -> (GATHER, SCATTER, STORE_H, ACT_BWD, weight used as W^T (forward) or W (backward))
_MM_FLAGS = {
    "linear_fwd": (True, True, False, False, True),
    "linear_bwd_dx": (True, True, False, False, False),
    "ffn_fwd_in": (True, False, True, False, True),
    "ffn_fwd_out": (False, True, False, False, True),
    "ffn_bwd_dh": (True, False, False, True, False),
    "ffn_bwd_dx": (False, True, False, False, False),
}
# kind -> (GATHER_A, GATHER_X)
_WGRAD_FLAGS = {
    "wgrad_linear": (True, True),
    "wgrad_ffn_out": (True, False),
    "wgrad_ffn_in": (False, True),
}


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MM_GROUP_M = 8  # row tiles per launch-order group of the grouped GEMM (see _grouped_mm_kernel)


REGISTERS_PER_SM = 65536  # 32-bit registers of one SM (every NVIDIA GPU since Kepler)
RESIDENT_PROGRAMS = 2  # 8-warp programs of one launch meant to share an SM (latency hiding)


def launch_options(kind: str, config) -> dict:
    """Compile options of launch ``kind`` beyond its tile config (passed at launch and by the
    compile tier alike).

    A grouped-GEMM config may carry a register cap (``MMConfig.maxnreg``: two 8-warp programs
    per SM at 128, e.g. 128 x 128 tiles with an activation epilogue that would take 184-255).
    The weight gradient's 8-warp tiles are sized for two programs per SM; with bias and fp32
    atomics ptxas chose 130 registers (sm_90a, bf16 128 x 128 x 64), which leaves one. A cap of
    ``REGISTERS_PER_SM / (2 x threads)`` = 128 keeps two, with no spills (the compile tier checks).
    """
    if getattr(config, "maxnreg", 0):
        return {"maxnreg": config.maxnreg}
    if kind in WGRAD_KINDS:
        cap = REGISTERS_PER_SM // (RESIDENT_PROGRAMS * config.num_warps * 32)
        if cap < 255:
            return {"maxnreg": cap}
    return {}


def input_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """Values of INPUT_PRECISION the launchers can pass for this dtype."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def align_of(*values: int) -> int:
    """The largest power of two <= 16 dividing every value (0 counts as divisible)."""
    al = 16
    while al > 1 and any(int(v) % al for v in values):
        al //= 2
    return al


def is_aligned(dtype: torch.dtype, align: int) -> bool:
    """Rows of ``align``-divisible widths are 16-byte aligned (vector loads, async copies)."""
    return align * dtype.itemsize >= 16


def heuristic_config(kind: str, dtype: torch.dtype, input_precision: str, swiglu: bool = False,
                     N: int = 4096, aligned: bool = True):
    """The tile configuration of launch ``kind`` (an entry of KERNEL_KINDS but "route").

    ``swiglu``: the swiglu launches of ffn_fwd_in (a B tile of gate and up columns, half as
    many output columns: ``mm_output_columns``) and ffn_bwd_dh (two h tiles and two outputs in
    the epilogue); they take the same tiles as the other activations.  ``N``: the output width
    of a grouped GEMM
    (columns of dW for the weight gradient); narrow outputs (<= 64) take 64-wide tiles.
    ``aligned``: widths and row strides give 16-byte aligned rows (``is_aligned``); when not
    (odd widths such as 97), loads are scalar and need many more registers, so the tiles shrink.
    Chosen from the sm_90a compile reports (tests/test_sm90_experts.py): no spills, shared
    memory within 227 KB, wgmma for 16-bit inputs and for fp32 with tf32.
    """
    fma = dtype == torch.float32 and input_precision == "ieee"
    tf32 = dtype == torch.float32 and not fma
    narrow = N <= 64
    if kind in WGRAD_KINDS:
        # The reduction runs over tokens gathered through perm: each step's row addresses come
        # from a load made in the loop, and Triton's software pipeliner spends stages on that
        # index load. Below 5 stages every cp.async.wait_group drains all copies (no load
        # overlaps the math: the H200's 82 TFLOP/s); at 5 the loads of the next two steps stay
        # in flight (the compile tier asserts it: sm90.assert_pipelined).
        if fma:
            return WGradConfig(32, 64, 16, 4, 2)
        if tf32:
            return WGradConfig(64, 64, 32, 4, 5)
        if not aligned:
            return WGradConfig(64, 64, 32, 4, 2)
        return WGradConfig(64 if narrow else 128, 128, 64, 8, 5)
    if kind not in MM_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if fma:
        return MMConfig(32, 64, 16, 4, 2)
    if not aligned:
        return MMConfig(64, 32, 32, 4, 2)
    if tf32:
        return MMConfig(64, 64, 32, 4, 3)
    if narrow:
        if kind == "ffn_bwd_dh" and swiglu:
            # two h tiles and two outputs: over the whole 128 x 64 tile the epilogue took 107
            # (Triton 3.6) to 176 (Triton 3.9, which runs the sigmoid in the load's layout and
            # converts two fp32 tiles to the accumulator's) registers; in two 128 x 32 slices
            # 74-78 on both, so two programs per SM whichever Triton compiles it
            return MMConfig(128, 64, 64, 8, 3, 0, 2)
        return MMConfig(128, 64, 64, 8, 3)
    if kind in ("ffn_fwd_in", "ffn_bwd_dh"):
        # an activation epilogue over a whole 128 x 128 tile took 184 (gelu forward) to 255
        # registers (act' backward), one program per SM; over four 128 x 32 slices in turn,
        # 107-124 for every activation, no spills: two per SM, and wgmma n = 128 (the B tile
        # reused twice as often as at the 128 x 64 tiles these launches took before). The
        # swiglu forward's 128-wide B tile pairs 64 gate with 64 up columns: 118 registers.
        return MMConfig(128, 128, 64, 8, 3, 0, 4)
    return MMConfig(128, 128, 64, 8, 3)


def candidate_configs(kind: str, dtype: torch.dtype | None = None,
                      input_precision: str | None = None, swiglu: bool | None = None,
                      aligned: bool | None = None) -> list:
    """Every configuration the launchers can pick for ``kind`` (deduplicated)."""
    dtypes = _DTYPES if dtype is None else (dtype,)
    out: list = []
    for dt in dtypes:
        for prec in (input_precisions(dt) if input_precision is None else (input_precision,)):
            for du in ((False, True) if swiglu is None else (swiglu,)):
                for al in ((True, False) if aligned is None else (aligned,)):
                    for n in (64, 4096):
                        c = heuristic_config(kind, dt, prec, du, n, al)
                        if c not in out:
                            out.append(c)
    return out


CONFIGS_ENV = "MMKERNELS_EXPERTS_CONFIGS"


def config_overrides() -> dict:
    """``MMKERNELS_EXPERTS_CONFIGS``: tile configs replacing the heuristic's, per launch kind.

    ``"kind=v,v,v,v,v;kind=..."``: a grouped-GEMM kind (``MM_KINDS``) takes
    ``BLOCK_M,BLOCK_N,BLOCK_K,warps,stages[,maxnreg[,epilogue_split]]`` (``maxnreg`` 0: no
    cap; ``epilogue_split`` 1, 2 or 4), a weight-gradient kind (``WGRAD_KINDS``)
    ``BLOCK_N,BLOCK_K,BLOCK_T,warps,stages``. It applies to every dtype and width of that kind
    (the sm_90a compile tier checks only the heuristic's configs): meant for the output of
    ``python -m bench.tune_gpu --env-out``, on the GPU it was measured on. Unset or empty: ``{}``.
    """
    return dict(_parse_config_overrides(os.environ.get(CONFIGS_ENV, "").strip()))


@functools.lru_cache(maxsize=8)
def _parse_config_overrides(raw: str) -> tuple:
    """``config_overrides``'s parse of one setting, cached: every launch asks (seven per FFN
    forward and backward), the setting rarely changes. ``((kind, config), ...)``."""
    out: dict = {}
    for item in filter(None, (p.strip() for p in raw.split(";"))):
        kind, sep, values = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in MM_KINDS + WGRAD_KINDS:
            raise ValueError(f"{CONFIGS_ENV}: {item!r} is not kind=values with a kind of "
                             f"{MM_KINDS + WGRAD_KINDS}")
        try:
            nums = [int(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"{CONFIGS_ENV}: {item!r}: the values must be integers") from None
        # grouped GEMMs: an optional register cap, then an optional epilogue split
        n_max = 5 if kind in WGRAD_KINDS else 7
        if (not 5 <= len(nums) <= n_max or any(v <= 0 or v & (v - 1) for v in nums[:4])
                or nums[4] <= 0 or any(v and not 24 <= v <= 255 for v in nums[5:6])
                or any(v not in (1, 2, 4) or nums[1] // v < 16 for v in nums[6:])):
            raise ValueError(f"{CONFIGS_ENV}: {item!r}: need 5 values (grouped GEMMs: 5 to 7), "
                             f"three block sizes and the warps powers of two, stages >= 1, a "
                             f"register cap 0 (none) or in [24, 255], an epilogue split of 1, 2 "
                             f"or 4 leaving slices of >= 16 columns")
        out[kind] = (WGradConfig if kind in WGRAD_KINDS else MMConfig)(*nums)
    return tuple(out.items())


def _pick(kind, dtype, prec, swiglu, N, align, config):
    """The launch's config: ``config`` (one, or a dict by kind), else ``MMKERNELS_EXPERTS_CONFIGS``,
    else ``heuristic_config``."""
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None:
        config = config_overrides().get(kind)
    if config is None:
        return heuristic_config(kind, dtype, prec, swiglu, N, is_aligned(dtype, align))
    return config


def mm_output_columns(cfg: MMConfig, act: int, act_bwd: bool) -> int:
    """Output columns one grouped-GEMM program writes: ``BLOCK_N``, but half of it for the swiglu
    forward, whose B tile holds ``BLOCK_N / 2`` gate columns and the matching up columns."""
    return cfg.BLOCK_N // 2 if act == ACT_SWIGLU and not act_bwd else cfg.BLOCK_N


WGRAD_CHUNK_ENV = "MMKERNELS_EXPERTS_WGRAD_CHUNK"
# the automatic token chunking aims at this many weight-gradient programs per SM, and never
# makes a chunk shorter than WGRAD_MIN_CHUNK tokens (each chunk adds one fp32 tile of atomics)
WGRAD_PROGRAMS_PER_SM = 4
WGRAD_MIN_CHUNK = 512


def wgrad_chunk_setting() -> int | None:
    """``MMKERNELS_EXPERTS_WGRAD_CHUNK``: ``None`` for ``auto`` (the default, see
    :func:`auto_wgrad_chunk`), ``0`` for one program per expert and tile (no atomics), or a
    positive token count per weight-gradient program."""
    raw = os.environ.get(WGRAD_CHUNK_ENV, "auto").strip()
    if raw.lower() == "auto":
        return None
    try:
        chunk = int(raw)
    except ValueError:
        raise ValueError(f"{WGRAD_CHUNK_ENV} must be 'auto' or a token count, got {raw!r}") from None
    if chunk < 0:
        raise ValueError(f"{WGRAD_CHUNK_ENV} must be >= 0, got {chunk}")
    return chunk


def auto_wgrad_chunk(T: int, E: int, expert_tiles: int, block_t: int, sm_count: int,
                     deterministic: bool) -> int:
    """Tokens per weight-gradient program when ``MMKERNELS_EXPERTS_WGRAD_CHUNK`` is ``auto``.

    ``T``: tokens; ``E``: experts; ``expert_tiles``: dW tiles of one expert
    (``cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K)``); ``block_t``: tokens per reduction step;
    ``sm_count``: the GPU's multiprocessors (0: unknown, e.g. the interpreter).

    Without chunks, each program owns one dW tile and walks all of its expert's tokens. When
    the ``E * expert_tiles`` programs are fewer than ``WGRAD_PROGRAMS_PER_SM`` per SM, the
    experts' token counts decide the time: VLMo's image expert holds 5x the text expert's
    tokens, so its programs run 5x longer while the SMs that ran text tiles idle (dW_in of the
    VLMo FFN: 288 tiles on 132 SMs, 82 TFLOP/s on the H200). Then the tokens are cut into
    chunks giving about that many programs per SM (``T * expert_tiles / chunk`` of them),
    summed with fp32 atomics. Returns 0 (no chunks) when the grid has the waves to balance
    itself, when chunks would be shorter than ``WGRAD_MIN_CHUNK`` or cover every token, when
    the SM count is unknown, and under ``torch.use_deterministic_algorithms`` (atomics sum in
    a run-dependent order).
    """
    if deterministic or sm_count <= 0 or T <= 0:
        return 0
    target = WGRAD_PROGRAMS_PER_SM * sm_count
    if E * expert_tiles >= target:
        return 0
    chunk = -(-T * expert_tiles // target)
    chunk = -(-chunk // block_t) * block_t
    if chunk < WGRAD_MIN_CHUNK or chunk >= T:
        return 0
    return chunk


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (0 for any other device, e.g. the interpreter's CPU)."""
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def wgrad_chunk(T: int, E: int, expert_tiles: int, block_t: int, device: torch.device) -> int:
    """Tokens per weight-gradient program for this launch (0: one program per expert and tile)."""
    setting = wgrad_chunk_setting()
    if setting is None:
        return auto_wgrad_chunk(T, E, expert_tiles, block_t, sm_count(device),
                                torch.are_deterministic_algorithms_enabled())
    return setting
