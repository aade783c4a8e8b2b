"""Multi-head coarse-to-fine self-attention with a KV cache for O(L)-per-step sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dqfast.reference.c2f_attention import C2FLayout

__all__ = ["C2FAttention", "CachedC2FLayout", "KVCache"]


class CachedC2FLayout(C2FLayout):
    """A :class:`dqfast.C2FLayout` that builds ``key_valid()`` and ``dense_mask()`` once.

    A model applies one layout in every attention layer; the plain layout rebuilds its (B, L, L)
    mask at each call. This one keeps the first result (its ``lengths`` must not change afterwards,
    as for any layout). ``CachedC2FLayout.of(layout)`` wraps an existing layout.
    """

    def __init__(self, segment_sizes, lengths: torch.Tensor, mode: str = "causal"):
        super().__init__(segment_sizes, lengths, mode)
        self._key_valid: torch.Tensor | None = None
        self._dense_mask: torch.Tensor | None = None

    @classmethod
    def of(cls, layout: C2FLayout) -> CachedC2FLayout:
        if isinstance(layout, cls):
            return layout
        return cls(layout.segment_sizes, layout.lengths, layout.mode)

    def key_valid(self) -> torch.Tensor:
        if self._key_valid is None:
            self._key_valid = super().key_valid()
        return self._key_valid

    def dense_mask(self) -> torch.Tensor:
        if self._dense_mask is None:
            self._dense_mask = super().dense_mask()
        return self._dense_mask

    def to(self, device: torch.device | str) -> C2FLayout:
        if self.lengths.device == torch.device(device):
            return self
        return CachedC2FLayout(self.segment_sizes, self.lengths.to(device), self.mode)


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, for one :class:`C2FAttention` layer.

    k, v: (B, Hh, Lmax, Dh) preallocated; positions ``[0, length)`` are written.
    key_valid: (B, Lmax) bool, True where a written position is a real token (pads stay False,
        so later queries never attend to them).
    length: number of positions written so far.

    :meth:`C2FAttention.step` updates all four in place: the cache belongs to the decoding loop.
    """

    k: torch.Tensor
    v: torch.Tensor
    key_valid: torch.Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class C2FAttention(nn.Module):
    """Self-attention over a coarse-to-fine sequence described by a :class:`dqfast.C2FLayout`.

    dim: model width, split into ``num_heads`` heads of ``dim // num_heads``.
    bias: whether the qkv and output projections have a bias.
    dropout: dropout on the attention output (after the output projection) in training mode;
        attention weights are not dropped, so the fused kernels apply unchanged.

    ``forward(x, layout)`` processes a whole sequence; ``new_cache`` + ``step`` decode it a few
    positions at a time and give the same result at every position.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, device=device, dtype=dtype)
        self.out = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, dim) -> q, k, v, each (B, Hh, L, Dh)."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        return q, k, v

    def _project_out(self, attn: torch.Tensor) -> torch.Tensor:
        """attn: (B, Hh, L, Dh) -> (B, L, dim)."""
        out = self.out(rearrange(attn, "b h l d -> b l (h d)"))
        return F.dropout(out, self.dropout, self.training)

    def forward(self, x: torch.Tensor, layout: C2FLayout) -> torch.Tensor:
        """x: (B, L, dim), L = layout.seq_len -> (B, L, dim).

        Pad positions get an attention output of 0, i.e. only the output bias.
        """
        import dqfast  # at call time: dqfast/__init__ may import this module before defining the ops

        q, k, v = self._qkv(x)
        return self._project_out(dqfast.c2f_attention(q, k, v, layout))

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for up to ``max_len`` positions; device and dtype default to the weights'."""
        weight = self.qkv.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        shape = (batch_size, self.num_heads, max_len, self.head_dim)
        return KVCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            key_valid=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
            length=0,
        )

    def step(self, x_new: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``Lq`` new positions appended at ``cache.length``; meant for inference (no_grad).

        x_new: (B, Lq, dim) the new positions; valid: (B, Lq) bool, which of them are real tokens
        (default all). Writes their k/v into ``cache`` (in place) and advances ``cache.length``.
        Returns (B, Lq, dim). The new positions attend to every valid cached position and to each
        other: call with Lq = 1 for causal token-by-token decoding, or with a whole segment for
        block-mode decoding. Pad positions (valid False) get an attention output of 0, as in
        :meth:`forward`.
        """
        import dqfast

        B, Lq, _ = x_new.shape
        start, end = cache.length, cache.length + Lq
        if end > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions; {start} used, {Lq} more do not fit")
        if cache.k.shape[0] != B:
            raise ValueError(f"cache has batch {cache.k.shape[0]} but x_new has B = {B}")
        if x_new.dtype != cache.k.dtype:
            raise TypeError(f"x_new has dtype {x_new.dtype} but the cache holds {cache.k.dtype}")
        if valid is None:
            valid = torch.ones(B, Lq, dtype=torch.bool, device=x_new.device)
        elif valid.shape != (B, Lq) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a ({B}, {Lq}) bool tensor, got {tuple(valid.shape)} {valid.dtype}")

        q, k, v = self._qkv(x_new)
        cache.k[:, :, start:end] = k
        cache.v[:, :, start:end] = v
        cache.key_valid[:, start:end] = valid
        cache.length = end
        attn = dqfast.c2f_decode_attention(q, cache.k[:, :, :end], cache.v[:, :, :end], cache.key_valid[:, :end])
        attn = attn * rearrange(valid, "b l -> b 1 l 1").to(attn.dtype)
        return self._project_out(attn)
