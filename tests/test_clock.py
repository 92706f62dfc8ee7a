"""The package's one clock (core.clock.now): it waits for the device before reading the time."""

from __future__ import annotations

import pytest
import torch

from tts_workbench.core import clock


def test_now_waits_for_the_cuda_device_or_only_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the wait, a read while kernels are still queued charges them to the next phase;
    with ``stream``, only the calling thread's stream (two streams' timers waited for each other)."""
    waited: list[object] = []

    class Stream:
        def synchronize(self) -> None:
            waited.append("stream")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    for device in (None, "cpu", torch.device("cpu")):
        clock.now(device)
        clock.now(device, stream=True)
    assert waited == []  # nothing to wait for on the CPU
    clock.now("cuda:0")
    clock.now(torch.device("cuda", 0), stream=True)
    assert waited == ["cuda:0", "stream"]  # the device, then its stream alone
