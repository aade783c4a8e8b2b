"""Class swapping: how :func:`dqfast.patch` reroutes another library's module without touching its state.

A recognised module keeps its identity, its children, its parameters and buffers (so every
state-dict key and every optimizer reference stays valid); only its class changes, to a subclass
of the original whose ``forward`` calls a dqfast op. The subclass keeps the original's name, so
``type(m).__name__`` checks and ``isinstance`` checks still pass; its repr gains a ``dqfast=...``
tag. :func:`restore` swaps the class back. Patched modules pickle (``torch.save(model)``) and
deep-copy: the pickle names the original class and the integration, not the generated subclass.
"""

from __future__ import annotations

import copyreg
from collections.abc import Callable

from torch import nn

__all__ = ["register", "patched_class", "swap", "restore", "is_swapped", "integration_key"]

# key ("diffusers.Upsample2D", ...) -> (forward, op name shown in the repr and the report)
_FORWARDS: dict[str, tuple[Callable, str]] = {}
_CLASSES: dict[tuple[type, str], type] = {}


def register(key: str, forward: Callable, op: str) -> None:
    """Declare the ``forward`` that replaces the original one for integration ``key``."""
    _FORWARDS[key] = (forward, op)


def _extra_repr(self) -> str:
    base = type(self)._dqfast_base.extra_repr(self)
    tag = f"dqfast={type(self)._dqfast_op}"
    return f"{base}, {tag}" if base else tag


def _reduce_ex(self, protocol: int):
    # object's reduction is (copyreg.__newobj__, (cls,), state, ...); name the original class and
    # the integration instead of the generated subclass, which no module-level name refers to.
    reduced = object.__reduce_ex__(self, max(int(protocol), 2))
    if reduced[0] is not copyreg.__newobj__:
        raise TypeError(f"cannot pickle a patched {type(self).__name__}: unexpected reduction {reduced[0]!r}")
    return (_rebuild, (type(self)._dqfast_base, type(self)._dqfast_key), *reduced[2:])


def _rebuild(base: type, key: str):
    """Unpickling: an empty instance of the patched subclass (its state is set afterwards)."""
    import dqfast.integrations  # noqa: F401  (registers every integration's forward)

    cls = patched_class(base, key)
    return cls.__new__(cls)


def patched_class(base: type, key: str) -> type:
    """The subclass of ``base`` whose ``forward`` is integration ``key``'s (made once, then cached)."""
    cls = _CLASSES.get((base, key))
    if cls is None:
        forward, op = _FORWARDS[key]
        namespace = {
            "forward": forward,
            "extra_repr": _extra_repr,
            "__reduce_ex__": _reduce_ex,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "_dqfast_base": base,
            "_dqfast_key": key,
            "_dqfast_op": op,
        }
        cls = type(base.__name__, (base,), namespace)
        _CLASSES[(base, key)] = cls
    return cls


def is_swapped(module: nn.Module) -> bool:
    """Whether ``module``'s class is one made by :func:`patched_class`."""
    return "_dqfast_base" in type(module).__dict__


def integration_key(module: nn.Module) -> str | None:
    return type(module).__dict__.get("_dqfast_key")


def swap(module: nn.Module, key: str) -> None:
    """Give ``module`` the patched class for ``key`` (in place; no-op if it already has it)."""
    if is_swapped(module):
        return
    module.__class__ = patched_class(type(module), key)


def restore(module: nn.Module) -> bool:
    """Give ``module`` back its original class; True if it was patched."""
    if not is_swapped(module):
        return False
    module.__class__ = type(module)._dqfast_base
    return True


def call_original(module: nn.Module, *args, **kwargs):
    """Run the original class's ``forward`` on ``module`` (the exact fallback)."""
    return type(module)._dqfast_base.forward(module, *args, **kwargs)
