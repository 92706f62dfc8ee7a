"""Run upstream generation with a token cap and per-phase timing.

Upstream ``ChatterboxTTS.generate`` hard-codes ``max_new_tokens=1000`` (about 10 minutes of
full-size T3 on a 2-core CPU) and random weights never emit the stop token. Rather than copy
``generate``, we shadow ``t3.inference`` on the instance for the duration of a call, so the
upstream code path runs unchanged with a smaller cap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE
from chatterbox.tts import ChatterboxTTS

from .sources import ReferenceInfo, SourceError, check_reference

UPSTREAM_SENTENCE = (
    "Ezreal and Jinx teamed up with Ahri, Yasuo, and Teemo to take down the enemy's Nexus "
    "in an epic late-game pentakill."
)


@dataclass
class PhaseTimes:
    """Wall seconds and call counts per labelled method."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, dt: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + dt
        self.calls[label] = self.calls.get(label, 0) + 1


@contextmanager
def shadow(
    obj: object, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Replace method ``name`` of ``obj`` by ``wrap(original)`` while inside, then restore it.

    The wrapper is an instance attribute; whatever the instance had before (another wrapper,
    or nothing) is put back on exit, so shadows nest.
    """
    before = obj.__dict__.get(name, _MISSING)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if before is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


_MISSING = object()


@contextmanager
def timed(methods: dict[str, tuple[object, str]]) -> Iterator[PhaseTimes]:
    """Time calls to ``getattr(obj, name)`` for each ``label: (obj, name)`` while inside."""
    times = PhaseTimes()

    def timer(label: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def inner(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    times.add(label, time.perf_counter() - t0)

            return inner

        return wrap

    with ExitStack() as stack:
        for label, (obj, name) in methods.items():
            stack.enter_context(shadow(obj, name, timer(label)))
        yield times


@contextmanager
def token_cap(tts: ChatterboxTTS, max_new_tokens: int) -> Iterator[dict[str, Any]]:
    """Cap T3 generation at ``max_new_tokens`` inside upstream ``generate``.

    Yields a dict that receives the raw tokens of the last ``t3.inference`` call.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    seen: dict[str, Any] = {}

    def wrap(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def capped(**kwargs: Any) -> torch.Tensor:
            kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens") or max_new_tokens, max_new_tokens)
            seen["tokens"] = original(**kwargs)
            return seen["tokens"]

        return capped

    with shadow(tts.t3, "inference", wrap):
        yield seen


@dataclass
class GenerationResult:
    """One generation: audio, tokens, and where the time went."""

    wav: np.ndarray
    sample_rate: int
    speech_tokens: list[int]
    stopped_by: str  # "stop token" or "token cap"
    invalid_tokens: int  # ids >= 6561 that S3Gen cannot vocode (dropped, as upstream does)
    seconds: dict[str, float]
    wall_s: float

    @property
    def audio_s(self) -> float:
        return len(self.wav) / self.sample_rate

    @property
    def rtf(self) -> float:
        """Real-time factor: compute seconds per second of audio (below 1 is faster than real time)."""
        return self.wall_s / self.audio_s if self.audio_s else float("inf")


def prepare_voice(tts: ChatterboxTTS, reference: str, exaggeration: float = 0.5) -> ReferenceInfo:
    """Validate ``reference`` and run upstream ``prepare_conditionals`` on it."""
    info = check_reference(reference)
    tts.prepare_conditionals(reference, exaggeration=exaggeration)
    return info


def generate(
    tts: ChatterboxTTS,
    text: str = UPSTREAM_SENTENCE,
    max_new_tokens: int = 150,
    seed: int = 0,
    **sampling: Any,
) -> GenerationResult:
    """Upstream ``tts.generate(text, **sampling)`` with a token cap, a seed and phase timings."""
    if not text or not text.strip():
        raise SourceError("text is empty: give at least one word to speak")
    if tts.conds is None and not sampling.get("audio_prompt_path"):
        raise SourceError("no voice: call prepare_voice(tts, wav) first or pass audio_prompt_path")
    torch.manual_seed(seed)
    methods = {
        "t3": (tts.t3, "inference"),
        "s3gen.flow": (tts.s3gen, "flow_inference"),
        "s3gen.vocoder": (tts.s3gen, "hift_inference"),
        "watermark": (tts.watermarker, "apply_watermark"),
    }
    t0 = time.perf_counter()
    with token_cap(tts, max_new_tokens) as seen, timed(methods) as times:
        wav = tts.generate(text, **sampling)
    wall = time.perf_counter() - t0
    raw = seen["tokens"][0].tolist()
    stopped = "stop token" if raw and raw[-1] == tts.t3.hp.stop_speech_token else "token cap"
    return GenerationResult(
        wav=wav.squeeze(0).numpy(),
        sample_rate=tts.sr,
        speech_tokens=raw,
        stopped_by=stopped,
        invalid_tokens=sum(t >= SPEECH_VOCAB_SIZE for t in raw),
        seconds={k: round(v, 4) for k, v in times.seconds.items()},
        wall_s=wall,
    )
