"""``dqfast.patch`` on real diffusers modules: every ``Upsample2D`` of an AutoencoderKL decoder, the
Upsample2D variants (patched or reported), and the VQ-VAE ``VectorQuantizer``; outputs, gradients,
checkpoints both ways, idempotence, dry run, unpatch, pickling."""

from __future__ import annotations

import copy
import io
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dqfast
from dqfast.patch import patch, unpatch
from tests.helpers import FP32_TOL, assert_three_way, seed

diffusers = pytest.importorskip("diffusers", reason="diffusers is installed by `make test` (extra 'integrations')")
from diffusers.models.autoencoders.vae import VectorQuantizer  # noqa: E402
from diffusers.models.upsampling import FirUpsample2D, Upsample2D  # noqa: E402

# diffusers' default block layout for the Stable Diffusion VAE (four blocks, two resnets per block),
# with tiny channels so the CPU test stays fast.
SD_LAYOUT = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    block_out_channels=(8, 16, 16, 16),
    norm_num_groups=4,
    latent_channels=4,
    sample_size=32,
)


@pytest.fixture
def count_calls(monkeypatch):
    """Counts calls of the public dqfast ops the patched modules must route through."""
    calls = {"upsample_conv2d": 0, "vector_quantize": 0}
    for name in calls:
        original = getattr(dqfast, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dqfast, name, counted)
    return calls


def _vae() -> diffusers.AutoencoderKL:
    seed(0)
    return diffusers.AutoencoderKL(**SD_LAYOUT)


def _assert_same_grads(model: nn.Module, reference: nn.Module, exact: nn.Module | None = None) -> None:
    """Parameter gradients of ``model`` equal ``reference``'s: to FP32_TOL, or, given the float64
    ``exact`` model, within the three-way bound (sums over many pixels round differently)."""
    got = dict(model.named_parameters())
    exact = dict(exact.named_parameters()) if exact is not None else {}
    for name, p in reference.named_parameters():
        if p.grad is None:
            assert got[name].grad is None, name
            continue
        if name in exact:
            assert_three_way(got[name].grad, p.grad, exact[name].grad, name)
        else:
            torch.testing.assert_close(got[name].grad, p.grad, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")


def _upsample2d_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Upsample2D)]


def test_autoencoderkl_decoder_every_upsample2d_is_patched_and_matches(count_calls):
    vae = _vae()
    reference = copy.deepcopy(vae)
    exact = copy.deepcopy(vae).double()
    keys = list(vae.state_dict())
    names = _upsample2d_names(vae)
    assert len(names) == 3, "the default layout upsamples after each of the first three up blocks"

    report = patch(vae)

    assert report.names == names and report.skipped == []
    assert all(entry.op == "upsample_conv2d" for entry in report.patched)
    assert all(isinstance(vae.get_submodule(n), Upsample2D) for n in names), "isinstance must still hold"
    assert "dqfast=upsample_conv2d" in repr(vae.get_submodule(names[0]))
    assert list(vae.state_dict()) == keys

    z = torch.randn(2, 4, 5, 6, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_()
    out = vae.decode(z).sample
    assert count_calls["upsample_conv2d"] == 3, "every Upsample2D must run dqfast.upsample_conv2d"
    expected = reference.decode(z_ref).sample
    assert out.shape == expected.shape == (2, 3, 40, 48)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    z_exact = z.detach().double().requires_grad_()
    exact.decode(z_exact).sample.backward(g.double())
    torch.testing.assert_close(z.grad, z_ref.grad, **FP32_TOL)
    assert_three_way(z.grad, z_ref.grad, z_exact.grad, "z")
    _assert_same_grads(vae, reference, exact)


def test_checkpoints_load_both_ways():
    original = _vae().eval()
    patched = _vae().eval()
    with torch.no_grad():  # different weights than `original`, so loading must change the outputs
        for p in patched.parameters():
            p.mul_(0.5)
    patch(patched)
    z = torch.randn(1, 4, 3, 5)

    # original checkpoint -> patched model
    patched.load_state_dict(original.state_dict(), strict=True)
    torch.testing.assert_close(patched.decode(z).sample, original.decode(z).sample, **FP32_TOL)

    # patched checkpoint -> original model
    with torch.no_grad():
        for p in patched.parameters():
            p.add_(0.01)
    fresh = _vae().eval()
    fresh.load_state_dict(patched.state_dict(), strict=True)
    torch.testing.assert_close(fresh.decode(z).sample, patched.decode(z).sample, **FP32_TOL)


def test_dry_run_idempotence_unpatch_and_pickle(count_calls):
    vae = _vae().eval()
    reference = copy.deepcopy(vae)
    classes = [type(m) for m in vae.modules()]
    z = torch.randn(1, 4, 4, 3)
    expected = reference.decode(z).sample

    dry = patch(vae, inplace=False)
    assert not dry.applied and dry.names == _upsample2d_names(vae)
    assert [type(m) for m in vae.modules()] == classes, "inplace=False must not modify the model"
    assert count_calls["upsample_conv2d"] == 0

    patch(vae)
    again = patch(vae)
    assert again.names == [] and again.already == dry.names
    torch.testing.assert_close(vae.decode(z).sample, expected, **FP32_TOL)
    assert count_calls["upsample_conv2d"] == 3, "patching twice must not stack the patch"

    buffer = io.BytesIO()
    torch.save(vae, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for model in (loaded, copy.deepcopy(vae)):
        assert patch(model).already == dry.names
        torch.testing.assert_close(model.decode(z).sample, expected, **FP32_TOL)

    assert unpatch(vae) == dry.names
    assert [type(m) for m in vae.modules()] == classes
    calls = count_calls["upsample_conv2d"]
    torch.testing.assert_close(vae.decode(z).sample, expected, **FP32_TOL)
    assert count_calls["upsample_conv2d"] == calls, "an unpatched model must not call dqfast"


def _variants() -> nn.ModuleDict:
    seed(1)
    return nn.ModuleDict(
        {
            "plain": Upsample2D(6, use_conv=True, out_channels=5),
            "op_name": Upsample2D(6, use_conv=True, name="op"),
            "norm": Upsample2D(6, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True),
            "rms_norm": Upsample2D(6, use_conv=True, norm_type="rms_norm", eps=1e-5, elementwise_affine=True),
            "kernel5": Upsample2D(6, use_conv=True, kernel_size=5, padding=2, bias=False),
            "transpose": Upsample2D(6, use_conv_transpose=True),
            "no_conv": Upsample2D(6, use_conv=False),
            "no_interpolate": Upsample2D(6, use_conv=True, interpolate=False),
            "even_kernel": Upsample2D(6, use_conv=True, kernel_size=4, padding=1),
            "valid_padding": Upsample2D(6, use_conv=True, padding=0),
            "fir": FirUpsample2D(6, out_channels=6, use_conv=True),
        }
    )


PATCHED_VARIANTS = ["plain", "op_name", "norm", "rms_norm", "kernel5"]
SKIPPED_VARIANTS = {
    "transpose": "use_conv_transpose",
    "no_conv": "use_conv=False",
    "no_interpolate": "interpolate=False",
    "even_kernel": "square odd kernel",
    "valid_padding": "'same' padding",
    "fir": "FIR",
}


def test_upsample2d_variants_patched_or_reported(count_calls):
    model = _variants()
    with torch.no_grad():  # non-trivial norm affine parameters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    skipped_before = {name: model[name] for name in SKIPPED_VARIANTS}
    replicate = model["plain"].conv
    replicate.padding_mode = "replicate"
    reference["plain"].conv.padding_mode = "replicate"

    report = patch(model)

    assert report.names == PATCHED_VARIANTS
    assert {entry.name: entry.detail for entry in report.skipped}.keys() == SKIPPED_VARIANTS.keys()
    for entry in report.skipped:
        assert SKIPPED_VARIANTS[entry.name] in entry.detail, (entry.name, entry.detail)
    for name, module in skipped_before.items():
        assert model[name] is module and type(module) is type(reference[name]), f"{name} must be left alone"

    for name in PATCHED_VARIANTS:
        x = torch.randn(2, 6, 3, 5, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        before = count_calls["upsample_conv2d"]
        out = model[name](x)
        assert count_calls["upsample_conv2d"] == before + 1, name
        expected = reference[name](x_ref)
        torch.testing.assert_close(out, expected, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **FP32_TOL)
        _assert_same_grads(model[name], reference[name])


def test_upsample2d_call_time_fallbacks(count_calls):
    seed(2)
    module = Upsample2D(4, use_conv=True)
    reference = copy.deepcopy(module)
    patch(module)
    x = torch.randn(1, 4, 3, 5)

    torch.testing.assert_close(module(x, output_size=(6, 10)), reference(x), **FP32_TOL)
    assert count_calls["upsample_conv2d"] == 1, "output_size equal to 2x the input is still the fold"

    odd = module(x, output_size=(7, 10))
    torch.testing.assert_close(odd, reference(x, output_size=(7, 10)), rtol=0, atol=0)
    assert odd.shape[-2:] == (7, 10) and count_calls["upsample_conv2d"] == 1

    with pytest.raises(ValueError, match="4 channels"):
        module(torch.randn(1, 3, 2, 2))

    seen = []
    module.conv.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)
    assert seen == [(1, 4, 6, 10)] and count_calls["upsample_conv2d"] == 1, "a hooked conv runs the original"


def _quantizer(**kwargs) -> VectorQuantizer:
    seed(3)
    quantizer = VectorQuantizer(n_e=23, vq_embed_dim=5, beta=0.25, **kwargs)
    with torch.no_grad():  # well-separated codes: exact index agreement is then the right check
        quantizer.embedding.weight.normal_()
    return quantizer


@pytest.mark.parametrize(
    "options",
    [dict(), dict(legacy=False), dict(sane_index_shape=True), dict(remap="used.npy", unknown_index="extra")],
    ids=["legacy", "fixed_beta", "sane_index_shape", "remap"],
)
def test_diffusers_vector_quantizer_matches(options, tmp_path, count_calls):
    if "remap" in options:
        np.save(tmp_path / "used.npy", np.arange(0, 23, 2))
        options = dict(options, remap=str(tmp_path / "used.npy"))
    quantizer = _quantizer(**options)
    reference = copy.deepcopy(quantizer)
    report = patch(quantizer)
    assert report.names == [""] and report.patched[0].kind == "diffusers VectorQuantizer"

    z = torch.randn(2, 5, 3, 4, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_()
    z_q, loss, (_, _, indices) = quantizer(z)
    assert count_calls["vector_quantize"] == 1
    e_q, e_loss, (_, _, e_indices) = reference(z_ref)
    assert torch.equal(indices, e_indices) and indices.shape == e_indices.shape
    torch.testing.assert_close(z_q, e_q, **FP32_TOL)
    torch.testing.assert_close(loss, e_loss, **FP32_TOL)
    w = torch.randn_like(z_q)
    ((z_q * w).sum() + loss).backward()
    ((e_q * w).sum() + e_loss).backward()
    torch.testing.assert_close(z.grad, z_ref.grad, **FP32_TOL)
    torch.testing.assert_close(quantizer.embedding.weight.grad, reference.embedding.weight.grad, **FP32_TOL)


def test_vqmodel_quantizer_and_decoder_are_patched(count_calls):
    seed(4)
    model = diffusers.VQModel(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=3,
        num_vq_embeddings=19,
        vq_embed_dim=3,
        sample_size=16,
    ).eval()
    reference = copy.deepcopy(model)
    report = patch(model)
    assert {entry.kind for entry in report.patched} == {"diffusers Upsample2D", "diffusers VectorQuantizer"}
    x = torch.randn(1, 3, 8, 12)
    with torch.no_grad():
        out = model(x).sample
        expected = reference(x).sample
    assert count_calls["vector_quantize"] == 1 and count_calls["upsample_conv2d"] >= 1
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_classes_are_recognised_only_while_diffusers_is_imported(monkeypatch):
    module = Upsample2D(4, use_conv=True)
    assert patch(module, inplace=False).names == [""]
    for name in list(sys.modules):
        if name.split(".")[0] == "diffusers":
            monkeypatch.delitem(sys.modules, name)
    report = patch(module)
    assert report.names == [] and report.skipped == []
    assert type(module) is Upsample2D


def test_patched_decoder_traces_without_graph_breaks():
    decoder = _vae().decoder.eval()
    patch(decoder)
    explanation = torch._dynamo.explain(decoder)(torch.randn(1, 4, 5, 6))
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
