"""Vector quantization in Triton: nearest-code search, the dynamic (per-region grain) quantizer and
per-code statistics for EMA codebooks.

Search: a program takes BLOCK_N vectors and walks the codebook BLOCK_K codes at a time; the dot
products come from ``tl.dot`` with fp32 accumulation (D walked in BLOCK_D chunks, masked tails, so
any D and K work), squared L2 is ranked as ``||c||^2 - 2 z.c`` (``||z||^2`` is constant per row)
and cosine as ``-z.c`` of normalised vectors. A running (min, argmin) lives in registers: inside
a tile the first minimum wins, across tiles only a strictly smaller score replaces the best, so
ties go to the lowest index. The N x K distance matrix never exists. The chosen code is then
gathered in the same program, written out, and its distance recomputed directly as
``sum((z - c)^2)`` (or ``1 - z.c``) in fp32, which has no cancellation.

Non-finite input (the reference's rule): a NaN score counts as +inf, so a NaN or inf code never
beats a finite one; a vector whose ``||z||^2`` is not finite (a NaN or inf entry, or an overflow)
has no finite distance to any code and gets index 0, that code, and the distance computed for it.

Dynamic quantization: the grain map decides, per grain g, which cells of ``features[g]`` are
coded. Their flat raster ids are compacted on the device (cumsum + scatter, no host sync) into a
list whose length is an upper bound; the kernel reads the true count from device memory and the
programs past it return at once. Each coded vector is gathered by index straight from
``features[g]`` through its strides (no gathered copy) and searched once. Few vectors are coded
(5120 at the DQ-VAE shape), so the codebook walk is split into contiguous ranges searched by
separate programs, as many as fill the GPU (decided on the device from the true count); each
writes its (score, index) and a second kernel keeps the lowest score, ties to the lowest range,
which is the lowest index as in one walk: the result does not depend on the split. That kernel
writes the code and index to the 2**(G-1-g) x 2**(G-1-g) finest cells each vector covers, rows x
channel slices per program. The loss is reduced from per-program partial sums of ``||v - q||^2``
(no atomics, so the forward is deterministic). The backward kernel revisits the coded cells, also
by rows x channel slices: straight-through and commitment gradient to the features (plain stores:
every cell is coded at most once), gate gradient and codebook gradient by fp32 atomics.

Cosine goes through fp32 l2-normalised copies made by torch (``F.normalize``, eps 1e-12), so the
normalisation's gradient comes from autograd; the kernels then see unit vectors.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dqfast.types import DynamicVQOutput, VQOutput

__all__ = [
    "vector_quantize",
    "vector_quantize_reasons",
    "dynamic_quantize",
    "dynamic_quantize_reasons",
    "grain_from_budget",
    "code_statistics",
    "vector_quantize_fwd",
    "dynamic_quantize_fwd",
    "dynamic_quantize_bwd",
    "code_statistics_fwd",
]

# ----------------------------------------------------------------------------------------------
# Tuning constants
# ----------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Same eps as F.normalize's default: every backend normalises identically.
NORMALIZE_EPS = 1e-12

# Register budgets below come from compiling every kernel for sm_90a offline (ptxas -v; no GPU
# was at hand to time them): they are the widths at which the kernels stopped spilling.
#
# Channels per dot step. Up to MAX_SINGLE_CHUNK_D the whole vector is one chunk, loaded once and
# kept on chip for the walk over the codebook (no spills at 128x128 tiles for D <= 256 in 16-bit;
# fp32 goes through tf32x3, whose operand copies need far more shared memory: 128 channels fit
# only the 64x64 tile, 64 channels fit every config). Wider vectors are walked in
# MULTI_CHUNK_BLOCK_D chunks, reloaded per code tile (64-channel chunks spilled in 16-bit, 32 did
# not; fp32 still spills a little there). Gathered vectors (dynamic quantization) cannot use
# vector loads (their addresses come from an index list), so they stay in one chunk only up to
# 64 channels.
MAX_SINGLE_CHUNK_D = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 64}
MAX_SINGLE_CHUNK_D_GATHERED = 64
MULTI_CHUNK_BLOCK_D = 32
# Gathered fp32 vectors (tf32x3 splits every operand in two): 32-channel chunks took 244-255
# registers and spilled in 4 of the 6 search configs at D = 256 (sm_90 compile); 16 does not.
MULTI_CHUNK_BLOCK_D_GATHERED_FP32 = 16
# Every tl.dot dimension must be >= 16 on the GPU, so tiny D is padded (masked) up to 16.
MIN_BLOCK_D = 16
# Channels per step when the chosen code is gathered and written: a full-width gather tile
# pushed the search kernel to 255 registers with spills; 16 keeps it at ~100-200, no spills.
EMIT_BLOCK_D = 16
# Channels per step of the backward (gathers from 4 to 16 gradient cells per vector) and of the
# statistics kernel (no tl.dot, so any power of two works).
BWD_BLOCK_D = 16
STATISTICS_BLOCK_D = 32

# The interpreter runs one fixed, small config (autotuning there would only burn CPU time).
# On the GPU every config must fit the H100's 227 KiB of shared memory at the widest single chunk
# (16-bit, D = 256): one BLOCK_N x 256 vector tile plus num_stages BLOCK_K x 256 code tiles, i.e.
# 512 B x (BLOCK_N + num_stages x BLOCK_K) with BLOCK_N + num_stages x BLOCK_K <= 454 (sm_90
# compile: (128, 128, 8, 3) needed 256 KiB and (128, 128, 8, 4) 320 KiB; they could never launch).
# (32, 64, 4, 4) is gone too: ptxas held the gathered 16-bit search to 128 registers and spilled.
_SEARCH_CONFIGS = (
    [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    if _INTERPRET
    else [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 64, 8, 4),
        ]
    ]
)

# Dynamic quantization at the DQ-VAE shape (B = 8, 16x16 + 32x32 maps, budget 0.5) codes only 1024
# coarse and 4096 fine vectors: one program per 64 rows would leave most of the H100's 132 SMs idle
# (16 and 64 busy programs). The search therefore splits the codebook walk into up to
# SEARCH_MAX_SPLITS contiguous ranges, as many as it takes for about SEARCH_WAVES x SMs programs to
# have work (decided on the device from the true count), each writing its (score, index); a small
# kernel keeps the lowest score, ties to the lowest split, then gathers and writes the code.
SEARCH_MAX_SPLITS = 16
SEARCH_WAVES = 2
# Interpreter: a target that splits the small test codebooks, so the combine is what runs there.
_INTERPRET_TARGET_PROGRAMS = 64

# Rows and channels per program of the gather/scatter kernels (the combine and write of the codes,
# the backward, the statistics): rows x channel slices rather than whole vectors, so that the
# DQ-VAE shape gives hundreds of programs (fixed sizes: autotuning would re-run the atomics).
_ELEMENTWISE_BLOCK_N = 32
_CHANNELS_PER_PROGRAM = 16 if _INTERPRET else 32

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _block_d(D: int, dtype: torch.dtype, *, gathered: bool) -> int:
    """Channels per dot step: all of D in one chunk when it fits, else MULTI_CHUNK_BLOCK_D."""
    single = max(triton.next_power_of_2(D), MIN_BLOCK_D)
    cap = MAX_SINGLE_CHUNK_D_GATHERED if gathered else MAX_SINGLE_CHUNK_D[dtype]
    if single <= cap:
        return single
    return MULTI_CHUNK_BLOCK_D_GATHERED_FP32 if gathered and dtype == torch.float32 else MULTI_CHUNK_BLOCK_D


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 passes give ~fp32 accuracy on tensor cores (plain tf32 would rank
    # codes with ~1e-3 relative error). For fp16/bf16 inputs the option is ignored by tl.dot.
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nearest_code(
    z_ptr,  # base pointer of the vectors
    row_off,  # (BLOCK_N,) int64 element offset of each vector's first channel
    row_scale,  # (BLOCK_N,) fp32 factor the vector is multiplied by (the gate; 1.0 without one)
    row_mask,  # (BLOCK_N,) bool, rows that exist
    stride_zd,  # element stride between channels of a vector
    codebook_ptr,  # (K, D) codes
    code_sq_ptr,  # (K,) fp32 squared code norms (l2 only)
    k_lo,  # first code searched (a multiple of BLOCK_K)
    k_hi,  # end of the codes searched (<= K)
    D,
    stride_ck,
    stride_cd,
    COSINE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # D <= BLOCK_D
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(score, index) of the nearest code in [k_lo, k_hi) of every row, both (BLOCK_N,).

    The score ranks codes (``||c||^2 - 2 v.c`` or ``-v.c``); ties go to the lowest index. A NaN
    score counts as +inf, so it never beats a finite one. A row whose ``||v||^2`` is not finite
    (NaN or inf in it) has no finite distance to any code: it gets score +inf and index k_lo.
    """
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_d0 = tl.arange(0, BLOCK_D)
    # With D in one chunk the vectors stay in registers for the whole codebook walk (the load is
    # dead code otherwise and disappears).
    z_first = tl.load(
        z_ptr + row_off[:, None] + offs_d0[None, :] * stride_zd,
        mask=row_mask[:, None] & (offs_d0[None, :] < D),
        other=0.0,
    )
    if SINGLE_CHUNK:
        zf = z_first.to(tl.float32) * row_scale[:, None]
        row_sq = tl.sum(zf * zf, axis=1)
    else:
        row_sq = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            zc = tl.load(
                z_ptr + row_off[:, None] + offs_d[None, :] * stride_zd,
                mask=row_mask[:, None] & (offs_d[None, :] < D),
                other=0.0,
            )
            zf = zc.to(tl.float32) * row_scale[:, None]
            row_sq += tl.sum(zf * zf, axis=1)
    # Not (row_sq < inf) is true for +inf and NaN alike.
    finite_row = row_sq < float("inf")
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64) + k_lo
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = (k0 + offs_k0).to(tl.int64)
        k_mask = offs_k < k_hi
        if SINGLE_CHUNK:
            c = tl.load(
                codebook_ptr + offs_k[:, None] * stride_ck + offs_d0[None, :] * stride_cd,
                mask=k_mask[:, None] & (offs_d0[None, :] < D),
                other=0.0,
            )
            dots = tl.dot(z_first, tl.trans(c), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        else:
            dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                d_mask = offs_d < D
                z = tl.load(
                    z_ptr + row_off[:, None] + offs_d[None, :] * stride_zd,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                c = tl.load(
                    codebook_ptr + offs_k[:, None] * stride_ck + offs_d[None, :] * stride_cd,
                    mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                dots = tl.dot(z, tl.trans(c), dots, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        dots = dots * row_scale[:, None]
        if COSINE:
            score = -dots
        else:
            code_sq = tl.load(code_sq_ptr + offs_k, mask=k_mask, other=0.0)
            score = code_sq[None, :] - 2.0 * dots
        # Masked codes, NaN scores and rows without a finite distance all rank as +inf.
        keep = k_mask[None, :] & finite_row[:, None] & (score < float("inf"))
        score = tl.where(keep, score, float("inf"))
        tile_best, tile_idx = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx.to(tl.int64) + k0, best_idx)
    return best, best_idx


@triton.jit
def _emit_code(
    z_ptr,  # base pointer of the vectors
    row_off,  # (BLOCK_N,) int64 element offset of each vector's first channel
    row_scale,  # (BLOCK_N,) fp32 factor the vector is multiplied by
    row_mask,  # (BLOCK_N,) bool
    stride_zd,
    codebook_ptr,  # (K, D) codes
    code_idx,  # (BLOCK_N,) int64 chosen code of every row
    stride_ck,
    stride_cd,
    out_ptr,  # output the chosen codes are written to (cast to its dtype)
    out_off,  # (BLOCK_N,) int64 element offset of each row's first output cell
    stride_od,
    stride_oh,
    stride_ow,
    d_lo,  # first channel written
    D,  # end of the channels written
    SPREAD: tl.constexpr,  # every code is written to SPREAD x SPREAD cells (h, w) of the output
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Writes channels [d_lo, D) of the chosen codes and returns (sum (v - q)^2, sum v * q) over
    them, both (BLOCK_N,) fp32."""
    offs_d0 = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_N,), tl.float32)
    dot = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(d_lo, D, BLOCK_D):
        offs_d = d0 + offs_d0
        mask = row_mask[:, None] & (offs_d[None, :] < D)
        v = tl.load(z_ptr + row_off[:, None] + offs_d[None, :] * stride_zd, mask=mask, other=0.0)
        v = v.to(tl.float32) * row_scale[:, None]
        q = tl.load(codebook_ptr + code_idx[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask, other=0.0)
        diff = v - q.to(tl.float32)
        sq += tl.sum(diff * diff, axis=1)
        dot += tl.sum(v * q.to(tl.float32), axis=1)
        out = out_ptr + out_off[:, None] + offs_d[None, :] * stride_od
        for t in tl.static_range(SPREAD * SPREAD):
            tl.store(out + (t // SPREAD) * stride_oh + (t % SPREAD) * stride_ow, q, mask=mask)
    return sq, dot


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_SEARCH_CONFIGS, key=["K", "D"])
@triton.jit
def _vector_quantize_fwd_kernel(
    z_ptr,  # (N, D) vectors, any row and channel strides
    codebook_ptr,  # (K, D) codes, same dtype as z
    code_sq_ptr,  # (K,) fp32 squared code norms (l2 only)
    quantized_ptr,  # out (N, D) contiguous: the chosen codes
    indices_ptr,  # out (N,) int64
    distance_ptr,  # out (N,) fp32 distance to the chosen code
    N,
    K,
    D,
    stride_zn,
    stride_zd,
    stride_ck,
    stride_cd,
    COSINE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # D <= BLOCK_D: the vectors are loaded once
    BLOCK_D: tl.constexpr,
    EMIT_BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_off = rows * stride_zn
    ones = tl.full((BLOCK_N,), 1.0, tl.float32)
    _, idx = _nearest_code(
        z_ptr, row_off, ones, row_mask, stride_zd, codebook_ptr, code_sq_ptr, 0, K, D, stride_ck, stride_cd,
        COSINE, DOT_PRECISION, SINGLE_CHUNK, BLOCK_N, BLOCK_K, BLOCK_D,
    )  # fmt: skip
    sq, dot = _emit_code(
        z_ptr, row_off, ones, row_mask, stride_zd, codebook_ptr, idx, stride_ck, stride_cd,
        quantized_ptr, rows * D, 1, 0, 0, 0, D, 1, BLOCK_N, EMIT_BLOCK_D,
    )  # fmt: skip
    distance = 1.0 - dot if COSINE else sq
    tl.store(indices_ptr + rows, idx, mask=row_mask)
    tl.store(distance_ptr + rows, distance, mask=row_mask)


@triton.jit
def _coded_rows(cells_ptr, rows, row_mask, Hg, Wg):
    """(b, y, x) int64 of the coded cells listed at ``rows`` of the cell list."""
    # Decoded in int32 (cells < 2**31, checked by the reasons): int64 division is a long software
    # routine on the GPU and pushed the kernels into spills.
    cell = tl.load(cells_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    x = (cell % Wg).to(tl.int64)
    y = ((cell // Wg) % Hg).to(tl.int64)
    b = (cell // (Wg * Hg)).to(tl.int64)
    return b, y, x


@triton.jit
def _gate_scale(
    gate_ptr,
    b,
    y,
    x,
    row_mask,
    stride_gb,
    stride_gh,
    stride_gw,
    stride_gg,
    GRAIN: tl.constexpr,
    REGION: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    """(BLOCK_N,) fp32 gate value of each row's region at this grain (1.0 without a gate)."""
    if HAS_GATE:
        gate_off = b * stride_gb + (y // REGION) * stride_gh + (x // REGION) * stride_gw + GRAIN * stride_gg
        scale = tl.load(gate_ptr + gate_off, mask=row_mask, other=0.0).to(tl.float32)
    else:
        scale = tl.where(row_mask, 1.0, 1.0)
    return scale


@triton.jit
def _split_plan(count, K, target_programs, MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(row tiles, codebook splits, code tiles per split) for ``count`` coded rows: the codebook
    walk is split until about ``target_programs`` programs have work."""
    n_row_tiles = (count + BLOCK_N - 1) // BLOCK_N
    n_k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    splits = (target_programs + n_row_tiles - 1) // tl.maximum(n_row_tiles, 1)
    splits = tl.maximum(tl.minimum(tl.minimum(splits, n_k_tiles), MAX_SPLITS), 1)
    tiles_per_split = (n_k_tiles + splits - 1) // splits
    splits = (n_k_tiles + tiles_per_split - 1) // tiles_per_split
    return n_row_tiles, splits, tiles_per_split


@triton.autotune(configs=_SEARCH_CONFIGS, key=["K", "D"])
@triton.jit
def _dynamic_quantize_search_kernel(
    feat_ptr,  # features[g] (B, D, Hg, Wg), any strides
    gate_ptr,  # (B, H, W, G) gate, read only when HAS_GATE
    codebook_ptr,  # (K, D) codes
    code_sq_ptr,  # (K,) fp32 squared code norms (l2 only)
    cells_ptr,  # (>= count,) int64 raster ids b*Hg*Wg + y*Wg + x of the coded cells, first `count` valid
    count_ptr,  # (1,) int64 number of coded cells at this grain
    best_ptr,  # out (cells, MAX_SPLITS) fp32: best score of every row in every codebook split
    best_idx_ptr,  # out (cells, MAX_SPLITS) int64: its code
    splits_ptr,  # out (1,) int32: number of codebook splits used (written by program 0)
    K,
    D,
    Hg,
    Wg,
    target_programs,  # programs wanted with work (a few waves of the GPU's SMs)
    stride_fb,
    stride_fd,
    stride_fh,
    stride_fw,
    stride_gb,
    stride_gh,
    stride_gw,
    stride_gg,
    stride_ck,
    stride_cd,
    GRAIN: tl.constexpr,  # g: a region is REGION = 2**g cells of this grid wide
    REGION: tl.constexpr,
    HAS_GATE: tl.constexpr,
    COSINE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # D <= BLOCK_D: the vectors are loaded once
    MAX_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr)
    n_row_tiles, splits, tiles_per_split = _split_plan(count, K, target_programs, MAX_SPLITS, BLOCK_N, BLOCK_K)
    if pid == 0:
        tl.store(splits_ptr, splits.to(tl.int32))
    # The grid covers every cell of the grid times MAX_SPLITS (the count is known only here).
    row_tile = pid // splits
    split = pid % splits
    if row_tile >= n_row_tiles:
        return
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < count
    b, y, x = _coded_rows(cells_ptr, rows, row_mask, Hg, Wg)
    row_off = b * stride_fb + y * stride_fh + x * stride_fw
    scale = _gate_scale(
        gate_ptr, b, y, x, row_mask, stride_gb, stride_gh, stride_gw, stride_gg, GRAIN, REGION, HAS_GATE
    )
    k_lo = split * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    best, idx = _nearest_code(
        feat_ptr, row_off, scale, row_mask, stride_fd, codebook_ptr, code_sq_ptr, k_lo, k_hi, D, stride_ck,
        stride_cd, COSINE, DOT_PRECISION, SINGLE_CHUNK, BLOCK_N, BLOCK_K, BLOCK_D,
    )  # fmt: skip
    tl.store(best_ptr + rows * MAX_SPLITS + split, best, mask=row_mask)
    tl.store(best_idx_ptr + rows * MAX_SPLITS + split, idx, mask=row_mask)


@triton.jit
def _dynamic_quantize_emit_kernel(
    feat_ptr,  # features[g] (B, D, Hg, Wg), any strides
    gate_ptr,  # (B, H, W, G) gate, read only when HAS_GATE
    codebook_ptr,  # (K, D) codes
    cells_ptr,  # (>= count,) int64 raster ids of the coded cells, first `count` valid
    count_ptr,  # (1,) int64 number of coded cells at this grain
    best_ptr,  # (cells, MAX_SPLITS) fp32 from the search kernel
    best_idx_ptr,  # (cells, MAX_SPLITS) int64 from the search kernel
    splits_ptr,  # (1,) int32 number of codebook splits used
    quantized_ptr,  # out (B, D, Hf, Wf): codes written to the SPREAD x SPREAD finest cells of each cell
    indices_ptr,  # out (B, Hf, Wf) int64, broadcast the same way
    partial_ptr,  # out (row tiles, channel tiles) fp32: sum of ||v - q||^2 over this program's tile
    D,
    Hg,
    Wg,
    stride_fb,
    stride_fd,
    stride_fh,
    stride_fw,
    stride_gb,
    stride_gh,
    stride_gw,
    stride_gg,
    stride_ck,
    stride_cd,
    stride_qb,
    stride_qd,
    stride_qh,
    stride_qw,
    stride_ib,
    stride_ih,
    stride_iw,
    GRAIN: tl.constexpr,
    REGION: tl.constexpr,
    SPREAD: tl.constexpr,  # 2**(G-1-g): finest cells per cell of this grid, along each axis
    HAS_GATE: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # channels per program (axis 1 of the grid)
    EMIT_BLOCK_D: tl.constexpr,  # channels per step
):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    count = tl.load(count_ptr)
    start = pid * BLOCK_N
    if start >= count:
        return
    rows = start + tl.arange(0, BLOCK_N)
    row_mask = rows < count
    # Deterministic combine: the lowest score over the splits, ties to the lowest split (whose
    # codes come first), so ties still go to the lowest code index.
    splits = tl.load(splits_ptr)
    offs_s = tl.arange(0, MAX_SPLITS)
    part = rows[:, None] * MAX_SPLITS + offs_s[None, :]
    part_mask = row_mask[:, None] & (offs_s[None, :] < splits)
    scores = tl.load(best_ptr + part, mask=part_mask, other=float("inf"))
    _, which = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
    idx = tl.load(best_idx_ptr + rows * MAX_SPLITS + which, mask=row_mask, other=0)
    b, y, x = _coded_rows(cells_ptr, rows, row_mask, Hg, Wg)
    row_off = b * stride_fb + y * stride_fh + x * stride_fw
    scale = _gate_scale(
        gate_ptr, b, y, x, row_mask, stride_gb, stride_gh, stride_gw, stride_gg, GRAIN, REGION, HAS_GATE
    )
    out_off = b * stride_qb + (y * SPREAD) * stride_qh + (x * SPREAD) * stride_qw
    d_lo = pid_d * BLOCK_D
    sq, _ = _emit_code(
        feat_ptr, row_off, scale, row_mask, stride_fd, codebook_ptr, idx, stride_ck, stride_cd,
        quantized_ptr, out_off, stride_qd, stride_qh, stride_qw, d_lo, tl.minimum(d_lo + BLOCK_D, D), SPREAD,
        BLOCK_N, EMIT_BLOCK_D,
    )  # fmt: skip
    if pid_d == 0:
        idx_off = b * stride_ib + (y * SPREAD) * stride_ih + (x * SPREAD) * stride_iw
        for t in tl.static_range(SPREAD * SPREAD):
            tl.store(indices_ptr + idx_off + (t // SPREAD) * stride_ih + (t % SPREAD) * stride_iw, idx, mask=row_mask)
    tl.store(partial_ptr + pid * tl.num_programs(1) + pid_d, tl.sum(tl.where(row_mask, sq, 0.0), axis=0))


@triton.jit
def _dynamic_quantize_bwd_kernel(
    feat_ptr,  # features[g] (B, D, Hg, Wg), any strides
    gate_ptr,  # (B, H, W, G) gate, read only when HAS_GATE
    codebook_ptr,  # (K, D) codes
    indices_ptr,  # (B, Hf, Wf) int64 codes from the forward
    cells_ptr,  # (>= count,) int64 raster ids of the coded cells (as in the forward)
    count_ptr,  # (1,) int64 number of coded cells
    grad_q_ptr,  # (B, D, Hf, Wf) gradient of quantized, read only when HAS_GRAD_Q
    coef_ptr,  # (2,) fp32 [dL/dloss * 2 beta / (N D), dL/dloss * 2 / (N D)], read only when HAS_GRAD_LOSS
    grad_feat_ptr,  # out (B, D, Hg, Wg), zero-initialised; each coded cell stored once
    grad_gate_ptr,  # out (B, H, W, G) fp32, zero-initialised, atomics (4**g cells per region)
    grad_codebook_ptr,  # out (K, D) fp32 contiguous, zero-initialised, atomics
    D,
    Hg,
    Wg,
    stride_fb,
    stride_fd,
    stride_fh,
    stride_fw,
    stride_gb,
    stride_gh,
    stride_gw,
    stride_gg,
    stride_ck,
    stride_cd,
    stride_ib,
    stride_ih,
    stride_iw,
    stride_dqb,
    stride_dqd,
    stride_dqh,
    stride_dqw,
    stride_dfb,
    stride_dfd,
    stride_dfh,
    stride_dfw,
    stride_dgb,
    stride_dgh,
    stride_dgw,
    stride_dgg,
    GRAIN: tl.constexpr,
    REGION: tl.constexpr,
    SPREAD: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_GRAD_Q: tl.constexpr,
    HAS_GRAD_LOSS: tl.constexpr,
    CHANNELS: tl.constexpr,  # channels per program (axis 1 of the grid)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr)
    start = pid * BLOCK_N
    if start >= count:
        return
    rows = start + tl.arange(0, BLOCK_N)
    row_mask = rows < count
    b, y, x = _coded_rows(cells_ptr, rows, row_mask, Hg, Wg)
    feat_off = b * stride_fb + y * stride_fh + x * stride_fw
    scale = _gate_scale(
        gate_ptr, b, y, x, row_mask, stride_gb, stride_gh, stride_gw, stride_gg, GRAIN, REGION, HAS_GATE
    )
    d_lo = tl.program_id(1).to(tl.int64) * CHANNELS
    d_hi = tl.minimum(d_lo + CHANNELS, D)
    idx = tl.load(
        indices_ptr + b * stride_ib + (y * SPREAD) * stride_ih + (x * SPREAD) * stride_iw, mask=row_mask, other=0
    )
    if HAS_GRAD_LOSS:
        coef_commit = tl.load(coef_ptr)
        coef_code = tl.load(coef_ptr + 1)
    grad_q_off = b * stride_dqb + (y * SPREAD) * stride_dqh + (x * SPREAD) * stride_dqw
    grad_feat_off = b * stride_dfb + y * stride_dfh + x * stride_dfw
    gate_acc = tl.zeros((BLOCK_N,), tl.float32)
    offs_d0 = tl.arange(0, BLOCK_D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + offs_d0
        mask = row_mask[:, None] & (offs_d[None, :] < d_hi)
        f = tl.load(feat_ptr + feat_off[:, None] + offs_d[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
        grad_v = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        if HAS_GRAD_Q:
            # Straight-through: the code was broadcast to SPREAD x SPREAD finest cells, so its
            # gradient is the sum over them.
            grad_q = grad_q_ptr + grad_q_off[:, None] + offs_d[None, :] * stride_dqd
            for t in tl.static_range(SPREAD * SPREAD):
                grad_v += tl.load(
                    grad_q + (t // SPREAD) * stride_dqh + (t % SPREAD) * stride_dqw, mask=mask, other=0.0
                ).to(tl.float32)
        if HAS_GRAD_LOSS:
            q = tl.load(codebook_ptr + idx[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(
                tl.float32
            )
            diff = scale[:, None] * f - q
            grad_v += coef_commit * diff
            tl.atomic_add(
                grad_codebook_ptr + idx[:, None] * D + offs_d[None, :], -coef_code * diff, mask=mask, sem="relaxed"
            )
        tl.store(
            grad_feat_ptr + grad_feat_off[:, None] + offs_d[None, :] * stride_dfd, scale[:, None] * grad_v, mask=mask
        )
        gate_acc += tl.sum(grad_v * f, axis=1)
    if HAS_GATE:
        grad_gate_off = b * stride_dgb + (y // REGION) * stride_dgh + (x // REGION) * stride_dgw + GRAIN * stride_dgg
        tl.atomic_add(grad_gate_ptr + grad_gate_off, gate_acc, mask=row_mask, sem="relaxed")


@triton.jit
def _code_statistics_kernel(
    x_ptr,  # (N, D) vectors, any strides
    indices_ptr,  # (N,) int code of every vector
    counts_ptr,  # out (K,) fp32, zero-initialised, atomics
    sums_ptr,  # out (K, D) fp32 contiguous, zero-initialised, atomics
    N,
    K,
    D,
    stride_xn,
    stride_xd,
    stride_i,
    CHANNELS: tl.constexpr,  # channels per program (axis 1 of the grid)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = tl.load(indices_ptr + rows * stride_i, mask=rows < N, other=-1).to(tl.int64)
    # Indices outside [0, K) are skipped rather than written out of bounds.
    valid = (rows < N) & (idx >= 0) & (idx < K)
    if pid_d == 0:
        tl.atomic_add(counts_ptr + idx, tl.full((BLOCK_N,), 1.0, tl.float32), mask=valid, sem="relaxed")
    offs_d0 = tl.arange(0, BLOCK_D)
    d_lo = pid_d * CHANNELS
    d_hi = tl.minimum(d_lo + CHANNELS, D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + offs_d0
        mask = valid[:, None] & (offs_d[None, :] < d_hi)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
        tl.atomic_add(sums_ptr + idx[:, None] * D + offs_d[None, :], x.to(tl.float32), mask=mask, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _direct(kernel):
    """The default ``wrap_triton`` of a launcher: the kernel itself (a plain eager launch).

    :mod:`dqfast.kernels._triton_ops` passes ``torch.library.wrap_triton`` instead, so that
    torch.compile traces the launch into its graph (the parameter keeps that name because torch
    finds a triton_op's kernels by looking for ``wrap_triton(<kernel>)`` calls in its source).
    """
    return kernel


def vector_quantize_fwd(
    z: torch.Tensor, codebook: torch.Tensor, *, cosine: bool, out_dtype: torch.dtype, wrap_triton=_direct
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code of every row.

    z: (N, D) any strides (rows read through their stride, no copy); codebook: (K, D), z's dtype
    (for cosine both already l2-normalised). Returns quantized (N, D) contiguous in ``out_dtype``,
    indices (N,) int64, distance (N,) fp32.
    """
    N, D = z.shape
    K = codebook.shape[0]
    quantized = torch.empty(N, D, dtype=out_dtype, device=z.device)
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    distance = torch.empty(N, dtype=torch.float32, device=z.device)
    if N == 0 or D == 0:
        distance.fill_(1.0 if cosine else 0.0)
        return quantized, indices.zero_(), distance
    code_sq = codebook.float().pow(2).sum(-1)
    block_d = _block_d(D, z.dtype, gathered=False)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    wrap_triton(_vector_quantize_fwd_kernel)[grid](
        z, codebook, code_sq, quantized, indices, distance,
        N, K, D, z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        COSINE=cosine, DOT_PRECISION=_dot_precision(z.dtype), SINGLE_CHUNK=D <= block_d, BLOCK_D=block_d,
        EMIT_BLOCK_D=EMIT_BLOCK_D,
    )  # fmt: skip
    return quantized, indices, distance


def _coded_cells(grain: torch.Tensor, num_grains: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per grain g, the coded cells of the grain-g grid, compacted on the device.

    grain: (B, H, W) int64. Returns (cells, counts): ``cells[g]`` (B*Hg*Wg + 1,) int64 whose first
    ``counts[g]`` entries are the raster ids ``b*Hg*Wg + y*Wg + x`` of the coded cells in raster
    order (the rest is junk), ``counts[g]`` (1,) int64. No host synchronisation: the kernels read
    the count from device memory.
    """
    B, H, W = grain.shape
    cells, counts = [], []
    for g in range(num_grains):
        side = 2**g
        coded = (grain == g)[:, :, None, :, None].expand(B, H, side, W, side).reshape(-1)
        total = coded.numel()
        # Position of each coded cell in the list; every uncoded cell goes to one spare slot.
        slot = torch.where(coded, torch.cumsum(coded, 0) - 1, total)
        ids = torch.arange(total, dtype=torch.int64, device=grain.device)
        cells.append(torch.empty(total + 1, dtype=torch.int64, device=grain.device).scatter_(0, slot, ids))
        counts.append(coded.sum().reshape(1))
    return cells, counts


def dynamic_quantize_fwd(
    features: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    gate: torch.Tensor | None,
    cells: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    *,
    cosine: bool,
    out_dtype: torch.dtype,
    wrap_triton=_direct,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Search every coded vector once and broadcast its code to the finest grid.

    features: G maps (B, D, H*2**g, W*2**g), any strides; codebook: (K, D), features' dtype;
    gate: (B, H, W, G) or None (the coded vector is ``gate[b, h, w, g] * features[g][cell]``);
    cells, counts: from :func:`_coded_cells`. Returns quantized (B, D, Hf, Wf) in ``out_dtype``,
    indices (B, Hf, Wf) int64 and the fp32 sum of ``||v - q||^2`` over the coded vectors, shape ().
    """
    G = len(features)
    B, D, H, W = features[0].shape
    K = codebook.shape[0]
    device = codebook.device
    Hf, Wf = H * 2 ** (G - 1), W * 2 ** (G - 1)
    # Every finest cell belongs to exactly one coded cell, so both outputs are fully written.
    quantized = torch.empty(B, D, Hf, Wf, dtype=out_dtype, device=device)
    indices = torch.empty(B, Hf, Wf, dtype=torch.int64, device=device)
    code_sq = codebook.float().pow(2).sum(-1)
    gate_arg = gate if gate is not None else code_sq  # never read without a gate
    gate_strides = gate.stride() if gate is not None else (0, 0, 0, 0)
    block_d = _block_d(D, codebook.dtype, gathered=True)
    if device.type == "cuda":
        target = SEARCH_WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = _INTERPRET_TARGET_PROGRAMS
    channel_programs = triton.cdiv(D, _CHANNELS_PER_PROGRAM)
    splits = torch.empty(1, dtype=torch.int32, device=device)
    partials = []
    for g, feat in enumerate(features):
        cap = cells[g].numel() - 1  # cells of the grain-g grid: an upper bound on the coded ones
        if cap == 0 or D == 0:
            continue
        best = torch.empty(cap, SEARCH_MAX_SPLITS, dtype=torch.float32, device=device)
        best_idx = torch.empty(cap, SEARCH_MAX_SPLITS, dtype=torch.int64, device=device)
        grid = lambda meta, cap=cap: (triton.cdiv(cap, meta["BLOCK_N"]) * SEARCH_MAX_SPLITS,)
        wrap_triton(_dynamic_quantize_search_kernel)[grid](
            feat, gate_arg, codebook, code_sq, cells[g], counts[g], best, best_idx, splits,
            K, D, feat.shape[2], feat.shape[3], target, *feat.stride(), *gate_strides, *codebook.stride(),
            GRAIN=g, REGION=2**g, HAS_GATE=gate is not None, COSINE=cosine,
            DOT_PRECISION=_dot_precision(feat.dtype), SINGLE_CHUNK=D <= block_d, MAX_SPLITS=SEARCH_MAX_SPLITS,
            BLOCK_D=block_d,
        )  # fmt: skip
        row_programs = triton.cdiv(cap, _ELEMENTWISE_BLOCK_N)
        partial = torch.zeros(row_programs, channel_programs, dtype=torch.float32, device=device)
        wrap_triton(_dynamic_quantize_emit_kernel)[(row_programs, channel_programs)](
            feat, gate_arg, codebook, cells[g], counts[g], best, best_idx, splits, quantized, indices, partial,
            D, feat.shape[2], feat.shape[3], *feat.stride(), *gate_strides, *codebook.stride(),
            *quantized.stride(), *indices.stride(),
            GRAIN=g, REGION=2**g, SPREAD=2 ** (G - 1 - g), HAS_GATE=gate is not None, MAX_SPLITS=SEARCH_MAX_SPLITS,
            BLOCK_N=_ELEMENTWISE_BLOCK_N, BLOCK_D=_CHANNELS_PER_PROGRAM,
            EMIT_BLOCK_D=min(EMIT_BLOCK_D, _CHANNELS_PER_PROGRAM),
        )  # fmt: skip
        partials.append(partial.sum())
    sq_sum = torch.stack(partials).sum() if partials else torch.zeros((), dtype=torch.float32, device=device)
    if D == 0:
        indices.zero_()
    return quantized, indices, sq_sum


def dynamic_quantize_bwd(
    grad_quantized: torch.Tensor | None,
    coef: torch.Tensor | None,
    features: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    gate: torch.Tensor | None,
    indices: torch.Tensor,
    cells: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    *,
    wrap_triton=_direct,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the dynamic quantizer.

    grad_quantized: (B, D, Hf, Wf) or None; coef: (2,) fp32 ``dL/dloss * [2 beta, 2] / (N_codes D)``
    or None; the rest as saved by the forward. Returns (grad of every features[g] in its dtype,
    grad of the gate in its dtype or None, grad of the codebook (K, D) in its dtype or None).
    """
    G = len(features)
    D = features[0].shape[1]
    device = codebook.device
    grad_features = [torch.zeros_like(f) for f in features]
    grad_gate = torch.zeros(gate.shape, dtype=torch.float32, device=device) if gate is not None else None
    grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=device)
    dummy = grad_codebook
    grad_q_arg = grad_quantized if grad_quantized is not None else dummy
    grad_q_strides = grad_quantized.stride() if grad_quantized is not None else (0, 0, 0, 0)
    gate_strides = gate.stride() if gate is not None else (0, 0, 0, 0)
    grad_gate_strides = grad_gate.stride() if grad_gate is not None else (0, 0, 0, 0)
    block_d = min(triton.next_power_of_2(max(D, 1)), BWD_BLOCK_D)
    for g, feat in enumerate(features):
        cap = cells[g].numel() - 1
        if cap == 0 or D == 0:
            continue
        grid = (triton.cdiv(cap, _ELEMENTWISE_BLOCK_N), triton.cdiv(D, _CHANNELS_PER_PROGRAM))
        wrap_triton(_dynamic_quantize_bwd_kernel)[grid](
            feat, gate if gate is not None else dummy, codebook, indices, cells[g], counts[g],
            grad_q_arg, coef if coef is not None else dummy,
            grad_features[g], grad_gate if grad_gate is not None else dummy, grad_codebook,
            D, feat.shape[2], feat.shape[3], *feat.stride(), *gate_strides, *codebook.stride(), *indices.stride(),
            *grad_q_strides, *grad_features[g].stride(), *grad_gate_strides,
            GRAIN=g, REGION=2**g, SPREAD=2 ** (G - 1 - g), HAS_GATE=gate is not None,
            HAS_GRAD_Q=grad_quantized is not None, HAS_GRAD_LOSS=coef is not None,
            CHANNELS=_CHANNELS_PER_PROGRAM, BLOCK_N=_ELEMENTWISE_BLOCK_N, BLOCK_D=block_d,
        )  # fmt: skip
    grad_gate = grad_gate.to(gate.dtype) if grad_gate is not None else None
    # Without a loss gradient nothing reaches the codebook (quantized is straight-through).
    return grad_features, grad_gate, grad_codebook.to(codebook.dtype) if coef is not None else None


def code_statistics(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code count and sum of the vectors assigned to it, for EMA codebook updates.

    x: (N, D) float, any strides; indices: (N,) int in [0, num_codes) (entries outside are
    skipped). Returns counts (num_codes,) fp32 and sums (num_codes, D) fp32, built with fp32
    atomics: no N x K one-hot is ever formed. Not differentiable.
    """
    return code_statistics_fwd(x, indices, num_codes)


def code_statistics_fwd(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, *, wrap_triton=_direct
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher of :func:`code_statistics` (same arguments and results)."""
    N, D = x.shape
    counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device)
    sums = torch.zeros(num_codes, D, dtype=torch.float32, device=x.device)
    if N == 0 or num_codes == 0:
        return counts, sums
    block_d = min(triton.next_power_of_2(max(D, 1)), STATISTICS_BLOCK_D, _CHANNELS_PER_PROGRAM)
    x = x.detach()
    grid = (triton.cdiv(N, _ELEMENTWISE_BLOCK_N), triton.cdiv(max(D, 1), _CHANNELS_PER_PROGRAM))
    wrap_triton(_code_statistics_kernel)[grid](
        x, indices, counts, sums, N, num_codes, D, x.stride(0), x.stride(1), indices.stride(0),
        CHANNELS=_CHANNELS_PER_PROGRAM, BLOCK_N=_ELEMENTWISE_BLOCK_N, BLOCK_D=block_d,
    )  # fmt: skip
    return counts, sums


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class VectorQuantizeFunction(torch.autograd.Function):
    """Plain VQ: straight-through to z; indices and distance are not differentiable."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, cosine: bool, out_dtype: torch.dtype):
        quantized, indices, distance = vector_quantize_fwd(z, codebook, cosine=cosine, out_dtype=out_dtype)
        ctx.z_dtype = z.dtype
        ctx.mark_non_differentiable(indices, distance)
        return quantized, indices, distance

    @staticmethod
    def backward(ctx, grad_quantized, grad_indices, grad_distance):
        return grad_quantized.to(ctx.z_dtype), None, None, None


class DynamicQuantizeFunction(torch.autograd.Function):
    """Dynamic VQ: quantized (straight-through) and loss, differentiable in features, gate, codebook."""

    @staticmethod
    def forward(
        ctx,
        codebook: torch.Tensor,
        gate: torch.Tensor | None,
        beta: float,
        cosine: bool,
        out_dtype: torch.dtype,
        cells: list[torch.Tensor],
        counts: list[torch.Tensor],
        *features: torch.Tensor,
    ):
        quantized, indices, sq_sum = dynamic_quantize_fwd(
            features, codebook, gate, cells, counts, cosine=cosine, out_dtype=out_dtype
        )
        # Every coded vector counts once; N_codes >= 1 whenever there is a region.
        denom = torch.stack(counts).sum().clamp_min(1).to(torch.float32) * features[0].shape[1]
        loss = (1.0 + beta) * sq_sum / denom
        ctx.save_for_backward(codebook, gate, indices, denom, *cells, *counts, *features)
        ctx.beta, ctx.num_grains = beta, len(features)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return quantized, indices, loss

    @staticmethod
    def backward(ctx, grad_quantized, grad_indices, grad_loss):
        codebook, gate, indices, denom, *rest = ctx.saved_tensors
        G = ctx.num_grains
        cells, counts, features = rest[:G], rest[G : 2 * G], rest[2 * G :]
        coef = None
        if grad_loss is not None:
            coef = grad_loss.float() * 2.0 / denom * torch.tensor([ctx.beta, 1.0], device=denom.device)
        grad_features, grad_gate, grad_codebook = dynamic_quantize_bwd(
            grad_quantized, coef, features, codebook, gate, indices, cells, counts
        )
        return grad_codebook, grad_gate, None, None, None, None, None, *grad_features


# ----------------------------------------------------------------------------------------------
# Public ops (same signatures as dqfast.vector_quantize / dqfast.dynamic_quantize)
# ----------------------------------------------------------------------------------------------


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2") -> VQOutput:
    """Nearest-code search. z: (..., D), codebook: (K, D) -> VQOutput(quantized (..., D),
    indices (...) int64, distance (...) fp32). See :func:`dqfast.vector_quantize`."""
    lead, D = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, D)  # a view for any z whose leading dims collapse (e.g. z[..., ::2])
    if metric == "cosine":
        flat = F.normalize(flat.float(), dim=-1, eps=NORMALIZE_EPS)
        codes = F.normalize(codebook.detach().float(), dim=-1, eps=NORMALIZE_EPS)
    else:
        codes = codebook.detach()
    quantized, indices, distance = VectorQuantizeFunction.apply(flat, codes, metric == "cosine", z.dtype)
    return VQOutput(quantized.reshape(*lead, D), indices.reshape(lead), distance.reshape(lead))


def _fractions(budget) -> list[float]:
    if isinstance(budget, torch.Tensor):
        budget = budget.reshape(-1).tolist()
    if isinstance(budget, numbers.Real):
        return [float(budget)]
    return [float(f) for f in budget]


def grain_from_budget(router_logits: torch.Tensor, budget) -> torch.Tensor:
    """Per-region grains meeting ``budget`` exactly in every image, on the device.

    router_logits: (B, H, W, G); budget: fraction of fine regions (G = 2) or G - 1 fractions,
    finest first. Grain G-1-i takes ``floor(cumsum(budget)[i] * H * W + 0.5)`` minus the regions
    already given, the top free ones by ``logits[..., G-1-i] - logits[..., 0]``, ties to the
    lower raster index; the rest get grain 0. Returns (B, H, W) int64.
    """
    B, H, W, G = router_logits.shape
    regions = H * W
    logits = router_logits.detach().reshape(B, regions, G)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    grain = torch.zeros(B, regions, dtype=torch.int64, device=logits.device)
    free = torch.ones(B, regions, dtype=torch.bool, device=logits.device)
    cumulative, given = 0.0, 0
    for i, fraction in enumerate(_fractions(budget)):
        cumulative += fraction
        target = min(math.floor(cumulative * regions + 0.5), regions)
        take, given = target - given, target
        g = G - 1 - i
        # A stable descending sort keeps raster order among equal scores; the free regions are
        # then ranked in that order and the first `take` of them are chosen.
        order = torch.sort(logits[..., g] - logits[..., 0], dim=1, descending=True, stable=True).indices
        free_sorted = free.gather(1, order)
        chosen_sorted = free_sorted & (torch.cumsum(free_sorted, 1) <= take)
        chosen = torch.zeros_like(free).scatter_(1, order, chosen_sorted)
        grain = torch.where(chosen, g, grain)
        free &= ~chosen
    return grain.reshape(B, H, W)


def _resolve_grain(grain, gate, router_logits, budget) -> torch.Tensor:
    if grain is not None:
        return grain.to(torch.int64)
    if gate is not None:
        return gate.detach().argmax(-1)
    if budget is None:
        return router_logits.detach().argmax(-1)
    return grain_from_budget(router_logits, budget)


def dynamic_quantize(
    features: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    *,
    grain: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    router_logits: torch.Tensor | None = None,
    budget=None,
    metric: str = "l2",
    beta: float = 0.25,
) -> DynamicVQOutput:
    """Dynamic (per-region grain) vector quantization. features: G maps (B, D, H*2**g, W*2**g),
    coarsest first; codebook: (K, D). See :func:`dqfast.dynamic_quantize`."""
    G = len(features)
    grain = _resolve_grain(grain, gate, router_logits, budget)
    cells, counts = _coded_cells(grain, G)
    if metric == "cosine":
        # v = normalize(gate * f): made densely by torch so autograd carries the normalisation
        # (and the gate's gradient through it); the kernels then see unit vectors.
        maps = []
        for g, f in enumerate(features):
            if gate is not None:
                side = 2**g
                f = f * gate[..., g].repeat_interleave(side, 1).repeat_interleave(side, 2)[:, None]
            maps.append(F.normalize(f.float(), dim=1, eps=NORMALIZE_EPS))
        codes = F.normalize(codebook.float(), dim=-1, eps=NORMALIZE_EPS)
        kernel_gate = None
    else:
        maps, codes, kernel_gate = list(features), codebook, gate
    quantized, indices, loss = DynamicQuantizeFunction.apply(
        codes, kernel_gate, float(beta), metric == "cosine", features[0].dtype, cells, counts, *maps
    )
    n_codes = (4**grain).sum((1, 2))
    return DynamicVQOutput(quantized, indices, grain, loss, n_codes)


# ----------------------------------------------------------------------------------------------
# Why the kernels cannot serve a call
# ----------------------------------------------------------------------------------------------


def _dtype_reasons(name: str, t: torch.Tensor) -> list[str]:
    if t.dtype not in _SUPPORTED_DTYPES:
        return [f"{name} has dtype {t.dtype}; the Triton kernel supports float32, float16 and bfloat16"]
    if t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [f"{name} is bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) cannot run correctly"]
    return []


def vector_quantize_reasons(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2") -> list[str]:
    """Why :func:`vector_quantize` cannot serve this call (empty list when it can)."""
    why = _dtype_reasons("z", z) + _dtype_reasons("codebook", codebook)
    if z.dtype != codebook.dtype:
        why.append(f"z ({z.dtype}) and codebook ({codebook.dtype}) must share a dtype")
    return why


def code_statistics_reasons(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> list[str]:
    """Why :func:`code_statistics` cannot serve this call (empty list when it can)."""
    return _dtype_reasons("x", x)


def dynamic_quantize_reasons(
    features: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    *,
    grain: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    router_logits: torch.Tensor | None = None,
    budget=None,
    metric: str = "l2",
    beta: float = 0.25,
) -> list[str]:
    """Why :func:`dynamic_quantize` cannot serve this call (empty list when it can)."""
    why = []
    for g, f in enumerate(features):
        why += _dtype_reasons(f"features[{g}]", f)
    why += _dtype_reasons("codebook", codebook)
    if gate is not None:
        why += _dtype_reasons("gate", gate)
    dtypes = {t.dtype for t in (*features, codebook)}
    if len(dtypes) > 1:
        why.append(f"features and codebook must share a dtype, got {sorted(str(d) for d in dtypes)}")
    finest = features[-1]
    cells = finest.shape[0] * finest.shape[2] * finest.shape[3]
    if cells >= 2**31:
        why.append(f"the finest grid has {cells} cells; the kernel indexes cells in int32 (< 2**31)")
    return why
