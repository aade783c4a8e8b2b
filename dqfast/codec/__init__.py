"""dqfast's image codec: real bitstreams for the learned models, entropy coded with constriction.

- :mod:`~dqfast.codec.container`: the versioned file format (header, streams, CRC32).
- :mod:`~dqfast.codec.entropy`: exactly reproducible integer probability tables and ANS coding.
- :mod:`~dqfast.codec.cae_codec`: the compressive autoencoder's latents.
- :mod:`~dqfast.codec.dq_codec`: the DQ-VAE's grain map and variable-length codes.
- :mod:`~dqfast.codec.cli` / :mod:`~dqfast.codec.evaluate`: ``compress``, ``decompress``, ``info``
  and ``eval`` commands of ``python -m dqfast``.

:func:`encode` / :func:`decode` pick the codec from the model (or from the file's header).
"""

from __future__ import annotations

import torch
from torch import nn

from dqfast.codec.cae_codec import compress_cae, decompress_cae, encode_cae
from dqfast.codec.container import (
    FORMAT_VERSION,
    MAGIC,
    CodecError,
    Compressed,
    Header,
    model_fingerprint,
    pack,
    unpack,
)
from dqfast.codec.dq_codec import compress_dq, decompress_dq, encode_dq
from dqfast.codec.entropy import TOTAL, IntegerTables, quantize_pmf

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "TOTAL",
    "CodecError",
    "Compressed",
    "Header",
    "IntegerTables",
    "codec_kind",
    "compress_cae",
    "compress_dq",
    "decode",
    "decompress_cae",
    "decompress_dq",
    "encode",
    "encode_cae",
    "encode_dq",
    "model_fingerprint",
    "pack",
    "quantize_pmf",
    "read_header",
    "unpack",
]


def codec_kind(model: nn.Module) -> str:
    """``"cae"`` or ``"dqvae"``: which codec handles ``model``; ValueError for other models."""
    from dqfast.models.cae import CompressiveAutoencoder
    from dqfast.models.cae_hyper import HyperpriorCAE
    from dqfast.models.dqvae import DQVAE

    if isinstance(model, CompressiveAutoencoder | HyperpriorCAE):
        return "cae"
    if isinstance(model, DQVAE):
        return "dqvae"
    raise ValueError(f"no codec for a {type(model).__name__}: expected a CompressiveAutoencoder or a DQVAE")


def encode(
    model: nn.Module,
    image: torch.Tensor,
    *,
    budget: float | None = None,
    quality: float | None = None,
    name: str | None = None,
    source_channels: int = 3,
    prior: nn.Module | None = None,
    prior_name: str | None = None,
) -> Compressed:
    """Compress ``image`` (3, H, W) in [0, 1] with ``model``'s codec.

    ``budget`` (DQ-VAE: fraction of fine regions) and ``quality`` (CAE: scale multiplier) are the
    rate settings; passing the one the model does not use is an error. ``prior`` (DQ-VAE only): a
    DQ-Transformer to code the codes with (see :mod:`dqfast.codec.dq_codec`), named ``prior_name``.
    """
    kind = codec_kind(model)
    if kind == "cae":
        if budget is not None:
            raise ValueError("budget applies to the DQ-VAE; a CAE takes quality")
        if prior is not None:
            raise ValueError("prior applies to the DQ-VAE")
        return encode_cae(model, image, quality=quality, name=name, source_channels=source_channels)
    if quality is not None:
        raise ValueError("quality applies to the CAE; a DQ-VAE takes budget")
    return encode_dq(
        model, image, budget=budget, name=name, source_channels=source_channels, prior=prior, prior_name=prior_name
    )


def read_header(data: bytes) -> Header:
    """The header of a dqfast file (the file is fully checked: length and CRC)."""
    return unpack(data)[0]


def decode(
    data: bytes,
    model: nn.Module,
    *,
    name: str | None = None,
    prior: nn.Module | None = None,
    prior_name: str | None = None,
) -> tuple[torch.Tensor, Header]:
    """Decompress a dqfast file with ``model`` (and the ``prior`` its DQ-VAE codes were coded with,
    if any) -> (image (3, H, W) in [0, 1], header)."""
    header = read_header(data)
    if header.kind == "cae":
        return decompress_cae(data, model, name=name), header
    return decompress_dq(data, model, name=name, prior=prior, prior_name=prior_name), header
