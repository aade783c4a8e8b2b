"""``dqfast.patch.patch``: fused sub-pixel modules replace conv + shuffle and upsample + conv, nothing else."""

from __future__ import annotations

import copy
import importlib.abc
import sys

import pytest
import torch
from torch import nn

import dqfast
from dqfast.nn import SubPixelConv2d
from dqfast.patch import patch, unpatch
from tests.helpers import FP32_TOL, seed


class ForwardWired(nn.Module):
    """A conv + shuffle pair wired by ``forward``, not a Sequential: must be left alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def _model() -> nn.Sequential:
    seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: a plain conv
        nn.Conv2d(8, 16, 3, padding=1),  # 1: (a) with the activation between conv and shuffle
        nn.LeakyReLU(0.2),
        nn.PixelShuffle(2),
        nn.Sequential(  # 4: nested
            nn.Upsample(scale_factor=2, mode="nearest"),  # 4.0-4.1: (b), zero padding
            nn.Conv2d(4, 6, 3, padding=1),
            nn.Sequential(  # 4.2: doubly nested, (a) with the activation after the shuffle, 5x5 reflect
                nn.Conv2d(6, 12, 5, padding=2, padding_mode="reflect"),
                nn.PixelShuffle(2),
                nn.SiLU(),
            ),
        ),
        nn.Conv2d(3, 12, 3, stride=2, padding=1),  # 5-6: stride 2, left alone
        nn.PixelShuffle(2),
        nn.Upsample(scale_factor=2),  # 7-8: reflect padding does not fold, left alone
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 16, 3, padding=1),  # 9-11: tanh-GELU is not a fusable activation, left alone
        nn.GELU(approximate="tanh"),
        nn.PixelShuffle(2),
        nn.AvgPool2d(8),  # 12: keeps the test images small
        nn.UpsamplingBilinear2d(scale_factor=2),  # 13-14: bilinear, left alone
        nn.Conv2d(4, 4, 3, padding=1),
        nn.UpsamplingNearest2d(scale_factor=2),  # 15-16: (b) with replicate padding
        nn.Conv2d(4, 3, 3, padding=1, padding_mode="replicate"),
        ForwardWired(),  # 17: not a Sequential, left alone
    )


REPLACED = ["1", "4.1", "4.2.0", "16"]
CONSUMED = ["2", "3", "4.0", "4.2.1", "4.2.2", "15"]
LEFT_ALONE = ["0", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "17", "17.conv", "17.shuffle"]


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def test_patch_replaces_the_patterns_and_keeps_outputs():
    model = _model().eval()
    original = copy.deepcopy(model)
    before = {name: _get(model, name) for name in LEFT_ALONE}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    length = len(model)

    report = patch(model)

    assert report.names == REPLACED
    assert report.applied
    for name in REPLACED:
        module = _get(model, name)
        assert isinstance(module, SubPixelConv2d), name
        assert not module.training, f"{name} must keep the eval mode of the conv it replaces"
    assert _get(model, "1").activation == "leaky_relu" and _get(model, "1").negative_slope == 0.2
    assert _get(model, "4.2.0").activation == "silu" and _get(model, "4.2.0").padding_mode == "reflect"
    assert _get(model, "4.1").folded_from == (3, 2) and _get(model, "16").padding_mode == "replicate"
    for name in CONSUMED:
        assert isinstance(_get(model, name), nn.Identity), name
    for name, module in before.items():
        assert _get(model, name) is module, f"{name} must be left alone"
    assert len(model) == length

    # Parameter names do not move; conv + shuffle keeps identical weights.
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for key in ("1.weight", "1.bias", "4.2.0.weight", "4.2.0.bias"):
        assert torch.equal(state_after[key], state_before[key])

    x = torch.randn(2, 3, 3, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with dqfast.use_backend("reference"):
        expected = original(x)
        got = model(x2)
        assert got.shape == expected.shape == (2, 4, 3 * 32, 5 * 32)
        torch.testing.assert_close(got, expected, **FP32_TOL)
        g = torch.randn_like(expected)
        expected.backward(g)
        got.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, **FP32_TOL)

    again = patch(model)
    assert again.names == [], "a patched model has nothing left to patch"
    assert again.already == REPLACED


def test_dry_run_changes_nothing():
    model = _model()
    modules = dict(model.named_modules())
    report = patch(model, inplace=False)
    assert report.names == REPLACED and not report.applied
    assert dict(model.named_modules()) == modules


def test_root_sequential_names_and_non_module_input():
    seq = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.PixelShuffle(2))
    wrapper = nn.ModuleDict({"up": seq})
    assert patch(wrapper).names == ["up.0"]
    assert patch(nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.PixelShuffle(2))).names == ["0"]
    # The shuffle factor must divide the conv's channels; here 6 is not a multiple of 4.
    report = patch(nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.PixelShuffle(2)))
    assert report.names == []
    assert [(e.name, e.kind) for e in report.skipped] == [("0", "nn.Sequential Conv2d + PixelShuffle")]
    assert "multiple of upscale**2" in report.skipped[0].detail
    with pytest.raises(TypeError, match="nn.Module"):
        patch(lambda x: x)
    with pytest.raises(TypeError, match="nn.Module"):
        unpatch("model")
    with pytest.raises(TypeError, match="inplace must be a bool"):
        patch(nn.Sequential(), inplace="yes")


def test_skipped_pairs_are_reported_with_the_reason():
    report = patch(_model(), inplace=False)
    skipped = {entry.name: entry.detail for entry in report.skipped}
    assert set(skipped) == {"5", "8", "14"}
    assert "stride 1" in skipped["5"]
    assert "reflect" in skipped["8"]
    assert "only nearest" in skipped["14"]
    text = str(report)
    assert "would patch 4, skipped 3" in text and "4.2.0" in text


def test_unpatch_restores_the_original_modules_with_trained_weights():
    model = _model().train()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    patch(model)
    with torch.no_grad():  # stands in for training done while patched
        for p in model.parameters():
            p.add_(0.125)
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    assert unpatch(model) == REPLACED
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert list(model.state_dict()) == keys
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    assert all(m.training for m in model.modules())
    assert unpatch(model) == [], "nothing left to restore"

    # Back to the original modules: the same function as the original with the shifted weights.
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.125)
    x = torch.randn(1, 3, 3, 5)
    with dqfast.use_backend("reference"):
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


INTEGRATION_LIBRARIES = ("diffusers", "vector_quantize_pytorch", "taming")


class _BlockImports(importlib.abc.MetaPathFinder):
    """Fails any import of an integration library (stands in for a machine without them)."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in INTEGRATION_LIBRARIES:
            raise AssertionError(f"dqfast imported {name}")
        return None


def test_patch_never_imports_an_integration_library(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in INTEGRATION_LIBRARIES:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockImports(), *sys.meta_path])
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3, padding=1))
    assert patch(model, inplace=False).names == ["1"]
    assert patch(model).names == ["1"]
    assert unpatch(model) == ["1"]
    assert not [name for name in sys.modules if name.split(".")[0] in INTEGRATION_LIBRARIES]
