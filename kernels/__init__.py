"""Triton kernels, one op per file.

Nothing here is imported by ``import dqfast``: :mod:`dqfast.ops` imports a kernel module the
first time a call is routed to Triton, so the package works on machines without Triton or CUDA.

Each kernel module exposes, for every op it implements, the op function (same signature and
return type as the reference, differentiable through an ``autograd.Function``) and a
``<op>_reasons(...)`` function returning why the kernel cannot serve a call (empty if it can).
Kernel modules never import :mod:`dqfast.reference`.
"""

from ._compat import patch_interpreter_index

patch_interpreter_index()
