"""The end-to-end diagnosis behind ``tts-workbench diagnose`` and ``make demo``."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from . import plots
from .generation import UPSTREAM_SENTENCE, generate, prepare_voice
from .sources import load_model, make_reference_wav, model_summary


def run_diagnosis(
    model: str = "tiny",
    text: str = UPSTREAM_SENTENCE,
    reference: str | None = None,
    tokens: int = 150,
    seed: int = 0,
    device: str = "cpu",
    outdir: str | Path = "runs/diagnose",
) -> dict[str, Any]:
    """Build or load ``model``, condition it on a voice, generate once, and report.

    Writes ``speech.wav`` and ``generation.png`` under ``outdir``.
    """
    outdir = Path(outdir)
    t0 = time.perf_counter()
    tts = load_model(model, device=device, seed=seed)
    build_s = time.perf_counter() - t0
    if reference is None:
        reference = str(make_reference_wav(outdir / "reference.wav", seed=seed))
    t0 = time.perf_counter()
    ref = prepare_voice(tts, reference)
    conditioning_s = time.perf_counter() - t0
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
            f"{'':15}{report['invalid_speech_tokens']} ids >= 6561 dropped before S3Gen, as upstream does"
        )
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in report["phase_s"].items())
    lines.append(f"audio        : {report['audio_s']:.2f} s")
    lines.append(f"wall time    : {report['generation_s']:.2f} s ({phases})")
    lines.append(f"RTF          : {report['rtf']:.2f} (compute seconds per audio second; < 1 is real time)")
    lines.append(f"build        : {report['build_s']:.2f} s, conditioning {report['conditioning_s']:.2f} s")
    lines.append(f"wrote        : {report['wav']}, {report['plot']}")
    return "\n".join(lines)
