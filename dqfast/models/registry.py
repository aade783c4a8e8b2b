"""Model registry: ``dqfast.models.create(name, pretrained=False, **overrides)``.

A model module registers its presets with :func:`register`; each preset is a factory taking
keyword overrides of its configuration. Pretrained weights are safetensors files shipped inside
the package (``dqfast/models/weights/<name>.safetensors``): nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

__all__ = ["register", "create", "available", "weights_path"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
WEIGHTS_DIR = Path(__file__).parent / "weights"


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a preset factory under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model preset {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available(pretrained: bool | None = None) -> list[str]:
    """Registered preset names, sorted; ``pretrained=True`` lists only those with shipped weights."""
    names = sorted(_REGISTRY)
    if pretrained is True:
        names = [n for n in names if weights_path(n).exists()]
    return names


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def create(name: str, pretrained: bool = False, **overrides) -> nn.Module:
    """Build preset ``name``; ``pretrained=True`` loads its shipped safetensors weights."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available()}")
    model = _REGISTRY[name](**overrides)
    if pretrained:
        path = weights_path(name)
        if not path.exists():
            raise ValueError(f"no pretrained weights ship for {name!r}; presets with weights: {available(True)}")
        if overrides:
            raise ValueError(f"pretrained={name!r} cannot take configuration overrides, got {sorted(overrides)}")
        from safetensors.torch import load_file

        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weights of {name!r} do not fit the model: missing {missing}, unexpected {unexpected}")
        model.eval()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
