"""Per-chunk streaming latency: what each chunk cost, when it arrived, and whether a real-time
player would have run dry waiting for it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..core.constants import SAMPLES_PER_TOKEN
from ..core.machine import busy_machine_line
from ..core.tables import counted, render


def real_time_factor(seconds: float, audio_s: float) -> float:
    """Real-time factor: seconds spent per second of audio (below 1 is faster than real time);
    infinite with no audio."""
    return seconds / audio_s if audio_s else float("inf")


@dataclass
class ChunkMetrics:
    """One emitted chunk. Times are seconds; ``emitted_s`` counts from the start of the stream."""

    index: int
    emitted_s: float
    tokens: int  # new speech tokens vocoded for this chunk
    invalid_tokens: int  # ids >= SPEECH_VOCAB_SIZE dropped before S3Gen (random weights: about a fifth)
    t3_s: float
    flow_s: float
    vocoder_s: float
    audio_s: float
    prompt_frames: int  # S3Gen mel frames spent on the reference prompt
    context_frames: int  # frames re-processed from earlier chunks (redundant work)
    new_frames: int
    s3gen_calls: int
    nan_samples: int = 0
    cumulative_rtf: float = 0.0
    queued_s: float = 0.0  # a stream engine's queue: from the request to its prefill (in emitted_s)

    @property
    def compute_s(self) -> float:
        """Seconds of work for this chunk: T3, flow and vocoder."""
        return self.t3_s + self.flow_s + self.vocoder_s

    @property
    def rtf(self) -> float:
        """This chunk's work over its audio (under 1: faster than real time)."""
        return real_time_factor(self.compute_s, self.audio_s)


@dataclass
class Underrun:
    """One silence a real-time player met."""

    at_s: float  # stream time when the player ran out of audio
    gap_s: float  # silence until the next chunk arrived


def underruns(emitted_s: list[float], audio_s: list[float]) -> list[Underrun]:
    """A player that starts at the first chunk with audio and plays in real time: every gap it
    meets. A chunk without audio fills none: the player stays dry through its arrival (before
    2026-12-04 it ended the gap there, one silence counted as two shorter ones)."""
    gaps: list[Underrun] = []
    heard = [(arrival, length) for arrival, length in zip(emitted_s, audio_s, strict=True) if length > 0]
    if not heard:
        return gaps
    end = heard[0][0] + heard[0][1]  # when the buffered audio runs out
    for arrival, length in heard[1:]:
        if arrival > end:
            gaps.append(Underrun(at_s=end, gap_s=arrival - end))
            end = arrival
        end += length
    return gaps


def gap_summary(gaps: list[Underrun]) -> dict[str, float | int]:
    """What a player's gaps (``underruns``) amount to: how many, their seconds, the longest."""
    return {
        "underruns": len(gaps),
        "underrun_s": sum((g.gap_s for g in gaps), 0.0),
        "max_underrun_s": max((g.gap_s for g in gaps), default=0.0),
    }


@dataclass
class StreamReport:
    """All chunks of one stream and the totals a listener feels."""

    strategy: str
    chunks: list[ChunkMetrics] = field(default_factory=list)
    wall_s: float = 0.0  # to the last chunk, or to T3's end where that is later (set by ``stream``)
    # T3's seconds and invalid ids after the last chunk (blocks that made no chunk: only invalid
    # ids, or only the stop token), in the totals of ``summary`` but in no chunk's record
    t3_after_s: float = 0.0
    invalid_after: int = 0

    def add(self, chunk: np.ndarray, m: ChunkMetrics) -> np.ndarray:
        """Record a chunk as it leaves for the player: NaN samples counted and zeroed (a player
        would blow up on them), the stream's wall time and the cumulative RTF brought up to it.
        Returns the chunk to play."""
        nan = np.isnan(chunk)
        if nan.any():
            m.nan_samples = int(nan.sum())
            chunk = np.where(nan, 0.0, chunk).astype(np.float32)
        self.chunks.append(m)
        self.wall_s = m.emitted_s
        m.cumulative_rtf = real_time_factor(m.emitted_s, self.audio_s)
        return chunk

    @property
    def ttfa_s(self) -> float:
        """When the first chunk with audio left (a chunk without any is no first audio)."""
        return next((c.emitted_s for c in self.chunks if c.audio_s > 0), float("inf"))

    @property
    def audio_s(self) -> float:
        """Seconds of audio streamed."""
        return sum(c.audio_s for c in self.chunks)

    @property
    def rtf(self) -> float:
        """Wall seconds over audio seconds for the whole stream."""
        return real_time_factor(self.wall_s, self.audio_s)

    @property
    def s3gen_calls(self) -> int:
        """S3Gen calls over the whole stream."""
        return sum(c.s3gen_calls for c in self.chunks)

    @property
    def underruns(self) -> list[Underrun]:
        """The gaps a player meets that starts at the first audio and plays in real time (``underruns``)."""
        return underruns([c.emitted_s for c in self.chunks], [c.audio_s for c in self.chunks])

    def summary(self) -> dict[str, Any]:
        """The stream's totals (times in ``*_s``, S3Gen's frames by kind, underruns) as one dict."""
        kinds = ("prompt_frames", "context_frames", "new_frames")
        frames = {k: sum(getattr(c, k) for c in self.chunks) for k in kinds}
        ran = sum(frames.values())
        return {
            "strategy": self.strategy,
            "chunks": len(self.chunks),
            "ttfa_s": self.ttfa_s,
            "wall_s": self.wall_s,
            "audio_s": self.audio_s,
            "rtf": self.rtf,
            "s3gen_calls": self.s3gen_calls,
            "t3_s": sum(c.t3_s for c in self.chunks) + self.t3_after_s,
            "flow_s": sum(c.flow_s for c in self.chunks),
            "vocoder_s": sum(c.vocoder_s for c in self.chunks),
            **frames,
            # S3Gen's frames that were not new audio (the prompt and re-run context): its waste
            "redundant_frames_pct": 100 * (ran - frames["new_frames"]) / ran if ran else None,
            "tokens": sum(c.tokens for c in self.chunks),
            "invalid_tokens": sum(c.invalid_tokens for c in self.chunks) + self.invalid_after,
            "nan_samples": sum(c.nan_samples for c in self.chunks),
            **gap_summary(self.underruns),
        }

    def rows(self) -> list[dict[str, Any]]:
        """One dict per chunk: its ``ChunkMetrics`` fields and its RTF."""
        return [{**asdict(c), "rtf": c.rtf} for c in self.chunks]

    def to_frame(self) -> pd.DataFrame:
        """One row per chunk: every ``ChunkMetrics`` field and its RTF (seconds in ``*_s``)."""
        return _frame(self.rows())


class Spoken(Protocol):
    """A stream that has spoken: ``streaming.StreamState`` or the engine's ``StreamHandle``."""

    @property
    def tokens(self) -> list[int]:
        """The speech token ids the stream vocoded, in order."""

    @property
    def report(self) -> StreamReport:
        """The stream's chunks and their metrics."""


def vocoding_frame(streams: Mapping[Any, Spoken], waves: Mapping[Any, np.ndarray]) -> pd.DataFrame:
    """One row per stream (``waves``: the audio each played, by the same keys): its chunks, S3Gen
    calls and samples, and whether every speech token it kept was vocoded exactly once
    (``SAMPLES_PER_TOKEN`` samples each: a window vocoded twice, or a token dropped, changes
    the length)."""
    rows = [
        {
            "stream": key,
            "chunks": len(s.report.chunks),
            "s3gen_calls": s.report.s3gen_calls,
            "tokens": len(s.tokens),
            "samples": len(waves[key]),
            "vocoded_once": len(waves[key]) == len(s.tokens) * SAMPLES_PER_TOKEN,
        }
        for key, s in streams.items()
    ]
    return pd.DataFrame(rows)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*ChunkMetrics.__dataclass_fields__, "rtf"])


def format_chunks(report: StreamReport) -> str:
    """The per-chunk table and the stream summary, for a terminal or a notebook."""
    return _chunks_text(report.to_frame(), report.summary())


def _chunks_text(table: pd.DataFrame, s: dict[str, Any]) -> str:
    invalid = f"{counted(s['invalid_tokens'], 'invalid token')} dropped"
    if math.isinf(s["ttfa_s"]):  # no first audio (no chunk, or none with audio), no RTF: not inf
        why = f"in its {s['chunks']} chunks" if s["chunks"] else "(T3 kept no speech token)"
        return "\n".join([render(table), f"{s['strategy']}: no audio {why}, {invalid}"])
    return "\n".join(
        [
            # the summary line below totals the columns left out
            render(table.drop(columns=["invalid_tokens", "s3gen_calls", "nan_samples"])),
            f"{s['strategy']}: first audio after {s['ttfa_s']:.2f} s, RTF {s['rtf']:.2f}, "
            f"{s['s3gen_calls']} S3Gen/vocoder calls, "
            f"{s['underruns']} underruns ({s['underrun_s']:.2f} s silent), "
            + invalid
            + (f", {s['nan_samples']} NaN samples zeroed" if s["nan_samples"] else ""),
        ]
    )


def _quality_text(q: dict[str, Any], audio: bool) -> str:
    """The seams and the SNR against the one-shot output, in words."""
    if not audio:
        return "seams: none (no audio); nothing to compare with one-shot"
    seams = (
        "seams: none (one chunk)"
        if q["seam_max_over_median"] is None
        else f"seams: largest jump {q['seam_max_over_median']:.2f}x the median jump "
        f"(elsewhere up to {q['ordinary_max_over_median']:.2f}x)"
    )
    snr = "n/a" if q["snr_db"] is None else f"{q['snr_db']:.1f} dB"  # None: every sample in a crossfade
    if q.get("identical_to_one_shot"):
        snr = "inf dB (identical)"
    length = f"length difference {q['length_diff_samples']} samples"
    return f"{seams}; SNR vs one-shot {snr} outside crossfades; {length}"


def _t3_compile_text(report: dict[str, Any]) -> list[str]:
    """What building T3's compiled step cost, if anything: the part before the first chunk (in
    its time: the step, and any longer span a long first window reached) and the rest, a longer
    span compiled after it (in a later chunk's). Before 2026-12-05 the whole was printed as before
    the first token, though with a reused plan none of it came there."""
    total = report.get("t3_compile_s")
    if not total:
        return []
    before = report["t3_compile_before_first_s"]
    line = (
        f"T3 decode step ({report['t3_step_mode']}) built in {before:.2f} s before the first chunk: "
        "inside its time"
    )
    if total > before:
        line += f", and {total - before:.2f} s after it for a longer span"
    return [line]


# The chunk table's columns, under its summary line: seconds of each stage's work and the mel frames
# S3Gen made (a table without audio, its columns of invalid ids, calls and NaN samples kept, has none).
CHUNK_LEGEND = (
    "emitted_s: when the chunk was ready, from the request; tokens: the speech tokens it vocoded; audio_s:",
    "its audio; t3_s, flow_s, vocoder_s: each stage's work for it; queued_s: waiting in an engine's queue;",
    "prompt_frames, context_frames, new_frames: S3Gen's mel frames of the voice prompt, of earlier chunks",
    "made again (redundant work) and new; rtf: the chunk's work over its audio; cumulative_rtf: emitted_s",
    "over all audio so far",
)


def format_report(report: dict[str, Any]) -> str:
    """The ``tts-workbench stream`` output: chunk table, summary, quality against one-shot,
    printed from the report's own rows and totals (those count what came after the last chunk)."""
    env = report.get("environment")  # (none before 2026-12-07)
    ran = f"{report['config']['strategy']} strategy, T3 {report['t3_step_mode']} step" if env else ""
    audio = not math.isinf(report["summary"]["ttfa_s"])  # some chunk had audio
    return "\n".join(
        [
            *([f"stream of {env['model']} on {env['device']}: {ran}"] if env else []),
            _chunks_text(_frame(report["chunks"]), report["summary"]),
            *(CHUNK_LEGEND if audio else ()),
            _quality_text(report["quality_vs_one_shot"], audio),
            *_t3_compile_text(report),
            *busy_machine_line(report.get("environment", {})),  # (no environment before 2026-12-07)
            # a multilingual model's (the others speak English only: None, or absent from older reports)
            *([f"language: {report['language']}"] if report.get("language") else []),
            report["note"],
            f"wrote {report['files']['wav']} and {report['files']['timeline']}",
        ]
    )


def timeline_figure(report: StreamReport, title: str = "") -> Figure:
    """Per chunk, the compute (T3, flow, vocoder) as stacked bars ending when the chunk was
    emitted, against the playback of a real-time player; underruns in red."""
    fig = Figure(figsize=(9, 1.2 + 0.35 * max(len(report.chunks), 1)))
    ax = fig.subplots()
    colors = {"T3": "tab:blue", "flow": "tab:orange", "vocoder": "tab:green"}
    play = 0.0
    for c in report.chunks:
        start = c.emitted_s - c.compute_s
        for name, dur in (("T3", c.t3_s), ("flow", c.flow_s), ("vocoder", c.vocoder_s)):
            ax.barh(c.index, dur, left=start, color=colors[name], label=name if c.index == 0 else None)
            start += dur
        if c.audio_s <= 0:  # nothing to play: the player stays dry through it (as ``underruns``)
            continue
        play = max(play, c.emitted_s)
        ax.barh(c.index, c.audio_s, left=play, height=0.3, color="0.6", label="playback")
        play += c.audio_s
    for g in report.underruns:
        ax.axvspan(g.at_s, g.at_s + g.gap_s, color="red", alpha=0.2, label="underrun")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:  # above the bars, under the title: at the lower right it covered the last chunk's playback
        ax.legend(unique.values(), unique.keys(), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                  ncol=len(unique), fontsize=8, frameon=False)  # fmt: skip
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("chunk")
    ax.set_yticks([c.index for c in report.chunks])  # whole chunks (one chunk had ticks -0.25, 0, 0.25)
    ax.invert_yaxis()
    timing = (
        "no audio"  # no chunk has audio: no first audio and no RTF, rather than print inf
        if math.isinf(report.ttfa_s)
        else f"TTFA {report.ttfa_s:.2f} s, RTF {report.rtf:.2f}"
    )
    ax.set_title(title or f"{report.strategy}: {timing}", pad=24)
    fig.tight_layout()
    return fig


def seam_metric(wav: np.ndarray, seams: list[int], half_width: int = 48) -> dict[str, float | None]:
    """The largest sample-to-sample jump near each seam, relative to the median jump, against the
    largest jump anywhere else (a click is a seam jump far above anything ordinary); ``None``
    for the seams of a stream that has none (one chunk, or no audio)."""
    jumps = np.abs(np.diff(wav.astype(np.float64)))
    median = (float(np.median(jumps)) if jumps.size else 0.0) or 1e-12  # no jump: no median to take
    near = np.zeros(len(jumps), dtype=bool)
    for s in seams:
        near[max(s - half_width, 0) : s + half_width] = True
    seam = float(jumps[near].max() / median) if near.any() else None
    ordinary = float(jumps[~near].max() / median) if (~near).any() else 0.0
    return {"seam_max_over_median": seam, "ordinary_max_over_median": ordinary}


def snr_db(wav: np.ndarray, reference: np.ndarray, exclude: Sequence[tuple[int, int]] = ()) -> float | None:
    """Signal-to-noise ratio of ``wav`` against ``reference`` (same length up to the shorter),
    leaving out the ``exclude`` sample ranges (the crossfade regions); ``None`` where no sample
    is left to compare (a stream without audio)."""
    n = min(len(wav), len(reference))
    keep = np.ones(n, dtype=bool)
    for lo, hi in exclude:
        keep[max(lo, 0) : min(hi, n)] = False
    if not keep.any():
        return None
    ref, err = reference[:n][keep].astype(np.float64), (wav[:n] - reference[:n])[keep].astype(np.float64)
    noise = float(np.sum(err**2))
    return float("inf") if noise == 0 else 10 * float(np.log10(np.sum(ref**2) / noise))
