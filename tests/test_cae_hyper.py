"""The variable-rate CAE (GDN, mean-scale hyperprior, gain ladder) and its bitstreams, on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dqfast.codec import CodecError, decode, encode, unpack
from dqfast.codec import cae_hyper_codec as hc
from dqfast.data import TrainingMix, color_augment, dead_leaves
from dqfast.models import create
from dqfast.models.cae_hyper import BELOW_ONE_STEPS, GDN, HyperpriorCAE, gaussian_mass


@pytest.fixture(scope="module")
def model() -> HyperpriorCAE:
    torch.manual_seed(0)
    m = create("cae-hyper-tiny")
    # Spread the gains a little so the levels code at clearly different rates.
    with torch.no_grad():
        m.latent_log_gains.copy_(torch.linspace(-1.0, 1.5, m.levels)[:, None].repeat(1, m.latent_channels))
    return m.eval()


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, w)[None, None, :] * torch.rand(3, 1, 1, generator=g)
    return (0.3 * base + 0.5 * ramp + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


def test_gdn_matches_formula_and_inverts_at_init():
    torch.manual_seed(1)
    gdn, igdn = GDN(5), GDN(5, inverse=True)
    with torch.no_grad():
        gdn.gamma.add_(0.05 * torch.rand(5, 5))
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    gdn, igdn = gdn.double(), igdn.double()
    gamma = gdn.gamma.clamp_min(0) ** 2
    beta = gdn.beta.clamp_min(1e-3) ** 2
    norm = beta[None, :, None, None] + torch.einsum("ij,bjhw->bihw", gamma, x * x)
    torch.testing.assert_close(gdn(x), x / norm.sqrt())
    torch.testing.assert_close(igdn(x), x * torch.sqrt(1 + 0.1 * x * x))


def test_gaussian_mass_is_a_distribution():
    scale = torch.tensor([0.11, 0.5, 3.0, 40.0], dtype=torch.float64)
    k = torch.arange(-400, 401, dtype=torch.float64)[:, None]
    total = gaussian_mass(k, scale).sum(0)
    torch.testing.assert_close(total, torch.ones(4, dtype=torch.float64), atol=1e-9, rtol=0)


def test_forward_shapes_and_gradients(model):
    model.train()
    try:
        x = _image(40, 56)[None].repeat(2, 1, 1, 1).requires_grad_()
        out = model(x, torch.tensor([1.0, 2.5]))
        assert out.reconstruction.shape == x.shape
        assert out.bits.shape == (2,) and (out.bits > 0).all() and (out.bits_side < out.bits).all()
        loss, logs = model.training_step({"image": x.detach()})
        loss.backward()
        assert math.isfinite(logs["loss"]) and logs["bpp"] > 0
        for name, p in model.named_parameters():
            if name.startswith("hyper_prior.mixture") or name.endswith("log_gains"):
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_gains_interpolate_between_levels(model):
    g1, _ = model.gains(1.0, 1, torch.device("cpu"))
    g2, _ = model.gains(2.0, 1, torch.device("cpu"))
    g15, _ = model.gains(1.5, 1, torch.device("cpu"))
    torch.testing.assert_close(g15.log(), (g1.log() + g2.log()) / 2)
    gl, _ = model.gains(float(model.levels), 1, torch.device("cpu"))
    torch.testing.assert_close(gl[0, :, 0, 0], model.latent_log_gains[-1].exp())


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (1, 1), (70, 9)])
@pytest.mark.parametrize("quality", [1.0, 2.3, 3.0])
def test_codec_round_trip_is_exact(model, size, quality):
    """The decoder recovers exactly the encoder's symbols, so its image equals the model's own decode."""
    x = _image(*size, seed=size[0])
    result = encode(model, x, quality=quality, name="tiny")
    image, header = decode(result.data, model, name="tiny")
    assert image.shape == x.shape and header.setting == quality
    with torch.no_grad():
        z, symbols, _ = model.compress_symbols(x[None], quality)
        expected = model.decompress_symbols(z, symbols, quality, size)[0]
    torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)
    assert result.bpp > 0 and result.estimated_bpp > 0


def test_rate_rises_with_quality(model):
    x = _image(96, 80, seed=3)
    rates = [encode(model, x, quality=q, name="t").bpp for q in (1.0, 2.0, 3.0)]
    assert rates[0] < rates[1] < rates[2]


@pytest.mark.parametrize("quality", [0.05, 0.0, -1.0, 3.5, math.nan, math.inf, 1e308])
def test_quality_out_of_ladder_is_refused(model, quality):
    with pytest.raises(ValueError, match="quality must lie in"):
        encode(model, _image(16, 16), quality=quality, name="t")


def test_corrupted_and_foreign_files_are_refused(model):
    data = bytearray(encode(model, _image(32, 48), quality=2.0, name="t").data)
    with pytest.raises(CodecError):
        decode(bytes(data[:-9]), model, name="t")
    other = create("cae-hyper-tiny")
    with pytest.raises(CodecError, match="weights|model"):
        decode(bytes(data), other, name="t")


def _banded(monkeypatch) -> None:
    """Make a small image stream through bands, with several column tiles in every transform."""
    monkeypatch.setattr(hc, "TILED_ABOVE", 64 * 64)
    monkeypatch.setattr(hc, "BAND_ROWS", 8)
    monkeypatch.setattr(hc, "TILE", 64)
    monkeypatch.setattr(hc, "HYPER_TILE", 16)
    monkeypatch.setattr(hc, "SIDE_TILE", 4)
    monkeypatch.setattr(hc, "SYNTH_TILE", 8)
    monkeypatch.setattr(hc, "OUT_ROWS", 48)


def test_banded_codec_round_trips_exactly_and_matches_whole_image(model, monkeypatch):
    """Large images stream through bands and tiles with halos: the decoder recovers exactly the
    encoder's symbols, and the result is the whole-image pass up to float rounding (no seams)."""
    x = _image(200, 136, seed=5)
    whole = encode(model, x, quality=2.0, name="t")
    z_whole, res_whole, _ = hc.decode_hyper_symbols(*unpack(whole.data), model)
    image_whole, _ = decode(whole.data, model, name="t")

    _banded(monkeypatch)
    sent = []
    add = hc._Groups.add
    monkeypatch.setattr(hc._Groups, "add", lambda self, v, lv: (sent.append(v.copy()), add(self, v, lv))[1])
    tiled = encode(model, x, quality=2.0, name="t")
    plan = hc._Plan(model, 200, 136)
    assert plan.tiled and len(plan.bands) == 4 and len(sent) == 4
    z, res, _ = hc.decode_hyper_symbols(*unpack(tiled.data), model)
    for (a, b), values in zip(plan.bands, sent):
        np.testing.assert_array_equal(res[:, a:b].numpy().reshape(-1), values)
    assert torch.equal(z, z_whole)
    assert (res != res_whole).float().mean() < 1e-3
    assert abs(len(tiled.data) - len(whole.data)) < 0.01 * len(whole.data)

    image_tiled, _ = decode(tiled.data, model, name="t")
    torch.testing.assert_close(image_tiled, image_whole, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = model.decompress_symbols(z, res, 2.0, (200, 136))[0]
    torch.testing.assert_close(image_tiled, expected, atol=1e-5, rtol=0)
    header, bands = hc.decode_hyper_bands(tiled.data, model, name="t")
    bands = list(bands)
    assert [y0 for y0, _ in bands] == [0, 48, 64, 112, 128, 176, 192]
    assert torch.equal(torch.cat([band for _, band in bands], 1), image_tiled)


@pytest.mark.parametrize("banded", [False, True])
def test_pillow_image_codes_as_its_tensor(model, monkeypatch, banded):
    from PIL import Image

    from dqfast.codec.cli import _image_tensor

    if banded:
        _banded(monkeypatch)
    pixels = (_image(90, 75, seed=2).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    for img, channels in ((Image.fromarray(pixels), 3), (Image.fromarray(pixels[..., 1]), 1)):
        from_pillow = encode(model, img, quality=1.5, name="t", source_channels=channels)
        from_tensor = encode(model, _image_tensor(img, channels), quality=1.5, name="t", source_channels=channels)
        assert from_pillow.data == from_tensor.data


def test_levels_in_float32_match_a_float64_search():
    exact = hc.SCALE_LEVELS.astype(np.float32)
    near = np.concatenate(
        [exact, np.nextafter(exact, np.float32(0)), np.nextafter(exact, np.float32(np.inf)), [0.0, 0.11, 1e-3, 300.0]]
    ).astype(np.float32)
    rng = np.random.default_rng(0)
    s = np.concatenate([near, np.exp(rng.uniform(-3, 6, 5000)).astype(np.float32)])
    expected = np.minimum(np.searchsorted(hc.SCALE_LEVELS, s.astype(np.float64), side="left"), 63)
    np.testing.assert_array_equal(hc._levels(torch.from_numpy(s)), expected)


def test_grouped_coder_escapes_and_detects_truncation():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, len(hc.SCALE_LEVELS), 500)
    values = np.round(rng.normal(0, hc.SCALE_LEVELS[levels])).astype(np.int64)
    values[:3] = [10**6, -(10**7), 2**31 - 1]  # far outside every table: escaped
    words = hc._encode_grouped(values, levels)
    np.testing.assert_array_equal(hc._decode_grouped(words, levels), values)
    with pytest.raises(CodecError):
        hc._decode_grouped(words[: len(words) // 2], levels)
    with pytest.raises(CodecError):
        hc._decode_grouped(np.zeros(0, np.uint32), levels)


def test_dead_leaves_is_seeded_and_covers_the_gamut():
    a = dead_leaves(96, np.random.default_rng(7))
    b = dead_leaves(96, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    np.testing.assert_array_equal(a, b)
    many = np.concatenate([dead_leaves(64, np.random.default_rng(s)).reshape(-1, 3) for s in range(6)])
    spread = many.astype(np.float64)
    saturation = spread.max(1) - spread.min(1)
    assert saturation.max() > 200 and saturation.min() < 30, "saturated and grey colours both occur"
    assert len(np.unique(many // 32, axis=0)) > 100, "colours spread over the RGB cube"


def test_color_augment_keeps_greys_grey_and_changes_hue():
    rng = np.random.default_rng(0)
    grey = np.full((4, 4, 3), 128, np.uint8)
    np.testing.assert_array_equal(color_augment(grey, rng), grey)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    outs = {tuple(color_augment(red, np.random.default_rng(s))[0, 0]) for s in range(20)}
    assert len(outs) > 5


def test_training_mix_items_and_resumable_randomness():
    photos = [np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    ds = TrainingMix(photos, 32, crops_per_photo=3, synthetic_items=4, synthetic_pool=2, synthetic_size=48)
    assert len(ds) == 7
    torch.manual_seed(3)
    first = [ds[i]["image"] for i in range(len(ds))]
    torch.manual_seed(3)
    again = [ds[i]["image"] for i in range(len(ds))]
    for a, b in zip(first, again):
        assert a.shape == (3, 32, 32) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="crop_size"):
        TrainingMix(photos, 4)


def test_quality_below_one_extrapolates_the_first_step(model):
    g05, _ = model.gains(0.5, 1, torch.device("cpu"))
    g1, _ = model.gains(1.0, 1, torch.device("cpu"))
    g2, _ = model.gains(2.0, 1, torch.device("cpu"))
    # Quality 0.5 is BELOW_ONE_STEPS / 2 ladder steps below level 1.
    torch.testing.assert_close(g05.log(), g1.log() - BELOW_ONE_STEPS * 0.5 * (g2.log() - g1.log()))
    x = _image(64, 48, seed=9)
    low, one = encode(model, x, quality=0.5, name="t"), encode(model, x, quality=1.0, name="t")
    assert low.bpp < one.bpp
    assert decode(low.data, model, name="t")[1].setting == 0.5


def test_image_folder_decodes_each_file_once(tmp_path, monkeypatch):
    from PIL import Image

    from dqfast import data

    for i in range(2):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    calls = []
    real = data._read_rgb
    monkeypatch.setattr(data, "_read_rgb", lambda p: calls.append(p) or real(p))
    ds = data.ImageFolder(tmp_path, 8)
    for _ in range(3):
        for i in range(len(ds)):
            assert ds[i]["image"].shape == (3, 8, 8)
    assert len(calls) == 2
    uncached = data.ImageFolder(tmp_path, 8, cache_bytes=0)
    uncached[0], uncached[0]
    assert len(calls) == 4
