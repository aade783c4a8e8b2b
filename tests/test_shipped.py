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

from dqfast.codec import decode, encode, model_fingerprint
from dqfast.codec.cli import to_uint8
from dqfast.codec.evaluate import psnr
from dqfast.models import available, create
from dqfast.models.registry import WEIGHTS_DIR, weights_path
from dqfast.sample_data import HELD_OUT, SPLITS, TRAIN, export_images, load_sample, load_sample_array

SHIPPED = ("cae-small", "cae-small-hq", "dqvae-small")

# model_fingerprint of each shipped weights file (hex). A retrained model changes them on purpose;
# anything else changing them (a state_dict key renamed, a buffer added) breaks old files.
FINGERPRINTS = {
    "cae-small": "b009a24b2d440880",
    "cae-small-hq": "6911837145d9c631",
    "dqvae-small": "7b2226228f30716d",
}

# (PSNR floor dB, bpp ceiling) on the central 128x128 of the held-out "astronaut". Measured with the
# shipped weights: cae-small 25.69 dB at 0.836 bpp, cae-small-hq 26.41 dB at 1.279 bpp (whole file);
# the floors sit 1 dB below, the ceilings 15% above.
CAE_FLOORS = {"cae-small": (24.69, 0.96), "cae-small-hq": (25.41, 1.47)}


def _crop(name: str, height: int, width: int) -> torch.Tensor:
    """The central (3, height, width) of a held-out sample, as the codec sees an 8-bit file."""
    x = load_sample(name)
    H, W = x.shape[1:]
    top, left = (H - height) // 2, (W - width) // 2
    return x[:, top : top + height, left : left + width].contiguous()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: create(name, pretrained=True) for name in SHIPPED}


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
    assert set(SHIPPED) <= set(available(pretrained=True))
    total = sum(weights_path(name).stat().st_size for name in SHIPPED)
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
    for name in SHIPPED:
        entry = manifest[name]
        assert entry["preset"] == name
        assert entry["last_log"]["loss"] < entry["first_log"]["loss"]


def test_weights_fingerprints_are_stable(models):
    for name, model in models.items():
        assert model_fingerprint(model).hex() == FINGERPRINTS[name], name
        assert model_fingerprint(create(name, pretrained=True)) == model_fingerprint(model)


def test_pretrained_rejects_overrides():
    with pytest.raises(ValueError, match="overrides"):
        create("cae-small", pretrained=True, lmbda=0.5)


# ----------------------------------------------------------------------------------------------
# Codec round trips on a held-out image
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_held_out_round_trip_is_exact(models, name):
    model = models[name]
    x = _crop(HELD_OUT[1], 100, 90)  # sides that are not multiples of the tile or of 8
    rate = {"budget": 0.5} if name.startswith("dqvae") else {}
    first = encode(model, x, name=name, **rate)
    assert encode(model, x, name=name, **rate).data == first.data
    image1, header = decode(first.data, model, name=name)
    image2, _ = decode(first.data, model, name=name)
    assert image1.shape == (3, 100, 90) and header.image_size == (100, 90)
    assert torch.equal(image1, image2)
    # Entropy coding is lossless: the file decodes to what the network makes of the encoder's symbols.
    with torch.no_grad():
        if name.startswith("dqvae"):
            padded = F.pad(x[None], (0, 128 - 90, 0, 128 - 100), mode="replicate")
            tiles = rearrange(padded, "1 c (nh r) (nw s) -> (nh nw) c r s", r=64, s=64)
            direct = model.decode(model.encode(tiles, budget=0.5))
            direct = rearrange(direct, "(nh nw) c r s -> c (nh r) (nw s)", nh=2)[:, :100, :90].clamp(0, 1)
        else:
            direct = model.decode(model.encode(x[None]), output_size=(100, 90))[0]
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


@pytest.mark.parametrize("name", ["cae-small", "cae-small-hq"])
def test_cae_beats_psnr_floor(models, name):
    model = models[name]
    x = _crop(HELD_OUT[0], 128, 128)
    result = encode(model, x, name=name)
    decoded, _ = decode(result.data, model, name=name)
    floor_db, max_bpp = CAE_FLOORS[name]
    value = psnr(to_uint8(x), to_uint8(decoded))
    assert value > floor_db, f"{name}: {value:.2f} dB at {result.bpp:.3f} bpp"
    assert result.bpp < max_bpp, f"{name}: {result.bpp:.3f} bpp"
    assert math.isclose(result.bpp, len(result.data) * 8 / (128 * 128))


def test_higher_lambda_model_spends_more_bits_for_more_quality(models):
    x = _crop(HELD_OUT[1], 128, 128)
    out = {}
    for name in ("cae-small", "cae-small-hq"):
        result = encode(models[name], x, name=name)
        out[name] = (result.bpp, psnr(to_uint8(x), to_uint8(decode(result.data, models[name], name=name)[0])))
    assert out["cae-small-hq"][0] > out["cae-small"][0]
    assert out["cae-small-hq"][1] > out["cae-small"][1]


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------


def test_codec_demo_rows_and_figure(tmp_path):
    from dqfast.codec.demo import BUDGETS, format_rows, run_codec_demo

    rows = run_codec_demo(tmp_path, image=HELD_OUT[0], crop=128)
    assert [r["model"] for r in rows] == ["dqvae-small"] * len(BUDGETS) + ["cae-small", "cae-small-hq"]
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
