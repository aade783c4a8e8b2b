"""Sub-pixel convolution and the folded resize-convolution as composites of torch convolutions.

``subpixel_conv2d`` is ``pixel_shuffle(act(conv2d(x, weight, bias, padding=k // 2)))``, with zero
padding done by the convolution itself (no padded copy of x) and ``F.pad`` for reflect and
replicate, the activation in place when autograd does not record, and the shuffle as one copy of
a permuted view (torch's CPU ``pixel_shuffle`` kernel is about 2x slower than that).

``upsample_conv2d`` (nearest x2 then a 3x3 "same" conv) is computed on the low-res grid by its
2x2-tap phases: output pixel (2i + a, 2j + b) reads only the low-res rows i - 1 + a .. i + a and
columns j - 1 + b .. j + b, so the 3x3 weights fold into four 2x2 kernels, one per phase (16
multiply-adds per input channel and output pixel group instead of the 36 of the conv on the
upsampled image, 2.25x fewer). All four phases run as one convolution with 4 * Cout output
channels over the once-padded input, evaluated at (H + 1) x (W + 1) positions; phase (a, b) is
the (a, b)-shifted H x W window of its channel group, written straight into its place in the
output. Other kernel sizes and scales use the dense folded kernel through conv2d + pixel_shuffle.

The folded weights are cached per weight tensor, keyed on its identity and its version counter
(``Tensor._version``, bumped by every in-place update such as an optimizer step), so inference
does not re-fold every call and an updated weight is never served stale. While autograd records
(a weight or bias that requires grad) the weights are folded afresh in the graph instead.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

__all__ = ["subpixel_conv2d", "upsample_conv2d", "subpixel_conv2d_reasons", "upsample_conv2d_reasons"]

_F_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def _activation(y: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """The activation, in place on the fresh conv output ``y`` when autograd does not record it."""
    if activation is None:
        return y
    inplace = not (torch.is_grad_enabled() and y.requires_grad)
    if activation == "relu":
        return F.relu(y, inplace=inplace)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope, inplace=inplace)
    if activation == "gelu":
        return F.gelu(y, approximate="none")
    if activation == "silu":
        return F.silu(y, inplace=inplace)
    raise ValueError(f"unknown activation {activation!r}")


def _conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: int, padding_mode: str):
    """conv2d with ``pad`` pixels of ``padding_mode`` padding on each side."""
    if pad == 0:
        return F.conv2d(x, weight, bias)
    if padding_mode == "zeros":
        return F.conv2d(x, weight, bias, padding=pad)
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=_F_PAD_MODE[padding_mode]), weight, bias)


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
    """``pixel_shuffle(act(conv2d(pad(x), weight, bias)), upscale)`` (fast path).

    x: (B, Cin, H, W); weight: (Cout * r**2, Cin, k, k), k odd; bias: (Cout * r**2,) or None.
    Returns (B, Cout, r * H, r * W).
    """
    if x.shape[2] == 0 or x.shape[3] == 0:
        # conv2d refuses an empty image; the result is empty, still attached to the graph.
        B, cout = x.shape[0], weight.shape[0] // (upscale * upscale)
        empty = x.new_zeros(B, cout, upscale * x.shape[2], upscale * x.shape[3])
        return empty + (x.sum() + weight.sum() + (0 if bias is None else bias.sum())) * 0
    y = _conv_same(x, weight, bias, weight.shape[-1] // 2, padding_mode)
    return _pixel_shuffle(_activation(y, activation, negative_slope), upscale)


def _pixel_shuffle(y: torch.Tensor, r: int) -> torch.Tensor:
    """``F.pixel_shuffle(y, r)`` as one strided copy of a permuted view.

    torch's CPU pixel_shuffle kernel indexes element by element; the permuted copy (vectorised
    TensorIterator loops) takes half its time at the CPU bench shapes (12 x 48 x 64: 27 vs 58 us;
    32 x 24 x 24: 21 vs 32 us). Same values, same autograd (the copy's backward is the inverse
    permutation).
    """
    if r == 1:
        return y
    if not y.is_contiguous():  # e.g. a channels_last conv output: let torch pick its kernel
        return F.pixel_shuffle(y, r)
    B, channels, H, W = y.shape
    C = channels // (r * r)
    return y.view(B, C, r, r, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C, H * r, W * r)


# ----------------------------------------------------------------------------------------------
# Resize-convolution
# ----------------------------------------------------------------------------------------------


def _taps(kernel_size: int, scale: int, side: int, phase_windows: bool, dtype, device) -> torch.Tensor:
    """taps[a, t, d] = 1 where phase a's high-res tap d reads low-res tap t (one axis).

    High-res row ``scale * i + a + d - p`` holds low-res row ``i + floor((a + d - p) / scale)``.
    ``phase_windows``: t counts from the first row phase a reads (scale 2, k = 3: rows i - 1 + a
    and i + a, so side 2); otherwise t counts from the centre of a common odd window of ``side``.
    """
    p = kernel_size // 2
    taps = torch.zeros(scale, side, kernel_size, dtype=dtype, device=device)
    for a in range(scale):
        first = (a - p) // scale if phase_windows else -(side // 2)
        for d in range(kernel_size):
            taps[a, (a + d - p) // scale - first, d] = 1
    return taps


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, scale: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Folded weights (Cout * scale**2, Cin, T, T) in pixel-shuffle channel order, and bias.

    Scale 2 and k = 3: T = 2, the phase kernels (phase (a, b) reads the low-res window starting
    at offset (a - 1, b - 1)). Otherwise the dense odd kernel of the equal sub-pixel conv.
    """
    k = weight.shape[-1]
    if scale == 2 and k == 3:
        taps = _taps(3, 2, 2, True, weight.dtype, weight.device)
    else:
        p = k // 2
        side = 2 * max(-(-p // scale), (scale - 1 + p) // scale) + 1
        taps = _taps(k, scale, side, False, weight.dtype, weight.device)
    folded = torch.einsum("oidf,aud,bvf->oabiuv", weight, taps, taps).flatten(0, 2)
    return folded, (None if bias is None else bias.repeat_interleave(scale * scale))


# id(weight) -> (weakref to weight, weight version, id(bias), bias version, scale, folded pair)
_FOLDED: dict[int, tuple] = {}


def _version(t: torch.Tensor | None) -> int:
    return -1 if t is None else t._version


def _folded(weight: torch.Tensor, bias: torch.Tensor | None, scale: int):
    recording = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if recording or weight.is_inference() or (bias is not None and bias.is_inference()):
        # Inference tensors carry no version counter, and a recorded fold must stay in its graph.
        return _fold(weight, bias, scale)
    key = id(weight)
    entry = _FOLDED.get(key)
    stamp = (_version(weight), id(bias), _version(bias), scale)
    if entry is not None and entry[0]() is weight and entry[1] == stamp:
        return entry[2]
    # Normal tensors even when the first call comes in inference mode: a later call may record
    # autograd through x with these (frozen) weights, and autograd cannot save inference tensors.
    with torch.inference_mode(False), torch.no_grad():
        folded = _fold(weight, bias, scale)
    _FOLDED[key] = (weakref.ref(weight, lambda _, key=key: _FOLDED.pop(key, None)), stamp, folded)
    return folded


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
    """``act(conv2d(pad(interpolate(x, scale, "nearest")), weight, bias))`` (fast path).

    x: (B, Cin, H, W); weight: (Cout, Cin, k, k), k odd; bias: (Cout,) or None; padding_mode
    zeros | replicate. Returns (B, Cout, scale * H, scale * W).
    """
    B, _, H, W = x.shape
    cout, k = weight.shape[0], weight.shape[-1]
    folded_weight, folded_bias = _folded(weight, bias, scale)
    if not (scale == 2 and k == 3) or H == 0 or W == 0:
        return subpixel_conv2d(
            x,
            folded_weight,
            folded_bias,
            upscale=scale,
            padding_mode=padding_mode,
            activation=activation,
            negative_slope=negative_slope,
        )
    # One conv over the input padded by 1: position (p, q) reads low-res rows p - 1, p and
    # columns q - 1, q, which is phase (a, b) of output pixel (2(p - a) + a, 2(q - b) + b).
    y = _conv_same(x, folded_weight, folded_bias, 1, padding_mode)  # (B, 4 Cout, H + 1, W + 1)
    y = _activation(y, activation, negative_slope).view(B, cout, 2, 2, H + 1, W + 1)
    out = y.new_empty(B, cout, H, 2, W, 2)
    for a in range(2):
        for b in range(2):
            out[:, :, :, a, :, b] = y[:, :, a, b, a : a + H, b : b + W]
    return out.view(B, cout, 2 * H, 2 * W)


def subpixel_conv2d_reasons(x, weight, bias=None, **kwargs) -> list[str]:
    """Why the fast path cannot serve this call: never, for a call the ops layer accepted."""
    return []


def upsample_conv2d_reasons(x, weight, bias=None, **kwargs) -> list[str]:
    return []
