"""The vector_quantize reference against brute force in float64, and the public API's input checks."""

from __future__ import annotations

import pytest
import torch

import dqfast
from dqfast.reference import vector_quantize as ref
from tests.helpers import seed

METRICS = ["l2", "cosine"]


def brute_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 distances by the textbook formulas: cdist**2, or 1 - cos of unit vectors."""
    z, codebook = z.double().reshape(-1, z.shape[-1]), codebook.double()
    if metric == "l2":
        return torch.cdist(z, codebook) ** 2
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cn = codebook / codebook.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1 - zn @ cn.T


def separated_codebook(K: int, D: int, metric: str) -> torch.Tensor:
    """K codes at least 1.0 apart (l2) or 0.02 apart in 1 - cos, checked, so small noise cannot flip an index."""
    codebook = torch.randn(K, D) * 4
    d = brute_distances(codebook, codebook, metric) + torch.eye(K, dtype=torch.float64) * 1e9
    assert d.min() > (1.0 if metric == "l2" else 0.02), "test precondition: codes are well separated"
    return codebook


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape,K", [((37, 7), 19), ((3, 5, 13), 130), ((2, 2, 2, 33), 5)])
def test_chosen_distance_is_the_minimum(metric, shape, K):
    seed(1)
    z, codebook = torch.randn(*shape), torch.randn(K, shape[-1])
    out = ref.vector_quantize(z, codebook, metric=metric)
    d = brute_distances(z, codebook, metric)
    best = d.min(-1).values
    assert out.indices.shape == shape[:-1] and out.indices.dtype == torch.int64
    assert out.distance.shape == shape[:-1] and out.distance.dtype == torch.float32
    # The chosen code is a minimiser (up to fp32 rounding) and the reported distance is its distance.
    chosen = d.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, best, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.distance.reshape(-1).double(), best, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_indices_on_separated_codebook(metric):
    seed(2)
    K, D = 23, 6
    codebook = separated_codebook(K, D, metric)
    truth = torch.randint(K, (4, 9))
    z = codebook[truth] + 1e-3 * torch.randn(4, 9, D)
    out = ref.vector_quantize(z, codebook, metric=metric)
    assert torch.equal(out.indices, truth)


def test_chunked_search_matches_brute_force(monkeypatch):
    """Force many small chunks (the path large inputs take) and check it agrees with one big search."""
    seed(3)
    codebook = separated_codebook(17, 5, "l2")
    truth = torch.randint(17, (101,))
    z = codebook[truth] + 1e-3 * torch.randn(101, 5)
    monkeypatch.setattr(ref, "_CHUNK_ENTRIES", 17 * 4)  # 4 rows per chunk, the last one partial
    assert torch.equal(ref.vector_quantize(z, codebook).indices, truth)


def test_ties_go_to_the_lowest_index():
    # Integer-valued data keep every distance exact, so the ties are real ties in any formulation.
    a, b, c = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-3.0, 0.0, 1.0]), torch.tensor([0.0, 5.0, 5.0])
    codebook = torch.stack([c, a, b, a, b])  # a at 1 and 3, b at 2 and 4
    z = torch.stack([a, b, c, a + 0.0])
    assert ref.vector_quantize(z, codebook).indices.tolist() == [1, 2, 0, 1]
    # Equidistant from two different codes: the first one listed wins, in either order.
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    zero = torch.zeros(1, 2)
    assert ref.vector_quantize(zero, e).indices.tolist() == [0]
    assert ref.vector_quantize(zero, e.flip(0)).indices.tolist() == [0]
    # Cosine: a code and twice that code normalise to the same unit vector.
    cos_book = torch.stack([b, 2 * a, a, 2 * b])
    assert ref.vector_quantize(torch.stack([a, b]), cos_book, metric="cosine").indices.tolist() == [1, 0]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(metric, dtype):
    seed(4)
    z, codebook = torch.randn(41, 12).to(dtype), torch.randn(29, 12).to(dtype)
    out = ref.vector_quantize(z, codebook, metric=metric)
    assert out.quantized.dtype == dtype and out.distance.dtype == torch.float32
    # Distances are taken in fp32 from the exact half values, so they match float64 closely.
    d = brute_distances(z, codebook, metric)
    chosen = d.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, d.min(-1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.distance.double(), d.min(-1).values, atol=1e-5, rtol=1e-5)
    if metric == "l2":
        assert torch.equal(out.quantized, codebook[out.indices])


@pytest.mark.parametrize("metric", METRICS)
def test_quantized_is_the_chosen_code(metric):
    seed(5)
    z, codebook = torch.randn(2, 7, 10), torch.randn(15, 10)
    out = ref.vector_quantize(z, codebook, metric=metric)
    if metric == "l2":
        assert torch.equal(out.quantized, codebook[out.indices])
    else:
        unit = codebook.double() / codebook.double().norm(dim=-1, keepdim=True)
        torch.testing.assert_close(out.quantized.double(), unit[out.indices], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "shape,K",
    [((7,), 4), ((1, 1, 7), 3), ((5, 7), 1), ((0, 7), 6), ((2, 0, 7), 6), ((3, 4, 3), 2)],
    ids=["no-leading-dims", "singletons", "K=1", "N=0", "empty-middle", "D=3"],
)
def test_shapes(shape, K):
    seed(6)
    z, codebook = torch.randn(*shape), torch.randn(K, shape[-1])
    out = ref.vector_quantize(z, codebook)
    assert out.quantized.shape == shape
    assert out.indices.shape == shape[:-1] and out.distance.shape == shape[:-1]
    if K == 1:
        assert (out.indices == 0).all()
    if z.numel():
        d = brute_distances(z, codebook, "l2")
        torch.testing.assert_close(out.distance.reshape(-1).double(), d.min(-1).values, atol=1e-5, rtol=1e-5)


def test_noncontiguous_input():
    seed(7)
    base, codebook = torch.randn(9, 16), torch.randn(11, 8)
    z = base[:, ::2]
    assert not z.is_contiguous()
    out = ref.vector_quantize(z, codebook)
    assert torch.equal(out.indices, ref.vector_quantize(z.contiguous(), codebook).indices)
    d = brute_distances(z, codebook, "l2")
    torch.testing.assert_close(out.distance.double(), d.min(-1).values, atol=1e-5, rtol=1e-5)


def test_float64_stays_float64():
    seed(8)
    z, codebook = torch.randn(13, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    out = ref.vector_quantize(z, codebook)
    assert out.distance.dtype == torch.float64 and out.quantized.dtype == torch.float64
    d = brute_distances(z, codebook, "l2")
    torch.testing.assert_close(out.distance, d.min(-1).values, atol=1e-12, rtol=1e-12)


def test_straight_through_gradient_l2():
    seed(9)
    z = torch.randn(6, 5, requires_grad=True)
    codebook = torch.randn(8, 5, requires_grad=True)
    upstream = torch.randn(6, 5)
    ref.vector_quantize(z, codebook).quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)
    assert codebook.grad is None  # quantized passes nothing to the codebook


def test_straight_through_gradient_cosine():
    """z receives the upstream gradient through the normalisation: (g - zn (zn . g)) / ||z||."""
    seed(10)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(8, 5, dtype=torch.float64)
    upstream = torch.randn(6, 5, dtype=torch.float64)
    ref.vector_quantize(z, codebook, metric="cosine").quantized.backward(upstream)
    norm = z.detach().norm(dim=-1, keepdim=True)
    zn = z.detach() / norm
    expected = (upstream - zn * (zn * upstream).sum(-1, keepdim=True)) / norm
    torch.testing.assert_close(z.grad, expected, atol=1e-12, rtol=1e-10)


def test_half_gradient_dtype():
    seed(11)
    z = torch.randn(4, 6, dtype=torch.float16, requires_grad=True)
    codebook = torch.randn(5, 6, dtype=torch.float16)
    upstream = torch.randn(4, 6, dtype=torch.float16)
    ref.vector_quantize(z, codebook).quantized.backward(upstream)
    assert z.grad.dtype == torch.float16 and torch.equal(z.grad, upstream)


# ---------------------------------------------------------------------------------------------
# Bad input through the public API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.tensor(1.0), torch.randn(4, 1), {}), ValueError, "z"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 6), {}), ValueError, "codebook"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5, 1), {}), ValueError, "codebook"),
        (lambda: (torch.randn(3, 5), torch.randn(5), {}), ValueError, "codebook"),
        (lambda: (torch.randn(3, 5), torch.randn(0, 5), {}), ValueError, "codebook"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5), {"metric": "dot"}), ValueError, "metric"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5).double(), {}), TypeError, "dtype"),
        (lambda: (torch.randn(3, 5).half(), torch.randn(4, 5), {}), TypeError, "dtype"),
        (lambda: (torch.randint(3, (3, 5)), torch.randn(4, 5), {}), TypeError, "z"),
        (lambda: (torch.randn(3, 5), torch.randint(3, (4, 5)), {}), TypeError, "codebook"),
        (lambda: ([[1.0, 2.0]], torch.randn(4, 2), {}), TypeError, "z"),
    ],
    ids=[
        "scalar-z",
        "D-mismatch",
        "codebook-rank-3",
        "codebook-rank-1",
        "empty-codebook",
        "unknown-metric",
        "dtype-mix",
        "half-fp32-mix",
        "integer-z",
        "integer-codebook",
        "list-z",
    ],
)
def test_bad_input(make, error, match):
    z, codebook, kwargs = make()
    with pytest.raises(error, match=match):
        dqfast.vector_quantize(z, codebook, **kwargs)


# ----------------------------------------------------------------------------------------------
# code_statistics: the EMA codebook statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_code_statistics_equals_the_one_hot_formulation(dtype):
    seed(31)
    x = torch.randn(57, 6).to(dtype)
    idx = torch.randint(0, 9, (57,))
    idx[:5] = 3  # contention on one code
    counts, sums = dqfast.code_statistics(x, idx, 11)
    onehot = torch.nn.functional.one_hot(idx, 11).double()
    torch.testing.assert_close(counts.double(), onehot.sum(0))
    torch.testing.assert_close(sums.double(), onehot.T @ x.double(), atol=1e-5, rtol=1e-5)
    assert counts[9:].eq(0).all() and sums[9:].eq(0).all()


def test_code_statistics_bad_input():
    x, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="indices"):
        dqfast.code_statistics(x, idx[:3], 5)
    with pytest.raises(TypeError, match="indices"):
        dqfast.code_statistics(x, idx.float(), 5)
    with pytest.raises(ValueError, match="num_codes"):
        dqfast.code_statistics(x, idx, 0)
    with pytest.raises(ValueError, match="x"):
        dqfast.code_statistics(x[0], idx, 5)


def test_zero_code_dimension_is_refused_clearly():
    with pytest.raises(ValueError, match="D >= 1"):
        dqfast.vector_quantize(torch.randn(5, 0), torch.randn(3, 0))
    with pytest.raises(ValueError, match="D >= 1"):
        dqfast.dynamic_quantize(
            [torch.randn(1, 0, 2, 2), torch.randn(1, 0, 4, 4)], torch.randn(3, 0), grain=torch.zeros(1, 2, 2).long()
        )
