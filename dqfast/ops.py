"""The public ops: validate the arguments, then dispatch to the Triton kernel or the reference.

Every function here checks its inputs and raises a ``ValueError`` / ``TypeError`` naming the
argument and what was expected, so bad input never reaches a kernel (no Triton compile errors,
no silent wrong answers). Dispatch follows :mod:`dqfast.backend`; the reference, the fast path
and the kernel are called with exactly the arguments of the public signature.

Checks of tensor *values* (index ranges, one-hot gates, grains, layout lengths) need the data on
the host. They run eagerly; under ``torch.compile`` (``torch.compiler.is_compiling()``) they are
skipped so that a compiled graph does not break, and the values are then the caller's duty.
Shape, dtype and device checks always run. Number arguments (``beta``, ``scale``, budget
fractions) are checked with comparisons only (``0 <= beta < math.inf`` refuses NaN and inf too):
``torch.compile(dynamic=True)`` traces a float argument, module attribute or keyword default as
a symbolic float, on which comparisons become guards while ``math.isfinite`` cannot be traced.
Empty spatial sizes (B, H or W = 0) of the conv ops are answered here, for every backend, with
the empty output.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from dqfast import backend
from dqfast.reference import c2f_attention as _ref_attn
from dqfast.reference import subpixel_conv as _ref_spc
from dqfast.reference import vector_quantize as _ref_vq
from dqfast.reference.c2f_attention import C2FLayout
from dqfast.types import C2FTokens, DynamicVQOutput, VQOutput

__all__ = [
    "subpixel_conv2d",
    "upsample_conv2d",
    "vector_quantize",
    "dynamic_quantize",
    "code_statistics",
    "c2f_attention",
    "c2f_decode_attention",
    "c2f_flatten",
    "c2f_unflatten",
    "grain_from_budget",
    "C2FLayout",
]

METRICS = ("l2", "cosine")


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _tensor(x, name: str, *, ndim: int | None = None, floating: bool | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating is True and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def _same_dtype(pairs: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def _same_device(pairs: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must match")


def _int(x, name: str, *, minimum: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def _choice(x, name: str, choices: Sequence) -> None:
    if x not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {x!r}")


def _scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def _check_values() -> bool:
    """Whether checks that read tensor values run: always, except while torch.compile traces."""
    return not torch.compiler.is_compiling()


def _autocast(*tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    The conv and attention ops follow ``torch.autocast`` like ``F.conv2d`` and SDPA do, so modules
    holding fp32 parameters run in bf16/fp16 under mixed precision instead of raising on the
    dtype mix. Tensors that are None stay None.
    """
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def _dispatch(op: str, reference_fn, *args, **kwargs):
    if torch.compiler.is_compiling():
        # One opaque custom-op node in the graph; it dispatches the same way at run time. Imported
        # here, not with dqfast, because registering the ops costs ~0.1 s that eager use never needs.
        from dqfast import library

        return getattr(library, op)(*args, **kwargs)
    return backend.resolve(op, reference_fn, *args, **kwargs)(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# 3.1 Sub-pixel convolution
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
    """Fused ``pixel_shuffle(act(conv2d(pad(x), weight, bias)), upscale)``.

    x: (B, Cin, H, W); weight: (Cout * r**2, Cin, k, k) with k odd ("same" padding k // 2);
    bias: (Cout * r**2,) or None. Returns (B, Cout, r * H, r * W).
    padding_mode: zeros | reflect | replicate; activation: None | relu | leaky_relu | gelu | silu.
    """
    _tensor(x, "x", ndim=4, floating=True)
    _tensor(weight, "weight", ndim=4, floating=True)
    x, weight, bias = _autocast(x, weight, bias)
    upscale = _int(upscale, "upscale", minimum=1)
    pairs = [("x", x), ("weight", weight)]
    cout_r2, cin, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"weight must have a square kernel, got kernel size {kh}x{kw}")
    if kh % 2 == 0:
        raise ValueError(f"weight kernel size must be odd ('same' padding k // 2), got {kh}")
    if cin != x.shape[1]:
        raise ValueError(f"weight expects {cin} input channels but x has {x.shape[1]} (x: (B, Cin, H, W))")
    if cout_r2 == 0 or cout_r2 % (upscale * upscale):
        raise ValueError(f"weight.shape[0] = {cout_r2} must be a positive multiple of upscale**2 = {upscale * upscale}")
    if bias is not None:
        _tensor(bias, "bias", ndim=1, floating=True)
        if bias.shape[0] != cout_r2:
            raise ValueError(f"bias must have shape ({cout_r2},), got {tuple(bias.shape)}")
        pairs.append(("bias", bias))
    _same_dtype(pairs)
    _same_device(pairs)
    _choice(padding_mode, "padding_mode", _ref_spc.PADDING_MODES)
    _choice(activation, "activation", _ref_spc.ACTIVATIONS)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a number, got {type(negative_slope).__name__}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        return _ref_spc.subpixel_conv2d(
            x, weight, bias, upscale=upscale, padding_mode=padding_mode, activation=activation
        )
    pad = kh // 2
    if padding_mode == "reflect" and pad >= min(x.shape[2], x.shape[3]):
        raise ValueError(f"padding_mode='reflect' needs H and W > k // 2 = {pad}, got x of shape {tuple(x.shape)}")
    return _dispatch(
        "subpixel_conv2d",
        _ref_spc.subpixel_conv2d,
        x,
        weight,
        bias,
        upscale=upscale,
        padding_mode=padding_mode,
        activation=activation,
        negative_slope=float(negative_slope),
    )


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
    """The resize-convolution ``act(conv2d(pad(interpolate(x, scale, "nearest")), weight, bias))``.

    x: (B, Cin, H, W); weight: (Cout, Cin, k, k), k odd ("same" padding on the upsampled grid);
    bias: (Cout,) or None. Returns (B, Cout, scale * H, scale * W). Computed on the low-res grid as
    the exactly equal sub-pixel convolution; the Triton kernel reads only the 2x2 taps each
    output phase needs for 3x3 convs at scale 2 (2.25x fewer FLOPs than the high-res conv).
    padding_mode: zeros | replicate (reflect does not fold exactly and is refused).
    """
    _tensor(x, "x", ndim=4, floating=True)
    _tensor(weight, "weight", ndim=4, floating=True)
    x, weight, bias = _autocast(x, weight, bias)
    scale = _int(scale, "scale", minimum=1)
    cout, cin, kh, kw = weight.shape
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"weight must have a square odd kernel, got kernel size {kh}x{kw}")
    if cin != x.shape[1]:
        raise ValueError(f"weight expects {cin} input channels but x has {x.shape[1]} (x: (B, Cin, H, W))")
    if cout == 0:
        raise ValueError("weight must have at least one output channel")
    pairs = [("x", x), ("weight", weight)]
    if bias is not None:
        _tensor(bias, "bias", ndim=1, floating=True)
        if bias.shape[0] != cout:
            raise ValueError(f"bias must have shape ({cout},), got {tuple(bias.shape)}")
        pairs.append(("bias", bias))
    _same_dtype(pairs)
    _same_device(pairs)
    _choice(padding_mode, "padding_mode", _ref_spc.FOLDABLE_PADDING_MODES)
    _choice(activation, "activation", _ref_spc.ACTIVATIONS)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a number, got {type(negative_slope).__name__}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        return _ref_spc.upsample_conv2d(x, weight, bias, scale=scale, padding_mode=padding_mode)
    return _dispatch(
        "upsample_conv2d",
        _ref_spc.upsample_conv2d,
        x,
        weight,
        bias,
        scale=scale,
        padding_mode=padding_mode,
        activation=activation,
        negative_slope=float(negative_slope),
    )


# ----------------------------------------------------------------------------------------------
# 3.2 / 3.3 Vector quantization
# ----------------------------------------------------------------------------------------------


def _check_codebook(codebook, d: int, d_name: str) -> None:
    _tensor(codebook, "codebook", ndim=2, floating=True)
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code, got shape (0, D)")
    if d == 0:
        raise ValueError(f"{d_name} must have a code dimension D >= 1, got D = 0")
    if codebook.shape[1] != d:
        raise ValueError(f"codebook has code dimension {codebook.shape[1]} but {d_name} has D = {d}")


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2") -> VQOutput:
    """Nearest-code search: z (..., D), codebook (K, D) -> VQOutput(quantized, indices, distance).

    indices (...) int64, argmin over codes (ties to the lowest index); distance (...) float32 to
    the chosen code (squared L2, or 1 - cos for ``metric="cosine"``, where quantized is the
    normalised code); quantized (..., D) carries the straight-through gradient to z.

    Non-finite input: a NaN distance compares as +inf, so a NaN codebook row is never chosen
    while a finite distance exists; a vector with no finite distance gets index 0, quantized =
    code 0 and the distance computed for it (NaN or inf). Same in every backend.
    """
    _tensor(z, "z", floating=True)
    if z.dim() < 1:
        raise ValueError("z must have at least one dimension (..., D), got a scalar")
    _check_codebook(codebook, z.shape[-1], "z")
    _same_dtype([("z", z), ("codebook", codebook)])
    _same_device([("z", z), ("codebook", codebook)])
    _choice(metric, "metric", METRICS)
    return _dispatch("vector_quantize", _ref_vq.vector_quantize, z, codebook, metric=metric)


def _check_budget(budget, num_grains: int):
    """Normalise ``budget`` to a tuple of G - 1 fractions (finest first) after checking it."""
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    if isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        fractions = (float(budget),)
    elif isinstance(budget, Sequence) and not isinstance(budget, str):
        fractions = tuple(budget)
        for f in fractions:
            if isinstance(f, bool) or not isinstance(f, numbers.Real):
                raise TypeError(f"budget must hold numbers, got {budget!r}")
        fractions = tuple(float(f) for f in fractions)
    else:
        raise TypeError(f"budget must be a fraction or a sequence of fractions, got {type(budget).__name__}")
    if len(fractions) != num_grains - 1:
        raise ValueError(
            f"budget must give {num_grains - 1} fraction(s) (finest grain first) for {num_grains} grains, "
            f"got {len(fractions)}"
        )
    for f in fractions:
        if not (0.0 <= f <= 1.0):
            raise ValueError(f"budget fractions must lie in [0, 1], got {budget!r}")
    if sum(fractions) > 1.0 + 1e-9:
        raise ValueError(f"budget fractions must sum to at most 1, got {budget!r} (sum {sum(fractions)})")
    return fractions


def grain_from_budget(router_logits: torch.Tensor, budget) -> torch.Tensor:
    """Per-region grain (B, H, W) int64 meeting ``budget`` exactly in every image.

    router_logits: (B, H, W, G). G = 2: ``budget`` is the fraction f of fine regions; exactly
    floor(f * H * W + 0.5) regions per image are fine, the top ones by logit_fine - logit_coarse,
    ties to the lower raster index. G > 2: a sequence of G - 1 fractions, finest grain first.
    """
    _tensor(router_logits, "router_logits", ndim=4, floating=True)
    if router_logits.shape[-1] < 2:
        raise ValueError(f"router_logits must have G >= 2 grains in its last dim, got {tuple(router_logits.shape)}")
    fractions = _check_budget(budget, router_logits.shape[-1])
    if torch.compiler.is_compiling():
        # One opaque node: the reference rounds the budget on the host, which a graph cannot hold.
        from dqfast import library

        return library.grain_from_budget(router_logits, fractions)
    return _ref_vq.grain_from_budget(router_logits, fractions if len(fractions) > 1 else fractions[0])


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
    """Dynamic vector quantization with per-region grains and an exact per-image code budget.

    features: G maps, coarsest first, ``features[g]`` (B, D, H * 2**g, W * 2**g); the regions are
    the (H, W) cells of the coarsest grid and a region at grain g uses 4**g codes. The grain of
    each region comes from exactly one of ``grain`` (B, H, W) int, ``gate`` (B, H, W, G) one-hot
    (straight-through router training; a gate that is not one-hot is refused) or
    ``router_logits`` (B, H, W, G) (argmax, or the exact per-image ``budget``). Returns
    DynamicVQOutput(quantized (B, D, Hf, Wf), indices (B, Hf, Wf), grain (B, H, W), loss,
    n_codes (B,)), Hf = H * 2**(G - 1). Under ``torch.compile`` pass ``budget`` as a Python
    number or sequence (a tensor budget is read back to the host); grain and gate values are not
    checked there.
    """
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence) or len(features) == 0:
        raise TypeError("features must be a non-empty list or tuple of (B, D, H * 2**g, W * 2**g) tensors")
    for g, f in enumerate(features):
        _tensor(f, f"features[{g}]", ndim=4, floating=True)
    G = len(features)
    B, D, H, W = features[0].shape
    for g, f in enumerate(features):
        want = (B, D, H * 2**g, W * 2**g)
        if tuple(f.shape) != want:
            raise ValueError(
                f"features[{g}] must have shape {want} (coarsest first, each grain 2x the previous), "
                f"got {tuple(f.shape)}"
            )
    _check_codebook(codebook, D, "features")
    pairs = [(f"features[{g}]", f) for g in range(G)] + [("codebook", codebook)]
    _choice(metric, "metric", METRICS)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a non-negative finite number, got {beta!r}")

    given = [n for n, v in (("grain", grain), ("gate", gate), ("router_logits", router_logits)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of grain, gate or router_logits; got {given or 'none'}")
    if budget is not None and router_logits is None:
        raise ValueError("budget needs router_logits (it ranks regions by logit_fine - logit_coarse)")
    if grain is not None:
        _tensor(grain, "grain", ndim=3, floating=False)
        if tuple(grain.shape) != (B, H, W):
            raise ValueError(f"grain must have shape {(B, H, W)}, got {tuple(grain.shape)}")
        _same_device(pairs + [("grain", grain)])
        if grain.numel() and _check_values() and (int(grain.min()) < 0 or int(grain.max()) >= G):
            raise ValueError(f"grain values must lie in [0, {G}) for {G} feature maps")
    for name, t in (("gate", gate), ("router_logits", router_logits)):
        if t is None:
            continue
        _tensor(t, name, ndim=4, floating=True)
        if tuple(t.shape) != (B, H, W, G):
            raise ValueError(f"{name} must have shape {(B, H, W, G)}, got {tuple(t.shape)}")
        pairs.append((name, t))
    if gate is not None and gate.numel() and _check_values():
        one_hot = ((gate == 0) | (gate == 1)).all(-1) & (gate.sum(-1) == 1)
        if not bool(one_hot.all()):
            b, h, w = (~one_hot).nonzero()[0].tolist()
            raise ValueError(
                f"gate must be one-hot along its last dim (one 1.0, the rest 0.0), got gate[{b}, {h}, {w}] = "
                f"{gate[b, h, w].tolist()}; use a hard (straight-through) Gumbel-softmax"
            )
    _same_dtype([p for p in pairs if p[0] != "router_logits"])
    _same_device(pairs)
    if budget is not None:
        if G < 2:
            raise ValueError("budget needs at least 2 grains")
        fractions = _check_budget(budget, G)
        budget = fractions if len(fractions) > 1 else fractions[0]
    return _dispatch(
        "dynamic_quantize",
        _ref_vq.dynamic_quantize,
        list(features),
        codebook,
        grain=grain,
        gate=gate,
        router_logits=router_logits,
        budget=budget,
        metric=metric,
        beta=float(beta),
    )


def code_statistics(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code count and sum of the vectors assigned to it, for EMA codebook training.

    x: (N, D) float; indices: (N,) int32 or int64 in [0, num_codes) (checked, except under
    torch.compile). Returns counts (num_codes,) and sums (num_codes, D), float32 (float64 for
    float64 x). Never forms an N x K one-hot; the Triton kernel accumulates with fp32 atomics.
    Not differentiable.
    """
    _tensor(x, "x", ndim=2, floating=True)
    _tensor(indices, "indices", ndim=1)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32 or int64 tensor, got {indices.dtype}")
    num_codes = _int(num_codes, "num_codes", minimum=1)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries but x has N = {x.shape[0]} rows")
    _same_device([("x", x), ("indices", indices)])
    if _check_values() and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_codes:
            raise ValueError(f"indices must lie in [0, num_codes = {num_codes}), got values in [{low}, {high}]")
    return _dispatch("code_statistics", _ref_vq.code_statistics, x, indices, num_codes)


def c2f_flatten(indices: torch.Tensor, grain: torch.Tensor, *, num_grains: int | None = None) -> C2FTokens:
    """The coarse-to-fine token sequence: per image the coarse codes in raster order of coarse
    regions, then the finer codes in row-first order over their grids (see C2FTokens).

    indices: (B, Hf, Wf) int codes broadcast to the finest grid; grain: (B, H, W) int.
    """
    _tensor(indices, "indices", ndim=3, floating=False)
    _tensor(grain, "grain", ndim=3, floating=False)
    B, H, W = grain.shape
    if indices.shape[0] != B:
        raise ValueError(f"indices has batch {indices.shape[0]} but grain has {B}")
    if H == 0 or W == 0 or indices.shape[1] % H or indices.shape[2] % W:
        raise ValueError(f"indices grid {tuple(indices.shape[1:])} must be a multiple of the grain grid {(H, W)}")
    factor = indices.shape[1] // H
    if indices.shape[2] // W != factor or factor & (factor - 1):
        raise ValueError(f"indices grid {tuple(indices.shape[1:])} must be the grain grid {(H, W)} times 2**(G - 1)")
    inferred = factor.bit_length()
    if num_grains is None:
        num_grains = inferred
    elif _int(num_grains, "num_grains", minimum=1) != inferred:
        raise ValueError(f"num_grains={num_grains} does not match the indices grid (which implies {inferred})")
    _same_device([("indices", indices), ("grain", grain)])
    if grain.numel() and _check_values() and (int(grain.min()) < 0 or int(grain.max()) >= num_grains):
        raise ValueError(f"grain values must lie in [0, {num_grains})")
    return _ref_vq.c2f_flatten(indices, grain, num_grains=num_grains)


def c2f_unflatten(tokens: C2FTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`c2f_flatten`: returns (indices (B, Hf, Wf), grain (B, H, W))."""
    if not isinstance(tokens, C2FTokens):
        raise TypeError(f"tokens must be a dqfast.C2FTokens (from c2f_flatten), got {type(tokens).__name__}")
    H, W = tokens.grid_size
    _tensor(tokens.lengths, "tokens.lengths", ndim=2, floating=False)
    G = len(tokens.codes)
    if len(tokens.positions) != G or tokens.lengths.shape[1] != G:
        raise ValueError("tokens.codes, tokens.positions and tokens.lengths must describe the same grains")
    for g in range(G):
        for name, t in (("codes", tokens.codes[g]), ("positions", tokens.positions[g])):
            _tensor(t, f"tokens.{name}[{g}]", ndim=2, floating=False)
            if tuple(t.shape) != (tokens.lengths.shape[0], H * W * 4**g):
                raise ValueError(
                    f"tokens.{name}[{g}] must have shape {(tokens.lengths.shape[0], H * W * 4**g)}, "
                    f"got {tuple(t.shape)}"
                )
    return _ref_vq.c2f_unflatten(tokens)


# ----------------------------------------------------------------------------------------------
# 3.4 Coarse-to-fine attention
# ----------------------------------------------------------------------------------------------


def _check_qkv(q, k, v, names=("q", "k", "v")):
    for name, t in zip(names, (q, k, v)):
        _tensor(t, name, ndim=4, floating=True)
    _same_dtype(list(zip(names, (q, k, v))))
    _same_device(list(zip(names, (q, k, v))))
    if q.shape[-1] == 0:
        raise ValueError("q must have a head dim Dh >= 1")


def c2f_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: C2FLayout, *, scale: float | None = None
) -> torch.Tensor:
    """Masked coarse-to-fine attention. q, k, v: (B, Hh, L, Dh) -> (B, Hh, L, Dh).

    Key j is valid for sample b iff its offset inside its segment is < ``layout.lengths[b, seg]``;
    query i attends to valid keys j <= i (mode "causal") or with seg(j) <= seg(i) (mode "block").
    Pad queries return 0. ``scale`` defaults to Dh ** -0.5. Values at pad positions (NaN and inf
    included) reach no output or gradient: pad queries get 0 and a zero gradient, pad keys zero
    dk and dv, in every backend.
    """
    _check_qkv(q, k, v)
    q, k, v = _autocast(q, k, v)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k and v must have the same shape (B, Hh, L, Dh), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not isinstance(layout, C2FLayout):
        raise TypeError(f"layout must be a dqfast.C2FLayout, got {type(layout).__name__}")
    B, _, L, _ = q.shape
    if layout.seq_len != L:
        raise ValueError(f"layout describes a sequence of {layout.seq_len} tokens but q has L = {L}")
    if layout.batch_size != B:
        raise ValueError(f"layout.lengths has batch {layout.batch_size} but q has B = {B}")
    if layout.lengths.device != q.device:
        raise ValueError(f"layout.lengths is on {layout.lengths.device} but q is on {q.device}")
    _scale(scale)
    return _dispatch("c2f_attention", _ref_attn.c2f_attention, q, k, v, layout, scale=scale)


def c2f_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Few-query attention over a KV cache, O(Lk) per step.

    q: (B, Hh, Lq, Dh); k_cache, v_cache: (B, Hh, Lk, Dh); key_valid: (B, Lk) bool. Every query
    attends to every valid cached key; a query with no valid key returns 0. Cache slots not
    marked valid are never read (NaN or inf there reaches no output or gradient).
    """
    _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    q, k_cache, v_cache = _autocast(q, k_cache, v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    B, Hh, _, Dh = q.shape
    if (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (B, Hh, Dh):
        raise ValueError(
            f"k_cache must be (B, Hh, Lk, Dh) = ({B}, {Hh}, Lk, {Dh}) to match q, got {tuple(k_cache.shape)}"
        )
    _tensor(key_valid, "key_valid", ndim=2)
    if key_valid.dtype != torch.bool:
        raise TypeError(f"key_valid must be a bool tensor, got {key_valid.dtype}")
    if tuple(key_valid.shape) != (B, k_cache.shape[2]):
        raise ValueError(f"key_valid must have shape {(B, k_cache.shape[2])}, got {tuple(key_valid.shape)}")
    _same_device([("q", q), ("key_valid", key_valid)])
    _scale(scale)
    return _dispatch(
        "c2f_decode_attention", _ref_attn.c2f_decode_attention, q, k_cache, v_cache, key_valid, scale=scale
    )
