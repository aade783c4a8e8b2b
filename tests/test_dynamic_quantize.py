"""The dynamic_quantize reference against the official DQ-VAE formulation, exact budgets, gradients,
the DynamicQuantizer module, and the public API's input checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import dqfast
from dqfast.nn.dynamic_quantizer import DynamicQuantizer
from dqfast.reference import vector_quantize as ref
from tests.helpers import plain_and_single_rank, seed


@pytest.fixture(autouse=True)
def reference_backend():
    """This file proves the reference and the module's own logic; under TRITON_INTERPRET=1 the
    public op would otherwise route CPU tensors to the kernel, whose parity has its own tests."""
    with dqfast.use_backend("reference"):
        yield


def upsample_nearest(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, ..., H, W) -> (B, ..., H * factor, W * factor) by repeating rows and columns."""
    return x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def official_path(features, codebook, grain, gate=None, beta=0.25):
    """The official DQ-VAE path, written independently: broadcast every grain to the finest grid,
    merge by the grain mask (times the gate), quantize EVERY finest cell by brute-force cdist, and
    weight each finest cell by 1 / (cells its code covers) so every region counts once.

    Returns (quantized (B, D, Hf, Wf) straight-through, indices (B, Hf, Wf), loss).
    """
    G = len(features)
    B, D, Hf, Wf = features[-1].shape
    merged = torch.zeros_like(features[-1])
    weight = torch.zeros(B, Hf, Wf, dtype=features[-1].dtype)
    for g, f in enumerate(features):
        mask = upsample_nearest(grain == g, 2 ** (G - 1)).to(f.dtype)
        scale = mask if gate is None else mask * upsample_nearest(gate[..., g], 2 ** (G - 1))
        merged = merged + upsample_nearest(f, 2 ** (G - 1 - g)) * scale[:, None]
        weight = weight + mask / 4 ** (G - 1 - g)
    cells = merged.permute(0, 2, 3, 1).reshape(-1, D)
    indices = (torch.cdist(cells, codebook.to(cells.dtype)) ** 2).argmin(-1)
    q = codebook[indices].reshape(B, Hf, Wf, D).permute(0, 3, 1, 2)
    quantized = merged + (q - merged).detach()
    w = weight[:, None]
    commitment = (w * (merged - q.detach()) ** 2).sum()
    codebook_term = (w * (merged.detach() - q) ** 2).sum()
    loss = (beta * commitment + codebook_term) / (weight.sum() * D)
    return quantized, indices.reshape(B, Hf, Wf), loss


def separated_problem(B, H, W, D, K, G, *, dtype=torch.float64, noise=1e-3):
    """Features near well-separated codes (so the nearest code is unambiguous) and random grains."""
    codebook = torch.randn(K, D, dtype=dtype) * 3
    gaps = torch.cdist(codebook, codebook) + torch.eye(K, dtype=dtype) * 1e9
    assert gaps.min() > 1.0, "test precondition: codes are well separated"
    features = []
    for g in range(G):
        picks = torch.randint(K, (B, H * 2**g, W * 2**g))
        features.append((codebook[picks] + noise * torch.randn(*picks.shape, D, dtype=dtype)).permute(0, 3, 1, 2))
    grain = torch.randint(G, (B, H, W))
    return [f.contiguous() for f in features], codebook, grain


def hand_budget(score_by_grain: list[list[float]], fractions: list[float], num_regions: int) -> list[int]:
    """One image's grains by the spec, with Python lists: cumulative rounding, finest grain first,
    each grain taking the best free regions, equal scores to the lower index."""
    G = len(fractions) + 1
    grains = [0] * num_regions
    free = set(range(num_regions))
    previous = 0
    for i, total in enumerate(itertools.accumulate(fractions)):
        cumulative = min(math.floor(total * num_regions + 0.5), num_regions)
        g = G - 1 - i
        ranked = sorted(free, key=lambda r: (-score_by_grain[g][r], r))
        for r in ranked[: cumulative - previous]:
            grains[r] = g
            free.discard(r)
        previous = cumulative
    return grains


# ---------------------------------------------------------------------------------------------
# Against the official path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G,B,H,W", [(2, 2, 3, 5), (3, 2, 2, 3), (2, 1, 1, 1), (3, 1, 2, 2)])
def test_matches_official_path(G, B, H, W):
    seed(20 + G)
    D, K = 5, 11
    features, codebook, grain = separated_problem(B, H, W, D, K, G)
    grain[0, 0, 0] = G - 1  # both extremes present whatever the draw
    if H * W > 1:
        grain[-1, -1, -1] = 0
    out = ref.dynamic_quantize(features, codebook, grain=grain)
    quantized, indices, loss = official_path(features, codebook, grain)

    Hf, Wf = H * 2 ** (G - 1), W * 2 ** (G - 1)
    assert out.quantized.shape == (B, D, Hf, Wf) and out.indices.shape == (B, Hf, Wf)
    assert torch.equal(out.indices, indices)
    assert torch.equal(out.quantized, quantized)
    assert torch.equal(out.grain, grain)
    torch.testing.assert_close(out.loss, loss, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("G", [2, 3])
def test_every_region_holds_its_codes(G):
    """Per region: each grain-g cell's 4**(G-1-g) finest copies hold one code, the nearest to that cell's feature."""
    seed(30 + G)
    B, H, W, D, K = 2, 2, 3, 6, 9
    features = [torch.randn(B, D, H * 2**g, W * 2**g, dtype=torch.float64) for g in range(G)]
    codebook = torch.randn(K, D, dtype=torch.float64)
    grain = torch.randint(G, (B, H, W))
    out = ref.dynamic_quantize(features, codebook, grain=grain)
    for b, h, w in itertools.product(range(B), range(H), range(W)):
        g = int(grain[b, h, w])
        side, spread = 2**g, 2 ** (G - 1 - g)
        for i, j in itertools.product(range(side), range(side)):
            y, x = h * side + i, w * side + j
            block = out.indices[b, y * spread : (y + 1) * spread, x * spread : (x + 1) * spread]
            assert (block == block[0, 0]).all()
            v = features[g][b, :, y, x]
            d = ((codebook - v) ** 2).sum(-1)
            assert d[block[0, 0]] <= d.min() + 1e-12
            qblock = out.quantized[b, :, y * spread : (y + 1) * spread, x * spread : (x + 1) * spread]
            assert torch.equal(qblock, codebook[block[0, 0]][:, None, None].expand_as(qblock))


def test_cosine_metric_codes_and_loss():
    seed(40)
    B, H, W, D, K = 2, 2, 2, 4, 7
    features = [torch.randn(B, D, H * 2**g, W * 2**g, dtype=torch.float64) for g in range(2)]
    codebook = torch.randn(K, D, dtype=torch.float64)
    grain = torch.randint(2, (B, H, W))
    out = ref.dynamic_quantize(features, codebook, grain=grain, metric="cosine", beta=0.5)
    unit = codebook / codebook.norm(dim=-1, keepdim=True)
    total, count = 0.0, 0
    for g, f in enumerate(features):
        mask = upsample_nearest(grain == g, 2**g)
        v = f.permute(0, 2, 3, 1)[mask]
        v = v / v.norm(dim=-1, keepdim=True)
        codes = out.indices[:, :: 2 ** (1 - g), :: 2 ** (1 - g)][mask]
        assert (v @ unit[codes].T).diagonal().allclose((v @ unit.T).max(-1).values, atol=1e-12)
        total += ((v - unit[codes]) ** 2).sum().item()
        count += v.shape[0]
    torch.testing.assert_close(out.loss.item(), 1.5 * total / (count * D), atol=1e-12, rtol=1e-10)


def test_loss_and_n_codes_by_hand():
    """Loss in float64 by an explicit loop over regions and cells, and n_codes = sum 4**grain."""
    seed(41)
    B, H, W, D, K, G, beta = 2, 2, 3, 3, 6, 3, 0.3
    features = [torch.randn(B, D, H * 2**g, W * 2**g, dtype=torch.float64) for g in range(G)]
    codebook = torch.randn(K, D, dtype=torch.float64)
    grain = torch.randint(G, (B, H, W))
    out = ref.dynamic_quantize(features, codebook, grain=grain, beta=beta)
    total, n = 0.0, 0
    for b, h, w in itertools.product(range(B), range(H), range(W)):
        g = int(grain[b, h, w])
        for i, j in itertools.product(range(2**g), range(2**g)):
            v = features[g][b, :, h * 2**g + i, w * 2**g + j]
            total += ((codebook - v) ** 2).sum(-1).min().item()
            n += 1
    torch.testing.assert_close(out.loss.item(), (1 + beta) * total / (n * D), atol=1e-12, rtol=1e-10)
    expected = [sum(4 ** int(x) for x in grain[b].flatten()) for b in range(B)]
    assert out.n_codes.tolist() == expected and out.n_codes.dtype == torch.int64
    assert out.n_codes.sum().item() == n


def test_half_precision_features():
    seed(42)
    features, codebook, grain = separated_problem(2, 2, 2, 8, 10, 2, dtype=torch.float32, noise=1e-2)
    features, codebook = [f.half() for f in features], codebook.half()
    out = ref.dynamic_quantize(features, codebook, grain=grain)
    _, indices, loss = official_path([f.double() for f in features], codebook.double(), grain)
    assert out.quantized.dtype == torch.float16 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.loss.double(), loss, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Grains from a gate or router logits, exact budgets
# ---------------------------------------------------------------------------------------------


def test_grain_from_gate_and_argmax():
    seed(50)
    features, codebook, _ = separated_problem(2, 3, 2, 4, 8, 3)
    logits = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    want = logits.argmax(-1)
    gate = F.one_hot(want, 3).double()
    assert torch.equal(ref.dynamic_quantize(features, codebook, gate=gate).grain, want)
    assert torch.equal(ref.dynamic_quantize(features, codebook, router_logits=logits).grain, want)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.5, 0.37])
def test_budget_is_exact_per_image(fraction):
    seed(51)
    B, H, W = 4, 5, 7
    logits = torch.randn(B, H, W, 2)
    grain = ref.grain_from_budget(logits, fraction)
    n = math.floor(fraction * H * W + 0.5)
    assert ((grain == 1).sum((1, 2)) == n).all()
    assert torch.equal(ref.grain_from_budget(logits, [fraction]), grain)  # a 1-sequence means the same
    # The fine regions are the top ones by logit_fine - logit_coarse.
    score = logits[..., 1] - logits[..., 0]
    for b in range(B):
        fine, coarse = score[b][grain[b] == 1], score[b][grain[b] == 0]
        if fine.numel() and coarse.numel():
            assert fine.min() >= coarse.max()


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.5, 0.37])
def test_budget_through_dynamic_quantize(fraction):
    seed(52)
    B, H, W = 3, 3, 5
    features, codebook, _ = separated_problem(B, H, W, 4, 8, 2)
    out = ref.dynamic_quantize(features, codebook, router_logits=torch.randn(B, H, W, 2), budget=fraction)
    n = math.floor(fraction * H * W + 0.5)
    assert ((out.grain == 1).sum((1, 2)) == n).all()
    assert (out.n_codes == (H * W - n) + 4 * n).all()


def test_budget_ties_go_to_the_lower_region():
    B, H, W = 2, 3, 4
    assert ref.grain_from_budget(torch.zeros(B, H, W, 2), 0.5).flatten(1).tolist() == [[1] * 6 + [0] * 6] * B
    # Many equal scores: compare with the spec written as a sort by (-score, index).
    seed(53)
    logits = torch.randint(-2, 3, (B, H, W, 2)).float()
    for fraction in (0.25, 0.5, 0.75):
        grain = ref.grain_from_budget(logits, fraction)
        for b in range(B):
            flat = logits[b].reshape(H * W, 2)
            scores = [[0.0] * (H * W), (flat[:, 1] - flat[:, 0]).tolist()]
            assert grain[b].flatten().tolist() == hand_budget(scores, [fraction], H * W)


@pytest.mark.parametrize("fractions", [(0.3, 0.3), (0.25, 0.25), (0.0, 1.0), (1.0, 0.0), (0.45, 0.1)])
def test_triple_grain_budget(fractions):
    seed(54)
    B, H, W = 3, 2, 5
    logits = torch.randint(-3, 4, (B, H, W, 3)).float()  # small integers: plenty of ties
    grain = ref.grain_from_budget(logits, fractions)
    for b in range(B):
        flat = logits[b].reshape(H * W, 3)
        scores = [[0.0] * (H * W)] + [(flat[:, g] - flat[:, 0]).tolist() for g in (1, 2)]
        assert grain[b].flatten().tolist() == hand_budget(scores, list(fractions), H * W)


def test_triple_grain_counts_use_cumulative_rounding():
    """10 regions, (0.25, 0.25): rounding each grain alone would give 3 + 3 = 6 refined regions;
    cumulative rounding gives floor(2.5 + 0.5) = 3 finest and floor(5 + 0.5) - 3 = 2 medium, 5 in all,
    the rounded total."""
    seed(55)
    grain = ref.grain_from_budget(torch.randn(4, 2, 5, 3), (0.25, 0.25))
    assert ((grain == 2).sum((1, 2)) == 3).all()
    assert ((grain == 1).sum((1, 2)) == 2).all()
    assert ref.budget_counts((0.25, 0.25), 10) == [3, 2]


def test_budget_logits_in_half_precision_rank_in_fp32():
    logits = torch.zeros(1, 1, 3, 2, dtype=torch.float16)
    logits[0, 0, :, 1] = torch.tensor([1000.0, 1000.5, 1001.0], dtype=torch.float16)
    logits[0, 0, :, 0] = torch.tensor([0.0, 0.5, 0.25], dtype=torch.float16)
    # fp32 scores 1000, 1000, 1000.75: region 2 first, then the tie 0 / 1 goes to region 0.
    assert ref.grain_from_budget(logits, 2 / 3).flatten().tolist() == [1, 0, 1]


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("with_gate", [False, True])
def test_gradients_match_official_path(G, with_gate):
    """Straight-through and loss gradients to features, gate and codebook vs the official formulation."""
    seed(60 + G)
    B, H, W, D, K = 2, 2, 3, 4, 9
    features, codebook, grain = separated_problem(B, H, W, D, K, G)
    upstream = torch.randn(B, D, H * 2 ** (G - 1), W * 2 ** (G - 1), dtype=torch.float64)

    def grads(run):
        feats = [f.clone().requires_grad_() for f in features]
        book = codebook.clone().requires_grad_()
        gate = F.one_hot(grain, G).double().requires_grad_() if with_gate else None
        quantized, loss = run(feats, book, gate)
        ((quantized * upstream).sum() + 3.0 * loss).backward()
        return [f.grad for f in feats] + [book.grad] + ([gate.grad] if with_gate else [])

    def reference(feats, book, gate):
        kwargs = {"gate": gate} if gate is not None else {"grain": grain}
        out = ref.dynamic_quantize(feats, book, **kwargs)
        return out.quantized, out.loss

    def official(feats, book, gate):
        quantized, _, loss = official_path(feats, book, grain, gate)
        return quantized, loss

    for mine, theirs in zip(grads(reference), grads(official)):
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=1e-10)


def test_gate_gradient_is_dl_dv_dot_features():
    """With a one-hot gate v = 1.0 * features, so dL/dv = dL/dfeatures and the gate's gradient at the
    chosen grain is the sum over the region's cells of <dL/dfeatures, features>; 0 at other grains."""
    seed(62)
    B, H, W, D, K, G = 2, 2, 2, 3, 7, 3
    features = [torch.randn(B, D, H * 2**g, W * 2**g, dtype=torch.float64, requires_grad=True) for g in range(G)]
    codebook = torch.randn(K, D, dtype=torch.float64)
    grain = torch.randint(G, (B, H, W))
    gate = F.one_hot(grain, G).double().requires_grad_()
    out = ref.dynamic_quantize(features, codebook, gate=gate)
    upstream = torch.randn_like(out.quantized)
    ((out.quantized * upstream).sum() + out.loss).backward()
    expected = torch.zeros(B, H, W, G, dtype=torch.float64)
    for g in range(G):
        inner = (features[g].grad * features[g].detach()).sum(1)  # (B, Hg, Wg)
        per_region = inner.reshape(B, H, 2**g, W, 2**g).sum((2, 4))
        expected[..., g] = torch.where(grain == g, per_region, 0.0)
    torch.testing.assert_close(gate.grad, expected, atol=1e-12, rtol=1e-10)


def test_gradcheck_codebook():
    """With beta = 0 and constant features the loss is a plain function of the codebook (no
    stop-gradient in the way), so finite differences must match autograd."""
    seed(63)
    features, codebook, grain = separated_problem(1, 2, 2, 3, 6, 2, noise=0.3)

    def loss(book):
        return ref.dynamic_quantize(features, book, grain=grain, beta=0.0).loss

    assert torch.autograd.gradcheck(loss, (codebook.clone().requires_grad_(),))


def test_gradients_by_closed_form():
    """d loss / d v = 2 beta (v - q) / (N D) on coded cells, 0 elsewhere; d loss / d c_k = sum over the
    vectors coded by k of 2 (c_k - v) / (N D); the straight-through part sums the upstream over each
    cell's broadcast block."""
    seed(64)
    B, H, W, D, K, G, beta = 2, 2, 2, 3, 5, 2, 0.4
    features = [torch.randn(B, D, H * 2**g, W * 2**g, dtype=torch.float64, requires_grad=True) for g in range(G)]
    codebook = torch.randn(K, D, dtype=torch.float64, requires_grad=True)
    grain = torch.randint(G, (B, H, W))
    out = ref.dynamic_quantize(features, codebook, grain=grain, beta=beta)
    upstream = torch.randn_like(out.quantized)
    ((out.quantized * upstream).sum() + out.loss).backward()

    N = int(out.n_codes.sum())
    book_grad = torch.zeros(K, D, dtype=torch.float64)
    for g, f in enumerate(features):
        spread = 2 ** (G - 1 - g)
        mask = upsample_nearest(grain == g, 2**g)[:, None]
        codes = out.indices[:, ::spread, ::spread]
        q = codebook.detach()[codes].permute(0, 3, 1, 2)
        block_sum = upstream.reshape(B, D, H * 2**g, spread, W * 2**g, spread).sum((3, 5))
        expected = torch.where(mask, block_sum + 2 * beta * (f.detach() - q) / (N * D), 0.0)
        torch.testing.assert_close(f.grad, expected, atol=1e-12, rtol=1e-10)
        diff = (q - f.detach()).permute(0, 2, 3, 1)[mask[:, 0]]
        book_grad.index_add_(0, codes[mask[:, 0]], 2 * diff / (N * D))
    torch.testing.assert_close(codebook.grad, book_grad, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# DynamicQuantizer
# ---------------------------------------------------------------------------------------------


def pyramid(B, C, H, W, G, requires_grad=False):
    return [torch.randn(B, C, H * 2**g, W * 2**g, requires_grad=requires_grad) for g in range(G)]


@pytest.mark.parametrize("G", [2, 3])
def test_module_train_reaches_router(G):
    seed(70)
    model = DynamicQuantizer(8, 16, G, budget_target=0.5 if G == 2 else (0.3, 0.3), restart_dead=False)
    model.train()
    feats = pyramid(2, 8, 2, 3, G, requires_grad=True)
    out = model(feats)
    assert out.quantized.shape == (2, 8, 2 * 2 ** (G - 1), 3 * 2 ** (G - 1))
    assert out.router_logits.shape == (2, 2, 3, G)
    assert out.budget_loss.item() > 0
    (out.quantized.square().mean() + out.loss + out.budget_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_module_eval_argmax_and_exact_budget():
    seed(71)
    model = DynamicQuantizer(6, 12, in_channels=10).eval()
    feats = pyramid(3, 10, 4, 5, 2)
    out = model(feats)
    assert out.quantized.shape == (3, 6, 8, 10)
    assert torch.equal(out.grain, out.router_logits.argmax(-1))
    assert out.budget_loss.item() == 0.0
    out = model(feats, budget=0.37)
    n = math.floor(0.37 * 20 + 0.5)
    assert ((out.grain == 1).sum((1, 2)) == n).all()
    assert (out.n_codes == 20 - n + 4 * n).all()


def test_module_is_deterministic_under_seed():
    def run():
        torch.manual_seed(72)
        model = DynamicQuantizer(4, 8, ema=True).train()
        feats = pyramid(2, 4, 2, 2, 2)
        out = model(feats)
        return out.indices, out.grain, out.loss, model.codebook.clone()

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def coded_vectors(features, indices, grain):
    """Every coded vector and its code, by explicit loops (independent of the module's gathering)."""
    G = len(features)
    vectors, codes = [], []
    B, H, W = grain.shape
    for b, h, w in itertools.product(range(B), range(H), range(W)):
        g = int(grain[b, h, w])
        spread = 2 ** (G - 1 - g)
        for i, j in itertools.product(range(2**g), range(2**g)):
            y, x = h * 2**g + i, w * 2**g + j
            vectors.append(features[g][b, :, y, x])
            codes.append(int(indices[b, y * spread, x * spread]))
    return torch.stack(vectors), torch.tensor(codes)


def test_module_ema_update_matches_one_hot_formula():
    seed(73)
    decay, eps, K, D = 0.9, 1e-5, 6, 3
    model = DynamicQuantizer(D, K, ema=True, decay=decay, eps=eps, restart_dead=False).train()
    feats = pyramid(2, D, 2, 2, 2)
    start = model.codebook.clone()
    out = model(feats)
    vectors, codes = coded_vectors([f.detach() for f in feats], out.indices, out.grain)
    one_hot = F.one_hot(codes, K).float()  # N x K here on purpose: the textbook EMA formula
    usage = decay * torch.ones(K) + (1 - decay) * one_hot.sum(0)
    code_sum = decay * start + (1 - decay) * one_hot.T @ vectors
    smoothed = (usage + eps) / (usage.sum() + K * eps) * usage.sum()
    torch.testing.assert_close(model.usage, usage)
    torch.testing.assert_close(model.codebook, code_sum / smoothed[:, None], atol=1e-6, rtol=1e-5)
    assert model.codebook.grad_fn is None and not model.codebook.requires_grad


def test_module_ema_moves_codes_toward_data():
    seed(74)
    model = DynamicQuantizer(4, 8, ema=True, decay=0.5, restart_dead=False).train()
    centre = torch.tensor([1.0, -2.0, 0.5, 3.0])
    feats = [centre[None, :, None, None] + 0.01 * torch.randn(2, 4, 2 * 2**g, 2 * 2**g) for g in range(2)]
    before = (model.codebook - centre).norm(dim=-1).min()
    for _ in range(3):
        out = model(feats)
    used = out.indices.unique()
    assert (model.codebook[used] - centre).norm(dim=-1).max() < 0.5 * before


@pytest.mark.parametrize("ema", [False, True])
def test_module_dead_code_restart(ema):
    seed(75)
    K, D = 32, 4
    model = DynamicQuantizer(D, K, ema=ema, restart_dead=True).train()
    # Few distinct vectors: most codes go unused and must be restarted from the batch.
    feats = pyramid(1, D, 1, 2, 2)
    before = model.codebook.detach().clone()
    out = model(feats)
    vectors, codes = coded_vectors([f.detach() for f in feats], out.indices, out.grain)
    dead = torch.ones(K, dtype=torch.bool)
    dead[codes.unique()] = False
    after = model.codebook.detach()
    assert dead.sum() >= K - vectors.shape[0]
    for k in torch.nonzero(dead).flatten().tolist():
        assert (after[k] == vectors).all(-1).any(), f"dead code {k} was not replaced by a batch vector"
    assert (model.usage[dead] == model.dead_threshold).all()
    if not ema:
        assert torch.equal(after[~dead], before[~dead])


def test_module_ema_loss_is_commitment_only():
    seed(76)
    model = DynamicQuantizer(4, 8, ema=True, beta=0.25, restart_dead=False).eval()
    feats = pyramid(2, 4, 2, 2, 2, requires_grad=True)
    out = model(feats)
    plain = dqfast.dynamic_quantize(feats, model.codebook, grain=out.grain)
    # The op's loss is (1 + beta) * E; with EMA only beta * E remains, with the same gradient.
    torch.testing.assert_close(out.loss, plain.loss * 0.25 / 1.25)
    (g_model,) = torch.autograd.grad(out.loss, feats[1], retain_graph=True)
    (g_op,) = torch.autograd.grad(plain.loss, feats[1])
    torch.testing.assert_close(g_model, g_op)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="num_grains"):
        DynamicQuantizer(4, 8, 1)
    with pytest.raises(ValueError, match="metric"):
        DynamicQuantizer(4, 8, metric="dot")
    with pytest.raises(ValueError, match="budget_target"):
        DynamicQuantizer(4, 8, 3, budget_target=0.5)
    with pytest.raises(ValueError, match="features"):
        DynamicQuantizer(4, 8).eval()(pyramid(1, 4, 2, 2, 3))


# ---------------------------------------------------------------------------------------------
# Bad input through the public API
# ---------------------------------------------------------------------------------------------


def _good():
    features = [torch.randn(2, 3, 2 * 2**g, 3 * 2**g) for g in range(2)]
    return features, torch.randn(5, 3), torch.zeros(2, 2, 3, dtype=torch.int64)


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("no-grain-source", ValueError, "exactly one"),
        ("two-grain-sources", ValueError, "exactly one"),
        ("fine-first", ValueError, r"features\[1\]"),
        ("not-2x", ValueError, r"features\[1\]"),
        ("D-mismatch", ValueError, "codebook"),
        ("grain-out-of-range", ValueError, "grain"),
        ("negative-grain", ValueError, "grain"),
        ("budget-above-1", ValueError, "budget"),
        ("budget-below-0", ValueError, "budget"),
        ("budget-without-logits", ValueError, "budget"),
        ("budget-wrong-length", ValueError, "budget"),
        ("gate-shape", ValueError, "gate"),
        ("logits-shape", ValueError, "router_logits"),
        ("grain-shape", ValueError, "grain"),
        ("integer-features", TypeError, "features"),
        ("tensor-not-list", TypeError, "features"),
        ("metric", ValueError, "metric"),
    ],
)
def test_bad_input(case, error, match):
    features, codebook, grain = _good()
    kwargs = {"grain": grain}
    logits = torch.randn(2, 2, 3, 2)
    if case == "no-grain-source":
        kwargs = {}
    elif case == "two-grain-sources":
        kwargs = {"grain": grain, "router_logits": logits}
    elif case == "fine-first":
        features = features[::-1]
    elif case == "not-2x":
        features[1] = torch.randn(2, 3, 6, 9)
    elif case == "D-mismatch":
        codebook = torch.randn(5, 4)
    elif case == "grain-out-of-range":
        kwargs = {"grain": grain + 2}
    elif case == "negative-grain":
        kwargs = {"grain": grain - 1}
    elif case == "budget-above-1":
        kwargs = {"router_logits": logits, "budget": 1.5}
    elif case == "budget-below-0":
        kwargs = {"router_logits": logits, "budget": -0.1}
    elif case == "budget-without-logits":
        kwargs = {"grain": grain, "budget": 0.5}
    elif case == "budget-wrong-length":
        kwargs = {"router_logits": logits, "budget": (0.3, 0.3)}
    elif case == "gate-shape":
        kwargs = {"gate": torch.ones(2, 2, 3, 3)}
    elif case == "logits-shape":
        kwargs = {"router_logits": torch.randn(2, 3, 2, 2)}
    elif case == "grain-shape":
        kwargs = {"grain": torch.zeros(2, 3, 2, dtype=torch.int64)}
    elif case == "integer-features":
        features = [f.long() for f in features]
    elif case == "tensor-not-list":
        features = features[0]
    elif case == "metric":
        kwargs["metric"] = "manhattan"
    with pytest.raises(error, match=match):
        dqfast.dynamic_quantize(features, codebook, **kwargs)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("ema", [False, True])
def test_module_backward_after_codebook_update(metric, ema):
    """The EMA / restart update rewrites the codebook during forward; backward must still run and
    the learned codebook must still receive its gradient."""
    seed(77)
    model = DynamicQuantizer(4, 16, metric=metric, ema=ema, restart_dead=True).train()
    feats = pyramid(2, 4, 1, 2, 2, requires_grad=True)
    out = model(feats)
    (out.quantized.square().mean() + out.loss).backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in feats)
    if not ema:
        assert model.codebook.grad is not None and model.codebook.grad.abs().sum() > 0


def test_module_single_process_group_matches_plain(tmp_path):
    """Under torch.distributed (one gloo rank here) the statistics are all-reduced and the restart
    picks broadcast; with one rank that must change nothing."""

    def run():
        torch.manual_seed(78)
        model = DynamicQuantizer(4, 8, ema=True).train()
        out = model(pyramid(2, 4, 1, 2, 2))
        return out.indices, model.codebook.clone(), model.usage.clone()

    plain, distributed = plain_and_single_rank(run, tmp_path)
    for a, b in zip(plain, distributed):
        assert torch.equal(a, b)
