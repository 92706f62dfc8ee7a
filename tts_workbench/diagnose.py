"""The end-to-end diagnosis behind ``tts-workbench diagnose`` and ``make demo``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from chatterbox.tts import ChatterboxTTS, Conditionals

from . import plots
from .attention import (
    configured_backend,
    probe_backends,
    probe_output_attentions,
    record_kernels,
    why_not_flash,
)
from .clock import now
from .constants import SPEECH_VOCAB_SIZE, UPSTREAM_SENTENCE, dtype_name
from .dtypes import advice_for, autocast_or_refuse, census, conditionals_census, trace_dtypes
from .errors import NoVoiceError
from .generation import generate, prepare_voice
from .precision import restored
from .sources import components, load_model, make_reference_wav, model_summary


def run_diagnosis(
    model: str = "tiny",
    text: str = UPSTREAM_SENTENCE,
    reference: str | None = None,
    tokens: int = 150,
    seed: int = 0,
    device: str = "cpu",
    outdir: str | Path = "runs/diagnose",
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Build or load ``model``, condition it on a voice, generate once in float32 (recording
    attention kernels), probe the attention backend, then run the ``dtype``/``autocast``
    precision diagnosis. Writes ``speech.wav`` and ``generation.png`` under ``outdir``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = now(device)
    tts = load_model(model, device=device, seed=seed)
    build_s = now(device) - t0
    if reference is None:
        reference = str(make_reference_wav(outdir / "reference.wav", seed=seed))
    t0 = now(device)
    ref = prepare_voice(tts, reference)
    conditioning_s = now(device) - t0
    with record_kernels(tts) as kernels:
        result = generate(tts, text, max_new_tokens=tokens, seed=seed)
    wav_path = outdir / "speech.wav"
    sf.write(str(wav_path), result.wav, result.sample_rate)
    fig = plots.generation_figure(
        result.wav, result.sample_rate, result.seconds, f"{model}: {len(result.speech_tokens)} tokens"
    )
    plot_path = plots.save(fig, outdir / "generation.png")
    return {
        "model": model,
        "device": device,
        "torch": torch.__version__,
        "components": model_summary(tts),
        "reference": asdict(ref),
        "text": text,
        "speech_tokens": len(result.speech_tokens),
        "invalid_speech_tokens": result.invalid_tokens,
        "stopped_by": result.stopped_by,
        "token_cap": tokens,
        "audio_s": round(result.audio_s, 3),
        "build_s": round(build_s, 3),
        "conditioning_s": round(conditioning_s, 3),
        "generation_s": round(result.wall_s, 3),
        "phase_s": result.seconds,
        "rtf": round(result.rtf, 3),
        "wav": str(wav_path),
        "plot": str(plot_path),
        "kernels": kernels.by_phase(),
        "time_share_ms": kernels.share,
        "attention": diagnose_attention(tts),
        "precision": diagnose_precision(tts, reference, dtype, autocast, min(tokens, 20), seed, text),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text for a ``run_diagnosis`` report."""
    lines = [f"model source : {report['model']} on {report['device']} (torch {report['torch']})"]
    for name, comp in report["components"].items():
        lines.append(
            f"  {name:<6} {comp['parameters'] / 1e6:8.2f} M params  {comp['bytes'] / 2**20:8.1f} MiB  "
            f"{', '.join(comp['dtypes'])}"
        )
    ref = report["reference"]
    notes = "; ".join(ref["notes"]) or "used as is"
    lines.append(f"reference    : {ref['path']} ({ref['seconds']} s, {ref['sample_rate']} Hz): {notes}")
    lines.append(
        f"speech tokens: {report['speech_tokens']} (ended by the {report['stopped_by']}"
        + (
            f" of {report['token_cap']}: random weights never emit the stop token)"
            if report["stopped_by"] == "token cap"
            else ")"
        )
    )
    if report["invalid_speech_tokens"]:
        lines.append(
            f"{'':15}{report['invalid_speech_tokens']} ids >= {SPEECH_VOCAB_SIZE} dropped before S3Gen, "
            "as upstream does"
        )
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in report["phase_s"].items())
    lines.append(f"audio        : {report['audio_s']:.2f} s")
    lines.append(f"wall time    : {report['generation_s']:.2f} s ({phases})")
    lines.append(f"RTF          : {report['rtf']:.2f} (compute seconds per audio second; < 1 is real time)")
    lines.append(f"build        : {report['build_s']:.2f} s, conditioning {report['conditioning_s']:.2f} s")
    lines.append(f"wrote        : {report['wav']}, {report['plot']}")
    lines += ["", format_attention(report["kernels"], report["time_share_ms"], report["attention"])]
    lines += ["", format_precision(report["precision"])]
    return "\n".join(lines)


def _stage(tts: ChatterboxTTS, fn: Callable[[], Any], kernels: bool = False) -> dict[str, Any]:
    """Run ``fn`` under the dtype tracer (and the kernel recorder); never raise."""
    out: dict[str, Any] = {"error": None}
    t0 = now(tts.device)
    try:  # outside the tracer, so the tracer sees the exception and names the failing module
        with ExitStack() as stack:
            trace = stack.enter_context(trace_dtypes(tts))
            rec = stack.enter_context(record_kernels(tts)) if kernels else None
            fn()
    except Exception as e:  # reported with its module path and advice, not swallowed silently
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    out["seconds"] = round(now(tts.device) - t0, 3)
    out.update(trace.summary())
    first = trace.first_mismatch
    out["first_mismatch"] = vars(first) if first else None
    out["advice"] = advice_for(trace.failure or first)
    if rec is not None:
        out["kernels"] = rec.by_phase()
        out["time_share_ms"] = rec.share
    return out


def diagnose_precision(
    tts: ChatterboxTTS,
    reference: str,
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    tokens: int = 20,
    seed: int = 0,
    text: str = UPSTREAM_SENTENCE,
) -> dict[str, Any]:
    """The seed's half-precision failure, reproduced on purpose and traced; the caller's model
    is given back as it was (weights, dtypes, conditionals).

    ``tts`` must already be conditioned in float32. Its components are then cast to ``dtype``
    the way users do (``.to(torch.float16)``) while the conditionals stay float32, and three
    stages run under the tracer: conditioning on ``reference`` again, one capped generation,
    and S3Gen alone on valid tokens (so its own failure shows even when T3 fails first).
    """
    if tts.conds is None:
        raise NoVoiceError("condition the model in float32 before diagnose_precision")
    with restored(tts) as conds:
        return _precision_stages(tts, conds, reference, dtype, autocast, tokens, seed, text)


def _precision_stages(
    tts: ChatterboxTTS,
    conds: Conditionals,
    reference: str,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
    tokens: int,
    seed: int,
    text: str,
) -> dict[str, Any]:
    for module in components(tts).values():
        module.to(dtype)
    device = str(tts.device)
    stages: dict[str, Any] = {}
    with autocast_or_refuse(device, autocast):
        stages["conditioning"] = _stage(tts, lambda: prepare_voice(tts, reference))
        tts.conds = conds  # keep the float32 conditionals of the seed scenario
        stages["generate"] = _stage(
            tts, lambda: generate(tts, text, max_new_tokens=tokens, seed=seed), kernels=True
        )
        tts.conds = conds
        valid = torch.randint(
            0, SPEECH_VOCAB_SIZE, (1, tokens), generator=torch.Generator().manual_seed(seed)
        )
        stages["s3gen"] = _stage(
            tts, lambda: tts.s3gen.inference(speech_tokens=valid.to(device), ref_dict=dict(conds.gen))
        )
    return {
        "dtype": dtype_name(dtype),
        "autocast": dtype_name(autocast) if autocast else None,
        "census": [vars(r) for r in census(tts)],
        "conditionals": [vars(r) for r in conditionals_census(tts)],
        "stages": stages,
    }


def diagnose_attention(tts: ChatterboxTTS) -> dict[str, Any]:
    """Configured vs effective backend, the output_attentions probe, why not Flash, forced
    backends, for T3's decode shapes on the current device and dtype."""
    return {
        "configured": configured_backend(tts),
        "output_attentions": vars(probe_output_attentions(tts)),
        "why_not_flash": why_not_flash(tts),
        "forced_backends": [vars(p) for p in probe_backends(tts)],
    }


def format_attention(
    kernels_by_phase: dict[str, dict[str, int]], share_ms: dict[str, dict[str, float]], att: dict[str, Any]
) -> str:
    """Kernels per phase with attention's share of op time, then the backend probes."""
    lines = ["attention kernels per phase (float32 run above):"]
    for phase, kernels in kernels_by_phase.items():
        share = share_ms.get(phase, {})
        total = sum(share.values()) or 1.0
        lines.append(
            f"  {phase:<16} {', '.join(f'{k} x{n}' for k, n in kernels.items()):<40} "
            f"attention {100 * share.get('attention', 0) / total:4.1f}% of op time, "
            f"linear/matmul {100 * share.get('linear/matmul', 0) / total:4.1f}%"
        )
    lines.append(f"  backend      : {att['configured']}; {att['output_attentions']['verdict']}")
    for reason in att["why_not_flash"]:
        lines.append(f"  no Flash     : {reason}")
    forced = ", ".join(f"{p['backend']} {'ok' if p['ok'] else 'refused'}" for p in att["forced_backends"])
    lines.append(f"  forced alone : {forced}")
    return "\n".join(lines)


def format_precision(prec: dict[str, Any]) -> str:
    """One block per traced stage: error, first mismatch, failing module, fix."""
    lines = [
        f"precision {prec['dtype']}"
        + (f" under autocast {prec['autocast']}" if prec["autocast"] else "")
        + " (components cast, conditionals left float32, as in the seed):",
    ]
    for name, st in prec["stages"].items():
        if st["error"] is None and not st["mismatches"]:
            lines.append(f"  {name:<13}: ok, no dtype mismatch in {st['calls']} module calls")
            continue
        first = st["first_mismatch"]
        lines.append(f"  {name:<13}: {st['error'] or 'ran'}")
        if first and "mismatch" in first:  # a flagged call (a Failure is printed below)
            lines.append(
                f"  {'':13}  first mismatch: {first['module'] or '(outside a module)'} "
                f"inputs {first['inputs']} weights {first['weight']}"
            )
        if st["failure"]:
            f = st["failure"]
            lines.append(f"  {'':13}  failed in     : {f['module'] or '(outside a module)'} at {f['where']}")
        if st["advice"]:
            lines.append(f"  {'':13}  fix           : {st['advice']}")
    return "\n".join(lines)
