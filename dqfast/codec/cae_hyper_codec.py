"""Real bitstreams for the variable-rate CAE (:class:`dqfast.models.cae_hyper.HyperpriorCAE`).

A file holds two streams:

1. the side information ``z`` (N channels at 1/32 resolution), coded channel by channel with
   static tables: the hyperprior (a Gaussian scale mixture per channel) at the file's quality,
   integrated over unit bins in float64 and quantised to integers (:class:`IntegerTables`);
2. the latent residuals ``round((y - mu) · g)`` (M channels at 1/8 resolution). The decoder
   recomputes every latent's mean and scale from the decoded ``z``; each scale is rounded up to
   one of :data:`SCALE_LEVELS` (64 log-spaced levels, CompressAI's table), and all residuals of
   one level are coded with that level's zero-mean Gaussian table, in level order. Within a level
   the order is band by band (bands of :data:`BAND_ROWS` latent rows, top to bottom), and channel,
   row, column within a band; an image of at most :data:`TILED_ABOVE` pixels is one band (plain
   raster order). The tables are a pure function of the levels: the same integers on every machine.

The encoder and the decoder compute the means and scales with the same function on the same
decoded symbols and the same tiles, so the decoder's table choice is the encoder's (bit-exact on
one machine; a machine whose float convolutions round differently can pick another level for a
scale lying on a level boundary, which the tables' CRC in the header cannot see — as with every
learned codec that predicts its probabilities with a network).

Rate control: ``quality`` in [0.1, L] picks (interpolates, below 1 extrapolates) the model's ladder of gains; it is
stored in the header.

Memory and time: an image of at most :data:`TILED_ABOVE` pixels runs every transform on the whole
image at once. A larger one streams through bands of :data:`BAND_ROWS` latent rows (``8 ·
BAND_ROWS`` image rows), each transform run by column tiles with a halo covering its receptive
field (:mod:`dqfast.codec.tiling`), so the result equals a whole-image pass up to float rounding
and has no seams:

- encoder: the image is read a band at a time (a Pillow image is never converted whole; the
  command line streams a PNG from the file, :mod:`dqfast.codec.png_rows`), the analysis, the
  hyper-analysis and the hyper-synthesis (means and scales, by tiles of the side information
  fixed by the image size: the decoder uses the very same tiles) run one band ahead of each
  other, and what stays for the whole image is the side information and the table symbols of the
  residuals, deflated band by band and level by level (1-2 bytes per latent before deflating);
- decoder: the stream holds level 0 of every band first, so every symbol is decoded before the
  first band is rebuilt. A first pass counts every band's latents of each level (the levels are
  not kept); the symbols are decoded band by band within each level and kept deflated; then the
  means and scales are recomputed band by band, the band's levels give each symbol its place, and
  the synthesis yields the image a band at a time (:func:`decode_hyper_bands`; ``python -m dqfast
  decompress`` streams them into the PNG).

Time grows linearly with the pixels. What stays in memory for the whole image is the side
information and the deflated symbols (0.06, 0.2, 0.45 bytes per pixel at 0.3, 1, 2.5 bpp); the
rest is per-band buffers, whose free memory goes back to the system after every band
(:func:`_malloc_trim`). A 12000 x 12000 photo-like PNG at 1 bpp, through ``python -m dqfast``
on one thread: ``compress`` peaks at 0.92 GB resident, ``decompress`` at 1.03 GB.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator

import constriction
import numpy as np
import torch
import torch.nn.functional as F
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
    TOTAL,
    IntegerTables,
    check_symbol_range,
    decode_rows,
    encode_rows,
    information_bits,
    pop_escapes,
    push_end_mark,
    push_escapes,
    read_end_mark,
)
from dqfast.codec.tiling import run_tiled
from dqfast.models.cae import _normal_cdf
from dqfast.models.cae_hyper import BELOW_ONE_STEPS

__all__ = [
    "SCALE_LEVELS",
    "DEFAULT_QUALITY",
    "encode_hyper",
    "decompress_hyper",
    "decode_hyper_bands",
    "decode_hyper_symbols",
]

# Scales (in symbol units) of the residual tables: 64 log-spaced levels from 0.11 to 256.
SCALE_LEVELS = np.exp(np.linspace(math.log(0.11), math.log(256.0), 64))
# Side-information tables cover all but this much of every channel's mass; rarer values are escaped.
TAIL_MASS = 1e-6
MAX_HALF_RANGE = 2047
# The middle of the ladder: about 0.4-0.6 bpp on photographs.
DEFAULT_QUALITY = 4.0
# Images above this many pixels stream through bands of BAND_ROWS latent rows (a multiple of 4).
TILED_ABOVE = 1536 * 1536
BAND_ROWS = 64
# Column tiles of the banded transforms: analysis (image pixels), hyper-analysis (latents),
# hyper-synthesis (side-information pixels), synthesis (latents).
TILE = 1024
HYPER_TILE = 256
SIDE_TILE = 64
SYNTH_TILE = 128
# Rows per image band handed out by decode_hyper_bands.
OUT_ROWS = 128
# The float64 rate estimate runs on chunks of this many latents.
_CHUNK = 1 << 20


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
    if t < 0:
        t *= BELOW_ONE_STEPS
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


def _level_bounds() -> torch.Tensor:
    """float32 thresholds t_i, the largest float32 <= SCALE_LEVELS[i]: for a float32 scale s,
    ``s <= SCALE_LEVELS[i]`` exactly when ``s <= t_i``, so bucketing in float32 picks the level
    that a float64 search would."""
    t = SCALE_LEVELS.astype(np.float32)
    t = np.where(t.astype(np.float64) > SCALE_LEVELS, np.nextafter(t, np.float32(-np.inf)), t)
    return torch.from_numpy(t.astype(np.float32))


_BOUNDS = _level_bounds()


def _levels(scales: torch.Tensor) -> np.ndarray:
    """uint8 table index of every scale (same shape): the smallest level at or above it."""
    s = scales.detach().float().contiguous()
    idx = torch.bucketize(s, _BOUNDS.to(s.device), out_int32=True).clamp_max_(len(SCALE_LEVELS) - 1)
    return idx.to(torch.uint8).cpu().numpy()


@functools.cache
def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere): hands the heap's free pages back to the system.

    Called once per band of a banded image. Band buffers below glibc's (self-raising) mmap threshold
    are carved from the heap, and the long-lived kept symbols between them stop the heap from
    shrinking: without it the peak RSS of ``compress`` grew by 7.5 bytes per pixel (640 x 16384
    against 640 x 4096), of freed memory."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


def _radius(net: nn.Module) -> float:
    """Receptive-field radius of a chain of (sub-pixel) convolutions, in pixels of its input grid."""
    from dqfast.nn import SubPixelConv2d

    radius, step = 0.0, 1.0  # step: one pixel of the current grid, in input pixels
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            radius += (m.kernel_size[0] // 2) * m.dilation[0] * step
            step *= m.stride[0]
        elif isinstance(m, SubPixelConv2d):
            radius += (m.kernel_size // 2) * step
            step /= m.upscale
    return radius


def _halo(net: nn.Module, align: int) -> int:
    """The receptive-field radius rounded up to a multiple of ``align`` (at least ``align``)."""
    return max(align, align * math.ceil(_radius(net) / align))


class _Plan:
    """How an image of H x W pixels is cut: latent bands and the halos of each transform.

    A pure function of the image size and the model's architecture, so encoder and decoder
    compute the means and scales on the same tiles."""

    def __init__(self, model: nn.Module, H: int, W: int):
        self.H, self.W = H, W
        self.h, self.w = model.latent_size(H, W)
        self.hz, self.wz = self.h // 4, self.w // 4
        self.m, self.n = model.latent_channels, model.hyper_channels
        self.tiled = H * W > TILED_ABOVE
        band = BAND_ROWS if self.tiled else self.h
        self.bands = [(a, min(a + band, self.h)) for a in range(0, self.h, band)]
        self.zband = band // 4
        self.enc_halo = _halo(model.encoder, 8)
        self.hyper_halo = _halo(model.hyper_analysis, 4)
        self.side_halo = _halo(model.hyper_synthesis, 1)
        self.dec_halo = _halo(model.decoder, 1)

    def cols(self, tile: int, length: int) -> int:
        """Column tile: ``tile`` for a banded image, the whole width otherwise."""
        return tile if self.tiled else length


class _Rows:
    """Rows of (C, rows, w) tensors produced band by band, top to bottom: ``get`` any row range
    (pulling bands as needed), ``forget`` the rows above a line."""

    def __init__(self, bands: Iterator[tuple[int, torch.Tensor]]):
        self._bands = bands
        self._held: list[tuple[int, torch.Tensor]] = []
        self.end = 0

    def get(self, a: int, b: int) -> torch.Tensor:
        while self.end < b:
            start, t = next(self._bands)
            self._held.append((start, t))
            self.end = start + t.shape[1]
        parts = [
            t[:, max(a, s) - s : min(b, s + t.shape[1]) - s] for s, t in self._held if s < b and s + t.shape[1] > a
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def forget(self, below: int) -> None:
        self._held = [(s, t) for s, t in self._held if s + t.shape[1] > below]


def _side_band(model: nn.Module, z: torch.Tensor, q: float, plan: _Plan, a: int, b: int):
    """(mu, scales), each (M, b - a, w): the gained means and scales of latent rows [a, b) from the
    side information z (N, hz, wz) float32, by tiles of z (SIDE_TILE columns, the band's rows)
    with a halo. Encoder and decoder call this with the same arguments."""
    za, zb = a // 4, b // 4
    s0, s1 = max(0, za - plan.side_halo), min(plan.hz, zb + plan.side_halo)

    def side(t: torch.Tensor) -> torch.Tensor:
        return torch.cat(model.side_parameters(t, q))

    out = run_tiled(
        side,
        z[:, s0:s1],
        tile=(s1 - s0, plan.cols(SIDE_TILE, plan.wz)),
        halo=(0, plan.side_halo),
        scale=(4, 1),
    )
    out = out[:, 4 * (za - s0) : 4 * (zb - s0)]
    return out[: plan.m], out[plan.m :]


# ----------------------------------------------------------------------------------------------
# Residuals grouped by table level
# ----------------------------------------------------------------------------------------------


def _symbol_dtype(table: IntegerTables) -> type:
    """The narrowest unsigned type holding ``table``'s symbols (its escape included)."""
    return np.uint8 if table.counts.shape[1] <= 256 else np.uint16


def _pack(symbols: np.ndarray) -> bytes:
    # Kept symbols are deflated: most lie at a table's centre, so a band's symbols shrink several
    # times (216 MB of uint8 symbols held for a 12000 x 12000 image were most of the growth).
    return zlib.compress(symbols.tobytes(), 1)


def _unpack(packed: bytes, dtype: type) -> np.ndarray:
    return np.frombuffer(zlib.decompress(packed), dtype=dtype)


class _Groups:
    """The encoder's residuals as table symbols, grouped by level, band by band (deflated)."""

    def __init__(self):
        self.symbols: dict[int, list[bytes]] = {}
        self.escaped: dict[int, list[np.ndarray]] = {}

    def add(self, values: np.ndarray, levels: np.ndarray) -> None:
        """One band: values (n,) int32 residuals in coding order, levels (n,) uint8 their table levels."""
        tables = _residual_tables()
        counts = np.bincount(levels, minlength=len(SCALE_LEVELS))
        order = np.argsort(levels, kind="stable")  # a radix sort for uint8: raster order within a level
        grouped = values[order]
        del order
        start = 0
        for level in np.flatnonzero(counts):
            group = grouped[start : start + counts[level]]
            start += counts[level]
            table = tables[level]
            escape = table.counts.shape[1] - 1
            outside = (group < table.lo) | (group > table.hi)
            symbols = np.where(outside, escape, group - table.lo).astype(_symbol_dtype(table))
            self.symbols.setdefault(int(level), []).append(_pack(symbols))
            if outside.any():
                self.escaped.setdefault(int(level), []).append(group[outside])

    def encode(self) -> np.ndarray:
        """The stream: symbols of level 0, 1, ... (bands in order within a level), escapes, end mark."""
        tables = _residual_tables()
        coder = constriction.stream.stack.AnsCoder()
        # ANS is a stack: push what the decoder reads last first.
        push_end_mark(coder)
        parts = [e for level in sorted(self.escaped) for e in self.escaped[level]]
        if parts:
            push_escapes(coder, np.concatenate(parts))
        for level in sorted(self.symbols, reverse=True):
            table = tables[level]
            model = constriction.stream.model.Categorical(table.probabilities()[0], perfect=False)
            packed = self.symbols.pop(level)
            while packed:
                coder.encode_reverse(_unpack(packed.pop(), _symbol_dtype(table)).astype(np.int32), model)
        return coder.get_compressed()


class _Symbols:
    """The decoder's residual symbols, kept per band and level (deflated) until the band is rebuilt.

    The stream holds level 0 of every band, then level 1, ...: every symbol is decoded before the
    first band can be rebuilt, but placing them needs only how many of each level every band has.
    :meth:`values` rebuilds a band from its levels, computed again from the side information."""

    def __init__(self, counts: list[np.ndarray]):
        self.counts = counts
        self.packed: list[dict[int, bytes]] = [{} for _ in counts]
        self.escaped: list[dict[int, np.ndarray]] = [{} for _ in counts]

    def values(self, k: int, levels: np.ndarray) -> np.ndarray:
        """Band k's residuals (the shape of its levels, uint8) as int32; releases the band's symbols."""
        tables = _residual_tables()
        flat = levels.reshape(-1)
        counts = np.bincount(flat, minlength=len(SCALE_LEVELS))
        if not np.array_equal(counts, self.counts[k]):
            raise CodecError(
                "the table levels of a band changed between two computations: this machine's float "
                "convolutions are not deterministic"
            )
        grouped = np.empty(flat.size, np.int32)
        start = 0
        for level in np.flatnonzero(counts):
            table = tables[level]
            symbols = _unpack(self.packed[k].pop(int(level)), _symbol_dtype(table))
            group = grouped[start : start + symbols.size]
            group[:] = symbols
            group += table.lo
            escaped = self.escaped[k].pop(int(level), None)
            if escaped is not None:
                group[symbols == table.counts.shape[1] - 1] = escaped
            start += symbols.size
        values = np.empty(flat.size, np.int32)
        values[np.argsort(flat, kind="stable")] = grouped
        return values.reshape(levels.shape)


def _decode_levels(words: np.ndarray, counts: list[np.ndarray]) -> _Symbols:
    """Inverse of :meth:`_Groups.encode` given how many residuals of each level every band has
    (``counts[k]``: the bincount of band k's levels)."""
    tables = _residual_tables()
    total = np.sum(counts, axis=0) if counts else np.zeros(len(SCALE_LEVELS), np.int64)
    need = sum(float(n) * -math.log2(tables[i].counts.max() / TOTAL) for i, n in enumerate(total) if n)
    if 32 * np.size(words) + 64 < 0.9 * need:
        raise CodecError(
            f"corrupted file: a stream of {4 * np.size(words)} bytes cannot hold {int(total.sum())} residuals "
            f"(they need at least {need / 8:.0f} bytes)"
        )
    out = _Symbols(counts)
    escapes: list[tuple[int, int, int]] = []  # (band, level, how many), in the stream's order
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        for level in np.flatnonzero(total):
            table = tables[level]
            escape = table.counts.shape[1] - 1
            model = constriction.stream.model.Categorical(table.probabilities()[0], perfect=False)
            for k, band_counts in enumerate(counts):
                if not band_counts[level]:
                    continue
                symbols = coder.decode(model, int(band_counts[level]))
                out.packed[k][int(level)] = _pack(symbols.astype(_symbol_dtype(table)))
                hit = int(np.count_nonzero(symbols == escape))
                if hit:
                    escapes.append((k, int(level), hit))
        n_escaped = sum(n for _, _, n in escapes)
        if n_escaped:
            values = pop_escapes(coder, n_escaped)
            start = 0
            for k, level, n in escapes:
                out.escaped[k][level] = values[start : start + n].copy()
                start += n
        problem = read_end_mark(coder)
    except (ValueError, KeyError) as e:
        raise CodecError(f"corrupted file: invalid entropy-coded stream ({e})") from None
    if problem:
        raise CodecError(problem)
    return out


def _encode_grouped(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Code ``values`` (n,) int32-range integers with table ``levels[i]`` each (one band)."""
    groups = _Groups()
    groups.add(np.asarray(values).astype(np.int32), np.asarray(levels).astype(np.uint8))
    return groups.encode()


def _decode_grouped(words: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_encode_grouped` given the same ``levels``: (n,) int64."""
    levels = np.asarray(levels).astype(np.uint8)
    symbols = _decode_levels(words, [np.bincount(levels, minlength=len(SCALE_LEVELS))])
    return symbols.values(0, levels).astype(np.int64)


def _residual_bits(values: np.ndarray, scales: torch.Tensor) -> float:
    """Ideal code length of the residuals (n,) under their (unrounded) Gaussian scales (any shape, n)."""
    s_all = scales.detach().reshape(-1)
    bits = 0.0
    for i in range(0, values.size, _CHUNK):
        v = torch.from_numpy(values[i : i + _CHUNK].astype(np.float64))
        s = s_all[i : i + _CHUNK].cpu().double()
        a = v.abs()
        mass = (_normal_cdf((0.5 - a) / s) - _normal_cdf((-0.5 - a) / s)).clamp_min(1e-300)
        bits += float(-torch.log2(mass).sum())
    return bits


def _check_range(x: torch.Tensor, what: str = "latents") -> None:
    """:func:`check_symbol_range` on the extremes only (NaN and infinities propagate to them)."""
    if x.numel():
        check_symbol_range(torch.stack([x.min(), x.max()]), what=what)


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


def _pixel_rows(image, source_channels: int) -> tuple[int, int, Callable[[int, int], torch.Tensor]]:
    """(H, W, rows): ``rows(y0, y1)`` -> (3, y1 - y0, W) float32 in [0, 1] of a (3, H, W) float
    tensor in [0, 1], a Pillow image or a :class:`~dqfast.codec.png_rows.PngRows` (converted a band
    at a time, as the command line reads it: a grayscale source replicated to RGB)."""
    from PIL import Image

    from dqfast.codec.png_rows import PngRows

    if isinstance(image, Image.Image | PngRows):
        W, H = image.size
        if H < 1 or W < 1 or max(H, W) > 0xFFFF:
            raise ValueError(f"image sides must lie in 1..65535 pixels, got {W}x{H}")

        def pil_rows(y0: int, y1: int) -> torch.Tensor:
            band = image.crop((0, y0, W, y1))
            array = np.asarray(band.convert("L" if source_channels == 1 else "RGB"))
            if array.ndim == 2:
                array = np.repeat(array[..., None], 3, axis=2)
            return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

        return H, W, pil_rows
    batch = check_image(image)
    return image.shape[1], image.shape[2], lambda y0, y1: batch[0, :, y0:y1]


def _padded_rows(rows: Callable, plan: _Plan, r0: int, r1: int) -> torch.Tensor:
    """(1, 3, r1 - r0, 8w) rows of the image padded (edge replication) to the latent grid."""
    H, W = plan.H, plan.W
    if r0 >= H:
        x = rows(H - 1, H)[None].expand(-1, -1, r1 - r0, -1)
    else:
        x = rows(r0, min(r1, H))[None]
    pad_rows = r1 - r0 - x.shape[2]
    pad_cols = 8 * plan.w - W
    if pad_rows or pad_cols:
        x = F.pad(x, (0, pad_cols, 0, pad_rows), mode="replicate")
    return x


def _latent_bands(model: nn.Module, plan: _Plan, rows: Callable, device) -> Iterator[tuple[int, torch.Tensor]]:
    """(a, y) per band: the latents y (M, b - a, w) float32 of latent rows [a, b)."""
    halo = plan.enc_halo
    for a, b in plan.bands:
        r0, r1 = max(0, 8 * a - halo), min(8 * plan.h, 8 * b + halo)
        x = _padded_rows(rows, plan, r0, r1).to(device)
        x = x - model.pixel_mean  # a new tensor (the rows may be an expanded view): normalised in place
        x.div_(model.pixel_std)
        y = run_tiled(
            lambda t: model.encoder(t).float(),
            x,
            tile=(r1 - r0, plan.cols(TILE, 8 * plan.w)),
            halo=(0, halo),
            scale=(1, 8),
        )
        del x
        yield a, y[0, :, a - r0 // 8 : b - r0 // 8]


def encode_hyper(
    model: nn.Module,
    image,
    *,
    quality: float | None = None,
    name: str | None = None,
    source_channels: int = 3,
) -> Compressed:
    """Compress ``image`` at ``quality`` in [min_quality, L] (default :data:`DEFAULT_QUALITY`).

    ``image``: a (3, H, W) floating-point tensor in [0, 1], a Pillow image or a
    :class:`~dqfast.codec.png_rows.PngRows` (read a band at a time; ``source_channels`` 1 converts
    it as grayscale).
    """
    channels = check_source_channels(source_channels)
    H, W, rows = _pixel_rows(image, channels)
    q = _quality(model, quality)
    fingerprint = model_fingerprint(model)
    device = next(model.parameters()).device
    plan = _Plan(model, H, W)
    m, h, w, n, hz, wz = plan.m, plan.h, plan.w, plan.n, plan.hz, plan.wz
    groups = _Groups()
    bits = 0.0
    with torch.no_grad():
        latent_gain, hyper_gain = model.gains(q, 1, device)
        latents = _Rows(_latent_bands(model, plan, rows, device))
        z = torch.zeros((n, hz, wz), dtype=torch.float32, device=device)
        z_done = 0
        for a, b in plan.bands:
            # The side information one band ahead: the means and scales of rows [a, b) read z
            # up to side_halo rows below, which read the latents up to hyper_halo rows below.
            while z_done < min(hz, b // 4 + plan.side_halo):
                za, zb = z_done, min(hz, z_done + plan.zband)
                ya, yb = max(0, 4 * za - plan.hyper_halo), min(h, 4 * zb + plan.hyper_halo)
                side = run_tiled(
                    lambda t: model.hyper_analysis(t).float(),
                    latents.get(ya, yb)[None],
                    tile=(yb - ya, plan.cols(HYPER_TILE, w)),
                    halo=(0, plan.hyper_halo),
                    scale=(1, 4),
                )
                side = side[0, :, za - ya // 4 : zb - ya // 4] * hyper_gain[0]
                _check_range(side, "side information")
                z[:, za:zb] = torch.round(side)
                z_done = zb
            mu, scales = _side_band(model, z, q, plan, a, b)
            residual = latents.get(a, b) * latent_gain[0]
            residual.sub_(mu)  # in place, here and below: the same float operations, one buffer
            _check_range(residual)
            values = residual.round_().to(torch.int32).cpu().numpy().reshape(-1)
            del residual, mu
            latents.forget(min(b, 4 * z_done - plan.hyper_halo))
            bits += _residual_bits(values, scales)
            levels = _levels(scales).reshape(-1)
            del scales  # and the means' buffer with them, before the grouping's transients
            groups.add(values, levels)
            del values, levels
            if plan.tiled:
                _malloc_trim()()
        del latents
    z_np = z.cpu().numpy().astype(np.int64).reshape(n, hz * wz)
    z_tables, z_pmf, z_lo = _side_tables(model, q)
    z_words = encode_rows(z_np, z_tables)
    y_words = groups.encode()
    header = Header(
        kind="cae",
        model_name=name if name is not None else type(model).__name__,
        weights_hash=fingerprint,
        tables_hash=zlib.crc32(_residual_digest().to_bytes(4, "little"), z_tables.digest()),
        image_size=(H, W),
        channels=channels,
        padded_size=(8 * h, 8 * w),
        latent_shape=(m, h, w),
        setting=q,
        params=(z_lo, z_tables.hi, n),
    )
    bits += information_bits(z_np, z_pmf, z_lo)
    return Compressed(pack(header, [z_words, y_words]), header, bits)


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------


def _check_layout(header: Header, model: nn.Module) -> tuple[int, int, int, int, int, int]:
    H, W = header.image_size
    h, w = model.latent_size(H, W)
    expected = (model.latent_channels, h, w, model.hyper_channels, h // 4, w // 4)
    if tuple(header.latent_shape) != expected[:3] or len(header.params) != 3 or header.params[2] != expected[3]:
        raise CodecError(f"corrupted file: latent shape {header.latent_shape} does not fit a {W}x{H} image")
    if tuple(header.padded_size) != (8 * h, 8 * w):
        raise CodecError(f"corrupted file: padded size {header.padded_size} does not fit a {W}x{H} image")
    return expected


class _Decoded:
    """A parsed file's symbols: side information z (N, hz, wz) float32 and the residual symbols."""

    def __init__(self, plan: _Plan, q: float, z: torch.Tensor, symbols: _Symbols):
        self.plan, self.q, self.z, self.symbols = plan, q, z, symbols


def _band_counts(model: nn.Module, z: torch.Tensor, q: float, plan: _Plan) -> list[np.ndarray]:
    """How many latents of each table level every band has (the decoder's first pass)."""
    counts = []
    with torch.no_grad():
        for a, b in plan.bands:
            _, scales = _side_band(model, z, q, plan, a, b)
            counts.append(np.bincount(_levels(scales).reshape(-1), minlength=len(SCALE_LEVELS)))
            del scales
            if plan.tiled:
                _malloc_trim()()
    return counts


def _decode_symbols(header: Header, streams: list[np.ndarray], model: nn.Module) -> _Decoded:
    _, h, w, n, hz, wz = _check_layout(header, model)
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
    device = next(model.parameters()).device
    z = torch.from_numpy(decode_rows(streams[0], z_tables, hz * wz).reshape(n, hz, wz)).to(device).float()
    plan = _Plan(model, *header.image_size)
    symbols = _decode_levels(streams[1], _band_counts(model, z, q, plan))
    return _Decoded(plan, q, z, symbols)


def _band_latents(model: nn.Module, d: _Decoded, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, values) of band k, each (M, rows, w): the gained means (float32) and the residuals
    (int32); releases the band's symbols."""
    a, b = d.plan.bands[k]
    mu, scales = _side_band(model, d.z, d.q, d.plan, a, b)
    levels = _levels(scales)
    del scales
    return mu, torch.from_numpy(d.symbols.values(k, levels)).to(mu.device)


def decode_hyper_symbols(
    header: Header, streams: list[np.ndarray], model: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(z symbols (N, hz, wz) int64, residuals (M, h, w) int64, quality) of a parsed file, for a checked model."""
    d = _decode_symbols(header, streams, model)
    with torch.no_grad():
        values = torch.cat([_band_latents(model, d, k)[1] for k in range(len(d.plan.bands))], dim=1)
    return d.z.long(), values.long(), d.q


def _image_bands(model: nn.Module, d: _Decoded) -> Iterator[tuple[int, torch.Tensor]]:
    """(y0, band) for every band of latent rows: (3, rows, W) in [0, 1] on the model's device.
    Releases each band's residuals once used."""
    plan, halo = d.plan, d.plan.dec_halo
    device = d.z.device
    latent_gain, _ = model.gains(d.q, 1, device)

    def latents() -> Iterator[tuple[int, torch.Tensor]]:
        for k, (a, _) in enumerate(plan.bands):
            mu, values = _band_latents(model, d, k)
            y = values.float()
            del values
            y.add_(mu).div_(latent_gain[0])
            del mu  # a view of the band's means and scales: dropped before the next band's
            yield a, y

    with torch.no_grad():
        y_hat = _Rows(latents())
        for a, b in plan.bands:
            s0, s1 = max(0, a - halo), min(plan.h, b + halo)
            out = run_tiled(
                model.decoder,
                y_hat.get(s0, s1)[None],
                tile=(s1 - s0, plan.cols(SYNTH_TILE, plan.w)),
                halo=(0, halo),
                scale=(8, 1),
            )
            y_hat.forget(b - halo)
            out = out[0, :, 8 * (a - s0) : 8 * (min(b, plan.h) - s0)]
            out = out[:, : max(0, min(8 * b, plan.H) - 8 * a), : plan.W]
            # In place on the synthesis output: a band of a 12000-pixel-wide image is 74 MB a copy.
            yield 8 * a, out.mul_(model.pixel_std[0]).add_(model.pixel_mean[0]).clamp_(0.0, 1.0)
            del out  # before the next band's synthesis allocates its output
            if plan.tiled:
                _malloc_trim()()


def _parse(data: bytes, model: nn.Module, name: str | None) -> tuple[Header, _Decoded]:
    header, streams = unpack(data)
    if header.kind != "cae":
        raise CodecError(f"this is a {header.kind} file, not a CAE file")
    check_model(header, name if name is not None else type(model).__name__, model_fingerprint(model))
    return header, _decode_symbols(header, streams, model)


def decode_hyper_bands(
    data: bytes, model: nn.Module, *, name: str | None = None
) -> tuple[Header, Iterator[tuple[int, torch.Tensor]]]:
    """Parse and check a variable-rate CAE file, then decode it band by band.

    Returns (header, bands): ``bands`` yields ``(y0, band)`` top to bottom, ``band`` a (3, rows, W)
    float32 CPU tensor in [0, 1] of image rows ``y0 .. y0 + rows`` (at most :data:`OUT_ROWS`
    rows). The whole file is decoded into symbols before this returns (a damaged file fails
    here); the synthesis runs lazily, so memory stays at a few bands whatever the image size.
    """
    header, d = _parse(data, model, name)

    def generate() -> Iterator[tuple[int, torch.Tensor]]:
        # Rows handed out are copies and the band is dropped before the next one is synthesised:
        # a consumer holding the last rows does not keep the whole band's buffer alive.
        bands = _image_bands(model, d)
        while (item := next(bands, None)) is not None:
            y0, band = item
            del item
            for i in range(0, band.shape[1], OUT_ROWS):
                yield y0 + i, band[:, i : i + OUT_ROWS].to("cpu", copy=True)
            del band

    return header, generate()


def decompress_hyper(data: bytes, model: nn.Module, *, name: str | None = None) -> torch.Tensor:
    """Bytes of a variable-rate CAE file -> the image (3, H, W) float32 in [0, 1] on the model's device."""
    header, d = _parse(data, model, name)
    H, W = header.image_size
    if len(d.plan.bands) == 1:
        return next(_image_bands(model, d))[1].contiguous()  # a view of the padded synthesis output
    image = torch.empty((3, H, W), dtype=torch.float32, device=d.z.device)
    for y0, band in _image_bands(model, d):
        image[:, y0 : y0 + band.shape[1]] = band
    return image
