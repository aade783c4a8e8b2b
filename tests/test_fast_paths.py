"""The fast path off the GPU (dqfast.fast), proven against the reference like a kernel: fp32
against the float64 reference, fp16/bf16 by the three-way rule, every gradient, odd shapes, B = 1,
empty segments, non-contiguous inputs, non-finite values in pads and codebooks, and the caches
(attention packing per layout, folded resize-conv weights per weight version)."""

from __future__ import annotations

import gc
import inspect
import math
import subprocess
import sys

import pytest
import torch

import dqfast.fast as fast
from dqfast.fast import c2f_attention as fast_attn
from dqfast.fast import subpixel_conv as fast_spc
from dqfast.fast import vector_quantize as fast_vq
from dqfast.reference import c2f_attention as ref_attn
from dqfast.reference import subpixel_conv as ref_spc
from dqfast.reference import vector_quantize as ref_vq
from dqfast.reference.c2f_attention import C2FLayout
from tests.helpers import FP32_TOL, assert_three_way, max_err, noncontiguous, randn, seed

HALF = [torch.float16, torch.bfloat16]

REFERENCE_FNS = {
    "subpixel_conv2d": ref_spc.subpixel_conv2d,
    "upsample_conv2d": ref_spc.upsample_conv2d,
    "vector_quantize": ref_vq.vector_quantize,
    "dynamic_quantize": ref_vq.dynamic_quantize,
    "code_statistics": ref_vq.code_statistics,
    "c2f_attention": ref_attn.c2f_attention,
    "c2f_decode_attention": ref_attn.c2f_decode_attention,
}


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)


def as64(*tensors):
    return tuple(t.detach().double().requires_grad_(t.requires_grad) for t in tensors)


# ---------------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(REFERENCE_FNS))
def test_get_matches_the_reference_signature(op):
    fn = fast.get(op)
    assert callable(fn)
    ours, theirs = inspect.signature(fn).parameters, inspect.signature(REFERENCE_FNS[op]).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


def test_unknown_op():
    assert fast.get("conv3d") is None
    assert fast.reasons("conv3d") == ["no fast path for 'conv3d'; fast paths exist for " + str(list(fast.OPS))]


def test_serves_validated_calls():
    z, codebook = randn(5, 3), randn(4, 3)
    assert fast.reasons("vector_quantize", z, codebook, metric="l2") == []


def test_imports_without_triton_or_kernels():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import dqfast.fast\n"
        "assert not any(m.startswith(('dqfast.kernels', 'kernels')) for m in sys.modules), 'kernels imported'\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------------------------
# c2f_attention
# ---------------------------------------------------------------------------------------------

# (segment_sizes, lengths, mode): full and short segments, an empty segment, a zero-size segment,
# a sample with no real token, B = 1.
LAYOUTS = {
    "causal_dq": ((6, 7), [[6, 7], [3, 1]], "causal"),
    "causal_empty": ((3, 0, 5), [[0, 0, 5], [3, 0, 2], [0, 0, 0]], "causal"),
    "block_var": ((1, 4, 9), [[1, 4, 9], [1, 2, 0]], "block"),
    "block_b1": ((4, 0, 5), [[2, 0, 5]], "block"),
}


def make_layout(name: str) -> C2FLayout:
    sizes, lengths, mode = LAYOUTS[name]
    return C2FLayout(sizes, torch.tensor(lengths), mode)


def qkv(B, Hh, L, Dh, dtype=torch.float32):
    return tuple(randn(B, Hh, L, Dh, dtype=dtype, requires_grad=True) for _ in range(3))


# The dense path (cached additive mask, L <= DENSE_MAX_LEN) and the packed path, both with and
# without autograd: every layout here is short, so DENSE_MAX_LEN = 0 forces the packed path. The
# dense path closes the pad query rows where SDPA zeroes such rows (PyTorch's CPU kernels do), and
# otherwise leaves them open and zeroes the output after: "dense_open_rows" forces the latter.
@pytest.fixture(params=["packed", "dense", "dense_open_rows"])
def attention_path(request, monkeypatch):
    monkeypatch.setattr(fast_attn, "DENSE_MAX_LEN", 0 if request.param == "packed" else 10_000)
    if request.param == "dense_open_rows":
        monkeypatch.setattr(fast_attn, "_closes_empty_rows", lambda device, dtype: False)
    return request.param


BOTH_PATHS = pytest.mark.usefixtures("attention_path")


@BOTH_PATHS
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_fp32_against_float64_reference(name, scale):
    seed(1)
    layout = make_layout(name)
    q, k, v = qkv(layout.batch_size, 3, layout.seq_len, 5)
    out = fast_attn.c2f_attention(q, k, v, layout, scale=scale)
    q64, k64, v64 = as64(q, k, v)
    exact = ref_attn.c2f_attention(q64, k64, v64, layout, scale=scale)
    torch.testing.assert_close(out.double(), exact, **FP32_TOL)
    g = randn(*out.shape)
    for got, want in zip(grads(out, (q, k, v), g), grads(exact, (q64, k64, v64), g.double())):
        torch.testing.assert_close(got.double(), want, **FP32_TOL)
    pad_queries = ~layout.key_valid()
    assert (out.detach().permute(0, 2, 1, 3)[pad_queries] == 0).all()


@BOTH_PATHS
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_attention_inference_paths(name):
    """Without autograd, short sequences take the dense path (cached additive mask); both paths
    must give the reference's result, also with NaN/inf in the pads."""
    seed(11)
    layout = make_layout(name)
    q, k, v = (t.detach() for t in qkv(layout.batch_size, 2, layout.seq_len, 6))
    exact = ref_attn.c2f_attention(*as64(q, k, v), layout)
    pads = (~layout.key_valid())[:, None, :, None].expand_as(q)
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            out = fast_attn.c2f_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout)
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), exact, **FP32_TOL)
        for bad in (float("nan"), float("inf")):
            for which in range(3):
                dirty = [torch.where(pads, bad, t) if i == which else t for i, t in enumerate((q, k, v))]
                out = fast_attn.c2f_attention(*dirty, layout)
                torch.testing.assert_close(out.double(), exact, **FP32_TOL)


@BOTH_PATHS
@pytest.mark.parametrize("name", ["causal_empty", "block_var"])
def test_attention_noncontiguous_inputs(name):
    seed(2)
    layout = make_layout(name)
    q, k, v = qkv(layout.batch_size, 2, layout.seq_len, 6)
    nq, nk, nv = (noncontiguous(t) for t in (q, k, v))
    g = randn(*q.shape)
    out = fast_attn.c2f_attention(nq, nk, nv, layout)
    exact = ref_attn.c2f_attention(*as64(q, k, v), layout)
    torch.testing.assert_close(out.double(), exact, **FP32_TOL)
    want = grads(ref_attn.c2f_attention(q, k, v, layout), (q, k, v), g)
    for got, w in zip(grads(out, (nq, nk, nv), g), want):
        torch.testing.assert_close(got, w, **FP32_TOL)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["causal_dq", "block_var"])
def test_attention_half_three_way(name, dtype):
    seed(3)
    layout = make_layout(name)
    q, k, v = qkv(layout.batch_size, 2, layout.seq_len, 8, dtype)
    g = randn(*q.shape, dtype=dtype)
    out = fast_attn.c2f_attention(q, k, v, layout)
    same = ref_attn.c2f_attention(q, k, v, layout)
    q64, k64, v64 = as64(q, k, v)
    exact = ref_attn.c2f_attention(q64, k64, v64, layout)
    assert out.dtype == dtype
    assert_three_way(out, same, exact, "out")
    for name_, got, s, e in zip(
        "qkv", grads(out, (q, k, v), g), grads(same, (q, k, v), g), grads(exact, (q64, k64, v64), g.double())
    ):
        assert got.dtype == dtype
        assert_three_way(got, s, e, f"d{name_}")


@BOTH_PATHS
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["causal_empty", "block_var"])
def test_attention_non_finite_pads_never_leak(name, bad):
    seed(4)
    layout = make_layout(name)
    q, k, v = qkv(layout.batch_size, 2, layout.seq_len, 4)
    pads = (~layout.key_valid())[:, None, :, None].expand_as(q)
    assert pads.any()
    dirty = [torch.where(pads, bad, t.detach()).requires_grad_() for t in (q, k, v)]
    clean = [torch.where(pads, 0.0, t.detach()).requires_grad_() for t in (q, k, v)]
    # A finite output gradient at pad rows contributes nothing (compared below with zeros there);
    # a non-finite one is carried on as in the reference (see the module docstring).
    g = randn(*q.shape)
    out_dirty = fast_attn.c2f_attention(*dirty, layout)
    out_clean = ref_attn.c2f_attention(*clean, layout)
    assert torch.isfinite(out_dirty).all()
    assert (out_dirty[pads] == 0).all()
    torch.testing.assert_close(out_dirty, out_clean, **FP32_TOL)
    for got, want in zip(grads(out_dirty, dirty, g), grads(out_clean, clean, torch.where(pads, 0.0, g))):
        assert torch.isfinite(got).all()
        assert (got[pads] == 0).all()
        torch.testing.assert_close(got, want, **FP32_TOL)


@BOTH_PATHS
@pytest.mark.parametrize("which", ["key", "query"])
@pytest.mark.parametrize("name", ["causal_dq", "block_var"])
def test_attention_infinite_pad_with_finite_output_never_leaks(name, which):
    """The dense path's blind spot: an infinite pad key (or query) whose scores are all -inf leaves
    the forward finite, yet dQ = dS @ K (dK = dS^T @ Q) would hold 0 * inf = NaN; the check of q
    and k sends the call to the packed path."""
    seed(36)
    layout = make_layout(name)
    q, k, v = (t.detach() for t in qkv(layout.batch_size, 2, layout.seq_len, 4))
    pads = (~layout.key_valid())[:, None, :, None].expand_as(q)
    first = torch.zeros_like(pads)
    first[..., 0] = True
    # Key: every query positive in dimension 0 and the pad keys -inf there only. Query: every key
    # negative in dimension 0 and the pad queries +inf there only. Either way every score of a pad
    # is -inf (none NaN), so nothing non-finite reaches the forward output.
    if which == "key":
        q = torch.where(first, q.abs() + 0.1, q)
        dirty = [q, torch.where(pads & first, -math.inf, k), v]
    else:
        k = torch.where(first, -k.abs() - 0.1, k)
        dirty = [torch.where(pads & first, math.inf, q), k, v]
    dirty = [t.clone().requires_grad_() for t in dirty]
    clean = [torch.where(pads, 0.0, t).requires_grad_() for t in (q, k, v)]
    out = fast_attn.c2f_attention(*dirty, layout)
    want = ref_attn.c2f_attention(*clean, layout)
    torch.testing.assert_close(out, want, **FP32_TOL)
    g = randn(*q.shape)
    for got, w in zip(grads(out, dirty, g), grads(want, clean, g)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, w, **FP32_TOL)


@pytest.mark.parametrize("mode", ["causal", "block"])
def test_attention_dense_path_reads_only_the_keys_in_use(mode, monkeypatch):
    """fp32 on CPU: when every key past a multiple of KEY_BLOCK is a pad in every sample, the dense
    path hands SDPA only the keys up to it (views). Exact, NaN in the cut-off pads included."""
    monkeypatch.setattr(fast_attn, "DENSE_MAX_LEN", 10_000)
    seed(41)
    # L = 12 + 29 = 41; the last real position is 12 + 16 - 1 = 27, so 32 keys are read.
    layout = C2FLayout((12, 29), torch.tensor([[7, 16], [12, 9], [3, 0]]), mode)
    dense = fast_attn._dense_tables(layout, torch.device("cpu"), torch.float32)
    assert dense.keys == 32 and dense.mask.shape == (3, 1, 41, 32)
    assert "the first 32 keys" in fast_attn.c2f_attention_detail(*qkv(3, 1, 41, 4), layout)
    assert fast_attn._dense_tables(layout, torch.device("cpu"), torch.float64).keys == 41
    q, k, v = (t.detach() for t in qkv(3, 2, 41, 8))
    pads = (~layout.key_valid())[:, None, :, None].expand_as(q)
    for dtype in (torch.float32, torch.float64):
        clean = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        dirty = [torch.where(pads, math.nan, t.detach()).requires_grad_() for t in clean]
        g = randn(*q.shape, dtype=dtype)
        want = ref_attn.c2f_attention(*clean, layout)
        want_grads = grads(want, clean, g)
        for inputs in (clean, dirty):
            out = fast_attn.c2f_attention(*inputs, layout)
            assert out.dtype == dtype
            torch.testing.assert_close(out, want, **FP32_TOL)
            for got, w in zip(grads(out, inputs, g), want_grads):
                assert torch.isfinite(got).all()
                torch.testing.assert_close(got, w, **FP32_TOL)
            with torch.no_grad():
                torch.testing.assert_close(fast_attn.c2f_attention(*inputs, layout), want, **FP32_TOL)


def test_attention_tables_built_once_per_layout(monkeypatch):
    seed(5)
    monkeypatch.setattr(fast_attn, "DENSE_MAX_LEN", 0)  # the packed path, whose tables are counted
    layout = make_layout("causal_dq")
    built = []
    build = fast_attn._build_packing
    monkeypatch.setattr(fast_attn, "_build_packing", lambda *a: built.append(1) or build(*a))
    monkeypatch.setattr(C2FLayout, "dense_mask", lambda self: pytest.fail("the dense mask was built"))
    q, k, v = qkv(2, 2, layout.seq_len, 4)
    first = fast_attn.c2f_attention(q, k, v, layout)
    for _ in range(3):  # e.g. the layers of a model sharing one layout
        again = fast_attn.c2f_attention(q, k, v, layout)
    assert built == [1]
    assert torch.equal(first, again)
    # Another layout object with other lengths gets its own tables.
    other = C2FLayout(layout.segment_sizes, torch.tensor([[2, 3], [6, 0]]))
    out = fast_attn.c2f_attention(q, k, v, other)
    assert built == [1, 1]
    monkeypatch.undo()
    torch.testing.assert_close(out, ref_attn.c2f_attention(q, k, v, other), **FP32_TOL)


@BOTH_PATHS
def test_attention_tables_built_in_inference_mode_serve_autograd():
    seed(35)
    layout = make_layout("block_var")
    q, k, v = qkv(2, 2, layout.seq_len, 4)
    # The packing (or the dense mask) is built here, in inference mode.
    with torch.inference_mode():
        fast_attn.c2f_attention(q.detach(), k.detach(), v.detach(), layout)
    g = randn(*q.shape)
    got = grads(fast_attn.c2f_attention(q, k, v, layout), (q, k, v), g)
    want = grads(ref_attn.c2f_attention(q, k, v, layout), (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_attention_tables_die_with_the_layout():
    layout = make_layout("block_var")
    q, k, v = qkv(2, 1, layout.seq_len, 4)
    fast_attn.c2f_attention(q, k, v, layout)
    assert layout in fast_attn._PACKINGS
    count = len(fast_attn._PACKINGS)
    del layout
    gc.collect()
    assert len(fast_attn._PACKINGS) == count - 1


def test_attention_dq_transformer_layout_and_empty_sequence():
    seed(6)
    layout = C2FLayout.dq_transformer(torch.tensor([3, 0, 8]), torch.tensor([5, 17, 0]), 8, 20)
    q, k, v = qkv(3, 2, layout.seq_len, 16)
    out = fast_attn.c2f_attention(q, k, v, layout)
    torch.testing.assert_close(out.double(), ref_attn.c2f_attention(*as64(q, k, v), layout), **FP32_TOL)
    empty = C2FLayout((0, 0), torch.zeros(2, 2, dtype=torch.int64))
    q, k, v = qkv(2, 2, 0, 4)
    assert fast_attn.c2f_attention(q, k, v, empty).shape == (2, 2, 0, 4)


# ---------------------------------------------------------------------------------------------
# c2f_decode_attention
# ---------------------------------------------------------------------------------------------


def decode_inputs(B=3, Hh=2, Lq=1, Lk=11, Dh=6, dtype=torch.float32, all_valid=False):
    q = randn(B, Hh, Lq, Dh, dtype=dtype, requires_grad=True)
    k = randn(B, Hh, Lk, Dh, dtype=dtype, requires_grad=True)
    v = randn(B, Hh, Lk, Dh, dtype=dtype, requires_grad=True)
    valid = torch.ones(B, Lk, dtype=torch.bool) if all_valid else torch.rand(B, Lk) < 0.6
    if not all_valid:
        valid[0] = False  # a sample without any valid key returns 0
    return q, k, v, valid


@pytest.mark.parametrize("all_valid", [False, True])
@pytest.mark.parametrize("Lq", [1, 4])
def test_decode_fp32_against_float64_reference(Lq, all_valid):
    seed(7)
    q, k, v, valid = decode_inputs(Lq=Lq, all_valid=all_valid)
    out = fast_attn.c2f_decode_attention(q, k, v, valid)
    q64, k64, v64 = as64(q, k, v)
    exact = ref_attn.c2f_decode_attention(q64, k64, v64, valid)
    torch.testing.assert_close(out.double(), exact, **FP32_TOL)
    if not all_valid:
        assert (out[0] == 0).all()
    g = randn(*out.shape)
    for got, want in zip(grads(out, (q, k, v), g), grads(exact, (q64, k64, v64), g.double())):
        torch.testing.assert_close(got.double(), want, **FP32_TOL)


def test_decode_noncontiguous_cache_slice_and_empty_cache():
    seed(8)
    q, k, v, valid = decode_inputs(Lk=13)
    # The KV cache is sliced to the decoded length: a non-contiguous view.
    out = fast_attn.c2f_decode_attention(q, k[:, :, :9], v[:, :, :9], valid[:, :9])
    exact = ref_attn.c2f_decode_attention(*as64(q, k[:, :, :9], v[:, :, :9]), valid[:, :9])
    torch.testing.assert_close(out.double(), exact, **FP32_TOL)
    empty = fast_attn.c2f_decode_attention(q, k[:, :, :0], v[:, :, :0], valid[:, :0])
    assert (empty == 0).all() and empty.shape == q.shape
    (gq,) = torch.autograd.grad(empty.sum(), q)
    assert (gq == 0).all()


@pytest.mark.parametrize("dtype", HALF)
def test_decode_half_three_way(dtype):
    seed(9)
    q, k, v, valid = decode_inputs(Lq=2, dtype=dtype)
    out = fast_attn.c2f_decode_attention(q, k, v, valid)
    same = ref_attn.c2f_decode_attention(q, k, v, valid)
    exact = ref_attn.c2f_decode_attention(*as64(q, k, v), valid)
    assert_three_way(out, same, exact, "decode")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_decode_invalid_cache_entries_never_leak(bad):
    seed(10)
    q, k, v, valid = decode_inputs(Lq=2)
    drop = (~valid)[:, None, :, None].expand_as(k)
    dirty = [torch.where(drop, bad, t.detach()).requires_grad_() for t in (k, v)]
    clean = [torch.where(drop, 0.0, t.detach()).requires_grad_() for t in (k, v)]
    out = fast_attn.c2f_decode_attention(q, *dirty, valid)
    want = ref_attn.c2f_decode_attention(q, *clean, valid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, **FP32_TOL)
    g = randn(*out.shape)
    for got, w in zip(grads(out, [q, *dirty], g), grads(want, [q, *clean], g)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, w, **FP32_TOL)


# ---------------------------------------------------------------------------------------------
# vector_quantize
# ---------------------------------------------------------------------------------------------


def brute_force(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 distances, computed independently: cdist squared or 1 - cos."""
    z, c = z.reshape(-1, z.shape[-1]).double(), codebook.double()
    if metric == "l2":
        return torch.cdist(z, c).pow(2)
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cn = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1 - zn @ cn.T


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape, K", [((37, 5), 19), ((2, 3, 7, 33), 130), ((1, 1), 3)])
def test_vq_chosen_distance_is_the_minimum(metric, shape, K, monkeypatch):
    seed(11)
    monkeypatch.setattr(fast_vq, "CHUNK_ENTRIES", 300)  # several blocks of rows
    z, codebook = randn(*shape), randn(K, shape[-1])
    out = fast_vq.vector_quantize(z, codebook, metric=metric)
    assert out.indices.shape == shape[:-1] and out.indices.dtype == torch.int64
    assert out.distance.dtype == torch.float32 and out.quantized.shape == shape
    d = brute_force(z, codebook, metric)
    chosen = d.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    assert (chosen <= d.min(1).values + 1e-4).all()
    torch.testing.assert_close(out.distance.reshape(-1).double(), chosen, **FP32_TOL)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vq_exact_indices_and_outputs_on_separated_codebook(metric, monkeypatch):
    seed(12)
    monkeypatch.setattr(fast_vq, "CHUNK_ENTRIES", 64)
    codebook = randn(23, 9) * 4
    truth = torch.randint(0, 23, (3, 41))
    z = codebook[truth] + 0.01 * randn(3, 41, 9)
    out = fast_vq.vector_quantize(z, codebook, metric=metric)
    ref = ref_vq.vector_quantize(z.double(), codebook.double(), metric=metric)
    assert torch.equal(out.indices, truth)
    torch.testing.assert_close(out.quantized.double(), ref.quantized, **FP32_TOL)
    torch.testing.assert_close(out.distance.double(), ref.distance, **FP32_TOL)


def test_vq_ties_go_to_the_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    assert fast_vq.vector_quantize(z, codebook).indices.tolist() == [0, 1, 0]
    assert fast_vq.vector_quantize(z, codebook, metric="cosine").indices.tolist() == [0, 1, 0]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vq_exact_ties_on_integer_data(metric, monkeypatch):
    """Integer vectors make every distance exact, so duplicated codes tie exactly."""
    seed(32)
    monkeypatch.setattr(fast_vq, "CHUNK_ENTRIES", 500)
    base = torch.randint(-3, 4, (40, 5)).float()
    codebook = base[torch.randint(0, 40, (97,))]  # many duplicated rows, in random places
    z = torch.randint(-3, 4, (300, 5)).float()
    d = brute_force(z, codebook, metric)
    first = (d == d.min(1, keepdim=True).values).float().argmax(1)  # the lowest tied index
    if metric == "l2":
        assert torch.equal(fast_vq.vector_quantize(z, codebook).indices, first)
    else:  # cosine values are rounded: ties within rounding need not be exact, distances must be
        out = fast_vq.vector_quantize(z, codebook, metric=metric)
        torch.testing.assert_close(out.distance.double(), d.min(1).values, **FP32_TOL)


def test_vq_noncontiguous_and_float64_and_empty():
    seed(13)
    z, codebook = randn(17, 6), randn(11, 6)
    out = fast_vq.vector_quantize(noncontiguous(z), noncontiguous(codebook))
    want = ref_vq.vector_quantize(z, codebook)
    torch.testing.assert_close(out.distance, want.distance, **FP32_TOL)
    assert torch.equal(out.quantized, codebook[out.indices])
    out64 = fast_vq.vector_quantize(z.double(), codebook.double())
    assert out64.distance.dtype == torch.float64 and out64.quantized.dtype == torch.float64
    empty = fast_vq.vector_quantize(randn(0, 6), codebook)
    assert empty.indices.shape == (0,) and empty.quantized.shape == (0, 6) and empty.distance.shape == (0,)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", HALF)
def test_vq_half_precision(metric, dtype):
    seed(14)
    z, codebook = randn(50, 12, dtype=dtype), randn(40, 12, dtype=dtype)
    out = fast_vq.vector_quantize(z, codebook, metric=metric)
    assert out.quantized.dtype == dtype and out.distance.dtype == torch.float32
    d = brute_force(z, codebook, metric)  # on the same (rounded) inputs
    chosen = d.gather(1, out.indices[:, None]).squeeze(1)
    assert (chosen <= d.min(1).values + 1e-4).all()
    torch.testing.assert_close(out.distance.double(), chosen, **FP32_TOL)
    ref = ref_vq.vector_quantize(z, codebook, metric=metric)
    same = out.indices == ref.indices
    assert torch.equal(out.quantized[same], ref.quantized[same])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vq_straight_through_gradient(metric, dtype):
    seed(15)
    z = randn(4, 7, 5, dtype=dtype, requires_grad=True)
    codebook = randn(9, 5, dtype=dtype)
    g = randn(4, 7, 5, dtype=dtype)
    out = fast_vq.vector_quantize(z, codebook, metric=metric)
    ref = ref_vq.vector_quantize(z, codebook, metric=metric)
    assert torch.equal(out.indices, ref.indices)
    (got,) = torch.autograd.grad(out.quantized, z, g)
    (want,) = torch.autograd.grad(ref.quantized, z, g)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_vq_nan_codebook_row_is_never_chosen():
    seed(16)
    codebook = randn(12, 4)
    codebook[3] = float("nan")
    codebook[7, 2] = float("inf")
    z = randn(30, 4)
    out = fast_vq.vector_quantize(z, codebook)
    assert not ((out.indices == 3) | (out.indices == 7)).any()
    finite = torch.ones(12, dtype=torch.bool)
    finite[[3, 7]] = False
    d = brute_force(z, codebook[finite], "l2")
    torch.testing.assert_close(out.distance.double(), d.min(1).values, **FP32_TOL)


def test_vq_non_finite_vectors_take_code_zero():
    seed(17)
    codebook = randn(6, 3)
    z = randn(5, 3)
    z[1, 0] = float("nan")
    z[3, 2] = float("-inf")
    out = fast_vq.vector_quantize(z, codebook)
    assert out.indices[1] == 0 and out.indices[3] == 0
    assert torch.isnan(out.distance[1]) and torch.isinf(out.distance[3])
    finite_rows = [0, 2, 4]
    torch.testing.assert_close(
        out.indices[finite_rows], fast_vq.vector_quantize(z[finite_rows], codebook).indices, atol=0, rtol=0
    )
    all_nan = fast_vq.vector_quantize(randn(4, 3), torch.full((5, 3), float("nan")))
    assert (all_nan.indices == 0).all()
    assert fast_vq.vector_quantize(z, codebook, metric="cosine").indices[1] == 0


def test_vq_never_allocates_n_by_k(monkeypatch):
    seed(18)
    N, K, D = 1000, 256, 8
    z, codebook = randn(N, D), randn(K, D)
    monkeypatch.setattr(fast_vq, "CHUNK_ENTRIES", 1 << 12)
    sizes, addmm = [], torch.addmm

    def spy(*args, **kwargs):
        result = addmm(*args, **kwargs)
        sizes.append(result.numel())
        return result

    monkeypatch.setattr(torch, "addmm", spy)
    out = fast_vq.vector_quantize(z, codebook)
    monkeypatch.undo()
    assert len(sizes) == -(-N // 16) and max(sizes) == 16 * K  # blocks of 2**12 // K = 16 rows
    torch.testing.assert_close(out.distance, ref_vq.vector_quantize(z, codebook).distance, **FP32_TOL)


def test_vq_codebook_table_cached_and_never_stale():
    seed(31)
    codebook = randn(8, 4)
    z = randn(20, 4)
    first = fast_vq.vector_quantize(z, codebook)
    entry = fast_vq._TABLES[id(codebook)]
    assert fast_vq.vector_quantize(z, codebook).indices.tolist() == first.indices.tolist()
    assert fast_vq._TABLES[id(codebook)] is entry  # served from the cache
    with torch.no_grad():
        codebook[5] = z.mean(0)  # in place, as an EMA update does
        codebook[2] = float("nan")
    after = fast_vq.vector_quantize(z, codebook)
    finite = [i for i in range(8) if i != 2]
    d = brute_force(z, codebook[finite], "l2")
    torch.testing.assert_close(after.distance.double(), d.min(1).values, **FP32_TOL)
    assert not (after.indices == 2).any() and not torch.equal(after.indices, first.indices)
    cosine = fast_vq.vector_quantize(z, codebook, metric="cosine")  # another table, same codebook
    assert (cosine.distance <= 2).all() and not (cosine.indices == 2).any()
    key = id(codebook)
    del codebook
    gc.collect()
    assert key not in fast_vq._TABLES


# ---------------------------------------------------------------------------------------------
# dynamic_quantize and code_statistics
# ---------------------------------------------------------------------------------------------


def features_for(B, D, H, W, G, dtype=torch.float32):
    return [randn(B, D, H * 2**g, W * 2**g, dtype=dtype, requires_grad=True) for g in range(G)]


def dynamic_pair(features, codebook, **kwargs):
    f64 = [f.detach().double().requires_grad_() for f in features]
    c64 = codebook.detach().double().requires_grad_()
    return ref_vq.dynamic_quantize(f64, c64, **kwargs), f64, c64


def check_dynamic(out, exact, inputs, inputs64):
    assert torch.equal(out.grain, exact.grain) and torch.equal(out.n_codes, exact.n_codes)
    assert torch.equal(out.indices, exact.indices)
    torch.testing.assert_close(out.quantized.double(), exact.quantized, **FP32_TOL)
    torch.testing.assert_close(out.loss.double(), exact.loss, **FP32_TOL)
    g = randn(*out.quantized.shape)
    got = torch.autograd.grad((out.quantized * g).sum() + out.loss, inputs)
    want = torch.autograd.grad((exact.quantized * g.double()).sum() + exact.loss, inputs64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **FP32_TOL)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("G", [2, 3])
def test_dynamic_quantize_with_grain(metric, G):
    seed(19)
    B, D, H, W, K = 2, 5, 3, 2, 13
    features = features_for(B, D, H, W, G)
    codebook = randn(K, D, requires_grad=True)
    grain = torch.randint(0, G, (B, H, W))
    grain[0] = 0  # one image with no fine region: an empty grain
    out = fast_vq.dynamic_quantize(features, codebook, grain=grain, metric=metric, beta=0.3)
    exact, f64, c64 = dynamic_pair(features, codebook, grain=grain, metric=metric, beta=0.3)
    check_dynamic(out, exact, [*features, codebook], [*f64, c64])


def test_dynamic_quantize_with_gate_noncontiguous():
    seed(20)
    B, D, H, W, K = 1, 4, 3, 3, 9
    base = features_for(B, D, H, W, 2)
    features = [noncontiguous(f) for f in base]
    codebook = randn(K, D, requires_grad=True)
    gate = torch.nn.functional.one_hot(torch.randint(0, 2, (B, H, W)), 2).float().requires_grad_()
    out = fast_vq.dynamic_quantize(features, codebook, gate=gate)
    f64 = [f.detach().double().requires_grad_() for f in base]
    c64, gate64 = codebook.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    exact = ref_vq.dynamic_quantize(f64, c64, gate=gate64)
    check_dynamic(out, exact, [*features, codebook, gate], [*f64, c64, gate64])


@pytest.mark.parametrize("budget", [0.0, 0.5, 1.0])
def test_dynamic_quantize_with_budget(budget):
    seed(21)
    B, D, H, W, K = 2, 3, 4, 3, 7
    features = features_for(B, D, H, W, 2)
    codebook = randn(K, D, requires_grad=True)
    logits = randn(B, H, W, 2)
    out = fast_vq.dynamic_quantize(features, codebook, router_logits=logits, budget=budget)
    exact, f64, c64 = dynamic_pair(features, codebook, router_logits=logits.double(), budget=budget)
    check_dynamic(out, exact, [*features, codebook], [*f64, c64])
    assert (out.n_codes == H * W + 3 * int(budget * H * W + 0.5)).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_quantize_compact_path_without_autograd(metric, G, dtype, monkeypatch):
    """Without autograd, small maps take the compact path (every cell of every grain searched in
    one matrix); it must give the reference's result and the general path's, non-finite vectors
    and a NaN codebook row included."""
    seed(37)
    B, D, H, W, K = 3, 5, 3, 2, 13
    features = [f.detach() for f in features_for(B, D, H, W, G, dtype)]
    codebook = randn(K, D, dtype=dtype)
    codebook[4] = float("nan")  # never chosen
    grain = torch.randint(0, G, (B, H, W))
    grain[0] = 0  # an image with no finer region
    grain[1] = G - 1  # an image with no coarser region
    exact = ref_vq.dynamic_quantize([f.double() for f in features], codebook.double(), grain=grain, metric=metric)
    built, limit = [], fast_vq.COMPACT_MAX_WORK
    compact = fast_vq._dynamic_quantize_compact
    monkeypatch.setattr(fast_vq, "_dynamic_quantize_compact", lambda *a: built.append(1) or compact(*a))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = fast_vq.dynamic_quantize(features, codebook, grain=grain, metric=metric, beta=0.3)
            monkeypatch.setattr(fast_vq, "COMPACT_MAX_WORK", 0)
            general = fast_vq.dynamic_quantize(features, codebook, grain=grain, metric=metric, beta=0.3)
            monkeypatch.setattr(fast_vq, "COMPACT_MAX_WORK", limit)
        assert built and built.pop() and not built  # the compact path served the first call only
        assert out.quantized.dtype == dtype and out.loss.dtype == dtype
        assert not (out.indices == 4).any()
        for got in (out, general):
            assert torch.equal(got.grain, grain) and torch.equal(got.n_codes, exact.n_codes)
            assert torch.equal(got.indices, exact.indices)
            torch.testing.assert_close(got.quantized.double(), exact.quantized, **FP32_TOL)
        exact_loss = ref_vq.dynamic_quantize(
            [f.double() for f in features], codebook.double(), grain=grain, metric=metric, beta=0.3
        ).loss
        torch.testing.assert_close(out.loss.double(), exact_loss, **FP32_TOL)
        torch.testing.assert_close(out.loss, general.loss, **FP32_TOL)
    # A non-finite vector: the compact path declines and the general path answers.
    features[1][0, :, 0, 0] = float("inf")
    with torch.no_grad():
        out = fast_vq.dynamic_quantize(features, codebook, grain=grain, metric=metric)
        monkeypatch.setattr(fast_vq, "COMPACT_MAX_WORK", 0)
        general = fast_vq.dynamic_quantize(features, codebook, grain=grain, metric=metric)
    assert torch.equal(out.indices, general.indices)
    assert torch.equal(out.quantized.isnan(), general.quantized.isnan())


@pytest.mark.parametrize("dtype", HALF)
def test_dynamic_quantize_half(dtype):
    seed(22)
    features = features_for(2, 6, 2, 3, 2, dtype)
    codebook = randn(11, 6, dtype=dtype) * 3
    grain = torch.randint(0, 2, (2, 2, 3))
    out = fast_vq.dynamic_quantize(features, codebook, grain=grain)
    ref = ref_vq.dynamic_quantize(features, codebook, grain=grain)
    assert out.quantized.dtype == dtype
    same = out.indices == ref.indices
    assert same.float().mean() > 0.9
    assert torch.equal(out.quantized.permute(0, 2, 3, 1)[same], ref.quantized.permute(0, 2, 3, 1)[same])


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_code_statistics(index_dtype):
    seed(23)
    x, idx = randn(40, 7), torch.randint(0, 9, (40,), dtype=index_dtype)
    counts, sums = fast_vq.code_statistics(x, idx, 12)
    one_hot = torch.nn.functional.one_hot(idx.long(), 12).double()
    assert counts.dtype == torch.float32 and torch.equal(counts.double(), one_hot.sum(0))
    torch.testing.assert_close(sums.double(), one_hot.T @ x.double(), **FP32_TOL)
    counts, sums = fast_vq.code_statistics(randn(0, 7, dtype=torch.float64), torch.zeros(0, dtype=index_dtype), 3)
    assert counts.dtype == torch.float64 and (counts == 0).all() and sums.shape == (3, 7)


# ---------------------------------------------------------------------------------------------
# subpixel_conv2d and upsample_conv2d
# ---------------------------------------------------------------------------------------------


def conv_inputs(B, cin, cout, H, W, k, dtype=torch.float32, bias=True):
    x = randn(B, cin, H, W, dtype=dtype, requires_grad=True)
    w = randn(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5, requires_grad=True)
    b = randn(cout, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


def check_conv(fast_fn, ref_fn, inputs, **kw):
    out = fast_fn(*inputs, **kw)
    inputs64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    exact = ref_fn(*inputs64, **kw)
    torch.testing.assert_close(out.double(), exact, **FP32_TOL)
    g = randn(*out.shape)
    used = [t for t in inputs if t is not None]
    used64 = [t for t in inputs64 if t is not None]
    for a, b in zip(grads(out, used, g), grads(exact, used64, g.double())):
        torch.testing.assert_close(a.double(), b, **FP32_TOL)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("activation", [None, "leaky_relu", "gelu"])
@pytest.mark.parametrize("k, r", [(3, 2), (1, 3), (5, 2)])
def test_subpixel_conv2d(padding_mode, activation, k, r):
    seed(24)
    x, w, b = conv_inputs(2, 3, 2 * r * r, 5, 7, k, bias=activation != "gelu")
    check_conv(
        fast_spc.subpixel_conv2d,
        ref_spc.subpixel_conv2d,
        (x, w, b),
        upscale=r,
        padding_mode=padding_mode,
        activation=activation,
        negative_slope=0.2,
    )


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "gelu", "silu"])
def test_conv_activations_without_autograd(activation):
    """Without autograd the activation runs in place on the fresh conv output."""
    seed(33)
    x, w, b = (t.detach() for t in conv_inputs(2, 3, 8, 5, 6, 3))
    with torch.no_grad():
        for fast_fn, ref_fn, ww, bb, kw in (
            (fast_spc.subpixel_conv2d, ref_spc.subpixel_conv2d, w, b, dict(upscale=2)),
            (fast_spc.upsample_conv2d, ref_spc.upsample_conv2d, w[:3], b[:3], dict(scale=2)),
        ):
            out = fast_fn(x, ww, bb, activation=activation, negative_slope=0.3, **kw)
            want = ref_fn(x.double(), ww.double(), bb.double(), activation=activation, negative_slope=0.3, **kw)
            torch.testing.assert_close(out.double(), want, **FP32_TOL)


def test_subpixel_conv2d_noncontiguous_and_empty():
    seed(25)
    x, w, b = conv_inputs(1, 4, 8, 6, 5, 3)
    out = fast_spc.subpixel_conv2d(noncontiguous(x), w, b, upscale=2, activation="silu")
    want = ref_spc.subpixel_conv2d(x, w, b, upscale=2, activation="silu")
    torch.testing.assert_close(out, want, **FP32_TOL)
    empty = fast_spc.subpixel_conv2d(randn(2, 4, 0, 5, requires_grad=True), w, b, upscale=2)
    assert empty.shape == (2, 2, 0, 10)


@pytest.mark.parametrize("dtype", HALF)
def test_subpixel_and_resize_half_three_way(dtype):
    seed(26)
    x, w, b = conv_inputs(2, 5, 8, 7, 6, 3, dtype)
    for fast_fn, ref_fn, kw in (
        (fast_spc.subpixel_conv2d, ref_spc.subpixel_conv2d, dict(upscale=2, activation="relu")),
        (fast_spc.upsample_conv2d, ref_spc.upsample_conv2d, dict(scale=2, activation="silu")),
    ):
        ww = w if ref_fn is ref_spc.subpixel_conv2d else w[:3]
        bb = b if ref_fn is ref_spc.subpixel_conv2d else b[:3]
        out, same = fast_fn(x, ww, bb, **kw), ref_fn(x, ww, bb, **kw)
        exact = ref_fn(*(t.detach().double() for t in (x, ww, bb)), **kw)
        assert out.dtype == dtype
        assert_three_way(out, same, exact, ref_fn.__name__)
        g = randn(*out.shape, dtype=dtype)
        for got, s, e in zip(
            grads(out, (x, w, b), g),
            grads(same, (x, w, b), g),
            torch.autograd.grad(
                ref_fn(*(t64 := [t.detach().double().requires_grad_() for t in (x, ww, bb)]), **kw), t64, g.double()
            ),
        ):
            if got.shape != e.shape:  # the slice of w / b used by the resize-conv
                got, s = got[:3], s[:3]
            assert_three_way(got, s, e, ref_fn.__name__ + " grad")


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("k, scale", [(3, 2), (5, 2), (3, 3), (1, 2), (7, 2)])
def test_upsample_conv2d(padding_mode, k, scale):
    seed(27)
    x, w, b = conv_inputs(2, 3, 4, 5, 4, k)
    check_conv(
        fast_spc.upsample_conv2d,
        ref_spc.upsample_conv2d,
        (x, w, b),
        scale=scale,
        padding_mode=padding_mode,
        activation="leaky_relu",
        negative_slope=0.1,
    )


def test_upsample_conv2d_equals_interpolate_then_conv():
    seed(28)
    x, w, b = conv_inputs(1, 4, 3, 1, 6, 3, bias=False)  # H = 1 and B = 1
    out = fast_spc.upsample_conv2d(noncontiguous(x), w, None)
    want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2), w, None, padding=1)
    torch.testing.assert_close(out, want, **FP32_TOL)
    empty = fast_spc.upsample_conv2d(randn(1, 4, 0, 3), w, None)
    assert empty.shape == (1, 3, 0, 6)


def test_folded_weights_cached_and_never_stale():
    seed(29)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1)
    x = randn(2, 4, 6, 5)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)

    def expected(module):
        with torch.no_grad():
            return module(torch.nn.functional.interpolate(x, scale_factor=2))

    with torch.no_grad():
        first = fast_spc.upsample_conv2d(x, conv.weight, conv.bias)
        entry = fast_spc._FOLDED[id(conv.weight)]
        again = fast_spc.upsample_conv2d(x, conv.weight, conv.bias)
        assert fast_spc._FOLDED[id(conv.weight)] is entry  # served from the cache
    torch.testing.assert_close(first, expected(conv), **FP32_TOL)
    assert torch.equal(first, again)

    # A training step: the forward records a fresh fold, the optimizer updates in place.
    out = fast_spc.upsample_conv2d(x, conv.weight, conv.bias)
    out.square().mean().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None
    opt.step()
    with torch.no_grad():
        after = fast_spc.upsample_conv2d(x, conv.weight, conv.bias)
    assert not torch.allclose(after, first)
    torch.testing.assert_close(after, expected(conv), **FP32_TOL)

    with torch.no_grad():
        conv.bias.add_(1.0)  # an in-place change of the bias alone
        shifted = fast_spc.upsample_conv2d(x, conv.weight, conv.bias)
    torch.testing.assert_close(shifted, after + 1.0, **FP32_TOL)

    key = id(conv.weight)
    del conv, opt, out
    gc.collect()
    assert key not in fast_spc._FOLDED


def test_cached_tables_from_inference_mode_serve_autograd_later():
    """Frozen weights / codebook cached under inference_mode, then a call recording autograd
    through the input (e.g. gradients to the latents of a frozen decoder)."""
    seed(34)
    x, w, b = (t.detach() for t in conv_inputs(1, 2, 3, 4, 4, 3))
    codebook, z = randn(8, 4), randn(5, 4)
    with torch.inference_mode():
        fast_spc.upsample_conv2d(x, w, b)
        fast_vq.vector_quantize(z, codebook, metric="cosine")
    x.requires_grad_()
    (gx,) = torch.autograd.grad(fast_spc.upsample_conv2d(x, w, b).sum(), x)
    (want,) = torch.autograd.grad(ref_spc.upsample_conv2d(x, w, b).sum(), x)
    torch.testing.assert_close(gx, want, **FP32_TOL)
    z.requires_grad_()
    (gz,) = torch.autograd.grad(fast_vq.vector_quantize(z, codebook, metric="cosine").quantized.sum(), z)
    (want,) = torch.autograd.grad(ref_vq.vector_quantize(z, codebook, metric="cosine").quantized.sum(), z)
    torch.testing.assert_close(gz, want, **FP32_TOL)


def test_folded_weights_inference_mode():
    seed(30)
    x, w, b = (t.detach() for t in conv_inputs(1, 3, 2, 4, 4, 3))
    with torch.inference_mode():
        out = fast_spc.upsample_conv2d(x, w, b)
        w_inf = w.clone()  # an inference tensor: no version counter, folded every call
        out_inf = fast_spc.upsample_conv2d(x, w_inf, b)
    assert torch.equal(out, out_inf)
    assert max_err(out, ref_spc.upsample_conv2d(x, w, b)) < 1e-5


def test_describe_names_the_size_dependent_method():
    import dqfast

    layout = make_layout("causal_dq")
    q, k, v = qkv(layout.batch_size, 2, layout.seq_len, 4)
    with dqfast.use_backend("auto"):
        route = dqfast.describe("c2f_attention", q, k, v, layout)
        assert route.path == "fast" and route.detail.startswith("dense:")
        assert str(route).endswith("; as " + route.detail) and route == ("fast", route.reasons)
        long_layout = C2FLayout((200,), torch.tensor([[150]]))
        ql = randn(1, 1, 200, 4)
        assert dqfast.describe("c2f_attention", ql, ql, ql, long_layout).detail.startswith("packed:")
        valid = torch.tensor([[True, True, False, False], [True, False, True, False]])
        cache = randn(2, 1, 4, 3)
        detail = dqfast.describe("c2f_decode_attention", randn(2, 1, 1, 3), cache, cache, valid).detail
        assert "first 3 of 4" in detail
        features, codebook = [randn(1, 3, 2, 2), randn(1, 3, 4, 4)], randn(5, 3)
        grain = torch.zeros(1, 2, 2, dtype=torch.int64)
        with torch.no_grad():
            assert dqfast.describe("dynamic_quantize", features, codebook, grain=grain).detail.startswith("compact:")
        assert dqfast.describe("vector_quantize", randn(4, 3), codebook).detail == ""
