"""tts-workbench: diagnose and fix slow Chatterbox streaming.

The package is one subpackage per layer, bottom up: ``core``, ``models``, ``instruments``,
``runtime``, then ``studies`` and ``serving`` side by side, and ``interface`` (each one's
docstring says what it holds and what it may import; ``lint-imports`` checks the order). The
names users reach for most are re-exported here and imported on first use, so
``import tts_workbench`` stays cheap::

    from tts_workbench import PerformanceOptimizedTTS, load_model, trace_dtypes
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "models.sources",
    "make_reference_wav": "models.reference",
    "save_checkpoint": "models.checkpoints",
    "trace_dtypes": "instruments.dtypes",
    "record_kernels": "instruments.attention",
    "prepare_voice": "runtime.generation",
    "PerformanceOptimizedTTS": "runtime.optimized",
    "UpstreamTTS": "runtime.optimized",
    "StreamConfig": "runtime.streaming",
    "run_bench": "studies.bench",
    "run_diagnosis": "studies.diagnose",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tts_workbench' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
