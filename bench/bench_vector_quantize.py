"""Timing of ``dqfast.vector_quantize`` (forward: search + gather) against its peers.

Providers, grouped by shape and dtype so they line up:

* ``dqfast``: the Triton kernel through the public op (backend "triton");
* ``reference``: the pure-PyTorch reference (fp32 matmul distances, chunked over N, argmin);
* ``fast``: the pure-torch fast path (blocks of rows through one addmm each, argmin in cache),
  what serves CPU calls; its CPU cases record ``ratio_vs_peer`` against ``cdist_fp32``;
* ``compiled``: torch.compile of the reference;
* ``cdist_fp32``: ``torch.cdist`` in fp32 + argmin + gather, what vector-quantize-pytorch does
  (it materialises the N x K distance matrix);
* ``matmul_bf16``: ``||z||^2 - 2 z.c + ||c||^2`` in bf16 with one matmul + argmin + gather, the
  cheapest dense formulation (N x K in bf16, distances rounded to bf16).

Shapes: the latent of a 256 x 256 image at stride 8 (32 x 32 = 1024 vectors) for batches 8 and 64,
codebooks of 1024 and 16384 codes, code dims 4 and 8 (low-dim lookup-free style codebooks), 32 and
256 (VQGAN / DQ-VAE); fp32 and bf16 inputs. On a CPU only three modest fp32 cases run.

``code_statistics`` (EMA codebook statistics): ``reference``, ``fast`` and the one-hot matmul
``one_hot`` (what EMA codebooks commonly do: ``one_hot(indices, K).T @ x``).

flops = 2 * N * K * D (the distance matmul, the same for every provider); nbytes = z in + codebook
in + quantized out + indices and distances out, what a fused kernel must move at least.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from providers import COMPILED, DEVICE, DQFAST, FAST, REFERENCE, compiled, measure, require, side_by_side

import dqfast
from dqfast.fast import vector_quantize as fast_vq
from dqfast.reference.vector_quantize import code_statistics, vector_quantize

CDIST_FP32 = "cdist_fp32"
MATMUL_BF16 = "matmul_bf16"
PROVIDERS = (DQFAST, REFERENCE, FAST, COMPILED, CDIST_FP32, MATMUL_BF16)

GPU_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    """z (B * 32 * 32, D) against a (K, D) codebook (or N vectors directly for the CPU cases)."""

    N: int
    K: int
    D: int
    gpu_only: bool = True

    @property
    def name(self) -> str:
        return f"N{self.N}_K{self.K}_D{self.D}"

    def flops(self) -> float:
        return 2.0 * self.N * self.K * self.D

    def nbytes(self, dtype: torch.dtype) -> float:
        size = torch.empty((), dtype=dtype).element_size()
        return float((2 * self.N * self.D + self.K * self.D) * size + self.N * (8 + 4))


CASES = [Case(B * 32 * 32, K, D) for B in (8, 64) for K in (1024, 16384) for D in (4, 8, 32, 256)] + [
    Case(256, 64, 8, gpu_only=False),
    Case(1024, 256, 32, gpu_only=False),
    Case(2048, 512, 64, gpu_only=False),
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _params() -> list:
    out = []
    for case in CASES:
        for dtype in GPU_DTYPES if case.gpu_only else (torch.float32,):
            for provider in PROVIDERS:
                out.append(pytest.param(case, dtype, provider, id=f"{case.name}-{_dtype_name(dtype)}-{provider}"))
    return out


def cdist_fp32(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vector-quantize-pytorch's search: fp32 cdist over the full N x K matrix, argmin, gather."""
    indices = torch.cdist(z.float(), codebook.float()).argmin(-1)
    return F.embedding(indices, codebook), indices


def matmul_bf16(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 expanded into one bf16 matmul plus the two norms, argmin, gather."""
    zb, cb = z.bfloat16(), codebook.bfloat16()
    distance = zb.pow(2).sum(-1, keepdim=True) - 2 * (zb @ cb.T) + cb.pow(2).sum(-1)
    indices = distance.argmin(-1)
    return F.embedding(indices, codebook), indices


@pytest.mark.parametrize("case, dtype, provider", _params())
def test_vector_quantize(benchmark, case: Case, dtype: torch.dtype, provider: str):
    require(provider, gpu_only=case.gpu_only)
    benchmark.group = f"vector_quantize {case.name} {_dtype_name(dtype)}"
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(case.N, case.D, generator=gen).to(DEVICE, dtype)
    codebook = torch.randn(case.K, case.D, generator=gen).to(DEVICE, dtype)

    if provider == DQFAST:
        with dqfast.use_backend("triton"):
            reasons = dqfast.explain("vector_quantize", z, codebook)
        if reasons:
            pytest.skip("dqfast kernel unavailable: " + "; ".join(reasons))

        def fn():
            with dqfast.use_backend("triton"):
                return dqfast.vector_quantize(z, codebook)

    elif provider == REFERENCE:
        fn = lambda: vector_quantize(z, codebook)
    elif provider == FAST:
        fn = lambda: fast_vq.vector_quantize(z, codebook)
    elif provider == COMPILED:
        ref = compiled(vector_quantize)
        fn = lambda: ref(z, codebook)
    elif provider == CDIST_FP32:
        fn = lambda: cdist_fp32(z, codebook)
    else:
        fn = lambda: matmul_bf16(z, codebook)

    with torch.inference_mode():
        versus = {}
        if provider == FAST and not case.gpu_only:
            assert torch.equal(fn().indices, cdist_fp32(z, codebook)[1]), "fast path and cdist disagree"
            versus = dict(peer=CDIST_FP32, **side_by_side(fn, lambda: cdist_fp32(z, codebook)))
        measure(benchmark, fn, flops=case.flops(), nbytes=case.nbytes(dtype), provider=provider, **versus)


ONE_HOT = "one_hot"
# (N, K, D, gpu_only)
STATS_CASES = [(65536, 8192, 256, True), (4096, 512, 64, False)]


@pytest.mark.parametrize("N, K, D, gpu_only", STATS_CASES, ids=[f"N{n}_K{k}_D{d}" for n, k, d, _ in STATS_CASES])
@pytest.mark.parametrize("provider", [REFERENCE, FAST, ONE_HOT])
def test_code_statistics(benchmark, provider: str, N: int, K: int, D: int, gpu_only: bool):
    require(provider, gpu_only=gpu_only)
    benchmark.group = f"code_statistics N{N}_K{K}_D{D}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen).to(DEVICE)
    indices = torch.randint(0, K, (N,), generator=gen).to(DEVICE)

    def one_hot():
        onehot = F.one_hot(indices, K).to(x.dtype)
        return onehot.sum(0), onehot.T @ x

    fns = {REFERENCE: lambda: code_statistics(x, indices, K), FAST: lambda: fast_vq.code_statistics(x, indices, K)}
    fn = fns.get(provider, one_hot)
    with torch.inference_mode():
        counts, sums = fn()
        want_counts, want_sums = one_hot()
        assert torch.equal(counts, want_counts)
        torch.testing.assert_close(sums, want_sums, atol=1e-3, rtol=1e-4)
        versus = {}
        if provider == FAST and not gpu_only:
            versus = dict(peer=ONE_HOT, **side_by_side(fn, one_hot))
        measure(benchmark, fn, nbytes=float(N * D * 4 + N * 8 + K * D * 4), provider=provider, **versus)
