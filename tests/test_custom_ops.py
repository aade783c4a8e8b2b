"""The public ops as torch.library custom ops: opcheck on CPU, and torch.compile(fullgraph=True)
of models using them with no graph break, equal to eager in values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dqfast
from dqfast import library
from tests.helpers import HAS_CUDA, HAS_TRITON

# Compiling with the "aot_eager" backend runs Dynamo (graph capture) and AOTAutograd (the fake
# implementations and the registered autograd) without generating code, which is what the custom
# ops have to get right; one test also compiles with the default inductor backend.
COMPILE_BACKEND = "aot_eager"


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {})


def _randn(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float32).requires_grad_(grad)


def test_every_public_dispatching_op_is_registered():
    assert set(library.OPS) == set(dqfast.backend.OPS)
    for name, (_op, backward) in library.OPS.items():
        assert hasattr(torch.ops.dqfast, name)
        if backward is not None:
            assert hasattr(torch.ops.dqfast, backward)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_subpixel_conv2d(with_bias):
    torch.manual_seed(0)
    x, w = _randn(2, 3, 5, 4), _randn(8, 3, 3, 3)
    b = _randn(8) if with_bias else None
    _opcheck(torch.ops.dqfast.subpixel_conv2d.default, (x, w, b, 2, "replicate", "leaky_relu", 0.2))


def test_opcheck_upsample_conv2d():
    torch.manual_seed(1)
    x, w, b = _randn(2, 3, 5, 4), _randn(4, 3, 3, 3), _randn(4)
    _opcheck(torch.ops.dqfast.upsample_conv2d.default, (x, w, b, 2, "zeros", "silu", 0.01))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck_vector_quantize(metric):
    torch.manual_seed(2)
    _opcheck(torch.ops.dqfast.vector_quantize.default, (_randn(3, 5, 6), _randn(7, 6, grad=False), metric))


@pytest.mark.parametrize("how", ["grain", "gate", "budget"])
def test_opcheck_dynamic_quantize(how):
    torch.manual_seed(3)
    B, D, H, W = 2, 5, 2, 3
    feats = [_randn(B, D, H * 2**g, W * 2**g) for g in range(2)]
    codebook = _randn(9, D)
    grain = gate = logits = budget = None
    if how == "grain":
        grain = torch.randint(0, 2, (B, H, W))
    elif how == "gate":
        gate = nn.functional.one_hot(torch.randint(0, 2, (B, H, W)), 2).float().requires_grad_()
    else:
        logits, budget = torch.randn(B, H, W, 2), [0.5]
    args = (feats, codebook, grain, gate, logits, budget, "l2", 0.25)
    _opcheck(torch.ops.dqfast.dynamic_quantize.default, args)


def test_opcheck_code_statistics():
    torch.manual_seed(4)
    x, idx = torch.randn(10, 3), torch.randint(0, 5, (10,))
    _opcheck(torch.ops.dqfast.code_statistics.default, (x, idx, 5))


@pytest.mark.parametrize("mode", ["causal", "block"])
def test_opcheck_c2f_attention(mode):
    torch.manual_seed(5)
    q, k, v = (_randn(2, 2, 9, 8) for _ in range(3))
    lengths = torch.tensor([[3, 4], [5, 0]])
    _opcheck(torch.ops.dqfast.c2f_attention.default, (q, k, v, [5, 4], lengths, mode, None))


def test_opcheck_c2f_decode_attention():
    torch.manual_seed(6)
    q, k, v = _randn(2, 2, 1, 8), _randn(2, 2, 7, 8), _randn(2, 2, 7, 8)
    valid = torch.rand(2, 7) < 0.7
    _opcheck(torch.ops.dqfast.c2f_decode_attention.default, (q, k, v, valid, 0.3))


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, same values and gradients as eager
# ----------------------------------------------------------------------------------------------


class TinyDecoder(nn.Module):
    """A VQGAN-style decoder tail: sub-pixel upsampling, then a folded resize-conv."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.spc = nn.Parameter(torch.randn(c * 4, c, 3, 3) * 0.2)
        self.spc_bias = nn.Parameter(torch.randn(c * 4) * 0.1)
        self.up = nn.Parameter(torch.randn(3, c, 3, 3) * 0.2)

    def forward(self, x):
        h = self.conv_in(x)
        h = dqfast.subpixel_conv2d(h, self.spc, self.spc_bias, upscale=2, activation="gelu")
        return dqfast.upsample_conv2d(h, self.up, None, padding_mode="replicate")


class TinyTokenizerBlock(nn.Module):
    """dynamic_quantize of two feature maps with a per-image budget, then c2f attention over the
    quantized tokens of a layout built inside the compiled region."""

    def __init__(self, d: int = 6, k: int = 11):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(k, d))
        self.router = nn.Linear(d, 2)
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, coarse, fine, coarse_len, fine_len):
        logits = self.router(coarse.permute(0, 2, 3, 1))
        out = dqfast.dynamic_quantize([coarse, fine], self.codebook, router_logits=logits, budget=0.5)
        tokens = out.quantized.flatten(2).transpose(1, 2)  # (B, L, D)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, L, D) each
        L = tokens.shape[1]
        layout = dqfast.C2FLayout((L // 2, L - L // 2), torch.stack([coarse_len, fine_len], 1))
        return dqfast.c2f_attention(q, k, v, layout), out.loss


def _compare_compiled(model, inputs, backend=COMPILE_BACKEND):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    eager_out = model(*inputs)
    compiled_out = compiled(*inputs)
    eager_out = eager_out if isinstance(eager_out, tuple) else (eager_out,)
    compiled_out = compiled_out if isinstance(compiled_out, tuple) else (compiled_out,)
    for e, c in zip(eager_out, compiled_out):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters()] + [t for t in inputs if t.requires_grad]
    # (the router gets no gradient through a budget: unused in both, hence allow_unused)
    eager_grads = torch.autograd.grad(sum(o.sum() for o in eager_out), params, allow_unused=True)
    compiled_grads = torch.autograd.grad(sum(o.sum() for o in compiled_out), params, allow_unused=True)
    assert sum(g is not None for g in eager_grads) >= len(params) // 2
    for e, c in zip(eager_grads, compiled_grads):
        assert (e is None) == (c is None)
        if e is not None:
            torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


def test_compile_decoder_fullgraph():
    torch.manual_seed(7)
    _compare_compiled(TinyDecoder(), (torch.randn(2, 3, 5, 6, requires_grad=True),))


def test_compile_dynamic_quantize_and_attention_fullgraph():
    torch.manual_seed(8)
    B, D, H, W = 2, 6, 2, 3
    coarse = torch.randn(B, D, H, W, requires_grad=True)
    fine = torch.randn(B, D, 2 * H, 2 * W, requires_grad=True)
    L = 4 * H * W
    inputs = (coarse, fine, torch.tensor([L // 2, 5]), torch.tensor([7, 0]))
    _compare_compiled(TinyTokenizerBlock(D), inputs)


def test_compile_patched_decoder_fullgraph():
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Conv2d(4, 2 * 4, 3, padding=1),
        nn.PixelShuffle(2),
    )
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    before = model(x)
    dqfast.patch(model)
    assert not any(isinstance(m, nn.PixelShuffle | nn.Upsample) for m in model.modules()), model
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    _compare_compiled(model, (x,))


@pytest.mark.slow
def test_compile_decoder_with_inductor():
    torch.manual_seed(9)
    _compare_compiled(TinyDecoder(), (torch.randn(2, 3, 5, 6, requires_grad=True),), backend="inductor")


def test_eager_calls_do_not_need_the_custom_op_layer():
    # Eager dispatch goes straight to the backend; the custom ops are for compiled graphs.
    x, w = torch.randn(1, 2, 3, 3), torch.randn(4, 2, 3, 3)
    with torch.autograd.profiler.profile() as prof:
        dqfast.subpixel_conv2d(x, w, upscale=2)
    assert not any("dqfast::" in e.name for e in prof.function_events)
    with torch.autograd.profiler.profile() as prof:
        torch.compile(lambda x, w: dqfast.subpixel_conv2d(x, w, upscale=2), backend=COMPILE_BACKEND)(x, w)
    assert any("dqfast::subpixel_conv2d" in e.name for e in prof.function_events)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="compiles the Triton path: needs a CUDA device and triton")
def test_compile_triton_path_on_gpu():
    torch.manual_seed(10)
    model = TinyDecoder().cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda", requires_grad=True)
    with dqfast.use_backend("triton"):
        _compare_compiled(model, (x,), backend="inductor")
    B, D, H, W = 2, 16, 4, 4
    block = TinyTokenizerBlock(D).cuda()
    coarse = torch.randn(B, D, H, W, device="cuda", requires_grad=True)
    fine = torch.randn(B, D, 2 * H, 2 * W, device="cuda", requires_grad=True)
    L = 4 * H * W
    lens = (torch.tensor([L // 2, 5], device="cuda"), torch.tensor([7, 0], device="cuda"))
    with dqfast.use_backend("triton"):
        _compare_compiled(block, (coarse, fine, *lens), backend="inductor")
