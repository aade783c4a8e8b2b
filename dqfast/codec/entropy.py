"""Entropy coding of integer arrays with static, exactly reproducible probability tables.

A table is a row of integer counts summing to ``TOTAL = 2**16`` with every count >= 1, so every
symbol can be coded and the table is a pure function of the integers. constriction receives
``counts / TOTAL`` as float64: with a power-of-two total those fractions and their partial sums are
exact in float64, so its fixed-point model (24-bit, ``perfect=False``) is the same on every
machine and the decoder rebuilds exactly the encoder's model.

:class:`IntegerTables` covers the integers ``lo..hi`` plus an escape symbol: a value outside the
range is coded as the escape, followed by its raw 32 bits (two uniform 16-bit symbols), so coding is
lossless for any int32 value while the table stays small.

Every stream ends with a 16-bit end mark (:data:`END_MARK`): a stream that runs dry before the
symbols the header announces is an error, never zeros. Before decoding, a stream shorter than the
least its announced symbols can take (each at its row's most likely value) is refused.

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

__all__ = [
    "TOTAL",
    "IntegerTables",
    "quantize_pmf",
    "encode_rows",
    "decode_rows",
    "information_bits",
    "check_symbol_range",
    "SYMBOL_MIN",
    "SYMBOL_MAX",
]

TOTAL_BITS = 16
TOTAL = 1 << TOTAL_BITS

# Escaped values travel as two 16-bit halves of their two's-complement int32 pattern.
_HALF = 1 << 16
# The symbols a stream can carry: int32.
SYMBOL_MIN, SYMBOL_MAX = -(1 << 31), (1 << 31) - 1
# An ANS stream may be this many bits shorter than the information content of its symbols
# (the coder's state holds up to 64 bits; rounding in the state update is far below 1 %).
_SLACK_BITS = 64
# The last symbols of every stream, three uniform 16-bit values. constriction decodes an exhausted
# stream as endless zeros (a symbol of cumulative count 0 coded on a coder whose state is below its
# count leaves the state unchanged), so without a mark a stream cut short, or empty, would decode
# "successfully". Pushed first, the mark also lifts the state above 2**32, where every symbol
# changes it: an extra or missing symbol then garbles the mark.
END_MARK = (0xD9F5, 0x6A3C, 0xB1E7)


def check_symbol_range(values, *, what: str = "latents", lo: int = SYMBOL_MIN, hi: int = SYMBOL_MAX) -> None:
    """Raise ValueError unless every value of ``values`` is finite and rounds into ``lo..hi``.

    Call it on the unrounded (float) values *before* converting them to integers: a float beyond
    int32 wraps or saturates silently in the conversion, and the file would decode to garbage.
    ``values``: a torch tensor or anything numpy reads. ``what`` names the values in the message.
    """
    try:
        import torch

        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return
    if not np.isfinite(array).all():
        raise ValueError(f"{what} are not finite (NaN or infinity): the rate setting is out of range")
    low, high = np.round(array.min()), np.round(array.max())
    if low < lo or high > hi:
        raise ValueError(
            f"{what} span {low:.4g}..{high:.4g}, beyond the codable range {lo}..{hi}: the rate setting is too high"
        )


def push_end_mark(coder) -> None:
    """Push :data:`END_MARK` onto an ANS ``coder`` first, so the decoder reads it last."""
    coder.encode_reverse(np.array(END_MARK, dtype=np.int32), constriction.stream.model.Uniform(_HALF))


def push_escapes(coder, values: np.ndarray) -> None:
    """Push escaped int32 ``values`` (in the order the decoder reads them) as two 16-bit halves each."""
    escaped = np.asarray(values).astype(np.int32).view(np.uint32)
    if escaped.size:
        halves = np.stack([escaped & (_HALF - 1), escaped >> 16], axis=1).reshape(-1).astype(np.int32)
        coder.encode_reverse(halves, constriction.stream.model.Uniform(_HALF))


def pop_escapes(coder, n: int) -> np.ndarray:
    """Read ``n`` escaped values pushed by :func:`push_escapes`: (n,) int32."""
    halves = coder.decode(constriction.stream.model.Uniform(_HALF), 2 * n).astype(np.uint32)
    return (halves[0::2] | (halves[1::2] << 16)).astype(np.uint32).view(np.int32)


def read_end_mark(coder) -> str | None:
    """Read the end mark off ``coder``; the reason the stream is damaged, or None when it ends cleanly."""
    guard = tuple(int(v) for v in coder.decode(constriction.stream.model.Uniform(_HALF), len(END_MARK)))
    if guard != END_MARK:
        return "corrupted file: the entropy-coded stream ends early or is damaged (no end mark)"
    if not coder.is_empty():
        return "corrupted file: the entropy-coded stream holds more data than the header announces"
    return None


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
    # ANS is a stack: push what the decoder reads last first. Decoding order: rows 0..R-1, escapes,
    # end mark.
    push_end_mark(coder)
    push_escapes(coder, values[outside])
    models = _models(tables)
    for r in reversed(range(tables.rows)):
        if symbols.shape[1]:
            coder.encode_reverse(symbols[r], models[r])
    return coder.get_compressed()


def minimum_bits(tables: IntegerTables, n: int) -> float:
    """The fewest bits any stream of ``n`` symbols per row can take: each at its row's most likely symbol."""
    top = tables.counts.max(axis=1).astype(np.float64)
    return float(n * -np.log2(top / TOTAL).sum())


def decode_rows(words: np.ndarray, tables: IntegerTables, n: int) -> np.ndarray:
    """Inverse of :func:`encode_rows`: returns (R, n) int64.

    Raises :class:`~dqfast.codec.container.CodecError` when the words are not a valid stream for
    ``n`` symbols per row: shorter than the least those symbols can take (checked before anything
    is decoded or allocated), exhausted before the last symbol, rejected by constriction, or with
    words left over.
    """
    words = np.ascontiguousarray(words, dtype=np.uint32)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # 0.9: the coder's integer state update can round a symbol's cost slightly below its information.
    need = minimum_bits(tables, n)
    if 32 * words.size + _SLACK_BITS < 0.9 * need:
        raise CodecError(
            f"corrupted file: a stream of {4 * words.size} bytes cannot hold {tables.rows} x {n} symbols "
            f"(they need at least {need / 8:.0f} bytes)"
        )
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = np.empty((tables.rows, n), dtype=np.int64)
        if n:
            models = _models(tables)
            for r, model in enumerate(models):
                out[r] = coder.decode(model, n)
        escape = tables.counts.shape[1] - 1
        outside = out == escape
        out += tables.lo
        n_escaped = int(outside.sum())
        if n_escaped:
            out[outside] = pop_escapes(coder, n_escaped)
        problem = read_end_mark(coder)
    except (ValueError, KeyError) as e:
        raise CodecError(f"corrupted file: invalid entropy-coded stream ({e})") from None
    if problem:
        raise CodecError(problem)
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
