"""Reports as strict JSON. Python writes a float that is not finite as ``Infinity`` or ``NaN``,
which JSON has not (browsers' and most languages' parsers refuse it); a report holds such floats
where nothing was measured (a stream that gave no audio has no first audio: ``inf``)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(report: Any) -> Any:
    """``report`` with every float that is not finite replaced by None, in dicts, lists and tuples."""
    if isinstance(report, float) and not math.isfinite(report):
        return None
    if isinstance(report, dict):
        return {k: finite(v) for k, v in report.items()}
    if isinstance(report, list | tuple):
        return [finite(v) for v in report]
    return report


def dumps(report: Any, indent: int | None = 2) -> str:
    """``report`` as strict JSON text (``finite``; anything else JSON cannot hold raises)."""
    return json.dumps(finite(report), indent=indent, allow_nan=False)
