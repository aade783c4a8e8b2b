"""``DynamicQuantizer``: the DQ-VAE quantization layer (granularity router + shared codebook) over
``dqfast.dynamic_quantize``, with an optional EMA codebook and dead-code restart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from dqfast.reference.vector_quantize import METRICS, NORMALIZE_EPS

__all__ = ["DynamicQuantizer", "DynamicQuantizerOutput", "GranularityRouter", "LOSS_REDUCTIONS", "BUDGET_LOSSES"]

# "coded": squared errors summed over the coded vectors (a coarse region counted once) / (N_codes * D).
# "official": the released code's mean over all finest cells, coarse cells weighted 1/4 (B * Hf * Wf * D).
LOSS_REDUCTIONS = ("coded", "official")
# "mse": budget_weight * mean over grains of (fraction - target)^2.
# "official": the released BudgetConstraint_RatioMSE_DualGrain, 2 * budget_weight * (ratio - target)^2.
BUDGET_LOSSES = ("mse", "official")
# "chosen": only the chosen grain's gate entry gets a gradient (dqfast.dynamic_quantize's gate).
# "official": the released merge sum_g gate_g * up(features_g): every entry gets one (two grains).
GATE_GRADIENTS = ("chosen", "official")


@torch.library.custom_op("dqfast::codebook_snapshot", mutates_args=())
def _snapshot(codebook: torch.Tensor) -> torch.Tensor:
    """A copy of the codebook that a compiled graph keeps.

    Under torch.compile the codebook read by the quantization must be a copy taken before the
    in-graph EMA / restart update: Inductor drops a plain ``clone`` or same-dtype ``to(copy=True)``
    of a graph input as a no-op, so the backward would read the updated buffer. An opaque op is
    neither removed nor recomputed in the backward.
    """
    return codebook.clone()


@_snapshot.register_fake
def _(codebook):
    return torch.empty_like(codebook)


_snapshot.register_autograd(lambda ctx, grad: grad)


class DynamicQuantizerOutput(NamedTuple):
    """Result of :meth:`DynamicQuantizer.forward`.

    quantized: (B, dim, Hf, Wf) codes broadcast to the finest grid, straight-through to the features.
    indices: (B, Hf, Wf) int64; grain: (B, H, W) int64; n_codes: (B,) int64 codes per image.
    loss: () quantization loss (beta * commitment + codebook term; commitment only with EMA), reduced
        as ``loss_reduction`` says.
    router_logits: (B, H, W, G) the router's scores, coarsest grain first.
    budget_loss: () the budget term (see ``budget_loss`` of :class:`DynamicQuantizer`), 0 without a target.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    grain: torch.Tensor
    loss: torch.Tensor
    n_codes: torch.Tensor
    router_logits: torch.Tensor
    budget_loss: torch.Tensor


def _group_count(channels: int, preferred: int = 32) -> int:
    """32 groups like VQGAN's GroupNorm when the channels allow it, else the largest divisor of both."""
    return math.gcd(channels, preferred)


class GranularityRouter(nn.Module):
    """The DQ-VAE granularity router: per-region logits over the G grains.

    Each grain's map is GroupNorm-ed, every finer map is average-pooled to the coarse grid, the
    maps are concatenated (G * C channels) and a two-layer MLP scores every coarse region:
    ``Linear(G*C, hidden) -> SiLU -> Linear(hidden, G)`` (hidden defaults to G * C, as in the paper).

    features: G maps (B, C, H * 2**g, W * 2**g), coarsest first -> logits (B, H, W, G).
    """

    def __init__(self, channels: int, num_grains: int, hidden: int | None = None):
        super().__init__()
        width = num_grains * channels
        hidden = width if hidden is None else hidden
        self.norms = nn.ModuleList(nn.GroupNorm(_group_count(channels), channels, eps=1e-6) for _ in range(num_grains))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, num_grains))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for g, (norm, feature) in enumerate(zip(self.norms, features)):
            x = norm(feature)
            pooled.append(F.avg_pool2d(x, 2**g) if g else x)
        return self.mlp(rearrange(torch.cat(pooled, 1), "b c h w -> b h w c"))


class DynamicQuantizer(nn.Module):
    """Dynamic vector quantizer: a router picks a grain per region, one codebook codes all grains.

    Args:
        dim: code dimension D.
        codebook_size: number of codes K.
        num_grains: G >= 2 feature maps, coarsest first, each 2x the previous resolution.
        in_channels: channels of the input maps (router input); when it differs from ``dim`` a
            shared 1x1 conv projects the maps to ``dim`` before quantization. Default: ``dim``.
        router_hidden: hidden width of the router MLP (default G * in_channels).
        beta: commitment weight.
        metric: ``"l2"`` | ``"cosine"``.
        ema: keep the codebook as a buffer updated by exponential moving averages of the coded
            vectors (VQ-VAE-2 style) instead of a learned parameter; the loss then keeps only the
            commitment term.
        decay, eps: EMA decay and Laplace smoothing of the code counts.
        restart_dead: in training, replace dead codes by random coded vectors of the batch.
        dead_threshold: a code is dead when its EMA usage (average codes per batch, starting at 1)
            falls below this.
        budget_target: training target for the fraction of regions per grain (G = 2: fraction of
            fine regions; G > 2: G - 1 fractions, finest first), pulled by ``budget_weight * MSE``.
        budget_weight: weight of that MSE.
        gumbel_tau: temperature of the hard Gumbel-softmax gate used in training.
        loss_reduction: ``"coded"`` (default): the squared errors of the coded vectors (every region
            once) divided by N_codes * D, so the weight does not change with the fine ratio;
            ``"official"``: the released code's mean over all B * Hf * Wf * D finest-cell entries
            with coarse cells weighted 1/4, i.e. the default times N_codes / (B * Hf * Wf); with EMA
            it also keeps the (gradient-free) codebook term in the value, as the released code does.
        budget_loss: ``"mse"`` (default): ``budget_weight * MSE(fractions, targets)``;
            ``"official"`` (two grains): ``2 * budget_weight * (ratio - target)^2``, the released
            ``BudgetConstraint_RatioMSE_DualGrain`` (its fine-ratio and coarse-ratio terms).
        gate_gradient: ``"chosen"`` (default): in training, the hard gate's chosen entry gets the
            gradient ``<dL/dv, v>`` (dqfast.dynamic_quantize); ``"official"`` (two grains): the
            released code merges ``gate_coarse * up(coarse) + gate_fine * fine`` at every fine cell,
            so the other entry gets a gradient too (same forward; the router's gradient differs).
        router_channels: channels of the maps the router reads when they are not the quantized
            ones (``forward(..., router_features=...)``); default ``in_channels``.

    Grains: ``forward(features, budget=f)`` meets the budget exactly in every image (top regions by
    router score); otherwise training samples a hard Gumbel-softmax gate (straight-through, so the
    router learns from the quantization and budget losses) and eval takes the argmax.

    Deterministic under ``torch.manual_seed``: the Gumbel noise and the restart picks use torch's RNG.

    Training compiles with ``torch.compile(fullgraph=True)``, static or dynamic shapes: the EMA and
    restart update then runs with static shapes (see :meth:`_update_codebook`); the usage, code
    sums and EMA codebook equal eager's, the restart picks are drawn differently.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_grains: int = 2,
        *,
        in_channels: int | None = None,
        router_hidden: int | None = None,
        beta: float = 0.25,
        metric: str = "l2",
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_dead: bool = True,
        dead_threshold: float = 1.0,
        budget_target: float | Sequence[float] | None = None,
        budget_weight: float = 10.0,
        gumbel_tau: float = 1.0,
        loss_reduction: str = "coded",
        budget_loss: str = "mse",
        gate_gradient: str = "chosen",
        router_channels: int | None = None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("num_grains", num_grains)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if dim < 1 or codebook_size < 1:
            raise ValueError(f"dim and codebook_size must be >= 1, got {dim}, {codebook_size}")
        if num_grains < 2:
            raise ValueError(f"num_grains must be >= 2 (use dqfast.vector_quantize for one grain), got {num_grains}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        if gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {gumbel_tau}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if budget_loss not in BUDGET_LOSSES:
            raise ValueError(f"budget_loss must be one of {BUDGET_LOSSES}, got {budget_loss!r}")
        if gate_gradient not in GATE_GRADIENTS:
            raise ValueError(f"gate_gradient must be one of {GATE_GRADIENTS}, got {gate_gradient!r}")
        if gate_gradient == "official" and num_grains != 2:
            raise ValueError(
                f"gate_gradient='official' is the released dual-grain merge (num_grains 2), got {num_grains}"
            )
        if budget_loss == "official" and num_grains != 2:
            raise ValueError(f"budget_loss='official' is the released dual-grain loss (num_grains 2), got {num_grains}")
        in_channels = dim if in_channels is None else in_channels

        self.dim, self.codebook_size, self.num_grains = dim, codebook_size, num_grains
        self.beta, self.metric, self.ema = float(beta), metric, ema
        self.decay, self.eps = float(decay), float(eps)
        self.restart_dead, self.dead_threshold = restart_dead, float(dead_threshold)
        self.budget_target = None if budget_target is None else self._check_target(budget_target)
        self.budget_weight, self.gumbel_tau = float(budget_weight), float(gumbel_tau)
        self.loss_reduction, self.budget_loss_kind, self.gate_gradient = loss_reduction, budget_loss, gate_gradient

        router_channels = in_channels if router_channels is None else router_channels
        self.router = GranularityRouter(router_channels, num_grains, router_hidden)
        self.project = nn.Conv2d(in_channels, dim, 1) if in_channels != dim else nn.Identity()

        # VQGAN's initialisation: small codes, pulled to the data by the losses or the EMA.
        codebook = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("code_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        # Usage starts at one per code, so the EMA codebook code_sum / usage starts at the initial codes.
        self.register_buffer("usage", torch.ones(codebook_size))

    def _check_target(self, target) -> tuple[float, ...]:
        fractions = (float(target),) if isinstance(target, int | float) else tuple(float(t) for t in target)
        if len(fractions) != self.num_grains - 1:
            raise ValueError(
                f"budget_target must give {self.num_grains - 1} fraction(s), finest grain first, got {target!r}"
            )
        if any(not 0.0 <= f <= 1.0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
            raise ValueError(f"budget_target fractions must lie in [0, 1] and sum to at most 1, got {target!r}")
        return fractions

    def forward(
        self, features: Sequence[torch.Tensor], budget=None, router_features: Sequence[torch.Tensor] | None = None
    ) -> DynamicQuantizerOutput:
        """features: G maps (B, in_channels, H * 2**g, W * 2**g), coarsest first.

        budget: None, or the exact per-image fraction(s) of regions per grain (see
        ``dqfast.dynamic_quantize``); with a budget the router's scores rank the regions and the
        quantizer passes no gradient to the router.
        router_features: G maps the router reads instead of ``features`` (e.g. the maps before a
            1x1 projection, as in the released DQ-VAE); same grids, ``router_channels`` channels.
        """
        from dqfast import ops

        if isinstance(features, torch.Tensor) or len(features) != self.num_grains:
            raise ValueError(f"features must be a list of {self.num_grains} maps, coarsest first")
        if router_features is not None and (
            isinstance(router_features, torch.Tensor) or len(router_features) != self.num_grains
        ):
            raise ValueError(f"router_features must be a list of {self.num_grains} maps, coarsest first")
        router_logits = self.router(features if router_features is None else router_features)
        maps = [self.project(f) for f in features]

        # A copy, in the maps' dtype: under autocast the maps may be half precision while the
        # codebook stays fp32 (the cast is differentiable, so the fp32 codebook gets its gradient),
        # and the EMA / restart update below rewrites the codebook in place, which must not touch a
        # tensor the backward pass saved.
        if torch.compiler.is_compiling() and self.training and (self.ema or self.restart_dead):
            codebook = _snapshot(self.codebook).to(maps[0].dtype)
        else:
            codebook = self.codebook.to(maps[0].dtype, copy=True)
        gate = None
        if budget is not None:
            out = ops.dynamic_quantize(
                maps, codebook, router_logits=router_logits, budget=budget, metric=self.metric, beta=self.beta
            )
        elif self.training:
            gate = F.gumbel_softmax(router_logits, tau=self.gumbel_tau, hard=True, dim=-1).to(maps[0].dtype)
            coded = self._official_merge(maps, gate) if self.gate_gradient == "official" else maps
            out = ops.dynamic_quantize(coded, codebook, gate=gate, metric=self.metric, beta=self.beta)
        else:
            out = ops.dynamic_quantize(maps, codebook, router_logits=router_logits, metric=self.metric, beta=self.beta)

        loss = out.loss
        if self.loss_reduction == "official":
            # The op divides by N_codes * D; the released code by B * Hf * Wf * D (coarse cells at 1/4,
            # so the numerators agree). It keeps the EMA codebook term's value too.
            B, _, Hf, Wf = out.quantized.shape
            loss = loss * (out.n_codes.sum().to(loss.dtype) / (B * Hf * Wf))
        elif self.ema:
            # The op's loss is (beta + 1) * E in value, and the codebook term (E) carries no gradient
            # here since the codebook is a buffer; removing its value leaves beta * commitment.
            loss = loss - loss.detach() / (1.0 + self.beta)

        if self.training and (self.ema or self.restart_dead):
            self._update_codebook(maps, out.indices, out.grain)

        budget_loss = self._budget_loss(gate, out.grain, router_logits)
        return DynamicQuantizerOutput(
            out.quantized, out.indices, out.grain, loss, out.n_codes, router_logits, budget_loss
        )

    @staticmethod
    def _official_merge(maps: Sequence[torch.Tensor], gate: torch.Tensor) -> list[torch.Tensor]:
        """The maps with the released merge's gate gradient added, values unchanged.

        The released code quantizes ``gate_c * up(coarse) + gate_f * fine`` at every fine cell. Its
        value is the chosen map; the other gate entry receives ``<dL/dcell, other map>``. Adding
        ``(gate_f - sg(gate_f)) * avgpool(fine)`` to the coarse map and ``(gate_c - sg(gate_c)) *
        up(coarse)`` to the fine map (both 0 in value) gives those gradients through the op, whose
        coded vector is ``gate[chosen] * map``: a coarse region's one vector stands for its 4
        cells at weight 1/4, hence the mean of the fine cells.
        """
        coarse, fine = maps
        g = rearrange(gate - gate.detach(), "b h w g -> b g h w").to(coarse.dtype)
        merged_coarse = coarse + g[:, 1:] * F.avg_pool2d(fine, 2)
        merged_fine = fine + repeat(g[:, :1] * coarse, "b c h w -> b c (h 2) (w 2)")
        return [merged_coarse, merged_fine]

    def _budget_loss(self, gate: torch.Tensor | None, grain: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """budget_weight * mean over grains g > 0 of (fraction of regions at g - target)^2; with
        ``budget_loss="official"`` 2 * budget_weight * (fine ratio - target)^2.

        The fractions are averaged over the batch (as in DQ-VAE) from the gate when training with
        one (so the router gets the gradient), else from the hard grains.
        """
        if self.budget_target is None:
            return like.new_zeros(())
        choice = gate if gate is not None else F.one_hot(grain, self.num_grains).to(like.dtype)
        fractions = choice.mean((0, 1, 2)).flip(0)[: self.num_grains - 1]  # finest first
        target = torch.tensor(self.budget_target, dtype=fractions.dtype, device=fractions.device)
        if self.budget_loss_kind == "official":
            # The released loss adds the same MSE for the coarse ratio, 1 - r against 1 - t.
            return self.budget_weight * (F.mse_loss(fractions, target) + F.mse_loss(1 - fractions, 1 - target))
        return self.budget_weight * F.mse_loss(fractions, target)

    def _coded_vectors(
        self, maps: Sequence[torch.Tensor], indices: torch.Tensor, grain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every coded vector once, with its code: (N, D) float32 and (N,) int64."""
        vectors, codes = [], []
        G = self.num_grains
        for g, feature in enumerate(maps):
            coded = repeat(grain == g, "b h w -> b (h s1) (w s2)", s1=2**g, s2=2**g)
            vectors.append(rearrange(feature, "b d h w -> b h w d")[coded])
            stride = 2 ** (G - 1 - g)
            codes.append(indices[:, ::stride, ::stride][coded])
        vectors = torch.cat(vectors).float()
        if self.metric == "cosine":
            vectors = F.normalize(vectors, dim=-1, eps=NORMALIZE_EPS)
        return vectors, torch.cat(codes)

    def _all_cells(
        self, maps: Sequence[torch.Tensor], indices: torch.Tensor, grain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cell of every grain's map with its code, (M, D) float32 and (M,) int64, M the cells
        of all the maps: a cell not coded at its grain gets the extra code K (static shapes, for
        torch.compile; :meth:`_coded_vectors` keeps the coded ones only)."""
        vectors, codes = [], []
        G, K = self.num_grains, self.codebook_size
        for g, feature in enumerate(maps):
            coded = repeat(grain == g, "b h w -> b (h s1) (w s2)", s1=2**g, s2=2**g)
            vectors.append(rearrange(feature, "b d h w -> (b h w) d"))
            stride = 2 ** (G - 1 - g)
            codes.append(torch.where(coded, indices[:, ::stride, ::stride], K).flatten())
        vectors = torch.cat(vectors).float()
        if self.metric == "cosine":
            vectors = F.normalize(vectors, dim=-1, eps=NORMALIZE_EPS)
        return vectors, torch.cat(codes)

    @torch.no_grad()
    def _update_codebook(self, maps: Sequence[torch.Tensor], indices: torch.Tensor, grain: torch.Tensor) -> None:
        """EMA of code usage (and of the codebook with ``ema=True``), then dead-code restart.

        Counts and sums come from :func:`dqfast.code_statistics` over the N coded vectors (fp32
        atomics in the Triton kernel, bincount / index_add in the reference): O(N * D) memory, no
        N x K one-hot. Under torch.distributed they are summed over ranks and the restart picks
        come from rank 0, so every rank keeps the same codebook.

        Under torch.compile every shape must be static: the statistics run over every cell of
        every grain's map, the cells not coded at their grain going to an extra code K whose row
        is dropped (the same counts and sums), and the restart candidates are K draws with
        replacement among the coded cells (``torch.multinomial``), so the random picks, though
        drawn the same way, are not the eager ones.
        """
        from dqfast import ops

        maps = [m.detach() for m in maps]
        K = self.codebook_size
        compiling = torch.compiler.is_compiling()
        if compiling:
            vectors, codes = self._all_cells(maps, indices, grain)
            counts, sums = ops.code_statistics(vectors, codes, K + 1)
            counts, sums = counts[:K], sums[:K]
        else:
            vectors, codes = self._coded_vectors(maps, indices, grain)
            counts, sums = ops.code_statistics(vectors, codes, K)
        counts, sums = counts.float(), sums.float()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)

        if self.ema:
            if distributed:
                dist.all_reduce(sums)
            self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            total = self.usage.sum()
            smoothed = (self.usage + self.eps) / (total + K * self.eps) * total
            self.codebook.copy_(self.code_sum / smoothed[:, None])

        if not self.restart_dead or not vectors.shape[0]:
            return
        # One candidate per code (no host sync on how many are dead); only dead codes take theirs.
        if compiling:
            coded = codes < K
            # Without a coded cell (an empty grid) nothing restarts; the uniform weight only keeps
            # the draw valid.
            found = coded.any()
            weight = torch.where(found, coded.float(), torch.ones_like(vectors[:, 0]))
            candidates = vectors[torch.multinomial(weight, K, replacement=True)]
        else:
            found = None
            candidates = vectors[torch.randint(vectors.shape[0], (K,), device=vectors.device)]
        if distributed and compiling:
            # Dynamo traces dist.all_reduce but not dist.broadcast; the functional form traces.
            from torch.distributed import _functional_collectives as funcol

            candidates = funcol.broadcast(candidates, 0, dist.group.WORLD)
        elif distributed:
            dist.broadcast(candidates, src=0)
        dead = self.usage < self.dead_threshold
        if found is not None:
            dead = dead & found
        self.codebook.copy_(torch.where(dead[:, None], candidates.to(self.codebook.dtype), self.codebook))
        self.usage.copy_(torch.where(dead, self.dead_threshold, self.usage))
        if self.ema:
            self.code_sum.copy_(torch.where(dead[:, None], candidates * self.dead_threshold, self.code_sum))
