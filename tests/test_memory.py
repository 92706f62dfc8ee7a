"""Memory instruments: the sampled fallback where the kernel's peak resident set cannot be reset, and
counting tensors' bytes."""

from __future__ import annotations

import time

import pytest
import torch

from tts_workbench.instruments import memory

MB = 1_000_000


def test_a_sampled_window_keeps_the_block_peak_after_it_is_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    # As where /proc/self/clear_refs is refused (this machine allows it, so the fallback is forced).
    # The resident set is scripted: a real allocation may reuse pages the process already holds
    # (a worker's heap after other tests), and then the block shows no growth at all.
    monkeypatch.setattr(memory, "_reset_peak_rss", lambda: False)
    resident, reads = [500 * MB], [0]

    def rss_bytes() -> int:
        reads[0] += 1
        return resident[0]

    def sampled_twice_more() -> None:  # the sampler's reads (every 10 ms), bounded in time
        until, deadline = reads[0] + 2, time.monotonic() + 30
        while reads[0] < until and time.monotonic() < deadline:
            time.sleep(0.005)
        assert reads[0] >= until, "the sampler did not run"

    monkeypatch.setattr(memory, "rss_bytes", rss_bytes)
    with memory.memory_window("cpu") as w:
        resident[0] = 600 * MB  # the block's peak
        sampled_twice_more()
        resident[0] = 520 * MB  # freed before the block ends: only the samples saw the peak
        sampled_twice_more()
    assert "sampled every 10 ms" in w.how
    assert (w.start_bytes, w.peak_bytes, w.growth_bytes) == (500 * MB, 600 * MB, 100 * MB)


def test_meta_tensors_hold_no_bytes() -> None:
    # A meta tensor's storage reports its size but its data pointer is 0 for every one of them,
    # so two different meta weights were counted as one shared storage of the first one's size.
    with torch.device("meta"):
        small, large = torch.nn.Linear(10, 10), torch.nn.Linear(1000, 1000)
    assert memory.module_bytes([small, large]) == 0
    real = torch.nn.Linear(10, 10)
    assert memory.module_bytes([real, large]) == (10 * 10 + 10) * 4
