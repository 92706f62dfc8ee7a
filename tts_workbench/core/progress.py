"""Progress bars (tqdm's) whose saved notebook output says where they ended.

In a Jupyter kernel tqdm draws a widget, and the text a saved notebook keeps beside it is the
bar as it was when shown: "0%". A viewer that renders no widgets (GitHub's notebook view; the
docs site's pages until their widget script loads) showed every finished bar at 0%.
``progress_bar`` gives the same bar shown with a display id, and shows it again when it closes,
so the saved text is its last state. Outside a kernel it is tqdm's terminal bar, unchanged.
``Stages`` is a bar of a run's named stages, for the commands whose steps are few and long
(diagnose, profile, trace).
"""

from __future__ import annotations

from typing import Any

from tqdm import auto
from tqdm.notebook import tqdm as notebook_tqdm


class KeptBar(notebook_tqdm):
    """tqdm's notebook bar, its display updated on close: to its last state, or to nothing for a
    ``leave=False`` bar (hidden in the kernel; its saved text said "0%")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from IPython.display import display  # only in a kernel: a GPU image may have no IPython

        super().__init__(*args, **kwargs, display=False)
        shown = not self.disable  # (progress_bar gives no delayed bar: tqdm shows one itself)
        self._handle = display(self.container, display_id=True) if shown else None
        self.displayed = shown

    def close(self) -> None:
        super().close()
        handle, self._handle = self._handle, None
        if handle is not None:
            # its text now: the bar as it ended, or none for a bar that does not stay
            handle.update(self.container if self.leave else {"text/plain": ""}, raw=not self.leave)


def progress_bar(*args: Any, **kwargs: Any) -> auto.tqdm:
    """``tqdm.auto.tqdm(*args, **kwargs)``; in a Jupyter kernel, a ``KeptBar`` (but a ``delay``
    bar, which tqdm displays when the delay has passed, without a display id)."""
    if issubclass(auto.tqdm, notebook_tqdm) and kwargs.get("delay", 0) <= 0:
        return KeptBar(*args, **kwargs)
    return auto.tqdm(*args, **kwargs)


class Stages:
    """A run's stages on a bar of one step each (``progress_bar``, on stderr), the
    running one named after it: the command line silences upstream's own bars, and a long run
    said nothing until its report. Off (nothing written) without ``progress``, so a notebook's
    call keeps the output it saved. Called with a stage's name as that stage starts; as a
    ``with`` block, the last stage counted where the block ends without an error, and the bar's
    line ended whatever happened, so the report or error line after it has a line of its own."""

    def __init__(self, desc: str, total: int, progress: bool = False) -> None:
        self.bar = progress_bar(total=total, desc=desc, unit="stage", disable=not progress)
        self._running = False

    def __call__(self, name: str) -> None:
        """The stage before counted as done, ``name`` shown as running (one line for both: the
        count beside the old name read as that stage running again)."""
        self.bar.set_postfix_str(name, refresh=False)
        if self._running:
            self.bar.update()
        self._running = True
        self.bar.refresh()

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_rest: object) -> None:
        if kind is None and self._running:
            self.bar.update()
        self.bar.close()
