"""Fused sub-pixel convolution: ``pixel_shuffle(act(conv2d(pad(x), weight, bias)), r)`` in Triton.

Forward: an implicit-GEMM convolution. A program owns a tile of low-res output pixels
(``M = B * H * W`` rows) times conv output channels (``N = Cout * r**2`` columns) and reduces over
``Cin * k * k`` with ``tl.dot`` in fp32. Padding is index arithmetic on the input (zeros: masked
loads; reflect: mirrored indices; replicate: clamped indices), so no padded copy of ``x`` exists.
The epilogue adds the bias, applies the activation and stores conv channel ``c * r**2 + a * r + b``
of pixel ``(h, w)`` straight to ``out[:, c, r * h + a, r * w + b]``: the ``Cout * r**2`` tensor
never touches memory. The store address splits into a per-pixel part plus a per-channel part,
which is why the shuffle costs nothing.

Operand layouts (what lets the GEMM loads run as pipelined ``cp.async`` copies feeding wgmma):
every GEMM operand is read as runs along its contiguous channel axis. ``x`` is read channels-last
(element (b, h, w, c) with unit channel stride) and the weight with Cin innermost, so each pixel
row of the A tile and each output-channel column of the B tile is one contiguous run of the
reduction axis; padding only moves (reflect, replicate) or masks (zeros) whole rows. Read through
NCHW strides instead, the pixel axis is not provably contiguous (div/mod and reflect indexing) and
every element is a scalar 16-bit load into one shared-memory stage. The launchers choose per call:
a channels_last ``x`` or weight is used in place; an NCHW one is copied to channels-last first.
That copy reads and writes ``x`` once (2 |x| bytes; at the codec 96 -> 128 * 4 headline layer about
a third of the kernel's own x + out traffic), which a channels_last network never pays: the output
keeps x's memory format. ``fold_phase_weights`` lays the phase weight out Cin-innermost already.
Row alignment comes from Triton's specialisation of integer arguments divisible by 16 (channel
counts that are multiples of 16, as in every benchmark layer, give 16-byte vector copies; other
counts are still correct with narrower loads).

Backward (``SubPixelConv2dFunction``): both GEMMs run along the conv output channels, so the
gradient w.r.t. the conv output is laid out as a (B*H*W, N) matrix with N innermost and rows
padded to a multiple of 16 with zeros:
- without an activation it is ``pixel_unshuffle(grad_out)`` (one copy; both GEMMs then read it
  as contiguous rows instead of gathering it element by element);
- with an activation, one kernel recomputes the pre-activation tile (the forward GEMM again) and
  writes ``grad_out * act'(pre)`` into that matrix. Recomputing instead of saving the
  pre-activation in the forward keeps the forward's HBM traffic at x + weight + out (saving would
  write a second output-sized tensor, doubling the writes of a memory-bound forward) and keeps
  nothing output-sized alive between forward and backward;
- ``grad_x`` is the transposed convolution (implicit GEMM over pixels x Cin reducing over
  ``N * k * k``; the weight repacked as (k * k, Cin, N) so its tiles are runs of N). With reflect /
  replicate padding it is computed on the padded grid and folded back onto the source pixels with
  ``index_add_`` (each padded position is a copy of one pixel);
- ``grad_weight`` (and ``grad_bias``) reduce over pixels with ``tl.dot``; the pixel axis is split
  across programs that ``atomic_add`` their fp32 partial sums, because ``N * Cin * k * k`` tiles
  alone do not fill a GPU when the weight is small.

Pixel indices are split into (b, h, w) in int32 (``B * H * W`` must stay below 2**31, checked);
every memory offset is int64.

Resize-conv folding (``subpixel_conv2d_folded``): ``conv3x3(nearest_upsample_x2(x))`` is a sub-pixel
convolution whose output phase (a, b) reads only a 2x2 low-res neighbourhood. The phase-aware
kernel stores 2x2 taps per phase and reads only those: 16 MACs per low-res pixel per
(Cout, Cin) instead of 36 for the 3x3 conv on the upsampled image (2.25x fewer FLOPs).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "subpixel_conv2d",
    "subpixel_conv2d_reasons",
    "subpixel_conv2d_folded",
    "fold_phase_weights",
    "phase_weights_to_dense",
    "subpixel_conv2d_fwd",
    "subpixel_conv2d_bwd",
    "subpixel_conv2d_folded_fwd",
]

# ----------------------------------------------------------------------------------------------
# Tuning constants
# ----------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

PADDING_MODES = ("zeros", "reflect", "replicate")
ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "silu")
FOLDABLE_PADDING_MODES = ("zeros", "replicate")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Codes the kernels branch on at compile time.
_PAD_CODE = {"zeros": 0, "reflect": 1, "replicate": 2}
_ACT_CODE = {None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "silu": 4}
_PAD_REFLECT = tl.constexpr(1)
_PAD_REPLICATE = tl.constexpr(2)
_ACT_RELU = tl.constexpr(1)
_ACT_LEAKY_RELU = tl.constexpr(2)
_ACT_GELU = tl.constexpr(3)
_ACT_SILU = tl.constexpr(4)


def _configs(tiles: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]) -> list[triton.Config]:
    """Autotune configs from (block sizes..., num_warps, num_stages); every dot dimension >= 16."""
    return [
        triton.Config(dict(zip(names, (b0, b1, b2))), num_warps=warps, num_stages=stages)
        for b0, b1, b2, warps, stages in tiles
    ]


# The interpreter runs one fixed config: autotuning there only multiplies the (slow) runtime.
# Interpreter tiles stay small so the odd test shapes cross tile borders in every dimension.
_GEMM_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_INTERPRET_TILE = [(32, 32, 16, 4, 1)]
_GEMM_TILES = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 2, 4),
    (32, 64, 32, 2, 4),
]
_FWD_CONFIGS = _configs(_INTERPRET_TILE if _INTERPRET else _GEMM_TILES, _GEMM_NAMES)
_DX_CONFIGS = _configs(_INTERPRET_TILE if _INTERPRET else _GEMM_TILES, _GEMM_NAMES)
# grad_weight tiles are (N, Cin) with the pixel axis as the reduction.
_DW_NAMES = ("BLOCK_N", "BLOCK_C", "BLOCK_M")
_DW_TILES = [
    (64, 64, 64, 4, 3),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (32, 32, 128, 4, 3),
    (128, 128, 32, 8, 3),
]
_DW_CONFIGS = _configs([(32, 16, 32, 4, 1)] if _INTERPRET else _DW_TILES, _DW_NAMES)

# grad_weight splits the pixel axis into chunks of at least this many pixels, and into no more
# chunks than needed for about this many programs per SM.
_DW_MIN_PIXELS_PER_SPLIT = 32 if _INTERPRET else 1024
_DW_PROGRAMS_PER_SM = 4


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _source_index(i, size, PAD_MODE: tl.constexpr):
    """Map padded-grid coordinate ``i`` (may lie outside [0, size)) to the pixel it copies.

    Returns (index, holds_data). Zeros padding keeps the index and reports out-of-range positions
    as empty (masked loads read 0); reflect mirrors about the edge pixel (needs size > pad, checked
    by the caller); replicate clamps.
    """
    if PAD_MODE == _PAD_REFLECT:
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= size, 2 * size - 2 - i, i)
    elif PAD_MODE == _PAD_REPLICATE:
        i = tl.minimum(tl.maximum(i, 0), size - 1)
    return i, (i >= 0) & (i < size)


@triton.jit
def _activation(z, negative_slope, ACTIVATION: tl.constexpr):
    """act(z) in fp32; GELU is the exact erf form."""
    if ACTIVATION == _ACT_RELU:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == _ACT_LEAKY_RELU:
        z = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == _ACT_GELU:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == _ACT_SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _activation_grad(z, negative_slope, ACTIVATION: tl.constexpr):
    """d act(z) / dz in fp32, with torch's choice at the kinks (relu'(0) = 0, leaky'(0) = slope)."""
    if ACTIVATION == _ACT_RELU:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == _ACT_LEAKY_RELU:
        d = tl.where(z > 0, 1.0, negative_slope)
    elif ACTIVATION == _ACT_GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d = cdf + z * pdf
    elif ACTIVATION == _ACT_SILU:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _pixels(offs_m, H, W):
    """Split flat low-res pixel indices m = (b * H + h) * W + w into int32 (b, h, w).

    Pixel indices fit in int32 (the launchers refuse B * H * W >= 2**31), and 32-bit division is
    a few instructions where a 64-bit one is a subroutine call whose registers the epilogue would
    spill. Offsets stay int64: callers widen each index before multiplying it by a stride.
    """
    m = offs_m.to(tl.int32)
    w = m % W
    t = m // W
    return t // H, t % H, w


@triton.jit
def _conv_tile(
    x_ptr,  # input, channels last: element (b, h, w, c) at b*stride_xb + h*stride_xh + w*stride_xw + c
    w_ptr,  # weight taps, Cin innermost: element (n, th, tw, c) at n*stride_wn + th*stride_wh + tw*stride_ww + c
    x_pix,  # (BLOCK_M,) int64 offset of each pixel's image in x (b * stride_xb)
    h_idx,  # (BLOCK_M,) low-res row of each output pixel
    w_idx,  # (BLOCK_M,) low-res column of each output pixel
    m_mask,  # (BLOCK_M,) pixel in range
    offs_n,  # (BLOCK_N,) int64 conv output channels
    n_mask,  # (BLOCK_N,) channel in range
    H,
    W,
    CIN,
    stride_xh,
    stride_xw,
    stride_wn,
    stride_wh,
    stride_ww,
    row0,  # low-res row offset of tap row 0 relative to the output pixel (-k//2, or a-1 per phase)
    col0,  # same for tap column 0
    TAPS_H: tl.constexpr,
    TAPS_W: tl.constexpr,
    PAD_MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc[m, n] = sum over taps (th, tw) and channels c of x_pad[m's pixel + (row0+th, col0+tw), c] * w[n, th, tw, c].

    Both operands have the reduction axis (Cin) contiguous: each pixel row of the A tile and each
    channel column of the B tile is one run of BLOCK_K elements, so the loads vectorise and the
    software pipeliner turns them into cp.async copies into num_stages shared-memory buffers.
    Padding only moves (reflect, replicate) or masks (zeros) whole pixel rows.

    One flat loop over (tap, channel chunk) so the compiler pipelines loads across the whole
    reduction, which matters when Cin is small and a per-tap inner loop would be 1-2 steps long.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    n_chunks = tl.cdiv(CIN, BLOCK_K)
    for it in range(TAPS_H * TAPS_W * n_chunks):
        tap = it // n_chunks
        c0 = (it - tap * n_chunks) * BLOCK_K
        th = tap // TAPS_W
        tw = tap - th * TAPS_W
        ih, h_ok = _source_index(h_idx + (row0 + th), H, PAD_MODE)
        iw, w_ok = _source_index(w_idx + (col0 + tw), W, PAD_MODE)
        offs_c = c0 + offs_k
        c_mask = offs_c < CIN
        a = tl.load(
            x_ptr + (x_pix + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)[:, None] + offs_c[None, :],
            mask=(m_mask & h_ok & w_ok)[:, None] & c_mask[None, :],
            other=0.0,
        )
        # (BLOCK_K, BLOCK_N) with K contiguous: the K-major B operand wgmma reads directly.
        b = tl.load(
            w_cols + (th * stride_wh + tw * stride_ww) + offs_c[:, None],
            mask=c_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return acc


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "CIN", "KSIZE", "R"])
@triton.jit
def _subpixel_conv2d_fwd_kernel(
    x_ptr,  # input viewed (B, H, W, CIN) with unit channel stride
    w_ptr,  # weight (N, CIN, KSIZE, KSIZE), N = COUT * R * R, unit channel stride
    bias_ptr,  # bias (N,), element stride stride_bias; any valid pointer when HAS_BIAS is False (never read)
    out_ptr,  # output (B, COUT, R * H, R * W), any strides
    M,  # B * H * W low-res pixels
    H,
    W,
    CIN,
    N,
    stride_xb,
    stride_xh,
    stride_xw,
    stride_wn,
    stride_wh,
    stride_ww,
    stride_ob,
    stride_oc,
    stride_oh,
    stride_ow,
    stride_bias,
    negative_slope,
    R: tl.constexpr,
    KSIZE: tl.constexpr,
    PAD_MODE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Channel tiles vary fastest so programs running together share one x tile in L2.
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    b_idx, h_idx, w_idx = _pixels(offs_m, H, W)

    acc = _conv_tile(
        x_ptr, w_ptr, b_idx.to(tl.int64) * stride_xb, h_idx, w_idx, m_mask, offs_n, n_mask, H, W, CIN,
        stride_xh, stride_xw, stride_wn, stride_wh, stride_ww,
        -(KSIZE // 2), -(KSIZE // 2), KSIZE, KSIZE, PAD_MODE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, negative_slope, ACTIVATION)

    # Pixel shuffle in the store: channel n = (c * R + a) * R + s of pixel (h, w) goes to
    # out[b, c, R*h + a, R*w + s]; the address is a per-pixel part plus a per-channel part.
    nn = offs_n.to(tl.int32)
    sub = nn % (R * R)
    col = (nn // (R * R)).to(tl.int64) * stride_oc + (sub // R).to(tl.int64) * stride_oh + (sub % R) * stride_ow
    row = b_idx.to(tl.int64) * stride_ob + (R * h_idx).to(tl.int64) * stride_oh + (R * w_idx).to(tl.int64) * stride_ow
    tl.store(
        out_ptr + row[:, None] + col[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "COUT", "CIN"])
@triton.jit
def _subpixel_conv2d_folded_fwd_kernel(
    x_ptr,  # input viewed (B, H, W, CIN) with unit channel stride
    w_ptr,  # phase weight (COUT, 4, CIN, 2, 2): taps of phase a*2+b, unit channel stride
    bias_ptr,  # bias (COUT,), element stride stride_bias; any valid pointer when HAS_BIAS is False (never read)
    out_ptr,  # output (B, COUT, 2 * H, 2 * W), any strides
    M,  # B * H * W low-res pixels
    H,
    W,
    CIN,
    COUT,
    stride_xb,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wp,
    stride_wh,
    stride_ww,
    stride_ob,
    stride_oc,
    stride_oh,
    stride_ow,
    stride_bias,
    negative_slope,
    PAD_MODE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 1 is the output phase (a, b): each phase is its own GEMM over CIN * 2 * 2.
    pid = tl.program_id(0).to(tl.int64)
    phase = tl.program_id(1).to(tl.int64)
    pa = phase // 2
    pb = phase % 2
    num_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < COUT
    b_idx, h_idx, w_idx = _pixels(offs_m, H, W)

    # Phase a of output row 2i + a reads low-res rows i + a - 1 (tap 0) and i + a (tap 1).
    acc = _conv_tile(
        x_ptr, w_ptr + phase * stride_wp, b_idx.to(tl.int64) * stride_xb, h_idx, w_idx, m_mask, offs_n, n_mask, H, W, CIN,
        stride_xh, stride_xw, stride_wo, stride_wh, stride_ww,
        pa - 1, pb - 1, 2, 2, PAD_MODE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, negative_slope, ACTIVATION)

    row = b_idx.to(tl.int64) * stride_ob + (2 * h_idx + pa) * stride_oh + (2 * w_idx + pb) * stride_ow
    tl.store(
        out_ptr + row[:, None] + (offs_n * stride_oc)[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "CIN", "KSIZE", "R"])
@triton.jit
def _subpixel_conv2d_bwd_act_kernel(
    x_ptr,  # input viewed (B, H, W, CIN) with unit channel stride
    w_ptr,  # weight (N, CIN, KSIZE, KSIZE), unit channel stride
    bias_ptr,  # bias (N,), element stride stride_bias; any valid pointer when HAS_BIAS is False (never read)
    go_ptr,  # grad of the output (B, COUT, R * H, R * W), any strides
    g_ptr,  # result: grad w.r.t. the pre-activation conv output, (M, NP) row-major
    M,
    H,
    W,
    CIN,
    N,
    NP,  # row length of g: N rounded up to 16; columns N..NP are written as zeros
    stride_xb,
    stride_xh,
    stride_xw,
    stride_wn,
    stride_wh,
    stride_ww,
    stride_gob,
    stride_goc,
    stride_goh,
    stride_gow,
    stride_bias,
    negative_slope,
    R: tl.constexpr,
    KSIZE: tl.constexpr,
    PAD_MODE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    b_idx, h_idx, w_idx = _pixels(offs_m, H, W)

    pre = _conv_tile(
        x_ptr, w_ptr, b_idx.to(tl.int64) * stride_xb, h_idx, w_idx, m_mask, offs_n, n_mask, H, W, CIN,
        stride_xh, stride_xw, stride_wn, stride_wh, stride_ww,
        -(KSIZE // 2), -(KSIZE // 2), KSIZE, KSIZE, PAD_MODE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        pre += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    # Read grad_out through the pixel-shuffle addressing of the forward store.
    nn = offs_n.to(tl.int32)
    sub = nn % (R * R)
    col = (nn // (R * R)).to(tl.int64) * stride_goc + (sub // R).to(tl.int64) * stride_goh + (sub % R) * stride_gow
    row = (
        b_idx.to(tl.int64) * stride_gob + (R * h_idx).to(tl.int64) * stride_goh + (R * w_idx).to(tl.int64) * stride_gow
    )
    go = tl.load(go_ptr + row[:, None] + col[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    g = go.to(tl.float32) * _activation_grad(pre, negative_slope, ACTIVATION)
    # Columns N..NP get go = 0, hence g = 0: the padding the backward GEMMs read unmasked.
    tl.store(
        g_ptr + offs_m[:, None] * NP + offs_n[None, :],
        g.to(g_ptr.dtype.element_ty),
        mask=m_mask[:, None] & (offs_n < NP)[None, :],
    )


@triton.autotune(configs=_DX_CONFIGS, key=["MP", "NP", "CIN", "KSIZE"])
@triton.jit
def _subpixel_conv2d_bwd_dx_kernel(
    g_ptr,  # grad w.r.t. the conv output, (B*H*W, NP) row-major, columns N..NP zero
    w_ptr,  # weight taps (KSIZE * KSIZE, CIN, NP) contiguous, columns N..NP zero
    dx_ptr,  # result: grad w.r.t. the input grid positions (B, CIN, HP, WP), any strides
    MP,  # B * HP * WP result positions
    H,
    W,
    HP,
    WP,
    OFFSET,  # padded-grid coordinate of result position (0, 0): k//2 for the interior, else 0
    CIN,
    NP,
    stride_db,
    stride_dc,
    stride_dh,
    stride_dw,
    KSIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_c = tl.cdiv(CIN, BLOCK_N)
    pid_m = pid // num_c
    pid_c = pid % num_c
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < MP
    ci_mask = offs_ci < CIN
    b_idx, yr, xr = _pixels(offs_m, HP, WP)
    yp = yr + OFFSET
    xp = xr + OFFSET
    w_cols = w_ptr + offs_ci[None, :] * NP

    # Padded position (yp, xp) was read by output pixel (yp - kh, xp - kw) through tap (kh, kw).
    # Both operands run along N (the reduction): g rows of one pixel, weight columns of one Cin.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    n_chunks = tl.cdiv(NP, BLOCK_K)
    for it in range(KSIZE * KSIZE * n_chunks):
        tap = it // n_chunks
        n0 = (it - tap * n_chunks) * BLOCK_K
        kh = tap // KSIZE
        kw = tap - kh * KSIZE
        h = yp - kh
        w = xp - kw
        valid = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        offs_n = n0 + offs_k
        n_mask = offs_n < NP
        g = tl.load(
            g_ptr + (((b_idx * H + h) * W + w).to(tl.int64) * NP)[:, None] + offs_n[None, :],
            mask=valid[:, None] & n_mask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_cols + tap * (CIN * NP) + offs_n[:, None],
            mask=n_mask[:, None] & ci_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(g, wt, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)

    row = b_idx.to(tl.int64) * stride_db + yr.to(tl.int64) * stride_dh + xr.to(tl.int64) * stride_dw
    tl.store(
        dx_ptr + row[:, None] + offs_ci[None, :] * stride_dc,
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_mask[:, None] & ci_mask[None, :],
    )


@triton.autotune(
    configs=_DW_CONFIGS, key=["M", "NP", "CIN", "KSIZE", "M_PER_SPLIT"], reset_to_zero=["dw_ptr", "db_ptr"]
)
@triton.jit
def _subpixel_conv2d_bwd_dw_kernel(
    g_ptr,  # grad w.r.t. the conv output, (B*H*W, NP) row-major, columns N..NP zero
    x_ptr,  # input viewed (B, H, W, CIN) with unit channel stride
    dw_ptr,  # result (accumulated): fp32 (N, CIN, KSIZE, KSIZE) contiguous, zero-initialised
    db_ptr,  # result (accumulated): fp32 (N,), zero-initialised; untouched when HAS_BIAS is False
    M,  # B * H * W low-res pixels
    H,
    W,
    CIN,
    N,
    NP,
    M_PER_SPLIT,  # pixels reduced by one program along grid axis 1
    stride_xb,
    stride_xh,
    stride_xw,
    KSIZE: tl.constexpr,
    PAD_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Axis 0: (tap, Cin tile, N tile), N fastest; axis 1: a chunk of the pixel axis.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    num_c = tl.cdiv(CIN, BLOCK_C)
    pid_n = pid % num_n
    rest = pid // num_n
    pid_c = rest % num_c
    tap = rest // num_c
    kh = tap // KSIZE
    kw = tap % KSIZE
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = offs_n < NP
    c_mask = offs_c < CIN

    # The reduction runs over pixels; both tiles are runs along their channel axis (N for g,
    # Cin for x), which keeps the loads vectorised and asynchronous.
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    for i in range(tl.cdiv(M_PER_SPLIT, BLOCK_M)):
        offs_m = m_start + i * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        b_idx, h_idx, w_idx = _pixels(offs_m, H, W)
        # gT[n, m]: loaded transposed so the dot needs no tl.trans.
        gt = tl.load(
            g_ptr + offs_n[:, None] + (offs_m * NP)[None, :], mask=n_mask[:, None] & m_mask[None, :], other=0.0
        )
        ih, h_ok = _source_index(h_idx + (kh - KSIZE // 2), H, PAD_MODE)
        iw, w_ok = _source_index(w_idx + (kw - KSIZE // 2), W, PAD_MODE)
        xt = tl.load(
            x_ptr
            + (b_idx.to(tl.int64) * stride_xb + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)[:, None]
            + offs_c[None, :],
            mask=(m_mask & h_ok & w_ok)[:, None] & c_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(gt, xt, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if HAS_BIAS:
            bacc += tl.sum(gt.to(tl.float32), axis=1)

    kk = KSIZE * KSIZE
    out_mask = offs_n < N
    tl.atomic_add(
        dw_ptr + offs_n[:, None] * (CIN * kk) + offs_c[None, :] * kk + tap,
        acc,
        mask=out_mask[:, None] & c_mask[None, :],
    )
    if HAS_BIAS:
        # Every (tap, Cin tile) sees the same g; only the first one contributes the bias grad.
        if (pid_c == 0) & (tap == 0):
            tl.atomic_add(db_ptr + offs_n, bacc, mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's conv setting (TF32 when ``torch.backends.cudnn.allow_tf32``, as
    ``conv2d`` does); 16-bit inputs multiply exactly in the tensor cores anyway."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"


def _bias_stride(bias: torch.Tensor | None) -> int:
    return 0 if bias is None else bias.stride(0)


def _output_like(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A new (B, C, H', W') tensor in x's memory format (channels_last in, channels_last out)."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _channels_innermost(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``t`` itself when dimension ``dim`` (the channels) has unit stride, else a copy that has.

    The copy keeps t's shape; only the memory order changes (channels moved innermost, the other
    dimensions in their original order). A channels_last activation or weight passes unchanged.
    """
    if t.stride(dim) == 1 or t.shape[dim] <= 1:
        return t
    order = [d for d in range(t.dim()) if d != dim] + [dim]
    inverse = [order.index(d) for d in range(t.dim())]
    return t.permute(order).contiguous().permute(inverse)


def _direct(kernel):
    """The default ``wrap_triton`` of the launchers: the kernel itself (a plain eager launch)."""
    return kernel


# The launchers take ``wrap_triton``: the ``torch.library.triton_op`` implementations in
# :mod:`dqfast.kernels._triton_ops` pass ``torch.library.wrap_triton`` so that torch.compile
# traces each launch into its graph. The parameter keeps that name because torch finds the
# kernels of a triton_op by looking for ``wrap_triton(<kernel>)`` calls in its source.

# The kernels split pixel indices in int32; the padded grid of grad_x is the largest they index.
_MAX_PIXELS = 2**31 - 1


def _too_many_pixels(x_shape: tuple[int, ...], pad: int) -> str | None:
    """Why (B, Cin, H, W) with this padding exceeds the kernels' int32 pixel indices, or None."""
    B, _, H, W = x_shape
    pixels = B * (H + 2 * pad) * (W + 2 * pad)
    if pixels > _MAX_PIXELS:
        return f"B * (H + 2 * pad) * (W + 2 * pad) = {pixels} pixels exceeds the kernel's int32 pixel index (2**31 - 1)"
    return None


def _check_pixels(x: torch.Tensor, pad: int) -> None:
    why = _too_many_pixels(tuple(x.shape), pad)
    if why is not None:
        raise ValueError(f"x of shape {tuple(x.shape)}: {why}")


def _round_up(n: int, multiple: int) -> int:
    return triton.cdiv(n, multiple) * multiple


# Row length of the backward's (pixels, N) matrices is padded to this many elements: Triton
# specialises integer arguments divisible by 16, which is what lets it prove the rows aligned.
_ROW_ALIGN = 16


def subpixel_conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    upscale: int,
    padding_mode: str,
    activation: str | None,
    negative_slope: float,
    *,
    wrap_triton=_direct,
) -> torch.Tensor:
    """out = pixel_shuffle(act(conv2d(pad(x), weight, bias)), upscale).

    x: (B, Cin, H, W); weight: (Cout * r**2, Cin, k, k); bias: (Cout * r**2,) or None.
    Returns (B, Cout, r * H, r * W) in x's dtype and memory format. Any strides in; x and weight
    are read channels-last (a copy is made only when their channel stride is not 1).
    """
    B, cin, H, W = x.shape
    n, _, k, _ = weight.shape
    r = upscale
    out = _output_like(x, (B, n // (r * r), r * H, r * W))
    M = B * H * W
    if out.numel() == 0:
        return out
    _check_pixels(x, k // 2)
    xl, wl = _channels_innermost(x), _channels_innermost(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    wrap_triton(_subpixel_conv2d_fwd_kernel)[grid](
        xl, wl, wl if bias is None else bias, out,
        M, H, W, cin, n,
        xl.stride(0), xl.stride(2), xl.stride(3), wl.stride(0), wl.stride(2), wl.stride(3),
        *out.stride(), _bias_stride(bias),
        float(negative_slope),
        R=r, KSIZE=k, PAD_MODE=_PAD_CODE[padding_mode], ACTIVATION=_ACT_CODE[activation],
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype),
    )  # fmt: skip
    return out


def subpixel_conv2d_folded_fwd(
    x: torch.Tensor,
    phase_weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding_mode: str,
    activation: str | None,
    negative_slope: float,
    *,
    wrap_triton=_direct,
) -> torch.Tensor:
    """The resize-conv upsampler on the low-res grid, reading only each phase's 2x2 taps.

    x: (B, Cin, H, W); phase_weight: (Cout, 4, Cin, 2, 2) (see :func:`fold_phase_weights`, which
    already lays Cin innermost); bias: (Cout,) or None. Returns (B, Cout, 2 * H, 2 * W) in x's
    dtype and memory format.
    """
    B, cin, H, W = x.shape
    cout = phase_weight.shape[0]
    out = _output_like(x, (B, cout, 2 * H, 2 * W))
    M = B * H * W
    if out.numel() == 0:
        return out
    _check_pixels(x, 1)
    xl, wl = _channels_innermost(x), _channels_innermost(phase_weight, dim=2)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]), 4)
    wrap_triton(_subpixel_conv2d_folded_fwd_kernel)[grid](
        xl, wl, wl if bias is None else bias, out,
        M, H, W, cin, cout,
        xl.stride(0), xl.stride(2), xl.stride(3), wl.stride(0), wl.stride(1), wl.stride(3), wl.stride(4),
        *out.stride(), _bias_stride(bias),
        float(negative_slope),
        PAD_MODE=_PAD_CODE[padding_mode], ACTIVATION=_ACT_CODE[activation],
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype),
    )  # fmt: skip
    return out


def _source_rows(size: int, pad: int, padding_mode: str, device: torch.device) -> torch.Tensor:
    """(size + 2 * pad,) int64: the source index each padded coordinate copies."""
    p = torch.arange(-pad, size + pad, device=device)
    if padding_mode == "reflect":
        p = p.abs()
        return torch.where(p > size - 1, 2 * (size - 1) - p, p)
    return p.clamp(0, size - 1)


def _split_pixels(M: int, tiles: int, device: torch.device) -> int:
    """Pixels per grad_weight program: enough programs to fill the GPU, not too few pixels each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    splits = max(1, min(triton.cdiv(M, _DW_MIN_PIXELS_PER_SPLIT), triton.cdiv(_DW_PROGRAMS_PER_SM * sms, tiles)))
    return triton.cdiv(M, splits)


def subpixel_conv2d_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    upscale: int,
    padding_mode: str,
    activation: str | None,
    negative_slope: float,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    *,
    wrap_triton=_direct,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`subpixel_conv2d_fwd` w.r.t. (x, weight, bias).

    grad_out: (B, Cout, r * H, r * W), any strides; x, weight, bias as in the forward.
    needs_grad: which of the three to compute (None is returned for the others).
    Returns grad_x (B, Cin, H, W) in x's memory format, grad_weight (Cout * r**2, Cin, k, k),
    grad_bias (Cout * r**2,) or None, each in its input's dtype.
    """
    need_x, need_w, need_b = needs_grad
    need_b = need_b and bias is not None
    B, cin, H, W = x.shape
    n, _, k, _ = weight.shape
    r, pad, M = upscale, k // 2, B * H * W
    precision = _dot_precision(x.dtype)
    grad_out = grad_out.to(x.dtype)
    if M == 0 or n == 0 or cin == 0:
        return (
            torch.zeros_like(x) if need_x else None,
            torch.zeros_like(weight) if need_w else None,
            torch.zeros_like(bias) if need_b else None,
        )

    _check_pixels(x, pad)
    # Both backward GEMMs reduce over or run along the conv channels, so the gradient w.r.t. the
    # conv output is laid out (pixels, N) with N innermost, rows padded to np_ elements (zeros).
    np_ = _round_up(n, _ROW_ALIGN)
    xl = _channels_innermost(x)
    g = torch.empty((M, np_), dtype=x.dtype, device=x.device)
    if activation is None:
        # pixel_unshuffle into g's layout: conv channel (c, a, s) of pixel (h, w) is
        # grad_out[b, c, r*h + a, r*w + s]. One pass over grad_out, which both GEMMs then read
        # as contiguous rows instead of gathering it element by element.
        cout = n // (r * r)
        src = grad_out.unflatten(3, (W, r)).unflatten(2, (H, r)).permute(0, 2, 4, 1, 3, 5)
        g[:, :n].view(B, H, W, cout, r, r).copy_(src)
        g[:, n:].zero_()
    else:
        wl = _channels_innermost(weight)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        wrap_triton(_subpixel_conv2d_bwd_act_kernel)[grid](
            xl, wl, wl if bias is None else bias, grad_out, g,
            M, H, W, cin, n, np_,
            xl.stride(0), xl.stride(2), xl.stride(3), wl.stride(0), wl.stride(2), wl.stride(3),
            *grad_out.stride(), _bias_stride(bias),
            float(negative_slope),
            R=r, KSIZE=k, PAD_MODE=_PAD_CODE[padding_mode], ACTIVATION=_ACT_CODE[activation],
            HAS_BIAS=bias is not None, DOT_PRECISION=precision,
        )  # fmt: skip

    grad_x = grad_w = grad_b = None
    if need_x:
        if padding_mode == "zeros" or pad == 0:
            # Only interior positions have a source pixel: write grad_x directly.
            grad_x = torch.empty_like(x)
            dx, hp, wp, offset = grad_x, H, W, pad
        else:
            # Every padded position copies a pixel: take the grad on the padded grid, then fold.
            hp, wp, offset = H + 2 * pad, W + 2 * pad, 0
            dx = torch.empty((B, hp, wp, cin), dtype=torch.float32, device=x.device).permute(0, 3, 1, 2)
        # Weight taps (k * k, Cin, np_) with N innermost: the reduction axis of grad_x's GEMM.
        wt = weight.new_zeros((k * k, cin, np_))
        wt[:, :, :n].view(k, k, cin, n).copy_(weight.permute(2, 3, 1, 0))
        mp = B * hp * wp
        grid = lambda meta: (triton.cdiv(mp, meta["BLOCK_M"]) * triton.cdiv(cin, meta["BLOCK_N"]),)
        wrap_triton(_subpixel_conv2d_bwd_dx_kernel)[grid](
            g, wt, dx,
            mp, H, W, hp, wp, offset, cin, np_,
            *dx.stride(),
            KSIZE=k, DOT_PRECISION=precision,
        )  # fmt: skip
        if grad_x is None:
            rows = _source_rows(H, pad, padding_mode, x.device)
            cols = _source_rows(W, pad, padding_mode, x.device)
            folded = dx.new_zeros(B, cin, H, wp).index_add_(2, rows, dx)
            folded = dx.new_zeros(B, cin, H, W).index_add_(3, cols, folded)
            grad_x = torch.empty_like(x).copy_(folded)

    if need_w or need_b:
        dw = torch.zeros((n, cin, k, k), dtype=torch.float32, device=x.device)
        db = torch.zeros((n,), dtype=torch.float32, device=x.device)
        m_per_split = _split_pixels(M, triton.cdiv(n, 64) * triton.cdiv(cin, 64) * k * k, x.device)
        grid = lambda meta: (
            triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(cin, meta["BLOCK_C"]) * k * k,
            triton.cdiv(M, m_per_split),
        )
        wrap_triton(_subpixel_conv2d_bwd_dw_kernel)[grid](
            g, xl, dw, db,
            M, H, W, cin, n, np_, m_per_split,
            xl.stride(0), xl.stride(2), xl.stride(3),
            KSIZE=k, PAD_MODE=_PAD_CODE[padding_mode], HAS_BIAS=need_b, DOT_PRECISION=precision,
        )  # fmt: skip
        grad_w = dw.to(weight.dtype) if need_w else None
        grad_b = db.to(bias.dtype) if need_b else None
    return grad_x, grad_w, grad_b


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class SubPixelConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, upscale, padding_mode, activation, negative_slope):
        ctx.save_for_backward(x, weight, bias)
        ctx.config = (upscale, padding_mode, activation, negative_slope)
        return subpixel_conv2d_fwd(x, weight, bias, upscale, padding_mode, activation, negative_slope)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        grads = subpixel_conv2d_bwd(grad_out, x, weight, bias, *ctx.config, needs_grad=ctx.needs_input_grad[:3])
        return *grads, None, None, None, None


class SubPixelConv2dFoldedFunction(torch.autograd.Function):
    """Forward on the phase-aware kernel; backward through the dense 3x3 equivalent.

    The backward runs the general kernels on the (Cout * 4, Cin, 3, 3) weight with zero taps
    (:func:`phase_weights_to_dense`), which costs 9/4 of the minimal FLOPs but is exact, and maps
    the weight gradient back to the phase taps.
    """

    @staticmethod
    def forward(ctx, x, phase_weight, bias, padding_mode, activation, negative_slope):
        ctx.save_for_backward(x, phase_weight, bias)
        ctx.config = (padding_mode, activation, negative_slope)
        return subpixel_conv2d_folded_fwd(x, phase_weight, bias, padding_mode, activation, negative_slope)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, phase_weight, bias = ctx.saved_tensors
        padding_mode, activation, negative_slope = ctx.config
        dense = phase_weights_to_dense(phase_weight)
        dense_bias = None if bias is None else bias.repeat_interleave(4)
        grad_x, grad_dense, grad_dense_bias = subpixel_conv2d_bwd(
            grad_out, x, dense, dense_bias, 2, padding_mode, activation, negative_slope,
            needs_grad=ctx.needs_input_grad[:3],
        )  # fmt: skip
        grad_phase = None if grad_dense is None else _dense_to_phase_weights(grad_dense)
        grad_bias = None if grad_dense_bias is None else grad_dense_bias.view(-1, 4).sum(1)
        return grad_x, grad_phase, grad_bias, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def subpixel_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    upscale: int,
    padding_mode: str = "zeros",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Fused ``pixel_shuffle(act(conv2d(pad(x), weight, bias)), upscale)``, differentiable.

    x: (B, Cin, H, W); weight: (Cout * r**2, Cin, k, k), k odd; bias: (Cout * r**2,) or None.
    Returns (B, Cout, r * H, r * W) in x's dtype. Inputs are validated by
    :func:`dqfast.subpixel_conv2d`; :func:`subpixel_conv2d_reasons` says what the kernel supports.
    """
    return SubPixelConv2dFunction.apply(x, weight, bias, upscale, padding_mode, activation, negative_slope)


def subpixel_conv2d_reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    upscale: int,
    padding_mode: str = "zeros",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> list[str]:
    """Why the kernel cannot serve this call (empty when it can). Devices are checked by the backend."""
    why = []
    tensors = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            why.append(f"{name} dtype {t.dtype} is not supported (float32, float16, bfloat16)")
        elif t.dtype == torch.bfloat16 and _INTERPRET:
            why.append(f"{name} is bfloat16, which the Triton CPU interpreter cannot multiply correctly")
    if any(t.dtype != x.dtype for _, t in tensors):
        why.append("x, weight and bias must share one dtype")
    if padding_mode not in PADDING_MODES:
        why.append(f"padding_mode {padding_mode!r} is not one of {PADDING_MODES}")
    if activation not in ACTIVATIONS:
        why.append(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if padding_mode == "reflect" and x.dim() == 4 and weight.dim() == 4:
        if weight.shape[-1] // 2 >= min(x.shape[2], x.shape[3]):
            why.append("reflect padding needs H and W larger than k // 2")
    if x.dim() == 4 and weight.dim() == 4 and (big := _too_many_pixels(tuple(x.shape), weight.shape[-1] // 2)):
        why.append(big)
    return why


def fold_phase_weights(conv_weight: torch.Tensor) -> torch.Tensor:
    """2x2 taps per output phase of ``conv3x3(nearest_upsample_x2(x))``, on the low-res grid.

    conv_weight: (Cout, Cin, 3, 3), the ORIGINAL high-res conv weight. Returns phase_weight
    (Cout, 4, Cin, 2, 2): phase p = a * 2 + b is output pixel (2i + a, 2j + b); tap (t, u)
    reads low-res pixel (i + a - 1 + t, j + b - 1 + u), i.e. row offsets {a - 1, a}.

    Derivation (rows; columns alike): up[y] = x[y // 2], so high-res tap dy in {-1, 0, 1} of
    output row 2i + a reads low-res row (2i + a + dy) // 2 = i + (a + dy) // 2, which is tap
    t = (a + dy) // 2 + 1 - a. Phase 0: dy = -1 -> t 0; dy = 0, 1 -> t 1. Phase 1: dy = -1, 0 -> t 0;
    dy = 1 -> t 1. Each 2x2 tap is the sum of the 3x3 taps that land on it.
    """
    fold = _phase_fold(conv_weight)
    # Laid out with Cin innermost (a permuted view): the layout the phase-aware kernel reads, so
    # its launcher needs no copy of the weight.
    phase = torch.einsum("oikl,atk,bul->oabtui", conv_weight, fold, fold)
    return phase.reshape(conv_weight.shape[0], 4, 2, 2, conv_weight.shape[1]).permute(0, 1, 4, 2, 3)


def _phase_fold(like: torch.Tensor) -> torch.Tensor:
    """fold[a, t, dy + 1] = 1 where high-res tap dy of phase a lands on low-res tap t (see
    :func:`fold_phase_weights`), in ``like``'s dtype and device."""
    # Computed on the device from aranges: no host-to-device copy (which would synchronise the
    # stream on every call) and no index assignments (a dozen nodes in a traced graph).
    a = torch.arange(2, device=like.device).view(2, 1, 1)
    t = torch.arange(2, device=like.device).view(1, 2, 1)
    dy = torch.arange(-1, 2, device=like.device).view(1, 1, 3)
    return (torch.div(a + dy, 2, rounding_mode="floor") + 1 - a == t).to(like.dtype)


def fold_phase_weights_grad(grad_phase: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. the (Cout, Cin, 3, 3) conv weight given the gradient w.r.t. its
    :func:`fold_phase_weights` (Cout, 4, Cin, 2, 2): the transpose of that linear map."""
    fold = _phase_fold(grad_phase)
    cout, _, cin, _, _ = grad_phase.shape
    return torch.einsum("oabitu,atk,bul->oikl", grad_phase.reshape(cout, 2, 2, cin, 2, 2), fold, fold)


def phase_weights_to_dense(phase_weight: torch.Tensor) -> torch.Tensor:
    """The (Cout * 4, Cin, 3, 3) sub-pixel weight (zero taps included) equal to ``phase_weight``.

    Phase (a, b) is conv channel o * 4 + a * 2 + b; its 2x2 taps at row offsets {a - 1, a} sit at
    3x3 rows a, a + 1 (and columns b, b + 1). Differentiable.
    """
    cout, _, cin, _, _ = phase_weight.shape
    dense = phase_weight.new_zeros(cout, 2, 2, cin, 3, 3)
    for a in range(2):
        for b in range(2):
            dense[:, a, b, :, a : a + 2, b : b + 2] = phase_weight[:, a * 2 + b]
    return dense.reshape(cout * 4, cin, 3, 3)


def _dense_to_phase_weights(dense: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`phase_weights_to_dense` (reads the phase taps, drops the zero taps)."""
    cin = dense.shape[1]
    grouped = dense.view(-1, 2, 2, cin, 3, 3)
    taps = [grouped[:, a, b, :, a : a + 2, b : b + 2] for a in range(2) for b in range(2)]
    return torch.stack(taps, dim=1)


def subpixel_conv2d_folded(
    x: torch.Tensor,
    phase_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    padding_mode: str = "zeros",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``act(conv3x3(nearest_upsample_x2(x)))`` computed on the low-res grid, differentiable.

    x: (B, Cin, H, W); phase_weight: (Cout, 4, Cin, 2, 2) from :func:`fold_phase_weights`;
    bias: (Cout,) or None. Returns (B, Cout, 2H, 2W), equal to
    ``act(conv2d(interpolate(x, scale_factor=2, mode="nearest"), w, bias, padding=1))`` with that
    padding mode; only "zeros" and "replicate" fold exactly, so "reflect" is refused.
    """
    if padding_mode not in FOLDABLE_PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {FOLDABLE_PADDING_MODES} for the folded resize-conv, got "
            f"{padding_mode!r} (reflect padding of the upsampled image is not reflect padding of x)"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, Cin, H, W), got shape {tuple(x.shape)}")
    if phase_weight.dim() != 5 or phase_weight.shape[1:] != (4, x.shape[1], 2, 2):
        raise ValueError(
            f"phase_weight must be (Cout, 4, Cin={x.shape[1]}, 2, 2), got shape {tuple(phase_weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (phase_weight.shape[0],):
        raise ValueError(f"bias must have shape ({phase_weight.shape[0]},), got {tuple(bias.shape)}")
    tensors = [x, phase_weight] + ([bias] if bias is not None else [])
    if any(t.dtype != x.dtype for t in tensors) or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x, phase_weight and bias must share one dtype among {SUPPORTED_DTYPES}")
    return SubPixelConv2dFoldedFunction.apply(x, phase_weight, bias, padding_mode, activation, negative_slope)


def upsample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: int = 2,
    padding_mode: str = "zeros",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``act(conv3x3(nearest_upsample_x2(x)))`` through the phase-aware kernel (2x2 taps per phase).

    x: (B, Cin, H, W); weight: (Cout, Cin, 3, 3), the high-res conv weight; bias: (Cout,) or None.
    Returns (B, Cout, 2H, 2W). Folding the weight is a tiny differentiable einsum per call.
    """
    return subpixel_conv2d_folded(
        x,
        fold_phase_weights(weight),
        bias,
        padding_mode=padding_mode,
        activation=activation,
        negative_slope=negative_slope,
    )


def upsample_conv2d_reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: int = 2,
    padding_mode: str = "zeros",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> list[str]:
    """Why :func:`upsample_conv2d` cannot serve this call (empty when it can)."""
    why = []
    if scale != 2 or weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
        why.append("the phase-aware resize-conv kernel covers 3x3 convs after a 2x upsample only")
    if padding_mode not in FOLDABLE_PADDING_MODES:
        why.append(f"padding_mode {padding_mode!r} does not fold; supported: {FOLDABLE_PADDING_MODES}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        why.append(f"x, weight and bias must share one dtype, got {sorted(map(str, dtypes))}")
    elif x.dtype not in SUPPORTED_DTYPES:
        why.append(f"dtype {x.dtype} is not supported (supported: {SUPPORTED_DTYPES})")
    elif x.dtype == torch.bfloat16 and _INTERPRET:
        why.append("bfloat16 is not supported by the Triton CPU interpreter")
    if activation not in ACTIVATIONS:
        why.append(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if x.dim() == 4 and (big := _too_many_pixels(tuple(x.shape), 1)):
        why.append(big)
    return why
