"""``dqfast.patch`` on taming-transformers / latent-diffusion style decoders (VQGAN, LDM, DQ-VAE).

Two sources of the ``Upsample(in_channels, with_conv)`` class:
- the real ``taming.modules.diffusionmodules.model`` (taming-transformers 0.0.1 from PyPI,
  installed by `make test` without its training dependencies);
- a transcription below with the same structure and behaviour (attribute names ``with_conv`` /
  ``conv``, nearest x2 then a 3x3 "same" conv), standing in for the many vendored copies (LDM,
  DQ-VAE) that are not installable packages.
Look-alike classes with other behaviour must be left alone and reported.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dqfast
from dqfast.patch import patch, unpatch
from tests.helpers import FP32_TOL, assert_three_way, seed


class Upsample(nn.Module):
    """Transcription of the taming/LDM upsampler: nearest x2, then (with_conv) a 3x3 conv, padding 1."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(2, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class VQGANStyleDecoder(nn.Module):
    """conv_in, then per level a residual block and an ``Upsample``, then norm and conv_out."""

    def __init__(self, z_channels: int = 3, channels: int = 6, levels: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.up = nn.ModuleList()
        for _ in range(levels):
            level = nn.Module()
            level.block = ResBlock(channels)
            level.upsample = Upsample(channels, with_conv=True)
            self.up.append(level)
        self.norm_out = nn.GroupNorm(2, channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for level in self.up:
            h = level.upsample(level.block(h))
        return self.conv_out(F.silu(self.norm_out(h)))


@pytest.fixture
def fold_calls(monkeypatch):
    calls = []
    original = dqfast.upsample_conv2d

    def counted(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return original(*args, **kwargs)

    monkeypatch.setattr(dqfast, "upsample_conv2d", counted)
    return calls


def _check_decoder(decoder: nn.Module, z_shape: tuple[int, ...], expected_names: list[str], fold_calls) -> None:
    """Patch ``decoder``; outputs and every gradient against the unpatched fp32 and float64 copies."""
    reference = copy.deepcopy(decoder)
    exact = copy.deepcopy(decoder).double()
    keys = list(decoder.state_dict())

    report = patch(decoder)

    assert report.names == expected_names and report.skipped == []
    assert all(entry.kind.startswith("taming/LDM-style Upsample") for entry in report.patched)
    assert list(decoder.state_dict()) == keys
    z = torch.randn(*z_shape, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_()
    z_exact = z.detach().double().requires_grad_()
    out = decoder(z)
    assert fold_calls == [2] * len(expected_names), "every Upsample must run dqfast.upsample_conv2d"
    expected = reference(z_ref)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    exact(z_exact).backward(g.double())
    torch.testing.assert_close(z.grad, z_ref.grad, **FP32_TOL)
    exact_params = dict(exact.named_parameters())
    for (name, p), (_, p_ref) in zip(decoder.named_parameters(), reference.named_parameters()):
        assert_three_way(p.grad, p_ref.grad, exact_params[name].grad, name)


def test_transcribed_vqgan_decoder(fold_calls):
    seed(0)
    _check_decoder(VQGANStyleDecoder(), (2, 3, 3, 5), ["up.0.upsample", "up.1.upsample"], fold_calls)


def test_real_taming_decoder(fold_calls):
    model = pytest.importorskip(
        "taming.modules.diffusionmodules.model", reason="taming-transformers is installed by `make test`"
    )
    seed(1)
    # GroupNorm(32) inside taming's blocks needs channel counts that are multiples of 32.
    decoder = model.Decoder(
        ch=32,
        out_ch=3,
        ch_mult=(1, 1, 2),
        num_res_blocks=1,
        attn_resolutions=[4],
        resolution=16,
        z_channels=4,
        in_channels=3,
    )
    _check_decoder(decoder, (1, 4, 3, 5), ["up.1.upsample", "up.2.upsample"], fold_calls)


def test_checkpoints_pickle_and_unpatch(fold_calls):
    seed(2)
    original = VQGANStyleDecoder().eval()
    patched = VQGANStyleDecoder().eval()  # other random weights
    patch(patched)
    z = torch.randn(1, 3, 4, 3)
    patched.load_state_dict(original.state_dict(), strict=True)
    torch.testing.assert_close(patched(z), original(z), **FP32_TOL)
    with torch.no_grad():
        for p in patched.parameters():
            p.mul_(1.5)
    fresh = VQGANStyleDecoder().eval()
    fresh.load_state_dict(patched.state_dict(), strict=True)
    expected = patched(z)
    torch.testing.assert_close(fresh(z), expected, **FP32_TOL)

    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    calls = len(fold_calls)
    torch.testing.assert_close(loaded(z), expected, **FP32_TOL)
    assert len(fold_calls) == calls + 2, "a pickled patched model stays patched"
    assert patch(loaded).already == ["up.0.upsample", "up.1.upsample"]

    assert unpatch(patched) == ["up.0.upsample", "up.1.upsample"]
    assert type(patched.up[0].upsample) is Upsample
    calls = len(fold_calls)
    torch.testing.assert_close(patched(z), expected, **FP32_TOL)
    assert len(fold_calls) == calls


class BilinearUpsample(nn.Module):
    """Same structure as the taming class, other behaviour: must not be patched."""

    def __init__(self, channels: int):
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="bilinear"))


BilinearUpsample.__name__ = "Upsample"


class ScaleFourUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=4.0, mode="nearest"))


ScaleFourUpsample.__name__ = "Upsample"


def test_look_alikes_and_unsupported_variants_are_left_alone():
    seed(3)
    valid_padding = Upsample(4, with_conv=True)
    valid_padding.conv = nn.Conv2d(4, 4, 3, padding=0)
    reflect = Upsample(4, with_conv=True)
    reflect.conv.padding_mode = "reflect"
    extra_child = Upsample(4, with_conv=True)
    extra_child.norm = nn.GroupNorm(2, 4)
    hooked = Upsample(4, with_conv=True)
    hooked.conv.register_forward_hook(lambda *args: None)
    model = nn.ModuleDict(
        {
            "bilinear": BilinearUpsample(4),
            "scale4": ScaleFourUpsample(4),
            "no_conv": Upsample(4, with_conv=False),
            "valid_padding": valid_padding,
            "reflect": reflect,
            "extra_child": extra_child,
            "hooked": hooked,
            "torch_upsample": nn.Upsample(scale_factor=2),
            "ok": Upsample(4, with_conv=True),
        }
    )
    types = {name: type(m) for name, m in model.items()}
    report = patch(model)
    assert report.names == ["ok"]
    reasons = {entry.name: entry.detail for entry in report.skipped}
    assert set(reasons) == {"bilinear", "scale4", "no_conv", "valid_padding", "reflect", "extra_child", "hooked"}
    assert "probe output differs" in reasons["bilinear"]
    assert "probe output (1, 4, 12, 20)" in reasons["scale4"]
    assert "with_conv=False" in reasons["no_conv"]
    assert "'same' padding" in reasons["valid_padding"]
    assert "reflect" in reasons["reflect"]
    assert "norm" in reasons["extra_child"]
    assert "hooks" in reasons["hooked"]
    for name, cls in types.items():
        if name != "ok":
            assert type(model[name]) is cls, f"{name} must be left alone"
