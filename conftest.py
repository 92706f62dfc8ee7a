"""The notebooks run under nbval as the end-to-end tier: each of their cells is marked
``integration`` (``make integration-test``; ``make test`` leaves them out)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.integration)
