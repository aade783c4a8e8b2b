"""Result types shared by the reference, the kernels and the public API."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["VQOutput", "DynamicVQOutput", "C2FTokens"]


class VQOutput(NamedTuple):
    """Result of :func:`dqfast.vector_quantize`.

    quantized: (..., D) the chosen codes (normalised codes for ``metric="cosine"``), carrying
        the straight-through gradient to ``z``.
    indices: (...) int64, argmin over the codebook, ties to the lowest index.
    distance: (...) float32, distance to the chosen code (squared L2, or 1 - cos).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    distance: torch.Tensor


class DynamicVQOutput(NamedTuple):
    """Result of :func:`dqfast.dynamic_quantize`.

    quantized: (B, D, Hf, Wf) every region's codes broadcast (nearest) to the finest grid,
        straight-through to the chosen features.
    indices: (B, Hf, Wf) int64, broadcast the same way.
    grain: (B, H, W) int64, the grain of every coarse region.
    loss: () float32, ``beta * commitment + codebook`` term, every coded vector weighted once.
    n_codes: (B,) int64, ``sum(4 ** grain)`` per image: the variable code length.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    grain: torch.Tensor
    loss: torch.Tensor
    n_codes: torch.Tensor


class C2FTokens(NamedTuple):
    """The coarse-to-fine token sequence of :func:`dqfast.c2f_flatten`.

    codes: tuple of G tensors, coarsest first; ``codes[g]`` is (B, H * W * 4**g) int64: the codes
        coded at grain g, in raster order over the grain-g grid (H * 2**g, W * 2**g) restricted to
        regions of grain g, padded with -1 after ``lengths[:, g]`` entries.
    positions: tuple of G tensors shaped like ``codes``: the raster index of each code's cell in
        the grain-g grid, -1 on padding.
    lengths: (B, G) int64, how many codes each image has at each grain.
    grid_size: (H, W) of the coarsest grid.
    """

    codes: tuple[torch.Tensor, ...]
    positions: tuple[torch.Tensor, ...]
    lengths: torch.Tensor
    grid_size: tuple[int, int]
