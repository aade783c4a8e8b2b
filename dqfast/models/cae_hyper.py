"""A variable-rate compressive autoencoder: the paper's shape with GDN, a hyperprior and a rate ladder.

Theis et al.'s compressive autoencoder (three 5x5 stride-2 convolutions to latents at 1/8
resolution, residual blocks, a decoder built from sub-pixel convolutions so every decoder conv runs
on the low-res grid, straight-through rounding) with what later work showed matters most at this
size:

- GDN / inverse GDN between the convolutions (Ballé et al. 2017): a divisive normalisation that
  gaussianises the latents far better than a pointwise nonlinearity of the same cost.
- A mean-scale hyperprior (Ballé et al. 2018; Minnen et al. 2018): side information ``z`` at 1/32
  resolution, coded with a per-channel Gaussian scale mixture (the paper's entropy model), predicts
  a mean and a scale for every latent, so smooth regions cost almost nothing and textured ones get
  wide laws. The coded symbols are ``round(y - mu)``; the decoder adds ``mu`` back.
- One model for a ladder of rates: the paper's per-coefficient scales λ, one vector per rate point
  (a "gain" per latent channel and ladder level, trained jointly for ``len(lmbdas)`` trade-offs).
  The latents are multiplied by the gain before rounding and divided after; the entropy model's
  means and scales are multiplied by the same gain, which is exact (if ``y ~ N(mu, s²)`` then
  ``g·y ~ N(g·mu, (g·s)²)``), so one hyperprior serves every rate. Between two levels the log-gains
  are interpolated linearly, which gives a continuous ``quality`` in [1, len(lmbdas)]; below 1 (down
  to :data:`QUALITY_MIN`) they are extrapolated along the ladder's first step, :data:`BELOW_ONE_STEPS`
  ladder steps per unit of quality, for lower rates still.

Conventions: images are (B, 3, H, W) in [0, 1]; sides are padded at the bottom/right (edge
replication) to multiples of 32 (at least 64) and the output cropped back; ``quality`` is a float
(or a (B,) tensor) in [QUALITY_MIN, L], 1 the lowest trained rate. Training draws one ladder level per image and
minimises ``bpp + lmbda[level] · 255² · MSE`` (CompressAI's scale, so λ values carry over).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dqfast.models.cae import GaussianScaleMixture, _normal_cdf, clip_ste, round_ste
from dqfast.models.registry import register
from dqfast.nn import SubPixelConv2d

__all__ = ["BELOW_ONE_STEPS", "GDN", "HyperpriorCAE", "HyperCAEOutput", "LADDER", "QUALITY_MIN", "SCALE_MIN"]

# CompressAI's λ for its quality levels 1..7 (MSE models): about 0.1 to 1.5 bpp on Kodak.
LADDER = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483, 0.0932)
# Below quality 1 the gains are extrapolated along the ladder's first step, BELOW_ONE_STEPS ladder
# steps per unit of quality, down to QUALITY_MIN (a model of one level: 1).
QUALITY_MIN = 0.1
BELOW_ONE_STEPS = 2.5
# Smallest scale of a latent's Gaussian (in symbol units): narrower laws gain nothing after rounding.
SCALE_MIN = 0.11
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _lower_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``max(x, bound)`` forward, identity gradient (a parameter below its bound can still come back)."""
    return x + (x.clamp_min(bound) - x).detach()


class GDN(nn.Module):
    """Generalised divisive normalisation ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j²)`` (or its inverse).

    beta and gamma are kept non-negative by squaring bounded parameters (Ballé's reparametrisation);
    the inverse (IGDN, for decoders) multiplies by the same square root.
    """

    def __init__(self, channels: int, *, inverse: bool = False, gamma_init: float = 0.1):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(math.sqrt(gamma_init) * torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        beta = _lower_bound(self.beta, 1e-3) ** 2
        gamma = _lower_bound(self.gamma, 0.0) ** 2
        norm = F.conv2d(x * x, gamma[:, :, None, None], beta)
        return x * norm.sqrt() if self.inverse else x * norm.rsqrt()


class _Residual(nn.Module):
    """``x + conv(leaky_relu(conv(x)))``: the paper's residual block, two mirror-padded 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.01))


def gaussian_mass(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mass of N(0, scale²) on [v - 1/2, v + 1/2], evaluated in the lower tail (no cancellation)."""
    a = v.abs()
    return _normal_cdf((0.5 - a) / scale) - _normal_cdf((-0.5 - a) / scale)


class HyperCAEOutput(NamedTuple):
    """reconstruction (B, 3, H, W); bits (B,) estimated total bits (latents + side information);
    bits_side (B,) the side information's share."""

    reconstruction: torch.Tensor
    bits: torch.Tensor
    bits_side: torch.Tensor

    @property
    def bpp(self) -> torch.Tensor:
        h, w = self.reconstruction.shape[-2:]
        return self.bits / (h * w)


class HyperpriorCAE(nn.Module):
    """The variable-rate compressive autoencoder (see the module docstring).

    Encoder: normalise, conv 5x5/2 -> c1, GDN, conv 5x5/2 -> c2, GDN, residual blocks,
    conv 5x5/2 -> ``latent_channels`` (1/8 resolution). Decoder: sub-pixel conv 3x3 ×2 -> c2,
    IGDN, residual blocks, sub-pixel conv ×2 -> c1, IGDN, sub-pixel conv ×2 -> 3, denormalise, clip.
    Hyper-analysis: conv 3x3, conv 5x5/2, conv 5x5/2 -> ``hyper_channels`` (1/32 resolution);
    hyper-synthesis: two sub-pixel convs ×2 and a 3x3 conv to a mean and a log-scale per latent.
    """

    def __init__(
        self,
        channels: tuple[int, int] = (64, 96),
        latent_channels: int = 96,
        hyper_channels: int = 64,
        num_residual_blocks: int = 1,
        lmbdas: tuple[float, ...] = LADDER,
        num_scales: int = 6,
        pixel_mean: tuple[float, float, float] = _IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = _IMAGENET_STD,
    ):
        super().__init__()
        if len(lmbdas) < 1 or any(not (lm > 0) for lm in lmbdas):
            raise ValueError(f"lmbdas must be a non-empty sequence of positive numbers, got {lmbdas}")
        if list(lmbdas) != sorted(lmbdas):
            raise ValueError(f"lmbdas must be increasing (level 1 the lowest rate), got {lmbdas}")
        c1, c2 = channels
        m, n = latent_channels, hyper_channels
        self.latent_channels, self.hyper_channels = m, n
        self.lmbdas = tuple(float(lm) for lm in lmbdas)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))

        def down(cin: int, cout: int, mode: str = "reflect") -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 5, stride=2, padding=2, padding_mode=mode)

        def up(cin: int, cout: int, activation: str | None = None, mode: str = "reflect") -> SubPixelConv2d:
            return SubPixelConv2d(cin, cout, 3, upscale=2, padding_mode=mode, activation=activation)

        self.encoder = nn.Sequential(
            down(3, c1),
            GDN(c1),
            down(c1, c2),
            GDN(c2),
            *[_Residual(c2) for _ in range(num_residual_blocks)],
            down(c2, m),
        )
        self.decoder = nn.Sequential(
            up(m, c2),
            GDN(c2, inverse=True),
            *[_Residual(c2) for _ in range(num_residual_blocks)],
            up(c2, c1),
            GDN(c1, inverse=True),
            up(c1, 3),
        )
        self.hyper_analysis = nn.Sequential(
            nn.Conv2d(m, n, 3, padding=1),
            nn.LeakyReLU(0.01),
            down(n, n, "zeros"),
            nn.LeakyReLU(0.01),
            down(n, n, "zeros"),
        )
        self.hyper_synthesis = nn.Sequential(
            up(n, n, "leaky_relu", "zeros"),
            up(n, n * 3 // 2, "leaky_relu", "zeros"),
            nn.Conv2d(n * 3 // 2, 2 * m, 3, padding=1),
        )
        levels = len(lmbdas)
        # Log-gains start spread over a factor e² so the levels begin at different rates.
        spread = torch.linspace(-1.0, 1.0, levels) if levels > 1 else torch.zeros(1)
        self.latent_log_gains = nn.Parameter(spread[:, None].repeat(1, m))
        self.hyper_log_gains = nn.Parameter((0.5 * spread)[:, None].repeat(1, n))
        self.hyper_prior = GaussianScaleMixture(n, num_scales)

    # ------------------------------------------------------------------------------------------
    # Shapes and gains
    # ------------------------------------------------------------------------------------------

    @property
    def levels(self) -> int:
        return len(self.lmbdas)

    @staticmethod
    def padded_size(height: int, width: int) -> tuple[int, int]:
        """(H', W'): each side rounded up to a multiple of 32, at least 64."""
        return max(64, -(-height // 32) * 32), max(64, -(-width // 32) * 32)

    @classmethod
    def latent_size(cls, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latent grid (1/8 of the padded image); the side information is (h/4, w/4)."""
        ph, pw = cls.padded_size(height, width)
        return ph // 8, pw // 8

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.padded_size(h, w)
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")
        return x

    @property
    def min_quality(self) -> float:
        """The lowest quality accepted: :data:`QUALITY_MIN` (1 for a model of a single level)."""
        return QUALITY_MIN if self.levels > 1 else 1.0

    def check_quality(self, quality) -> None:
        """Raise ValueError unless ``quality`` is a finite number (or tensor) in [min_quality, levels]."""
        q = torch.as_tensor(quality, dtype=torch.float64)
        if not torch.isfinite(q).all() or (q < self.min_quality).any() or (q > self.levels).any():
            raise ValueError(f"quality must lie in [{self.min_quality:g}, {self.levels}], got {quality!r}")

    def gains(self, quality, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, 1, 1) latent gains and (B, N, 1, 1) side-information gains at ``quality`` (float or (B,))."""
        q = torch.as_tensor(quality, dtype=torch.float32, device=device).reshape(-1)
        q = (q.expand(batch) if q.numel() == 1 else q) - 1.0
        # Below level 1 a quality unit is BELOW_ONE_STEPS ladder steps, extrapolated.
        q = torch.where(q < 0, BELOW_ONE_STEPS * q, q)
        # The segment [low, low + 1] holding q; below level 1 the first segment, extrapolated (t < 0).
        low = q.floor().clamp(0, max(self.levels - 2, 0)).long()
        high = (low + 1).clamp_max(self.levels - 1)
        t = (q - low.float())[:, None]

        def interp(table: torch.Tensor) -> torch.Tensor:
            log_gain = table[low] * (1 - t) + table[high] * t
            return rearrange(log_gain.exp(), "b c -> b c 1 1")

        return interp(self.latent_log_gains), interp(self.hyper_log_gains)

    # ------------------------------------------------------------------------------------------
    # The transforms
    # ------------------------------------------------------------------------------------------

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] -> y (B, M, h, w) float32 latents before any gain."""
        x = (self._pad(x) - self.pixel_mean) / self.pixel_std
        return self.encoder(x).float()

    def synthesis(self, y_hat: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """y_hat (B, M, h, w) -> (B, 3, H, W) in [0, 1] (straight-through clip)."""
        out = self.decoder(y_hat) * self.pixel_std + self.pixel_mean
        h, w = output_size
        return clip_ste(out[..., :h, :w])

    def entropy_parameters(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_hat (B, N, h/4, w/4) -> (mu, scale), each (B, M, h, w) float32, before any gain."""
        params = self.hyper_synthesis(z_hat).float()
        mu, log_scale = params.chunk(2, dim=1)
        return mu, log_scale.clamp(-6.0, 8.0).exp()

    def hyper_bits(self, z_symbols: torch.Tensor, hyper_gain: torch.Tensor) -> torch.Tensor:
        """Code length in bits of each side-information symbol (B, N, hz, wz) at the given gains.

        The hyperprior is a Gaussian scale mixture of the un-gained side information: at gain g its
        component scales are multiplied by g, exactly the law of ``g·z``.
        """
        prior = self.hyper_prior
        scales, weights = prior._scales_and_weights(torch.float32)
        scales = rearrange(scales, "c s -> 1 c 1 1 s") * hyper_gain[..., None]
        k = z_symbols.float()[..., None]
        mass = (prior._interval_mass(k, scales) * rearrange(weights, "c s -> 1 c 1 1 s")).sum(-1)
        return -torch.log2(mass.clamp_min(prior.min_likelihood))

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, quality) -> HyperCAEOutput:
        """x (B, 3, H, W), quality float or (B,) in [1, levels] -> HyperCAEOutput.

        Training mode estimates the rate on the latents plus uniform noise (a smooth density) and
        decodes the straight-through rounded latents; eval mode rates the rounded symbols exactly
        as the codec codes them (up to table quantisation).
        """
        b = x.shape[0]
        y = self.analysis(x)
        latent_gain, hyper_gain = self.gains(quality, b, x.device)
        z = self.hyper_analysis(y).float() * hyper_gain
        z_symbols = round_ste(z)
        z_rated = z + torch.empty_like(z).uniform_(-0.5, 0.5) if self.training else z_symbols
        bits_side = self.hyper_bits(z_rated, hyper_gain).sum(dim=(1, 2, 3))

        mu, scale = self.entropy_parameters(z_symbols / hyper_gain)
        residual = (y - mu) * latent_gain
        scale = (scale * latent_gain).clamp_min(SCALE_MIN)
        symbols = round_ste(residual)
        rated = residual + torch.empty_like(residual).uniform_(-0.5, 0.5) if self.training else symbols
        mass = gaussian_mass(rated, scale).clamp_min(1e-9)
        bits = -torch.log2(mass).sum(dim=(1, 2, 3)) + bits_side

        y_hat = symbols / latent_gain + mu
        return HyperCAEOutput(self.synthesis(y_hat, x.shape[-2:]), bits, bits_side)

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """batch["image"] (B, 3, H, W): one random ladder level per image; loss = bpp + λ·255²·MSE."""
        x = batch["image"]
        b = x.shape[0]
        level = torch.randint(self.levels, (b,))
        out = self(x, (level + 1).float())
        lmbda = torch.tensor(self.lmbdas, device=x.device)[level.to(x.device)]
        mse = (out.reconstruction.float() - x.float()).pow(2).mean(dim=(1, 2, 3))
        loss = (out.bpp + lmbda * 255.0**2 * mse).mean()
        mse_mean = float(mse.detach().mean())
        return loss, {
            "loss": loss.item(),
            "bpp": float(out.bpp.detach().mean()),
            "bpp_side": float((out.bits_side.detach() / (x.shape[-1] * x.shape[-2])).mean()),
            "mse": mse_mean,
            "psnr": float((-10 * torch.log10(mse.detach().clamp_min(1e-12))).mean()),
        }

    # ------------------------------------------------------------------------------------------
    # Codec interface
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def compress_symbols(self, x: torch.Tensor, quality: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (1, 3, H, W) -> (z_symbols (N, hz, wz) int64, residual symbols (M, h, w) int64, scales (M, h, w)).

        ``scales`` are the gained Gaussian scales the decoder recomputes from ``z_symbols`` alone.
        """
        self.check_quality(quality)
        y = self.analysis(x)
        latent_gain, hyper_gain = self.gains(quality, 1, x.device)
        z_symbols = torch.round(self.hyper_analysis(y).float() * hyper_gain)
        mu, scale = self.entropy_parameters(z_symbols / hyper_gain)
        symbols = torch.round((y - mu) * latent_gain)
        scale = (scale * latent_gain).clamp_min(SCALE_MIN)
        return z_symbols[0].long(), symbols[0].long(), scale[0]

    @torch.no_grad()
    def side_parameters(self, z_symbols: torch.Tensor, quality: float) -> tuple[torch.Tensor, torch.Tensor]:
        """z_symbols (N, hz, wz) -> (mu (M, h, w) gained means, scales (M, h, w) gained scales)."""
        latent_gain, hyper_gain = self.gains(quality, 1, z_symbols.device)
        mu, scale = self.entropy_parameters(z_symbols[None].float() / hyper_gain)
        return (mu * latent_gain)[0], (scale * latent_gain).clamp_min(SCALE_MIN)[0]

    @torch.no_grad()
    def decompress_symbols(
        self, z_symbols: torch.Tensor, symbols: torch.Tensor, quality: float, output_size: tuple[int, int]
    ) -> torch.Tensor:
        """(z_symbols (N, hz, wz), symbols (M, h, w)) -> image (1, 3, H, W) in [0, 1]."""
        latent_gain, hyper_gain = self.gains(quality, 1, z_symbols.device)
        mu, _ = self.entropy_parameters(z_symbols[None].float() / hyper_gain)
        y_hat = symbols[None].float() / latent_gain + mu
        return self.synthesis(y_hat, output_size)


def _config(overrides: dict, **defaults) -> dict:
    defaults.update(overrides)
    return defaults


@register("cae-hyper")
def cae_hyper(**overrides) -> HyperpriorCAE:
    """The variable-rate CAE at the paper's widths: 64/128 channels, 96 latents, 3 residual blocks."""
    return HyperpriorCAE(**_config(overrides, channels=(64, 128), latent_channels=96, num_residual_blocks=3))


@register("cae-hyper-tiny")
def cae_hyper_tiny(**overrides) -> HyperpriorCAE:
    """A CPU-test size: 12/16 channels, 8 latents, 8 side channels, 3 ladder levels."""
    return HyperpriorCAE(
        **_config(
            overrides,
            channels=(12, 16),
            latent_channels=8,
            hyper_channels=8,
            num_residual_blocks=1,
            lmbdas=(0.004, 0.016, 0.064),
        )
    )


def _small(overrides: dict) -> HyperpriorCAE:
    return HyperpriorCAE(
        **_config(overrides, channels=(48, 64), latent_channels=96, hyper_channels=48, num_residual_blocks=0)
    )


@register("cae-small")
def cae_small(**overrides) -> HyperpriorCAE:
    """The shipped CAE (weights in ``dqfast/models/weights``): the ``cae-hyper-small`` architecture, trained
    on scikit-image's TRAIN photographs mixed with dead-leaves images, one model for the 7-level ladder."""
    return _small(overrides)


@register("cae-hyper-small")
def cae_hyper_small(**overrides) -> HyperpriorCAE:
    """The CPU-sized variable-rate CAE (shipped trained as ``cae-small``): 48/64 channels with GDN, 96
    latents at 1/8 resolution, 48 side channels at 1/32, the 7-level ladder; encode + decode of a
    768x512 image under a second on a 2-core CPU."""
    return _small(overrides)
