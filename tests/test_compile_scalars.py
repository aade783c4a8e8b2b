"""Python-number arguments of the public ops under ``torch.compile(dynamic=True, fullgraph=True)``.

With ``dynamic=True`` Dynamo traces a float argument of the compiled function, a float attribute of
a module and even a keyword default of a function it inlines (``dynamic_quantize``'s
``beta=0.25``) as a symbolic float, on which ``math.isfinite`` cannot be traced. The ops check
such numbers with comparisons only, which trace (as guards) and still refuse NaN, inf and
out-of-range values eagerly. Each compiled function here takes the numbers as arguments, is
called with two values and must equal eager.

Passing a traced float to an operator (a dqfast custom op's ``float`` argument, or an ATen one such
as ``leaky_relu``'s slope) makes Dynamo specialize it: a new value recompiles rather than reusing
the graph. That is torch's behaviour, so the tests do not count graphs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import dqfast
from dqfast import ops
from dqfast.nn import DynamicQuantizer
from tests.helpers import plain_and_single_rank

# Dynamo and AOTAutograd (fake implementations, registered autograd) without code generation;
# one test compiles with inductor.
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, backend=BACKEND):
    return torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)


def _dq_inputs(seed=0, G=2, B=2, D=4, H=2, W=3):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, D, H * 2**i, W * 2**i, generator=g) for i in range(G)]
    return feats, torch.randn(8, D, generator=g), torch.randn(B, H, W, G, generator=g)


def _assert_dq_equal(out, ref):
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# dynamic_quantize: beta (and budget) as traced numbers
# ----------------------------------------------------------------------------------------------


def test_dynamic_quantize_beta_argument_inductor():
    feats, codebook, logits = _dq_inputs()

    def fn(feats, codebook, logits, beta):
        return ops.dynamic_quantize(feats, codebook, router_logits=logits, beta=beta)

    compiled = _compile(fn, "inductor")
    for beta in (0.3, 0.7):
        _assert_dq_equal(compiled(feats, codebook, logits, beta), fn(feats, codebook, logits, beta))


def test_dynamic_quantize_beta_gradients_match_eager():
    feats, codebook, logits = _dq_inputs(1)

    def fn(feats, codebook, logits, beta):
        out = ops.dynamic_quantize(feats, codebook, router_logits=logits, beta=beta)
        return out.loss + out.quantized.square().mean()

    compiled = _compile(fn)
    for beta in (0.25, 1.5):
        grads = []
        for f in (compiled, fn):
            leaves = [t.clone().requires_grad_() for t in (*feats, codebook)]
            f(leaves[:-1], leaves[-1], logits, beta).backward()
            grads.append([t.grad for t in leaves])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dynamic_quantize_default_beta_and_int_beta():
    # the keyword default beta=0.25 is traced symbolically too
    feats, codebook, logits = _dq_inputs(2)
    compiled = _compile(lambda f, c, l: ops.dynamic_quantize(f, c, router_logits=l))
    _assert_dq_equal(compiled(feats, codebook, logits), ops.dynamic_quantize(feats, codebook, router_logits=logits))
    compiled = _compile(lambda f, c, l, b: ops.dynamic_quantize(f, c, router_logits=l, beta=b))
    _assert_dq_equal(
        compiled(feats, codebook, logits, 1), ops.dynamic_quantize(feats, codebook, router_logits=logits, beta=1)
    )


@pytest.mark.parametrize("G, budget", [(2, 0.5), (3, (0.25, 0.375))])
def test_budget_arguments(G, budget):
    feats, codebook, logits = _dq_inputs(3, G=G, H=2, W=4)

    def fn(feats, codebook, logits, budget, beta):
        out = ops.dynamic_quantize(feats, codebook, router_logits=logits, budget=budget, beta=beta)
        return out, ops.grain_from_budget(logits, budget)

    compiled = _compile(fn)
    out, grain = compiled(feats, codebook, logits, budget, 0.5)
    ref, ref_grain = fn(feats, codebook, logits, budget, 0.5)
    _assert_dq_equal(out, ref)
    torch.testing.assert_close(grain, ref_grain)
    torch.testing.assert_close(out.grain, grain)


def test_dynamic_quantizer_module_beta_attribute():
    torch.manual_seed(4)
    feats, *_ = _dq_inputs(4)
    quantizer = DynamicQuantizer(4, 8, 2, beta=0.4, restart_dead=False).eval()
    compiled = _compile(quantizer)
    for a, b in zip(compiled(feats), quantizer(feats)):
        torch.testing.assert_close(a, b)
    # training: the hard Gumbel gate path (random, so compare with the same seed)
    quantizer.train()
    torch.manual_seed(5)
    out = compiled(feats)
    torch.manual_seed(5)
    for a, b in zip(out, quantizer(feats)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("router", ["learned", "entropy"])
def test_dqvae_tiny_encode_with_budget_argument(router):
    from dqfast.models import create

    torch.manual_seed(8)
    model = create("dqvae-tiny", **({} if router == "learned" else {"router": "entropy"})).eval()
    x = torch.rand(2, 3, 32, 32)
    compiled = _compile(lambda x, budget: model.encode(x, budget=budget))
    for budget in (0.5, 0.25):
        out, ref = compiled(x, budget), model.encode(x, budget=budget)
        for name in ("indices", "grain", "n_codes"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name))
        assert int(out.grain[0].sum()) == round(budget * out.grain[0].numel())


# ----------------------------------------------------------------------------------------------
# the other number arguments: negative_slope, attention scale
# ----------------------------------------------------------------------------------------------


def test_conv_negative_slope_arguments():
    g = torch.Generator().manual_seed(6)
    x, w, b, w2 = (torch.randn(*s, generator=g) for s in ((1, 3, 5, 4), (8, 3, 3, 3), (8,), (4, 3, 3, 3)))

    def fn(x, w, b, w2, slope):
        return (
            ops.subpixel_conv2d(x, w, b, upscale=2, activation="leaky_relu", negative_slope=slope),
            ops.upsample_conv2d(x, w2, activation="leaky_relu", negative_slope=slope),
        )

    compiled = _compile(fn)
    for slope in (0.2, 0.05):
        for a, r in zip(compiled(x, w, b, w2, slope), fn(x, w, b, w2, slope)):
            torch.testing.assert_close(a, r)


def test_attention_scale_arguments():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    layout = dqfast.C2FLayout([1, 4], torch.tensor([[1, 3], [1, 4]]), "causal")
    key_valid = torch.tensor([[True, True, False, True, True], [True] * 5])

    def fn(q, k, v, key_valid, scale):
        return (
            ops.c2f_attention(q, k, v, layout, scale=scale),
            ops.c2f_decode_attention(q[:, :, -1:], k, v, key_valid, scale=scale),
        )

    compiled = _compile(fn)
    for scale in (0.3, 0.125):
        for a, r in zip(compiled(q, k, v, key_valid, scale), fn(q, k, v, key_valid, scale)):
            torch.testing.assert_close(a, r)


# ----------------------------------------------------------------------------------------------
# eager calls still refuse bad numbers (and a compiled call that falls back to eager does too)
# ----------------------------------------------------------------------------------------------

BAD_NONNEGATIVE = [-1.0, -1e-30, math.nan, math.inf, -math.inf, True, "0.25", None]
BAD_POSITIVE = [0.0, -0.5, math.nan, math.inf, -math.inf, False, "1"]


@pytest.mark.parametrize("beta", BAD_NONNEGATIVE)
def test_eager_dynamic_quantize_refuses_bad_beta(beta):
    feats, codebook, logits = _dq_inputs()
    with pytest.raises(ValueError, match="beta must be a non-negative finite number"):
        ops.dynamic_quantize(feats, codebook, router_logits=logits, beta=beta)


@pytest.mark.parametrize("beta", [0, 0.0, -0.0, 2])
def test_eager_dynamic_quantize_accepts_edge_betas(beta):
    feats, codebook, logits = _dq_inputs()
    ops.dynamic_quantize(feats, codebook, router_logits=logits, beta=beta)


@pytest.mark.parametrize("scale", BAD_POSITIVE)
def test_eager_attention_refuses_bad_scale(scale):
    q = torch.randn(1, 1, 5, 4)
    layout = dqfast.C2FLayout([1, 4], torch.tensor([[1, 4]]), "block")
    with pytest.raises(ValueError, match="scale must be a positive finite number or None"):
        ops.c2f_attention(q, q, q, layout, scale=scale)
    with pytest.raises(ValueError, match="scale must be a positive finite number or None"):
        ops.c2f_decode_attention(q, q, q, torch.ones(1, 5, dtype=torch.bool), scale=scale)


@pytest.mark.parametrize("slope", [True, "0.1", None])
def test_eager_convs_refuse_non_number_negative_slope(slope):
    x, w = torch.randn(1, 3, 4, 4), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        ops.subpixel_conv2d(x, w, upscale=2, negative_slope=slope)
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        ops.upsample_conv2d(x, w, negative_slope=slope)


def test_compiled_call_with_bad_beta_still_raises():
    # A bad value fails the graph's guard on beta; retracing reaches the check. Without fullgraph
    # the frame falls back to eager, which raises the ValueError itself.
    feats, codebook, logits = _dq_inputs()
    compiled = torch.compile(
        lambda f, c, l, b: ops.dynamic_quantize(f, c, router_logits=l, beta=b).loss, backend=BACKEND, dynamic=True
    )
    compiled(feats, codebook, logits, 0.5)
    for beta in (-1.0, math.nan):
        with pytest.raises(ValueError, match="beta must be a non-negative finite number"):
            compiled(feats, codebook, logits, beta)


# ----------------------------------------------------------------------------------------------
# DynamicQuantizer training with the EMA codebook and dead-code restart under fullgraph compile:
# the update runs over every cell with static shapes (see DynamicQuantizer._update_codebook)
# ----------------------------------------------------------------------------------------------


def _train_feats(seed, G, B=2, D=4, H=2, W=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, H * 2**i, W * 2**i, generator=g) for i in range(G)]


def _buffers(quantizer):
    names = ("usage", "code_sum", "codebook") if quantizer.ema else ("usage", "codebook")
    return {name: getattr(quantizer, name).detach().clone() for name in names}


@pytest.mark.parametrize(
    "G, metric, dynamic, backend",
    [(2, "l2", False, BACKEND), (3, "cosine", True, BACKEND), (2, "l2", False, "inductor")],
)
def test_dynamic_quantizer_ema_training_step_matches_eager(G, metric, dynamic, backend):
    import torch._inductor.config

    # inductor draws its own random numbers unless told to use torch's (the Gumbel gate must match)
    with torch._inductor.config.patch(fallback_random=True):
        _ema_training_steps(G, metric, dynamic, backend)


def _ema_training_steps(G, metric, dynamic, backend):
    torch.manual_seed(9)
    eager = DynamicQuantizer(
        4, 8, G, metric=metric, ema=True, restart_dead=False, budget_target=(0.5 / (G - 1),) * (G - 1)
    ).train()
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)
    for step in range(2):
        feats = _train_feats(10 + step, G)
        results = []
        for fn in (compiled, eager):
            leaves = [f.clone().requires_grad_() for f in feats]
            torch.manual_seed(20 + step)  # the same Gumbel gate
            out = fn(leaves)
            (out.loss + out.budget_loss + out.quantized.square().mean()).backward()
            results.append((out, [f.grad for f in leaves]))
        (out, grads), (ref, ref_grads) = results
        _assert_dq_equal(out, ref)
        # the backward reads the codebook of the forward, not the updated buffer
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name, value in _buffers(eager).items():
            torch.testing.assert_close(getattr(module, name), value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(eager.usage, torch.ones_like(eager.usage))


@pytest.mark.parametrize("ema, dynamic, backend", [(False, False, "inductor"), (True, True, BACKEND)])
def test_dynamic_quantizer_restart_under_fullgraph(ema, dynamic, backend):
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        _restart_step(ema, dynamic, backend)


def _restart_step(ema, dynamic, backend):
    torch.manual_seed(11)
    # 64 codes for 2 * 6 regions: most codes go unused in the step, so they are dead (usage 0.99 < 1).
    eager = DynamicQuantizer(4, 64, 2, ema=ema, restart_dead=True).train()
    module = copy.deepcopy(eager)
    before = _buffers(module)
    feats = _train_feats(12, 2)
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)
    results = []
    for fn, quantizer in ((compiled, module), (eager, eager)):
        leaves = [f.clone().requires_grad_() for f in feats]
        torch.manual_seed(13)
        result = fn(leaves)
        (result.loss + result.quantized.square().mean()).backward()
        grads = [f.grad for f in leaves] + ([] if ema else [quantizer.codebook.grad])
        results.append((result, grads))
    (out, grads), (ref, ref_grads) = results
    _assert_dq_equal(out, ref)
    # the backward reads the codebook of the forward, not the restarted one
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    used = torch.zeros(64, dtype=torch.bool)
    used[out.indices.unique()] = True
    assert 0 < used.sum() < 64
    vectors, _ = eager._coded_vectors(feats, out.indices, out.grain)
    restarted = module.codebook.detach()[~used]
    # each restarted code is one of the step's coded vectors
    assert (restarted[:, None] == vectors[None]).all(-1).any(1).all()
    torch.testing.assert_close(module.usage[~used], torch.full((int((~used).sum()),), 1.0))
    if ema:
        torch.testing.assert_close(module.code_sum[~used], restarted)  # candidate * dead_threshold (1)
        # live codes: the EMA update, as eagerly
        for name, value in _buffers(eager).items():
            torch.testing.assert_close(getattr(module, name)[used], value[used], rtol=1e-5, atol=1e-6, msg=name)
    else:
        torch.testing.assert_close(module.codebook.detach()[used], before["codebook"][used], rtol=0, atol=0)
        torch.testing.assert_close(module.usage[used], eager.usage[used])


def test_dqvae_tiny_training_step_under_fullgraph():
    from dqfast.models import create

    torch.manual_seed(14)
    eager = create("dqvae-tiny").train()
    assert eager.quantizer.ema and eager.quantizer.restart_dead
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(15)
    out = compiled(x)
    torch.manual_seed(15)
    ref = eager(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.quantizer.usage, eager.quantizer.usage)
    (out.quant_loss + out.budget_loss + out.reconstruction.square().mean()).backward()


def test_compiled_restart_without_coded_cell_keeps_codebook():
    # Not reachable from forward (every region is coded at one grain): no cell coded, nothing restarts.
    quantizer = DynamicQuantizer(4, 8, 2, restart_dead=True)
    quantizer.usage.fill_(0.5)
    before = quantizer.codebook.detach().clone()
    update = torch.compile(quantizer._update_codebook, backend=BACKEND, fullgraph=True)
    update(_train_feats(16, 2, B=1), torch.zeros(1, 4, 6, dtype=torch.long), torch.full((1, 2, 3), 2))
    torch.testing.assert_close(quantizer.codebook.detach(), before, rtol=0, atol=0)
    torch.testing.assert_close(quantizer.usage, torch.full((8,), 0.495))


def test_compiled_update_under_single_process_group(tmp_path):
    # The statistics are all-reduced and the restart picks broadcast (a functional collective under
    # compile); one gloo rank changes nothing, so the compiled step matches the plain compiled one.

    feats = _train_feats(17, 2)

    def run():
        torch._dynamo.reset()
        torch.manual_seed(18)
        quantizer = DynamicQuantizer(4, 16, 2, ema=True, restart_dead=True).train()
        out = torch.compile(quantizer, backend=BACKEND, fullgraph=True)(feats)
        return out.indices, quantizer.codebook.clone(), quantizer.usage.clone(), quantizer.code_sum.clone()

    plain, distributed = plain_and_single_rank(run, tmp_path)
    for a, b in zip(plain, distributed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
