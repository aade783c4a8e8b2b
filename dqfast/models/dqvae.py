"""DQ-VAE: a dynamic-granularity VQ tokenizer (Huang et al., CVPR 2023), built on the dqfast ops.

One VQGAN-style convolutional backbone feeds G grains taken at different depths (coarsest from the
last level, each finer grain from the level before it); a router picks a grain per coarse region,
one shared codebook codes every grain (:func:`dqfast.dynamic_quantize`, an exact per-image code
budget when asked), and a VQGAN-style decoder rebuilds the image from the dense finest latent grid,
with position embeddings telling the 2x2 copies of a coarse code apart and every nearest-upsample +
3x3 conv folded into a sub-pixel convolution (:class:`dqfast.nn.SubPixelConv2d`).

Routers: ``"feature"`` is the learned DQ-VAE router (:class:`dqfast.nn.DynamicQuantizer`: hard
Gumbel-softmax in training, argmax in eval); ``"entropy"`` codes a region finely when the gray-level
entropy of its pixels is high, with histogram bins spanning each image's actual value range.

Not included: LPIPS (it needs downloaded network weights) and the PatchGAN discriminator; the
training loss is L1 + (MS-)SSIM + quantization + budget terms.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pytorch_msssim import ms_ssim, ssim
from torch import nn

import dqfast
from dqfast.models.registry import register
from dqfast.nn import DynamicQuantizer, SubPixelConv2d
from dqfast.types import C2FTokens

__all__ = ["DQVAE", "DQVAEOutput", "DQTokens", "EntropyRouter", "region_entropy"]

ROUTERS = ("feature", "entropy")
ROUTER_TAPS = ("after_quant_conv", "before_quant_conv")

# ITU-R BT.601 luma weights: the gray level the entropy router measures.
_LUMA = (0.299, 0.587, 0.114)

# pytorch_msssim's MS-SSIM downsamples 4 times and needs the smaller side > (win_size - 1) * 2**4.
_MS_SSIM_MIN_SIDE = 10 * 16 + 1


class DQTokens(NamedTuple):
    """The codes of a batch of images.

    indices: (B, Hf, Wf) int64, every region's codes broadcast (nearest) to the finest grid.
    grain: (B, H, W) int64, the grain of every coarse region (0 = coarsest).
    n_codes: (B,) int64, codes per image, ``sum(4 ** grain)``.
    """

    indices: torch.Tensor
    grain: torch.Tensor
    n_codes: torch.Tensor

    def c2f(self) -> C2FTokens:
        """The coarse-to-fine sequence of these codes (:func:`dqfast.c2f_flatten`)."""
        return dqfast.c2f_flatten(self.indices, self.grain)


class DQVAEOutput(NamedTuple):
    """Result of :meth:`DQVAE.forward`.

    reconstruction: (B, 3, H, W), unclamped.
    indices: (B, Hf, Wf) int64; grain: (B, H, W) int64; n_codes: (B,) int64 (see :class:`DQTokens`).
    quant_loss: () commitment + codebook loss of the quantizer.
    budget_loss: () the router's budget term (0 for the entropy router or without a target).
    router_scores: (B, H, W, G) the router's logits, or for the entropy router (0, e, e, ...)
        with e the region entropy in bits.
    """

    reconstruction: torch.Tensor
    indices: torch.Tensor
    grain: torch.Tensor
    n_codes: torch.Tensor
    quant_loss: torch.Tensor
    budget_loss: torch.Tensor
    router_scores: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Building blocks (VQGAN style: GroupNorm + swish, pre-activation residual blocks)
# ----------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    """VQGAN's GroupNorm(32) where the width allows it, else the largest group count dividing both."""
    return nn.GroupNorm(math.gcd(channels, 32), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a (1x1) shortcut.

    x: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H * W positions, residual. x: (B, C, H, W) -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W))


class Downsample(nn.Module):
    """3x3 conv with stride 2 after padding one pixel right and bottom (VQGAN): (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def folded_upsample(channels: int) -> SubPixelConv2d:
    """The decoder upsampler ``conv3x3(nearest_upsample_x2(x))`` as a sub-pixel conv on the low-res grid.

    Built from the conv by :meth:`SubPixelConv2d.from_upsample_conv`: the module's parameters are
    the 3x3 conv's own (so training keeps the resize-conv structure, 9 taps per channel pair), and
    it never makes the upsampled image.
    """
    return SubPixelConv2d.from_upsample_conv(nn.Conv2d(channels, channels, 3, padding=1))


def _mid_block(channels: int, dropout: float, attention: bool) -> nn.Sequential:
    """res -> attn -> res (attention optional)."""
    attn: nn.Module = AttnBlock(channels) if attention else nn.Identity()
    return nn.Sequential(ResnetBlock(channels, channels, dropout), attn, ResnetBlock(channels, channels, dropout))


class _Level(nn.Module):
    """Residual blocks (each followed by attention at the listed resolutions) at one resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()
        for i in range(num_blocks):
            self.blocks.append(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout))
            self.attns.append(AttnBlock(out_channels) if attention else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            x = attn(block(x))
        return x


# ----------------------------------------------------------------------------------------------
# Encoder, decoder, position embedding
# ----------------------------------------------------------------------------------------------


class DQEncoder(nn.Module):
    """VQGAN backbone with G grain branches.

    Level i runs at ``resolution / 2**i`` with ``ch * ch_mult[i]`` channels. Grain g (0 = coarsest)
    is tapped after the blocks of level ``L - 1 - g`` and gets its own mid block (res -> attn ->
    res), GroupNorm, swish and a 3x3 conv to ``z_channels``.

    x: (B, in_channels, R, R) -> G maps, coarsest first, map g (B, z_channels, R / 2**(L-1-g), ...).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        num_grains: int,
        mid_attn: bool,
        dropout: float,
    ):
        super().__init__()
        L = len(ch_mult)
        self.num_grains = num_grains
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        widths = [ch * m for m in ch_mult]
        block_in, res = ch, resolution
        for i, width in enumerate(widths):
            self.levels.append(_Level(block_in, width, num_res_blocks, res in attn_resolutions, dropout))
            block_in = width
            if i < L - 1:
                self.downsamples.append(Downsample(width))
                res //= 2
        self.branches = nn.ModuleList()
        for g in range(num_grains):
            width = widths[L - 1 - g]
            self.branches.append(
                nn.Sequential(
                    _mid_block(width, dropout, mid_attn),
                    _norm(width),
                    nn.SiLU(),
                    nn.Conv2d(width, z_channels, 3, padding=1),
                )
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        L = len(self.levels)
        taps: dict[int, torch.Tensor] = {}
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            h = level(h)
            if i >= L - self.num_grains:
                taps[i] = h
            if i < L - 1:
                h = self.downsamples[i](h)
        return [branch(taps[L - 1 - g]) for g, branch in enumerate(self.branches)]


class LatentPositionEmbedding(nn.Module):
    """Fixed Fourier features plus learned row and column embeddings of an (H, W) latent grid.

    Added to the dense latent before decoding: a coarse code broadcast to 2x2 cells is the same
    vector in all four, and the position embedding is what lets the decoder draw them differently.
    The Fourier part is the transformer sinusoid of the row index (first half of the channels) and
    of the column index (second half). x: (B, C, H, W) -> same.

    Periodic with the grid: a window of any size at ``offset`` (row, column, in latent cells from
    the top-left of a tile) reads the embedding at ``(offset + i) mod grid``, so a window cut from
    the code map of several tiles (as the codec decodes across tile borders) gets the embedding its
    cells have in their own tiles.
    """

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width
        self.register_buffer("fourier", self._fourier(channels, height, width), persistent=False)
        self.row = nn.Parameter(torch.randn(channels, height, 1) * 0.02)
        self.col = nn.Parameter(torch.randn(channels, 1, width) * 0.02)

    @staticmethod
    def _sinusoid(channels: int, length: int) -> torch.Tensor:
        """(channels, length): sin on the first half, cos on the second, geometric frequencies."""
        half = max(channels // 2, 1)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(length, dtype=torch.float64)[None, :] * freqs[:, None]
        return torch.cat([angles.sin(), angles.cos()])[:channels].float()

    @classmethod
    def _fourier(cls, channels: int, height: int, width: int) -> torch.Tensor:
        rows = channels // 2
        row = cls._sinusoid(rows, height)[:, :, None].expand(-1, height, width)
        col = cls._sinusoid(channels - rows, width)[:, None, :].expand(-1, height, width)
        return torch.cat([row, col])

    def forward(self, x: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        table = self.fourier + self.row + self.col
        h, w = x.shape[-2:]
        r0, c0 = (int(o) for o in offset)
        if (h, w) != (self.height, self.width) or r0 % self.height or c0 % self.width:
            rows = (torch.arange(h, device=x.device) + r0) % self.height
            cols = (torch.arange(w, device=x.device) + c0) % self.width
            table = table[:, rows][:, :, cols]
        return x + table.to(x.dtype)


class DQDecoder(nn.Module):
    """VQGAN decoder on the dense finest latent grid.

    z: (B, z_channels, h, w) -> (B, out_channels, h * 2**(L-1), w * 2**(L-1)), L = len(ch_mult).
    conv_in -> mid (res, attn, res) -> per level, finest-latent first: num_res_blocks + 1 residual
    blocks (attention at the listed resolutions), then a folded upsampler -> norm, swish, conv_out.
    """

    def __init__(
        self,
        *,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        latent_resolution: int,
        z_channels: int,
        mid_attn: bool,
        dropout: float,
    ):
        super().__init__()
        L = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = latent_resolution
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, dropout, mid_attn)
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(L)):
            width = ch * ch_mult[i]
            self.levels.append(_Level(block_in, width, num_res_blocks + 1, res in attn_resolutions, dropout))
            block_in = width
            if i > 0:
                self.upsamples.append(folded_upsample(width))
                res *= 2
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Entropy router
# ----------------------------------------------------------------------------------------------


def region_entropy(images: torch.Tensor, grid_size: tuple[int, int], bins: int = 32) -> torch.Tensor:
    """Gray-level entropy (bits) of every region of an (H, W) grid over each image.

    images: (B, 3, Himg, Wimg) (or (B, 1, Himg, Wimg) already gray), Himg and Wimg multiples of
    the grid. Returns (B, H, W) float32.

    The gray image's ``bins`` equal-width bins span that image's own min..max (the maximum falls
    in the last bin): the bins always cover every value, whatever the images' range (the released
    DQ-VAE code histogrammed over a range that did not cover its values). A constant image has
    entropy 0 everywhere.
    """
    B, C, Himg, Wimg = images.shape
    H, W = grid_size
    ph, pw = Himg // H, Wimg // W
    with torch.no_grad():
        x = images.float()
        gray = x[:, 0] if C == 1 else torch.einsum("bchw,c->bhw", x, x.new_tensor(_LUMA))
        lo = gray.amin((1, 2), keepdim=True)
        span = gray.amax((1, 2), keepdim=True) - lo
        # Where the span is 0, gray - lo is 0 too: every pixel lands in bin 0.
        level = ((gray - lo) / span.clamp_min(torch.finfo(torch.float32).tiny) * bins).floor()
        level = level.clamp(0, bins - 1).long()
        region = repeat(torch.arange(H * W, device=x.device).view(H, W), "h w -> (h ph) (w pw)", ph=ph, pw=pw)
        slot = (region[None] * bins + level).reshape(B, -1)
        counts = torch.zeros(B, H * W * bins, device=x.device).scatter_add_(
            1, slot, torch.ones_like(slot, dtype=x.dtype)
        )
        p = rearrange(counts, "b (r k) -> b r k", k=bins) / (ph * pw)
        entropy = -torch.special.xlogy(p, p).sum(-1) / math.log(2.0)
    return entropy.view(B, H, W)


class EntropyRouter(nn.Module):
    """Grains from region entropy: a region is coded at grain g when its entropy exceeds
    ``thresholds[g - 1]`` (ascending thresholds, one per grain above the coarsest).

    With a budget the entropies rank the regions instead (:func:`dqfast.grain_from_budget` on logits
    ``(0, e, e, ...)``: the finest grain takes the highest-entropy regions, the next grain the next
    ones). The thresholds are a buffer, saved with the weights; :meth:`calibrate` sets them to
    dataset percentiles.
    """

    def __init__(self, num_grains: int, thresholds: Sequence[float] | None = None, bins: int = 32):
        super().__init__()
        if thresholds is None:
            # Placeholders in bits (of log2(bins) at most); calibrate on data for real use.
            top = math.log2(bins)
            thresholds = [top * (g + 1) / (num_grains + 1) for g in range(num_grains - 1)]
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != num_grains - 1 or any(a > b for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"entropy thresholds must be {num_grains - 1} ascending numbers, got {thresholds}")
        self.num_grains, self.bins = num_grains, bins
        self.register_buffer("thresholds", torch.tensor(thresholds))

    def forward(
        self, images: torch.Tensor, grid_size: tuple[int, int], budget=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, Himg, Wimg) -> (grain (B, H, W) int64, scores (B, H, W, G))."""
        entropy = region_entropy(images, grid_size, self.bins)
        scores = torch.stack([torch.zeros_like(entropy)] + [entropy] * (self.num_grains - 1), -1)
        if budget is not None:
            return dqfast.grain_from_budget(scores, budget), scores
        grain = (entropy[..., None] > self.thresholds.to(entropy.device)).sum(-1)
        return grain, scores

    @torch.no_grad()
    def calibrate(self, entropy: torch.Tensor, fractions) -> None:
        """Set the thresholds so that, over ``entropy`` (any shape, region entropies of a dataset),
        the given fractions of regions (finest grain first) exceed them."""
        fractions = [float(fractions)] if isinstance(fractions, int | float) else [float(f) for f in fractions]
        if len(fractions) != self.num_grains - 1:
            raise ValueError(f"fractions must give {self.num_grains - 1} value(s), finest grain first")
        cumulative = torch.tensor(fractions, dtype=torch.float64).cumsum(0).clamp(0, 1)
        levels = torch.quantile(entropy.flatten().double(), 1 - cumulative)
        self.thresholds.copy_(levels.flip(0).float())


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class DQVAE(nn.Module):
    """Dynamic-granularity VQ autoencoder.

    Args:
        resolution: training image side R (the decoder's position embedding is built for its grid).
        ch, ch_mult, num_res_blocks, attn_resolutions, dropout: the VQGAN backbone (level i runs at
            R / 2**i with ch * ch_mult[i] channels; attention after every block at the listed sides).
        z_channels: encoder output / decoder input width.
        embed_dim, codebook_size: code dimension and number of codes (one codebook for all grains).
        num_grains: G >= 2; grain g is tapped at level len(ch_mult) - 1 - g, so regions are the
            cells of the R / 2**(len(ch_mult) - 1) grid and the finest grid is 2**(G-1) times that.
        decoder_ch_mult: decoder levels; default ``ch_mult[:len(ch_mult) - G + 1]`` (one upsample
            per level below the finest tap).
        mid_attn: attention inside the branch and decoder mid blocks.
        router: ``"feature"`` (learned, :class:`dqfast.nn.DynamicQuantizer`) or ``"entropy"``.
        beta, metric, ema, budget_target, budget_weight, gumbel_tau: quantizer / feature router
            settings (see :class:`dqfast.nn.DynamicQuantizer`); ``budget_target`` is the training
            target for the fraction of regions per grain (finest first).
        entropy_thresholds, entropy_bins: entropy router settings (see :class:`EntropyRouter`).
        train_budget: exact per-image budget used by :meth:`training_step` (None: the router decides;
            ``"random"``: every step draws one, half the time None, else uniform fractions, so every
            budget the codec may be asked for is seen in training).
        loss_reduction, budget_loss, gate_gradient: the quantizer's conventions (see
            :class:`dqfast.nn.DynamicQuantizer`); ``"official"`` reproduces the released code.
        router_tap: where the feature router reads the encoder's maps: ``"after_quant_conv"``
            (default: the maps being quantized) or ``"before_quant_conv"`` (the released DQ-VAE: the
            raw encoder maps, so the router's gradients reach the encoder without passing through
            the 1x1 conv; the forward is the same function of its inputs).
        l1_weight, ssim_weight: reconstruction loss weights (``ssim_weight * (1 - (MS-)SSIM)``).

    ``forward(x, budget=None)`` -> :class:`DQVAEOutput`; ``encode`` -> :class:`DQTokens`;
    ``decode(tokens)`` -> images; ``training_step(batch)`` -> (loss, logs).
    """

    def __init__(
        self,
        *,
        resolution: int = 256,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16, 32),
        dropout: float = 0.0,
        z_channels: int = 256,
        embed_dim: int = 256,
        codebook_size: int = 1024,
        num_grains: int = 2,
        decoder_ch_mult: Sequence[int] | None = None,
        mid_attn: bool = True,
        router: str = "feature",
        beta: float = 0.25,
        metric: str = "l2",
        ema: bool = True,
        budget_target: float | Sequence[float] | None = 0.5,
        budget_weight: float = 10.0,
        gumbel_tau: float = 1.0,
        entropy_thresholds: Sequence[float] | None = None,
        entropy_bins: int = 32,
        train_budget: float | Sequence[float] | None = None,
        l1_weight: float = 1.0,
        ssim_weight: float = 1.0,
        loss_reduction: str = "coded",
        budget_loss: str = "mse",
        gate_gradient: str = "chosen",
        router_tap: str = "after_quant_conv",
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if router_tap not in ROUTER_TAPS:
            raise ValueError(f"router_tap must be one of {ROUTER_TAPS}, got {router_tap!r}")
        self.router_tap = router_tap
        if num_grains < 2 or num_grains > len(ch_mult):
            raise ValueError(f"num_grains must lie in [2, len(ch_mult) = {len(ch_mult)}], got {num_grains}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} must be a multiple of 2**(len(ch_mult) - 1)")
        self.resolution, self.num_grains, self.router_kind = resolution, num_grains, router
        self.metric = metric
        if isinstance(train_budget, str) and train_budget != "random":
            raise ValueError(f"train_budget must be None, a budget or 'random', got {train_budget!r}")
        self.train_budget = train_budget
        self.l1_weight, self.ssim_weight = float(l1_weight), float(ssim_weight)
        self.grid_size = resolution // 2 ** (len(ch_mult) - 1)
        self.latent_size = self.grid_size * 2 ** (num_grains - 1)
        if decoder_ch_mult is None:
            decoder_ch_mult = ch_mult[: len(ch_mult) - num_grains + 1]
        if self.latent_size * 2 ** (len(decoder_ch_mult) - 1) != resolution:
            raise ValueError(
                f"decoder_ch_mult has {len(decoder_ch_mult)} levels, which upsample the {self.latent_size}-wide "
                f"latent grid to {self.latent_size * 2 ** (len(decoder_ch_mult) - 1)}, not {resolution}"
            )

        self.encoder = DQEncoder(
            in_channels=in_channels,
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            resolution=resolution,
            z_channels=z_channels,
            num_grains=num_grains,
            mid_attn=mid_attn,
            dropout=dropout,
        )
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        if router == "feature":
            self.quantizer = DynamicQuantizer(
                embed_dim,
                codebook_size,
                num_grains,
                beta=beta,
                metric=metric,
                ema=ema,
                budget_target=budget_target,
                budget_weight=budget_weight,
                gumbel_tau=gumbel_tau,
                loss_reduction=loss_reduction,
                budget_loss=budget_loss,
                gate_gradient=gate_gradient,
                router_channels=z_channels if router_tap == "before_quant_conv" else None,
            )
            self.entropy_router = None
        else:
            self.quantizer = None
            self.entropy_router = EntropyRouter(num_grains, entropy_thresholds, entropy_bins)
            self.beta = float(beta)
            # The initialisation DynamicQuantizer uses: small codes, pulled to the data by the loss.
            self.entropy_codebook = nn.Parameter(
                torch.empty(codebook_size, embed_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            )
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.position = LatentPositionEmbedding(z_channels, self.latent_size, self.latent_size)
        self.decoder = DQDecoder(
            out_channels=in_channels,
            ch=ch,
            ch_mult=tuple(decoder_ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            latent_resolution=self.latent_size,
            z_channels=z_channels,
            mid_attn=mid_attn,
            dropout=dropout,
        )
        # How often each code is used, counted on training data (see count_codes): the codec's static
        # prior over the codebook. All ones (a uniform prior) until counted.
        self.register_buffer("code_frequencies", torch.ones(codebook_size, dtype=torch.float32))

    # -- pieces ---------------------------------------------------------------------------------

    @property
    def codebook(self) -> torch.Tensor:
        """(K, embed_dim) the shared codebook."""
        return self.quantizer.codebook if self.quantizer is not None else self.entropy_codebook

    def _encode_maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """(the maps to quantize, after quant_conv; the maps the router reads, None: the same)."""
        raw = self.encoder(x)
        maps = [self.quant_conv(f) for f in raw]
        return maps, raw if self.router_tap == "before_quant_conv" and self.quantizer is not None else None

    def _quantize(self, x: torch.Tensor, maps: list[torch.Tensor], budget, router_maps=None):
        """-> (quantized (B, D, Hf, Wf), indices, grain, n_codes, quant_loss, budget_loss, scores)."""
        if self.quantizer is not None:
            q = self.quantizer(maps, budget=budget, router_features=router_maps)
            return q.quantized, q.indices, q.grain, q.n_codes, q.loss, q.budget_loss, q.router_logits
        grain, scores = self.entropy_router(x, maps[0].shape[-2:], budget)
        codebook = self.entropy_codebook.to(maps[0].dtype)
        q = dqfast.dynamic_quantize(maps, codebook, grain=grain, metric=self.metric, beta=self.beta)
        return q.quantized, q.indices, q.grain, q.n_codes, q.loss, q.loss.new_zeros(()), scores

    def decode_latent(self, quantized: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """quantized: (B, embed_dim, Hf, Wf) dense code vectors -> images (B, 3, R, R).

        ``offset``: where the window's top-left cell lies in its tile, (row, column) in latent cells
        (see :class:`LatentPositionEmbedding`); (0, 0) for a whole tile.
        """
        return self.decoder(self.position(self.post_quant_conv(quantized), offset))

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a float (B, C, H, W) image tensor, got {getattr(x, 'shape', type(x))}")
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"this DQVAE codes {self.resolution}x{self.resolution} images, got {tuple(x.shape[-2:])}")

    # -- API ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, budget=None) -> DQVAEOutput:
        """x: (B, 3, R, R) in [0, 1]. budget: None, or the exact per-image fraction of regions per
        grain (G = 2: fine fraction; G > 2: G - 1 fractions, finest first)."""
        self._check_images(x)
        maps, router_maps = self._encode_maps(x)
        quantized, indices, grain, n_codes, quant_loss, budget_loss, scores = self._quantize(
            x, maps, budget, router_maps
        )
        return DQVAEOutput(self.decode_latent(quantized), indices, grain, n_codes, quant_loss, budget_loss, scores)

    def _mode_dependent(self) -> list[nn.Module]:
        """The submodules whose forward depends on the training flag: the quantizer (Gumbel gate,
        codebook updates) and dropout layers with p > 0. Every other layer of the model (convs,
        GroupNorm, attention, the sub-pixel convs) computes the same in both modes."""
        return [
            m
            for m in self.modules()
            if isinstance(m, DynamicQuantizer | nn.modules.batchnorm._BatchNorm)
            or (isinstance(m, nn.Dropout) and m.p > 0)
        ]

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval behaviour for the duration: nothing to do when the model is already in eval mode;
        in training mode only the few mode-dependent submodules are switched (and restored)."""
        if not self.training:
            yield
            return
        switched = [m for m in self._mode_dependent() if m.training]
        for module in switched:
            module.training = False
        try:
            yield
        finally:
            for module in switched:
                module.training = True

    @torch.no_grad()
    def encode(self, x: torch.Tensor, budget=None) -> DQTokens:
        """x: (B, 3, R, R) -> :class:`DQTokens`. Deterministic: runs in eval mode (argmax routing, no
        codebook update) whatever the module's mode, and restores the mode after."""
        self._check_images(x)
        with self._eval_mode():
            maps, router_maps = self._encode_maps(x)
            _, indices, grain, n_codes, *_ = self._quantize(x, maps, budget, router_maps)
        return DQTokens(indices, grain, n_codes)

    def decode(self, tokens: DQTokens | C2FTokens, *, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Codes -> codebook vectors -> post-quant conv -> decoder: images (B, 3, R, R).

        tokens: :class:`DQTokens` (or a ``(indices, grain, ...)`` tuple), or the coarse-to-fine
        :class:`dqfast.C2FTokens` of a generator. ``offset``: for a window of the code map of several
        tiles, where its top-left cell lies in its tile (row, column, in finest latent cells); the
        decoder was trained on such windows (see :meth:`training_step`).
        """
        if isinstance(tokens, C2FTokens):
            indices, _ = dqfast.c2f_unflatten(tokens)
        else:
            indices = tokens[0]
        side = self.latent_size
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (side, side):
            raise ValueError(f"tokens.indices must be (B, {side}, {side}), got {tuple(indices.shape)}")
        K = self.codebook.shape[0]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
            raise ValueError(f"tokens.indices must lie in [0, {K})")
        codes = self.codebook
        if self.metric == "cosine":
            codes = F.normalize(codes, dim=-1)
        quantized = rearrange(codes[indices], "b h w d -> b d h w")
        return self.decode_latent(quantized, offset)

    def _similarity(self, reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """MS-SSIM when the images are large enough for its 4 downsamplings, else SSIM."""
        side = min(x.shape[-2:])
        if side >= _MS_SSIM_MIN_SIDE:
            return ms_ssim(reconstruction, x, data_range=1.0)
        win = min(11, side if side % 2 else side - 1)
        return ssim(reconstruction, x, data_range=1.0, win_size=win)

    def _draw_train_budget(self) -> float | list[float] | None:
        """The budget of one training step (see ``train_budget``); draws from torch's generator."""
        if self.train_budget != "random":
            return self.train_budget
        draw = torch.rand(self.num_grains + 1)
        if draw[0] < 0.5:
            return None
        if self.num_grains == 2:
            return float(draw[1])
        # G - 1 fractions (finest first) of a uniform split of the regions over the G grains.
        split = -torch.log(draw[1:].clamp_min(1e-12))
        return (split / split.sum())[: self.num_grains - 1].tolist()

    def _window_step(self, x: torch.Tensor, budget) -> tuple[DQVAEOutput, torch.Tensor]:
        """x: (B, 3, nR, nR), n >= 2 -> (the output for one R x R window per image, its target).

        Every R x R tile is coded on its own (as the codec codes them); the decoder then sees one
        R x R window of the assembled code map per image, at a random offset (a whole number of
        coarse regions, so the same for the whole batch), with the position embedding its cells
        have in their tiles. Offsets across tile borders are what the codec decodes to hide them.
        """
        B, _, side, _ = x.shape
        R, f = self.resolution, self.latent_size
        n = side // R
        tiles = rearrange(x, "b c (nh r) (nw s) -> (b nh nw) c r s", r=R, s=R)
        maps, router_maps = self._encode_maps(tiles)
        quantized, indices, grain, n_codes, quant_loss, budget_loss, scores = self._quantize(
            tiles, maps, budget, router_maps
        )
        latent = rearrange(quantized, "(b nh nw) d h w -> b d (nh h) (nw w)", b=B, nh=n, nw=n)
        region = 2 ** (self.num_grains - 1)
        r0, c0 = (int(v) * region for v in torch.randint(0, (n - 1) * f // region + 1, (2,)))
        window = latent[:, :, r0 : r0 + f, c0 : c0 + f]
        reconstruction = self.decode_latent(window, (r0, c0))
        stride = R // f
        target = x[:, :, r0 * stride : r0 * stride + R, c0 * stride : c0 * stride + R]
        return DQVAEOutput(reconstruction, indices, grain, n_codes, quant_loss, budget_loss, scores), target

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """batch["image"]: (B, 3, S, S) in [0, 1], S = n * R -> (loss, logs).

        n = 1: the tile is coded and decoded. n >= 2: each of the n x n tiles is coded, and the
        decoder rebuilds one R x R window of their code map at a random offset (see
        :meth:`_window_step`), so it learns to decode across tile borders.

        loss = l1_weight * L1 + ssim_weight * (1 - (MS-)SSIM) + quantization loss + budget loss.
        """
        x = batch["image"]
        R = self.resolution
        if x.dim() != 4 or x.shape[-1] != x.shape[-2] or x.shape[-1] % R:
            raise ValueError(f"batch['image'] must be (B, 3, S, S) with S a multiple of {R}, got {tuple(x.shape)}")
        budget = self._draw_train_budget()
        if x.shape[-1] == R:
            out = self(x, budget=budget)
        else:
            out, x = self._window_step(x, budget)
        l1 = (out.reconstruction - x).abs().mean()
        similarity = self._similarity(out.reconstruction.float(), x.float())
        loss = self.l1_weight * l1 + self.ssim_weight * (1 - similarity) + out.quant_loss + out.budget_loss
        with torch.no_grad():
            mse = (out.reconstruction.clamp(0, 1) - x).pow(2).mean()
            psnr = -10 * torch.log10(mse.clamp_min(1e-10))
            fine_ratio = (out.grain == self.num_grains - 1).float().mean()
        logs = {
            "loss": loss.item(),
            "l1": l1.item(),
            "ssim": similarity.item(),
            "psnr": psnr.item(),
            "quant_loss": out.quant_loss.item(),
            "budget_loss": out.budget_loss.item(),
            "fine_ratio": fine_ratio.item(),
            "codes_per_image": out.n_codes.float().mean().item(),  # per R x R tile
        }
        return loss, logs

    @torch.no_grad()
    def count_codes(self, x: torch.Tensor, budget=None) -> torch.Tensor:
        """x: (B, 3, R, R) -> (K,) int64: how many times each code is coded in these images.

        Every region's codes count once (a coarse code is one code, not its 4 broadcast copies), as
        in the codec's stream. ``budget`` as in :meth:`encode`.
        """
        tokens = self.encode(x, budget=budget).c2f()
        coded = torch.cat([codes[positions >= 0] for codes, positions in zip(tokens.codes, tokens.positions)])
        return torch.bincount(coded.flatten().cpu(), minlength=self.codebook.shape[0])

    @torch.no_grad()
    def calibrate_entropy_thresholds(self, images: torch.Tensor, fractions) -> None:
        """Entropy router only: thresholds at the percentiles of ``images``' region entropies that code
        ``fractions`` of regions (finest grain first) above the coarsest grain."""
        if self.entropy_router is None:
            raise ValueError("calibrate_entropy_thresholds needs router='entropy'")
        self._check_images(images)
        grid = (self.grid_size, self.grid_size)
        self.entropy_router.calibrate(region_entropy(images, grid, self.entropy_router.bins), fractions)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


@register("dqvae")
def dqvae(**overrides) -> DQVAE:
    """The released dual-grain DQ-VAE for 256x256 images: 16x16 coarse / 32x32 fine grids,
    1024 x 256 codebook, feature router, fine-ratio target 0.5."""
    return DQVAE(**overrides)


@register("dqvae-entropy")
def dqvae_entropy(**overrides) -> DQVAE:
    """The dual-grain DQ-VAE with the entropy router (the authors' later choice)."""
    config = dict(router="entropy")
    config.update(overrides)
    return DQVAE(**config)


@register("dqvae-tiny")
def dqvae_tiny(**overrides) -> DQVAE:
    """CPU-sized dual grain for 32x32 images: 4x4 coarse / 8x8 fine grids, 64 x 16 codebook."""
    config = dict(
        resolution=32,
        ch=16,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        mid_attn=False,
        z_channels=16,
        embed_dim=16,
        codebook_size=64,
    )
    config.update(overrides)
    return DQVAE(**config)


@register("dqvae-triple-tiny")
def dqvae_triple_tiny(**overrides) -> DQVAE:
    """CPU-sized triple grain for 32x32 images: 4x4 / 8x8 / 16x16 grids, targets 0.3 fine / 0.3 medium."""
    config = dict(
        resolution=32,
        ch=16,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        mid_attn=False,
        z_channels=16,
        embed_dim=16,
        codebook_size=64,
        num_grains=3,
        budget_target=(0.3, 0.3),
    )
    config.update(overrides)
    return DQVAE(**config)


@register("dqvae-small")
def dqvae_small(**overrides) -> DQVAE:
    """The shipped CPU-trained dual-grain DQ-VAE (weights in ``dqfast/models/weights``) for 64x64
    tiles: 8x8 coarse / 16x16 fine grids (strides 8 and 4), 256 x 32 codebook, feature router."""
    config = dict(
        resolution=64,
        ch=16,
        ch_mult=(1, 2, 2, 4),
        num_res_blocks=1,
        attn_resolutions=(),
        mid_attn=False,
        z_channels=32,
        embed_dim=32,
        codebook_size=256,
    )
    config.update(overrides)
    return DQVAE(**config)
