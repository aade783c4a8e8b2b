"""``dqfast.patch``: route the upsamplers and codebook searches of existing models through dqfast ops.

``patch(model)`` walks the module tree once and changes, in place:

1. Pairs among consecutive children of an ``nn.Sequential`` (nested ones included):

   (a) ``Conv2d`` → ``PixelShuffle(r)``, with optionally one elementwise activation (ReLU,
       LeakyReLU, exact GELU, SiLU) between them or right after the shuffle (an elementwise
       activation commutes with the shuffle). Becomes :meth:`SubPixelConv2d.from_conv`.
   (b) ``Upsample(scale_factor=s, mode="nearest")`` (or ``UpsamplingNearest2d``), s an integer, →
       ``Conv2d``: :meth:`SubPixelConv2d.from_upsample_conv`, the resize-convolution computed as a
       sub-pixel convolution on the low-res grid (no upsampled image is made).

   The fused module takes the convolution's slot and the other consumed slots become
   ``nn.Identity``, so indices and parameter names do not move (``seq.3.weight`` stays
   ``seq.3.weight``). These modules hold new Parameter objects: patch before building an optimizer.

2. Modules of other libraries (:mod:`dqfast.integrations`, one file per library): diffusers
   ``Upsample2D`` and ``VectorQuantizer``, taming/LDM-style ``Upsample(with_conv=True)``,
   vector-quantize-pytorch ``VectorQuantize``. Class-based ones are recognised only when the
   library is already imported by the process (dqfast never imports it). These keep their
   identity, children, parameters and buffers: only their class is swapped for a subclass whose
   ``forward`` calls :func:`dqfast.upsample_conv2d` / :func:`dqfast.vector_quantize`, so the state
   dict and any optimizer stay valid, and checkpoints load both ways.

Variants the ops cannot express are left alone and listed in the report with the reason.
Outputs and gradients are unchanged up to float rounding. ``patch`` is idempotent, and
:func:`unpatch` restores the original modules (keeping trained weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dqfast import integrations
from dqfast.integrations import _swap
from dqfast.nn import SubPixelConv2d

__all__ = ["PatchEntry", "PatchReport", "patch", "unpatch"]

SEQUENTIAL_SHUFFLE = "nn.Sequential Conv2d + PixelShuffle"
SEQUENTIAL_UPSAMPLE = "nn.Sequential Upsample(nearest) + Conv2d"


@dataclass(frozen=True)
class PatchEntry:
    """One module in a :class:`PatchReport`.

    name: dotted module name in the model; kind: what was recognised; op: the dqfast op it runs
    (or would run) through; detail: for a patched module, what still runs the original code at
    call time; for a skipped one, why it was left alone.
    """

    name: str
    kind: str
    op: str | None
    detail: str = ""


@dataclass
class PatchReport:
    """What :func:`patch` changed (or, with ``inplace=False``, would change) and what it left alone.

    ``patched`` and ``skipped`` are in module-tree order; ``already`` names modules a previous call
    patched. ``names`` is the list of patched names; ``str(report)`` is a readable table.
    """

    applied: bool
    patched: list[PatchEntry] = field(default_factory=list)
    skipped: list[PatchEntry] = field(default_factory=list)
    already: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.patched]

    def __str__(self) -> str:
        verb = "patched" if self.applied else "would patch"
        lines = [f"dqfast.patch: {verb} {len(self.patched)}, skipped {len(self.skipped)}, already {len(self.already)}"]
        for entry in self.patched:
            lines.append(f"  {verb:<11} {entry.name or '<root>'}: {entry.kind} -> dqfast.{entry.op}")
            if entry.detail:
                lines.append(f"              at call time: {entry.detail}")
        for entry in self.skipped:
            lines.append(f"  {'skipped':<11} {entry.name or '<root>'}: {entry.kind}: {entry.detail}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# nn.Sequential pairs
# --------------------------------------------------------------------------------------------


def _activation_spec(module: nn.Module) -> tuple[str, float] | None:
    """(name, negative_slope) of an activation the fused op supports, else None."""
    if type(module) is nn.ReLU:
        return "relu", 0.01
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu", 0.01
    if type(module) is nn.SiLU:
        return "silu", 0.01
    return None


def _nearest_scale(module: nn.Module) -> int | str:
    """The integer scale of a nearest-neighbour ``nn.Upsample`` with a scale factor, else why not."""
    if module.mode != "nearest":
        return f"Upsample(mode={module.mode!r}): only nearest upsampling folds into the conv"
    if module.size is not None:
        return f"Upsample(size={module.size}): the fold needs an integer scale_factor"
    factor = module.scale_factor
    factors = tuple(factor) if isinstance(factor, tuple | list) else (factor, factor)
    if len(factors) != 2 or factors[0] != factors[1]:
        return f"Upsample(scale_factor={factor}): the fold needs one integer scale for both axes"
    scale = factors[0]
    if scale is None or float(scale) != int(scale) or int(scale) < 1:
        return f"Upsample(scale_factor={factor}): the fold needs an integer scale >= 1"
    return int(scale)


def _fuse_pixel_shuffle(children: list[nn.Module], i: int) -> tuple[SubPixelConv2d | str, int, int] | None:
    """Pattern (a) at ``children[i]``: (fused module or why not, children used, conv offset), or None."""
    conv = children[i]
    if type(conv) is not nn.Conv2d:
        return None
    rest = children[i + 1 : i + 4]
    activation = None
    if len(rest) >= 2 and isinstance(rest[1], nn.PixelShuffle) and _activation_spec(rest[0]) is not None:
        activation, used = _activation_spec(rest[0]), 3
        shuffle = rest[1]
    elif rest and isinstance(rest[0], nn.PixelShuffle):
        shuffle, used = rest[0], 2
        if len(rest) >= 2 and _activation_spec(rest[1]) is not None:
            activation, used = _activation_spec(rest[1]), 3
    else:
        return None
    name, slope = activation if activation is not None else (None, 0.01)
    try:
        fused = SubPixelConv2d.from_conv(conv, shuffle.upscale_factor, activation=name, negative_slope=slope)
    except (TypeError, ValueError) as exc:
        return str(exc), 2, 0
    return fused, used, 0


def _fold_upsample(children: list[nn.Module], i: int) -> tuple[SubPixelConv2d | str, int, int] | None:
    """Pattern (b) at ``children[i]``: (folded module or why not, children used, conv offset), or None."""
    if not isinstance(children[i], nn.Upsample) or i + 1 >= len(children) or type(children[i + 1]) is not nn.Conv2d:
        return None
    scale = _nearest_scale(children[i])
    if isinstance(scale, str):
        return scale, 2, 1
    try:
        fused = SubPixelConv2d.from_upsample_conv(children[i + 1], scale=scale)
    except (TypeError, ValueError) as exc:
        return str(exc), 2, 1
    return fused, 2, 1


def _patch_sequential(seq: nn.Sequential, prefix: str, apply: bool, report: PatchReport) -> None:
    # Not named_children(): it skips repeats of a shared module, which would shift the positions.
    names = list(seq._modules)
    children = list(seq._modules.values())
    i = 0
    while i < len(children):
        kind = SEQUENTIAL_SHUFFLE
        match = _fuse_pixel_shuffle(children, i)
        if match is None:
            kind = SEQUENTIAL_UPSAMPLE
            match = _fold_upsample(children, i)
        if match is None:
            i += 1
            continue
        fused, used, conv_offset = match
        conv_slot = i + conv_offset
        op = "subpixel_conv2d" if kind == SEQUENTIAL_SHUFFLE else "upsample_conv2d"
        if isinstance(fused, str):
            report.skipped.append(PatchEntry(f"{prefix}{names[conv_slot]}", kind, op, fused))
            i += used
            continue
        fused.train(children[conv_slot].training)
        report.patched.append(PatchEntry(f"{prefix}{names[conv_slot]}", kind, op))
        if apply:
            # Kept outside the module registry (no state-dict keys) so unpatch can put them back.
            fused._dqfast_original = tuple(zip(names[i : i + used], children[i : i + used], strict=True))
            fused._dqfast_conv_slot = names[conv_slot]
            for j in range(i, i + used):
                setattr(seq, names[j], fused if j == conv_slot else nn.Identity())
        i += used


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def patch(model: nn.Module, *, inplace: bool = True) -> PatchReport:
    """Route the upsamplers and codebook searches of ``model`` through dqfast ops, in place.

    model: any ``nn.Module``. Returns a :class:`PatchReport`: the modules patched (or, with
    ``inplace=False``, that would be patched: nothing is modified then), the recognised modules left
    alone and why, and the modules an earlier call already patched. Calling it again is a no-op.
    Outputs and gradients are unchanged up to float rounding; state-dict keys do not change.
    """
    _check_model(model)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    modules = list(model.named_modules())
    order = {name: i for i, (name, _) in enumerate(modules)}
    report = PatchReport(applied=inplace)
    to_apply = []
    # Every verdict first, then the changes: an integration may swap a child (a codebook) too.
    for name, module in modules:
        if _swap.is_swapped(module) or hasattr(module, "_dqfast_original"):
            report.already.append(name)
            continue
        found = integrations.find(module)
        if found is None:
            continue
        if found.reason is not None:
            report.skipped.append(PatchEntry(name, found.kind, found.op, found.reason))
        else:
            report.patched.append(PatchEntry(name, found.kind, found.op, found.note))
            to_apply.append(found.apply)
    if inplace:
        for apply in to_apply:
            apply()
    for name, module in modules:
        if isinstance(module, nn.Sequential):
            _patch_sequential(module, f"{name}." if name else "", inplace, report)
    report.patched.sort(key=lambda entry: order[entry.name])
    report.skipped.sort(key=lambda entry: order[entry.name])
    return report


def _restore_sequential(seq: nn.Sequential) -> list[str]:
    restored = []
    for slot, module in list(seq._modules.items()):
        originals = getattr(module, "_dqfast_original", None)
        if not isinstance(module, SubPixelConv2d) or originals is None:
            continue
        for name, original in originals:
            if name == module._dqfast_conv_slot:
                # The fused module holds the trained parameters, with the conv's shapes in both patterns.
                original.weight = module.weight
                original.bias = module.bias
                restored.append(slot)
            original.train(module.training)
            setattr(seq, name, original)
    return restored


def unpatch(model: nn.Module) -> list[str]:
    """Undo :func:`patch` on ``model`` in place; returns the names of the restored modules.

    Swapped library modules get their original class back (their parameters never moved);
    fused Sequential slots get their original modules back, holding the fused module's current
    parameters (so training done while patched is kept).
    """
    _check_model(model)
    restored = []
    prefixes = {}
    modules = list(model.named_modules())
    order = {name: i for i, (name, _) in enumerate(modules)}
    for name, module in modules:
        if _swap.restore(module):
            module.__dict__.pop("_dqfast_search", None)
            restored.append(name)
        if isinstance(module, nn.Sequential):
            prefixes[name] = module
    for name, seq in prefixes.items():
        restored += [f"{name}.{slot}" if name else slot for slot in _restore_sequential(seq)]
    return sorted(restored, key=order.__getitem__)
