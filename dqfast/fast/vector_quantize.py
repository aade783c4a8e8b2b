"""Vector quantization as a chunked ``addmm`` + ``argmin`` (fast path off the GPU).

The reference evaluates ``||z||^2 - 2 z.c + ||c||^2`` as three N x K passes (matmul, two
broadcast adds) before the argmin. Here a block of rows at a time goes through one ``addmm``
whose bias is ``||c||^2``: ``||z||^2`` is the same for every code of a row, so it cannot move the
argmin and is left out. The block's distance matrix (at most ``CHUNK_ENTRIES`` fp32 values) stays
in cache for the row minimum, and never more than that exists at once, whatever N is.

Non-finite input (the documented rule, shared with the reference and the kernels): a distance
that is NaN counts as +inf. A code with a non-finite entry is at distance NaN or inf from every
vector, so it is never chosen (its bias is set to +inf and its row zeroed in the matmul); a vector
with a non-finite entry is at distance NaN or inf from every code, so all its distances count as
+inf and it takes the lowest index, 0. The returned distance is that of the chosen code, computed
as the reference does: ``sum((z - c)^2)`` (l2) or ``1 - zn.cn`` (cosine), so it is NaN/inf there.

``code_statistics`` uses ``bincount`` and ``index_add_``; ``dynamic_quantize`` is the reference's
algorithm with this search inside (a region is searched once, at its grain), except for small
maps without autograd, where one search over every cell of every grain and a gather of the coded
ones takes half the torch calls (``COMPACT_MAX_WORK``; ``dqfast.describe`` names the method).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dqfast.types import DynamicVQOutput, VQOutput

__all__ = [
    "vector_quantize",
    "dynamic_quantize",
    "code_statistics",
    "nearest_code",
    "vector_quantize_reasons",
    "dynamic_quantize_reasons",
    "code_statistics_reasons",
]

NORMALIZE_EPS = 1e-12  # F.normalize's default, as in the reference

# Distance entries evaluated at once: 2**18 fp32 values (1 MiB) keep a block's distances in the
# L2 cache between the addmm that writes them and the argmin that reads them.
CHUNK_ENTRIES = 1 << 18


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(x: torch.Tensor, metric: str, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return F.normalize(x, dim=-1, eps=NORMALIZE_EPS) if metric == "cosine" else x


class _CodeTable(NamedTuple):
    """What the search needs of a codebook (prepared: compute dtype, normalised for cosine).

    codes: (K, D) the prepared codes with non-finite rows zeroed; bias: (K,) the addmm bias,
    ``||c||^2`` for l2 and 0 for cosine, +inf for a non-finite code; prepared: the prepared codes
    themselves (non-finite rows kept), for gathering the chosen code.
    """

    codes: torch.Tensor
    bias: torch.Tensor
    prepared: torch.Tensor


def _code_table(prepared: torch.Tensor, metric: str) -> _CodeTable:
    bias = prepared.pow(2).sum(-1) if metric == "l2" else prepared.new_zeros(prepared.shape[0])
    if math.isfinite((bias if metric == "l2" else prepared).sum().item()):
        return _CodeTable(prepared, bias, prepared)
    bad = ~torch.isfinite(prepared).all(-1)
    codes = torch.where(bad[:, None], 0, prepared)
    bias = torch.where(bad, math.inf, codes.pow(2).sum(-1) if metric == "l2" else bias)
    return _CodeTable(codes, bias, prepared)


# id(codebook) -> (weakref, stamp, table with ``codebook`` itself replaced by None): a model's
# codebook is prepared once per version (``Tensor._version`` moves with every in-place update,
# e.g. an EMA or optimizer step). The entry never holds the codebook, so it dies with it.
_TABLES: dict[int, tuple] = {}


def _cached_code_table(codebook: torch.Tensor, metric: str, dtype: torch.dtype) -> _CodeTable:
    if codebook.is_inference() or (torch.is_grad_enabled() and codebook.requires_grad):
        return _code_table(_prepare(codebook.detach(), metric, dtype), metric)
    key = id(codebook)
    stamp = (codebook._version, metric, dtype)
    entry = _TABLES.get(key)
    if entry is None or entry[0]() is not codebook or entry[1] != stamp:
        with torch.inference_mode(False):  # normal tensors, usable by later autograd-recorded calls
            table = _code_table(_prepare(codebook.detach(), metric, dtype), metric)
        stored = _CodeTable(*(None if t is codebook else t for t in table))
        _TABLES[key] = (weakref.ref(codebook, lambda _, key=key: _TABLES.pop(key, None)), stamp, stored)
        return table
    return _CodeTable(*(codebook if t is None else t for t in entry[2]))


def _search(z: torch.Tensor, table: _CodeTable, metric: str) -> torch.Tensor:
    """Index (N,) int64 of the lowest ``bias - alpha * z.c`` of every row, a block of rows at a time.

    ``torch.min`` along a dim returns the first minimum like ``argmin`` and is 2-3x faster than it
    on CPU here (256 x 64: 17 vs 37 us; 1024 x 256: 179 vs 436 us).
    """
    N, K = z.shape[0], table.codes.shape[0]
    alpha = -2.0 if metric == "l2" else -1.0
    codes_t = table.codes.T
    rows = min(max(1, CHUNK_ENTRIES // K), N)
    if rows == N:  # one block: no preallocated buffers to slice
        return torch.addmm(table.bias, z, codes_t, alpha=alpha).min(1).indices
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    scores = z.new_empty(rows, K)
    best = z.new_empty(rows)
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        block = scores[: stop - start]
        torch.addmm(table.bias, z[start:stop], codes_t, alpha=alpha, out=block)
        torch.min(block, 1, out=(best[: stop - start], indices[start:stop]))
    return indices


def nearest_code(z: torch.Tensor, codes: torch.Tensor, metric: str, table: _CodeTable | None = None) -> torch.Tensor:
    """Index of the nearest code of every row, ties to the lowest index; NaN distances count as +inf.

    z: (N, D), codes: (K, D), both in the compute dtype (and normalised for cosine); ``table``:
    the prepared codes, when the caller has them. Returns (N,) int64. l2 ranks codes by
    ``||c||^2 - 2 z.c``, cosine by ``-z.c``; a row with a non-finite entry gets index 0.
    """
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=z.device)
    table = _code_table(codes, metric) if table is None else table
    if math.isfinite(z.sum().item()):
        return _search(z, table, metric)
    bad_rows = ~torch.isfinite(z).all(-1)
    return _search(torch.where(bad_rows[:, None], 0, z), table, metric).masked_fill_(bad_rows, 0)


def _chosen_distance(z: torch.Tensor, code: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "l2":
        return (z - code).pow(2).sum(-1)
    return 1 - (z * code).sum(-1)


class _StraightThrough(torch.autograd.Function):
    """Value ``code`` (cast to ``dtype``), gradient passed unchanged to ``source``.

    Equal to the reference's ``(code + (source - sg(source))).to(dtype)`` in value and gradient,
    without its two elementwise passes.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.source_dtype = source.dtype
        return code.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.source_dtype), None, None


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2") -> VQOutput:
    """Nearest-code search (fast path), same contract as the reference.

    z: (..., D); codebook: (K, D). Returns VQOutput(quantized (..., D), indices (...) int64,
    distance (...) float32, or float64 for float64 input).
    """
    dtype = _compute_dtype(z.dtype)
    lead, dim = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, dim)
    with torch.no_grad():
        vectors = _prepare(flat.detach(), metric, dtype)
        table = _cached_code_table(codebook, metric, dtype)
        if vectors.shape[0] == 0:
            indices = torch.empty(0, dtype=torch.int64, device=z.device)
        elif math.isfinite(vectors.sum().item()):
            indices = _search(vectors, table, metric)
        else:
            indices = nearest_code(vectors, table.codes, metric, table)
        chosen = F.embedding(indices, table.prepared)
        distance = _chosen_distance(vectors, chosen, metric)
    if metric == "l2":
        code = F.embedding(indices, codebook.detach()) if codebook.dtype != dtype else chosen
        source = flat
    else:
        code = chosen
        source = _prepare(flat, metric, dtype) if flat.requires_grad else None
    if source is not None and source.requires_grad:
        quantized = _StraightThrough.apply(source, code, z.dtype)
    else:
        quantized = code.to(z.dtype)
    return VQOutput(quantized.reshape(*lead, dim), indices.reshape(lead), distance.reshape(lead))


# ----------------------------------------------------------------------------------------------
# Dynamic quantization
# ----------------------------------------------------------------------------------------------


def _resolve_grain(grain, gate, router_logits, budget) -> torch.Tensor:
    if grain is not None:
        return grain.to(torch.int64)
    if gate is not None:
        return gate.detach().argmax(-1)
    if budget is None:
        return router_logits.detach().argmax(-1)
    from dqfast import ops  # the exact-budget allocation is shared, not re-derived here

    return ops.grain_from_budget(router_logits.detach(), budget)


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest x``factor`` of x (B, H, W, ...) to (B, H * factor, W * factor, ...)."""
    if factor == 1:
        return x
    B, H, W, *rest = x.shape
    # One copy from a broadcast view (two repeat_interleave calls make two copies via gathers).
    return x[:, :, None, :, None].expand(B, H, factor, W, factor, *rest).reshape(B, H * factor, W * factor, *rest)


# Without autograd, calls whose search over *every* cell of every grain costs at most this many
# multiply-adds (N_all * K * D, N_all = B * H * W * (1 + 4 + ... + 4**(G-1))) take the compact
# path: one search over all cells instead of one gather-and-search per grain. It does up to
# (4**G - 1) / 3 times the distance work of searching the coded cells only, but half the torch
# calls, which is what small maps cost. Measured on one CPU thread (G = 2, budget 0.5): 83 vs
# 168 us at 2.6e5 multiply-adds, 204 vs 245 us at 2.6e6, 655 vs 539 us at 1.0e7.
COMPACT_MAX_WORK = 1 << 22

# (G, B, H, W, device) -> (G, B, H, s, W, s) int64, s = 2**(G-1): the row of the all-cells matrix
# that fills finest cell (y * s + i, x * s + j) when its region (y, x) has grain g. A handful of
# shapes per process.
_ROW_TABLES: dict[tuple, torch.Tensor] = {}


def _row_table(G: int, B: int, H: int, W: int, device: torch.device) -> torch.Tensor:
    key = (G, B, H, W, device)
    table = _ROW_TABLES.get(key)
    if table is None:
        if len(_ROW_TABLES) >= 64:
            _ROW_TABLES.clear()
        tables, offset = [], 0
        with torch.inference_mode(False):
            for g in range(G):
                Hg, Wg = H * 2**g, W * 2**g
                rows = torch.arange(offset, offset + B * Hg * Wg, device=device).view(B, Hg, Wg, 1)
                tables.append(_upsample(rows, 2 ** (G - 1 - g)).squeeze(-1))
                offset += B * Hg * Wg
            s = 2 ** (G - 1)
            table = _ROW_TABLES[key] = torch.stack(tables).view(G, B, H, s, W, s)
    return table


def _compact_work(features, codebook) -> int:
    """Multiply-adds of searching every cell of every grain: N_all * K * D."""
    B, D, H, W = features[0].shape
    return B * H * W * (4 ** len(features) - 1) // 3 * codebook.shape[0] * D


def _compact_serves(features, codebook, gate) -> bool:
    """Whether the compact path serves the call: no autograd, no gate, small enough."""
    recording = torch.is_grad_enabled() and (codebook.requires_grad or any(f.requires_grad for f in features))
    return gate is None and not recording and 0 < _compact_work(features, codebook) <= COMPACT_MAX_WORK


def _dynamic_quantize_compact(features, codebook, grain, table, metric, beta, dtype) -> DynamicVQOutput | None:
    """Inference with small maps: every cell of every grain searched in one matrix, the coded ones
    then picked by a gather. None when a vector is not finite (the general path handles that)."""
    G = len(features)
    B, D, H, W = features[0].shape
    row_table = _row_table(G, B, H, W, features[0].device)
    n_all = sum(f.shape[0] * f.shape[2] * f.shape[3] for f in features)
    vectors = torch.empty(n_all, D, dtype=dtype, device=features[0].device)
    start = 0
    for f in features:
        stop = start + f.shape[0] * f.shape[2] * f.shape[3]
        vectors[start:stop].view(f.shape[0], f.shape[2], f.shape[3], D).copy_(f.permute(0, 2, 3, 1))
        start = stop
    if metric == "cosine":
        vectors = F.normalize(vectors, dim=-1, eps=NORMALIZE_EPS)
    if not math.isfinite(vectors.sum().item()):
        return None
    best = _search(vectors, table, metric)  # (n_all,)
    # The row filling every finest cell: its region's grain picks one of the G tables.
    s = row_table.shape[3]
    rowmap = row_table.gather(0, grain[None, :, :, None, :, None].expand(1, B, H, s, W, s)).view(B, H * s, W * s)
    indices = best.take(rowmap)
    source = codebook if metric == "l2" else table.prepared
    quantized = F.embedding(indices, source).to(features[0].dtype)
    # Loss: every coded vector once (both terms have the same value without autograd), i.e. the
    # squared distances of the rows that fill some cell, each weighted (1 + beta) / D.
    sq = (vectors - F.embedding(best, table.prepared)).pow_(2).sum(-1)
    coded = torch.zeros(n_all, dtype=dtype, device=vectors.device).index_fill_(0, rowmap.view(-1), (beta + 1) / D)
    n_codes = torch.pow(4, grain).sum((1, 2))
    loss = torch.dot(sq, coded) / n_codes.sum()  # every region has at least one code: never 0
    return DynamicVQOutput(quantized.permute(0, 3, 1, 2), indices, grain, loss, n_codes)


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
    """Dynamic (per-region grain) vector quantization (fast path), same contract as the reference.

    Every coded vector is searched once at its grain with :func:`nearest_code`; the finest grid
    is then filled by one gather from the chosen codes of all grains (each grain-g cell fills its
    2**(G-1-g) square block), whose backward sums a broadcast code's gradient as the reference's
    broadcast does.
    """
    G = len(features)
    B, D, H, W = features[0].shape
    Hf, Wf = H * 2 ** (G - 1), W * 2 ** (G - 1)
    grain = _resolve_grain(grain, gate, router_logits, budget)
    dtype = _compute_dtype(features[0].dtype)
    recording = torch.is_grad_enabled()
    if _compact_serves(features, codebook, gate):
        # (A no_grad block costs ~10 us at this size; it is entered only when grad mode is on.)
        with torch.no_grad() if recording else contextlib.nullcontext():
            out = _dynamic_quantize_compact(
                features, codebook.detach(), grain, _cached_code_table(codebook, metric, dtype), metric, beta, dtype
            )
        if out is not None:
            return out
    with torch.no_grad():
        table = _cached_code_table(codebook, metric, dtype)
    codes = _prepare(codebook, metric, dtype)  # keeps the gradient to the codebook for the loss
    rowmap = None  # (B, Hf, Wf): the row of ``all_q`` / ``all_idx`` that fills every finest cell
    all_q, all_idx = [], []
    commitment = codebook_term = codes.new_zeros(())
    n_total = 0
    for g, feature in enumerate(features):
        coded = _upsample(grain == g, 2**g)  # (B, Hg, Wg)
        cells = coded.reshape(-1).nonzero().squeeze(1)  # raster order over (b, y, x)
        v = feature.permute(0, 2, 3, 1).reshape(-1, D).index_select(0, cells)  # (N_g, D)
        if gate is not None:
            v = v * _upsample(gate[..., g], 2**g).reshape(-1).index_select(0, cells)[:, None]
        target = _prepare(v, metric, dtype)
        with torch.no_grad():
            idx = nearest_code(target.detach(), table.codes, metric, table)
        if metric == "l2":
            q = F.embedding(idx, codebook.detach())
            source = v
        else:
            q = F.embedding(idx, table.prepared)
            source = target
        q = _StraightThrough.apply(source, q, feature.dtype) if source.requires_grad else q.to(feature.dtype)
        if recording:
            chosen = F.embedding(idx, codes)
            commitment = commitment + (target - chosen.detach()).pow(2).sum()
            codebook_term = codebook_term + (target.detach() - chosen).pow(2).sum()
        else:  # the two terms have the same value
            commitment = commitment + (target - F.embedding(idx, table.prepared)).pow(2).sum()
        # The rows of this grain's codes, on its grid, then broadcast to the finest grid.
        rows = torch.full(coded.shape, -1, dtype=torch.int64, device=cells.device)
        rows.view(-1).index_copy_(0, cells, torch.arange(n_total, n_total + cells.shape[0], device=cells.device))
        rows = _upsample(rows, 2 ** (G - 1 - g))
        rowmap = rows if rowmap is None else torch.where(rows >= 0, rows, rowmap)
        all_q.append(q)
        all_idx.append(idx)
        n_total += cells.shape[0]
    if not recording:
        codebook_term = commitment
    all_q = torch.cat(all_q) if G > 1 else all_q[0]
    quantized = F.embedding(rowmap, all_q) if n_total else features[0].new_zeros(B, Hf, Wf, D) + all_q.sum()
    indices = (torch.cat(all_idx) if G > 1 else all_idx[0])[rowmap] if n_total else rowmap.clamp_min(0)

    loss = (beta * commitment + codebook_term) / (max(n_total, 1) * D)
    n_codes = (4**grain).sum((1, 2))
    return DynamicVQOutput(quantized.permute(0, 3, 1, 2), indices, grain, loss, n_codes)


# ----------------------------------------------------------------------------------------------
# Code statistics
# ----------------------------------------------------------------------------------------------


def code_statistics(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code count (num_codes,) and sum (num_codes, D) of the vectors assigned to each code.

    float32 (float64 for float64 x); ``bincount`` and ``index_add_``, no N x K one-hot.
    """
    acc = _compute_dtype(x.dtype)
    indices = indices.to(torch.int64)
    counts = torch.bincount(indices, minlength=num_codes).to(acc)
    sums = torch.zeros(num_codes, x.shape[1], dtype=acc, device=x.device)
    sums.index_add_(0, indices, x.detach().to(acc))
    return counts, sums


def vector_quantize_reasons(z, codebook, *, metric="l2") -> list[str]:
    """Why the fast path cannot serve this call: never, for a call the ops layer accepted."""
    return []


def dynamic_quantize_reasons(features, codebook, **kwargs) -> list[str]:
    return []


def dynamic_quantize_detail(features, codebook, *, gate=None, **kwargs) -> str:
    """Which method serves the call (:func:`dqfast.describe` shows it)."""
    work = _compact_work(features, codebook)
    if _compact_serves(features, codebook, gate):
        return (
            f"compact: every cell of every grain searched in one matrix ({work} multiply-adds <= "
            f"COMPACT_MAX_WORK = {COMPACT_MAX_WORK}, no autograd, no gate)"
        )
    return "per grain: its coded cells gathered, each searched once"


def code_statistics_reasons(x, indices, num_codes) -> list[str]:
    return []
