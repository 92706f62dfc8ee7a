"""Library noise filtered at the workbench's entry points (the CLI and ``notebook_setup``).

Importing chatterbox and profiling it prints warnings that are not the user's concern and bury
the workbench's own report: resemble-perth's ``pkg_resources`` deprecation, diffusers'
``LoRACompatibleLinear`` deprecation, chatterbox's own use of the deprecated
``torch.backends.cuda.sdp_kernel``, and Kineto's ``USDT ... profiler_start`` lines on every
profiler start. Each is silenced by name; everything else, the workbench's own warnings
included, still shows. Call this before importing the rest of the package (it imports neither
torch nor chatterbox itself).
"""

from __future__ import annotations

import os
import re
import warnings

# (category, start of the message) of each silenced library warning.
LIBRARY_WARNINGS = (
    (UserWarning, "pkg_resources is deprecated"),
    (FutureWarning, "`LoRACompatibleLinear` is deprecated"),
    (FutureWarning, "`torch.backends.cuda.sdp_kernel()` is deprecated"),
)


def quiet_libraries() -> None:
    """Silence the known library warnings and Kineto's log lines (``KINETO_LOG_LEVEL``, read at
    each profiler start; a value the user set is kept)."""
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # 6: above USDT/STAGE, Kineto prints nothing


def notebook_setup() -> None:
    """First call of every notebook: library noise off, so a cell shows the workbench's output."""
    quiet_libraries()
