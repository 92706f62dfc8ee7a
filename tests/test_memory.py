"""The memory window where the kernel's peak resident set cannot be reset: the sampled fallback."""

from __future__ import annotations

import time

import pytest
import torch

from tts_workbench.instruments import memory


def test_a_sampled_window_keeps_the_block_peak_after_it_is_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    # as where /proc/self/clear_refs is refused (this machine allows it, so the fallback is forced)
    monkeypatch.setattr(memory, "_reset_peak_rss", lambda: False)
    with memory.memory_window("cpu") as w:
        held = torch.ones(25_000_000)  # 100 MB, resident for several of the 10 ms samples
        time.sleep(0.2)
        del held  # freed before the block ends: only the samples saw it
        time.sleep(0.2)
    assert "sampled every 10 ms" in w.how
    assert w.growth_bytes > 45e6, w
