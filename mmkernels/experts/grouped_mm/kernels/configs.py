"""Launch configurations of the grouped-GEMM kernels: the launch kinds and their flags, the
heuristic tile table (``heuristic_config``), register caps (``launch_options``) and the weight
gradient's token chunks. Overrides go through :mod:`mmkernels.tuning` (family ``"experts"``,
the kinds of ``MM_KINDS`` and ``WGRAD_KINDS``, the option ``"experts.wgrad_chunk"``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .... import tuning
from ...._triton import DTYPES, input_precisions, sm_count
from ...activations import ACTIVATIONS
from ...routing_kernels import is_aligned

# activation codes (constexpr ACT of the grouped GEMM)
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_RELU, ACT_SWIGLU = 0, 1, 2, 3, 4, 5
ACT_CODES = {"none": ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU,
             "relu": ACT_RELU, "swiglu": ACT_SWIGLU}
assert set(ACT_CODES) == {"none", *ACTIVATIONS}


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
MM_FLAGS = {
    "linear_fwd": (True, True, False, False, True),
    "linear_bwd_dx": (True, True, False, False, False),
    "ffn_fwd_in": (True, False, True, False, True),
    "ffn_fwd_out": (False, True, False, False, True),
    "ffn_bwd_dh": (True, False, False, True, False),
    "ffn_bwd_dx": (False, True, False, False, False),
}
# kind -> (GATHER_A, GATHER_X)
WGRAD_FLAGS = {
    "wgrad_linear": (True, True),
    "wgrad_ffn_out": (True, False),
    "wgrad_ffn_in": (False, True),
}

MM_GROUP_M = 8  # row tiles per launch-order group of the grouped GEMM (see grouped_mm_kernel)


REGISTERS_PER_SM = 65536  # 32-bit registers of one SM (every NVIDIA GPU since Kepler)
RESIDENT_PROGRAMS = 2  # 8-warp programs of one launch meant to share an SM (latency hiding)


def launch_options(kind: str, config) -> dict:
    """Compile options of launch ``kind`` beyond its tile config (passed at launch and by the
    compile tier alike).

    A grouped-GEMM config may carry a register cap (``MMConfig.maxnreg``: two 8-warp programs
    per SM at 128). The weight gradient's 8-warp tiles are sized for two programs per SM, which
    bias and fp32 atomics can push just past 128 registers; a cap of
    ``REGISTERS_PER_SM / (RESIDENT_PROGRAMS x threads)`` keeps two, with no spills (the compile
    tier checks).
    """
    if getattr(config, "maxnreg", 0):
        return {"maxnreg": config.maxnreg}
    if kind in WGRAD_KINDS:
        cap = REGISTERS_PER_SM // (RESIDENT_PROGRAMS * config.num_warps * 32)
        if cap < 255:
            return {"maxnreg": cap}
    return {}


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
    Chosen from the sm_90a compile reports (tests/experts/test_sm90.py): no spills, shared
    memory within 227 KB, wgmma for 16-bit inputs and for fp32 with tf32.
    """
    fma = dtype == torch.float32 and input_precision == "ieee"
    tf32 = dtype == torch.float32 and not fma
    narrow = N <= 64
    if kind in WGRAD_KINDS:
        # The reduction runs over tokens gathered through perm: each step's row addresses come
        # from a load made in the loop, and Triton's software pipeliner spends stages on that
        # index load. Below 5 stages every cp.async.wait_group drains all copies (no load
        # overlaps the math); at 5 the loads of the next two steps stay in flight (the compile
        # tier asserts it: sm90.assert_pipelined).
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
            # two h tiles and two outputs: over the whole 128 x 64 tile the epilogue's registers
            # depend on the Triton release (newer ones run the sigmoid in the load's layout and
            # convert two fp32 tiles); in two 128 x 32 slices it keeps two programs per SM
            # whichever Triton compiles it
            return MMConfig(128, 64, 64, 8, 3, 0, 2)
        return MMConfig(128, 64, 64, 8, 3)
    if kind in ("ffn_fwd_in", "ffn_bwd_dh"):
        # an activation epilogue over a whole 128 x 128 tile needs more registers than two
        # programs per SM allow; over four 128 x 32 slices in turn it fits two per SM without
        # spills, with wgmma n = 128 (the B tile reused twice as often as at 128 x 64 tiles).
        # The swiglu forward's 128-wide B tile pairs 64 gate with 64 up columns.
        return MMConfig(128, 128, 64, 8, 3, 0, 4)
    return MMConfig(128, 128, 64, 8, 3)


def candidate_configs(kind: str, dtype: torch.dtype | None = None,
                      input_precision: str | None = None, swiglu: bool | None = None,
                      aligned: bool | None = None) -> list:
    """Every configuration the launchers can pick for ``kind`` (deduplicated)."""
    dtypes = DTYPES if dtype is None else (dtype,)
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


# tuning keys: an override set with mmkernels.tuning.set_config("experts", kind, config, **match)
# may match on these case values of a launch
MM_KEYS = ("dtype", "input_precision", "swiglu", "aligned", "N")
WGRAD_KEYS = ("dtype", "input_precision", "aligned", "N")
for _kind in MM_KINDS:
    tuning.register_kind("experts", _kind, MMConfig, keys=MM_KEYS)
for _kind in WGRAD_KINDS:
    tuning.register_kind("experts", _kind, WGradConfig, keys=WGRAD_KEYS)


def pick_config(kind: str, dtype: torch.dtype, input_precision: str, swiglu: bool, N: int,
                align: int, config=None):
    """The config of one launch of ``kind``: ``config`` (one config, or a dict kind -> config)
    when given, else the override :func:`mmkernels.tuning.lookup` finds for this case, else
    :func:`heuristic_config`. ``align``: the launch's ALIGN (see ``routing_kernels.align_of``)."""
    if isinstance(config, dict):
        config = config.get(kind)
    if config is not None:
        return config
    aligned = is_aligned(dtype, align)
    config = tuning.lookup("experts", kind, dtype=dtype, input_precision=input_precision,
                           swiglu=bool(swiglu), aligned=aligned, N=int(N))
    if config is None:
        return heuristic_config(kind, dtype, input_precision, swiglu, N, aligned)
    return config


def mm_output_columns(cfg: MMConfig, act: int, act_bwd: bool) -> int:
    """Output columns one grouped-GEMM program writes: ``BLOCK_N``, but half of it for the swiglu
    forward, whose B tile holds ``BLOCK_N / 2`` gate columns and the matching up columns."""
    return cfg.BLOCK_N // 2 if act == ACT_SWIGLU and not act_bwd else cfg.BLOCK_N


# the automatic token chunking aims at this many weight-gradient programs per SM, and never
# makes a chunk shorter than WGRAD_MIN_CHUNK tokens (each chunk adds one fp32 tile of atomics)
WGRAD_PROGRAMS_PER_SM = 4
WGRAD_MIN_CHUNK = 512
WGRAD_CHUNK_OPTION = "experts.wgrad_chunk"


def check_wgrad_chunk(value):
    """The value of the ``experts.wgrad_chunk`` option: ``"auto"`` or a token count >= 0."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError(f"{WGRAD_CHUNK_OPTION} must be 'auto' or a token count, got {value!r}")
    try:
        chunk = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{WGRAD_CHUNK_OPTION} must be 'auto' or a token count, got {value!r}") from None
    if chunk < 0:
        raise ValueError(f"{WGRAD_CHUNK_OPTION} must be >= 0, got {chunk}")
    return chunk


tuning.register_option(
    WGRAD_CHUNK_OPTION, "auto", check_wgrad_chunk,
    "tokens per weight-gradient program of the experts' grouped GEMM: 'auto' (auto_wgrad_chunk), "
    "0 (one program per expert and tile, no atomics) or a token count (fp32 atomics)")


def wgrad_chunk_setting() -> int | None:
    """The ``experts.wgrad_chunk`` option: ``None`` for ``"auto"`` (the default, see
    :func:`auto_wgrad_chunk`), ``0`` for one program per expert and tile (no atomics), or a
    positive token count per weight-gradient program."""
    value = tuning.option(WGRAD_CHUNK_OPTION)
    return None if value == "auto" else value


def auto_wgrad_chunk(T: int, E: int, expert_tiles: int, block_t: int, sm_count: int,
                     deterministic: bool) -> int:
    """Tokens per weight-gradient program when the ``experts.wgrad_chunk`` option is ``auto``.

    ``T``: tokens; ``E``: experts; ``expert_tiles``: dW tiles of one expert
    (``cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K)``); ``block_t``: tokens per reduction step;
    ``sm_count``: the GPU's multiprocessors (0: unknown, e.g. the interpreter).

    Without chunks, each program owns one dW tile and walks all of its expert's tokens. When
    the ``E * expert_tiles`` programs are fewer than ``WGRAD_PROGRAMS_PER_SM`` per SM, the
    experts' token counts decide the time: VLMo's image expert holds several times the text
    expert's tokens, so its programs run that much longer while the SMs that ran text tiles
    idle. Then the tokens are cut into
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


def wgrad_chunk(T: int, E: int, expert_tiles: int, block_t: int, device: torch.device) -> int:
    """Tokens per weight-gradient program for this launch (0: one program per expert and tile)."""
    setting = wgrad_chunk_setting()
    if setting is None:
        # the SM count is unknown to the interpreter (CPU tensors): 0, no chunks
        sms = sm_count(device) if device.type == "cuda" else 0
        return auto_wgrad_chunk(T, E, expert_tiles, block_t, sms,
                                torch.are_deterministic_algorithms_enabled())
    return setting
