"""``dqfast.patch`` on real vector-quantize-pytorch ``VectorQuantize`` modules: the codebook search runs
through ``dqfast.vector_quantize`` while outputs, losses, gradients and the EMA / dead-code / k-means
state evolve exactly as in the library, in training and eval, euclidean and cosine."""

from __future__ import annotations

import copy

import pytest
import torch

import dqfast
from dqfast.patch import patch, unpatch
from tests.helpers import FP32_TOL, seed

vqp = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch is installed by `make test` (extra 'integrations')"
)

DIM, CODES = 12, 37

CONFIGS = {
    "euclidean": dict(),
    "cosine": dict(use_cosine_sim=True),
    "euclidean_ste": dict(rotation_trick=False),
    "cosine_dead_codes": dict(use_cosine_sim=True, threshold_ema_dead_code=2),
    "kmeans_init": dict(kmeans_init=True, kmeans_iters=2),
    "learnable": dict(learnable_codebook=True, ema_update=False, rotation_trick=False),
    "heads": dict(heads=2, separate_codebook_per_head=True, codebook_dim=5),
    "shared_heads": dict(heads=3, codebook_dim=4),
    "affine": dict(affine_param=True),
}


@pytest.fixture
def search_calls(monkeypatch):
    calls = []
    original = dqfast.vector_quantize

    def counted(z, codebook, **kwargs):
        calls.append((tuple(z.shape), tuple(codebook.shape), kwargs.get("metric", "l2")))
        return original(z, codebook, **kwargs)

    monkeypatch.setattr(dqfast, "vector_quantize", counted)
    return calls


def _pair(**options):
    seed(0)
    vq = vqp.VectorQuantize(dim=DIM, codebook_size=CODES, decay=0.8, **options)
    return vq, copy.deepcopy(vq)


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _run(module, x, rng_seed, **kwargs):
    torch.manual_seed(rng_seed)  # dead-code replacement and k-means sample at random
    return module(x, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_and_eval_match_the_library(name, search_calls):
    vq, reference = _pair(**CONFIGS[name])
    keys = list(vq.state_dict())
    report = patch(vq)
    assert report.names == [""] and report.skipped == []
    assert list(vq.state_dict()) == keys

    heads = vq.heads if vq.separate_codebook_per_head else 1
    metric = "cosine" if vq.use_cosine_sim else "l2"
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, 20:] = False
    for step in range(2):  # two training steps: the EMA state must evolve identically
        x = torch.randn(2, 25, DIM, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        kwargs = dict(mask=mask) if step == 1 and vq.heads == 1 else {}
        calls = len(search_calls)
        quantized, indices, loss = _run(vq, x, step, **kwargs)
        assert len(search_calls) == calls + heads, "the search must run through dqfast.vector_quantize"
        assert all(call[2] == metric for call in search_calls)
        e_quantized, e_indices, e_loss = _run(reference, x_ref, step, **kwargs)
        assert torch.equal(indices, e_indices)
        torch.testing.assert_close(quantized, e_quantized, **FP32_TOL)
        torch.testing.assert_close(loss, e_loss, **FP32_TOL)
        g = torch.randn_like(quantized)
        ((quantized * g).sum() + loss).backward()
        ((e_quantized * g).sum() + e_loss).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **FP32_TOL)
        for (pname, p), (_, p_ref) in zip(vq.named_parameters(), reference.named_parameters()):
            assert (p.grad is None) == (p_ref.grad is None), pname
            if p.grad is not None:
                torch.testing.assert_close(p.grad, p_ref.grad, **FP32_TOL, msg=lambda m, n=pname: f"{n}: {m}")
        state, e_state = _state(vq), _state(reference)
        for key in e_state:
            torch.testing.assert_close(state[key], e_state[key], **FP32_TOL, msg=lambda m, k=key: f"{k}: {m}")

    vq.eval()
    reference.eval()
    x = torch.randn(3, 7, DIM)
    quantized, indices, loss = vq(x)
    e_quantized, e_indices, e_loss = reference(x)
    assert torch.equal(indices, e_indices)
    torch.testing.assert_close(quantized, e_quantized, **FP32_TOL)
    torch.testing.assert_close(loss, e_loss, **FP32_TOL)


def test_image_feature_maps_and_residual_vq(search_calls):
    seed(1)
    fmap = vqp.VectorQuantize(dim=6, codebook_size=16, accept_image_fmap=True)
    rvq = vqp.ResidualVQ(dim=6, num_quantizers=3, codebook_size=16)
    model = torch.nn.ModuleDict({"fmap": fmap, "rvq": rvq})
    reference = copy.deepcopy(model)
    report = patch(model)
    assert report.names == ["fmap", "rvq.layers.0", "rvq.layers.1", "rvq.layers.2"]
    for name, x in (("fmap", torch.randn(2, 6, 5, 3)), ("rvq", torch.randn(2, 11, 6))):
        calls = len(search_calls)
        out, indices, losses = _run(model[name], x, 0)
        assert len(search_calls) == calls + (3 if name == "rvq" else 1)
        e_out, e_indices, e_losses = _run(reference[name], x, 0)
        assert torch.equal(indices, e_indices)
        torch.testing.assert_close(out, e_out, **FP32_TOL)
        torch.testing.assert_close(losses, e_losses, **FP32_TOL)


def test_call_time_fallbacks_run_the_library_search(search_calls):
    vq, reference = _pair(use_cosine_sim=True)
    vq.eval()
    reference.eval()
    patch(vq)
    x = torch.randn(2, 9, DIM)

    out, e_out = vq(x, topk=3), reference(x, topk=3)
    assert search_calls == [] and torch.equal(out[1], e_out[1])

    codes = torch.randint(0, CODES, (2, 9))
    vq.train()
    reference.train()
    torch.testing.assert_close(vq(x, indices=codes)[1], reference(x, indices=codes)[1], **FP32_TOL)
    assert search_calls == [], "indices= asks for a cross-entropy over all distances"
    vq.eval()
    reference.eval()

    # A hand-set cosine codebook whose codes have different norms: the library ranks by the dot
    # product with the stored codes, which is not the cosine ranking; the original search serves it.
    with torch.no_grad():
        scale = torch.linspace(0.5, 2.0, CODES)[:, None]
        vq.codebook = vq.codebook * scale
        reference.codebook = reference.codebook * scale
    out, e_out = vq(x), reference(x)
    assert search_calls == [] and torch.equal(out[1], e_out[1])
    torch.testing.assert_close(out[0], e_out[0], **FP32_TOL)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (dict(stochastic_sample_codes=True), "stochastic_sample_codes"),
        (dict(straight_through=True, rotation_trick=False), "straight_through"),
        (dict(codebook_diversity_loss_weight=0.1), "codebook_diversity_loss_weight"),
        (dict(commitment_use_cross_entropy_loss=True), "commitment_use_cross_entropy_loss"),
    ],
)
def test_variants_that_need_the_distance_matrix_are_left_alone(options, reason):
    vq, _ = _pair(**options)
    codebook_class = type(vq._codebook)
    report = patch(vq)
    assert report.names == [] and len(report.skipped) == 1
    assert reason in report.skipped[0].detail and report.skipped[0].kind == "vector-quantize-pytorch VectorQuantize"
    assert type(vq) is vqp.VectorQuantize and type(vq._codebook) is codebook_class


def test_rotation_trick_is_kept_and_reported():
    vq, _ = _pair()
    assert vq.rotation_trick, "the library's default for dim > 1"
    report = patch(vq, inplace=False)
    assert "rotation_trick kept" in report.patched[0].detail
    assert type(vq) is vqp.VectorQuantize, "inplace=False must not modify the module"


def test_checkpoints_idempotence_and_unpatch(search_calls):
    vq, reference = _pair(use_cosine_sim=True)
    patch(vq)
    assert patch(vq).already == ["", "_codebook"]
    x = torch.randn(2, 6, DIM)
    _run(vq, x, 0)  # one training step changes the EMA buffers
    _run(reference, x, 0)
    assert len(search_calls) == 1

    fresh = copy.deepcopy(reference)
    fresh.load_state_dict(vq.state_dict(), strict=True)  # patched checkpoint -> library module
    other, _ = _pair(use_cosine_sim=True)
    patch(other)
    other.load_state_dict(reference.state_dict(), strict=True)  # library checkpoint -> patched module
    for module in (vq, fresh, other, reference):
        module.eval()
    y = torch.randn(4, 5, DIM)
    expected = reference(y)
    for module in (vq, fresh, other):
        got = module(y)
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0], **FP32_TOL)

    assert unpatch(vq) == ["", "_codebook"]
    assert type(vq) is vqp.VectorQuantize and type(vq._codebook) is vqp.vector_quantize_pytorch.Codebook
    assert "_dqfast_search" not in vq._codebook.__dict__
    calls = len(search_calls)
    assert torch.equal(vq(y)[1], expected[1]) and len(search_calls) == calls
