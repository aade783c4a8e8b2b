"""The shipped pretrained models, the sample-image split and the codec demo.

Every check runs on held-out images (``dqfast.sample_data.HELD_OUT``), cropped small so the file
stays fast on a CPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

import dqfast
from dqfast.codec import decode, encode, model_fingerprint
from dqfast.codec.cli import to_uint8
from dqfast.codec.evaluate import psnr
from dqfast.models import available, create
from dqfast.models.registry import WEIGHTS_DIR, weights_path
from dqfast.sample_data import HELD_OUT, SPLITS, TRAIN, export_images, load_sample, load_sample_array

SHIPPED = ("cae-small", "dqvae-small")  # the codec's models
GENERATOR, TOKENIZER = "dqtransformer-small", "dqvae-small"  # the generator and the codes it models
ALL_SHIPPED = (*SHIPPED, GENERATOR)

# model_fingerprint of each shipped weights file (hex). A retrained model changes them on purpose;
# anything else changing them (a state_dict key renamed, a buffer added) breaks old files.
FINGERPRINTS = {
    "cae-small": "291b22b0243f0f52",
    "dqvae-small": "b91e133844eb41c0",
    "dqtransformer-small": "4fe6ab00776f72f1",
}

# The shipped CAE's checks on images it never saw (values measured with the shipped weights; see
# README.md "Shipped models"). Colour chart: mean shift of the flat patches per channel, at a
# quality whose file is >= 0.5 bpp; gradient: PSNR at a quality whose file is <= 1 bpp.
CHART_QUALITIES = (3.0, 4.0)
CHART_SHIFT = 2.0
CHART_MAX_SHIFT = 4.0
GRADIENT_QUALITY = 1.0
GRADIENT_PSNR = 30.0
# The whole ladder on a held-out crop: rate and PSNR rise with quality; measured ends.
LADDER_QUALITIES = (0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
LADDER_LOW_BPP = 0.2
LADDER_HIGH_BPP = 1.5
# Ladder points whose files fall in 0.15-1 bpp on the held-out photos, and the least mean PSNR gap
# to JPEG at the same file size they must keep.
JPEG_QUALITIES = (0.1, 1.0, 2.0, 3.0, 4.0)
JPEG_MARGIN_DB = 0.5


def _crop(name: str, height: int, width: int) -> torch.Tensor:
    """The central (3, height, width) of a held-out sample, as the codec sees an 8-bit file."""
    x = load_sample(name)
    H, W = x.shape[1:]
    top, left = (H - height) // 2, (W - width) // 2
    return x[:, top : top + height, left : left + width].contiguous()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: create(name, pretrained=True) for name in ALL_SHIPPED}


# ----------------------------------------------------------------------------------------------
# Sample data
# ----------------------------------------------------------------------------------------------


def test_split_is_disjoint_and_covers_held_out_photographs():
    assert not set(TRAIN) & set(HELD_OUT)
    assert len(HELD_OUT) >= 2 and len(TRAIN) >= 5
    assert len(set(TRAIN)) == len(TRAIN) and len(set(HELD_OUT)) == len(HELD_OUT)
    assert SPLITS == {"train": TRAIN, "held-out": HELD_OUT}
    for name in HELD_OUT:
        array = load_sample_array(name)
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
        # A photograph, not a flat or synthetic picture: many distinct colours.
        assert len(np.unique(array.reshape(-1, 3), axis=0)) > 10_000


def test_export_writes_the_exact_pixels(tmp_path):
    paths = export_images("held-out", tmp_path)
    assert [p.stem for p in paths] == list(HELD_OUT)
    for path in paths:
        with Image.open(path) as img:
            written = np.array(img.convert("RGB"))
        np.testing.assert_array_equal(written, load_sample_array(path.stem))
        x = load_sample(path.stem)
        assert x.dtype == torch.float32 and x.shape == (3, *written.shape[:2])
        torch.testing.assert_close(x, torch.from_numpy(written).permute(2, 0, 1).float() / 255, rtol=0, atol=0)


def test_unknown_sample_and_split_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown sample image"):
        load_sample("lena")
    with pytest.raises(ValueError, match="split"):
        export_images("validation", tmp_path)


# ----------------------------------------------------------------------------------------------
# Shipped weights
# ----------------------------------------------------------------------------------------------


def test_every_shipped_preset_loads_without_download(models):
    assert set(ALL_SHIPPED) <= set(available(pretrained=True))
    total = sum(weights_path(name).stat().st_size for name in ALL_SHIPPED)
    assert total <= 10 * 2**20, f"shipped weights take {total} bytes, over 10 MB"
    for name, model in models.items():
        assert not model.training
        # The file holds exactly the preset's state: a fresh preset has the same keys and shapes.
        fresh = create(name).state_dict()
        loaded = model.state_dict()
        assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in loaded.items()}
        # And trained values, not the fresh initialisation.
        assert any(not torch.equal(fresh[k], loaded[k]) for k in fresh)
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    for name in ALL_SHIPPED:
        entry = manifest[name]
        assert entry["preset"] == name
        assert entry["last_log"]["loss"] < entry["first_log"]["loss"]


def test_weights_fingerprints_are_stable(models):
    for name, model in models.items():
        assert model_fingerprint(model).hex() == FINGERPRINTS[name], name
        assert model_fingerprint(create(name, pretrained=True)) == model_fingerprint(model)


def test_pretrained_rejects_overrides():
    with pytest.raises(ValueError, match="overrides"):
        create("cae-small", pretrained=True, lmbdas=(0.01,))


# ----------------------------------------------------------------------------------------------
# Codec round trips on a held-out image
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_held_out_round_trip_is_exact(models, name):
    model = models[name]
    x = _crop(HELD_OUT[1], 100, 90)  # sides that are not multiples of the tile or of 8
    rate = {"budget": 0.5} if name.startswith("dqvae") else {"quality": 3.0}
    first = encode(model, x, name=name, **rate)
    assert encode(model, x, name=name, **rate).data == first.data
    image1, header = decode(first.data, model, name=name)
    image2, _ = decode(first.data, model, name=name)
    assert image1.shape == (3, 100, 90) and header.image_size == (100, 90)
    assert torch.equal(image1, image2)
    # Entropy coding is lossless: the file decodes to what the network makes of the encoder's symbols
    # (the DQ-VAE's tiles decoded once each, without the border blending).
    with torch.no_grad():
        if name.startswith("dqvae"):
            from dqfast.codec.dq_codec import decompress_dq

            image1 = decompress_dq(first.data, model, name=name, blend=False)
            padded = F.pad(x[None], (0, 128 - 90, 0, 128 - 100), mode="replicate")
            tiles = rearrange(padded, "1 c (nh r) (nw s) -> (nh nw) c r s", r=64, s=64)
            direct = model.decode(model.encode(tiles, budget=0.5))
            direct = rearrange(direct, "(nh nw) c r s -> c (nh r) (nw s)", nh=2)[:, :100, :90].clamp(0, 1)
        else:
            z, symbols, _ = model.compress_symbols(x[None], 3.0)
            direct = model.decompress_symbols(z, symbols, 3.0, (100, 90))[0]
    torch.testing.assert_close(image1, direct, rtol=0, atol=1e-5)


@pytest.mark.parametrize("budget", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_dqvae_meets_the_budget_exactly(models, budget):
    model = models["dqvae-small"]
    x = _crop(HELD_OUT[0], 128, 192)  # 2 x 3 tiles of 64 x 64
    regions = model.grid_size**2
    fine = round(budget * regions)
    result = encode(model, x, budget=budget, name="dqvae-small")
    coarse_count, fine_count = result.header.params
    assert (coarse_count, fine_count) == (6 * (regions - fine), 6 * fine)
    # Per tile, not only in total: tokenize the tiles directly.
    tiles = torch.stack([x[:, i : i + 64, j : j + 64] for i in (0, 64) for j in (0, 64, 128)])
    tokens = model.encode(tiles, budget=budget)
    assert (tokens.grain == 1).sum((1, 2)).tolist() == [fine] * 6
    assert tokens.n_codes.tolist() == [regions - fine + 4 * fine] * 6
    decoded, _ = decode(result.data, model, name="dqvae-small")
    assert decoded.shape == x.shape


def test_dqvae_spends_more_bits_and_gains_quality_with_budget(models):
    model = models["dqvae-small"]
    x = _crop(HELD_OUT[0], 128, 128)
    low = encode(model, x, budget=0.0, name="dqvae-small")
    high = encode(model, x, budget=1.0, name="dqvae-small")
    assert high.bpp > 2.5 * low.bpp
    psnr_low = psnr(to_uint8(x), to_uint8(decode(low.data, model, name="dqvae-small")[0]))
    psnr_high = psnr(to_uint8(x), to_uint8(decode(high.data, model, name="dqvae-small")[0]))
    assert psnr_high > psnr_low + 0.5


def _phase_gradient_ratio(image: torch.Tensor, tile: int) -> float:
    """Largest mean absolute step (8-bit levels) at one position modulo the tile, over the mean of
    all positions, across rows and columns: a seam on the tile grid or a streak anywhere else in
    the tile shows as one position whose steps stand out."""
    g = image.float() * 255
    ratios = []
    for steps in ((g[:, :, 1:] - g[:, :, :-1]).abs().mean((0, 1)), (g[:, 1:, :] - g[:, :-1, :]).abs().mean((0, 2))):
        by_phase = torch.stack([steps[p::tile].mean() for p in range(tile)])
        ratios.append(float((by_phase / by_phase.mean()).max()))
    return max(ratios)


def test_dqvae_decodes_without_seams_or_streaks(models):
    """The codec's blended decode of a held-out photo shows no tile grid and no streak at any other
    position of the tile, and hiding the borders costs no PSNR (the decoder was trained on windows
    across tile borders); the tiles decoded alone show their borders, so the check can fail."""
    from dqfast.codec.dq_codec import decompress_dq

    model = models["dqvae-small"]
    x = load_sample(HELD_OUT[0])  # 512 x 512: 8 x 8 tiles
    data = encode(model, x, budget=0.5, name="dqvae-small").data
    blended = decompress_dq(data, model, name="dqvae-small")
    tiles = decompress_dq(data, model, name="dqvae-small", blend=False)
    R = model.resolution
    assert _phase_gradient_ratio(x, R) < 1.3
    assert _phase_gradient_ratio(tiles, R) > 3.0
    assert _phase_gradient_ratio(blended, R) <= 1.5
    assert psnr(to_uint8(x), to_uint8(blended)) >= psnr(to_uint8(x), to_uint8(tiles)) - 0.1


def test_code_frequencies_prior_beats_uniform(models):
    """The counted prior codes held-out codes in fewer bits than the uniform prior over the codebook."""
    model = models["dqvae-small"]
    freq = model.code_frequencies
    assert freq.min() >= 1 and freq.sum() > 2 * freq.numel()  # counted, with one count of smoothing
    x = _crop(HELD_OUT[1], 128, 128)
    counted = encode(model, x, budget=0.5, name="dqvae-small")
    uniform_model = create("dqvae-small", pretrained=True)
    uniform_model.code_frequencies.fill_(1.0)
    uniform = encode(uniform_model, x, budget=0.5, name="dqvae-small")
    assert counted.estimated_bits < uniform.estimated_bits
    assert len(counted.data) < len(uniform.data)


# ----------------------------------------------------------------------------------------------
# The shipped CAE on images it never saw: colour, smooth gradients, the rate ladder, JPEG
# ----------------------------------------------------------------------------------------------

# Flat patches of saturated, muted, skin, dark and grey colours (teal, olive and greens included:
# the hues an under-trained codec shifted).
CHART_COLORS = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
    (0, 128, 128), (128, 128, 0), (0, 100, 0), (230, 180, 140), (90, 60, 40), (20, 20, 20),
    (235, 235, 235), (128, 128, 128), (255, 128, 0), (128, 0, 255), (30, 144, 255), (220, 20, 60),
    (46, 139, 87), (75, 0, 130), (255, 215, 0), (0, 206, 209), (139, 69, 19), (60, 60, 120),
)  # fmt: skip
PATCH = 40


def _chart() -> np.ndarray:
    """(4·40, 6·40, 3) uint8: the CHART_COLORS as 40x40 patches, 6 per row."""
    image = np.zeros((4 * PATCH, 6 * PATCH, 3), np.uint8)
    for i, color in enumerate(CHART_COLORS):
        r, c = divmod(i, 6)
        image[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = color
    return image


def _gradient(height: int = 157, width: int = 203) -> np.ndarray:
    """A smooth synthetic colour gradient (the image the old shipped CAE coded at 17.6 dB)."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    channels = np.broadcast_arrays(40 + 180 * x + 20 * y, 30 + 150 * y + 0 * x, 200 - 120 * x * y)
    return np.clip(np.round(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def _code(model, pixels: np.ndarray, quality: float) -> tuple[float, np.ndarray]:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    result = encode(model, x, quality=quality, name="cae-small")
    return result.bpp, to_uint8(decode(result.data, model, name="cae-small")[0])


@pytest.mark.parametrize("quality", CHART_QUALITIES)
def test_cae_keeps_colours(models, quality):
    """Mean colour of every flat patch within CHART_SHIFT levels per channel (inner 24x24 of each patch)."""
    bpp, out = _code(models["cae-small"], _chart(), quality)
    shifts = []
    for i, color in enumerate(CHART_COLORS):
        r, c = divmod(i, 6)
        inner = out[r * PATCH + 8 : (r + 1) * PATCH - 8, c * PATCH + 8 : (c + 1) * PATCH - 8]
        shifts.append(np.abs(inner.reshape(-1, 3).mean(0) - np.array(color)))
    mean_shift = np.mean(shifts, axis=0)
    assert bpp >= 0.5 and (mean_shift < CHART_SHIFT).all(), (bpp, mean_shift.round(2))
    assert np.max(shifts) < CHART_MAX_SHIFT, np.max(shifts)


def test_cae_codes_a_smooth_gradient(models):
    bpp, out = _code(models["cae-small"], _gradient(), GRADIENT_QUALITY)
    value = psnr(_gradient(), out)
    assert bpp <= 1.0 and value >= GRADIENT_PSNR, (bpp, value)


def test_cae_ladder_is_monotone(models):
    """Rate and PSNR rise with quality over the whole ladder, on a held-out photo."""
    model = models["cae-small"]
    pixels = to_uint8(_crop(HELD_OUT[1], 192, 256))
    points = [_code(model, pixels, q) for q in LADDER_QUALITIES]
    rates = [bpp for bpp, _ in points]
    quality = [psnr(pixels, out) for _, out in points]
    assert rates == sorted(rates) and len(set(rates)) == len(rates), rates
    assert quality == sorted(quality), quality
    assert rates[0] <= LADDER_LOW_BPP and rates[-1] >= LADDER_HIGH_BPP, rates


def test_cae_beats_jpeg_on_held_out_photos(models):
    """At every ladder point in 0.15-1 bpp: PSNR above JPEG's at the nearest file size (mean over photos)."""
    from dqfast.codec.evaluate import _decode, jpeg_at_bpp

    model = models["cae-small"]
    for q in JPEG_QUALITIES:
        gaps = []
        for name in HELD_OUT:
            pixels = load_sample_array(name)
            bpp, out = _code(model, pixels, q)
            data, _ = jpeg_at_bpp(pixels, bpp)
            jpeg_bpp = len(data) * 8 / (pixels.shape[0] * pixels.shape[1])
            # JPEG's nearest size may land above the target: that only favours JPEG.
            assert jpeg_bpp >= 0.95 * bpp, (name, q, bpp, jpeg_bpp)
            gaps.append(psnr(pixels, out) - psnr(pixels, _decode(data)))
        assert np.mean(gaps) >= JPEG_MARGIN_DB, (q, gaps)


# ----------------------------------------------------------------------------------------------
# The DQ-Transformer over dqvae-small codes
# ----------------------------------------------------------------------------------------------

# Held-out loss (content CE + mean position CE, nats per token) on the 8 tiles of _held_out_tokens.
# Measured: shipped 4.65 (content CE 3.93), untrained preset 10.45 for seeds 0, 1, 2 (content CE 5.57,
# about ln 259). The trained model must win by 4 nats of the 5.8; its content CE must beat the
# static code-frequency prior of dqvae-small (5.25 nats per code on these tiles) by 0.5 nat.
HELD_OUT_LOSS_MARGIN = 4.0
CONTENT_CE_MARGIN = 0.5


def _held_out_tiles() -> torch.Tensor:
    """(8, 3, 64, 64): the central 128x128 of each held-out photograph cut into four 64x64 tiles."""
    crops = [_crop(name, 128, 128) for name in HELD_OUT]
    return torch.cat([rearrange(c, "c (nh r) (nw s) -> (nh nw) c r s", r=64, s=64) for c in crops])


def _check_valid_tokens(tokens, grid: int, codebook_size: int) -> None:
    """Every sample is a valid dual-grain code map, checked cell by cell against its coarse positions."""
    assert tokens.grid_size == (grid, grid) and len(tokens.codes) == 2
    for b in range(tokens.lengths.shape[0]):
        n_coarse, n_fine = tokens.lengths[b].tolist()
        coarse = tokens.positions[0][b, :n_coarse].tolist()
        fine = tokens.positions[1][b, :n_fine].tolist()
        # Coarse regions: distinct, in the grid, in raster order.
        assert coarse == sorted(set(coarse)) and all(0 <= p < grid * grid for p in coarse)
        # Fine cells: exactly the four children of every region not coded coarse, row-first.
        regions = [r for r in range(grid * grid) if r not in set(coarse)]
        children = [
            (2 * (r // grid) + dy) * 2 * grid + 2 * (r % grid) + dx for r in regions for dy in (0, 1) for dx in (0, 1)
        ]
        assert fine == sorted(children)
        for g, n in ((0, n_coarse), (1, n_fine)):
            codes = tokens.codes[g][b]
            assert ((codes[:n] >= 0) & (codes[:n] < codebook_size)).all()
            assert (codes[n:] == -1).all() and (tokens.positions[g][b, n:] == -1).all()
    _, grain = dqfast.c2f_unflatten(tokens)
    for b in range(tokens.lengths.shape[0]):
        expected = torch.ones(grid * grid, dtype=grain.dtype)
        expected[tokens.positions[0][b, : tokens.lengths[b, 0]]] = 0
        assert torch.equal(grain[b].flatten(), expected)


def test_training_command_resolves_the_shipped_tokenizer(tmp_path):
    """The shipped command's glue: ``--tokenizer dqvae-small`` loads the shipped weights and, with no
    ``--crop``, the crops take the tokenizer's tile side (64), not the 256 of the paper presets."""
    import argparse

    from dqfast import train

    data = tmp_path / "train"
    data.mkdir()
    for name in TRAIN[:2]:
        Image.fromarray(load_sample_array(name)).save(data / f"{name}.png")
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(
        [
            "dqtransformer",
            "--model",
            GENERATOR,
            "--tokenizer",
            TOKENIZER,
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
        ]
        + ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--log-every", "1", "--device", "cpu"]
    )
    last = train.run(args)
    assert last["step"] == 2 and math.isfinite(last["loss"])
    # The tokenizer it used is the shipped one: it tokenizes like create(TOKENIZER, pretrained=True).
    tokenizer = train._load_tokenizer(TOKENIZER, torch.device("cpu"))
    assert model_fingerprint(tokenizer).hex() == FINGERPRINTS[TOKENIZER]


def test_generator_matches_its_tokenizer_and_manifest(models):
    generator, vae = models[GENERATOR], models[TOKENIZER]
    assert generator.codebook_size == vae.codebook.shape[0]
    assert generator.grid_size == (vae.grid_size, vae.grid_size)
    assert generator.num_classes == 0 and generator.label_embedding is None
    entry = json.loads((WEIGHTS_DIR / "manifest.json").read_text())[GENERATOR]
    assert entry["train_args"]["tokenizer"] == TOKENIZER and entry["train_args"]["overrides"] == []
    assert "--tokenizer dqvae-small" in entry["command"]


def test_generated_tokens_are_valid_and_decode_to_tiles(models):
    generator, vae = models[GENERATOR], models[TOKENIZER]
    tokens = generator.generate(4, generator=torch.Generator().manual_seed(0))
    _check_valid_tokens(tokens, vae.grid_size, vae.codebook.shape[0])
    images = vae.decode(tokens)
    assert images.shape == (4, 3, vae.resolution, vae.resolution) and images.isfinite().all()
    assert len({tuple(c.tolist()) for c in tokens.codes[0]}) == 4  # four different samples
    # The fine fraction it learnt is the tokenizer's (about 0.57 on the held-out tiles); an untrained
    # model stops its increasing run of coarse positions after ~5 regions, over 0.9 fine.
    regions = vae.grid_size**2
    sampled = (tokens.lengths[:, 1] / 4).mean().item() / regions
    encoded = vae.encode(_held_out_tiles()).grain.float().mean().item()
    assert abs(sampled - encoded) < 0.2, (sampled, encoded)


def test_cached_and_uncached_generation_agree(models):
    generator = models[GENERATOR]
    cached = generator.generate(2, generator=torch.Generator().manual_seed(1), use_cache=True)
    uncached = generator.generate(2, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(cached.lengths, uncached.lengths)
    for g in range(2):
        assert torch.equal(cached.codes[g], uncached.codes[g])
        assert torch.equal(cached.positions[g], uncached.positions[g])


def test_generator_beats_untrained_and_code_prior_on_held_out_tokens(models):
    generator, vae = models[GENERATOR], models[TOKENIZER]
    tokens = vae.encode(_held_out_tiles())
    flat = dqfast.c2f_flatten(tokens.indices, tokens.grain)
    torch.manual_seed(0)
    untrained = create(GENERATOR).eval()
    with torch.no_grad():
        loss, parts = generator.loss(flat)
        untrained_loss, _ = untrained.loss(flat)
    assert loss < untrained_loss - HELD_OUT_LOSS_MARGIN, (loss.item(), untrained_loss.item())
    # The counted unigram prior over the codebook, the codec's static model of the same codes.
    freq = vae.code_frequencies
    codes = torch.cat([c[c >= 0] for c in flat.codes])
    prior_ce = -(freq / freq.sum()).log()[codes].mean()
    assert parts["content_ce"] < prior_ce - CONTENT_CE_MARGIN, (parts["content_ce"].item(), prior_ce.item())


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------


def test_codec_demo_rows_and_figure(tmp_path):
    from dqfast.codec.demo import BUDGETS, QUALITIES, format_rows, run_codec_demo

    rows = run_codec_demo(tmp_path, image=HELD_OUT[0], crop=128)
    n = len(BUDGETS)
    assert [r["model"] for r in rows] == ["dqvae-small"] * n + ["dqvae+prior"] * n + ["cae-small"] * len(QUALITIES)
    for static, coded in zip(rows[:n], rows[n : 2 * n]):  # the same codes in a smaller file
        assert coded["psnr"] == static["psnr"] and coded["bytes"] < static["bytes"]
    cae = [r for r in rows if r["model"] == "cae-small"]
    assert [r["bytes"] for r in cae] == sorted(r["bytes"] for r in cae), "the ladder spends more at higher quality"
    for r in rows:
        assert r["bpp"] == pytest.approx(r["bytes"] * 8 / (128 * 128))
        assert 5.0 < r["psnr"] < 60.0 and 5.0 < r["jpeg_psnr"] < 60.0
    dq = [r for r in rows if r["model"] == "dqvae-small"]
    assert [r["fine_fraction"] for r in dq] == pytest.approx(list(BUDGETS), abs=1 / 64)
    assert dq[0]["bytes"] < dq[1]["bytes"]
    with Image.open(tmp_path / "codec_demo.png") as img:
        assert img.size[0] > 400 and img.size[1] > 300
    table = format_rows(rows)
    assert table.count("\n") == len(rows) + 1 and "dqvae-small" in table
