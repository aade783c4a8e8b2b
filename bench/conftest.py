"""pytest-benchmark plumbing shared by every bench file: see bench/providers.py."""

from __future__ import annotations

import pytest
from providers import device_info


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore::UserWarning"))


@pytest.fixture(scope="session")
def device_facts() -> dict:
    return device_info()
