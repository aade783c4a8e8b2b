"""DQ-VAE: shapes, gradients, exact per-image budgets, encode/decode, the entropy router, triple
grain, the folded decoder upsamplers and a short training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import repeat

import dqfast
from dqfast.models import create
from dqfast.models.dqvae import DQVAE, DQTokens, EntropyRouter, region_entropy
from dqfast.nn import SubPixelConv2d
from tests.helpers import seed


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(batch: int = 2, side: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Smooth random images in [0, 1] with a noisy patch, so regions differ in detail."""
    g = generator if generator is not None else seed(0)
    x = F.interpolate(torch.rand(batch, 3, 4, 4, generator=g), size=side, mode="bilinear", align_corners=False)
    x[:, :, : side // 2, : side // 2] += 0.3 * torch.rand(batch, 3, side // 2, side // 2, generator=g)
    return x.clamp(0, 1)


def expected_counts(fractions, regions: int) -> list[int]:
    """Regions per grain above the coarsest (finest first) by cumulative rounding, computed here."""
    fractions = [fractions] if isinstance(fractions, float) else list(fractions)
    counts, previous, total = [], 0, 0.0
    for f in fractions:
        total += f
        cumulative = min(math.floor(total * regions + 0.5), regions)
        counts.append(cumulative - previous)
        previous = cumulative
    return counts


# ----------------------------------------------------------------------------------------------
# Shapes and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, grid, latent", [("dqvae-tiny", 4, 8), ("dqvae-triple-tiny", 4, 16), ("dqvae-entropy", 4, 8)]
)
def test_shapes(name, grid, latent):
    seed(0)
    overrides = {}
    if name == "dqvae-entropy":  # the entropy preset at tiny size
        overrides = dict(
            resolution=32, ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(), mid_attn=False
        )
        overrides.update(z_channels=16, embed_dim=16, codebook_size=64)
    model = create(name, **overrides).eval()
    x = images(3)
    out = model(x)
    G = model.num_grains
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (3, latent, latent) and out.indices.dtype == torch.int64
    assert out.grain.shape == (3, grid, grid) and out.grain.dtype == torch.int64
    assert out.router_scores.shape == (3, grid, grid, G)
    assert int(out.grain.min()) >= 0 and int(out.grain.max()) < G
    assert torch.equal(out.n_codes, (4**out.grain).sum((1, 2)))
    assert out.quant_loss.dim() == 0 and torch.isfinite(out.quant_loss)
    # Every region's codes are its own: a coarse region's cells of the finest grid share one code.
    for g in range(G):
        side = latent // grid // 2**g
        blocks = repeat(out.indices[:, ::side, ::side], "b h w -> b (h s1) (w s2)", s1=side, s2=side)
        mask = repeat(out.grain == g, "b h w -> b (h s1) (w s2)", s1=latent // grid, s2=latent // grid)
        assert torch.equal(out.indices[mask], blocks[mask])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("dqvae-tiny", {}),
        ("dqvae-tiny", {"ema": False}),
        ("dqvae-triple-tiny", {}),
        ("dqvae-tiny", {"router": "entropy", "train_budget": 0.5}),
    ],
)
def test_gradients_reach_every_parameter(name, overrides):
    """In training mode (hard Gumbel gate for the feature router) every parameter gets a gradient,
    the router's included; with ``ema=False`` the codebook is a parameter and gets one too."""
    seed(0)
    model = create(name, **overrides).train()
    loss, logs = model.training_step({"image": images(2)})
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []
    if overrides.get("router", "feature") == "feature":
        assert any(n.startswith("quantizer.router.") for n, _ in model.named_parameters())
    if overrides.get("ema") is False:
        assert isinstance(model.codebook, torch.nn.Parameter)
    for key in ("loss", "l1", "psnr", "fine_ratio", "codes_per_image"):
        assert isinstance(logs[key], float) and math.isfinite(logs[key])


# ----------------------------------------------------------------------------------------------
# Budgets, encode / decode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["feature", "entropy"])
@pytest.mark.parametrize("budget", [0.0, 0.3, 0.5, 1.0])
def test_budget_is_exact_per_image(router, budget):
    seed(1)
    model = create("dqvae-tiny", router=router).eval()
    x = images(4, generator=seed(2))
    tokens = model.encode(x, budget=budget)
    fine = expected_counts(budget, 16)[0]
    assert ((tokens.grain == 1).sum((1, 2)) == fine).all()
    assert (tokens.n_codes == 16 - fine + 4 * fine).all()
    # forward agrees with encode on the budget
    assert torch.equal(model(x, budget=budget).grain, tokens.grain)


@pytest.mark.parametrize("router", ["feature", "entropy"])
@pytest.mark.parametrize("budget", [(0.3, 0.3), (0.25, 0.5), (0.0, 1.0)])
def test_triple_grain_budget_is_exact_per_image(router, budget):
    seed(3)
    model = create("dqvae-triple-tiny", router=router).eval()
    tokens = model.encode(images(3), budget=budget)
    n_fine, n_medium = expected_counts(budget, 16)
    assert ((tokens.grain == 2).sum((1, 2)) == n_fine).all()
    assert ((tokens.grain == 1).sum((1, 2)) == n_medium).all()
    assert (tokens.n_codes == (16 - n_fine - n_medium) + 4 * n_medium + 16 * n_fine).all()
    # The c2f order of three grains round-trips.
    indices, grain = dqfast.c2f_unflatten(tokens.c2f())
    assert torch.equal(indices, tokens.indices) and torch.equal(grain, tokens.grain)


def test_decode_of_encode_matches_forward():
    seed(4)
    model = create("dqvae-tiny").eval()
    x = images(2)
    tokens = model.encode(x, budget=0.5)
    assert isinstance(tokens, DQTokens)
    image = model.decode(tokens)
    assert image.shape == x.shape
    expected = model(x, budget=0.5).reconstruction
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=1e-5)
    # The coarse-to-fine sequence of a generator decodes to the same image.
    torch.testing.assert_close(model.decode(tokens.c2f()), image, atol=0, rtol=0)


def test_decode_of_cosine_codes_matches_forward():
    seed(5)
    model = create("dqvae-tiny", metric="cosine", ema=False).eval()
    x = images(2)
    torch.testing.assert_close(model.decode(model.encode(x)), model(x).reconstruction, atol=1e-5, rtol=1e-5)


def test_encode_is_deterministic_in_training_mode():
    """encode tokenises with the argmax router and leaves the codebook and the mode untouched."""
    seed(6)
    model = create("dqvae-tiny").train()
    x = images(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = model.encode(x)
    second = model.encode(x)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(first.indices, second.indices) and torch.equal(first.grain, second.grain)
    eval_tokens = model.eval().encode(x)
    assert torch.equal(first.grain, eval_tokens.grain) and torch.equal(first.indices, eval_tokens.indices)
    assert torch.equal(first.grain, model(x).grain)


def test_encode_switches_only_mode_dependent_modules():
    """With dropout > 0 in training mode, encode still tokenises like eval mode; only the quantizer
    and the dropout layers are switched (and restored), and nothing at all in eval mode."""
    seed(6)
    model = create("dqvae-tiny", dropout=0.5).train()
    x = images(2)
    switched = model._mode_dependent()
    assert model.quantizer in switched
    assert {type(m) for m in switched} == {type(model.quantizer), torch.nn.Dropout}
    assert len(switched) < len(list(model.modules())) // 4
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.training)) for m in switched]
    first, second = model.encode(x), model.encode(x)
    assert seen and not any(seen)  # every mode-dependent module ran in eval mode
    assert all(m.training for m in model.modules())  # and every module is back in training mode
    assert torch.equal(first.indices, second.indices)
    for hook in hooks:
        hook.remove()
    model.eval()
    eval_tokens = model.encode(x)
    assert torch.equal(first.indices, eval_tokens.indices) and torch.equal(first.grain, eval_tokens.grain)
    # Nothing is switched in eval mode (the tokens above are from an untouched model).
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------------------------
# Entropy router
# ----------------------------------------------------------------------------------------------


def numpy_region_entropy(image: np.ndarray, grid: int, bins: int = 32) -> np.ndarray:
    """Independent formulation: numpy histograms over the image's own min..max."""
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    lo, hi = float(gray.min()), float(gray.max())
    side = gray.shape[0] // grid
    out = np.zeros((grid, grid))
    for i in range(grid):
        for j in range(grid):
            patch = gray[i * side : (i + 1) * side, j * side : (j + 1) * side]
            counts, _ = np.histogram(patch, bins=bins, range=(lo, hi) if hi > lo else (lo, lo + 1))
            p = counts[counts > 0] / patch.size
            out[i, j] = -(p * np.log2(p)).sum()
    return out


def test_region_entropy_matches_numpy_histograms():
    g = seed(7)
    # Gray values at bin centres of the image's range, so float rounding cannot move a bin edge.
    levels = torch.randint(0, 32, (2, 32, 32), generator=g).double()
    levels[:, 0, 0], levels[:, 0, 1] = 0, 31  # the range is exactly 32 bins wide
    gray = -0.7 + 0.05 * (levels + 0.5)
    gray[:, 0, 0], gray[:, 0, 1] = -0.7, -0.7 + 0.05 * 32
    gray[:, 8:16, 8:24] = 0.1  # flat regions
    x = repeat(gray, "b h w -> b c h w", c=3).float()
    ours = region_entropy(x, (4, 4))
    for b in range(2):
        np.testing.assert_allclose(ours[b].numpy(), numpy_region_entropy(x[b].double().numpy(), 4), atol=1e-5)
    assert (ours[:, 1, 1:3] == 0).all()


def test_entropy_bins_cover_the_actual_value_range():
    """A low-contrast image in [0.5, 0.5 + 8/1000) and the same image mapped to [-3, 1]: 8 equally
    frequent gray levels give 3 bits in the textured region in both. Bins over a fixed [0, 1] range
    would put the 8 levels of the first image in one bin (0 bits) and drop the second's negative
    values."""
    levels = torch.arange(64).remainder(8).reshape(8, 8).double()  # 8 levels, 8 pixels each
    gray = torch.zeros(16, 16, dtype=torch.float64)
    gray[:8, :8] = levels
    gray[8:, 8:] = 7.0  # the image's other values: flat
    for lo, step in ((0.5, 0.001), (-3.0, 4.0 / 7)):
        x = repeat(lo + step * gray, "h w -> 1 c h w", c=3).float()
        e = region_entropy(x, (2, 2))
        torch.testing.assert_close(e[0, 0, 0], torch.tensor(3.0), atol=1e-5, rtol=0)
        assert (e[0].flatten()[1:] == 0).all()


def test_entropy_is_invariant_to_affine_value_maps():
    g = seed(8)
    levels = torch.randint(0, 32, (1, 1, 32, 32), generator=g).float()
    levels[..., 0, 0], levels[..., 0, 1] = 0, 31
    x = (levels + 0.5) / 32
    y = 4.0 * x - 1.5  # bin centres map to bin centres of the new range
    torch.testing.assert_close(region_entropy(x, (4, 4)), region_entropy(y, (4, 4)), atol=1e-5, rtol=0)


def test_entropy_router_thresholds_and_calibration():
    router = EntropyRouter(2, thresholds=[1.5])
    levels = torch.arange(256).remainder(4).reshape(16, 16).float()  # 4 levels: 2 bits
    gray = torch.zeros(32, 32)
    gray[:16, :16] = levels / 3  # one textured region out of four, range [0, 1]
    x = repeat(gray, "h w -> 1 c h w", c=3)
    grain, scores = router(x, (2, 2))
    assert grain.tolist() == [[[1, 0], [0, 0]]]
    torch.testing.assert_close(scores[0, 0, 0], torch.tensor([0.0, 2.0]))
    router.thresholds.fill_(2.5)
    assert int(router(x, (2, 2))[0].sum()) == 0

    g = seed(9)
    entropy = torch.rand(1000, generator=g) * 5
    router.calibrate(entropy, 0.3)
    assert abs(float((entropy > router.thresholds[0]).float().mean()) - 0.3) < 0.01
    triple = EntropyRouter(3)
    triple.calibrate(entropy, (0.2, 0.3))
    lo, hi = triple.thresholds.tolist()
    assert lo < hi
    assert abs(float((entropy > hi).float().mean()) - 0.2) < 0.01
    assert abs(float(((entropy > lo) & (entropy <= hi)).float().mean()) - 0.3) < 0.01


def test_entropy_model_codes_textured_regions_fine():
    seed(10)
    model = create("dqvae-tiny", router="entropy", entropy_thresholds=[1.0]).eval()
    x = torch.full((1, 3, 32, 32), 0.5)
    x[:, :, 8:16, 16:24] = torch.rand(1, 3, 8, 8, generator=seed(11))
    tokens = model.encode(x)
    expected = torch.zeros(1, 4, 4, dtype=torch.int64)
    expected[0, 1, 2] = 1
    assert torch.equal(tokens.grain, expected)
    model.calibrate_entropy_thresholds(images(4), 0.5)
    assert model.encode(images(4)).grain.float().mean().item() == pytest.approx(0.5, abs=0.15)


# ----------------------------------------------------------------------------------------------
# Decoder upsamplers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dqvae-tiny", "dqvae-triple-tiny"])
def test_folded_upsamplers_equal_nearest_upsample_conv(name):
    seed(12)
    model = create(name).eval()
    upsamplers = list(model.decoder.upsamples)
    assert len(upsamplers) == int(math.log2(32 // model.latent_size))
    # The decoder holds no other upsampling: every x2 step is one of these modules.
    assert sum(isinstance(m, SubPixelConv2d) for m in model.modules()) == len(upsamplers)
    with dqfast.use_backend("reference"):
        for module in upsamplers:
            assert isinstance(module, SubPixelConv2d) and module.folded_from == (3, 2)
            with torch.no_grad():
                module.weight.normal_()
                module.bias.normal_()
            x = torch.randn(2, module.in_channels, 5, 6, dtype=torch.float64)
            module = module.double()
            expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), module.weight, module.bias, padding=1)
            torch.testing.assert_close(module(x), expected, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Configuration, presets, bad input
# ----------------------------------------------------------------------------------------------


def test_paper_preset_configuration():
    with torch.device("meta"):
        model = create("dqvae")
    assert (model.grid_size, model.latent_size, model.resolution) == (16, 32, 256)
    assert tuple(model.codebook.shape) == (1024, 256)
    assert model.router_kind == "feature" and model.num_grains == 2
    assert len(model.decoder.upsamples) == 3  # 32 -> 256
    n = sum(p.numel() for p in model.parameters())
    assert 30e6 < n < 80e6


def test_bad_input():
    seed(13)
    model = create("dqvae-tiny").eval()
    with pytest.raises(ValueError, match="32x32"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="indices"):
        model.decode(DQTokens(torch.zeros(1, 4, 4, dtype=torch.int64), torch.zeros(1, 4, 4), torch.ones(1)))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(DQTokens(torch.full((1, 8, 8), 64), torch.zeros(1, 4, 4), torch.ones(1)))
    with pytest.raises(ValueError, match="budget"):
        model.encode(images(1), budget=1.5)
    with pytest.raises(ValueError, match="router"):
        DQVAE(router="pooling")
    with pytest.raises(ValueError, match="num_grains"):
        create("dqvae-tiny", num_grains=5)
    with pytest.raises(ValueError, match="ascending"):
        EntropyRouter(3, thresholds=[2.0, 1.0])
    with pytest.raises(ValueError, match="router='entropy'"):
        model.calibrate_entropy_thresholds(images(1), 0.5)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def test_learns_to_reconstruct_fixed_crops():
    """150 Adam steps on 4 fixed 32x32 crops: the loss falls below half its start and the
    reconstruction error below a third, with the fine ratio held near the 0.5 target."""
    seed(14)
    model = create("dqvae-tiny").train()
    x = images(4, generator=seed(15))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(150):
        loss, logs = model.training_step({"image": x})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(logs)
    first, last = history[0], history[-10:]
    final_loss = sum(h["loss"] for h in last) / len(last)
    final_l1 = sum(h["l1"] for h in last) / len(last)
    assert final_loss < 0.5 * first["loss"], (first, history[-1])
    assert final_l1 < first["l1"] / 3, (first, history[-1])
    assert abs(sum(h["fine_ratio"] for h in last) / len(last) - 0.5) < 0.2
    model.eval()
    with torch.no_grad():
        error = (model.decode(model.encode(x, budget=0.5)) - x).abs().mean().item()
    assert error < first["l1"] / 3


# ----------------------------------------------------------------------------------------------
# Decoding windows across tile borders (what the codec's blending decodes)
# ----------------------------------------------------------------------------------------------


def test_position_embedding_is_periodic_over_tiles():
    model = create("dqvae-tiny").eval()
    f, C = model.latent_size, model.post_quant_conv.out_channels
    with torch.no_grad():
        model.position.row.normal_()
        model.position.col.normal_()
        table = model.position(torch.zeros(1, C, f, f))[0]  # the embedding of one tile
        tiled = repeat(table, "c h w -> c (a h) (b w)", a=3, b=3)
        for r0, c0 in [(0, 0), (2, 6), (f // 2, f // 2), (f - 2, 1), (f + 3, 2 * f - 1)]:
            window = model.position(torch.zeros(1, C, f, f), (r0, c0))[0]
            torch.testing.assert_close(window, tiled[:, r0 % f : r0 % f + f, c0 % f : c0 % f + f], rtol=0, atol=0)
        # Any window size: a 2 x 3 tile latent reads the same periodic table.
        big = model.position(torch.zeros(1, C, 2 * f, 3 * f))[0]
        torch.testing.assert_close(big, tiled[:, : 2 * f, : 3 * f], rtol=0, atol=0)


def test_window_training_step_decodes_a_window_of_independently_coded_tiles():
    model = create("dqvae-tiny").eval()  # eval: deterministic routing, no codebook update
    R, f = model.resolution, model.latent_size
    x = images(2, 2 * R, seed(3))
    seen = set()
    for trial in range(6):
        torch.manual_seed(trial)
        out, target = model._window_step(x, model.train_budget)
        # Which window: the target is the image under it (found by search, not by the code's formula).
        stride = R // f
        hits = [
            (r, c)
            for r in range(f + 1)
            for c in range(f + 1)
            if torch.equal(target, x[:, :, r * stride : r * stride + R, c * stride : c * stride + R])
        ]
        assert len(hits) == 1
        r0, c0 = hits[0]
        assert r0 % 2 == 0 and c0 % 2 == 0  # whole coarse regions
        seen.add((r0, c0))
        # The tiles coded alone, their code map cut at the window, decoded with its offset.
        tiles = torch.stack([x[:, :, i : i + R, j : j + R] for i in (0, R) for j in (0, R)], 1).flatten(0, 1)
        tokens = model.encode(tiles, budget=model.train_budget)
        codes = tokens.indices.reshape(2, 2, 2, f, f).permute(0, 1, 3, 2, 4).reshape(2, 2 * f, 2 * f)
        window = codes[:, r0 : r0 + f, c0 : c0 + f]
        grain = torch.zeros(2, 1, 1, dtype=torch.int64)
        with torch.no_grad():
            expected = model.decode((window, grain, grain[:, 0, 0]), offset=(r0, c0))
        torch.testing.assert_close(out.reconstruction.detach(), expected, rtol=1e-5, atol=1e-5)
        assert out.indices.shape[0] == 8  # every tile coded
    assert len(seen) > 1  # the offset is drawn, not fixed


def test_training_step_takes_whole_tiles_only():
    model = create("dqvae-tiny")
    for shape in [(2, 3, 48, 48), (2, 3, 64, 32), (3, 32, 32)]:
        with pytest.raises(ValueError, match="multiple of 32"):
            model.training_step({"image": torch.rand(shape)})
    loss, logs = model.training_step({"image": images(2, 64)})
    loss.backward()
    assert math.isfinite(logs["psnr"])
    assert all(p.grad is not None for p in model.decoder.parameters())


@pytest.mark.parametrize("name", ["dqvae-tiny", "dqvae-triple-tiny"])
def test_random_train_budget_covers_router_and_exact_budgets(name):
    model = create(name, train_budget="random")
    torch.manual_seed(0)
    draws = [model._draw_train_budget() for _ in range(200)]
    exact = [b for b in draws if b is not None]
    assert 60 < len(exact) < 140  # about half the steps let the router decide
    G = model.num_grains
    values = [b if G == 2 else sum(b) for b in exact]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert min(values) < 0.2 and max(values) > 0.8  # the whole range, not one point
    if G > 2:
        assert all(len(b) == G - 1 for b in exact)
    # A training step with a drawn budget runs and trains.
    torch.manual_seed(3)
    loss, logs = model.training_step({"image": images(2, 2 * model.resolution)})
    loss.backward()
    assert math.isfinite(logs["loss"])
    with pytest.raises(ValueError, match="train_budget"):
        create(name, train_budget="sometimes")
