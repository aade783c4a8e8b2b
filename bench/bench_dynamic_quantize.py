"""Timing of ``dqfast.dynamic_quantize`` (forward) against the official DQ-VAE path.

Providers, grouped by shape and dtype so they line up:

* ``dqfast``: the Triton kernels through the public op (backend "triton");
* ``reference``: the pure-PyTorch reference (searches each coded vector once);
* ``fast``: the pure-torch fast path (the reference's algorithm with the chunked addmm search),
  what serves CPU calls; its CPU case records ``ratio_vs_peer`` against ``official``;
* ``compiled``: torch.compile of the reference;
* ``official``: the released DQ-VAE quantizer (:func:`official_dynamic_quantize` below): broadcast
  the coarse map 2x2 onto the fine grid, merge with the fine map by the grain mask, then search
  every one of the 32 x 32 cells with addmm + argmin (a coarse region is searched 4 times) and
  weight coarse cells 1/4 in the loss.

Shape: DQ-VAE at 256 x 256: a 16 x 16 coarse and a 32 x 32 fine map of D = 256, K = 1024 codes,
budget 0.5 (half the regions fine: 128 + 4 * 128 = 640 coded vectors per image instead of 1024),
batches 8 and 64, fp32 and bf16. Every provider gets the same precomputed grain map (exact budget
from random router scores), so the timing is the quantization alone. On a CPU only a small fp32
case runs.

flops = 2 * (coded vectors) * K * D, the useful distance work, the same number for every provider
(the official path does 1024 / 640 = 1.6x that); nbytes = both feature maps in + codebook in +
quantized out (fine grid) + indices out.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from providers import COMPILED, DEVICE, DQFAST, FAST, REFERENCE, compiled, measure, require, side_by_side

import dqfast
from dqfast.fast import vector_quantize as fast_vq
from dqfast.reference.vector_quantize import dynamic_quantize, grain_from_budget

OFFICIAL = "official"
PROVIDERS = (DQFAST, REFERENCE, FAST, COMPILED, OFFICIAL)

GPU_DTYPES = (torch.float32, torch.bfloat16)
BUDGET = 0.5


@dataclass(frozen=True)
class Case:
    """features: (B, D, H, W) coarse and (B, D, 2H, 2W) fine; codebook (K, D)."""

    B: int
    H: int
    W: int
    D: int
    K: int
    gpu_only: bool = True

    @property
    def name(self) -> str:
        return f"B{self.B}_{self.H}x{self.W}to{2 * self.H}x{2 * self.W}_D{self.D}_K{self.K}"

    def coded_vectors(self) -> int:
        fine = int(BUDGET * self.H * self.W + 0.5)
        return self.B * (self.H * self.W - fine + 4 * fine)

    def flops(self) -> float:
        return 2.0 * self.coded_vectors() * self.K * self.D

    def nbytes(self, dtype: torch.dtype) -> float:
        size = torch.empty((), dtype=dtype).element_size()
        cells = self.B * self.H * self.W
        features = 5 * cells * self.D  # coarse + fine (4x)
        return float((features + self.K * self.D + 4 * cells * self.D) * size + 4 * cells * 8)


CASES = [Case(B, 16, 16, 256, 1024) for B in (8, 64)] + [
    Case(2, 4, 4, 16, 64, gpu_only=False),
    Case(2, 16, 16, 64, 512, gpu_only=False),
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


def official_dynamic_quantize(
    features: list[torch.Tensor], codebook: torch.Tensor, grain: torch.Tensor, beta: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released dual-grain DQ-VAE quantizer (merge, then search every finest cell).

    features: [(B, D, H, W), (B, D, 2H, 2W)]; codebook: (K, D); grain: (B, H, W) in {0, 1}.
    Returns (quantized (B, D, 2H, 2W) straight-through, indices (B, 2H, 2W), loss).
    """
    coarse, fine = features
    B, D, Hf, Wf = fine.shape
    fine_mask = grain.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].bool()  # (B, 1, Hf, Wf)
    merged = torch.where(fine_mask, fine, F.interpolate(coarse, scale_factor=2, mode="nearest"))
    z = rearrange(merged, "b d h w -> (b h w) d")
    distance = torch.addmm(z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1), z, codebook.T, alpha=-2)
    indices = distance.argmin(1)
    q = rearrange(F.embedding(indices, codebook), "(b h w) d -> b d h w", b=B, h=Hf)
    # Coarse cells weigh 1/4 so that every region counts once.
    weight = torch.where(fine_mask, 1.0, 0.25).to(merged.dtype)
    err = (weight * (merged.detach() - q).pow(2)).sum()
    commit = (weight * (merged - q.detach()).pow(2)).sum()
    loss = (beta * commit + err) / (weight.sum() * D)
    quantized = merged + (q - merged).detach()
    return quantized, indices.view(B, Hf, Wf), loss


@pytest.mark.parametrize("case, dtype, provider", _params())
def test_dynamic_quantize(benchmark, case: Case, dtype: torch.dtype, provider: str):
    require(provider, gpu_only=case.gpu_only)
    benchmark.group = f"dynamic_quantize {case.name} {_dtype_name(dtype)}"
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(case.B, case.D, case.H * s, case.W * s, generator=gen).to(DEVICE, dtype) for s in (1, 2)]
    codebook = torch.randn(case.K, case.D, generator=gen).to(DEVICE, dtype)
    grain = grain_from_budget(torch.randn(case.B, case.H, case.W, 2, generator=gen).to(DEVICE), BUDGET)

    if provider == DQFAST:
        with dqfast.use_backend("triton"):
            reasons = dqfast.explain("dynamic_quantize", features, codebook, grain=grain)
        if reasons:
            pytest.skip("dqfast kernel unavailable: " + "; ".join(reasons))

        def fn():
            with dqfast.use_backend("triton"):
                return dqfast.dynamic_quantize(features, codebook, grain=grain)

    elif provider == REFERENCE:
        fn = lambda: dynamic_quantize(features, codebook, grain=grain)
    elif provider == FAST:
        fn = lambda: fast_vq.dynamic_quantize(features, codebook, grain=grain)
    elif provider == COMPILED:
        ref = compiled(dynamic_quantize)
        fn = lambda: ref(features, codebook, grain=grain)
    else:
        fn = lambda: official_dynamic_quantize(features, codebook, grain)

    with torch.inference_mode():
        versus = {}
        if provider == FAST and not case.gpu_only:
            official = official_dynamic_quantize(features, codebook, grain)
            assert torch.equal(fn().indices, official[1]), "fast path and official path disagree"
            versus = dict(
                peer=OFFICIAL, **side_by_side(fn, lambda: official_dynamic_quantize(features, codebook, grain))
            )
        measure(
            benchmark,
            fn,
            flops=case.flops(),
            nbytes=case.nbytes(dtype),
            provider=provider,
            coded_vectors=case.coded_vectors(),
            **versus,
        )
