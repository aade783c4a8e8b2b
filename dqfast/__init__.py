"""dqfast: exact, fast building blocks for dynamic-granularity tokenizers, coarse-to-fine
generators and learned image codecs."""

from dqfast.backend import BackendUnavailable, explain, get_backend, set_backend, use_backend
from dqfast.types import C2FTokens, DynamicVQOutput, VQOutput

__version__ = "0.1.0"
