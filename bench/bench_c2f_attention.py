"""Benchmarks of coarse-to-fine attention (DESIGN §3.4) and of sampling with a KV cache.

Attention providers, all on the same layout:
- ``dqfast``: the Triton kernel through the public op (backend "triton");
- ``reference``: the pure-PyTorch reference (dense scores, fp32);
- ``fast``: the pure-torch fast path (SDPA over the packed real tokens), what serves CPU calls;
- ``sdpa_dense``: ``F.scaled_dot_product_attention`` with the dense (B, 1, L, L) boolean mask;
- ``flex``: compiled FlexAttention with a BlockMask built once from ``layout.mask_mod``;
- ``sdpa_causal``: plain causal SDPA over all L positions, the upper bound (it does not skip pads).

Shapes: the DQ-Transformer (width 1024, 8 heads of 128; segments 1+256+1 and 1024+1, about 128
coarse and 512 fine codes per image, so ~640 of 1283 positions are real) at batch 16 and 64, and
VAR-style block attention over 10 scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16 squared: L = 680).
On a CPU: a tiny layout (L = 41) and the DQ-Transformer layout at a quarter of its capacities
(segments 1+64+1 and 256+1, L = 323, about half real) with 8 heads of 64; the ``fast`` case
records its ratio against ``sdpa_dense`` (``ratio_vs_peer``, timed alternately in the same run).
FLOPs count only the allowed (query, key) pairs, identically for every provider, so TFLOP/s
compares providers on the same useful work.

Sampling: tokens/s generating one sequence with a few C2FAttention layers, decoding with the KV
cache (O(L) per step) against recomputing the whole prefix at every step (O(L^2) per step, how the
released DQ-Transformer samples). CPU runs tiny versions of both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from providers import DEVICE, DQFAST, FAST, HAS_CUDA, REFERENCE, measure, require, side_by_side

import dqfast
from dqfast.fast import c2f_attention as fast_attention
from dqfast.nn.c2f_attention import C2FAttention
from dqfast.reference.c2f_attention import C2FLayout, c2f_decode_attention

SDPA_DENSE = "sdpa_dense"
FLEX = "flex"
SDPA_CAUSAL = "sdpa_causal"
PROVIDERS = [DQFAST, REFERENCE, FAST, SDPA_DENSE, FLEX, SDPA_CAUSAL]

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    head_dim: int
    gpu_only: bool
    make_layout: Callable[[int, torch.Generator], C2FLayout]


def _dq_layout(coarse_capacity: int, fine_capacity: int, coarse: int, fine: int) -> Callable:
    """DQ-Transformer layout with per-image counts spread +-12% around ``coarse`` and ``fine``."""

    def make(batch: int, gen: torch.Generator) -> C2FLayout:
        coarse_counts = torch.randint(coarse - coarse // 8, coarse + coarse // 8 + 1, (batch,), generator=gen)
        fine_counts = torch.randint(fine - fine // 8, fine + fine // 8 + 1, (batch,), generator=gen)
        return C2FLayout.dq_transformer(coarse_counts, fine_counts, coarse_capacity, fine_capacity)

    return make


def _var_layout(batch: int, gen: torch.Generator) -> C2FLayout:
    sizes = [p * p for p in VAR_SCALES]
    return C2FLayout(sizes, torch.tensor(sizes).expand(batch, -1), mode="block")


SHAPES = {
    "dq_b16": Shape("dq_b16", 16, 8, 128, True, _dq_layout(256, 1024, 128, 512)),
    "dq_b64": Shape("dq_b64", 64, 8, 128, True, _dq_layout(256, 1024, 128, 512)),
    # VAR-d16: width 1024 as 16 heads of 64.
    "var_b16": Shape("var_b16", 16, 16, 64, True, _var_layout),
    # CPU-sized DQ layout: segments 1+10+1 and 28+1, L = 41.
    "cpu_tiny": Shape("cpu_tiny", 2, 2, 32, False, _dq_layout(10, 28, 5, 14)),
    # The DQ-Transformer layout at a quarter of its capacities: segments 1+64+1 and 256+1, L = 323.
    "cpu_dq323": Shape("cpu_dq323", 2, 8, 64, False, _dq_layout(64, 256, 32, 128)),
}
CASES = [(s, d) for s in ("dq_b16", "dq_b64", "var_b16") for d in ("bf16",)] + [
    ("dq_b16", "fp16"),
    ("cpu_tiny", "fp32"),
    ("cpu_dq323", "fp32"),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _require_attention_provider(provider: str, shape: Shape, direction: str) -> None:
    if provider == FLEX and not HAS_CUDA and direction == "fwd_bwd":
        pytest.skip("FlexAttention has no backward on CPU (torch raises NotImplementedError)")
    if provider == FLEX and not HAS_CUDA and os.environ.get("DQFAST_BENCH_COMPILE_CPU") != "1":
        pytest.skip("compiling FlexAttention on CPU takes ~25 s; set DQFAST_BENCH_COMPILE_CPU=1 to time it")
    if provider == SDPA_CAUSAL and not HAS_CUDA:
        pytest.skip("the causal upper bound is a GPU comparison; on CPU only reference and sdpa_dense run")
    require(provider, gpu_only=shape.gpu_only)


def _in_backend(name: str, fn: Callable) -> Callable:
    def call(*args):
        with dqfast.use_backend(name):
            return fn(*args)

    return call


_flex_compiled = None


def _flex_fn(layout: C2FLayout, batch: int, seq_len: int) -> Callable:
    """Compiled FlexAttention with its BlockMask built here, once, outside the timed region."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(layout.mask_mod, batch, None, seq_len, seq_len, device=DEVICE)
    return lambda q, k, v: _flex_compiled(q, k, v, block_mask=block_mask)


def _attention_fn(provider: str, layout: C2FLayout, q: torch.Tensor) -> Callable:
    """provider -> f(q, k, v) computing the same masked attention (pads 0, except sdpa_causal)."""
    B, _, L, _ = q.shape
    if provider == DQFAST:
        fn = _in_backend("triton", lambda q, k, v: dqfast.c2f_attention(q, k, v, layout))
        with dqfast.use_backend("triton"):
            reasons = dqfast.explain("c2f_attention", q, q, q, layout)
        if reasons:
            pytest.skip("; ".join(reasons))
        return fn
    if provider == REFERENCE:
        return _in_backend("reference", lambda q, k, v: dqfast.c2f_attention(q, k, v, layout))
    if provider == FAST:
        return lambda q, k, v: fast_attention.c2f_attention(q, k, v, layout)
    if provider == SDPA_DENSE:
        # Pad queries have no allowed key (SDPA would return NaN): let them see every key, then
        # zero their rows. The mask is built once, outside the timed region.
        query_valid = layout.key_valid()[:, None, :, None]
        mask = layout.dense_mask()[:, None] | ~query_valid

        def sdpa_dense(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * query_valid

        return sdpa_dense
    if provider == FLEX:
        return _flex_fn(layout, B, L)
    if provider == SDPA_CAUSAL:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"unknown provider {provider!r}")


_reference_outputs: dict[tuple[str, str], torch.Tensor] = {}


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape_name,dtype_name", CASES, ids=[f"{s}-{d}" for s, d in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_c2f_attention(benchmark, provider, shape_name, dtype_name, direction):
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    _require_attention_provider(provider, shape, direction)
    benchmark.group = f"c2f_attention {shape_name} {dtype_name} {direction}"

    gen = torch.Generator().manual_seed(0)
    layout = shape.make_layout(shape.batch, gen).to(DEVICE)
    B, Hh, L, Dh = shape.batch, shape.heads, layout.seq_len, shape.head_dim
    q, k, v = (
        torch.randn(B, Hh, L, Dh, generator=gen).to(DEVICE, dtype).requires_grad_(direction == "fwd_bwd")
        for _ in range(3)
    )
    attend = _attention_fn(provider, layout, q)

    # Every masked provider must compute the same thing before its time means anything.
    if provider != SDPA_CAUSAL:
        key = (shape_name, dtype_name)
        if key not in _reference_outputs:
            with torch.no_grad(), dqfast.use_backend("reference"):
                _reference_outputs[key] = dqfast.c2f_attention(q, k, v, layout).float()
        with torch.no_grad():
            got = attend(q, k, v).float()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, _reference_outputs[key], atol=tol, rtol=tol)

    if direction == "fwd":

        def run():
            with torch.no_grad():
                return attend(q, k, v)
    else:
        grad_out = torch.randn(B, Hh, L, Dh, generator=gen).to(DEVICE, dtype)

        def run():
            return torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)

    # 2 matmuls of 2*Dh flops per allowed pair per head; the backward does 5 (recomputed scores,
    # dV, dP, dQ, dK), i.e. 2.5x the forward, so forward + backward is 3.5x.
    allowed = int(layout.dense_mask().sum())
    flops = 4 * Dh * Hh * allowed * (1.0 if direction == "fwd" else 3.5)
    nbytes = 4 * B * Hh * L * Dh * q.element_size() * (1 if direction == "fwd" else 2)
    versus = {}
    if provider == FAST and not shape.gpu_only:
        peer = _attention_fn(SDPA_DENSE, layout, q)
        if direction == "fwd":

            def run_peer():
                with torch.no_grad():
                    return peer(q, k, v)
        else:

            def run_peer():
                return torch.autograd.grad(peer(q, k, v), (q, k, v), grad_out)

        versus = dict(peer=SDPA_DENSE, **side_by_side(run, run_peer))
    measure(
        benchmark,
        run,
        flops=flops,
        nbytes=nbytes,
        provider=provider,
        shape=shape_name,
        dtype=dtype_name,
        direction=direction,
        seq_len=L,
        valid_fraction=float(layout.key_valid().float().mean()),
        allowed_pairs=allowed,
        **versus,
    )


# ---------------------------------------------------------------------------------------------
# Decoding: few queries over a KV cache
# ---------------------------------------------------------------------------------------------

SDPA_MASKED = "sdpa_masked"
# name -> (batch, heads, head_dim, queries, layout maker, gpu_only); the cache is the whole layout.
DECODE = {
    "dq_b16": (16, 8, 128, 1, _dq_layout(256, 1024, 128, 512), True),
    "cpu_dq323": (4, 8, 64, 1, _dq_layout(64, 256, 32, 128), False),
}


@pytest.mark.parametrize("size", list(DECODE))
@pytest.mark.parametrize("provider", [REFERENCE, FAST, SDPA_MASKED])
def test_c2f_decode_attention(benchmark, provider, size):
    """One decoding step at the end of the sequence: Lq new queries over the full cache."""
    B, Hh, Dh, Lq, make_layout, gpu_only = DECODE[size]
    require(provider, gpu_only=gpu_only)
    benchmark.group = f"c2f_decode_attention {size}"
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    key_valid = make_layout(B, gen).key_valid().to(DEVICE)
    Lk = key_valid.shape[1]
    q = torch.randn(B, Hh, Lq, Dh, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(B, Hh, Lk, Dh, generator=gen).to(DEVICE, dtype) for _ in range(2))
    mask = key_valid[:, None, None, :]
    fns = {
        REFERENCE: lambda: c2f_decode_attention(q, k, v, key_valid),
        FAST: lambda: fast_attention.c2f_decode_attention(q, k, v, key_valid),
        SDPA_MASKED: lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    fn = fns[provider]
    with torch.inference_mode():
        torch.testing.assert_close(fn().float(), fns[REFERENCE]().float(), atol=1e-4, rtol=1e-4)
        versus = {}
        if provider == FAST and not gpu_only:
            versus = dict(peer=SDPA_MASKED, **side_by_side(fn, fns[SDPA_MASKED], rounds=20))
        measure(benchmark, fn, provider=provider, batch=B, cache_len=Lk, queries=Lq, **versus)


# ---------------------------------------------------------------------------------------------
# Sampling: KV cache vs recomputing the prefix
# ---------------------------------------------------------------------------------------------

KV_CACHE = "kv_cache"
RECOMPUTE = "recompute"

# name -> (tokens, dim, heads, layers, gpu_only)
SAMPLING = {
    "dq_640": (640, 1024, 8, 4, True),
    "cpu_tiny": (32, 64, 4, 2, False),
}


class _AttentionStack(torch.nn.Module):
    """Residual C2FAttention layers; the next input is the normalised last hidden state (a
    stand-in for embedding the sampled token: the attention is what is being timed)."""

    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(C2FAttention(dim, heads) for _ in range(layers))

    def next_input(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, h.shape[-1:])

    def sample_with_cache(self, x0: torch.Tensor, tokens: int) -> torch.Tensor:
        """x0: (1, 1, dim) -> (1, 1, dim), the input after ``tokens`` steps."""
        caches = [layer.new_cache(1, tokens) for layer in self.layers]
        x = x0
        for _ in range(tokens):
            h = x
            for layer, cache in zip(self.layers, caches):
                h = h + layer.step(h, cache)
            x = self.next_input(h)
        return x

    def sample_recompute(self, x0: torch.Tensor, layouts: list[C2FLayout]) -> torch.Tensor:
        """The same loop, running every layer over the whole prefix at every step."""
        xs = [x0]
        for layout in layouts:
            h = torch.cat(xs, dim=1)
            for layer in self.layers:
                h = h + layer(h, layout)
            xs.append(self.next_input(h[:, -1:]))
        return xs[-1]


@pytest.mark.parametrize("size", list(SAMPLING))
@pytest.mark.parametrize("provider", [KV_CACHE, RECOMPUTE])
def test_c2f_sampling(benchmark, provider, size):
    tokens, dim, heads, layers, gpu_only = SAMPLING[size]
    require(provider, gpu_only=gpu_only)
    benchmark.group = f"c2f_sampling {size}"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    torch.manual_seed(0)
    model = _AttentionStack(dim, heads, layers).to(DEVICE, dtype).eval()
    x0 = torch.randn(1, 1, dim, device=DEVICE, dtype=dtype)
    # Causal layouts of every prefix length, built outside the timed region.
    layouts = [C2FLayout((n,), torch.full((1, 1), n, device=DEVICE)) for n in range(1, tokens + 1)]

    def run():
        with torch.inference_mode():
            if provider == KV_CACHE:
                return model.sample_with_cache(x0, tokens)
            return model.sample_recompute(x0, layouts)

    # Which implementation "auto" picks for the decode step, recorded beside the timing.
    head_dim = dim // heads
    q = torch.zeros(1, heads, 1, head_dim, device=DEVICE, dtype=dtype)
    kv = torch.zeros(1, heads, tokens, head_dim, device=DEVICE, dtype=dtype)
    key_valid = torch.ones(1, tokens, dtype=torch.bool, device=DEVICE)
    with dqfast.use_backend("auto"):
        backend = "reference" if dqfast.explain("c2f_decode_attention", q, kv, kv, key_valid) else "triton"
        measure(benchmark, run, provider=provider, tokens=tokens, dim=dim, layers=layers, decode_backend=backend)
    seconds = benchmark.extra_info.get("seconds")
    if seconds:
        benchmark.extra_info["tokens_per_s"] = tokens / seconds
