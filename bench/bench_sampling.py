"""DQ-Transformer sampling, end to end: KV-cache decoding against recomputing the prefix.

Providers:

* ``cached``: ``DQTransformer.generate(use_cache=True)``: one index per step against per-layer KV
  caches (O(L) per step); its case records ``ratio_vs_peer`` against ``recompute`` measured
  alternately in the same run, and ``tokens_per_s``;
* ``recompute``: ``generate(use_cache=False)``: the released code's loop, which runs both
  transformers over the whole prefix at every step (O(L^2) per step; dqfast's version masks the
  mid-sequence pads, which changes nothing in its cost).

Both sample the same tokens for the same seed. Cases (budget 0.5: exact per-image fine fraction,
so the number of steps is fixed):

* ``small``: the shipped ``dqtransformer-small`` (8x8 / 16x16 grids, L = 323, 0.37 M parameters),
  B = 4: 34 coarse + 129 fine steps. Runs on the CPU (the bench smoke) and the GPU.
* ``paper``: the paper layout (16x16 / 32x32 grids, L = 1283, K = 1024, width 1024, 8 heads,
  B = 4) with the released 6 + 18 layers: GPU only. On the CPU, ``DQFAST_BENCH_PAPER_CPU=1`` runs
  it with 1 + 1 layers and B = 1 (a full recomputed sample takes minutes there).

tokens_per_s counts the sampled tokens (codes and eos) of the whole batch per second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from providers import DEVICE, HAS_CUDA, measure, side_by_side

from dqfast.models import create

CACHED, RECOMPUTE = "cached", "recompute"
BUDGET = 0.5
PAPER_CPU = os.environ.get("DQFAST_BENCH_PAPER_CPU") == "1"


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    gpu_only: bool
    overrides: tuple = ()

    def model(self):
        if self.name == "small":
            return create("dqtransformer-small", pretrained=True)
        torch.manual_seed(0)
        return create("dqtransformer", num_classes=0, **dict(self.overrides))


CASES = [
    Case("small", 4, gpu_only=False),
    Case("paper", 4, gpu_only=True),
    Case("paper_2_layers_cpu", 1, gpu_only=False, overrides=(("position_layers", 1), ("content_layers", 1))),
]


def _skip(case: Case) -> None:
    if case.gpu_only and not HAS_CUDA:
        pytest.skip("GPU-sized (310.7 M parameters, L = 1283); on the CPU see paper_2_layers_cpu")
    if case.name == "paper_2_layers_cpu":
        if HAS_CUDA:
            pytest.skip("the CPU stand-in for the paper case; the GPU runs the full model")
        if not PAPER_CPU:
            pytest.skip("a recomputed L = 1283 sample takes minutes on a CPU; set DQFAST_BENCH_PAPER_CPU=1")


@pytest.mark.parametrize("provider", [CACHED, RECOMPUTE])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sampling(benchmark, case: Case, provider: str):
    _skip(case)
    benchmark.group = f"sampling {case.name} B{case.batch}"
    model = case.model().to(DEVICE).eval()

    def run(use_cache: bool):
        return model.generate(
            case.batch, budget=BUDGET, generator=torch.Generator(DEVICE).manual_seed(0), use_cache=use_cache
        )

    tokens = run(provider == CACHED)
    n_tokens = int(tokens.lengths.sum()) + 2 * case.batch  # codes + the two eos of every image
    steps = int(tokens.lengths[:, 0].max()) + 2 + int(tokens.lengths[:, 1].max())
    cheap = not HAS_CUDA  # keep the CPU bench smoke short
    versus = {}
    if provider == CACHED:
        again = run(False)
        assert all(torch.equal(a, b) for a, b in zip(tokens.codes + tokens.positions, again.codes + again.positions))
        versus = dict(peer=RECOMPUTE, **side_by_side(lambda: run(True), lambda: run(False), rounds=2 if cheap else 5))
        versus["peer_tokens_per_s"] = n_tokens / versus["peer_seconds"]
    measure(
        benchmark,
        lambda: run(provider == CACHED),
        warmup=1,
        case=case.name,
        seq_len=model.seq_len,
        parameters=sum(p.numel() for p in model.parameters()),
        layers=(len(model.position_blocks), len(model.content_blocks)),
        sampled_tokens=n_tokens,
        steps=steps,
        **versus,
    )
    seconds = benchmark.extra_info.get("seconds")
    if seconds:
        benchmark.extra_info["tokens_per_s"] = n_tokens / seconds
        benchmark.extra_info["ms_per_step"] = 1e3 * seconds / steps
