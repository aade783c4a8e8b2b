"""Triton coarse-to-fine attention against the reference: forward, dq/dk/dv, KV-cache decoding.

Every kernel call goes through the public API under ``dqfast.use_backend("triton")``. fp32 is
compared with the float64 reference at 1e-4; fp16 with the three-way rule (kernel error vs the
float64 result within twice the fp16 reference's error plus a rounding band). Shapes are small
but odd: segment capacities not multiples of the 16-wide interpreter tiles, empty segments,
lengths 0 and full, B = 1, one and several heads, Dh = 16, 24 and 32, strided and fused-qkv views.
"""

from __future__ import annotations

import math

import pytest
import torch

import dqfast
from dqfast.reference.c2f_attention import C2FLayout
from dqfast.reference.c2f_attention import c2f_attention as reference_attention
from dqfast.reference.c2f_attention import c2f_decode_attention as reference_decode
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

# name -> (segment_sizes, lengths, mode, heads, head_dim, how q/k/v are laid out, scale)
CASES = {
    "causal_empty_segment": ((7, 0, 20, 13), [[5, 0, 20, 0], [7, 0, 3, 13]], "causal", 2, 24, "contiguous", None),
    "block_empty_segment": ((7, 0, 20, 13), [[5, 0, 20, 0], [7, 0, 3, 13]], "block", 2, 24, "contiguous", None),
    "causal_b1_one_segment": ((33,), [[33]], "causal", 1, 16, "contiguous", None),
    # Sample 0 is all real: key tiles spanning segment boundaries are fully valid yet still masked.
    "block_var_scales": ((1, 4, 16, 25), [[1, 4, 16, 25], [1, 4, 9, 25]], "block", 3, 32, "strided", 0.3),
    "causal_dq_fused_qkv": ((18, 33), [[18, 33], [12, 5], [2, 0]], "causal", 2, 24, "fused", None),
    "block_fused_qkv": ((10, 27), [[10, 0], [3, 27]], "block", 2, 16, "fused", None),
    "causal_strided_empty_coarse": ((9, 40), [[0, 40], [9, 17]], "causal", 1, 32, "strided", 1.7),
    "causal_all_padding_sample": ((5, 12), [[0, 0], [5, 12]], "causal", 1, 16, "contiguous", None),
}


def valid_positions(sizes, lengths) -> torch.Tensor:
    """(B, L) bool, built segment by segment: the first lengths[b][s] slots of segment s are real."""
    rows = []
    for per_sample in lengths:
        row = []
        for size, n in zip(sizes, per_sample):
            row += [True] * n + [False] * (size - n)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def segment_of(sizes) -> torch.Tensor:
    """(L,) int64: the segment index of every position."""
    return torch.tensor([s for s, size in enumerate(sizes) for _ in range(size)], dtype=torch.int64)


def make_leaves(kind: str, B: int, H: int, L: int, Dh: int) -> list[torch.Tensor]:
    """fp32 CPU leaf values: three (B, H, L, Dh) tensors, or one fused (B, L, 3, H, Dh) qkv."""
    if kind == "fused":
        return [randn(B, L, 3, H, Dh)]
    return [randn(B, H, L, Dh) for _ in range(3)]


def to_qkv(kind: str, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, L, Dh); the fused layout gives transposed views of one projection output."""
    if kind == "fused":
        q, k, v = leaves[0].unbind(dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return leaves[0], leaves[1], leaves[2]


def cast_leaves(leaves, kind: str, dtype: torch.dtype, strided: bool) -> list[torch.Tensor]:
    out = []
    for t in leaves:
        t = t.to(device=KERNEL_DEVICE, dtype=dtype)
        out.append(noncontiguous(t).requires_grad_() if strided else t.requires_grad_())
    return out


def attention_and_grads(backend: str, leaves, kind: str, layout, grad_out, scale) -> list[torch.Tensor]:
    """[out, grad of every leaf] through dqfast.c2f_attention under ``backend``."""
    with dqfast.use_backend(backend):
        out = dqfast.c2f_attention(*to_qkv(kind, leaves), layout, scale=scale)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def per_position(t: torch.Tensor, kind: str, is_output: bool) -> torch.Tensor:
    """A (B, L, ...) view of an output or gradient so pad positions can be selected with (B, L)."""
    return t if kind == "fused" and not is_output else t.transpose(1, 2)


def compare(kernel, same_dtype, exact, dtype, names) -> None:
    for got, same, ref, name in zip(kernel, same_dtype, exact, names):
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), ref, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert_three_way(got, same, ref, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_reference(case, dtype):
    sizes, lengths, mode, H, Dh, kind, scale = CASES[case]
    seed(list(CASES).index(case))
    B, L = len(lengths), sum(sizes)
    layout = C2FLayout(sizes, torch.tensor(lengths, device=KERNEL_DEVICE), mode)
    leaves = make_leaves(kind, B, H, L, Dh)
    grad_out = randn(B, H, L, Dh, device=KERNEL_DEVICE)

    strided = kind == "strided"
    kernel = attention_and_grads("triton", cast_leaves(leaves, kind, dtype, strided), kind, layout, grad_out, scale)
    same = attention_and_grads("reference", cast_leaves(leaves, kind, dtype, False), kind, layout, grad_out, scale)
    exact = attention_and_grads(
        "reference", cast_leaves(leaves, kind, torch.float64, False), kind, layout, grad_out, scale
    )
    names = ["out"] + (["dqkv"] if kind == "fused" else ["dq", "dk", "dv"])
    assert kernel[0].dtype == dtype and kernel[0].shape == (B, H, L, Dh)
    compare(kernel, same, exact, dtype, names)

    # Pad queries output exactly 0; pad positions get exactly 0 gradient (as queries and as keys).
    pad = ~valid_positions(sizes, lengths).to(KERNEL_DEVICE)
    for i, (t, name) in enumerate(zip(kernel, names)):
        assert (per_position(t, kind, is_output=i == 0)[pad] == 0).all(), f"{name} is not 0 at pad positions"


@pytest.mark.parametrize("mode", ["causal", "block"])
def test_pad_positions_are_never_read(mode):
    """NaN and +-inf in every pad slot of q, k, v and of the output gradient change nothing.

    The padded tail of each segment is skipped (never loaded), not multiplied by a zero weight:
    a single NaN read would turn its whole row or column into NaN. Real queries are computed as if
    pad k and v were 0, pad queries output exactly 0 with dq = 0, pad keys get dk = dv = 0: the
    kernel equals itself on zeroed pads bit for bit, and the reference on the poisoned inputs.
    """
    seed(3)
    sizes, lengths = (13, 3, 29), [[4, 3, 17], [13, 0, 29]]
    B, H, L, Dh = 2, 2, sum(sizes), 24
    layout = C2FLayout(sizes, torch.tensor(lengths, device=KERNEL_DEVICE), mode)
    pad = ~valid_positions(sizes, lengths).to(KERNEL_DEVICE)
    clean = [randn(B, H, L, Dh, device=KERNEL_DEVICE) for _ in range(3)]
    grad_out = randn(B, H, L, Dh, device=KERNEL_DEVICE)
    for t in (*clean, grad_out):
        t.transpose(1, 2)[pad] = 0.0
    poisoned = [t.clone() for t in clean]
    poisoned_grad_out = grad_out.clone()
    for t, fill in zip((*poisoned, poisoned_grad_out), ("nan", "inf", "-inf", "nan")):
        t.transpose(1, 2)[pad] = float(fill)

    kernel = attention_and_grads(
        "triton", [t.clone().requires_grad_() for t in poisoned], "contiguous", layout, poisoned_grad_out, None
    )
    zeroed = attention_and_grads(
        "triton", [t.clone().requires_grad_() for t in clean], "contiguous", layout, grad_out, None
    )
    exact = attention_and_grads(
        "reference", [t.double().requires_grad_() for t in clean], "contiguous", layout, grad_out, None
    )
    # The reference's rule covers pad q, k, v (the output gradient at pad rows is kept clean here).
    spec = attention_and_grads(
        "reference", [t.double().requires_grad_() for t in poisoned], "contiguous", layout, grad_out, None
    )
    for got, same, ref, ref_poisoned, name in zip(kernel, zeroed, exact, spec, ["out", "dq", "dk", "dv"]):
        assert torch.isfinite(got).all(), f"{name}: a pad slot was read"
        assert torch.equal(got, same), f"{name}: pad values changed the result"
        assert (got.transpose(1, 2)[pad] == 0).all(), f"{name} is not exactly 0 at pad positions"
        torch.testing.assert_close(got.double(), ref, **FP32_TOL)
        torch.testing.assert_close(got.double(), ref_poisoned, **FP32_TOL)


@pytest.mark.parametrize("mode", ["causal", "block"])
def test_forward_saves_log_sum_exp(mode):
    """The launcher's lse (log2 units of the scaled scores) is logsumexp over the allowed keys / ln 2,
    and +inf on pad rows (so a backward that read those rows would still get zero probabilities)."""
    from dqfast.kernels.c2f_attention import c2f_attention_fwd

    seed(4)
    sizes, lengths = (11, 0, 26), [[11, 0, 9], [2, 0, 26]]
    B, H, L, Dh, scale = 2, 2, sum(sizes), 24, 0.45
    q, k, v = (randn(B, H, L, Dh, device=KERNEL_DEVICE) for _ in range(3))
    seg_start = torch.tensor([0, 11, 11, L], dtype=torch.int32, device=KERNEL_DEVICE)
    valid_end = (seg_start[:-1] + torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE)).contiguous()
    _, lse = c2f_attention_fwd(q, k, v, seg_start, valid_end, mode == "causal", scale)

    allowed = C2FLayout(sizes, torch.tensor(lengths, device=KERNEL_DEVICE), mode).dense_mask()[:, None]
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    expected = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1) / torch.log(torch.tensor(2.0))
    valid = valid_positions(sizes, lengths).to(KERNEL_DEVICE)[:, None, :].expand(B, H, L)
    torch.testing.assert_close(lse.double()[valid], expected[valid], **FP32_TOL)
    assert (lse[~valid] == float("inf")).all()


def test_decode_token_by_token_equals_full_forward():
    """Causal decoding, one query per step over a preallocated cache, equals the full forward."""
    seed(5)
    sizes, lengths = (6, 11), [[6, 11], [4, 7]]
    B, H, L, Dh, capacity = 2, 2, sum(sizes), 24, 21
    layout = C2FLayout(sizes, torch.tensor(lengths), "causal")
    valid = valid_positions(sizes, lengths)
    q, k, v = (randn(B, H, L, Dh, dtype=torch.float64) for _ in range(3))
    full = reference_attention(q, k, v, layout)

    # The cache is a (B, capacity, H, Dh) buffer seen as (B, H, capacity, Dh); unused slots hold NaN.
    k_cache = torch.full((B, capacity, H, Dh), float("nan"), device=KERNEL_DEVICE).transpose(1, 2)
    v_cache = torch.full((B, capacity, H, Dh), float("nan"), device=KERNEL_DEVICE).transpose(1, 2)
    k_cache[:, :, :L] = k.float().to(KERNEL_DEVICE)
    v_cache[:, :, :L] = v.float().to(KERNEL_DEVICE)
    slot_valid = torch.zeros(B, capacity, dtype=torch.bool, device=KERNEL_DEVICE)
    with torch.no_grad(), dqfast.use_backend("triton"):
        for i in range(L):
            slot_valid[:, i] = valid[:, i]
            q_i = q[:, :, i : i + 1].float().to(KERNEL_DEVICE)
            out = dqfast.c2f_decode_attention(q_i, k_cache, v_cache, slot_valid.clone()).cpu()
            # Only real positions are decoded; a pad position has no defined next-token output.
            rows = valid[:, i]
            torch.testing.assert_close(out[rows, :, 0].double(), full[rows, :, i], **FP32_TOL)


def test_decode_block_segments_equal_full_forward():
    """Block decoding: a whole segment of queries at once (20 queries: two query tiles)."""
    seed(6)
    sizes, lengths = (1, 4, 9, 20), [[1, 4, 9, 20], [1, 3, 0, 11]]
    B, H, L, Dh = 2, 3, sum(sizes), 16
    layout = C2FLayout(sizes, torch.tensor(lengths), "block")
    valid, seg = valid_positions(sizes, lengths), segment_of(sizes)
    q, k, v = (randn(B, H, L, Dh, dtype=torch.float64) for _ in range(3))
    full = reference_attention(q, k, v, layout)
    start = 0
    with torch.no_grad(), dqfast.use_backend("triton"):
        for s, size in enumerate(sizes):
            key_valid = (valid & (seg <= s)[None, :]).to(KERNEL_DEVICE)
            q_s, k_d, v_d = (t.float().to(KERNEL_DEVICE) for t in (q[:, :, start : start + size], k, v))
            out = dqfast.c2f_decode_attention(q_s, k_d, v_d, key_valid).cpu()
            rows = valid[:, start : start + size]
            got, ref = out.transpose(1, 2)[rows], full[:, :, start : start + size].transpose(1, 2)[rows]
            torch.testing.assert_close(got.double(), ref, **FP32_TOL)
            start += size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lq", [1, 5, 19])
def test_decode_with_key_holes_matches_reference(lq, dtype):
    seed(7 + lq)
    B, H, Lk, Dh = 3, 2, 75, 24
    q = randn(B, H, lq, Dh, device=KERNEL_DEVICE)
    k_cache, v_cache = randn(B, H, Lk, Dh, device=KERNEL_DEVICE), randn(B, H, Lk, Dh, device=KERNEL_DEVICE)
    key_valid = torch.rand(B, Lk, device=KERNEL_DEVICE) < 0.4
    key_valid[1] = False  # a sample with no valid key: its queries return 0
    key_valid[2, :40] = False  # a long run of holes: whole key tiles to skip
    # Holes hold NaN in k and inf in v (the kernel must not read them); the caches are strided views.
    hole = (~key_valid)[:, None, :, None].expand_as(k_cache)
    k_poisoned, v_poisoned = (
        noncontiguous(t.masked_fill(hole, fill).to(dtype)) for t, fill in ((k_cache, math.nan), (v_cache, math.inf))
    )

    with torch.no_grad(), dqfast.use_backend("triton"):
        out = dqfast.c2f_decode_attention(q.to(dtype), k_poisoned, v_poisoned, key_valid, scale=0.37)
    same = reference_decode(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), key_valid, scale=0.37)
    exact = reference_decode(
        q.to(dtype).double(), k_cache.to(dtype).double(), v_cache.to(dtype).double(), key_valid, scale=0.37
    )
    assert out.dtype == dtype and out.shape == (B, H, lq, Dh)
    assert (out[1] == 0).all()
    compare([out], [same], [exact], dtype, ["out"])
    # The reference on the poisoned cache (its spec: invalid slots never reach the output) agrees.
    spec = reference_decode(q.to(dtype).double(), k_poisoned.double(), v_poisoned.double(), key_valid, scale=0.37)
    compare([out], [same], [spec], dtype, ["out"])


def test_decode_kernel_is_forward_only():
    """Needing a gradient: the kernel refuses, explain says why, auto falls back to the reference."""
    from dqfast.kernels import c2f_attention as kernels

    seed(8)
    q = randn(1, 2, 1, 16, device=KERNEL_DEVICE, requires_grad=True)
    k_cache, v_cache = randn(1, 2, 9, 16, device=KERNEL_DEVICE), randn(1, 2, 9, 16, device=KERNEL_DEVICE)
    key_valid = torch.ones(1, 9, dtype=torch.bool, device=KERNEL_DEVICE)
    with pytest.raises(RuntimeError, match="forward-only"):
        kernels.c2f_decode_attention(q, k_cache, v_cache, key_valid)
    with dqfast.use_backend("triton"):
        assert any("requires grad" in r for r in dqfast.explain("c2f_decode_attention", q, k_cache, v_cache, key_valid))
        with pytest.raises(dqfast.BackendUnavailable, match="requires grad"):
            dqfast.c2f_decode_attention(q, k_cache, v_cache, key_valid)
        with torch.no_grad():
            assert dqfast.explain("c2f_decode_attention", q, k_cache, v_cache, key_valid) == []
    with dqfast.use_backend("auto"):
        out = dqfast.c2f_decode_attention(q, k_cache, v_cache, key_valid)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    torch.testing.assert_close(out, reference_decode(q, k_cache, v_cache, key_valid))


def test_explain_and_unavailable_calls():
    seed(9)
    layout = C2FLayout((3, 4), torch.tensor([[3, 2]], device=KERNEL_DEVICE), "causal")
    q, k, v = (randn(1, 2, 7, 16, device=KERNEL_DEVICE) for _ in range(3))
    with dqfast.use_backend("triton"):
        assert dqfast.explain("c2f_attention", q, k, v, layout) == []
        q64, k64, v64 = q.double(), k.double(), v.double()
        why = dqfast.explain("c2f_attention", q64, k64, v64, layout)
        assert why and any("float64" in r for r in why)
        with pytest.raises(dqfast.BackendUnavailable, match="float64"):
            dqfast.c2f_attention(q64, k64, v64, layout)
        wide = randn(1, 1, 7, 300, device=KERNEL_DEVICE)
        assert any("head dim" in r for r in dqfast.explain("c2f_attention", wide, wide, wide, layout))
        key_valid = torch.ones(1, 7, dtype=torch.bool, device=KERNEL_DEVICE)
        assert any("float64" in r for r in dqfast.explain("c2f_decode_attention", q64, k64, v64, key_valid))
        if INTERPRET:
            qb = q.bfloat16()
            assert any("bfloat16" in r for r in dqfast.explain("c2f_attention", qb, qb, qb, layout))
    # Auto quietly takes the reference for what the kernel cannot serve.
    with dqfast.use_backend("auto"):
        torch.testing.assert_close(
            dqfast.c2f_attention(q64, k64, v64, layout), reference_attention(q64, k64, v64, layout)
        )


# ----------------------------------------------------------------------------------------------
# GPU only: bf16 and real sizes
# ----------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("mode", ["causal", "block"])
def test_bf16_forward_and_gradients_gpu(mode):
    sizes, lengths = (37, 0, 150, 90), [[37, 0, 100, 90], [10, 0, 150, 0]]
    seed(10)
    B, H, L, Dh = 2, 4, sum(sizes), 64
    layout = C2FLayout(sizes, torch.tensor(lengths, device="cuda"), mode)
    leaves = make_leaves("fused", B, H, L, Dh)
    grad_out = randn(B, H, L, Dh, device="cuda")
    dtype = torch.bfloat16
    kernel = attention_and_grads("triton", cast_leaves(leaves, "fused", dtype, False), "fused", layout, grad_out, None)
    same = attention_and_grads("reference", cast_leaves(leaves, "fused", dtype, False), "fused", layout, grad_out, None)
    exact = attention_and_grads(
        "reference", cast_leaves(leaves, "fused", torch.float64, False), "fused", layout, grad_out, None
    )
    compare(kernel, same, exact, dtype, ["out", "dqkv"])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_dq_transformer_size_gpu(dtype):
    """The released DQ-Transformer shape: 258 + 1025 positions, width 1024 = 8 heads x 128."""
    seed(11)
    coarse, fine = torch.tensor([256, 130, 40, 0]), torch.tensor([1024, 480, 800, 12])
    layout = C2FLayout.dq_transformer(coarse, fine).to("cuda")
    B, H, L, Dh = 4, 8, layout.seq_len, 128
    leaves = make_leaves("fused", B, H, L, Dh)
    grad_out = randn(B, H, L, Dh, device="cuda")
    kernel = attention_and_grads("triton", cast_leaves(leaves, "fused", dtype, False), "fused", layout, grad_out, None)
    same = attention_and_grads("reference", cast_leaves(leaves, "fused", dtype, False), "fused", layout, grad_out, None)
    exact = attention_and_grads(
        "reference", cast_leaves(leaves, "fused", torch.float64, False), "fused", layout, grad_out, None
    )
    compare(kernel, same, exact, dtype, ["out", "dqkv"])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_dq_transformer_size_gpu(dtype):
    seed(12)
    B, H, Lk, Dh = 8, 8, 1283, 128
    q = randn(B, H, 1, Dh, device="cuda")
    k_cache, v_cache = randn(B, H, Lk, Dh, device="cuda"), randn(B, H, Lk, Dh, device="cuda")
    key_valid = torch.arange(Lk, device="cuda")[None, :] < torch.randint(1, Lk, (B, 1), device="cuda")
    with torch.no_grad(), dqfast.use_backend("triton"):
        out = dqfast.c2f_decode_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), key_valid)
    same = reference_decode(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), key_valid)
    exact = reference_decode(q.to(dtype).double(), k_cache.to(dtype).double(), v_cache.to(dtype).double(), key_valid)
    assert_three_way(out, same, exact, "out")
