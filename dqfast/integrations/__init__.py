"""Integrations with other libraries' models, one file per library, used by :func:`dqfast.patch`.

Each file exposes ``find(module) -> Found | None``: None when the module is not one it knows,
otherwise a :class:`~dqfast.integrations._common.Found` verdict (patchable with an ``apply``, or
left alone with the reason). Class-based integrations (diffusers, vector-quantize-pytorch) look
their classes up in ``sys.modules`` and never import the library; the taming/LDM integration
recognises its module by structure, since that class lives in many vendored copies.

- :mod:`~dqfast.integrations.diffusers`: ``Upsample2D``, ``VectorQuantizer``
- :mod:`~dqfast.integrations.taming`: ``Upsample(in_channels, with_conv)``
- :mod:`~dqfast.integrations.vector_quantize_pytorch`: ``VectorQuantize`` codebook search
"""

from __future__ import annotations

from torch import nn

from dqfast.integrations import diffusers, taming, vector_quantize_pytorch
from dqfast.integrations._common import Found

__all__ = ["Found", "INTEGRATIONS", "find"]

INTEGRATIONS = (diffusers, vector_quantize_pytorch, taming)


def find(module: nn.Module) -> Found | None:
    """The first integration's verdict on ``module``, or None when no integration knows it."""
    for integration in INTEGRATIONS:
        found = integration.find(module)
        if found is not None:
            return found
    return None
