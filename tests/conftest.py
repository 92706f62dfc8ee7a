"""Shared fixtures: one tiny model with a prepared voice per test session.

The first ``prepare_conditionals`` in a fresh venv pays a one-off numba JIT (~30 s); the
session fixture makes the suite pay it once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chatterbox.tts import ChatterboxTTS

from tts_workbench.models.sources import load_model, make_reference_wav
from tts_workbench.runtime.generation import prepare_voice


@pytest.fixture(scope="session")
def reference_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reference_wav(tmp_path_factory.mktemp("ref") / "reference.wav")


@pytest.fixture(scope="session")
def tiny_tts(reference_wav: Path) -> ChatterboxTTS:
    tts = load_model("tiny", seed=0)
    prepare_voice(tts, str(reference_wav))
    return tts
