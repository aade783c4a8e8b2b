"""Coarse-to-fine attention: the sequence layout, its mask, masked attention and KV-cache decoding.

A coarse-to-fine sequence is S segments of fixed capacity laid end to end (the DQ-Transformer's
``[sos, coarse..., eos, pad...][fine..., eos, pad...]``, or VAR's token maps of 1, 4, 9, ...
tokens). Each sample fills only the first ``lengths[b, s]`` positions of segment s; the rest are
padding in the middle of the sequence, which must be neither attended to nor produce output.

Definitions (the spec every backend follows):

- ``seg(j)``: the segment holding position j; ``start(s)``: the offset of segment s.
- ``valid(b, j)``: ``j - start(seg(j)) < lengths[b, seg(j)]``.
- ``allowed(b, i, j)``: ``valid(b, i) and valid(b, j) and order(i, j)`` where ``order`` is
  ``j <= i`` (mode ``"causal"``, token by token) or ``seg(j) <= seg(i)`` (mode ``"block"``, a
  whole segment at a time, VAR-style scale-causal).
- ``c2f_attention``: softmax over the allowed keys of ``scale * q . k``, times v; pad queries
  (invalid i) return exactly 0.
- Pad slots are inert: the q, k and v held at invalid positions (pad queries, invalid keys, cache
  slots not marked valid) never reach any output or gradient, even when they are NaN or inf.
  Real queries are computed as if the pad k and v were 0; pad queries output exactly 0 and
  receive a zero gradient; invalid keys receive zero dk and dv.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from einops import rearrange

__all__ = ["C2FLayout", "c2f_attention", "c2f_decode_attention"]

MODES = ("causal", "block")

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class C2FLayout:
    """Which positions of a coarse-to-fine sequence are real, and who may attend to whom.

    segment_sizes: S ints >= 0, the capacity of each segment; the sequence length is
        ``L = sum(segment_sizes)``.
    lengths: (B, S) integer tensor, ``0 <= lengths[b, s] <= segment_sizes[s]``: how many leading
        positions of segment s are real tokens in sample b. Kept as given (not copied), so it
        stays on its device; do not modify it in place afterwards.
    mode: ``"causal"`` (key j <= query i) or ``"block"`` (seg(j) <= seg(i)).

    Position j of sample b is valid iff ``j - start(seg(j)) < lengths[b, seg(j)]``; query i may
    attend to key j iff both are valid and the mode's order holds. :meth:`dense_mask` and
    :attr:`mask_mod` are two views of that one definition.

    The values of ``lengths`` are checked eagerly (one host sync); under ``torch.compile``
    (``torch.compiler.is_compiling()``) that check is skipped so the graph does not break.
    """

    def __init__(self, segment_sizes: Sequence[int], lengths: torch.Tensor, mode: str = "causal"):
        if isinstance(segment_sizes, str | bytes | torch.Tensor) or not isinstance(segment_sizes, Sequence):
            raise TypeError(
                f"segment_sizes must be a sequence of ints (one capacity per segment), "
                f"got {type(segment_sizes).__name__}"
            )
        if len(segment_sizes) == 0:
            raise ValueError("segment_sizes must describe at least one segment, got an empty sequence")
        for size in segment_sizes:
            if isinstance(size, bool) or not isinstance(size, numbers.Integral):
                raise TypeError(f"segment_sizes must hold ints, got {segment_sizes!r}")
            if size < 0:
                raise ValueError(f"segment_sizes must be >= 0, got {list(segment_sizes)}")
        sizes = tuple(int(s) for s in segment_sizes)

        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be a (B, S) integer torch.Tensor, got {type(lengths).__name__}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.dim() != 2 or lengths.shape[1] != len(sizes):
            raise ValueError(
                f"lengths must have shape (B, S) = (B, {len(sizes)}) for {len(sizes)} segments, "
                f"got {tuple(lengths.shape)}"
            )
        # Value checks need the data on the host; under torch.compile they are skipped so a layout
        # built inside a compiled region does not break the graph (values are the caller's duty there).
        if lengths.numel() and not torch.compiler.is_compiling():
            capacity = torch.tensor(sizes, device=lengths.device)
            if bool((lengths < 0).any()):
                raise ValueError(f"lengths must be >= 0, got a minimum of {int(lengths.min())}")
            if bool((lengths > capacity).any()):
                b, s = (lengths > capacity).nonzero()[0].tolist()
                raise ValueError(
                    f"lengths must not exceed segment_sizes: lengths[{b}, {s}] = {int(lengths[b, s])} "
                    f"> segment_sizes[{s}] = {sizes[s]}"
                )

        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

        self._set(sizes, lengths, mode)

    def _set(self, sizes: tuple[int, ...], lengths: torch.Tensor, mode: str) -> None:
        self.segment_sizes: tuple[int, ...] = sizes
        self.lengths: torch.Tensor = lengths
        self.mode: str = mode
        self.num_segments: int = len(sizes)
        self.seq_len: int = sum(sizes)
        self.batch_size: int = lengths.shape[0]
        offsets, start = [], 0
        for size in sizes:
            offsets.append(start)
            start += size
        self.offsets: tuple[int, ...] = tuple(offsets)

    @classmethod
    def _unchecked(cls, segment_sizes: Sequence[int], lengths: torch.Tensor, mode: str) -> C2FLayout:
        """A layout from parts already checked (by an earlier constructor call): no host sync."""
        layout = cls.__new__(cls)
        layout._set(tuple(int(s) for s in segment_sizes), lengths, mode)
        return layout

    @classmethod
    def dq_transformer(
        cls,
        coarse_counts: torch.Tensor | Sequence[int],
        fine_counts: torch.Tensor | Sequence[int],
        coarse_capacity: int = 256,
        fine_capacity: int = 1024,
    ) -> C2FLayout:
        """The causal two-segment DQ-Transformer layout ``[sos, coarse..., eos, pad...][fine..., eos, pad...]``.

        coarse_counts, fine_counts: (B,) number of coarse / fine codes of each image. Segment
        capacities are ``1 + coarse_capacity + 1`` and ``fine_capacity + 1``; lengths are
        ``1 + coarse + 1`` (sos, codes, eos) and ``fine + 1`` (codes, eos).
        """
        coarse = torch.as_tensor(coarse_counts)
        fine = torch.as_tensor(fine_counts, device=coarse.device)
        for name, counts, capacity in (
            ("coarse_counts", coarse, coarse_capacity),
            ("fine_counts", fine, fine_capacity),
        ):
            if counts.dim() != 1 or counts.is_floating_point() or counts.dtype == torch.bool:
                raise ValueError(f"{name} must be a (B,) sequence of ints, got {tuple(counts.shape)} {counts.dtype}")
            if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > capacity):
                raise ValueError(f"{name} must lie in [0, {capacity}], got {counts.tolist()}")
        if coarse.shape != fine.shape:
            raise ValueError(
                f"coarse_counts and fine_counts must have the same length, got {coarse.shape[0]}, {fine.shape[0]}"
            )
        lengths = torch.stack([coarse.long() + 2, fine.long() + 1], dim=1)
        return cls((coarse_capacity + 2, fine_capacity + 1), lengths, mode="causal")

    # -- lookup tables, each (L,) -----------------------------------------------------------

    def segment_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L,) int64: the segment of every position."""
        device = self.lengths.device if device is None else device
        sizes = torch.tensor(self.segment_sizes, dtype=torch.int64, device=device)
        return torch.repeat_interleave(torch.arange(self.num_segments, device=device), sizes, output_size=self.seq_len)

    def _segment_starts(self, device: torch.device) -> torch.Tensor:
        """(S,) int64: the offset of every segment."""
        return torch.tensor(self.offsets, dtype=torch.int64, device=device)

    # -- masks --------------------------------------------------------------------------------

    def key_valid(self) -> torch.Tensor:
        """(B, L) bool: position j of sample b is a real token (offset in its segment < its length)."""
        device = self.lengths.device
        seg = self.segment_ids(device)
        offset_in_segment = torch.arange(self.seq_len, device=device) - self._segment_starts(device)[seg]
        return offset_in_segment[None, :] < self.lengths[:, seg]

    def dense_mask(self) -> torch.Tensor:
        """(B, L, L) bool: ``[b, i, j]`` is True iff query i of sample b may attend to key j.

        Rows of pad queries are all False.
        """
        valid = self.key_valid()
        device = valid.device
        if self.mode == "causal":
            positions = torch.arange(self.seq_len, device=device)
            order = positions[None, :] <= positions[:, None]
        else:
            seg = self.segment_ids(device)
            order = seg[None, :] <= seg[:, None]
        return valid[:, :, None] & valid[:, None, :] & order[None]

    @property
    def mask_mod(self) -> MaskMod:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` equal to :meth:`dense_mask`.

        Built only from indexing into small lookup tensors (segment of each position, segment
        starts, lengths) and comparisons, so ``torch.compile`` and ``create_block_mask`` can
        trace it; the indices may be scalars or broadcastable index tensors.
        """
        device = self.lengths.device
        seg = self.segment_ids(device)
        starts = self._segment_starts(device)
        lengths = self.lengths
        causal = self.mode == "causal"

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            q_seg, kv_seg = seg[q_idx], seg[kv_idx]
            q_valid = (q_idx - starts[q_seg]) < lengths[b, q_seg]
            kv_valid = (kv_idx - starts[kv_seg]) < lengths[b, kv_seg]
            order = (kv_idx <= q_idx) if causal else (kv_seg <= q_seg)
            return q_valid & kv_valid & order

        return mask_mod

    # -- misc ---------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> C2FLayout:
        """The same layout with ``lengths`` on ``device`` (self when it is already there)."""
        if self.lengths.device == torch.device(device):
            return self
        return C2FLayout(self.segment_sizes, self.lengths.to(device), self.mode)

    def __repr__(self) -> str:
        return (
            f"C2FLayout(segment_sizes={self.segment_sizes}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, mode={self.mode!r}, device={self.lengths.device})"
        )


def _masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float | None,
    query_valid: torch.Tensor | None,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """softmax over allowed keys of ``scale * q . k`` times v; rows with no allowed key give 0.

    q: (B, Hh, Lq, Dh); k, v: (B, Hh, Lk, Dh); allowed: bool, broadcastable to (B, Hh, Lq, Lk);
    query_valid (B, Lq) or None (every query real), key_valid (B, Lk): the slots whose values may
    be read. The others are replaced by 0 before any arithmetic (``torch.where``, whose gradient
    to the replaced entries is exactly 0), so a NaN or inf stored there reaches neither the
    output nor a gradient: masking the scores alone would not do, since 0 * NaN is NaN in the
    weighted sum of v and in the gradient of q.
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    key_slots = rearrange(key_valid, "b j -> b 1 j 1")
    k = torch.where(key_slots, k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(key_slots, v, torch.zeros((), dtype=v.dtype, device=v.device))
    if query_valid is not None:
        q = torch.where(rearrange(query_valid, "b i -> b 1 i 1"), q, torch.zeros((), dtype=q.dtype, device=q.device))
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.einsum("bhid,bhjd->bhij", qc, kc) * scale
    # A finite fill (not -inf) keeps a fully masked row's softmax finite (uniform) and its
    # gradient free of NaN; zeroing the disallowed weights afterwards then makes that row's
    # output and gradients exactly 0. In rows with an allowed key, exp(min - max) is already 0.
    scores = scores.masked_fill(~allowed, torch.finfo(compute_dtype).min)
    weights = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return torch.einsum("bhij,bhjd->bhid", weights, vc).to(q.dtype)


def c2f_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: C2FLayout, *, scale: float | None = None
) -> torch.Tensor:
    """Coarse-to-fine masked attention (reference).

    q, k, v: (B, Hh, L, Dh), L = layout.seq_len, B = layout.batch_size.
    Returns (B, Hh, L, Dh): ``out[b, h, i] = sum_j softmax_j(scale * q[b,h,i] . k[b,h,j]) v[b,h,j]``
    over the keys j allowed by ``layout.dense_mask()[b, i]``; pad queries return exactly 0 (and
    receive zero gradient). Values held at pad positions (q, k or v, NaN and inf included) never
    reach an output or a gradient; pad keys receive zero dk and dv. The output gradient of a pad
    query meets only zero weights: a finite one contributes nothing, a NaN or inf one is carried
    on as 0 * NaN like any product in PyTorch (and in SDPA with a fully masked row); backends
    may drop it instead. ``scale`` defaults to Dh ** -0.5. Computed in float32 (float64 stays
    float64), returned in q's dtype; differentiable by autograd.
    """
    layout = layout.to(q.device)
    allowed = layout.dense_mask()
    valid = layout.key_valid()
    return _masked_attention(q, k, v, rearrange(allowed, "b i j -> b 1 i j"), scale, valid, valid)


def c2f_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of a few new queries over a KV cache (reference): O(Lk) work per query.

    q: (B, Hh, Lq, Dh); k_cache, v_cache: (B, Hh, Lk, Dh); key_valid: (B, Lk) bool.
    Every query attends to every valid cached key (the caller writes the new positions' k/v
    into the cache, and marks them valid, before calling); a query with no valid key returns 0.
    Token-by-token causal decoding uses Lq = 1; block decoding passes a whole segment, whose
    positions then see each other. Returns (B, Hh, Lq, Dh) in q's dtype. Cache slots not marked
    valid are never read (NaN or inf there reaches no output; their dk and dv are 0).
    """
    return _masked_attention(q, k_cache, v_cache, rearrange(key_valid, "b j -> b 1 1 j"), scale, None, key_valid)
