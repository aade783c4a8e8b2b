"""Coarse-to-fine masked attention: FlashAttention-style forward and backward, and KV-cache decoding.

The mask (DESIGN §3.4) is never materialised. Every program reads two tiny tables:

- ``seg_start`` (S + 1,) int32: the offset of every segment, followed by L;
- ``valid_end`` (B, S) int32: ``start(s) + lengths[b, s]``, the end of segment s's real tokens.

Query i may attend to key j iff both are real and ``j < q_end(i)``, where ``q_end(i)`` is ``i + 1``
in mode "causal" and the end of i's segment in mode "block" (seg(j) <= seg(i) means exactly that
j lies before the end of i's segment). With that, the keys a query tile needs are, per segment s,
the contiguous range ``[start(s), min(valid_end[b, s], max q_end))``. The kernels walk that range
segment by segment in key tiles anchored at the segment start, so:

- EMPTY tiles are never visited: the padded tail of every segment, keys past the causal diagonal,
  later segments in block mode, and whole query tiles of padding;
- FULL tiles (every key real and allowed for every real query of the tile) form a prefix of each
  segment's range and run without any mask;
- PARTIAL tiles (the diagonal, the last real tile of a segment) apply the per-element mask.

The backward pass mirrors this from the key side (one program per key tile walking the query
tiles of every segment that may see it, accumulating dk and dv) and from the query side (one
program per query tile accumulating dq, like the forward); two kernels rather than atomics keep
dq deterministic. Pad positions are never read, as queries or as keys (whatever they hold, even
NaN, cannot leak in): pad queries write exact zeros and ``lse = +inf``, and rows a backward tile
does not load read ``lse = +inf``, so their probabilities and gradients are exact zeros.

Decoding splits the cache over the key axis (flash-decoding): each program takes one query and
reduces one chunk of keys to a partial (max, sum, accumulator), its scores as row reductions of
q * k (a single query would fill 1 of 16 rows of a tensor-core tile), and a small kernel merges the
chunks. Invalid cache slots are masked out of the K and V loads themselves, so they are never read.

Scores are handled in base 2: ``scale * log2(e)`` is folded into the scores so the online softmax
uses ``exp2``, and the saved log-sum-exp is in those units.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "c2f_attention",
    "c2f_attention_reasons",
    "c2f_decode_attention",
    "c2f_decode_attention_reasons",
    "c2f_attention_fwd",
    "c2f_attention_bwd",
    "c2f_decode_attention_fwd",
]

# ----------------------------------------------------------------------------------------------
# Tuning constants
# ----------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = math.log2(math.e)
# Every tl.dot dimension must be >= 16 on the GPU, so head dims below 16 are padded up to 16.
MIN_BLOCK_D = 16
# Decoding: one program per (b, h, query, key chunk); a single query's scores are a row
# reduction (sum of q * k over Dh), not a tl.dot padded to 16 query rows (15 of 16 rows of
# padding). The kernel is memory-bound: its K and V loads are unconditional (masked by validity,
# so holes cost no bytes) and the key loop is software-pipelined over DECODE_NUM_STAGES tiles.
DECODE_BLOCK_N = 16 if _INTERPRET else 64
DECODE_NUM_STAGES = 3
# Fewest key tiles a chunk is given before the cache is split further, so that each program has
# several tiles in flight rather than one.
DECODE_MIN_TILES_PER_SPLIT = 2
# Upper bound on key chunks per (b, h, query tile); the merge kernel loads all of them at once.
DECODE_MAX_SPLITS = 64
# Positions and in-slice offsets are int32 (only the (b, h) base offset is int64).
_INT32_LIMIT = 2**31 - 1
# Grids put B * Hh on axis 0 (2**31 - 1 programs); sequence tiles (at least 16 positions) and
# decode query rows go on axes 1 and 2, which CUDA caps at 65535.
_GRID_YZ_LIMIT = 65535
MIN_GRID_TILE = 16


def _configs(space: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune space of (BLOCK_M, BLOCK_N, num_warps, num_stages) on the GPU; one fixed 16x16
    config in the interpreter, where tuning is slow and 16 is the smallest tl.dot size."""
    if _INTERPRET:
        space = [(16, 16, 4, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in dict.fromkeys(space)
    ]


# Every space below was compiled for sm_90 at the bench's headline shapes (Dh 128 DQ-Transformer,
# Dh 64 VAR): no 16-bit config spills or needs more than 227 KiB of shared memory. A 128-row tile
# takes 8 warps (with 4, the forward (128, 64) spilled 392 B and dq (128, 32) 376 B); dk/dv keep
# four BLOCK_N x Dh tiles (k, v, dk, dv) live, so 64- and 128-key tiles take 8 warps (with 4,
# (32, 128) spilled 2 KB and (64, 64) 244 B; (64, 64) still spilled 140 B with 8). Triton 3.6
# and 3.9 ship different ptxas versions, and both are checked (make sm90-report): near 128 or 168
# registers either one may trade a few bytes of spill for occupancy, so a config clean under one
# can spill under the other.
#
# fp32 inputs go through tensor cores as tf32x3 (three tf32 products: about fp32 accuracy, as
# the vector quantizer does). Each operand is split in two, so fp32 tiles need about twice the
# registers and shared memory of 16-bit ones: they get their own small spaces, and the autotuner
# prunes by dtype (the union is listed so every config is visible to tooling). At Dh 128 every
# 64-row fp32 tile spilled (fwd 480 B, dq 1 KB, dk/dv 1-2 KB, with 4 or 8 warps); the 32- and
# 16-row tiles kept here do not (mma.sync: wgmma needs 64 rows).
_FWD_16 = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4), (32, 32, 4, 2)]
_FWD_32 = [(32, 32, 4, 2)]
# dq: like the forward ((32, 64, 4, 3) spilled 36 B at Dh 128).
_BWD_DQ_16 = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)]
# fp32: (32, 32, 8, 2) spills 92 B at Dh 128 under triton 3.9 (none under 3.6); (16, 32, 4, 2)
# spills under neither (254 registers at Dh 128), so autotune always has a clean fp32 tile.
_BWD_DQ_32 = [(32, 32, 8, 2), (16, 32, 4, 2)]
# dk, dv: the program owns a key tile (BLOCK_N) and walks query tiles (BLOCK_M).
# The smallest 16-bit tile is (32, 32, 4, 2), on the same 32-key grid as the (16, 32, 4, 2) it
# replaces: that one spilled 12 B at Dh 64 under triton 3.6 (128 registers), and (16, 32, 4, 3)
# 12 B at Dh 64 and 92 B at Dh 128 under 3.9. (32, 32, 4, 2) compiles without spills under both
# (135-223 registers; an earlier version of this kernel spilled 12 B there at Dh 64).
_BWD_DKDV_16 = [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (16, 64, 4, 2), (32, 32, 4, 2)]
_BWD_DKDV_32 = [(16, 16, 4, 2)]

_FWD_CONFIGS = _configs(_FWD_16 + _FWD_32)
_BWD_DQ_CONFIGS = _configs(_BWD_DQ_16 + _BWD_DQ_32)
_BWD_DKDV_CONFIGS = _configs(_BWD_DKDV_16 + _BWD_DKDV_32)


def _by_dtype(space_16: list, space_32: list):
    """early_config_prune keeping the configs of the launch's dtype (fp32 or 16-bit)."""
    keep_16, keep_32 = set(space_16), set(space_32)

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if _INTERPRET:
            return configs
        keep = keep_32 if named_args["Q"].dtype == torch.float32 else keep_16
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
        return kept or configs

    return {"early_config_prune": prune}


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _query_rows(
    SEG_START,  # (S + 1,) int32 segment offsets followed by L
    VALID_END,  # (B, S) int32 end of the real tokens of every segment
    b,
    S,
    offs_m,
    IS_CAUSAL: tl.constexpr,
):
    """Per query row: is it a real token, and the exclusive bound q_end(i) on its keys."""
    row_valid = offs_m < 0
    seg_end = tl.zeros_like(offs_m)
    for s in range(0, S):
        lo = tl.load(SEG_START + s)
        hi = tl.load(SEG_START + s + 1)
        vend = tl.load(VALID_END + b * S + s)
        row_valid = row_valid | ((offs_m >= lo) & (offs_m < vend))
        seg_end = tl.where((offs_m >= lo) & (offs_m < hi), hi, seg_end)
    if IS_CAUSAL:
        q_end = offs_m + 1
    else:
        q_end = seg_end
    return row_valid, q_end


@triton.jit
def _key_range(q_end, row_valid, L):
    """(max, min) of q_end over the real rows of a tile: the key bound and the FULL-tile bound.

    A tile without real rows gets (0, L), which makes every key loop below run zero times.
    """
    kv_hi = tl.max(tl.where(row_valid, q_end, 0), axis=0)
    full_hi = tl.min(tl.where(row_valid, q_end, L), axis=0)
    return kv_hi, full_hi


@triton.jit
def _segment_key_tiles(SEG_START, VALID_END, b, S, s, kv_hi, full_hi, BLOCK_N: tl.constexpr):
    """Key tiles of segment s for a query tile: [lo, mid) are FULL, [mid, end) are PARTIAL."""
    lo = tl.load(SEG_START + s)
    vend = tl.load(VALID_END + b * S + s)
    end = tl.minimum(vend, kv_hi)
    n_full = tl.maximum(tl.minimum(end, full_hi) - lo, 0) // BLOCK_N
    mid = lo + n_full * BLOCK_N
    return lo, mid, end


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,  # K pointer already offset to this (b, h)
    v_base,  # V pointer already offset to this (b, h)
    stride_kl,
    stride_kd,
    stride_vl,
    stride_vd,
    start_n,
    kv_end,
    q_end,
    offs_d,
    d_mask,
    qk_scale,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key tile of the online softmax: returns the updated (acc, l_i, m_i)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    load_mask = d_mask[None, :]
    if MASKED:
        load_mask = load_mask & (offs_n[:, None] < kv_end)
    k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        allowed = (offs_n[None, :] < kv_end) & (offs_n[None, :] < q_end[:, None])
        qk = tl.where(allowed, qk, float("-inf"))
    # m_i starts finite (-1e30), so a row whose keys are all masked keeps alpha = 1 and p = 0.
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _bwd_dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,  # K pointer already offset to this (b, h)
    v_base,  # V pointer already offset to this (b, h)
    stride_kl,
    stride_kd,
    stride_vl,
    stride_vd,
    start_n,
    kv_end,
    q_end,
    offs_d,
    d_mask,
    qk_scale,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq += dS @ K over one key tile, dS = P * (dP - delta), P recomputed from the saved lse."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    load_mask = d_mask[None, :]
    if MASKED:
        load_mask = load_mask & (offs_n[:, None] < kv_end)
    k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        allowed = (offs_n[None, :] < kv_end) & (offs_n[None, :] < q_end[:, None])
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_base,  # Q pointer already offset to this (b, h)
    do_base,  # dO pointer already offset to this (b, h)
    lse_base,  # LSE pointer already offset to this (b, h)
    delta_base,  # DELTA pointer already offset to this (b, h)
    stride_ql,
    stride_qd,
    stride_dol,
    stride_dod,
    start_m,
    q_hi,
    seg_end,
    offs_n,
    key_valid,
    offs_d,
    d_mask,
    qk_scale,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk += dS^T @ Q and dv += P^T @ dO over one query tile, computed transposed (keys x queries)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_mask = offs_m < q_hi
    load_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=load_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod, mask=load_mask, other=0.0)
    # Rows at or past q_hi (pad or out of range) read lse = +inf: their probabilities are exactly 0.
    lse = tl.load(lse_base + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_mask, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.math.exp2(qk_t - lse[None, :])
    if MASKED:
        if IS_CAUSAL:
            q_end = offs_m + 1
        else:
            q_end = tl.zeros_like(offs_m) + seg_end
        allowed = key_valid[:, None] & (offs_n[:, None] < q_end[None, :])
        p_t = tl.where(allowed, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_FWD_CONFIGS, key=["L", "HEAD_DIM", "IS_CAUSAL"], prune_configs_by=_by_dtype(_FWD_16, _FWD_32))
@triton.jit
def _c2f_attention_fwd_kernel(
    Q,  # (B, H, L, Dh) queries, any strides
    K,  # (B, H, L, Dh) keys, any strides
    V,  # (B, H, L, Dh) values, any strides
    O,  # (B, H, L, Dh) output, any strides
    LSE,  # (B, H, L) fp32 contiguous: log2-sum-exp2 of the scaled scores, +inf on pad rows
    SEG_START,  # (S + 1,) int32 segment offsets followed by L
    VALID_END,  # (B, S) int32 contiguous: start + length of every segment
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    H,
    L,
    S,
    HEAD_DIM: tl.constexpr,  # the real Dh; BLOCK_D is it rounded up to a power of two
    qk_scale,  # scale * log2(e)
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    # Positions stay int32 (L < 2**31); only the (b, h) base offsets need int64.
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_in = offs_m < L
    row_valid, q_end = _query_rows(SEG_START, VALID_END, b, S, offs_m, IS_CAUSAL)
    kv_hi, full_hi = _key_range(q_end, row_valid, L)

    # Pad rows are never read: whatever they hold (even NaN) cannot leak into the tile.
    q = tl.load(
        q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    # Every real row has q_end >= 1; pad rows get 0 (they allow no key), so after the key loop
    # row_valid is q_end > 0 and no separate row mask stays live across it (under triton 3.6 the
    # mask kept through the loop was spilled at BLOCK_M = BLOCK_N = 128, Dh 128).
    q_end = tl.where(row_valid, q_end, 0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, S):
        lo, mid, end = _segment_key_tiles(SEG_START, VALID_END, b, S, s, kv_hi, full_hi, BLOCK_N)
        for start_n in range(lo, mid, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                start_n, end, q_end, offs_d, d_mask, qk_scale, False, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
        for start_n in range(mid, end, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                start_n, end, q_end, offs_d, d_mask, qk_scale, True, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip

    # Pad rows may have l_i = 0 (or garbage from FULL tiles): they write exact zeros.
    row_valid = q_end > 0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where(row_valid[:, None], acc / l_safe[:, None], 0.0)
    tl.store(
        o_base + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=m_in[:, None] & d_mask[None, :],
    )
    lse = tl.where(row_valid, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh * L + offs_m, lse, mask=m_in)


@triton.jit
def _c2f_attention_bwd_preprocess_kernel(
    O,  # (B, H, L, Dh) forward output, any strides
    DO,  # (B, H, L, Dh) output gradient, any strides
    DELTA,  # (B, H, L) fp32 contiguous: rowsum(dO * O)
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    H,
    L,
    HEAD_DIM: tl.constexpr,  # the real Dh; BLOCK_D is it rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * L + offs_m, delta, mask=offs_m < L)


@triton.autotune(
    configs=_BWD_DQ_CONFIGS, key=["L", "HEAD_DIM", "IS_CAUSAL"], prune_configs_by=_by_dtype(_BWD_DQ_16, _BWD_DQ_32)
)
@triton.jit
def _c2f_attention_bwd_dq_kernel(
    Q,  # (B, H, L, Dh) queries, any strides
    K,  # (B, H, L, Dh) keys, any strides
    V,  # (B, H, L, Dh) values, any strides
    DO,  # (B, H, L, Dh) output gradient, any strides
    DQ,  # (B, H, L, Dh) query gradient, any strides
    LSE,  # (B, H, L) fp32 contiguous, from the forward
    DELTA,  # (B, H, L) fp32 contiguous, from the preprocess kernel
    SEG_START,  # (S + 1,) int32 segment offsets followed by L
    VALID_END,  # (B, S) int32 contiguous: start + length of every segment
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dql,
    stride_dqd,
    H,
    L,
    S,
    HEAD_DIM: tl.constexpr,  # the real Dh; BLOCK_D is it rounded up to a power of two
    scale,
    qk_scale,  # scale * log2(e)
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_in = offs_m < L
    row_valid, q_end = _query_rows(SEG_START, VALID_END, b, S, offs_m, IS_CAUSAL)
    kv_hi, full_hi = _key_range(q_end, row_valid, L)

    # Pad rows are never read (their dq is exactly 0); lse = +inf zeroes their probabilities.
    load_mask = row_valid[:, None] & d_mask[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
        mask=load_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
        mask=load_mask,
        other=0.0,
    )
    lse = tl.load(LSE + bh * L + offs_m, mask=row_valid, other=float("inf"))
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, S):
        lo, mid, end = _segment_key_tiles(SEG_START, VALID_END, b, S, s, kv_hi, full_hi, BLOCK_N)
        for start_n in range(lo, mid, BLOCK_N):
            dq = _bwd_dq_tile(
                dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                start_n, end, q_end, offs_d, d_mask, qk_scale, False, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
        for start_n in range(mid, end, BLOCK_N):
            dq = _bwd_dq_tile(
                dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                start_n, end, q_end, offs_d, d_mask, qk_scale, True, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=m_in[:, None] & d_mask[None, :],
    )


@triton.autotune(
    configs=_BWD_DKDV_CONFIGS,
    key=["L", "HEAD_DIM", "IS_CAUSAL"],
    prune_configs_by=_by_dtype(_BWD_DKDV_16, _BWD_DKDV_32),
)
@triton.jit
def _c2f_attention_bwd_dkdv_kernel(
    Q,  # (B, H, L, Dh) queries, any strides
    K,  # (B, H, L, Dh) keys, any strides
    V,  # (B, H, L, Dh) values, any strides
    DO,  # (B, H, L, Dh) output gradient, any strides
    DK,  # (B, H, L, Dh) key gradient, any strides
    DV,  # (B, H, L, Dh) value gradient, any strides
    LSE,  # (B, H, L) fp32 contiguous, from the forward
    DELTA,  # (B, H, L) fp32 contiguous, from the preprocess kernel
    SEG_START,  # (S + 1,) int32 segment offsets followed by L
    VALID_END,  # (B, S) int32 contiguous: start + length of every segment
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkl,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvl,
    stride_dvd,
    H,
    L,
    S,
    HEAD_DIM: tl.constexpr,  # the real Dh; BLOCK_D is it rounded up to a power of two
    scale,
    qk_scale,  # scale * log2(e)
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    b = bh // H
    h = bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh * L
    delta_base = DELTA + bh * L

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_in = offs_n < L
    key_valid = offs_n < 0
    for s in range(0, S):
        lo = tl.load(SEG_START + s)
        vend = tl.load(VALID_END + b * S + s)
        key_valid = key_valid | ((offs_n >= lo) & (offs_n < vend))
    n_valid = tl.sum(key_valid.to(tl.int32), axis=0)

    # Pad keys are never read (their dk, dv are exactly 0).
    kv_mask = key_valid[:, None] & d_mask[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for s in range(0, S):
        lo = tl.load(SEG_START + s)
        seg_end = tl.load(SEG_START + s + 1)
        vend = tl.load(VALID_END + b * S + s)
        # Real queries of segment s that can see some key of this tile: [q_lo, q_hi).
        if IS_CAUSAL:
            q_lo = tl.maximum(lo, start_n)
            q_hi = vend
            full_from = start_n + BLOCK_N - 1
        else:
            q_lo = lo
            q_hi = tl.where(seg_end > start_n, vend, lo)
            full_from = tl.where(seg_end >= start_n + BLOCK_N, lo, q_hi)
        q_hi = tl.where(n_valid > 0, q_hi, q_lo)
        full_from = tl.where(n_valid == BLOCK_N, full_from, q_hi)
        # Query tiles start at q_lo; the first ones may be PARTIAL (diagonal), the rest FULL.
        n_partial = (tl.maximum(full_from - q_lo, 0) + BLOCK_M - 1) // BLOCK_M
        mid = tl.minimum(q_lo + n_partial * BLOCK_M, q_hi)
        for start_m in range(q_lo, mid, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd, stride_dol,
                stride_dod, start_m, q_hi, seg_end, offs_n, key_valid, offs_d, d_mask, qk_scale,
                True, IS_CAUSAL, BLOCK_M, DOT_PRECISION,
            )  # fmt: skip
        for start_m in range(mid, q_hi, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd, stride_dol,
                stride_dod, start_m, q_hi, seg_end, offs_n, key_valid, offs_d, d_mask, qk_scale,
                False, IS_CAUSAL, BLOCK_M, DOT_PRECISION,
            )  # fmt: skip
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=n_in[:, None] & d_mask[None, :],
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=n_in[:, None] & d_mask[None, :],
    )


@triton.jit
def _c2f_decode_attention_fwd_kernel(
    Q,  # (B, H, Lq, Dh) new queries, any strides
    K,  # (B, H, Lk, Dh) key cache, any strides
    V,  # (B, H, Lk, Dh) value cache, any strides
    KEY_VALID,  # (B, Lk) uint8 view of the bool key_valid, any strides
    PART_ACC,  # (B * H * Lq * n_splits, Dh) fp32: unnormalised partial outputs
    PART_M,  # (B * H * Lq * n_splits,) fp32: partial running max (log2 units)
    PART_L,  # (B * H * Lq * n_splits,) fp32: partial sum of exp2
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_kvb,
    stride_kvl,
    H,
    LQ,
    LK,
    HEAD_DIM: tl.constexpr,  # the real Dh; BLOCK_D is it rounded up to a power of two
    n_splits,
    keys_per_split,
    qk_scale,  # scale * log2(e)
    NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row = tl.program_id(2)
    b = bh // H
    h = bh % H
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kv_valid_base = KEY_VALID + b * stride_kvb

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + row * stride_ql + offs_d * stride_qd, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * qk_scale
    # q is pre-scaled so a score is one multiply-add per channel, reduced over the row.
    m_i = tl.full([1], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_lo = split * keys_per_split
    n_hi = tl.minimum(n_lo + keys_per_split, LK)
    for start_n in tl.range(n_lo, n_hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = tl.load(kv_valid_base + offs_n * stride_kvl, mask=offs_n < n_hi, other=0) != 0
        # Invalid slots are never read (masked loads of a hole fetch nothing): whatever they hold,
        # even NaN, cannot reach the output.
        load_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
        qk = tl.sum(q[None, :] * k.to(tl.float32), axis=1)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=0))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    part = (bh * LQ + row) * n_splits + split
    tl.store(PART_ACC + part * HEAD_DIM + offs_d, acc, mask=d_mask)
    zero = tl.arange(0, 1)
    tl.store(PART_M + part + zero, m_i)
    tl.store(PART_L + part + zero, l_i)


@triton.jit
def _c2f_decode_attention_combine_kernel(
    PART_ACC,  # (B * H * Lq * n_splits, Dh) fp32 partial outputs
    PART_M,  # (B * H * Lq * n_splits,) fp32 partial running max
    PART_L,  # (B * H * Lq * n_splits,) fp32 partial sum
    O,  # (B, H, Lq, Dh) output, any strides
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    H,
    LQ,
    HEAD_DIM: tl.constexpr,  # the real Dh; BLOCK_D is it rounded up to a power of two
    n_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_splits
    d_mask = offs_d < HEAD_DIM
    part = (bh * LQ + row) * n_splits + offs_s
    m_s = tl.load(PART_M + part, mask=s_mask, other=-1.0e30)
    l_s = tl.load(PART_L + part, mask=s_mask, other=0.0)
    acc_s = tl.load(
        PART_ACC + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0
    )
    m = tl.max(m_s, axis=0)
    w = tl.math.exp2(m_s - m)
    l = tl.sum(w * l_s, axis=0)
    acc = tl.sum(w[:, None] * acc_s, axis=0)
    # A query with no valid key anywhere has l = 0 and returns 0.
    out = tl.where(l > 0.0, acc / tl.where(l > 0.0, l, 1.0), 0.0)
    tl.store(
        O + b * stride_ob + h * stride_oh + row * stride_ol + offs_d * stride_od,
        out.to(O.dtype.element_ty),
        mask=d_mask,
    )


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


def _block_d(head_dim: int) -> int:
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 passes on tensor cores give ~fp32 accuracy (plain tf32 would cost
    # ~1e-3 relative error, far above the fp32 contract; "ieee" runs on CUDA cores: no tensor
    # core instruction at all, and up to 100 KB of spills at Dh = 128 on sm_90). fp16/bf16
    # inputs use tensor cores either way.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=64)
def _segment_starts(offsets: tuple[int, ...], seq_len: int, device: torch.device) -> torch.Tensor:
    """(S + 1,) int32: segment offsets followed by L, cached so a layout costs no copy per call."""
    return torch.tensor((*offsets, seq_len), dtype=torch.int32, device=device)


def _layout_tables(layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(seg_start (S + 1,), valid_end (B, S)) int32 from a C2FLayout, on ``device``."""
    seg_start = _segment_starts(tuple(layout.offsets), int(layout.seq_len), device)
    lengths = layout.lengths.to(device=device, dtype=torch.int32)
    valid_end = (seg_start[:-1] + lengths).contiguous()
    return seg_start, valid_end


def c2f_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seg_start: torch.Tensor,
    valid_end: torch.Tensor,
    is_causal: bool,
    scale: float,
    *,
    wrap_triton=_direct,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked coarse-to-fine attention forward.

    q, k, v: (B, H, L, Dh), any strides (e.g. transposed views of a fused (B, L, 3, H, Dh) qkv).
    seg_start: (S + 1,) int32 segment offsets followed by L; valid_end: (B, S) int32 contiguous.
    Returns (out (B, H, L, Dh) in q's dtype and layout, lse (B, H, L) fp32 in log2 units of the
    scaled scores, +inf on pad rows).
    """
    B, H, L, Dh = q.shape
    assert valid_end.is_contiguous() and valid_end.shape == (B, seg_start.numel() - 1)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    def grid(meta):
        return (B * H, triton.cdiv(L, meta["BLOCK_M"]))

    wrap_triton(_c2f_attention_fwd_kernel)[grid](
        q, k, v, out, lse, seg_start, valid_end,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, valid_end.shape[1], Dh, scale * LOG2E,
        IS_CAUSAL=is_causal, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=_block_d(Dh),
    )  # fmt: skip
    return out, lse


def c2f_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    seg_start: torch.Tensor,
    valid_end: torch.Tensor,
    is_causal: bool,
    scale: float,
    *,
    wrap_triton=_direct,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), each (B, H, L, Dh) in its input's dtype and layout.

    do, q, k, v, out: (B, H, L, Dh), any strides; lse: (B, H, L) fp32 from the forward;
    seg_start, valid_end: as in :func:`c2f_attention_fwd`.
    """
    B, H, L, Dh = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0:
        return dq, dk, dv
    block_d = _block_d(Dh)
    precision = _dot_precision(q.dtype)
    S = valid_end.shape[1]

    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    pre_block = 16 if _INTERPRET else 64
    wrap_triton(_c2f_attention_bwd_preprocess_kernel)[(B * H, triton.cdiv(L, pre_block))](
        out, do, delta, *out.stride(), *do.stride(), H, L, Dh, BLOCK_M=pre_block, BLOCK_D=block_d
    )

    def dq_grid(meta):
        return (B * H, triton.cdiv(L, meta["BLOCK_M"]))

    wrap_triton(_c2f_attention_bwd_dq_kernel)[dq_grid](
        q, k, v, do, dq, lse, delta, seg_start, valid_end,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, L, S, Dh, scale, scale * LOG2E,
        IS_CAUSAL=is_causal, DOT_PRECISION=precision, BLOCK_D=block_d,
    )  # fmt: skip

    def dkdv_grid(meta):
        return (B * H, triton.cdiv(L, meta["BLOCK_N"]))

    wrap_triton(_c2f_attention_bwd_dkdv_kernel)[dkdv_grid](
        q, k, v, do, dk, dv, lse, delta, seg_start, valid_end,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, L, S, Dh, scale, scale * LOG2E,
        IS_CAUSAL=is_causal, DOT_PRECISION=precision, BLOCK_D=block_d,
    )  # fmt: skip
    return dq, dk, dv


def _decode_splits(programs: int, lk: int, device: torch.device) -> tuple[int, int]:
    """(number of key chunks, keys per chunk) so that about two waves of programs fill the GPU,
    each chunk at least DECODE_MIN_TILES_PER_SPLIT key tiles long."""
    n_tiles = triton.cdiv(lk, DECODE_BLOCK_N)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        most = max(1, n_tiles // DECODE_MIN_TILES_PER_SPLIT)
    else:
        # Interpreter: enough chunks that small test caches are split (one key tile per chunk),
        # so the split-and-merge path is what the tests exercise.
        target, most = 64, n_tiles
    splits = max(1, min(triton.cdiv(target, programs), most, DECODE_MAX_SPLITS))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split * DECODE_BLOCK_N


def c2f_decode_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    *,
    wrap_triton=_direct,
) -> torch.Tensor:
    """Few-query attention over a KV cache, split over the key axis then merged.

    q: (B, H, Lq, Dh); k_cache, v_cache: (B, H, Lk, Dh); key_valid: (B, Lk) bool; any strides.
    Returns (B, H, Lq, Dh) in q's dtype; a query with no valid key gets 0.
    """
    B, H, Lq, Dh = q.shape
    Lk = k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()
    n_splits, keys_per_split = _decode_splits(B * H * Lq, Lk, q.device)
    parts = B * H * Lq * n_splits
    part_acc = torch.empty((parts, Dh), dtype=torch.float32, device=q.device)
    part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
    part_l = torch.empty(parts, dtype=torch.float32, device=q.device)
    # Same-size reinterpretation (no copy): Triton reads bytes more predictably than i1 pointers.
    kv_bytes = key_valid.view(torch.uint8)
    block_d = _block_d(Dh)
    wrap_triton(_c2f_decode_attention_fwd_kernel)[(B * H, n_splits, Lq)](
        q, k_cache, v_cache, kv_bytes, part_acc, part_m, part_l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *kv_bytes.stride(),
        H, Lq, Lk, Dh, n_splits, keys_per_split, scale * LOG2E,
        NUM_STAGES=DECODE_NUM_STAGES, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d,
    )  # fmt: skip
    wrap_triton(_c2f_decode_attention_combine_kernel)[(B * H, Lq)](
        part_acc, part_m, part_l, out, *out.stride(), H, Lq, Dh, n_splits,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=block_d,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class C2FAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg_start, valid_end, is_causal: bool, scale: float):
        out, lse = c2f_attention_fwd(q, k, v, seg_start, valid_end, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, seg_start, valid_end)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, seg_start, valid_end = ctx.saved_tensors
        dq, dk, dv = c2f_attention_bwd(do, q, k, v, out, lse, seg_start, valid_end, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public ops (called by dqfast.ops with validated arguments) and their reasons
# ----------------------------------------------------------------------------------------------


def c2f_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, scale: float | None = None
) -> torch.Tensor:
    """Coarse-to-fine masked attention (Triton). Same contract as ``dqfast.c2f_attention``.

    q, k, v: (B, Hh, L, Dh) fp16/bf16/fp32, any strides; layout: a ``dqfast.C2FLayout`` with
    L = layout.seq_len. Returns (B, Hh, L, Dh) in q's dtype; differentiable in q, k, v.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seg_start, valid_end = _layout_tables(layout, q.device)
    return C2FAttentionFunction.apply(q, k, v, seg_start, valid_end, layout.mode == "causal", scale)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def c2f_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """KV-cache decoding attention (Triton, forward only). Same contract as ``dqfast.c2f_decode_attention``.

    q: (B, Hh, Lq, Dh); k_cache, v_cache: (B, Hh, Lk, Dh); key_valid: (B, Lk) bool.
    Raises RuntimeError when a gradient would be needed (use the reference backend for that).
    """
    if _needs_grad(q, k_cache, v_cache):
        raise RuntimeError(
            "c2f_decode_attention's Triton kernel is forward-only (inference); call it under "
            "torch.no_grad() or use the reference backend to differentiate"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return c2f_decode_attention_fwd(q, k_cache, v_cache, key_valid, scale)


def _common_reasons(tensors: dict[str, torch.Tensor]) -> list[str]:
    why = []
    first_name, first = next(iter(tensors.items()))
    dtype = first.dtype
    if dtype not in SUPPORTED_DTYPES:
        why.append(f"{first_name} has dtype {dtype}; the kernel supports float16, bfloat16 and float32")
    elif dtype == torch.bfloat16 and _INTERPRET:
        why.append("bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1)")
    for name, t in tensors.items():
        if t.dtype != dtype:
            why.append(f"{name} has dtype {t.dtype} but {first_name} has {dtype}")
    if first.dim() == 4 and triton.cdiv(first.shape[2], MIN_GRID_TILE) > _GRID_YZ_LIMIT:
        why.append(f"sequence length {first.shape[2]} exceeds the launch grid's limit")
    head_dim = first.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        why.append(f"head dim {head_dim} exceeds the kernel's maximum of {MAX_HEAD_DIM}")
    for name, t in tensors.items():
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape[2:], t.stride()[2:]))
        if extent > _INT32_LIMIT:
            why.append(f"{name}'s (L, Dh) slice spans more than 2**31 elements (int32 offsets)")
    return why


def c2f_attention_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, scale: float | None = None
) -> list[str]:
    """Why the Triton kernel cannot serve this ``c2f_attention`` call (empty list: it can)."""
    why = _common_reasons({"q": q, "k": k, "v": v})
    if layout.mode not in ("causal", "block"):
        why.append(f"layout.mode {layout.mode!r} is not 'causal' or 'block'")
    return why


def c2f_decode_attention_reasons(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    scale: float | None = None,
) -> list[str]:
    """Why the Triton decode kernel cannot serve this call (empty list: it can)."""
    why = _common_reasons({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    if q.shape[2] > _GRID_YZ_LIMIT:
        why.append(f"{q.shape[2]} queries exceed the decode grid's limit of {_GRID_YZ_LIMIT}")
    if _needs_grad(q, k_cache, v_cache):
        why.append("q, k_cache or v_cache requires grad; the decode kernel is forward-only (inference)")
    return why
