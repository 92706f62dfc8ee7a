"""Streaming strategies on the upstream T3 and S3Gen: each yields ``(audio_chunk, ChunkMetrics)``,
and the chunks concatenated are the utterance.

- ``naive``: chatterbox-streaming's loop (chunk 25 tokens, context 50): every chunk re-runs S3Gen
  over the previous ``context_tokens`` plus the new ones, keeps the new part by proportion and
  fades it in. Many calls, each paying for the reference prompt again; seams where the fade is.
- ``buffered``: tokens are gathered into windows (a short first one for a fast first audio, then
  ~3.5 s). Each window is run through S3Gen once with a little left context and the flow's
  lookahead, on one noise track shared by the whole utterance, and joined to the previous one by
  an overlap-add crossfade. The tail is always flushed, so every token is vocoded exactly once.
  With a compiled ``FlowPlan`` every window's estimator frames are padded to its regular size
  (the last window too; the second one too when the first is shorter than the left context),
  so the compiled estimator sees two shapes: first and regular window.

Why not reuse the prompt's computation across calls: S3Gen's conformer encoder and the CFM
estimator attend over prompt and new tokens together, so the prompt's activations change with
every window; the only reuse that is exact is none. What does cut the per-call cost is a shorter
reference prompt (``prompt_s``), reported against the one-shot output.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Generator, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from chatterbox.tts import ChatterboxTTS, Conditionals

from ..core.clock import now
from ..core.constants import (
    FRAMES_PER_TOKEN,
    SAMPLE_RATE,
    SAMPLES_PER_MS,
    SAMPLES_PER_TOKEN,
    TOKENS_PER_S,
)
from ..core.errors import PASS_CONDS, PREPARE_FIRST, ConfigError, NoVoiceError, as_int
from ..core.families import family_of, language_for
from ..core.files import written
from ..core.machine import environment
from ..core.progress import progress_bar
from ..core.rng import StreamRandom, overwritten
from ..core.tables import counted
from ..instruments.latency import ChunkMetrics, StreamReport, seam_metric, snr_db, timeline_figure
from ..instruments.plots import save
from ..models.sources import token_cap_note
from ..models.vocode import FlowPlan, fade_in, flow_mels, tail_tokens, vocoder
from .decode import (
    DecodePlan,
    DecodeStats,
    check_new_tokens,
    checked_cap,
    checked_seed,
    decode_blocks,
    invalid_ids,
    speech_ids,
    spoken_language,
    text_tokens,
)
from .generation import checked_voice
from .precision import check_conditionals

STRATEGIES = ("naive", "buffered")
# The longest window, prompt or fade a config takes: far past any stream T3 can sample (4096
# tokens, 164 s), and short enough that counting its tokens or samples cannot overflow.
MAX_SPAN_S = 3600.0


# StreamConfig's sizes in whole tokens (an hour of audio at most each, as its spans in seconds)
TOKEN_COUNTS = ("chunk_tokens", "context_tokens", "left_context_tokens", "lookahead_tokens")


@dataclass(frozen=True)
class StreamConfig:
    """How to cut the token stream into S3Gen calls. Sizes are in tokens or seconds of audio."""

    strategy: str = "buffered"
    # naive: chatterbox-streaming 0.1.2 defaults
    chunk_tokens: int = 25
    context_tokens: int = 50
    fade_ms: float = 20.0
    # buffered
    first_window_s: float = 1.0
    window_s: float = 3.5
    crossfade_ms: float = 40.0
    left_context_tokens: int = 4
    lookahead_tokens: int = 3  # the flow encoder's pre-lookahead
    carry_source: bool = False  # pass HiFT's excitation source of the overlap to the next call
    prompt_s: float | None = None  # keep only the last prompt_s seconds of the reference prompt
    t3_block: int = 5  # tokens per stop-token check (and per hand-over from T3)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}: choose {' or '.join(STRATEGIES)}")
        counts: dict[str, object] = {  # object: what a caller passed, not what the fields say
            "chunk_tokens": self.chunk_tokens,
            "context_tokens": self.context_tokens,
            "left_context_tokens": self.left_context_tokens,
            "lookahead_tokens": self.lookahead_tokens,
            "t3_block": self.t3_block,
        }
        for name, count in counts.items():
            # They slice the token list and count T3's steps: 2.5 passed the sign checks below and
            # failed after T3 had run (t3_block=2.5 checked for the stop token every 5 tokens).
            whole = as_int(count)
            if whole is None:
                raise ConfigError(f"{name} must be a whole number of tokens (an int), got {count!r}")
            # kept as the int it is: a numpy one (a sweep over np.arange) reached the report's
            # config and chunk rows, which JSON cannot write
            object.__setattr__(self, name, whole)
        positive = {
            "chunk_tokens": self.chunk_tokens,
            "first_window_s": self.first_window_s,
            "window_s": self.window_s,
            "t3_block": self.t3_block,
        }
        for name, value in positive.items():
            if not 0 < value < math.inf:  # nan and inf too
                raise ConfigError(f"{name} must be positive and finite, got {value}")
        nonnegative = {
            "context_tokens": self.context_tokens,
            "fade_ms": self.fade_ms,
            "crossfade_ms": self.crossfade_ms,
            "left_context_tokens": self.left_context_tokens,
            "lookahead_tokens": self.lookahead_tokens,
        }
        for name, value in nonnegative.items():
            if not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be zero or positive and finite, got {value}")
        if self.strategy == "naive" and self.context_tokens < 1:
            # Upstream fades every S3Gen call in over its first token (20 ms of zeros, then a 20 ms
            # ramp), which the context absorbs: with none, each chunk began with 20 ms of silence.
            raise ConfigError(
                f"context_tokens must be 1 or more for the naive strategy (every call's first token is "
                f"faded in from silence, inside the context), got {self.context_tokens}"
            )
        if self.prompt_s is not None and not 0 < self.prompt_s < math.inf:
            raise ConfigError(
                f"prompt_s must be positive (or None for the whole prompt), got {self.prompt_s}"
            )
        spans = {  # name: (value, unit, seconds per unit)
            "first_window_s": (self.first_window_s, "s", 1.0),
            "window_s": (self.window_s, "s", 1.0),
            "prompt_s": (self.prompt_s or 0.0, "s", 1.0),
            "fade_ms": (self.fade_ms, "ms", 1e-3),
            "crossfade_ms": (self.crossfade_ms, "ms", 1e-3),
            # token counts too (before 2026-12-07 unbounded: a window padded to 10**6 tokens of
            # context ran out of memory in its first flow call)
            **{name: (getattr(self, name), "tokens", 1 / TOKENS_PER_S) for name in TOKEN_COUNTS},
        }
        for name, (value, unit, scale) in spans.items():
            if value * scale > MAX_SPAN_S:
                raise ConfigError(
                    f"{name} of {value:g} {unit} is longer than an hour: give {MAX_SPAN_S:g} s or less"
                )
        if self.strategy == "buffered":  # naive has no windows and no crossfade: nothing to fit
            self._check_crossfade()

    def _check_crossfade(self) -> None:
        """The crossfade is shorter than a window, and half of it fits on either side of a seam."""
        ms = SAMPLES_PER_TOKEN // SAMPLES_PER_MS  # a token's milliseconds
        shortest = min(self.first_window_tokens, self.window_tokens)  # what is compared: whole tokens
        if self.crossfade_samples >= shortest * SAMPLES_PER_TOKEN:
            # what is compared, in whole samples: 39.98 ms was "not shorter" than 40 ms, unsaid
            whole = self.crossfade_samples / SAMPLES_PER_MS
            rounded = f" ({whole:g} ms in whole samples)" if whole != self.crossfade_ms else ""
            raise ConfigError(
                f"crossfade of {self.crossfade_ms:g} ms{rounded} is not shorter than a window "
                f"({counted(shortest, 'token')} of {ms} ms = {shortest * ms} ms): "
                "shorten it or widen the windows"
            )
        room = min(self.left_context_tokens, self.lookahead_tokens)
        if self.crossfade_samples / 2 > room * SAMPLES_PER_TOKEN:
            # crossfade_samples / 2 is crossfade_ms * SAMPLES_PER_MS / 2 rounded: at most
            # room * SAMPLES_PER_TOKEN for every crossfade_ms up to twice the room's milliseconds.
            most = f"of {2 * room * ms} ms or less" if room else "of 0 (none)"
            raise ConfigError(
                f"half the crossfade ({self.crossfade_samples / 2 / SAMPLES_PER_MS:g} ms) must fit in "
                f"the left context and the lookahead (the shorter: {counted(room, 'token')} "
                f"of {ms} ms = {room * ms} ms): give crossfade_ms (--crossfade-ms) {most}, "
                "or raise left_context_tokens and lookahead_tokens"
            )

    @property
    def first_window_tokens(self) -> int:
        """The first window in speech tokens (at least one)."""
        return max(1, round(self.first_window_s * TOKENS_PER_S))

    @property
    def window_tokens(self) -> int:
        """A later window in speech tokens (at least one)."""
        return max(1, round(self.window_s * TOKENS_PER_S))

    def padded_tokens(self, first: bool) -> int:
        """The tokens a compiled estimator pads a window of this kind to: a first window's own and
        its lookahead; every later one's left context too (the second one's may be shorter, a
        first window under ``left_context_tokens``: its padding is then a little longer)."""
        if first:
            return self.first_window_tokens + self.lookahead_tokens
        return self.left_context_tokens + self.window_tokens + self.lookahead_tokens

    @property
    def crossfade_samples(self) -> int:
        """The crossfade in samples, even so that half lies on either side of a seam."""
        return 2 * round(self.crossfade_ms * SAMPLES_PER_MS / 2)  # even, so it splits around a seam


def shorten_prompt(gen: dict[str, Any], prompt_s: float | None) -> dict[str, Any]:
    """The reference dict a stream's S3Gen calls use: exactly two prompt mel frames per prompt
    token (frames 2i and 2i+1 are token i's) and, with ``prompt_s``, only the last ``prompt_s``
    seconds of both.

    Upstream ``embed_ref`` leaves one mel frame more than twice the tokens when the reference is
    under 10 s and not a multiple of 40 ms (it cuts the tokens to the frames, not the odd frame,
    at the end). The flow then returns 2T-1 frames for T tokens, every call is 480 samples short
    and the windows no longer tile: the odd frame, which belongs to no token, is dropped here."""
    tokens, feat = gen["prompt_token"], gen["prompt_feat"]
    whole = min(tokens.size(1), feat.size(1) // FRAMES_PER_TOKEN)  # tokens with both their frames
    keep = whole if prompt_s is None else min(whole, max(1, round(prompt_s * TOKENS_PER_S)))
    if keep == tokens.size(1) and feat.size(1) == keep * FRAMES_PER_TOKEN:
        return gen  # aligned already, nothing to cut
    out = dict(gen)
    out["prompt_token"] = tokens[:, whole - keep : whole]
    out["prompt_token_len"] = torch.tensor([keep])
    out["prompt_feat"] = feat[:, (whole - keep) * FRAMES_PER_TOKEN : whole * FRAMES_PER_TOKEN]
    if torch.is_tensor(gen.get("prompt_feat_len")):  # upstream leaves it None; keep it true if set
        out["prompt_feat_len"] = torch.tensor([keep * FRAMES_PER_TOKEN])
    return out


def noise_track(tokens: int, seed: int) -> torch.Tensor:
    """Flow-matching start noise (1, 80, frames) for ``tokens`` tokens, one track for the whole
    utterance. Drawn frame by frame, so a shorter track is the start of a longer one: a seeded
    stream's audio does not depend on its token cap (``max_new_tokens`` sizes the track)."""
    g = torch.Generator().manual_seed(seed)
    # Frame-major: frame k is draws 80k to 80k + 79 whatever the length. Drawn (1, 80, frames),
    # bin b's row began at draw b * frames, so a frame's values moved with the length.
    return torch.randn(1, tokens * FRAMES_PER_TOKEN, 80, generator=g).transpose(1, 2).contiguous()


def own_seed(seed: int, purpose: int) -> int:
    """The seed of a stream's draw ``purpose`` (``StreamState.NOISE``, ...) for stream ``seed``:
    a 64-bit hash of both (``numpy.random.SeedSequence``). Streams submitted with seeds
    ``s, s + 1, ...`` then share no draws: ``seed + purpose`` would give stream ``s``'s draws to
    stream ``s + 1``'s (or its T3's, which draws from the seed itself)."""
    entropy = [seed % 2**64, purpose]  # as torch.manual_seed takes a negative seed
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def with_prompt_noise(state: StreamState, noise: torch.Tensor) -> torch.Tensor:
    """The flow's whole start noise for a call: the utterance's prompt noise, then ``noise``
    for the generated frames. Upstream draws the prompt part from the global generator at
    every call; a fixed part of the stream's own keeps the stream's output its own."""
    return torch.cat([state.prompt_noise, noise], dim=2)


@dataclass
class StreamState:
    """What a stream has produced so far, read by the caller after (or during) iteration."""

    report: StreamReport
    tokens: list[int] = field(default_factory=list)  # valid speech tokens, in order
    seams: list[int] = field(default_factory=list)  # sample positions where chunks were joined
    crossfades: list[tuple[int, int]] = field(default_factory=list)  # sample ranges blended
    noise: torch.Tensor = field(default_factory=lambda: noise_track(0, 0))  # set by stream()
    prompt_noise: torch.Tensor = field(default_factory=lambda: noise_track(0, 0))  # set by stream()
    rng: StreamRandom = field(default_factory=lambda: StreamRandom(0))  # S3Gen's draws; set by stream()
    seed: int = 0  # the stream's; set by stream()
    voice: Conditionals | None = None  # the voice it spoke (one_shot's too); set by stream()
    t3: DecodeStats = field(default_factory=DecodeStats)
    s3gen_compile_s: float = 0.0  # compiling the flow's estimator for new shapes: not in flow_s
    compile_before_first_s: float = 0.0  # the part of the compiling done before the first chunk
    t3_compile_before_first_s: float = 0.0  # T3's part of it: later, t3.compile_s grows by longer spans

    # Each of a stream's draws from its own seed: T3's samples from ``seed`` itself (as upstream
    # after ``torch.manual_seed(seed)``), these from ``own_seed(seed, purpose)``, so no two draw
    # the same numbers, within a stream or across streams with nearby seeds.
    NOISE, PROMPT_NOISE, HIFT = 1, 2, 3

    def draw_from(self, seed: int, tokens: int, prompt_tokens: int) -> None:
        """The stream's own S3Gen draws for ``seed`` (its T3 draws from ``StreamRandom(seed)``):
        HiFT's source and the flow's start noise, for ``tokens`` tokens and the prompt. A
        track for fewer tokens is the start of this one (``noise_track``)."""
        self.seed, self.rng = seed, StreamRandom(own_seed(seed, self.HIFT))
        self.noise = noise_track(tokens, own_seed(seed, self.NOISE))
        self.prompt_noise = noise_track(prompt_tokens, own_seed(seed, self.PROMPT_NOISE))

    def prompt_noise_for(self, prompt_tokens: int) -> torch.Tensor:
        """The start noise of a ``prompt_tokens`` prompt: the stream's own, or for a prompt of
        another length (a one-shot yardstick with the whole prompt) drawn the same way (the
        shorter of the two the start of the longer)."""
        if self.prompt_noise.size(2) == prompt_tokens * FRAMES_PER_TOKEN:
            return self.prompt_noise
        return noise_track(prompt_tokens, own_seed(self.seed, self.PROMPT_NOISE))

    @property
    def used(self) -> bool:
        """Whether a stream has already recorded anything here (tokens, chunks, T3 samples)."""
        return bool(self.tokens or self.report.chunks or self.seams or self.t3.sampled)


def _t3_blocks(
    tts: ChatterboxTTS,
    conds: Conditionals,
    text: str,
    max_new_tokens: int,
    seed: int,
    plan: DecodePlan | None,
    block: int,
    stats: DecodeStats | None,
    language_id: str | None,
    sampling: dict[str, Any],
) -> Generator[torch.Tensor, None, None]:
    """A stream's T3 blocks in the voice ``conds``: the family's sampling defaults under the
    caller's, drawn from the stream's own T3 generator (``StreamRandom(seed)``)."""
    cfg_weight, sampling = family_of(tts).sampling_with(sampling)
    return decode_blocks(
        tts.t3,
        conds.t3,
        text_tokens(tts, text, cfg_weight, language_id),
        max_new_tokens=max_new_tokens,
        plan=plan,
        stop_check_every=block,
        stats=stats,
        cfg_weight=cfg_weight,
        generator=StreamRandom(seed).generator(tts.t3.speech_head.weight.device),
        **sampling,
    )


def _voice(tts: ChatterboxTTS, conds: Conditionals | None, text: str) -> Conditionals:
    """The voice a stream speaks ``text`` in: ``conds``, checked against the model (another
    family's, another size's, a path: each failed at T3's first step, in torch or Python), or
    the model's own."""
    if conds is not None:
        check_conditionals(conds, tts)
    return checked_voice(conds if conds is not None else tts.conds, text, PASS_CONDS)


def stream_tokens(
    tts: ChatterboxTTS,
    text: str,
    *,
    max_new_tokens: int = 1000,
    seed: int = 0,
    plan: DecodePlan | None = None,
    language_id: str | None = None,
    conds: Conditionals | None = None,
    **sampling: Any,
) -> list[int]:
    """The speech tokens ``stream`` vocodes with these arguments (its ``StreamState.tokens``),
    from T3 alone: nothing is vocoded, so a check of many streams' tokens costs T3's time only."""
    seed, max_new_tokens = checked_seed(seed), checked_cap(max_new_tokens)
    voice = _voice(tts, conds, text)
    blocks = _t3_blocks(tts, voice, text, max_new_tokens, seed, plan, 8, None, language_id, sampling)
    return [t for block in blocks for t in speech_ids(block[0].tolist())] + tail_tokens(tts.s3gen)


def stream(
    tts: ChatterboxTTS,
    text: str,
    config: StreamConfig = StreamConfig(),  # noqa: B008 (frozen dataclass)
    *,
    max_new_tokens: int = 1000,
    seed: int = 0,
    plan: DecodePlan | None = None,
    amp: torch.dtype | None = None,
    flow: FlowPlan | None = None,
    state: StreamState | None = None,
    progress: bool = False,
    language_id: str | None = None,
    conds: Conditionals | None = None,
    **sampling: Any,
) -> Generator[tuple[np.ndarray, ChunkMetrics], None, None]:
    """Generate ``text`` with the voice ``conds`` and yield audio chunks as they are ready. Without
    ``conds``, the voice is ``tts.conds`` as it is when the stream is first read (a generator's
    body runs then): a caller that may prepare another voice before then passes a copy.

    ``plan`` runs T3's decode steps, ``flow`` the buffered windows' CFM estimator (default eager).
    Pass a ``StreamState`` to read the report, the tokens and the seam positions afterwards:
    a fresh one for every stream (one that holds a stream already is refused with ConfigError).
    Stopping the iteration early stops T3 too (nothing runs in the background). ``progress``
    shows tokens sampled and S3Gen calls done on stderr. The multilingual model speaks
    ``language_id`` (default "en"); the others speak English only and refuse any other.
    ``sampling`` (temperature, top_p, ...; ``cfg_weight``) defaults as the family's upstream
    ``generate`` does, so a stream speaks the tokens of a one-shot generation with the same seed
    (but after a start-of-speech id T3 sampled mid-way: one-shot vocodes only what follows it).
    A chunk's record counts the T3 seconds and invalid ids since the previous chunk; T3's blocks
    after the last chunk (only invalid ids, or the stop token) are kept in the report's ``t3_after_s`` and
    ``invalid_after`` when T3 has ended, so its totals are the whole generation's, and its
    ``wall_s`` runs to the end of T3 where that came after the last chunk. Two streams with the
    same seed whose tokens agree have the same audio whatever their ``max_new_tokens``, up to
    the last window of the one that ends first (the noise track's frames do not depend on its
    length, ``noise_track``).
    """
    # Checked (and made Python ints) before anything is drawn or sized with them: a numpy seed
    # overflowed in own_seed, a float cap failed in torch's randn, a cap of True streamed a token.
    seed, max_new_tokens = checked_seed(seed), checked_cap(max_new_tokens)
    voice = _voice(tts, conds, text)
    check_new_tokens(tts.t3, max_new_tokens)  # before the noise track, sized by it, is drawn
    # an English-only model asked for another language refuses it (before 2026-12-07 ignored)
    spoken_language(tts, language_id)
    if state is not None and state.used:
        # Its tokens, seams and chunks would be taken for this utterance's: the windows would
        # vocode the previous utterance again and the report would add the two up.
        raise ConfigError(
            f"this StreamState already holds a stream ({len(state.tokens)} tokens, "
            f"{len(state.report.chunks)} chunks): pass a fresh StreamState for every stream"
        )
    if state is not None and state.report.strategy != config.strategy:  # (before 2026-12-04 kept)
        raise ConfigError(
            f"this StreamState's report is labelled {state.report.strategy!r} and the stream is "
            f"{config.strategy!r}: pass StreamState(StreamReport({config.strategy!r}))"
        )
    state = state if state is not None else StreamState(StreamReport(config.strategy))
    state.voice = voice
    gen = shorten_prompt(voice.gen, config.prompt_s)
    prompt_tokens = int(gen["prompt_token"].size(1))
    prompt_frames = prompt_tokens * FRAMES_PER_TOKEN
    # Every random draw of the stream comes from its own generators (``core.rng``): T3's samples,
    # HiFT's source, the flow's start noise. Another stream in another thread changes none of them.
    # T3 and S3Gen draw from separate ones, so the tokens do not depend on when S3Gen ran: they are
    # the tokens of a one-shot generation with this seed.
    # The stream's clock starts before its text front end runs (before 2026-12-07 after: the
    # first audio left out the tokenizer's time, which a one-shot generation's includes).
    device = tts.device
    t_start = now(device)
    state.draw_from(seed, max_new_tokens + len(tail_tokens(tts.s3gen)), prompt_tokens)  # Turbo's silence too
    stats = state.t3
    blocks = _t3_blocks(
        tts, voice, text, max_new_tokens, seed, plan, config.t3_block, stats, language_id, sampling
    )
    flow = flow or FlowPlan()
    if config.strategy == "naive":
        cutter = _naive
    else:
        cutter = functools.partial(_buffered, flow=flow)
    t3_seen = [0.0]
    t3_done = [0.0]  # stream time when T3 ended
    invalid = [0]
    bar = progress_bar(
        total=max_new_tokens, unit="tok", desc=f"{config.strategy} stream", disable=not progress
    )

    def tokens_in() -> Iterator[bool]:
        """Pull T3 blocks into state.tokens; yields True when more came, ends when T3 is done."""
        stop = tts.t3.hp.stop_speech_token
        while True:
            block = next(blocks, None)
            if block is None:
                t3_done[0] = now(device) - t_start
                state.tokens.extend(tail_tokens(tts.s3gen))  # Turbo's closing silence, as upstream
                return
            ids = block[0].tolist()
            bar.update(len(ids))
            state.tokens.extend(speech_ids(ids))
            invalid[0] += invalid_ids(ids, stop)
            yield True

    def metrics(**kw: Any) -> ChunkMetrics:
        t3 = stats.prefill_s + stats.decode_s
        m = ChunkMetrics(
            index=len(state.report.chunks),
            emitted_s=now(device) - t_start,
            t3_s=t3 - t3_seen[0],
            invalid_tokens=invalid[0],
            prompt_frames=prompt_frames,
            **kw,
        )
        t3_seen[0], invalid[0] = t3, 0
        return m

    try:
        for chunk, m in cutter(tts, gen, config, state, tokens_in(), metrics, amp):
            if not state.report.chunks:  # what compiling cost before the first audio
                state.t3_compile_before_first_s = state.t3.compile_s
                state.compile_before_first_s = state.t3.compile_s + state.s3gen_compile_s
            chunk = state.report.add(chunk, m)
            bar.set_postfix(s3gen_calls=state.report.s3gen_calls, refresh=False)
            yield chunk, m
        if not state.report.chunks:  # no audio: T3's compiling all came before any
            state.t3_compile_before_first_s = state.t3.compile_s
        # T3 blocks after the last chunk (only invalid ids, or only the stop token) make no chunk
        # of their own: the report keeps their T3 seconds and invalid ids apart (the chunks'
        # records were handed out already), so its totals are the whole generation's.
        state.report.t3_after_s = stats.prefill_s + stats.decode_s - t3_seen[0]
        state.report.invalid_after = invalid[0]
        # The wall (so the RTF) covers those blocks too, not only the stream up to its last
        # chunk: it runs to T3's end where that came later (T3 runs as the caller pulls, so a
        # caller slow to ask for more after the last chunk is in it, as in every emitted_s).
        state.report.wall_s = max(state.report.wall_s, t3_done[0])
    finally:
        blocks.close()
        bar.close()


def stream_all(
    tts: ChatterboxTTS, text: str, config: StreamConfig, **kwargs: Any
) -> tuple[np.ndarray, StreamState]:
    """Run ``stream`` to the end (keyword arguments as there): the whole waveform and the state,
    the ``state=`` given (checked by ``stream``) or a new one."""
    given = kwargs.pop("state", None)
    state = given if given is not None else StreamState(StreamReport(config.strategy))
    chunks = [c for c, _ in stream(tts, text, config, state=state, **kwargs)]
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), state


def _s3gen(
    tts: ChatterboxTTS,
    gen: dict[str, Any],
    tokens: list[int],
    noise: torch.Tensor,
    amp: torch.dtype | None,
    rng: StreamRandom,
    cache: torch.Tensor | None = None,
    flow: FlowPlan | None = None,
    pad_to: int | None = None,
) -> tuple[np.ndarray, torch.Tensor, float, float, float]:
    """One S3Gen call on the flow's whole start ``noise`` (prompt and tokens), HiFT drawing
    from ``rng``: waveform, excitation source, flow seconds, vocoder seconds, and the seconds
    spent compiling the estimator for a new shape (kept out of the flow seconds)."""
    with ExitStack() as stack:
        if amp is not None:
            stack.enter_context(torch.autocast(tts.s3gen.device.type, amp))
        device = tts.s3gen.device
        compiled_before = flow.compile_s_here if flow else 0.0
        t0 = now(device)
        with overwritten():  # upstream draws start noise that ``noise`` then replaces
            mels = flow_mels(tts.s3gen, torch.tensor(tokens), gen, noise=noise, plan=flow, pad_to=pad_to)
        t1 = now(device)
        if amp is not None:  # HiFT outside autocast, as the wrapper's float32 island runs it: its
            # iSTFT takes no bfloat16 (a direct stream(amp=torch.bfloat16) failed at its first chunk)
            stack.enter_context(torch.autocast(device.type, enabled=False))
            mels = mels.float()
        with rng.drawing():  # HiFT's sine phases and noise
            wav, source = vocoder(tts.s3gen, mels, cache)
        t2 = now(device)
    compiling = (flow.compile_s_here if flow else 0.0) - compiled_before
    return wav[0].cpu().numpy(), source, t1 - t0 - compiling, t2 - t1, compiling


def _naive(
    tts: ChatterboxTTS,
    gen: dict[str, Any],
    config: StreamConfig,
    state: StreamState,
    tokens_in: Iterator[bool],
    metrics: Any,
    amp: torch.dtype | None,
) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
    done = 0  # tokens already emitted as audio
    emitted = 0  # samples already emitted
    fade = int(config.fade_ms * SAMPLES_PER_MS)
    more = True
    while more:
        more = next(tokens_in, False)
        ready = len(state.tokens) - done
        if ready == 0 or (more and ready < config.chunk_tokens):
            continue
        new = state.tokens[done:]
        context = state.tokens[max(0, done - config.context_tokens) : done]
        # chatterbox-streaming draws new start noise for every call: here from the stream's generator.
        frames = (len(context) + len(new)) * FRAMES_PER_TOKEN
        fresh = torch.randn(1, 80, frames, generator=state.rng.generator())
        noise = with_prompt_noise(state, fresh)
        wav, _, flow_s, voc_s, _ = _s3gen(tts, gen, context + new, noise, amp, state.rng)
        fade_in(tts.s3gen, torch.from_numpy(wav))  # upstream S3Gen.inference fades every call in
        chunk = wav[int(len(context) * len(wav) / (len(context) + len(new))) :].copy()
        if done and fade:  # the fork's fade-in at every seam but the first
            chunk[:fade] *= np.linspace(0.0, 1.0, min(fade, len(chunk)), dtype=np.float32)
        if done:
            state.seams.append(emitted)
        done, emitted = len(state.tokens), emitted + len(chunk)
        yield (
            chunk,
            metrics(
                tokens=len(new),
                flow_s=flow_s,
                vocoder_s=voc_s,
                audio_s=len(chunk) / SAMPLE_RATE,
                context_frames=len(context) * FRAMES_PER_TOKEN,
                new_frames=len(new) * FRAMES_PER_TOKEN,
                s3gen_calls=1,
            ),
        )


@dataclass(frozen=True)
class Window:
    """One buffered S3Gen call: its own tokens ``[begin, end)``, run over ``[start, stop)`` (with
    left context and lookahead); ``regular`` is the token count a compiled estimator pads to."""

    begin: int
    end: int
    start: int
    stop: int
    final: bool
    regular: int

    @property
    def first(self) -> bool:
        """Whether this is the stream's first window (it has no audio before it to crossfade onto)."""
        return self.begin == 0


class BufferedCutter:
    """The buffered strategy's bookkeeping, apart from running anything: which window is ready
    (``next_window``), the noise and excitation source it gets, and how its waveform is trimmed
    and crossfaded onto the previous window (``assemble``). ``stream`` drives it from one
    token iterator; the stream engine drives one per stream and batches their S3Gen calls."""

    def __init__(self, config: StreamConfig, state: StreamState) -> None:
        self.config, self.state = config, state
        c = config.crossfade_samples
        ramp = (1 - np.cos(np.linspace(0, np.pi, c, dtype=np.float32))) / 2
        self.ramp = ramp if c else np.zeros(0, np.float32)
        self.begin = 0  # first token of the next window
        self.tail: np.ndarray | None = None  # the previous window's last c samples, to be blended
        self.prev: tuple[int, int, torch.Tensor] | None = None  # the last call's (start, stop) and source
        self.done = False

    def next_window(self, more: bool) -> Window | None:
        """The next window, once enough tokens are there (``more``: T3 may still add some);
        ``None`` while it waits for tokens, and after the last window (``done``).

        A window whose tokens (and lookahead) are all there is a regular one even when T3 has
        ended since: the cut must not depend on when it is asked. ``stream`` asks as the tokens
        come; the engine's S3Gen stage, busy with other streams, may first ask after T3 is done,
        and a stream's windows (so its audio) are then still the ones it gets alone."""
        config, n, begin = self.config, len(self.state.tokens), self.begin
        size = config.first_window_tokens if begin == 0 else config.window_tokens
        if self.done or (more and n < begin + size + config.lookahead_tokens):
            return None
        if n == begin:  # T3 ended on a window boundary: the tail was already flushed
            self.done = True
            return None
        final = not more and n < begin + size + config.lookahead_tokens
        end = n if final else begin + size
        start = max(0, begin - config.left_context_tokens)
        stop = n if final else end + config.lookahead_tokens
        return Window(begin, end, start, stop, final, config.padded_tokens(first=begin == 0))

    def noise(self, w: Window) -> torch.Tensor:
        """The flow's start noise for the window (prompt part included)."""
        frames = slice(w.start * FRAMES_PER_TOKEN, w.stop * FRAMES_PER_TOKEN)
        return with_prompt_noise(self.state, self.state.noise[:, :, frames])

    def cache(self, w: Window) -> torch.Tensor | None:
        """The previous call's excitation source over this window's left context (``carry_source``)."""
        if not self.config.carry_source or self.prev is None or self.prev[1] <= w.start:
            return None
        p_start, p_end, p_src = self.prev
        return p_src[:, :, (w.start - p_start) * SAMPLES_PER_TOKEN : (p_end - p_start) * SAMPLES_PER_TOKEN]

    def assemble(self, w: Window, wav: np.ndarray, source: torch.Tensor, s3gen: Any) -> np.ndarray:
        """The audio the window adds: its own samples, the first window faded in as upstream,
        the seam overlap-added with the previous window's tail (the ramps sum to one)."""
        c, state = self.config.crossfade_samples, self.state
        self.prev = (w.start, w.stop, source)
        if w.first:
            fade_in(s3gen, torch.from_numpy(wav))  # as upstream one-shot
        lo = w.begin * SAMPLES_PER_TOKEN - (c // 2 if w.begin else 0)
        hi = w.end * SAMPLES_PER_TOKEN + (0 if w.final else c // 2)
        seg = wav[lo - w.start * SAMPLES_PER_TOKEN : hi - w.start * SAMPLES_PER_TOKEN].copy()
        if w.begin:  # a seam with the previous window, crossfaded or a hard cut
            state.seams.append(w.begin * SAMPLES_PER_TOKEN)
        if self.tail is not None and c:
            seg[:c] = self.tail * self.ramp[::-1] + seg[:c] * self.ramp
            state.crossfades.append((lo, lo + c))
        chunk, self.tail = (seg, None) if w.final or not c else (seg[:-c], seg[-c:])
        self.advance(w)
        return chunk

    def advance(self, w: Window) -> None:
        """Past window ``w``: the next one begins where it ends (after the final one: done)."""
        self.begin, self.done = w.end, w.final


def window_metrics(w: Window, chunk: np.ndarray) -> dict[str, Any]:
    """The ``ChunkMetrics`` fields that a buffered window fixes (timings come from the caller)."""
    return {
        "tokens": w.end - w.begin,
        "audio_s": len(chunk) / SAMPLE_RATE,
        "context_frames": (w.begin - w.start + w.stop - w.end) * FRAMES_PER_TOKEN,
        "new_frames": (w.end - w.begin) * FRAMES_PER_TOKEN,
        "s3gen_calls": 1,
    }


def _buffered(
    tts: ChatterboxTTS,
    gen: dict[str, Any],
    config: StreamConfig,
    state: StreamState,
    tokens_in: Iterator[bool],
    metrics: Any,
    amp: torch.dtype | None,
    flow: FlowPlan,
) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
    cut = BufferedCutter(config, state)
    more = True
    while True:
        w = cut.next_window(more)
        if w is None:
            if cut.done:  # without more tokens to come, next_window only says None when done
                return
            more = next(tokens_in, False)
            continue
        wav, source, flow_s, voc_s, compiling = _s3gen(
            tts, gen, state.tokens[w.start : w.stop], cut.noise(w), amp, state.rng, cut.cache(w), flow,
            w.regular if flow.compiled else None,
        )  # fmt: skip
        state.s3gen_compile_s += compiling
        chunk = cut.assemble(w, wav, source, tts.s3gen)
        yield chunk, metrics(flow_s=flow_s, vocoder_s=voc_s, **window_metrics(w, chunk))


def one_shot(tts: ChatterboxTTS, state: StreamState, config: StreamConfig) -> np.ndarray:
    """The same tokens through one S3Gen call, on the same noise track and prompt: the reference
    a streamed utterance is compared with, in the voice it spoke (``state.voice``, which ``stream``
    and the stream engine set; else the model's) (no audio where the stream kept no speech token:
    S3Gen cannot vocode none)."""
    voice = state.voice if state.voice is not None else tts.conds
    if voice is None:  # it takes no conds=: the voice comes with the state
        raise NoVoiceError(
            fix=f"give the state its voice (state.voice: stream and the engine set it), or {PREPARE_FIRST}"
        )
    if not state.tokens:
        return np.zeros(0, np.float32)
    gen = shorten_prompt(voice.gen, config.prompt_s)
    prompt = state.prompt_noise_for(int(gen["prompt_token"].size(1)))
    noise = torch.cat([prompt, state.noise[:, :, : len(state.tokens) * FRAMES_PER_TOKEN]], dim=2)
    wav, *_ = _s3gen(tts, gen, state.tokens, noise, None, StreamRandom(state.rng.seed))
    fade_in(tts.s3gen, torch.from_numpy(wav))
    # zeroed as the stream's chunks are (``StreamReport.add``): a NaN left here made the SNR NaN
    return np.where(np.isnan(wav), 0.0, wav).astype(np.float32)


def quality(wav: np.ndarray, reference: np.ndarray, state: StreamState) -> dict[str, float | bool | None]:
    """Seam clicks (largest jump at a seam vs elsewhere) and SNR against ``reference`` outside
    the crossfades, plus the length difference in samples. ``identical_to_one_shot``: equal
    sample for sample outside the crossfades (an SNR of inf, which JSON writes as null, as it
    writes "nothing to compare": a stream of one window is the one-shot call)."""
    snr = snr_db(wav, reference, state.crossfades)
    return {
        **seam_metric(wav, state.seams),
        "snr_db": snr,
        "identical_to_one_shot": snr == float("inf"),
        "length_diff_samples": len(wav) - len(reference),
    }


def run_to_files(
    tts: ChatterboxTTS,
    text: str,
    config: StreamConfig,
    outdir: str | Path,
    max_new_tokens: int = 250,
    seed: int = 0,
    plan: DecodePlan | None = None,
    progress: bool = False,
    model: str | Path | None = None,
    language_id: str | None = None,
) -> dict[str, Any]:
    """Stream ``text`` (multilingual: in ``language_id``, default "en"), compare with the
    one-shot output of the same tokens, and write the WAV and the timeline plot under
    ``outdir``; returns the summary, the chunk rows and the quality. ``model``: the source
    ``tts`` was loaded from (None: unnamed), for the note on a capped run."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    wav, state = stream_all(
        tts, text, config, max_new_tokens=max_new_tokens, seed=seed, plan=plan, progress=progress,
        language_id=language_id,
    )  # fmt: skip
    reference = one_shot(tts, state, config)
    wav_path = written(outdir / f"{config.strategy}.wav", lambda path: sf.write(path, wav, SAMPLE_RATE))
    fig_path = save(timeline_figure(state.report), outdir / f"{config.strategy}_timeline.png")
    return {
        "environment": environment(str(model or "unnamed"), str(tts.device)),
        "config": asdict(config),
        "language": language_for(tts, language_id),  # None: a family that speaks English only
        "summary": state.report.summary(),
        "chunks": state.report.rows(),
        "quality_vs_one_shot": quality(wav, reference, state),
        "speech_tokens": list(state.tokens),  # the ids vocoded, in order (Turbo's closing silence included)
        "t3_step_mode": state.t3.step_mode,
        # building (compiling) the static step, and any longer span compiled mid-way: only the
        # part before the first chunk is in its time
        "t3_compile_s": state.t3.compile_s,
        "t3_compile_before_first_s": state.t3_compile_before_first_s,
        "note": (
            f"ended by the stop token at token {state.t3.steps}"
            if state.t3.stopped
            else f"no stop token within {max_new_tokens} tokens ({token_cap_note(model)})"
        ),
        "files": {"wav": str(wav_path), "timeline": str(fig_path)},
    }
