"""Shared fixtures: one tiny model with a prepared voice per test session.

The first ``prepare_conditionals`` in a fresh venv pays a one-off numba JIT (~30 s); the
session fixture makes the suite pay it once. The imports are inside the fixtures: pytest-xdist's
controller process loads this file too but runs no test, and importing chatterbox there would
hold back the workers' start by its ~7 s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from chatterbox.tts import ChatterboxTTS


@pytest.fixture(scope="session")
def reference_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tts_workbench.models.sources import make_reference_wav

    # 3 s, not the CLI's 10 s: S3Gen runs its flow over the whole voice prompt with every call
    # (the default voice's 500 mel frames are most of a tiny window's cost)
    return make_reference_wav(tmp_path_factory.mktemp("ref") / "reference.wav", seconds=3.0)


@pytest.fixture(scope="session")
def tiny_tts(reference_wav: Path) -> ChatterboxTTS:
    from tts_workbench.models.sources import load_model
    from tts_workbench.runtime.generation import prepare_voice

    tts = load_model("tiny", seed=0)
    prepare_voice(tts, str(reference_wav))
    return tts


class Steer:
    """A wrap for a speech head's ``forward`` (``patching.shadow``) that edits the logits of
    chosen calls, counted from 1 (the prefill's): ``{call: token}`` pushes that token to the
    top, ``{call: None}`` makes every logit NaN. ``calls``: how many calls it has seen."""

    def __init__(self, edits: dict[int, int | None]) -> None:
        self.edits, self.calls = edits, 0

    def __call__(self, forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
        import torch

        def steered(x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out: torch.Tensor = forward(x)
            if self.calls not in self.edits:
                return out
            token = self.edits[self.calls]
            return out * float("nan") if token is None else out.index_fill(-1, torch.tensor([token]), 1e4)

        return steered


@pytest.fixture
def steer() -> type[Steer]:
    """``Steer``, for the tests that make a head sample what they need."""
    return Steer
