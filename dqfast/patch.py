"""``dqfast.patch``: swap sub-pixel upsamplers in any model for fused :class:`~dqfast.nn.SubPixelConv2d`.

Two patterns are recognised among consecutive children of an ``nn.Sequential`` (wherever it sits
in the module tree, nested Sequentials included):

(a) ``Conv2d`` → ``PixelShuffle(r)``, with optionally one elementwise activation (ReLU, LeakyReLU,
    exact GELU, SiLU) either between them or right after the shuffle. Because the activation is
    elementwise, act(shuffle(conv(x))) == shuffle(act(conv(x))), so it fuses in either place.
    The result is :meth:`SubPixelConv2d.from_conv`: same weights, same shapes.
(b) ``Upsample(scale_factor=s, mode="nearest")`` (or ``UpsamplingNearest2d``), s an integer, →
    ``Conv2d``: :meth:`SubPixelConv2d.from_upsample_conv`, which computes the resize-convolution as
    a sub-pixel convolution on the low-res grid (no upsampled image is made).

The fused module takes the convolution's slot and the other consumed slots become
``nn.Identity``, so the Sequential keeps its length and indices, and the parameter names do not
move (``seq.3.weight`` stays ``seq.3.weight``; in pattern (a) the tensors are identical too).
Convolutions the fused op cannot express (stride, dilation, groups, non-"same" padding, even
kernels, reflect padding under an upsample, ...) are left alone. Convs wired by a custom
``forward`` rather than a Sequential are not touched: only a Sequential's order is a dataflow fact.

Patch before building an optimizer: the fused modules hold new Parameter objects.
"""

from __future__ import annotations

from torch import nn

from dqfast.nn import SubPixelConv2d

__all__ = ["patch"]


def _activation_spec(module: nn.Module) -> tuple[str, float] | None:
    """(name, negative_slope) of an activation the fused op supports, else None."""
    if type(module) is nn.ReLU:
        return "relu", 0.01
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu", 0.01
    if type(module) is nn.SiLU:
        return "silu", 0.01
    return None


def _nearest_scale(module: nn.Module) -> int | None:
    """The integer scale of a nearest-neighbour ``nn.Upsample`` with a scale factor, else None."""
    if not isinstance(module, nn.Upsample) or module.mode != "nearest" or module.size is not None:
        return None
    factor = module.scale_factor
    factors = tuple(factor) if isinstance(factor, tuple | list) else (factor, factor)
    if len(factors) != 2 or factors[0] != factors[1]:
        return None
    scale = factors[0]
    if scale is None or float(scale) != int(scale) or int(scale) < 1:
        return None
    return int(scale)


def _fuse_pixel_shuffle(children: list[nn.Module], i: int) -> tuple[SubPixelConv2d, int] | None:
    """Pattern (a) starting at ``children[i]``: the fused module and how many children it replaces."""
    conv = children[i]
    if type(conv) is not nn.Conv2d:
        return None
    rest = children[i + 1 : i + 4]
    activation = None
    if len(rest) >= 2 and isinstance(rest[1], nn.PixelShuffle) and _activation_spec(rest[0]) is not None:
        activation, used = _activation_spec(rest[0]), 3
        shuffle = rest[1]
    elif rest and isinstance(rest[0], nn.PixelShuffle):
        shuffle, used = rest[0], 2
        if len(rest) >= 2 and _activation_spec(rest[1]) is not None:
            activation, used = _activation_spec(rest[1]), 3
    else:
        return None
    name, slope = activation if activation is not None else (None, 0.01)
    try:
        fused = SubPixelConv2d.from_conv(conv, shuffle.upscale_factor, activation=name, negative_slope=slope)
    except (TypeError, ValueError):
        return None
    return fused, used


def _fold_upsample(children: list[nn.Module], i: int) -> tuple[SubPixelConv2d, int] | None:
    """Pattern (b) starting at ``children[i]``: the folded module and how many children it replaces."""
    scale = _nearest_scale(children[i])
    if scale is None or i + 1 >= len(children) or type(children[i + 1]) is not nn.Conv2d:
        return None
    try:
        fused = SubPixelConv2d.from_upsample_conv(children[i + 1], scale=scale)
    except (TypeError, ValueError):
        return None
    return fused, 2


def _patch_sequential(seq: nn.Sequential, prefix: str, apply: bool) -> list[str]:
    # Not named_children(): it skips repeats of a shared module, which would shift the positions.
    names = list(seq._modules)
    children = list(seq._modules.values())
    replaced = []
    i = 0
    while i < len(children):
        match = _fuse_pixel_shuffle(children, i)
        conv_offset = 0
        if match is None:
            match = _fold_upsample(children, i)
            conv_offset = 1
        if match is None:
            i += 1
            continue
        fused, used = match
        conv_slot = i + conv_offset
        fused.train(children[conv_slot].training)
        replaced.append(f"{prefix}{names[conv_slot]}")
        if apply:
            for j in range(i, i + used):
                setattr(seq, names[j], fused if j == conv_slot else nn.Identity())
        i += used
    return replaced


def patch(model: nn.Module, *, inplace: bool = True) -> list[str]:
    """Replace sub-pixel and resize-conv upsamplers in ``model`` by fused ``SubPixelConv2d`` modules.

    Returns, in module-tree order, the dotted names of the slots that now hold (or, with
    ``inplace=False``, would hold) a ``SubPixelConv2d``. ``inplace=False`` changes nothing: it
    reports what would be replaced (``patch(copy.deepcopy(model))`` patches a copy). Outputs are
    unchanged up to float rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = list(model.named_modules())
    order = {name: i for i, (name, _) in enumerate(modules)}
    replaced = []
    for name, module in modules:
        if isinstance(module, nn.Sequential):
            replaced += _patch_sequential(module, f"{name}." if name else "", apply=inplace)
    return sorted(replaced, key=order.__getitem__)
