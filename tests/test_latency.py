"""Per-chunk records as a frame and as the text table, on a planted stream."""

from __future__ import annotations

import pytest

from tts_workbench.instruments.latency import ChunkMetrics, StreamReport, format_chunks


def _report() -> StreamReport:
    chunks = [
        ChunkMetrics(0, 1.0, 25, 3, 0.5, 0.4, 0.1, 1.0, 500, 0, 50, 1, cumulative_rtf=1.0),
        ChunkMetrics(1, 3.0, 50, 0, 1.0, 0.6, 0.4, 2.0, 500, 8, 100, 1, cumulative_rtf=1.0),
    ]
    return StreamReport("buffered", chunks, wall_s=3.0)


def test_frame_has_one_row_per_chunk_with_its_rtf() -> None:
    report = _report()
    frame = report.to_frame()
    assert len(frame) == 2 and list(frame["index"]) == [0, 1]
    assert list(frame["rtf"]) == pytest.approx([c.rtf for c in report.chunks]) == [1.0, 1.0]
    assert frame["new_frames"].sum() == report.summary()["new_frames"]


def test_chunk_table_then_the_summary_line() -> None:
    lines = format_chunks(_report()).splitlines()
    assert lines[0].split()[:3] == ["index", "emitted_s", "tokens"] and "invalid_tokens" not in lines[0]
    assert lines[2].split()[:3] == ["1", "3.00", "50"]
    assert (
        lines[3].startswith("buffered: first audio after 1.00 s") and "3 invalid tokens dropped" in lines[3]
    )
