"""Parity of the fused sub-pixel convolution kernel (kernels/subpixel_conv.py) with the reference.

The kernel runs through the public API under ``use_backend("triton")`` (on CPU this needs
``TRITON_INTERPRET=1``) and is compared with ``dqfast.reference.subpixel_conv`` evaluated in
float64 on the same inputs: ~1e-4 for fp32, the three-way rule of tests/helpers.py for fp16 and
bf16 (kernel error <= 2 x the same-dtype torch error + a rounding band). Every gradient is checked.
The folded resize-conv path is compared with ``conv2d(interpolate(x, 2, "nearest"), w, b, padding=1)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dqfast
from dqfast.reference import subpixel_conv as ref
from tests.helpers import (
    FP32_TOL,
    INTERPRET,
    KERNEL_DEVICE,
    assert_three_way,
    needs_gpu,
    needs_kernels,
    noncontiguous,
    randn,
    seed,
)

pytestmark = needs_kernels

# (B, Cin, H, W, Cout, r, k, padding_mode, activation, bias): a covering set, not the product.
# Interpreter tiles are 32 pixels x 32 channels x 16 Cin: H*W*B, Cout*r^2 and Cin cross them.
CASES = [
    (1, 3, 5, 7, 5, 2, 3, "zeros", None, True),
    (2, 19, 6, 5, 3, 3, 3, "reflect", "relu", True),
    (1, 5, 7, 6, 4, 1, 5, "replicate", "gelu", False),
    (2, 6, 4, 9, 3, 2, 1, "zeros", "silu", True),
    (1, 7, 9, 5, 9, 2, 3, "reflect", "leaky_relu", True),
    (1, 4, 5, 6, 3, 3, 5, "reflect", None, False),
    (2, 5, 3, 4, 2, 2, 5, "zeros", "gelu", True),
]


def _case_id(case) -> str:
    B, cin, H, W, cout, r, k, pad, act, bias = case
    return f"B{B}-c{cin}-{H}x{W}-o{cout}-r{r}-k{k}-{pad}-{act}-{'bias' if bias else 'nobias'}"


@pytest.fixture(autouse=True)
def _exact_fp32_conv():
    """fp32 on a GPU: no TF32 in cuDNN (the same-dtype reference) nor in the kernel (it follows cuDNN)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def _inputs(case):
    """fp32 CPU tensors x, weight, bias (or None) and grad_out for a case, unit-scale output."""
    B, cin, H, W, cout, r, k, _, _, has_bias = case
    seed(0)
    x = randn(B, cin, H, W)
    w = randn(cout * r * r, cin, k, k, scale=(cin * k * k) ** -0.5)
    b = randn(cout * r * r, scale=0.5) if has_bias else None
    go = randn(B, cout, r * H, r * W)
    return x, w, b, go


def _run(fn, tensors, go, dtype, device, **kwargs):
    """Output and grads of ``fn(*tensors, **kwargs)`` with leaves cast to dtype/device.

    tensors: [x, weight, bias-or-None]; grads are returned for the non-None ones, in order.
    """
    leaves = [None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], go.to(device=device, dtype=dtype))
    return out, grads


def _kernel(*args, **kwargs):
    with dqfast.use_backend("triton"):
        return dqfast.subpixel_conv2d(*args, **kwargs)


def _check(name, out, same, exact, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, **FP32_TOL, msg=lambda m: f"{name}: {m}")
    else:
        assert out.dtype == dtype, f"{name}: dtype {out.dtype}"
        assert_three_way(out, same, exact, name)


def _parity(case, dtype, *, x=None, w=None, b=None, go=None, negative_slope=0.01):
    """Kernel vs reference (same dtype and float64) for the output and every gradient.

    x, w, b, go: replacements (other layouts of the same values) for the case's own inputs.
    """
    B, cin, H, W, cout, r, k, pad, act, _ = case
    x0, w0, b0, go0 = _inputs(case)
    x, w, go = (x0 if x is None else x), (w0 if w is None else w), (go0 if go is None else go)
    b0 = b0 if b is None else b
    kw = dict(upscale=r, padding_mode=pad, activation=act, negative_slope=negative_slope)
    # Round the inputs to the tested dtype first so float64 sees exactly what the kernel sees.
    rounded = [None if t is None else t.to(dtype) for t in (x, w, b0)]
    go_r = go.to(dtype)
    out, grads = _run(_kernel, rounded, go_r, dtype, KERNEL_DEVICE, **kw)
    same, same_grads = _run(ref.subpixel_conv2d, rounded, go_r, dtype, KERNEL_DEVICE, **kw)
    exact, exact_grads = _run(ref.subpixel_conv2d, rounded, go_r, torch.float64, KERNEL_DEVICE, **kw)
    assert out.shape == (B, cout, r * H, r * W)
    _check("out", out, same, exact, dtype)
    for name, g, s, e in zip(("grad_x", "grad_weight", "grad_bias"), grads, same_grads, exact_grads):
        _check(name, g, s, e, dtype)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity(case, dtype):
    _parity(case, dtype)


def test_leaky_relu_slope():
    _parity((1, 6, 5, 5, 3, 2, 3, "replicate", "leaky_relu", True), torch.float32, negative_slope=0.3)


def test_channels_last_and_noncontiguous():
    """channels_last x (output keeps the format), strided weight and bias, non-contiguous grad_out."""
    case = (2, 9, 6, 7, 3, 2, 3, "reflect", "silu", True)
    x, w, b, go = _inputs(case)
    cl = x.to(memory_format=torch.channels_last)
    out, _ = _parity(case, torch.float32, x=cl, w=noncontiguous(w), b=noncontiguous(b))
    assert out.is_contiguous(memory_format=torch.channels_last)
    # grad_out as a transposed view: the kernels read it through strides, no copy.
    go_t = go.transpose(2, 3).contiguous().transpose(2, 3)
    assert not go_t.is_contiguous()
    _parity(case, torch.float32, x=noncontiguous(x), go=go_t)


def test_only_input_grad_and_empty_batch():
    """Gradients only where asked for, and B = 0 returns empty results without a launch."""
    case = (1, 5, 4, 6, 2, 2, 3, "zeros", "relu", True)
    x, w, b, go = _inputs(case)
    xk = x.to(KERNEL_DEVICE).requires_grad_()
    wk, bk = w.to(KERNEL_DEVICE), b.to(KERNEL_DEVICE)
    out = _kernel(xk, wk, bk, upscale=2, activation="relu")
    (gx,) = torch.autograd.grad(out, [xk], go.to(KERNEL_DEVICE))
    xe = x.double().requires_grad_()
    exact = ref.subpixel_conv2d(xe, w.double(), b.double(), upscale=2, activation="relu")
    (gxe,) = torch.autograd.grad(exact, [xe], go.double())
    torch.testing.assert_close(gx.double().cpu(), gxe, **FP32_TOL)

    empty = torch.zeros(0, 5, 4, 6, device=KERNEL_DEVICE, requires_grad=True)
    wg = wk.clone().requires_grad_()
    out = _kernel(empty, wg, bk, upscale=2)
    assert out.shape == (0, 2, 8, 12)
    gx, gw = torch.autograd.grad(out.sum(), [empty, wg])
    assert gx.shape == empty.shape and torch.equal(gw, torch.zeros_like(wg))


def test_channels_last_weight_and_grad_out():
    """A channels_last weight is read in place (Cin innermost), a channels_last grad_out is unshuffled."""
    case = (1, 16, 5, 6, 3, 2, 3, "zeros", None, True)
    x, w, b, go = _inputs(case)
    cl = dict(memory_format=torch.channels_last)
    _parity(case, torch.float32, x=x.to(**cl), w=w.to(**cl), go=go.to(**cl))


def test_operand_layout_choice():
    """Channels-innermost operands are used in place; others are copied with the values unchanged."""
    from dqfast.kernels.subpixel_conv import _channels_innermost

    x = randn(2, 5, 3, 4)
    cl = x.to(memory_format=torch.channels_last)
    assert _channels_innermost(cl) is cl
    for t in (x, noncontiguous(x)):
        y = _channels_innermost(t)
        assert y.stride(1) == 1 and y.shape == t.shape and torch.equal(y, t)
    phase = randn(3, 4, 6, 2, 2)
    y = _channels_innermost(phase, dim=2)
    assert y.stride(2) == 1 and torch.equal(y, phase)


@pytest.mark.parametrize("shape", [(1, 5, 0, 6), (2, 5, 4, 0)], ids=["H0", "W0"])
def test_empty_spatial(shape):
    """H or W = 0: empty outputs of the right shape and zero gradients, for both kernels."""
    from dqfast.kernels.subpixel_conv import fold_phase_weights, subpixel_conv2d_folded

    B, cin, H, W = shape
    seed(1)
    x = torch.zeros(shape, device=KERNEL_DEVICE, requires_grad=True)
    w = randn(8, cin, 3, 3).to(KERNEL_DEVICE).requires_grad_()
    b = randn(8).to(KERNEL_DEVICE).requires_grad_()
    out = _kernel(x, w, b, upscale=2, padding_mode="replicate", activation="gelu")
    assert out.shape == (B, 2, 2 * H, 2 * W)
    gx, gw, gb = torch.autograd.grad(out.sum(), [x, w, b])
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))

    out = subpixel_conv2d_folded(x, fold_phase_weights(w), b, padding_mode="zeros")
    assert out.shape == (B, 8, 2 * H, 2 * W)
    gx, gw, gb = torch.autograd.grad(out.sum(), [x, w, b])
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_pixel_limit_is_a_reason():
    """Pixel indices are int32 in the kernels: a grid past 2**31 pixels is refused with a reason."""
    from dqfast.kernels.subpixel_conv import subpixel_conv2d_reasons, upsample_conv2d_reasons

    x = torch.empty(2, 1, 40000, 30000, device="meta")
    w = torch.empty(4, 1, 3, 3, device="meta")
    assert any("2**31" in r for r in subpixel_conv2d_reasons(x, w, upscale=2))
    assert any("2**31" in r for r in upsample_conv2d_reasons(x, w))
    assert subpixel_conv2d_reasons(x[:, :, :1000], w, upscale=2) == []


# ----------------------------------------------------------------------------------------------
# Dispatch: explain / BackendUnavailable
# ----------------------------------------------------------------------------------------------


def test_explain_and_unavailable():
    x, w, b, _ = _inputs(CASES[0])
    x, w, b = (t.to(KERNEL_DEVICE) for t in (x, w, b))
    with dqfast.use_backend("triton"):
        assert dqfast.explain("subpixel_conv2d", x, w, b, upscale=2) == []
        why = dqfast.explain("subpixel_conv2d", x.double(), w.double(), b.double(), upscale=2)
        assert any("float64" in reason for reason in why), why
        with pytest.raises(dqfast.BackendUnavailable, match="float64"):
            dqfast.subpixel_conv2d(x.double(), w.double(), b.double(), upscale=2)


@pytest.mark.skipif(not INTERPRET, reason="bf16 is refused only by the CPU interpreter")
def test_explain_bf16_under_interpreter():
    x, w, b, _ = _inputs(CASES[0])
    with dqfast.use_backend("triton"):
        why = dqfast.explain("subpixel_conv2d", x.bfloat16(), w.bfloat16(), b.bfloat16(), upscale=2)
    assert any("interpreter" in reason for reason in why), why


# ----------------------------------------------------------------------------------------------
# Folded resize-conv: conv3x3(nearest_upsample_x2(x)) on the low-res grid
# ----------------------------------------------------------------------------------------------


def _resize_conv(x, w, b, *, padding_mode, activation=None, negative_slope=0.01):
    """The high-res formulation the fold must reproduce: nearest x2, pad 1, 3x3 conv, activation."""
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    up = F.pad(up, (1, 1, 1, 1), mode="constant" if padding_mode == "zeros" else padding_mode)
    return ref.apply_activation(F.conv2d(up, w, b), activation, negative_slope)


def _folded(x, w, b, **kwargs):
    """The kernel path from the ORIGINAL high-res weight, so grads flow back to w through the fold."""
    from dqfast.kernels.subpixel_conv import fold_phase_weights, subpixel_conv2d_folded

    return subpixel_conv2d_folded(x, fold_phase_weights(w), b, **kwargs)


FOLD_CASES = [
    (1, 5, 5, 7, 6, "zeros", None, True),
    (2, 18, 4, 3, 35, "replicate", "gelu", True),
    (1, 3, 6, 5, 4, "zeros", "leaky_relu", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: f"B{c[0]}-c{c[1]}-{c[2]}x{c[3]}-o{c[4]}-{c[5]}-{c[6]}")
def test_folded_parity(case, dtype):
    B, cin, H, W, cout, pad, act, has_bias = case
    seed(3)
    x = randn(B, cin, H, W).to(dtype)
    w = randn(cout, cin, 3, 3, scale=(cin * 9) ** -0.5).to(dtype)
    b = randn(cout, scale=0.5).to(dtype) if has_bias else None
    go = randn(B, cout, 2 * H, 2 * W).to(dtype)
    kw = dict(padding_mode=pad, activation=act)
    out, grads = _run(_folded, [x, w, b], go, dtype, KERNEL_DEVICE, **kw)
    same, same_grads = _run(_resize_conv, [x, w, b], go, dtype, KERNEL_DEVICE, **kw)
    exact, exact_grads = _run(_resize_conv, [x, w, b], go, torch.float64, KERNEL_DEVICE, **kw)
    _check("out", out, same, exact, dtype)
    for name, g, s, e in zip(("grad_x", "grad_weight", "grad_bias"), grads, same_grads, exact_grads):
        _check(name, g, s, e, dtype)


def test_fold_phase_weights_matches_reference_fold():
    """The 2x2 phase taps placed in a 3x3 frame equal the reference's folded sub-pixel weight."""
    from dqfast.kernels.subpixel_conv import fold_phase_weights, phase_weights_to_dense

    seed(4)
    w = randn(5, 3, 3, 3, dtype=torch.float64)
    dense, _ = ref.fold_upsample_conv(w, None, scale=2, padding_mode="zeros")
    assert torch.equal(phase_weights_to_dense(fold_phase_weights(w)), dense)


def test_folded_phase_weight_layouts():
    """fold_phase_weights lays Cin innermost (read in place); a contiguous phase weight is repacked."""
    from dqfast.kernels.subpixel_conv import fold_phase_weights, subpixel_conv2d_folded

    seed(6)
    x, w, b = randn(1, 6, 5, 4), randn(7, 6, 3, 3, scale=6**-1), randn(7)
    phase = fold_phase_weights(w)
    assert phase.stride(2) == 1
    exact = _resize_conv(x.double(), w.double(), b.double(), padding_mode="replicate")
    for pw in (phase, phase.contiguous()):
        out = subpixel_conv2d_folded(
            x.to(KERNEL_DEVICE), pw.to(KERNEL_DEVICE), b.to(KERNEL_DEVICE), padding_mode="replicate"
        )
        torch.testing.assert_close(out.double().cpu(), exact, **FP32_TOL)


def test_folded_refuses_reflect():
    from dqfast.kernels.subpixel_conv import subpixel_conv2d_folded

    x = torch.zeros(1, 2, 3, 3, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="padding_mode"):
        subpixel_conv2d_folded(x, torch.zeros(4, 4, 2, 2, 2, device=KERNEL_DEVICE), padding_mode="reflect")


# ----------------------------------------------------------------------------------------------
# GPU only: bf16 and realistic sizes
# ----------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "case",
    [
        (4, 128, 64, 48, 64, 2, 3, "zeros", "leaky_relu", True),
        (2, 96, 37, 53, 3, 2, 3, "reflect", None, True),
        (1, 64, 33, 65, 32, 3, 5, "replicate", "gelu", False),
    ],
    ids=_case_id,
)
def test_parity_gpu_large(case, dtype):
    _parity(case, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_folded_parity_gpu_large(dtype):
    test_folded_parity((2, 128, 48, 40, 128, "replicate", "silu", True), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
def test_public_upsample_conv2d_routes_to_the_phase_kernel(dtype, padding_mode):
    """dqfast.upsample_conv2d under the triton backend matches the reference, output and gradients."""
    torch.manual_seed(5)
    x = torch.randn(2, 5, 7, 9).to(KERNEL_DEVICE, dtype)
    w = (torch.randn(6, 5, 3, 3) / 4).to(KERNEL_DEVICE, dtype)
    b = torch.randn(6).to(KERNEL_DEVICE, dtype)
    g = torch.randn(2, 6, 14, 18).to(KERNEL_DEVICE, dtype)
    kw = dict(padding_mode=padding_mode, activation="gelu")
    with dqfast.use_backend("triton"):
        assert dqfast.explain("upsample_conv2d", x, w, b, **kw) == []
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        out = dqfast.upsample_conv2d(xs, ws, bs, **kw)
        (out * g).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    with dqfast.use_backend("reference"):
        ref = dqfast.upsample_conv2d(x64, w64, b64, **kw)
        (ref * g.double()).sum().backward()
        same = dqfast.upsample_conv2d(x, w, b, **kw) if dtype == torch.float32 else None
    if dtype == torch.float32:
        tol = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.double(), ref, **tol)
        torch.testing.assert_close(same.double(), ref, **tol)
        for got, want in ((xs.grad, x64.grad), (ws.grad, w64.grad), (bs.grad, b64.grad)):
            torch.testing.assert_close(got.double(), want, **tol)
    else:
        xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
        with dqfast.use_backend("reference"):
            same = dqfast.upsample_conv2d(xr, wr, br, **kw)
            (same * g).sum().backward()
        assert_three_way(out, same, ref, "out")
        for name, got, sd, want in (
            ("dx", xs.grad, xr.grad, x64.grad),
            ("dw", ws.grad, wr.grad, w64.grad),
            ("db", bs.grad, br.grad, b64.grad),
        ):
            assert_three_way(got, sd, want, name)


@needs_kernels
def test_upsample_conv2d_other_kernel_sizes_fall_back_or_raise():
    x, w = torch.randn(1, 3, 4, 4).to(KERNEL_DEVICE), torch.randn(5, 3, 5, 5).to(KERNEL_DEVICE)
    with dqfast.use_backend("triton"):
        assert any("3x3" in r for r in dqfast.explain("upsample_conv2d", x, w))
        with pytest.raises(dqfast.BackendUnavailable, match="3x3"):
            dqfast.upsample_conv2d(x, w)
