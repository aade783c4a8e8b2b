"""Model registry: ``dqfast.models.create(name, pretrained=False, **overrides)``.

A model module registers its presets with :func:`register`; each preset is a factory taking
keyword overrides of its configuration. Pretrained weights are safetensors files shipped inside
the package (``dqfast/models/weights/<name>.safetensors``): nothing is downloaded. Each file's
sha256 is recorded in ``weights/manifest.json`` (``manifest[name]["sha256"]``, written by
``scripts/update_manifest_hashes.py``) and checked every time the weights are loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

__all__ = ["register", "create", "available", "weights_path", "file_sha256", "verify_weights", "MANIFEST_FILE"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST_FILE = "manifest.json"


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


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(name: str, weights_dir: Path | None = None) -> Path:
    """The path of preset ``name``'s shipped weights, after checking its sha256 against the manifest.

    ValueError naming the file when the manifest has no hash for it or the hash differs (a damaged
    or replaced file): loading it could silently give a different model.
    """
    folder = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    path = folder / f"{name}.safetensors"
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest[name]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{manifest_path} records no sha256 for {path.name} ({type(e).__name__}: {e}); "
            "run scripts/update_manifest_hashes.py after shipping weights"
        ) from None
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"{path} is damaged or was replaced: its sha256 is {actual}, the manifest records {expected}; "
            "reinstall dqfast (or run scripts/update_manifest_hashes.py after shipping new weights)"
        )
    return path


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

        path = verify_weights(name, path.parent)
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a malformed file
            raise ValueError(f"cannot read the weights in {path}: {e}") from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weights of {name!r} do not fit the model: missing {missing}, unexpected {unexpected}")
        model.eval()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
