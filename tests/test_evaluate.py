"""``eval``'s measurement rules: BD-rate, off-target matches, grayscale scored as L, no JPEG cap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dqfast.codec import evaluate as ev


def _photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([80 + 60 * np.sin(x / 9), 120 + 50 * np.cos(y / 7), 90 + x / 3], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def test_bd_rate_of_a_scaled_curve():
    rates = np.array([0.2, 0.4, 0.8, 1.6, 3.2])
    psnrs = 24 + 3 * np.log2(rates / 0.2)
    assert ev.bd_rate(rates, psnrs, 0.8 * rates, psnrs) == pytest.approx(-20.0, abs=1e-6)
    assert ev.bd_rate(rates, psnrs, 1.5 * rates, psnrs) == pytest.approx(50.0, abs=1e-6)
    assert ev.bd_rate(rates, psnrs, rates, psnrs) == pytest.approx(0.0, abs=1e-9)
    # Too few points, or curves whose quality ranges do not overlap: no number.
    assert ev.bd_rate(rates[:3], psnrs[:3], rates[:3], psnrs[:3]) is None
    assert ev.bd_rate(rates, psnrs, rates, psnrs + 100) is None


def test_jpeg_search_reaches_quality_100():
    pixels = _photo()
    data, quality = ev.jpeg_at_bpp(pixels, 50.0)  # beyond any JPEG: the top quality is the nearest
    assert quality == 100
    assert len(data) > len(ev.jpeg_at_bpp(pixels, 0.5)[0])


@pytest.mark.parametrize("search", [ev.jpeg_at_bpp, ev.webp_at_bpp, ev.avif_at_bpp, ev.jpeg2000_at_bpp])
def test_standard_codecs_hit_their_target(search):
    pixels = _photo()
    target = 1.5
    data, _ = search(pixels, target)
    bpp = len(data) * 8 / (pixels.shape[0] * pixels.shape[1])
    assert abs(bpp - target) < 0.25 * target


def test_grayscale_is_coded_and_scored_as_l():
    gray = _photo()[..., 1].copy()
    anchor = [ev.Measurement("g.png", "model", "q=1", 1.0, 30.0, "ssim", 0.9)]
    rows = ev._measure_classical(anchor, {"g.png": gray})
    assert {r.codec for r in rows} == {name for name, _ in ev.standard_codecs()}
    jpeg, _ = ev.jpeg_at_bpp(gray, 1.0)
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.mode == "L"  # one channel coded, not an RGB copy
    assert ev.psnr(gray, gray) == float("inf")
    metric, value = ev.similarity(gray, gray)
    assert metric == "ssim" and value == pytest.approx(1.0)


def test_off_target_matches_are_flagged_and_left_out_of_means():
    pixels = np.zeros((64, 64, 3), np.uint8)  # a flat image: no codec can spend 6 bpp on it
    anchor = [ev.Measurement("flat.png", "model", "q=1", 6.0, 40.0, "ssim", 0.99)]
    rows = ev._measure_classical(anchor, {"flat.png": pixels})
    assert rows and all(r.off_target for r in rows)
    summary = ev.summarize(anchor + rows)
    standard = [s for s in summary if s["anchor"] == "model"]
    assert all(s["images"] == 0 and s["off_target"] == 1 and s["psnr"] is None for s in standard)
    mine = next(s for s in summary if s["codec"] == "model")
    assert mine["images"] == 1 and mine["bpp"] == pytest.approx(6.0)
