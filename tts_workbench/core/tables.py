"""The one table renderer: every text table of the workbench is a DataFrame printed by ``render``.

Numbers are right-aligned in their column's format, everything else (names, lists) left-aligned
under a left-aligned header, so a column reads the same in a terminal, a notebook and a log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from pandas.api.types import is_bool_dtype, is_float_dtype, is_numeric_dtype, is_scalar


def _number(spec: str) -> Callable[[Any], str]:
    return lambda value: format(value, spec)


def _text(width: int) -> Callable[[Any], str]:
    return lambda value: str(value).ljust(width)


def _shown(value: Any) -> str:
    """A text column's value as printed: "None" for any missing one (None, NaN, NA)."""
    return "None" if value is None or (is_scalar(value) and pd.isna(value)) else str(value)


def render(frame: pd.DataFrame, formats: Mapping[str, str] | None = None, floats: str = ".2f") -> str:
    """``frame`` as aligned text, without its index; ``formats`` maps a column to a format spec
    (default: ``floats`` for float columns, ``str`` for the rest)."""
    if frame.empty:
        return "(no rows)"
    formats = formats or {}
    frame = frame.copy()  # text columns are made strings below: the caller's frame stays as it is
    headers: dict[Any, str] = {}
    formatters: dict[str, Callable[[Any], str]] = {}
    for col in frame.columns:
        values = frame[col]
        if is_numeric_dtype(values) and not is_bool_dtype(values):
            headers[col] = str(col)
            formatters[headers[col]] = _number(formats.get(col, floats if is_float_dtype(values) else ""))
        else:  # pandas right-aligns text; pad values and header to one width instead
            # str per value, as _text prints it: pandas prints a missing value itself, as a
            # right-aligned "NaN", without calling the formatter; every missing value is "None" here
            # (pandas 3's astype(str) keeps None as NA, of no length)
            frame[col] = pd.Series([_shown(v) for v in values], index=frame.index, dtype=object)
            width = max(len(str(col)), int(frame[col].str.len().max()))
            headers[col] = str(col).ljust(width)
            formatters[headers[col]] = _text(width)
    text = frame.rename(columns=headers).to_string(index=False, formatters=formatters)
    return "\n".join(line.rstrip() for line in text.splitlines())
