"""Kernel parity of ``dynamic_quantize`` (the DQ-VAE step) and of the budgeted grain allocation.

The kernel runs through the public API under ``use_backend("triton")`` (CPU tensors under
TRITON_INTERPRET=1). Oracles: the reference in the same dtype and in float64 (three-way rule) for
every output and every gradient, and formulations written here from the definition: the nearest
code of every coded cell by brute force on a well-separated codebook, the loss as a sum over
coded vectors, n_codes as sum(4**grain), and the budget as "exactly n regions per image, the top
ones by score, ties to the lower raster index".
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dqfast
from dqfast.reference import vector_quantize as ref
from tests.helpers import KERNEL_DEVICE, assert_three_way, max_err, needs_gpu, needs_kernels, randn, seed

pytestmark = needs_kernels

DEV = KERNEL_DEVICE


def _make(G, B=2, H=3, W=5, D=7, K=19, dtype=torch.float32, scale=1.0):
    features = [randn(B, D, H * 2**g, W * 2**g, dtype=dtype, device=DEV) for g in range(G)]
    codebook = randn(K, D, dtype=dtype, device=DEV, scale=scale)
    return features, codebook


def _run(backend, features, codebook, cast, weight, loss_weight, **kwargs):
    """Run dynamic_quantize on copies cast to ``cast`` and backpropagate
    ``sum(quantized * weight) + loss_weight * loss`` (a None term is left out of the graph);
    returns (output, grads dict)."""
    leaves = {f"features[{g}]": f.detach().to(cast).requires_grad_() for g, f in enumerate(features)}
    leaves["codebook"] = codebook.detach().to(cast).requires_grad_()
    call = dict(kwargs)
    if kwargs.get("gate") is not None:
        leaves["gate"] = call["gate"] = kwargs["gate"].detach().to(cast).requires_grad_()
    feats = [leaves[f"features[{g}]"] for g in range(len(features))]
    with dqfast.use_backend(backend):
        out = dqfast.dynamic_quantize(feats, leaves["codebook"], **call)
    terms = []
    if loss_weight is not None:
        terms.append(loss_weight * out.loss)
    if weight is not None:
        terms.append((out.quantized * weight.to(out.quantized.dtype)).sum())
    sum(terms).backward()
    return out, {name: t.grad for name, t in leaves.items()}


def _three_way(features, codebook, *, with_quantized_grad=True, loss_weight=3.0, **kwargs):
    """Kernel vs reference (same dtype) vs reference (float64): every output and gradient."""
    G = len(features)
    B, D, H, W = features[0].shape
    weight = randn(B, D, H * 2 ** (G - 1), W * 2 ** (G - 1), device=DEV) if with_quantized_grad else None
    dtype = features[0].dtype
    out, grads = _run("triton", features, codebook, dtype, weight, loss_weight, **kwargs)
    same, same_grads = _run("reference", features, codebook, dtype, weight, loss_weight, **kwargs)
    exact, exact_grads = _run("reference", features, codebook, torch.float64, weight, loss_weight, **kwargs)

    assert torch.equal(out.grain, exact.grain) and out.grain.dtype == torch.int64
    assert torch.equal(out.indices, exact.indices) and out.indices.dtype == torch.int64
    assert torch.equal(out.n_codes, exact.n_codes) and out.n_codes.dtype == torch.int64
    assert out.quantized.dtype == dtype and out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert_three_way(out.quantized, same.quantized, exact.quantized, "quantized")
    assert_three_way(out.loss.reshape(1), same.loss.reshape(1), exact.loss.reshape(1), "loss")
    for name, grad in grads.items():
        if exact_grads[name] is None:
            assert grad is None or not grad.any(), f"{name} should get no gradient"
            continue
        assert grad is not None, f"{name} got no gradient"
        assert grad.dtype == dtype, f"{name}.grad dtype {grad.dtype}"
        assert_three_way(grad, same_grads[name], exact_grads[name], f"{name}.grad")
    return out, grads


def _one_hot(grain, G, dtype=torch.float32):
    return F.one_hot(grain, G).to(dtype)


# ----------------------------------------------------------------------------------------------
# Parity with the reference: grain sources, grains, dtypes, metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G", [2, 3])
def test_given_grain(G, dtype, metric):
    seed(10 + G)
    features, codebook = _make(G, dtype=dtype)
    grain = torch.randint(0, G, (2, 3, 5), device=DEV)
    _three_way(features, codebook, grain=grain, metric=metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("G", [2, 3])
def test_gate_gets_its_gradient(G, metric):
    seed(20 + G)
    features, codebook = _make(G)
    gate = _one_hot(torch.randint(0, G, (2, 3, 5), device=DEV), G)
    out, grads = _three_way(features, codebook, gate=gate, metric=metric)
    assert torch.equal(out.grain, gate.argmax(-1))
    if metric == "l2":
        # Only the chosen grain's entry sees the features: the others get exactly zero.
        assert grads["gate"][gate == 0].abs().max().item() == 0.0
        assert grads["gate"][gate == 1].abs().min().item() > 0.0


def test_gate_gradient_is_the_cell_sum_of_dL_dv_dot_f():
    """The gate gradient from the definition: <dL/dv, f> summed over a region's cells, with
    dL/dv = (sum of dL/dquantized over the finest cells a code covers) + commitment term."""
    seed(25)
    G, B, H, W, D = 2, 1, 2, 3, 5
    features, codebook = _make(G, B=B, H=H, W=W, D=D)
    grain = torch.tensor([[[0, 1, 1], [1, 0, 0]]], device=DEV)
    gate = _one_hot(grain, G)
    weight = randn(B, D, 2 * H, 2 * W, device=DEV)
    out, grads = _run("triton", features, codebook, torch.float32, weight, None, gate=gate)
    q = codebook[out.indices].permute(0, 3, 1, 2)  # (B, D, Hf, Wf)
    assert torch.equal(out.quantized, q)
    expected = torch.zeros(B, H, W, G, dtype=torch.float64, device=DEV)
    for h in range(H):
        for w in range(W):
            g = int(grain[0, h, w])
            if g == 0:
                dv = weight[0, :, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].double().sum((1, 2))
                expected[0, h, w, 0] = (dv * features[0][0, :, h, w].double()).sum()
            else:
                cells = slice(2 * h, 2 * h + 2), slice(2 * w, 2 * w + 2)
                f = features[1][0, :, cells[0], cells[1]].double()
                expected[0, h, w, 1] = (weight[0, :, cells[0], cells[1]].double() * f).sum()
    assert max_err(grads["gate"], expected) <= 1e-5


@pytest.mark.parametrize("G", [2, 3])
def test_router_logits_argmax(G):
    seed(30 + G)
    features, codebook = _make(G)
    logits = randn(2, 3, 5, G, device=DEV)
    out, _ = _three_way(features, codebook, router_logits=logits)
    assert torch.equal(out.grain, logits.argmax(-1))


@pytest.mark.parametrize("budget", [0.0, 1.0, 0.5, 0.3, 0.7])
def test_budget_dual_grain(budget):
    seed(40)
    H, W = 3, 5
    features, codebook = _make(2, H=H, W=W)
    logits = randn(2, H, W, 2, device=DEV)
    out, _ = _three_way(features, codebook, router_logits=logits, budget=budget)
    n_fine = math.floor(budget * (H * W) + 0.5)
    assert (out.grain == 1).sum((1, 2)).tolist() == [n_fine, n_fine]
    assert out.n_codes.tolist() == [H * W - n_fine + 4 * n_fine] * 2


@pytest.mark.parametrize("budget", [(0.3, 0.3), (0.0, 1.0), (1.0, 0.0), (0.2, 0.5)])
def test_budget_triple_grain(budget):
    seed(41)
    H, W = 3, 5
    features, codebook = _make(3, H=H, W=W, D=5)
    logits = randn(2, H, W, 3, device=DEV)
    out, _ = _three_way(features, codebook, router_logits=logits, budget=budget)
    n_cum = [math.floor(sum(budget[: i + 1]) * (H * W) + 0.5) for i in range(2)]
    counts = [n_cum[0], n_cum[1] - n_cum[0]]
    for b in range(2):
        assert (out.grain[b] == 2).sum().item() == counts[0]
        assert (out.grain[b] == 1).sum().item() == counts[1]


@pytest.mark.parametrize("D", [33, 70])  # 70: the search walks D in chunks
def test_batch_of_one_and_channels_last_features(D):
    seed(50)
    features, codebook = _make(2, B=1, H=3, W=3, D=D, K=130)
    features = [f.to(memory_format=torch.channels_last) for f in features]
    assert not features[1].is_contiguous()
    _three_way(features, codebook, grain=torch.randint(0, 2, (1, 3, 3), device=DEV))


def test_single_grain():
    seed(51)
    features, codebook = _make(1, D=64)
    out, _ = _three_way(features, codebook, grain=torch.zeros(2, 3, 5, dtype=torch.int64, device=DEV))
    assert out.n_codes.tolist() == [15, 15]


def test_loss_only_and_quantized_only_backward():
    seed(52)
    features, codebook = _make(2)
    grain = torch.randint(0, 2, (2, 3, 5), device=DEV)
    _three_way(features, codebook, grain=grain, with_quantized_grad=False)
    # quantized alone: straight-through, nothing reaches the codebook.
    _, grads = _three_way(features, codebook, grain=grain, loss_weight=None)
    assert grads["codebook"] is None


# ----------------------------------------------------------------------------------------------
# Semantics from the definition (independent of the reference)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [2, 3])
def test_each_coded_cell_gets_its_nearest_code_and_the_loss_counts_it_once(G):
    seed(60 + G)
    B, H, W, D, K, beta = 2, 2, 3, 6, 40, 0.25
    codebook = randn(K, D, device=DEV, scale=4.0)
    grain = torch.randint(0, G, (B, H, W), device=DEV)
    # Every cell's feature is a noisy copy of a known code: the nearest code is known exactly.
    truth = [torch.randint(0, K, (B, H * 2**g, W * 2**g), device=DEV) for g in range(G)]
    features = [
        codebook[t].permute(0, 3, 1, 2) + 0.05 * randn(*t.shape[:1], D, *t.shape[1:], device=DEV) for t in truth
    ]
    with dqfast.use_backend("triton"):
        out = dqfast.dynamic_quantize(features, codebook, grain=grain, beta=beta)

    sq_sum, n_total = 0.0, 0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                g = int(grain[b, h, w])
                side, spread = 2**g, 2 ** (G - 1 - g)
                for i in range(side):
                    for j in range(side):
                        y, x = h * side + i, w * side + j
                        code = int(truth[g][b, y, x])
                        block = out.indices[b, y * spread : (y + 1) * spread, x * spread : (x + 1) * spread]
                        assert (block == code).all()
                        qblock = out.quantized[b, :, y * spread : (y + 1) * spread, x * spread : (x + 1) * spread]
                        assert torch.equal(qblock, codebook[code][:, None, None].expand_as(qblock))
                        sq_sum += (features[g][b, :, y, x].double() - codebook[code].double()).pow(2).sum().item()
                        n_total += 1
    assert out.n_codes.tolist() == (4**grain).sum((1, 2)).tolist()
    assert sum(out.n_codes.tolist()) == n_total
    expected_loss = (1 + beta) * sq_sum / (n_total * D)
    assert abs(out.loss.item() - expected_loss) <= 1e-5 * expected_loss


def _budget_oracle(logits: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Greedy allocation written as plain loops: for grain G-1, G-2, ..., repeatedly take the
    free region with the largest score, the lowest raster index among equal scores."""
    B, H, W, G = logits.shape
    flat = logits.reshape(B, H * W, G).double()
    grain = torch.zeros(B, H * W, dtype=torch.int64)
    for b in range(B):
        free = set(range(H * W))
        for i, count in enumerate(counts):
            g = G - 1 - i
            score = (flat[b, :, g] - flat[b, :, 0]).tolist()
            for _ in range(count):
                best = min(free, key=lambda r: (-score[r], r))
                grain[b, best] = g
                free.remove(best)
    return grain.reshape(B, H, W)


@pytest.mark.parametrize(
    "G,budget,counts",
    [(2, 0.5, [8]), (2, 0.3, [5]), (2, 1.0, [15]), (2, 0.0, [0]), (3, (0.3, 0.3), [5, 4]), (3, (0.1, 0.0), [2, 0])],
)
def test_grain_from_budget_exact_per_image_with_ties(G, budget, counts):
    from dqfast.kernels.vector_quantize import grain_from_budget

    seed(70)
    B, H, W = 3, 3, 5
    # Coarse integer logits: many equal scores, so the raster-order tie-break matters.
    logits = torch.randint(-2, 3, (B, H, W, G)).float()
    logits[0] = 0.0  # image 0: every score ties
    grain = grain_from_budget(logits.to(DEV), budget)
    assert grain.dtype == torch.int64 and grain.shape == (B, H, W)
    assert torch.equal(grain.cpu(), _budget_oracle(logits, counts))
    # All ties: the finest grain takes the first regions in raster order.
    assert grain[0].reshape(-1)[: counts[0]].eq(G - 1).all()


def test_grain_from_budget_half_precision_logits_rank_in_fp32():
    from dqfast.kernels.vector_quantize import grain_from_budget

    # logit_fine = 1000 everywhere, logit_coarse small and decreasing in raster order: the exact
    # scores 1000 - logit_coarse grow along the raster, but in fp16 they all round to 1000 (a
    # tie that would pick the first regions instead of the last).
    logits = torch.zeros(2, 4, 4, 2)
    logits[..., 1] = 1000.0
    logits[..., 0] = torch.linspace(0.05, 0.01, 16).reshape(4, 4)
    logits = logits.half().to(DEV)
    assert ((logits[..., 1] - logits[..., 0]) == logits[0, 0, 0, 1]).all(), "scores must tie in fp16"
    grain = grain_from_budget(logits, 0.25)
    assert torch.equal(grain.cpu(), _budget_oracle(logits.cpu(), [4]))
    assert grain.reshape(2, -1)[:, -4:].eq(1).all()
    assert torch.equal(grain, ref.grain_from_budget(logits, 0.25))


def test_codebook_split_keeps_ties_at_the_lowest_index_and_ranks_nan_as_inf():
    """The search splits the codebook walk (K = 100: four code tiles of the interpreter's
    BLOCK_K = 32, so four splits): exact duplicates in different splits resolve to the lowest
    index, non-finite codes are never chosen, a vector with a NaN gets code 0, as in the
    reference."""
    seed(70)
    B, H, W, D, K = 2, 2, 3, 6, 100
    codebook = randn(K, D, device=DEV, scale=4.0)
    codebook[70] = codebook[5]  # split 2 duplicates split 0
    codebook[99] = codebook[40]  # split 3 duplicates split 1
    codebook[33] = math.nan
    codebook[64, 2] = math.inf
    grain = torch.tensor([[[0, 1, 0], [1, 1, 0]], [[1, 0, 0], [0, 0, 1]]], device=DEV)
    picks = torch.tensor([5, 70, 40, 99, 33, 64, 12, 80])
    truth = [picks[torch.randint(0, len(picks), (B, H * 2**g, W * 2**g))].to(DEV) for g in range(2)]
    clean = codebook.clone()
    clean[33] = codebook[12]
    clean[64] = codebook[80]
    features = [clean[t].permute(0, 3, 1, 2) + 0.05 * randn(B, D, *t.shape[1:], device=DEV) for t in truth]
    features[1][1, :, 0, 0] = math.nan  # region (0, 0) of image 1 is fine: this vector is coded
    with dqfast.use_backend("triton"):
        out = dqfast.dynamic_quantize(features, codebook, grain=grain)
    with dqfast.use_backend("reference"):
        want = dqfast.dynamic_quantize(features, codebook, grain=grain)
    assert torch.equal(out.indices, want.indices)
    assert not ((out.indices == 70) | (out.indices == 99) | (out.indices == 33) | (out.indices == 64)).any()
    assert (out.indices == 5).any() and (out.indices == 40).any()
    assert out.indices[1, 0, 0].item() == 0
    assert torch.equal(out.quantized, want.quantized)
    assert torch.isnan(out.loss) and torch.isnan(want.loss)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def test_explain_and_no_silent_fallback():
    features, codebook = _make(2)
    grain = torch.zeros(2, 3, 5, dtype=torch.int64, device=DEV)
    f64 = [f.double() for f in features]
    with dqfast.use_backend("triton"):
        assert dqfast.explain("dynamic_quantize", features, codebook, grain=grain) == []
        why = dqfast.explain("dynamic_quantize", f64, codebook.double(), grain=grain)
        assert why and any("float64" in w for w in why)
        with pytest.raises(dqfast.BackendUnavailable, match="float64"):
            dqfast.dynamic_quantize(f64, codebook.double(), grain=grain)


# ----------------------------------------------------------------------------------------------
# GPU-only: bf16 and realistic sizes
# ----------------------------------------------------------------------------------------------


@needs_gpu
def test_bf16_gate():
    seed(80)
    features, codebook = _make(2, B=2, H=8, W=8, D=64, K=256, dtype=torch.bfloat16)
    gate = _one_hot(torch.randint(0, 2, (2, 8, 8), device=DEV), 2, torch.bfloat16)
    _three_way(features, codebook, gate=gate)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dq_vae_size_at_half_budget(dtype):
    seed(81)
    B, H, W, D, K = 4, 16, 16, 256, 1024
    # Features near known codes: with 2560 searches a random codebook would hold near-ties.
    codebook = randn(K, D, device=DEV, scale=3.0)
    features = []
    for g in range(2):
        truth = torch.randint(0, K, (B, H * 2**g, W * 2**g), device=DEV)
        noise = 0.1 * randn(B, D, H * 2**g, W * 2**g, device=DEV)
        features.append((codebook[truth].permute(0, 3, 1, 2) + noise).to(dtype))
    codebook = codebook.to(dtype)
    logits = randn(B, H, W, 2, device=DEV)
    out, _ = _three_way(features, codebook, router_logits=logits, budget=0.5)
    assert out.n_codes.tolist() == [128 + 4 * 128] * 4
