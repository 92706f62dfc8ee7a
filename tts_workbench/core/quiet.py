"""Library noise filtered at the workbench's entry points (the CLI and ``notebook_setup``).

Importing chatterbox and profiling it prints warnings that are not the user's concern and bury
the workbench's own report: resemble-perth's ``pkg_resources`` deprecation, diffusers'
``LoRACompatibleLinear`` deprecation, chatterbox's own use of the deprecated
``torch.backends.cuda.sdp_kernel``, and Kineto's ``USDT ... profiler_start`` lines on every
profiler start. Each is silenced by name; everything else, the workbench's own warnings
included, still shows. Call this before importing the rest of the package (it imports neither
torch nor chatterbox itself). It also sets ``TRANSFORMERS_VERBOSITY=error`` (unless the user set
it), which transformers reads when imported: its logged warnings (the ``sdpa``/``output_attentions``
one) stay off for the whole process, not only while a command runs.

While a command runs, ``upstream_silenced`` also drops what upstream writes to the terminal on
its own: its ``print`` lines ("loaded PerthNet", "S3 Token -> Mel Inference..."), transformers'
logged warnings (whatever verbosity the user set) and upstream's tqdm bars ("Sampling"), so the
command shows the workbench's report and its own progress only. In a notebook every cell
runs with the bars and the logged warnings off (``notebook_setup``); upstream's prints show.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator

# (category, start of the message) of each silenced library warning.
LIBRARY_WARNINGS = (
    (UserWarning, "pkg_resources is deprecated"),
    (FutureWarning, "`LoRACompatibleLinear` is deprecated"),
    (FutureWarning, "`torch.backends.cuda.sdp_kernel()` is deprecated"),
    # torch's, for the FFTs of a float16 S3Gen (HiFT's STFT): the report says what ran in which dtype
    (UserWarning, "ComplexHalf support is experimental"),
)


def quiet_libraries() -> None:
    """Silence the known library warnings, Kineto's log lines (``KINETO_LOG_LEVEL``, read at
    each profiler start) and transformers' logged warnings for the rest of the process
    (``TRANSFORMERS_VERBOSITY``); a value the user set is kept."""
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # 6: above USDT/STAGE, Kineto prints nothing
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported


# Upstream modules that draw their own tqdm bars.
UPSTREAM_TQDM = ("chatterbox.models.t3.t3", "chatterbox.models.s3gen.flow_matching")


@contextlib.contextmanager
def upstream_bars_off() -> Iterator[None]:
    """Inside: upstream's tqdm bars disabled and transformers logging errors only."""
    import importlib

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from .patching import shadow

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with contextlib.ExitStack() as stack:
        stack.callback(hf_logging.set_verbosity, level)
        for name in UPSTREAM_TQDM:
            module = importlib.import_module(name)
            stack.enter_context(shadow(module, "tqdm", lambda _: functools.partial(tqdm, disable=True)))
        yield


@contextlib.contextmanager
def upstream_silenced() -> Iterator[None]:
    """Inside: upstream's stdout prints are dropped as well as its bars (``upstream_bars_off``).
    The workbench reports on stdout after the block and shows its own progress on stderr, so
    nothing of its own is lost."""
    with upstream_bars_off(), contextlib.redirect_stdout(io.StringIO()):
        yield


def notebook_setup() -> None:
    """First call of every notebook: library noise off, so a cell shows the workbench's output,
    and figures shown as pictures: ``%matplotlib inline`` shows the figures pyplot made in a cell
    (``instruments.plots``) when it ends, and registers the image formatter that shows a bare
    ``matplotlib.figure.Figure`` (the timeline and seam figures) as a picture, not as text.

    Every later cell runs with upstream's bars off (``upstream_bars_off``, put back when the
    cell ends): the "Sampling" bars of each generation would bury the cell's own output. Its
    prints stay (a cell's own ``print`` shares stdout with them)."""
    quiet_libraries()
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    shell.run_line_magic("matplotlib", "inline")
    # By name, not identity: after a reload of this module the old callbacks are still there.
    registered = shell.events.callbacks["pre_run_cell"]
    if any(getattr(f, "__qualname__", "") == "_CellQuiet.enter" for f in registered):
        return  # a second call: the cells are quiet already
    shell.events.register("pre_run_cell", _cell_quiet.enter)
    shell.events.register("post_run_cell", _cell_quiet.exit)


class _CellQuiet:
    """``upstream_bars_off`` around each cell, as IPython's pre/post_run_cell callbacks (IPython
    calls post_run_cell whatever the cell did). Only once chatterbox is imported: the next cell
    may still set what torch reads at import. A cell that runs cells (``run_cell``) nests: the
    outermost one holds the bars off."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._depth = 0

    def enter(self, info: object) -> None:
        self._depth += 1
        if self._depth == 1 and "chatterbox" in sys.modules:
            self._stack.enter_context(upstream_bars_off())

    def exit(self, result: object) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._stack.close()


_cell_quiet = _CellQuiet()
