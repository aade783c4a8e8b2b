"""Backend selection: ``auto`` | ``triton`` | ``fast`` | ``reference``.

Three paths can serve a call: the Triton kernel (:mod:`dqfast.kernels`), the fast pure-torch
path (:mod:`dqfast.fast`, composites of torch ops proven against the reference) and the
readable reference (:mod:`dqfast.reference`, the spec).

- ``auto`` (default): Triton when the tensors are CUDA, triton imports and the kernel supports
  the call; otherwise the fast path when it has one for the op and no reason to refuse the call;
  otherwise the reference. The device is looked at first, so a process that only ever passes CPU
  tensors never imports triton or a kernel module.
- ``triton`` / ``fast``: that path only; a call it cannot serve raises
  :class:`BackendUnavailable` listing the reasons (never a silent fallback). On CPU tensors
  ``triton`` is allowed only under ``TRITON_INTERPRET=1`` (how CI tests kernels).
- ``reference``: always the reference.

The ``DQFAST_BACKEND`` environment variable gives the default. It is read when an op runs (or
:func:`get_backend` is called), not at import, so ``import dqfast`` never fails on a bad value;
the op raises a ``ValueError`` naming the variable and the valid values instead.
:func:`explain` lists why Triton does not serve a call; :func:`describe` names the path that
does, with the reasons every earlier path was passed over.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Route",
    "set_backend",
    "get_backend",
    "use_backend",
    "explain",
    "describe",
    "triton_available",
]

BACKENDS = ("auto", "triton", "fast", "reference")

ENV_VAR = "DQFAST_BACKEND"

# Op name -> kernel module (under dqfast.kernels). A module that does not exist yet simply makes
# the op Triton-less, with that as the reason.
KERNEL_MODULES = {
    "subpixel_conv2d": "subpixel_conv",
    "upsample_conv2d": "subpixel_conv",
    "vector_quantize": "vector_quantize",
    "dynamic_quantize": "vector_quantize",
    "code_statistics": "vector_quantize",
    "c2f_attention": "c2f_attention",
    "c2f_decode_attention": "c2f_attention",
}

OPS = tuple(KERNEL_MODULES)

_PATH_NAMES = {"triton": "Triton", "fast": "fast"}


class BackendUnavailable(RuntimeError):
    """An explicit ``triton`` or ``fast`` request that this path cannot serve; ``reasons`` lists why."""

    def __init__(self, op: str, reasons: list[str], backend: str = "triton"):
        self.op, self.reasons, self.backend = op, list(reasons), backend
        name = _PATH_NAMES.get(backend, backend)
        super().__init__(f"dqfast.{op}: the {name} backend cannot serve this call: " + "; ".join(reasons))


class Route(NamedTuple):
    """Which path serves a call (:func:`describe`).

    path: ``"triton"``, ``"fast"`` or ``"reference"``.
    reasons: under ``auto``, for every path tried before it and passed over, the reasons
        (``{"triton": [...]}`` or ``{"triton": [...], "fast": [...]}``); empty when the first
        choice serves the call or the path was requested explicitly.
    """

    path: str
    reasons: dict[str, list[str]]

    # How the fast path computes this call when it has size-dependent variants (e.g. "dense: one
    # SDPA call with the layout's cached additive mask (L = 41 <= DENSE_MAX_LEN = 128) ..."); ""
    # otherwise. Not a tuple field: :func:`describe` attaches it to a fast route, computed when read.
    detail = ""

    def __str__(self) -> str:
        passed = "; ".join(f"not {p}: " + ", ".join(r) for p, r in self.reasons.items())
        text = self.path + (f" ({passed})" if passed else "")
        return text + (f"; as {self.detail}" if self.detail else "")


class _DetailedRoute(Route):
    """A :class:`Route` whose ``detail`` is asked of the fast path when first read (never while a
    call is dispatched or traced); a plain subclass has an instance ``__dict__`` to keep it in."""

    @property
    def detail(self) -> str:
        if "_detail" not in self.__dict__:
            ask = self.__dict__.pop("_ask")
            self.__dict__["_detail"] = ask()
        return self.__dict__["_detail"]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _from_env() -> str:
    raw = os.environ.get(ENV_VAR, "")
    name = raw.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR}={raw!r} is not a dqfast backend; valid values: {BACKENDS}")
    return name


class _State(threading.local):
    def __init__(self):
        self.stack: list[str] = []


_state = _State()
_global: str | None = None  # None: follow DQFAST_BACKEND


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"``, ``"triton"``, ``"fast"`` or ``"reference"``."""
    global _global
    _global = _check_name(name)


def get_backend() -> str:
    """The backend in force for this thread: innermost :func:`use_backend`, else the one given to
    :func:`set_backend`, else ``DQFAST_BACKEND`` (``"auto"`` when unset).

    Raises ``ValueError`` (naming the variable and the valid values) when it falls to a bad
    ``DQFAST_BACKEND``.
    """
    if _state.stack:
        return _state.stack[-1]
    return _global if _global is not None else _from_env()


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


def _fast_module():
    """The :mod:`dqfast.fast` package, or None when this version of dqfast has none (or one
    without its ``get`` / ``reasons`` entry points)."""
    module = sys.modules.get("dqfast.fast")
    if module is None:
        try:
            module = importlib.import_module("dqfast.fast")
        except ModuleNotFoundError as e:
            if e.name == "dqfast.fast":
                return None
            raise
    if not (callable(getattr(module, "get", None)) and callable(getattr(module, "reasons", None))):
        return None
    return module


def _visit_tensors(x, out: list[torch.Tensor]) -> None:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, list | tuple):
        for y in x:
            _visit_tensors(y, out)
    elif hasattr(x, "lengths") and isinstance(getattr(x, "lengths", None), torch.Tensor):
        out.append(x.lengths)  # a C2FLayout: its lengths live on a device too


def _tensors(args, kwargs) -> list[torch.Tensor]:
    # A module-level helper, not a recursive closure: a closure that refers to itself is a
    # reference cycle, which would keep every op's input tensors alive until the next garbage
    # collection (hundreds of MB of activations when a codec runs a network tile by tile).
    out: list[torch.Tensor] = []
    for x in list(args) + list(kwargs.values()):
        _visit_tensors(x, out)
    return out


def _check_op(op: str) -> None:
    if op not in KERNEL_MODULES:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(KERNEL_MODULES)}")


def _device_reasons(backend: str, args, kwargs) -> list[str]:
    """Device reasons against Triton, decided from the tensors alone (imports nothing)."""
    devices = {t.device.type for t in _tensors(args, kwargs)}
    if not devices - {"cuda"}:
        return []
    if backend == "auto":
        # auto never routes CPU tensors to the interpreter: it is for proving parity, not speed.
        return [f"tensors are on {sorted(devices)}; backend 'auto' uses Triton only for CUDA tensors"]
    if devices == {"cpu"} and interpreting():
        return []
    return [f"tensors are on {sorted(devices)}; Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"]


def reasons(op: str, *args, **kwargs) -> list[str]:
    """Every reason the Triton kernel of ``op`` cannot serve this call (empty when it can).

    Under ``auto`` a call on non-CUDA tensors is refused on that ground alone, before triton or
    any kernel module is imported.
    """
    _check_op(op)
    backend = get_backend()
    why = _device_reasons(backend, args, kwargs)
    if why and backend == "auto":
        return why
    if not triton_available():
        return ["triton is not installed"]
    module, missing = _kernel_module(op)
    if module is None:
        return why + [missing]
    return why + getattr(module, f"{op}_reasons")(*args, **kwargs)


def fast_reasons(op: str, *args, **kwargs) -> list[str]:
    """Every reason the fast path of ``op`` cannot serve this call (empty when it can)."""
    _check_op(op)
    module = _fast_module()
    if module is None:
        return ["no fast path (dqfast.fast) in this version of dqfast"]
    if module.get(op) is None:
        return [f"no fast path for {op}"]
    return list(module.reasons(op, *args, **kwargs))


def explain(op: str, *args, **kwargs) -> list[str]:
    """Why ``dqfast.<op>(*args, **kwargs)`` would not run on Triton under the current backend.

    Empty list: the call runs on the Triton kernel. Under backend ``reference`` (``fast``) the one
    reason says so. Example: ``dqfast.explain("vector_quantize", z, codebook)``; to ask what an
    explicit request would do, wrap it in ``with dqfast.use_backend("triton"):``. Which path
    serves the call instead (fast path or reference), and why: :func:`describe`.
    """
    backend = get_backend()
    if backend in ("reference", "fast"):
        _check_op(op)
        return [f'backend is "{backend}"']
    return reasons(op, *args, **kwargs)


def describe(op: str, *args, **kwargs) -> Route:
    """The path that serves ``dqfast.<op>(*args, **kwargs)`` under the current backend, and why.

    Returns a :class:`Route`, e.g. ``Route("fast", {"triton": ["tensors are on ['cpu']; ..."]})``;
    ``str(route)`` reads ``fast (not triton: tensors are on ['cpu']; ...)``. When the fast path
    serves the call with a size-dependent variant, ``route.detail`` names it and ``str(route)``
    ends with ``; as <detail>``. Under an explicit ``triton`` or ``fast`` backend that cannot
    serve the call it raises :class:`BackendUnavailable`, as the op itself would.
    """
    route = _route(op, *args, **kwargs)
    detail = getattr(_fast_module(), "detail", None) if route.path == "fast" else None
    if callable(detail):
        route = _DetailedRoute(*route)
        route.__dict__["_ask"] = lambda: detail(op, *args, **kwargs)
    return route


def _route(op: str, *args, **kwargs) -> Route:
    """:func:`describe` without the fast path's detail (what every op call asks)."""
    _check_op(op)
    backend = get_backend()
    if backend == "reference":
        return Route("reference", {})
    if backend == "fast":
        why = fast_reasons(op, *args, **kwargs)
        if why:
            raise BackendUnavailable(op, why, "fast")
        return Route("fast", {})
    why = reasons(op, *args, **kwargs)
    if not why:
        return Route("triton", {})
    if backend == "triton":
        raise BackendUnavailable(op, why, "triton")
    fast_why = fast_reasons(op, *args, **kwargs)
    if not fast_why:
        return Route("fast", {"triton": why})
    return Route("reference", {"triton": why, "fast": fast_why})


def resolve(op: str, reference_fn: Callable, *args, **kwargs) -> Callable:
    """The implementation of ``op`` for this call under the current backend."""
    path = _route(op, *args, **kwargs).path
    if path == "triton":
        return getattr(_kernel_module(op)[0], op)
    if path == "fast":
        return _fast_module().get(op)
    return reference_fn
