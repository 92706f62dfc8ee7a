"""Matplotlib figures for reports and notebooks.

Without a display matplotlib picks the Agg backend by itself; Jupyter sets its inline one.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..core.files import written

# How many characters of 7-point text an inch of figure holds, with room to spare (DejaVu Sans
# averages about 4 points a character at that size).
NOTE_CHARS_PER_INCH = 17


def generation_figure(wav: np.ndarray, sr: int, seconds: dict[str, float], title: str) -> Figure:
    """Waveform on the left, wall time per phase on the right."""
    fig, (ax_wav, ax_t) = plt.subplots(1, 2, figsize=(11, 3), gridspec_kw={"width_ratios": [3, 1]})
    t = np.arange(len(wav)) / sr
    ax_wav.plot(t, wav, lw=0.4)
    ax_wav.set(xlabel="seconds", ylabel="amplitude", title=title)
    labels = list(seconds)
    ax_t.barh(labels, [seconds[k] for k in labels], color="tab:orange")
    ax_t.set(xlabel="wall seconds", title="time per phase")
    ax_t.invert_yaxis()
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG, whole or not at all (``files.written``), and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return written(path, lambda partial: fig.savefig(partial, dpi=110))
    finally:
        plt.close(fig)


def time_share_figure(share: pd.DataFrame, title: str = "operator self time by phase") -> Figure:
    """Stacked bars of ``profiling.time_share``: attention vs linear/matmul vs other self time, per
    phase; a profile without operators is an empty plot that says so."""
    fig, ax = plt.subplots(figsize=(8, 3))
    if share.empty:  # pandas refuses to plot no numbers (TypeError)
        ax.text(0.5, 0.5, "no operator in this profile", ha="center", va="center", transform=ax.transAxes)
    else:
        ms = share.pivot(index="phase", columns="category", values="self_ms")
        colors = {"attention": "tab:red", "linear/matmul": "tab:blue", "other": "tab:gray"}
        ms.plot.barh(stacked=True, ax=ax, color=colors)
        ax.invert_yaxis()
        # above the bars, under the title: in the lower right it covered the end of a long bar there
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    ax.set(xlabel="self_ms (profiled self CPU time)", ylabel="")  # after pandas' labels
    ax.set_title(title, pad=24 if not share.empty else None)
    fig.tight_layout()
    return fig


def family_time_figure(families: pd.DataFrame) -> Figure:
    """Compute seconds per second of audio, T3 vs S3Gen, one bar per family
    (``bench.compare_families``): below the line at 1 is faster than real time."""
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(families["family"], families["t3_s_per_audio_s"], label="T3")
    ax.bar(
        families["family"],
        families["s3gen_s_per_audio_s"],
        bottom=families["t3_s_per_audio_s"],
        label="S3Gen",
    )
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("s per s of audio (one-shot)")
    # above the bars: inside the axes it covered a tall bar (one family at full size)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def load_figure(levels: pd.DataFrame, first_audio_limit_s: float | None = None) -> Figure:
    """The load study (``load.load_frame``): time to first audio p50/p95/p99 (left, with the
    real-time limit on it when given) and seconds of audio delivered per wall second (right)
    against concurrent streams, each level's limiting stage written beside its point. On the
    right, the dashed line is what every stream in real time from its arrival would deliver
    (``real_time_audio_per_wall_s``: the diagonal for a burst of equal-length streams, below it
    when their audio differs): a point below it means the
    streams together fall behind."""
    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(10, 3.4))
    x = levels["streams"]
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        ax_t.plot(x, levels[f"ttfa_{q}_s"], style, label=q)
    if first_audio_limit_s is not None:
        ax_t.axhline(first_audio_limit_s, color="tab:red", lw=0.8, ls="--", label="real-time limit")
    ax_t.set(xlabel="concurrent streams", ylabel="time to first audio (s)", xscale="log", title="first audio")
    ax_t.legend()
    ax_a.plot(x, levels["audio_per_wall_s"], "o-", color="tab:green", label="delivered")
    ax_a.plot(x, levels["real_time_audio_per_wall_s"], "k--", lw=0.8, label="every stream in real time")
    # known in-process only; a client of an endpoint cannot see the stages
    staged = "limiting_stage" in levels and levels["limiting_stage"].notna().any()
    if staged:
        last = x.max()
        for xi, yi, stage in zip(x, levels["audio_per_wall_s"], levels["limiting_stage"], strict=True):
            if pd.isna(stage):  # a level whose every stream failed
                continue
            # the last level's label to the left of its point: to the right the axes' edge cut it
            right = xi == last and len(x) > 1
            ax_a.annotate(stage, (xi, yi), textcoords="offset points", xytext=(-4 if right else 4, -12),
                          ha="right" if right else "left", fontsize=8)  # fmt: skip
        ax_a.margins(y=0.15)  # room under the lowest point for its label (it sat on the frame)
    ax_a.set(xlabel="concurrent streams", ylabel="audio s per wall s", xscale="log",
             title="audio delivered (limiting stage marked)" if staged else "audio delivered")  # fmt: skip
    ax_a.legend()
    for ax in (ax_t, ax_a):
        ax.minorticks_off()
        ax.set_xticks(list(x), [str(v) for v in x])
    fig.tight_layout()
    return fig


def memory_figure(memory: pd.DataFrame, device: str = "cpu") -> Figure:
    """The bench's memory per configuration (``bench.memory_frame``): weights, static KV cache
    and the run's own growth stacked per configuration, in GiB."""
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(memory)))
    left = np.zeros(len(memory))
    parts = (("weights_gib", "weights", "tab:blue"), ("kv_cache_gib", "static KV cache", "tab:orange"),
             ("run_growth_gib", "run growth", "tab:green"))  # fmt: skip
    for column, label, color in parts:
        ax.barh(memory["config"], memory[column], left=left, color=color, label=label)
        left += memory[column].to_numpy()
    for y, total in enumerate(memory["total_gib"]):
        ax.annotate(f"{total:.2f}", (total, y), textcoords="offset points", xytext=(4, -3), fontsize=8)
    where = "CUDA allocated" if device == "cuda" else "resident"
    ax.set_xlabel(f"GiB ({where})")
    ax.set_title("memory per configuration: what each alone would hold", pad=24)
    ax.invert_yaxis()
    # above the bars, under the title: inside them it covered the totals written beside the last bars
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def device_time_figure(table: pd.DataFrame, title: str = "device time in the decode region") -> Figure:
    """Where the device's time went, one bar per run (``trace_analysis.compare``): compute,
    non-compute (copies, memsets), idle waiting for the host and other idle, in % of the span
    from the first kernel to the last. A host-bound step is mostly host wait. Runs without
    device time (a CPU-only trace, a trace left unread: ``note`` says which) are named below the
    bars, each with its note."""
    cols = ["run", "compute_pct", "non_compute_pct", "idle_pct", "idle_host_wait_pct", "note"]
    data = table.reindex(columns=cols)
    missing, table = data[data["idle_pct"].isna()], data.dropna(subset=["idle_pct"])
    host = table["idle_pct"] * table["idle_host_wait_pct"] / 100
    parts = (
        ("compute", table["compute_pct"], "tab:blue"),
        ("non-compute", table["non_compute_pct"], "tab:purple"),
        ("idle: host wait", host, "tab:red"),
        ("idle: other", table["idle_pct"] - host, "tab:gray"),
    )
    notes = missing[["run", "note"]].fillna("")
    said = "; ".join(f"{run}: {note}" for run, note in notes.itertuples(index=False))
    # wrapped here: matplotlib wraps a text only as it draws it, after tight_layout has sized it
    wrap = textwrap.TextWrapper(NOTE_CHARS_PER_INCH * 8, break_on_hyphens=False)  # `tts-workbench` whole
    note = wrap.fill(f"no bar for {said}") if len(missing) else ""
    lines = note.count("\n") + 1 if note else 0
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(table) + 0.12 * lines))  # a 7-point line: 0.12 in
    left = np.zeros(len(table))
    for label, share, color in parts:
        ax.barh(table["run"], share, left=left, color=color, label=label)
        left += share.to_numpy()
    ax.set(xlabel="% of the device's span (HolisticTraceAnalysis)", xlim=(0, 100))
    if note:  # said, not drawn as empty bars
        _note_below_xlabel(ax, note)
    ax.invert_yaxis()
    if len(table):  # with no bar, a key would be four entries of one colour
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    else:
        ax.set_yticks([])
    ax.set_title(title, pad=24 if len(table) else None)
    fig.tight_layout()
    return fig


def _note_below_xlabel(ax: Axes, note: str) -> None:
    """``note`` in small print under ``ax``'s x label, from the figure's left edge (it is wrapped
    to the figure's width; from the axes' edge, right of long run names, it ran off the figure):
    an axes' text, so ``tight_layout`` makes room for it (it leaves a figure's text out: one at
    the figure's foot was drawn over the label and cut off)."""
    ax.annotate(note, xy=(0.01, 0), xycoords=("figure fraction", ax.xaxis.label), xytext=(0, -4),
                textcoords="offset points", va="top", fontsize=7)  # fmt: skip
