"""Per-chunk records as a frame and as the text table, on a planted stream."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from tts_workbench.instruments.latency import (
    CHUNK_LEGEND,
    ChunkMetrics,
    StreamReport,
    format_chunks,
    format_report,
    gap_summary,
    seam_metric,
    snr_db,
    timeline_figure,
    underruns,
    vocoding_frame,
)


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


def test_the_vocoding_frame_says_whether_each_token_was_vocoded_once() -> None:
    """75 tokens in two chunks: 75 x 960 samples is each once; a window vocoded twice (its 25
    tokens' samples again) or a token dropped is not."""
    spoke = SimpleNamespace(report=_report(), tokens=list(range(75)))
    waves = {"once": np.zeros(75 * 960), "twice": np.zeros(100 * 960), "dropped": np.zeros(74 * 960)}
    frame = vocoding_frame(dict.fromkeys(waves, spoke), waves)
    assert frame["vocoded_once"].tolist() == [True, False, False]
    assert frame.iloc[0].to_dict() == {
        "stream": "once", "chunks": 2, "s3gen_calls": 2, "tokens": 75, "samples": 72000, "vocoded_once": True
    }  # fmt: skip


def test_redundant_share_is_the_frames_s3gen_ran_that_were_not_new_audio() -> None:
    # prompt 500 + 500, context 0 + 8, new 50 + 100 frames
    assert _report().summary()["redundant_frames_pct"] == pytest.approx(100 * 1008 / 1158)
    assert StreamReport("naive").summary()["redundant_frames_pct"] is None  # no S3Gen call: no share


def test_rtf_is_compute_or_wall_over_audio_chunk_by_chunk_and_for_the_stream() -> None:
    # Compute (1.0 s) and audio (2.0 s, then 1.0 s) differ, so an inverted ratio shows.
    report = StreamReport("buffered")
    for index, emitted, audio in ((0, 1.0, 2.0), (1, 3.0, 1.0)):
        m = ChunkMetrics(index, emitted, 50, 0, 0.5, 0.4, 0.1, audio, 500, 0, 100, 1)
        report.add(np.zeros(int(audio * 24_000), dtype=np.float32), m)
    report.wall_s = 3.5
    assert [c.rtf for c in report.chunks] == pytest.approx([0.5, 1.0])  # compute / audio
    # emitted so far / audio so far: 1.0 / 2.0, then 3.0 / 3.0
    assert [c.cumulative_rtf for c in report.chunks] == pytest.approx([0.5, 1.0])
    assert report.rtf == pytest.approx(3.5 / 3.0)  # the stream's wall / its audio
    assert report.summary()["rtf"] == pytest.approx(3.5 / 3.0)


def test_chunk_table_then_the_summary_line() -> None:
    lines = format_chunks(_report()).splitlines()
    assert lines[0].split()[:3] == ["index", "emitted_s", "tokens"] and "invalid_tokens" not in lines[0]
    assert lines[2].split()[:3] == ["1", "3.00", "50"]
    assert (
        lines[3].startswith("buffered: first audio after 1.00 s") and "3 invalid tokens dropped" in lines[3]
    )
    # dry from 2.0 s to chunk 1 at 3.0 s, then from 5.0 s to chunk 2 at 6.5 s: 2.5 s of silence in all
    report = _report()
    report.chunks.append(ChunkMetrics(2, 6.5, 25, 0, 0.5, 0.2, 0.1, 0.5, 500, 8, 25, 1))
    assert gap_summary(report.underruns) == {"underruns": 2, "underrun_s": 2.5, "max_underrun_s": 1.5}
    assert "2 underruns (2.50 s silent)" in format_chunks(report).splitlines()[-1]


def test_stream_command_output_counts_what_came_after_the_last_chunk() -> None:
    # The command prints from the JSON report: the totals there include the invalid ids and T3
    # time after the last chunk, and the printed line must say the same.
    report = _report()
    report.invalid_after = 5
    report.t3_after_s = 0.25
    doc = {
        "summary": report.summary(),
        "chunks": report.rows(),
        "quality_vs_one_shot": {"seam_max_over_median": None, "snr_db": 30.0, "length_diff_samples": 0},
        "note": "no stop token within 75 tokens",
        "files": {"wav": "a.wav", "timeline": "a.png"},
    }
    assert doc["summary"]["invalid_tokens"] == 8 and doc["summary"]["t3_s"] == 0.5 + 1.0 + 0.25
    assert "8 invalid tokens dropped" in format_report(doc)


@pytest.mark.parametrize(
    ("before", "said"),
    [(1.5, "built in 1.50 s before the first chunk: inside its time"),
     (1.0, "built in 1.00 s before the first chunk: inside its time, and 0.50 s after it for a longer span")],
)  # fmt: skip
def test_t3_compiling_is_printed_before_the_first_chunk_and_after_it_apart(before: float, said: str) -> None:
    # Before, all of t3_compile_s was printed as before the first token, a longer span's too.
    report = _report()
    doc = {
        "summary": report.summary(),
        "chunks": report.rows(),
        "quality_vs_one_shot": {"seam_max_over_median": None, "snr_db": 30.0, "length_diff_samples": 0},
        "t3_step_mode": "compiled",
        "t3_compile_s": 1.5,
        "t3_compile_before_first_s": before,
        "note": "no stop token within 75 tokens",
        "files": {"wav": "a.wav", "timeline": "a.png"},
    }
    assert f"T3 decode step (compiled) {said}" in format_report(doc).splitlines()


def test_an_empty_stream_is_measured_without_numpy_warnings_and_printed_as_no_audio() -> None:
    # A stream whose T3 kept no speech token has no audio. Before, the seam metric took the
    # median of no jumps ("Mean of empty slice") and the SNR of nothing against nothing was inf.
    empty = np.zeros(0, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        seams = seam_metric(empty, [])
        snr = snr_db(empty, empty)
    assert seams == {"seam_max_over_median": None, "ordinary_max_over_median": 0.0} and snr is None
    assert seam_metric(np.ones(1, dtype=np.float32), [])["ordinary_max_over_median"] == 0.0  # no jump either
    report = StreamReport("buffered", invalid_after=1)
    doc = {
        "summary": report.summary(),
        "chunks": report.rows(),
        "quality_vs_one_shot": {**seams, "snr_db": snr, "length_diff_samples": 0},
        "note": "ended by the stop token at token 2",
        "files": {"wav": "a.wav", "timeline": "a.png"},
    }
    lines = format_report(doc).splitlines()
    assert lines[:3] == [  # (no title: a report without its environment, as before 2026-12-07; no legend)
        "(no rows)",
        "buffered: no audio (T3 kept no speech token), 1 invalid token dropped",
        "seams: none (no audio); nothing to compare with one-shot",
    ]
    assert "inf" not in format_report(doc)


def test_a_stream_with_audio_but_no_sample_outside_the_crossfades_prints_snr_n_a() -> None:
    report = _report()
    doc = {
        "summary": report.summary(),
        "chunks": report.rows(),
        "quality_vs_one_shot": {
            "seam_max_over_median": 2.0,
            "ordinary_max_over_median": 1.5,
            "snr_db": None,  # every sample in a crossfade
            "length_diff_samples": 0,
        },
        "note": "ended by the stop token at token 75",
        "files": {"wav": "a.wav", "timeline": "a.png"},
    }
    quality = next(x for x in format_report(doc).splitlines() if x.startswith("seams:"))  # a TypeError before
    assert quality.startswith("seams: largest jump 2.00x") and "SNR vs one-shot n/a" in quality


def test_no_gap_is_no_underrun_in_float_seconds() -> None:
    assert gap_summary([]) == {"underruns": 0, "underrun_s": 0.0, "max_underrun_s": 0.0}
    assert isinstance(gap_summary([])["underrun_s"], float)  # was the int 0 of an empty sum
    assert underruns([1.0, 2.0], [1.0, 1.0]) == []  # chunk 1 arrives as chunk 0's audio runs out


def test_a_chunk_without_audio_neither_ends_a_gap_nor_is_the_first_audio() -> None:
    # the player runs dry at 2.0 and gets audio again at 4.0: one gap of 2 s, not two of 1 s
    assert gap_summary(underruns([1.0, 3.0, 4.0], [1.0, 0.0, 1.0]))["max_underrun_s"] == 2.0
    assert gap_summary(underruns([0.5, 1.0, 3.0], [0.0, 1.0, 1.0]))["underrun_s"] == 1.0  # from 1.0, not 0.5
    empty_first = ChunkMetrics(0, 0.5, 0, 25, 0.5, 0.0, 0.0, 0.0, 0, 0, 0, 0)
    report = _report()
    report.chunks.insert(0, empty_first)
    assert report.ttfa_s == 1.0


def test_a_stream_without_audio_is_titled_no_audio_not_inf() -> None:
    silent = ChunkMetrics(0, 0.5, 0, 25, 0.5, 0.0, 0.0, 0.0, 0, 0, 0, 0)  # chunks, none with audio
    for report in (StreamReport("buffered"), StreamReport("buffered", [silent])):
        title = timeline_figure(report).axes[0].get_title()
        assert title == "buffered: no audio"  # was "buffered: TTFA inf s, RTF inf"
    assert timeline_figure(_report()).axes[0].get_title() == "buffered: TTFA 1.00 s, RTF 1.00"


def test_a_stream_whose_chunks_have_no_audio_says_no_audio_not_inf() -> None:
    # chunks made, none with audio: the text said "first audio after inf s, RTF inf" and "seams:
    # none (one chunk)" for two chunks, where the figure says "no audio"
    silent = [ChunkMetrics(i, 0.5 * (i + 1), 5, 0, 0.5, 0.1, 0.1, 0.0, 500, 0, 50, 1) for i in range(2)]
    report = StreamReport("buffered", silent)
    empty = np.zeros(0, np.float32)
    q = {**seam_metric(empty, [960]), "snr_db": snr_db(empty, empty), "length_diff_samples": 0}
    doc = {"summary": report.summary(), "chunks": report.rows(), "quality_vs_one_shot": q, "note": "n",
           "files": {"wav": "a.wav", "timeline": "a.png"}}  # fmt: skip
    text = format_report(doc)
    assert "after inf" not in text and "RTF inf" not in text and "one chunk" not in text
    assert "buffered: no audio in its 2 chunks" in text and "seams: none (no audio)" in text
    assert "emitted_s:" not in text  # the legend is for the table of a stream with audio


def test_the_stream_report_names_what_ran_and_explains_its_columns() -> None:
    """(before 2026-12-07 it named neither the model nor the device, and its 13 columns had no legend)"""
    report = _report()
    doc = {"summary": report.summary(), "chunks": report.rows(), "note": "n",
           "quality_vs_one_shot": {"seam_max_over_median": None, "ordinary_max_over_median": 0.0,
                                   "snr_db": 20.0, "length_diff_samples": 0},
           "environment": {"model": "tiny", "device": "cpu"}, "config": {"strategy": "buffered"},
           "t3_step_mode": "static", "files": {"wav": "a.wav", "timeline": "a.png"}}  # fmt: skip
    lines = format_report(doc).splitlines()
    assert lines[0] == "stream of tiny on cpu: buffered strategy, T3 static step"
    start = lines.index(next(x for x in lines if x.startswith("emitted_s:")))
    legend = lines[start : start + len(CHUNK_LEGEND)]
    shown = lines[1].split()  # the table's header: every column it shows is explained
    assert all(f"{c}:" in " ".join(legend) or f"{c}," in " ".join(legend) for c in shown if c != "index")
    assert max(len(x) for x in legend) <= 120


@pytest.mark.parametrize("chunks", [1, 2])
def test_the_timeline_key_covers_no_bar_and_its_chunks_are_whole(chunks: int) -> None:
    """The key at the lower right covered the last chunk's playback bar (the lowest, ending
    last), and one chunk's key stuck out of the axes into the title; one chunk's axis was ticked
    -0.25, 0.00, 0.25."""
    report = _report()
    report.chunks = report.chunks[:chunks]
    fig = timeline_figure(report)
    canvas = FigureCanvasAgg(fig)  # a bare Figure's canvas cannot draw
    canvas.draw()
    renderer = canvas.get_renderer()
    ax, page = fig.axes[0], fig.bbox
    key = ax.get_legend().get_window_extent(renderer)
    assert page.x0 <= key.x0 and key.x1 <= page.x1 and page.y0 <= key.y0 and key.y1 <= page.y1, key
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(bars) >= 4 * chunks and not any(key.overlaps(bar) for bar in bars)  # (and underruns)
    assert not key.overlaps(ax.title.get_window_extent(renderer))
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(chunks)]
