"""``SubPixelConv2d``: conv + activation + pixel shuffle as one module over ``dqfast.subpixel_conv2d``."""

from __future__ import annotations

import math

import torch
from torch import nn

from dqfast import ops
from dqfast.reference.subpixel_conv import (
    ACTIVATIONS,
    FOLDABLE_PADDING_MODES,
    PADDING_MODES,
    fold_upsample_conv,
)

__all__ = ["SubPixelConv2d"]


class SubPixelConv2d(nn.Module):
    """``nn.Sequential(nn.Conv2d(in, out * r**2, k, padding=k // 2), act, nn.PixelShuffle(r))`` fused.

    x: (B, in_channels, H, W) -> (B, out_channels, upscale * H, upscale * W).
    Parameters: ``weight`` (out_channels * upscale**2, in_channels, k, k) and ``bias``
    (out_channels * upscale**2,) or None, in pixel-shuffle channel order, initialised like
    ``nn.Conv2d``.

    Resize mode (built by :meth:`from_upsample_conv`): the module computes
    ``act(conv(interpolate(x, scale, "nearest")))`` through :func:`dqfast.upsample_conv2d`, which
    runs it as the equal sub-pixel convolution on the low-res grid (the Triton kernel reads only
    the 2x2 taps each output phase needs). ``weight`` (out_channels, in_channels, k, k) and ``bias``
    (out_channels,) are then the resize-conv's own parameters, so its state dict stays
    interchangeable with the ``nn.Conv2d`` it came from and training keeps the folded structure;
    ``folded_from`` is ``(k, scale)`` and :meth:`folded_weight` gives the sub-pixel weights.
    Otherwise ``folded_from`` is None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        upscale: int = 2,
        bias: bool = True,
        padding_mode: str = "zeros",
        activation: str | None = None,
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
            ("upscale", upscale),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int ('same' padding k // 2), got {kernel_size}")
        if upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {upscale}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.upscale = upscale
        self.padding_mode = padding_mode
        self.activation = activation
        self.negative_slope = negative_slope
        self.folded_from: tuple[int, int] | None = None
        factory = dict(device=device, dtype=dtype)
        conv_channels = out_channels * upscale * upscale
        self.weight = nn.Parameter(torch.empty(conv_channels, in_channels, kernel_size, kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(conv_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The ``nn.Conv2d`` initialisation (kaiming-uniform weight with a = sqrt(5), uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size * self.kernel_size
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> (B, out_channels, upscale * H, upscale * W)."""
        if self.folded_from is not None:
            return ops.upsample_conv2d(
                x,
                self.weight,
                self.bias,
                scale=self.upscale,
                padding_mode=self.padding_mode,
                activation=self.activation,
                negative_slope=self.negative_slope,
            )
        return ops.subpixel_conv2d(
            x,
            self.weight,
            self.bias,
            upscale=self.upscale,
            padding_mode=self.padding_mode,
            activation=self.activation,
            negative_slope=self.negative_slope,
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, upscale={self.upscale}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        if self.folded_from is not None:
            s += f", folded_from={self.folded_from}"
        return s

    @staticmethod
    def _check_conv(conv: nn.Conv2d, name: str) -> int:
        """The kernel size of ``conv`` after checking it is a plain odd "same" convolution."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
        kh, kw = conv.kernel_size
        if kh != kw or kh % 2 == 0:
            raise ValueError(f"{name} must have a square odd kernel, got kernel_size={conv.kernel_size}")
        if tuple(conv.stride) != (1, 1):
            raise ValueError(f"{name} must have stride 1, got stride={conv.stride}")
        if tuple(conv.dilation) != (1, 1):
            raise ValueError(f"{name} must have dilation 1, got dilation={conv.dilation}")
        if conv.groups != 1:
            raise ValueError(f"{name} must have groups=1, got groups={conv.groups}")
        if conv.padding != "same" and tuple(conv.padding) != (kh // 2, kh // 2):
            raise ValueError(f"{name} must have padding k // 2 = {kh // 2} ('same'), got padding={conv.padding}")
        if conv.padding_mode not in PADDING_MODES:
            raise ValueError(f"{name}.padding_mode must be one of {PADDING_MODES}, got {conv.padding_mode!r}")
        return kh

    def _copy_parameters(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        upscale: int,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> SubPixelConv2d:
        """The module equal to ``nn.Sequential(conv, act, nn.PixelShuffle(upscale))``.

        conv: nn.Conv2d(in, out * upscale**2, k, padding=k // 2), k odd, stride, dilation and
        groups 1, padding_mode zeros | reflect | replicate. Weights are copied exactly.
        """
        k = cls._check_conv(conv, "conv")
        if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
            raise ValueError(f"upscale must be an int >= 1, got {upscale!r}")
        if conv.out_channels % (upscale * upscale):
            raise ValueError(
                f"conv.out_channels = {conv.out_channels} must be a multiple of upscale**2 = {upscale * upscale}"
            )
        module = cls(
            conv.in_channels,
            conv.out_channels // (upscale * upscale),
            kernel_size=k,
            upscale=upscale,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            activation=activation,
            negative_slope=negative_slope,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        module._copy_parameters(conv.weight, conv.bias)
        return module

    @classmethod
    def from_upsample_conv(cls, conv: nn.Conv2d, scale: int = 2) -> SubPixelConv2d:
        """The module equal to ``conv(F.interpolate(x, scale_factor=scale, mode="nearest"))``.

        The module keeps ``conv``'s parameters (copied) and runs :func:`dqfast.upsample_conv2d`,
        which computes the resize-convolution as the equal sub-pixel convolution on the low-res grid
        (see :func:`dqfast.reference.subpixel_conv.fold_upsample_conv`): no upsampled image is ever
        made. conv: odd "same" nn.Conv2d with padding_mode zeros or replicate (reflect does not
        fold exactly and is refused).
        """
        k = cls._check_conv(conv, "conv")
        if conv.padding_mode not in FOLDABLE_PADDING_MODES:
            raise ValueError(
                f"conv.padding_mode must be one of {FOLDABLE_PADDING_MODES} to fold an upsample + conv, "
                f"got {conv.padding_mode!r}: reflect padding of the upsampled image mirrors about a "
                "different point than reflect padding of the low-res image, so no sub-pixel conv equals it"
            )
        module = cls(
            conv.in_channels,
            conv.out_channels,
            kernel_size=k,
            upscale=scale,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        module.weight = nn.Parameter(conv.weight.detach().clone())
        if conv.bias is not None:
            module.bias = nn.Parameter(conv.bias.detach().clone())
        module.folded_from = (k, scale)
        return module

    def folded_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sub-pixel ``(weight, bias)`` this module computes with, in pixel-shuffle order.

        For a resize-mode module the fold of its resize-conv parameters
        (:func:`dqfast.reference.subpixel_conv.fold_upsample_conv`); otherwise its own parameters.
        """
        if self.folded_from is None:
            return self.weight, self.bias
        return fold_upsample_conv(self.weight, self.bias, scale=self.upscale, padding_mode=self.padding_mode)
