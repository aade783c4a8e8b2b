"""Coarse-to-fine attention as a composite of ``F.scaled_dot_product_attention`` calls.

The reference (``dqfast.reference.c2f_attention``) materialises the fp32 (B, Hh, L, L) scores, a
masked copy, the softmax and a second masked copy. Here the real tokens of every sample are
packed to the front of a shorter sequence of ``Lr = max_b (real tokens of b)`` slots, in their
original order. Packing keeps the order of the real tokens, so in mode "causal" the allowed pairs
are exactly ``j' <= i'`` among the packed slots: plain causal SDPA with no mask at all, on a
sequence that is often half as long (a quarter of the pairs). Mode "block" keeps a boolean mask,
``seg(j') <= seg(i')``, over the packed slots. Each output position is then gathered back from its
slot; pad positions gather from an appended zero slot, so they are exactly 0 and send no gradient.

Non-finite pads: pad positions are never read. The empty slots at the end of a short sample
repeat its first real token (their outputs are dropped, and finite values keep their zero
gradient from turning into NaN in SDPA's backward); a sample with no real token at all has its
slots zeroed with ``torch.where``. So NaN/inf in a pad query, key or value reaches neither an
output nor a gradient.

Short sequences (L <= ``DENSE_MAX_LEN``) skip the packing, whose gathers cost more than they save
there: one SDPA call with the layout's cached additive mask. The rows of pad queries are closed
(no allowed key), which SDPA answers with exact zeros and zero gradients on CPU (checked once per
device and dtype by :func:`_closes_empty_rows`; where it does not, the rows are left open and the
output zeroed after with ``masked_fill``). A non-finite pad still reaches SDPA there, so the call
goes to the packed path when it could show: without autograd, when the output is not finite; with
autograd, when ``q + k * out`` is not (a NaN/inf pad value or a NaN pad query shows in the output;
an infinite pad key or query whose scores are all -inf leaves the forward finite but puts
0 * inf in dQ or dK). The output gradient of a pad row meets only zero weights: a finite one
contributes nothing, a NaN or inf one is carried on as in the reference (the packed path and the
open rows happen to drop it).

The packing indices and masks depend only on the layout, so they are computed once per layout
object (and device) and cached for as long as the layout lives: the layers of a model share them.

Decoding (``c2f_decode_attention``): SDPA on the cache with the (B, 1, 1, Lk) validity mask, the
cache first cut (a view) after the last position that some sample may attend to. A masked key contributes
``exp(-inf) * v = 0 * v``, which is NaN when v is not finite; the invalid cached positions are
zeroed in a copy of the cache only when one of them is not finite (see the function).
"""

from __future__ import annotations

import math
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
        s-th real token of sample b; later slots repeat its first real token, so they hold finite
        values whenever the real tokens are finite).
    slot_valid: (B, Lr) bool, slot s of sample b holds a real token.
    zero_empty: whether some sample has no real token at all: only then are its slots (which
        hold a pad) zeroed after the gather.
    scatter: (B, L) int64, the slot of every position; pad positions point at slot Lr (a zero row).
    block_mask: (B, 1, Lr, Lr) bool for mode "block" (None for "causal"); rows of empty slots are
        all True so SDPA never sees a fully masked row (their outputs are dropped).
    """

    gather: torch.Tensor
    slot_valid: torch.Tensor
    zero_empty: bool
    scatter: torch.Tensor
    block_mask: torch.Tensor | None


# layout -> {(device, lengths version): _Packing, ("dense", device, dtype, version): masks}. Weak
# keys: the tables die with the layout.
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
    gather = torch.where(slot_valid, order[:, :slots], order[:, :1])
    zero_empty = bool((counts == 0).any()) if B else False
    scatter = torch.where(valid, valid.long().cumsum(1) - 1, slots)
    block_mask = None
    if layout.mode == "block":
        seg = layout.segment_ids(device)
        packed_seg = seg[gather] if L else torch.zeros_like(gather)
        block_mask = packed_seg[:, None, :] <= packed_seg[:, :, None]
        block_mask = (block_mask & slot_valid[:, None, :]) | ~slot_valid[:, :, None]
        block_mask = block_mask[:, None]
    return _Packing(gather, slot_valid, zero_empty, scatter, block_mask)


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
        # Normal tensors even when built in inference mode: autograd saves the gather indices.
        with torch.inference_mode(False):
            packing = per_layout[key] = _build_packing(layout, device)
    return packing


def _zeros_from(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like x that still belong to its autograd graph (zero gradient, even for NaN x)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0)


# Sequences up to this length take the dense path: per-call overhead dominates there, and one SDPA
# call with a cached additive mask beats packing's gathers.
DENSE_MAX_LEN = 128
_DENSE_DTYPES = (torch.float32, torch.float64)

# PyTorch's CPU flash-attention kernel runs fastest when the number of keys is a multiple of 16 in
# float32 (measured on the 2-core AVX-512 Xeon, B=2, Hh=2, Lq=41, Dh=32, one thread: 17 us forward
# at 32 keys, 26 at 24, 29 at 40, 20 at 48; float64 shows no such steps). When every key past
# such a multiple is a pad in every sample (a DQ layout rarely fills its last segment), the dense
# path reads only the keys up to it: views of k and v, exact since those keys are masked anyway.
KEY_BLOCK = {torch.float32: 16}


class _Dense(NamedTuple):
    """Per-layout tables of the dense path, on one device and in one dtype.

    mask: (B, 1, L, keys) additive, 0 where query i may attend to key j, -inf elsewhere.
    keys: how many leading key positions SDPA reads (see :data:`KEY_BLOCK`); later ones are pads
        in every sample.
    closed: the rows of pad queries are all -inf (SDPA returns 0 for them); otherwise they are all
        0 and the output rows are zeroed after.
    query_pad: (B, 1, L, 1) bool, query i of sample b is a pad.
    query_valid: (B, 1, L, 1) 1/0 in the mask's dtype, its complement.
    """

    mask: torch.Tensor
    keys: int
    closed: bool
    query_pad: torch.Tensor
    query_valid: torch.Tensor


# (device, dtype) -> whether SDPA there returns exact zeros (and zero gradients) for closed rows.
_CLOSED_ROWS: dict[tuple[torch.device, torch.dtype], bool] = {}


def _closes_empty_rows(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA on ``device`` in ``dtype`` answers a query row with no allowed key with exact
    zeros, finite values elsewhere, and gradients that are exactly zero through that row.

    Probed once with a 128-long causal layout whose position 1 is a pad (PyTorch's CPU
    kernels do this; a kernel that replaces -inf with a large finite number would average the
    values instead, one without the special case would return NaN).
    """
    key = (device, dtype)
    if key not in _CLOSED_ROWS:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                gen = torch.Generator().manual_seed(0)
                L = 128
                q, k, v, g = (torch.randn(1, 2, L, 8, generator=gen).to(device, dtype) for _ in range(4))
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                pos = torch.arange(L, device=device)
                real = pos != 1
                allowed = (pos[None, :] <= pos[:, None]) & real[None, :] & real[:, None]
                mask = torch.zeros(L, L, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
                closed_ok = all(bool((t[:, :, 1] == 0).all()) for t in (out, dq, dk, dv))
                finite = all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv))
            _CLOSED_ROWS[key] = closed_ok and finite
        except RuntimeError:
            _CLOSED_ROWS[key] = False
    return _CLOSED_ROWS[key]


def _dense_tables(layout: C2FLayout, device: torch.device, dtype: torch.dtype) -> _Dense:
    """The dense path's tables (see :class:`_Dense`), cached per layout."""
    per_layout = _PACKINGS.get(layout)
    key = ("dense", device, dtype, layout.lengths._version)
    if per_layout is not None and key in per_layout:
        return per_layout[key]
    closed = _closes_empty_rows(device, dtype)
    # Normal tensors even when built in inference mode: an autograd-recorded SDPA saves the mask.
    with torch.inference_mode(False):
        valid = _key_valid(layout, layout.lengths.to(device))
        L = valid.shape[1]
        if layout.mode == "causal":
            positions = torch.arange(L, device=device)
            order = positions[None, :] <= positions[:, None]
        else:
            seg = layout.segment_ids(device)
            order = seg[None, :] <= seg[:, None]
        allowed = valid[:, None, :] & order
        # Pad query rows: closed (no key), or open (every key) where SDPA does not zero closed rows.
        allowed = allowed & valid[:, :, None] if closed else allowed | ~valid[:, :, None]
        keys = L
        block = KEY_BLOCK.get(dtype) if device.type == "cpu" else None
        if block and L:
            used = valid.any(0).nonzero()
            if used.numel():
                keys = min(L, -(-(int(used[-1]) + 1) // block) * block)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
        mask = mask[:, None, :, :keys].contiguous()
        entry = _Dense(mask, keys, closed, ~valid[:, None, :, None], valid[:, None, :, None].to(dtype))
    if per_layout is None:
        per_layout = _PACKINGS[layout] = {}
    per_layout[key] = entry
    return entry


def _finite_for_autograd(q: torch.Tensor, k: torch.Tensor, raw: torch.Tensor) -> bool:
    """Whether q, k and SDPA's raw output are all finite (one fused product and one sum: the sum
    is non-finite whenever one term is, and, harmlessly, when it overflows)."""
    q, k, raw = q.detach(), k.detach(), raw.detach()  # (cheaper than a no_grad block)
    if q.shape == k.shape == raw.shape:
        return math.isfinite(torch.addcmul(q, k, raw).sum().item())
    return math.isfinite((q.sum() + k.sum() + raw.sum()).item())


def _pack(x: torch.Tensor, packing: _Packing) -> torch.Tensor:
    """x (B, Hh, L, Dh) -> (B, Hh, Lr, Dh), real tokens first; no slot holds a pad's value."""
    B, Hh, _, Dh = x.shape
    index = packing.gather[:, None, :, None].expand(B, Hh, -1, Dh)
    packed = x.gather(2, index) if x.shape[2] else x.new_zeros(B, Hh, index.shape[2], Dh)
    if packing.zero_empty:
        packed = torch.where(packing.slot_valid[:, None, :, None], packed, 0)
    return packed


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
    if L <= DENSE_MAX_LEN and q.dtype in _DENSE_DTYPES:
        dense = _dense_tables(layout, q.device, q.dtype)
        kd, vd = (k, v) if dense.keys == L else (k[:, :, : dense.keys], v[:, :, : dense.keys])
        raw = F.scaled_dot_product_attention(q, kd, vd, attn_mask=dense.mask, scale=scale)
        if raw.grad_fn is None:
            # No autograd: every non-finite pad that could change an output shows in it.
            if not dense.closed:
                raw.mul_(dense.query_valid)
            if math.isfinite(raw.sum().item()):
                return raw
        elif _finite_for_autograd(q, k, raw):
            if not dense.closed:
                # masked_fill (not a product): its backward drops a non-finite pad-row gradient.
                return raw.masked_fill(dense.query_pad, 0)
            return raw
    packing = _packing(layout, q.device)
    qp, kp, vp = (_pack(t, packing) for t in (q, k, v))
    if q.dtype not in (torch.float32, torch.float64):
        qp, kp, vp = qp.float(), kp.float(), vp.float()
    if packing.block_mask is None:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=packing.block_mask, scale=scale)
    # Slot Lr is a zero row: pad positions gather it and come out exactly 0.
    out = F.pad(out.to(q.dtype), (0, 0, 0, 1))
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
    Lk = _keys_in_use(key_valid)
    if Lk < k_cache.shape[2]:
        # Trailing positions that no sample may attend to (the unfilled tail of a preallocated
        # cache, the pads at the end of the last segment) are cut off: views, and exact, since a
        # masked key contributes nothing; SDPA's work is proportional to the keys it reads.
        k_cache, v_cache, key_valid = k_cache[:, :, :Lk], v_cache[:, :, :Lk], key_valid[:, :Lk]
    if q.numel() == 0 or Lk == 0:
        return _zeros_from(q)
    qc, kc, vc = q, k_cache, v_cache
    if q.dtype not in (torch.float32, torch.float64):
        qc, kc, vc = (t.float() for t in (q, k_cache, v_cache))
    recording = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
    if not recording:
        # Inference: SDPA with the validity mask, as is. A masked key still contributes
        # exp(-inf) * v = 0 * v, NaN for a non-finite v (and a NaN key's score stays NaN under the
        # mask), and a sample without any valid key has a fully masked row: all of these show as
        # non-finite values in the (small) output, so the careful path runs only then.
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=key_valid.view(B, 1, 1, Lk), scale=scale)
        if math.isfinite(out.sum().item()):
            return out.to(q.dtype)
    elif not _finite(k_cache, v_cache, ~key_valid):
        # Under autograd an infinite masked key can poison the gradient alone: checked up front.
        kc, vc = _drop_invalid(kc, vc, key_valid)
    if not recording:
        kc, vc = _drop_invalid(kc, vc, key_valid)
    any_valid = key_valid.any(1)  # (B,)
    # A sample without any valid key attends to every (zeroed) key; its output is zeroed after.
    mask = (key_valid | ~any_valid[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale).to(q.dtype)
    if bool(any_valid.all()):
        return out
    return torch.where(any_valid[:, None, None, None], out, 0)


def _keys_in_use(key_valid: torch.Tensor) -> int:
    """1 + the last cache position that some sample may attend to (0 when there is none)."""
    if key_valid.numel() == 0:
        return 0
    used = key_valid.any(0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


def _finite(k: torch.Tensor, v: torch.Tensor, invalid: torch.Tensor) -> bool:
    """Whether the cached keys and values at the invalid positions are all finite."""
    rows, cols = invalid.nonzero(as_tuple=True)
    # A sum is non-finite whenever one term is (or, harmlessly, when it overflows).
    return bool(torch.isfinite(k[rows, :, cols].sum() + v[rows, :, cols].sum()))


def _drop_invalid(k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor):
    keep = key_valid[:, None, :, None]
    return torch.where(keep, k, 0), torch.where(keep, v, 0)


def c2f_attention_reasons(q, k, v, layout, *, scale=None) -> list[str]:
    """Why the fast path cannot serve this call: never, for a call the ops layer accepted."""
    return []


def c2f_decode_attention_reasons(q, k_cache, v_cache, key_valid, *, scale=None) -> list[str]:
    return []


def c2f_attention_detail(q, k, v, layout, *, scale=None) -> str:
    """Which method serves the call (:func:`dqfast.describe` shows it)."""
    L = q.shape[2]
    if L <= DENSE_MAX_LEN and q.dtype in _DENSE_DTYPES:
        dense = _dense_tables(layout, q.device, q.dtype)
        rows = "closed" if dense.closed else "open, zeroed after"
        keys = f", the first {dense.keys} keys (the rest are pads)" if dense.keys < L else ""
        return (
            f"dense: one SDPA call with the layout's cached additive mask (L = {L} <= DENSE_MAX_LEN = "
            f"{DENSE_MAX_LEN}; pad query rows {rows}{keys}); packed instead when a pad is not finite"
        )
    why = f"L = {L} > DENSE_MAX_LEN = {DENSE_MAX_LEN}" if L > DENSE_MAX_LEN else f"{q.dtype} attended in float32"
    return f"packed: SDPA over the real tokens only ({why})"


def c2f_decode_attention_detail(q, k_cache, v_cache, key_valid, *, scale=None) -> str:
    used, Lk = _keys_in_use(key_valid), k_cache.shape[2]
    if used < Lk:
        return f"SDPA with the validity mask over the first {used} of {Lk} cached positions (none later is valid)"
    return f"SDPA with the validity mask over all {Lk} cached positions"
