"""Entropy coding of integer arrays with static, exactly reproducible probability tables.

A table is a row of integer counts summing to ``TOTAL = 2**16`` with every count >= 1, so every
symbol can be coded and the table is a pure function of the integers. constriction receives
``counts / TOTAL`` as float64: with a power-of-two total those fractions and their partial sums are
exact in float64, so its fixed-point model (24-bit, ``perfect=False``) is the same on every
machine and the decoder rebuilds exactly the encoder's model.

:class:`IntegerTables` covers the integers ``lo..hi`` plus an escape symbol: a value outside the
range is coded as the escape, followed by its raw 32 bits (two uniform 16-bit symbols), so coding is
lossless for any int32 value while the table stays small.

Streams are constriction ANS stacks (``AnsCoder``): every row of symbols is coded by one vectorised
``encode_reverse`` call with a concrete categorical model, so Python loops only over table rows
(channels), never over symbols.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import constriction
import numpy as np

from dqfast.codec.container import CodecError

__all__ = ["TOTAL", "IntegerTables", "quantize_pmf", "encode_rows", "decode_rows", "information_bits"]

TOTAL_BITS = 16
TOTAL = 1 << TOTAL_BITS

# Escaped values travel as two 16-bit halves of their two's-complement int32 pattern.
_HALF = 1 << 16


def quantize_pmf(pmf: np.ndarray, total: int = TOTAL) -> np.ndarray:
    """Integer counts approximating each row of ``pmf``, every count >= 1, every row summing to ``total``.

    pmf: (C, K) or (K,) non-negative finite masses (need not be normalised; an all-zero row becomes
    uniform). Returns int64 counts of the same shape.

    Each symbol first gets one count (nothing may have zero probability), the remaining
    ``total - K`` are shared in proportion to the masses, rounded down, and the counts still missing
    go to the largest remainders, ties to the lower index (largest-remainder rounding). Everything is
    float64/int64 numpy arithmetic, so the result is deterministic for a given input.
    """
    masses = np.asarray(pmf, dtype=np.float64)
    squeeze = masses.ndim == 1
    if squeeze:
        masses = masses[None]
    if masses.ndim != 2 or masses.shape[1] == 0:
        raise ValueError(f"pmf must have shape (C, K) with K >= 1, got {masses.shape}")
    C, K = masses.shape
    if K > total:
        raise ValueError(f"a table of {K} symbols cannot give each symbol a count out of a total of {total}")
    if not np.isfinite(masses).all() or (masses < 0).any():
        raise ValueError("pmf must be finite and non-negative")
    row_mass = masses.sum(1, keepdims=True)
    masses = np.where(row_mass > 0, masses, 1.0)
    row_mass = masses.sum(1, keepdims=True)

    spare = total - K
    share = masses / row_mass * spare
    base = np.floor(share).astype(np.int64)
    missing = spare - base.sum(1)
    remainder = share - base
    order = np.argsort(-remainder, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(K), (C, K)), axis=1)
    counts = 1 + base + (rank < missing[:, None])
    assert (counts.sum(1) == total).all(), "largest-remainder rounding lost counts"
    return counts[0] if squeeze else counts


@dataclass(frozen=True, eq=False)
class IntegerTables:
    """Quantised tables over the integers ``lo..hi`` plus an escape symbol (last column).

    counts: (R, hi - lo + 2) int64, each row summing to ``TOTAL``, every entry >= 1.
    """

    lo: int
    counts: np.ndarray

    @classmethod
    def from_pmf(cls, pmf: np.ndarray, lo: int, escape_mass: float = 0.0) -> IntegerTables:
        """Tables from masses ``pmf`` (R, K) over ``lo..lo+K-1``; the escape gets ``escape_mass`` (at least 1 count)."""
        pmf = np.asarray(pmf, dtype=np.float64)
        if pmf.ndim != 2:
            raise ValueError(f"pmf must have shape (R, K), got {pmf.shape}")
        escape = np.full((pmf.shape[0], 1), float(escape_mass))
        return cls(int(lo), quantize_pmf(np.concatenate([pmf, escape], axis=1)))

    @property
    def hi(self) -> int:
        return self.lo + self.counts.shape[1] - 2

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    def probabilities(self) -> np.ndarray:
        """(R, K + 1) float64 ``counts / TOTAL``: exact binary fractions."""
        return self.counts.astype(np.float64) / TOTAL

    def digest(self) -> int:
        """CRC32 of the range and the counts: lets a decoder notice that its tables differ from the encoder's."""
        blob = np.asarray([self.lo, *self.counts.shape], dtype="<i8").tobytes() + self.counts.astype("<i4").tobytes()
        return zlib.crc32(blob)


def _models(tables: IntegerTables) -> list:
    probs = tables.probabilities()
    return [constriction.stream.model.Categorical(row, perfect=False) for row in probs]


def encode_rows(values: np.ndarray, tables: IntegerTables) -> np.ndarray:
    """Code ``values`` (R, N) integers, row r with table row r, into a stream of uint32 words.

    Values outside ``tables.lo..tables.hi`` are escaped and coded exactly (they must fit in int32).
    """
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != tables.rows:
        raise ValueError(f"values must have shape ({tables.rows}, N), got {values.shape}")
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        raise ValueError("values must fit in int32")
    values = values.astype(np.int64)
    escape = tables.counts.shape[1] - 1
    outside = (values < tables.lo) | (values > tables.hi)
    symbols = np.where(outside, escape, values - tables.lo).astype(np.int32)

    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: push what the decoder reads last first. Decoding order: rows 0..R-1, escapes.
    escaped = values[outside].astype(np.int32).view(np.uint32)
    if escaped.size:
        halves = np.stack([escaped & (_HALF - 1), escaped >> 16], axis=1).reshape(-1).astype(np.int32)
        coder.encode_reverse(halves, constriction.stream.model.Uniform(_HALF))
    models = _models(tables)
    for r in reversed(range(tables.rows)):
        if symbols.shape[1]:
            coder.encode_reverse(symbols[r], models[r])
    return coder.get_compressed()


def decode_rows(words: np.ndarray, tables: IntegerTables, n: int) -> np.ndarray:
    """Inverse of :func:`encode_rows`: returns (R, n) int64.

    Raises :class:`~dqfast.codec.container.CodecError` when the words are not a valid stream for
    ``n`` symbols per row (constriction rejects them, or words are left over).
    """
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        out = np.empty((tables.rows, n), dtype=np.int64)
        if n:
            for r, model in enumerate(_models(tables)):
                out[r] = coder.decode(model, n)
        escape = tables.counts.shape[1] - 1
        outside = out == escape
        out += tables.lo
        n_escaped = int(outside.sum())
        if n_escaped:
            halves = coder.decode(constriction.stream.model.Uniform(_HALF), 2 * n_escaped).astype(np.uint32)
            out[outside] = (halves[0::2] | (halves[1::2] << 16)).astype(np.uint32).view(np.int32)
        leftover = not coder.is_empty()
    except (ValueError, KeyError) as e:
        raise CodecError(f"corrupted file: invalid entropy-coded stream ({e})") from None
    if leftover:
        raise CodecError("corrupted file: the entropy-coded stream holds more data than the header announces")
    return out


def information_bits(values: np.ndarray, pmf: np.ndarray, lo: int) -> float:
    """Ideal code length in bits of ``values`` (R, N) under float masses ``pmf`` (R, K) over ``lo..lo+K-1``.

    The model's own rate estimate (no table quantisation, no stream overhead); values outside the
    range are charged at the smallest mass of their row.
    """
    values = np.asarray(values, dtype=np.int64)
    pmf = np.asarray(pmf, dtype=np.float64)
    pmf = pmf / pmf.sum(1, keepdims=True)
    index = np.clip(values - lo, 0, pmf.shape[1] - 1)
    p = np.take_along_axis(pmf, index, axis=1)
    tiny = np.maximum(pmf.min(1, keepdims=True), np.finfo(np.float64).tiny)
    p = np.where((values - lo < 0) | (values - lo >= pmf.shape[1]), tiny, p)
    return float(-np.log2(np.maximum(p, np.finfo(np.float64).tiny)).sum())
