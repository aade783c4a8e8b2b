"""The Triton kernels as ``torch.library.triton_op`` ops (kernels/_triton_ops.py) and the
decomposition of the public custom ops onto them when torch.compile traces a CUDA call.

Without a GPU: the registrations and schemas, the kernels torch finds in each op, eager parity of
the triton_ops with the reference on the CPU interpreter (values and gradients), and the graphs
AOTAutograd traces (in a subprocess that imports the kernels compiled, not interpreted, and
points triton at an sm_90 target so that the kernels' mutation analysis runs): a routed call
becomes the kernel launches themselves, forward and backward, and a CPU call stays one opaque
node. With a GPU: torch.compile(fullgraph=True) with inductor, equal to eager, and the kernels
appear in the generated code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dqfast
from dqfast import library  # registers the public custom ops
from dqfast.reference import c2f_attention as ref_attn
from dqfast.reference import subpixel_conv as ref_spc
from dqfast.reference import vector_quantize as ref_vq
from tests.helpers import CAN_RUN_KERNELS, HAS_TRITON, KERNEL_DEVICE, needs_gpu

ROOT = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed")

# name -> (schema, kernels launched)
EXPECTED = {
    "subpixel_conv2d_triton": (
        "dqfast::subpixel_conv2d_triton(Tensor x, Tensor weight, Tensor? bias, SymInt factor, str padding_mode, "
        "str? activation, float negative_slope) -> Tensor",
        {"_subpixel_conv2d_fwd_kernel"},
    ),
    "subpixel_conv2d_triton_backward": (
        "dqfast::subpixel_conv2d_triton_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, SymInt factor, "
        "str padding_mode, str? activation, float negative_slope, bool[] wants) -> Tensor[]",
        {"_subpixel_conv2d_bwd_act_kernel", "_subpixel_conv2d_bwd_dx_kernel", "_subpixel_conv2d_bwd_dw_kernel"},
    ),
    "upsample_conv2d_triton": (
        "dqfast::upsample_conv2d_triton(Tensor x, Tensor weight, Tensor? bias, SymInt factor, str padding_mode, "
        "str? activation, float negative_slope) -> Tensor",
        {"_subpixel_conv2d_folded_fwd_kernel"},
    ),
    "upsample_conv2d_triton_backward": (
        "dqfast::upsample_conv2d_triton_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, SymInt factor, "
        "str padding_mode, str? activation, float negative_slope, bool[] wants) -> Tensor[]",
        {"_subpixel_conv2d_bwd_act_kernel", "_subpixel_conv2d_bwd_dx_kernel", "_subpixel_conv2d_bwd_dw_kernel"},
    ),
    "vector_quantize_triton": (
        "dqfast::vector_quantize_triton(Tensor z, Tensor codebook, str metric) -> (Tensor, Tensor, Tensor)",
        {"_vector_quantize_fwd_kernel"},
    ),
    "c2f_attention_triton": (
        "dqfast::c2f_attention_triton(Tensor q, Tensor k, Tensor v, SymInt[] segment_sizes, Tensor lengths, "
        "str mode, float? scale) -> (Tensor, Tensor)",
        {"_c2f_attention_fwd_kernel"},
    ),
    "c2f_attention_triton_backward": (
        "dqfast::c2f_attention_triton_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "SymInt[] segment_sizes, Tensor lengths, str mode, float? scale) -> (Tensor, Tensor, Tensor)",
        {"_c2f_attention_bwd_preprocess_kernel", "_c2f_attention_bwd_dq_kernel", "_c2f_attention_bwd_dkdv_kernel"},
    ),
    "dynamic_quantize_triton": (
        "dqfast::dynamic_quantize_triton(Tensor[] features, Tensor codebook, Tensor? grain, Tensor? gate, "
        "Tensor? router_logits, float[]? budget, str metric, float beta) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        {"_dynamic_quantize_search_kernel", "_dynamic_quantize_emit_kernel"},
    ),
    "dynamic_quantize_triton_backward": (
        "dqfast::dynamic_quantize_triton_backward(Tensor? grad_quantized, Tensor? grad_loss, Tensor[] features, "
        "Tensor codebook, Tensor? gate, Tensor grain, Tensor indices, str metric, float beta, bool[] wants) "
        "-> Tensor[]",
        {"_dynamic_quantize_bwd_kernel"},
    ),
    "code_statistics_triton": (
        "dqfast::code_statistics_triton(Tensor x, Tensor indices, SymInt num_codes) -> (Tensor, Tensor)",
        {"_code_statistics_kernel"},
    ),
    "c2f_decode_attention_triton": (
        "dqfast::c2f_decode_attention_triton(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_valid, "
        "float? scale) -> Tensor",
        {"_c2f_decode_attention_fwd_kernel", "_c2f_decode_attention_combine_kernel"},
    ),
}


@pytest.fixture(scope="module")
def triton_ops():
    if not HAS_TRITON:
        pytest.skip("needs triton installed")
    from dqfast.kernels import _triton_ops

    return _triton_ops


def test_library_import_does_not_import_triton():
    code = "import sys, dqfast.library; print(any(m.split('.')[0] == 'triton' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_registrations_and_schemas(triton_ops):
    # every public op: each one's CUDA path can be traced into the kernels
    assert set(triton_ops.TRITON_OPS) == set(library.OPS)
    for name, (schema, _) in EXPECTED.items():
        assert str(getattr(torch.ops.dqfast, name).default._schema) == schema
    for public, (forward, backward) in triton_ops.TRITON_OPS.items():
        assert forward._qualname == f"dqfast::{public}_triton"
        assert backward is None or backward._qualname == f"dqfast::{public}_triton_backward"
        # same arguments as the opaque op they stand in for, so the decomposition forwards them as is
        generic = getattr(torch.ops.dqfast, public).default._schema
        assert [a.name for a in forward._opoverload._schema.arguments] == [a.name for a in generic.arguments]


def test_schema_and_autograd_registration(triton_ops):
    # opcheck's fake-tensor and AOT tests would run the interpreter's kernels on fake tensors
    # (wrap_triton leaves interpreted kernels unwrapped): the traced graphs are checked below.
    x, w, b = torch.randn(1, 2, 3, 3), torch.randn(4, 2, 3, 3, requires_grad=True), torch.randn(4)
    args = (x, w, b, 2, "zeros", "relu", 0.01)
    for op in (torch.ops.dqfast.subpixel_conv2d_triton, torch.ops.dqfast.upsample_conv2d_triton):
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------
# Eager parity of the triton_ops (CPU interpreter or GPU) with the reference
# ----------------------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(
    not CAN_RUN_KERNELS, reason="Triton kernels need triton and a CUDA device or TRITON_INTERPRET=1"
)

CONV_CASES = [
    # (B, Cin, H, W, Cout, k, padding_mode, activation, bias, channels_last)
    (2, 3, 5, 4, 2, 3, "replicate", "gelu", True, False),
    (1, 5, 4, 6, 3, 3, "reflect", None, False, False),
    (2, 4, 3, 5, 2, 1, "zeros", "leaky_relu", True, True),
]


def _leaves(*tensors):
    return [None if t is None else t.detach().to(KERNEL_DEVICE).requires_grad_() for t in tensors]


def _grads(out, leaves, go):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], go)


@pytest.fixture(autouse=True)
def _exact_fp32_conv():
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


@needs_kernels
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[6]}-{c[7]}-k{c[5]}")
def test_subpixel_conv2d_triton_matches_reference(triton_ops, case):
    B, cin, H, W, cout, k, pad, act, has_bias, cl = case
    r = 2
    torch.manual_seed(0)
    x = torch.randn(B, cin, H, W)
    x = x.to(memory_format=torch.channels_last) if cl else x
    w = torch.randn(cout * r * r, cin, k, k) * (cin * k * k) ** -0.5
    b = torch.randn(cout * r * r) * 0.5 if has_bias else None
    go = torch.randn(B, cout, r * H, r * W)
    kl, rl = _leaves(x, w, b), _leaves(x, w, b)
    out = torch.ops.dqfast.subpixel_conv2d_triton(*kl, r, pad, act, 0.2)
    expected = ref_spc.subpixel_conv2d(*rl, upscale=r, padding_mode=pad, activation=act, negative_slope=0.2)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for g, e in zip(_grads(out, kl, go.to(out.device)), _grads(expected, rl, go.to(out.device))):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("pad, act, has_bias", [("zeros", "silu", True), ("replicate", None, False)])
def test_upsample_conv2d_triton_matches_reference(triton_ops, pad, act, has_bias):
    torch.manual_seed(1)
    x, w = torch.randn(2, 5, 4, 3), torch.randn(3, 5, 3, 3) * 0.2
    b = torch.randn(3) if has_bias else None
    go = torch.randn(2, 3, 8, 6)
    kl, rl = _leaves(x, w, b), _leaves(x, w, b)
    out = torch.ops.dqfast.upsample_conv2d_triton(*kl, 2, pad, act, 0.01)
    expected = ref_spc.upsample_conv2d(*rl, scale=2, padding_mode=pad, activation=act)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for g, e in zip(_grads(out, kl, go.to(out.device)), _grads(expected, rl, go.to(out.device))):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("mode", ["causal", "block"])
def test_c2f_attention_triton_matches_reference(triton_ops, mode):
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    k = k.transpose(2, 3).contiguous().transpose(2, 3)  # any strides
    lengths = torch.tensor([[3, 4], [5, 0]])
    layout = dqfast.C2FLayout((5, 4), lengths, mode)
    kl, rl = _leaves(q, k, v), _leaves(q, k, v)
    out, lse = torch.ops.dqfast.c2f_attention_triton(*kl, [5, 4], lengths.to(KERNEL_DEVICE), mode, 0.3)
    expected = ref_attn.c2f_attention(*rl, layout.to(KERNEL_DEVICE), scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 2, 9) and lse.dtype == torch.float32
    go = torch.randn_like(out)
    for g, e in zip(_grads(out, kl, go), _grads(expected, rl, go)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vector_quantize_triton_matches_reference(triton_ops, metric):
    torch.manual_seed(2)
    z, codebook = torch.randn(3, 7, 6), torch.randn(11, 6)
    z[0, 0] = 0.0  # cosine: a zero vector (its gradient goes through the eps clamp)
    (zk,), (zr,) = _leaves(z), _leaves(z)
    out = torch.ops.dqfast.vector_quantize_triton(zk, codebook.to(zk.device), metric)
    expected = ref_vq.vector_quantize(zr, codebook.to(zr.device), metric=metric)
    torch.testing.assert_close(out[1], expected.indices)
    torch.testing.assert_close(out[0], expected.quantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], expected.distance, atol=1e-5, rtol=1e-5)
    assert out[0].dtype == z.dtype and out[1].dtype == torch.int64 and out[2].dtype == torch.float32
    go = torch.randn_like(out[0])
    (g,) = torch.autograd.grad(out[0], zk, go)
    (e,) = torch.autograd.grad(expected.quantized, zr, go)
    torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


DQ_CASES = [
    # (metric, how the grain is given)
    ("l2", "gate"),
    ("l2", "budget"),
    ("cosine", "gate"),
    ("cosine", "grain"),
]


@needs_kernels
@pytest.mark.parametrize("metric, mode", DQ_CASES)
def test_dynamic_quantize_triton_matches_reference(triton_ops, metric, mode):
    torch.manual_seed(3)
    B, D, H, W, K = 2, 6, 3, 2, 13
    features = [torch.randn(B, D, H * 2**g, W * 2**g) for g in range(2)]
    features[1] = features[1].transpose(2, 3).contiguous().transpose(2, 3)  # any strides
    codebook = torch.randn(K, D)
    logits = torch.randn(B, H, W, 2)
    logits[0, 0, 0] = torch.tensor([2.0, -2.0])  # region (0, 0) of image 0 coded coarse
    gate = torch.nn.functional.one_hot(logits.argmax(-1), 2).float() if mode == "gate" else None
    grain = logits.argmax(-1) if mode == "grain" else None
    router_logits, budget = (logits, [0.5]) if mode == "budget" else (None, None)
    if metric == "cosine":
        features[0][0, :, 0, 0] = 0.0  # a coded zero vector: its gradient goes through the eps clamp
    kl, rl = _leaves(*features, codebook, gate), _leaves(*features, codebook, gate)
    grain_k = None if grain is None else grain.to(KERNEL_DEVICE)
    logits_k = None if router_logits is None else router_logits.to(KERNEL_DEVICE)
    out = torch.ops.dqfast.dynamic_quantize_triton(kl[:2], kl[2], grain_k, kl[3], logits_k, budget, metric, 0.25)
    expected = ref_vq.dynamic_quantize(
        rl[:2], rl[2], grain=grain_k, gate=rl[3], router_logits=logits_k,
        budget=None if budget is None else budget[0], metric=metric, beta=0.25,
    )  # fmt: skip
    quantized, indices, grain_out, loss, n_codes = out
    assert torch.equal(indices, expected.indices)
    assert torch.equal(grain_out, expected.grain) and torch.equal(n_codes, expected.n_codes)
    assert quantized.dtype == features[0].dtype and loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(quantized, expected.quantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, expected.loss, atol=1e-6, rtol=1e-5)
    # gradients of the straight-through output and the loss (commitment and codebook terms)
    go, gl = torch.randn_like(quantized), 1.7
    grads = _grads((quantized * go).sum() + gl * loss, kl, None)
    expected_grads = _grads((expected.quantized * go).sum() + gl * expected.loss, rl, None)
    assert len(grads) == (4 if gate is not None else 3)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_dynamic_quantize_triton_backward_returns_the_wanted_gradients(triton_ops):
    torch.manual_seed(4)
    features = [torch.randn(1, 4, 2 * 2**g, 2 * 2**g).to(KERNEL_DEVICE) for g in range(2)]
    codebook = torch.randn(5, 4).to(KERNEL_DEVICE)
    grain = torch.tensor([[[0, 1], [1, 0]]]).to(KERNEL_DEVICE)
    _, indices, grain, _, _ = torch.ops.dqfast.dynamic_quantize_triton(
        features, codebook, grain, None, None, None, "l2", 0.25
    )
    grad_q = torch.randn(1, 4, 4, 4).to(KERNEL_DEVICE)
    grads = torch.ops.dqfast.dynamic_quantize_triton_backward(
        grad_q, None, features, codebook, None, grain, indices, "l2", 0.25, [True, False, True, False]
    )
    assert [tuple(g.shape) for g in grads] == [(1, 4, 2, 2), (0,), (5, 4), (0,)]
    assert not grads[2].any()  # no loss gradient: nothing reaches the codebook


@needs_kernels
def test_code_statistics_triton_matches_reference(triton_ops):
    torch.manual_seed(6)
    x = torch.randn(45, 14)[:, ::2].to(KERNEL_DEVICE)  # any strides
    indices = torch.randint(0, 9, (45,)).to(KERNEL_DEVICE)
    counts, sums = torch.ops.dqfast.code_statistics_triton(x, indices, 11)
    expected_counts, expected_sums = ref_vq.code_statistics(x, indices, 11)
    torch.testing.assert_close(counts, expected_counts)
    torch.testing.assert_close(sums, expected_sums, atol=1e-5, rtol=1e-5)
    assert counts.dtype == sums.dtype == torch.float32


@needs_kernels
def test_c2f_decode_attention_triton_matches_reference(triton_ops):
    torch.manual_seed(7)
    q = torch.randn(2, 3, 2, 8).to(KERNEL_DEVICE)
    k, v = (torch.randn(2, 3, 37, 8).to(KERNEL_DEVICE) for _ in range(2))
    k = k.transpose(2, 3).contiguous().transpose(2, 3)  # any strides
    key_valid = (torch.rand(2, 37) > 0.3).to(KERNEL_DEVICE)
    key_valid[1] = False  # a query with no valid key gets 0
    out = torch.ops.dqfast.c2f_decode_attention_triton(q, k, v, key_valid, 0.4)
    expected = ref_attn.c2f_decode_attention(q, k, v, key_valid, scale=0.4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not out[1].any()


@needs_kernels
def test_opcheck_schemas_of_the_quantizer_and_decode_ops(triton_ops):
    features = [
        torch.randn(1, 4, 2, 2).to(KERNEL_DEVICE),
        torch.randn(1, 4, 4, 4).to(KERNEL_DEVICE).requires_grad_(),
    ]
    codebook = torch.randn(5, 4).to(KERNEL_DEVICE)
    grain = torch.tensor([[[0, 1], [1, 0]]]).to(KERNEL_DEVICE)
    checks = ("test_schema", "test_autograd_registration")
    dq_args = (features, codebook, grain, None, None, None, "l2", 0.25)
    torch.library.opcheck(torch.ops.dqfast.dynamic_quantize_triton.default, dq_args, test_utils=checks)
    x, indices = torch.randn(6, 4).to(KERNEL_DEVICE), torch.randint(0, 5, (6,)).to(KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.dqfast.code_statistics_triton.default, (x, indices, 5), test_utils=checks)
    q, k, v = (torch.randn(1, 2, n, 8).to(KERNEL_DEVICE) for n in (1, 5, 5))
    key_valid = torch.tensor([[True, False, True, True, False]]).to(KERNEL_DEVICE)
    decode_args = (q, k, v, key_valid, None)
    torch.library.opcheck(torch.ops.dqfast.c2f_decode_attention_triton.default, decode_args, test_utils=checks)


# ----------------------------------------------------------------------------------------------
# The graphs AOTAutograd traces (CPU, kernels compiled for an sm_90 target, never launched)
# ----------------------------------------------------------------------------------------------

_TRACE = r"""
import json, os, sys, torch
import triton
from triton.backends.compiler import GPUTarget
from torch._functorch.aot_autograd import aot_export_joint_simple
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

class Sm90:  # what triton asks the driver for while torch analyses a kernel's stores
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Sm90())
import dqfast
from dqfast import library
from dqfast.kernels import _triton_ops  # compiled kernels: TRITON_INTERPRET is unset at import
os.environ["TRITON_INTERPRET"] = "1"  # lets the "triton" backend take CPU tensors
if sys.argv[1] in ("widen", "dynamic"):
    library._GRAPH_TRITON_DEVICES = frozenset({"cuda", "cpu"})

def kernel_name(kernel):
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__

def trace(fn, args, joint=True):
    gm = aot_export_joint_simple(fn, args, trace_joint=joint)
    kernels, mutated, ops = [], [], []
    for node in gm.graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernels.append(kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"])))
            mutated.append(sorted(node.kwargs["tensors_to_clone"]))
        elif node.op == "call_function" and "dqfast" in str(node.target):
            ops.append(str(node.target))
    return {"kernels": kernels, "mutated": mutated, "ops": ops}

from torch._library.triton import get_triton_kernels_for_op
found = {
    op._name: sorted(kernel_name(k) for k in get_triton_kernels_for_op(op._qualname))
    for pair in _triton_ops.TRITON_OPS.values() for op in pair if op is not None
}

torch.manual_seed(0)
x = torch.randn(2, 16, 6, 5, requires_grad=True)
w_spc, b_spc = torch.randn(64, 16, 3, 3, requires_grad=True), torch.randn(64, requires_grad=True)
w_up = torch.randn(8, 16, 3, 3, requires_grad=True)
z, codebook = torch.randn(2, 5, 16, requires_grad=True), torch.randn(33, 16)
result = {}
with dqfast.use_backend("triton"):
    result["subpixel_conv2d"] = trace(
        lambda x, w, b: (library.subpixel_conv2d(x, w, b, upscale=2, padding_mode="reflect", activation="gelu").sum(),),
        [x, w_spc, b_spc],
    )
    result["upsample_conv2d"] = trace(lambda x, w: (library.upsample_conv2d(x, w, None).sum(),), [x, w_up])
    result["vector_quantize"] = trace(
        lambda z, c: (library.vector_quantize(z, c, metric="cosine").quantized.sum(),), [z, codebook]
    )
    lengths = torch.tensor([[3, 4], [5, 0]])
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    result["c2f_attention"] = trace(
        lambda q, k, v, n: (library.c2f_attention(q, k, v, dqfast.C2FLayout._unchecked((5, 4), n, "causal")).sum(),),
        [q, k, v, lengths],
    )
    feats = [torch.randn(2, 16, 2 * 2**g, 3 * 2**g, requires_grad=True) for g in range(2)]
    cb = torch.randn(33, 16, requires_grad=True)
    gate = torch.nn.functional.one_hot(torch.randn(2, 2, 3, 2).argmax(-1), 2).float().requires_grad_()

    def quantize(f0, f1, c, gt):
        out = library.dynamic_quantize([f0, f1], c, gate=gt)
        return (out.quantized.sum() + out.loss,)

    result["dynamic_quantize"] = trace(quantize, [*feats, cb, gate])
    x_cs, idx_cs = torch.randn(40, 16), torch.randint(0, 33, (40,))
    result["code_statistics"] = trace(lambda x, i: library.code_statistics(x, i, 33), [x_cs, idx_cs], joint=False)
    q_dec, k_dec, v_dec = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    valid = torch.rand(2, 70) > 0.3
    result["c2f_decode_attention"] = trace(
        lambda q, k, v, m: (library.c2f_decode_attention(q, k, v, m),), [q_dec, k_dec, v_dec, valid], joint=False
    )
    # a call that needs a gradient (the decode kernels are forward-only)
    decode_with_grad = trace(
        lambda q, k, v, m: (library.c2f_decode_attention(q, k, v, m).sum(),),
        [q_dec.requires_grad_(), k_dec, v_dec, valid],
    )
print(json.dumps({"found": found, "graphs": result, "decode_with_grad": decode_with_grad}))
"""


# torch.compile(dynamic=True, fullgraph=True) of each op: Dynamo, then AOTAutograd with symbolic
# sizes reaching the launchers (the compiled graph is captured, never run).
_TRACE_DYNAMIC = (
    _TRACE[: _TRACE.index("def trace(")]
    + r"""
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

class Captured(Exception):
    pass

def compile_and_capture(fn, args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Captured

        return make_boxed_func(run)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), dynamic=True, fullgraph=True)
    try:
        compiled(*args)
    except Captured:
        pass
    gm = graphs[0]  # the forward graph (compiled first)
    return [
        kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]))
        for node in gm.graph.nodes
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional
    ]

torch.manual_seed(0)
x = torch.randn(2, 16, 6, 5, requires_grad=True)
w = torch.randn(64, 16, 3, 3, requires_grad=True)
z, codebook = torch.randn(2, 7, 16, requires_grad=True), torch.randn(33, 16)
q, k, v = (torch.randn(2, 2, 11, 16, requires_grad=True) for _ in range(3))
lengths = torch.tensor([[3, 4], [5, 0]])
result = {}
with dqfast.use_backend("triton"):
    result["subpixel_conv2d"] = compile_and_capture(
        lambda x, w: dqfast.subpixel_conv2d(x, w, upscale=2, activation="silu"), (x, w)
    )
    result["upsample_conv2d"] = compile_and_capture(lambda x, w: dqfast.upsample_conv2d(x, w[:8]), (x, w))
    result["vector_quantize"] = compile_and_capture(lambda z, c: dqfast.vector_quantize(z, c).quantized, (z, codebook))
    result["c2f_attention"] = compile_and_capture(
        lambda q, k, v, n: dqfast.c2f_attention(q, k, v, dqfast.C2FLayout((5, 6), n, "block")), (q, k, v, lengths)
    )
    feats = [torch.randn(2, 16, 3 * 2**g, 5 * 2**g, requires_grad=True) for g in range(2)]
    grain = torch.randint(0, 2, (2, 3, 5))
    # (library's op: dqfast.dynamic_quantize's argument checks break the graph at math.isfinite(beta)
    # when dynamic=True makes the float symbolic)
    result["dynamic_quantize"] = compile_and_capture(
        lambda f0, f1, c, g: library.dynamic_quantize([f0, f1], c, grain=g).quantized, (*feats, codebook, grain)
    )
    x_cs, idx_cs = torch.randn(41, 16), torch.randint(0, 33, (41,))
    result["code_statistics"] = compile_and_capture(lambda x, i: dqfast.code_statistics(x, i, 33), (x_cs, idx_cs))
    q_dec, k_dec, v_dec = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    valid = torch.rand(2, 70) > 0.3
    result["c2f_decode_attention"] = compile_and_capture(
        lambda q, k, v, m: dqfast.c2f_decode_attention(q, k, v, m), (q_dec, k_dec, v_dec, valid)
    )
print(json.dumps(result))
"""
)


def _trace(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TORCH_LOGS="-all")
    script = _TRACE_DYNAMIC if mode == "dynamic" else _TRACE
    out = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def traced_on_gpu_path():
    if not HAS_TRITON:
        pytest.skip("needs triton installed")
    return _trace("widen")


def test_torch_finds_the_kernels_of_each_op(traced_on_gpu_path):
    # (what torch hashes into its compile caches; it reads the wrap_triton calls in the source)
    found = traced_on_gpu_path["found"]
    assert set(found) == set(EXPECTED)
    for name, (_, kernels) in EXPECTED.items():
        assert set(found[name]) == kernels, name


def test_compiled_call_launches_the_forward_and_backward_kernels(traced_on_gpu_path):
    graphs = traced_on_gpu_path["graphs"]
    spc = graphs["subpixel_conv2d"]
    assert spc["ops"] == []  # no opaque custom op left
    assert spc["kernels"] == [
        "_subpixel_conv2d_fwd_kernel",
        "_subpixel_conv2d_bwd_act_kernel",
        "_subpixel_conv2d_bwd_dx_kernel",
        "_subpixel_conv2d_bwd_dw_kernel",
    ]
    # torch's analysis of the kernels' stores: only the outputs are written
    assert spc["mutated"] == [["out_ptr"], ["g_ptr"], ["dx_ptr"], ["db_ptr", "dw_ptr"]]
    up = graphs["upsample_conv2d"]
    assert up["ops"] == []
    assert up["kernels"][0] == "_subpixel_conv2d_folded_fwd_kernel"
    # no activation: the backward reads pixel_unshuffle(grad) and skips the recompute kernel
    assert up["kernels"][1:] == ["_subpixel_conv2d_bwd_dx_kernel", "_subpixel_conv2d_bwd_dw_kernel"]
    vq = graphs["vector_quantize"]
    assert vq["kernels"] == ["_vector_quantize_fwd_kernel"]
    assert vq["mutated"] == [["distance_ptr", "indices_ptr", "quantized_ptr"]]
    assert vq["ops"] == ["dqfast.vector_quantize_backward.default"]  # straight-through: no kernel
    attn = graphs["c2f_attention"]
    assert attn["ops"] == []
    # the backward op's signature has no lse: the forward kernel runs again there (unless the
    # compiler dedupes the two identical launches)
    assert attn["kernels"][0] == "_c2f_attention_fwd_kernel"
    assert attn["kernels"][-3:] == [
        "_c2f_attention_bwd_preprocess_kernel",
        "_c2f_attention_bwd_dq_kernel",
        "_c2f_attention_bwd_dkdv_kernel",
    ]


def test_compiled_quantizer_and_decode_calls_launch_their_kernels(traced_on_gpu_path):
    graphs = traced_on_gpu_path["graphs"]
    search, emit = "_dynamic_quantize_search_kernel", "_dynamic_quantize_emit_kernel"
    dq = graphs["dynamic_quantize"]
    assert dq["ops"] == []  # no opaque custom op left, forward or backward
    # per grain (2 here): the split codebook search, then the combine that writes the codes; the
    # backward op carries no indices, so the (deterministic) forward kernels run again there
    # before the backward kernel, once per grain
    assert dq["kernels"] == [search, emit] * 4 + ["_dynamic_quantize_bwd_kernel"] * 2
    fwd_mutated = [
        ["best_idx_ptr", "best_ptr", "splits_ptr"],
        ["cells_ptr", "indices_ptr", "partial_ptr", "quantized_ptr"],
    ]
    # (torch's analysis also lists cells_ptr: the stores' addresses come from the cells it loads)
    assert dq["mutated"] == fwd_mutated * 4 + [["cells_ptr", "grad_codebook_ptr", "grad_feat_ptr", "grad_gate_ptr"]] * 2
    stats = graphs["code_statistics"]
    assert stats == {"kernels": ["_code_statistics_kernel"], "mutated": [["counts_ptr", "sums_ptr"]], "ops": []}
    decode = graphs["c2f_decode_attention"]
    assert decode["ops"] == []
    assert decode["kernels"] == ["_c2f_decode_attention_fwd_kernel", "_c2f_decode_attention_combine_kernel"]
    assert decode["mutated"] == [["PART_ACC", "PART_L", "PART_M"], ["O"]]
    # inputs that need a gradient: below autograd they do not show it, so the forward runs the
    # kernels (as the opaque op did at run time) and the backward stays the opaque op
    with_grad = traced_on_gpu_path["decode_with_grad"]
    assert with_grad["kernels"] == decode["kernels"]
    assert with_grad["ops"] == ["dqfast.c2f_decode_attention_backward.default"]


def test_compile_with_dynamic_shapes_traces_the_kernels():
    if not HAS_TRITON:
        pytest.skip("needs triton installed")
    forward = _trace("dynamic")
    assert forward == {
        "subpixel_conv2d": ["_subpixel_conv2d_fwd_kernel"],
        "upsample_conv2d": ["_subpixel_conv2d_folded_fwd_kernel"],
        "vector_quantize": ["_vector_quantize_fwd_kernel"],
        "c2f_attention": ["_c2f_attention_fwd_kernel"],
        "dynamic_quantize": ["_dynamic_quantize_search_kernel", "_dynamic_quantize_emit_kernel"] * 2,
        "code_statistics": ["_code_statistics_kernel"],
        "c2f_decode_attention": ["_c2f_decode_attention_fwd_kernel", "_c2f_decode_attention_combine_kernel"],
    }


def test_cpu_calls_stay_one_opaque_node():
    if not HAS_TRITON:
        pytest.skip("needs triton installed")
    graphs = _trace("cpu")["graphs"]
    for op, graph in graphs.items():
        assert graph["kernels"] == [], op
        assert f"dqfast.{op}.default" in graph["ops"], graph


# ----------------------------------------------------------------------------------------------
# GPU: torch.compile(fullgraph=True) with inductor
# ----------------------------------------------------------------------------------------------


class _Decoder(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.spc = nn.Parameter(torch.randn(c * 4, c, 3, 3) * 0.1)
        self.spc_bias = nn.Parameter(torch.randn(c * 4) * 0.1)
        self.up = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.codebook = nn.Parameter(torch.randn(64, c))

    def forward(self, x):
        h = dqfast.subpixel_conv2d(x, self.spc, self.spc_bias, upscale=2, activation="gelu")
        h = dqfast.upsample_conv2d(h, self.up, None, padding_mode="replicate")
        vq = dqfast.vector_quantize(h.permute(0, 2, 3, 1), self.codebook)
        return vq.quantized, vq.indices


@needs_gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_inductor_compiles_the_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(12)
    model = _Decoder().cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), dqfast.use_backend("triton"):
        eager_q, eager_i = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        (q, i), codes = run_and_get_code(compiled, x)
        torch.testing.assert_close(q, eager_q, atol=1e-4, rtol=1e-4)
        assert torch.equal(i, eager_i)
        go = torch.randn_like(q)
        params = [x, model.spc, model.spc_bias, model.up]
        eager_grads = torch.autograd.grad(eager_q, params, go)
        grads = torch.autograd.grad(q, params, go)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-3)
    code = "\n".join(codes)
    for kernel in ("_subpixel_conv2d_fwd_kernel", "_subpixel_conv2d_folded_fwd_kernel", "_vector_quantize_fwd_kernel"):
        assert kernel in code, kernel
    # the kernels are in the graph, not behind the opaque custom ops
    assert "torch.ops.dqfast.subpixel_conv2d.default" not in code
    assert "torch.ops.dqfast.vector_quantize.default" not in code


@needs_gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_inductor_compiles_the_attention_kernels():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(13)
    q, k, v = (torch.randn(2, 4, 40, 64, device="cuda", requires_grad=True) for _ in range(3))
    lengths = torch.tensor([[8, 20], [5, 0]], device="cuda")

    def attend(q, k, v, lengths):
        return dqfast.c2f_attention(q, k, v, dqfast.C2FLayout((10, 30), lengths, "causal"))

    torch._dynamo.reset()
    with dqfast.use_backend("triton"):
        expected = attend(q, k, v, lengths)
        out, codes = run_and_get_code(torch.compile(attend, fullgraph=True, backend="inductor"), q, k, v, lengths)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        go = torch.randn_like(out)
        for g, e in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(expected, (q, k, v), go)):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    code = "\n".join(codes)
    assert "_c2f_attention_fwd_kernel" in code
    assert "torch.ops.dqfast.c2f_attention.default" not in code


@needs_gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_inductor_compiles_the_quantizer_and_decode_kernels():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(14)
    D, K = 32, 256
    features = [torch.randn(2, D, 8 * 2**g, 8 * 2**g, device="cuda", requires_grad=True) for g in range(2)]
    codebook = torch.randn(K, D, device="cuda", requires_grad=True)
    gate = torch.nn.functional.one_hot(torch.randn(2, 8, 8, 2, device="cuda").argmax(-1), 2).float()
    gate.requires_grad_()
    params = [*features, codebook, gate]

    def quantize(f0, f1, codebook, gate):
        out = dqfast.dynamic_quantize([f0, f1], codebook, gate=gate)
        counts, sums = dqfast.code_statistics(f1.permute(0, 2, 3, 1).reshape(-1, D), out.indices.reshape(-1), K)
        return out.quantized, out.indices, out.loss, counts, sums

    torch._dynamo.reset()
    with dqfast.use_backend("triton"):
        expected = quantize(*params)
        out, codes = run_and_get_code(torch.compile(quantize, fullgraph=True, backend="inductor"), *params)
        torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1], expected[1])
        torch.testing.assert_close(out[2], expected[2], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[3], expected[3])
        torch.testing.assert_close(out[4], expected[4], atol=1e-4, rtol=1e-4)
        go = torch.randn_like(out[0])
        eager_grads = torch.autograd.grad((expected[0] * go).sum() + 3.0 * expected[2], params)
        grads, bwd_codes = run_and_get_code(lambda: torch.autograd.grad((out[0] * go).sum() + 3.0 * out[2], params))
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    code = "\n".join(codes + bwd_codes)
    for kernel in (
        "_dynamic_quantize_search_kernel",
        "_dynamic_quantize_emit_kernel",
        "_dynamic_quantize_bwd_kernel",
        "_code_statistics_kernel",
    ):
        assert kernel in code, kernel
    for op in ("dynamic_quantize", "dynamic_quantize_backward", "code_statistics"):
        assert f"torch.ops.dqfast.{op}.default" not in code, op

    q = torch.randn(2, 4, 3, 64, device="cuda")
    k_cache, v_cache = (torch.randn(2, 4, 300, 64, device="cuda") for _ in range(2))
    key_valid = torch.rand(2, 300, device="cuda") > 0.2

    def decode(q, k_cache, v_cache, key_valid):
        return dqfast.c2f_decode_attention(q, k_cache, v_cache, key_valid)

    torch._dynamo.reset()
    with dqfast.use_backend("triton"), torch.no_grad():
        expected = decode(q, k_cache, v_cache, key_valid)
        out, codes = run_and_get_code(
            torch.compile(decode, fullgraph=True, backend="inductor"), q, k_cache, v_cache, key_valid
        )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    code = "\n".join(codes)
    assert "_c2f_decode_attention_fwd_kernel" in code and "_c2f_decode_attention_combine_kernel" in code
    assert "torch.ops.dqfast.c2f_decode_attention.default" not in code
