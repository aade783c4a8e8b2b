"""Models built on dqfast: ``create(name, pretrained=False, **overrides)`` and ``available()``."""

from dqfast.models.registry import available, count_parameters, create, register

__all__ = ["available", "count_parameters", "create", "register"]
