"""What every integration shares: the verdict type and the checks on a convolution to fold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dqfast.reference.subpixel_conv import FOLDABLE_PADDING_MODES

__all__ = ["Found", "fold_refusal", "runs_plain_conv"]


@dataclass(frozen=True)
class Found:
    """An integration's verdict on one module.

    kind: what the module is ("diffusers Upsample2D", ...); op: the dqfast op it is (or would be)
    routed through; reason: None when it can be patched, else why it is left alone; note: what the
    patched module still hands back to the original code at call time; apply: patches the module in
    place (None when ``reason`` is set).
    """

    kind: str
    op: str | None
    reason: str | None = None
    note: str = ""
    apply: Callable[[], None] | None = None


def fold_refusal(conv: object, name: str = "conv") -> str | None:
    """Why ``interpolate(nearest, 2)`` followed by ``conv`` cannot run as ``dqfast.upsample_conv2d``, or None."""
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is a {type(conv).__name__}, not an nn.Conv2d"
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return f"{name} is a {type(conv).__name__} with its own forward (e.g. an adapter layer)"
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        return f"{name} has kernel size {kh}x{kw}; the fold needs a square odd kernel"
    if tuple(conv.stride) != (1, 1):
        return f"{name} has stride {tuple(conv.stride)}; the fold needs stride 1"
    if tuple(conv.dilation) != (1, 1):
        return f"{name} has dilation {tuple(conv.dilation)}; the fold needs dilation 1"
    if conv.groups != 1:
        return f"{name} has groups={conv.groups}; the fold needs groups=1"
    if conv.padding != "same" and tuple(conv.padding) != (kh // 2, kh // 2):
        return f"{name} has padding {conv.padding} with a {kh}x{kh} kernel; the fold needs 'same' padding {kh // 2}"
    if conv.padding_mode not in FOLDABLE_PADDING_MODES:
        return (
            f"{name} has padding_mode={conv.padding_mode!r}; only {FOLDABLE_PADDING_MODES} fold exactly "
            "(reflect padding of the upsampled image mirrors about a different point)"
        )
    return None


def runs_plain_conv(conv: nn.Module) -> bool:
    """Call-time check: ``conv`` is still a hook-free plain ``nn.Conv2d`` (else use the original forward).

    Hooks (offloading, adapters, feature taps) expect the conv to be called; a conv swapped for a
    subclass after patching has its own semantics. Either way the original forward is the safe path.
    """
    return (
        type(conv).forward is nn.Conv2d.forward
        and type(conv)._conv_forward is nn.Conv2d._conv_forward
        and not conv._forward_hooks
        and not conv._forward_pre_hooks
    )
