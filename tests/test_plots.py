"""The figures' layout, drawn with Agg: labels inside their axes, keys clear of what they key,
titles inside the figure."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from tts_workbench.instruments.plots import family_time_figure, load_figure, memory_figure, time_share_figure
from tts_workbench.instruments.profiling import OP_COLUMNS


def _drawn(fig: Figure) -> FigureCanvasAgg:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas


def _inside(box: Bbox, frame: Bbox) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def _levels(stages: list[str | None]) -> pd.DataFrame:
    """Four levels as the H200 load study drew them (2026-12-04): the slowest delivering least."""
    streams = [1, 8, 32, 64]
    return pd.DataFrame({
        "streams": streams, "ttfa_p50_s": [0.2, 0.3, 0.5, 0.9], "ttfa_p95_s": [0.2, 0.4, 0.7, 1.3],
        "ttfa_p99_s": [0.2, 0.4, 0.8, 1.5], "audio_per_wall_s": [3.0, 8.0, 24.0, 30.0],
        "real_time_audio_per_wall_s": [float(n) for n in streams], "limiting_stage": stages,
    })  # fmt: skip


def test_the_load_figure_writes_each_limiting_stage_inside_its_axes() -> None:
    """The last level's label was written right of its point, through the axes' right edge
    ("s3gen" of the H200 run), and the lowest point's below the bottom edge."""
    fig = load_figure(_levels(["t3", "t3", "s3gen", "s3gen"]), 1.0)
    renderer = _drawn(fig).get_renderer()
    ax = fig.axes[1]
    labels = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
    assert [name for name, _ in labels] == ["t3", "t3", "s3gen", "s3gen"]
    for name, box in labels:
        assert _inside(box, ax.bbox), (name, box, ax.bbox)
    assert ax.get_title() == "audio delivered (limiting stage marked)"


def test_a_load_figure_without_stages_does_not_say_it_marks_them() -> None:
    """An endpoint's load study (``load --url``) knows no stage: its title said "(limiting stage
    marked)" over a figure marking none; a level whose streams all failed has none either."""
    unknown = load_figure(_levels([None] * 4).drop(columns="limiting_stage"))
    assert unknown.axes[1].get_title() == "audio delivered" and not unknown.axes[1].texts
    partly = load_figure(_levels(["t3", None, "s3gen", None]))
    assert [t.get_text() for t in partly.axes[1].texts] == ["t3", "s3gen"]


@pytest.mark.parametrize("families", [1, 3])
def test_the_family_figures_key_covers_no_bar(families: int) -> None:
    frame = pd.DataFrame({
        "family": ["standard", "turbo", "multilingual"][:families],
        "t3_s_per_audio_s": [2.5, 0.8, 3.0][:families], "s3gen_s_per_audio_s": [1.0, 0.9, 1.2][:families],
    })  # fmt: skip
    fig = family_time_figure(frame)
    renderer = _drawn(fig).get_renderer()
    ax = fig.axes[0]
    key = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(bars) == 2 * families and not any(key.overlaps(bar) for bar in bars)
    assert _inside(key, fig.bbox)


def test_the_time_share_figures_key_covers_no_bar() -> None:
    """The key sat in the lower right, over the end of a long bar there (s3gen.flow's in notebook
    02; here the last row's, time outside every phase: upstream's watermark)."""
    phases = ["t3.conditioning", "t3.prefill", "t3.decode", "s3gen.flow", "s3gen.vocoder", "other"]
    longest = [5.0, 38.0, 130.0, 280.0, 75.0, 250.0]
    share = pd.DataFrame([
        {"phase": phase, "category": category, "self_ms": ms * part}
        for phase, ms in zip(phases, longest, strict=True)
        for category, part in (("attention", 0.3), ("linear/matmul", 0.3), ("other", 0.4))
    ]).astype({"phase": OP_COLUMNS["phase"], "category": OP_COLUMNS["category"]})  # fmt: skip
    fig = time_share_figure(share)
    renderer = _drawn(fig).get_renderer()
    ax = fig.axes[0]
    key = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(bars) == 18 and not any(key.overlaps(bar) for bar in bars)
    assert _inside(key, fig.bbox) and not key.overlaps(ax.title.get_window_extent(renderer))


def test_the_memory_figures_key_is_clear_of_its_title_and_bars() -> None:
    memory = pd.DataFrame({
        "config": ["upstream", "optimized", "compiled"], "weights_gib": [1.0, 0.5, 0.5],
        "kv_cache_gib": [0.0, 0.1, 0.1], "run_growth_gib": [0.3, 0.2, 0.4],
    })  # fmt: skip
    memory["total_gib"] = memory[["weights_gib", "kv_cache_gib", "run_growth_gib"]].sum(axis=1)
    fig = memory_figure(memory)
    renderer = _drawn(fig).get_renderer()
    ax = fig.axes[0]
    key = ax.get_legend().get_window_extent(renderer)
    drawn = [a.get_window_extent(renderer) for a in (*ax.patches, *ax.texts)]  # bars and totals
    assert len(drawn) == 12 and not any(key.overlaps(box) for box in drawn)
    assert _inside(key, fig.bbox) and not key.overlaps(ax.title.get_window_extent(renderer))
