"""Vector quantization, the reference: nearest-code search, the DQ-VAE dynamic quantizer with an
exact per-image code budget, and the coarse-to-fine (c2f) token order.

Definitions (the spec every backend follows):

- ``vector_quantize(z, codebook, metric)``: every vector of ``z`` (..., D) is replaced by its
  nearest code. ``"l2"``: squared Euclidean distance. ``"cosine"``: ``1 - cos`` between the
  l2-normalised vector and the l2-normalised codes (``F.normalize``, eps 1e-12); the quantized
  vector is then the normalised code. Ties go to the lowest code index.
- ``grain_from_budget(router_logits, budget)``: per-region grains that meet the budget exactly in
  every image, top regions by ``logit_g - logit_0``, ties to the lower raster index.
- ``dynamic_quantize(features, codebook, ...)``: regions are the cells of the coarsest grid; a
  region of grain g is coded by its 4**g vectors of ``features[g]``, each searched once.
- ``c2f_flatten`` / ``c2f_unflatten``: the DQ-Transformer token order (see ``C2FTokens``).

Distances are computed in float32 whatever the input dtype (float64 inputs stay float64 so tests
can compare against exact values).

Non-finite values: a NaN distance compares as +inf. A NaN or inf codebook row is therefore never
chosen while any code has a finite distance; a vector whose distances are all NaN or +inf (a NaN
or inf in the vector itself, or a codebook of such rows) gets index 0 (the lowest of equal +inf
distances), quantized = that code exactly, and distance = the distance computed for that code
(NaN or inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from dqfast.types import C2FTokens, DynamicVQOutput, VQOutput

__all__ = [
    "METRICS",
    "vector_quantize",
    "grain_from_budget",
    "budget_counts",
    "dynamic_quantize",
    "c2f_flatten",
    "c2f_unflatten",
]

METRICS = ("l2", "cosine")

# Same eps as F.normalize's default, stated so every backend normalises identically.
NORMALIZE_EPS = 1e-12

# Distance-matrix entries evaluated at once (64 MiB of fp32): bounds memory for large N.
_CHUNK_ENTRIES = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(x: torch.Tensor, metric: str, dtype: torch.dtype) -> torch.Tensor:
    """x (..., D) cast to the compute dtype, l2-normalised along D for the cosine metric."""
    x = x.to(dtype)
    return F.normalize(x, dim=-1, eps=NORMALIZE_EPS) if metric == "cosine" else x


def _nearest(z: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """Index of the nearest code, ties to the lowest index.

    z: (N, D), codes: (K, D), both already in the compute dtype (and normalised for cosine).
    Returns (N,) int64.

    l2 evaluates ``||z||^2 - 2 z.c + ||c||^2`` (the matmul form every fast implementation uses);
    cosine takes the first maximum of ``z.c``, i.e. the first minimum of ``1 - cos``. Codes whose
    computed distances are exactly equal resolve to the lowest index (argmin / argmax return the
    first extremum); codes closer than the rounding error may resolve differently in another
    formulation, which is why tests compare the chosen distance rather than the index there.

    A NaN distance counts as +inf (argmin alone would pick the first NaN), so NaN codes lose to
    every finite one and a row with no finite distance resolves to index 0.
    """
    indices = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    code_sq = codes.pow(2).sum(-1)
    rows = max(1, _CHUNK_ENTRIES // codes.shape[0])
    for start in range(0, z.shape[0], rows):
        chunk = z[start : start + rows]
        dots = chunk @ codes.T  # (n, K)
        if metric == "l2":
            dist = chunk.pow(2).sum(-1, keepdim=True) - 2 * dots + code_sq
        else:
            dist = -dots  # 1 - cos, less the constant 1: the same order, ties included
        indices[start : start + rows] = torch.where(dist.isnan(), math.inf, dist).argmin(-1)
    return indices


class _StraightThrough(torch.autograd.Function):
    """Value ``value`` exactly, gradient passed unchanged to ``source`` (same shape).

    ``value + (source - source.detach())`` has the same gradient but turns the value into NaN
    whenever ``source`` holds a NaN or inf (inf - inf), where the spec asks for the code itself.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def _straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(value, source) if source.requires_grad else value


def _chosen_distance(z: torch.Tensor, code: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance between matching rows of z and code (N, D), recomputed directly for accuracy:
    ``sum((z - c)^2)`` has no cancellation, unlike the matmul form used for the search."""
    if metric == "l2":
        return (z - code).pow(2).sum(-1)
    return 1 - (z * code).sum(-1)


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2") -> VQOutput:
    """Nearest-code search.

    z: (..., D) any float dtype; codebook: (K, D) of the same dtype; metric: ``"l2"`` | ``"cosine"``.

    Returns ``VQOutput(quantized, indices, distance)``:

    - indices (...) int64: the nearest code, ties to the lowest index (see :func:`_nearest` for
      the formula evaluated: ``||z||^2 - 2 z.c + ||c||^2`` in float32, or ``z.c`` of normalised
      vectors for cosine), evaluated a block of rows at a time so at most 2**24 distances exist
      at once.
    - quantized (..., D) in z's dtype: exactly ``codebook[indices]`` (for cosine the code
      normalised in float32, then cast to z's dtype), straight-through: the gradient passes
      unchanged to z (for cosine, to the normalised ``zn = F.normalize(z)``, hence through the
      normalisation to z). No gradient reaches the codebook through it. The value is q
      exactly (not ``z + sg(q - z)``, q up to one rounding, nor ``q + (z - sg(z))``, NaN when z
      holds a NaN or inf).
    - distance (...) float32 (float64 for float64 inputs): squared L2 or ``1 - cos`` to the chosen
      code, recomputed directly for that code.

    Empty z (no vectors) gives empty outputs. NaN distances count as +inf: a NaN codebook row is
    never chosen while a finite distance exists, and a vector with no finite distance (NaN or
    inf in it) gets index 0, quantized = code 0 and the distance computed for code 0 (NaN/inf).
    """
    dtype = _compute_dtype(z.dtype)
    lead, dim = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, dim)
    with torch.no_grad():
        vectors = _prepare(flat, metric, dtype)
        codes = _prepare(codebook, metric, dtype)
        indices = _nearest(vectors, codes, metric)
        chosen = codes[indices]
        distance = _chosen_distance(vectors, chosen, metric)

    if metric == "l2":
        source = flat
        code = codebook.detach()[indices]
    else:
        source = _prepare(flat, metric, dtype)
        code = chosen
    quantized = _straight_through(code, source).to(z.dtype)
    return VQOutput(quantized.reshape(*lead, dim), indices.reshape(lead), distance.reshape(lead))


def _fractions(budget) -> list[float]:
    """A float, a sequence of floats or a tensor of them, as a list of Python floats."""
    return [float(f) for f in torch.as_tensor(budget, dtype=torch.float64).reshape(-1).tolist()]


def budget_counts(budget, num_regions: int) -> list[int]:
    """Regions per grain for ``budget`` (finest grain first), by cumulative rounding.

    ``n_cum[i] = floor(cumsum(budget)[i] * num_regions + 0.5)`` and ``n[i] = n_cum[i] - n_cum[i-1]``,
    so the counts add up to the rounded total rather than accumulating one rounding per grain.
    """
    counts, total, previous = [], 0.0, 0
    for fraction in _fractions(budget):
        total += fraction
        cumulative = min(math.floor(total * num_regions + 0.5), num_regions)
        counts.append(cumulative - previous)
        previous = cumulative
    return counts


def grain_from_budget(router_logits: torch.Tensor, budget) -> torch.Tensor:
    """Per-region grains meeting the budget exactly in every image.

    router_logits: (B, H, W, G), G >= 2. budget: for G = 2 a fraction f in [0, 1] (or a
    1-sequence); for G > 2 a sequence of G - 1 fractions, FINEST grain first, summing to <= 1.
    Returns grain (B, H, W) int64.

    Counts come from :func:`budget_counts` (G = 2: exactly ``floor(f * H * W + 0.5)`` fine
    regions per image). Grains are allocated greedily from the finest down: grain G - 1 takes the
    top n_0 regions by ``logits[..., G-1] - logits[..., 0]``; grain G - 2 the top n_1 of the
    regions left by ``logits[..., G-2] - logits[..., 0]``; and so on; the rest get grain 0. Equal
    scores go to the lower raster index ``h * W + w``. Scores are taken in float32 (float64 for
    float64 logits) so half-precision logits do not round distinct scores into ties.
    """
    B, H, W, G = router_logits.shape
    logits = rearrange(router_logits.to(_compute_dtype(router_logits.dtype)), "b h w g -> b (h w) g")
    grain = torch.zeros(B, H * W, dtype=torch.int64, device=router_logits.device)
    taken = torch.zeros(B, H * W, dtype=torch.int8, device=router_logits.device)
    for i, count in enumerate(budget_counts(budget, H * W)):
        g = G - 1 - i
        score = logits[..., g] - logits[..., 0]
        # Stable sorts keep raster order among equals: rank by score (ties to the lower index),
        # then move regions already taken by a finer grain behind the free ones.
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        order = order.gather(1, torch.sort(taken.gather(1, order), dim=1, stable=True).indices)
        chosen = order[:, :count]
        grain.scatter_(1, chosen, g)
        taken.scatter_(1, chosen, 1)
    return grain.view(B, H, W)


def _resolve_grain(
    grain: torch.Tensor | None,
    gate: torch.Tensor | None,
    router_logits: torch.Tensor | None,
    budget,
) -> torch.Tensor:
    if grain is not None:
        return grain.to(torch.int64)
    if gate is not None:
        return gate.detach().argmax(-1)
    if budget is None:
        return router_logits.detach().argmax(-1)
    return grain_from_budget(router_logits.detach(), budget)


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest ×factor upsampling of x (B, H, W, ...) to (B, H*factor, W*factor, ...)."""
    return repeat(x, "b h w ... -> b (h fh) (w fw) ...", fh=factor, fw=factor)


def dynamic_quantize(
    features: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    *,
    grain: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    router_logits: torch.Tensor | None = None,
    budget=None,
    metric: str = "l2",
    beta: float = 0.25,
) -> DynamicVQOutput:
    """Dynamic (per-region grain) vector quantization, the DQ-VAE step.

    features: G tensors, coarsest first; ``features[g]`` is (B, D, H * 2**g, W * 2**g).
    codebook: (K, D), shared by all grains.
    Exactly one of:
      grain: (B, H, W) int in [0, G);
      gate: (B, H, W, G) one-hot float (hard Gumbel-softmax, may carry gradient); grain = argmax;
      router_logits: (B, H, W, G); grain = argmax, or :func:`grain_from_budget` when ``budget``
        is given (budget: fraction of fine regions for G = 2, G - 1 fractions finest first else).

    A region (h, w) of grain g is coded by the 4**g vectors
    ``features[g][b, :, h*2**g : (h+1)*2**g, w*2**g : (w+1)*2**g]``, each searched once. The
    coded vector is ``v = gate[b, h, w, g] * features[g][cell]`` when a gate is given (its chosen
    entry is 1.0, so v has the feature's value and the gate receives
    ``<dL/dv, features[g][cell]>``), else ``v = features[g][cell]``. Each v is quantized with
    :func:`vector_quantize` semantics.

    Returns ``DynamicVQOutput``:

    - quantized (B, D, Hf, Wf), Hf = H * 2**(G-1), features' dtype: each code at its cell of the
      grain-g grid, broadcast nearest ×2**(G-1-g) to the finest grid; value q, straight-through
      gradient to v (hence to the features and the gate).
    - indices (B, Hf, Wf) int64, broadcast the same way; grain (B, H, W) int64.
    - loss: ``(beta * sum ||v - sg(q)||^2 + sum ||sg(v) - q||^2) / (N_codes * D)``, the sums over
      every coded vector once (a coarse code broadcast to 4 finest cells counts once, i.e. 1/4 per
      cell), N_codes = sum(n_codes); for cosine v is the normalised vector. float32 (float64 for
      float64 inputs); its gradient reaches the features, the gate and the codebook.
    - n_codes (B,) int64 = sum over regions of 4**grain.
    """
    G = len(features)
    B, D, H, W = features[0].shape
    Hf, Wf = H * 2 ** (G - 1), W * 2 ** (G - 1)
    grain = _resolve_grain(grain, gate, router_logits, budget)
    dtype = _compute_dtype(features[0].dtype)
    codes = _prepare(codebook, metric, dtype)  # keeps the gradient to the codebook for the loss

    quantized = features[0].new_zeros(B, Hf, Wf, D)
    indices = torch.zeros(B, Hf, Wf, dtype=torch.int64, device=codebook.device)
    commitment = codebook_term = codes.new_zeros(())
    n_total = 0
    for g, feature in enumerate(features):
        coded = _upsample(grain == g, 2**g)  # (B, Hg, Wg) cells of the grain-g grid that are coded
        v = rearrange(feature, "b d h w -> b h w d")[coded]  # (N_g, D), raster order over (b, y, x)
        if gate is not None:
            v = v * _upsample(gate[..., g], 2**g)[coded][:, None]
        vq = vector_quantize(v, codebook, metric=metric)

        target = _prepare(v, metric, dtype)
        chosen = codes[vq.indices]
        commitment = commitment + (target - chosen.detach()).pow(2).sum()
        codebook_term = codebook_term + (target.detach() - chosen).pow(2).sum()
        n_total += v.shape[0]

        spread = 2 ** (G - 1 - g)
        grid = quantized.new_zeros(*coded.shape, D).index_put((coded,), vq.quantized)
        quantized = quantized + _upsample(grid, spread)
        code_grid = indices.new_zeros(coded.shape).index_put((coded,), vq.indices)
        indices = indices + _upsample(code_grid, spread)

    loss = (beta * commitment + codebook_term) / (max(n_total, 1) * D)
    n_codes = (4**grain).sum((1, 2))
    return DynamicVQOutput(rearrange(quantized, "b h w d -> b d h w"), indices, grain, loss, n_codes)


def c2f_flatten(indices: torch.Tensor, grain: torch.Tensor, *, num_grains: int | None = None) -> C2FTokens:
    """The coarse-to-fine token sequence of a dynamic code map.

    indices: (B, Hf, Wf) int, codes broadcast to the finest grid (as from :func:`dynamic_quantize`);
    grain: (B, H, W) int; num_grains: G, by default inferred from Hf / H = 2**(G-1).

    Segment g holds, per image, the codes of the cells of the grain-g grid (H * 2**g, W * 2**g)
    that belong to regions of grain g, in raster (row-first) order over that grid, with their raster
    positions in it; capacity H * W * 4**g, padded with -1. For G = 2 this is the DQ-Transformer
    order: coarse codes in raster order of coarse regions, then fine codes in row-first order over
    the 2H x 2W grid restricted to fine regions.
    """
    B, H, W = grain.shape
    G = num_grains if num_grains is not None else (indices.shape[1] // H).bit_length()
    codes, positions, lengths = [], [], []
    for g in range(G):
        stride = 2 ** (G - 1 - g)
        cell_codes = rearrange(indices[:, ::stride, ::stride], "b h w -> b (h w)")  # one per grain-g cell
        coded = rearrange(_upsample(grain == g, 2**g), "b h w -> b (h w)")
        # A stable sort on "not coded" brings the coded cells to the front in raster order.
        order = torch.sort((~coded).to(torch.int8), dim=1, stable=True).indices
        count = coded.sum(1)
        real = torch.arange(coded.shape[1], device=grain.device) < count[:, None]
        codes.append(torch.where(real, cell_codes.gather(1, order).to(torch.int64), -1))
        positions.append(torch.where(real, order, -1))
        lengths.append(count)
    return C2FTokens(tuple(codes), tuple(positions), torch.stack(lengths, 1).to(torch.int64), (H, W))


def c2f_unflatten(tokens: C2FTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`c2f_flatten`.

    tokens: ``C2FTokens`` for G grains over an (H, W) coarsest grid.
    Returns (indices (B, Hf, Wf) int64 broadcast nearest to the finest grid, grain (B, H, W) int64).
    """
    H, W = tokens.grid_size
    G = len(tokens.codes)
    B = tokens.lengths.shape[0]
    device = tokens.lengths.device
    indices = torch.zeros(B, H * 2 ** (G - 1), W * 2 ** (G - 1), dtype=torch.int64, device=device)
    grain = torch.zeros(B, H, W, dtype=torch.int64, device=device)
    for g in range(G):
        side = 2**g
        cells = H * W * 4**g
        real = tokens.positions[g] >= 0
        # Padding is written to one extra slot past the grid, then dropped.
        slot = torch.where(real, tokens.positions[g], cells)
        code_grid = torch.zeros(B, cells + 1, dtype=torch.int64, device=device)
        code_grid.scatter_(1, slot, tokens.codes[g].to(torch.int64))
        coded = torch.zeros(B, cells + 1, dtype=torch.bool, device=device)
        coded.scatter_(1, slot, real)
        code_grid = rearrange(code_grid[:, :cells], "b (h w) -> b h w", h=H * side)
        coded = rearrange(coded[:, :cells], "b (h w) -> b h w", h=H * side)
        indices = indices + _upsample(code_grid, 2 ** (G - 1 - g))
        region = rearrange(coded, "b (h sh) (w sw) -> b h w (sh sw)", sh=side, sw=side).any(-1)
        grain = grain + g * region
    return indices, grain


def code_statistics(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code count and sum of the vectors assigned to it (the EMA codebook statistics).

    x: (N, D) float; indices: (N,) int in [0, num_codes). Returns counts (num_codes,) float32 and
    sums (num_codes, D) float32 (float64 for float64 x). bincount / index_add: O(N * D) work and
    memory, no N x K one-hot. Not differentiable.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    counts = torch.bincount(indices, minlength=num_codes).to(acc)
    sums = torch.zeros(num_codes, x.shape[1], dtype=acc, device=x.device)
    sums.index_add_(0, indices, x.detach().to(acc))
    return counts, sums
