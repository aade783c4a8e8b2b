"""taming-transformers / latent-diffusion style ``Upsample(in_channels, with_conv)`` (VQGAN, LDM, DQ-VAE decoders).

These classes live in many copies (``taming.modules.diffusionmodules.model``,
``ldm.modules.diffusionmodules.model``, and the many repositories that vendor the file), so they
are recognised by structure rather than by an importable class: a module whose class is named
``Upsample`` (not ``torch.nn.Upsample``), with a ``with_conv`` attribute, a single child ``conv``
that the fold can express (odd "same" ``nn.Conv2d``, zeros or replicate padding) and no other
parameters or buffers. Its forward is then checked on a small probe input (a private seeded
generator, no gradient, no effect on the module) to equal ``conv(interpolate(x, 2, "nearest"))``;
only then is it patched, so a look-alike class with other behaviour is reported and left alone.

Patched, ``forward`` is :func:`dqfast.upsample_conv2d` with the module's own conv parameters.
``with_conv=False`` (a bare nearest upsample) is reported and left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dqfast
from dqfast.integrations import _swap
from dqfast.integrations._common import Found, fold_refusal, runs_plain_conv

__all__ = ["find"]

KEY = "taming.Upsample"

# Probe tolerance per weight dtype: the probe compares two computations of the same conv.
_PROBE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _upsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    conv = getattr(self, "conv", None)
    if not self.with_conv or conv is None or not runs_plain_conv(conv):
        return _swap.call_original(self, x)
    return dqfast.upsample_conv2d(x, conv.weight, conv.bias, scale=2, padding_mode=conv.padding_mode)


_swap.register(KEY, _upsample_forward, "upsample_conv2d")


def _probe_refusal(module: nn.Module) -> str | None:
    """Why ``module.forward`` is not ``conv(interpolate(x, 2, nearest))`` on a probe input, or None."""
    conv = module.conv
    weight = conv.weight
    if weight.device.type == "meta":
        return "its parameters are on the meta device, so its forward cannot be checked"
    if conv._forward_hooks or conv._forward_pre_hooks or module._forward_hooks or module._forward_pre_hooks:
        return "it or its conv has hooks, so probing its forward could have side effects"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, conv.in_channels, 3, 5, generator=generator).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            got = type(module).forward(module, x)
        except Exception as exc:  # a look-alike with another signature or contract: not ours to patch
            return f"its forward failed on a probe input ({type(exc).__name__}: {exc})"
        want = conv._conv_forward(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, conv.bias)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return f"its forward is not interpolate(nearest, 2) + conv (probe output {shape}, expected {tuple(want.shape)})"
    tol = _PROBE_TOL.get(weight.dtype, 1e-2)
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        return "its forward is not interpolate(nearest, 2) + conv (probe output differs)"
    return None


def find(module: nn.Module) -> Found | None:
    """The verdict on ``module`` if it looks like a taming/LDM ``Upsample``, else None."""
    cls = type(module)
    if cls.__name__ != "Upsample" or isinstance(module, nn.Upsample) or not hasattr(module, "with_conv"):
        return None
    kind = f"taming/LDM-style Upsample ({cls.__module__})"
    op = "upsample_conv2d"
    if not module.with_conv:
        return Found(kind, op, "with_conv=False: a bare nearest upsample, no conv to fold into")
    children = [name for name, _ in module.named_children()]
    if children != ["conv"]:
        return Found(kind, op, f"children {children}; the pattern has exactly one child, conv")
    own = [name for name, _ in module.named_parameters(recurse=False)] + [
        name for name, _ in module.named_buffers(recurse=False)
    ]
    if own:
        return Found(kind, op, f"parameters or buffers of its own {own}; the pattern has only conv's")
    reason = fold_refusal(module.conv) or _probe_refusal(module)
    if reason is not None:
        return Found(kind, op, reason)
    return Found(kind, op, note="a hooked or replaced conv: original forward", apply=lambda: _swap.swap(module, KEY))
