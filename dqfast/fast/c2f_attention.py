"""Coarse-to-fine attention as a composite of ``F.scaled_dot_product_attention`` calls.

The reference (``dqfast.reference.c2f_attention``) materialises the fp32 (B, Hh, L, L) scores, a
masked copy, the softmax and a second masked copy. Here the real tokens of every sample are
packed to the front of a shorter sequence of ``Lr = max_b (real tokens of b)`` slots, in their
original order. Packing keeps the order of the real tokens, so in mode "causal" the allowed pairs
are exactly ``j' <= i'`` among the packed slots: plain causal SDPA with no mask at all, on a
sequence that is often half as long (a quarter of the pairs). Mode "block" keeps a boolean mask,
``seg(j') <= seg(i')``, over the packed slots. Each output position is then gathered back from its
slot; pad positions gather from an appended zero slot, so they are exactly 0 and send no gradient.

Non-finite pads: pad positions are never read (only real positions are gathered), and the empty
slots at the end of a short sample are zeroed with ``torch.where`` after the gather, so NaN/inf in
a pad query, key or value reaches neither an output nor a gradient.

The packing indices depend only on the layout, so they are computed once per layout object (and
device) and cached for as long as the layout lives: the layers of a model share them.

Decoding (``c2f_decode_attention``): SDPA on the cache with the (B, 1, 1, Lk) validity mask. A
masked key contributes ``exp(-inf) * v = 0 * v``, which is NaN when v is not finite, so the
invalid cached positions are checked (a gather of only those positions) and zeroed in a copy of
the cache only when one of them is not finite.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dqfast.reference.c2f_attention import C2FLayout

__all__ = ["c2f_attention", "c2f_decode_attention", "c2f_attention_reasons", "c2f_decode_attention_reasons"]


class _Packing(NamedTuple):
    """Per-layout tables, all on the layout's device.

    gather: (B, Lr) int64, the position held by each packed slot (slot s < count[b] holds the
        s-th real token of sample b; later slots hold position 0 and are zeroed).
    slot_valid: (B, Lr) bool, slot s of sample b holds a real token.
    scatter: (B, L) int64, the slot of every position; pad positions point at slot Lr (a zero row).
    block_mask: (B, 1, Lr, Lr) bool for mode "block" (None for "causal"); rows of empty slots are
        all True so SDPA never sees a fully masked row (their outputs are dropped).
    """

    gather: torch.Tensor
    slot_valid: torch.Tensor
    scatter: torch.Tensor
    block_mask: torch.Tensor | None


# layout -> {(device, lengths version): _Packing}. Weak keys: the tables die with the layout.
_PACKINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _build_packing(layout: C2FLayout, device: torch.device) -> _Packing:
    lengths = layout.lengths.to(device)
    valid = _key_valid(layout, lengths)  # (B, L)
    B, L = valid.shape
    counts = valid.sum(1)
    # At least one slot, so SDPA always has a (zeroed) key and every output depends on q, k, v.
    slots = max(int(counts.max()) if B else 0, 1)
    # A stable sort on "is pad" brings the real positions to the front in their original order.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    if order.shape[1] < slots:  # L == 0
        order = torch.cat([order, order.new_zeros(B, slots - order.shape[1])], 1)
    slot_valid = torch.arange(slots, device=device) < counts[:, None]
    gather = torch.where(slot_valid, order[:, :slots], 0)
    scatter = torch.where(valid, valid.long().cumsum(1) - 1, slots)
    block_mask = None
    if layout.mode == "block":
        seg = layout.segment_ids(device)
        packed_seg = seg[gather] if L else torch.zeros_like(gather)
        block_mask = packed_seg[:, None, :] <= packed_seg[:, :, None]
        block_mask = (block_mask & slot_valid[:, None, :]) | ~slot_valid[:, :, None]
        block_mask = block_mask[:, None]
    return _Packing(gather, slot_valid, scatter, block_mask)


def _key_valid(layout: C2FLayout, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: ``j - start(seg(j)) < lengths[b, seg(j)]``, the definition of a real token."""
    device = lengths.device
    sizes = torch.tensor(layout.segment_sizes, dtype=torch.int64, device=device)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes, output_size=layout.seq_len)
    starts = torch.tensor(layout.offsets, dtype=torch.int64, device=device)
    offset = torch.arange(layout.seq_len, device=device) - starts[seg]
    return offset[None, :] < lengths[:, seg]


def _packing(layout: C2FLayout, device: torch.device) -> _Packing:
    # The lengths' version counter notices an in-place change (which the layout forbids anyway).
    key = (device, layout.lengths._version)
    per_layout = _PACKINGS.get(layout)
    if per_layout is None:
        per_layout = _PACKINGS[layout] = {}
    packing = per_layout.get(key)
    if packing is None:
        per_layout.clear()
        packing = per_layout[key] = _build_packing(layout, device)
    return packing


def _zeros_from(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like x that still belong to its autograd graph (zero gradient, even for NaN x)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0)


def _pack(x: torch.Tensor, packing: _Packing) -> torch.Tensor:
    """x (B, Hh, L, Dh) -> (B, Hh, Lr, Dh), real tokens first, empty slots exactly 0."""
    B, Hh, _, Dh = x.shape
    index = packing.gather[:, None, :, None].expand(B, Hh, -1, Dh)
    packed = x.gather(2, index) if x.shape[2] else x.new_zeros(B, Hh, index.shape[2], Dh)
    return torch.where(packing.slot_valid[:, None, :, None], packed, 0)


def c2f_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: C2FLayout, *, scale: float | None = None
) -> torch.Tensor:
    """Coarse-to-fine masked attention (fast path), same contract as the reference.

    q, k, v: (B, Hh, L, Dh), L = layout.seq_len. Returns (B, Hh, L, Dh) in q's dtype; pad queries
    are exactly 0. Half-precision inputs are attended in float32 (like the reference), then cast.
    """
    B, Hh, L, Dh = q.shape
    if q.numel() == 0:
        return q * 0
    packing = _packing(layout, q.device)
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    qp, kp, vp = (_pack(t, packing).to(compute) for t in (q, k, v))
    if packing.block_mask is None:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=packing.block_mask, scale=scale)
    # Slot Lr is a zero row: pad positions gather it and come out exactly 0.
    out = torch.cat([out.to(q.dtype), out.new_zeros(B, Hh, 1, Dh, dtype=q.dtype)], 2)
    return out.gather(2, packing.scatter[:, None, :, None].expand(B, Hh, L, Dh))


def c2f_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Few-query attention over a KV cache (fast path), same contract as the reference.

    q: (B, Hh, Lq, Dh); k_cache, v_cache: (B, Hh, Lk, Dh); key_valid: (B, Lk) bool. A query with
    no valid key returns 0.
    """
    B, Hh, Lq, Dh = q.shape
    Lk = k_cache.shape[2]
    if q.numel() == 0 or Lk == 0:
        return _zeros_from(q)
    invalid = ~key_valid
    any_valid = key_valid.any(1)  # (B,)
    all_valid = bool(key_valid.all())
    if not all_valid:
        # Only the invalid positions are checked: usually few, and finite (then no copy is made).
        rows, cols = invalid.nonzero(as_tuple=True)
        if not (torch.isfinite(k_cache[rows, :, cols]).all() and torch.isfinite(v_cache[rows, :, cols]).all()):
            drop = invalid[:, None, :, None]
            k_cache = torch.where(drop, 0, k_cache)
            v_cache = torch.where(drop, 0, v_cache)
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    qc, kc, vc = (t.to(compute) for t in (q, k_cache, v_cache))
    if all_valid:
        return F.scaled_dot_product_attention(qc, kc, vc, scale=scale).to(q.dtype)
    # A sample without any valid key attends to every (then zeroed) key and is zeroed after.
    mask = (key_valid | ~any_valid[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale).to(q.dtype)
    if bool(any_valid.all()):
        return out
    return torch.where(any_valid[:, None, None, None], out, 0)


def c2f_attention_reasons(q, k, v, layout, *, scale=None) -> list[str]:
    """Why the fast path cannot serve this call: never, for a call the ops layer accepted."""
    return []


def c2f_decode_attention_reasons(q, k_cache, v_cache, key_valid, *, scale=None) -> list[str]:
    return []
