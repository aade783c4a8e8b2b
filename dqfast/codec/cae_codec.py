"""Real bitstreams for the compressive autoencoder (:class:`dqfast.models.cae.CompressiveAutoencoder`).

The encoder's integer latents are coded channel by channel with static tables: channel c uses the
model's probabilities ``pmf_table(lo, hi)[c]`` (its Gaussian scale mixture integrated over unit
bins), quantised to integers by :func:`~dqfast.codec.entropy.quantize_pmf`. The tables are not
stored in the file: they are a pure function of the weights, recomputed at both ends in float64 on
the CPU, and the header carries the weights hash (same weights) and a CRC of the quantised tables
(same arithmetic), so a mismatch is reported instead of decoding garbage. Symbols outside
``lo..hi`` are escaped and coded exactly, so the decoder always recovers exactly the encoder's
latents. Channels switched off by the model's mask are always 0 and are not coded.

Rate control: ``quality`` q multiplies every quantisation scale λ (and, to keep the tables matched
to the symbols, every scale of the entropy model) by q; q = 1 is the trained rate point, q > 1
spends more bits, q < 1 fewer. The model's weights hash is taken before this scaling.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from dqfast.codec.container import (
    CodecError,
    Compressed,
    Header,
    check_image,
    check_model,
    check_source_channels,
    model_fingerprint,
    pack,
    unpack,
)
from dqfast.codec.entropy import IntegerTables, decode_rows, encode_rows, information_bits

__all__ = ["compress_cae", "decompress_cae", "encode_cae", "TAIL_MASS", "MAX_HALF_RANGE"]

# Per-channel tables cover all but this much of the mass of every channel's law; rarer symbols are
# escaped. Every table entry costs at least 1/65536 of probability, so a wider range wastes rate.
TAIL_MASS = 1e-6
# Cap on the table half-width: a table of K entries reserves K/65536 of the mass for its floor counts.
MAX_HALF_RANGE = 2047


def _variable_rate(model: nn.Module) -> bool:
    """Whether ``model`` is the variable-rate CAE (coded by :mod:`dqfast.codec.cae_hyper_codec`)."""
    from dqfast.models.cae_hyper import HyperpriorCAE

    return isinstance(model, HyperpriorCAE)


def _quality(quality: float | None) -> float:
    if quality is None:
        return 1.0
    q = float(quality)
    if not math.isfinite(q) or q <= 0:
        raise ValueError(f"quality must be a positive finite number, got {quality!r}")
    return q


def _at_quality(model: nn.Module, q: float) -> nn.Module:
    """A copy of ``model`` whose quantisation and entropy-model scales are multiplied by ``q``."""
    if q == 1.0:
        return model
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.log_scales.add_(math.log(q))
        scaled.entropy_model.log_scales.add_(math.log(q))
    return scaled


def _table_range(model: nn.Module) -> tuple[int, int]:
    lo, hi = model.latent_range(TAIL_MASS)
    return max(lo, -MAX_HALF_RANGE), min(hi, MAX_HALF_RANGE)


def _active_channels(model: nn.Module) -> np.ndarray:
    return np.flatnonzero(model.mask.detach().cpu().numpy() != 0)


def _tables(model: nn.Module, lo: int, hi: int, active: np.ndarray) -> tuple[np.ndarray, IntegerTables]:
    """Float (A, K) probabilities of the active channels and their quantised tables (escape mass 0)."""
    pmf = model.pmf_table(lo, hi).detach().cpu().to(torch.float64).numpy()[active]
    return pmf, IntegerTables.from_pmf(pmf, lo)


def encode_cae(
    model: nn.Module,
    image: torch.Tensor,
    *,
    quality: float | None = None,
    name: str | None = None,
    source_channels: int = 3,
) -> Compressed:
    """Compress ``image`` (3, H, W) in [0, 1]; returns the file bytes with its header and estimated rate.

    ``name`` is the model's name recorded in the file (default: its class name); the decoder must
    present the same name and weights. ``source_channels`` (1 or 3) records whether the image came
    from a grayscale file, so that a decoder writing files can give it back as grayscale.
    """
    if _variable_rate(model):
        from dqfast.codec.cae_hyper_codec import encode_hyper

        return encode_hyper(model, image, quality=quality, name=name, source_channels=source_channels)
    batch = check_image(image)
    q = _quality(quality)
    fingerprint = model_fingerprint(model)
    coder = _at_quality(model, q)
    device = next(coder.parameters()).device
    symbols = coder.encode(batch.to(device))[0].cpu().numpy().astype(np.int64)  # (C, h, w)
    C, h, w = symbols.shape
    active = _active_channels(coder)
    lo, hi = _table_range(coder)
    pmf, tables = _tables(coder, lo, hi, active)
    rows = symbols[active].reshape(len(active), h * w)
    words = encode_rows(rows, tables)
    header = Header(
        kind="cae",
        model_name=name if name is not None else type(model).__name__,
        weights_hash=fingerprint,
        tables_hash=tables.digest(),
        image_size=tuple(image.shape[1:]),
        channels=check_source_channels(source_channels),
        padded_size=(8 * h, 8 * w),
        latent_shape=(C, h, w),
        setting=q,
        params=(lo, hi),
    )
    return Compressed(pack(header, [words]), header, information_bits(rows, pmf, lo))


def compress_cae(
    model: nn.Module, image: torch.Tensor, *, quality: float | None = None, name: str | None = None
) -> bytes:
    """image: (3, H, W) in [0, 1] -> the bytes of a dqfast file (see :func:`encode_cae`)."""
    return encode_cae(model, image, quality=quality, name=name).data


def decode_cae_symbols(header: Header, streams: list[np.ndarray], model: nn.Module) -> np.ndarray:
    """The integer latents (C, h, w) int64 of a parsed CAE file, for a model already checked against it."""
    return _decode_symbols(header, streams, _at_quality(model, _stored_quality(header)))


def _decode_symbols(header: Header, streams: list[np.ndarray], coder: nn.Module) -> np.ndarray:
    """As :func:`decode_cae_symbols`, ``coder`` being the model already set to the file's quality."""
    C, h, w = _latent_shape(header, coder)
    if len(streams) != 1 or len(header.params) != 2:
        raise CodecError("corrupted file: a CAE file has one stream and a table range")
    lo, hi = header.params
    if not -MAX_HALF_RANGE <= lo <= hi <= MAX_HALF_RANGE:
        raise CodecError(f"corrupted file: table range {lo}..{hi} is outside what the encoder makes")
    active = _active_channels(coder)
    _, tables = _tables(coder, lo, hi, active)
    if tables.digest() != header.tables_hash:
        raise CodecError(
            "probability tables differ from the encoder's: this machine computes the model's pmf differently"
        )
    symbols = np.zeros((C, h * w), dtype=np.int64)
    symbols[active] = decode_rows(streams[0], tables, h * w)
    return symbols.reshape(C, h, w)


def _stored_quality(header: Header) -> float:
    q = header.setting
    if not math.isfinite(q) or q <= 0:
        raise CodecError(f"corrupted file: quality {q} is not a positive number")
    return q


def _latent_shape(header: Header, model: nn.Module) -> tuple[int, int, int]:
    H, W = header.image_size
    expected = (model.latent_channels, -(-max(H, 16) // 8), -(-max(W, 16) // 8))
    if tuple(header.latent_shape) != expected or H < 1 or W < 1:
        raise CodecError(f"corrupted file: latent shape {header.latent_shape} does not fit a {H}x{W} image")
    return expected


def decompress_cae(data: bytes, model: nn.Module, *, name: str | None = None) -> torch.Tensor:
    """Bytes of a dqfast CAE file -> the image (3, H, W) float32 in [0, 1] on the model's device.

    Raises :class:`CodecError` for a malformed file or a model other than the encoder's.
    """
    if _variable_rate(model):
        from dqfast.codec.cae_hyper_codec import decompress_hyper

        return decompress_hyper(data, model, name=name)
    header, streams = unpack(data)
    if header.kind != "cae":
        raise CodecError(f"this is a {header.kind} file, not a CAE file")
    check_model(header, name if name is not None else type(model).__name__, model_fingerprint(model))
    coder = _at_quality(model, _stored_quality(header))
    symbols = _decode_symbols(header, streams, coder)
    device = next(coder.parameters()).device
    latents = torch.from_numpy(symbols).to(device=device, dtype=torch.int32)[None]
    return coder.decode(latents, output_size=header.image_size)[0]
