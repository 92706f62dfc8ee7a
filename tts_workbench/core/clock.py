"""One clock for every timer in the package: it waits for the device before reading the time.

CUDA kernels run asynchronously: a host clock read while work is still queued charges that work
to whatever runs next. ``now(device)`` synchronises the device first (nothing extra on the CPU),
so phase times add up to the wall time on every device. Repeated measurements are
``torch.utils.benchmark.Measurement`` objects: median, IQR and ``Compare`` tables for free.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Measurement, TaskSpec

Device = torch.device | str | None

# Below this many repeats a Measurement's ``.iqr`` is not a quartile spread: the quartiles of one
# run are that run, of two or three a share of their range.
FEW_REPEATS = 4


def synchronize(device: Device) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def now(device: Device = None, stream: bool = False) -> float:
    """``time.perf_counter()`` after the device has finished its queued work; with ``stream``,
    only the work queued on the calling thread's current CUDA stream (two threads timing their
    own streams would otherwise wait for each other's work)."""
    if stream and device is not None and torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    else:
        synchronize(device)
    return time.perf_counter()


@dataclass
class Stopwatch:
    """Accumulates synchronised seconds over the blocks run under ``running()``."""

    device: Device = None
    seconds: float = 0.0
    calls: int = 0

    @contextmanager
    def running(self) -> Iterator[None]:
        """Time the block (the device synchronised at both ends) and add it to ``seconds`` and ``calls``."""
        t0 = now(self.device)
        try:
            yield
        finally:
            self.seconds += now(self.device) - t0
            self.calls += 1

    def run_call(self, args: tuple[object, ...], kwargs: dict[str, object]) -> AbstractContextManager[None]:
        """``running()`` for ``patching.around``: time every call of a shadowed method."""
        return self.running()


def measurement(
    seconds: Sequence[float],
    label: str,
    description: str = "",
    sub_label: str | None = None,
    threads: int = 1,
) -> Measurement:
    """Repeated timings (each read on this clock) as a ``torch.utils.benchmark.Measurement``
    (``.median``, ``.iqr``, ``.times``) that ``torch.utils.benchmark.Compare`` can put in a
    table beside others (``label``: the table, ``sub_label``: the row, ``description``: the
    column; ``threads``: the torch threads they ran with)."""
    spec = TaskSpec(stmt=label, setup="", label=label, sub_label=sub_label,
                    description=description or label, num_threads=threads)  # fmt: skip
    return Measurement(number_per_run=1, raw_times=list(seconds), task_spec=spec)
