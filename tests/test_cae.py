"""The compressive autoencoder: shapes, straight-through estimators, the entropy model, masks, λ, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dqfast.models import create
from dqfast.models.cae import CompressiveAutoencoder, GaussianScaleMixture, clip_ste, round_ste
from tests.helpers import seed


def _tiny(**overrides) -> CompressiveAutoencoder:
    seed(0)
    return create("cae-tiny", **overrides)


def _mixture_density(t: np.ndarray, weights: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """sum_s w_s N(t; 0, s^2) written out from the Gaussian formula, t: (n,) -> (n,)."""
    t = t[:, None]
    return (weights * np.exp(-0.5 * (t / scales) ** 2) / (scales * math.sqrt(2 * math.pi))).sum(axis=1)


def _simpson(a: float, b: float, weights: np.ndarray, scales: np.ndarray, n: int = 4001) -> float:
    """Numeric integral of the mixture density over [a, b] (composite Simpson, float64)."""
    t = np.linspace(a, b, n)
    f = _mixture_density(t, weights, scales)
    h = (b - a) / (n - 1)
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def _random_mixture(channels: int = 3) -> GaussianScaleMixture:
    seed(1)
    gsm = GaussianScaleMixture(channels, num_scales=6)
    with torch.no_grad():
        gsm.log_scales.uniform_(math.log(0.2), math.log(8.0))
        gsm.mixture_logits.normal_()
    return gsm


def _mixture_params(gsm: GaussianScaleMixture, c: int) -> tuple[np.ndarray, np.ndarray]:
    weights = gsm.mixture_logits[c].detach().double().softmax(-1).numpy()
    scales = gsm.log_scales[c].detach().double().exp().numpy()
    return weights, scales


def _smooth_images(n: int, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) fixed images of low-frequency sinusoids in [0.1, 0.9]."""
    g = seed(3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        f = torch.rand(3, 3, generator=g) * 4
        images.append(
            torch.stack(
                [0.5 + 0.4 * torch.sin(2 * math.pi * (f[c, 0] * xx + f[c, 1] * yy) + f[c, 2]) for c in range(3)]
            )
        )
    return torch.stack(images)


@pytest.mark.parametrize("size", [(32, 32), (21, 35), (8, 8), (17, 40)])
def test_shapes_and_round_trip(size):
    model = _tiny(initial_active=None).eval()
    with torch.no_grad():
        model.log_scales.fill_(2.0)
    h, w = size
    x = torch.rand(2, 3, h, w)
    out = model(x)
    latent_hw = (math.ceil(max(h, 16) / 8), math.ceil(max(w, 16) / 8))
    assert out.reconstruction.shape == x.shape
    assert out.latents.shape == (2, model.latent_channels, *latent_hw)
    assert model.latent_size(h, w) == latent_hw
    assert out.bits.shape == (2,)
    assert torch.allclose(out.bpp, out.bits / (h * w))
    assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1
    assert torch.equal(out.latents, out.latents.round())

    symbols = model.encode(x)
    assert symbols.dtype == torch.int32 and symbols.shape == out.latents.shape
    assert torch.equal(symbols.float(), out.latents)
    assert symbols.abs().max() > 0, "the test needs non-zero symbols to mean anything"
    assert torch.equal(model.decode(symbols, (h, w)), out.reconstruction)


def test_round_ste_gradient_is_identity():
    z = (torch.randn(4, 5) * 3).requires_grad_()
    w = torch.randn(4, 5)
    y = round_ste(z)
    assert torch.equal(y, torch.round(z.detach()))
    (y * w).sum().backward()
    assert torch.equal(z.grad, w)


def test_clip_ste_gradient_is_one_outside_the_range():
    y = torch.linspace(-1.0, 2.0, 31).requires_grad_()
    w = torch.randn(31)
    out = clip_ste(y)
    assert torch.equal(out, y.detach().clamp(0, 1))
    (out * w).sum().backward()
    assert torch.equal(y.grad, w)
    assert (y.detach() < 0).any() and (y.detach() > 1).any()


def test_every_parameter_gets_a_gradient():
    model = _tiny(initial_active=None)
    with torch.no_grad():
        # Non-zero symbols, or the first decoder conv would see only zeros and get a zero gradient.
        model.log_scales.fill_(3.0)
    loss, logs = model.training_step({"image": torch.rand(2, 3, 32, 32)})
    loss.backward()
    assert math.isfinite(logs["loss"]) and set(logs) >= {"loss", "bpp", "psnr", "mse"}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_gsm_likelihood_equals_numeric_integral():
    gsm = _random_mixture(3)
    g = seed(2)
    symbols = torch.randint(-25, 26, (2, 3, 4, 5), generator=g).float()
    symbols[0, :, 0, :3] = torch.tensor([0.0, 1.0, -1.0])
    got = gsm.likelihood(symbols)
    for c in range(3):
        weights, scales = _mixture_params(gsm, c)
        for k in symbols[:, c].unique().tolist():
            expected = max(_simpson(k - 0.5, k + 0.5, weights, scales), gsm.min_likelihood)
            actual = got[:, c][symbols[:, c] == k]
            assert torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-5, atol=0), (
                c,
                k,
            )


def test_model_bits_equal_numeric_code_length():
    model = _tiny(initial_active=None)
    with torch.no_grad():
        model.log_scales.fill_(3.0)
        model.entropy_model.mixture_logits.normal_()
    out = model(torch.rand(2, 3, 24, 24))
    expected = torch.zeros(2, dtype=torch.float64)
    for c in range(model.latent_channels):
        weights, scales = _mixture_params(model.entropy_model, c)
        for b in range(2):
            for k in out.latents[b, c].flatten().tolist():
                mass = max(_simpson(k - 0.5, k + 0.5, weights, scales, n=801), 1e-9)
                expected[b] -= math.log2(mass)
    assert torch.allclose(out.bits.double(), expected, rtol=1e-5)


def test_pmf_table_rows_sum_to_one_and_match_the_integral():
    gsm = _random_mixture(3)
    lo, hi = -6, 9
    table = gsm.pmf_table(lo, hi)
    assert table.shape == (3, hi - lo + 1) and table.dtype == torch.float64
    assert torch.allclose(table.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    for c in range(3):
        weights, scales = _mixture_params(gsm, c)
        far = 60 * scales.max()
        expected = [_simpson(-far, lo + 0.5, weights, scales, n=200001)]
        expected += [_simpson(k - 0.5, k + 0.5, weights, scales) for k in range(lo + 1, hi)]
        expected += [_simpson(hi - 0.5, far, weights, scales, n=200001)]
        assert np.allclose(table[c].numpy(), expected, rtol=1e-7, atol=1e-12)
    assert torch.equal(gsm.pmf_table(2, 2), torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="lo <= hi"):
        gsm.pmf_table(3, 2)


def test_latent_range_holds_all_but_the_tail():
    gsm = _random_mixture(3)
    tail = 1e-6
    lo, hi = gsm.latent_range(tail)
    assert lo == -hi and hi > 0
    for c in range(3):
        weights, scales = _mixture_params(gsm, c)
        outside = sum(w * math.erfc((hi + 0.5) / (s * math.sqrt(2))) for w, s in zip(weights, scales))
        assert outside <= tail
    # The range is tight: one step narrower, the widest component alone leaves more than the tail out.
    s_max = gsm.log_scales.detach().double().exp().max().item()
    assert math.erfc((hi - 1.5) / (s_max * math.sqrt(2))) > tail


def test_incremental_mask():
    model = _tiny()
    with torch.no_grad():
        model.log_scales.fill_(3.0)
    assert model.active_coefficients == 2
    assert torch.equal(model.mask, torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0]))
    x = torch.rand(2, 3, 32, 32)
    symbols = model.encode(x)
    assert (symbols[:, 2:] == 0).all() and (symbols[:, :2] != 0).any()
    out = model(x)
    expected_bits = model.entropy_model.bits(out.latents)[:, :2].sum(dim=(1, 2, 3))
    assert torch.allclose(out.bits, expected_bits)
    # The entropy model of a masked channel does not enter the rate.
    with torch.no_grad():
        model.entropy_model.log_scales[5].fill_(-2.0)
    assert torch.equal(model(x).bits, out.bits)

    for n in range(3, model.latent_channels + 1):
        assert model.enable_next_coefficient()
        assert model.active_coefficients == n
    assert not model.enable_next_coefficient()
    assert "mask" in model.state_dict()


def test_scales_change_the_rate_and_are_divided_out():
    model = _tiny(initial_active=None).eval()
    x = _smooth_images(2)
    with torch.no_grad():
        unquantized = model.decoder(model.encoder((x - model.pixel_mean) / model.pixel_std))
        unquantized = unquantized * model.pixel_std + model.pixel_mean
        bits, errors = [], []
        for log_scale in (0.0, 2.0, 4.0, 6.0):
            model.log_scales.fill_(log_scale)
            out = model(x)
            bits.append(out.bits.mean().item())
            errors.append((out.reconstruction - unquantized.clamp(0, 1)).abs().max().item())
    # Larger λ: finer quantisation steps, more bits, and a decoder input closer to the unrounded latent.
    assert all(a < b for a, b in zip(bits, bits[1:])), bits
    assert errors[-1] < 0.05 * errors[0], errors


def test_ms_ssim_distortion_and_bad_config():
    model = _tiny(initial_active=None, distortion="ms-ssim", lmbda=5.0)
    loss, logs = model.training_step({"image": _smooth_images(2)})
    loss.backward()
    assert math.isfinite(loss.item()) and 0 < logs["ssim"] <= 1
    assert abs(logs["loss"] - (logs["bpp"] + 5.0 * (1 - logs["ssim"]))) < 1e-4
    with pytest.raises(ValueError, match="distortion"):
        create("cae-tiny", distortion="l1")
    with pytest.raises(ValueError, match="initial_active"):
        create("cae-tiny", initial_active=9)


def test_paper_preset_sizes():
    model = create("cae")
    assert model.latent_channels == 96
    assert model.encoder[0].out_channels == 64 and model.encoder[2].out_channels == 128
    assert model.decoder[0].weight.shape[0] == 128 * 4 and model.decoder[-1].weight.shape[0] == 12
    assert model.entropy_model.num_scales == 6 and model.active_coefficients == 2


def test_cae_tiny_learns():
    torch.manual_seed(0)
    model = _tiny(initial_active=None)
    x = _smooth_images(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, psnrs = [], []
    for _ in range(200):
        loss, logs = model.training_step({"image": x})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(logs["loss"])
        psnrs.append(logs["psnr"])
    assert np.mean(losses[-10:]) < 0.5 * losses[0], (losses[0], losses[-10:])
    assert np.mean(psnrs[-10:]) > psnrs[0] + 8, (psnrs[0], psnrs[-10:])
