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
An autoregressive prior (the DQ-Transformer) would code the codes far tighter but needs one network
step per code at both ends, with bit-exact probabilities across machines; it is left for later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
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
from dqfast.codec.entropy import IntegerTables, decode_rows, encode_rows, information_bits
from dqfast.types import C2FTokens

__all__ = ["compress_dq", "decompress_dq", "encode_dq", "TILE_BATCH"]

# Tiles tokenized or decoded per network call: bounds memory on large images.
TILE_BATCH = 8


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


def encode_dq(
    model: nn.Module,
    image: torch.Tensor,
    *,
    budget: float | Sequence[float] | None = None,
    name: str | None = None,
    source_channels: int = 3,
) -> Compressed:
    """Compress ``image`` (3, H, W) in [0, 1] with a DQ-VAE; ``budget`` as in :meth:`DQVAE.encode`.

    ``name``: the model name recorded in the file (default: its class name); ``source_channels``:
    1 when the image came from a grayscale file.
    """
    batch = check_image(image)
    fingerprint = model_fingerprint(model)
    R = model.resolution
    H, W = image.shape[1:]
    nh, nw = _tile_grid((H, W), R)
    device = model.codebook.device
    padded = F.pad(batch, (0, nw * R - W, 0, nh * R - H), mode="replicate")
    tiles = rearrange(padded, "1 c (nh r) (nw s) -> (nh nw) c r s", r=R, s=R)
    indices, grain = [], []
    for chunk in tiles.split(TILE_BATCH):
        out = model.encode(chunk.to(device), budget=budget)
        indices.append(out.indices.cpu())
        grain.append(out.grain.cpu())
    indices, grain = torch.cat(indices), torch.cat(grain)

    G = model.num_grains
    tokens = dqfast.c2f_flatten(indices, grain, num_grains=G)
    codes = torch.cat([c[m] for c, m in zip(tokens.codes, _coded_mask(tokens))]).numpy()[None]
    grain_rows = grain.reshape(1, -1).numpy()
    grain_counts = tuple(int(n) for n in np.bincount(grain_rows[0], minlength=G))
    grain_pmf, grain_tables, code_pmf, code_tables = _tables(model, grain_counts)
    streams = [encode_rows(grain_rows, grain_tables), encode_rows(codes, code_tables)]
    header = Header(
        kind="dqvae",
        model_name=name if name is not None else type(model).__name__,
        weights_hash=fingerprint,
        tables_hash=code_tables.digest(),
        image_size=(H, W),
        channels=check_source_channels(source_channels),
        padded_size=(nh * R, nw * R),
        latent_shape=(G, model.grid_size, model.grid_size),
        setting=_setting(budget),
        params=grain_counts,
    )
    bits = information_bits(grain_rows, grain_pmf, 0) + information_bits(codes, code_pmf, 0)
    return Compressed(pack(header, streams), header, bits)


def compress_dq(
    model: nn.Module, image: torch.Tensor, budget: float | Sequence[float] | None = None, *, name: str | None = None
) -> bytes:
    """image: (3, H, W) in [0, 1] -> the bytes of a dqfast file (see :func:`encode_dq`)."""
    return encode_dq(model, image, budget=budget, name=name).data


def decode_dq_tokens(header: Header, streams: list[np.ndarray], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (T, Hf, Wf), grain (T, H, W)) int64 of every tile of a parsed DQ-VAE file."""
    G, side = model.num_grains, model.grid_size
    R = model.resolution
    H, W = header.image_size
    nh, nw = _tile_grid((H, W), R)
    if tuple(header.latent_shape) != (G, side, side) or tuple(header.padded_size) != (nh * R, nw * R):
        raise CodecError(f"corrupted file: latent shape {header.latent_shape} does not fit a {H}x{W} image")
    T = nh * nw
    n_regions = T * side * side
    if len(streams) != 2 or len(header.params) != G or sum(header.params) != n_regions or min(header.params) < 0:
        raise CodecError("corrupted file: the grain counts do not match the tiles")
    _, grain_tables, _, code_tables = _tables(model, header.params)
    if code_tables.digest() != header.tables_hash:
        raise CodecError(
            "probability tables differ from the encoder's: this machine computes the model's prior differently"
        )

    grain_flat = decode_rows(streams[0], grain_tables, n_regions)[0]
    if np.bincount(grain_flat, minlength=G).tolist() != list(header.params):
        raise CodecError("corrupted file: the decoded grain map disagrees with the header's counts")
    grain = torch.from_numpy(grain_flat).reshape(T, side, side)
    # The grain map alone fixes every code's slot: flatten a blank code map to get the positions.
    blank = torch.zeros(T, side * 2 ** (G - 1), side * 2 ** (G - 1), dtype=torch.int64)
    layout = dqfast.c2f_flatten(blank, grain, num_grains=G)
    masks = _coded_mask(layout)
    n_codes = sum(int(m.sum()) for m in masks)
    flat = torch.from_numpy(decode_rows(streams[1], code_tables, n_codes)[0])
    codes, start = [], 0
    for c, m in zip(layout.codes, masks):
        filled = c.clone()
        filled[m] = flat[start : start + int(m.sum())]
        start += int(m.sum())
        codes.append(filled)
    indices, _ = dqfast.c2f_unflatten(layout._replace(codes=tuple(codes)))
    return indices, grain


def decompress_dq(data: bytes, model: nn.Module, *, name: str | None = None) -> torch.Tensor:
    """Bytes of a dqfast DQ-VAE file -> the image (3, H, W) float32 in [0, 1] on the model's device.

    Raises :class:`CodecError` for a malformed file or a model other than the encoder's.
    """
    header, streams = unpack(data)
    if header.kind != "dqvae":
        raise CodecError(f"this is a {header.kind} file, not a DQ-VAE file")
    check_model(header, name if name is not None else type(model).__name__, model_fingerprint(model))
    indices, grain = decode_dq_tokens(header, streams, model)
    device = model.codebook.device
    R = model.resolution
    H, W = header.image_size
    nh, nw = _tile_grid((H, W), R)
    tiles = []
    with torch.no_grad():
        for idx, gr in zip(indices.split(TILE_BATCH), grain.split(TILE_BATCH)):
            n = (4**gr).sum((1, 2))
            tiles.append(model.decode((idx.to(device), gr.to(device), n.to(device))).float())
    image = rearrange(torch.cat(tiles), "(nh nw) c r s -> c (nh r) (nw s)", nh=nh, nw=nw)
    return image[:, :H, :W].clamp(0, 1)
