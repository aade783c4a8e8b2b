"""Models built on dqfast: ``create(name, pretrained=False, **overrides)`` and ``available()``.

Presets: the compressive autoencoder (``cae``, ``cae-tiny``), DQ-VAE (``dqvae``, ``dqvae-entropy``,
``dqvae-tiny``, ``dqvae-triple-tiny``) and DQ-Transformer (``dqtransformer``, ``dqtransformer-tiny``).
"""

from dqfast.models import cae, dqtransformer, dqvae  # noqa: F401  (register their presets)
from dqfast.models.cae import CompressiveAutoencoder
from dqfast.models.dqtransformer import DQTransformer
from dqfast.models.dqvae import DQVAE, DQTokens
from dqfast.models.registry import available, count_parameters, create, register

__all__ = [
    "DQVAE",
    "CompressiveAutoencoder",
    "DQTokens",
    "DQTransformer",
    "available",
    "count_parameters",
    "create",
    "register",
]
