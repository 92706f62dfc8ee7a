"""The ``profile`` command: one upstream generation under the profiler, its op frame (saved
beside the trace), the top operators per phase read from it, the attention kernels it saw looked
up in the trace file that TensorBoard and Perfetto open, and HolisticTraceAnalysis's reading of
its decode region where the trace has device activity (``trace_report`` for the decode steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from chatterbox.tts import ChatterboxTTS

from ..core.errors import ConfigError
from ..core.progress import Stages
from ..core.tables import render
from ..instruments.attention import KernelRecord
from ..instruments.profiling import (
    DECODE_CUT,
    EAGER,
    KERNEL_OPS,
    op_events,
    op_frame,
    profile_run,
    read_trace,
    run_folder,
    top_ops,
    trace_files,
    write_ops,
)
from ..instruments.trace_analysis import analyze_cut, cut_region, events_within
from ..models.sources import token_cap_note
from ..runtime.generation import generate
from .diagnose import decode_step_kernels, decode_step_plan

# profile_generation's stages: the profiled generation, the op frame, the trace read and cut, HTA's
# reading of the cut, ops.csv, the decode step's kernels
PROFILE_STAGES = 6


def check_run(run: str) -> None:
    """Refuse a run name that names no folder inside the log folder: an absolute one, or one
    that climbs out of it with ``..``."""
    if Path(run).is_absolute() or ".." in Path(run).parts:
        raise ConfigError(
            f"argument --run: {run!r} names no folder inside --logdir: give a relative name without "
            "'..' (such as generation, or a/b for a folder below it)"
        )


def profile_generation(
    tts: ChatterboxTTS,
    logdir: str | Path,
    run: str,
    tokens: int,
    text: str,
    seed: int = 0,
    memory: bool = False,
    decode: str = "eager",
    model: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One upstream generation of ``tts`` (loaded from ``model``, a ``load_model`` source; None:
    unnamed) under ``profile_run``; its op frame is built once from the
    profile in memory and written to ``ops.csv`` beside the trace (``profiling.read_ops``), as is
    the cut of its ``t3.decode`` region, named in the report (``region_trace``: where HTA is not
    installed, ``device_trace`` says to read it with ``trace --read`` elsewhere).
    ``decode_step``: the attention kernel of the workbench's ``decode`` step (eager, static or
    compiled) and how it was found (``diagnose.decode_step_kernels``: for a compiled step,
    Inductor's generated code, which no profiler trace can show). ``progress``: each stage named
    on a bar on stderr as it runs (``core.progress.Stages``; the command line's)."""
    check_run(run)
    step_plan = decode_step_plan(tts, text, decode, tokens)  # a text no step can decode: refused first
    run_folder(logdir, run)  # as profile_run makes it: a --logdir that is a file refused before the bar
    with Stages("profile", PROFILE_STAGES, progress) as stage:
        stage("profiled generation")
        with profile_run(tts, logdir, run, memory=memory) as prof:
            result = generate(tts, text, max_new_tokens=tokens, seed=seed)
        path = trace_files(Path(logdir) / run)[-1]
        stage("op frame")
        ops = op_frame(op_events(prof))
        top = top_ops(ops, by="total_ms")
        recorded = sorted(KernelRecord(ops).kernels("t3.decode"))
        # The trace is parsed once. The kernel check reads the decode steps cut out of it: the op
        # the frame counted must be inside the t3.decode ranges of the file the viewers open.
        stage("reading the trace")
        trace = read_trace(path)
        steps = cut_region(trace, "t3.decode", path=path)
        in_region = events_within(trace, "t3.decode", path)  # inside the ranges, not between them
        region = path.parent / DECODE_CUT
        stage("reading t3.decode with HTA")
        device = analyze_cut(steps, region)
        stage("writing ops.csv")
        ops_path = write_ops(ops, path.parent)
        stage(f"finding the {step_plan.step} step's kernels")
        decode_step = decode_step_kernels(tts, text, decode, seed, tokens, plan=step_plan)
    return {
        "run": run,
        "logdir": str(logdir),
        "trace": str(path),
        "ops": str(ops_path),
        "tokens": len(result.speech_tokens),
        "note": f"{len(result.speech_tokens)} tokens, ended by the {result.stopped_by}"
        + (f" ({token_cap_note(model)})" if result.stopped_by == "token cap" else ""),
        "top_ops": {
            str(phase): rows.drop(columns="phase").to_dict("records")
            for phase, rows in top.groupby("phase", observed=True)
        },
        "recorded_decode_kernels": recorded,
        "recorded_kernels_in_trace": {k: in_trace(k, in_region) for k in recorded},
        "decode_step": decode_step,
        "device_trace": device.summary(),
        "region_trace": str(region),
        "open_with": [
            f"tensorboard --logdir {logdir}  (PYTORCH_PROFILER tab)",
            f"https://ui.perfetto.dev: {path}",
        ],
    }


def in_trace(kernel: str, events: list[dict[str, Any]]) -> bool:
    """Whether trace ``events`` show the attention ``kernel``: its op by name, and for eager
    attention a softmax over 4-D scores (sampling's softmax over the vocabulary, 2-D, runs in
    ``t3.decode`` too). The profile records shapes: the trace has each op's "Input Dims"."""
    op = KERNEL_OPS[kernel]
    return any(
        e["name"] == op and (kernel != EAGER or len((e.get("args", {}).get("Input Dims") or [[]])[0]) == 4)
        for e in events
    )


def format_profile(report: dict[str, Any]) -> str:
    """The top operators per phase, the kernel check, and where the trace and its decode region are."""
    top = pd.DataFrame([{"phase": p, **row} for p, rows in report["top_ops"].items() for row in rows])
    step = report["decode_step"]
    seen = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in report["recorded_kernels_in_trace"].items())
    return "\n".join(
        [
            "top operators per phase by total_ms (inclusive CPU time; self_ms: the op alone):",
            render(top, {"self_ms": ".1f", "total_ms": ".1f"}),
            f"attention kernel(s) in t3.decode, found in the trace file's t3.decode ranges: {seen}",
            f"T3 decode step {step['step']}: {', '.join(step['kernels'])} (found by {step['found_by']})",
            f"t3.decode on the device (HolisticTraceAnalysis): {_device_line(report['device_trace'])}",
            f"t3.decode region trace: {report['region_trace']} (read it with tts-workbench trace --read)",
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
