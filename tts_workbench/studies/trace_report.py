"""The ``trace`` command: T3's decode with each decode step (eager, static, compiled) profiled
after a warm-up, its ``t3.decode`` region cut out and read by HolisticTraceAnalysis: how much of
the decode the device sat idle waiting for the host, side by side per step.

Cutting and reading are apart (``decode_traces``, ``read_traces``): a GPU machine without HTA
cuts (``trace --cut-only``), another machine reads (``trace --read``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pandas as pd
from chatterbox.tts import ChatterboxTTS

from ..core.errors import NoVoiceError
from ..core.rng import StreamRandom
from ..core.tables import render
from ..instruments.profiling import DECODE_CUT, profile_run, read_trace, run_folder, trace_files
from ..instruments.trace_analysis import (
    TraceReport,
    analyze,
    device_events,
    region_trace,
)
from ..runtime.decode import StepMode, t3_decode, text_tokens
from ..runtime.optimized import check_decode, decode_plan


def decode_traces(
    tts: ChatterboxTTS,
    steps: Sequence[str],
    logdir: str | Path,
    tokens: int,
    text: str,
    seed: int = 0,
    policy: str = "float32",
    keep: int | None = None,
) -> dict[str, Path]:
    """For each decode step: T3's decode (weights as ``policy``) run once to warm up (compile,
    CUDA graphs, cache) and once under the profiler without phase hooks (they would make a
    compiled step compile again), its ``t3.decode`` region (the first ``keep`` steps, if given)
    cut to ``logdir/decode-STEP/t3.decode.json.gz``. Returns those region traces by step, for
    ``read_traces`` here or on another machine (HTA need not be installed where they are taken)."""
    if tts.conds is None:
        raise NoVoiceError()
    ids = text_tokens(tts, text)
    # Every step's folder before any step runs: one that cannot be made stops the command first.
    folders = {step: run_folder(logdir, f"decode-{step}") for step in steps}
    regions = {}
    for step, folder in folders.items():
        plan = replace(decode_plan(tts, policy), step=cast(StepMode, check_decode(step, tts.t3.device)))
        for profiled in (False, True):  # a warm-up, then the run that is traced
            with profile_run(tts, logdir, folder.name, phases=False) if profiled else nullcontext():
                rng = StreamRandom(seed).generator(tts.device)
                t3_decode(tts.t3, tts.conds.t3, ids, max_new_tokens=tokens, plan=plan, generator=rng)
        path = trace_files(folder)[-1]
        regions[step] = region_trace(path, "t3.decode", path.parent / DECODE_CUT, keep)
    return regions


def read_traces(paths: Mapping[str, Path]) -> dict[str, TraceReport]:
    """HolisticTraceAnalysis's reading of each trace (``trace_analysis.analyze``), by label."""
    return {label: analyze(path) for label, path in paths.items()}


def decode_trace_report(reports: dict[str, TraceReport], note: str, top: int = 5) -> dict[str, Any]:
    """``read_traces``' reports for JSON (written strictly by ``core.strict_json``): the
    side-by-side table (one row per trace with every field any row has, ``None`` where a trace
    has none: a CPU-only trace's shares, a read trace's note) and each trace's top kernels."""
    # Not compare(reports).to_dict("records"): the DataFrame fills a row's missing fields with
    # NaN, which JSON has no word for, and turns the launch counts beside them into floats.
    rows = [{"run": label, **r.summary()} for label, r in reports.items()]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    return {
        "note": note,
        "table": [{k: row.get(k) for k in fields} for row in rows],
        "traces": {label: r.trace for label, r in reports.items()},
        "top_kernels": {label: r.kernels.head(top).to_dict("records") for label, r in reports.items()},
    }


def cut_report(regions: Mapping[str, Path], note: str) -> dict[str, Any]:
    """``decode_traces``' region traces as JSON, unread: where each is and how many device events
    it holds (0 on a GPU would mean the profiler saw none of the step's kernels)."""
    return {
        "note": note,
        "table": [],
        "traces": {step: str(path) for step, path in regions.items()},
        "device_events": {step: device_events(read_trace(path)) for step, path in regions.items()},
    }


def format_decode_traces(report: dict[str, Any]) -> str:
    """The side-by-side table of the traces HTA read, a note for each it could not, each one's
    attention and top kernels, and where the traces are."""
    traces = [f"{label}: {path}" for label, path in report["traces"].items()]
    if not report["table"]:  # cut_report
        counts = ", ".join(f"{step} {n}" for step, n in report["device_events"].items())
        head = f"T3 decode region traces, not read (trace --read reads them); device events: {counts}"
        return "\n".join([head, *traces, report["note"]])
    lines = ["T3 decode region, read by HolisticTraceAnalysis:"]
    read = [row for row in report["table"] if row.get("idle_pct") is not None]
    if read:
        cols = ["run", "device", "compute_pct", "idle_pct", "idle_host_wait_pct", "launches",
                "kernels_per_launch", "median_launch_delay_us", "gpu_shorter_than_launch_pct"]  # fmt: skip
        # shares and times to a tenth; the launch count, an int, as it is
        lines.append(render(pd.DataFrame(read)[cols], {c: ".1f" for c in cols[2:] if c != "launches"}))
    for row in report["table"]:
        if row not in read:
            lines.append(f"{row['run']}: {row['note']}")
            continue
        seen = ", ".join(row["attention_kernels"]) or "none of the fused SDPA kernels"
        lines.append(f"attention kernels on the device, {row['run']}: {seen} (found by kernel name)")
        top = pd.DataFrame(report["top_kernels"][row["run"]])[["kernel", "sum_us", "share_pct"]]
        top["kernel"] = top["kernel"].str.slice(0, 80)
        lines += [f"top kernels, {row['run']}:", render(top, {"sum_us": ".0f", "share_pct": ".1f"})]
    return "\n".join([*lines, report["note"], *traces])
