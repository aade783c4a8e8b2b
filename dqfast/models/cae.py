"""The compressive autoencoder of Theis, Shi, Cunningham and Huszár (ICLR 2017).

An end-to-end trained lossy codec: encoder ``f`` (three 5x5 stride-2 convolutions around residual
blocks, mirror padding) to latents at 1/8 resolution, rounding to integers, a per-channel Gaussian
scale mixture as the entropy model, and a decoder ``g`` built from sub-pixel convolutions
(:class:`dqfast.nn.SubPixelConv2d`), so every decoder convolution runs on the low-res grid.

Conventions used throughout:

- Images are (B, 3, H, W) floats in [0, 1]. Inputs whose sides are not multiples of 8 (or are
  smaller than 16) are padded at the bottom/right by edge replication and the output cropped back.
- Coefficients are latent channels: the incremental mask (``model.mask``, shape (C,)) switches
  whole channels on or off, and a masked channel is neither decoded nor counted in the rate.
- Per-coefficient scales λ (``exp(model.log_scales)``, shape (C, 1, 1), one per channel) multiply
  the latents before rounding and divide them after: the symbols coded are ``round(λ·z)``. Larger
  λ means finer steps and a higher rate; fine-tuning only ``log_scales`` moves one trained model to
  other rates (Theis et al. §2.3).
- ``bits`` is the estimated total code length of each image, shape (B,), in bits; ``bpp`` divides
  it by the number of pixels of the (unpadded) image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dqfast.models.registry import register
from dqfast.nn import SubPixelConv2d

__all__ = [
    "CAEOutput",
    "CompressiveAutoencoder",
    "GaussianScaleMixture",
    "round_ste",
    "clip_ste",
]

DISTORTIONS = ("mse", "ms-ssim")

# pytorch_msssim's MS-SSIM needs the shorter side > 160 (four 2x downsamplings of an 11-tap window);
# smaller images use single-scale SSIM instead.
_MS_SSIM_MIN_SIDE = 161

# Per-channel RGB statistics of ImageNet, a fixed normalisation like the paper's (buffers, not learned).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer in the forward pass; identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def clip_ste(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Clamp to [lo, hi] in the forward pass; gradient 1 everywhere (also outside the range).

    A plain clamp would stop the gradient of every pixel the decoder overshoots, which is exactly
    where the decoder needs to be corrected.
    """
    return x + (x.clamp(lo, hi) - x).detach()


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF via erfc: accurate in the lower tail, where 1 + erf(x) would cancel."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


class CAEOutput(NamedTuple):
    """Result of :meth:`CompressiveAutoencoder.forward`.

    reconstruction: (B, 3, H, W) in [0, 1] (straight-through clipped).
    bits: (B,) float32, estimated total bits of each image's symbols under the entropy model.
    latents: (B, C, H8, W8) the coded symbols ``round(λ·z)·mask`` (integer-valued float32 carrying
        the straight-through gradient), H8 = ceil(max(H, 16) / 8), likewise W8.
    """

    reconstruction: torch.Tensor
    bits: torch.Tensor
    latents: torch.Tensor

    @property
    def bpp(self) -> torch.Tensor:
        """(B,) estimated bits per pixel: ``bits / (H * W)`` of the reconstructed image."""
        h, w = self.reconstruction.shape[-2:]
        return self.bits / (h * w)


class GaussianScaleMixture(nn.Module):
    """Per-channel zero-mean Gaussian scale mixture, the CAE's entropy model.

    Channel c has density ``p_c(t) = sum_s pi_cs N(t; 0, sigma_cs^2)`` with ``pi_c = softmax(
    mixture_logits[c])`` and ``sigma_cs = exp(log_scales[c, s])``. An integer symbol k has the mass
    of that density convolved with a unit-width uniform: ``P_c(k) = F_c(k + 1/2) - F_c(k - 1/2)``,
    F_c the mixture CDF. This is the training rate and the codec's probability table alike.
    """

    def __init__(
        self,
        channels: int,
        num_scales: int = 6,
        init_scale_range: tuple[float, float] = (0.25, 16.0),
        min_scale: float = 0.05,
        min_likelihood: float = 1e-9,
    ):
        super().__init__()
        lo, hi = init_scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"init_scale_range must satisfy 0 < lo <= hi, got {init_scale_range}")
        # Geometrically spread initial scales let every channel fit peaked and wide laws from the start.
        init = torch.linspace(math.log(lo), math.log(hi), num_scales)
        self.channels = channels
        self.num_scales = num_scales
        self.min_scale = min_scale
        self.min_likelihood = min_likelihood
        self.log_scales = nn.Parameter(init.repeat(channels, 1))
        self.mixture_logits = nn.Parameter(torch.zeros(channels, num_scales))

    def _scales_and_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, S) standard deviations (floored at ``min_scale``) and mixture weights in ``dtype``."""
        scales = self.log_scales.to(dtype).exp().clamp_min(self.min_scale)
        weights = self.mixture_logits.to(dtype).softmax(dim=-1)
        return scales, weights

    @staticmethod
    def _interval_mass(k: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Mass of N(0, scales^2) on [k - 1/2, k + 1/2], evaluated on the side of the nearer tail.

        By symmetry the mass equals that of [-k - 1/2, -k + 1/2]; evaluating both CDFs at
        non-positive arguments keeps the difference of two numbers near 1 from cancelling.
        """
        sign = torch.where(k > 0, -1.0, 1.0).to(k.dtype)
        upper = _normal_cdf(sign * (k + 0.5) / scales)
        lower = _normal_cdf(sign * (k - 0.5) / scales)
        return (upper - lower).abs()

    def likelihood(self, symbols: torch.Tensor) -> torch.Tensor:
        """symbols: (B, C, H, W) integer-valued -> (B, C, H, W) float32 masses ``P_c(k)``, floored.

        Computed in float32 whatever the input dtype (mixed-precision training included).
        Differentiable in the symbols (the straight-through gradient reaches the encoder) and in
        the mixture parameters.
        """
        scales, weights = self._scales_and_weights(torch.float32)
        k = rearrange(symbols.float(), "b c h w -> b c h w 1")
        mass = self._interval_mass(k, rearrange(scales, "c s -> c 1 1 s"))
        mixture = (mass * rearrange(weights, "c s -> c 1 1 s")).sum(dim=-1)
        return mixture.clamp_min(self.min_likelihood)

    def bits(self, symbols: torch.Tensor) -> torch.Tensor:
        """symbols: (B, C, H, W) -> (B, C, H, W) code length ``-log2 P_c(k)`` of every symbol."""
        return -torch.log2(self.likelihood(symbols))

    @torch.no_grad()
    def pmf_table(self, lo: int, hi: int) -> torch.Tensor:
        """(C, hi - lo + 1) float64 probabilities of the integers lo..hi for every channel.

        Computed in float64 on the CPU (the same numbers wherever the model lives). The two end
        entries absorb the tails: entry lo is ``F_c(lo + 1/2)`` and entry hi is ``1 - F_c(hi - 1/2)``,
        so every row sums to 1 (up to float64 rounding) and symbols clamped to [lo, hi] are codable.
        """
        if hi < lo:
            raise ValueError(f"pmf_table needs lo <= hi, got lo={lo}, hi={hi}")
        scales, weights = (t.detach().cpu() for t in self._scales_and_weights(torch.float64))
        if hi == lo:
            return torch.ones(self.channels, 1, dtype=torch.float64)
        k = torch.arange(lo, hi + 1, dtype=torch.float64)
        mass = self._interval_mass(rearrange(k, "n -> 1 n 1"), rearrange(scales, "c s -> c 1 s"))
        lower_tail = _normal_cdf((lo + 0.5) / scales)
        upper_tail = _normal_cdf(-(hi - 0.5) / scales)
        mass[:, 0] = lower_tail
        mass[:, -1] = upper_tail
        return (mass * rearrange(weights, "c s -> c 1 s")).sum(dim=-1)

    @torch.no_grad()
    def latent_range(self, tail_mass: float = 1e-9) -> tuple[int, int]:
        """A symmetric integer range (lo, hi) outside which every channel has mass below ``tail_mass``.

        Uses the widest mixture component of all channels: if N(0, sigma_max^2) puts less than
        ``tail_mass`` beyond ±t, so does every mixture (a convex combination of narrower Gaussians).
        """
        if not 0 < tail_mass < 1:
            raise ValueError(f"tail_mass must lie in (0, 1), got {tail_mass}")
        scales, _ = self._scales_and_weights(torch.float64)
        z = torch.special.ndtri(torch.tensor(1.0 - tail_mass / 2, dtype=torch.float64))
        bound = math.ceil(float(scales.max().cpu() * z) + 0.5)
        return -bound, bound


class ResidualBlock(nn.Module):
    """``x + conv(act(conv(x)))`` with two 3x3 mirror-padded convolutions of ``channels`` each."""

    def __init__(self, channels: int, negative_slope: float):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x + self.conv2(F.leaky_relu(self.conv1(x), self.negative_slope))


class CompressiveAutoencoder(nn.Module):
    """Theis et al.'s compressive autoencoder (see the module docstring for the conventions).

    Encoder: normalise, conv 5x5/2 -> ``channels[0]``, leaky ReLU, conv 5x5/2 -> ``channels[1]``,
    leaky ReLU, ``num_residual_blocks`` residual blocks, conv 5x5/2 -> ``latent_channels``.
    Decoder: sub-pixel conv 3x3 ×2 -> ``channels[1]`` (leaky ReLU), residual blocks, sub-pixel conv
    3x3 ×2 -> ``channels[0]`` (leaky ReLU), sub-pixel conv 3x3 ×2 -> 3, denormalise, clip.
    All convolutions mirror-pad (``padding_mode="reflect"``).

    Training loss (:meth:`training_step`): ``bpp + lmbda * D`` with D = 255² · MSE for
    ``distortion="mse"`` (the scale used by CompressAI, so ``lmbda`` values carry over) or
    D = 1 − MS-SSIM for ``"ms-ssim"`` (single-scale SSIM when the shorter side is ≤ 160).
    """

    def __init__(
        self,
        channels: tuple[int, int] = (64, 128),
        latent_channels: int = 96,
        num_residual_blocks: int = 3,
        num_scales: int = 6,
        initial_active: int | None = 2,
        negative_slope: float = 0.01,
        pixel_mean: tuple[float, float, float] = _IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = _IMAGENET_STD,
        distortion: str = "mse",
        lmbda: float = 0.01,
    ):
        super().__init__()
        if distortion not in DISTORTIONS:
            raise ValueError(f"distortion must be one of {DISTORTIONS}, got {distortion!r}")
        if initial_active is None:
            initial_active = latent_channels
        if not 0 <= initial_active <= latent_channels:
            raise ValueError(f"initial_active must lie in [0, {latent_channels}], got {initial_active}")
        c1, c2 = channels
        self.latent_channels = latent_channels
        self.distortion = distortion
        self.lmbda = lmbda
        slope = negative_slope

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))

        def down(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 5, stride=2, padding=2, padding_mode="reflect")

        self.encoder = nn.Sequential(
            down(3, c1),
            nn.LeakyReLU(slope),
            down(c1, c2),
            nn.LeakyReLU(slope),
            *[ResidualBlock(c2, slope) for _ in range(num_residual_blocks)],
            down(c2, latent_channels),
        )

        def up(cin: int, cout: int, activation: str | None) -> SubPixelConv2d:
            return SubPixelConv2d(
                cin, cout, 3, upscale=2, padding_mode="reflect", activation=activation, negative_slope=slope
            )

        self.decoder = nn.Sequential(
            up(latent_channels, c2, "leaky_relu"),
            *[ResidualBlock(c2, slope) for _ in range(num_residual_blocks)],
            up(c2, c1, "leaky_relu"),
            up(c1, 3, None),
        )

        self.log_scales = nn.Parameter(torch.zeros(latent_channels, 1, 1))
        mask = torch.zeros(latent_channels)
        mask[:initial_active] = 1.0
        self.register_buffer("mask", mask)
        self.entropy_model = GaussianScaleMixture(latent_channels, num_scales)

    # ------------------------------------------------------------------------------------------
    # Incremental training
    # ------------------------------------------------------------------------------------------

    @property
    def active_coefficients(self) -> int:
        """How many latent channels the mask lets through (always the first ones)."""
        return int(self.mask.sum().item())

    def enable_next_coefficient(self) -> bool:
        """Switch on the next masked latent channel; False (and no change) when all are on."""
        n = self.active_coefficients
        if n >= self.latent_channels:
            return False
        self.mask[n] = 1.0
        return True

    def enable_all_coefficients(self) -> None:
        self.mask.fill_(1.0)

    # ------------------------------------------------------------------------------------------
    # Codec
    # ------------------------------------------------------------------------------------------

    @property
    def scales(self) -> torch.Tensor:
        """(C, 1, 1) the per-channel quantisation scales λ."""
        return self.log_scales.exp()

    @staticmethod
    def latent_size(height: int, width: int) -> tuple[int, int]:
        """(H8, W8) of the symbol grid for an H x W image: ceil(max(side, 16) / 8) each."""
        return max(16, -(-height // 8) * 8) // 8, max(16, -(-width // 8) * 8) // 8

    @classmethod
    def _pad(cls, x: torch.Tensor) -> torch.Tensor:
        """Pad (B, 3, H, W) at the bottom/right to sides that are multiples of 8 and at least 16.

        Sixteen keeps the 5x5 mirror padding valid at 1/4 resolution (reflect needs side > 2).
        """
        h, w = x.shape[-2:]
        h8, w8 = cls.latent_size(h, w)
        ph, pw = 8 * h8 - h, 8 * w8 - w
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1] -> (B, C, H8, W8) continuous float32 latents ``λ·f(x)``, unmasked."""
        x = (self._pad(x) - self.pixel_mean) / self.pixel_std
        # Rounding needs float32: bf16 cannot represent integers above 256 exactly.
        return self.encoder(x).float() * self.log_scales.float().exp()

    def synthesis(self, symbols: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """symbols: (B, C, H8, W8) -> (B, 3, H, W): undo λ, decode, denormalise, clip, crop."""
        y = self.decoder(symbols / self.log_scales.exp())
        y = y * self.pixel_std + self.pixel_mean
        h, w = output_size
        return clip_ste(y[..., :h, :w])

    def forward(self, x: torch.Tensor) -> CAEOutput:
        """x: (B, 3, H, W) in [0, 1] -> CAEOutput(reconstruction, bits (B,), latents)."""
        mask = rearrange(self.mask, "c -> 1 c 1 1")
        symbols = round_ste(self.analysis(x)) * mask
        bits = (self.entropy_model.bits(symbols) * mask).sum(dim=(1, 2, 3))
        return CAEOutput(self.synthesis(symbols, x.shape[-2:]), bits, symbols)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1] -> (B, C, H8, W8) int32 symbols ``round(λ·f(x))``, 0 where masked."""
        mask = rearrange(self.mask, "c -> 1 c 1 1")
        return (torch.round(self.analysis(x)) * mask).to(torch.int32)

    @torch.no_grad()
    def decode(self, symbols: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """symbols: (B, C, H8, W8) integer symbols from :meth:`encode` -> (B, 3, H, W) in [0, 1]."""
        mask = rearrange(self.mask, "c -> 1 c 1 1")
        return self.synthesis(symbols.float() * mask, tuple(output_size))

    def pmf_table(self, lo: int, hi: int) -> torch.Tensor:
        """(C, hi - lo + 1) float64 symbol probabilities per channel; see GaussianScaleMixture.pmf_table."""
        return self.entropy_model.pmf_table(lo, hi)

    def latent_range(self, tail_mass: float = 1e-9) -> tuple[int, int]:
        """Integer symbol range (lo, hi) holding all but ``tail_mass`` of every channel's mass."""
        return self.entropy_model.latent_range(tail_mass)

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """batch["image"]: (B, 3, H, W) in [0, 1] -> (loss, logs): rate + lmbda · distortion."""
        x = batch["image"]
        out = self(x)
        x = x.float()
        recon = out.reconstruction.float()
        bpp = out.bpp.mean()
        mse = F.mse_loss(recon, x)
        logs: dict[str, float] = {}
        if self.distortion == "mse":
            distortion = 255.0**2 * mse
        else:
            from pytorch_msssim import ms_ssim, ssim

            # The Gaussian windows are convolutions: keep them out of bf16 autocast.
            with torch.autocast(x.device.type, enabled=False):
                if min(x.shape[-2:]) >= _MS_SSIM_MIN_SIDE:
                    similarity = ms_ssim(recon, x, data_range=1.0)
                    logs["ms_ssim"] = similarity.item()
                else:
                    win_size = min(11, _largest_odd(min(x.shape[-2:])))
                    similarity = ssim(recon, x, data_range=1.0, win_size=win_size)
                    logs["ssim"] = similarity.item()
            distortion = 1.0 - similarity
        loss = bpp + self.lmbda * distortion
        mse_value = mse.item()
        logs.update(
            loss=loss.item(),
            bpp=bpp.item(),
            mse=mse_value,
            psnr=10 * math.log10(1.0 / max(mse_value, 1e-12)),
            active=float(self.active_coefficients),
        )
        return loss, logs


def _largest_odd(n: int) -> int:
    return n if n % 2 else n - 1


@register("cae")
def cae(**overrides) -> CompressiveAutoencoder:
    """The paper's widths: 64 and 128 channels, 96 latent channels at 1/8 resolution, 3 residual blocks."""
    config = dict(channels=(64, 128), latent_channels=96, num_residual_blocks=3)
    config.update(overrides)
    return CompressiveAutoencoder(**config)


@register("cae-tiny")
def cae_tiny(**overrides) -> CompressiveAutoencoder:
    """A CPU-test size: 16 and 24 channels, 8 latent channels, 1 residual block."""
    config = dict(channels=(16, 24), latent_channels=8, num_residual_blocks=1)
    config.update(overrides)
    return CompressiveAutoencoder(**config)
