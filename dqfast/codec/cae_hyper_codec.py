"""Real bitstreams for the variable-rate CAE (:class:`dqfast.models.cae_hyper.HyperpriorCAE`).

A file holds two streams:

1. the side information ``z`` (N channels at 1/32 resolution), coded channel by channel with
   static tables: the hyperprior (a Gaussian scale mixture per channel) at the file's quality,
   integrated over unit bins in float64 and quantised to integers (:class:`IntegerTables`);
2. the latent residuals ``round((y - mu) · g)`` (M channels at 1/8 resolution). The decoder
   recomputes every latent's mean and scale from the decoded ``z``; each scale is rounded up to
   one of :data:`SCALE_LEVELS` (64 log-spaced levels, CompressAI's table), and all residuals of
   one level are coded, in raster order, with that level's zero-mean Gaussian table. The tables
   are a pure function of the levels: the same integers on every machine.

The encoder and the decoder compute the means and scales with the same function on the same
decoded symbols, so the decoder's table choice is the encoder's (bit-exact on one machine; a
machine whose float convolutions round differently can pick another level for a scale lying on a
level boundary, which the tables' CRC in the header cannot see — as with every learned codec that
predicts its probabilities with a network).

Rate control: ``quality`` in [0.5, L] picks (and interpolates) the model's ladder of gains; it is
stored in the header. Large images run the analysis and synthesis transforms tile by tile with a
halo (:mod:`dqfast.codec.tiling`), so their memory is bounded by the tile, not the image.
"""

from __future__ import annotations

import functools
import math
import zlib

import constriction
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
from dqfast.codec.entropy import (
    END_MARK,
    IntegerTables,
    check_symbol_range,
    decode_rows,
    encode_rows,
    information_bits,
)

__all__ = ["SCALE_LEVELS", "DEFAULT_QUALITY", "encode_hyper", "decompress_hyper", "decode_hyper_symbols"]

# Scales (in symbol units) of the residual tables: 64 log-spaced levels from 0.11 to 256.
SCALE_LEVELS = np.exp(np.linspace(math.log(0.11), math.log(256.0), 64))
# Side-information tables cover all but this much of every channel's mass; rarer values are escaped.
TAIL_MASS = 1e-6
MAX_HALF_RANGE = 2047
# The middle of the ladder: about 0.4-0.6 bpp on photographs.
DEFAULT_QUALITY = 4.0
# Images above this many pixels run the transforms tile by tile (input tiles of TILE pixels).
TILED_ABOVE = 1536 * 1536
TILE = 512
_HALF = 1 << 16


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


@functools.cache
def _residual_tables() -> tuple[IntegerTables, ...]:
    """One zero-mean Gaussian table per scale level, over ±(5σ + 1) plus an escape."""
    tables = []
    for sigma in SCALE_LEVELS:
        r = min(int(math.ceil(5.0 * sigma)) + 1, MAX_HALF_RANGE)
        k = torch.arange(-r, r + 1, dtype=torch.float64)
        a = k.abs()
        pmf = _normal_cdf((0.5 - a) / sigma) - _normal_cdf((-0.5 - a) / sigma)
        escape = float(2 * _normal_cdf(torch.tensor(-(r + 0.5) / sigma, dtype=torch.float64)))
        tables.append(IntegerTables.from_pmf(pmf.numpy()[None], -r, escape_mass=escape))
    return tuple(tables)


def _residual_digest() -> int:
    crc = 0
    for t in _residual_tables():
        crc = zlib.crc32(t.digest().to_bytes(4, "little"), crc)
    return crc


def _quality(model: nn.Module, quality: float | None) -> float:
    q = DEFAULT_QUALITY if quality is None else quality
    if isinstance(q, bool) or not isinstance(q, int | float):
        raise TypeError(f"quality must be a number, got {type(quality).__name__}")
    q = float(q)
    if not math.isfinite(q) or not model.min_quality <= q <= model.levels:
        raise ValueError(f"quality must lie in [{model.min_quality:g}, {model.levels}] for this model, got {quality!r}")
    return q


def _hyper_gain64(model: nn.Module, q: float) -> torch.Tensor:
    """(N,) float64 side-information gains at quality q (the float64 twin of ``model.gains``)."""
    table = model.hyper_log_gains.detach().cpu().double()
    t = q - 1.0
    low = min(max(int(math.floor(t)), 0), max(model.levels - 2, 0))
    high = min(low + 1, model.levels - 1)
    frac = t - low
    return (table[low] * (1 - frac) + table[high] * frac).exp()


def _side_tables(model: nn.Module, q: float) -> tuple[IntegerTables, np.ndarray, int]:
    """Quantised per-channel tables of the side information at quality q, their float masses, lo."""
    prior = model.hyper_prior
    scales, weights = (t.detach().cpu() for t in prior._scales_and_weights(torch.float64))
    scales = scales * _hyper_gain64(model, q)[:, None]
    z = float(torch.special.ndtri(torch.tensor(1.0 - TAIL_MASS / 2, dtype=torch.float64)))
    bound = min(math.ceil(float(scales.max()) * z + 0.5), MAX_HALF_RANGE)
    k = torch.arange(-bound, bound + 1, dtype=torch.float64)
    mass = prior._interval_mass(k[None, :, None], scales[:, None, :])
    mass[:, 0] = _normal_cdf((-bound + 0.5) / scales)
    mass[:, -1] = _normal_cdf(-(bound - 0.5) / scales)
    pmf = (mass * weights[:, None, :]).sum(-1).numpy()
    return IntegerTables.from_pmf(pmf, -bound), pmf, -bound


def _levels(scales: torch.Tensor) -> np.ndarray:
    """Flat (M·h·w,) table index of every latent: the smallest level at or above its scale."""
    s = scales.detach().cpu().double().numpy().reshape(-1)
    return np.minimum(np.searchsorted(SCALE_LEVELS, s, side="left"), len(SCALE_LEVELS) - 1)


def _encode_grouped(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Code ``values`` (n,) with table ``levels[i]`` each, grouped by level (level order, raster order within)."""
    tables = _residual_tables()
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.array(END_MARK, dtype=np.int32), constriction.stream.model.Uniform(_HALF))
    escaped_all, pushes = [], []
    for level in np.unique(levels):
        table = tables[level]
        group = values[levels == level]
        outside = (group < table.lo) | (group > table.hi)
        escape = table.counts.shape[1] - 1
        symbols = np.where(outside, escape, group - table.lo).astype(np.int32)
        pushes.append((symbols, table))
        escaped_all.append(group[outside])
    escaped = np.concatenate(escaped_all).astype(np.int32).view(np.uint32) if escaped_all else np.zeros(0, np.uint32)
    if escaped.size:
        halves = np.stack([escaped & (_HALF - 1), escaped >> 16], axis=1).reshape(-1).astype(np.int32)
        coder.encode_reverse(halves, constriction.stream.model.Uniform(_HALF))
    for symbols, table in reversed(pushes):
        model = constriction.stream.model.Categorical(table.probabilities()[0], perfect=False)
        coder.encode_reverse(symbols, model)
    return coder.get_compressed()


def _decode_grouped(words: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_encode_grouped` given the same ``levels``: (n,) int64."""
    tables = _residual_tables()
    out = np.empty(levels.shape, dtype=np.int64)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        escapes = []
        for level in np.unique(levels):
            table = tables[level]
            where = levels == level
            model = constriction.stream.model.Categorical(table.probabilities()[0], perfect=False)
            symbols = coder.decode(model, int(where.sum())).astype(np.int64)
            escape = table.counts.shape[1] - 1
            values = symbols + table.lo
            escapes.append(np.flatnonzero(where)[symbols == escape])
            out[where] = values
        escaped_at = np.concatenate(escapes) if escapes else np.zeros(0, np.int64)
        if escaped_at.size:
            halves = coder.decode(constriction.stream.model.Uniform(_HALF), 2 * escaped_at.size).astype(np.uint32)
            # Escapes were pushed in level order, the order ``escapes`` lists them in.
            out[escaped_at] = (halves[0::2] | (halves[1::2] << 16)).astype(np.uint32).view(np.int32)
        guard = tuple(int(v) for v in coder.decode(constriction.stream.model.Uniform(_HALF), len(END_MARK)))
        leftover = not coder.is_empty()
    except (ValueError, KeyError) as e:
        raise CodecError(f"corrupted file: invalid entropy-coded stream ({e})") from None
    if guard != END_MARK:
        raise CodecError("corrupted file: the entropy-coded stream ends early or is damaged (no end mark)")
    if leftover:
        raise CodecError("corrupted file: the entropy-coded stream holds more data than the header announces")
    return out


def _residual_bits(values: np.ndarray, scales: torch.Tensor) -> float:
    """Ideal code length of the residuals under their (unrounded) Gaussian scales."""
    v = torch.from_numpy(values.astype(np.float64))
    s = scales.detach().cpu().double().reshape(-1)
    a = v.abs()
    mass = (_normal_cdf((0.5 - a) / s) - _normal_cdf((-0.5 - a) / s)).clamp_min(1e-300)
    return float(-torch.log2(mass).sum())


def _analysis(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The latents y of a (1, 3, H, W) image, tile by tile for large images."""
    if batch.shape[-2] * batch.shape[-1] <= TILED_ABOVE:
        return model.analysis(batch)
    from dqfast.codec.tiling import run_tiled

    x = (model._pad(batch) - model.pixel_mean) / model.pixel_std
    return run_tiled(lambda t: model.encoder(t).float(), x, tile=TILE, halo=32, scale=(1, 8))


def _synthesis(model: nn.Module, y_hat: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    h, w = output_size
    if h * w <= TILED_ABOVE:
        return model.synthesis(y_hat, output_size)
    from dqfast.codec.tiling import run_tiled

    out = run_tiled(lambda t: model.decoder(t), y_hat, tile=TILE // 8, halo=4, scale=(8, 1))
    out = out * model.pixel_std + model.pixel_mean
    return out[..., :h, :w].clamp(0.0, 1.0)


def encode_hyper(
    model: nn.Module,
    image: torch.Tensor,
    *,
    quality: float | None = None,
    name: str | None = None,
    source_channels: int = 3,
) -> Compressed:
    """Compress ``image`` (3, H, W) in [0, 1] at ``quality`` in [1, L] (default :data:`DEFAULT_QUALITY`)."""
    batch = check_image(image)
    q = _quality(model, quality)
    fingerprint = model_fingerprint(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        y = _analysis(model, batch.to(device))
        latent_gain, hyper_gain = model.gains(q, 1, device)
        z = model.hyper_analysis(y).float() * hyper_gain
        check_symbol_range(z, what="side information")
        z_symbols = torch.round(z)[0]
        mu, scales = model.side_parameters(z_symbols, q)
        residual = y[0] * latent_gain[0] - mu
        check_symbol_range(residual)
    z_np = z_symbols.cpu().numpy().astype(np.int64)
    n, hz, wz = z_np.shape
    values = torch.round(residual).cpu().numpy().astype(np.int64)
    m, h, w = values.shape
    z_tables, z_pmf, z_lo = _side_tables(model, q)
    z_words = encode_rows(z_np.reshape(n, hz * wz), z_tables)
    levels = _levels(scales)
    y_words = _encode_grouped(values.reshape(-1), levels)
    header = Header(
        kind="cae",
        model_name=name if name is not None else type(model).__name__,
        weights_hash=fingerprint,
        tables_hash=zlib.crc32(_residual_digest().to_bytes(4, "little"), z_tables.digest()),
        image_size=tuple(image.shape[1:]),
        channels=check_source_channels(source_channels),
        padded_size=(8 * h, 8 * w),
        latent_shape=(m, h, w),
        setting=q,
        params=(z_lo, z_tables.hi, n),
    )
    bits = information_bits(z_np.reshape(n, hz * wz), z_pmf, z_lo) + _residual_bits(values.reshape(-1), scales)
    return Compressed(pack(header, [z_words, y_words]), header, bits)


def _check_layout(header: Header, model: nn.Module) -> tuple[int, int, int, int, int, int]:
    H, W = header.image_size
    h, w = model.latent_size(H, W)
    expected = (model.latent_channels, h, w, model.hyper_channels, h // 4, w // 4)
    if tuple(header.latent_shape) != expected[:3] or len(header.params) != 3 or header.params[2] != expected[3]:
        raise CodecError(f"corrupted file: latent shape {header.latent_shape} does not fit a {W}x{H} image")
    if tuple(header.padded_size) != (8 * h, 8 * w):
        raise CodecError(f"corrupted file: padded size {header.padded_size} does not fit a {W}x{H} image")
    return expected


def decode_hyper_symbols(
    header: Header, streams: list[np.ndarray], model: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(z symbols (N, hz, wz), residuals (M, h, w), quality) of a parsed file, for a checked model."""
    m, h, w, n, hz, wz = _check_layout(header, model)
    q = header.setting
    if not (math.isfinite(q) and model.min_quality <= q <= model.levels):
        raise CodecError(
            f"corrupted file: quality {q} is outside this model's ladder [{model.min_quality:g}, {model.levels}]"
        )
    if len(streams) != 2:
        raise CodecError("corrupted file: a variable-rate CAE file has two streams")
    z_tables, _, z_lo = _side_tables(model, q)
    if tuple(header.params[:2]) != (z_lo, z_tables.hi) or header.tables_hash != zlib.crc32(
        _residual_digest().to_bytes(4, "little"), z_tables.digest()
    ):
        raise CodecError(
            "probability tables differ from the encoder's: this machine computes the model's tables differently"
        )
    z_np = decode_rows(streams[0], z_tables, hz * wz).reshape(n, hz, wz)
    device = next(model.parameters()).device
    z_symbols = torch.from_numpy(z_np).to(device)
    with torch.no_grad():
        _, scales = model.side_parameters(z_symbols, q)
    values = _decode_grouped(streams[1], _levels(scales)).reshape(m, h, w)
    return z_symbols, torch.from_numpy(values).to(device), q


def decompress_hyper(data: bytes, model: nn.Module, *, name: str | None = None) -> torch.Tensor:
    """Bytes of a variable-rate CAE file -> the image (3, H, W) float32 in [0, 1] on the model's device."""
    header, streams = unpack(data)
    if header.kind != "cae":
        raise CodecError(f"this is a {header.kind} file, not a CAE file")
    check_model(header, name if name is not None else type(model).__name__, model_fingerprint(model))
    z_symbols, values, q = decode_hyper_symbols(header, streams, model)
    with torch.no_grad():
        latent_gain, _ = model.gains(q, 1, z_symbols.device)
        mu, _ = model.side_parameters(z_symbols, q)
        y_hat = (values.float() + mu)[None] / latent_gain
        return _synthesis(model, y_hat, header.image_size)[0]
