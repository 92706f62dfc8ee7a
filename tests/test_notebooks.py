"""Stored notebook outputs come from one top-to-bottom run: every code cell executed, in order,
none with an error. (nbval re-runs them in `make integration-test`, where conftest.py marks them
`integration`; this checks what is committed.)"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_all_ten_notebooks_exist() -> None:
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(10)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_from_the_latest_run_in_order(path: Path) -> None:
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: run top to bottom once, got {counts}"
    for c in cells:
        assert not [o for o in c.outputs if o.output_type == "error"], f"{path.name}: error output stored"
