"""The codec: exact integer tables, ANS coding, the file format and its failure modes, and exact round
trips of CAE latents and DQ-VAE tokens through real bitstreams."""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dqfast
import dqfast.models.cae  # noqa: F401  (registers the presets)
import dqfast.models.dqvae  # noqa: F401
from dqfast.codec import (
    FORMAT_VERSION,
    MAGIC,
    TOTAL,
    CodecError,
    Header,
    IntegerTables,
    decode,
    decompress_cae,
    decompress_dq,
    encode,
    model_fingerprint,
    pack,
    quantize_pmf,
    read_header,
    unpack,
)
from dqfast.codec.cae_codec import decode_cae_symbols
from dqfast.codec.dq_codec import BLEND_FRACTION, decode_dq_tokens
from dqfast.codec.entropy import decode_rows, encode_rows
from dqfast.models import create
from tests.helpers import seed

# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cae():
    seed(0)
    model = create("cae-tiny").eval()
    model.enable_all_coefficients()
    # Untrained latents are ~0.1 wide: scale them (lambda = 64) so the symbols spread over many values.
    with torch.no_grad():
        model.log_scales.fill_(math.log(64.0))
    return model


@pytest.fixture(scope="module")
def dq():
    seed(1)
    return create("dqvae-tiny").eval()


def _image(h: int, w: int, n: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    # A smooth ramp plus noise: not constant, so codes and latents vary across the image.
    ramp = torch.linspace(0, 1, w)[None, None, :] * torch.linspace(0.2, 1, h)[None, :, None]
    return (0.6 * ramp + 0.4 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


def _header(**changes) -> Header:
    fields = dict(
        kind="cae",
        model_name="cae-tiny",
        weights_hash=bytes(range(8)),
        tables_hash=0xDEADBEEF,
        image_size=(37, 53),
        channels=3,
        padded_size=(40, 56),
        latent_shape=(8, 5, 7),
        setting=1.5,
        params=(-79, 79),
    )
    fields.update(changes)
    return Header(**fields)


def _recrc(data: bytes) -> bytes:
    """``data`` with its trailing CRC32 recomputed (to reach checks that come after the CRC)."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


# ----------------------------------------------------------------------------------------------
# Integer probability tables
# ----------------------------------------------------------------------------------------------


def test_quantize_pmf_rows_sum_to_total_and_follow_largest_remainders():
    rng = np.random.default_rng(0)
    pmf = rng.random((6, 300)) ** 6  # many tiny masses: the floor of one count matters
    pmf[2, 10:] = 0.0
    counts = quantize_pmf(pmf)
    assert counts.dtype == np.int64 and counts.shape == pmf.shape
    assert (counts.sum(1) == TOTAL).all()
    assert counts.min() >= 1
    # Largest remainders, checked from the definition: everyone gets 1 + floor(share); the ones that got
    # one more have remainders at least as large as every one that did not.
    K = pmf.shape[1]
    share = pmf / pmf.sum(1, keepdims=True) * (TOTAL - K)
    extra = counts - 1 - np.floor(share).astype(np.int64)
    assert set(np.unique(extra)) <= {0, 1}
    remainder = share - np.floor(share)
    for r in range(pmf.shape[0]):
        if extra[r].any() and not extra[r].all():
            assert remainder[r][extra[r] == 1].min() >= remainder[r][extra[r] == 0].max()
    assert np.abs(counts / TOTAL - pmf / pmf.sum(1, keepdims=True)).max() <= (K + 1) / TOTAL


def test_quantize_pmf_is_deterministic_and_breaks_ties_to_the_lower_index():
    counts = quantize_pmf(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert counts.tolist() == [[21846, 21845, 21845], [21846, 21845, 21845]]
    pmf = np.random.default_rng(3).random((4, 50))
    assert np.array_equal(quantize_pmf(pmf), quantize_pmf(pmf.copy()))
    # 1 + floor(0.25 * 6) = 2 and 1 + floor(0.75 * 6) = 5; one count left, remainders tie at 0.5.
    assert quantize_pmf(np.array([0.25, 0.75]), total=8).tolist() == [3, 5]


@pytest.mark.parametrize(
    "pmf, match",
    [
        (np.array([[0.5, -0.1]]), "non-negative"),
        (np.array([[0.5, np.nan]]), "finite"),
        (np.ones((1, TOTAL + 1)), "cannot give each symbol"),
        (np.ones((2, 3, 4)), "shape"),
    ],
)
def test_quantize_pmf_rejects_bad_tables(pmf, match):
    with pytest.raises(ValueError, match=match):
        quantize_pmf(pmf)


def test_rows_round_trip_exactly_with_escapes_and_cost_what_the_tables_say():
    rng = np.random.default_rng(1)
    N, lo, K = 5000, -20, 41
    # Per-row discretised Laplace laws of different widths over lo..lo+K-1.
    support = np.arange(lo, lo + K)
    pmf = np.stack([np.exp(-np.abs(support) / s) for s in (0.5, 2.0, 5.0, 40.0)])
    tables = IntegerTables.from_pmf(pmf, lo)
    p = pmf / pmf.sum(1, keepdims=True)
    values = np.stack([rng.choice(support, size=N, p=row) for row in p])
    values[0, :3] = [lo - 1, tables.hi + 1, 10**6]  # outside the table: escaped
    values[3, :2] = [np.iinfo(np.int32).min, np.iinfo(np.int32).max]
    words = encode_rows(values, tables)
    assert words.dtype == np.uint32
    decoded = decode_rows(words, tables, N)
    assert decoded.dtype == np.int64 and np.array_equal(decoded, values)

    # ANS costs the information content under the quantised tables plus a few words.
    probs = tables.probabilities()
    escape = tables.counts.shape[1] - 1
    outside = (values < lo) | (values > tables.hi)
    symbols = np.where(outside, escape, values - lo)
    ideal = -np.log2(np.take_along_axis(probs, symbols, 1)).sum() + 32 * outside.sum()
    assert ideal <= 32 * len(words) <= ideal + 96


def test_rows_empty_and_too_wide_values():
    tables = IntegerTables.from_pmf(np.ones((2, 3)), 0)
    assert decode_rows(encode_rows(np.zeros((2, 0), np.int64), tables), tables, 0).shape == (2, 0)
    with pytest.raises(ValueError, match="int32"):
        encode_rows(np.array([[0], [2**31]]), tables)
    with pytest.raises(ValueError, match="shape"):
        encode_rows(np.zeros((3, 4), np.int64), tables)


def test_rows_reject_invalid_streams():
    tables = IntegerTables.from_pmf(np.ones((2, 10)), 0)
    values = np.random.default_rng(2).integers(0, 10, size=(2, 50))
    words = encode_rows(values, tables)
    with pytest.raises(CodecError, match="cannot hold 2 x 50 symbols"):
        decode_rows(np.array([0], np.uint32), tables, 50)
    with pytest.raises(CodecError, match="more data than the header announces|end mark"):
        decode_rows(words, tables, 49)
    # Long enough to pass the length check, but every word is garbage.
    with pytest.raises(CodecError, match="invalid entropy-coded stream|end mark|more data"):
        decode_rows(np.full(words.size, 0x9E3779B9, np.uint32), tables, 50)


def test_exhausted_stream_is_an_error_not_zeros():
    # Value 0 has cumulative count 0: coded on an empty ANS coder it costs nothing, so an exhausted
    # stream decodes as zeros unless the end mark is checked.
    tables = IntegerTables.from_pmf(np.array([[1000.0, 1.0, 1.0]]), 0)
    zeros = np.zeros((1, 40), np.int64)
    words = encode_rows(zeros, tables)
    assert (decode_rows(words, tables, 40) == 0).all()
    with pytest.raises(CodecError, match="end mark"):
        decode_rows(np.zeros(0, np.uint32), tables, 40)
    for cut in range(1, words.size):
        with pytest.raises(CodecError):
            decode_rows(words[:cut], tables, 40)
    with pytest.raises(CodecError):
        decode_rows(words, tables, 41)


def test_symbol_range_check():
    from dqfast.codec.entropy import check_symbol_range

    check_symbol_range(torch.tensor([-3.2, 2.0**31 - 2], dtype=torch.float64))
    for bad in (1e10, -1e10, 1e308, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rate setting"):
            check_symbol_range(torch.tensor([0.0, bad], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Container
# ----------------------------------------------------------------------------------------------


def _packed() -> tuple[bytes, list[np.ndarray]]:
    streams = [np.array([1, 2**32 - 1, 12345], np.uint32), np.array([], np.uint32), np.array([7], np.uint32)]
    return pack(_header(), streams), streams


def test_container_round_trip():
    data, streams = _packed()
    assert data.startswith(MAGIC) and data[len(MAGIC)] == FORMAT_VERSION
    header, out = unpack(data)
    assert header == _header()
    assert len(out) == 3 and all(np.array_equal(a, b) for a, b in zip(out, streams))
    # Streams are little-endian words right before the CRC, which covers everything before it.
    assert data[-4 - 16 : -4] == struct.pack("<4I", 1, 2**32 - 1, 12345, 7)
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])
    dq_header = _header(kind="dqvae", model_name="dqvae-tiny", setting=math.nan, params=(5, 11), latent_shape=(2, 4, 4))
    back = unpack(pack(dq_header, []))[0]
    assert back.kind == "dqvae" and back.params == (5, 11) and math.isnan(back.setting)


def test_container_errors():
    data, _ = _packed()
    with pytest.raises(CodecError, match="^empty file"):
        unpack(b"")
    with pytest.raises(CodecError, match="not a dqfast file"):
        unpack(b"\x89PNG\r\n\x1a\n" + data[8:])
    with pytest.raises(CodecError, match="not a dqfast file"):
        unpack(b"hello")
    wrong_version = bytearray(data)
    wrong_version[len(MAGIC)] = FORMAT_VERSION + 1
    with pytest.raises(CodecError, match=f"unsupported dqfast format version {FORMAT_VERSION + 1}"):
        unpack(bytes(wrong_version))
    with pytest.raises(CodecError, match="unexpected bytes after"):
        unpack(data + b"\0")
    unknown_kind = bytearray(data)
    unknown_kind[len(MAGIC) + 1] = 9
    with pytest.raises(CodecError, match="CRC32 mismatch"):
        unpack(bytes(unknown_kind))
    with pytest.raises(CodecError, match="unknown codec kind 9"):
        unpack(_recrc(bytes(unknown_kind)))


def test_container_every_truncation_is_reported():
    data, _ = _packed()
    for n in range(1, len(data)):
        with pytest.raises(CodecError, match="^truncated file") as info:
            unpack(data[:n])
        assert "\n" not in str(info.value)


def test_container_every_flipped_byte_is_caught():
    data, _ = _packed()
    header_end = len(data) - 4 - 16
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(CodecError) as info:
            unpack(bytes(bad))
        if i >= header_end:  # stream words and the CRC itself: only the CRC can tell
            assert "CRC32 mismatch" in str(info.value)


def test_model_fingerprint(cae):
    fp = model_fingerprint(cae)
    assert len(fp) == 8 and fp == model_fingerprint(cae)
    twin = create("cae-tiny")
    twin.load_state_dict(cae.state_dict())
    assert model_fingerprint(twin) == fp
    with torch.no_grad():
        twin.decoder[0].weight.view(-1)[5] += 1e-6
    assert model_fingerprint(twin) != fp
    twin.load_state_dict(cae.state_dict())
    twin.mask[-1] = 0.0  # a buffer counts too
    assert model_fingerprint(twin) != fp


# ----------------------------------------------------------------------------------------------
# CAE
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 53), (1, 1), (16, 24)])
def test_cae_latents_round_trip_exactly(cae, size):
    image = _image(*size)
    result = encode(cae, image, name="cae-tiny")
    assert result.bpp == len(result.data) * 8 / (size[0] * size[1])
    header, streams = unpack(result.data)
    symbols = decode_cae_symbols(header, streams, cae)
    expected = cae.encode(image[None])[0].numpy()
    assert symbols.shape == expected.shape and np.array_equal(symbols, expected)
    assert len(np.unique(expected)) > 3  # a non-trivial latent
    decoded = decompress_cae(result.data, cae, name="cae-tiny")
    assert decoded.shape == (3, *size)
    assert torch.equal(decoded, cae.decode(torch.from_numpy(expected)[None], output_size=size)[0])
    assert header.image_size == size and header.padded_size == (8 * expected.shape[1], 8 * expected.shape[2])
    assert header.kind == "cae" and header.model_name == "cae-tiny" and header.latent_shape == expected.shape
    assert header.weights_hash == model_fingerprint(cae) and header.channels == 3 and header.setting == 1.0


def test_cae_deterministic(cae):
    image = _image(29, 41, 2)
    first, second = encode(cae, image), encode(cae, image)
    assert first.data == second.data
    a, b = decompress_cae(first.data, cae), decompress_cae(first.data, cae)
    assert torch.equal(a, b)
    assert math.isfinite(first.estimated_bpp) and first.estimated_bpp > 0


def test_cae_escapes_keep_latents_exact(cae):
    narrow = create("cae-tiny").eval()
    narrow.load_state_dict(cae.state_dict())
    with torch.no_grad():
        narrow.entropy_model.log_scales.fill_(math.log(0.1))  # table range -1..1: most symbols escape
    image = _image(24, 24, 3)
    data = encode(narrow, image).data
    header, streams = unpack(data)
    assert header.params[1] - header.params[0] <= 2
    expected = narrow.encode(image[None])[0].numpy()
    assert np.abs(expected).max() > header.params[1]
    assert np.array_equal(decode_cae_symbols(header, streams, narrow), expected)


def test_cae_only_active_channels_are_coded(cae):
    masked = create("cae-tiny").eval()
    state = cae.state_dict()
    state["mask"] = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0])
    masked.load_state_dict(state)
    image = _image(40, 40, 4)
    small, full = encode(masked, image), encode(cae, image)
    assert len(small.data) < len(full.data)
    header, streams = unpack(small.data)
    assert np.array_equal(decode_cae_symbols(header, streams, masked), masked.encode(image[None])[0].numpy())


def test_cae_quality_changes_the_rate(cae):
    image = _image(48, 48, 5)
    rates = [encode(cae, image, quality=q).bpp for q in (0.25, 1.0, 4.0)]
    assert rates[0] < rates[1] < rates[2]
    data = encode(cae, image, quality=4.0).data
    assert read_header(data).setting == 4.0
    assert decode(data, cae)[0].shape == (3, 48, 48)
    with pytest.raises(ValueError, match="quality"):
        encode(cae, image, quality=0.0)


def test_cae_wrong_model_and_tables(cae, dq):
    data = encode(cae, _image(20, 20), name="cae-tiny").data
    other = create("cae-tiny").eval()
    with pytest.raises(CodecError, match="^wrong model: the file was made with 'cae-tiny'"):
        decompress_cae(data, other, name="cae-tiny")
    with pytest.raises(CodecError, match="wrong model"):
        decompress_cae(data, cae, name="cae")
    with pytest.raises(CodecError, match="not a DQ-VAE file"):
        decompress_dq(data, dq)
    same_weights = create("cae-tiny").eval()
    same_weights.load_state_dict(cae.state_dict())
    base = same_weights.pmf_table
    same_weights.pmf_table = lambda lo, hi: base(lo, hi) * torch.linspace(1, 2, hi - lo + 1, dtype=torch.float64)
    with pytest.raises(CodecError, match="probability tables differ"):
        decompress_cae(data, same_weights, name="cae-tiny")


def test_cae_bad_images(cae):
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        encode(cae, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode(cae, torch.full((3, 8, 8), 1.5))
    with pytest.raises(TypeError, match="floating point"):
        encode(cae, torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="budget applies to the DQ-VAE"):
        encode(cae, _image(8, 8), budget=0.5)


# ----------------------------------------------------------------------------------------------
# DQ-VAE
# ----------------------------------------------------------------------------------------------


def _tiles(image: torch.Tensor, side: int) -> torch.Tensor:
    """(3, H, W) -> (T, 3, side, side): replicate-pad bottom/right, tiles in row-major order (a plain loop)."""
    H, W = image.shape[1:]
    nh, nw = -(-H // side), -(-W // side)
    padded = F.pad(image[None], (0, nw * side - W, 0, nh * side - H), mode="replicate")[0]
    return torch.stack(
        [padded[:, i * side : (i + 1) * side, j * side : (j + 1) * side] for i in range(nh) for j in range(nw)]
    )


@pytest.mark.parametrize("size, budget", [((45, 70), 0.5), ((32, 32), None), ((1, 1), 0.0), ((33, 20), 1.0)])
def test_dq_tokens_round_trip_exactly(dq, size, budget):
    image = _image(*size, 6)
    result = encode(dq, image, budget=budget, name="dqvae-tiny")
    assert result.bpp == len(result.data) * 8 / (size[0] * size[1])
    header, streams = unpack(result.data)
    indices, grain = decode_dq_tokens(header, streams, dq)
    expected = dq.encode(_tiles(image, dq.resolution), budget=budget)
    assert torch.equal(indices, expected.indices) and torch.equal(grain, expected.grain)
    if budget is not None:
        regions = dq.grid_size**2
        assert (grain.sum((1, 2)) == round(budget * regions)).all()
    assert header.params == tuple(torch.bincount(grain.flatten(), minlength=2).tolist())
    assert header.image_size == size and header.kind == "dqvae" and header.latent_shape == (2, 4, 4)
    assert (header.setting == budget) if budget is not None else math.isnan(header.setting)

    decoded = decompress_dq(result.data, dq, name="dqvae-tiny", blend=False)
    assert decoded.shape == (3, *size)
    nh, nw = -(-size[0] // dq.resolution), -(-size[1] // dq.resolution)
    tiles = dq.decode(expected).clamp(0, 1)
    full = torch.cat([torch.cat(list(tiles[i * nw : (i + 1) * nw]), dim=2) for i in range(nh)], dim=1)
    # 1e-5: the codec decodes a row of tiles per batch, the test all at once (other conv blocking).
    torch.testing.assert_close(decoded, full[:, : size[0], : size[1]], rtol=0, atol=1e-5)
    # Blended (the default): the tiles alone away from interior borders, a mix near them.
    blended = decompress_dq(result.data, dq, name="dqvae-tiny")
    assert torch.equal(blended, decompress_dq(result.data, dq, name="dqvae-tiny"))
    R, band = dq.resolution, dq.resolution * BLEND_FRACTION
    rows, cols = torch.arange(size[0]) + 0.5, torch.arange(size[1]) + 0.5

    def near_border(p, n):
        return torch.stack([(p - k * R).abs() < band for k in range(1, n)]).any(0) if n > 1 else p < 0

    near = near_border(rows, nh)[:, None] | near_border(cols, nw)[None, :]
    torch.testing.assert_close(blended[:, ~near], decoded[:, ~near], rtol=0, atol=1e-5)
    assert near.any() == (nh > 1 or nw > 1)
    if near.any():
        assert not torch.allclose(blended[:, near], decoded[:, near], atol=1e-3)


def test_dq_blend_decodes_shifted_windows_with_their_tile_offsets(dq, monkeypatch):
    """The half-tile-shifted windows are decoded with the position embedding of their cells' place
    in the tiles (offset f/2), and every window's codes are the code map cut at that place."""
    image = _image(80, 100, 9)  # 3 x 4 tiles of 32
    data = encode(dq, image, budget=0.5, name="dqvae-tiny").data
    header, streams = unpack(data)
    indices, _ = decode_dq_tokens(header, streams, dq)
    f = dq.latent_size
    code_map = indices.reshape(3, 4, f, f).permute(0, 2, 1, 3).reshape(3 * f, 4 * f)
    calls = []
    original = type(dq).decode

    def spy(self, tokens, *, offset=(0, 0)):
        for window in tokens[0]:
            hits = [
                (r, c)
                for r in range(0, 2 * f + 1, f // 2)
                for c in range(0, 3 * f + 1, f // 2)
                if torch.equal(window, code_map[r : r + f, c : c + f])
            ]
            assert any((r % f, c % f) == tuple(offset) for r, c in hits), (offset, hits)
        calls.append(tuple(offset))
        return original(self, tokens, offset=offset)

    monkeypatch.setattr(type(dq), "decode", spy)
    decompress_dq(data, dq, name="dqvae-tiny")
    assert set(calls) == {(0, 0), (0, f // 2), (f // 2, 0), (f // 2, f // 2)}


def test_dq_rate_grows_with_budget(dq):
    image = _image(64, 64, 7)
    sizes = [len(encode(dq, image, budget=b).data) for b in (0.0, 0.5, 1.0)]
    assert sizes[0] < sizes[1] < sizes[2]
    # Uniform prior over 64 codes: 6 bits per code is the bulk of the stream.
    n_codes = [4 * 16 * (1 + 3 * b) for b in (0.0, 0.5, 1.0)]
    for size, n in zip(sizes, n_codes):
        assert 6 * n <= 8 * size <= 6 * n + 8 * 200


def test_dq_code_frequencies_prior():
    seed(2)
    model = create("dqvae-tiny").eval()
    image = _image(32, 32, 8)
    plain = encode(model, image, budget=0.5)
    used = model.encode(image[None], budget=0.5).indices.flatten()
    freq = torch.bincount(used, minlength=64).double() + 0.01
    model.register_buffer("code_frequencies", freq)
    skewed = encode(model, image, budget=0.5)
    assert len(skewed.data) < len(plain.data)
    assert read_header(skewed.data).tables_hash != read_header(plain.data).tables_hash
    header, streams = unpack(skewed.data)
    indices, _ = decode_dq_tokens(header, streams, model)
    assert torch.equal(indices, model.encode(image[None], budget=0.5).indices)


def test_dq_triple_grain_round_trip():
    seed(3)
    model = create("dqvae-triple-tiny").eval()
    image = _image(40, 30, 9)
    data = encode(model, image, budget=(0.25, 0.25)).data
    header, streams = unpack(data)
    indices, grain = decode_dq_tokens(header, streams, model)
    expected = model.encode(_tiles(image, 32), budget=(0.25, 0.25))
    assert torch.equal(indices, expected.indices) and torch.equal(grain, expected.grain)
    assert set(grain.unique().tolist()) == {0, 1, 2}


def test_dq_wrong_model_and_corrupt_counts(dq, cae):
    data = encode(dq, _image(32, 32), budget=0.5, name="dqvae-tiny").data
    with pytest.raises(CodecError, match="wrong model"):
        decompress_dq(data, create("dqvae-tiny").eval(), name="dqvae-tiny")
    with pytest.raises(CodecError, match="not a CAE file"):
        decompress_cae(data, cae)
    header, streams = unpack(data)
    lying = pack(dataclasses.replace(header, params=(header.params[0] + 1, header.params[1] - 1)), streams)
    with pytest.raises(CodecError, match="corrupted file"):
        decompress_dq(lying, dq, name="dqvae-tiny")


def test_dq_uses_public_c2f_order(dq):
    """The code stream holds the codes in dqfast.c2f_flatten order: coarse codes, then fine ones."""
    image = _image(32, 32, 10)
    tokens = dq.encode(image[None], budget=0.25)
    c2f = dqfast.c2f_flatten(tokens.indices, tokens.grain)
    expected = torch.cat([c2f.codes[g][0, : c2f.lengths[0, g]] for g in range(2)]).numpy()
    header, streams = unpack(encode(dq, image, budget=0.25).data)
    from dqfast.codec.dq_codec import _tables

    code_tables = _tables(dq, header.params)[3]
    assert np.array_equal(decode_rows(streams[1], code_tables, len(expected))[0], expected)
