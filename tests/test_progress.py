"""Progress bars whose saved notebook output shows where they ended (core.progress)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from tqdm import auto
from tqdm.notebook import tqdm as notebook_tqdm

from tts_workbench.core import progress as progress_module
from tts_workbench.core.progress import KeptBar, Stages, progress_bar


class _Handle:
    def __init__(self, shown: list[str]) -> None:
        self.shown = shown

    def update(self, obj: Any, raw: bool = False) -> None:
        self.shown.append(repr(obj["text/plain"] if raw else obj))


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    shown: list[str] = []

    def display(obj: Any, display_id: bool = False) -> _Handle:
        assert display_id  # else the display could not be updated
        shown.append(repr(obj))
        return _Handle(shown)

    monkeypatch.setattr("IPython.display.display", display)  # imported by KeptBar when made
    return shown


def test_a_kept_bar_shows_its_last_state_again_when_it_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    # tqdm's own notebook bar keeps the text it had when shown: a saved notebook said "0%"
    shown = _recording(monkeypatch)
    with KeptBar(total=3, desc="bench") as bar:
        bar.update(3)
    assert len(shown) == 2 and "0%" in shown[0] and "100%" in shown[1] and "3/3" in shown[1], shown


def test_a_bar_that_does_not_stay_leaves_no_text_and_one_that_is_off_shows_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown = _recording(monkeypatch)
    with KeptBar(total=3, leave=False) as bar:
        bar.update(3)
    assert len(shown) == 2 and "0%" in shown[0] and shown[1] == "''", shown  # its saved text: none
    with KeptBar(total=3, disable=True) as bar:
        bar.update(3)
    assert len(shown) == 2, shown


def test_in_a_kernel_progress_is_a_kept_bar_but_for_a_delayed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    class Kernel(progress_module.notebook_tqdm):  # what tqdm.auto gives in a kernel
        pass

    _recording(monkeypatch)
    monkeypatch.setattr(progress_module.auto, "tqdm", Kernel)
    with progress_bar(total=2) as bar:
        assert isinstance(bar, KeptBar)
    with progress_bar(total=2, delay=5) as bar:  # tqdm displays it itself, if ever: no handle
        assert type(bar) is Kernel


def test_outside_a_kernel_progress_is_the_terminal_bar() -> None:
    assert not issubclass(auto.tqdm, notebook_tqdm)  # this process is no kernel
    with progress_bar(total=2, disable=True) as bar:
        assert type(bar) is auto.tqdm
    out = io.StringIO()
    with progress_bar(total=2, file=out, disable=False) as bar:  # shown (TQDM_DISABLE aside): no notebook bar
        assert type(bar) is auto.tqdm and not isinstance(bar, notebook_tqdm)
        bar.update(2)
    assert "2/2" in out.getvalue()  # drawn as text, in the file it was given


def test_stages_count_each_finished_stage_and_end_the_bar_whatever_happened() -> None:
    """A stage is counted once the next starts, the last where the block ends without an error;
    the bar is closed either way, so the report or the error after it has a line of its own."""
    with Stages("run", 3, progress=True) as stage:
        counted = []
        for name in ("a", "b", "c"):
            stage(name)
            counted.append(stage.bar.n)
    assert counted == [0, 1, 2]  # the running stage is not done yet
    assert stage.bar.n == 3 and stage.bar.disable  # all three, and closed (tqdm disables a closed bar)
    with pytest.raises(RuntimeError), Stages("run", 3, progress=True) as failed:
        failed("a")
        raise RuntimeError("stage a failed")
    assert failed.bar.n == 0 and failed.bar.disable  # the failed stage not counted, the bar closed
