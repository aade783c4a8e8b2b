"""Compatibility with the triton releases dqfast supports (3.6, the GPU machine's, to 3.9).

Imported by ``dqfast.kernels`` before any kernel module, so every kernel gets it.

Triton 3.6's interpreter (``TRITON_INTERPRET=1``) turns a Triton tensor into a Python int, as
``range()`` and indexing need, with ``int(handle.data)``. A scalar kernel argument or a scalar
computed in the kernel is held there as a NumPy array of shape (1,), and NumPy 2.4 no longer
converts an array of ndim > 0 to a Python scalar: every ``range()`` whose bound is a runtime value
fails with "only 0-dimensional arrays can be converted to Python scalars". Triton 3.9 squeezes the
array first. :func:`patch_interpreter_index` gives 3.6 the same conversion (reshape to 0-d, which
still refuses a block of more than one element). Compiled kernels are untouched.
"""

from __future__ import annotations

import inspect

_PATCHED = False


def _scalar_index(self) -> int:
    return int(self.handle.data.reshape(()))


def patch_interpreter_index() -> bool:
    """Make the interpreter's ``tensor.__index__`` accept one-element arrays. True if patched."""
    global _PATCHED
    if _PATCHED:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton, or a build without the interpreter
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data)" not in source:  # this release already converts 0-d (3.9 squeezes)
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # The scope restores attributes last-in first-out, so this one is undone first.
        scope.set_attr(tensor, "__index__", _scalar_index)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _PATCHED = True
    return True
