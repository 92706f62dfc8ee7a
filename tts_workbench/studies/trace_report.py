"""The ``trace`` command: T3's decode with each decode step (eager, static, compiled) profiled
after a warm-up, its ``t3.decode`` region cut out and read by HolisticTraceAnalysis: how much of
the decode the device sat idle waiting for the host, side by side per step.

Cutting and reading are apart (``decode_traces``, ``read_traces``): a GPU machine without HTA
cuts (``trace --cut-only``), another machine reads (``trace --read``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import pandas as pd
from chatterbox.tts import ChatterboxTTS

from ..core.errors import PREPARE_FIRST, ConfigError, NoVoiceError
from ..core.positions import positions_needed
from ..core.progress import Stages
from ..core.rng import StreamRandom
from ..core.tables import render
from ..instruments.profiling import DECODE_CUT, profile_run, read_trace, run_folder, trace_files
from ..instruments.trace_analysis import (
    TraceReport,
    analyze_cut,
    analyze_trace,
    cut_region,
    device_events,
    has_region,
    read_checked_trace,
    region_trace,
)
from ..runtime.decode import (
    DecodePlan,
    DecodeResult,
    StepMode,
    check_new_tokens,
    checked_prefill,
    t3_decode,
    text_tokens,
)
from ..runtime.optimized import check_decode, decode_plan

REGION = "t3.decode"
WHOLE_TRACE = f"whole trace (no {REGION} range)"
# The top-level key of each profile decode_traces takes (a cut keeps its trace's keys): the decode
# step asked for, the one that ran ("static" where a compiled step's compile failed) and why.
STEP_KEY = "t3_step"


def decode_traces(
    tts: ChatterboxTTS,
    steps: Sequence[str],
    logdir: str | Path,
    tokens: int,
    text: str,
    seed: int = 0,
    policy: str = "float32",
    keep: int | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """For each decode step: T3's decode (weights as ``policy``) run once to warm up (compile,
    CUDA graphs, cache) and once under the profiler without phase hooks (they would make a
    compiled step compile again), its ``t3.decode`` region (the first ``keep`` steps, if given)
    cut to ``logdir/decode-STEP/t3.decode.json.gz``, the step that ran under ``STEP_KEY`` (and
    the model's device under ``profiling.MODEL_DEVICE_KEY``, as ``profile_run`` writes it).
    Returns those region traces by step, for ``read_traces`` here or on another machine (HTA
    need not be installed where they are taken). ``progress``: each stage (warm-up, profiled
    run, cut, per step) named on a bar on stderr as it runs (``core.progress.Stages``; the command
    line's)."""
    if tts.conds is None:
        raise NoVoiceError(fix=PREPARE_FIRST)
    ids = text_tokens(tts, text)
    # Every check before any folder is emptied: a refusal leaves the earlier traces as they were.
    _check_decode_tokens(tokens)
    _check_keep(keep)
    check_new_tokens(tts.t3, tokens)
    prefill = checked_prefill(tts, text, tokens, name="tokens")
    base, need = decode_plan(tts, policy), positions_needed(prefill, tokens)
    plans = {}
    for step in steps:
        mode = cast(StepMode, check_decode(step, tts.t3.device))
        # a static or compiled step's cache holds the run (the eager step's grows as it goes)
        size = base.max_cache_len if mode == "eager" else max(base.max_cache_len, need)
        plans[step] = replace(base, step=mode, max_cache_len=size)
    folders = {step: run_folder(logdir, f"decode-{step}") for step in steps}
    regions = {}
    with Stages("trace", 3 * len(plans), progress) as stage:
        for step, plan in plans.items():
            for profiled in (False, True):  # a warm-up, then the run that is traced
                stage(f"{step} step: {'profiled run' if profiled else 'warm-up'}")
                run = (
                    profile_run(tts, logdir, folders[step].name, phases=False) if profiled else nullcontext()
                )
                with run as prof:
                    rng = StreamRandom(seed).generator(tts.device)
                    ran = t3_decode(
                        tts.t3, tts.conds.t3, ids, max_new_tokens=tokens, plan=plan, generator=rng
                    )
                    if prof is not None:  # while it profiles: the trace is written as it stops
                        prof.add_metadata_json(STEP_KEY, json.dumps(_step_ran(step, plan, ran)))
            stage(f"{step} step: cutting {REGION}")
            path = trace_files(folders[step])[-1]
            regions[step] = region_trace(path, REGION, path.parent / DECODE_CUT, keep)
    return regions


def _check_decode_tokens(tokens: int) -> None:
    """A ConfigError for fewer than 2 tokens: the first token comes from the prefill, so with one
    no decode step runs and the profile has no ``REGION`` to cut."""
    if tokens < 2:
        raise ConfigError(
            f"tokens must be at least 2, got {tokens}: the first token comes from the prefill, and "
            f"the {REGION} region is the decode steps after it"
        )


def _check_keep(keep: int | None) -> None:
    """A ConfigError naming ``keep`` for fewer than 1 step: ``region_trace`` refuses it too, but
    as its own ``occurrences`` and only after the profiled run, its folder emptied."""
    if keep is not None and keep < 1:
        raise ConfigError(f"keep must be at least 1 (or None: every decode step), got {keep}")


def _step_ran(step: str, plan: DecodePlan, ran: DecodeResult) -> dict[str, str | None]:
    """The step asked for, the one that ran and why it fell back (None when it did not)."""
    built = [s for batch in (1, 2) if (s := plan.static_step(batch)) is not None]
    fallback = next((s.fallback_reason for s in built if s.fallback_reason), None)
    return {"asked": step, "ran": ran.step_mode, "fallback": fallback}


def _step_words(asked: str | None, ran: str | None, fallback: str | None) -> str:
    """``_step_ran``'s record in words: "compiled step", "compiled step (ran static: why)"; ""
    for a trace ``decode_traces`` did not take (none asked)."""
    if asked is None or ran == asked:
        return f"{asked} step" if asked else ""
    return f"{asked} step (ran {ran}" + (f": {fallback})" if fallback else ")")


def _what(row: Mapping[str, Any]) -> str:
    """What a ``decode_trace_report`` row read, in words: the region or the whole trace, and the
    decode step that ran in it where ``decode_traces`` took it."""
    read = "T3 decode region" if row.get("region") else WHOLE_TRACE
    ran = _step_words(row.get("step"), row.get("step_ran"), row.get("compile_fallback"))
    return ", ".join(filter(None, [read, ran]))


@dataclass
class ReadTrace(TraceReport):
    """A trace file's reading: of its ``REGION`` (``region``, when it has one) or of all of it
    (None), and the decode step that ran in it (``_step_ran``'s, when ``decode_traces`` took it)."""

    region: str | None = None
    step: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """``TraceReport.summary`` and what was read: the region, the step asked for and the one
        that ran (``step_ran``: "static" where a compiled step's compile failed, and why)."""
        step = self.step or {}
        ran = {
            "step": step.get("asked"),
            "step_ran": step.get("ran"),
            "compile_fallback": step.get("fallback"),
        }
        return {**super().summary(), "region": self.region, **ran}


def read_traces(paths: Mapping[str, Path], progress: bool = False) -> dict[str, ReadTrace]:
    """HolisticTraceAnalysis's reading of each trace (``trace_analysis.analyze``), by label: of
    its ``t3.decode`` region where it has one (a cut of ``decode_traces``' is its own region),
    else of the whole trace. ``progress``: each trace named on a bar on stderr as it is read
    (``core.progress.Stages``; the command line's)."""
    reports = {}
    with Stages("read", len(paths), progress) as stage:
        for label, path in paths.items():
            stage(f"reading {label}")
            trace = read_checked_trace(path)  # parsed once: a whole trace can be many MB
            if has_region(trace, REGION):
                with tempfile.TemporaryDirectory(prefix="region-") as tmp:  # HTA reads files
                    cut = analyze_cut(cut_region(trace, REGION, None, path), Path(tmp) / DECODE_CUT)
                report, region = replace(cut, trace=str(Path(path).resolve())), REGION
            else:
                report, region = analyze_trace(trace, path), None
            reports[label] = ReadTrace(**vars(report), region=region, step=trace.get(STEP_KEY))
    return reports


def decode_trace_report(reports: Mapping[str, TraceReport], note: str, top: int = 5) -> dict[str, Any]:
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
    """``decode_traces``' region traces as JSON, unread: where each is, how many device events
    it holds (none for a model that ran on the CPU, whatever GPU the machine has: the trace says
    where it ran, ``profiling.MODEL_DEVICE_KEY``; none for a model on CUDA means the profiler saw
    none of the step's kernels) and the step that ran in it (``_step_ran``'s record: a compiled
    step may have run static)."""
    traces = {step: read_trace(path) for step, path in regions.items()}
    return {
        "note": note,
        "table": [],
        "traces": {step: str(path) for step, path in regions.items()},
        "device_events": {step: device_events(trace) for step, trace in traces.items()},
        "steps": {step: trace.get(STEP_KEY) for step, trace in traces.items()},  # what ran
    }


def _read_heading(regions: bool, any_read: bool) -> str:
    """The text report's first line: what was read (T3 decode regions, or traces read whole) and
    whether HTA read any of it (not where it is not installed, nor a CPU-only trace)."""
    if not any_read:
        return f"HolisticTraceAnalysis read none of these {'T3 decode regions' if regions else 'traces'}:"
    return "T3 decode region, read by HolisticTraceAnalysis:" if regions else "Read by HolisticTraceAnalysis:"


def format_decode_traces(report: dict[str, Any]) -> str:
    """The side-by-side table of the traces HTA read, what each is (``_what``), a note for each
    it could not read, each one's attention and top kernels, and where the traces are."""
    traces = [f"{label}: {path}" for label, path in report["traces"].items()]
    if not report["table"]:  # cut_report
        counts = ", ".join(f"{step} {n}" for step, n in report["device_events"].items())
        head = f"T3 decode region traces, not read (trace --read reads them); device events: {counts}"
        # (a cut report written before 2026-12-05 has no steps)
        ran = [f"{label}: {_step_words(**step)}" for label, step in report.get("steps", {}).items() if step]
        return "\n".join([head, *ran, *traces, report["note"]])
    read = [row for row in report["table"] if row.get("idle_pct") is not None]
    lines = [_read_heading(all(row.get("region") for row in report["table"]), bool(read))]
    if read:
        cols = ["run", "device", "compute_pct", "idle_pct", "idle_host_wait_pct", "launches",
                "kernels_per_launch", "median_launch_delay_us", "gpu_shorter_than_launch_pct"]  # fmt: skip
        # shares and times to a tenth; the launch count, an int, as it is
        lines.append(render(pd.DataFrame(read)[cols], {c: ".1f" for c in cols[2:] if c != "launches"}))
    for row in report["table"]:
        lines.append(f"{row['run']}: {_what(row)}")
        if row not in read:
            lines.append(f"{row['run']}: {row['note']}")
            continue
        seen = ", ".join(row["attention_kernels"]) or "none of the fused SDPA kernels"
        lines.append(f"attention kernels on the device, {row['run']}: {seen} (found by kernel name)")
        top = pd.DataFrame(report["top_kernels"][row["run"]])[["kernel", "sum_us", "share_pct"]]
        top["kernel"] = top["kernel"].str.slice(0, 80)
        lines += [f"top kernels, {row['run']}:", render(top, {"sum_us": ".0f", "share_pct": ".1f"})]
    return "\n".join([*lines, report["note"], *traces])
