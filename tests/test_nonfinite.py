"""Non-finite input and spec edges, the same in every backend (reference, fast path, Triton).

The spec (reference/*.py docstrings): values at pad slots of the attention ops never reach an
output or a gradient, NaN and inf included; in vector quantization a NaN distance compares as
+inf (a vector with no finite distance gets index 0, quantized = code 0 and the distance computed
for it); code_statistics indices and dynamic_quantize gates are validated in ops.py; the conv
ops answer B, H or W = 0 with the empty output. Each case runs on every backend that can serve it
here: the fast path when :mod:`dqfast.fast` has the op, the kernels under TRITON_INTERPRET=1 (or
on a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

import dqfast
from dqfast import backend
from tests.helpers import CAN_RUN_KERNELS, KERNEL_DEVICE

FILLS = [math.nan, math.inf, -math.inf]


def _backends(op: str, *args, **kwargs) -> None:
    """Skip unless the current backend can serve this call (the reason says why not)."""
    name = dqfast.get_backend()
    if name == "fast":
        why = backend.fast_reasons(op, *args, **kwargs)
        if why:
            pytest.skip(f"fast path cannot serve {op}: {why}")
    elif name == "triton":
        if not CAN_RUN_KERNELS:
            pytest.skip("Triton kernels need triton and a CUDA device or TRITON_INTERPRET=1")
        why = backend.reasons(op, *args, **kwargs)
        if why:
            pytest.skip(f"Triton cannot serve {op}: {why}")


@pytest.fixture(params=["reference", "fast", "triton"])
def path(request):
    with dqfast.use_backend(request.param):
        yield request.param


def _device(path: str) -> str:
    return KERNEL_DEVICE if path == "triton" else "cpu"


def _equal_nan(a: torch.Tensor, b: torch.Tensor, **tol) -> None:
    torch.testing.assert_close(a, b, equal_nan=True, **tol)


# ----------------------------------------------------------------------------------------------
# Attention: pad slots are inert
# ----------------------------------------------------------------------------------------------


def _layout(mode: str, device: str) -> dqfast.C2FLayout:
    # Two segments with pads in the middle and at the end; sample 1 has an empty second segment.
    lengths = torch.tensor([[5, 4], [7, 0]], device=device)
    return dqfast.C2FLayout((7, 6), lengths, mode=mode)


def _attend(tensors, layout, grad_out):
    """dqfast.c2f_attention on fresh leaf copies of ``tensors``: (output, their gradients)."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = dqfast.c2f_attention(*leaves, layout)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("mode", ["causal", "block"])
@pytest.mark.parametrize("fill", FILLS)
def test_c2f_attention_pads_never_reach_outputs_or_gradients(path, mode, fill):
    device = _device(path)
    torch.manual_seed(0)
    layout = _layout(mode, device)
    B, Hh, L, Dh = 2, 2, layout.seq_len, 16
    valid = layout.key_valid()  # (B, L)
    pad = ~valid[:, None, :, None].expand(B, Hh, L, Dh)
    clean = [torch.randn(B, Hh, L, Dh, device=device).masked_fill(pad, 0.0) for _ in range(3)]
    dirty = [t.masked_fill(pad, fill) for t in clean]
    if fill != fill:  # NaN: also a mix of NaN and inf in one tensor
        dirty[1] = dirty[1].masked_fill(pad & (torch.rand(pad.shape, device=device) < 0.5), math.inf)
    _backends("c2f_attention", *dirty, layout)
    grad_out = torch.randn(B, Hh, L, Dh, device=device)

    out, grads = _attend(dirty, layout, grad_out)
    want, want_grads = _attend(clean, layout, grad_out)
    assert torch.isfinite(out).all()
    query_pad = ~valid[:, None, :].expand(B, Hh, L)
    assert torch.equal(out[query_pad], torch.zeros_like(out[query_pad])), "pad queries must output exactly 0"
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        assert torch.equal(g[pad], torch.zeros_like(g[pad])), f"d{name} must be 0 at pad slots"
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["key", "query"])
def test_c2f_attention_infinite_pad_whose_scores_are_all_minus_inf(path, which):
    """An infinite pad that leaves every forward value finite: a pad key of -inf (or a pad query of
    +inf) in one dimension where every query (key) is positive (negative), so each of its scores
    is -inf, never NaN. Its weights are 0, but dQ = dS @ K and dK = dS^T @ Q would hold 0 * inf."""
    device = _device(path)
    torch.manual_seed(2)
    layout = _layout("causal", device)
    B, Hh, L, Dh = 2, 2, layout.seq_len, 16
    pad = ~layout.key_valid()[:, None, :, None].expand(B, Hh, L, Dh)
    first = torch.zeros_like(pad)
    first[..., 0] = True
    q, k, v = (torch.randn(B, Hh, L, Dh, device=device).masked_fill(pad, 0.0) for _ in range(3))
    if which == "key":
        q = torch.where(first & ~pad, q.abs() + 0.1, q)
        dirty = [q, k.masked_fill(pad & first, -math.inf), v]
    else:
        k = torch.where(first & ~pad, -k.abs() - 0.1, k)
        dirty = [q.masked_fill(pad & first, math.inf), k, v]
    _backends("c2f_attention", *dirty, layout)
    grad_out = torch.randn(B, Hh, L, Dh, device=device)

    out, grads = _attend(dirty, layout, grad_out)
    want, want_grads = _attend([q, k, v], layout, grad_out)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fill", FILLS)
def test_c2f_decode_attention_ignores_invalid_cache_slots(path, fill):
    device = _device(path)
    torch.manual_seed(1)
    B, Hh, Lq, Lk, Dh = 3, 2, 2, 11, 16
    key_valid = torch.rand(B, Lk, device=device) < 0.6
    key_valid[0, :] = False  # a sample with no valid key: its queries return 0
    key_valid[1, 0] = True
    invalid = ~key_valid[:, None, :, None].expand(B, Hh, Lk, Dh)
    q = torch.randn(B, Hh, Lq, Dh, device=device)
    k_clean, v_clean = (torch.randn(B, Hh, Lk, Dh, device=device).masked_fill(invalid, 0.0) for _ in range(2))
    k, v = k_clean.masked_fill(invalid, fill), v_clean.masked_fill(invalid, -fill)
    _backends("c2f_decode_attention", q, k, v, key_valid)
    out = dqfast.c2f_decode_attention(q, k, v, key_valid)
    want = dqfast.c2f_decode_attention(q, k_clean, v_clean, key_valid)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)

    if path == "triton":
        return  # the decode kernel is forward-only (inference); gradients come from the other paths
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dqfast.c2f_decode_attention(*leaves, key_valid).backward(torch.randn_like(q))
    for name, t in zip(("q", "k_cache", "v_cache"), leaves):
        assert torch.isfinite(t.grad).all(), f"d{name} has non-finite values"
    for t in leaves[1:]:
        assert torch.equal(t.grad[invalid], torch.zeros_like(t.grad[invalid]))


# ----------------------------------------------------------------------------------------------
# Vector quantization: NaN distances compare as +inf
# ----------------------------------------------------------------------------------------------


def _separated_codebook(K: int, D: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(K, D, generator=g) * 4).to(device)


def _vq_inputs(device: str, N=13, K=9, D=5):
    codebook = _separated_codebook(K, D, device)
    g = torch.Generator().manual_seed(4)
    # vectors near random codes, so the nearest code is unambiguous
    z = codebook.cpu()[torch.randint(K, (N,), generator=g)] + 0.1 * torch.randn(N, D, generator=g)
    return z.to(device), codebook


def _brute_force(z: torch.Tensor, codebook: torch.Tensor, metric: str, skip: list[int]) -> torch.Tensor:
    """float64 nearest code over the codes not in ``skip``, as indices into the full codebook."""
    keep = [i for i in range(codebook.shape[0]) if i not in skip]
    z64, c64 = z.double(), codebook[keep].double()
    if metric == "l2":
        d = torch.cdist(z64, c64) ** 2
    else:
        d = 1 - torch.nn.functional.normalize(z64, dim=-1) @ torch.nn.functional.normalize(c64, dim=-1).T
    return torch.tensor(keep, device=z.device)[d.argmin(1)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("fill", FILLS)
def test_vector_quantize_non_finite_codebook_rows_are_never_chosen(path, metric, fill):
    device = _device(path)
    z, codebook = _vq_inputs(device)
    codebook[3] = fill
    codebook[6, 2] = fill  # a row with a single non-finite entry
    _backends("vector_quantize", z, codebook, metric=metric)
    out = dqfast.vector_quantize(z, codebook, metric=metric)
    assert torch.equal(out.indices, _brute_force(z, codebook, metric, skip=[3, 6]))
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.distance).all()
    with dqfast.use_backend("reference"):
        ref = dqfast.vector_quantize(z, codebook, metric=metric)
    torch.testing.assert_close(out.quantized, ref.quantized, atol=0, rtol=0)
    torch.testing.assert_close(out.distance, ref.distance, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("fill", FILLS)
def test_vector_quantize_non_finite_vectors_get_code_zero(path, metric, fill):
    device = _device(path)
    z, codebook = _vq_inputs(device)
    z[2] = fill
    z[5, 1] = fill
    bad = torch.zeros(z.shape[0], dtype=torch.bool, device=device)
    bad[[2, 5]] = True
    _backends("vector_quantize", z, codebook, metric=metric)
    zl = z.clone().requires_grad_()
    out = dqfast.vector_quantize(zl, codebook, metric=metric)
    with dqfast.use_backend("reference"):
        ref = dqfast.vector_quantize(z, codebook, metric=metric)
    # spec: no finite distance -> index 0, quantized exactly that code, distance computed for it
    assert out.indices[bad].tolist() == [0, 0]
    code0 = codebook[0] if metric == "l2" else torch.nn.functional.normalize(codebook[0], dim=0)
    assert torch.equal(out.quantized[bad], code0.expand(2, -1))
    assert not torch.isfinite(out.distance[bad]).any()
    _equal_nan(out.distance, ref.distance, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.indices[~bad], _brute_force(z[~bad], codebook, metric, skip=[]))
    assert torch.equal(out.quantized, ref.quantized)
    # the straight-through gradient still reaches every finite vector
    grad = torch.randn_like(z)
    out.quantized.backward(grad)
    if metric == "l2":
        torch.testing.assert_close(zl.grad, grad)
    else:
        assert torch.isfinite(zl.grad[~bad]).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vector_quantize_all_nan_codebook_gives_index_zero(path, metric):
    device = _device(path)
    z, codebook = _vq_inputs(device)
    codebook = torch.full_like(codebook, math.nan)
    _backends("vector_quantize", z, codebook, metric=metric)
    out = dqfast.vector_quantize(z, codebook, metric=metric)
    assert torch.equal(out.indices, torch.zeros_like(out.indices))
    assert torch.isnan(out.quantized).all() and torch.isnan(out.distance).all()


@pytest.mark.parametrize("fill", FILLS)
def test_dynamic_quantize_non_finite_codes_and_features(path, fill):
    device = _device(path)
    B, D, H, W, K = 2, 5, 2, 3, 9
    g = torch.Generator().manual_seed(5)
    codebook = _separated_codebook(K, D, device)
    codebook[4] = fill
    feats = [
        (codebook.cpu()[torch.randint(K, (B, H * 2**s, W * 2**s), generator=g)] + 0.1).permute(0, 3, 1, 2)
        for s in range(2)
    ]
    feats = [f.contiguous().to(device) for f in feats]
    grain = torch.tensor([[[0, 1, 0], [1, 1, 0]], [[1, 0, 0], [0, 0, 1]]], device=device)
    feats[1][0, :, 0, 0] = fill  # a coded fine vector (region (0, 0) of image 0 is coarse: not coded)
    feats[1][0, 1, 0, 2] = fill  # region (0, 1) of image 0 is fine: coded
    _backends("dynamic_quantize", feats, codebook, grain=grain)
    leaves = [f.clone().requires_grad_() for f in feats]
    out = dqfast.dynamic_quantize(leaves, codebook, grain=grain)
    with dqfast.use_backend("reference"):
        ref = dqfast.dynamic_quantize(feats, codebook, grain=grain)
    assert not (out.indices == 4).any(), "a non-finite code was chosen"
    assert torch.equal(out.indices, ref.indices)
    _equal_nan(out.quantized, ref.quantized, atol=0, rtol=0)
    # the coded non-finite vector gets code 0 in its fine cell
    assert (out.indices[0, 0:1, 2:3] == 0).all()
    assert torch.isfinite(out.quantized).all()
    out.quantized.sum().backward()
    assert torch.isfinite(leaves[0].grad).all()


# ----------------------------------------------------------------------------------------------
# Validation in ops.py (the same error whatever the backend)
# ----------------------------------------------------------------------------------------------


def test_code_statistics_validates_indices(path):
    device = _device(path)
    x = torch.randn(6, 3, device=device)
    for bad in ([0, 1, 2, 3, 4, 7], [0, -1, 2, 3, 4, 5]):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, num_codes = 7\)"):
            dqfast.code_statistics(x, torch.tensor(bad, device=device), 7)
    with pytest.raises(ValueError, match="indices"):
        dqfast.code_statistics(x, torch.tensor([0, 1, 2, 3, 4, 5], device=device), 5)
    for dtype in (torch.uint8, torch.int16, torch.float32, torch.bool):
        with pytest.raises(TypeError, match="indices must be an int32 or int64"):
            dqfast.code_statistics(x, torch.zeros(6, dtype=dtype, device=device), 7)
    idx = torch.tensor([0, 6, 2, 2, 6, 0], device=device, dtype=torch.int32)
    _backends("code_statistics", x, idx, 7)
    counts, sums = dqfast.code_statistics(x, idx, 7)
    assert counts.tolist() == [2, 0, 2, 0, 0, 0, 2]
    torch.testing.assert_close(sums[6], x[1] + x[4])


def test_dynamic_quantize_refuses_a_gate_that_is_not_one_hot(path):
    device = _device(path)
    B, D, H, W = 1, 3, 2, 2
    feats = [torch.randn(B, D, H * 2**s, W * 2**s, device=device) for s in range(2)]
    codebook = torch.randn(4, D, device=device)
    gate = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [1, 0]]]), 2).float().to(device)
    _backends("dynamic_quantize", feats, codebook, gate=gate)
    assert dqfast.dynamic_quantize(feats, codebook, gate=gate).grain.tolist() == [[[0, 1], [1, 0]]]
    for value in ([0.5, 0.5], [1.0, 1.0], [0.0, 0.0], [math.nan, 1.0], [2.0, -1.0]):
        bad = gate.clone()
        bad[0, 1, 0] = torch.tensor(value)
        with pytest.raises(ValueError, match=r"gate must be one-hot.*gate\[0, 1, 0\]"):
            dqfast.dynamic_quantize(feats, codebook, gate=bad)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (0, 3, 0, 0)])
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate", "reflect"])
def test_conv_ops_with_empty_spatial_sizes(path, shape, padding_mode):
    device = _device(path)
    x = torch.randn(*shape, device=device, requires_grad=True)
    w = torch.randn(2 * 4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(2 * 4, device=device, requires_grad=True)
    y = dqfast.subpixel_conv2d(x, w, b, upscale=2, padding_mode=padding_mode, activation="gelu")
    assert y.shape == (shape[0], 2, 2 * shape[2], 2 * shape[3])
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    if padding_mode == "reflect":
        return  # reflect does not fold: upsample_conv2d refuses it whatever the size
    wu = torch.randn(5, 3, 3, 3, device=device, requires_grad=True)
    y = dqfast.upsample_conv2d(x, wu, None, scale=3, padding_mode=padding_mode)
    assert y.shape == (shape[0], 5, 3 * shape[2], 3 * shape[3])
    y.sum().backward()
    assert torch.equal(wu.grad, torch.zeros_like(wu))
