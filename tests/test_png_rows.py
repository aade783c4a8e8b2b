"""PngRows: a PNG read a band at a time gives exactly Pillow's pixels, or declines the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dqfast.codec.png_rows import PngRows

# PNG colour type of an 8-bit image with C samples per pixel.
_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _filtered_png(path: Path, pixels: np.ndarray, rng: np.random.Generator, idat_size: int = 999) -> None:
    """Write (H, W, C) uint8 ``pixels`` with a random filter type per row (all five occur), the
    compressed data split over many IDAT chunks, an ancillary chunk before them."""
    H, W, C = pixels.shape
    rows = pixels.reshape(H, W * C).astype(np.int16)
    lines, previous = [], np.zeros(W * C, np.int16)
    for y in range(H):
        kind = y % 5 if y < 5 else int(rng.integers(0, 5))
        row = rows[y]
        left = np.concatenate([np.zeros(C, np.int16), row[:-C]])
        up_left = np.concatenate([np.zeros(C, np.int16), previous[:-C]])
        if kind == 4:
            estimate = left + previous - up_left
            pa, pb, pc = (np.abs(estimate - v) for v in (left, previous, up_left))
            predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, up_left))
        else:
            predicted = (np.zeros_like(row), left, previous, (left + previous) // 2)[kind]
        lines.append(bytes([kind]) + ((row - predicted) & 0xFF).astype(np.uint8).tobytes())
        previous = row
    data = zlib.compress(b"".join(lines), 6)
    header = struct.pack(">IIBBBBB", W, H, 8, _COLOR_TYPE[C], 0, 0, 0)
    idat = b"".join(_chunk(b"IDAT", data[i : i + idat_size]) for i in range(0, len(data), idat_size))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"tEXt", b"k\x00v") + idat + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_bands_equal_pillows_pixels(tmp_path, channels):
    rng = np.random.default_rng(channels)
    H, W = 61, 37
    # Smooth and noisy rows alike, so every filter sees small and large differences.
    pixels = (rng.integers(0, 256, (H, W, channels)) // rng.integers(1, 60, (H, 1, 1))).astype(np.uint8)
    path = tmp_path / "x.png"
    _filtered_png(path, pixels, rng)
    with Image.open(path) as img:
        expected = np.asarray(img).reshape(H, W, channels)
        mode = img.mode
    assert np.array_equal(expected, pixels)
    for _ in range(10):
        with PngRows.open(path) as rows:
            assert rows.size == (W, H) and rows.mode == mode
            y0 = 0
            while y0 < H:
                y1 = min(H, y0 + int(rng.integers(1, 16)))
                band = rows.crop((0, y0, W, y1))
                assert band.mode == mode
                assert np.array_equal(np.asarray(band).reshape(y1 - y0, W, channels), expected[y0:y1])
                # Overlapping bands (halos) and skipped rows both occur.
                y0 = y1 if y1 == H else int(rng.integers(max(y0, y1 - 5), min(H, y1 + 3)))
            with pytest.raises(ValueError, match="top to bottom"):
                rows.crop((0, 0, W, 1))


def test_declines_what_it_does_not_stream(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    assert PngRows.open(tmp_path / "rgb.png") is not None
    data = (tmp_path / "rgb.png").read_bytes()
    ihdr = bytearray(data[16:29])
    ihdr[12] = 1  # Adam7 (Pillow writes no interlaced PNGs)
    (tmp_path / "interlaced.png").write_bytes(data[:8] + _chunk(b"IHDR", bytes(ihdr)) + data[33:])
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 200).save(tmp_path / "deep.png")
    Image.fromarray(pixels).save(tmp_path / "x.jpg")
    frames = [Image.fromarray(pixels), Image.fromarray(255 - pixels)]
    frames[0].save(tmp_path / "animated.png", save_all=True, append_images=frames[1:])
    for name in ("interlaced.png", "palette.png", "deep.png", "x.jpg", "animated.png", "missing.png"):
        assert PngRows.open(tmp_path / name) is None, name


def test_damaged_data_is_a_value_error(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    _filtered_png(path, pixels, rng, idat_size=100)
    data = path.read_bytes()
    (tmp_path / "short.png").write_bytes(data[: len(data) // 2])
    with PngRows.open(tmp_path / "short.png") as rows, pytest.raises(ValueError, match="ends before row"):
        rows.crop((0, 0, 30, 40))
    damaged = bytearray(data)
    start = data.index(b"IDAT") + 4
    damaged[start : start + 2] = b"\x00\x00"  # not a zlib header
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    with PngRows.open(tmp_path / "damaged.png") as rows, pytest.raises(ValueError, match="damaged PNG image data"):
        rows.crop((0, 0, 30, 40))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_banded_cae_codes_a_streamed_png_as_its_pillow_image(tmp_path, monkeypatch, channels):
    import torch

    from dqfast.codec import cae_hyper_codec as hc
    from dqfast.models import create
    from tests.test_cae_hyper import _banded

    _banded(monkeypatch)
    torch.manual_seed(0)
    model = create("cae-hyper-tiny").eval()
    rng = np.random.default_rng(channels)
    pixels = (rng.integers(0, 256, (200, 75, channels)) // rng.integers(1, 8, (200, 1, 1))).astype(np.uint8)
    path = tmp_path / "x.png"
    _filtered_png(path, pixels, rng)
    gray = channels <= 2
    with Image.open(path) as img:
        img.load()
        from_pillow = hc.encode_hyper(model, img, quality=1.5, source_channels=1 if gray else 3)
    with PngRows.open(path) as rows:
        streamed = hc.encode_hyper(model, rows, quality=1.5, source_channels=1 if gray else 3)
    assert len(hc._Plan(model, 200, 75).bands) > 2
    assert streamed.data == from_pillow.data


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_dqvae_codes_a_streamed_png_as_its_pillow_image(tmp_path, channels):
    """The DQ-VAE codec reads a row of tiles at a time: from a PngRows as from the Pillow image."""
    import torch

    from dqfast.codec.dq_codec import encode_dq
    from dqfast.models import create

    torch.manual_seed(0)
    model = create("dqvae-tiny").eval()  # 32 x 32 tiles: 3 rows of tiles below
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (70, 45, channels)).astype(np.uint8)
    path = tmp_path / "x.png"
    _filtered_png(path, pixels, rng)
    with Image.open(path) as img:
        img.load()
        from_pillow = encode_dq(model, img, budget=0.5, source_channels=1 if channels == 1 else 3)
    with PngRows.open(path) as rows:
        streamed = encode_dq(model, rows, budget=0.5, source_channels=1 if channels == 1 else 3)
    assert streamed.data == from_pillow.data
