"""The ``profile`` and ``trace`` commands.

``profile``: one upstream generation under the profiler, its op frame (saved beside the trace),
the top operators per phase read from it, the attention kernels it saw looked up in the trace
file that TensorBoard and Perfetto open, and HolisticTraceAnalysis's reading of its decode
region where the trace has device activity.

``trace``: T3's decode with each decode step (eager, static, compiled) profiled after a warm-up,
its ``t3.decode`` region cut out and read by HolisticTraceAnalysis: how much of the decode the
device sat idle waiting for the host, side by side per step. The cutting and the reading are
apart (``decode_traces``, ``read_traces``): a GPU machine without HTA cuts, this one reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pandas as pd
from chatterbox.tts import ChatterboxTTS

from ..core.rng import StreamRandom
from ..core.tables import render
from ..instruments.attention import KernelRecord
from ..instruments.profiling import (
    KERNEL_OPS,
    op_frame,
    profile_run,
    top_ops,
    trace_files,
    trace_names,
    write_ops,
)
from ..instruments.trace_analysis import TraceReport, analyze, analyze_region, compare, region_trace
from ..runtime.decode import StepMode, t3_decode, text_tokens
from ..runtime.generation import generate
from ..runtime.optimized import check_decode, decode_plan
from .diagnose import decode_step_kernels


def profile_generation(
    tts: ChatterboxTTS,
    logdir: str | Path,
    run: str,
    tokens: int,
    text: str,
    seed: int = 0,
    memory: bool = False,
    decode: str = "eager",
) -> dict[str, Any]:
    """One upstream generation under ``profile_run``; its op frame is built once from the
    profile in memory and written to ``ops.csv`` beside the trace (``profiling.read_ops``).
    ``decode_step``: the attention kernel of the workbench's ``decode`` step (eager, static or
    compiled) and how it was found (``diagnose.decode_step_kernels``: for a compiled step,
    Inductor's generated code, which no profiler trace can show)."""
    with profile_run(tts, logdir, run, memory=memory) as prof:
        result = generate(tts, text, max_new_tokens=tokens, seed=seed)
    path = trace_files(Path(logdir) / run)[-1]
    ops = op_frame(prof.events())
    top = top_ops(ops, by="total_ms")
    recorded = sorted(KernelRecord(ops).kernels("t3.decode"))
    in_trace = trace_names(path)
    device = analyze_region(path, "t3.decode", path.parent / "t3.decode.json.gz")
    return {
        "run": run,
        "logdir": str(logdir),
        "trace": str(path),
        "ops": str(write_ops(ops, path.parent)),
        "tokens": len(result.speech_tokens),
        "note": f"random weights never emit a stop token: generation capped at {tokens} tokens",
        "top_ops": {
            str(phase): rows.drop(columns="phase").to_dict("records")
            for phase, rows in top.groupby("phase", observed=True)
        },
        "recorded_decode_kernels": recorded,
        "recorded_kernels_in_trace": {k: KERNEL_OPS[k] in in_trace for k in recorded},
        "decode_step": decode_step_kernels(tts, text, decode, seed, min(tokens, 20)),
        "device_trace": device.summary(),
        "open_with": [
            f"tensorboard --logdir {logdir}  (PYTORCH_PROFILER tab)",
            f"https://ui.perfetto.dev: {path}",
        ],
    }


def format_profile(report: dict[str, Any]) -> str:
    """The top operators per phase, the kernel check, and where the trace is."""
    top = pd.DataFrame([{"phase": p, **row} for p, rows in report["top_ops"].items() for row in rows])
    step = report["decode_step"]
    seen = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in report["recorded_kernels_in_trace"].items())
    return "\n".join(
        [
            "top operators per phase by total_ms (inclusive CPU time; self_ms: the op alone):",
            render(top, {"self_ms": ".1f", "total_ms": ".1f"}),
            f"attention kernel(s) in t3.decode, found in the trace file: {seen}",
            f"T3 decode step {step['step']}: {', '.join(step['kernels'])} (found by {step['found_by']})",
            f"t3.decode on the device (HolisticTraceAnalysis): {_device_line(report['device_trace'])}",
            report["note"],
            f"trace: {report['trace']}",
            f"op frame: {report['ops']} (profiling.read_ops)",
            *report["open_with"],
        ]
    )


def _device_line(summary: dict[str, Any]) -> str:
    if "idle_pct" not in summary:
        return str(summary["note"])
    return (
        f"{summary['device']}: idle {summary['idle_pct']:.1f}% of the span "
        f"({summary['idle_host_wait_pct']:.0f}% of it waiting for the host), "
        f"median launch delay {summary['median_launch_delay_us']:.0f} us, "
        f"attention kernels {', '.join(summary['attention_kernels']) or 'none fused'}"
    )


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
    assert tts.conds is not None  # the caller prepared a voice
    ids = text_tokens(tts, text)
    regions = {}
    for step in steps:
        plan = replace(decode_plan(tts, policy), step=cast(StepMode, check_decode(step, tts.t3.device)))
        for profiled in (False, True):  # a warm-up, then the run that is traced
            with profile_run(tts, logdir, f"decode-{step}", phases=False) if profiled else nullcontext():
                rng = StreamRandom(seed).generator(tts.device)
                t3_decode(tts.t3, tts.conds.t3, ids, max_new_tokens=tokens, plan=plan, generator=rng)
        path = trace_files(Path(logdir) / f"decode-{step}")[-1]
        regions[step] = region_trace(path, "t3.decode", path.parent / "t3.decode.json.gz", keep)
    return regions


def read_traces(paths: Mapping[str, Path]) -> dict[str, TraceReport]:
    """HolisticTraceAnalysis's reading of each trace (``trace_analysis.analyze``), by label."""
    return {label: analyze(path) for label, path in paths.items()}


def decode_trace_report(reports: dict[str, TraceReport], note: str, top: int = 5) -> dict[str, Any]:
    """``read_traces``' reports as JSON: the side-by-side table and each trace's top kernels."""
    return {
        "note": note,
        "table": compare(reports).to_dict("records"),
        "traces": {step: r.trace for step, r in reports.items()},
        "top_kernels": {step: r.kernels.head(top).to_dict("records") for step, r in reports.items()},
    }


def format_decode_traces(report: dict[str, Any]) -> str:
    """The side-by-side table, each step's top kernels, and where the region traces are."""
    traces = [f"{label}: {path}" for label, path in report["traces"].items()]
    if not report["table"]:  # --cut-only
        return "\n".join(["T3 decode region traces, not read (HolisticTraceAnalysis: trace --read):", *traces,
                          report["note"]])  # fmt: skip
    table = pd.DataFrame(report["table"])
    lines = ["T3 decode region, read by HolisticTraceAnalysis:"]
    if "idle_pct" not in table:
        return "\n".join([*lines, str(table["note"].iloc[0]), report["note"]])
    cols = ["run", "device", "compute_pct", "idle_pct", "idle_host_wait_pct", "launches",
            "median_launch_delay_us", "gpu_shorter_than_launch_pct"]  # fmt: skip
    lines.append(render(table[cols], {c: ".1f" for c in cols[2:]}))
    for row in report["table"]:
        seen = ", ".join(row["attention_kernels"]) or "none of the fused SDPA kernels"
        lines.append(
            f"attention kernels on the device, {row['run']}: {seen} (found by kernel name in the trace)"
        )
    for step, kernels in report["top_kernels"].items():
        top = pd.DataFrame(kernels)[["kernel", "sum_us", "share_pct"]]
        top["kernel"] = top["kernel"].str.slice(0, 80)
        lines += [f"top kernels, {step}:", render(top, {"sum_us": ".0f", "share_pct": ".1f"})]
    lines += [report["note"], *traces]
    return "\n".join(lines)
