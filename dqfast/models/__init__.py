"""Models built on dqfast: ``create(name, pretrained=False, **overrides)`` and ``available()``.

Presets: the compressive autoencoder (``cae``, ``cae-tiny``; the variable-rate ``cae-hyper``,
``cae-hyper-tiny``, ``cae-hyper-small`` and the shipped ``cae-small``), DQ-VAE
(``dqvae``, ``dqvae-entropy``, ``dqvae-tiny``, ``dqvae-triple-tiny``, ``dqvae-small``) and DQ-Transformer
(``dqtransformer``, ``dqtransformer-tiny``, ``dqtransformer-small``). The ``-small`` presets ship
trained weights: ``create(name, pretrained=True)``.
"""

from dqfast.models import cae, cae_hyper, dqtransformer, dqvae  # noqa: F401  (register their presets)
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
