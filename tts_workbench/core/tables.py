"""The one table renderer: every text table of the workbench is a DataFrame printed by ``render``
(``render_sideways`` for one of few rows and many columns, turned on its side); and ``counted``,
a count with its noun as the reports and messages beside the tables print it.

Numbers are right-aligned in their column's format, everything else (names, lists) left-aligned
under a left-aligned header, so a column reads the same in a terminal, a notebook and a log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from pandas.api.types import is_bool_dtype, is_float_dtype, is_numeric_dtype, is_scalar


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural but for one: "1 stream", "8 streams", "0 invalid tokens"."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


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


def _cell(value: Any, numeric: bool, spec: str) -> str:
    """One value of a column: a number in ``spec``, else as text ("None" where missing)."""
    return format(value, spec) if numeric and not pd.isna(value) else _shown(value)


def render_sideways(
    frame: pd.DataFrame,
    key: str,
    heading: Callable[[Any], str] = str,
    formats: Mapping[str, str] | None = None,
    floats: str = ".2f",
) -> str:
    """``frame`` turned on its side: a line per column but ``key`` (its name first), a column per
    row headed ``heading(row[key])``, each value in its column's format as ``render``'s (a missing
    one "None", numbers' too) and right-aligned. For a table of a few rows and many columns (a
    load study's levels: 21 figures of each made one line of ~330 characters, wrapped past reading
    in a terminal)."""
    if frame.empty:
        return "(no rows)"
    formats = formats or {}
    rows: dict[str, list[str]] = {}
    for col in frame.columns.drop(key):
        values = frame[col]
        numeric = is_numeric_dtype(values) and not is_bool_dtype(values)
        spec = formats.get(col, floats if is_float_dtype(values) else "")
        rows[str(col)] = [_cell(v, numeric, spec) for v in values]
    heads = [heading(v) for v in frame[key]]
    if len(set(heads)) < len(heads):  # a column would replace another
        raise ValueError(f"rows of one heading in {heads}: each row's {key} must differ")
    columns = {"": list(rows)}
    for k, head in enumerate(heads):
        cells = [row[k] for row in rows.values()]
        width = max([len(head), *(len(c) for c in cells)])
        columns[head.rjust(width)] = [c.rjust(width) for c in cells]
    return render(pd.DataFrame(columns))
