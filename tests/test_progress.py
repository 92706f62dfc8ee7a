"""Progress bars whose saved notebook output shows where they ended (core.progress)."""

from __future__ import annotations

from typing import Any

import pytest

from tts_workbench.core import progress as progress_module
from tts_workbench.core.progress import KeptBar, progress_bar


class _Handle:
    def __init__(self, shown: list[str]) -> None:
        self.shown = shown

    def update(self, obj: Any) -> None:
        self.shown.append(repr(obj))


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    shown: list[str] = []

    def display(obj: Any, display_id: bool = False) -> _Handle:
        assert display_id  # else the display could not be updated
        shown.append(repr(obj))
        return _Handle(shown)

    monkeypatch.setattr(progress_module, "display", display)
    return shown


def test_a_kept_bar_shows_its_last_state_again_when_it_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    # tqdm's own notebook bar keeps the text it had when shown: a saved notebook said "0%"
    shown = _recording(monkeypatch)
    with KeptBar(total=3, desc="bench") as bar:
        bar.update(3)
    assert len(shown) == 2 and "0%" in shown[0] and "100%" in shown[1] and "3/3" in shown[1], shown


def test_a_bar_that_does_not_stay_or_is_off_is_not_shown_again(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _recording(monkeypatch)
    with KeptBar(total=3, leave=False) as bar:
        bar.update(3)
    with KeptBar(total=3, disable=True) as bar:
        bar.update(3)
    assert len(shown) == 1 and "0%" in shown[0], shown


def test_outside_a_kernel_progress_is_the_terminal_bar() -> None:
    with progress_bar(total=2, disable=True) as bar:
        assert not isinstance(bar, KeptBar)
