"""Real bitstreams for the DQ-VAE (:class:`dqfast.models.dqvae.DQVAE`): grain map + variable-length codes.

A DQ-VAE codes R x R images (its decoder's position embedding is built for one latent grid), so an
image of any size is padded at the bottom/right by edge replication to whole R x R tiles, each tile
is tokenized on its own (with ``budget``, every tile has exactly round(budget * regions) fine
regions) and the decoder crops back. Two streams:

1. the grain of every coarse region of every tile, in tile then raster order, coded with a static
   table of this image's own grain frequencies (the per-grain region counts are in the header, so
   the table costs a few bytes and the map costs about log2(binomial(N, k)) bits);
2. the codes in coarse-to-fine order (:func:`dqfast.c2f_flatten`: all coarse codes of all tiles,
   then the finer ones), coded with a static prior over the codebook: the model's
   ``code_frequencies`` (a (K,) buffer of code usage counts) when it has one, else uniform.

The decoder reads the grain map first, which fixes where every code goes, then the codes.

Seams: the decoder network sees one R x R window of codes at a time (zero padding at its edges,
GroupNorm statistics of the window), so tiles decoded independently show their borders. The
decoder therefore also decodes the windows of the code map shifted by half a tile (right, down,
and both: the codes of four neighbouring tiles, in which the old border runs through the middle;
R/2 is a multiple of a coarse region, so regions stay whole), each with the position embedding
its cells have in their own tiles, and blends: the weight of the shifted decode rises linearly
from 0 at a tile's centre to 1 on its border (``BLEND_FRACTION`` = 1/2), so every pixel is a mix
of the two decodes that favours the one in which it lies further from a window edge, and no
window's edge shows. The shipped ``dqvae-small`` was trained for this: its decoder learned on
windows of independently coded tiles at random offsets (:meth:`DQVAE.training_step`), so the
shifted decodes are as faithful as the aligned ones and the blend costs nothing. About four
decoder runs per tile; ``blend=False`` decodes each tile once.

Memory and time grow with the image, in bounded pieces: the encoder reads one row of tiles at a
time (from a tensor, or from a Pillow image without converting it whole), the decoder produces one
band of R rows at a time (:func:`decode_dq_bands`), and the command line streams those bands into
the PNG it writes.

With ``prior`` (a :class:`~dqfast.models.dqtransformer.DQTransformer` over the same codebook and
grids, e.g. ``dqtransformer-small`` for ``dqvae-small``), stream 2 holds the codes in the order the
transformer produces them, each coded under the distribution it predicts from the codes before it
and the grain map (:meth:`DQTransformer.assign_codes`, in batches of ``PRIOR_BATCH`` tiles, the
batch recorded in the file) with a range coder. Its float probabilities become integer tables by
:func:`quantize_pmf` (2**16 counts, every code >= 1), so the decoder rebuilds the encoder's tables
exactly when its network computes the same logits: the same model, batches and arithmetic on one
machine (a small model on the CPU runs on one thread, whatever the thread setting). The file names
both models
(``"dqvae-small+dqtransformer-small"``), its weights hash covers both, and its tables hash is the
CRC32 of the codes: a decoder whose logits differ (another machine, another math library) decodes
other codes, and the file is refused instead of decoded wrong. One network step per code at both
ends: the decoder runs the transformer's cached sampling loop.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterator, Sequence

import constriction
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import dqfast
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
    TOTAL,
    IntegerTables,
    decode_rows,
    encode_rows,
    information_bits,
    quantize_pmf,
)
from dqfast.types import C2FTokens

__all__ = [
    "compress_dq",
    "decompress_dq",
    "decode_dq_bands",
    "encode_dq",
    "check_prior",
    "prior_name_of",
    "TILE_BATCH",
    "PRIOR_BATCH",
]

# Tiles tokenized or decoded per network call: bounds memory on large images.
TILE_BATCH = 8
# Tiles whose codes are laid out (c2f flatten / unflatten) at once: the layout's temporaries are
# several times the code map, so a whole large image's would cost hundreds of MB.
TOKEN_CHUNK = 1024
# Tiles whose codes the prior codes in one transformer batch. Both ends must batch alike (the batch
# is part of the arithmetic that must repeat exactly), so the file records it (the last header
# param). 128: a 1024 x 1024 photo codes in 2.5 s on one thread (16: 4.9 s, 64: 3.0 s, 256: 2.5 s).
PRIOR_BATCH = 128
MAX_PRIOR_BATCH = 4096
# Half-width of the blend band around an interior tile border, as a fraction of the tile side.
# 1/2: the band covers the whole tile (a triangular overlap-add of the aligned and the shifted
# decodes). Measured on the held-out photos (dqvae-small, budget 0.5): the mean step at any position
# of the tile stays within 1.18-1.41x the mean over positions (originals 1.12-1.26x, tiles alone
# 5-6x), and the blend gains 0.7-1 dB over the tiles alone; 1/8 left 1.30-1.54x.
BLEND_FRACTION = 0.5


def _code_pmf(model: nn.Module) -> np.ndarray:
    """(1, K) float64 static prior over the codebook: ``model.code_frequencies`` or uniform."""
    K = model.codebook.shape[0]
    freq = getattr(model, "code_frequencies", None)
    if freq is None:
        return np.ones((1, K))
    freq = torch.as_tensor(freq).detach().cpu().to(torch.float64).reshape(1, -1).numpy()
    if freq.shape[1] != K:
        raise ValueError(f"model.code_frequencies has {freq.shape[1]} entries for a codebook of {K}")
    return freq


def _tables(
    model: nn.Module, grain_counts: Sequence[int]
) -> tuple[np.ndarray, IntegerTables, np.ndarray, IntegerTables]:
    grain_pmf = np.asarray(grain_counts, dtype=np.float64)[None]
    code_pmf = _code_pmf(model)
    return grain_pmf, IntegerTables.from_pmf(grain_pmf, 0), code_pmf, IntegerTables.from_pmf(code_pmf, 0)


def _setting(budget) -> float:
    if budget is None or isinstance(budget, Sequence):
        return math.nan
    return float(budget)


def _tile_grid(image_size: tuple[int, int], side: int) -> tuple[int, int]:
    H, W = image_size
    return -(-H // side), -(-W // side)


def _coded_mask(tokens: C2FTokens) -> list[torch.Tensor]:
    return [p >= 0 for p in tokens.positions]


# ----------------------------------------------------------------------------------------------
# The DQ-Transformer as the entropy model of the codes
# ----------------------------------------------------------------------------------------------


def check_prior(model: nn.Module, prior: nn.Module) -> None:
    """Raise ValueError unless ``prior`` is a DQ-Transformer over ``model``'s codes."""
    from dqfast.models.dqtransformer import DQTransformer

    if not isinstance(prior, DQTransformer):
        raise ValueError(f"prior must be a DQTransformer, got {type(prior).__name__}")
    K, side = model.codebook.shape[0], model.grid_size
    if model.num_grains != 2:
        raise ValueError(f"a DQ-Transformer prior codes dual-grain DQ-VAEs; this one has {model.num_grains} grains")
    if prior.codebook_size != K or tuple(prior.grid_size) != (side, side):
        raise ValueError(
            f"prior models {prior.codebook_size} codes on a {tuple(prior.grid_size)} grid; the DQ-VAE has "
            f"{K} codes on a {(side, side)} grid"
        )
    if prior.num_classes:
        raise ValueError("a class-conditional prior needs a label per image; use an unconditional one")


def _prior_names(name: str, prior_name: str) -> str:
    if "+" in name or "+" in prior_name:
        raise ValueError(f"model names must not contain '+': {name!r}, {prior_name!r}")
    return f"{name}+{prior_name}"


def _prior_fingerprint(model: nn.Module, prior: nn.Module) -> bytes:
    return hashlib.sha256(model_fingerprint(model) + model_fingerprint(prior)).digest()[:8]


def _prior_tables(logits: torch.Tensor) -> np.ndarray:
    """(n, K) float64 probabilities ``counts / TOTAL`` (exact binary fractions) from (n, K) logits."""
    pmf = torch.softmax(logits.detach().to("cpu", torch.float64), -1).numpy()
    return quantize_pmf(pmf, TOTAL).astype(np.float64) / TOTAL


def _targets(indices: torch.Tensor) -> torch.Tensor:
    """(T, 5R) codes by :meth:`DQTransformer.assign_codes` target: coarse regions, then fine cells.

    ``indices`` (T, Hf, Wf) is broadcast to the fine grid: a coarse region's code sits on its
    2 x 2 cells.
    """
    return torch.cat([indices[:, ::2, ::2].flatten(1), indices.flatten(1)], 1)


def _encode_with_prior(
    prior: nn.Module, indices: torch.Tensor, grain: torch.Tensor, batch: int
) -> tuple[np.ndarray, float, int]:
    """Range-code the codes of every tile under the prior, ``batch`` tiles per transformer run:
    (words, information bits, CRC32 of the codes)."""
    device = prior.content_embedding.weight.device
    family = constriction.stream.model.Categorical(perfect=False)
    coder = constriction.stream.queue.RangeEncoder()
    bits, crc = 0.0, 0
    for t0 in range(0, indices.shape[0], batch):
        table = _targets(indices[t0 : t0 + batch]).to(device)

        def choose(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            nonlocal bits, crc
            codes = table.gather(1, target.clamp(min=0)[:, None])[:, 0]
            rows = (target >= 0).cpu()
            if bool(rows.any()):
                probs = _prior_tables(logits[rows.to(logits.device)])
                symbols = codes.cpu()[rows].numpy().astype(np.int32)
                coder.encode(symbols, family, probs)
                bits += float(-np.log2(probs[np.arange(len(symbols)), symbols]).sum())
                crc = zlib.crc32(symbols.astype("<i4").tobytes(), crc)
            return codes

        prior.assign_codes(grain[t0 : t0 + batch].to(device), choose)
    coder.encode(np.array(END_MARK, dtype=np.int32), constriction.stream.model.Uniform(1 << 16))
    return coder.get_compressed(), bits, crc


def _decode_with_prior(
    prior: nn.Module, words: np.ndarray, grain: torch.Tensor, batch: int, crc_expected: int
) -> torch.Tensor:
    """Inverse of :func:`_encode_with_prior`: (T, Hf, Wf) int64 codes on the CPU."""
    device = prior.content_embedding.weight.device
    family = constriction.stream.model.Categorical(perfect=False)
    crc, chunks = 0, []
    try:
        coder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
        for t0 in range(0, grain.shape[0], batch):

            def choose(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                nonlocal crc
                codes = torch.zeros(target.shape[0], dtype=torch.int64)
                rows = (target >= 0).cpu()
                if bool(rows.any()):
                    symbols = coder.decode(family, _prior_tables(logits[rows.to(logits.device)]))
                    codes[rows] = torch.from_numpy(symbols.astype(np.int64))
                    crc = zlib.crc32(symbols.astype("<i4").tobytes(), crc)
                return codes

            tokens = prior.assign_codes(grain[t0 : t0 + batch].to(device), choose)
            tokens = C2FTokens(
                tuple(c.cpu() for c in tokens.codes),
                tuple(p.cpu() for p in tokens.positions),
                tokens.lengths.cpu(),
                tokens.grid_size,
            )
            chunks.append(dqfast.c2f_unflatten(tokens)[0])
        mark = tuple(int(v) for v in coder.decode(constriction.stream.model.Uniform(1 << 16), len(END_MARK)))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CodecError(f"corrupted file: invalid entropy-coded stream ({e})") from None
    if mark != END_MARK or crc != crc_expected:
        raise CodecError(
            "the codes decoded under the prior differ from the encoder's: the file is damaged, or this "
            "machine computes the prior's probabilities differently (files coded with a prior decode on "
            "the machine and software that made them)"
        )
    return torch.cat(chunks)


def encode_dq(
    model: nn.Module,
    image: torch.Tensor,
    *,
    budget: float | Sequence[float] | None = None,
    name: str | None = None,
    source_channels: int = 3,
    prior: nn.Module | None = None,
    prior_name: str | None = None,
) -> Compressed:
    """Compress ``image`` with a DQ-VAE; ``budget`` as in :meth:`DQVAE.encode`.

    ``image``: a (3, H, W) floating-point tensor in [0, 1], a (3, H, W) uint8 tensor, a Pillow
    image (read one row of tiles at a time: a large photo is never converted whole) or a
    :class:`~dqfast.codec.png_rows.PngRows` (a PNG decoded from its file a row of tiles at a time).

    ``name``: the model name recorded in the file (default: its class name); ``source_channels``:
    1 when the image came from a grayscale file. ``prior``: a DQ-Transformer over the model's
    codes to code them with (see the module docstring), recorded as ``prior_name`` (default: its
    class name); the file then decodes only with the same prior.
    """
    if prior is not None:
        check_prior(model, prior)
    H, W, rows = _pixel_rows(image)
    fingerprint = model_fingerprint(model)
    R = model.resolution
    nh, nw = _tile_grid((H, W), R)
    device = model.codebook.device
    indices, grain = [], []
    for i in range(nh):
        band = rows(i * R, min((i + 1) * R, H))[None]  # (1, 3, r, W) float32 in [0, 1]
        band = F.pad(band, (0, nw * R - W, 0, (i + 1) * R - min((i + 1) * R, H)), mode="replicate")
        tiles = band[0].unflatten(2, (nw, R)).permute(2, 0, 1, 3)  # (nw, 3, R, R)
        for chunk in tiles.split(TILE_BATCH):
            out = model.encode(chunk.contiguous().to(device), budget=budget)
            indices.append(out.indices.to("cpu", torch.int32))
            grain.append(out.grain.to("cpu", torch.int8))
    indices, grain = torch.cat(indices).long(), torch.cat(grain).long()

    G = model.num_grains
    # The stream is grain-major over all tiles (every tile's coarse codes, then the finer ones):
    # flatten a chunk of tiles at a time, collecting each grain's codes in tile order.
    per_grain: list[list[torch.Tensor]] = [[] for _ in range(G)]
    for idx, gr in zip(indices.split(TOKEN_CHUNK), grain.split(TOKEN_CHUNK)):
        tokens = dqfast.c2f_flatten(idx, gr, num_grains=G)
        for g, (c, m) in enumerate(zip(tokens.codes, _coded_mask(tokens))):
            per_grain[g].append(c[m])
    codes = torch.cat([t for chunks in per_grain for t in chunks]).numpy()[None]
    grain_rows = grain.reshape(1, -1).numpy()
    grain_counts = tuple(int(n) for n in np.bincount(grain_rows[0], minlength=G))
    grain_pmf, grain_tables, code_pmf, code_tables = _tables(model, grain_counts)
    name = name if name is not None else type(model).__name__
    if prior is None:
        streams = [encode_rows(grain_rows, grain_tables), encode_rows(codes, code_tables)]
        code_bits, tables_hash = information_bits(codes, code_pmf, 0), code_tables.digest()
    else:
        words, code_bits, tables_hash = _encode_with_prior(prior, indices, grain, PRIOR_BATCH)
        streams = [encode_rows(grain_rows, grain_tables), words]
        name = _prior_names(name, prior_name if prior_name is not None else type(prior).__name__)
        fingerprint = _prior_fingerprint(model, prior)
    header = Header(
        kind="dqvae",
        model_name=name,
        weights_hash=fingerprint,
        tables_hash=tables_hash,
        image_size=(H, W),
        channels=check_source_channels(source_channels),
        padded_size=(nh * R, nw * R),
        latent_shape=(G, model.grid_size, model.grid_size),
        setting=_setting(budget),
        params=grain_counts if prior is None else (*grain_counts, PRIOR_BATCH),
    )
    bits = information_bits(grain_rows, grain_pmf, 0) + code_bits
    return Compressed(pack(header, streams), header, bits)


def _pixel_rows(image) -> tuple[int, int, callable]:
    """(H, W, rows) with ``rows(y0, y1)`` -> (3, y1 - y0, W) float32 in [0, 1], for the accepted
    inputs (a :class:`~dqfast.codec.png_rows.PngRows` like a Pillow image: read top to bottom)."""
    from PIL import Image

    from dqfast.codec.png_rows import PngRows

    if isinstance(image, Image.Image | PngRows):
        W, H = image.size
        if H < 1 or W < 1 or max(H, W) > 0xFFFF:
            raise ValueError(f"image sides must lie in 1..65535 pixels, got {W}x{H}")

        def pil_rows(y0: int, y1: int) -> torch.Tensor:
            band = np.asarray(image.crop((0, y0, W, y1)).convert("RGB"))
            return torch.from_numpy(band.copy()).permute(2, 0, 1).float().div_(255.0)

        return H, W, pil_rows
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1 or max(image.shape[1:]) > 0xFFFF:
            raise ValueError(f"a uint8 image must have shape (3, H, W), sides 1..65535, got {tuple(image.shape)}")
        return image.shape[1], image.shape[2], lambda y0, y1: image[:, y0:y1].float().div_(255.0)
    batch = check_image(image)
    return image.shape[1], image.shape[2], lambda y0, y1: batch[0, :, y0:y1]


def compress_dq(
    model: nn.Module,
    image: torch.Tensor,
    budget: float | Sequence[float] | None = None,
    *,
    name: str | None = None,
    prior: nn.Module | None = None,
    prior_name: str | None = None,
) -> bytes:
    """image: (3, H, W) in [0, 1] -> the bytes of a dqfast file (see :func:`encode_dq`)."""
    return encode_dq(model, image, budget=budget, name=name, prior=prior, prior_name=prior_name).data


def decode_dq_tokens(
    header: Header, streams: list[np.ndarray], model: nn.Module, prior: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (T, Hf, Wf), grain (T, H, W)) int64 of every tile of a parsed DQ-VAE file.

    ``prior``: the DQ-Transformer the codes were coded with, when the file names one."""
    G, side = model.num_grains, model.grid_size
    R = model.resolution
    H, W = header.image_size
    nh, nw = _tile_grid((H, W), R)
    if tuple(header.latent_shape) != (G, side, side) or tuple(header.padded_size) != (nh * R, nw * R):
        raise CodecError(f"corrupted file: latent shape {header.latent_shape} does not fit a {H}x{W} image")
    T = nh * nw
    n_regions = T * side * side
    counts, extra = header.params[:G], header.params[G:]
    if len(streams) != 2 or len(counts) != G or sum(counts) != n_regions or min(counts) < 0:
        raise CodecError("corrupted file: the grain counts do not match the tiles")
    if len(extra) != (prior is not None) or (extra and not 1 <= extra[0] <= MAX_PRIOR_BATCH):
        raise CodecError(f"corrupted file: unexpected header params {header.params}")
    _, grain_tables, _, code_tables = _tables(model, counts)
    if prior is None and code_tables.digest() != header.tables_hash:
        raise CodecError(
            "probability tables differ from the encoder's: this machine computes the model's prior differently"
        )

    grain_flat = decode_rows(streams[0], grain_tables, n_regions)[0]
    if np.bincount(grain_flat, minlength=G).tolist() != list(counts):
        raise CodecError("corrupted file: the decoded grain map disagrees with the header's counts")
    grain = torch.from_numpy(grain_flat).reshape(T, side, side)
    del grain_flat
    if prior is not None:
        return _decode_with_prior(prior, streams[1], grain, extra[0], header.tables_hash), grain
    # Grain g's codes: counts[g] regions of 4**g codes each, one segment per grain, in tile order.
    per_grain = [n * 4**g for g, n in enumerate(counts)]
    flat = torch.from_numpy(decode_rows(streams[1], code_tables, sum(per_grain))[0])
    starts = np.concatenate([[0], np.cumsum(per_grain)[:-1]]).tolist()
    fine = side * 2 ** (G - 1)
    indices = torch.empty(T, fine, fine, dtype=torch.int64)
    # The grain map alone fixes every code's slot: flatten a blank code map (a chunk of tiles at a
    # time) to get the positions, fill them from each grain's segment, unflatten.
    for t0 in range(0, T, TOKEN_CHUNK):
        gr = grain[t0 : t0 + TOKEN_CHUNK]
        layout = dqfast.c2f_flatten(torch.zeros(gr.shape[0], fine, fine, dtype=torch.int64), gr, num_grains=G)
        codes = []
        for g, (c, m) in enumerate(zip(layout.codes, _coded_mask(layout))):
            n = int(m.sum())
            filled = c.clone()
            filled[m] = flat[starts[g] : starts[g] + n]
            starts[g] += n
            codes.append(filled)
        indices[t0 : t0 + gr.shape[0]], _ = dqfast.c2f_unflatten(layout._replace(codes=tuple(codes)))
    return indices, grain


def decompress_dq(
    data: bytes,
    model: nn.Module,
    *,
    name: str | None = None,
    blend: bool = True,
    prior: nn.Module | None = None,
    prior_name: str | None = None,
) -> torch.Tensor:
    """Bytes of a dqfast DQ-VAE file -> the image (3, H, W) float32 in [0, 1] on the CPU.

    Raises :class:`CodecError` for a malformed file or a model other than the encoder's.
    ``blend``: hide the tile borders (see the module docstring); False decodes each tile once.
    ``prior`` / ``prior_name``: the DQ-Transformer the file was coded with, if any.
    """
    header, bands = decode_dq_bands(data, model, name=name, blend=blend, prior=prior, prior_name=prior_name)
    H, W = header.image_size
    image = torch.empty(3, H, W)
    for y0, band in bands:
        image[:, y0 : y0 + band.shape[1]] = band
    return image


def decode_dq_bands(
    data: bytes,
    model: nn.Module,
    *,
    name: str | None = None,
    blend: bool = True,
    prior: nn.Module | None = None,
    prior_name: str | None = None,
) -> tuple[Header, Iterator[tuple[int, torch.Tensor]]]:
    """Parse and check a DQ-VAE file, then decode it band by band (``prior``: the DQ-Transformer
    the codes were coded with, when the file names one; see :func:`prior_name_of`).

    Returns (header, bands): ``bands`` yields ``(y0, band)`` top to bottom, ``band`` a (3, rows, W)
    float32 CPU tensor in [0, 1] of image rows ``y0 .. y0 + rows`` (rows = the tile side, less at
    the bottom). The file is fully checked (and its tokens decoded) before this returns; only the
    decoder network runs lazily, so memory stays at a few bands whatever the image size.
    """
    header, streams = unpack(data)
    if header.kind != "dqvae":
        raise CodecError(f"this is a {header.kind} file, not a DQ-VAE file")
    if not hasattr(model, "num_grains") or not hasattr(model, "grid_size"):
        raise CodecError(f"this DQ-VAE file cannot be decoded with a {type(model).__name__}")
    name = name if name is not None else type(model).__name__
    named_prior = prior_name_of(header)
    if prior is None:
        if named_prior is not None:
            raise CodecError(f"this file's codes were coded with the prior {named_prior!r}: pass it to decode")
        check_model(header, name, model_fingerprint(model))
    else:
        if named_prior is None:
            raise CodecError("this file was coded without a prior; decode it without one")
        check_prior(model, prior)
        prior_name = prior_name if prior_name is not None else type(prior).__name__
        check_model(header, _prior_names(name, prior_name), _prior_fingerprint(model, prior))
    indices, _ = decode_dq_tokens(header, streams, model, prior)
    return header, _bands(model, indices, header.image_size, blend)


def prior_name_of(header: Header) -> str | None:
    """The name of the DQ-Transformer a DQ-VAE file's codes were coded with, or None (static prior)."""
    if header.kind != "dqvae" or "+" not in header.model_name:
        return None
    return header.model_name.split("+", 1)[1]


def _blend_weight(length: int, tile: int, band: float) -> torch.Tensor:
    """(length,) weight of the half-tile-shifted decode along one axis of ``length`` padded pixels.

    1 on an interior tile border, falling linearly to 0 at ``band`` pixels from it; 0 near the
    image's own edges (there is no seam to hide, and no shifted tile).
    """
    p = torch.arange(length, dtype=torch.float64) + 0.5
    offset = p % tile
    dist = torch.minimum(offset, tile - offset)
    border = torch.where(offset < tile / 2, p - offset, p - offset + tile)
    interior = (border > 0) & (border < length)
    return torch.where(interior, (1 - dist / band).clamp(min=0), torch.zeros(())).float()


def _bands(model: nn.Module, indices: torch.Tensor, image_size: tuple[int, int], blend: bool):
    R, f = model.resolution, model.latent_size
    H, W = image_size
    nh, nw = _tile_grid((H, W), R)
    # The whole code map, (nh * f, nw * f): a shifted tile reads the codes of four neighbours.
    codes = indices.reshape(nh, nw, f, f).permute(0, 2, 1, 3).reshape(nh * f, nw * f)
    del indices
    region = 2 ** (model.num_grains - 1)  # finest cells per coarse region side
    blend = blend and f % 2 == 0 and (f // 2) % region == 0 and R % 2 == 0 and (nh > 1 or nw > 1)
    device = model.codebook.device

    def decode_tiles(latent: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
        """latent (n, f, f) code windows whose top-left cells lie at ``offset`` in their tiles ->
        (n, 3, R, R) float32 CPU images."""
        out = []
        with torch.no_grad():
            for chunk in latent.split(TILE_BATCH):
                grain = torch.zeros(chunk.shape[0], 1, 1, dtype=torch.int64)  # decode() reads the indices only
                out.append(model.decode((chunk.to(device), grain, grain[:, 0, 0]), offset=offset).float().cpu())
        return torch.cat(out)

    def strip(r0: int) -> torch.Tensor:
        """(3, R, nw * R): the tiles of latent rows r0 .. r0 + f, blended across their vertical borders."""
        rows = codes[r0 : r0 + f]
        a = decode_tiles(rows.reshape(f, nw, f).permute(1, 0, 2), (r0 % f, 0))  # (nw, 3, R, R)
        out = a.permute(1, 2, 0, 3).reshape(3, R, nw * R)
        if blend and nw > 1:
            shifted = rows[:, f // 2 : f // 2 + (nw - 1) * f]
            b = decode_tiles(shifted.reshape(f, nw - 1, f).permute(1, 0, 2), (r0 % f, f // 2))
            b = b.permute(1, 2, 0, 3).reshape(3, R, (nw - 1) * R)
            b = F.pad(b, (R // 2, R // 2))
            out = out + (b - out) * col_weight
        return out

    col_weight = _blend_weight(nw * R, R, BLEND_FRACTION * R) if blend else None
    row_weight = _blend_weight(nh * R, R, BLEND_FRACTION * R)[:, None] if blend else None

    def generate() -> Iterator[tuple[int, torch.Tensor]]:
        below = None  # the lower half of the previous shifted strip
        for i in range(nh):
            band = strip(i * f)
            if blend and nh > 1:
                upper = below if below is not None else torch.zeros(3, R // 2, nw * R)
                if i < nh - 1:
                    shifted = strip(i * f + f // 2)
                    lower, below = shifted[:, : R // 2], shifted[:, R // 2 :]
                else:
                    lower = torch.zeros(3, R // 2, nw * R)
                other = torch.cat([upper, lower], dim=1)
                band = band + (other - band) * row_weight[i * R : (i + 1) * R]
            rows = min(R, H - i * R)
            yield i * R, band[:, :rows, :W].clamp(0, 1)

    return generate()
