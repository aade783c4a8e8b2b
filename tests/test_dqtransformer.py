"""DQ-Transformer: the sequence, the loss, masked pads, valid samples, cached == uncached sampling,
fixed-position mode, class conditioning and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
from einops import repeat

import dqfast
from dqfast.models import create
from dqfast.models.dqtransformer import DQTransformer
from dqfast.types import C2FTokens
from tests.helpers import seed

K, GRID = 64, 4  # dqtransformer-tiny: 64 codes, 4x4 coarse / 8x8 fine
R = GRID * GRID


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_tokens(batch: int, generator: torch.Generator, fine_fraction: float | None = None) -> C2FTokens:
    """Random dual-grain code maps on a 4x4 / 8x8 grid, as a DQ-VAE would give, flattened."""
    if fine_fraction is None:
        grain = torch.randint(0, 2, (batch, GRID, GRID), generator=generator)
    else:
        grain = (torch.rand(batch, GRID, GRID, generator=generator) < fine_fraction).long()
    grain[0] = 0  # one image all coarse ...
    if batch > 1:
        grain[1] = 1  # ... and one all fine: the empty segments
    coarse = repeat(torch.randint(0, K, (batch, GRID, GRID), generator=generator), "b h w -> b (h 2) (w 2)")
    fine = torch.randint(0, K, (batch, 2 * GRID, 2 * GRID), generator=generator)
    indices = torch.where(repeat(grain == 0, "b h w -> b (h 2) (w 2)"), coarse, fine)
    return dqfast.c2f_flatten(indices, grain)


def tiny(**overrides) -> DQTransformer:
    return create("dqtransformer-tiny", **overrides)


def check_valid(tokens: C2FTokens) -> None:
    """Positions unique, in their grid and in c2f order; the fine cells are exactly the children of
    the regions not coded coarse; eos handled (lengths consistent, -1 after them)."""
    assert tokens.grid_size == (GRID, GRID)
    n_coarse, n_fine = tokens.lengths[:, 0], tokens.lengths[:, 1]
    for b in range(tokens.lengths.shape[0]):
        nc, nf = int(n_coarse[b]), int(n_fine[b])
        coarse = tokens.positions[0][b, :nc].tolist()
        assert coarse == sorted(set(coarse)) and all(0 <= p < R for p in coarse)
        assert (tokens.positions[0][b, nc:] == -1).all() and (tokens.codes[0][b, nc:] == -1).all()
        fine_regions = [r for r in range(R) if r not in coarse]
        children = sorted(
            (2 * (r // GRID) + dy) * 2 * GRID + 2 * (r % GRID) + dx
            for r in fine_regions
            for dy in (0, 1)
            for dx in (0, 1)
        )
        assert tokens.positions[1][b, :nf].tolist() == children
        assert (tokens.positions[1][b, nf:] == -1).all() and (tokens.codes[1][b, nf:] == -1).all()
        for g, n in ((0, nc), (1, nf)):
            assert ((tokens.codes[g][b, :n] >= 0) & (tokens.codes[g][b, :n] < K)).all()
    # c2f_flatten of the decoded map gives the same tokens: a valid grain map in canonical order.
    indices, grain = dqfast.c2f_unflatten(tokens)
    again = dqfast.c2f_flatten(indices, grain)
    for a, b in zip(again.codes + again.positions, tokens.codes + tokens.positions):
        assert torch.equal(a, b)
    assert torch.equal(again.lengths, tokens.lengths)


def assert_same_tokens(a: C2FTokens, b: C2FTokens) -> None:
    assert torch.equal(a.lengths, b.lengths)
    for x, y in zip(a.codes + a.positions, b.codes + b.positions):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# Sequence, loss, gradients
# ----------------------------------------------------------------------------------------------


def test_sequence_layout_by_hand():
    """[sos, coarse codes, eos, pad..][fine codes, eos, pad..] with positions and next-token targets."""
    model = tiny()
    grain = torch.ones(1, GRID, GRID, dtype=torch.int64)
    grain[0, 0, 1] = grain[0, 2, 3] = 0  # regions 1 and 11 coarse
    indices = torch.arange(64).reshape(1, 8, 8)
    tokens = dqfast.c2f_flatten(indices, grain)
    seq = model.sequence(tokens)
    Cc, Pc = R + 2, R + 3
    pad, eos, sos = K, K + 1, K + 2
    assert seq.content.shape == (1, Cc + 4 * R + 1)
    assert seq.content[0, :4].tolist() == [sos, int(indices[0, 0, 2]), int(indices[0, 4, 6]), eos]
    assert (seq.content[0, 4:Cc] == pad).all()
    assert seq.position[0, :4].tolist() == [R + 2, 1, 11, R + 1]
    n_fine = 4 * (R - 2)
    fine_codes = [int(indices[0, y, x]) for y in range(8) for x in range(8) if grain[0, y // 2, x // 2] == 1]
    assert seq.content[0, Cc : Cc + n_fine].tolist() == fine_codes
    assert seq.content[0, Cc + n_fine].item() == eos and (seq.content[0, Cc + n_fine + 1 :] == pad).all()
    assert seq.position[0, Cc + n_fine].item() == Pc + 4 * R + 1
    # Targets: the next real token, across the pads after the coarse eos; none after the final eos.
    assert seq.target_content[0, :3].tolist() == [int(indices[0, 0, 2]), int(indices[0, 4, 6]), eos]
    assert seq.target_content[0, 3].item() == fine_codes[0]
    assert seq.next_position[0, 3].item() == Pc + int(tokens.positions[1][0, 0])
    assert seq.target_fine[0, :3].tolist() == [False] * 3 and bool(seq.target_fine[0, 3])
    expected_targets = torch.zeros(seq.content.shape[1], dtype=torch.bool)
    expected_targets[:4] = True
    expected_targets[Cc : Cc + n_fine] = True
    assert torch.equal(seq.has_target[0], expected_targets)


def test_loss_by_hand_from_logits():
    """The loss equals content CE + mean(coarse, fine position CE) recomputed from forward's logits."""
    seed(0)
    model = tiny()
    tokens = random_tokens(3, seed(1))
    loss, parts = model.loss(tokens)
    seq = model.sequence(tokens)
    position_logits, content_logits = model(seq)
    Pc = R + 3
    content_terms, coarse_terms, fine_terms = [], [], []
    for b in range(3):
        for i in range(seq.content.shape[1]):
            if not seq.has_target[b, i]:
                continue
            content_terms.append(-content_logits[b, i].log_softmax(-1)[seq.target_content[b, i]])
            p = int(seq.next_position[b, i])
            if p < Pc:
                coarse_terms.append(-position_logits[b, i, :Pc].log_softmax(-1)[p])
            else:
                fine_terms.append(-position_logits[b, i, Pc:].log_softmax(-1)[p - Pc])
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    expected = mean(content_terms) + 0.5 * (mean(coarse_terms) + mean(fine_terms))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["fine_position_ce"], mean(fine_terms), atol=1e-5, rtol=1e-5)
    n_targets = int(tokens.lengths.sum()) + 2 * 3  # codes + sos + coarse eos per image
    assert len(content_terms) == n_targets


def test_loss_finite_and_gradients_reach_every_parameter():
    seed(2)
    model = tiny(num_classes=3).train()
    tokens = random_tokens(4, seed(3))
    loss, logs = model.training_step({"tokens": tokens, "label": torch.tensor([0, 1, 2, 1])})
    assert torch.isfinite(loss) and math.isfinite(logs["loss"])
    assert set(logs) == {"loss", "content_ce", "coarse_position_ce", "fine_position_ce"}
    # Untrained: near the uniform cross-entropies.
    assert abs(logs["content_ce"] - math.log(K + 3)) < 0.5
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []


# ----------------------------------------------------------------------------------------------
# Masked pads
# ----------------------------------------------------------------------------------------------


def test_pads_are_never_attended():
    """Changing what the pad positions hold (their ids, or the pad embedding) changes no output at a
    real position; the same change with the pads marked as real (an unmasked layout) does."""
    seed(4)
    model = tiny().eval()
    tokens = random_tokens(3, seed(5), fine_fraction=0.5)
    seq = model.sequence(tokens)
    real = seq.layout.key_valid()
    with torch.no_grad():
        pos_a, content_a = model(seq)
        g = seed(6)
        content = torch.where(real, seq.content, torch.randint(0, K + 3, seq.content.shape, generator=g))
        position = torch.where(real, seq.position, torch.randint(0, 2 * R + 6, seq.position.shape, generator=g))
        next_position = torch.where(real, seq.next_position, torch.randint(0, 5 * R, seq.position.shape, generator=g))
        changed = seq._replace(content=content, position=position, next_position=next_position)
        pos_b, content_b = model(changed)
        torch.testing.assert_close(pos_b[real], pos_a[real], atol=1e-6, rtol=0)
        torch.testing.assert_close(content_b[real], content_a[real], atol=1e-6, rtol=0)

        model.content_embedding.weight[model.pad_id].normal_()
        model.position_embedding.weight[model._special("pad", False)].normal_()
        pos_c, content_c = model(seq)
        torch.testing.assert_close(content_c[real], content_a[real], atol=1e-6, rtol=0)
        torch.testing.assert_close(pos_c[real], pos_a[real], atol=1e-6, rtol=0)

        full = dqfast.C2FLayout(seq.layout.segment_sizes, torch.tensor(seq.layout.segment_sizes).expand(3, 2))
        _, unmasked_a = model(seq._replace(layout=full))
        _, unmasked_b = model(changed._replace(layout=full))
        assert (unmasked_a[real] - unmasked_b[real]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 2.0},
        {"top_k": 5},
        {"top_p": 0.5},
        {"budget": 0.5},
        {"budget": 0.0},
        {"budget": 1.0},
        {"coarse_count": torch.tensor([0, 3, 16, 9])},
    ],
)
def test_samples_are_valid(kwargs):
    seed(7)
    model = tiny().eval()
    tokens = model.generate(4, generator=seed(8), **kwargs)
    check_valid(tokens)
    if "budget" in kwargs:
        n_fine = math.floor(kwargs["budget"] * R + 0.5)
        assert (tokens.lengths[:, 0] == R - n_fine).all()
    if "coarse_count" in kwargs:
        assert torch.equal(tokens.lengths[:, 0], kwargs["coarse_count"])


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"top_p": 0.9, "temperature": 1.5}, {"labels": torch.tensor([0, 2, 1]), "top_k": 20}, {"budget": 0.25}],
)
def test_cached_and_uncached_sampling_are_identical(kwargs):
    seed(9)
    model = tiny(num_classes=3 if "labels" in kwargs else 0).eval()
    # Sharper, varied logits than the initialisation's, so the samples depend on them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    cached = model.generate(3, generator=seed(10), use_cache=True, **kwargs)
    uncached = model.generate(3, generator=seed(10), use_cache=False, **kwargs)
    check_valid(cached)
    assert_same_tokens(cached, uncached)
    # ... and another seed gives other samples (the comparison is not vacuous).
    other = model.generate(3, generator=seed(11), use_cache=True, **kwargs)
    assert not all(torch.equal(a, b) for a, b in zip(other.codes, cached.codes))


def test_every_coarse_position_can_be_sampled():
    """With flat position scores, one coarse region per image lands on every region of the grid."""
    seed(12)
    model = tiny().eval()
    with torch.no_grad():
        model.position_head.weight.zero_()
        model.position_head.bias.zero_()
    tokens = model.generate(200, coarse_count=1, generator=seed(13))
    check_valid(tokens)
    assert set(tokens.positions[0][:, 0].tolist()) == set(range(R))
    # The first coarse choice, free: eos or any region, never a special.
    free = model.generate(100, generator=seed(14))
    first = free.positions[0][:, 0]
    assert set(first[first >= 0].tolist()) <= set(range(R))


def test_fixed_fine_position_mode():
    seed(15)
    model = tiny().eval()
    grain = (torch.rand(3, GRID, GRID, generator=seed(16)) < 0.4).long()
    grain[0] = 1
    cached = model.generate(3, grain=grain, generator=seed(17))
    uncached = model.generate(3, grain=grain, generator=seed(17), use_cache=False)
    check_valid(cached)
    assert_same_tokens(cached, uncached)
    _, decoded_grain = dqfast.c2f_unflatten(cached)
    assert torch.equal(decoded_grain, grain)
    assert torch.equal(cached.lengths[:, 1], 4 * grain.sum((1, 2)))


def test_class_conditioning():
    seed(18)
    model = tiny(num_classes=4).eval()
    tokens = random_tokens(2, seed(19))
    seq = model.sequence(tokens)
    with torch.no_grad():
        _, a = model(seq, labels=torch.tensor([0, 0]))
        _, b = model(seq, labels=torch.tensor([3, 0]))
        _, c = model(seq)  # no label: the null class
    real = seq.layout.key_valid()
    assert (a[0][real[0]] - b[0][real[0]]).abs().amax() > 1e-4  # the label reaches every position
    torch.testing.assert_close(a[1], b[1])
    assert (a - c).abs().amax() > 1e-4
    with pytest.raises(ValueError, match="labels"):
        tiny().generate(1, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        model.generate(1, labels=torch.tensor([5]))


def test_learns_a_tiny_token_set():
    """Two label-conditioned token maps: after 150 Adam steps the loss is below a tenth of its start,
    and greedy sampling (top_k=1), cached or not, gives back each label's map exactly."""
    seed(20)
    model = tiny(num_classes=2, width=48).train()
    tokens = random_tokens(2, seed(21), fine_fraction=0.4)
    grain = (torch.rand(2, GRID, GRID, generator=seed(22)) < 0.4).long()
    indices = dqfast.c2f_unflatten(tokens)[0]
    tokens = dqfast.c2f_flatten(indices, grain)
    labels = torch.tensor([0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(150):
        loss, logs = model.training_step({"tokens": tokens, "label": labels})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(logs["loss"])
    assert history[-1] < 0.1 * history[0], history[::25]
    model.eval()
    for use_cache in (True, False):
        sample = model.generate(2, labels=labels, top_k=1, use_cache=use_cache, generator=seed(23))
        assert_same_tokens(sample, tokens)


# ----------------------------------------------------------------------------------------------
# Presets and bad input
# ----------------------------------------------------------------------------------------------


def test_paper_preset_configuration():
    with torch.device("meta"):
        model = create("dqtransformer")
    assert (model.width, len(model.position_blocks), len(model.content_blocks)) == (1024, 6, 18)
    assert model.position_blocks[0].attn.num_heads == 8
    assert model.codebook_size == 1024 and model.grid_size == (16, 16)
    assert model.seq_len == (256 + 2) + (1024 + 1)
    n = sum(p.numel() for p in model.parameters())
    assert 280e6 < n < 340e6  # "about 300M"


def test_bad_input():
    model = tiny()
    wrong_grid = dqfast.c2f_flatten(torch.zeros(1, 4, 4, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="grid_size"):
        model.loss(wrong_grid)
    triple = dqfast.c2f_flatten(torch.zeros(1, 16, 16, dtype=torch.int64), torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="G = 2"):
        model.loss(triple)
    with pytest.raises(TypeError, match="C2FTokens"):
        model.loss(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(1, temperature=0.0)
    with pytest.raises(ValueError, match="budget"):
        model.generate(1, budget=1.5)
    with pytest.raises(ValueError, match="coarse_count"):
        model.generate(1, coarse_count=17)
    with pytest.raises(ValueError, match="at most one"):
        model.generate(1, coarse_count=3, budget=0.5)
    with pytest.raises(ValueError, match="grain"):
        model.generate(2, grain=torch.zeros(1, GRID, GRID, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_size"):
        model.generate(0)


# ----------------------------------------------------------------------------------------------
# The sampling fast path
# ----------------------------------------------------------------------------------------------


def test_cached_decode_steps_equal_the_forward_pass():
    """The KV-cache steps (straight on the weights, shared additive mask) give the forward pass's
    hidden states at every real index of a teacher-forced sequence, pads in the middle included."""
    from dqfast.models.dqtransformer import _CachedStreams

    seed(30)
    model = tiny(num_classes=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    tokens = random_tokens(3, seed(31), fine_fraction=0.5)
    labels = torch.tensor([0, 1, 2])
    seq = model.sequence(tokens)
    with torch.no_grad():
        h_ref, c_ref = model._streams(seq, labels)
        valid = torch.cat([seq.layout.key_valid(), torch.zeros(3, 1, dtype=torch.bool)], 1)
        streams = _CachedStreams(model, 3, labels, valid)
        real = seq.layout.key_valid()
        for t in range(model.seq_len):
            h = streams.position(t, seq.content[:, t], seq.position[:, t])
            c = streams.content(t, h, seq.next_position[:, t])
            rows = real[:, t]
            torch.testing.assert_close(h[rows], h_ref[rows, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c[rows], c_ref[rows, t], atol=1e-5, rtol=1e-5)


def test_sampling_uses_one_thread_for_small_models_and_restores_state():
    model = tiny().train()
    seen = []
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # Both paths look the index embeddings up inside generate.
        model.index_embedding.register_forward_pre_hook(lambda m, a: seen.append((torch.get_num_threads(), m.training)))
        model.generate(2, generator=seed(32), progress=True)
        assert seen and set(seen) == {(1, False)}  # one thread, eval mode (no dropout)
        assert torch.get_num_threads() == 2 and model.training  # both restored
        big = tiny(width=288, num_heads=2)  # above SMALL_WIDTH
        big.index_embedding.register_forward_pre_hook(lambda m, a: seen.append((torch.get_num_threads(), m.training)))
        seen.clear()
        big.generate(1, generator=seed(33), budget=0.0)
        assert {threads for threads, _ in seen} == {2}
    finally:
        torch.set_num_threads(original)


def test_layouts_cache_their_mask():
    from dqfast.nn.c2f_attention import CachedC2FLayout

    lengths = torch.tensor([[3, 2], [1, 0]])
    plain = dqfast.C2FLayout((4, 3), lengths)
    cached = CachedC2FLayout.of(plain)
    assert isinstance(cached, dqfast.C2FLayout) and CachedC2FLayout.of(cached) is cached
    assert torch.equal(cached.dense_mask(), plain.dense_mask())
    assert torch.equal(cached.key_valid(), plain.key_valid())
    assert cached.dense_mask() is cached.dense_mask()  # built once
    assert cached.to("cpu") is cached
