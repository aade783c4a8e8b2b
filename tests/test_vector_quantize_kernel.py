"""Kernel parity of ``vector_quantize`` (plain VQ) and of the ``code_statistics`` helper.

The kernel runs through the public API under ``use_backend("triton")`` (on CPU tensors under
TRITON_INTERPRET=1). Oracles: a brute-force float64 distance matrix written from the definition
(explicit differences, not the matmul form the kernel and the reference use), the reference in
the same dtype and in float64 (three-way rule), and bincount / index_add for the statistics.
Near-ties may legitimately flip the index, so random codebooks are checked through the distance
of the chosen code; well-separated codebooks and duplicated codes check indices exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import dqfast
from dqfast.reference import vector_quantize as ref
from tests.helpers import (
    INTERPRET,
    KERNEL_DEVICE,
    ROUNDING_BAND,
    assert_three_way,
    max_err,
    needs_gpu,
    needs_kernels,
    noncontiguous,
    randn,
    seed,
)

pytestmark = needs_kernels

DEV = KERNEL_DEVICE
EPS = 1e-12


def _kernel(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> dqfast.VQOutput:
    with dqfast.use_backend("triton"):
        return dqfast.vector_quantize(z, codebook, metric=metric)


def _brute_force(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 distances from the definition: sum of squared differences, or 1 - cos of
    vectors divided by max(norm, eps)."""
    z, c = z.reshape(-1, z.shape[-1]).double(), codebook.double()
    if metric == "l2":
        return (z[:, None, :] - c[None, :, :]).pow(2).sum(-1)
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cn = c / c.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return 1 - (zn[:, None, :] * cn[None, :, :]).sum(-1)


def _unit_codes(codebook: torch.Tensor) -> torch.Tensor:
    c = codebook.double()
    return c / c.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _check_against_oracles(z, codebook, metric, out):
    """The chosen code is a nearest one, its distance is right, and quantized is that code."""
    D = z.shape[-1]
    dist = _brute_force(z, codebook, metric)
    idx = out.indices.reshape(-1)
    assert out.indices.dtype == torch.int64 and out.distance.dtype == torch.float32
    assert ((idx >= 0) & (idx < codebook.shape[0])).all()
    scale = max(dist.abs().max().item(), 1.0)
    # fp32 sums of D terms round at ~D ulp (fp16 inputs are exact in fp32: same bound).
    tol = scale * (1e-6 + 1e-7 * D)
    chosen = dist.gather(1, idx[:, None]).squeeze(1)
    assert (chosen - dist.min(1).values).max().item() <= tol, "the chosen code is not a nearest one"
    assert max_err(out.distance.reshape(-1), chosen) <= tol, "distance is not the chosen code's distance"

    same = ref.vector_quantize(z.detach(), codebook, metric=metric)
    exact = ref.vector_quantize(z.detach().double(), codebook.double(), metric=metric)
    # Where the index agrees with the reference, the distance obeys the three-way rule.
    agree = (out.indices == exact.indices).reshape(-1)
    assert agree.float().mean().item() >= 0.9, "too many index disagreements for near-ties"
    assert_three_way(out.distance.reshape(-1)[agree], same.distance.reshape(-1)[agree],
                     exact.distance.reshape(-1)[agree], "distance")  # fmt: skip

    codes = codebook.double() if metric == "l2" else _unit_codes(codebook)
    expected_q = codes[idx].reshape(out.quantized.shape)
    assert out.quantized.dtype == z.dtype and out.quantized.shape == z.shape
    if metric == "l2":
        assert torch.equal(out.quantized, codebook[out.indices]), "quantized must be exactly the code"
    else:
        assert max_err(out.quantized, expected_q) <= ROUNDING_BAND[z.dtype] * 0.5


# D = 130 and 300 walk D in chunks (fp32 beyond 128 channels, 16-bit beyond 256).
SHAPES = [(37, 19, 3), (37, 130, 7), (37, 130, 33), (37, 19, 64), (13, 40, 130), (13, 40, 300)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,D", SHAPES)
def test_parity_random_codebooks(N, K, D, dtype, metric):
    seed(N * 1000 + K * 10 + D)
    z = randn(N, D, dtype=dtype, device=DEV)
    codebook = randn(K, D, dtype=dtype, device=DEV)
    _check_against_oracles(z, codebook, metric, _kernel(z, codebook, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_indices_on_well_separated_codebook(dtype, metric):
    seed(1)
    K, D, N = 130, 33, 41
    codebook = randn(K, D, dtype=torch.float32, device=DEV, scale=3.0)
    truth = torch.randint(0, K, (N,), device=DEV)
    z = codebook[truth] + 0.01 * torch.randn(N, D, device=DEV)
    out = _kernel(z.to(dtype), codebook.to(dtype), metric)
    assert torch.equal(out.indices, truth)
    _check_against_oracles(z.to(dtype), codebook.to(dtype), metric, out)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_the_lowest_index(metric):
    seed(2)
    K, D = 70, 7  # three code tiles of the interpreter's BLOCK_K = 32
    codebook = randn(K, D, device=DEV, scale=3.0)
    # Code 5 is duplicated inside its own tile (6) and in later tiles (40, 69).
    for dup in (6, 40, 69):
        codebook[dup] = codebook[5]
    # Code 50 is duplicated only in an earlier tile position (20): the earlier one must win.
    codebook[20] = codebook[50]
    z = torch.stack([codebook[5], codebook[50], codebook[69]]) + 0.01 * randn(3, D, device=DEV)
    out = _kernel(z, codebook, metric)
    assert out.indices.tolist() == [5, 20, 5]

    if metric == "l2":
        # Equidistant distinct codes: z = 0 with codes +e and -e (both at distance 1).
        e = torch.zeros(D, device=DEV)
        e[0] = 1.0
        tie_book = torch.stack([3 * e + 5, e, -e, e])
        out = _kernel(torch.zeros(1, D, device=DEV), tie_book, metric)
        assert out.indices.tolist() == [1]
        assert out.distance.tolist() == [1.0]


def test_empty_and_single_vector_shapes():
    seed(3)
    codebook = randn(19, 7, device=DEV)
    for shape in [(0, 7), (2, 0, 7)]:
        z = randn(*shape, device=DEV, requires_grad=True)
        out = _kernel(z, codebook, "l2")
        assert out.quantized.shape == shape and out.indices.shape == shape[:-1]
        assert out.distance.shape == shape[:-1] and out.distance.dtype == torch.float32
        out.quantized.sum().backward()
        assert z.grad.shape == shape
    for shape in [(7,), (1, 7), (1, 1, 7)]:
        z = randn(*shape, device=DEV)
        out = _kernel(z, codebook, "l2")
        assert out.quantized.shape == shape and out.indices.shape == shape[:-1]
        _check_against_oracles(z, codebook, "l2", out)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_noncontiguous_and_batched_inputs(metric):
    seed(4)
    z = randn(3, 11, 33, device=DEV)
    codebook = randn(130, 33, device=DEV)
    for z_in, c_in in [
        (noncontiguous(z), codebook),  # channel stride 2
        (z.transpose(0, 1).contiguous().transpose(0, 1), noncontiguous(codebook)),  # odd row strides
        (randn(33, 37, device=DEV).t(), codebook.t().contiguous().t()),  # column-major z and codebook
    ]:
        assert not z_in.is_contiguous()
        out = _kernel(z_in, c_in, metric)
        assert out.indices.shape == z_in.shape[:-1]
        _check_against_oracles(z_in, c_in, metric, out)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_straight_through_gradient(dtype, metric):
    seed(5)
    z = randn(2, 19, 33, dtype=dtype, device=DEV, requires_grad=True)
    codebook = randn(40, 33, dtype=dtype, device=DEV, requires_grad=True)
    weight = randn(2, 19, 33, dtype=dtype, device=DEV)
    out = _kernel(z, codebook, metric)
    assert out.quantized.requires_grad
    assert not out.indices.requires_grad and not out.distance.requires_grad
    (out.quantized * weight).sum().backward()
    assert codebook.grad is None, "no gradient reaches the codebook through quantized"
    if metric == "l2":
        assert torch.equal(z.grad, weight), "straight-through: dL/dz = dL/dquantized"
        return
    # Cosine: the gradient goes through zn = z / |z|: (w - zn (zn . w)) / |z|, from the formula.
    z64, w64 = z.detach().double(), weight.double()
    norm = z64.norm(dim=-1, keepdim=True)
    zn = z64 / norm
    expected = (w64 - zn * (zn * w64).sum(-1, keepdim=True)) / norm
    zs = z.detach().clone().requires_grad_()
    (ref.vector_quantize(zs, codebook.detach(), metric=metric).quantized * weight).sum().backward()
    assert_three_way(z.grad, zs.grad, expected, "z.grad")


def test_gradient_of_a_downstream_loss():
    """A loss on quantized differentiates like the float64 reference."""
    seed(6)
    z = randn(37, 7, device=DEV, requires_grad=True)
    codebook = randn(19, 7, device=DEV)
    target = randn(37, 7, device=DEV)
    out = _kernel(z, codebook, "l2")
    (out.quantized - target).pow(2).sum().backward()
    z64 = z.detach().double().requires_grad_()
    exact = ref.vector_quantize(z64, codebook.double(), metric="l2")
    (exact.quantized - target.double()).pow(2).sum().backward()
    assert torch.equal(out.indices, exact.indices)
    assert max_err(z.grad, z64.grad) <= 1e-5


def test_explain_and_no_silent_fallback():
    z, codebook = randn(5, 7, device=DEV), randn(9, 7, device=DEV)
    with dqfast.use_backend("triton"):
        assert dqfast.explain("vector_quantize", z, codebook) == []
        assert dqfast.explain("vector_quantize", z, codebook, metric="cosine") == []
        why = dqfast.explain("vector_quantize", z.double(), codebook.double())
        assert why and any("float64" in w for w in why)
        with pytest.raises(dqfast.BackendUnavailable, match="float64"):
            dqfast.vector_quantize(z.double(), codebook.double())
        if INTERPRET:
            why = dqfast.explain("vector_quantize", z.bfloat16(), codebook.bfloat16())
            assert any("interpreter" in w for w in why)


# ----------------------------------------------------------------------------------------------
# Non-finite input: a NaN distance compares as +inf (reference/vector_quantize.py)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("fill", [math.nan, math.inf, -math.inf])
def test_non_finite_codes_and_vectors_match_the_reference(metric, fill):
    seed(11)
    K, D = 70, 7  # three code tiles of the interpreter's BLOCK_K = 32
    codebook = randn(K, D, device=DEV, scale=3.0)
    truth = torch.tensor([3, 66, 5, 40, 69, 0, 12, 3, 33, 8, 9, 10], device=DEV)
    z = codebook[truth] + 0.01 * randn(truth.numel(), D, device=DEV)
    # Non-finite codes in the first and the last tile (a whole row, a single entry): the vectors
    # next to them (rows 0, 1, 7) must find the nearest finite code instead.
    codebook[3] = fill
    codebook[66, 2] = fill
    # Vectors without any finite distance: a whole row, a single entry, and (l2) a finite vector
    # whose squared norm overflows fp32. They get index 0, code 0 and its (non-finite) distance.
    z[9] = fill
    z[10, 4] = fill
    bad = [9, 10]
    if metric == "l2":
        z[11] = 3e19
        bad.append(11)
    out = _kernel(z, codebook, metric)
    with dqfast.use_backend("reference"):
        want = dqfast.vector_quantize(z, codebook, metric=metric)
    assert torch.equal(out.indices, want.indices)
    assert out.indices[bad].tolist() == [0] * len(bad)
    assert not ((out.indices == 3) | (out.indices == 66)).any()
    assert torch.equal(out.quantized, want.quantized)
    assert not torch.isfinite(out.distance[bad]).any()
    torch.testing.assert_close(out.distance, want.distance, atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_all_nan_codebook_gives_index_zero(metric):
    seed(12)
    z = randn(5, 7, device=DEV)
    codebook = torch.full((40, 7), math.nan, device=DEV)
    out = _kernel(z, codebook, metric)
    assert out.indices.tolist() == [0] * 5
    assert torch.isnan(out.quantized).all() and torch.isnan(out.distance).all()


# ----------------------------------------------------------------------------------------------
# code_statistics: the EMA helper
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_code_statistics_matches_bincount_and_index_add(dtype):
    from dqfast.kernels.vector_quantize import code_statistics

    seed(7)
    N, K, D = 77, 19, 37
    x = randn(N, D, dtype=dtype, device=DEV)
    # Only some codes used, one used many times (atomics contending on one row).
    indices = torch.randint(0, 7, (N,), device=DEV)
    indices[::5] = 3
    for x_in in (x, noncontiguous(x)):
        counts, sums = code_statistics(x_in, indices, K)
        assert counts.dtype == torch.float32 and sums.dtype == torch.float32
        assert counts.shape == (K,) and sums.shape == (K, D)
        assert torch.equal(counts, torch.bincount(indices, minlength=K).float())
        expected = torch.zeros(K, D, dtype=torch.float64, device=DEV).index_add_(0, indices, x.double())
        assert max_err(sums, expected) <= 1e-5 * max(expected.abs().max().item(), 1.0)

    counts, sums = code_statistics(x[:0], indices[:0], K)
    assert torch.equal(counts, torch.zeros(K, device=DEV)) and torch.equal(sums, torch.zeros(K, D, device=DEV))


# ----------------------------------------------------------------------------------------------
# GPU-only: bf16 and large shapes
# ----------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bf16_parity(metric):
    seed(8)
    z = randn(1000, 64, dtype=torch.bfloat16, device="cuda")
    codebook = randn(1024, 64, dtype=torch.bfloat16, device="cuda")
    _check_against_oracles(z, codebook, metric, _kernel(z, codebook, metric))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_shapes(dtype):
    seed(9)
    z = randn(8, 1021, 256, dtype=dtype, device="cuda")
    codebook = randn(4099, 256, dtype=dtype, device="cuda")
    out = _kernel(z, codebook, "l2")
    same = ref.vector_quantize(z, codebook)
    agree = (out.indices == same.indices).float().mean().item()
    assert agree >= 0.99
    # The chosen distance is never worse than the reference's by more than the fp32 rounding band.
    assert (out.distance - same.distance).max().item() <= 1e-4 * same.distance.abs().max().item()
    assert torch.equal(out.quantized, codebook[out.indices])


def test_public_code_statistics_routes_to_the_kernel():
    torch.manual_seed(3)
    x = torch.randn(45, 20).to(KERNEL_DEVICE)
    idx = torch.randint(0, 7, (45,)).to(KERNEL_DEVICE)
    with dqfast.use_backend("triton"):
        assert dqfast.explain("code_statistics", x, idx, 7) == []
        counts, sums = dqfast.code_statistics(x, idx, 7)
        with pytest.raises(dqfast.BackendUnavailable, match="float64"):
            dqfast.code_statistics(x.double(), idx, 7)
    want_counts, want_sums = ref.code_statistics(x.double(), idx, 7)
    torch.testing.assert_close(counts.double(), want_counts)
    torch.testing.assert_close(sums.double(), want_sums, atol=1e-5, rtol=1e-5)
