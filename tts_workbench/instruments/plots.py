"""Matplotlib figures for reports and notebooks.

Without a display matplotlib picks the Agg backend by itself; Jupyter sets its inline one.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


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
    """Write ``fig`` as PNG and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_share_figure(share: pd.DataFrame, title: str = "operator self time by phase") -> Figure:
    """Stacked bars of ``profiling.time_share``: attention vs linear/matmul vs other self time, per phase."""
    ms = share.pivot(index="phase", columns="category", values="self_ms")
    fig, ax = plt.subplots(figsize=(8, 3))
    ms.plot.barh(
        stacked=True, ax=ax, color={"attention": "tab:red", "linear/matmul": "tab:blue", "other": "tab:gray"}
    )
    ax.set(xlabel="self_ms (profiled self CPU time)", ylabel="", title=title)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
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
    ax.legend()
    fig.tight_layout()
    return fig
