"""dqfast: exact, fast building blocks for dynamic-granularity tokenizers, coarse-to-fine
generators and learned image codecs."""

from dqfast.backend import BackendUnavailable, explain, get_backend, set_backend, use_backend
from dqfast.types import C2FTokens, DynamicVQOutput, VQOutput

__version__ = "0.1.0"

_OPS = {
    "subpixel_conv2d",
    "vector_quantize",
    "dynamic_quantize",
    "grain_from_budget",
    "c2f_attention",
    "c2f_decode_attention",
    "c2f_flatten",
    "c2f_unflatten",
    "C2FLayout",
}


def __getattr__(name):
    if name in _OPS:
        from dqfast import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'dqfast' has no attribute {name!r}")
