"""The public ops as ``torch.library`` custom ops, so ``torch.compile`` sees each one as a single
node (no graph break, whatever the backend does inside).

``torch.ops.dqfast.<op>`` takes schema types only: a :class:`~dqfast.C2FLayout` is lowered to
``segment_sizes: int[]``, ``lengths: Tensor`` and ``mode: str``; feature maps to ``Tensor[]``;
a budget to ``float[]?``. Each op has

- an implementation for every device, which dispatches like the eager op
  (:func:`dqfast.backend.resolve`: the Triton kernel for CUDA tensors, else the fast path or the
  reference);
- a fake implementation (output shapes and dtypes only, for tracing);
- an autograd formula through a companion ``<op>_backward`` custom op. The backward op runs the
  chosen backend again with autograd on and returns the vector-Jacobian product: one extra
  forward per backward, the price of a backend-agnostic formula (the Triton autograd.Functions
  keep their own backward kernels; they run inside this recomputation).

:mod:`dqfast.ops` validates, then calls these ops while ``torch.compile`` traces
(``torch.compiler.is_compiling()``); eager calls dispatch directly, without the custom-op layer's
per-call overhead, and give the same values and gradients.

Compiled CUDA calls run the Triton kernels in the graph. The kernels are also registered as
``torch.library.triton_op`` ops (:mod:`dqfast.kernels._triton_ops`: ``dqfast::<op>_triton`` and
``dqfast::<op>_triton_backward``, each launch through ``torch.library.wrap_triton``) for every
public op: subpixel_conv2d, upsample_conv2d, vector_quantize, dynamic_quantize,
code_statistics, c2f_attention and c2f_decode_attention. When AOTAutograd traces one
of these custom ops (or its backward op) and every tensor of the call is on a CUDA device, a
``FunctionalTensorMode`` rule asks :func:`dqfast.backend.describe` which path serves the call;
when it is Triton, the custom op is replaced by the triton_op, which AOTAutograd decomposes into
the kernel launches themselves. Inductor then compiles and autotunes those kernels with the rest
of the graph (``triton.autotune`` configs, ``reset_to_zero`` and ``prune_configs_by`` are
supported on that path) instead of calling an opaque function. Consequences:

- the path is chosen when the graph is compiled (under the backend in force then), not at each
  call; a backend set afterwards applies to the ops that stayed opaque only;
- the backward of the conv ops, of the attention and of dynamic_quantize runs their backward
  kernels directly (no recomputation for the convs; the attention's and the quantizer's forward
  kernels run again, because their backward ops carry no log-sum-exp, indices or resolved
  grain; the quantizer's split search and combine are deterministic, so the indices are the
  forward's); vector_quantize's straight-through backward is torch ops, and so is the part of
  dynamic_quantize's cosine backward that goes through the normalisation and the gate;
- dynamic_quantize stays free of host syncs there as eagerly: the coded cells are compacted on the
  device into lists sized by the grids (the kernels read the true counts from device memory) and
  the codebook split is decided inside the search kernel, so every shape is known when tracing;
  the backward and code_statistics accumulate with fp32 atomics into zeroed outputs, which the
  traced graph keeps (torch's analysis marks those outputs, and the emit/backward kernels'
  cell lists, as written);
- c2f_decode_attention has forward kernels only. The inputs seen below autograd do not show
  whether they require grad, so a compiled call that needs a gradient runs its forward on the
  kernels (as the opaque op did at run time) and keeps the opaque backward op, which recomputes
  on the fast path or the reference (under an explicit ``triton`` backend it raises, as before);
- CPU calls, the fast and reference paths, and ``torch.export`` (which keeps triton_ops as custom
  ops) are unchanged: one opaque node that dispatches at run time.

No op is left opaque on a GPU, except ``grain_from_budget`` (a few sorts over the router logits,
integer output, no gradient): it is a custom op only so that a compiled graph does not break on
the host-side rounding of its budget, and always runs the reference (and, outside this module,
``dqfast::codebook_snapshot`` in :mod:`dqfast.nn.dynamic_quantizer`, a codebook copy that a
compiled training step must keep). Nothing here imports triton until a CUDA call is compiled onto
the Triton path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from dqfast import backend
from dqfast.reference import c2f_attention as _ref_attn
from dqfast.reference import subpixel_conv as _ref_spc
from dqfast.reference import vector_quantize as _ref_vq
from dqfast.reference.c2f_attention import C2FLayout
from dqfast.types import DynamicVQOutput, VQOutput

__all__ = [
    "subpixel_conv2d",
    "upsample_conv2d",
    "vector_quantize",
    "dynamic_quantize",
    "code_statistics",
    "c2f_attention",
    "c2f_decode_attention",
    "grain_from_budget",
    "OPS",
]

_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality,
    torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.ADInplaceOrView,
)


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    """Record autograd inside a custom op's implementation.

    Implementations run below the autograd dispatch keys (excluded), where ``torch.enable_grad``
    alone records nothing; the backward ops need a graph to take the vector-Jacobian product.
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    keys = [k for k in _AUTOGRAD_KEYS if excluded.has(k)]
    for k in keys:
        torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for k in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, True)


def _run(op: str, reference_fn: Callable, *args, **kwargs):
    return backend.resolve(op, reference_fn, *args, **kwargs)(*args, **kwargs)


def _fresh(t: Tensor, inputs: Sequence[Tensor | None]) -> Tensor:
    """``t`` made contiguous (the fake implementations promise contiguous outputs), copied when it
    shares memory with an input (custom ops may not alias)."""
    t = t.contiguous()
    ptr = t.untyped_storage().data_ptr()
    if t.numel() and any(i is not None and i.numel() and i.untyped_storage().data_ptr() == ptr for i in inputs):
        return t.clone()
    return t


def _vjp(
    fn: Callable, primals: list[Tensor | None], wants: Sequence[bool], cotangents: list[Tensor | None]
) -> list[Tensor]:
    """Gradients of ``fn(*primals)`` weighted by ``cotangents`` (one per output, None: no gradient)
    with respect to the primals flagged in ``wants``; zeros where a primal does not influence the
    used outputs, an empty tensor for primals not wanted (or None)."""
    with _autograd_on():
        leaves = [
            None if p is None else (p.detach().requires_grad_() if w else p.detach()) for p, w in zip(primals, wants)
        ]
        outs = fn(*leaves)
        outs = list(outs) if isinstance(outs, tuple | list) else [outs]
        pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None and o.requires_grad]
        wrt = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        grads = [None] * len(wrt)
        if pairs and wrt:
            grads = torch.autograd.grad(
                [o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True, materialize_grads=True
            )
    result, it = [], iter(grads)
    inputs = [*primals, *cotangents]
    for p, leaf in zip(primals, leaves):
        if leaf is None or not leaf.requires_grad:
            result.append((p if p is not None else primals[0]).new_empty(0))
            continue
        g = next(it)
        result.append(p.new_zeros(p.shape) if g is None else _fresh(g.detach(), inputs))
    return result


def _fake_grad(t: Tensor | None, wanted: bool, first: Tensor) -> Tensor:
    """What :func:`_vjp` returns for primal ``t``, as a fake tensor."""
    if t is not None and wanted:
        return t.new_empty(t.shape)
    return (t if t is not None else first).new_empty(0)


def _grads_or_none(grads: Sequence[Tensor], given: Sequence[Tensor | None], needs: Sequence[bool]) -> list:
    return [g if (t is not None and n) else None for g, t, n in zip(grads, given, needs)]


# ----------------------------------------------------------------------------------------------
# Compiling onto the Triton kernels (triton_op / wrap_triton)
# ----------------------------------------------------------------------------------------------

# Devices whose calls are decomposed onto the triton_ops when compiled (tests widen it to trace
# the decomposition on CPU without a GPU; the interpreter's kernels cannot be traced).
_GRAPH_TRITON_DEVICES = frozenset({"cuda"})


def _triton_ops():
    """:mod:`dqfast.kernels._triton_ops` (imports triton; only called for CUDA calls)."""
    from dqfast.kernels import _triton_ops

    return _triton_ops


def _compiles_to_triton(op: str, *args, **kwargs) -> bool:
    """Whether a traced call of ``op`` becomes the Triton kernels themselves: every tensor is on
    a GPU and :func:`dqfast.backend.describe` routes the call to Triton under the backend in force
    while the graph is compiled. (A backend that cannot serve it raises at run time instead, from
    the opaque op, as an eager call would.)"""
    tensors = backend._tensors(args, kwargs)
    if not tensors or any(t.device.type not in _GRAPH_TRITON_DEVICES for t in tensors):
        return False
    try:
        return backend.describe(op, *args, **kwargs).path == "triton"
    except backend.BackendUnavailable:
        return False


def _keeps_custom_ops() -> bool:
    """torch.export keeps triton_ops as custom ops (as torch does for its own triton_op)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def _decompose_onto_triton(op_def, route: Callable, triton_call: Callable) -> None:
    """Under AOTAutograd (``FunctionalTensorMode``: torch.compile's functionalized trace, never
    eager), replace a call of ``op_def`` that ``route(*args)`` sends to Triton by
    ``triton_call(*args)``, which calls the triton_ops of :mod:`dqfast.kernels._triton_ops`;
    their own decomposition then puts the kernel launches into the graph. Every other call
    stays one opaque node that dispatches at run time."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def rule(mode, op, types, args, kwargs):
        plain = all(issubclass(t, FakeTensor | FunctionalTensor) or t is Tensor for t in types)
        if not plain or _keeps_custom_ops() or not route(*args, **kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return triton_call(*args, **kwargs)

    op_def.register_torch_dispatch(FunctionalTensorMode, rule)


# ----------------------------------------------------------------------------------------------
# subpixel_conv2d / upsample_conv2d
# ----------------------------------------------------------------------------------------------


def _conv_op(name: str, reference_fn: Callable, factor_arg: str):
    def impl(x, weight, bias, factor, padding_mode, activation, negative_slope):
        kwargs = {factor_arg: factor, "padding_mode": padding_mode, "activation": activation}
        out = _run(name, reference_fn, x, weight, bias, negative_slope=negative_slope, **kwargs)
        return _fresh(out, (x, weight, bias))

    @torch.library.custom_op(f"dqfast::{name}", mutates_args=())
    def op(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        factor: int,
        padding_mode: str,
        activation: str | None,
        negative_slope: float,
    ) -> Tensor:
        return impl(x, weight, bias, factor, padding_mode, activation, negative_slope)

    @op.register_fake
    def _(x, weight, bias, factor, padding_mode, activation, negative_slope):
        cout = weight.shape[0] // (factor * factor) if name == "subpixel_conv2d" else weight.shape[0]
        return x.new_empty(x.shape[0], cout, factor * x.shape[2], factor * x.shape[3])

    @torch.library.custom_op(f"dqfast::{name}_backward", mutates_args=())
    def op_backward(
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
        def fn(x, weight, bias):
            return impl(x, weight, bias, factor, padding_mode, activation, negative_slope)

        return _vjp(fn, [x, weight, bias], wants, [grad])

    @op_backward.register_fake
    def _(grad, x, weight, bias, factor, padding_mode, activation, negative_slope, wants):
        return [_fake_grad(t, w, x) for t, w in zip((x, weight, bias), wants)]

    def setup_context(ctx, inputs, output):
        x, weight, bias, *rest = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.rest = rest
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        wants = [needs[0], needs[1], needs[2] and ctx.has_bias]
        grads = op_backward(grad, x, weight, bias, *ctx.rest, wants)
        return (*_grads_or_none(grads, (x, weight, bias), wants), None, None, None, None)

    op.register_autograd(backward, setup_context=setup_context)

    def route(x, weight, bias, factor, padding_mode, activation, negative_slope, *rest):
        kwargs = {factor_arg: factor, "padding_mode": padding_mode, "activation": activation}
        return _compiles_to_triton(name, x, weight, bias, negative_slope=negative_slope, **kwargs)

    # The custom ops promise contiguous outputs; the kernels keep x's memory format.
    def triton_forward(*args):
        forward, _ = _triton_ops().TRITON_OPS[name]
        return forward(*args).contiguous()

    def triton_backward(grad, *args):
        _, backward = _triton_ops().TRITON_OPS[name]
        return [g.contiguous() for g in backward(grad, *args)]

    _decompose_onto_triton(op, route, triton_forward)
    _decompose_onto_triton(op_backward, lambda grad, *args: route(*args), triton_backward)
    return op


_subpixel_conv2d = _conv_op("subpixel_conv2d", _ref_spc.subpixel_conv2d, "upscale")
_upsample_conv2d = _conv_op("upsample_conv2d", _ref_spc.upsample_conv2d, "scale")


def subpixel_conv2d(x, weight, bias=None, *, upscale, padding_mode="zeros", activation=None, negative_slope=0.01):
    return _subpixel_conv2d(x, weight, bias, upscale, padding_mode, activation, float(negative_slope))


def upsample_conv2d(x, weight, bias=None, *, scale=2, padding_mode="zeros", activation=None, negative_slope=0.01):
    return _upsample_conv2d(x, weight, bias, scale, padding_mode, activation, float(negative_slope))


# ----------------------------------------------------------------------------------------------
# vector_quantize
# ----------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("dqfast::vector_quantize", mutates_args=())
def _vector_quantize(z: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor, Tensor]:
    out = _run("vector_quantize", _ref_vq.vector_quantize, z, codebook, metric=metric)
    return tuple(_fresh(t, (z, codebook)) for t in out)


@_vector_quantize.register_fake
def _(z, codebook, metric):
    lead = z.shape[:-1]
    return (
        z.new_empty(z.shape),
        z.new_empty(lead, dtype=torch.int64),
        z.new_empty(lead, dtype=_compute_dtype(z.dtype)),
    )


@torch.library.custom_op("dqfast::vector_quantize_backward", mutates_args=())
def _vector_quantize_backward(grad: Tensor, z: Tensor, metric: str) -> Tensor:
    """The straight-through gradient to z: unchanged for l2, through the normalisation for cosine
    (no search needed: the chosen codes do not depend on z differentiably)."""
    if metric == "l2":
        return _fresh(grad.to(z.dtype), (grad, z))
    with _autograd_on():
        leaf = z.detach().requires_grad_()
        normed = _ref_vq._prepare(leaf, metric, _compute_dtype(z.dtype))
        (g,) = torch.autograd.grad(normed, leaf, grad.to(normed.dtype))
    return _fresh(g, (grad, z))


@_vector_quantize_backward.register_fake
def _(grad, z, metric):
    return z.new_empty(z.shape)


def _vq_setup(ctx, inputs, output):
    z, _, metric = inputs
    ctx.save_for_backward(z)
    ctx.metric = metric
    ctx.mark_non_differentiable(output[1], output[2])


def _vq_backward(ctx, grad_quantized, grad_indices, grad_distance):
    (z,) = ctx.saved_tensors
    return _vector_quantize_backward(grad_quantized, z, ctx.metric), None, None


_vector_quantize.register_autograd(_vq_backward, setup_context=_vq_setup)


def _vq_triton(z, codebook, metric):
    forward, _ = _triton_ops().TRITON_OPS["vector_quantize"]
    return tuple(t.contiguous() for t in forward(z, codebook, metric))


_decompose_onto_triton(
    _vector_quantize,
    lambda z, codebook, metric: _compiles_to_triton("vector_quantize", z, codebook, metric=metric),
    _vq_triton,
)


def vector_quantize(z, codebook, *, metric="l2") -> VQOutput:
    return VQOutput(*_vector_quantize(z, codebook, metric))


# ----------------------------------------------------------------------------------------------
# dynamic_quantize
# ----------------------------------------------------------------------------------------------


def _budget_arg(budget: list[float] | None):
    if budget is None:
        return None
    return budget[0] if len(budget) == 1 else tuple(budget)


def _dq_call(features, codebook, grain, gate, router_logits, budget, metric, beta):
    return _run(
        "dynamic_quantize",
        _ref_vq.dynamic_quantize,
        list(features),
        codebook,
        grain=grain,
        gate=gate,
        router_logits=router_logits,
        budget=_budget_arg(budget),
        metric=metric,
        beta=beta,
    )


@torch.library.custom_op("dqfast::dynamic_quantize", mutates_args=())
def _dynamic_quantize(
    features: list[Tensor],
    codebook: Tensor,
    grain: Tensor | None,
    gate: Tensor | None,
    router_logits: Tensor | None,
    budget: list[float] | None,
    metric: str,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _dq_call(features, codebook, grain, gate, router_logits, budget, metric, beta)
    inputs = (*features, codebook, grain, gate, router_logits)
    return tuple(_fresh(t, inputs) for t in out)


@_dynamic_quantize.register_fake
def _(features, codebook, grain, gate, router_logits, budget, metric, beta):
    G = len(features)
    B, D, H, W = features[0].shape
    Hf, Wf = H * 2 ** (G - 1), W * 2 ** (G - 1)
    f0 = features[0]
    return (
        f0.new_empty(B, D, Hf, Wf),
        f0.new_empty(B, Hf, Wf, dtype=torch.int64),
        f0.new_empty(B, H, W, dtype=torch.int64),
        f0.new_empty((), dtype=_compute_dtype(f0.dtype)),
        f0.new_empty(B, dtype=torch.int64),
    )


@torch.library.custom_op("dqfast::dynamic_quantize_backward", mutates_args=())
def _dynamic_quantize_backward(
    grad_quantized: Tensor | None,
    grad_loss: Tensor | None,
    features: list[Tensor],
    codebook: Tensor,
    grain: Tensor | None,
    gate: Tensor | None,
    router_logits: Tensor | None,
    budget: list[float] | None,
    metric: str,
    beta: float,
    wants: list[bool],
) -> list[Tensor]:
    G = len(features)

    def fn(*primals):
        feats, cb, gt = primals[:G], primals[G], primals[G + 1]
        out = _dq_call(feats, cb, grain, gt, router_logits, budget, metric, beta)
        return out.quantized, out.loss

    return _vjp(fn, [*features, codebook, gate], wants, [grad_quantized, grad_loss])


@_dynamic_quantize_backward.register_fake
def _(grad_quantized, grad_loss, features, codebook, grain, gate, router_logits, budget, metric, beta, wants):
    return [_fake_grad(t, w, features[0]) for t, w in zip((*features, codebook, gate), wants)]


def _dq_setup(ctx, inputs, output):
    features, codebook, grain, gate, router_logits, budget, metric, beta = inputs
    ctx.num_features = len(features)
    ctx.save_for_backward(*features, codebook, grain, gate, router_logits)
    ctx.rest = (budget, metric, beta)
    ctx.has_gate = gate is not None
    ctx.mark_non_differentiable(output[1], output[2], output[4])


def _dq_backward(ctx, grad_quantized, grad_indices, grad_grain, grad_loss, grad_n_codes):
    G = ctx.num_features
    saved = ctx.saved_tensors
    features, codebook, grain, gate, router_logits = list(saved[:G]), saved[G], *saved[G + 1 :]
    needs = ctx.needs_input_grad
    # needs[0] is one flag per feature map (or one for the list)
    feature_needs = list(needs[0]) if isinstance(needs[0], list | tuple) else [needs[0]] * G
    wants = [bool(n) for n in feature_needs] + [bool(needs[1]), bool(needs[3]) and ctx.has_gate]
    grads = _dynamic_quantize_backward(
        grad_quantized, grad_loss, features, codebook, grain, gate, router_logits, *ctx.rest, wants
    )
    feature_grads = [g if w else None for g, w in zip(grads[:G], wants[:G])]
    codebook_grad = grads[G] if needs[1] else None
    gate_grad = grads[G + 1] if wants[G + 1] else None
    return feature_grads, codebook_grad, None, gate_grad, None, None, None, None


_dynamic_quantize.register_autograd(_dq_backward, setup_context=_dq_setup)


def _dq_route(features, codebook, grain, gate, router_logits, budget, metric, beta, *rest) -> bool:
    return _compiles_to_triton(
        "dynamic_quantize",
        list(features),
        codebook,
        grain=grain,
        gate=gate,
        router_logits=router_logits,
        budget=_budget_arg(budget),
        metric=metric,
        beta=beta,
    )


def _dq_triton(*args):
    forward, _ = _triton_ops().TRITON_OPS["dynamic_quantize"]
    return tuple(t.contiguous() for t in forward(*args))


def _dq_triton_backward(
    grad_quantized, grad_loss, features, codebook, grain, gate, router_logits, budget, metric, beta, wants
):
    # The backward kernel reads the forward's indices and resolved grain, which this op's
    # signature does not carry: the forward kernels run again (as the opaque op recomputes too;
    # the search is deterministic, so the indices are the forward's).
    forward, backward = _triton_ops().TRITON_OPS["dynamic_quantize"]
    _, indices, resolved, _, _ = forward(features, codebook, grain, gate, router_logits, budget, metric, beta)
    grads = backward(grad_quantized, grad_loss, features, codebook, gate, resolved, indices, metric, beta, wants)
    return [g.contiguous() for g in grads]


_decompose_onto_triton(_dynamic_quantize, _dq_route, _dq_triton)
_decompose_onto_triton(
    _dynamic_quantize_backward, lambda grad_q, grad_loss, *args: _dq_route(*args), _dq_triton_backward
)


def dynamic_quantize(
    features, codebook, *, grain=None, gate=None, router_logits=None, budget=None, metric="l2", beta=0.25
) -> DynamicVQOutput:
    if budget is not None:
        budget = [float(budget)] if isinstance(budget, int | float) else [float(f) for f in budget]
    out = _dynamic_quantize(list(features), codebook, grain, gate, router_logits, budget, metric, float(beta))
    return DynamicVQOutput(*out)


@torch.library.custom_op("dqfast::grain_from_budget", mutates_args=())
def _grain_from_budget(router_logits: Tensor, budget: list[float]) -> Tensor:
    return _fresh(_ref_vq.grain_from_budget(router_logits, _budget_arg(budget)), (router_logits,))


@_grain_from_budget.register_fake
def _(router_logits, budget):
    B, H, W, _ = router_logits.shape
    return router_logits.new_empty(B, H, W, dtype=torch.int64)


def grain_from_budget(router_logits, budget):
    budget = [float(budget)] if isinstance(budget, int | float) else [float(f) for f in budget]
    return _grain_from_budget(router_logits.detach(), budget)


# ----------------------------------------------------------------------------------------------
# code_statistics (not differentiable)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("dqfast::code_statistics", mutates_args=())
def _code_statistics(x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    counts, sums = _run("code_statistics", _ref_vq.code_statistics, x, indices, num_codes)
    return _fresh(counts, (x, indices)), _fresh(sums, (x, indices))


@_code_statistics.register_fake
def _(x, indices, num_codes):
    acc = _compute_dtype(x.dtype)
    return x.new_empty(num_codes, dtype=acc), x.new_empty(num_codes, x.shape[1], dtype=acc)


def _cs_triton(x, indices, num_codes):
    forward, _ = _triton_ops().TRITON_OPS["code_statistics"]
    return tuple(t.contiguous() for t in forward(x, indices, num_codes))


_decompose_onto_triton(
    _code_statistics,
    lambda x, indices, num_codes: _compiles_to_triton("code_statistics", x, indices, num_codes),
    _cs_triton,
)


def code_statistics(x, indices, num_codes):
    return _code_statistics(x.detach(), indices, num_codes)


# ----------------------------------------------------------------------------------------------
# c2f_attention / c2f_decode_attention
# ----------------------------------------------------------------------------------------------


def _attn_call(q, k, v, segment_sizes, lengths, mode, scale):
    layout = C2FLayout._unchecked(segment_sizes, lengths, mode)
    return _run("c2f_attention", _ref_attn.c2f_attention, q, k, v, layout, scale=scale)


@torch.library.custom_op("dqfast::c2f_attention", mutates_args=())
def _c2f_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_sizes: list[int], lengths: Tensor, mode: str, scale: float | None
) -> Tensor:
    return _fresh(_attn_call(q, k, v, segment_sizes, lengths, mode, scale), (q, k, v))


@_c2f_attention.register_fake
def _(q, k, v, segment_sizes, lengths, mode, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("dqfast::c2f_attention_backward", mutates_args=())
def _c2f_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_sizes: list[int],
    lengths: Tensor,
    mode: str,
    scale: float | None,
    wants: list[bool],
) -> list[Tensor]:
    def fn(q, k, v):
        return _attn_call(q, k, v, segment_sizes, lengths, mode, scale)

    return _vjp(fn, [q, k, v], wants, [grad])


@_c2f_attention_backward.register_fake
def _(grad, q, k, v, segment_sizes, lengths, mode, scale, wants):
    return [_fake_grad(t, w, q) for t, w in zip((q, k, v), wants)]


def _attn_setup(ctx, inputs, output):
    q, k, v, segment_sizes, lengths, mode, scale = inputs
    ctx.save_for_backward(q, k, v, lengths)
    ctx.rest = (segment_sizes, mode, scale)


def _attn_backward(ctx, grad):
    q, k, v, lengths = ctx.saved_tensors
    segment_sizes, mode, scale = ctx.rest
    wants = list(ctx.needs_input_grad[:3])
    grads = _c2f_attention_backward(grad, q, k, v, segment_sizes, lengths, mode, scale, wants)
    return (*[g if w else None for g, w in zip(grads, wants)], None, None, None, None)


_c2f_attention.register_autograd(_attn_backward, setup_context=_attn_setup)


def _attn_route(q, k, v, segment_sizes, lengths, mode, scale, *rest) -> bool:
    layout = C2FLayout._unchecked(segment_sizes, lengths, mode)
    return _compiles_to_triton("c2f_attention", q, k, v, layout, scale=scale)


def _attn_triton(q, k, v, segment_sizes, lengths, mode, scale):
    forward, _ = _triton_ops().TRITON_OPS["c2f_attention"]
    out, _ = forward(q, k, v, segment_sizes, lengths, mode, scale)
    return out.contiguous()


def _attn_triton_backward(grad, q, k, v, segment_sizes, lengths, mode, scale, wants):
    # The backward kernels read the forward's output and log-sum-exp, which this op's signature
    # does not carry: the forward kernel runs again (as the opaque op recomputes too).
    forward, backward = _triton_ops().TRITON_OPS["c2f_attention"]
    out, lse = forward(q, k, v, segment_sizes, lengths, mode, scale)
    grads = backward(grad, q, k, v, out, lse, segment_sizes, lengths, mode, scale)
    return [g.contiguous() if w else t.new_empty(0) for g, t, w in zip(grads, (q, k, v), wants)]


_decompose_onto_triton(_c2f_attention, _attn_route, _attn_triton)
_decompose_onto_triton(_c2f_attention_backward, lambda grad, *args: _attn_route(*args), _attn_triton_backward)


def c2f_attention(q, k, v, layout: C2FLayout, *, scale=None):
    return _c2f_attention(q, k, v, list(layout.segment_sizes), layout.lengths, layout.mode, scale)


def _decode_call(q, k_cache, v_cache, key_valid, scale):
    return _run("c2f_decode_attention", _ref_attn.c2f_decode_attention, q, k_cache, v_cache, key_valid, scale=scale)


@torch.library.custom_op("dqfast::c2f_decode_attention", mutates_args=())
def _c2f_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, scale: float | None
) -> Tensor:
    return _fresh(_decode_call(q, k_cache, v_cache, key_valid, scale), (q, k_cache, v_cache))


@_c2f_decode_attention.register_fake
def _(q, k_cache, v_cache, key_valid, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("dqfast::c2f_decode_attention_backward", mutates_args=())
def _c2f_decode_attention_backward(
    grad: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, scale: float | None, wants: list[bool]
) -> list[Tensor]:
    def fn(q, k_cache, v_cache):
        return _decode_call(q, k_cache, v_cache, key_valid, scale)

    return _vjp(fn, [q, k_cache, v_cache], wants, [grad])


@_c2f_decode_attention_backward.register_fake
def _(grad, q, k_cache, v_cache, key_valid, scale, wants):
    return [_fake_grad(t, w, q) for t, w in zip((q, k_cache, v_cache), wants)]


def _decode_setup(ctx, inputs, output):
    q, k_cache, v_cache, key_valid, scale = inputs
    ctx.save_for_backward(q, k_cache, v_cache, key_valid)
    ctx.scale = scale


def _decode_backward(ctx, grad):
    q, k_cache, v_cache, key_valid = ctx.saved_tensors
    wants = list(ctx.needs_input_grad[:3])
    grads = _c2f_decode_attention_backward(grad, q, k_cache, v_cache, key_valid, ctx.scale, wants)
    return (*[g if w else None for g, w in zip(grads, wants)], None, None)


_c2f_decode_attention.register_autograd(_decode_backward, setup_context=_decode_setup)


def _decode_route(q, k_cache, v_cache, key_valid, scale) -> bool:
    # The decode kernels are forward-only. Below autograd (here, and where the opaque op runs in a
    # compiled graph) the inputs do not show that they require grad, so a call that needs a
    # gradient has its forward on the kernels as before; its backward stays the opaque op.
    return _compiles_to_triton("c2f_decode_attention", q, k_cache, v_cache, key_valid, scale=scale)


def _decode_triton(q, k_cache, v_cache, key_valid, scale):
    forward, _ = _triton_ops().TRITON_OPS["c2f_decode_attention"]
    return forward(q, k_cache, v_cache, key_valid, scale).contiguous()


_decompose_onto_triton(_c2f_decode_attention, _decode_route, _decode_triton)


def c2f_decode_attention(q, k_cache, v_cache, key_valid, *, scale=None):
    return _c2f_decode_attention(q, k_cache, v_cache, key_valid, scale)


# The custom ops (forward and backward), by public op name, for tests and tools.
OPS = {
    "subpixel_conv2d": (_subpixel_conv2d, "subpixel_conv2d_backward"),
    "upsample_conv2d": (_upsample_conv2d, "upsample_conv2d_backward"),
    "vector_quantize": (_vector_quantize, "vector_quantize_backward"),
    "dynamic_quantize": (_dynamic_quantize, "dynamic_quantize_backward"),
    "code_statistics": (_code_statistics, None),
    "c2f_attention": (_c2f_attention, "c2f_attention_backward"),
    "c2f_decode_attention": (_c2f_decode_attention, "c2f_decode_attention_backward"),
}
