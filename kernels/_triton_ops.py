"""The Triton kernels as ``torch.library.triton_op`` ops, so ``torch.compile`` sees the kernels.

A ``torch.library.custom_op`` is opaque to the compiler: Inductor calls it as an external
function. A ``triton_op`` is decomposed by AOTAutograd into its torch ops and one
``triton_kernel_wrapper_functional`` node per launch (each launch goes through
``torch.library.wrap_triton``), which Inductor compiles, autotunes and schedules with the rest of
the graph (the user-defined Triton kernel path; the launchers' ``triton.autotune`` configs and
``reset_to_zero`` are supported there). Eagerly a triton_op runs its launcher directly. The
launchers take a ``wrap_triton=`` argument (default: the kernel itself, a plain launch) and get
``torch.library.wrap_triton`` from here (the attention's two launchers are restated instead).

Ops (each with a fake implementation, which is the function itself, and an autograd formula
unless said otherwise):

- ``dqfast::subpixel_conv2d_triton`` / ``dqfast::subpixel_conv2d_triton_backward``: the fused
  sub-pixel conv forward kernel; the backward op runs the backward kernels (activation
  recompute, grad_x, grad_weight/grad_bias) and returns ``[grad_x, grad_weight, grad_bias]``, an
  empty tensor for a gradient not wanted.
- ``dqfast::upsample_conv2d_triton`` / ``dqfast::upsample_conv2d_triton_backward``: the
  phase-aware resize-conv kernel (scale 2, 3x3); the backward runs the sub-pixel backward kernels
  on the equivalent dense weight, as the kernel's autograd.Function does, and maps the weight
  gradient back through the fold.
- ``dqfast::vector_quantize_triton``: the nearest-code search kernel; its gradient is the
  straight-through one (through the l2 normalisation for cosine), plain torch ops.
- ``dqfast::c2f_attention_triton`` / ``dqfast::c2f_attention_triton_backward``: the attention
  forward (returns the output and the log-sum-exp the backward reads) and the three backward
  kernels. ``kernels/c2f_attention.py`` launches its kernels directly, so its two launchers are
  restated here with their launches through ``wrap_triton`` (same arguments; the parity tests
  check them against the reference), and its layout tables are rebuilt per call: its per-device
  ``functools.lru_cache`` of seg_start must not keep a tensor made while torch.compile traces.
- ``dqfast::dynamic_quantize_triton`` / ``dqfast::dynamic_quantize_triton_backward``: the
  dynamic quantizer. The forward resolves the grain and compacts the coded cells with torch ops
  on the device (cumsum + scatter into lists sized by the grid, the true count read by the
  kernels: no host sync, so every shape is known when tracing), then runs per grain the split
  codebook search and the deterministic combine/emit kernel; the loss is reduced from the emit
  kernel's per-program partial sums. The backward op takes the forward's resolved grain and
  indices and runs the backward kernel (fp32 atomics for the gate and codebook gradients, as
  eagerly); for cosine the kernels see torch-normalised unit vectors, and the gradient through
  ``F.normalize`` (and the gate multiplying the features before it) is restated in torch ops,
  since a triton_op's backward cannot record autograd. Returns ``[*grad_features,
  grad_codebook, grad_gate]``, an empty tensor for a gradient not wanted.
- ``dqfast::code_statistics_triton``: the per-code count/sum kernel (fp32 atomics into zeroed
  outputs); not differentiable (no autograd formula).
- ``dqfast::c2f_decode_attention_triton``: the KV-cache decode kernels (split over the keys,
  then merged); forward-only, as the kernel module is (no autograd formula: a compiled call that
  needs a gradient keeps the opaque backward op, see :mod:`dqfast.library`).

Autotuned kernels: ``wrap_triton`` accepts ``triton.autotune`` kernels; Inductor autotunes them
itself over the listed configs (``configs``, ``key``, ``reset_to_zero`` and
``prune_configs_by`` are supported, pre/post hooks are not, and none is used here). Under
``TRITON_INTERPRET=1`` torch leaves interpreted kernels unwrapped, so the ops run eagerly on CPU
tensors there (the parity tests) but cannot be traced.

Importing this module imports triton and the kernel modules: :mod:`dqfast.library` imports it
only when a CUDA call is being compiled onto the Triton path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .c2f_attention import (
    c2f_attention_bwd,
    c2f_attention_fwd,
    c2f_decode_attention_fwd,
)
from .subpixel_conv import (
    _dense_to_phase_weights,
    fold_phase_weights,
    fold_phase_weights_grad,
    phase_weights_to_dense,
    subpixel_conv2d_bwd,
    subpixel_conv2d_folded_fwd,
    subpixel_conv2d_fwd,
)
from .vector_quantize import (
    NORMALIZE_EPS,
    _coded_cells,
    _resolve_grain,
    code_statistics_fwd,
    dynamic_quantize_bwd,
    dynamic_quantize_fwd,
    vector_quantize_fwd,
)

__all__ = [
    "subpixel_conv2d_triton",
    "subpixel_conv2d_triton_backward",
    "upsample_conv2d_triton",
    "upsample_conv2d_triton_backward",
    "vector_quantize_triton",
    "c2f_attention_triton",
    "c2f_attention_triton_backward",
    "dynamic_quantize_triton",
    "dynamic_quantize_triton_backward",
    "code_statistics_triton",
    "c2f_decode_attention_triton",
    "TRITON_OPS",
]


def _grads_out(grads, primals: tuple[Tensor | None, ...]) -> list[Tensor]:
    """The backward ops' result: each gradient, or an empty tensor where none was computed."""
    first = primals[0]
    return [g if g is not None else (p if p is not None else first).new_empty(0) for g, p in zip(grads, primals)]


def _grads_or_none(grads: list[Tensor], wants: list[bool]) -> list[Tensor | None]:
    return [g if w else None for g, w in zip(grads, wants)]


def _conv_wants(ctx) -> list[bool]:
    needs = ctx.needs_input_grad
    return [bool(needs[0]), bool(needs[1]), bool(needs[2]) and ctx.has_bias]


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, *rest = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.rest = rest
    ctx.has_bias = bias is not None


# ----------------------------------------------------------------------------------------------
# subpixel_conv2d
# ----------------------------------------------------------------------------------------------


@triton_op("dqfast::subpixel_conv2d_triton", mutates_args=())
def subpixel_conv2d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    factor: int,
    padding_mode: str,
    activation: str | None,
    negative_slope: float,
) -> Tensor:
    """pixel_shuffle(act(conv2d(pad(x), weight, bias)), factor) on the fused kernel.

    x: (B, Cin, H, W); weight: (Cout * factor**2, Cin, k, k); bias: (Cout * factor**2,) or None.
    Returns (B, Cout, factor * H, factor * W) in x's dtype and memory format.
    """
    return subpixel_conv2d_fwd(
        x, weight, bias, factor, padding_mode, activation, negative_slope, wrap_triton=wrap_triton
    )


@triton_op("dqfast::subpixel_conv2d_triton_backward", mutates_args=())
def subpixel_conv2d_triton_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    factor: int,
    padding_mode: str,
    activation: str | None,
    negative_slope: float,
    wants: list[bool],
) -> list[Tensor]:
    """[grad_x, grad_weight, grad_bias] of :func:`subpixel_conv2d_triton` for the gradient ``grad``
    of its output; ``wants`` flags which to compute (an empty tensor stands for the others)."""
    grads = subpixel_conv2d_bwd(
        grad, x, weight, bias, factor, padding_mode, activation, negative_slope,
        needs_grad=(wants[0], wants[1], wants[2]), wrap_triton=wrap_triton,
    )  # fmt: skip
    return _grads_out(grads, (x, weight, bias))


def _subpixel_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    wants = _conv_wants(ctx)
    grads = subpixel_conv2d_triton_backward(grad, x, weight, bias, *ctx.rest, wants)
    return (*_grads_or_none(grads, wants), None, None, None, None)


subpixel_conv2d_triton.register_autograd(_subpixel_backward, setup_context=_conv_setup)


# ----------------------------------------------------------------------------------------------
# upsample_conv2d
# ----------------------------------------------------------------------------------------------


def _check_scale(factor: int) -> None:
    if factor != 2:
        raise ValueError(f"the phase-aware resize-conv kernel covers a 2x upsample only, got scale {factor}")


@triton_op("dqfast::upsample_conv2d_triton", mutates_args=())
def upsample_conv2d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    factor: int,
    padding_mode: str,
    activation: str | None,
    negative_slope: float,
) -> Tensor:
    """act(conv3x3(nearest_upsample_x2(x))) on the phase-aware kernel.

    x: (B, Cin, H, W); weight: (Cout, Cin, 3, 3); bias: (Cout,) or None; factor must be 2.
    Returns (B, Cout, 2H, 2W) in x's dtype and memory format.
    """
    _check_scale(factor)
    return subpixel_conv2d_folded_fwd(
        x, fold_phase_weights(weight), bias, padding_mode, activation, negative_slope, wrap_triton=wrap_triton
    )


@triton_op("dqfast::upsample_conv2d_triton_backward", mutates_args=())
def upsample_conv2d_triton_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    factor: int,
    padding_mode: str,
    activation: str | None,
    negative_slope: float,
    wants: list[bool],
) -> list[Tensor]:
    """[grad_x, grad_weight, grad_bias] of :func:`upsample_conv2d_triton`: the sub-pixel backward
    kernels on the dense (Cout * 4, Cin, 3, 3) equivalent of the folded weight, the weight
    gradient mapped back to the phase taps and then through the fold to the 3x3 weight."""
    _check_scale(factor)
    dense = phase_weights_to_dense(fold_phase_weights(weight))
    dense_bias = None if bias is None else bias.repeat_interleave(4)
    grad_x, grad_dense, grad_dense_bias = subpixel_conv2d_bwd(
        grad, x, dense, dense_bias, 2, padding_mode, activation, negative_slope,
        needs_grad=(wants[0], wants[1], wants[2]), wrap_triton=wrap_triton,
    )  # fmt: skip
    grad_w = None if grad_dense is None else fold_phase_weights_grad(_dense_to_phase_weights(grad_dense))
    grad_b = None if grad_dense_bias is None else grad_dense_bias.view(-1, 4).sum(1)
    return _grads_out((grad_x, grad_w, grad_b), (x, weight, bias))


def _upsample_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    wants = _conv_wants(ctx)
    grads = upsample_conv2d_triton_backward(grad, x, weight, bias, *ctx.rest, wants)
    return (*_grads_or_none(grads, wants), None, None, None, None)


upsample_conv2d_triton.register_autograd(_upsample_backward, setup_context=_conv_setup)


# ----------------------------------------------------------------------------------------------
# vector_quantize
# ----------------------------------------------------------------------------------------------


@triton_op("dqfast::vector_quantize_triton", mutates_args=())
def vector_quantize_triton(z: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest-code search. z: (..., D), codebook: (K, D), metric "l2" or "cosine" ->
    (quantized (..., D) in z's dtype, indices (...) int64, distance (...) fp32)."""
    lead, D = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, D)
    cosine = metric == "cosine"
    if cosine:
        flat = F.normalize(flat.float(), dim=-1, eps=NORMALIZE_EPS)
        codebook = F.normalize(codebook.float(), dim=-1, eps=NORMALIZE_EPS)
    quantized, indices, distance = vector_quantize_fwd(
        flat, codebook, cosine=cosine, out_dtype=z.dtype, wrap_triton=wrap_triton
    )
    return quantized.reshape(*lead, D), indices.reshape(lead), distance.reshape(lead)


def _vq_setup(ctx, inputs, output) -> None:
    z, _, metric = inputs
    ctx.save_for_backward(z)
    ctx.metric = metric
    ctx.mark_non_differentiable(output[1], output[2])


def _vq_backward(ctx, grad_quantized, grad_indices, grad_distance):
    """Straight-through to z: unchanged for l2; for cosine through ``F.normalize(z.float())``,
    whose gradient is (g - y (y . g)) / |z| with y the unit vector (g / eps where |z| <= eps)."""
    (z,) = ctx.saved_tensors
    if ctx.metric != "cosine":
        return grad_quantized.to(z.dtype), None, None
    zf, g = z.float(), grad_quantized.float()
    norm = torch.linalg.vector_norm(zf, dim=-1, keepdim=True)
    denom = norm.clamp_min(NORMALIZE_EPS)
    y = zf / denom
    grad = torch.where(norm > NORMALIZE_EPS, g - y * (y * g).sum(-1, keepdim=True), g) / denom
    return grad.to(z.dtype), None, None


vector_quantize_triton.register_autograd(_vq_backward, setup_context=_vq_setup)


# ----------------------------------------------------------------------------------------------
# c2f_attention
# ----------------------------------------------------------------------------------------------


def _c2f_tables(segment_sizes: list[int], lengths: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(seg_start (S + 1,), valid_end (B, S)) int32, as ``kernels.c2f_attention._layout_tables``
    makes them but without its per-device cache of seg_start (a cache must not keep a tensor
    made while torch.compile traces)."""
    starts = [0]
    for size in segment_sizes:
        starts.append(starts[-1] + int(size))
    seg_start = torch.tensor(starts, dtype=torch.int32, device=device)
    valid_end = (seg_start[:-1] + lengths.to(device=device, dtype=torch.int32)).contiguous()
    return seg_start, valid_end


def _c2f_scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


@triton_op("dqfast::c2f_attention_triton", mutates_args=())
def c2f_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, segment_sizes: list[int], lengths: Tensor, mode: str, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Coarse-to-fine masked attention forward. q, k, v: (B, H, L, Dh), any strides; the layout
    as ``segment_sizes`` (S,), ``lengths`` (B, S) and ``mode`` ("causal" or "block").
    Returns (out (B, H, L, Dh) in q's dtype, lse (B, H, L) fp32, what the backward reads)."""
    seg_start, valid_end = _c2f_tables(segment_sizes, lengths, q.device)
    return c2f_attention_fwd(
        q, k, v, seg_start, valid_end, mode == "causal", _c2f_scale(q, scale), wrap_triton=wrap_triton
    )


@triton_op("dqfast::c2f_attention_triton_backward", mutates_args=())
def c2f_attention_triton_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    segment_sizes: list[int],
    lengths: Tensor,
    mode: str,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`c2f_attention_triton` for the gradient ``grad`` of ``out``."""
    seg_start, valid_end = _c2f_tables(segment_sizes, lengths, q.device)
    causal, scale = mode == "causal", _c2f_scale(q, scale)
    return c2f_attention_bwd(grad, q, k, v, out, lse, seg_start, valid_end, causal, scale, wrap_triton=wrap_triton)


def _c2f_setup(ctx, inputs, output) -> None:
    q, k, v, segment_sizes, lengths, mode, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lengths)
    ctx.rest = (segment_sizes, mode, scale)
    ctx.mark_non_differentiable(lse)


def _c2f_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, lengths = ctx.saved_tensors
    segment_sizes, mode, scale = ctx.rest
    dq, dk, dv = c2f_attention_triton_backward(grad_out, q, k, v, out, lse, segment_sizes, lengths, mode, scale)
    return dq, dk, dv, None, None, None, None


c2f_attention_triton.register_autograd(_c2f_backward, setup_context=_c2f_setup)


# ----------------------------------------------------------------------------------------------
# dynamic_quantize
# ----------------------------------------------------------------------------------------------


def _normalize_grad(v: Tensor, grad: Tensor, dim: int) -> Tensor:
    """The gradient through ``F.normalize(v, dim=dim, eps=NORMALIZE_EPS)`` (v fp32):
    (g - y (y . g)) / |v| with y the unit vector, g / eps where |v| <= eps."""
    norm = torch.linalg.vector_norm(v, dim=dim, keepdim=True)
    denom = norm.clamp_min(NORMALIZE_EPS)
    y = v / denom
    return torch.where(norm > NORMALIZE_EPS, grad - y * (y * grad).sum(dim, keepdim=True), grad) / denom


def _gate_map(gate: Tensor, g: int) -> Tensor:
    """(B, 1, H * 2**g, W * 2**g): gate[..., g] at every cell of the grain-g grid."""
    side = 2**g
    return gate[..., g].repeat_interleave(side, 1).repeat_interleave(side, 2)[:, None]


def _dq_kernel_inputs(features, codebook: Tensor, gate: Tensor | None, metric: str):
    """(vectors, maps, codes, gate) the kernels see, as ``kernels.vector_quantize.dynamic_quantize``
    makes them: for cosine the maps are fp32 ``F.normalize(gate * features[g])`` (``vectors``:
    the gated maps before it) and the codes the normalised codebook, with no gate left; for l2
    the arguments themselves."""
    if metric != "cosine":
        return list(features), list(features), codebook, gate
    vectors = [f if gate is None else f * _gate_map(gate, g) for g, f in enumerate(features)]
    maps = [F.normalize(v.float(), dim=1, eps=NORMALIZE_EPS) for v in vectors]
    return vectors, maps, F.normalize(codebook.float(), dim=-1, eps=NORMALIZE_EPS), None


def _dq_denom(counts: list[Tensor], D: int) -> Tensor:
    """N_codes * D as fp32 (N_codes >= 1), from the device-side counts of coded cells."""
    return torch.stack(counts).sum().clamp_min(1).to(torch.float32) * D


@triton_op("dqfast::dynamic_quantize_triton", mutates_args=())
def dynamic_quantize_triton(
    features: list[Tensor],
    codebook: Tensor,
    grain: Tensor | None,
    gate: Tensor | None,
    router_logits: Tensor | None,
    budget: list[float] | None,
    metric: str,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dynamic (per-region grain) quantization on the search, combine/emit kernels.

    features: G maps (B, D, H * 2**g, W * 2**g), any strides; codebook (K, D); one of grain
    (B, H, W), gate (B, H, W, G) or router_logits (B, H, W, G) with an optional budget.
    Returns (quantized (B, D, Hf, Wf) in the features' dtype, indices (B, Hf, Wf) int64, grain
    (B, H, W) int64, loss () fp32, n_codes (B,) int64), as ``dqfast.dynamic_quantize``.
    """
    G, D = len(features), features[0].shape[1]
    resolved = _resolve_grain(grain, gate, router_logits, budget)
    if resolved is grain:  # an op's output may not be one of its inputs
        resolved = resolved.clone()
    cells, counts = _coded_cells(resolved, G)
    _, maps, codes, kernel_gate = _dq_kernel_inputs(features, codebook, gate, metric)
    quantized, indices, sq_sum = dynamic_quantize_fwd(
        maps, codes, kernel_gate, cells, counts,
        cosine=metric == "cosine", out_dtype=features[0].dtype, wrap_triton=wrap_triton,
    )  # fmt: skip
    loss = (1.0 + beta) * sq_sum / _dq_denom(counts, D)
    n_codes = (4**resolved).sum((1, 2))
    return quantized, indices, resolved, loss, n_codes


@triton_op("dqfast::dynamic_quantize_triton_backward", mutates_args=())
def dynamic_quantize_triton_backward(
    grad_quantized: Tensor | None,
    grad_loss: Tensor | None,
    features: list[Tensor],
    codebook: Tensor,
    gate: Tensor | None,
    grain: Tensor,
    indices: Tensor,
    metric: str,
    beta: float,
    wants: list[bool],
) -> list[Tensor]:
    """[*grad_features, grad_codebook, grad_gate] of :func:`dynamic_quantize_triton` for the
    gradients of its quantized output and loss; ``grain`` and ``indices`` are the forward's
    outputs, ``wants`` flags which gradients to return (an empty tensor stands for the others)."""
    G, D = len(features), features[0].shape[1]
    cells, counts = _coded_cells(grain, G)
    vectors, maps, codes, kernel_gate = _dq_kernel_inputs(features, codebook, gate, metric)
    coef = None
    if grad_loss is not None:
        c = grad_loss.float() * 2.0 / _dq_denom(counts, D)
        coef = torch.stack([c * beta, c])
    grad_maps, grad_gate, grad_codes = dynamic_quantize_bwd(
        grad_quantized, coef, maps, codes, kernel_gate, indices, cells, counts, wrap_triton=wrap_triton
    )
    if grad_codes is None:  # no loss gradient: nothing reaches the codebook
        grad_codes = torch.zeros_like(codes)
    if metric != "cosine":
        grad_features, grad_codebook = grad_maps, grad_codes
    else:
        # Through v = gate * features[g] (the gate broadcast over the region's cells and the
        # channels) and the normalisations, as autograd goes through them eagerly.
        grad_features, gate_parts = [], []
        for g, (f, v, gm) in enumerate(zip(features, vectors, grad_maps)):
            grad_v = _normalize_grad(v.float(), gm, 1).to(v.dtype)
            if gate is None:
                grad_features.append(grad_v.to(f.dtype))
                continue
            grad_features.append((grad_v * _gate_map(gate, g)).to(f.dtype))
            side, (B, _, Hg, Wg) = 2**g, f.shape
            part = (grad_v * f).sum(1).reshape(B, Hg // side, side, Wg // side, side).sum((2, 4))
            gate_parts.append(part)
        grad_gate = None if gate is None else torch.stack(gate_parts, -1).to(gate.dtype)
        grad_codebook = _normalize_grad(codebook.float(), grad_codes, -1).to(codebook.dtype)
    grads = [*grad_features, grad_codebook, grad_gate]
    return _grads_out([g if w else None for g, w in zip(grads, wants)], (*features, codebook, gate))


def _dq_setup(ctx, inputs, output) -> None:
    features, codebook, grain, gate, router_logits, budget, metric, beta = inputs
    _, indices, resolved, _, n_codes = output
    ctx.num_features = len(features)
    ctx.save_for_backward(*features, codebook, gate, resolved, indices)
    ctx.rest = (metric, beta)
    ctx.has_gate = gate is not None
    ctx.mark_non_differentiable(indices, resolved, n_codes)


def _dq_backward(ctx, grad_quantized, grad_indices, grad_grain, grad_loss, grad_n_codes):
    G = ctx.num_features
    saved = ctx.saved_tensors
    features, (codebook, gate, grain, indices) = list(saved[:G]), saved[G:]
    needs = ctx.needs_input_grad
    # needs[0] is one flag per feature map (or one for the list)
    feature_needs = list(needs[0]) if isinstance(needs[0], list | tuple) else [needs[0]] * G
    wants = [bool(n) for n in feature_needs] + [bool(needs[1]), bool(needs[3]) and ctx.has_gate]
    grads = dynamic_quantize_triton_backward(
        grad_quantized, grad_loss, features, codebook, gate, grain, indices, *ctx.rest, wants
    )
    feature_grads = [g if w else None for g, w in zip(grads[:G], wants[:G])]
    codebook_grad, gate_grad = _grads_or_none(grads[G:], wants[G:])
    return feature_grads, codebook_grad, None, gate_grad, None, None, None, None


dynamic_quantize_triton.register_autograd(_dq_backward, setup_context=_dq_setup)


# ----------------------------------------------------------------------------------------------
# code_statistics (not differentiable)
# ----------------------------------------------------------------------------------------------


@triton_op("dqfast::code_statistics_triton", mutates_args=())
def code_statistics_triton(x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-code count and sum. x: (N, D), indices: (N,) -> (counts (num_codes,) fp32,
    sums (num_codes, D) fp32), accumulated by fp32 atomics into zeroed outputs."""
    return code_statistics_fwd(x, indices, num_codes, wrap_triton=wrap_triton)


# ----------------------------------------------------------------------------------------------
# c2f_decode_attention (forward only)
# ----------------------------------------------------------------------------------------------


@triton_op("dqfast::c2f_decode_attention_triton", mutates_args=())
def c2f_decode_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, scale: float | None
) -> Tensor:
    """KV-cache decoding attention. q: (B, H, Lq, Dh); k_cache, v_cache: (B, H, Lk, Dh);
    key_valid: (B, Lk) bool; any strides. Returns (B, H, Lq, Dh) in q's dtype (0 for a query
    with no valid key). Forward only."""
    return c2f_decode_attention_fwd(q, k_cache, v_cache, key_valid, _c2f_scale(q, scale), wrap_triton=wrap_triton)


# Public op name -> (forward triton_op, backward triton_op or None).
TRITON_OPS = {
    "subpixel_conv2d": (subpixel_conv2d_triton, subpixel_conv2d_triton_backward),
    "upsample_conv2d": (upsample_conv2d_triton, upsample_conv2d_triton_backward),
    "vector_quantize": (vector_quantize_triton, None),
    "c2f_attention": (c2f_attention_triton, c2f_attention_triton_backward),
    "dynamic_quantize": (dynamic_quantize_triton, dynamic_quantize_triton_backward),
    "code_statistics": (code_statistics_triton, None),
    "c2f_decode_attention": (c2f_decode_attention_triton, None),
}
