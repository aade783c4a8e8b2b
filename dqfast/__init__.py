"""dqfast: exact, fast building blocks for dynamic-granularity tokenizers, coarse-to-fine
generators and learned image codecs.

Every op has a pure-PyTorch reference (:mod:`dqfast.reference`, the spec), a Triton kernel
(:mod:`dqfast.kernels`, imported on first use for CUDA tensors) and possibly a fast pure-torch
path (:mod:`dqfast.fast`); :mod:`dqfast.backend` chooses between them (:func:`describe` says which
serves a call and why).
"""

from dqfast.backend import BackendUnavailable, describe, explain, get_backend, set_backend, use_backend
from dqfast.ops import (
    C2FLayout,
    c2f_attention,
    c2f_decode_attention,
    c2f_flatten,
    c2f_unflatten,
    code_statistics,
    dynamic_quantize,
    grain_from_budget,
    subpixel_conv2d,
    upsample_conv2d,
    vector_quantize,
)
from dqfast.patch import PatchReport, patch, unpatch
from dqfast.types import C2FTokens, DynamicVQOutput, VQOutput

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "C2FLayout",
    "C2FTokens",
    "DynamicVQOutput",
    "PatchReport",
    "VQOutput",
    "c2f_attention",
    "c2f_decode_attention",
    "c2f_flatten",
    "c2f_unflatten",
    "code_statistics",
    "describe",
    "dynamic_quantize",
    "explain",
    "get_backend",
    "grain_from_budget",
    "patch",
    "set_backend",
    "subpixel_conv2d",
    "unpatch",
    "upsample_conv2d",
    "use_backend",
    "vector_quantize",
]
