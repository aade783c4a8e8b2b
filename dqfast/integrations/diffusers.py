"""diffusers: ``Upsample2D`` (the VAE / UNet resize-conv upsampler) and the VQ-VAE ``VectorQuantizer``.

Recognised by class, and only when the module defining the class is already in ``sys.modules``:
this file never imports diffusers (if no diffusers module of that kind was imported, no instance
of it can exist in the user's model).

- ``Upsample2D(use_conv=True)`` with interpolation on (the default, as in every ``AutoencoderKL``
  decoder and UNet up block): nearest x2, then an odd "same" ``nn.Conv2d`` (zeros or replicate
  padding), optionally after its channel norm. Patched, ``forward`` runs the norm (if any) and
  :func:`dqfast.upsample_conv2d` with the module's own conv parameters. Left alone, with the
  reason: ``use_conv_transpose``, ``use_conv=False``, ``interpolate=False``, a conv the fold cannot
  express, a subclass with its own forward. At call time an ``output_size`` other than twice the
  input, the deprecated ``scale`` argument, or a conv that has hooks (offloading) or was replaced
  runs the original forward.
- ``VectorQuantizer``: the nearest-code search (``argmin(cdist(z, codebook))``, an N x K matrix)
  runs as :func:`dqfast.vector_quantize`; the loss, the straight-through output, index remapping
  and ``sane_index_shape`` are computed as in diffusers.
- ``FirUpsample2D`` and ``KUpsample2D`` are reported as left alone (not nearest resize-convs).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import dqfast
from dqfast.integrations import _swap
from dqfast.integrations._common import Found, fold_refusal, runs_plain_conv

__all__ = ["find"]

UPSAMPLING_MODULE = "diffusers.models.upsampling"
VAE_MODULE = "diffusers.models.autoencoders.vae"

UPSAMPLE_KEY = "diffusers.Upsample2D"
QUANTIZER_KEY = "diffusers.VectorQuantizer"

UPSAMPLE_NOTE = "output_size other than 2x the input, the deprecated scale argument, or a hooked conv: original forward"


def _loaded_class(module_name: str, class_name: str) -> type | None:
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _upsample_conv(module: nn.Module) -> nn.Module | None:
    return module.conv if module.name == "conv" else module.Conv2d_0


def _upsample2d_forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
    conv = _upsample_conv(self) if self.use_conv else None
    h, w = hidden_states.shape[-2:]
    fusable = (
        conv is not None
        and not self.use_conv_transpose
        and self.interpolate
        and not args
        and kwargs.get("scale") is None
        and runs_plain_conv(conv)
        and (output_size is None or tuple(int(s) for s in output_size) == (2 * h, 2 * w))
    )
    if not fusable:
        return _swap.call_original(self, hidden_states, output_size, *args, **kwargs)
    if hidden_states.shape[1] != self.channels:
        raise ValueError(f"hidden_states must have {self.channels} channels, got shape {tuple(hidden_states.shape)}")
    if self.norm is not None:
        # A per-pixel channel norm commutes with nearest upsampling; diffusers applies it first too.
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return dqfast.upsample_conv2d(hidden_states, conv.weight, conv.bias, scale=2, padding_mode=conv.padding_mode)


def _vector_quantizer_forward(self, z: torch.Tensor):
    embedding = self.embedding
    if type(embedding) is not nn.Embedding or embedding._forward_hooks or embedding._forward_pre_hooks:
        return _swap.call_original(self, z)
    z = z.permute(0, 2, 3, 1).contiguous()
    z_flat = z.view(-1, self.vq_embed_dim)
    with torch.no_grad():
        indices = dqfast.vector_quantize(z_flat.detach(), embedding.weight.detach().to(z_flat.dtype)).indices
    z_q = embedding(indices).view(z.shape)
    commitment = torch.mean((z_q.detach() - z) ** 2)
    codebook_term = torch.mean((z_q - z.detach()) ** 2)
    # diffusers' default ``legacy=True`` weights the terms the other way round (kept for its checkpoints).
    loss = commitment + self.beta * codebook_term if self.legacy else self.beta * commitment + codebook_term
    z_q = z + (z_q - z).detach()
    z_q = z_q.permute(0, 3, 1, 2).contiguous()
    if self.remap is not None:
        indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
    if self.sane_index_shape:
        indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
    return z_q, loss, (None, None, indices)


_swap.register(UPSAMPLE_KEY, _upsample2d_forward, "upsample_conv2d")
_swap.register(QUANTIZER_KEY, _vector_quantizer_forward, "vector_quantize")


def _find_upsample2d(module: nn.Module, cls: type) -> Found:
    kind = "diffusers Upsample2D"
    op = "upsample_conv2d"
    if type(module).forward is not cls.forward:
        return Found(kind, op, f"{type(module).__name__} overrides Upsample2D.forward")
    if module.use_conv_transpose:
        return Found(kind, op, "use_conv_transpose=True: a transposed conv, not nearest upsample + conv")
    if not module.use_conv:
        return Found(kind, op, "use_conv=False: a bare nearest upsample, no conv to fold into")
    if not module.interpolate:
        return Found(kind, op, "interpolate=False: a plain conv, no upsample")
    reason = fold_refusal(_upsample_conv(module), "conv" if module.name == "conv" else "Conv2d_0")
    if reason is not None:
        return Found(kind, op, reason)
    return Found(kind, op, note=UPSAMPLE_NOTE, apply=lambda: _swap.swap(module, UPSAMPLE_KEY))


def _find_vector_quantizer(module: nn.Module, cls: type) -> Found:
    kind = "diffusers VectorQuantizer"
    op = "vector_quantize"
    if type(module).forward is not cls.forward:
        return Found(kind, op, f"{type(module).__name__} overrides VectorQuantizer.forward")
    if type(module.embedding) is not nn.Embedding:
        return Found(kind, op, f"embedding is a {type(module.embedding).__name__}, not an nn.Embedding")
    return Found(kind, op, note="hooked embedding: original forward", apply=lambda: _swap.swap(module, QUANTIZER_KEY))


def find(module: nn.Module) -> Found | None:
    """The verdict on ``module`` if it is one of the diffusers classes this file knows, else None."""
    upsample2d = _loaded_class(UPSAMPLING_MODULE, "Upsample2D")
    if upsample2d is not None and isinstance(module, upsample2d):
        return _find_upsample2d(module, upsample2d)
    quantizer = _loaded_class(VAE_MODULE, "VectorQuantizer")
    if quantizer is not None and isinstance(module, quantizer):
        return _find_vector_quantizer(module, quantizer)
    for name, reason in (
        ("FirUpsample2D", "FIR-filtered upsampling, not nearest: the fold does not apply"),
        ("KUpsample2D", "a fixed-kernel transposed conv, not nearest upsample + conv"),
    ):
        cls = _loaded_class(UPSAMPLING_MODULE, name)
        if cls is not None and isinstance(module, cls):
            return Found(f"diffusers {name}", None, reason)
    return None
