"""Run a fully convolutional network over overlapping spatial tiles and stitch the centres.

Memory of a convolutional encoder or decoder grows with the image; running it tile by tile bounds
it by the tile. Each tile is read with a *halo* of extra input on every side that is not image
border, the network runs on the enlarged window, and only the output of the tile's own region
(its *core*) is kept. When the halo covers the network's receptive-field radius (in input
pixels), the kept output equals the whole-image run up to float rounding: the zero padding a
convolution applies at a window edge only reaches outputs within its radius of that edge, which
lie in the discarded halo. Windows touching the image border see the same border as the
whole-image run.

This holds for *local* networks (convolutions, pointwise activations, per-pixel normalisations
such as GDN); a layer with global statistics (GroupNorm, attention) makes every output depend on
the whole input, and tiling changes the result.

The networks may change the resolution by a rational factor ``scale = num / den`` (an encoder
with three stride-2 stages: ``(1, 8)``; a decoder with three 2x upsamplings: ``(8, 1)``). Core
boundaries, halos and the input size must then be multiples of ``den`` so every output pixel maps
back to a whole number of input pixels.

    y = run_tiled(encoder, x, tile=256, halo=32, scale=(1, 8))
    for (oy, ox), block in iter_tiles(decoder, latents, tile=32, halo=4, scale=(8, 1)):
        write_rows(oy, ox, block)  # stream to disk without holding the whole output

:func:`pick_tile_size` chooses the largest tile that fits a memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

__all__ = ["Span", "tile_spans", "iter_tiles", "run_tiled", "pick_tile_size"]

Scale = tuple[int, int]


class Span:
    """One tile along one axis: the input window ``[start, stop)`` and its core ``[core_start, core_stop)``."""

    __slots__ = ("start", "stop", "core_start", "core_stop")

    def __init__(self, start: int, stop: int, core_start: int, core_stop: int):
        self.start, self.stop, self.core_start, self.core_stop = start, stop, core_start, core_stop

    def __repr__(self) -> str:
        return f"Span(window={self.start}:{self.stop}, core={self.core_start}:{self.core_stop})"


def _check_scale(scale: Scale) -> tuple[int, int]:
    num, den = scale
    if not (isinstance(num, int) and isinstance(den, int)) or num < 1 or den < 1:
        raise ValueError(f"scale must be a (num, den) pair of positive integers, got {scale!r}")
    g = math.gcd(num, den)
    return num // g, den // g


def tile_spans(length: int, tile: int, halo: int, align: int = 1) -> list[Span]:
    """Cores of ``tile`` input pixels covering ``[0, length)``, each with ``halo`` pixels on each inner side.

    ``tile`` and ``halo`` must be multiples of ``align``; the last core may be shorter.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if tile < 1 or tile % align:
        raise ValueError(f"tile must be a positive multiple of {align}, got {tile}")
    if halo < 0 or halo % align:
        raise ValueError(f"halo must be a non-negative multiple of {align}, got {halo}")
    spans = []
    for core_start in range(0, length, tile):
        core_stop = min(core_start + tile, length)
        spans.append(Span(max(0, core_start - halo), min(length, core_stop + halo), core_start, core_stop))
    return spans


def iter_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int | tuple[int, int],
    halo: int | tuple[int, int],
    scale: Scale = (1, 1),
) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """Yield ``((out_y, out_x), block)`` for every tile of ``x`` (..., H, W), rows first.

    ``block`` is ``fn``'s output for the tile's core, cropped from its run on the enlarged window;
    ``(out_y, out_x)`` is where the block goes in the whole output (``H * num / den`` rows).
    ``fn`` must map a (..., h, w) window to (..., h * num / den, w * num / den).
    """
    num, den = _check_scale(scale)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    hh, hw = (halo, halo) if isinstance(halo, int) else halo
    H, W = x.shape[-2:]
    if H % den or W % den:
        raise ValueError(f"the input size {H}x{W} must be a multiple of the scale's denominator {den}")
    rows, cols = tile_spans(H, th, hh, den), tile_spans(W, tw, hw, den)
    for r in rows:
        for c in cols:
            window = x[..., r.start : r.stop, c.start : c.stop]
            y = fn(window)
            expected = ((r.stop - r.start) * num // den, (c.stop - c.start) * num // den)
            if tuple(y.shape[-2:]) != expected:
                raise ValueError(
                    f"fn mapped a {r.stop - r.start}x{c.stop - c.start} window to {tuple(y.shape[-2:])}, "
                    f"expected {expected} for scale {num}/{den}"
                )
            y0, y1 = (r.core_start - r.start) * num // den, (r.core_stop - r.start) * num // den
            x0, x1 = (c.core_start - c.start) * num // den, (c.core_stop - c.start) * num // den
            yield (r.core_start * num // den, c.core_start * num // den), y[..., y0:y1, x0:x1]


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int | tuple[int, int],
    halo: int | tuple[int, int],
    scale: Scale = (1, 1),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fn(x)`` computed tile by tile (see :func:`iter_tiles`) and stitched into one tensor.

    x: (..., H, W) -> (..., H * num / den, W * num / den). ``out``: an optional preallocated output
    (any dtype and device; blocks are cast into it), e.g. a uint8 image to keep the peak low.
    """
    num, den = _check_scale(scale)
    H, W = x.shape[-2:]
    for (oy, ox), block in iter_tiles(fn, x, tile=tile, halo=halo, scale=scale):
        if out is None:
            shape = (*block.shape[:-2], H * num // den, W * num // den)
            out = torch.empty(shape, dtype=block.dtype, device=block.device)
        out[..., oy : oy + block.shape[-2], ox : ox + block.shape[-1]] = block
    return out


def pick_tile_size(
    budget_bytes: float,
    bytes_per_pixel: float,
    *,
    halo: int,
    align: int = 1,
    min_tile: int | None = None,
    max_tile: int | None = None,
) -> int:
    """The largest square core side (a multiple of ``align``) whose window fits ``budget_bytes``.

    ``bytes_per_pixel``: the network's peak working memory per *input* pixel of a window (measure
    it once on a small input, activations of the widest layers included). The window of a core of
    side t is (t + 2 * halo)^2 pixels. Raises ValueError when not even ``min_tile`` (default
    ``align``) fits.
    """
    if not budget_bytes > 0 or not bytes_per_pixel > 0:
        raise ValueError(f"budget_bytes and bytes_per_pixel must be positive, got {budget_bytes}, {bytes_per_pixel}")
    if align < 1 or halo < 0:
        raise ValueError(f"align must be >= 1 and halo >= 0, got {align}, {halo}")
    lowest = min_tile if min_tile is not None else align
    side = math.isqrt(int(budget_bytes / bytes_per_pixel)) - 2 * halo
    side -= side % align
    if max_tile is not None:
        side = min(side, max_tile - max_tile % align)
    if side < lowest:
        need = (lowest + 2 * halo) ** 2 * bytes_per_pixel / 2**20
        raise ValueError(
            f"a {lowest}-pixel tile with a {halo}-pixel halo needs {need:.0f} MiB, "
            f"over the budget of {budget_bytes / 2**20:.0f} MiB"
        )
    return side
