"""DQ-Transformer: coarse-to-fine autoregressive generation of DQ-VAE codes (Huang et al., CVPR 2023).

The sequence of one image (dual grain, H x W coarse regions, 2H x 2W fine cells)::

    coarse segment (capacity H*W + 2)          fine segment (capacity 4*H*W + 1)
    [sos, c_1 ... c_n, eos, pad ... pad]       [f_1 ... f_m, eos, pad ... pad]

with the coarse codes in raster order of their regions and the fine codes in row-first order over
the fine grid restricted to fine regions (:func:`dqfast.c2f_flatten`). Every token has a content
id (a code, or pad / eos / sos) and a position id (its cell in the grid of its segment, or a
special). The pads in the middle of the sequence are masked out of attention
(:class:`dqfast.C2FLayout`; the released code attended to them). With ``fine_sos=True`` the fine
segment starts with its own sos token (capacity 4*H*W + 2), as in the released stage-2 configs.

Sampling (:meth:`DQTransformer.generate`) decodes one index per step against per-layer KV caches,
straight on the weights; ``use_cache=False`` is the released recompute-the-prefix loop.

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

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from tqdm import tqdm

import dqfast
from dqfast.models.registry import register
from dqfast.nn import C2FAttention
from dqfast.nn.c2f_attention import CachedC2FLayout
from dqfast.types import C2FTokens

__all__ = ["DQTransformer", "DQSequence"]

# Models up to this width sample on one CPU thread (see DQTransformer.generate).
SMALL_WIDTH = 256


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
        fine_sos: start the fine segment with its own sos token (content id K + 3, the fine table's
            sos position, segment id 2, the label added like the coarse sos), as the released
            stage-2 configs do (they use content id class + 1026); it is given, never predicted,
            and the coarse eos then predicts nothing. Default False (the shipped weights).

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
        fine_sos: bool = False,
    ):
        super().__init__()
        if not isinstance(fine_sos, bool):
            raise TypeError(f"fine_sos must be a bool, got {type(fine_sos).__name__}")
        self.fine_sos = fine_sos
        H, W = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.grid_size = (int(H), int(W))
        self.codebook_size, self.num_classes, self.width = codebook_size, num_classes, width
        K = codebook_size
        self.pad_id, self.eos_id, self.sos_id = K, K + 1, K + 2
        self.fine_sos_id = K + 3 if fine_sos else None
        self.num_regions = R = H * W
        # Position vocab: coarse table [0, Pc), fine table [Pc, Pc + Pf).
        self.coarse_positions, self.fine_positions = R + 3, 4 * R + 3
        self.coarse_capacity, self.fine_capacity = R + 2, 4 * R + 1 + int(fine_sos)
        self.seq_len = self.coarse_capacity + self.fine_capacity

        self.content_embedding = nn.Embedding(K + 3 + int(fine_sos), width)
        self.position_embedding = nn.Embedding(self.coarse_positions + self.fine_positions, width)
        self.index_embedding = nn.Embedding(self.seq_len, width)
        self.segment_embedding = nn.Embedding(2 + int(fine_sos), width)
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

        def segment(codes, positions, count, fine: bool, lead: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            """[lead sos (content ids), codes..., one pad] with eos written right after the codes."""
            real = positions >= 0
            offset = self.coarse_positions if fine else 0
            content = torch.where(real, codes.long(), self.pad_id)
            position = torch.where(real, positions.long() + offset, self._special("pad", fine))
            content = torch.cat([column(i) for i in lead] + [content, column(self.pad_id)], 1)
            position = torch.cat(
                [column(self._special("sos", fine)) for _ in lead] + [position, column(self._special("pad", fine))],
                1,
            )
            eos_at = (count + len(lead))[:, None]
            content = content.scatter(1, eos_at, self.eos_id)
            position = position.scatter(1, eos_at, self._special("eos", fine))
            return content, position

        f0 = int(self.fine_sos)
        content_c, position_c = segment(tokens.codes[0], tokens.positions[0], n_coarse, False, [self.sos_id])
        fine_lead = [self.fine_sos_id] if self.fine_sos else []
        content_f, position_f = segment(tokens.codes[1], tokens.positions[1], n_fine, True, fine_lead)
        content = torch.cat([content_c, content_f], 1)
        position = torch.cat([position_c, position_f], 1)
        lengths = torch.stack([n_coarse.long() + 2, n_fine.long() + 1 + f0], 1)
        layout = CachedC2FLayout((Cc, self.fine_capacity), lengths, mode="causal")

        # The token after the coarse eos is the first of the fine segment, across the pads; with a
        # fine sos that one is given, so the coarse eos has no target.
        index = torch.arange(L, device=device)
        next_index = (index + 1).expand(B, L)
        if not self.fine_sos:
            next_index = next_index.scatter(1, (n_coarse + 1)[:, None], Cc)
        next_index = next_index.clamp(max=L - 1)
        has_target = layout.key_valid() & (index[None] != (Cc + f0 + n_fine)[:, None])
        if self.fine_sos:
            has_target = has_target & (index[None] != (n_coarse + 1)[:, None])
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
        Cc = self.coarse_capacity
        index = torch.arange(start, start + n, device=content.device)
        segment = (index >= Cc).long()
        if self.fine_sos:
            segment = segment + (index == Cc).long()  # the fine sos has segment id 2
        h = self.content_embedding(content) + self.position_embedding(position)
        h = h + self.index_embedding(index) + self.segment_embedding(segment)
        if labels is not None:
            # The label joins the sos token(s): index 0, and index Cc with a fine sos.
            for at in (0, Cc) if self.fine_sos else (0,):
                if start <= at < start + n:
                    h = h.clone()
                    h[:, at - start] = h[:, at - start] + self.label_embedding(labels)
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
        allowed: torch.Tensor | None,
        uniform: torch.Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
    ) -> torch.Tensor:
        """One id per row of logits (B, V) among the allowed ones (None: all), by inverting the CDF
        at ``uniform`` (B,).

        Every row has at least one allowed id. Drawing the uniforms outside (one per row at every
        step, whether or not a row's choice is forced) keeps the random stream the same however
        the logits were computed, which is what makes cached and uncached sampling identical.
        """
        scores = logits.float()
        if temperature != 1.0:
            scores = scores / temperature
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        if top_k is not None and top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            # Drop an id once the ids before it already hold top_p of the mass (the first always stays).
            drop = (probs.cumsum(-1) - probs) >= top_p
            scores = scores.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
        cdf = scores.softmax(-1).cumsum(-1)
        total = cdf[:, -1:]
        # A point strictly below the total mass: the first id whose cdf exceeds it has mass.
        point = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, point, right=True)[:, 0]

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

    @contextlib.contextmanager
    def _sampling_context(self, device: torch.device) -> Iterator[None]:
        """No dropout while sampling; one intra-op thread for a small model on the CPU (its ops are
        too small to split: a second thread only adds synchronisation). Both restored after."""
        threads = torch.get_num_threads()
        fewer = device.type == "cpu" and self.width <= SMALL_WIDTH and threads > 1
        was_training = self.training
        if fewer:
            torch.set_num_threads(1)
        if was_training:
            self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train()
            if fewer:
                torch.set_num_threads(threads)

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
        progress: bool = False,
    ) -> C2FTokens:
        """Sample ``batch_size`` token sequences; returns :class:`dqfast.C2FTokens` (decode them with
        ``DQVAE.decode``).

        labels: (B,) class ids (class-conditional models; default "no label").
        temperature, top_k, top_p: applied to the coarse position and the code distributions.
        grain: (B, H, W) int, 0 = coarse, 1 = fine: fixed-position mode, only codes are sampled.
        coarse_count: int or (B,) exact number of coarse regions per image; or ``budget``, the
            fraction of fine regions (rounded like :func:`dqfast.grain_from_budget`).
        generator: torch.Generator for the uniforms (on the model's device).
        use_cache: decode with KV caches (O(L) per step); False recomputes the whole prefix at every
            step, as the released code does. Both give the same samples for the same generator
            state (up to the last bits of the logits: the two paths round differently).
        progress: show a tqdm bar over the sequence indices.

        Runs in eval mode (no dropout); a small model on the CPU runs on one thread. Only the
        coarse segment's length is random, so the loop synchronises with the host once per coarse
        step (never with ``coarse_count``, ``budget`` or ``grain``) and once before the fine segment.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        device = self.content_embedding.weight.device
        B = batch_size
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
        with self._sampling_context(device):
            return self._generate(
                B, labels, float(temperature), top_k, top_p, fixed, required, generator, use_cache, progress
            )

    @torch.no_grad()
    def assign_codes(
        self,
        grain: torch.Tensor,
        choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        labels: torch.Tensor | None = None,
        progress: bool = False,
    ) -> C2FTokens:
        """The cached sampling loop with the coarse regions fixed by ``grain`` (B, H, W) (0 = coarse,
        1 = fine) and every code picked by ``choose(logits, target)`` instead of drawn.

        At each step ``logits`` is (B, K) float32, the code logits of every row; ``target`` (B,)
        int64 says what the code is for: a coarse region ``r`` (0..R-1, row-major over the coarse
        grid), a fine cell ``R + c`` (c row-major over the fine grid), or -1 where the row places
        no code at this step (its pick is ignored). ``choose`` returns (B,) codes in 0..K-1.
        Returns the tokens placed.

        This is how the DQ-VAE codec uses the model as its entropy model: the encoder's ``choose``
        returns the image's codes and codes each under its distribution, the decoder's decodes
        them. Both ends run the same arithmetic in the same order on the same batch, so on one
        machine they see the same logits (a small model on the CPU runs on one thread, whatever the
        thread setting). The random stream is not touched.
        """
        device = self.content_embedding.weight.device
        B = grain.shape[0]
        if grain.shape != (B, *self.grid_size):
            raise ValueError(
                f"grain must have shape (B, {self.grid_size[0]}, {self.grid_size[1]}), got {tuple(grain.shape)}"
            )
        if grain.numel() and (int(grain.min()) < 0 or int(grain.max()) > 1):
            raise ValueError("grain must hold 0 (coarse) or 1 (fine)")
        labels = self._labels(labels, B, device)
        fixed = rearrange(grain.to(device) == 0, "b h w -> b (h w)")
        # Fixed positions leave one allowed choice per step: the uniforms only have to exist.
        generator = torch.Generator(device=device).manual_seed(0)
        with self._sampling_context(device):
            return self._generate(
                B, labels, 1.0, None, None, fixed, fixed.sum(1), generator, True, progress, choose=choose
            )

    def _generate(
        self, B, labels, temperature, top_k, top_p, fixed, required, generator, use_cache, progress, choose=None
    ):
        device = self.content_embedding.weight.device
        H, W = self.grid_size
        R, K, Pc = self.num_regions, self.codebook_size, self.coarse_positions
        Cc, L, f0 = self.coarse_capacity, self.seq_len, int(self.fine_sos)
        pad_c, eos_c = self._special("pad", False), self._special("eos", False)
        pad_f, eos_f = self._special("pad", True), self._special("eos", True)

        def ids(value: int, *shape: int) -> torch.Tensor:
            return torch.full(shape, value, dtype=torch.int64, device=device)

        # The sequence so far, (B, L + 1): column L is a scratch slot that takes the writes of the
        # rows with nothing to place, so every step writes every row (no masked indexing).
        content, position = ids(self.pad_id, B, L + 1), ids(pad_c, B, L + 1)
        position[:, Cc:] = pad_f
        next_position = ids(pad_c, B, L + 1)
        valid = torch.zeros(B, L + 1, dtype=torch.bool, device=device)
        content[:, 0], position[:, 0], valid[:, 0] = self.sos_id, self._special("sos", False), True
        if self.fine_sos:  # given, not sampled: its slot is known from the start
            content[:, Cc], position[:, Cc], valid[:, Cc] = self.fine_sos_id, self._special("sos", True), True
        coarse_taken = torch.zeros(B, R + 1, dtype=torch.bool, device=device)  # column R: scratch
        last_coarse = ids(-1, B)
        region = torch.arange(R, device=device)
        # The region of every fine cell, row-first over the fine grid.
        cell_region = rearrange(repeat(region.view(H, W), "h w -> (h 2) (w 2)"), "h w -> (h w)").contiguous()
        no = torch.zeros(B, 1, dtype=torch.bool, device=device)
        position_weight, position_bias = self.position_head.weight[:Pc], self.position_head.bias[:Pc]
        content_weight, content_bias = self.content_head.weight[:K], self.content_head.bias[:K]

        if use_cache:
            streams = _CachedStreams(self, B, labels, valid)
        else:
            streams = _RecomputedStreams(self, labels, content, position, valid, next_position)

        def uniform() -> torch.Tensor:
            return torch.rand(B, generator=generator, device=device)

        def draw_code(t: int, h: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
            next_position[:, t] = nxt
            c = streams.content(t, h, nxt)
            c = F.layer_norm(c, (self.width,), self.content_norm.weight, self.content_norm.bias, self.content_norm.eps)
            logits = F.linear(c, content_weight, content_bias)
            if choose is not None:
                coarse, fine = nxt < R, (nxt >= Pc) & (nxt < Pc + 4 * R)
                target = torch.where(coarse, nxt, torch.where(fine, nxt - Pc + R, -1))
                return choose(logits, target).to(device=device, dtype=torch.int64)
            return self._sample(logits, None, uniform(), temperature, top_k, top_p)

        def place(target: torch.Tensor, code: torch.Tensor, nxt: torch.Tensor, placing: torch.Tensor) -> None:
            target = target[:, None]
            content.scatter_(1, target, code[:, None])
            position.scatter_(1, target, nxt[:, None])
            valid.scatter_(1, target, placing[:, None])

        bar = tqdm(total=L, disable=not progress, unit="tok", desc="sampling", leave=False, dynamic_ncols=True)
        # Coarse segment: sample a later region (raster order) or eos, then its code.
        coarse_end = None if required is None else int(required.max()) + 2  # the steps that read coarse tokens
        t = 0
        while t < Cc:
            now = valid[:, t]
            is_eos = content[:, t] == self.eos_id
            choosing, entering = now & ~is_eos, now & is_eos
            h = streams.position(t, content[:, t], position[:, t])
            hn = F.layer_norm(
                h, (self.width,), self.position_norm.weight, self.position_norm.bias, self.position_norm.eps
            )
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
            # Rows that do not choose get eos allowed too (their pick is never used): no empty rows.
            allowed = torch.cat([coarse_ok, no, (eos_ok | ~choosing)[:, None], no], 1)
            chosen = self._sample(
                F.linear(hn, position_weight, position_bias), allowed, uniform(), temperature, top_k, top_p
            )
            if self.fine_sos:
                entered, placing = pad_c, choosing  # the fine sos is given; the coarse eos predicts nothing
            else:
                fine_cell = ~coarse_taken[:, cell_region]
                first = fine_cell.to(torch.uint8).argmax(1) + Pc
                entered, placing = torch.where(fine_cell.any(1), first, eos_f), choosing | entering
            nxt = torch.where(choosing, chosen, torch.where(entering, entered, pad_c))
            code = draw_code(t, h, nxt)
            code = torch.where((nxt == eos_c) | (nxt == eos_f), self.eos_id, code)
            place(torch.where(choosing, t + 1, torch.where(placing, Cc, L)), code, nxt, placing)
            picked = choosing & (chosen < R)
            coarse_taken.scatter_(1, torch.where(picked, chosen, R)[:, None], True)
            last_coarse = torch.where(picked, chosen, last_coarse)
            t += 1
            bar.update(1)
            if t >= Cc or (t >= coarse_end if coarse_end is not None else not bool(valid[:, t].any())):
                break

        # Fine segment: the children of the regions not coded coarse, row-first, then eos. The
        # positions are determined (a table built once); only the codes are sampled.
        fine_cell = ~coarse_taken[:, cell_region]
        n_fine = fine_cell.sum(1)
        order = torch.sort((~fine_cell).to(torch.int8), dim=1, stable=True).indices + Pc
        j = torch.arange(4 * R + 1, device=device)
        table = torch.where(
            j < n_fine[:, None], torch.cat([order, order[:, :1]], 1), torch.where(j == n_fine[:, None], eos_f, pad_f)
        )
        steps = int(n_fine.max()) + f0
        bar.update(Cc - t)
        for t in range(Cc, Cc + steps):
            p = t - Cc + 1 - f0  # the fine token this step predicts (p == n_fine: the eos)
            active = n_fine >= p
            h = streams.position(t, content[:, t], position[:, t])
            nxt = torch.where(active, table[:, min(p, 4 * R)], pad_c)
            code = torch.where(n_fine == p, self.eos_id, draw_code(t, h, nxt))
            place(torch.where(active, t + 1, L), code, nxt, active)
            bar.update(1)
        bar.update(L - bar.n)
        bar.close()
        return self._tokens(content[:, :L], position[:, :L], valid[:, :L])

    def _prefix_layout(self, valid: torch.Tensor, length: int) -> CachedC2FLayout:
        """The layout of the first ``length`` indices, from which of them are real so far."""
        Cc = self.coarse_capacity
        sizes = (min(Cc, length), max(length - Cc, 0))
        lengths = torch.stack([valid[:, : sizes[0]].sum(1), valid[:, Cc:length].sum(1)], 1)
        return CachedC2FLayout(sizes, lengths, mode="causal")

    def _tokens(self, content: torch.Tensor, position: torch.Tensor, valid: torch.Tensor) -> C2FTokens:
        """C2FTokens from the generated sequence."""
        R, Cc, Pc, K = self.num_regions, self.coarse_capacity, self.coarse_positions, self.codebook_size
        start_f = Cc + int(self.fine_sos)
        codes, positions, lengths = [], [], []
        for segment, offset, start in (
            (content[:, 1 : 1 + R], 0, 1),
            (content[:, start_f : start_f + 4 * R], Pc, start_f),
        ):
            real = (segment < K) & valid[:, start : start + segment.shape[1]]
            where = position[:, start : start + segment.shape[1]] - offset
            codes.append(torch.where(real, segment, -1))
            positions.append(torch.where(real, where, -1))
            lengths.append(real.sum(1))
        return C2FTokens(tuple(codes), tuple(positions), torch.stack(lengths, 1), self.grid_size)


def _block_weights(block: Block) -> tuple:
    """The tensors and constants :func:`_block_step` reads, looked up once per sampling run."""
    attn, fc1, act, fc2 = block.attn, block.mlp[0], block.mlp[1], block.mlp[2]
    return (
        (block.norm1.weight, block.norm1.bias, block.norm1.eps),
        (attn.qkv.weight, attn.qkv.bias, attn.num_heads, attn.head_dim),
        (attn.out.weight, attn.out.bias),
        (block.norm2.weight, block.norm2.bias, block.norm2.eps),
        (fc1.weight, fc1.bias, act.approximate, fc2.weight, fc2.bias),
    )


def _block_step(weights: tuple, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int, mask: torch.Tensor):
    """One index of a :class:`Block` against its KV cache, straight on the weights (the same
    arithmetic as ``Block.forward`` at that index, without the module and op call overheads).

    weights: :func:`_block_weights`; x: (B, width); k, v: (B, Hh, L, Dh) cached keys and values,
    index t written here; mask: (B, 1, 1, t + 1) float, 0 at the real tokens among indices 0..t and
    -inf at the pads (index 0, the sos, is real, so no row is empty).
    """
    (n1w, n1b, n1e), (qkv_w, qkv_b, heads, head_dim), (out_w, out_b), (n2w, n2b, n2e), mlp = weights
    B, width = x.shape
    y = F.layer_norm(x, (width,), n1w, n1b, n1e)
    q, k_new, v_new = F.linear(y, qkv_w, qkv_b).view(B, 3, heads, 1, head_dim).unbind(1)
    k.narrow(2, t, 1).copy_(k_new)
    v.narrow(2, t, 1).copy_(v_new)
    out = F.scaled_dot_product_attention(q, k.narrow(2, 0, t + 1), v.narrow(2, 0, t + 1), attn_mask=mask)
    x = x + F.linear(out.view(B, width), out_w, out_b)
    y = F.layer_norm(x, (width,), n2w, n2b, n2e)
    fc1_w, fc1_b, approximate, fc2_w, fc2_b = mlp
    return x + F.linear(F.gelu(F.linear(y, fc1_w, fc1_b), approximate=approximate), fc2_w, fc2_b)


class _CachedStreams:
    """The two streams decoded one index at a time against per-layer KV caches: O(L) per step.

    ``valid`` (B, L + 1) is the sampler's record of which indices hold real tokens; the additive
    attention mask is derived from it once per step and shared by every layer of both streams.
    """

    def __init__(self, model: DQTransformer, batch_size: int, labels: torch.Tensor | None, valid: torch.Tensor):
        weight = model.content_embedding.weight
        L = model.seq_len

        def layers(blocks) -> list[tuple]:
            out = []
            for b in blocks:
                shape = (batch_size, b.attn.num_heads, L, b.attn.head_dim)
                dtype = b.attn.qkv.weight.dtype
                out.append(
                    (_block_weights(b), weight.new_zeros(shape, dtype=dtype), weight.new_zeros(shape, dtype=dtype))
                )
            return out

        self.model, self.valid = model, valid
        self.position_layers, self.content_layers = layers(model.position_blocks), layers(model.content_blocks)
        self.content_table = model.content_embedding.weight
        self.position_table = model.position_embedding.weight
        self.next_position_table = model.next_position_embedding.weight
        # Index and segment embeddings of every index, and the label of the sos token(s), once.
        index = torch.arange(L, device=weight.device)
        segment = (index >= model.coarse_capacity).long()
        if model.fine_sos:
            segment = segment + (index == model.coarse_capacity).long()
        self.constant = model.index_embedding(index) + model.segment_embedding(segment)
        self.label = None if labels is None else model.label_embedding(labels)
        self.label_at = (0, model.coarse_capacity) if model.fine_sos else (0,)
        self.zero = weight.new_zeros(())
        self.minus_inf = weight.new_full((), float("-inf"))

    def position(self, t: int, content: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """content, position: (B,) the ids at index t -> the position stream's state (B, width)."""
        h = F.embedding(content, self.content_table) + F.embedding(position, self.position_table)
        h = h + self.constant[t]
        if self.label is not None and t in self.label_at:
            h = h + self.label
        self.mask = torch.where(self.valid[:, None, None, : t + 1], self.zero, self.minus_inf)
        for weights, k, v in self.position_layers:
            h = _block_step(weights, h, k, v, t, self.mask)
        return h

    def content(self, t: int, h: torch.Tensor, next_position: torch.Tensor) -> torch.Tensor:
        """h: (B, width) from :meth:`position`; next_position: (B,) -> the content stream's state."""
        c = h + F.embedding(next_position, self.next_position_table)
        for weights, k, v in self.content_layers:
            c = _block_step(weights, c, k, v, t, self.mask)
        return c


class _RecomputedStreams:
    """The released code's loop: both streams recomputed over the whole prefix at every step
    (O(L^2) per step), through the model's ``forward`` path; pads are masked."""

    def __init__(self, model, labels, content, position, valid, next_position):
        self.model, self.labels = model, labels
        self.content_ids, self.position_ids, self.valid, self.next_position = content, position, valid, next_position

    def position(self, t: int, content: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        m, n = self.model, t + 1
        self.layout = m._prefix_layout(self.valid, n)
        embedded = m._embed(self.content_ids[:, :n], self.position_ids[:, :n], 0, self.labels)
        self.prefix = m._position_stream(embedded, self.layout)
        return self.prefix[:, t]

    def content(self, t: int, h: torch.Tensor, next_position: torch.Tensor) -> torch.Tensor:
        return self.model._content_stream(self.prefix, self.next_position[:, : t + 1], self.layout)[:, t]


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
