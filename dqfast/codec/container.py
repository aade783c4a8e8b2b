"""The dqfast file format: a small versioned header, the entropy-coded streams and a CRC32.

Layout (all integers little-endian)::

    magic          4 bytes  b"\\x89DQF" (the high first byte catches text-mode transfers, as in PNG)
    version        u8       FORMAT_VERSION
    kind           u8       1 = cae, 2 = dqvae
    model name     u8 length + utf-8 bytes
    weights hash   8 bytes  first 8 bytes of the sha256 of the model's state_dict (model_fingerprint)
    tables hash    u32      CRC32 of the quantised tables the encoder derived from the model
    image size     u32 H, u32 W
    channels       u8       channels of the original image (the codec always codes 3)
    padded size    u32 Hp, u32 Wp   the size the network saw; the decoder crops back to H x W
    latent shape   u8 n + n x u32   codec-specific (CAE: C, h, w; DQ-VAE: G, H, W of the coarse grid)
    setting        f64      the rate setting (DQ-VAE: budget; CAE: NaN)
    params         u8 n + n x i32   codec-specific integers (CAE: table range lo, hi; DQ-VAE: regions per grain)
    streams        u8 n + n x u32 byte lengths, then the streams (uint32 words, little-endian)
    crc32          u32      zlib.crc32 of every byte before it

The whole file counts towards the bit rate: ``bpp = len(file) * 8 / (H * W)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "CodecError",
    "Compressed",
    "Header",
    "pack",
    "unpack",
    "model_fingerprint",
    "check_model",
    "check_image",
    "check_source_channels",
    "check_header",
    "DEFAULT_MAX_PIXELS",
    "pixel_limit",
    "max_pixels",
]

MAGIC = b"\x89DQF"
# 2: every entropy-coded stream ends with an end mark (dqfast.codec.entropy.END_MARK).
FORMAT_VERSION = 2
_KIND_CODES = {"cae": 1, "dqvae": 2}
_KIND_NAMES = {v: k for k, v in _KIND_CODES.items()}

# Largest image a file may claim before anything is allocated for it: 2**28 pixels (268 megapixels,
# over five times a 50-megapixel photo; 16384 x 16384). A file claiming more is refused from its
# header; raise the limit with :func:`pixel_limit` (the CLI's ``--max-pixels``).
DEFAULT_MAX_PIXELS = 1 << 28
# The codecs pad to whole network tiles (CAE: 8 pixels, at least 16; DQ-VAE: the tile side).
_MAX_PADDING = 1024
_MAX_LATENT_DIMS = 8
_PIXEL_LIMIT: contextvars.ContextVar[int] = contextvars.ContextVar("dqfast_max_pixels", default=DEFAULT_MAX_PIXELS)


def max_pixels() -> int:
    """The pixel limit in force (see :func:`pixel_limit`)."""
    return _PIXEL_LIMIT.get()


@contextlib.contextmanager
def pixel_limit(limit: int) -> Iterator[None]:
    """Within the block, :func:`unpack` refuses files claiming more than ``limit`` pixels (H * W)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the pixel limit must be a positive integer, got {limit!r}")
    token = _PIXEL_LIMIT.set(limit)
    try:
        yield
    finally:
        _PIXEL_LIMIT.reset(token)


class CodecError(ValueError):
    """A file that cannot be decoded (empty, not dqfast, truncated, corrupted, wrong model); one-line message."""


@dataclass(frozen=True)
class Header:
    kind: str
    model_name: str
    weights_hash: bytes
    tables_hash: int
    image_size: tuple[int, int]
    channels: int
    padded_size: tuple[int, int]
    latent_shape: tuple[int, ...]
    setting: float = math.nan
    params: tuple[int, ...] = field(default=())

    @property
    def pixels(self) -> int:
        return self.image_size[0] * self.image_size[1]


@dataclass(frozen=True)
class Compressed:
    """A compressed image: the file bytes and its rates.

    bpp counts the whole file (header and CRC included); estimated_bpp is the model's own
    estimate, the ideal code length of the coded symbols under its float probabilities.
    """

    data: bytes
    header: Header
    estimated_bits: float

    @property
    def bpp(self) -> float:
        return len(self.data) * 8 / self.header.pixels

    @property
    def estimated_bpp(self) -> float:
        return self.estimated_bits / self.header.pixels


def check_image(image: torch.Tensor) -> torch.Tensor:
    """image: (3, H, W) floating point in [0, 1] -> the same as a (1, 3, H, W) float32 batch."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point in [0, 1], got {image.dtype}")
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ValueError("image values must be finite and lie in [0, 1]")
    if max(image.shape[1:]) > 0xFFFF:
        raise ValueError(f"image sides must be at most 65535 pixels, got {tuple(image.shape[1:])}")
    return image.float()[None]


def check_source_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"source_channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return channels


def model_fingerprint(model: nn.Module) -> bytes:
    """First 8 bytes of the sha256 over the model's state_dict: names, dtypes, shapes and raw bytes, sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:8]


def check_model(header: Header, name: str, fingerprint: bytes) -> None:
    """Raise :class:`CodecError` unless the decoding model is the one the file was made with."""
    if header.model_name != name or header.weights_hash != fingerprint:
        raise CodecError(
            f"wrong model: the file was made with {header.model_name!r} (weights {header.weights_hash.hex()}), "
            f"not {name!r} (weights {fingerprint.hex()})"
        )


def pack(header: Header, streams: list[np.ndarray]) -> bytes:
    """Serialise ``header`` and the uint32 word ``streams`` into one file."""
    if header.kind not in _KIND_CODES:
        raise ValueError(f"kind must be one of {sorted(_KIND_CODES)}, got {header.kind!r}")
    name = header.model_name.encode("utf-8")
    if len(name) > 255:
        raise ValueError(f"model name is longer than 255 bytes: {header.model_name!r}")
    if len(header.weights_hash) != 8:
        raise ValueError(f"weights_hash must be 8 bytes, got {len(header.weights_hash)}")
    for what, seq in (("latent_shape", header.latent_shape), ("params", header.params)):
        if len(seq) > 255:
            raise ValueError(f"{what} has more than 255 entries")
    payloads = [np.ascontiguousarray(s, dtype="<u4").tobytes() for s in streams]
    if len(payloads) > 255:
        raise ValueError("at most 255 streams")

    out = bytearray()
    out += MAGIC
    out += struct.pack("<BB", FORMAT_VERSION, _KIND_CODES[header.kind])
    out += struct.pack("<B", len(name)) + name
    out += header.weights_hash
    out += struct.pack("<I", header.tables_hash & 0xFFFFFFFF)
    out += struct.pack("<II", *header.image_size)
    out += struct.pack("<B", header.channels)
    out += struct.pack("<II", *header.padded_size)
    out += struct.pack(f"<B{len(header.latent_shape)}I", len(header.latent_shape), *header.latent_shape)
    out += struct.pack("<d", header.setting)
    out += struct.pack(f"<B{len(header.params)}i", len(header.params), *header.params)
    out += struct.pack(f"<B{len(payloads)}I", len(payloads), *(len(p) for p in payloads))
    for p in payloads:
        out += p
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise CodecError(f"truncated file: the header ends after {len(self.data)} bytes")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def raw(self, n: int) -> bytes:
        return self.take(f"{n}s")[0]


def check_header(header: Header, limit: int | None = None) -> Header:
    """Raise :class:`CodecError` unless every field of ``header`` is one an encoder can write.

    Checked before anything is allocated for the image: sides >= 1 and H * W <= ``limit`` (default
    :func:`max_pixels`), channels 1 or 3, a padded size at least the image and at most
    ``_MAX_PADDING`` more, a latent shape of positive entries no larger than the padded image,
    and a rate setting the codec makes (CAE: a positive finite quality; DQ-VAE: NaN or a budget in
    [0, 1]).
    """
    limit = max_pixels() if limit is None else limit
    H, W = header.image_size
    if H < 1 or W < 1:
        raise CodecError(f"corrupted file: the image size {W}x{H} has a zero side")
    if H * W > limit:
        raise CodecError(
            f"the file claims a {W}x{H} image ({H * W} pixels), over the limit of {limit} pixels "
            "(raise it with --max-pixels if the file is trusted)"
        )
    if header.channels not in (1, 3):
        raise CodecError(f"corrupted file: {header.channels} source channels (expected 1 or 3)")
    Hp, Wp = header.padded_size
    if not (H <= Hp <= H + _MAX_PADDING and W <= Wp <= W + _MAX_PADDING):
        raise CodecError(f"corrupted file: padded size {Wp}x{Hp} does not fit a {W}x{H} image")
    shape = header.latent_shape
    if not 1 <= len(shape) <= _MAX_LATENT_DIMS or min(shape) < 1 or math.prod(shape) > 1024 * Hp * Wp:
        raise CodecError(f"corrupted file: latent shape {shape} does not fit a {W}x{H} image")
    s = header.setting
    if header.kind == "cae" and not (math.isfinite(s) and s > 0):
        raise CodecError(f"corrupted file: quality {s} is not a positive number")
    if header.kind == "dqvae" and not (math.isnan(s) or 0.0 <= s <= 1.0):
        raise CodecError(f"corrupted file: budget {s} is not a fraction in [0, 1]")
    return header


def unpack(data: bytes, *, limit: int | None = None) -> tuple[Header, list[np.ndarray]]:
    """Parse a file made by :func:`pack`; raise :class:`CodecError` with a one-line reason on bad input.

    Every header field is validated (:func:`check_header`, ``limit`` pixels at most) before the
    streams are copied out.
    """
    data = bytes(data)
    if not data:
        raise CodecError("empty file: not a dqfast bitstream")
    if not data.startswith(MAGIC) and not MAGIC.startswith(data):
        raise CodecError("not a dqfast file (bad magic bytes)")
    r = _Reader(data)
    r.raw(len(MAGIC))
    (version,) = r.take("<B")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported dqfast format version {version} (this dqfast reads version {FORMAT_VERSION})")
    (kind_code,) = r.take("<B")
    (name_len,) = r.take("<B")
    name_bytes = r.raw(name_len)
    weights_hash = r.raw(8)
    (tables_hash,) = r.take("<I")
    image_size = r.take("<II")
    (channels,) = r.take("<B")
    padded_size = r.take("<II")
    (n_latent,) = r.take("<B")
    latent_shape = r.take(f"<{n_latent}I")
    (setting,) = r.take("<d")
    (n_params,) = r.take("<B")
    params = r.take(f"<{n_params}i")
    (n_streams,) = r.take("<B")
    lengths = r.take(f"<{n_streams}I")

    expected = r.pos + sum(lengths) + 4
    if len(data) < expected:
        raise CodecError(f"truncated file: {len(data)} bytes, the header announces {expected}")
    if len(data) > expected:
        raise CodecError(f"corrupted file: {len(data) - expected} unexpected bytes after the data")
    (stored_crc,) = struct.unpack_from("<I", data, expected - 4)
    if zlib.crc32(data[: expected - 4]) != stored_crc:
        raise CodecError("corrupted file: CRC32 mismatch")

    if kind_code not in _KIND_NAMES:
        raise CodecError(f"corrupted file: unknown codec kind {kind_code}")
    try:
        model_name = name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("corrupted file: the model name is not utf-8") from None
    header = Header(
        kind=_KIND_NAMES[kind_code],
        model_name=model_name,
        weights_hash=weights_hash,
        tables_hash=tables_hash,
        image_size=tuple(image_size),
        channels=channels,
        padded_size=tuple(padded_size),
        latent_shape=tuple(latent_shape),
        setting=setting,
        params=tuple(params),
    )
    check_header(header, limit)
    streams = []
    for n in lengths:
        if n % 4:
            raise CodecError(f"corrupted file: a stream of {n} bytes is not whole 32-bit words")
        streams.append(np.frombuffer(r.raw(n), dtype="<u4").astype(np.uint32))
    return header, streams
