"""Backend selection: ``auto`` | ``triton`` | ``reference``.

``auto`` routes a call to the Triton kernel when triton imports, the tensors are on CUDA and the
kernel supports the call; otherwise to the pure-PyTorch reference. ``triton`` never falls back
silently: a call the kernel cannot serve raises :class:`BackendUnavailable` listing the reasons.
On CPU tensors ``triton`` is allowed only under ``TRITON_INTERPRET=1`` (how CI tests kernels).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "set_backend",
    "get_backend",
    "use_backend",
    "explain",
    "triton_available",
]

BACKENDS = ("auto", "triton", "reference")

# Op name -> kernel module (under dqfast.kernels). A module that does not exist yet simply makes
# the op reference-only, with that as the reason.
KERNEL_MODULES = {
    "subpixel_conv2d": "subpixel_conv",
    "upsample_conv2d": "subpixel_conv",
    "vector_quantize": "vector_quantize",
    "dynamic_quantize": "vector_quantize",
    "code_statistics": "vector_quantize",
    "c2f_attention": "c2f_attention",
    "c2f_decode_attention": "c2f_attention",
}


class BackendUnavailable(RuntimeError):
    """An explicit ``triton`` request that the kernels cannot serve; ``reasons`` lists why."""

    def __init__(self, op: str, reasons: list[str]):
        self.op, self.reasons = op, list(reasons)
        super().__init__(f"dqfast.{op}: the Triton backend cannot serve this call: " + "; ".join(reasons))


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


class _State(threading.local):
    def __init__(self):
        self.stack: list[str] = []


_state = _State()
_global = _check_name(os.environ.get("DQFAST_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"``, ``"triton"`` or ``"reference"``."""
    global _global
    _global = _check_name(name)


def get_backend() -> str:
    """The backend in force for this thread (innermost :func:`use_backend`, else the global one)."""
    return _state.stack[-1] if _state.stack else _global


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` inside a ``with`` block (thread-local, nestable)."""
    _state.stack.append(_check_name(name))
    try:
        yield
    finally:
        _state.stack.pop()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel_module(op: str):
    """(module, None) or (None, reason) for the kernel module serving ``op``."""
    modname = KERNEL_MODULES[op]
    try:
        return importlib.import_module(f"dqfast.kernels.{modname}"), None
    except ModuleNotFoundError as e:
        if e.name in (f"dqfast.kernels.{modname}", "triton"):
            return None, f"no Triton kernel for {op} in this version of dqfast"
        raise


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []

    def visit(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, list | tuple):
            for y in x:
                visit(y)

    for x in list(args) + list(kwargs.values()):
        visit(x)
    return out


def reasons(op: str, *args, **kwargs) -> list[str]:
    """Every reason the Triton kernel of ``op`` cannot serve this call (empty when it can)."""
    if op not in KERNEL_MODULES:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(KERNEL_MODULES)}")
    if not triton_available():
        return ["triton is not installed"]
    why = []
    devices = {t.device.type for t in _tensors(args, kwargs)}
    if devices - {"cuda"}:
        if get_backend() == "auto":
            # auto never routes CPU tensors to the interpreter: it is for proving parity, not speed.
            why.append(f"tensors are on {sorted(devices)}; backend 'auto' uses Triton only for CUDA tensors")
        elif not (devices == {"cpu"} and interpreting()):
            why.append(
                f"tensors are on {sorted(devices)}; Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
            )
    module, missing = _kernel_module(op)
    if module is None:
        why.append(missing)
        return why
    why += getattr(module, f"{op}_reasons")(*args, **kwargs)
    return why


def explain(op: str, *args, **kwargs) -> list[str]:
    """Why ``dqfast.<op>(*args, **kwargs)`` would not run on Triton under the current backend.

    Empty list: the call runs on the Triton kernel. Under backend ``reference`` the one reason
    says so. Example: ``dqfast.explain("vector_quantize", z, codebook)``; to ask what an explicit
    request would do, wrap it in ``with dqfast.use_backend("triton"):``.
    """
    if get_backend() == "reference":
        return ['backend is "reference"']
    return reasons(op, *args, **kwargs)


def resolve(op: str, reference_fn: Callable, *args, **kwargs) -> Callable:
    """The implementation of ``op`` for this call under the current backend."""
    backend = get_backend()
    if backend == "reference":
        return reference_fn
    why = reasons(op, *args, **kwargs)
    if not why:
        return getattr(_kernel_module(op)[0], op)
    if backend == "triton":
        raise BackendUnavailable(op, why)
    return reference_fn
