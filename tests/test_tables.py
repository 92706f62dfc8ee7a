"""The one table renderer: formats per column, numbers right and text left, every row one line."""

from __future__ import annotations

import pandas as pd
import pytest

from tts_workbench.core.tables import counted, render, render_sideways


def test_numbers_right_in_their_format_text_left() -> None:
    frame = pd.DataFrame(
        {
            "phase": ["t3.decode", "s3gen.flow"],
            "calls": [3, 120],
            "self_ms": [1.234, 22.5],
            "shape": [[1, 2], [3]],
        }
    )
    lines = render(frame, {"self_ms": ".1f"}).splitlines()
    assert lines == [
        "phase      calls self_ms shape",
        "t3.decode      3     1.2 [1, 2]",
        "s3gen.flow   120    22.5 [3]",
    ]


def test_floats_default_and_empty_frame() -> None:
    assert render(pd.DataFrame({"x_s": [0.5]})).splitlines() == [" x_s", "0.50"]
    assert render(pd.DataFrame({"x_s": [0.5]}), floats=".3f").endswith("0.500")
    assert render(pd.DataFrame({"x_s": []})) == "(no rows)"


def test_a_column_with_no_value_renders_as_text() -> None:
    # pandas 3 keeps NA through astype(str): before, measuring the column's width raised
    lines = render(pd.DataFrame({"a": [None, None], "n": [1, 2]})).splitlines()
    assert [line.split() for line in lines] == [["a", "n"], ["None", "1"], ["None", "2"]]


def test_a_missing_value_in_a_text_column_is_left_aligned_as_the_others() -> None:
    # (before: pandas printed it itself, a right-aligned "NaN", without calling the formatter)
    frame = pd.DataFrame({"name": ["abc", None], "x": [1, 2]})
    lines = render(frame).splitlines()
    assert lines[2].startswith("None") and lines[1].startswith("abc")
    assert frame["name"].isna().tolist() == [False, True]  # the caller's frame as it was


def test_a_text_column_is_as_wide_as_its_header_and_booleans_are_text() -> None:
    # text narrower than its header: padded to the header's width, so still left-aligned under it
    frame = pd.DataFrame({"family": ["a", "bc"], "n": [1, 22]})
    assert render(frame).splitlines() == ["family  n", "a       1", "bc     22"]
    # booleans are no numbers: left-aligned as text, not right-aligned
    assert render(pd.DataFrame({"ok": [True, False], "n": [1, 22]})).splitlines() == [
        "ok     n",
        "True   1",
        "False 22",
    ]


def test_sideways_a_line_per_column_and_a_right_aligned_column_per_row() -> None:
    frame = pd.DataFrame(
        {"streams": [1, 16], "p95_s": [0.914, float("nan")], "stage": ["s3gen", None], "n": [3, 120]}
    )
    lines = render_sideways(frame, "streams", lambda n: f"{n} x", {"p95_s": ".1f"}).splitlines()
    assert lines == [
        "        1 x 16 x",
        "p95_s   0.9 None",  # each value in its column's format; a missing one "None" (render: "NaN")
        "stage s3gen None",
        "n         3  120",
    ]
    assert render_sideways(frame.iloc[:0], "streams") == "(no rows)"
    with pytest.raises(ValueError, match="each row's streams must differ"):  # a column would be lost
        render_sideways(frame, "streams", lambda n: "same")


def test_a_count_says_its_noun_plural_but_for_one() -> None:
    """The one pluraliser of the reports and messages (five wrote their own before 2026-12-08)."""
    assert [counted(n, "stream") for n in (0, 1, 8)] == ["0 streams", "1 stream", "8 streams"]
    assert counted(1, "invalid token") == "1 invalid token" and counted(2, "timed run") == "2 timed runs"
