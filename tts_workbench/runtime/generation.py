"""Run upstream generation with a token cap and per-phase timing.

Upstream ``ChatterboxTTS.generate`` hard-codes ``max_new_tokens=1000`` (``UPSTREAM_GENERATE_CAP``,
about 10 minutes of full-size T3 on a 2-core CPU) and random weights almost never sample the stop
token. Rather than copy ``generate``, we shadow ``t3.inference`` on the instance for the duration
of a call, so the upstream code path runs unchanged with a smaller cap.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.clock import Stopwatch, now
from ..core.constants import SAMPLE_RATE, SPEECH_VOCAB_SIZE, UPSTREAM_GENERATE_CAP, UPSTREAM_SENTENCE
from ..core.errors import (
    PASS_A_PATH,
    ConfigError,
    EmptyTextError,
    NoSpeechError,
    NoVoiceError,
    SourceError,
)
from ..core.families import TTSModel, family_of
from ..core.patching import around, routed, shared
from ..core.rng import StreamRandom, not_drawing
from ..instruments.latency import real_time_factor
from ..instruments.profiling import t3_phase
from ..models.reference import ReferenceInfo, check_reference
from ..models.vocode import tail_tokens
from .alignment import upstream_alignment
from .decode import (
    checked_cap,
    checked_seed,
    generated_ids,
    invalid_ids,
    is_turbo,
    spoken_language,
    text_tokens,
)
from .sampling import check_sampling


@dataclass
class PhaseTimes:
    """Synchronised seconds and call counts per labelled method (see ``timed``)."""

    watches: dict[str, Stopwatch] = field(default_factory=dict)

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per phase label, for the phases that ran."""
        return {label: w.seconds for label, w in self.watches.items() if w.calls}

    @property
    def calls(self) -> dict[str, int]:
        """Calls per phase label, for the phases that ran."""
        return {label: w.calls for label, w in self.watches.items() if w.calls}


@contextmanager
def timed(
    methods: dict[str, tuple[object, str]], device: torch.device | str | None = None
) -> Iterator[PhaseTimes]:
    """Time calls to ``getattr(obj, name)`` for each ``label: (obj, name)`` while inside, on a
    clock that waits for ``device`` (so a phase is not charged for its neighbour's queued work)."""
    times = PhaseTimes({label: Stopwatch(device) for label in methods})
    with ExitStack() as stack:
        for label, (obj, name) in methods.items():
            stack.enter_context(around(obj, name, times.watches[label].run_call, this_thread=True))
        yield times


@contextmanager
def t3_timed(tts: TTSModel, times: PhaseTimes) -> Iterator[None]:
    """Add T3's two phases to ``times``: ``t3.prefill``, its transformer and speech head over
    more than one new position; ``t3.decode``, from the end of the prefill to the end of T3's
    inference (every step's forward and sampling), its ``calls`` the one-position forwards.
    What the inference does before its prefill (input embeddings, building its backend) is in
    neither: a per-step time from ``t3.decode`` does not change with the token count."""
    prefill = times.watches.setdefault("t3.prefill", Stopwatch(tts.device))
    decode = times.watches.setdefault("t3.decode", Stopwatch(tts.device))
    prefill_end: list[float] = []

    @contextmanager
    def phase(args: tuple[Any, ...], kwargs: dict[str, Any], forward: bool) -> Iterator[None]:
        if t3_phase(args, kwargs) == "t3.prefill":
            with prefill.running():
                yield
            prefill_end[:] = [now(tts.device)]
        else:
            decode.calls += forward  # the transformer's, not the head's
            yield

    @contextmanager
    def inference(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
        prefill_end.clear()
        yield
        if prefill_end:
            decode.seconds += now(tts.device) - prefill_end[0]

    with ExitStack() as stack:
        stack.enter_context(around(tts.t3.tfmr, "forward", lambda a, k: phase(a, k, True), this_thread=True))
        stack.enter_context(
            around(tts.t3.speech_head, "forward", lambda a, k: phase(a, k, False), this_thread=True)
        )
        stack.enter_context(around(tts.t3, family_of(tts).t3_inference, inference, this_thread=True))
        yield


@contextmanager
def token_cap(tts: TTSModel, max_new_tokens: int) -> Iterator[dict[str, Any]]:
    """Cap T3 generation at ``max_new_tokens`` inside upstream ``generate`` (any family).

    Yields a dict that receives the raw tokens of the last T3 inference call (``tokens``) and
    the cap it ran under (``cap``: the lower of ``max_new_tokens`` and upstream generate's own).
    """
    if max_new_tokens < 1:  # not check_new_tokens: upstream generate caps a longer run itself
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    seen: dict[str, Any] = {}
    family = family_of(tts)

    def wrap(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def capped(**kwargs: Any) -> torch.Tensor:
            # The lower of the caller's cap and generate's own.
            if family.name == "turbo":  # one token from the prefill, then max_gen_len
                own = kwargs.get("max_gen_len", UPSTREAM_GENERATE_CAP)
                kwargs["max_gen_len"] = min(own, max_new_tokens - 1)
                seen["cap"] = kwargs["max_gen_len"] + 1
            else:
                kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens") or max_new_tokens, max_new_tokens)
                seen["cap"] = kwargs["max_new_tokens"]
            seen["tokens"] = tokens = original(**kwargs)
            if family.name == "multilingual":
                # Random weights sample ids beyond the 6561 speech tokens, which trained weights do
                # not. Standard generate drops them; multilingual generate keeps them (its
                # drop_invalid_tokens only cuts at start/stop) and S3Gen's embedding would fail,
                # so they are dropped here, as standard does (counted in invalid_tokens).
                hp = tts.t3.hp
                keep = (
                    (tokens < SPEECH_VOCAB_SIZE)
                    | (tokens == hp.start_speech_token)
                    | (tokens == hp.stop_speech_token)
                )
                tokens = tokens[:, keep[0]]
            vocoded_ids(tts, tokens[0].tolist())  # none: refused before upstream's S3Gen fails on them
            return tokens

        return capped

    with routed(tts.t3, family.t3_inference, wrap):  # this thread's generation only
        yield seen


def vocoded_ids(tts: TTSModel, ids: list[int]) -> list[int]:
    """The ids upstream ``generate`` hands S3Gen after T3 sampled ``ids`` (``decode.generated_ids``,
    then Turbo's closing silence); a NoSpeechError where there are none, on which S3Gen's
    convolutions would fail."""
    speech = generated_ids(ids, tts.t3) + tail_tokens(tts.s3gen)
    if not speech:
        raise NoSpeechError(len(ids))
    return speech


def ended_by(raw: list[int], stop_token: int, cap: int, asked: int) -> str:
    """What ended an upstream generation of ``raw`` tokens capped at ``cap`` (the lower of the
    ``asked`` cap and upstream generate's own): "stop token", "token cap", or upstream's limit
    when it is lower than what was asked for. Turbo's inference drops the stop token it
    sampled: a stream shorter than its cap is how that shows."""
    if (raw and raw[-1] == stop_token) or len(raw) < cap:
        return "stop token"
    return "token cap" if cap >= asked else f"upstream generate's own cap of {cap} tokens"


@contextmanager
def _drawing_quietly(tts: TTSModel, rng: StreamRandom) -> Iterator[None]:
    """Upstream's draws in this thread from ``rng`` (``rng.drawing()``, a TorchFunctionMode every
    torch call passes through), the mode switched off (``rng.not_drawing``, other modes kept)
    where nothing is drawn: T3's backbone and the flow's encoder and estimator, most of the
    calls. With it on there too, T3's decode took about 15% longer (tiny model, CPU; about 4%
    with it off there), time the phases would be charged that upstream after
    ``torch.manual_seed`` does not spend."""
    with ExitStack() as stack:
        stack.enter_context(rng.drawing())
        for module in (tts.t3.tfmr, tts.s3gen.flow.encoder, tts.s3gen.flow.decoder.estimator):
            stack.enter_context(around(module, "forward", lambda a, k: not_drawing(), this_thread=True))
        yield


@dataclass
class GenerationResult:
    """One generation: audio, tokens, and where the time went."""

    wav: np.ndarray
    sample_rate: int
    speech_tokens: list[int]
    stopped_by: str  # "stop token", "token cap" or upstream's own cap (``ended_by``)
    invalid_tokens: int  # ids >= SPEECH_VOCAB_SIZE that S3Gen cannot vocode (dropped, as upstream does)
    seconds: dict[str, float]
    wall_s: float
    decode_steps: int = 0  # T3's one-position forwards, timed together in seconds["t3.decode"]

    @property
    def audio_s(self) -> float:
        """Seconds of audio generated."""
        return len(self.wav) / self.sample_rate

    @property
    def rtf(self) -> float:
        """Real-time factor: wall seconds per second of audio (below 1 is faster than real time)."""
        return real_time_factor(self.wall_s, self.audio_s)


def _float32_loudness(original: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Turbo's ``norm_loudness`` multiplies the float32 reference by a NumPy float64 gain, which
    NumPy 2 promotes to float64, and the S3 tokenizer's float32 mel filters then refuse it
    ("expected scalar type Double but found Float"): keep the reference float32."""

    def norm_loudness(wav: np.ndarray, sr: int, target_lufs: float = -27) -> np.ndarray:
        return np.asarray(original(wav, sr, target_lufs), dtype=np.float32)

    return norm_loudness


def _loaded_samples(info: ReferenceInfo) -> int:
    """The samples of a reference as upstream Turbo's ``prepare_conditionals`` loads it and
    asserts on (``len(wav) / sr > 5.0``): librosa.load at S3Gen's rate, whose resampling makes
    ``ceil(frames * ratio)`` of them. Not ``info.seconds``: rounded to 3 decimals, 5.0004 s read 5.0."""
    return int(np.ceil(info.frames * (SAMPLE_RATE / info.sample_rate)))  # as librosa.resample computes it


def prepare_voice(
    tts: TTSModel, reference: str, exaggeration: float = 0.5, norm_loudness: bool = True
) -> ReferenceInfo:
    """Validate ``reference`` and run upstream ``prepare_conditionals`` on it (for Turbo with its
    loudness normalisation kept in float32, see ``_float32_loudness``; ``norm_loudness`` is
    Turbo's switch for it, the other families do not normalise)."""
    family = family_of(tts)
    info = check_reference(reference)
    turbo = family.name == "turbo"
    if turbo and (samples := _loaded_samples(info)) / SAMPLE_RATE <= 5.0:  # upstream asserts it
        raise SourceError(
            f"Turbo needs a reference longer than 5 s; {reference} has {samples / SAMPLE_RATE:.5f} s "
            f"({samples} samples at {SAMPLE_RATE} Hz, as upstream loads it)"
        )
    # In turn: a generate running on this model reads the voice again for S3Gen after T3.
    # Without grad: upstream embeds the x-vector with autograd on, and the voice then held
    # CAMPPlus's saved activations through its grad_fn (181 MB for a 10 s reference, 2026-12-06).
    with (
        voice_turn(tts),
        shared(tts, "norm_loudness", _float32_loudness) if turbo else nullcontext(),
        torch.no_grad(),
    ):
        tts.prepare_conditionals(
            reference, exaggeration=exaggeration, **({"norm_loudness": norm_loudness} if turbo else {})
        )
    return info


def checked_voice(conds: Any, text: str, fix: str = PASS_A_PATH) -> Any:
    """``conds``, the voice to speak ``text`` with (upstream ``Conditionals``), once there is one
    and something to speak: a NoVoiceError naming ``fix`` (what the caller takes) where ``conds``
    is None, else an EmptyTextError where ``text`` is empty or blank."""
    if conds is None:
        raise NoVoiceError(fix=fix)
    if not text or not text.strip():
        raise EmptyTextError()
    return conds


# Upstream keeps one voice per model (tts.conds, which its generate writes, then reads for T3 and
# again for S3Gen) and, multilingual, one backend and alignment analyzer (t3.patched_model): two
# generations at once spoke each other's voice, and failed inside the analyzer.
_turns: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_turns_lock = threading.Lock()


@contextmanager
def voice_turn(tts: TTSModel) -> Iterator[None]:
    """The model's turn: the calls that write or read ``tts``'s voice (``tts.conds``) run inside
    it one after the other, each from its write to its last read."""
    with _turns_lock:
        # Re-entrant: a call in turn makes others that take it (the optimized wrapper's generate
        # prepares its voice with its own prepare_conditionals, then runs speech_tokens and vocode).
        turn = _turns.setdefault(tts.t3, threading.RLock())
    with turn:
        yield


def checked_call(seed: object, max_new_tokens: object) -> tuple[int | None, int]:
    """A ``generate`` call's seed (None: the global random state, as upstream) and token cap as
    Python ints, refused as a stream's are (``checked_seed``, ``checked_cap``): a numpy seed
    failed in torch, a cap of True spoke one token."""
    return (None if seed is None else checked_seed(seed)), checked_cap(max_new_tokens)


def generate(
    tts: TTSModel,
    text: str = UPSTREAM_SENTENCE,
    max_new_tokens: int = 150,
    seed: int | None = 0,
    **sampling: Any,
) -> GenerationResult:
    """Upstream ``tts.generate(text, **sampling)`` with a token cap, a seed and phase timings
    (``t3`` includes its ``t3.prefill`` and ``t3.decode``, see ``t3_timed``). The multilingual
    model speaks ``language_id`` (default "en", checked by ``decode.spoken_language``: the
    English-only models take "en" and refuse any other); a ``language_id`` of None is none given,
    for every family.

    With a ``seed`` every draw comes from the call's own generators (``rng.StreamRandom``):
    the tokens and audio of upstream ``generate`` after ``torch.manual_seed(seed)``, and
    neither another thread's generation nor the global random state is touched; ``None`` goes
    on from the caller's random state, as upstream does. An ``audio_prompt_path`` is prepared
    by ``prepare_voice`` (its checks and fixes) before upstream runs; the sampling settings are
    checked first (``sampling.check_sampling``, as the workbench's own loop checks them; and
    cfg_weight 0, which upstream's standard generate fails on, refused) and upstream is handed
    the values checked (``Family.sampling_with``: top_k an int, the others floats). An argument
    upstream's ``generate`` does not take is refused (ConfigError) before the voice is prepared.
    Calls on one model take turns (``voice_turn``: upstream keeps one voice and one analyzer per
    model, and reads the voice twice); the wall time starts at this call's turn."""
    seed, max_new_tokens = checked_call(seed, max_new_tokens)
    reference = sampling.pop("audio_prompt_path", None)
    checked_voice(reference or tts.conds, text)  # a reference to prepare will do
    family = family_of(tts)
    # None is none given, for every family; English asked of an English-only model is what it
    # speaks, and not handed to its upstream generate (which takes no language); another, refused.
    if (language := spoken_language(tts, sampling.pop("language_id", None))) is not None:
        sampling["language_id"] = language
    text_tokens(tts, text, 0.0, language)  # a text longer than T3's positions: refused, not an IndexError
    # Upstream checks none of these: a temperature of 0 failed inside torch's multinomial, one
    # below 0 sampled the least likely tokens. Checked as the workbench's own decode loop checks them.
    given = {k: v for k, v in sampling.items() if k in family.sampling}
    cfg_weight, settings = family.sampling_with(given)
    check_sampling(is_turbo(tts.t3), cfg_weight, **settings)
    # The values checked, as the optimized wrapper decodes with: transformers' warpers refused the
    # caller's Turbo temperature 2 or top_k 50.0, and a string failed in torch. Those upstream
    # Turbo ignores (cfg_weight, min_p) are not in ``given``: they go as they came.
    sampling.update({k: cfg_weight if k == "cfg_weight" else settings[k] for k in given})
    # Standard generate builds one text row without guidance, which T3.inference joins to its two
    # start-token rows: a RuntimeError in torch.cat (multilingual builds both rows, Turbo has none).
    if family.name == "standard" and cfg_weight == 0:
        raise ConfigError(
            "upstream's standard generate cannot decode without guidance: give cfg_weight above 0, "
            "or use the optimized wrapper (optimize=True), which decodes cfg_weight 0 unguided"
        )
    upstream = inspect.signature(tts.generate)
    try:  # before the reference is prepared: upstream's TypeError came once the voice was replaced
        upstream.bind(text, audio_prompt_path=reference, **sampling)
    except TypeError as e:  # inspect's words name the argument
        takes = ", ".join(upstream.parameters)
        raise ConfigError(
            f"upstream's {family.name} generate {e}: give only those it takes ({takes})"
        ) from None
    methods = {
        "t3": (tts.t3, family.t3_inference),
        "s3gen.flow": (tts.s3gen, "flow_inference"),
        "s3gen.vocoder": (tts.s3gen, "hift_inference"),
        "watermark": (tts.watermarker, "apply_watermark"),
    }
    # before the clock: a turn waited for is not this generation's time
    with voice_turn(tts):
        t0 = now(tts.device)
        if reference:  # as upstream's ``if audio_prompt_path`` (in the wall time, as there), with the checks
            # Prepared as upstream generate would: its exaggeration default (Turbo's is 0.0), and
            # Turbo's norm_loudness, which upstream generate only uses for this.
            default = upstream.parameters["exaggeration"].default
            norm = sampling.pop("norm_loudness", True) if family.name == "turbo" else True
            prepare_voice(tts, reference, sampling.get("exaggeration", default), norm)
        with (
            # Not torch.manual_seed: two threads' generations would draw each other's numbers.
            _drawing_quietly(tts, StreamRandom(seed)) if seed is not None else nullcontext(),
            token_cap(tts, max_new_tokens) as seen,
            timed(methods, tts.device) as times,
            t3_timed(tts, times),
            # Multilingual: upstream's analyzer hooks the attention for good; this one is undone.
            upstream_alignment() if family.name == "multilingual" else nullcontext(),
        ):
            wav = tts.generate(text, **sampling)
        wall = now(tts.device) - t0
    raw = seen["tokens"][0].tolist()
    stopped = ended_by(raw, tts.t3.hp.stop_speech_token, seen["cap"], max_new_tokens)
    return GenerationResult(
        wav=wav.squeeze(0).numpy(),
        sample_rate=tts.sr,
        speech_tokens=raw,
        stopped_by=stopped,
        invalid_tokens=invalid_ids(raw, tts.t3.hp.stop_speech_token),
        seconds=times.seconds,  # unrounded: a GPU's prefill of a few ms keeps its resolution
        wall_s=wall,
        decode_steps=times.calls.get("t3.decode", 0),
    )
