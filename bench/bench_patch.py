"""Timing of ``dqfast.patch`` on the models people already have: before and after patching.

* decoder: diffusers ``AutoencoderKL`` decoder in its default Stable-Diffusion block layout
  (four ``UpDecoderBlock2D``, two resnets each plus one, three ``Upsample2D``); ``sd-vae-512`` is
  the real size (channels 128/256/512/512, 64x64 latent -> 512x512 image, bf16, GPU only), the
  small case (channels 32/64/128/128, 8x8 latent -> 64x64, fp32) runs everywhere. Providers:
  ``eager`` (diffusers as is), ``patched`` (``dqfast.patch``: every Upsample2D through
  ``dqfast.upsample_conv2d``), and on GPU ``compiled`` / ``patched_compiled`` (``torch.compile`` of
  each; compiling a whole decoder on the CPU takes minutes, so those are GPU-only).
* vq: vector-quantize-pytorch ``VectorQuantize`` (library defaults: euclidean, EMA, rotation
  trick) forward + backward in training mode; ``N65536-K8192-D256`` on GPU, ``N4096-K1024-D64``
  everywhere. Providers ``library`` and ``patched`` (search through ``dqfast.vector_quantize``).
* upsample2d: one ``Upsample2D`` alone, ``eager`` vs ``patched`` (the SD-VAE's 512-channel
  128 -> 256 upsampler in bf16 on GPU; 128 channels 32 -> 64 in fp32 everywhere).

GPU cases record peak memory (``measure`` resets the CUDA peak after warm-up). CPU cases run on
one thread (see bench_subpixel_conv.py for why). ``python bench/bench_patch.py`` times the
providers of each case this machine runs alternately (same load for all) and prints the ratios;
on a CPU it counts process CPU time by default (steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from providers import DEVICE, HAS_CUDA, compiled, device_info, measure, sync

import dqfast

EAGER, PATCHED, COMPILED_EAGER, PATCHED_COMPILED = "eager", "patched", "compiled", "patched_compiled"
LIBRARY = "library"
DECODER_PROVIDERS = (EAGER, PATCHED, COMPILED_EAGER, PATCHED_COMPILED)
VQ_PROVIDERS = (LIBRARY, PATCHED)


@dataclass(frozen=True)
class DecoderCase:
    name: str
    channels: tuple[int, int, int, int]
    latent: int  # latent side; the image side is 8x
    dtype: torch.dtype
    gpu_only: bool


@dataclass(frozen=True)
class VQCase:
    name: str
    n: int
    k: int
    d: int
    gpu_only: bool


DECODER_CASES = [
    DecoderCase("sd-vae-512", (128, 256, 512, 512), 64, torch.bfloat16, gpu_only=True),
    DecoderCase("sd-vae-layout-small", (32, 64, 128, 128), 8, torch.float32, gpu_only=False),
]
# One Upsample2D alone: (channels, input side, dtype, gpu_only). The GPU case is the SD-VAE decoder's
# 512-channel 128x128 -> 256x256 upsampler.
UPSAMPLE_CASES = [(512, 128, torch.bfloat16, True), (128, 32, torch.float32, False)]
VQ_CASES = [
    VQCase("N65536-K8192-D256", 65536, 8192, 256, gpu_only=True),
    VQCase("N4096-K1024-D64", 4096, 1024, 64, gpu_only=False),
]


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    if DEVICE.type == "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_decoder(case: DecoderCase, patched: bool) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=case.channels,
        layers_per_block=2,
        latent_channels=4,
    )
    decoder = vae.decoder.to(device=DEVICE, dtype=case.dtype).eval()
    if patched:
        report = dqfast.patch(decoder)
        assert len(report.names) == 3, report
    return decoder


def decoder_fn(case: DecoderCase, provider: str) -> Callable[[], torch.Tensor]:
    decoder = make_decoder(case, patched=provider in (PATCHED, PATCHED_COMPILED))
    if provider in (COMPILED_EAGER, PATCHED_COMPILED):
        decoder = compiled(decoder)
    z = torch.randn(1, 4, case.latent, case.latent, generator=torch.Generator().manual_seed(1))
    z = z.to(device=DEVICE, dtype=case.dtype)

    def fn():
        with torch.no_grad():
            return decoder(z)

    return fn


def upsample_fn(channels: int, side: int, dtype: torch.dtype, provider: str) -> Callable[[], torch.Tensor]:
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    module = Upsample2D(channels, use_conv=True).to(device=DEVICE, dtype=dtype)
    if provider == PATCHED:
        assert dqfast.patch(module).names == [""]
    x = torch.randn(1, channels, side, side, device=DEVICE, dtype=dtype)

    def fn():
        with torch.no_grad():
            return module(x)

    return fn


def vq_fn(case: VQCase, provider: str) -> Callable[[], None]:
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    vq = VectorQuantize(dim=case.d, codebook_size=case.k).to(DEVICE).train()
    if provider == PATCHED:
        assert dqfast.patch(vq).names == [""]
    x = torch.randn(case.n // 1024, 1024, case.d, device=DEVICE, requires_grad=True)

    def fn():
        quantized, _, loss = vq(x)
        (quantized.square().mean() + loss).backward()

    return fn


def side_by_side(fns: dict[str, Callable[[], object]], rounds: int = 3, timer=time.perf_counter) -> dict[str, float]:
    """Best time of each fn over ``rounds`` alternating calls (order flipped every round), after one warm-up.

    ``timer=time.process_time`` counts this process's CPU time: on a shared, loaded CPU machine with
    one thread it is far steadier than wall time (other processes' time slices do not count).
    """
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for i in range(rounds + 1):
        for name in names if i % 2 else reversed(names):
            start = timer()
            fns[name]()
            sync()
            if i:
                best[name] = min(best[name], timer() - start)
    return best


def _skip_reason(gpu_only: bool, provider: str) -> str | None:
    if gpu_only and not HAS_CUDA:
        return "GPU-sized case; on CPU only the small case runs"
    if provider in (COMPILED_EAGER, PATCHED_COMPILED) and not HAS_CUDA:
        return "torch.compile of a whole decoder takes minutes on the CPU; compiled providers are timed on GPU"
    return None


def _need(module_name: str) -> None:
    pytest.importorskip(module_name, reason=f"{module_name} is installed by `make test` (extra 'integrations')")


@pytest.mark.parametrize("provider", DECODER_PROVIDERS)
@pytest.mark.parametrize("case", DECODER_CASES, ids=lambda c: c.name)
def test_decoder(benchmark, case: DecoderCase, provider: str):
    _need("diffusers")
    benchmark.group = f"patch decoder {case.name} {str(case.dtype).removeprefix('torch.')}"
    reason = _skip_reason(case.gpu_only, provider)
    if reason:
        pytest.skip(reason)
    measure(benchmark, decoder_fn(case, provider), warmup=1, provider=provider, image=8 * case.latent)


@pytest.mark.parametrize("provider", (EAGER, PATCHED))
@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=lambda c: f"c{c[0]}-{c[1]}px-{str(c[2]).removeprefix('torch.')}")
def test_upsample2d(benchmark, case: tuple, provider: str):
    _need("diffusers")
    channels, side, dtype, gpu_only = case
    benchmark.group = f"patch Upsample2D c{channels} {side}->{2 * side} {str(dtype).removeprefix('torch.')}"
    reason = _skip_reason(gpu_only, provider)
    if reason:
        pytest.skip(reason)
    flops = 2 * channels * channels * 9 * (2 * side) ** 2  # the 3x3 conv on the upsampled image
    measure(benchmark, upsample_fn(channels, side, dtype, provider), warmup=1, flops=flops, provider=provider)


@pytest.mark.parametrize("provider", VQ_PROVIDERS)
@pytest.mark.parametrize("case", VQ_CASES, ids=lambda c: c.name)
def test_vector_quantize_train(benchmark, case: VQCase, provider: str):
    _need("vector_quantize_pytorch")
    benchmark.group = f"patch VectorQuantize fwd+bwd {case.name}"
    reason = _skip_reason(case.gpu_only, provider)
    if reason:
        pytest.skip(reason)
    measure(benchmark, vq_fn(case, provider), warmup=1, provider=provider, n=case.n, k=case.k, d=case.d)


def main() -> None:
    parser = argparse.ArgumentParser(description="patched vs unpatched, side by side, on this machine")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latent", type=int, default=None, help="override the small decoder's latent side")
    parser.add_argument("--wall", action="store_true", help="CPU: wall time instead of process CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = time.perf_counter if HAS_CUDA or args.wall else time.process_time
    print(device_info())
    print(f"threads: {torch.get_num_threads()}, rounds: {args.rounds} (best of each, alternating)")
    print(f"timer: {timer.__name__}")
    for case in DECODER_CASES:
        if case.gpu_only and not HAS_CUDA:
            continue
        if args.latent and not case.gpu_only:
            case = DecoderCase(case.name, case.channels, args.latent, case.dtype, case.gpu_only)
        fns = {EAGER: decoder_fn(case, EAGER), PATCHED: decoder_fn(case, PATCHED)}
        if HAS_CUDA:
            fns[COMPILED_EAGER] = decoder_fn(case, COMPILED_EAGER)
            fns[PATCHED_COMPILED] = decoder_fn(case, PATCHED_COMPILED)
        best = side_by_side(fns, args.rounds, timer)
        times = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in best.items())
        print(f"decoder {case.name} {8 * case.latent}px: {times}; eager/patched {best[EAGER] / best[PATCHED]:.2f}x")
    for channels, side, dtype, gpu_only in UPSAMPLE_CASES:
        if gpu_only and not HAS_CUDA:
            continue
        fns = {name: upsample_fn(channels, side, dtype, name) for name in (EAGER, PATCHED)}
        best = side_by_side(fns, args.rounds, timer)
        times = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in best.items())
        print(f"Upsample2D c{channels} {side}->{2 * side}: {times}; eager/patched {best[EAGER] / best[PATCHED]:.2f}x")
    for case in VQ_CASES:
        if case.gpu_only and not HAS_CUDA:
            continue
        best = side_by_side({LIBRARY: vq_fn(case, LIBRARY), PATCHED: vq_fn(case, PATCHED)}, args.rounds, timer)
        times = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in best.items())
        print(f"VectorQuantize fwd+bwd {case.name}: {times}; library/patched {best[LIBRARY] / best[PATCHED]:.2f}x")


if __name__ == "__main__":
    main()
