"""DQ-Transformer: coarse-to-fine autoregressive generation of DQ-VAE codes (Huang et al., CVPR 2023).

The sequence of one image (dual grain, H x W coarse regions, 2H x 2W fine cells)::

    coarse segment (capacity H*W + 2)          fine segment (capacity 4*H*W + 1)
    [sos, c_1 ... c_n, eos, pad ... pad]       [f_1 ... f_m, eos, pad ... pad]

with the coarse codes in raster order of their regions and the fine codes in row-first order over
the fine grid restricted to fine regions (:func:`dqfast.c2f_flatten`). Every token has a content
id (a code, or pad / eos / sos) and a position id (its cell in the grid of its segment, or a
special). The pads in the middle of the sequence are masked out of attention
(:class:`dqfast.C2FLayout`; the released code attended to them).

Two stacked causal transformers: the position transformer reads content + position + absolute
index + segment embeddings and predicts the position of the next token; the content transformer
reads its hidden states plus the embedding of that next position and predicts the next code.

Sampling and valid grain maps: coarse positions are sampled in increasing raster order (the order
of the training data) among the positions after the last one, plus eos; the fine segment must
then hold exactly the 4 children of every region not coded coarse, in row-first order over the
fine grid, so its positions are determined and only its codes are sampled. Every sample is
therefore a valid grain map, and every coarse position can be sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

import dqfast
from dqfast.models.registry import register
from dqfast.nn import C2FAttention
from dqfast.types import C2FTokens

__all__ = ["DQTransformer", "DQSequence"]


class DQSequence(NamedTuple):
    """A batch of coarse-to-fine sequences with their teacher-forcing targets.

    content: (B, L) int64 content ids (codes, or the model's pad / eos / sos ids).
    position: (B, L) int64 global position ids (coarse table first, then the fine table).
    layout: the :class:`dqfast.C2FLayout` (which positions are real).
    next_position: (B, L) int64 global position id of the next real token (pad where none).
    target_content: (B, L) int64 content id of the next real token.
    has_target: (B, L) bool, real tokens that have a next token (all but the final eos).
    target_fine: (B, L) bool, the next token lies in the fine segment.
    """

    content: torch.Tensor
    position: torch.Tensor
    layout: dqfast.C2FLayout
    next_position: torch.Tensor
    target_content: torch.Tensor
    has_target: torch.Tensor
    target_fine: torch.Tensor


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)). x: (B, L, width)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = C2FAttention(width, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, layout: dqfast.C2FLayout) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))

    def step(self, x: torch.Tensor, cache, valid: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, width), the next position of the sequence decoded against ``cache``."""
        x = x + self.attn.step(self.norm1(x), cache, valid)
        return x + self.mlp(self.norm2(x))


class DQTransformer(nn.Module):
    """Coarse-to-fine generator over dual-grain DQ-VAE codes.

    Args:
        codebook_size: K codes; content ids K, K + 1, K + 2 are pad, eos, sos.
        grid_size: (H, W) (or an int) coarse region grid; the fine grid is (2H, 2W).
        width, num_heads, position_layers, content_layers, mlp_ratio, dropout: transformer sizes.
        num_classes: > 0 for class conditioning: the label's embedding is added to the sos token;
            id ``num_classes`` means "no label" (unconditional samples from a conditional model).

    Position ids: the coarse table holds rows 0 .. H*W - 1 (regions) then pad, eos, sos; the fine
    table follows it, 4*H*W cells then pad, eos, sos.
    """

    def __init__(
        self,
        *,
        codebook_size: int = 1024,
        grid_size: int | Sequence[int] = 16,
        width: int = 1024,
        num_heads: int = 8,
        position_layers: int = 6,
        content_layers: int = 18,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_classes: int = 0,
    ):
        super().__init__()
        H, W = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.grid_size = (int(H), int(W))
        self.codebook_size, self.num_classes, self.width = codebook_size, num_classes, width
        K = codebook_size
        self.pad_id, self.eos_id, self.sos_id = K, K + 1, K + 2
        self.num_regions = R = H * W
        # Position vocab: coarse table [0, Pc), fine table [Pc, Pc + Pf).
        self.coarse_positions, self.fine_positions = R + 3, 4 * R + 3
        self.coarse_capacity, self.fine_capacity = R + 2, 4 * R + 1
        self.seq_len = self.coarse_capacity + self.fine_capacity

        self.content_embedding = nn.Embedding(K + 3, width)
        self.position_embedding = nn.Embedding(self.coarse_positions + self.fine_positions, width)
        self.index_embedding = nn.Embedding(self.seq_len, width)
        self.segment_embedding = nn.Embedding(2, width)
        self.label_embedding = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.next_position_embedding = nn.Embedding(self.coarse_positions + self.fine_positions, width)
        self.position_blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout) for _ in range(position_layers)
        )
        self.position_norm = nn.LayerNorm(width)
        self.position_head = nn.Linear(width, self.coarse_positions + self.fine_positions)
        self.content_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, dropout) for _ in range(content_layers))
        self.content_norm = nn.LayerNorm(width)
        self.content_head = nn.Linear(width, K + 3)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- position ids ---------------------------------------------------------------------------

    def _special(self, name: str, fine: bool) -> int:
        """Global position id of a special ('pad', 'eos', 'sos') in the coarse or fine table."""
        local = {"pad": 0, "eos": 1, "sos": 2}[name]
        return self.coarse_positions + 4 * self.num_regions + local if fine else self.num_regions + local

    # -- sequences ------------------------------------------------------------------------------

    def _check_tokens(self, tokens: C2FTokens) -> None:
        if not isinstance(tokens, C2FTokens):
            raise TypeError(f"tokens must be a dqfast.C2FTokens, got {type(tokens).__name__}")
        if len(tokens.codes) != 2:
            raise ValueError(f"the DQ-Transformer models dual-grain tokens (G = 2), got G = {len(tokens.codes)}")
        if tuple(tokens.grid_size) != self.grid_size:
            raise ValueError(f"tokens.grid_size {tuple(tokens.grid_size)} does not match the model's {self.grid_size}")
        for codes in tokens.codes:
            if codes.numel() and int(codes.max()) >= self.codebook_size:
                raise ValueError(f"tokens.codes must lie in [0, {self.codebook_size}) (or -1 for padding)")

    def sequence(self, tokens: C2FTokens) -> DQSequence:
        """The model's input sequence and teacher-forcing targets for ``tokens`` (G = 2)."""
        self._check_tokens(tokens)
        device = tokens.lengths.device
        B = tokens.lengths.shape[0]
        n_coarse, n_fine = tokens.lengths[:, 0], tokens.lengths[:, 1]
        Cc, L = self.coarse_capacity, self.seq_len

        def column(value: int) -> torch.Tensor:
            return torch.full((B, 1), value, dtype=torch.int64, device=device)

        def segment(codes, positions, count, fine: bool, lead: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            """[lead specials, codes..., one pad] with eos written right after the codes."""
            real = positions >= 0
            offset = self.coarse_positions if fine else 0
            content = torch.where(real, codes.long(), self.pad_id)
            position = torch.where(real, positions.long() + offset, self._special("pad", fine))
            content = torch.cat([column(self.sos_id)] * len(lead) + [content, column(self.pad_id)], 1)
            position = torch.cat(
                [column(self._special(s, fine)) for s in lead] + [position, column(self._special("pad", fine))], 1
            )
            eos_at = (count + len(lead))[:, None]
            content = content.scatter(1, eos_at, self.eos_id)
            position = position.scatter(1, eos_at, self._special("eos", fine))
            return content, position

        content_c, position_c = segment(tokens.codes[0], tokens.positions[0], n_coarse, False, ["sos"])
        content_f, position_f = segment(tokens.codes[1], tokens.positions[1], n_fine, True, [])
        content = torch.cat([content_c, content_f], 1)
        position = torch.cat([position_c, position_f], 1)
        layout = dqfast.C2FLayout.dq_transformer(n_coarse, n_fine, self.num_regions, 4 * self.num_regions)

        # The token after the coarse eos is the first of the fine segment, across the pads.
        index = torch.arange(L, device=device)
        next_index = (index + 1).expand(B, L).scatter(1, (n_coarse + 1)[:, None], Cc).clamp(max=L - 1)
        has_target = layout.key_valid() & (index[None] != (Cc + n_fine)[:, None])
        next_position = torch.where(has_target, position.gather(1, next_index), self._special("pad", False))
        target_content = content.gather(1, next_index)
        return DQSequence(content, position, layout, next_position, target_content, has_target, next_index >= Cc)

    # -- the network ----------------------------------------------------------------------------

    def _labels(self, labels: torch.Tensor | None, batch_size: int, device) -> torch.Tensor | None:
        if self.label_embedding is None:
            if labels is not None:
                raise ValueError("labels need a class-conditional model (num_classes > 0)")
            return None
        if labels is None:
            return torch.full((batch_size,), self.num_classes, dtype=torch.int64, device=device)
        labels = torch.as_tensor(labels, device=device).long()
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = no label)")
        return labels

    def _embed(
        self, content: torch.Tensor, position: torch.Tensor, start: int, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """content, position: (B, n) ids of sequence indices [start, start + n) -> (B, n, width)."""
        n = content.shape[1]
        index = torch.arange(start, start + n, device=content.device)
        segment = (index >= self.coarse_capacity).long()
        h = self.content_embedding(content) + self.position_embedding(position)
        h = h + self.index_embedding(index) + self.segment_embedding(segment)
        if labels is not None and start == 0:
            h = h.clone()
            h[:, 0] = h[:, 0] + self.label_embedding(labels)
        return h

    def _position_stream(self, h: torch.Tensor, layout: dqfast.C2FLayout) -> torch.Tensor:
        for block in self.position_blocks:
            h = block(h, layout)
        return h

    def _content_stream(self, h: torch.Tensor, next_position: torch.Tensor, layout: dqfast.C2FLayout) -> torch.Tensor:
        c = h + self.next_position_embedding(next_position)
        for block in self.content_blocks:
            c = block(c, layout)
        return c

    def _streams(self, seq: DQSequence, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L, width) of the position and the content transformer."""
        labels = self._labels(labels, seq.content.shape[0], seq.content.device)
        h = self._position_stream(self._embed(seq.content, seq.position, 0, labels), seq.layout)
        return h, self._content_stream(h, seq.next_position, seq.layout)

    def forward(self, sequence: DQSequence, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing over a whole sequence (from :meth:`sequence`).

        Returns (position_logits (B, L, Pc + Pf), content_logits (B, L, K + 3)): at every index the
        scores of the next token's position (both tables) and content.
        """
        h, c = self._streams(sequence, labels)
        return self.position_head(self.position_norm(h)), self.content_head(self.content_norm(c))

    def loss(
        self, tokens: C2FTokens, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Content CE + mean(coarse position CE, fine position CE) over the real next tokens."""
        seq = self.sequence(tokens)
        h, c = self._streams(seq, labels)
        # Heads only on the rows that have a target: pads and the final eos predict nothing.
        rows = seq.has_target
        content_logits = self.content_head(self.content_norm(c[rows])).float()
        content_ce = F.cross_entropy(content_logits, seq.target_content[rows])
        position_logits = self.position_head(self.position_norm(h[rows])).float()
        target_position, fine = seq.next_position[rows], seq.target_fine[rows]
        Pc = self.coarse_positions
        coarse_ce = F.cross_entropy(position_logits[~fine, :Pc], target_position[~fine])
        fine_ce = F.cross_entropy(position_logits[fine, Pc:], target_position[fine] - Pc)
        loss = content_ce + 0.5 * (coarse_ce + fine_ce)
        return loss, {"content_ce": content_ce, "coarse_position_ce": coarse_ce, "fine_position_ce": fine_ce}

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """batch["tokens"]: C2FTokens from a DQ-VAE's ``encode``; batch["label"]: optional (B,)."""
        loss, parts = self.loss(batch["tokens"], batch.get("label"))
        logs = {"loss": loss.item()}
        logs.update({name: value.item() for name, value in parts.items()})
        return loss, logs

    # -- sampling -------------------------------------------------------------------------------

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        allowed: torch.Tensor,
        uniform: torch.Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
    ) -> torch.Tensor:
        """One id per row of logits (B, V) among the allowed ones, by inverting the CDF at ``uniform`` (B,).

        Every row has at least one allowed id. Drawing the uniforms outside (one per row, at every
        step, whether or not a row's choice is forced) keeps the random stream the same however
        the logits were computed, which is what makes cached and uncached sampling identical.
        """
        scores = (logits.float() / temperature).masked_fill(~allowed, float("-inf"))
        if top_k is not None:
            kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p is not None:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            # Drop an id once the ids before it already hold top_p of the mass (the first always stays).
            drop = (probs.cumsum(-1) - probs) >= top_p
            scores = scores.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        cdf = probs.cumsum(-1)
        choice = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
        last = (probs > 0).long().cumsum(-1).argmax(-1)  # the last id with mass
        return torch.minimum(choice, last)

    def _fine_cells(self, coarse_taken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine cells of the regions not coded coarse, row-first over the fine grid.

        coarse_taken: (B, H*W) bool -> (cells (B, 4HW), counts (B,)): the first counts[b] entries of
        cells[b] are the local fine ids of those cells (the rest are the other cells).
        """
        H, W = self.grid_size
        fine_region = rearrange(~coarse_taken, "b (h w) -> b h w", h=H)
        fine_cell = rearrange(repeat(fine_region, "b h w -> b (h 2) (w 2)"), "b h w -> b (h w)")
        order = torch.sort((~fine_cell).to(torch.int8), dim=1, stable=True).indices
        return order, fine_cell.sum(1)

    def _allowed_next_positions(
        self,
        t: int,
        now: torch.Tensor,
        current: torch.Tensor,
        coarse_taken: torch.Tensor,
        last_coarse: torch.Tensor,
        fixed: torch.Tensor | None,
        required: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, Pc + Pf) bool: the positions the token after index t may take.

        now: (B,) index t is a real token; current: (B,) its content id; coarse_taken: (B, H*W)
        regions coded coarse so far; last_coarse: (B,) the last of them (-1 before any); fixed:
        (B, H*W) the coarse regions in fixed-position mode; required: (B,) exact coarse counts.
        After sos or a coarse code: a later coarse region (raster order) or the coarse eos, within
        the mode's constraints. After the coarse eos or a fine code: the one next fine cell, or the
        fine eos. After the final eos or at a pad: nothing (an all-False row).
        """
        B, R = coarse_taken.shape
        device = coarse_taken.device
        allowed = torch.zeros(B, self.coarse_positions + self.fine_positions, dtype=torch.bool, device=device)
        is_eos = current == self.eos_id
        if t < self.coarse_capacity:
            choosing = now & ~is_eos
            region = torch.arange(R, device=device)
            later = region[None] > last_coarse[:, None]
            if fixed is not None:
                candidates = fixed & later
                coarse_ok = candidates & (candidates.long().cumsum(1) == 1)  # the next one only
                eos_ok = ~candidates.any(1)
            elif required is not None:
                # Index t holds coarse code number t; leave room for the codes still required.
                room = region[None] <= (R - required + t)[:, None]
                coarse_ok = later & room & (t < required)[:, None]
                eos_ok = t >= required
            else:
                coarse_ok, eos_ok = later, torch.ones(B, dtype=torch.bool, device=device)
            allowed[:, :R] = coarse_ok & choosing[:, None]
            allowed[:, self._special("eos", False)] = eos_ok & choosing
            entering = now & is_eos
            emitted = 0
        else:
            entering = now & ~is_eos
            emitted = t - self.coarse_capacity + 1
        # Fine codes already placed: `emitted`; the next is that cell of the row-first list, or eos.
        cells, n_fine = self._fine_cells(coarse_taken)
        cell = cells[:, min(emitted, 4 * R - 1)] + self.coarse_positions
        forced = torch.where(emitted < n_fine, cell, self._special("eos", True))
        rows = torch.arange(B, device=device)
        allowed[rows[entering], forced[entering]] = True
        return allowed

    def _coarse_counts(self, batch_size: int, coarse_count, budget, device) -> torch.Tensor | None:
        R = self.num_regions
        if coarse_count is not None and budget is not None:
            raise ValueError("give at most one of coarse_count and budget")
        if budget is not None:
            if not 0.0 <= float(budget) <= 1.0:
                raise ValueError(f"budget (fraction of fine regions) must lie in [0, 1], got {budget}")
            # The rounding of dqfast.grain_from_budget: floor(f * H * W + 0.5) fine regions.
            coarse_count = R - math.floor(float(budget) * R + 0.5)
        if coarse_count is None:
            return None
        counts = torch.as_tensor(coarse_count, device=device).long().expand(batch_size).clone()
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > R):
            raise ValueError(f"coarse_count must lie in [0, {R}], got {coarse_count}")
        return counts

    @torch.no_grad()
    def generate(
        self,
        batch_size: int,
        *,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        grain: torch.Tensor | None = None,
        coarse_count: int | torch.Tensor | None = None,
        budget: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> C2FTokens:
        """Sample ``batch_size`` token sequences; returns :class:`dqfast.C2FTokens` (decode them with
        ``DQVAE.decode``).

        labels: (B,) class ids (class-conditional models; default "no label").
        temperature, top_k, top_p: applied to the position and the code distributions.
        grain: (B, H, W) int, 0 = coarse, 1 = fine: fixed-position mode, only codes are sampled.
        coarse_count: int or (B,) exact number of coarse regions per image; or ``budget``, the
            fraction of fine regions (rounded like :func:`dqfast.grain_from_budget`).
        generator: torch.Generator for the uniforms (on the model's device).
        use_cache: decode with KV caches (O(L) per step); False recomputes the prefix at every
            step. Both give identical samples for the same generator state.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        device = self.content_embedding.weight.device
        B, R, K = batch_size, self.num_regions, self.codebook_size
        Cc, L = self.coarse_capacity, self.seq_len
        labels = self._labels(labels, B, device)
        required = self._coarse_counts(B, coarse_count, budget, device)
        fixed = None
        if grain is not None:
            if required is not None:
                raise ValueError("grain fixes the coarse regions; do not also give coarse_count or budget")
            if grain.shape != (B, *self.grid_size):
                raise ValueError(f"grain must have shape {(B, *self.grid_size)}, got {tuple(grain.shape)}")
            if grain.numel() and (int(grain.min()) < 0 or int(grain.max()) > 1):
                raise ValueError("grain must hold 0 (coarse) or 1 (fine)")
            fixed = rearrange(grain.to(device) == 0, "b h w -> b (h w)")
            required = fixed.sum(1)

        rows = torch.arange(B, device=device)
        content = torch.full((B, L), self.pad_id, dtype=torch.int64, device=device)
        position = torch.full((B, L), self._special("pad", False), dtype=torch.int64, device=device)
        position[:, Cc:] = self._special("pad", True)
        next_position = torch.full((B, L), self._special("pad", False), dtype=torch.int64, device=device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=device)
        content[:, 0], position[:, 0], valid[:, 0] = self.sos_id, self._special("sos", False), True
        coarse_taken = torch.zeros(B, R, dtype=torch.bool, device=device)
        last_coarse = torch.full((B,), -1, dtype=torch.int64, device=device)

        if use_cache:
            position_caches = [blk.attn.new_cache(B, L) for blk in self.position_blocks]
            content_caches = [blk.attn.new_cache(B, L) for blk in self.content_blocks]

        for t in range(L):
            if not valid[:, t:].any():
                break
            if not valid[:, t].any():
                continue  # every sample has a pad here: nothing to read or predict
            now = valid[:, t]

            # Position stream at index t.
            if use_cache:
                h = self._embed(content[:, t : t + 1], position[:, t : t + 1], t, labels)
                for block, cache in zip(self.position_blocks, position_caches):
                    h = block.step(h, cache, now[:, None])
                h_prefix = None
            else:
                layout = self._prefix_layout(valid, t + 1)
                h_prefix = self._position_stream(
                    self._embed(content[:, : t + 1], position[:, : t + 1], 0, labels), layout
                )
                h = h_prefix[:, t : t + 1]
            position_logits = self.position_head(self.position_norm(h))[:, 0]

            allowed = self._allowed_next_positions(t, now, content[:, t], coarse_taken, last_coarse, fixed, required)
            idle = ~allowed.any(1)  # pads and the final eos: a placeholder choice, never used
            allowed[idle, self._special("pad", False)] = True
            chosen = self._sample(
                position_logits, allowed, torch.rand(B, generator=generator, device=device), temperature, top_k, top_p
            )
            next_position[:, t] = torch.where(idle, self._special("pad", False), chosen)

            # Content stream at index t, reading the chosen next position.
            if use_cache:
                c = h + self.next_position_embedding(next_position[:, t : t + 1])
                for block, cache in zip(self.content_blocks, content_caches):
                    c = block.step(c, cache, now[:, None])
            else:
                c = self._content_stream(h_prefix, next_position[:, : t + 1], layout)[:, t : t + 1]
            content_logits = self.content_head(self.content_norm(c))[:, 0]
            next_is_eos = (chosen == self._special("eos", False)) | (chosen == self._special("eos", True))
            code_allowed = torch.zeros(B, K + 3, dtype=torch.bool, device=device)
            code_allowed[:, :K] = (~next_is_eos & ~idle)[:, None]
            code_allowed[:, self.eos_id] = next_is_eos & ~idle
            code_allowed[:, self.pad_id] = idle
            code = self._sample(
                content_logits,
                code_allowed,
                torch.rand(B, generator=generator, device=device),
                temperature,
                top_k,
                top_p,
            )

            # Place the next token: index t + 1, or the start of the fine segment after the coarse eos.
            is_eos = content[:, t] == self.eos_id
            target = torch.full((B,), t + 1, dtype=torch.int64, device=device)
            if t < Cc:
                target = torch.where(is_eos, Cc, target)
            place = ~idle
            content[rows[place], target[place]] = code[place]
            position[rows[place], target[place]] = chosen[place]
            valid[rows[place], target[place]] = True
            if t < Cc:
                picked = place & ~is_eos & (chosen < R)
                coarse_taken[rows[picked], chosen[picked]] = True
                last_coarse = torch.where(picked, chosen, last_coarse)

        return self._tokens(content, position, valid)

    def _prefix_layout(self, valid: torch.Tensor, length: int) -> dqfast.C2FLayout:
        """The layout of the first ``length`` indices, from which of them are real so far."""
        Cc = self.coarse_capacity
        sizes = (min(Cc, length), max(length - Cc, 0))
        lengths = torch.stack([valid[:, : sizes[0]].sum(1), valid[:, Cc:length].sum(1)], 1)
        return dqfast.C2FLayout(sizes, lengths, mode="causal")

    def _tokens(self, content: torch.Tensor, position: torch.Tensor, valid: torch.Tensor) -> C2FTokens:
        """C2FTokens from the generated sequence."""
        R, Cc, Pc, K = self.num_regions, self.coarse_capacity, self.coarse_positions, self.codebook_size
        codes, positions, lengths = [], [], []
        for segment, offset, start in ((content[:, 1 : 1 + R], 0, 1), (content[:, Cc : Cc + 4 * R], Pc, Cc)):
            real = (segment < K) & valid[:, start : start + segment.shape[1]]
            where = position[:, start : start + segment.shape[1]] - offset
            codes.append(torch.where(real, segment, -1))
            positions.append(torch.where(real, where, -1))
            lengths.append(real.sum(1))
        return C2FTokens(tuple(codes), tuple(positions), torch.stack(lengths, 1), self.grid_size)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


@register("dqtransformer")
def dqtransformer(**overrides) -> DQTransformer:
    """The released size: width 1024, 8 heads, 6 position + 18 content layers (~300M parameters),
    1024 codes over a 16x16 coarse / 32x32 fine grid, class-conditional on 1000 classes."""
    config = dict(num_classes=1000)
    config.update(overrides)
    return DQTransformer(**config)


@register("dqtransformer-tiny")
def dqtransformer_tiny(**overrides) -> DQTransformer:
    """CPU-sized: width 32, 2 heads, 1 + 1 layers, matching dqvae-tiny (64 codes, 4x4 / 8x8 grids)."""
    config = dict(codebook_size=64, grid_size=4, width=32, num_heads=2, position_layers=1, content_layers=1)
    config.update(overrides)
    return DQTransformer(**config)


@register("dqtransformer-small")
def dqtransformer_small(**overrides) -> DQTransformer:
    """The shipped CPU-trained generator (weights in ``dqfast/models/weights``) over ``dqvae-small``
    codes: 256 codes, 8x8 coarse / 16x16 fine grids, width 64, 4 heads, 2 position + 3 content
    layers, unconditional."""
    config = dict(
        codebook_size=256, grid_size=8, width=64, num_heads=4, position_layers=2, content_layers=3, num_classes=0
    )
    config.update(overrides)
    return DQTransformer(**config)
