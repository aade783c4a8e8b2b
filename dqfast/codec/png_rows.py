"""Read an 8-bit PNG a band of rows at a time, top to bottom, without decoding the whole image.

Pillow decodes a PNG whole, into 4 bytes per pixel for RGB (576 MB for 12000 x 12000). The
variable-rate CAE reads its input a band at a time, so for the common PNGs (8 bits per channel,
not interlaced, gray, RGB or with alpha) :class:`PngRows` inflates the IDAT stream as the bands
are asked for and keeps only the rows of the current band. The unfiltering is Pillow's own: the
filtered rows of a band, preceded by the last decoded row stored unfiltered, go through Pillow's
PNG row decoder, so the pixels are exactly those of ``Image.open(path)``.

    rows = PngRows.open("big.png")  # None: not a PNG this reader streams (use Pillow)
    band = rows.crop((0, y0, rows.size[0], y1))  # a Pillow image in the PNG's mode
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

__all__ = ["PngRows"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Colour types read here (8 bits per sample): their Pillow mode and samples per pixel.
_MODES = {0: ("L", 1), 2: ("RGB", 3), 4: ("LA", 2), 6: ("RGBA", 4)}
# Compressed bytes read from the file at a time.
_READ = 1 << 20


class PngRows:
    """A non-interlaced 8-bit gray, RGB, gray + alpha or RGBA PNG, read in bands of rows.

    ``size`` is (W, H) and ``mode`` the Pillow mode, as for a Pillow image; :meth:`crop` with a
    full-width box returns the rows as a Pillow image. Bands must come top to bottom: a band may
    start above the end of the previous one (overlapping halos), not above its start.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, color_type: int, idat: int):
        self.path = os.fspath(path)
        self.size = (width, height)
        self.mode, self._channels = _MODES[color_type]
        self._stride = 1 + width * self._channels  # the filter byte, then the samples
        self._file = open(self.path, "rb")  # noqa: SIM115  (closed by close() or at the last row)
        self._file.seek(idat)
        self._chunk_left = 0  # bytes of the current IDAT chunk not yet read
        self._idat_done = False
        self._inflate = zlib.decompressobj()
        self._rows = np.zeros((0, width * self._channels), np.uint8)  # decoded rows [start, end)
        self._start = 0

    @classmethod
    def open(cls, path: str | os.PathLike) -> PngRows | None:
        """A reader for the PNG at ``path``, or None when it is not one this reader streams
        (another format, another bit depth or colour type, interlaced, animated)."""
        try:
            with open(path, "rb") as f:
                if f.read(8) != _SIGNATURE:
                    return None
                length, kind = struct.unpack(">I4s", f.read(8))
                if kind != b"IHDR" or length != 13:
                    return None
                width, height, depth, color_type, compression, filtering, interlace = struct.unpack(
                    ">IIBBBBB", f.read(13)
                )
                f.read(4)
                if depth != 8 or color_type not in _MODES or (compression, filtering, interlace) != (0, 0, 0):
                    return None
                if not (1 <= width and 1 <= height):
                    return None
                while True:  # to the first IDAT chunk
                    head = f.read(8)
                    if len(head) < 8:
                        return None
                    length, kind = struct.unpack(">I4s", head)
                    if kind == b"IDAT":
                        idat = f.tell() - 8
                        break
                    if kind in (b"acTL", b"IEND"):  # animated: Pillow decides which frame is the image
                        return None
                    f.seek(length + 4, os.SEEK_CUR)
        except (OSError, struct.error):
            return None
        return cls(path, width, height, color_type, idat)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PngRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def crop(self, box: tuple[int, int, int, int]) -> Image.Image:
        """Rows ``box[1] .. box[3]`` (the full width: ``box[0] == 0``, ``box[2] == W``) as a Pillow image."""
        x0, y0, x1, y1 = box
        W, H = self.size
        if (x0, x1) != (0, W) or not 0 <= y0 < y1 <= H:
            raise ValueError(f"PngRows reads full-width bands of rows inside the image, got box {box}")
        if y0 < self._start:
            raise ValueError(f"PngRows reads top to bottom: rows from {y0} asked after rows from {self._start}")
        end = self._start + len(self._rows)
        fresh = self._decode(end, y1 - end) if y1 > end else self._rows[:0]
        kept = self._rows[max(0, y0 - self._start) :]
        self._rows = np.concatenate([kept, fresh[max(0, y0 - end) :]]) if len(fresh) else kept
        self._start = y0
        if y1 == H:
            self._file.close()
        band = self._rows[: y1 - y0].reshape(y1 - y0, W, self._channels)
        return Image.fromarray(band[..., 0] if self._channels == 1 else band)

    def _decode(self, y: int, n: int) -> np.ndarray:
        """Rows y .. y + n (the rows above y already decoded) -> (n, W * channels) uint8."""
        need = n * self._stride
        parts, have = [], 0
        while have < need:
            if self._inflate.unconsumed_tail:
                data = self._inflate.unconsumed_tail
            elif self._inflate.eof:
                raise ValueError(f"cannot read {self.path}: the PNG's image data ends before row {y + n}")
            else:
                data = self._read_idat()
                if not data:
                    raise ValueError(f"cannot read {self.path}: the PNG's image data ends before row {y + n}")
            try:
                out = self._inflate.decompress(data, need - have)
            except zlib.error as e:
                raise ValueError(f"cannot read {self.path}: damaged PNG image data ({e})") from None
            parts.append(out)
            have += len(out)
        filtered = b"".join(parts)
        W = self.size[0]
        if y == 0:
            prefix, rows = b"", n
        else:  # the row above, unfiltered (filter type 0): the next rows' filters read it
            prefix, rows = b"\x00" + self._rows[-1].tobytes(), n + 1
        try:
            band = Image.frombytes(self.mode, (W, rows), zlib.compress(prefix + filtered, 0), "zip", self.mode)
        except (ValueError, OSError) as e:
            raise ValueError(f"cannot read {self.path}: damaged PNG image data ({e})") from None
        decoded = np.asarray(band).reshape(rows, W * self._channels)
        return decoded[rows - n :]

    def _read_idat(self) -> bytes:
        """The next compressed bytes of the IDAT chunks (b"" after the last one)."""
        while not self._chunk_left:
            if self._idat_done:
                return b""
            head = self._file.read(8)
            if len(head) < 8:
                self._idat_done = True
                return b""
            length, kind = struct.unpack(">I4s", head)
            if kind != b"IDAT":
                self._idat_done = True
                return b""
            self._chunk_left = length
            if not length:
                self._file.read(4)
        data = self._file.read(min(self._chunk_left, _READ))
        if not data:
            self._idat_done = True
            return b""
        self._chunk_left -= len(data)
        if not self._chunk_left:
            self._file.read(4)  # the chunk's CRC
        return data
