"""Coarse-to-fine attention: layout and mask semantics, the reference against an independent float64
row-by-row softmax, gradients, KV-cache decoding equivalences, the C2FAttention module, bad input."""

from __future__ import annotations

import os

import pytest
import torch

import dqfast
from dqfast.nn.c2f_attention import C2FAttention
from dqfast.reference.c2f_attention import C2FLayout, c2f_attention, c2f_decode_attention
from tests.helpers import randn, seed

# (segment_sizes, lengths, mode): full capacity, short and empty segments, zero-size segments, B = 1.
CASES = {
    "causal_dq": ((6, 7), [[6, 7], [3, 1]], "causal"),
    "block_var": ((1, 4, 9), [[1, 4, 9], [1, 2, 0]], "block"),
    "causal_empty": ((3, 0, 5), [[0, 0, 5], [3, 0, 2]], "causal"),
    "block_b1": ((4, 0, 4), [[2, 0, 4]], "block"),
}


def make_layout(name: str) -> C2FLayout:
    sizes, lengths, mode = CASES[name]
    return C2FLayout(sizes, torch.tensor(lengths), mode)


def loop_valid(sizes, lengths) -> list[list[bool]]:
    """valid[b][j] by walking the segments one position at a time."""
    rows = []
    for per_sample in lengths:
        row = []
        for size, n in zip(sizes, per_sample):
            row += [offset < n for offset in range(size)]
        rows.append(row)
    return rows


def loop_mask(sizes, lengths, mode) -> torch.Tensor:
    """(B, L, L) bool built by explicit loops over samples, queries and keys."""
    segment_of = [s for s, size in enumerate(sizes) for _ in range(size)]
    L = len(segment_of)
    mask = torch.zeros(len(lengths), L, L, dtype=torch.bool)
    for b, valid in enumerate(loop_valid(sizes, lengths)):
        for i in range(L):
            for j in range(L):
                ordered = j <= i if mode == "causal" else segment_of[j] <= segment_of[i]
                mask[b, i, j] = valid[i] and valid[j] and ordered
    return mask


def rowwise_attention(q, k, v, mask, scale=None) -> torch.Tensor:
    """Float64 attention one query row at a time over the gathered allowed keys (differentiable).

    q, k, v: (B, Hh, L, Dh); mask: (B, Lq, Lk) bool. Rows with no allowed key are 0.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Hh, Lq, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    rows = []
    for b in range(B):
        for h in range(Hh):
            for i in range(Lq):
                keys = mask[b, i].nonzero().flatten()
                if keys.numel() == 0:
                    rows.append(torch.zeros(Dh, dtype=torch.float64))
                    continue
                weights = torch.softmax((k[b, h, keys] @ q[b, h, i]) * scale, dim=0)
                rows.append(weights @ v[b, h, keys])
    return torch.stack(rows).reshape(B, Hh, Lq, Dh)


def qkv(B, Hh, L, Dh, dtype=torch.float32, requires_grad=False):
    return tuple(randn(B, Hh, L, Dh, dtype=dtype, requires_grad=requires_grad) for _ in range(3))


# ---------------------------------------------------------------------------------------------
# Layout and mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_dense_mask_and_key_valid_match_loops(name):
    sizes, lengths, mode = CASES[name]
    layout = make_layout(name)
    assert layout.key_valid().tolist() == loop_valid(sizes, lengths)
    assert torch.equal(layout.dense_mask(), loop_mask(sizes, lengths, mode))


@pytest.mark.parametrize("name", list(CASES))
def test_mask_mod_on_index_grids_equals_dense_mask(name):
    layout = make_layout(name)
    B, L, Hh = layout.batch_size, layout.seq_len, 2
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(Hh)[None, :, None, None]
    q_idx = torch.arange(L)[None, None, :, None]
    kv_idx = torch.arange(L)[None, None, None, :]
    # The mask does not depend on the head, so the result broadcasts over h.
    grid = torch.broadcast_to(layout.mask_mod(b, h, q_idx, kv_idx), (B, Hh, L, L))
    assert torch.equal(grid, layout.dense_mask()[:, None].expand(B, Hh, L, L))
    # One scalar call (how FlexAttention's vmap sees it) agrees too.
    allowed = layout.dense_mask()
    i, j = L - 1, L // 2
    scalar = layout.mask_mod(torch.tensor(B - 1), torch.tensor(0), torch.tensor(i), torch.tensor(j))
    assert bool(scalar) == bool(allowed[B - 1, i, j])


def test_layout_attributes_and_helpers():
    lengths = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    layout = C2FLayout([2, 1, 4], lengths, mode="block")
    assert layout.lengths is lengths
    assert (layout.segment_sizes, layout.offsets) == ((2, 1, 4), (0, 2, 3))
    assert (layout.num_segments, layout.seq_len, layout.batch_size, layout.mode) == (3, 7, 1, "block")
    assert layout.segment_ids("cpu").tolist() == [0, 0, 1, 2, 2, 2, 2]
    assert layout.segment_ids().dtype == torch.int64
    assert layout.to("cpu").seq_len == 7
    text = repr(layout)
    assert "segment_sizes=(2, 1, 4)" in text and "'block'" in text


def test_dq_transformer_layout():
    layout = C2FLayout.dq_transformer([2, 0], [3, 5], coarse_capacity=3, fine_capacity=5)
    assert layout.segment_sizes == (5, 6) and layout.mode == "causal"
    assert layout.lengths.tolist() == [[4, 4], [2, 6]]
    # [sos, c, c, eos, pad][f, f, f, eos, pad, pad] and [sos, eos, pad, pad, pad][f x5, eos]
    expected = [[1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]]
    assert layout.key_valid().int().tolist() == expected
    with pytest.raises(ValueError, match="coarse_counts"):
        C2FLayout.dq_transformer([4], [1], coarse_capacity=3, fine_capacity=5)
    with pytest.raises(ValueError, match="fine_counts"):
        C2FLayout.dq_transformer([1], [-1], coarse_capacity=3, fine_capacity=5)


# ---------------------------------------------------------------------------------------------
# Reference attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("heads", [1, 3])
def test_reference_matches_rowwise_float64(name, heads):
    seed(1)
    sizes, lengths, mode = CASES[name]
    layout = make_layout(name)
    q, k, v = qkv(layout.batch_size, heads, layout.seq_len, 5)  # Dh = 5: not a power of two
    exact = rowwise_attention(q, k, v, loop_mask(sizes, lengths, mode))
    out = c2f_attention(q, k, v, layout)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)
    out64 = c2f_attention(q.double(), k.double(), v.double(), layout)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, exact, atol=1e-12, rtol=1e-12)


def test_explicit_scale():
    seed(2)
    layout = make_layout("block_var")
    q, k, v = qkv(2, 2, layout.seq_len, 3)
    exact = rowwise_attention(q, k, v, layout.dense_mask(), scale=1.7)
    torch.testing.assert_close(c2f_attention(q, k, v, layout, scale=1.7).double(), exact, atol=2e-6, rtol=1e-5)


def test_pad_queries_are_zero_with_zero_finite_gradients():
    seed(3)
    layout = make_layout("causal_empty")
    valid = layout.key_valid()
    q, k, v = qkv(layout.batch_size, 2, layout.seq_len, 6, requires_grad=True)
    out = c2f_attention(q, k, v, layout)
    pad = ~valid[:, None, :, None].expand_as(out)
    assert torch.isfinite(out).all()
    assert (out[pad] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # Pad queries get no gradient; pad keys and values are never read, so neither do they.
    for t in (q, k, v):
        assert (t.grad[pad] == 0).all()
    # The real positions' gradients match the row-by-row float64 formulation.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rowwise_attention(q64, k64, v64, layout.dense_mask()).square().sum().backward()
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-5, rtol=1e-4)


def test_all_positions_padded_gives_zeros():
    layout = C2FLayout((3, 2), torch.zeros(2, 2, dtype=torch.int64))
    q, k, v = qkv(2, 1, 5, 4, requires_grad=True)
    out = c2f_attention(q, k, v, layout)
    assert (out == 0).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


@pytest.mark.parametrize("mode", ["causal", "block"])
def test_gradcheck_float64(mode):
    seed(4)
    layout = C2FLayout((2, 3), torch.tensor([[2, 1], [1, 3]]), mode)
    q, k, v = qkv(2, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: c2f_attention(a, b, c, layout), (q, k, v))


def test_fp16_inputs():
    seed(5)
    layout = make_layout("causal_dq")
    q, k, v = qkv(layout.batch_size, 2, layout.seq_len, 8, dtype=torch.float16)
    out = c2f_attention(q, k, v, layout)
    assert out.dtype == torch.float16
    exact = rowwise_attention(q, k, v, layout.dense_mask())
    # Computed in fp32, then rounded once to fp16: within half an fp16 ulp of the largest value.
    bound = 2.0**-11 * exact.abs().max().item() + 1e-5
    assert (out.double() - exact).abs().max().item() <= bound


# ---------------------------------------------------------------------------------------------
# KV-cache decoding
# ---------------------------------------------------------------------------------------------


def test_decode_token_by_token_reproduces_causal_attention():
    seed(6)
    layout = make_layout("causal_empty")
    B, Hh, L, Dh = layout.batch_size, 2, layout.seq_len, 5
    q, k, v = qkv(B, Hh, L, Dh)
    full = c2f_attention(q, k, v, layout)
    valid = layout.key_valid()
    k_cache, v_cache = torch.zeros(B, Hh, L, Dh), torch.zeros(B, Hh, L, Dh)
    key_valid = torch.zeros(B, L, dtype=torch.bool)
    for t in range(L):
        k_cache[:, :, t], v_cache[:, :, t], key_valid[:, t] = k[:, :, t], v[:, :, t], valid[:, t]
        step = c2f_decode_attention(
            q[:, :, t : t + 1], k_cache[:, :, : t + 1], v_cache[:, :, : t + 1], key_valid[:, : t + 1]
        )
        for b in range(B):
            if valid[b, t]:
                torch.testing.assert_close(step[b, :, 0], full[b, :, t], atol=1e-6, rtol=1e-5)


def test_decode_segment_at_a_time_reproduces_block_attention():
    seed(7)
    layout = make_layout("block_var")
    B, Hh, L, Dh = layout.batch_size, 3, layout.seq_len, 4
    q, k, v = qkv(B, Hh, L, Dh)
    full = c2f_attention(q, k, v, layout)
    valid = layout.key_valid()
    k_cache, v_cache = torch.zeros(B, Hh, L, Dh), torch.zeros(B, Hh, L, Dh)
    key_valid = torch.zeros(B, L, dtype=torch.bool)
    for start, size in zip(layout.offsets, layout.segment_sizes):
        end = start + size
        k_cache[:, :, start:end], v_cache[:, :, start:end] = k[:, :, start:end], v[:, :, start:end]
        key_valid[:, start:end] = valid[:, start:end]
        step = c2f_decode_attention(q[:, :, start:end], k_cache[:, :, :end], v_cache[:, :, :end], key_valid[:, :end])
        real = valid[:, None, start:end, None].expand_as(step)
        torch.testing.assert_close(step[real], full[:, :, start:end][real], atol=1e-6, rtol=1e-5)


def test_decode_matches_rowwise_and_empty_rows_are_zero():
    seed(8)
    q = randn(2, 2, 3, 6)
    k, v = randn(2, 2, 7, 6), randn(2, 2, 7, 6)
    key_valid = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0] * 7], dtype=torch.bool)
    out = c2f_decode_attention(q, k, v, key_valid, scale=0.5)
    exact = rowwise_attention(q, k, v, key_valid[:, None, :].expand(2, 3, 7), scale=0.5)
    torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)
    assert (out[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# C2FAttention module (backend pinned to the reference: kernel parity is tested elsewhere)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def reference_backend():
    with dqfast.use_backend("reference"):
        yield


def test_module_forward_matches_manual_heads(reference_backend):
    seed(9)
    layout = make_layout("causal_dq")
    module = C2FAttention(15, 3)  # Dh = 5
    x = randn(layout.batch_size, layout.seq_len, 15)
    with torch.no_grad():
        y = module(x, layout)
        q, k, v = (module.qkv(x).double().reshape(2, 13, 3, 3, 5).permute(2, 0, 3, 1, 4)).unbind(0)
        heads = rowwise_attention(q, k, v, layout.dense_mask())
        expected = heads.permute(0, 2, 1, 3).reshape(2, 13, 15) @ module.out.weight.double().T
        expected = expected + module.out.bias.double()
    assert y.shape == (2, 13, 15)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_module_step_token_by_token_equals_causal_forward(reference_backend):
    seed(10)
    layout = C2FLayout.dq_transformer([2, 0], [4, 1], coarse_capacity=3, fine_capacity=5)
    module = C2FAttention(12, 4, bias=True).eval()  # Dh = 3
    x = randn(layout.batch_size, layout.seq_len, 12)
    valid = layout.key_valid()
    with torch.no_grad():
        full = module(x, layout)
        cache = module.new_cache(layout.batch_size, layout.seq_len)
        steps = [module.step(x[:, t : t + 1], cache, valid[:, t : t + 1]) for t in range(layout.seq_len)]
    assert cache.length == layout.seq_len and torch.equal(cache.key_valid, valid)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_module_step_segment_at_a_time_equals_block_forward(reference_backend):
    seed(11)
    layout = make_layout("block_var")
    module = C2FAttention(10, 2).eval()
    x = randn(layout.batch_size, layout.seq_len, 10)
    valid = layout.key_valid()
    with torch.no_grad():
        full = module(x, layout)
        cache = module.new_cache(layout.batch_size, layout.seq_len + 2)
        steps = [
            module.step(x[:, s : s + n], cache, valid[:, s : s + n])
            for s, n in zip(layout.offsets, layout.segment_sizes)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_module_dropout_and_cache_errors(reference_backend):
    seed(12)
    layout = make_layout("block_b1")
    module = C2FAttention(8, 2, dropout=0.5)
    x = randn(1, layout.seq_len, 8)
    plain = C2FAttention(8, 2)
    plain.load_state_dict(module.state_dict())
    torch.testing.assert_close(module.eval()(x, layout), plain(x, layout))
    dropped = module.train()(x, layout)
    assert (dropped == 0).any() and not torch.equal(dropped, plain(x, layout))
    cache = module.new_cache(1, 2)
    assert cache.k.shape == (1, 2, 2, 4) and cache.key_valid.dtype == torch.bool
    with torch.no_grad(), pytest.raises(ValueError, match="cache"):
        module.eval().step(randn(1, 3, 8), cache)
    with pytest.raises(ValueError, match="num_heads"):
        C2FAttention(10, 3)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="lengths"):
        C2FLayout((2, 3), torch.tensor([[2, 4]]))
    with pytest.raises(ValueError, match="lengths"):
        C2FLayout((2, 3), torch.tensor([[-1, 1]]))
    with pytest.raises(ValueError, match="lengths"):
        C2FLayout((2, 3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        C2FLayout((2, 3), torch.tensor([[1, 1, 1]]))
    with pytest.raises(TypeError, match="lengths"):
        C2FLayout((2, 3), torch.tensor([[1.0, 1.0]]))
    with pytest.raises(TypeError, match="lengths"):
        C2FLayout((2, 3), [[1, 1]])
    with pytest.raises(ValueError, match="mode"):
        C2FLayout((2, 3), torch.tensor([[1, 1]]), mode="bidirectional")
    with pytest.raises(ValueError, match="segment_sizes"):
        C2FLayout((2, -3), torch.tensor([[1, 0]]))
    with pytest.raises(TypeError, match="segment_sizes"):
        C2FLayout((2, 3.0), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="segment_sizes"):
        C2FLayout((), torch.zeros(1, 0, dtype=torch.int64))


def test_bad_attention_arguments_through_public_api():
    layout = make_layout("causal_dq")
    q, k, v = qkv(2, 2, 13, 4)
    with pytest.raises(ValueError, match="q"):
        dqfast.c2f_attention(q[0], k, v, layout)
    with pytest.raises(ValueError, match="k"):
        dqfast.c2f_attention(q, k[0], v, layout)
    with pytest.raises(ValueError, match="v"):
        dqfast.c2f_attention(q, k, v[:, :, :, None], layout)
    with pytest.raises(ValueError, match="same shape"):
        dqfast.c2f_attention(q, k[:, :1], v, layout)
    with pytest.raises(ValueError, match="layout"):
        dqfast.c2f_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], layout)
    with pytest.raises(ValueError, match="batch"):
        dqfast.c2f_attention(q[:1], k[:1], v[:1], layout)
    with pytest.raises(TypeError, match="dtype"):
        dqfast.c2f_attention(q, k.half(), v, layout)
    with pytest.raises(ValueError, match="scale"):
        dqfast.c2f_attention(q, k, v, layout, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        dqfast.c2f_attention(q, k, v, layout, scale=-1.0)
    with pytest.raises(TypeError, match="layout"):
        dqfast.c2f_attention(q, k, v, layout.lengths)
    with pytest.raises(TypeError, match="key_valid"):
        dqfast.c2f_decode_attention(q, k, v, torch.ones(2, 13, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_valid"):
        dqfast.c2f_decode_attention(q, k, v, torch.ones(2, 12, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# External oracle: FlexAttention compiled on CPU (about 25 s to compile, so opt-in)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DQFAST_TEST_FLEX") != "1",
    reason="compiling FlexAttention on CPU takes ~25 s; set DQFAST_TEST_FLEX=1",
)
@pytest.mark.parametrize("name", ["causal_dq", "block_var"])
def test_flex_attention_with_mask_mod_agrees(name):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seed(13)
    layout = make_layout(name)
    B, Hh, L, Dh = layout.batch_size, 2, layout.seq_len, 8
    q, k, v = qkv(B, Hh, L, Dh)
    block_mask = create_block_mask(layout.mask_mod, B, None, L, L, device="cpu")
    out = torch.compile(flex_attention)(q, k, v, block_mask=block_mask)
    valid = layout.key_valid()[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[valid], c2f_attention(q, k, v, layout)[valid], atol=1e-5, rtol=1e-5)
