"""Which device a model may run on here, and whether an error is its memory running out."""

from __future__ import annotations

import torch

from .errors import SourceError


def check_device(device: str) -> torch.device:
    """Return ``torch.device(device)`` or raise SourceError when it cannot run here."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SourceError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
        raise SourceError(
            f"device={device!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"{build}); use device='cpu' (on the command line: --device cpu) or run on a machine with an "
            "NVIDIA GPU"
        )
    count = torch.cuda.device_count() if dev.type == "cuda" else 0
    # else it fails later, at the first tensor put there
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        raise SourceError(
            f"device={device!r} requested but this machine has {count} GPU(s): "
            f"use one of {', '.join(f'cuda:{i}' for i in range(count))} (or 'cuda' for the current one)"
        )
    if dev.type not in ("cpu", "cuda"):
        raise SourceError(f"device {device!r} is not supported: use 'cpu' or 'cuda'")
    return dev


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: CUDA's (``torch.OutOfMemoryError``), the CPU
    allocator's (a plain RuntimeError) or Python's (``MemoryError``)."""
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))
    )
