"""torch.profiler helpers: phase-labelled regions on the real modules, and per-region tables.

``phase_regions`` opens a ``record_function`` range named by phase around each call of the
methods that make up a phase, so every profiler event can be attributed to its phase.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from chatterbox.tts import ChatterboxTTS
from torch.autograd.profiler import record_function
from torch.autograd.profiler_util import FunctionEvent

from .generation import shadow

PHASES = ("conditioning", "t3.conditioning", "t3.prefill", "t3.decode", "s3gen.flow", "s3gen.vocoder")


def _phase_methods(tts: ChatterboxTTS, extra_tfmrs: Sequence[object]) -> list[tuple[object, str, str | None]]:
    # Methods, not module hooks: upstream calls `flow.inference`, `mel2wav.inference`,
    # `tokenizer.forward` directly, which module hooks never see.
    s3 = tts.s3gen
    return [
        (tts.ve, "embeds_from_wavs", "conditioning"),
        (s3.tokenizer, "forward", "conditioning"),
        (s3.speaker_encoder, "inference", "conditioning"),
        (tts.t3.cond_enc, "forward", "t3.conditioning"),
        # prefill or decode, by the number of new positions (extra_tfmrs: decode copies in another dtype)
        (tts.t3.tfmr, "forward", None),
        *((m, "forward", None) for m in extra_tfmrs if m is not tts.t3.tfmr),
        (s3.flow, "inference", "s3gen.flow"),
        (s3.mel2wav, "inference", "s3gen.vocoder"),
    ]


@contextmanager
def phase_regions(tts: ChatterboxTTS, extra_tfmrs: Sequence[object] = ()) -> Iterator[None]:
    """Wrap every call of the phase methods in a profiler range named by its phase."""

    def labelled(label: str | None):
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def inner(*args: Any, **kwargs: Any) -> Any:
                name = label
                if name is None:
                    x = kwargs.get("inputs_embeds", args[0] if args else None)
                    name = "t3.prefill" if x is not None and x.shape[1] > 1 else "t3.decode"
                with record_function(name):
                    return fn(*args, **kwargs)

            return inner

        return wrap

    with ExitStack() as stack:
        for obj, method, label in _phase_methods(tts, extra_tfmrs):
            stack.enter_context(shadow(obj, method, labelled(label)))
        yield


def region_of(event: FunctionEvent) -> str:
    """The innermost phase range enclosing ``event`` (``other`` when none)."""
    return next((e.name for e in (event, *ancestors(event)) if e.name in PHASES), "other")


def ancestors(event: FunctionEvent) -> Iterator[FunctionEvent]:
    e = event.cpu_parent
    while e is not None:
        yield e
        e = e.cpu_parent
