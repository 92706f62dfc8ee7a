"""Stored notebook outputs come from one top-to-bottom run: every code cell executed, in order,
none with an error. (nbval re-runs them in `make integration-test`, where conftest.py marks them
`integration`; this checks what is committed.)"""

from __future__ import annotations

import re
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


# tqdm's text bar, with a total ("42%|####      | 21/50 [") or without one ("21it [")
TQDM_TEXT = re.compile(r"\d+%\|.*\| \d+/\d+ \[|\d+it \[")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_hold_no_upstream_progress_bars(path: Path) -> None:
    """Upstream's bars write to stderr (T3's "Sampling:"; S3Gen's and Turbo T3's have no
    description). The workbench's own are widgets (``core.progress``), whose saved text is in
    their display data, not in a stream: any bar's text in a stream is one that escaped."""
    for c in nbformat.read(path, as_version=4).cells:
        for o in c.get("outputs", []):
            if o.output_type != "stream":
                continue
            text = o.text
            bar = "Sampling:" in text or "\x1b[A" in text or TQDM_TEXT.search(text)
            assert not bar, f"{path.name}: a progress bar was stored in {o.name}: {text[:120]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_players_and_bars_show_where_they_ended(path: Path) -> None:
    """What a viewer without widgets (GitHub) shows of a player or a bar is its saved text: a
    player's chunk table after its title (which tells a notebook's players apart), a bar at its end
    (before 2026-12-04, "waiting for the first chunk" and "0%" for runs that had finished:
    ``StreamPlayer``, ``core.progress``)."""
    for c in nbformat.read(path, as_version=4).cells:
        for o in c.get("outputs", []):
            text = "".join(o.get("data", {}).get("text/plain", ""))
            stale = "waiting for the first chunk" in text or " 0%|" in text
            assert not stale, f"{path.name}: {text[:120]}"
            # a player's table: to_string(index=False)'s header (StreamPlayer._static_bundle)
            if any(line.startswith(" index  emitted_s") for line in text.splitlines()):
                markup = "".join(o["data"].get("text/html", ""))
                assert markup.startswith("<p><b>"), f"{path.name}: a player's table without its title"


def test_notebook_cells_run_with_upstreams_bars_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatterbox.models.t3.t3 as t3_module
    from IPython.core.interactiveshell import InteractiveShell

    from tts_workbench.core.quiet import notebook_setup

    shell = InteractiveShell.instance()
    monkeypatch.setattr(shell, "run_line_magic", lambda *a: None)  # the test process keeps its backend
    before = {e: list(shell.events.callbacks[e]) for e in ("pre_run_cell", "post_run_cell")}
    try:
        bars = t3_module.tqdm
        notebook_setup()
        notebook_setup()  # a second call adds nothing
        assert {e: len(shell.events.callbacks[e]) - len(before[e]) for e in before} == {
            "pre_run_cell": 1,
            "post_run_cell": 1,
        }
        shell.run_cell("import chatterbox.models.t3.t3 as m; bar = m.tqdm(range(3)); quiet = bar.disable")
        assert shell.user_ns["quiet"] is True
        assert t3_module.tqdm is bars  # given back when the cell ended
        # a cell running a cell: still quiet after the inner one ended
        shell.run_cell("get_ipython().run_cell('1'); after = m.tqdm(range(3)).disable")
        assert shell.user_ns["after"] is True and t3_module.tqdm is bars
    finally:
        for event, callbacks in before.items():
            shell.events.callbacks[event] = callbacks
        InteractiveShell.clear_instance()
