"""vector-quantize-pytorch: the nearest-code search of ``VectorQuantize`` (euclidean and cosine codebooks).

Recognised by class, only when ``vector_quantize_pytorch.vector_quantize_pytorch`` is already in
``sys.modules`` (this file never imports the library). Written against its unified ``Codebook``
(checked with vector-quantize-pytorch 1.32.0); another codebook class is reported and left alone.

What changes: the codebook's ``forward`` picks the nearest code with :func:`dqfast.vector_quantize`
instead of building the full N x K distance matrix and taking its argmax; the quantized vectors are
then gathered from the same (possibly learnable, bridged or affine-transformed) codebook tensor,
so values and gradients are those of the library. What stays the library's own code: input
projections, k-means initialisation, affine statistics, the EMA / dead-code updates (called with
the one-hot of the chosen codes, as the library does), the in-place codebook optimiser, the
straight-through / rotation-trick / directional estimators, the losses and every reshaping.

Refused (the module keeps the library's search, with the reason in the report): stochastic or
straight-through Gumbel sampling, the codebook-diversity loss and the cross-entropy commitment
loss (each needs the whole distance matrix). At call time these run the original search: a
``topk`` request, ``codebook_transform_fn``, ``indices=`` (cross-entropy to given codes), positional
arguments after ``x``, and a cosine codebook whose non-zero codes do not share one norm (the
library ranks by the dot product with its stored codes, which it keeps unit-norm; only then is
that the cosine ranking dqfast computes).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

import dqfast
from dqfast.integrations import _swap
from dqfast.integrations._common import Found

__all__ = ["find"]

LIBRARY_MODULE = "vector_quantize_pytorch.vector_quantize_pytorch"
VQ_KEY = "vector_quantize_pytorch.VectorQuantize"
CODEBOOK_KEY = "vector_quantize_pytorch.Codebook"

# Codes whose norms differ by more than this (relative) make the dot-product and cosine rankings differ.
_NORM_RTOL = 1e-5

CALL_TIME_NOTE = (
    "topk, codebook_transform_fn, indices=, extra positional arguments or a cosine codebook with "
    "unequal code norms: original search"
)


def _library():
    return sys.modules.get(LIBRARY_MODULE)


def _vector_quantize_forward(self, x, *args, **kwargs):
    fast = not args and all(kwargs.get(name) is None for name in ("indices", "topk", "codebook_transform_fn"))
    if not fast:
        return _swap.call_original(self, x, *args, **kwargs)
    codebook = self._codebook
    # Only a call from here may skip the distance matrix: this forward knows nothing downstream reads it.
    codebook._dqfast_search = True
    try:
        return _swap.call_original(self, x, **kwargs)
    finally:
        codebook._dqfast_search = False


def _unit_ranking(embed: torch.Tensor) -> bool:
    """Whether ranking by ``x . e`` equals ranking by cosine for every head: non-zero codes share a norm."""
    norms = embed.detach().float().norm(dim=-1)
    top = norms.amax(dim=-1, keepdim=True)
    return bool(((top - norms <= _NORM_RTOL * top) | (norms == 0)).all())


def _search(flatten: torch.Tensor, embed: torch.Tensor, metric: str) -> torch.Tensor:
    """Nearest code per vector and head: flatten (h, N, D), embed (h or 1, K, D) -> (h, N) int64."""
    with torch.no_grad():
        heads = []
        for h in range(flatten.shape[0]):
            codes = embed[h if embed.shape[0] > 1 else 0].detach()
            heads.append(dqfast.vector_quantize(flatten[h].detach(), codes, metric=metric).indices)
        return torch.stack(heads)


def _codebook_forward(self, x, *args, **kwargs):
    if (
        not self.__dict__.get("_dqfast_search", False)
        or args
        or kwargs.get("codebook_transform_fn") is not None
        or kwargs.get("topk") is not None
    ):
        return _swap.call_original(self, x, *args, **kwargs)
    # The library runs its codebook with CUDA autocast off; so does this.
    with torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext():
        return _codebook_search(self, x, **kwargs)


def _codebook_search(
    self,
    x,
    sample_codebook_temp=None,
    mask=None,
    freeze_codebook=False,
    codebook_transform_fn=None,
    ema_update_weight=None,
    accum_ema_update=False,
    ema_update=None,
    topk=None,
    update_usage=True,
):
    call = dict(
        sample_codebook_temp=sample_codebook_temp,
        mask=mask,
        freeze_codebook=freeze_codebook,
        ema_update_weight=ema_update_weight,
        accum_ema_update=accum_ema_update,
        ema_update=ema_update,
        update_usage=update_usage,
    )
    original_x = x
    ema_update = self.ema_update if ema_update is None else ema_update
    x = x.float()
    squeeze = x.ndim < 4
    if squeeze:
        x = x.unsqueeze(0)
    flatten = x.reshape(x.shape[0], -1, x.shape[-1])  # (h, N, D)
    if mask is not None:
        # (b, n) -> (h, b * heads * n): the layout of the flattened vectors, as the library builds it.
        heads = flatten.shape[-2] // (mask.shape[0] * mask.shape[1])
        mask = repeat(mask, "b n -> c (b h n)", c=flatten.shape[0], h=heads)
    self.init_embed_(flatten, mask=mask)
    if self.use_cosine_sim and not _unit_ranking(self.embed):
        # init_embed_ has run (it runs once); the original forward repeats nothing else done so far.
        return _swap.call_original(self, original_x, **call)
    if self.affine_param:
        self.update_affine(flatten, self.embed, mask=mask)
    embed = (self.embed if self.learnable_codebook else self.embed.detach()).to(x.dtype)
    if self.vq_bridge is not None:
        embed = self.vq_bridge(embed)
    if self.affine_param:
        codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
        embed = (embed - self.codebook_mean) * (batch_std / codebook_std) + self.batch_mean

    indices = _search(flatten, embed, "cosine" if self.use_cosine_sim else "l2")  # (h, N)
    embed_h = embed.expand(flatten.shape[0], -1, -1) if embed.shape[0] == 1 else embed
    quantize = embed_h.gather(1, indices.unsqueeze(-1).expand(-1, -1, embed_h.shape[-1]))  # (h, N, D)

    if self.training and update_usage and not freeze_codebook and (ema_update or self.has_dead_code_replacement):
        onehot = F.one_hot(indices, self.codebook_size).to(flatten.dtype)
        self.update_codebook(
            flatten,
            onehot,
            mask=mask,
            ema_update_weight=ema_update_weight,
            accum_ema_update=accum_ema_update,
            ema_update=ema_update,
        )
    quantize = quantize.reshape(x.shape)
    indices = indices.reshape(x.shape[:-1])
    if squeeze:
        quantize, indices = quantize.squeeze(0), indices.squeeze(0)
    # The distance matrix is what this path avoids; VectorQuantize reads it only for the losses refused above.
    return quantize, indices, None


_swap.register(VQ_KEY, _vector_quantize_forward, "vector_quantize")
_swap.register(CODEBOOK_KEY, _codebook_forward, "vector_quantize")


def _sampler_refusal(sampler, library) -> str | None:
    """Why the codebook's code sampler needs the distance matrix, or None for a plain argmax."""
    func, keywords = sampler, {}
    if isinstance(sampler, functools.partial):
        func, keywords = sampler.func, sampler.keywords
    if func is not getattr(library, "gumbel_sample", None):
        return f"a custom gumbel_sample ({getattr(func, '__name__', type(func).__name__)}) ranks codes its own way"
    if keywords.get("stochastic"):
        return "stochastic_sample_codes=True samples codes from a softmax over all distances"
    if keywords.get("straight_through"):
        return "straight_through=True takes gradients through a softmax over all distances"
    return None


def find(module: nn.Module) -> Found | None:
    """The verdict on ``module`` if it is a vector-quantize-pytorch ``VectorQuantize``, else None."""
    library = _library()
    vq_class = getattr(library, "VectorQuantize", None)
    if vq_class is None or not isinstance(module, vq_class):
        return None
    kind = "vector-quantize-pytorch VectorQuantize"
    op = "vector_quantize"
    if type(module).forward is not vq_class.forward:
        return Found(kind, op, f"{type(module).__name__} overrides VectorQuantize.forward")
    codebook = getattr(module, "_codebook", None)
    codebook_class = getattr(library, "Codebook", None)
    if codebook_class is None or type(codebook) is not codebook_class:
        return Found(
            kind,
            op,
            f"its codebook is a {type(codebook).__name__}; dqfast knows the unified Codebook "
            "(vector-quantize-pytorch 1.32)",
        )
    if getattr(module, "has_codebook_diversity_loss", False):
        return Found(kind, op, "codebook_diversity_loss_weight > 0 needs the softmax over all distances")
    if getattr(module, "has_commitment_loss", False) and getattr(module, "commitment_use_cross_entropy_loss", False):
        return Found(kind, op, "commitment_use_cross_entropy_loss=True needs the cross-entropy over all distances")
    reason = _sampler_refusal(codebook.gumbel_sample, library)
    if reason is not None:
        return Found(kind, op, reason)
    note = CALL_TIME_NOTE
    if getattr(module, "rotation_trick", False):
        note = "rotation_trick kept (the library applies it after the search); " + note

    def apply() -> None:
        _swap.swap(module, VQ_KEY)
        _swap.swap(codebook, CODEBOOK_KEY)

    return Found(kind, op, note=note, apply=apply)
