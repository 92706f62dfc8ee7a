"""Shared fixtures: one tiny model with a prepared voice per test session.

The first ``prepare_conditionals`` in a fresh venv pays a one-off numba JIT (~30 s); the
session fixture makes the suite pay it once. The imports are inside the fixtures: pytest-xdist's
controller process loads this file too but runs no test, and importing chatterbox there would
hold back the workers' start by its ~7 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
