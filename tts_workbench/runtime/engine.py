"""Many streams on one model: T3 continuously batched, S3Gen windows batched apart.

A ``StreamEngine`` takes streams at any time (``submit``) and runs two stages, each on its own
thread, as vLLM-Omni's TTS serving splits them (the token stage is latency-bound, the waveform
stage throughput-bound):

- **T3**: every active stream has its own rows of one KV cache allocated once at its largest
  shape (two rows with classifier-free guidance, one for Turbo) and its own position. A new
  stream is prefilled on its own (eager, as upstream) and joins at the next step; each step is
  one batched forward over all active streams (continuous batching: streams join and leave
  between steps, vLLM's scheme). A stream that ends, fails in T3 or is closed by its reader
  frees its rows before the next step (one failed in S3Gen, at T3's next pass): the last
  stream's rows move into the hole, so the active streams always fill rows ``[0, n)``. The step
  runs over a bucket of rows (``step_buckets``: 1, 2, 4, ... streams by default) and attends to
  a span of cache slots (``decode.spans``: the smallest holding every active stream's
  positions); ``"compiled"`` compiles (CUDA graphs on CUDA) once per bucket and span and
  reuses it. The cache and the steps over it are ``batched_step.BatchedStep``'s; the engine
  schedules (who joins, who leaves, what is sampled). A step out of memory preempts its newest
  stream (vLLM's scheme): back to the head of the queue, recomputed from its text and sampled
  tokens when there is room.
- **S3Gen**: each stream cuts its tokens into buffered windows (``streaming.BufferedCutter``);
  ready windows of the same voice and the same size go through the flow together, one CFM
  estimator call for several streams. First windows go first (they set time to first audio).
  The vocoder runs once for a flow call's windows whose excitation caches are as long, each
  stream's rows drawing HiFT's sine phases and noise from its own generator
  (``core.rng.rows_drawing``), so each gets its solo call's audio. With a compiled
  ``FlowPlan`` (``flow=``) a flow call's shape is fixed too: its estimator frames padded to the
  window kind's regular size (first or later window) and its windows to the next of
  ``flow_batches`` (copies of its last window, dropped after), so the estimator compiles once per
  voice, window kind and batch size, and each call runs without the eager estimator's host time.

Each stream samples from its own generator (``core.rng``), so it speaks the tokens it speaks
alone: in float32 exactly, up to where a batched kernel's rounding flips a near tie. Multilingual
streams run without upstream's alignment analyzer (as the single-stream static step), or with
``alignment=True`` each with its own, fed its rows of the static step's attention weights (as
the single-stream eager step: upstream's tokens).

Readers get ``(chunk, ChunkMetrics)`` from a ``StreamHandle`` (``stream_handle``), as a plain or
an async iterator. At most ``max_streams`` streams are active; more wait in a queue, none is
refused for load. A stream is active from its prefill to its last chunk: one whose T3 has ended
keeps its place until S3Gen has vocoded it, so an S3Gen slower than T3 holds new streams in the
queue instead of piling up windows behind it. A request that cannot run (empty text, longer than
the cache) fails alone with the same error as ``streaming.stream``; the others go on. An
argument of the wrong type, a seed no generator takes, a sampling argument the family does not
take or a value it cannot sample with, a language the model does not speak or no voice at all is
refused by ``submit`` itself, as upstream ``generate`` refuses an unknown keyword.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..core.clock import now
from ..core.constants import FRAMES_PER_TOKEN
from ..core.devices import out_of_memory
from ..core.errors import PASS_CONDS, ConfigError, NoVoiceError, whole_from_one
from ..core.families import family_of
from ..core.patching import let_go, sharing
from ..core.rng import StreamRandom, overwritten, rows_drawing
from ..instruments.latency import ChunkMetrics
from ..models.vocode import FlowPlan, cast_gen, flow_mels, tail_tokens, vocoder
from .alignment import Alignment, text_columns, watching_rows
from .alignment import alignment as new_analyzer
from .batched_step import BatchedStep, kv_bytes_per_stream
from .decode import (
    DecodePlan,
    T3Parts,
    check_cache_len,
    check_new_tokens,
    check_positions,
    check_room,
    checked_cap,
    checked_seed,
    invalid_ids,
    is_turbo,
    prefill_embeds,
    span_for,
    spans,
    speech_ids,
    spoken_language,
    text_tokens,
)
from .generation import checked_voice, voice_turn
from .precision import check_conditionals
from .sampling import Sampler, not_finite
from .stream_handle import END, Request, StreamHandle
from .streaming import (
    BufferedCutter,
    StreamConfig,
    Window,
    shorten_prompt,
    window_metrics,
)

ENGINE_STEPS = ("static", "compiled")


def buckets(max_streams: int) -> list[int]:
    """Batch sizes (in streams) a step runs at: powers of two below ``max_streams``, and it."""
    sizes = [1 << k for k in range(max_streams.bit_length()) if 1 << k < max_streams]
    return [*sizes, max_streams]


def _sizes(
    given: Sequence[int] | None,
    default: list[int],
    name: str,
    what: str,
    most: int | None = None,
    empty: bool = False,
) -> list[int]:
    """``given`` (``default`` for None) as sorted whole numbers from 1 to ``most``, else a
    ConfigError naming ``name`` (``empty``: none given is allowed)."""
    sizes = default if given is None else list(given)
    whole = all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= (most or b) for b in sizes)
    if not whole or not (sizes or empty):
        raise ConfigError(f"{name} must be whole numbers of {what}, got {given!r}")
    return sorted(set(sizes))


def check_sizes(
    step_buckets: Sequence[int] | None, flow_batches: Sequence[int] | None, most: int, limit: str
) -> None:
    """A ConfigError naming ``--step-buckets`` or ``--flow-batches`` for a size past ``most``
    streams, before any model is built (``limit`` says what sets it): a step runs over that many
    streams at most, and a flow call takes one window of each, so a larger size is a shape nothing
    fills (compiled for nothing; a huge flow batch was allocated until memory ran out)."""
    for flag, sizes, one in (
        ("--step-buckets", step_buckets, "a step of {} streams"),
        ("--flow-batches", flow_batches, "a flow call of {} windows"),
    ):
        if sizes and max(sizes) > most:
            raise ConfigError(
                f"argument {flag}: {one.format(max(sizes))} is more than {limit}: give sizes up to it"
            )


NOTHING_TO_FUSE = (
    "Turbo's GPT-2 T3 projects q, k and v in one matmul already and its MLP has no gate: there is nothing "
    "to fuse"
)


def check_engine_options(family: str | None, step: str, *, alignment: bool, fused: bool = False) -> None:
    """A ConfigError, naming the option as the command line does, for what an engine of a model of
    ``family`` (None: not known before the model loads) with ``step`` cannot run: upstream's
    alignment analyzer (``StreamEngine(alignment=True)``) on a model without one or with a
    compiled step, fused projections (``DecodePlan(fused=True)``) on Turbo, which has none to
    fuse. Called before anything is built (``load``, ``serve``) and again once the model has
    loaded."""
    if alignment and family not in (None, "multilingual"):
        raise ConfigError(
            "argument --alignment: the alignment analyzer is Multilingual T3's and this model has none: "
            "leave --alignment out, or load a Multilingual model"
        )
    if alignment and step != "static":
        raise ConfigError(
            "argument --alignment: the analyzers read attention weights, which the compiled step does not "
            "give: use --decode static, or leave --alignment out"
        )
    if fused and family == "turbo":  # fusion.fusable: GPT-2's c_attn is q, k and v in one already
        raise ConfigError(f"argument --fused: {NOTHING_TO_FUSE}: leave --fused out")


@dataclass
class _Live:
    """Engine-side state of an admitted stream."""

    handle: StreamHandle
    rows: int  # first cache row
    ids: torch.Tensor  # (1, max_new_tokens + 1): the start token, then the samples
    step: int  # tokens sampled so far
    prefill_len: int
    sampler: Sampler  # its settings: streams with equal ones are sampled together
    seen: torch.Tensor  # (1, vocab) bool: the tokens its repetition penalty applies to
    generator: torch.Generator
    conds: Any  # the voice (upstream Conditionals)
    gen: dict[str, Any]  # S3Gen's reference dict of the voice (shortened prompt, cast)
    cutter: BufferedCutter
    logits: torch.Tensor  # the logits of the next sample
    aligned: Alignment | None  # its alignment analyzer (Multilingual, ``alignment=True``)
    t3_done: bool = False
    t3_end_s: float = 0.0  # when T3 ended it, from its submit (as a chunk's ``emitted_s``)
    t3_s: float = 0.0  # seconds of T3 work for this stream (its prefill, batched steps) since its last chunk
    invalid: int = 0


class _ToVocode(NamedTuple):
    """A window whose mel is out of the flow: its stream, the window, the mel (1, 80, frames) and
    the excitation source the stream's previous window left over its start (None: none)."""

    live: _Live
    window: Window
    mel: torch.Tensor
    cache: torch.Tensor | None


@dataclass
class EngineStats:
    """Totals over the engine's life (seconds are wall time of each stage's thread)."""

    t3_steps: int = 0
    t3_rows: int = 0  # streams stepped, summed over steps
    t3_tokens: int = 0  # tokens sampled (prefill's first included)
    t3_s: float = 0.0  # batched steps and sampling
    prefill_s: float = 0.0
    compile_s: float = 0.0
    flow_calls: int = 0
    flow_windows: int = 0
    flow_splits: int = 0  # batched flow calls that failed and were run again a window a call
    flow_padded: int = 0  # copies of a window a compiled flow call ran to fill its batch size
    flow_s: float = 0.0
    flow_compile_s: float = 0.0  # compiling (and warming up) the flow's new shapes in flow calls
    vocoder_calls: int = 0
    vocoder_splits: int = 0  # batched vocoder calls that failed and were run again a window a call
    vocoder_s: float = 0.0
    admitted: int = 0
    failed: int = 0
    preempted: int = 0  # streams taken out of a step out of memory, requeued and recomputed
    # Each stage's time on its pieces of work (``_working``): T3's prefills and steps; S3Gen's
    # flow calls with all around them (the windows' tokens and noise, the vocoder, the crossfade)
    t3_busy_s: float = 0.0
    s3gen_busy_s: float = 0.0
    buckets_used: set[int] = field(default_factory=set)
    spans_used: set[int] = field(default_factory=set)  # cache slots the steps attended to

    def to_dict(self) -> dict[str, Any]:
        """The counters as JSON-friendly values (the sets of buckets and spans as sorted lists)."""
        sets = ("buckets_used", "spans_used")
        return {k: sorted(v) if k in sets else v for k, v in vars(self).items()}


def _held_by_wrapper(holder: object) -> ConfigError:
    """The refusal of an engine on a model an open wrapper (``holder``) holds: its weights are the
    wrapper's cast copies, and go back to the model's dtype under the engine's KV cache when it closes."""
    return ConfigError(
        f"this model is held by an open {type(holder).__name__}: T3's weights are the wrapper's, cast "
        "to its dtype policy's, and are cast back when it closes, under this engine's KV cache. Build "
        "the engine after the wrapper's close() (or the end of its with block; a wrapper is refused "
        "while an engine runs on the model), with its own T3 dtype: StreamEngine(tts, "
        'plan=decode_plan(tts, "bfloat16")) '
        "(runtime.optimized.decode_plan: a copy of T3's weights, the model's left as they are)"
    )


class StreamEngine:
    """Streams of one model, T3 continuously batched and S3Gen windows batched (module docstring).

    ``step``: "static" (the batched step as is) or "compiled" (``torch.compile``, CUDA graphs on
    CUDA, once per bucket and span; a growing eager cache cannot hold rows at different
    positions, so there is no "eager" engine step). ``max_cache_len``: positions per stream
    (prefill and new tokens). ``plan`` gives the weights and dtypes (default: the model's own,
    float32); its own step, cache length and C++ wrapper are not used (the engine's ``step`` and
    ``max_cache_len`` are). A compile that fails falls back to the static step with one warning
    (``fallback_reason``), as ``StaticStep`` does. ``alignment``: Multilingual only, static step
    only: each stream runs upstream's alignment analyzer (module docstring).

    Engines share a model, from construction until ``close()``: several may run on it at once,
    but none is built while a ``PerformanceOptimizedTTS`` holds it, nor a wrapper opened on it
    while one runs (each a ``ConfigError`` naming the fix): the wrapper casts T3's weights, and
    casts them back when it closes, under the engine's KV cache (``core.patching.sharing``).
    """

    def __init__(
        self,
        tts: Any,
        *,
        max_streams: int = 8,
        step: str = "static",
        config: StreamConfig | None = None,
        plan: DecodePlan | None = None,
        max_cache_len: int = 512,
        keep_logits: bool = False,
        flow: FlowPlan | None = None,
        flow_batches: Sequence[int] | None = None,
        step_buckets: Sequence[int] | None = None,
        alignment: bool = False,
    ) -> None:
        # A user of the model beside any other engine, from here until close(): a wrapper opened
        # meanwhile would cast T3 (or cast it back) under this KV cache, made in its dtype now.
        with sharing(tts, self, _held_by_wrapper):
            # was an AttributeError (a float's bit_length), a TypeError ("2" < 1)
            refusal = f"max_streams must be a whole number from 1, got {max_streams!r}"
            max_streams = whole_from_one(max_streams, refusal)
            batches = _sizes(flow_batches, buckets(max_streams), "flow_batches", "windows >= 1")
            streams = f"streams from 1 to max_streams ({max_streams})"
            sizes = _sizes(
                step_buckets, buckets(max_streams), "step_buckets", streams, most=max_streams, empty=True
            )
            if step not in ENGINE_STEPS:
                raise ConfigError(f"unknown engine step {step!r}: use {' or '.join(ENGINE_STEPS)}")
            self.config = config or StreamConfig("buffered")
            if self.config.strategy != "buffered":
                raise ConfigError("the stream engine runs the buffered strategy only")
            check_engine_options(family_of(tts).name, step, alignment=alignment)
            # Each stream's own analyzer (upstream multilingual's), fed its rows of the batched step's
            # attention weights: the step runs eager attention, as upstream's multilingual generate.
            self.alignment = alignment
            self._aligning: dict[int, contextlib.ExitStack] = {}  # by id of handle: what undoes its analyzer
            self.tts, self.max_streams = tts, max_streams
            self.keep_logits = keep_logits  # each handle's ``logits``: what every token was sampled from
            self.plan = plan or DecodePlan.plain(tts.t3)
            check_cache_len(max_cache_len, self.plan.decode.tfmr.config)  # the plan's own length is not used
            # The flow's estimator as ``flow`` runs it (eager by default). A plan may be shared by
            # engines one after another (the load study's levels): its compiled shapes are kept.
            self.flow = flow or FlowPlan()
            # Streams a T3 step has room for: lowered by a step out of memory to the streams the
            # step then ran over, so that the queue waits instead of a stream admitted into the
            # room freed running the step out of memory again; max_streams again once the
            # engine has no stream (``_idle``).
            self.fits = max_streams
            # Windows per flow call: at most the largest; a compiled flow pads a call to the next.
            self.flow_batches = batches
            # The streams a T3 step runs over (the live ones padded up to the next), max_streams
            # always among them: each is a compiled shape per span, so a few suffice where a compile
            # costs a minute (the H200) and steps over padded rows cost little (a memory-bound step).
            self.step_buckets = sorted({*sizes, max_streams})
            self.max_cache_len = max_cache_len
            self.device = tts.t3.speech_head.weight.device
            self.family = family_of(tts)
            self.turbo = is_turbo(tts.t3)
            self.rows_per_stream = self.family.rows
            self.stats = EngineStats()
            # T3's compute: the KV cache, allocated now at its largest shape, and the steps over it
            self.batched = BatchedStep(
                self.plan,
                streams=max_streams,
                rows_per_stream=self.rows_per_stream,
                max_cache_len=max_cache_len,
                mode=step,
                device=self.device,
                now=self._now,
            )
            self.kv_bytes_per_stream = kv_bytes_per_stream(tts, self.plan, max_cache_len)
            self._waiting: list[StreamHandle] = []
            self._joining: list[StreamHandle] = []  # taken from the queue, being prefilled
            self._preempted: dict[int, _Live] = {}  # by id of its handle (queued again): what it had
            self._live: list[_Live] = []  # admitted, in row order; T3 thread only (then close())
            self._vocoding: list[_Live] = []  # admitted, not yet fully vocoded; S3Gen thread reads
            self._lock = threading.Condition()
            self._counter = itertools.count()
            self._stopped = False
            self._failure: tuple[str, BaseException] | None = None  # a stage that died, and why
            self._held = 0  # open ``together()`` blocks: no stream joins meanwhile
            self._jobs: list[Callable[[], None]] = []  # run by the T3 stage before its next step
            self._flow_jobs: list[Callable[[], None]] = []  # run by the S3Gen stage before its next call
            self._busy: dict[str, tuple[str, float]] = {}  # stage: (its piece of work, monotonic start)
            # On CUDA each stage queues its work on a stream of its own, so the GPU runs T3's steps
            # while a flow call is in flight (on one stream they would wait for each other).
            cuda = self.device.type == "cuda"
            self._streams = {stage: torch.cuda.Stream(self.device) for stage in ("t3", "s3gen") if cuda}
            if cuda:  # what this thread queued (the cache's zeros) is done before the stages start
                torch.cuda.synchronize(self.device)
            self._threads = [
                threading.Thread(target=self._guard(loop, stage), name=f"engine-{stage}", daemon=True)
                for loop, stage in ((self._t3_loop, "t3"), (self._s3gen_loop, "s3gen"))
            ]
            for thread in self._threads:
                thread.start()

    # ------------------------------------------------------------------ public

    @property
    def running(self) -> bool:
        """Both stages take streams (False once closed, or once a stage died)."""
        with self._lock:
            return not self._stopped

    def stalled(self, after_s: float) -> str | None:
        """Which stage has been on one piece of work (a prefill, a decode step, a flow call) for
        more than ``after_s`` seconds, and on what; None if none has. A stage that hangs (a
        deadlock, a device that stopped answering) leaves every stream waiting while ``running``
        still says True: a server's health check asks this. A warm-up's compiles are not
        counted (minutes on a CPU, and asked for); a compile a step needs is."""
        now = time.monotonic()
        for stage, (what, since) in list(self._busy.items()):  # a copy: the stages change it
            if now - since > after_s:
                return (f"the {stage} stage has been on {what} for {now - since:.0f} s (more than "
                        f"{after_s:g} s): it hangs")  # fmt: skip
        return None

    @contextlib.contextmanager
    def _working(self, stage: str, what: str) -> Iterator[None]:
        """Mark ``stage`` busy with ``what`` for ``stalled`` while the block runs, and add its
        time to the stage's ``stats.<stage>_busy_s`` (only that stage's thread writes it)."""
        self._busy[stage] = (what, t0 := time.monotonic())
        try:
            yield
        finally:
            del self._busy[stage]
            name = f"{stage}_busy_s"
            setattr(self.stats, name, getattr(self.stats, name) + time.monotonic() - t0)

    @property
    def step_mode(self) -> str:
        """The step T3 runs: "compiled", or "static" (asked for, or a compile that failed)."""
        return self.batched.mode

    @property
    def attention_kernels(self) -> list[str]:
        """The attention ops the compiled step calls, read from Inductor's code (none if static)."""
        return self.batched.attention_kernels

    @property
    def fallback_reason(self) -> str | None:
        """Why a compiled engine runs the static step (its compile failed); None if it does not."""
        return self.batched.fallback_reason

    @property
    def stop_reason(self) -> str | None:
        """Why the engine takes no more streams: closed, or which stage died and with what
        error; None while it runs."""
        with self._lock:
            return str(self._stopped_error()) if self._stopped else None

    def active(self) -> int:
        """Streams admitted and not yet finished (being prefilled, or T3 or S3Gen still working
        for them); a preempted stream is queued again, not active."""
        return self.counts()[1]

    def queued(self) -> int:
        """Streams waiting for their turn (a stream closed while queued leaves the queue at once)."""
        with self._lock:
            return len(self._waiting)

    def counts(self) -> tuple[int, int]:
        """``(queued(), active())`` read at one moment: a stream moving from the queue to its
        prefill between two separate reads would be counted in neither (the server's health)."""
        with self._lock:
            # a preempted stream is queued until the T3 stage takes it (into _joining) again
            vocoding = {id(live.handle) for live in self._vocoding} - self._preempted.keys()
            return len(self._waiting), len({id(h) for h in self._joining} | vocoding)

    def free_rows(self) -> int:
        """Cache rows no stream holds."""
        with self._lock:
            return (self.max_streams - len(self._live)) * self.rows_per_stream

    def wait_rows_free(self, timeout: float) -> bool:
        """Wait until no stream holds cache rows, at most ``timeout`` seconds; whether none does.
        A stream failed in the S3Gen stage has ended for its reader before the T3 stage frees
        its rows (at its next pass). An engine whose stage failed frees nothing more: no wait
        there; one closing holds none once its stages have stopped (``close``)."""
        with self._lock:
            self._lock.wait_for(lambda: not self._live or self._failure is not None, timeout)
            return not self._live

    def submit(self, text: str, *, seed: int = 0, max_new_tokens: int = 150, conds: Any = None,
               language_id: str | None = None, **sampling: float) -> StreamHandle:  # fmt: skip
        """Queue a stream; read its chunks from the returned handle. Requests the model cannot run
        fail in the handle (its iteration raises), not here, so a server treats every request
        alike; only the caller's mistakes are refused here, with a ``ConfigError`` (as upstream
        ``generate``'s TypeError), and nothing is queued: an argument of the wrong type, a seed no
        generator takes, a sampling argument the family does not take or a value it cannot sample
        with, a language the model does not speak; a ``conds`` that is no voice of this model
        with a ``SourceError`` (``check_conditionals``); no voice at all, with a ``NoVoiceError``. The stream
        speaks the voice as it is now, its exaggeration included. A ``generate`` on the model in
        another thread is waited for (``voice_turn``): the voice is not read half-way through it."""
        seed, max_new_tokens = self._check_request(text, seed, max_new_tokens)
        # a misspelled argument would otherwise be dropped and the stream run with the default;
        # those upstream Turbo takes and ignores are refused too (a caller would expect them to work)
        self.family.check_sampling_keys(sampling, ignored=False)
        # refused now, not at its turn behind the streams ahead: a sampling value that is no number
        # (cfg_weight=None) or one no sampling takes (temperature=0), a language the model lacks
        cfg_weight, settings = self.family.sampling_with(sampling)
        sampler = Sampler(self.turbo, cfg_weight, **settings)
        # a language other than English given to an English-only model is refused (before
        # 2026-12-07 it was dropped, and the stream spoke English)
        spoken_language(self.tts, language_id)
        with voice_turn(self.tts):
            # The model's voice as it is now: one prepared while this stream waits is not its own.
            conds = self._voice_of(conds)
            # Nor is an exaggeration set meanwhile: upstream generate replaces conds.t3 and the
            # optimized wrapper sets its emotion_adv, on the voice itself. A shallow copy: they
            # replace its tensors, never write into them. S3Gen's part stays shared, by identity:
            # windows of one voice share a flow call (``_voice``, ``_batch_key``).
            t3_cond = copy.copy(conds.t3)
        request = Request(text, seed, max_new_tokens, conds, language_id, sampler, t3_cond)
        handle = StreamHandle(request, next(self._counter), self._drop)
        with self._lock:
            if self._stopped:
                raise self._stopped_error()
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    @staticmethod
    def _check_request(text: object, seed: object, max_new_tokens: object) -> tuple[int, int]:
        """Refuse arguments no stream could run with before they are queued: they would fail only
        at the stream's turn, after the streams ahead of it, with torch's or Python's own error.
        The seed and token cap as Python ints (a numpy integer is taken)."""
        if not isinstance(text, str):
            raise ConfigError(f"text must be a str, got {type(text).__name__} {text!r}")
        return checked_seed(seed), checked_cap(max_new_tokens)

    def _voice_of(self, conds: Any) -> Any:
        """The voice a stream (or the warm-up) given ``conds`` speaks: ``conds``, None for the
        model's own. Refused at submit (before, at its turn, with Python's or torch's own error):
        a ``conds`` that is no voice of this model (``check_conditionals``) and no voice at all,
        with a ``NoVoiceError`` naming the engine's fixes."""
        if conds is None:
            if self.tts.conds is None:
                raise NoVoiceError(fix=PASS_CONDS)
            return self.tts.conds
        check_conditionals(conds, self.tts)
        return conds

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Streams submitted inside the block join together, at one step, when it ends: a burst
        (their first windows are then ready at the same step and share a flow call)."""
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
                self._lock.notify_all()

    def warmup(self, conds: Any = None) -> float:
        """Build (compile) the step of every bucket and span now, and with a compiled flow its
        shapes for the voice ``conds`` (default: the model's), so no stream waits for them;
        seconds. (A tight ``max_cache_len`` means fewer spans to compile.) Each stage builds in
        its own thread, where its CUDA graphs are then recorded and replayed: T3's once no stream
        is live (each build writes a slot of every row; streams submitted meanwhile join after
        it), the flow's between flow calls. Wall seconds until both are built."""

        def t3() -> None:
            for bucket in self.step_buckets:
                for span in spans(self.max_cache_len):
                    if self._stopped:  # close() waits for the build under way, not the rest
                        raise self._stopped_error()
                    self._step_fn(bucket, span)

        builds = [(self._jobs, t3)]
        if self.flow.compiled:
            voice = self._voice_of(conds)
            builds.append((self._flow_jobs, lambda: self._build_flow(voice)))
        done = [threading.Event() for _ in builds]
        errors: list[Exception] = []

        def job(build: Callable[[], None], finished: threading.Event) -> Callable[[], None]:
            def run() -> None:
                try:
                    build()
                    self._now()  # what the stage's stream queued is done
                except Exception as e:  # raised in the caller's thread, below
                    errors.append(e)
                finally:
                    finished.set()

            return run

        t0 = time.perf_counter()
        with self._lock:
            if self._stopped:
                raise self._stopped_error()
            for (jobs, build), finished in zip(builds, done, strict=True):
                jobs.append(job(build, finished))
            self._lock.notify_all()
        for finished in done:
            while not finished.wait(timeout=1.0):
                if not self.running:
                    raise self._stopped_error()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop both stages (the step, prefill, build or flow call under way ends first, no more);
        streams still running end with an error (not one its reader closed); the KV cache and the
        compiled steps are let go, and the model (a wrapper may open on it)."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join()
        self._end_all(self._ended_error())
        with self._lock:  # the T3 thread, which alone writes it, is gone: its streams hold no rows now
            self._live = []
            self._lock.notify_all()  # a wait for free rows (before, it returned False as close began)
        self.batched.close()
        let_go(self)  # a wrapper may change the model now

    def _end_all(self, error: BaseException) -> None:
        """End every queued and admitted stream with ``error``, no longer counted (``queued()``,
        ``active()``): the engine has stopped. One closed already (its reader left, or a stage
        failed it with its own error) has ended: it is not ended again with this one (before, a
        reader that left during ``close()`` found its stream failed). One hold of the lock: a
        reader's close comes wholly before or after."""
        with self._lock:
            # a preempted stream is both queued and still being vocoded: one handle, ended once
            vocoding = [live.handle for live in self._vocoding]
            handles = list(dict.fromkeys([*self._waiting, *self._joining, *vocoding]))
            self._waiting, self._joining, self._vocoding = [], [], []
            self._preempted.clear()
            self._end([h for h in handles if not h.closed], error)

    def __enter__(self) -> StreamEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ T3 stage

    def _guard(self, loop: Callable[[], None], stage: str) -> Callable[[], None]:
        """The stage's thread: on its own CUDA stream; a stage that dies takes every stream with
        it, with its error (nothing hangs)."""

        def run() -> None:
            stream = self._streams.get(stage)
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    loop()
            except BaseException as e:
                with self._lock:
                    self._stopped = True
                    self._failure = (stage, e)
                    self._lock.notify_all()
                self._end_all(e)

        return run

    def _end(self, handles: list[StreamHandle], error: BaseException) -> None:
        """End streams with ``error``: their readers raise it, ``handle.error`` keeps it. They are
        closed, under the lock: no chunk follows the error (``_emit``)."""
        tb = error.__traceback__  # read once: a reader of the first handle may raise it meanwhile
        with self._lock:
            for h in handles:
                h.fail(error, tb)

    def _stopped_error(self) -> RuntimeError:
        """Why no stream can be taken: a stage's failure (its error as the cause), or ``close()``."""
        if self._failure is None:
            return RuntimeError("the engine is closed")
        stage, cause = self._failure
        error = RuntimeError(f"the engine stopped: its {stage} stage failed with {cause!r}")
        error.__cause__ = cause
        return error

    def _ended_error(self) -> RuntimeError:
        """What a stream the engine took but will not finish raises: the stage's failure, or
        the close, whichever stopped it (a ``submit`` after it gets ``_stopped_error``)."""
        if self._failure is None:
            return RuntimeError("the engine was closed before this stream ended")
        return self._stopped_error()

    def _now(self) -> float:
        """The clock of a stage: it waits for the work its own stream queued, not the other's."""
        return now(self.device, stream=True)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _drop(self, handle: StreamHandle) -> None:
        """Mark ``handle`` closed and take it out of the queue if it waits there, so that it is
        neither counted by ``queued`` nor given an admission turn. Safe from any thread, the
        stages' included: the lock is reentrant and nothing here waits for a stage."""
        with self._lock:
            handle.closed = True
            self._unqueue(handle)
            self._lock.notify_all()  # the T3 stage frees an admitted stream's rows before its step

    def _unqueue(self, handle: StreamHandle) -> None:
        """Take a closed stream out of the queue (under the lock); a preempted one, in no stage
        now, out of the S3Gen stage too: neither counts it from here on."""
        if handle in self._waiting:
            self._waiting.remove(handle)
        live = self._preempted.pop(id(handle), None)
        if live is not None:
            self._release(handle)
            if live in self._vocoding:
                self._vocoding.remove(live)

    def _room(self) -> int:
        """How many queued streams may join now (under the lock): none while ``together()`` holds
        them or a job waits (the jobs run first), else ``fits`` (``max_streams`` until a step runs
        out of memory) less the streams either stage still holds (rows in T3, windows still to
        vocode, or both; a preempted stream is queued, not held)."""
        if self._held or self._jobs:
            return 0
        held = {id(live.handle) for live in (*self._live, *self._vocoding)} - self._preempted.keys()
        return max(0, self.fits - len(held))

    def _idle(self) -> bool:
        """Nothing for the T3 stage: no stream, no job, none waiting that may join (a stream
        S3Gen lets go of wakes it). An engine with no stream at all, held or queued, takes
        ``max_streams`` again after a step out of memory (``fits``): what that step lacked may
        have been another stage's (S3Gen's flow call, on the same device), and a server would
        otherwise serve fewer streams for the rest of its life."""
        if not (self._live or self._vocoding or self._waiting or self._joining):
            self.fits = self.max_streams
        return not self._live and not self._jobs and (not self._waiting or not self._room())

    def _t3_loop(self) -> None:
        try:
            self._t3_passes()
        finally:  # the stage ends (closed, or failed): the analyzers it made are undone
            with self._lock:
                for handle_id in list(self._aligning):
                    self._aligning.pop(handle_id).close()

    def _t3_passes(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and self._idle():
                    self._lock.wait()
                if self._stopped:
                    return
                # A warm-up writes the last slot of each span in every row: only with no stream live.
                # Streams join at the pass after it: taken now, they would count as active (not
                # queued) all through it, before they are even prefilled.
                jobs, self._jobs = ([], self._jobs) if self._live else (self._jobs, [])
                room = 0 if jobs else self._room()
                joining, self._waiting = self._waiting[:room], self._waiting[room:]
                self._joining += joining  # admitted from here: counted by active(), not queued()
            for job in jobs:  # a warm-up, between steps
                job()
            for handle in joining:
                with self._working("t3", "a prefill"):
                    self._admit(handle)
            for live in [s for s in self._live if s.handle.closed]:
                self._leave(live)
            if self._live and not self._stopped:  # a close() during the admissions: no step more
                with self._working("t3", f"a decode step of {len(self._live)} stream(s)"):
                    self._step()

    def _admit(self, handle: StreamHandle) -> None:
        """Prefill a new stream on its own and give it the first free rows, or fail it alone.
        It leaves ``_joining`` as it joins the running streams (under one lock: ``active()``
        counts it throughout), or before its reader can see its error."""
        with self._lock:
            preempted = self._preempted.pop(id(handle), None)
        handle.admitted = handle.admitted if preempted else time.perf_counter()
        live: _Live | None = None
        error: Exception | None = None
        raised = False
        if handle.closed:  # closed after it left the queue (a close before takes it out of it)
            pass
        elif self._stopped:  # close() waits for the prefill under way, not for the others joining
            error = self._ended_error()
        else:
            try:
                if preempted:
                    live = self._resumed(preempted)
                else:
                    live = self._prefill(handle, handle.request)
                    self.stats.admitted += 1
            except Exception as e:  # a bad request fails alone, with the error stream() gives
                error, raised = e, True
        with self._lock:
            if handle not in self._joining:  # a stage died meanwhile and ended it (_end_all)
                return
            self._joining.remove(handle)
            if live is not None and self._stopped:  # closed, or a stage died: it would never be served
                live, error = None, self._ended_error()
            if live is not None:
                self._live.append(live)
                if live not in self._vocoding:  # a preempted stream's windows were vocoded meanwhile
                    self._vocoding.append(live)
            else:  # it does not join: its analyzer goes (a new stream's, or a preempted one's)
                self._release(handle)
                if preempted is not None and preempted in self._vocoding:  # not back: in no stage now
                    self._vocoding.remove(preempted)
            if handle.closed:  # ended meanwhile (S3Gen failed a window of it, or its reader left): once
                error = None
            elif error is not None:  # closed before S3Gen's next pass or a reader can see the error
                handle.closed = True
                self.stats.failed += raised  # the S3Gen stage counts its failures too
            self._lock.notify_all()
        if error is not None:
            self._end([handle], error)

    def _prefill(self, handle: StreamHandle, r: Request) -> _Live:
        conds = checked_voice(r.conds, r.text, PASS_CONDS)
        check_new_tokens(self.tts.t3, r.max_new_tokens)
        sampler = r.sampler
        if self._streams:  # the voice's conditionals may have been made on the default stream
            torch.cuda.current_stream(self.device).wait_stream(torch.cuda.default_stream(self.device))
        t0 = self._now()
        with self.plan.context(self.device):
            embeds, text_len = self._prompt(r)
            prefill_len = embeds.size(1)
            # first: past a GPT-2 backbone's positions (Turbo's) a longer cache, which the engine
            # refuses, is no fix (before 2026-12-04 the message below asked for one)
            check_positions(self.plan.decode.tfmr.config, prefill_len, r.max_new_tokens)
            holder = "each stream of the engine holds max_cache_len"
            fix = "start the engine with max_cache_len >= {need}"
            check_room(prefill_len, r.max_new_tokens, self.max_cache_len, holder, fix)
            aligned = self._align(handle, text_columns(prefill_len, text_len))
            with self._watching([(aligned, 0)]):
                logits, row = self._fill_rows(embeds)
            ids = torch.full((1, r.max_new_tokens + 1), self.tts.t3.hp.start_speech_token,
                             dtype=torch.long, device=self.device)  # fmt: skip
            seen = sampler.start(self.tts.t3.hp.start_speech_token, logits.size(-1), self.device)
        prefill_s = self._now() - t0
        self.stats.prefill_s += prefill_s
        state = handle.state
        gen = self._voice(conds)
        prompt_tokens = int(gen["prompt_token"].size(1))
        state.draw_from(r.seed, r.max_new_tokens + len(tail_tokens(self.tts.s3gen)), prompt_tokens)
        state.voice = conds  # as stream sets it: one_shot of the state then speaks this voice
        return _Live(
            handle=handle,
            rows=row,
            ids=ids,
            step=0,
            prefill_len=prefill_len,
            sampler=sampler,
            seen=seen,
            generator=StreamRandom(r.seed).generator(self.device),
            conds=conds,
            gen=gen,
            cutter=BufferedCutter(self.config, state),
            logits=logits,
            aligned=aligned,
            t3_s=prefill_s,  # in its first chunk's T3 time, as streaming.stream counts it
        )

    def _prompt(self, r: Request) -> tuple[torch.Tensor, int]:
        """Upstream's prefill input of request ``r`` in its voice as it was at its submit
        (``r.t3_cond``): its conditioning, text and start-of-speech tokens (both guidance rows
        where the request has guidance); and the number of text tokens."""
        cfg_weight = r.sampler.cfg_weight
        tokens = text_tokens(self.tts, r.text, cfg_weight, r.language_id).to(self.device)
        return prefill_embeds(self.tts.t3, r.t3_cond, tokens, cfg_weight), tokens.size(-1)

    def _align(self, handle: StreamHandle, text: tuple[int, int]) -> Alignment | None:
        """A new stream's alignment analyzer (None without ``alignment``), reading the prefill's
        ``text`` columns; what it changes on the model is undone by ``_release``."""
        if not self.alignment:
            return None
        scope = contextlib.ExitStack()
        tfmrs = [self.plan.prefill.tfmr, self.batched.parts.tfmr]
        aligned = scope.enter_context(new_analyzer(tfmrs, text, self.tts.t3.hp.stop_speech_token))
        with self._lock:
            self._aligning[id(handle)] = scope
        return aligned

    def _release(self, handle: StreamHandle) -> None:
        """Undo what a stream's analyzer changed (its spies, and the backbone's eager attention if
        it was the last): the stream left T3 for good. Nothing without an analyzer."""
        with self._lock:
            scope = self._aligning.pop(id(handle), None)
        if scope is not None:
            scope.close()

    def _fill_rows(self, embeds: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Prefill ``embeds`` (rows, positions, dim) into the next free rows of the cache: the
        last position's logits and the first row."""
        row = len(self._live) * self.rows_per_stream
        return self.batched.fill(row, embeds), row

    def _resume(self, live: _Live) -> _Live:
        """A preempted stream back in the cache: its prefill again, then the tokens it sampled,
        in one forward (vLLM's recompute); its next token is sampled from the logits after them,
        as the step it was taken out of would have given, on its own generator as before."""
        t0 = self._now()
        with self.plan.context(self.device):
            embeds, _ = self._prompt(live.handle.request)
            sampled = live.ids[:, 1 : live.step + 1]  # fed at learned speech positions 1 .. step
            positions = torch.arange(1, live.step + 1, device=self.device)[None]
            speech = T3Parts.of(self.tts.t3).embed(sampled, positions).expand(embeds.size(0), -1, -1)
            # its analyzer reads the last position's attention, as after the step it was taken out of
            with self._watching([(live.aligned, 0)], last=True):
                live.logits, live.rows = self._fill_rows(torch.cat([embeds, speech.to(embeds.dtype)], dim=1))
        resume_s = self._now() - t0
        self.stats.prefill_s += resume_s
        with self._lock:
            live.t3_s += resume_s
        return live

    def _resumed(self, live: _Live) -> _Live:
        """``_resume``, its out-of-memory error saying what happened and what to do."""
        try:
            return self._resume(live)
        except Exception as e:
            if not out_of_memory(e):
                raise
            error = torch.OutOfMemoryError(
                "out of memory recomputing this stream, preempted by a T3 step out of memory: hold "
                f"fewer streams at once (max_streams, --max-streams) ({e})"
            )
            raise error from e

    def _preempt(self, live: _Live) -> None:
        """Take a stream out of the T3 stage (its rows freed) and first into the queue: when there
        is room it is recomputed (``_resume``); its windows already cut are vocoded meanwhile."""
        with self._lock:
            self._leave(live, keep=True)
            if live.handle.closed:  # its reader left during the step: nothing to come back for
                self._release(live.handle)
                return
            self._preempted[id(live.handle)] = live
            self._waiting.insert(0, live.handle)
            self.stats.preempted += 1

    def _voice(self, conds: Any) -> dict[str, Any]:
        """S3Gen's reference dict of a voice: the one its streams still being vocoded use (windows
        of one voice can share a flow call), else made now. Nothing is kept past the voice's
        last stream: a server that gets a voice per request would keep every one of them."""
        with self._lock:
            for live in self._vocoding:
                if live.conds is conds:
                    return live.gen
        s3gen = self.tts.s3gen
        return cast_gen(shorten_prompt(conds.gen, self.config.prompt_s), s3gen.dtype, s3gen.device)

    def _leave(self, live: _Live, keep: bool = False) -> None:
        """Free a stream's rows: the last stream's rows move into them (rows stay ``[0, n)``).
        Its analyzer goes too, unless ``keep`` (a preempted stream comes back with it)."""
        if not keep:
            self._release(live.handle)
        with self._lock:
            index = self._live.index(live)
            last = self._live[-1]
            if last is not live:
                # Its keys and values are copied later, outside the lock (``apply_moves``): a
                # full-size stream's rows are ~0.5 GB, half a second's copy on a CPU, during which
                # the S3Gen stage and every reader (a server's event loop) would wait on the lock.
                self.batched.move(last.rows, live.rows)
                last.rows = live.rows
                self._live[index] = last
            self._live.pop()
            if live.handle.closed and live in self._vocoding:
                self._vocoding.remove(live)
            self._lock.notify_all()

    def _step_fn(self, bucket: int, span: int) -> Callable[..., torch.Tensor]:
        """The step for ``bucket`` streams attending to ``span`` slots, built (compiled, when the
        engine compiles) on first use: timed in ``stats.compile_s``, apart from ``t3_s``."""
        self.stats.compile_s += self.batched.build(bucket, span)
        return self.batched.steps[bucket, span]

    def _step(self) -> None:
        """One batched step: every active stream samples its next token from its logits (its own
        generator, its own processors; streams with equal settings in one batch), then one
        forward over the bucket's rows."""
        t0, compiled_before = self._now(), self.stats.compile_s
        lives = list(self._live)
        failed: list[tuple[_Live, Exception]] = []
        # One batch per sampler and number of logits rows (a stream without guidance in a family
        # with it has one row from its prefill, two after its first step).
        groups: dict[tuple[Sampler, int], list[_Live]] = {}
        for live in lives:
            groups.setdefault((live.sampler, live.logits.size(0)), []).append(live)
        with self.plan.context(self.device):
            sampled: dict[int, torch.Tensor] = {}
            for group in groups.values():
                try:
                    tokens = self._sample(group)
                except Exception as e:  # the group's sampling failed: its streams end, with the error
                    failed += [(live, e) for live in group]
                    tokens = torch.zeros((len(group), 2), dtype=torch.long, device=self.device)
                sampled.update({id(live): tokens[k] for k, live in enumerate(group)})
            # one host sync per step, for all streams
            read = torch.stack([sampled[id(live)] for live in lives]).tolist()
        values = [value for value, _ in read]
        broken = {id(live) for live, _ in failed}
        for live, (_, bad) in zip(lives, read, strict=True):
            if bad and id(live) not in broken:  # where multinomial would have raised
                failed.append((live, not_finite("at this stream's step")))
                broken.add(id(live))
        stop = self.tts.t3.hp.stop_speech_token
        ending = []
        with self._lock:  # the S3Gen stage sees every stream's token of this step, or none
            # one _fail per error (a sampling group's is one): each of its streams gets it with
            # the traceback it was raised with, before any reader can raise it (``_end``)
            by_error: dict[int, tuple[Exception, list[_Live]]] = {}
            for live, error in failed:
                by_error.setdefault(id(error), (error, []))[1].append(live)
            for error, group in by_error.values():
                self._fail(group, error, free=True)
            for live, value in zip(lives, values, strict=True):
                if id(live) in broken:
                    continue
                live.step += 1
                live.handle.sampled.append(value)
                live.handle.state.tokens.extend(speech_ids([value]))
                live.invalid += invalid_ids([value], stop)
                # inference_turbo feeds a first token that is the stop token back and goes on
                stopped = value == stop and not (self.turbo and live.step == 1)
                if stopped or live.step == live.ids.size(1) - 1:
                    live.handle.capped = not stopped  # before its end reaches the reader
                    ending.append(live)
        self.stats.t3_tokens += len(lives) - len(broken)  # a failed stream sampled nothing
        # Streams that sampled their last token leave before the forward, which they do not need:
        # its bucket holds only the streams going on (before 2026-12-04 they left after it, so a
        # step out of memory over their rows preempted a stream the others' bucket had room for).
        going_on = [live for live in lives if live not in ending and id(live) not in broken]
        sampling_s = self._now() - t0 if ending or not going_on else 0.0
        if ending:
            for live in ending:
                with self._lock:  # its rows are free before S3Gen can see its end
                    live.t3_s += sampling_s
                    live.handle.state.tokens.extend(tail_tokens(self.tts.s3gen))  # Turbo's closing silence
                    live.t3_end_s = time.perf_counter() - live.handle.submitted
                    live.t3_done = True
                    self._leave(live)
            self._wake()
        spent = sampling_s  # with no stream going on, the step was its sampling
        if going_on:
            self._forward_rows(going_on)
            spent = self._now() - t0 - (self.stats.compile_s - compiled_before)
        self.stats.t3_s += spent
        with self._lock:
            for live in going_on:
                live.t3_s += spent
        self._wake()

    def _forward_rows(self, still: list[_Live]) -> None:
        """The batched forward of the streams ``still`` decoding: each one's next logits. Out of
        memory, the newest of them is preempted (``_preempt``: requeued, recomputed when there
        is room, as vLLM preempts its newest request) and the forward runs again over the
        others, in a smaller bucket once few enough are left, and no more streams than those are
        admitted later (``fits``); a single stream out of memory, or any other failure, ends the
        streams with the error. Either way the engine goes on. A failed forward is no step (in
        neither ``t3_steps``, ``t3_rows``, ``buckets_used`` nor ``spans_used``; its time is in
        ``t3_s``), and the one run again writes the same cache slots."""
        n = self.rows_per_stream
        while still:
            self.batched.apply_moves()  # of streams that left since the last forward (a preempted one's too)
            bucket = next(b for b in self.step_buckets if b >= len(self._live))
            rows = bucket * n
            token = torch.full((rows, 1), 0, dtype=torch.long, device=self.device)
            position = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
            slot = torch.zeros((rows,), dtype=torch.long, device=self.device)
            for live in still:  # rows of streams that just ended keep position and slot 0, unread
                r = slice(live.rows, live.rows + n)
                token[r] = live.ids[0, live.step]
                position[r] = live.step
                slot[r] = live.prefill_len + live.step - 1
            span = span_for(max(live.prefill_len + live.step for live in still), self.max_cache_len)
            try:
                with self.plan.context(self.device), self._watching([(s.aligned, s.rows) for s in still]):
                    logits = self._step_fn(bucket, span)(token, position, slot)
            except Exception as e:
                if not out_of_memory(e) or len(still) == 1:
                    self._fail(still, e, free=True)
                    return
                newest = max(still, key=lambda live: live.handle.index)
                self._preempt(newest)  # the others' rows may move
                still.remove(newest)
                with self._lock:
                    self.fits = min(self.fits, len(still))
                continue
            for live in still:
                live.logits = logits[live.rows : live.rows + n]
            self.stats.t3_steps += 1
            self.stats.t3_rows += len(still)
            self._note_used(bucket, span)
            return

    @staticmethod
    def _watching(
        rows: Sequence[tuple[Alignment | None, int]], last: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """Around a forward: each stream's analyzer (if it has one) reads its first row of the
        forward (``watching_rows``)."""
        aligned = [(a, row) for a, row in rows if a is not None]
        return watching_rows(aligned, last) if aligned else contextlib.nullcontext()

    def _note_used(self, bucket: int, span: int) -> None:
        """Add to ``stats.buckets_used`` and ``spans_used`` by replacing the sets, never changing
        one: another thread (a server's scrape, ``to_dict``, ``asdict``) may be iterating it."""
        stats = self.stats
        if bucket not in stats.buckets_used:
            stats.buckets_used = stats.buckets_used | {bucket}
        if span not in stats.spans_used:
            stats.spans_used = stats.spans_used | {span}

    def _sample(self, group: list[_Live]) -> torch.Tensor:
        """The next token and whether its probabilities were not finite, (B, 2), of B streams
        with one sampler: guidance, the processors in upstream's order and the draws batched,
        each stream on its own generator."""
        if self.keep_logits:
            for live in group:
                live.handle.logits.append(live.logits.clone())
        sampler = group[0].sampler
        analyzers = [live.aligned.analyzer for live in group if live.aligned is not None]
        # the token each was just fed, as upstream's analyzer counts repeats (a host read)
        fed = torch.stack([live.ids[0, live.step] for live in group]).tolist() if analyzers else []
        tokens, bad = sampler.sample(
            torch.cat([live.logits for live in group]),
            torch.cat([live.seen for live in group]),
            [live.generator for live in group],
            analyzers,
            fed,
        )
        for k, live in enumerate(group):
            token = tokens[k : k + 1]
            sampler.saw(live.seen, token, first=live.step == 0)
            live.ids[:, live.step + 1] = token[:, 0]
        return torch.cat([tokens, bad.long()], dim=1)

    # ------------------------------------------------------------------ S3Gen stage

    def _s3gen_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    closed = [s for s in self._vocoding if s.handle.closed]
                    for live in closed:
                        self._vocoding.remove(live)
                    ready = [(live, w) for live in self._vocoding if (w := self._window(live)) is not None]
                    finished = [live for live in self._vocoding if live.cutter.done]
                    for live in finished:
                        self._vocoding.remove(live)
                        # T3's work after its last chunk (steps that gave only invalid ids or the
                        # stop token) is in no chunk: the report keeps it, and its wall runs to
                        # T3's end where that came later, as streaming.stream's does
                        report = live.handle.report
                        report.t3_after_s, report.invalid_after = live.t3_s, live.invalid
                        report.wall_s = max(report.wall_s, live.t3_end_s)
                    if closed or finished:  # their places are free: a queued stream may join
                        self._lock.notify_all()
                    # Heeded after the streams whose last chunk is out have ended (close() would
                    # fail them: they are still in _vocoding); windows cut now are not vocoded.
                    stopping = self._stopped
                    jobs, self._flow_jobs = self._flow_jobs, []
                    if ready or finished or stopping or jobs:
                        break
                    self._lock.wait(timeout=1.0)
            for live in finished:
                live.handle.put(END)
            if stopping:
                return
            for job in jobs:  # a warm-up, between flow calls
                job()
            if not ready:
                continue
            # First windows first (they set time to first audio), then by arrival.
            ready.sort(key=lambda lw: (not lw[1].first, lw[0].handle.index))
            key = self._batch_key(*ready[0])
            group = [lw for lw in ready if self._batch_key(*lw) == key][: self.flow_batches[-1]]
            with self._working("s3gen", f"a flow call of {len(group)} window(s)"):
                self._vocode_or_split(group)

    def _window(self, live: _Live) -> Window | None:
        more = not live.t3_done  # read before the tokens: a stream marked done has all of them
        return live.cutter.next_window(more)

    def _batch_key(self, live: _Live, w: Window) -> tuple[Any, ...]:
        # One flow call needs one prompt (voice) and one window length; a compiled one, one
        # padded length too (a last window as long as a first one pads to a later window's).
        return (id(live.gen), w.stop - w.start, w.regular if self.flow.compiled else None)

    def _vocode_or_split(self, group: list[tuple[_Live, Window]]) -> None:
        """The group's windows in one flow call; if that call fails (out of memory, say, or one
        stream's window), each window again in a call of its own, so only the streams whose own
        call fails end, each with its own error. Nothing was emitted by a call that failed: the
        flow runs before the vocoder, whose failures are split the same way."""
        try:
            self._vocode(group)
        except Exception as e:
            if len(group) == 1:
                self._fail([group[0][0]], e)
                return
            self.stats.flow_splits += 1
            for one in group:
                self._vocode_or_split([one])

    def _vocode(self, group: list[tuple[_Live, Window]]) -> None:
        """One flow call for the group's windows, then the vocoder over them; chunks out."""
        s3gen = self.tts.s3gen
        with torch.inference_mode():
            tokens = torch.tensor([live.handle.state.tokens[w.start : w.stop] for live, w in group])
            noise = torch.cat([live.cutter.noise(w) for live, w in group])
        if self._streams:  # the voice's tensors were made on T3's stream
            torch.cuda.current_stream(s3gen.device).wait_stream(self._streams["t3"])
        mels, flow_s, compiling, rows = self._flow_call(group[0][0].gen, tokens, noise, group[0][1].regular)
        self.stats.flow_compile_s += compiling
        self.stats.flow_calls += 1
        self.stats.flow_windows += len(group)
        self.stats.flow_padded += rows - len(group)
        self.stats.flow_s += flow_s
        # One vocoder call for the windows whose excitation caches are as long (a group's first
        # windows have none; its later ones, each its previous window's overlap).
        parts: dict[int, list[_ToVocode]] = {}
        for k, (live, w) in enumerate(group):
            cache = live.cutter.cache(w)
            length = 0 if cache is None else cache.size(-1)
            parts.setdefault(length, []).append(_ToVocode(live, w, mels[k : k + 1], cache))
        for part in parts.values():
            try:
                self._vocoder_or_split(part, flow_s / len(group))
            except Exception as e:  # past the flow call nothing may go back to it (its windows ran)
                self._fail([one.live for one in part], e)

    def _vocoder_or_split(self, part: list[_ToVocode], flow_s: float) -> None:
        """The vocoder over ``part``'s windows in one call, row k drawing from stream k's own
        generator as it would alone (``rows_drawing``), then each stream's chunk out. If the call
        fails, the generators are put back and each window runs in a call of its own, so only a
        stream whose own call fails ends, and the others still speak their solo audio."""
        s3gen, randoms = self.tts.s3gen, [one.live.handle.state.rng for one in part]
        back = [r.checkpoint() for r in randoms] if len(part) > 1 else []  # a lone window is not run again
        try:
            t1 = self._now()
            mels = torch.cat([one.mel for one in part])
            caches = [one.cache for one in part if one.cache is not None]  # all of them or none
            cache = torch.cat(caches) if caches else None
            # one window draws as streaming.stream's does; several, each from its stream's generator
            with randoms[0].drawing() if len(part) == 1 else rows_drawing(randoms):
                wav, source = vocoder(s3gen, mels, cache)
            voc_s = self._now() - t1
        except Exception as e:
            if len(part) == 1:
                self._fail([part[0].live], e)
                return
            self.stats.vocoder_splits += 1
            for restore in back:
                restore()
            for one in part:
                self._vocoder_or_split([one], flow_s)
            return
        self.stats.vocoder_calls += 1
        self.stats.vocoder_s += voc_s
        for k, one in enumerate(part):
            try:
                # its own source: a view would keep the whole batch's alive until its next window
                source_k = source[k : k + 1].clone() if len(part) > 1 else source
                chunk = one.live.cutter.assemble(one.window, wav[k].cpu().numpy(), source_k, s3gen)
                self._emit(one.live, one.window, chunk, flow_s, voc_s / len(part))
            except Exception as e:  # a stream's own seam: it fails alone
                self._fail([one.live], e)

    def _flow_call(
        self, gen: dict[str, Any], tokens: torch.Tensor, noise: torch.Tensor, regular: int
    ) -> tuple[torch.Tensor, float, float, int]:
        """Mels of windows ``tokens`` (windows, n) of the voice ``gen`` from their start ``noise``
        in one flow call; its seconds, the seconds it spent compiling (apart) and the rows it ran.
        A compiled flow runs it at a fixed shape: the windows padded to the next of
        ``flow_batches`` with copies of the last (each row of the flow is computed apart from the
        others; the copies are dropped), the estimator's frames to the prompt plus ``regular``
        tokens (``FlowPlan``)."""
        windows, pad_to = tokens.size(0), None
        if self.flow.compiled:
            batch = next(b for b in self.flow_batches if b >= windows)
            tokens = torch.cat([tokens, tokens[-1:].expand(batch - windows, -1)])
            noise = torch.cat([noise, noise[-1:].expand(batch - windows, -1, -1)])
            pad_to = regular
        compiled_before = self.flow.compile_s_here
        t0 = self._now()
        with overwritten():  # the noise is ours
            mels = flow_mels(self.tts.s3gen, tokens, gen, noise=noise, plan=self.flow, pad_to=pad_to)
        compiling = self.flow.compile_s_here - compiled_before
        return mels[:windows], self._now() - t0 - compiling, compiling, tokens.size(0)

    def _build_flow(self, conds: Any) -> None:
        """Compile the flow's shapes for ``conds``' voice now (a call of each window kind at each
        of ``flow_batches``; their mels dropped), in the S3Gen stage's thread where they run."""
        gen = self._voice(conds)
        prompt_frames = gen["prompt_feat"].size(1)
        for regular in (self.config.padded_tokens(first=True), self.config.padded_tokens(first=False)):
            for batch in self.flow_batches:
                if self._stopped:  # close() waits for the call under way, not the rest
                    raise self._stopped_error()
                tokens = torch.zeros(batch, regular, dtype=torch.long)
                noise = torch.zeros(batch, 80, prompt_frames + regular * FRAMES_PER_TOKEN)
                self._flow_call(gen, tokens, noise, regular)

    def _fail(self, lives: list[_Live], error: Exception, free: bool = False) -> None:
        """End streams with ``error`` (from either stage), each once: one already ended (failed
        by the other stage, or left by its reader) is neither counted nor ended again. Their rows
        are free before a reader sees it when the T3 stage fails them (``free``: every one's,
        ended before or not); else that stage frees them before its next step."""
        with self._lock:  # both stages fail streams
            ending = [live.handle for live in lives if not live.handle.closed]
            self.stats.failed += len(ending)
            for h in ending:
                h.closed = True  # before _leave: a closed stream leaves the S3Gen stage too
                self._unqueue(h)  # one preempted (S3Gen failed a window of it) is queued too
            if free:  # every one: the T3 stage fails a stream in its rows once
                for live in lives:
                    self._leave(live)
            self._end(ending, error)
            self._lock.notify_all()

    def _emit(self, live: _Live, w: Window, chunk: np.ndarray, flow_s: float, voc_s: float) -> None:
        h = live.handle
        with self._lock:  # the T3 stage adds to t3_s and invalid, and may fail the stream meanwhile
            if h.closed:  # failed (its reader has the error) or left by its reader: nobody gets it
                return
            t3_s, invalid, live.t3_s, live.invalid = live.t3_s, live.invalid, 0.0, 0
            m = ChunkMetrics(
                index=len(h.report.chunks),
                emitted_s=time.perf_counter() - h.submitted,
                t3_s=t3_s,
                flow_s=flow_s,
                vocoder_s=voc_s,
                invalid_tokens=invalid,
                prompt_frames=int(live.gen["prompt_token"].size(1)) * FRAMES_PER_TOKEN,
                queued_s=(h.admitted or h.submitted) - h.submitted,
                **window_metrics(w, chunk),
            )
            h.put((h.report.add(chunk, m), m))
