"""The released DQ code's conventions, offered as options, against transcriptions of its formulas.

Each ``official_*`` function below is written from the published description of the released
code (shared/PAPERS.md A, the project's DESIGN.md 8), independently of dqfast's implementation:

- quantizer loss: every one of the B x Hf x Wf finest cells is quantized (a coarse region's vector
  broadcast 2x2), and ``beta * mean((zq.detach() - z)^2 * m) + mean((zq - z.detach())^2 * m)`` is
  taken over all B * Hf * Wf * D entries with the cell weight m = 1/4 on coarse cells, 1 on fine;
- budget loss (BudgetConstraint_RatioMSE_DualGrain): ``beta = sum(1 * gate_coarse + 4 * gate_fine)
  / B - H * W``, ``ratio = beta / (4 * H * W - H * W)``, loss ``gamma * (ratio - t)^2 + gamma *
  ((1 - ratio) - (1 - t))^2``;
- router tap: the router reads the encoder's maps before the 1x1 quant_conv; the one-hot gate
  merges the raw maps, which then go through quant_conv and the quantizer;
- fine sos: the fine segment starts with its own sos token, with its own position and segment id.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

import dqfast
from dqfast.models import create
from dqfast.nn import DynamicQuantizer
from tests.helpers import seed
from tests.test_dqtransformer import assert_same_tokens, check_valid, random_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Transcriptions
# ----------------------------------------------------------------------------------------------


def official_merge(coarse: torch.Tensor, fine: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """gate (B, 2, H, W) one-hot (coarse, fine) -> the merged (B, C, 2H, 2W) map."""
    up = repeat(coarse, "b c h w -> b c (h 2) (w 2)")
    g = repeat(gate, "b g h w -> b g (h 2) (w 2)")
    return up * g[:, :1] + fine * g[:, 1:]


def official_quantizer_loss(merged: torch.Tensor, fine_cells: torch.Tensor, codebook: torch.Tensor, beta: float):
    """merged (B, D, Hf, Wf); fine_cells (B, Hf, Wf) bool -> (loss, indices (B, Hf, Wf))."""
    B, D, Hf, Wf = merged.shape
    z = rearrange(merged, "b d h w -> b (h w) d")
    flat = z.reshape(-1, D)
    distances = torch.addmm(
        flat.pow(2).sum(1, keepdim=True) + codebook.t().pow(2).sum(0, keepdim=True), flat, codebook.t(), alpha=-2.0
    )
    indices = distances.argmin(1).view(B, Hf * Wf)
    zq = codebook[indices]
    mask = torch.where(rearrange(fine_cells, "b h w -> b (h w) 1"), 1.0, 0.25).to(z.dtype)
    loss = beta * torch.mean((zq.detach() - z) ** 2 * mask) + torch.mean((zq - z.detach()) ** 2 * mask)
    return loss, indices.view(B, Hf, Wf)


def official_budget_loss(gate: torch.Tensor, target: float, gamma: float) -> torch.Tensor:
    """gate (B, 2, H, W), channel 0 coarse, 1 fine."""
    B, _, H, W = gate.shape
    const, max_const = H * W, 4 * H * W - H * W
    beta = (1.0 * gate[:, 0] + 4.0 * gate[:, 1]).sum() / B - const
    ratio = beta / max_const
    return gamma * (ratio - target) ** 2 + gamma * ((1 - ratio) - (1 - target)) ** 2


def official_router(router, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """The dual-grain router on (coarse, fine) maps with ``router``'s weights -> logits (B, H, W, 2)."""
    n0, n1 = router.norms
    c = F.group_norm(coarse, n0.num_groups, n0.weight, n0.bias, n0.eps)
    f = F.avg_pool2d(F.group_norm(fine, n1.num_groups, n1.weight, n1.bias, n1.eps), 2)
    h = rearrange(torch.cat([c, f], 1), "b c h w -> b h w c")
    lin1, lin2 = router.mlp[0], router.mlp[2]
    return F.linear(F.silu(F.linear(h, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)


# ----------------------------------------------------------------------------------------------
# Quantizer loss
# ----------------------------------------------------------------------------------------------


def quantizer_inputs(B=2, D=5, H=3, W=4, K=7, dtype=torch.float64):
    g = seed(0)
    coarse = torch.randn(B, D, H, W, generator=g, dtype=dtype, requires_grad=True)
    fine = torch.randn(B, D, 2 * H, 2 * W, generator=g, dtype=dtype, requires_grad=True)
    return coarse, fine


@pytest.mark.parametrize("ema", [False, True])
def test_official_quantizer_loss_equals_the_released_formula(ema):
    torch.manual_seed(1)
    module = DynamicQuantizer(5, 7, loss_reduction="official", ema=ema, restart_dead=False).double().eval()
    default = DynamicQuantizer(5, 7, ema=ema, restart_dead=False).double().eval()
    default.load_state_dict(module.state_dict())
    coarse, fine = quantizer_inputs()
    out = module([coarse, fine])
    fine_cells = repeat(out.grain == 1, "b h w -> b (h 2) (w 2)")
    gate = F.one_hot(out.grain, 2).permute(0, 3, 1, 2).to(coarse.dtype)
    codebook = module.codebook.detach().clone().requires_grad_(not ema)
    c2, f2 = coarse.detach().clone().requires_grad_(), fine.detach().clone().requires_grad_()
    expected, indices = official_quantizer_loss(official_merge(c2, f2, gate), fine_cells, codebook, 0.25)
    assert 0 < out.grain.sum() < out.grain.numel()  # both grains present: the weighting matters
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    # The same gradients to the features (and to a learned codebook).
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(coarse.grad, c2.grad, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(fine.grad, f2.grad, rtol=1e-10, atol=1e-15)
    if not ema:
        torch.testing.assert_close(module.codebook.grad, codebook.grad, rtol=1e-10, atol=1e-15)
    # The default divides by the coded vectors instead: official * B * Hf * Wf / N_codes (ema=False).
    if not ema:
        ours = default([coarse, fine]).loss
        B, _, Hf, Wf = fine.shape
        torch.testing.assert_close(ours, expected.detach() * B * Hf * Wf / out.n_codes.sum(), rtol=1e-12, atol=0)
        assert not torch.allclose(ours, expected.detach())


# ----------------------------------------------------------------------------------------------
# Budget loss
# ----------------------------------------------------------------------------------------------


def test_official_budget_loss_equals_the_released_formula():
    kwargs = dict(budget_target=0.3, budget_weight=10.0, restart_dead=False)
    torch.manual_seed(2)
    module = DynamicQuantizer(5, 7, budget_loss="official", **kwargs).double().train()
    default = DynamicQuantizer(5, 7, **kwargs).double().train()
    default.load_state_dict(module.state_dict())
    coarse, fine = quantizer_inputs()
    torch.manual_seed(3)
    out = module([coarse, fine])
    out.budget_loss.backward()
    router_grads = [p.grad.clone() for p in module.router.parameters()]
    # The transcription, with the same Gumbel noise (the same RNG state at the same draw).
    module.zero_grad()
    torch.manual_seed(3)
    logits = official_router(module.router, coarse, fine)
    gate = F.gumbel_softmax(logits, tau=1.0, hard=True, dim=-1)
    expected = official_budget_loss(gate.permute(0, 3, 1, 2), 0.3, 10.0)
    expected.backward()
    assert torch.equal(gate.argmax(-1), out.grain)
    torch.testing.assert_close(out.budget_loss, expected, rtol=1e-12, atol=0)
    for ours, theirs in zip(router_grads, [p.grad for p in module.router.parameters()]):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-15)
    # The default is half of it: budget_weight * (ratio - target)^2.
    torch.manual_seed(3)
    torch.testing.assert_close(default([coarse, fine]).budget_loss, expected.detach() / 2, rtol=1e-12, atol=0)


def test_official_budget_loss_is_dual_grain_only():
    with pytest.raises(ValueError, match="num_grains 2"):
        DynamicQuantizer(4, 8, num_grains=3, budget_loss="official")
    with pytest.raises(ValueError, match="budget_loss"):
        DynamicQuantizer(4, 8, budget_loss="sse")
    with pytest.raises(ValueError, match="loss_reduction"):
        DynamicQuantizer(4, 8, loss_reduction="sum")


# ----------------------------------------------------------------------------------------------
# Router tap point (DQ-VAE)
# ----------------------------------------------------------------------------------------------


def official_dqvae_losses(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released DQ-VAE's quantization + budget losses and router logits with ``model``'s weights."""
    q = model.quantizer
    raw_coarse, raw_fine = model.encoder(x)
    logits = official_router(q.router, raw_coarse, raw_fine)
    gate = F.gumbel_softmax(logits, tau=q.gumbel_tau, hard=True, dim=-1).permute(0, 3, 1, 2)
    merged = model.quant_conv(official_merge(raw_coarse, raw_fine, gate))
    fine_cells = repeat(gate.detach()[:, 1] > 0.5, "b h w -> b (h 2) (w 2)")
    quant_loss, _ = official_quantizer_loss(merged, fine_cells, q.codebook, q.beta)
    budget = official_budget_loss(gate, q.budget_target[0], q.budget_weight)
    return quant_loss, budget, logits


def dqvae_grads(model, x, fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(4)
    fn(model, x).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_router_tap_before_quant_conv_is_the_released_dqvae():
    official = dict(ema=False, loss_reduction="official", budget_loss="official", gate_gradient="official")
    seed(5)
    model = create("dqvae-tiny", router_tap="before_quant_conv", **official).double().train()
    model.quantizer.restart_dead = False
    x = torch.rand(2, 3, 32, 32, generator=seed(6), dtype=torch.float64)

    def ours(m, x):
        out = m(x)
        return out.quant_loss + out.budget_loss

    def theirs(m, x):
        quant, budget, _ = official_dqvae_losses(m, x)
        return quant + budget

    torch.manual_seed(4)
    out = model(x)
    torch.manual_seed(4)
    quant, budget, logits = official_dqvae_losses(model, x)
    torch.testing.assert_close(out.router_scores, logits, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.quant_loss, quant, rtol=1e-9, atol=0)
    torch.testing.assert_close(out.budget_loss, budget, rtol=1e-12, atol=0)
    a, b = dqvae_grads(model, x, ours), dqvae_grads(model, x, theirs)
    assert a.keys() == b.keys() and any(k.startswith("encoder.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-7, atol=1e-12, msg=name)

    # The op's own gate gradient (only the chosen entry) gives the router other gradients.
    model.quantizer.gate_gradient = "chosen"
    chosen = dqvae_grads(model, x, ours)
    model.quantizer.gate_gradient = "official"
    assert not torch.allclose(chosen["quantizer.router.mlp.2.weight"], b["quantizer.router.mlp.2.weight"])
    torch.testing.assert_close(chosen["quant_conv.weight"], b["quant_conv.weight"], rtol=1e-7, atol=1e-12)

    # The default tap reads the maps after quant_conv: the router has quant_conv-sized inputs and
    # its gradients reach quant_conv, so the gradients differ from the released code's.
    seed(5)
    default = create("dqvae-tiny", **official).double().train()
    default.quantizer.restart_dead = False
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.router")}
    default.load_state_dict(shared, strict=False)
    assert default.quantizer.router.norms[0].num_channels == default.quant_conv.out_channels
    c = dqvae_grads(default, x, ours)
    assert not torch.allclose(c["quant_conv.weight"], b["quant_conv.weight"])


def test_router_tap_and_gate_gradient_are_validated():
    with pytest.raises(ValueError, match="router_tap"):
        create("dqvae-tiny", router_tap="inside")
    with pytest.raises(ValueError, match="gate_gradient"):
        create("dqvae-tiny", gate_gradient="all")
    with pytest.raises(ValueError, match="num_grains 2"):
        DynamicQuantizer(4, 8, num_grains=3, gate_gradient="official")


# ----------------------------------------------------------------------------------------------
# Fine-segment sos (DQ-Transformer)
# ----------------------------------------------------------------------------------------------

K, GRID = 64, 4
R = GRID * GRID


def official_fine_sos_sequence(tokens, K: int, R: int):
    """[sos, coarse..., eos, pad...][fine sos, fine..., eos, pad...] content and position ids of one
    image, with the fine sos' own position (the fine table's sos slot) and segment id 2."""
    Pc = R + 3
    rows = []
    for b in range(tokens.lengths.shape[0]):
        nc, nf = (int(n) for n in tokens.lengths[b])
        content = [K + 2] + tokens.codes[0][b, :nc].tolist() + [K + 1] + [K] * (R - nc)
        position = [R + 2] + tokens.positions[0][b, :nc].tolist() + [R + 1] + [R] * (R - nc)
        segment = [0] * (R + 2)
        content += [K + 3] + tokens.codes[1][b, :nf].tolist() + [K + 1] + [K] * (4 * R - nf)
        position += [Pc + 4 * R + 2] + [Pc + p for p in tokens.positions[1][b, :nf].tolist()]
        position += [Pc + 4 * R + 1] + [Pc + 4 * R] * (4 * R - nf)
        segment += [2] + [1] * (4 * R + 1)
        rows.append((content, position, segment))
    return rows


def test_fine_sos_sequence_matches_the_released_layout():
    model = create("dqtransformer-tiny", fine_sos=True)
    tokens = random_tokens(3, seed(7), fine_fraction=0.5)
    seq = model.sequence(tokens)
    L = (R + 2) + (4 * R + 2)
    assert model.seq_len == L and seq.content.shape == (3, L)
    for b, (content, position, segment) in enumerate(official_fine_sos_sequence(tokens, K, R)):
        assert seq.content[b].tolist() == content
        assert seq.position[b].tolist() == position
        # Segment ids as the embedding sees them: the fine sos has its own.
        with torch.no_grad():
            embedded = model._embed(seq.content[b : b + 1], seq.position[b : b + 1], 0, None)[0]
            expected = (
                model.content_embedding(seq.content[b])
                + model.position_embedding(seq.position[b])
                + model.index_embedding.weight
                + model.segment_embedding(torch.tensor(segment))
            )
        torch.testing.assert_close(embedded, expected)
    # The fine sos is given: the coarse eos predicts nothing, the fine sos predicts the first fine token.
    nc, nf = tokens.lengths[:, 0], tokens.lengths[:, 1]
    rows = torch.arange(3)
    assert not seq.has_target[rows, nc + 1].any()
    Cc = R + 2
    assert seq.has_target[:, Cc].all() and seq.target_fine[:, Cc].all()
    assert torch.equal(seq.layout.lengths, torch.stack([nc + 2, nf + 2], 1))
    # The default model has no fine sos and keeps its parameter shapes (the shipped weights load).
    plain = create("dqtransformer-tiny")
    assert plain.seq_len == L - 1 and plain.content_embedding.num_embeddings == K + 3
    assert plain.segment_embedding.num_embeddings == 2 and model.segment_embedding.num_embeddings == 3


def test_fine_sos_training_and_sampling():
    seed(8)
    model = create("dqtransformer-tiny", fine_sos=True, num_classes=3)
    tokens = random_tokens(3, seed(9))
    loss, _ = model.loss(tokens, labels=torch.tensor([0, 1, 2]))
    loss.backward()
    # The fine sos row of the content embedding and the third segment embedding get gradients.
    assert model.content_embedding.weight.grad[K + 3].abs().sum() > 0
    assert model.segment_embedding.weight.grad[2].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    for kwargs in ({}, {"budget": 0.5}):
        cached = model.generate(3, labels=torch.tensor([0, 1, 2]), generator=seed(10), **kwargs)
        uncached = model.generate(3, labels=torch.tensor([0, 1, 2]), generator=seed(10), use_cache=False, **kwargs)
        check_valid(cached)
        assert_same_tokens(cached, uncached)
    # The generated tokens give back the same sequence as teacher forcing builds.
    seq = model.sequence(cached)
    assert (seq.content[:, R + 2] == K + 3).all()
    with pytest.raises(TypeError, match="fine_sos"):
        create("dqtransformer-tiny", fine_sos=1)


def test_fine_sos_changes_nothing_by_default():
    """The default layout is dqfast.C2FLayout.dq_transformer's; sequences equal the plain layout."""
    model = create("dqtransformer-tiny")
    tokens = random_tokens(2, seed(11))
    seq = model.sequence(tokens)
    plain = dqfast.C2FLayout.dq_transformer(tokens.lengths[:, 0], tokens.lengths[:, 1], R, 4 * R)
    assert seq.layout.segment_sizes == plain.segment_sizes
    assert torch.equal(seq.layout.lengths, plain.lengths)
    assert torch.equal(seq.layout.dense_mask(), plain.dense_mask())
