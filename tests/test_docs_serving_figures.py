"""docs/serving.md's four-stream first-audio figures follow the stored serving runs, computed by the
load study's own percentiles (before 2026-12-05 they were the interpolated ones of 2026-12-01, while
the study had reported nearest rank since 2026-12-03)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tts_workbench.studies.load import listener_summary

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("results/serving_cpu_tiny.json", "results/serving_cpu_tiny_pinning.json")


def _summary(report: dict[str, Any], level: dict[str, Any]) -> dict[str, Any]:
    """The level as the load study summarises it now."""
    assert report["arrival"] == "burst"  # every stream arrived at once: arrival 0, which the files omit
    streams = [{**s, "arrival_s": 0.0} for s in level["per_stream"]]
    return listener_summary(level["streams"], level["wall_s"], streams)


def _row(report: dict[str, Any]) -> str:
    """The setup's table cells: its three single streams' first audio, fastest first, then the
    four-stream level's first-audio p50 / p95 (the single streams tell the setup's row from the
    others', of this run and of the other)."""
    *singles, four = report["levels"]
    assert [level["streams"] for level in singles] == [1, 1, 1] and four["streams"] == 4
    one = sorted(_summary(report, level)["ttfa_p50_s"] for level in singles)
    p = _summary(report, four)
    return f"| {' / '.join(f'{s:.2f}' for s in one)} | {p['ttfa_p50_s']:.2f} / {p['ttfa_p95_s']:.2f} |"


@pytest.mark.parametrize("run", RUNS)
def test_the_four_stream_percentiles_are_the_stored_runs(run: str) -> None:
    """Each setup's row of the run's table holds what the stored streams give."""
    docs = (ROOT / "docs/serving.md").read_text()
    for setup, report in json.loads((ROOT / run).read_text())["reports"].items():
        assert _row(report) in docs, (run, setup)


def test_the_two_replicas_p95_comparison_is_the_stored_run() -> None:
    """The text's comparison of two replicas' p95 with one's is the first run's."""
    reports = json.loads((ROOT / RUNS[0]).read_text())["reports"]
    one, two = (
        _summary(reports[s], reports[s]["levels"][-1])["ttfa_p95_s"]
        for s in ("HTTP, 1 replica", "HTTP, 2 replicas")
    )
    assert f"first-audio p95 ({two:.2f} vs {one:.2f} s)" in (ROOT / "docs/serving.md").read_text()
