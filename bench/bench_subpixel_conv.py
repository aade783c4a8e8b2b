"""Timing of ``dqfast.subpixel_conv2d`` (forward) against its peers, provider x shape x dtype.

Two families, each grouped by shape and dtype so the providers of one case line up (plus
``fast`` in both: the pure-torch fast path that serves CPU calls, whose CPU cases record
``ratio_vs_peer`` against ``cudnn`` / ``upsample_conv``, the plain-torch peer):

* sub-pixel conv: ``dqfast`` (Triton), ``reference`` (eager), ``compiled`` (torch.compile of the
  reference) and ``cudnn`` (F.conv2d + activation + F.pixel_shuffle, what an nn.Sequential runs);
* resize-conv (nearest x2 upsample + 3x3 conv, the VQGAN decoder upsampler): ``upsample_conv``
  (F.interpolate + cuDNN conv), ``cudnn_folded`` (the folded weights through cuDNN + pixel
  shuffle), ``dqfast_dense_folded`` (the folded 3x3 weights, zero taps included, through the public
  op's Triton kernel) and ``dqfast_folded`` (the phase-aware Triton kernel that skips the zero taps).

Shapes: the learned-codec decoder's sub-pixel layers (96 -> 512 channels at 1/8 resolution, then
128 -> 256 at 1/4 and 64 -> 12 at 1/2, each r = 2, for a 768x512 Kodak image and a 2048x2048
one), an ESPCN-style last layer (32 -> 3 * 16, r = 4, 1080p output) and the VQGAN upsamplers
(512 channels at 64x64, 256 at 128x128). They run on CUDA in fp16, bf16 and fp32; on a CPU only
the small fp32 cases run, for the providers that can.

flops counts the multiply-adds of the convolution, 2 * B * Cout * r**2 * H * W * Cin * k * k (for
the resize-conv, those of the 3x3 conv on the upsampled image, so a phase-aware kernel that skips
the folded kernel's zero taps shows a higher effective TFLOP/s); nbytes is input + weight + output.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from providers import COMPILED, DEVICE, DQFAST, FAST, REFERENCE, compiled, measure, require, side_by_side

import dqfast
from dqfast.fast import subpixel_conv as fast_spc
from dqfast.reference.subpixel_conv import fold_upsample_conv, subpixel_conv2d

CUDNN = "cudnn"
UPSAMPLE_CONV = "upsample_conv"
CUDNN_FOLDED = "cudnn_folded"
DQFAST_FOLDED = "dqfast_folded"
DQFAST_DENSE_FOLDED = "dqfast_dense_folded"

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The peers' activations, written with plain torch.nn.functional calls.
_TORCH_ACT = {
    None: lambda y: y,
    "relu": F.relu,
    "leaky_relu": lambda y: F.leaky_relu(y, 0.01),
    "gelu": F.gelu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class Case:
    """One layer: x (B, cin, H, W) -> (B, cout, r * H, r * W) with a k x k kernel."""

    name: str
    cin: int
    cout: int
    r: int
    H: int
    W: int
    k: int = 3
    activation: str | None = None
    gpu_only: bool = True
    B: int = 1

    def flops(self) -> float:
        return 2.0 * self.B * self.cout * self.r**2 * self.H * self.W * self.cin * self.k**2

    def nbytes(self, dtype: torch.dtype, weight_numel: int) -> float:
        size = torch.empty((), dtype=dtype).element_size()
        numel = self.B * self.cin * self.H * self.W + weight_numel + self.B * self.cout * self.r**2 * self.H * self.W
        return float(numel * size)


def _codec_decoder(image_w: int, image_h: int) -> list[Case]:
    """The three sub-pixel layers of a learned-codec decoder (leaky ReLU after the inner two)."""
    tag = f"{image_w}x{image_h}"
    return [
        Case(f"codec_96to512_{tag}", 96, 128, 2, image_h // 8, image_w // 8, activation="leaky_relu"),
        Case(f"codec_128to256_{tag}", 128, 64, 2, image_h // 4, image_w // 4, activation="leaky_relu"),
        Case(f"codec_64to12_{tag}", 64, 3, 2, image_h // 2, image_w // 2),
    ]


SUBPIXEL_CASES = [
    *_codec_decoder(768, 512),
    *_codec_decoder(2048, 2048),
    Case("espcn_32to48_r4_1080p", 32, 3, 4, 1080 // 4, 1920 // 4),
    Case("cpu_small_16to32", 16, 8, 2, 24, 24, activation="relu", gpu_only=False),
    Case("cpu_codec_64to12", 64, 3, 2, 48, 64, gpu_only=False),
]

# Resize-conv: x (B, C, H, W) -> (B, C, 2H, 2W), so cin = cout = C and r is the upsampling factor.
RESIZE_CASES = [
    Case("vqgan_up_512_64x64", 512, 512, 2, 64, 64),
    Case("vqgan_up_256_128x128", 256, 256, 2, 128, 128),
    Case("cpu_small_up_16_16x16", 16, 16, 2, 16, 16, gpu_only=False),
    Case("cpu_up_64_32x32", 64, 64, 2, 32, 32, gpu_only=False, B=2),
]


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Run the CPU-sized cases on one thread.

    On a shared 2-core machine under load, OpenMP barrier waits dominate a tiny conv: the small
    resize-conv case took 55 s to benchmark with 2 threads and 1.9 s with one.
    """
    if DEVICE.type == "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _params(cases: list[Case], providers: tuple[str, ...]) -> list:
    out = []
    for case in cases:
        dtypes = GPU_DTYPES if case.gpu_only else (torch.float32,)
        for dtype in dtypes:
            for provider in providers:
                out.append(pytest.param(case, dtype, provider, id=f"{case.name}-{_dtype_name(dtype)}-{provider}"))
    return out


def _require_kernel(*args, **kwargs) -> None:
    """Skip, with the kernel's own reasons, a call the Triton kernel would refuse."""
    with dqfast.use_backend("triton"):
        reasons = dqfast.explain("subpixel_conv2d", *args, **kwargs)
    if reasons:
        pytest.skip("dqfast kernel unavailable: " + "; ".join(reasons))


def _make(case: Case, dtype: torch.dtype, weight_channels: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.B, case.cin, case.H, case.W, generator=g).to(DEVICE, dtype)
    w = (torch.randn(weight_channels, case.cin, case.k, case.k, generator=g) / (case.cin * case.k**2) ** 0.5).to(
        DEVICE, dtype
    )
    b = (0.1 * torch.randn(weight_channels, generator=g)).to(DEVICE, dtype)
    return x, w, b


@pytest.mark.parametrize("case, dtype, provider", _params(SUBPIXEL_CASES, (DQFAST, REFERENCE, FAST, COMPILED, CUDNN)))
def test_subpixel_conv2d(benchmark, case: Case, dtype: torch.dtype, provider: str):
    require(provider, gpu_only=case.gpu_only)
    benchmark.group = f"subpixel_conv2d {case.name} {_dtype_name(dtype)}"
    x, w, b = _make(case, dtype, case.cout * case.r**2)
    kw = dict(upscale=case.r, activation=case.activation)
    act, pad = _TORCH_ACT[case.activation], case.k // 2

    if provider == DQFAST:
        _require_kernel(x, w, b, **kw)

        def fn():
            with dqfast.use_backend("triton"):
                return dqfast.subpixel_conv2d(x, w, b, **kw)

    elif provider == REFERENCE:
        fn = lambda: subpixel_conv2d(x, w, b, **kw)
    elif provider == FAST:
        fn = lambda: fast_spc.subpixel_conv2d(x, w, b, **kw)
    elif provider == COMPILED:
        ref = compiled(subpixel_conv2d)
        fn = lambda: ref(x, w, b, **kw)
    else:
        fn = lambda: F.pixel_shuffle(act(F.conv2d(x, w, b, padding=pad)), case.r)

    with torch.inference_mode():
        versus = {}
        if provider == FAST and not case.gpu_only:
            peer = lambda: F.pixel_shuffle(act(F.conv2d(x, w, b, padding=pad)), case.r)
            torch.testing.assert_close(fn(), peer(), atol=1e-5, rtol=1e-5)
            versus = dict(peer=CUDNN, **side_by_side(fn, peer))
        measure(benchmark, fn, flops=case.flops(), nbytes=case.nbytes(dtype, w.numel()), provider=provider, **versus)


@pytest.mark.parametrize(
    "case, dtype, provider",
    _params(RESIZE_CASES, (DQFAST_FOLDED, DQFAST_DENSE_FOLDED, FAST, CUDNN_FOLDED, UPSAMPLE_CONV)),
)
def test_resize_conv(benchmark, case: Case, dtype: torch.dtype, provider: str):
    require(DQFAST if provider in (DQFAST_FOLDED, DQFAST_DENSE_FOLDED) else provider, gpu_only=case.gpu_only)
    benchmark.group = f"resize_conv {case.name} {_dtype_name(dtype)}"
    x, w, b = _make(case, dtype, case.cout)
    folded_w, folded_b = fold_upsample_conv(w, b, scale=case.r)
    pad, folded_pad = case.k // 2, folded_w.shape[-1] // 2

    if provider == DQFAST_FOLDED:
        # The phase-aware kernel reads only the 2x2 taps each output phase uses.
        with dqfast.use_backend("triton"):
            reasons = dqfast.explain("upsample_conv2d", x, w, b, scale=case.r)
        if reasons:
            pytest.skip("dqfast kernel unavailable: " + "; ".join(reasons))

        def fn():
            with dqfast.use_backend("triton"):
                return dqfast.upsample_conv2d(x, w, b, scale=case.r)

    elif provider == DQFAST_DENSE_FOLDED:
        _require_kernel(x, folded_w, folded_b, upscale=case.r)

        def fn():
            with dqfast.use_backend("triton"):
                return dqfast.subpixel_conv2d(x, folded_w, folded_b, upscale=case.r)

    elif provider == FAST:
        # The 2x2-tap phases with the folded weights cached across calls (inference).
        fn = lambda: fast_spc.upsample_conv2d(x, w, b, scale=case.r)
    elif provider == CUDNN_FOLDED:
        fn = lambda: F.pixel_shuffle(F.conv2d(x, folded_w, folded_b, padding=folded_pad), case.r)
    else:
        fn = lambda: F.conv2d(F.interpolate(x, scale_factor=case.r, mode="nearest"), w, b, padding=pad)

    # case.flops() is the 3x3 conv on the upsampled image (C -> C at r x the resolution), the same
    # number for every provider of the group; nbytes counts the unfolded weight.
    with torch.inference_mode():
        versus = {}
        if provider == FAST and not case.gpu_only:
            peer = lambda: F.conv2d(F.interpolate(x, scale_factor=case.r, mode="nearest"), w, b, padding=pad)
            torch.testing.assert_close(fn(), peer(), atol=1e-5, rtol=1e-5)
            versus = dict(peer=UPSAMPLE_CONV, **side_by_side(fn, peer))
        measure(benchmark, fn, flops=case.flops(), nbytes=case.nbytes(dtype, w.numel()), provider=provider, **versus)
