"""The fast path off the GPU: the fastest correct composite of torch ops for every public op.

Calls that the Triton kernels cannot serve (CPU tensors, or a GPU without triton) go here rather
than to the readable reference (``dqfast.reference``, the spec). Each function has the signature
and return type of the reference function the ops layer calls, and is proven against it in
tests/test_fast_paths.py the way a kernel is. Pure torch: imports neither triton nor the kernels.

- ``get(op)``: the fast implementation of ``op``, or None when it has none.
- ``reasons(op, *args, **kwargs)``: why the fast path cannot serve this call (empty: it can).
- ``detail(op, *args, **kwargs)``: which of its size-dependent methods serves the call ("" when
  the op has one method); ``dqfast.describe`` reports it.

One module per op family: :mod:`.subpixel_conv` (conv + pixel_shuffle; the 2x2-tap phases of the
resize-conv with cached folded weights), :mod:`.vector_quantize` (chunked addmm + argmin search,
dynamic quantization, code statistics), :mod:`.c2f_attention` (SDPA over the packed real tokens,
SDPA over the KV cache).
"""

from __future__ import annotations

from collections.abc import Callable

from dqfast.fast import c2f_attention, subpixel_conv, vector_quantize

__all__ = ["get", "reasons", "detail", "OPS"]

_MODULES = {
    "subpixel_conv2d": subpixel_conv,
    "upsample_conv2d": subpixel_conv,
    "vector_quantize": vector_quantize,
    "dynamic_quantize": vector_quantize,
    "code_statistics": vector_quantize,
    "c2f_attention": c2f_attention,
    "c2f_decode_attention": c2f_attention,
}

OPS: tuple[str, ...] = tuple(_MODULES)


def get(op: str) -> Callable | None:
    """The fast implementation of ``op`` (same signature and result as its reference), or None."""
    module = _MODULES.get(op)
    return None if module is None else getattr(module, op)


def reasons(op: str, *args, **kwargs) -> list[str]:
    """Every reason the fast path of ``op`` cannot serve this call; empty when it serves it."""
    module = _MODULES.get(op)
    if module is None:
        return [f"no fast path for {op!r}; fast paths exist for {list(OPS)}"]
    return list(getattr(module, f"{op}_reasons")(*args, **kwargs))


def detail(op: str, *args, **kwargs) -> str:
    """How the fast path computes this call, for ops whose method depends on the sizes (e.g. the
    dense or the packed attention); "" for ops with a single method. Shown by ``dqfast.describe``."""
    module = _MODULES.get(op)
    fn = None if module is None else getattr(module, f"{op}_detail", None)
    return fn(*args, **kwargs) if fn is not None else ""
