"""Reference semantics of ``subpixel_conv2d``, the resize-conv fold, ``SubPixelConv2d`` and bad input.

The oracle here is written independently of the reference: padding by explicit index arithmetic,
the convolution as a float64 sum over kernel taps, the activations from their formulas and the
pixel shuffle as a reshape/permute. Kernel parity is tested in its own file.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dqfast
from dqfast.nn.subpixel_conv import SubPixelConv2d
from dqfast.reference.subpixel_conv import (
    ACTIVATIONS,
    PADDING_MODES,
    fold_upsample_conv,
    folded_kernel_size,
    subpixel_conv2d,
)
from tests.helpers import FP32_TOL, ROUNDING_BAND, max_err, randn, seed

# ----------------------------------------------------------------------------------------------
# The independent float64 oracle
# ----------------------------------------------------------------------------------------------


def _pad_index(n: int, p: int, mode: str) -> torch.Tensor:
    """Source index of each of the n + 2p padded positions (reflect: mirror about the edge pixel)."""
    i = torch.arange(-p, n + p)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    assert mode == "reflect"
    i = torch.where(i < 0, -i, i)
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def _pad(x: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    B, C, H, W = x.shape
    if mode == "zeros":
        out = x.new_zeros(B, C, H + 2 * p, W + 2 * p)
        out[:, :, p : p + H, p : p + W] = x
        return out
    return x[:, :, _pad_index(H, p, mode)][:, :, :, _pad_index(W, p, mode)]


def _activate(y: torch.Tensor, activation: str | None, slope: float) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "relu":
        return torch.where(y > 0, y, torch.zeros_like(y))
    if activation == "leaky_relu":
        return torch.where(y >= 0, y, slope * y)
    if activation == "gelu":
        return 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    assert activation == "silu"
    return y / (1 + torch.exp(-y))


def _shuffle(y: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C * r * r, H, W) -> (B, C, r * H, r * W); channel c * r * r + a * r + b -> pixel (a, b)."""
    B, Cr2, H, W = y.shape
    C = Cr2 // (r * r)
    return y.reshape(B, C, r, r, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C, H * r, W * r)


def oracle(x, weight, bias, r, padding_mode="zeros", activation=None, slope=0.01) -> torch.Tensor:
    """The sub-pixel convolution in float64, tap by tap."""
    x, weight = x.detach().double(), weight.detach().double()
    H, W = x.shape[-2:]
    k = weight.shape[-1]
    xp = _pad(x, k // 2, padding_mode)
    y = x.new_zeros(x.shape[0], weight.shape[0], H, W)
    for dy in range(k):
        for dx in range(k):
            y += torch.einsum("oc,bchw->bohw", weight[:, :, dy, dx], xp[:, :, dy : dy + H, dx : dx + W])
    if bias is not None:
        y += bias.detach().double()[None, :, None, None]
    return _shuffle(_activate(y, activation, slope), r)


def _inputs(cin, cout, k, r, H, W, bias=True, dtype=torch.float32):
    x = randn(1, cin, H, W, dtype=dtype)
    w = randn(cout * r * r, cin, k, k, dtype=dtype, scale=1 / math.sqrt(cin * k * k))
    b = randn(cout * r * r, dtype=dtype, scale=0.5) if bias else None
    return x, w, b


# ----------------------------------------------------------------------------------------------
# The reference against the oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_reference_matches_oracle(r, k, padding_mode, activation):
    """Every padding mode x activation x kernel x upscale: float64 to 1e-12, float32 to 1e-5."""
    seed(100 * r + 10 * k)
    # Odd H and W, channel counts that are not powers of two; H = 5 keeps reflect (pad 2) legal.
    x, w, b = _inputs(cin=5, cout=3, k=k, r=r, H=5, W=7)
    slope = 0.2
    want = oracle(x, w, b, r, padding_mode, activation, slope)
    kw = dict(upscale=r, padding_mode=padding_mode, activation=activation, negative_slope=slope)
    got64 = subpixel_conv2d(x.double(), w.double(), b.double(), **kw)
    got32 = subpixel_conv2d(x, w, b, **kw)
    assert got64.shape == (1, 3, 5 * r, 7 * r) and got64.dtype == torch.float64
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got64, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got32.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_no_bias_and_default_slope(padding_mode):
    seed(1)
    x, w, _ = _inputs(cin=3, cout=2, k=3, r=2, H=4, W=3, bias=False)
    got = subpixel_conv2d(x.double(), w.double(), None, upscale=2, padding_mode=padding_mode, activation="leaky_relu")
    torch.testing.assert_close(got, oracle(x, w, None, 2, padding_mode, "leaky_relu", 0.01), atol=1e-12, rtol=0)


def test_pixel_shuffle_channel_order():
    """With a 1x1 identity-like weight, output pixel (r*i + a, r*j + b) of channel c is input
    channel c*r*r + a*r + b at (i, j): the nn.PixelShuffle convention, checked value by value."""
    r, C, H, W = 3, 2, 2, 3
    x = torch.arange(C * r * r * H * W, dtype=torch.float64).reshape(1, C * r * r, H, W)
    eye = torch.eye(C * r * r, dtype=torch.float64)[:, :, None, None]
    y = subpixel_conv2d(x, eye, None, upscale=r)
    for c in range(C):
        for a in range(r):
            for b in range(r):
                assert torch.equal(y[0, c, a::r, b::r], x[0, c * r * r + a * r + b])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision(dtype):
    """fp16/bf16 inputs give that dtype, within a rounding band of float64 on the same inputs."""
    seed(2)
    x, w, b = _inputs(cin=6, cout=3, k=3, r=2, H=5, W=5, dtype=dtype)
    got = subpixel_conv2d(x, w, b, upscale=2, activation="gelu")
    want = oracle(x, w, b, 2, "zeros", "gelu")
    assert got.dtype == dtype
    assert max_err(got, want) <= ROUNDING_BAND[dtype] * max(want.abs().max().item(), 1.0)


def test_noncontiguous_and_channels_last():
    seed(3)
    x, w, b = _inputs(cin=4, cout=2, k=3, r=2, H=5, W=6)
    want = subpixel_conv2d(x, w, b, upscale=2, padding_mode="reflect")
    x_nc = torch.cat([x, x], dim=-1)[..., ::2]
    x_nc.copy_(x)
    assert not x_nc.is_contiguous()
    torch.testing.assert_close(subpixel_conv2d(x_nc, w, b, upscale=2, padding_mode="reflect"), want)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(subpixel_conv2d(x_cl, w, b, upscale=2, padding_mode="reflect"), want)


@pytest.mark.parametrize(
    "padding_mode, activation",
    [("zeros", None), ("reflect", "gelu"), ("replicate", "silu"), ("reflect", "leaky_relu"), ("zeros", "relu")],
)
def test_gradcheck(padding_mode, activation):
    """Autograd through the reference equals finite differences in x, weight and bias."""
    seed(4)
    x, w, b = (t.double().requires_grad_() for t in _inputs(cin=2, cout=1, k=3, r=2, H=3, W=4))
    fn = lambda x, w, b: subpixel_conv2d(x, w, b, upscale=2, padding_mode=padding_mode, activation=activation)
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_inputs_not_modified():
    """Neither the reference nor the public op (forward and backward) writes into its inputs."""
    seed(5)
    x, w, b = _inputs(cin=3, cout=2, k=3, r=2, H=4, W=5)
    originals = [t.clone() for t in (x, w, b)]
    for activation in ACTIVATIONS:
        for fn in (subpixel_conv2d, dqfast.subpixel_conv2d):
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            fn(xs, ws, bs, upscale=2, padding_mode="replicate", activation=activation).sum().backward()
            for before, after in zip(originals, (xs, ws, bs)):
                assert torch.equal(before, after.detach())


# ----------------------------------------------------------------------------------------------
# Resize-conv folding
# ----------------------------------------------------------------------------------------------


def _upsample_conv(x, weight, bias, scale, padding_mode):
    """conv(nearest_upsample(x)) with "same" padding, the padding done on the high-res grid."""
    up = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    conv = nn.Conv2d(
        x.shape[1],
        weight.shape[0],
        weight.shape[-1],
        padding=weight.shape[-1] // 2,
        padding_mode=padding_mode,
        dtype=x.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv(up)


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("k, scale", [(3, 2), (5, 2), (7, 2), (3, 3), (5, 3)])
@pytest.mark.parametrize("H, W", [(1, 1), (3, 5), (4, 7)])
def test_fold_matches_upsample_conv(k, scale, padding_mode, H, W):
    """The folded sub-pixel conv on the low-res grid equals nearest-upsample + conv, float64."""
    seed(10 * k + scale)
    x = randn(1, 3, H, W, dtype=torch.float64)
    w = randn(5, 3, k, k, dtype=torch.float64)
    b = randn(5, dtype=torch.float64)
    fw, fb = fold_upsample_conv(w, b, scale=scale, padding_mode=padding_mode)
    K = folded_kernel_size(k, scale)
    assert fw.shape == (5 * scale * scale, 3, K, K) and fb.shape == (5 * scale * scale,)
    got = subpixel_conv2d(x, fw, fb, upscale=scale, padding_mode=padding_mode)
    torch.testing.assert_close(got, _upsample_conv(x, w, b, scale, padding_mode), atol=1e-12, rtol=1e-12)


def test_fold_kernel_sizes_and_phase_footprint():
    """Scale 2 folds 3x3 and 5x5 into 3x3; each output phase of a folded 3x3 reads a 2x2 block."""
    assert [folded_kernel_size(k, 2) for k in (1, 3, 5, 7)] == [1, 3, 3, 5]
    assert [folded_kernel_size(k, 3) for k in (1, 3, 5)] == [1, 3, 3]
    seed(6)
    fw, fb = fold_upsample_conv(randn(4, 2, 3, 3, dtype=torch.float64), None, scale=2)
    assert fb is None
    nonzero = (fw != 0).reshape(4, 2, 2, 2, 3, 3).any(dim=3)  # (Cout, a, b, Cin -> any, 3, 3)
    assert (nonzero.sum(dim=(-1, -2)) == 4).all()


def test_fold_refuses_reflect_and_reflect_really_differs():
    """Reflect padding is refused, and rightly: no fold of the weights can match it at the border
    (here the folded weights run with reflect padding differ from upsample + reflect conv)."""
    seed(7)
    x = randn(1, 2, 4, 5, dtype=torch.float64)
    w, b = randn(3, 2, 3, 3, dtype=torch.float64), randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="padding_mode"):
        fold_upsample_conv(w, b, scale=2, padding_mode="reflect")
    fw, fb = fold_upsample_conv(w, b, scale=2)
    folded = subpixel_conv2d(x, fw, fb, upscale=2, padding_mode="reflect")
    assert max_err(folded, _upsample_conv(x, w, b, 2, "reflect")) > 1e-3


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------


def test_module_init_like_conv2d():
    """Same seed, same numbers: the weight and bias are drawn exactly as nn.Conv2d draws them."""
    torch.manual_seed(8)
    conv = nn.Conv2d(6, 5 * 4, 3)
    torch.manual_seed(8)
    m = SubPixelConv2d(6, 5, kernel_size=3, upscale=2)
    assert m.weight.shape == (20, 6, 3, 3) and m.bias.shape == (20,)
    assert torch.equal(m.weight, conv.weight) and torch.equal(m.bias, conv.bias)
    assert m.folded_from is None
    assert SubPixelConv2d(6, 5, bias=False).bias is None


def test_module_repr():
    m = SubPixelConv2d(6, 5, kernel_size=5, upscale=3, bias=False, padding_mode="reflect", activation="leaky_relu")
    text = repr(m)
    for part in ("6, 5", "kernel_size=5", "upscale=3", "bias=False", "'reflect'", "'leaky_relu'", "0.01"):
        assert part in text, (part, text)


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="kernel_size"):
        SubPixelConv2d(3, 3, kernel_size=4)
    with pytest.raises(ValueError, match="upscale"):
        SubPixelConv2d(3, 3, upscale=0)
    with pytest.raises(TypeError, match="upscale"):
        SubPixelConv2d(3, 3, upscale=2.0)
    with pytest.raises(ValueError, match="padding_mode"):
        SubPixelConv2d(3, 3, padding_mode="circular")
    with pytest.raises(ValueError, match="activation"):
        SubPixelConv2d(3, 3, activation="tanh")


_TORCH_ACT = {
    None: nn.Identity(),
    "relu": nn.ReLU(),
    "leaky_relu": nn.LeakyReLU(0.3),
    "gelu": nn.GELU(),
    "silu": nn.SiLU(),
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("k, r, bias", [(1, 2, True), (3, 2, True), (5, 3, False), (3, 1, True)])
def test_from_conv_equals_conv_pixelshuffle(k, r, bias, padding_mode, activation):
    """from_conv copies the weights exactly; forward and gradients equal Conv2d + act + PixelShuffle."""
    seed(9)
    conv = nn.Conv2d(5, 3 * r * r, k, padding=k // 2, bias=bias, padding_mode=padding_mode)
    seq = nn.Sequential(conv, _TORCH_ACT[activation], nn.PixelShuffle(r))
    m = SubPixelConv2d.from_conv(conv, r, activation=activation, negative_slope=0.3)
    assert torch.equal(m.weight, conv.weight) and m.weight.data_ptr() != conv.weight.data_ptr()
    assert (m.bias is None) == (not bias) and (m.bias is None or torch.equal(m.bias, conv.bias))
    assert m.padding_mode == padding_mode
    x = randn(1, 5, 5, 7, requires_grad=True)
    # The reference backend, so the comparison is about the module and not a kernel's rounding.
    with dqfast.use_backend("reference"):
        out = m(x)
    want = seq(x)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    g = randn(*want.shape)
    gx, gw = torch.autograd.grad(want, (x, conv.weight), g)
    out.backward(g)
    torch.testing.assert_close(x.grad, gx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.weight.grad, gw, **FP32_TOL)


def test_from_conv_accepts_same_padding_string():
    conv = nn.Conv2d(2, 8, 3, padding="same")
    assert SubPixelConv2d.from_conv(conv, 2).kernel_size == 3


@pytest.mark.parametrize(
    "conv, upscale, error, match",
    [
        (nn.Conv2d(2, 8, 3, padding=1, stride=2), 2, ValueError, "stride"),
        (nn.Conv2d(2, 8, 3, padding=2, dilation=2), 2, ValueError, "dilation"),
        (nn.Conv2d(2, 8, 3, padding=1, groups=2), 2, ValueError, "groups"),
        (nn.Conv2d(2, 8, 4, padding=2), 2, ValueError, "odd kernel"),
        (nn.Conv2d(2, 8, (3, 5), padding=(1, 2)), 2, ValueError, "square"),
        (nn.Conv2d(2, 8, 3, padding=0), 2, ValueError, "padding"),
        (nn.Conv2d(2, 8, 3, padding=1, padding_mode="circular"), 2, ValueError, "padding_mode"),
        (nn.Conv2d(2, 6, 3, padding=1), 2, ValueError, "upscale"),
        (nn.Conv2d(2, 8, 3, padding=1), 0, ValueError, "upscale"),
        (nn.Linear(2, 8), 2, TypeError, "Conv2d"),
    ],
)
def test_from_conv_refuses(conv, upscale, error, match):
    with pytest.raises(error, match=match):
        SubPixelConv2d.from_conv(conv, upscale)


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("k, scale", [(3, 2), (5, 2), (3, 3)])
@pytest.mark.parametrize("H, W", [(2, 3), (5, 4)])
def test_from_upsample_conv(k, scale, padding_mode, H, W):
    """The module equals nn.Upsample(nearest) + Conv2d in float32; it remembers what it folded."""
    seed(11)
    conv = nn.Conv2d(4, 6, k, padding=k // 2, padding_mode=padding_mode)
    seq = nn.Sequential(nn.Upsample(scale_factor=scale, mode="nearest"), conv)
    m = SubPixelConv2d.from_upsample_conv(conv, scale=scale)
    assert m.folded_from == (k, scale) and m.upscale == scale and m.out_channels == 6
    assert m.kernel_size == k and m.weight.shape == conv.weight.shape
    assert m.folded_weight()[0].shape[-1] == folded_kernel_size(k, scale)
    assert f"folded_from=({k}, {scale})" in repr(m)
    x = randn(1, 4, H, W)
    with dqfast.use_backend("reference"):
        out = m(x)
    torch.testing.assert_close(out, seq(x), atol=1e-5, rtol=1e-5)


def test_from_upsample_conv_refuses_reflect():
    with pytest.raises(ValueError, match="reflect"):
        SubPixelConv2d.from_upsample_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="odd kernel"):
        SubPixelConv2d.from_upsample_conv(nn.Conv2d(2, 2, 2, padding=1))


# ----------------------------------------------------------------------------------------------
# Bad input through the public op
# ----------------------------------------------------------------------------------------------


def _good():
    return dict(x=torch.randn(1, 3, 4, 4), weight=torch.randn(8, 3, 3, 3), bias=torch.randn(8), upscale=2)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.randn(3, 4, 4)), ValueError, r"\bx\b"),
        (dict(weight=torch.randn(8, 3, 3)), ValueError, "weight"),
        (dict(weight=torch.randn(8, 3, 2, 2)), ValueError, "kernel"),
        (dict(weight=torch.randn(6, 3, 3, 3), bias=None), ValueError, "upscale"),
        (dict(weight=torch.randn(8, 4, 3, 3)), ValueError, "channels"),
        (dict(padding_mode="circular"), ValueError, "zeros.*reflect.*replicate"),
        (dict(activation="tanh"), ValueError, "relu.*leaky_relu.*gelu.*silu"),
        (dict(upscale=0), ValueError, "upscale"),
        (dict(upscale=2.0), TypeError, "upscale"),
        (dict(weight=torch.randn(8, 3, 3, 3, dtype=torch.float64)), TypeError, "dtype"),
        (dict(bias=torch.randn(7)), ValueError, "bias"),
        (dict(x=[[1.0]]), TypeError, r"\bx\b"),
    ],
    ids=[
        "x-rank",
        "weight-rank",
        "even-kernel",
        "not-div-r2",
        "cin",
        "padding",
        "activation",
        "upscale-0",
        "upscale-float",
        "dtype-mix",
        "bias-shape",
        "x-list",
    ],
)
def test_public_op_rejects(change, error, match):
    kwargs = _good()
    kwargs.update(change)
    x, weight, bias = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("bias")
    with pytest.raises(error, match=match):
        dqfast.subpixel_conv2d(x, weight, bias, **kwargs)


def test_public_op_matches_reference_on_cpu():
    seed(12)
    x, w, b = _inputs(cin=3, cout=2, k=3, r=2, H=3, W=5)
    with dqfast.use_backend("reference"):
        got = dqfast.subpixel_conv2d(x, w, b, upscale=2, activation="silu")
    torch.testing.assert_close(got.double(), oracle(x, w, b, 2, "zeros", "silu"), **FP32_TOL)


# ----------------------------------------------------------------------------------------------
# dqfast.upsample_conv2d: the resize-convolution as a public op
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("k, scale", [(3, 2), (5, 2), (3, 3), (1, 2)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_upsample_conv2d_equals_interpolate_then_conv(k, scale, padding_mode, activation):
    seed(21)
    x = randn(2, 3, 5, 4, dtype=torch.float64)
    w = randn(7, 3, k, k, dtype=torch.float64)
    b = randn(7, dtype=torch.float64)
    up = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    pad_mode = "constant" if padding_mode == "zeros" else padding_mode
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(up, [k // 2] * 4, mode=pad_mode), w, b)
    if activation == "silu":
        want = want * torch.sigmoid(want)
    with dqfast.use_backend("reference"):
        got = dqfast.upsample_conv2d(x, w, b, scale=scale, padding_mode=padding_mode, activation=activation)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_upsample_conv2d_module_trains_like_the_resize_conv():
    """Gradients of a resize-mode module equal those of nn.Upsample + Conv2d (its own parameters)."""
    seed(22)
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    m = SubPixelConv2d.from_upsample_conv(conv)
    x = randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = randn(2, 5, 6, 10, dtype=torch.float64)
    with dqfast.use_backend("reference"):
        (m(x) * g).sum().backward()
    (conv(torch.nn.functional.interpolate(x2, scale_factor=2, mode="nearest")) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m.weight.grad, conv.weight.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m.bias.grad, conv.bias.grad, atol=1e-12, rtol=1e-12)
    assert set(m.state_dict()) == set(conv.state_dict())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w: dqfast.upsample_conv2d(x, w, padding_mode="reflect"), ValueError, "padding_mode"),
        (lambda x, w: dqfast.upsample_conv2d(x, w[..., :2, :2]), ValueError, "odd kernel"),
        (lambda x, w: dqfast.upsample_conv2d(x, w[:, :2]), ValueError, "input channels"),
        (lambda x, w: dqfast.upsample_conv2d(x, w, scale=0), ValueError, "scale"),
        (lambda x, w: dqfast.upsample_conv2d(x, w, scale=2.0), TypeError, "scale"),
        (lambda x, w: dqfast.upsample_conv2d(x, w.double()), TypeError, "dtype"),
        (lambda x, w: dqfast.upsample_conv2d(x, w, torch.zeros(3)), ValueError, "bias"),
        (lambda x, w: dqfast.upsample_conv2d(x[0], w), ValueError, "x"),
        (lambda x, w: dqfast.upsample_conv2d(x, w, activation="tanh"), ValueError, "activation"),
    ],
)
def test_upsample_conv2d_bad_input(call, error, match):
    x, w = torch.randn(1, 3, 4, 4), torch.randn(5, 3, 3, 3)
    with pytest.raises(error, match=match):
        call(x, w)


@pytest.mark.parametrize("op", ["subpixel", "upsample"])
def test_ops_follow_autocast(op):
    """Under autocast an fp32 module runs in the autocast dtype instead of refusing the dtype mix."""
    seed(23)
    m = SubPixelConv2d(4, 3) if op == "subpixel" else SubPixelConv2d.from_upsample_conv(nn.Conv2d(4, 3, 3, padding=1))
    x = randn(1, 4, 5, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), dqfast.use_backend("reference"):
        out = m(x)
    assert out.dtype == torch.bfloat16
    with dqfast.use_backend("reference"):
        want = m.float()(x.float())
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)
    assert m.weight.dtype == torch.float32
