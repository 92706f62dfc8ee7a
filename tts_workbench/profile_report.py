"""The ``profile`` command: one upstream generation under the profiler, its trace read back
from disk, and the attention kernel the recorder saw looked up in that trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatterbox.tts import ChatterboxTTS

from .attention import KERNEL_OPS, record_kernels
from .generation import generate
from .profiling import OpRow, format_trace_table, profile_run, read_trace, trace_files


def profile_generation(
    tts: ChatterboxTTS,
    logdir: str | Path,
    run: str,
    tokens: int,
    text: str,
    seed: int = 0,
    memory: bool = False,
) -> dict[str, Any]:
    """One upstream generation under ``profile_run``; then the trace is read back from disk and
    checked against the attention recorder (a second, short generation: profilers do not nest)."""
    with profile_run(tts, logdir, run, memory=memory):
        result = generate(tts, text, max_new_tokens=tokens, seed=seed)
    path = trace_files(Path(logdir) / run)[-1]
    table = read_trace(path, top=None)
    with record_kernels(tts) as rec:
        generate(tts, text, max_new_tokens=min(tokens, 4), seed=seed)
    recorded = sorted(rec.kernels("t3.decode"))
    in_trace = {op.op for op in table.get("t3.decode", [])}
    return {
        "run": run,
        "logdir": str(logdir),
        "trace": str(path),
        "tokens": len(result.speech_tokens),
        "note": f"random weights never emit a stop token: generation capped at {tokens} tokens",
        "top_ops": {phase: [vars(r) for r in rows[:8]] for phase, rows in table.items()},
        "recorded_decode_kernels": recorded,
        "recorded_kernels_in_trace": {k: KERNEL_OPS[k] in in_trace for k in recorded},
        "open_with": [
            f"tensorboard --logdir {logdir}  (PYTORCH_PROFILER tab)",
            f"https://ui.perfetto.dev: {path}",
        ],
    }


def format_profile(report: dict[str, Any]) -> str:
    table = {p: [OpRow(**r) for r in rows] for p, rows in report["top_ops"].items()}
    seen = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in report["recorded_kernels_in_trace"].items())
    return "\n".join(
        [
            format_trace_table(table),
            f"attention kernel(s) the recorder saw in t3.decode, found in the trace: {seen}",
            report["note"],
            f"trace: {report['trace']}",
            *report["open_with"],
        ]
    )
