"""Sub-pixel convolution (ESPCN's "efficient sub-pixel convolution layer"), the reference.

``subpixel_conv2d`` is the executable spec of ``dqfast.subpixel_conv2d``: a "same" convolution
on the low-resolution grid producing ``Cout * r**2`` channels, an optional activation, then the
pixel shuffle that moves each group of ``r**2`` channels into an ``r x r`` block of pixels.

``fold_upsample_conv`` rewrites the resize-convolution ``conv(nearest_upsample(x))`` (the VQGAN /
DQ-VAE decoder upsampler) as an exactly equivalent sub-pixel convolution on the low-res grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "ACTIVATIONS",
    "PADDING_MODES",
    "FOLDABLE_PADDING_MODES",
    "apply_activation",
    "subpixel_conv2d",
    "fold_upsample_conv",
    "folded_kernel_size",
    "empty_result",
]

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "silu")
PADDING_MODES = ("zeros", "reflect", "replicate")

# Padding modes for which nearest-upsample + conv folds exactly (see fold_upsample_conv).
FOLDABLE_PADDING_MODES = ("zeros", "replicate")

# F.pad names for the padding modes (nn.Conv2d calls zero padding "zeros").
_F_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def apply_activation(y: torch.Tensor, activation: str | None, negative_slope: float = 0.01) -> torch.Tensor:
    """Elementwise activation by name; ``negative_slope`` is used by ``"leaky_relu"`` only.

    ``"gelu"`` is the exact erf form, 0.5 * y * (1 + erf(y / sqrt(2))), not the tanh approximation.
    """
    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "gelu":
        return F.gelu(y, approximate="none")
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def subpixel_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    upscale: int,
    padding_mode: str = "zeros",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``pixel_shuffle(act(conv2d(pad(x), weight, bias)), upscale)``.

    x: (B, Cin, H, W); weight: (Cout * r**2, Cin, k, k), k odd; bias: (Cout * r**2,) or None.
    Returns (B, Cout, r * H, r * W), in the dtype of x. Output channel c, pixel
    (r * i + a, r * j + b) comes from conv channel c * r**2 + a * r + b at (i, j), as in
    ``torch.nn.PixelShuffle``. Inputs are assumed validated by :func:`dqfast.subpixel_conv2d`.
    B, H or W = 0 gives the empty (B, Cout, r * H, r * W) output, whose gradients are empty for x
    and zero for weight and bias (any padding mode).
    """
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        cout = weight.shape[0] // (upscale * upscale)
        return empty_result(x, weight, bias, (x.shape[0], cout, upscale * x.shape[2], upscale * x.shape[3]))
    pad = weight.shape[-1] // 2
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode=_F_PAD_MODE[padding_mode])
    y = F.conv2d(x, weight, bias)
    y = apply_activation(y, activation, negative_slope)
    return rearrange(y, "b (c r1 r2) h w -> b c (h r1) (w r2)", r1=upscale, r2=upscale)


def empty_result(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, ...]
) -> torch.Tensor:
    """An output of ``shape`` holding no elements, still in the autograd graph of x, weight and
    bias, so that backward gives them (empty or zero) gradients like any other call."""
    out = x.new_zeros(shape)
    for t in (x, weight, bias):
        if t is not None and t.requires_grad:
            out = out + t.flatten()[:0].sum()  # a sum over no elements: exactly 0, zero gradient
    return out


def folded_kernel_size(kernel_size: int, scale: int) -> int:
    """Side of the low-res kernel that ``fold_upsample_conv`` makes from a k x k high-res kernel.

    With p = k // 2, phase a in [0, scale) and tap offset d in [-p, p], the low-res offset read is
    floor((a + d) / scale); the folded kernel is the smallest odd square covering all of them.
    Examples: scale 2 turns k = 3 and k = 5 into 3; k = 7 into 5.
    """
    p = kernel_size // 2
    lowest = -p // scale  # floor(-p / scale), a = 0, d = -p
    highest = (scale - 1 + p) // scale  # a = scale - 1, d = p
    return 2 * max(-lowest, highest) + 1


def _phase_taps(kernel_size: int, scale: int, folded: int, dtype, device) -> torch.Tensor:
    """taps[a, o, d] = 1 where phase a, high-res tap d lands on low-res tap o (1-D, per axis).

    Returns (scale, folded, kernel_size). Nearest upsampling repeats each low-res pixel ``scale``
    times, so high-res row scale * i + a + (d - p) is low-res row i + floor((a + d - p) / scale).
    """
    p, q = kernel_size // 2, folded // 2
    taps = torch.zeros(scale, folded, kernel_size, dtype=dtype, device=device)
    for a in range(scale):
        for d in range(kernel_size):
            taps[a, (a + d - p) // scale + q, d] = 1
    return taps


def fold_upsample_conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scale: int = 2,
    padding_mode: str = "zeros",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold ``conv2d(interpolate(x, scale_factor=scale, mode="nearest"), weight, bias, padding=k // 2)``
    into a sub-pixel convolution on the low-res grid.

    weight: (Cout, Cin, k, k), k odd; bias: (Cout,) or None. Returns ``(folded_weight, folded_bias)``
    with folded_weight (Cout * scale**2, Cin, K, K), K = :func:`folded_kernel_size` (k, scale), and
    folded_bias (Cout * scale**2,) or None, such that
    ``subpixel_conv2d(x, folded_weight, folded_bias, upscale=scale, padding_mode=padding_mode)``
    equals the resize-convolution with that padding mode. Output channels are in pixel-shuffle
    order c * scale**2 + a * scale + b for output phase (a, b). Taps no phase reads are zero.

    Exact for ``padding_mode`` "zeros" and "replicate": high-res row Y = scale * i + a + d falls
    outside [0, scale * H) exactly when low-res row i + floor((a + d) / scale) falls outside
    [0, H), and clamping commutes with floor division, so both paddings agree on the two grids.
    "reflect" is refused: it mirrors about the edge pixel on each grid, and the high-res mirror
    of row -1 is row 1, a copy of low-res row 0, while the low-res mirror of row -1 is row 1.
    """
    if padding_mode not in FOLDABLE_PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {FOLDABLE_PADDING_MODES} to fold an upsample + conv exactly, "
            f"got {padding_mode!r} (reflect padding of the upsampled image mirrors about a different "
            "point than reflect padding of the low-res image)"
        )
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise TypeError(f"scale must be an int, got {type(scale).__name__}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] % 2 == 0:
        raise ValueError(f"weight must be (Cout, Cin, k, k) with k odd, got shape {tuple(weight.shape)}")
    k = weight.shape[-1]
    folded = folded_kernel_size(k, scale)
    taps = _phase_taps(k, scale, folded, weight.dtype, weight.device)
    # Sum, for every phase (a, b) and low-res tap (u, v), the high-res taps (d, e) that land there.
    folded_weight = torch.einsum("oidf,aud,bvf->oabiuv", weight, taps, taps)
    folded_weight = rearrange(folded_weight, "o a b i u v -> (o a b) i u v")
    folded_bias = None if bias is None else bias.repeat_interleave(scale * scale)
    return folded_weight, folded_bias


def upsample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: int = 2,
    padding_mode: str = "zeros",
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """The resize-convolution ``act(conv2d(pad(interpolate(x, scale, "nearest")), weight, bias))``.

    x: (B, Cin, H, W); weight: (Cout, Cin, k, k), k odd, "same" padding k // 2 on the upsampled
    grid with ``padding_mode`` zeros or replicate; bias: (Cout,) or None. Returns
    (B, Cout, scale * H, scale * W). Computed as the exactly equal sub-pixel convolution on the
    low-res grid (:func:`fold_upsample_conv`), so the upsampled image is never made. B, H or W = 0
    gives the empty output (see :func:`subpixel_conv2d`).
    """
    folded_weight, folded_bias = fold_upsample_conv(weight, bias, scale=scale, padding_mode=padding_mode)
    return subpixel_conv2d(
        x,
        folded_weight,
        folded_bias,
        upscale=scale,
        padding_mode=padding_mode,
        activation=activation,
        negative_slope=negative_slope,
    )
