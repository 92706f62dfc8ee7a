"""The stream engine: each stream speaks what it speaks alone, at any concurrency, with streams
joining mid-way; failures stay with their stream; rows come back."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gc
import math
import re
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from torch._dynamo.utils import counters

from tts_workbench.core.constants import FRAMES_PER_TOKEN, SPEECH_VOCAB_SIZE
from tts_workbench.core.errors import CacheError, ConfigError, EmptyTextError, NoVoiceError, SourceError
from tts_workbench.core.families import family_of
from tts_workbench.core.patching import shadow
from tts_workbench.core.rng import StreamRandom
from tts_workbench.models import vocode
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.models.vocode import FlowPlan
from tts_workbench.runtime import batched_step
from tts_workbench.runtime import engine as engine_module
from tts_workbench.runtime.decode import DecodePlan, prefill_length, t3_decode, text_tokens
from tts_workbench.runtime.engine import StreamEngine, buckets
from tts_workbench.runtime.generation import generate, prepare_voice
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS, decode_plan
from tts_workbench.runtime.sampling import Sampler
from tts_workbench.runtime.stream_handle import StreamHandle, as_ready
from tts_workbench.runtime.streaming import StreamConfig, one_shot, stream_all

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Steer
    from tts_workbench.instruments.latency import ChunkMetrics

CONFIG = StreamConfig("buffered", first_window_s=0.6, window_s=1.2)
TEXTS = [
    "The first stream says a short sentence.",
    "A second one, somewhat longer, joins the first.",
    "Third.",
    "Number four reads numbers: one, two, three.",
]
TOKENS = 24  # two windows of CONFIG: the first (15 tokens) and a last one


@functools.cache  # many tests compare with the same few solo streams: each is run once
def solo(tts: ChatterboxTTS, text: str, seed: int) -> tuple[np.ndarray, list[int]]:
    """The stream alone, with the same (static-cache) step and the family's sampling defaults."""
    plan = DecodePlan.plain(tts.t3, step="static")
    wav, state = stream_all(
        tts, text, CONFIG, max_new_tokens=TOKENS, seed=seed, plan=plan, **family_of(tts).sampling
    )
    return wav, state.tokens


@functools.cache
def solo_logits(
    tts: ChatterboxTTS, text: str, seed: int, tokens: int = TOKENS
) -> tuple[list[int], list[torch.Tensor]]:
    """The ids the stream samples alone (the single-stream static step, the engine's default cache
    length) and the logits it samples each from."""
    plan = DecodePlan.plain(tts.t3, step="static", max_cache_len=512)
    logits: list[torch.Tensor] = []
    generator = StreamRandom(seed).generator()
    ids = text_tokens(tts, text)
    alone = t3_decode(tts.t3, tts.conds.t3, ids, max_new_tokens=tokens, plan=plan, logits_out=logits,
                      generator=generator, **family_of(tts).sampling)  # fmt: skip
    return alone.tokens[0].tolist(), logits


def check_logits(
    tts: ChatterboxTTS, handle: StreamHandle, text: str, seed: int, tokens: int = TOKENS
) -> None:
    """The stream (of an engine that keeps logits) sampled its solo ids, each from logits within
    float32 rounding of its solo ones: the random tiny model hardly depends on its KV cache, so a
    stream that attends to rows not its own (moved without its guidance row, say) still samples
    the same ids, but not from the same logits."""
    ids, logits = solo_logits(tts, text, seed, tokens)
    assert handle.sampled == ids, handle.index
    for i, (mine, theirs) in enumerate(zip(handle.logits, logits, strict=True)):
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max(), (handle.index, i)


def t3_done(engine: StreamEngine, handles: list[StreamHandle]) -> bool:
    """Whether T3 has sampled every token of ``handles``: each sampled one, and none holds rows."""
    return (
        all(h.sampled for h in handles) and engine.free_rows() == engine.max_streams * engine.rows_per_stream
    )


def check_against_solo(tts: ChatterboxTTS, streams: int, join_after: int) -> None:
    """``streams`` streams, the first ``join_after`` submitted at once and the rest while those
    are decoding: each gives its solo tokens exactly, from its solo logits (the first to end leave
    rows that a later one moves into), and audio within float32 rounding."""
    texts = [TEXTS[k % len(TEXTS)] for k in range(streams)]
    with StreamEngine(tts, max_streams=streams, config=CONFIG, keep_logits=True) as engine:
        kv = sum(t[: engine.rows_per_stream].nbytes for layer in engine.batched.kv for t in layer)
        assert engine.kv_bytes_per_stream == kv  # what a caller sizes max_streams by
        with engine.together():  # a burst: they join at one step
            handles = [
                engine.submit(t, seed=k, max_new_tokens=TOKENS) for k, t in enumerate(texts[:join_after])
            ]
        wait_until(lambda: len(handles[0].tokens) >= 8, 5.0)  # the others join while the first decode
        handles += [
            engine.submit(t, seed=k, max_new_tokens=TOKENS)
            for k, t in enumerate(texts[join_after:], start=join_after)
        ]
        chunks = {}
        for k, h in enumerate(handles):
            chunks[k] = [c for c, _ in h]
        assert engine.free_rows() == streams * engine.rows_per_stream and engine.active() == 0
    for k, h in enumerate(handles):
        wav, tokens = solo(tts, texts[k], k)
        assert h.tokens == tokens, k
        assert np.allclose(np.concatenate(chunks[k]), wav, atol=1e-5), k
        check_logits(tts, h, texts[k], k)
    assert max(engine.stats.buckets_used) == streams  # all of them in one batched step


def read_within(handle: StreamHandle, timeout: float = 120.0) -> list[ChunkMetrics]:
    """A stream's chunk records, read with a bound: a stream the engine never serves fails the
    test (a TimeoutError) instead of hanging it."""

    async def read() -> list[ChunkMetrics]:
        return [m async for _, m in handle]

    return asyncio.run(asyncio.wait_for(read(), timeout))


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll ``done`` every 10 ms until it holds or ``timeout`` seconds have passed; whether it held."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    return done()


@pytest.fixture(scope="module")
def tts(tiny_tts: ChatterboxTTS) -> ChatterboxTTS:
    return tiny_tts


@pytest.mark.parametrize(("streams", "join_after"), [(1, 1), (3, 2), (8, 4)])
def test_every_stream_speaks_its_solo_tokens(tts: ChatterboxTTS, streams: int, join_after: int) -> None:
    check_against_solo(tts, streams, join_after)


def test_streams_without_guidance_join_others_of_their_settings(tts: ChatterboxTTS) -> None:
    """cfg_weight=0 in a family with guidance: a stream has one logits row from its prefill,
    two after its first step, so one joining mid-way is sampled apart from one running."""
    sampling = {**family_of(tts).sampling, "cfg_weight": 0.0}
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        first = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS, **sampling)
        wait_until(lambda: len(first.tokens) >= 4, 5.0)  # the second joins while the first decodes
        second = engine.submit(TEXTS[1], seed=1, max_new_tokens=TOKENS, **sampling)
        for h in (first, second):
            assert sum(1 for _ in h) > 0 and h.error is None
    plan = DecodePlan.plain(tts.t3, step="static")
    for k, h in enumerate((first, second)):
        ids = text_tokens(tts, TEXTS[k], 0.0)
        alone = t3_decode(tts.t3, tts.conds.t3, ids, max_new_tokens=TOKENS, plan=plan,
                          generator=StreamRandom(k).generator(), **sampling)  # fmt: skip
        assert h.sampled == alone.tokens[0].tolist(), k


def test_a_stream_whose_logits_are_not_finite_fails_alone(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Sampler.sample

    def nan_at_temperature_07(self: Sampler, *a: object, **k: object) -> object:
        tokens, bad = real(self, *a, **k)  # type: ignore[arg-type]
        return tokens, bad | (self.temperature == 0.7)

    slow = threading.Event()  # set once bad has failed: good's steps then last, so it still runs

    def slowed(forward: Any) -> Any:
        def step(*a: Any, **k: Any) -> Any:
            if slow.is_set() and k["inputs_embeds"].size(1) == 1:
                time.sleep(0.5)
            return forward(*a, **k)

        return step

    def failing(self: Sampler, *a: Any, **k: Any) -> Any:
        if self.temperature == 0.7:
            slow.set()
        return nan_at_temperature_07(self, *a, **k)

    monkeypatch.setattr(Sampler, "sample", failing)
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine, shadow(tts.t3.tfmr, "forward", slowed):
        with engine.together():
            good = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
            bad = engine.submit(TEXTS[1], seed=1, max_new_tokens=TOKENS, temperature=0.7)
        with pytest.raises(RuntimeError, match="not finite"):
            list(bad)
        # its rows are free before its reader sees the error (EngineStream._fail): good's alone held
        assert engine.free_rows() == engine.rows_per_stream
        slow.clear()
        assert sum(1 for _ in good) > 0 and good.error is None
        assert engine.stats.t3_tokens == len(good.sampled) and bad.sampled == []  # bad sampled nothing
    assert good.tokens == solo(tts, TEXTS[0], 0)[1]


def test_no_chunk_follows_the_error_of_a_stream_t3_failed_while_s3gen_vocoded_it(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the window in the vocoder when T3 failed the stream was still emitted: its reader
    # got a chunk after the error, and the report counted audio nobody was given.

    in_vocoder, engine = threading.Event(), StreamEngine(tts, max_streams=1, config=CONFIG)
    real_vocoder, real_sample, real_vocode = engine_module.vocoder, Sampler.sample, engine._vocode
    failed: list[StreamHandle] = []

    def vocoder_outlasting_t3(*a: Any, **k: Any) -> Any:
        in_vocoder.set()  # T3's next sample fails the stream: this call returns after that
        with engine._lock:
            assert engine._lock.wait_for(lambda: failed[0].error is not None, timeout=60)
        return real_vocoder(*a, **k)

    def not_finite_once_vocoding(self: Sampler, *a: Any, **k: Any) -> Any:
        tokens, bad = real_sample(self, *a, **k)
        return tokens, bad | in_vocoder.is_set()

    vocoded = threading.Event()
    monkeypatch.setattr(engine_module, "vocoder", vocoder_outlasting_t3)
    monkeypatch.setattr(Sampler, "sample", not_finite_once_vocoding)
    monkeypatch.setattr(engine, "_vocode", lambda group: (real_vocode(group), vocoded.set()))
    with engine:
        failed.append(engine.submit(TEXTS[0], seed=0, max_new_tokens=200))
        assert vocoded.wait(timeout=120)  # the first window's vocode is over (its chunk out, before)
        for _ in range(2):  # every read: the error, no chunk
            got = []
            with pytest.raises(RuntimeError, match="not finite"):
                for _chunk, m in failed[0]:
                    got.append(m)
            assert got == []
        assert failed[0].report.chunks == [] and engine.stats.failed == 1


def test_a_compile_that_fails_falls_back_to_the_static_step(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As StaticStep does; before, the T3 stage died and every later stream was refused.

    def no_compiler(*a: object, **k: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(batched_step, "compile_method", no_compiler)
    with StreamEngine(tts, max_streams=1, step="compiled", config=CONFIG) as engine:
        with pytest.warns(RuntimeWarning, match="no compiler here"):
            engine.warmup()
        h = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        assert [m for _, m in h] and engine.running
        assert engine.step_mode == "static"
        assert "RuntimeError: no compiler here" in str(engine.fallback_reason)
    assert h.tokens == solo(tts, TEXTS[0], 0)[1]


def test_a_step_that_fails_ends_its_streams_and_the_engine_goes_on(tts: ChatterboxTTS) -> None:
    failing = threading.Event()

    def wrap(forward: Any) -> Any:
        def step(*a: Any, **k: Any) -> Any:
            if failing.is_set() and k["inputs_embeds"].size(1) == 1:  # a decode step, not a prefill
                raise RuntimeError("out of memory (made on purpose)")
            return forward(*a, **k)

        return step

    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        with shadow(tts.t3.tfmr, "forward", wrap):
            failing.set()
            lost = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
            with pytest.raises(RuntimeError, match="made on purpose"):
                list(lost)
            # its rows were free before its reader saw the error
            assert engine.free_rows() == 2 * engine.rows_per_stream and engine.active() == 0
            # a step that failed counts as none (before 2026-12-04: a step, its bucket and span used)
            assert engine.stats.t3_steps == 0 and engine.stats.buckets_used == set(), engine.stats
            failing.clear()
        assert engine.running and lost.error is not None
        after = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        assert [m for _, m in after] and engine.free_rows() == 2 * engine.rows_per_stream
    assert after.tokens == solo(tts, TEXTS[0], 0)[1]  # nothing of the failed step left in its rows


def fitting_two(
    engine: StreamEngine, oom: Callable[[], Exception], also: Callable[[torch.Tensor], bool] = lambda _: True
) -> Any:
    """A shadow of T3's forward that runs out of memory (``oom``) on a decode step over more than
    two streams' rows (where ``also`` holds of its input embeddings too)."""

    def wrap(forward: Any) -> Any:
        def step(*a: Any, **k: Any) -> Any:
            embeds = k["inputs_embeds"]
            if embeds.size(1) == 1 and embeds.size(0) > 2 * engine.rows_per_stream and also(embeds):
                raise oom()
            return forward(*a, **k)

        return step

    return shadow(engine.tts.t3.tfmr, "forward", wrap)


OOM = functools.partial(torch.OutOfMemoryError, "made on purpose")


def burst(engine: StreamEngine, streams: int, tokens: int = TOKENS) -> list[StreamHandle]:
    """``streams`` streams of ``TEXTS`` (seeds 0, 1, ...) joining ``engine`` at one step."""
    with engine.together():
        return [engine.submit(TEXTS[k % len(TEXTS)], seed=k, max_new_tokens=tokens) for k in range(streams)]


@pytest.mark.parametrize(
    "oom",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (made on purpose)"),
        lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory (made on purpose)"),
    ],
    ids=["cuda", "cpu"],
)
def test_a_step_out_of_memory_preempts_the_newest_stream_and_loses_none(
    tts: ChatterboxTTS, oom: Callable[[], Exception]
) -> None:
    """Three streams step in a bucket of three; a forward over more than two streams runs out of
    memory: the newest is preempted (requeued), the step runs again over the other two (a
    bucket of two), and the engine admits two at a time from then on. The preempted stream is
    recomputed when there is room and, like the three queued behind it, speaks its solo tokens
    and audio: no stream fails (before 2026-12-04 the step's three streams all did). Its time in
    the queue is from its submit to its first admission: the recompute's wait is not queueing."""
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine, fitting_two(engine, oom):
        handles = burst(engine, 6)
        assert wait_until(lambda: engine.stats.preempted > 0, 5.0)  # at the first step
        assert engine.counts() == (4, 2)  # the preempted stream queued again, first, not active
        assert engine.fits == 2  # while it has streams (see the test below)
        with engine._lock:  # the T3 stage takes from the queue
            assert engine._waiting[0] is handles[2]
        admitted = handles[2].admitted  # at its first admission
        assert admitted is not None
        waves = {k: np.concatenate([c for c, _ in h]) for k, h in enumerate(handles)}
        assert engine.stats.preempted == 1 and engine.stats.failed == 0
        assert max(engine.stats.buckets_used) == 2  # none of three ran
        assert engine.wait_rows_free(timeout=10.0) and engine.free_rows() == 3 * engine.rows_per_stream
        assert engine.counts() == (0, 0) and engine._preempted == {}
    for k, wav in waves.items():
        alone, tokens = solo(tts, TEXTS[k % 4], k)
        assert handles[k].error is None and handles[k].tokens == tokens and np.allclose(wav, alone, atol=1e-5)
        assert handles[k].capped  # random weights: each, the recomputed one too, ended at its cap
    queued = {m.queued_s for m in handles[2].report.chunks}
    assert handles[2].admitted == admitted and queued == {admitted - handles[2].submitted}


def test_an_engine_that_holds_no_stream_forgets_a_step_out_of_memory(tts: ChatterboxTTS) -> None:
    """After a step out of memory the engine admits only as many streams as that step ran over
    (``fits``, tested above) while it has streams; once it has none, held or queued, it takes
    ``max_streams`` again (the memory that step lacked may have been another stage's, S3Gen's on
    the same device): before, a server that ran out of memory once served fewer streams for the
    rest of its life."""
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine:
        with fitting_two(engine, OOM):
            for h in burst(engine, 3):
                read_within(h)
            assert engine.stats.preempted == 1 and max(engine.stats.buckets_used) == 2
        # the T3 stage, woken as the last stream leaves S3Gen, finds the engine empty
        assert wait_until(lambda: engine.fits == 3, 10.0)
        handles = burst(engine, 3)
        for h in handles:
            read_within(h)
        assert engine.fits == 3 and engine.stats.preempted == 1 and max(engine.stats.buckets_used) == 3
    assert [h.tokens for h in handles] == [solo(tts, TEXTS[k], k)[1] for k in range(3)]


def test_a_failed_steps_error_raised_by_each_reader_carries_only_its_own_raise(tts: ChatterboxTTS) -> None:
    """One error ends both streams of a failed step. Each read raises it with the traceback it
    was raised with, plus that read's own frames: before, every raise of the one object added
    its reader's frames to what the next reader saw (kept alive, with their locals), so a failed
    stream read again and again grew its traceback without end."""

    def wrap(forward: Any) -> Any:
        def step(*a: Any, **k: Any) -> Any:
            if k["inputs_embeds"].size(1) == 1:  # a decode step, not a prefill
                raise RuntimeError("the step broke (made on purpose)")
            return forward(*a, **k)

        return step

    def frames(error: BaseException | None) -> list[str]:
        assert error is not None
        return [f.name for f in traceback.extract_tb(error.__traceback__)]

    def reader_a(h: StreamHandle) -> None:
        with pytest.raises(RuntimeError, match="made on purpose"):
            list(h)

    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine, shadow(tts.t3.tfmr, "forward", wrap):
        a, b = burst(engine, 2)
        reader = threading.Thread(target=reader_a, args=(a,))
        reader.start()
        reader.join(timeout=120)
        assert not reader.is_alive() and a.error is b.error  # one error, both streams
        for _ in range(3):  # read again: the error again, each time from where it was raised
            with pytest.raises(RuntimeError, match="made on purpose"):
                list(b)
        seen = frames(b.error)
    assert "reader_a" not in seen and seen.count("_unwrap") == 1, seen
    assert "_forward_rows" in seen  # where it was raised is kept


def test_rows_move_outside_the_engine_lock(tts: ChatterboxTTS) -> None:
    """A stream that leaves before the last one frees rows the last one's keys and values move
    into: ~0.5 GB for a full-size stream at a server's cache length, half a second's copy on a
    CPU. It runs outside the engine's lock, so the S3Gen stage and the readers (a server's
    ``/health``, ``counts()``) go on meanwhile: before, under it. The moved stream still speaks
    its solo tokens."""
    answered: list[bool] = []

    def wrap(move: Any) -> Any:
        def moving() -> None:
            if engine.batched.moves:
                probe = threading.Thread(target=engine.counts)
                probe.start()
                probe.join(timeout=5.0)
                answered.append(not probe.is_alive())
            move()

        return moving

    engine = StreamEngine(tts, max_streams=2, config=CONFIG)
    with engine, shadow(engine.batched, "apply_moves", wrap):
        with engine.together():  # the short one has rows 0, the other rows after it
            short = engine.submit(TEXTS[0], seed=0, max_new_tokens=4)
            long = engine.submit(TEXTS[1], seed=1, max_new_tokens=TOKENS)
        read_within(short)
        read_within(long)
    assert answered and all(answered), answered
    assert long.tokens == solo(tts, TEXTS[1], 1)[1]


def test_a_preempted_stream_whose_reader_leaves_is_let_go(tts: ChatterboxTTS) -> None:
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine, fitting_two(engine, OOM):
        handles = burst(engine, 3)
        assert wait_until(lambda: engine.stats.preempted > 0, 5.0)  # at the first step
        handles[2].close()  # queued again when its reader leaves: out of the queue, nothing kept
        assert engine.counts() == (0, 2) and engine._preempted == {}
        assert all(len([c for c, _ in h]) > 0 for h in handles[:2])
        assert engine.wait_rows_free(timeout=10.0) and engine.counts() == (0, 0)
    assert [h.error for h in handles[:2]] == [None, None] and engine.stats.failed == 0


def test_a_stream_whose_reader_leaves_during_the_step_that_preempts_it_is_not_queued(
    tts: ChatterboxTTS,
) -> None:
    handles: list[StreamHandle] = []

    def leaving(_: torch.Tensor) -> bool:
        handles[2].close()  # its reader leaves while the step is under way
        return True

    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine, fitting_two(engine, OOM, leaving):
        handles += burst(engine, 3)
        assert all(len([c for c, _ in h]) > 0 for h in handles[:2])
        assert engine.stats.preempted == 0 and engine._preempted == {} and engine.queued() == 0


def test_a_preempted_stream_failed_by_s3gen_leaves_the_queue_with_its_error(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Preempted with its first window cut, which S3Gen (held up meanwhile) then fails to emit: it
    # stayed queued, counted, and close() ended it again, over its error.
    handles: list[StreamHandle] = []
    release = threading.Event()
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine:
        emit = engine._emit

        def failing(live: Any, *a: Any) -> None:
            if id(live.handle) in engine._preempted:
                raise RuntimeError("vocoder broke, on purpose")
            emit(live, *a)

        monkeypatch.setattr(engine, "_emit", failing)
        with engine._lock:  # S3Gen held up until the stream is preempted
            engine._flow_jobs.append(lambda: release.wait(60.0))
            engine._lock.notify_all()
        cut = CONFIG.first_window_tokens + CONFIG.lookahead_tokens  # its first window's tokens
        with fitting_two(engine, OOM, lambda _: len(handles[2].tokens) >= cut):
            with engine.together():
                # the two others long: no room comes free for it while they run
                handles += [
                    engine.submit(TEXTS[k], seed=k, max_new_tokens=(100, 100, 40)[k]) for k in range(3)
                ]
            try:  # S3Gen lets its windows go only once it is preempted, however slow T3 runs
                assert wait_until(lambda: engine.stats.preempted == 1, 30.0)
            finally:
                release.set()
            # its reader does not read yet (a read would drop it)
            assert wait_until(lambda: handles[2].error is not None, 30.0)
            assert engine.stats.preempted == 1 and engine.counts()[0] == 0 and engine._preempted == {}
    with pytest.raises(RuntimeError, match="on purpose"):  # its error still, not the close's
        list(handles[2])


def test_a_preempted_stream_whose_recompute_runs_out_of_memory_says_what_to_do(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine, fitting_two(engine, OOM):

        def resume(_live: Any) -> Any:
            with engine._lock:  # S3Gen busy meanwhile (a long flow call): no pass of it lets go of it
                engine._flow_jobs.append(lambda: time.sleep(1.0))
                engine._lock.notify_all()
            raise OOM()

        monkeypatch.setattr(engine, "_resume", resume)
        handles = burst(engine, 3)
        with pytest.raises(torch.OutOfMemoryError, match="recomputing this stream, preempted.*--max-streams"):
            list(handles[2])
        with engine._lock:  # in no stage once failed (it was counted active until S3Gen's next pass)
            assert all(live.handle is not handles[2] for live in engine._vocoding)
        assert all(len([c for c, _ in h]) > 0 for h in handles[:2])
        assert engine.wait_rows_free(timeout=10.0) and engine.counts() == (0, 0)


def slow_recomputes(
    engine: StreamEngine, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Any], threading.Event]:
    """Each recompute of ``engine`` half a second long: ``counts()`` read in each, and an event
    set as the first begins."""
    seen: list[tuple[int, int]] = []
    resume, recomputing = engine._resume, threading.Event()

    def slow(live: Any) -> Any:
        recomputing.set()
        time.sleep(0.5)
        seen.append(engine.counts())
        return resume(live)

    monkeypatch.setattr(engine, "_resume", slow)
    return seen, recomputing


def test_streams_being_recomputed_are_counted_active(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two streams preempted, let in together: while the first was recomputed the second, taken
    # from the queue too, was counted neither queued nor active.
    engine = StreamEngine(tts, max_streams=4, config=CONFIG)
    seen, _ = slow_recomputes(engine, monkeypatch)
    with engine, fitting_two(engine, OOM):
        handles = burst(engine, 4)
        assert wait_until(lambda: engine.stats.preempted == 2, 30.0)  # at the first steps
        with engine.together():  # no admission until the first two are done: then both at once
            assert all(len([c for c, _ in h]) > 0 for h in handles[:2])
        assert all(len([c for c, _ in h]) > 0 for h in handles[2:])
    assert engine.stats.preempted == 2 and [sum(c) for c in seen] == [2, 2], seen


def test_a_close_during_a_recompute_ends_the_stream_once(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close's error was put twice on its reader's queue.
    engine = StreamEngine(tts, max_streams=3, config=CONFIG)
    _, recomputing = slow_recomputes(engine, monkeypatch)
    with engine, fitting_two(engine, OOM):
        handles = burst(engine, 3)
        assert recomputing.wait(timeout=60.0)
    ends = [handles[2]._queue.get_nowait() for _ in range(handles[2]._queue.qsize())]
    assert len([e for e in ends if isinstance(e, BaseException)]) == 1, ends


def test_a_stream_that_ends_leaves_before_the_step_it_does_not_need(tts: ChatterboxTTS) -> None:
    # Its last token sampled, the first stream leaves before the forward: the two going on fit
    # (before 2026-12-04 the forward held its rows too, ran out of memory and ended the newest).
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine, fitting_two(engine, OOM):
        with engine.together():
            first = engine.submit(TEXTS[0], seed=0, max_new_tokens=1)
            handles = [engine.submit(TEXTS[k], seed=k, max_new_tokens=TOKENS) for k in (1, 2)]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
        list(first)
        assert engine.stats.preempted == 0 and engine.stats.failed == 0
    for k, (h, wav) in enumerate(zip(handles, waves, strict=True), start=1):
        alone, tokens = solo(tts, TEXTS[k], k)
        assert h.tokens == tokens and np.allclose(wav, alone, atol=1e-5)


def another_voice(tts: ChatterboxTTS, tmp_path: Path, seconds: float = 2.5, seed: int = 0) -> Any:
    """A voice of its own (a server's request, say), by default from a 2.5 s reference where the
    model's is 3 s (seed 0): it speaks other tokens and audio. The model keeps its voice. Not a
    fixture: pytest would hold the voice that a test checks is freed."""
    model_voice = tts.conds
    tts.prepare_conditionals(str(make_reference_wav(tmp_path / "r.wav", seconds=seconds, seed=seed)))
    other, tts.conds = tts.conds, model_voice
    return other


def test_a_stream_speaks_the_voice_of_its_submit_and_the_engine_keeps_none(
    tts: ChatterboxTTS, tmp_path: Path
) -> None:
    import gc
    import weakref

    voice = another_voice(tts, tmp_path)
    engine = StreamEngine(tts, max_streams=1, config=CONFIG)
    try:
        with engine.together():  # it waits: the model's voice changes before it is admitted
            default = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
            own = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS, conds=voice)
            model_voice, tts.conds = tts.conds, None
        try:
            spoken = [[c for c, _ in h] for h in (default, own)]
        finally:
            tts.conds = model_voice
        assert all(spoken) and own.state.voice is voice and default.state.voice is model_voice
        # the same text and seed, another voice: not the model's audio (a voice ignored would be)
        assert not np.array_equal(*(np.concatenate(chunks) for chunks in spoken))
        cache = weakref.ref(engine.batched.kv[0][0])
    finally:
        engine.close()
    held = weakref.ref(voice)
    del voice, own
    gc.collect()
    assert held() is None and cache() is None  # the engine (still referenced) holds neither
    assert not engine.batched._caches and not engine.batched.steps  # nor the cache's views and steps


def test_a_streams_one_shot_yardstick_speaks_the_voice_of_its_submit(
    tts: ChatterboxTTS, tmp_path: Path
) -> None:
    # Before, the engine left handle.state.voice None: one_shot fell back to the model's voice,
    # and a stream in another voice was compared with audio it never spoke (38 dB, not equal).
    other = another_voice(tts, tmp_path)
    config = StreamConfig("buffered", first_window_s=30, window_s=60)  # one window: the one-shot call
    with StreamEngine(tts, max_streams=1, config=config) as engine:
        h = engine.submit(TEXTS[0], seed=3, max_new_tokens=20, conds=other)
        wav = np.concatenate([c for c, _ in h])
    assert h.state.voice is other and h.state.report.s3gen_calls == 1
    assert np.array_equal(wav, one_shot(tts, h.state, config))


def hold_s3gen(engine: StreamEngine) -> threading.Event:
    """Hold the S3Gen stage (a long flow call, a loaded server's) until the event returned is set;
    back once the stage is held, with no window of a stream submitted after cut yet."""
    held, go = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        go.wait(60.0)

    with engine._lock:
        engine._flow_jobs.append(hold)
        engine._lock.notify_all()
    assert held.wait(10.0)
    return go


def test_streams_of_two_voices_ready_together_speak_each_their_own(
    tts: ChatterboxTTS, tmp_path: Path
) -> None:
    """Two voices with prompts of one length, their windows of one length ready at once: a flow
    call runs one voice's prompt, so each window goes in a call of its own voice and each stream
    speaks its audio alone (in one call with the other's, it would speak the other's voice)."""
    voices = [tts.conds, another_voice(tts, tmp_path, seconds=3.0, seed=1)]  # the model's: 3 s, seed 0
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        go = hold_s3gen(engine)
        with engine.together():
            handles = [engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS, conds=v) for v in voices]
        assert wait_until(lambda: t3_done(engine, handles), 60.0)  # every window of both is ready
        go.set()
        both = [np.concatenate([c for c, _ in h]) for h in handles]
    with StreamEngine(tts, max_streams=1, config=CONFIG, flow_batches=[1]) as engine:  # a window a call
        alone = [
            np.concatenate([c for c, _ in engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS, conds=v)])
            for v in voices
        ]
    assert not np.array_equal(alone[0], alone[1])  # the voices speak other audio
    assert all(np.allclose(b, a, atol=1e-5) for b, a in zip(both, alone, strict=True))


def test_a_new_streams_first_window_goes_before_the_later_windows_of_others(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first window sets a stream's time to first audio: S3Gen takes it before the later
    windows of streams already speaking, though those were submitted first."""
    calls: list[list[tuple[StreamHandle, bool]]] = []  # each flow call's windows: (stream, first?)
    go = threading.Event()
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        vocode = engine._vocode_or_split

        def spied(group: list[Any]) -> None:
            calls.append([(live.handle, w.first) for live, w in group])
            if len(calls) == 1:  # the first stream's first window: S3Gen busy until go
                go.wait(60.0)
            vocode(group)

        monkeypatch.setattr(engine, "_vocode_or_split", spied)
        early = engine.submit(TEXTS[1], seed=0, max_new_tokens=60)  # windows after its first to come
        assert wait_until(lambda: len(calls) == 1, 60.0)
        late = engine.submit(TEXTS[0], seed=1, max_new_tokens=TOKENS)
        assert wait_until(lambda: t3_done(engine, [early, late]), 60.0)  # both have windows ready
        go.set()
        assert read_within(early) and read_within(late)
    assert calls[0] == [(early, True)] and calls[1] == [(late, True)], calls[:2]
    assert (early, False) in calls[2]  # the early stream had a later window ready


def test_a_queued_stream_speaks_the_exaggeration_of_its_submit(tts: ChatterboxTTS) -> None:
    """A generate with another exaggeration while the streams wait replaces the model's T3
    conditionals (upstream's ``self.conds.t3 = T3Cond(...)``): before, the streams admitted after
    it were prefilled in that exaggeration, not in the voice as it was at their submit."""
    texts = [TEXTS[0], "The queued stream."]  # its 13th token is another in the exaggeration 0.9
    voice = tts.conds.t3
    with StreamEngine(tts, max_streams=1, config=CONFIG, keep_logits=True) as engine:
        try:
            with engine.together():  # both wait: the second queued behind the first
                handles = [engine.submit(t, seed=k, max_new_tokens=TOKENS) for k, t in enumerate(texts)]
                generate(tts, "x", max_new_tokens=2, exaggeration=0.9)
                assert tts.conds.t3 is not voice and engine.queued() == 2
            for h in handles:
                assert [c for c, _ in h] and h.error is None
        finally:
            tts.conds.t3 = voice
        # its prefill's logits, exactly those of the same stream submitted in the voice given back
        again = engine.submit(texts[1], seed=1, max_new_tokens=TOKENS)
        assert [c for c, _ in again] and torch.equal(handles[1].logits[0], again.logits[0])
    for k, h in enumerate(handles):
        assert h.tokens == solo(tts, texts[k], k)[1], k


def overflowing(tts: ChatterboxTTS, on: threading.Event) -> contextlib.AbstractContextManager[None]:
    """T3's first MLP returns inf while ``on`` is set: every later layer's keys and values,
    and the logits, are then NaN (a half-precision overflow, made on purpose)."""
    return shadow(tts.t3.tfmr.layers[0].mlp, "forward",
                  lambda forward: lambda x: forward(x) * (math.inf if on.is_set() else 1.0))  # fmt: skip


def test_a_stream_that_overflowed_leaves_nothing_in_its_rows_for_the_next(tts: ChatterboxTTS) -> None:
    # One row pair: the next stream gets the rows the overflowed one filled with NaN, and its
    # shorter prefill overwrites only part of them (a masked NaN still poisons attention).
    on = threading.Event()
    with overflowing(tts, on), StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        on.set()
        long = engine.submit(TEXTS[3], seed=0, max_new_tokens=TOKENS)
        with pytest.raises(RuntimeError, match="not finite"):
            list(long)
        on.clear()
        short = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)
        assert [c for c, _ in short] and short.error is None
    assert short.tokens == solo(tts, TEXTS[2], 2)[1]


def test_a_chunk_counts_its_streams_prefill_in_its_t3_time(tts: ChatterboxTTS) -> None:
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        h = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        list(h)
        stats = engine.stats
    # one stream: its chunks hold all of T3's time, prefill included (as streaming.stream counts)
    assert sum(c.t3_s for c in h.report.chunks) == pytest.approx(stats.t3_s + stats.prefill_s)


def test_a_streams_report_keeps_the_t3_work_after_its_last_chunk(
    tts: ChatterboxTTS, steer: type[Steer]
) -> None:
    # Before, T3 seconds and invalid ids after a stream's last chunk were dropped: a stream
    # whose only sample is not speech made no chunk and reported no T3 time at all.
    stop, bad = tts.t3.hp.stop_speech_token, SPEECH_VOCAB_SIZE
    last_three_bad = dict.fromkeys(range(TOKENS - 2, TOKENS + 1), bad)
    for edits, cap in ((last_three_bad, TOKENS), ({1: bad}, 1)):
        with shadow(tts.t3.speech_head, "forward", steer(edits)), StreamEngine(tts, config=CONFIG) as engine:
            h = engine.submit(TEXTS[0], seed=0, max_new_tokens=cap)
            list(h)
        s = h.report.summary()
        assert s["t3_s"] == pytest.approx(engine.stats.t3_s + engine.stats.prefill_s)
        assert s["invalid_tokens"] == sum(v >= bad and v != stop for v in h.sampled) >= len(edits)
        # its wall runs to T3's end, as streaming.stream's (before, 0 for the stream with no chunk)
        assert s["wall_s"] >= s["t3_s"] > 0


def test_capped_tells_a_stream_its_cap_ended_from_one_its_stop_token_ended(
    tts: ChatterboxTTS, steer: type[Steer]
) -> None:
    """A server counts the first (its speech may be cut short); random weights give it always."""
    stop = tts.t3.hp.stop_speech_token
    with shadow(tts.t3.speech_head, "forward", steer({4: stop})), StreamEngine(tts, config=CONFIG) as engine:
        stopped = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        list(stopped)
    with StreamEngine(tts, config=CONFIG) as engine:
        capped = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        list(capped)
    assert stopped.sampled[-1] == stop and len(stopped.sampled) == 4 and not stopped.capped
    assert len(capped.sampled) == TOKENS and stop not in capped.sampled and capped.capped


def test_a_stage_that_dies_says_why_to_later_callers(tts: ChatterboxTTS) -> None:
    # A fault outside any one stream's work (a failed step only ends its streams: above).
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:

        def broken(*a: object) -> None:
            raise MemoryError("out of device memory, on purpose")

        engine._step = broken  # type: ignore[method-assign]
        first = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        with pytest.raises(MemoryError, match="on purpose"):
            list(first)
        for _ in range(100):  # bounded: the stage has stopped by the time the stream failed
            if not engine.running:
                break
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=r"its t3 stage failed with MemoryError\('out of device") as e:
            engine.submit(TEXTS[1], seed=1)
        assert isinstance(e.value.__cause__, MemoryError)
        assert engine.stop_reason == str(e.value)  # what a server's /health reports
        assert engine.active() == 0 and engine.queued() == 0  # the failed stream is not counted
        # Its rows stay held (no stage runs any more), and a wait for them used to sit out its
        # whole timeout: with none at all it returns False, or the join finds it still waiting (a
        # liveness bound, not a timing). (A close() lets every row go: the test below.)
        returned: list[bool] = []
        wait = lambda: returned.append(engine.wait_rows_free(timeout=math.inf))  # noqa: E731
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(60)
        assert returned == [False] and engine.free_rows() == 0


def test_a_wait_for_rows_during_a_close_says_they_are_free(tts: ChatterboxTTS) -> None:
    """close() stops the stages, then lets every row go: a wait begun before it returned False as
    the close began, though the closed engine then held no row."""
    engine = StreamEngine(tts, max_streams=1, config=CONFIG)
    running = engine.submit(TEXTS[1], seed=0, max_new_tokens=400)
    wait_until(lambda: bool(running.sampled), 30.0)  # admitted and decoding
    returned: list[bool] = []
    waiter = threading.Thread(target=lambda: returned.append(engine.wait_rows_free(timeout=30)), daemon=True)
    waiter.start()
    engine.close()
    waiter.join(35)
    assert returned == [True]


def test_closing_a_busy_engine_ends_every_stream_and_counts_none(tts: ChatterboxTTS) -> None:
    engine = StreamEngine(tts, max_streams=1, config=CONFIG)
    running = engine.submit(TEXTS[1], seed=0, max_new_tokens=400)
    waiting = engine.submit(TEXTS[0], seed=1, max_new_tokens=TOKENS)
    wait_until(lambda: bool(running.sampled), 30.0)  # admitted and decoding
    assert engine.active() == 1 and engine.queued() == 1
    engine.close()
    # what /health and the Prometheus gauges report: no stream is left counted after close
    assert engine.active() == 0 and engine.queued() == 0
    # nor are the ended streams' rows (before, the running one's were still counted held)
    assert engine.free_rows() == engine.max_streams * engine.rows_per_stream and engine.wait_rows_free(0)
    for h in (running, waiting):
        with pytest.raises(RuntimeError, match="closed before this stream ended"):
            list(h)


def test_a_close_during_a_streams_last_window_lets_that_stream_end_whole(tts: ChatterboxTTS) -> None:
    # Before, the S3Gen stage saw the engine stopping before it saw the stream finished: a
    # stream that had received its whole audio then failed with "closed before it ended".
    engine = StreamEngine(tts, max_streams=1, config=CONFIG)
    vocode, closer = engine._vocode, threading.Thread(target=engine.close)

    def vocode_then_close(group: Any) -> None:
        vocode(group)  # the stream's only (so last) window, emitted
        closer.start()  # close() arrives now: it joins this thread, so it runs in another
        wait_until(lambda: engine._stopped, 5.0)  # for it to mark the engine stopped

    engine._vocode = vocode_then_close  # type: ignore[method-assign]
    handle = engine.submit(TEXTS[0], seed=0, max_new_tokens=10)  # one window
    chunks = list(handle)
    closer.join(timeout=30)
    assert len(chunks) == 1 and handle.error is None and not closer.is_alive()


def test_a_vocoder_failure_fails_its_stream_not_the_others_in_its_flow_call(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two streams of one text and seed reach every window at the same step: their windows share
    # each flow call and each vocoder call. The vocoder call of both fails, then the second
    # stream's call of its own fails too: that stream fails alone, the other speaks on.
    real, own_calls = engine_module.vocoder, []

    def fails(s3gen: Any, mels: torch.Tensor, cache: Any = None) -> Any:
        if mels.size(0) > 1:
            raise RuntimeError("out of memory, on purpose")
        own_calls.append(1)
        if len(own_calls) == 2:  # the second stream's call of its own
            raise RuntimeError("vocoder broke, on purpose")
        return real(s3gen, mels, cache)

    monkeypatch.setattr(engine_module, "vocoder", fails)
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        with engine.together():
            kept, lost = (engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS) for _ in "kl")
        with pytest.raises(RuntimeError, match="vocoder broke, on purpose"):
            list(lost)
        wav = np.concatenate([c for c, _ in kept])
        assert kept.error is None and engine.stats.failed == 1 and engine.stats.vocoder_splits == 1
        assert engine.stats.flow_windows == engine.stats.flow_calls + 1  # both in the first call only
        # the failed stream ended for its reader before T3's stage freed its rows: wait for them
        assert engine.wait_rows_free(timeout=10.0) and engine.free_rows() == 2 * engine.rows_per_stream
    alone, tokens = solo(tts, TEXTS[0], 0)
    assert kept.tokens == tokens and np.allclose(wav, alone, atol=1e-5)


SEEDS = (7, 8, 9)


def speak_together_after_t3(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[StreamHandle], list[np.ndarray], Any]:
    """SEEDS' streams of one text, S3Gen taking no window until T3 has ended all of them: then
    every stream's windows are ready at once, and those of one length go through the flow, and
    the vocoder, together. Their handles, audio and the engine's stats."""
    with StreamEngine(tts, max_streams=len(SEEDS), config=CONFIG) as engine:
        window, opened = engine._window, threading.Event()

        def gated(live: Any) -> Any:
            if len(engine._vocoding) == len(SEEDS) and all(v.t3_done for v in engine._vocoding):
                opened.set()  # and stays open as streams end
            return window(live) if opened.is_set() else None

        monkeypatch.setattr(engine, "_window", gated)
        with engine.together():
            handles = [engine.submit(TEXTS[0], seed=s, max_new_tokens=TOKENS) for s in SEEDS]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
    return handles, waves, engine.stats


def test_streams_of_other_seeds_share_vocoder_calls_and_keep_their_solo_audio(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before 2026-12-07 the vocoder ran a call per window. Now the windows of one flow call whose
    excitation caches are as long share one call, each stream's rows drawing HiFT's sine phases
    and noise from its own generator: each still speaks its solo audio."""
    handles, waves, stats = speak_together_after_t3(tts, monkeypatch)
    assert stats.vocoder_calls < stats.flow_windows and stats.vocoder_splits == 0, stats
    for seed, h, w in zip(SEEDS, handles, waves, strict=True):
        wav, tokens = solo(tts, TEXTS[0], seed)
        assert h.tokens == tokens and np.allclose(w, wav, atol=1e-5), seed
    assert not np.allclose(waves[0][: len(waves[1])], waves[1][: len(waves[0])], atol=1e-3)


def test_a_failed_batched_vocoder_call_is_run_again_a_window_a_call(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vocoder call of several windows that fails (out of memory, say) after drawing: each
    window goes again in a call of its own, from where its stream's generator was before the
    failed call, so every stream still speaks its solo audio."""
    real = engine_module.vocoder

    def no_batches(s3gen: Any, mels: torch.Tensor, cache: Any = None) -> Any:
        out = real(s3gen, mels, cache)  # it draws, then fails
        if mels.size(0) > 1:
            raise RuntimeError("out of memory, on purpose")
        return out

    monkeypatch.setattr(engine_module, "vocoder", no_batches)
    _, waves, stats = speak_together_after_t3(tts, monkeypatch)
    assert stats.vocoder_splits > 0 and stats.failed == 0
    for seed, w in zip(SEEDS, waves, strict=True):
        assert np.allclose(w, solo(tts, TEXTS[0], seed)[0], atol=1e-5), seed


def test_a_failed_batched_flow_call_is_run_again_a_window_a_call(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before 2026-12-04 a flow call that failed ended every stream in it. Now its windows go
    again one a call: a failure of the batch alone (an out-of-memory, say) loses no stream, and
    a failure of one stream's window ends that stream only."""
    flow, real = tts.s3gen.flow, tts.s3gen.flow.inference

    def no_batches(*a: Any, **k: Any) -> Any:
        if k["token"].size(0) > 1:
            raise RuntimeError("out of memory, on purpose")
        return real(*a, **k)

    monkeypatch.setattr(flow, "inference", no_batches)
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine:
        with engine.together():  # one text and seed: their windows are ready at the same steps
            handles = [engine.submit(TEXTS[0], seed=7, max_new_tokens=TOKENS) for _ in range(3)]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
        assert engine.stats.flow_splits > 0 and engine.stats.failed == 0
    wav, tokens = solo(tts, TEXTS[0], 7)
    assert all(h.tokens == tokens for h in handles) and all(np.allclose(w, wav, atol=1e-5) for w in waves)

    # One stream's windows cannot be prepared: it fails alone, with its own error.
    with StreamEngine(tts, max_streams=3, config=CONFIG) as engine:
        with engine.together():
            handles = [engine.submit(TEXTS[0], seed=7, max_new_tokens=TOKENS) for _ in range(3)]
        broken = handles[1]
        wait_until(lambda: engine.stats.admitted == 3, 5.0)  # until the engine has admitted it
        with engine._lock:  # the stages change these lists
            live = next(s for s in [*engine._live, *engine._vocoding] if s.handle is broken)

        def bad_window(*_a: object) -> Any:
            raise ValueError("this stream's window, on purpose")

        monkeypatch.setattr(live.cutter, "noise", bad_window)
        with pytest.raises(ValueError, match="this stream's window"):
            list(broken)
        kept = [np.concatenate([c for c, _ in h]) for h in (handles[0], handles[2])]
        assert engine.stats.failed == 1
    assert all(np.allclose(w, wav, atol=1e-5) for w in kept)


def test_a_stage_on_one_piece_of_work_too_long_is_reported_stalled(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung stage leaves ``running`` True: ``stalled`` names it (a server's health check asks)."""
    flow, real, release = tts.s3gen.flow, tts.s3gen.flow.inference, threading.Event()

    def hanging(*a: Any, **k: Any) -> Any:
        assert release.wait(timeout=60), "the test never released the flow"
        return real(*a, **k)

    monkeypatch.setattr(flow, "inference", hanging)
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        assert engine.stalled(after_s=0.0) is None  # idle: nothing to hang on
        handle = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        for _ in range(1000):  # bounded: until the first flow call has started
            if engine.stalled(after_s=0.2) is not None:
                break
            time.sleep(0.01)
        stall = engine.stalled(after_s=0.2)
        assert stall is not None and stall.startswith("the s3gen stage has been on a flow call of 1 window")
        assert engine.running and engine.stalled(after_s=60.0) is None  # not that long yet
        release.set()
        assert read_within(handle)
        assert engine.stalled(after_s=0.0) is None


def test_a_stream_both_stages_fail_is_failed_once(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # S3Gen's vocoder fails the stream while T3's step over it is in flight, then that step fails
    # too. Before, the stream was counted failed twice and its error replaced by the second one
    # (a second read raised another error than the first).

    vocoding, stepping, failed = threading.Event(), threading.Event(), []
    engine, real_vocoder = StreamEngine(tts, max_streams=1, config=CONFIG), engine_module.vocoder

    def vocoder_failing_during_a_step(*a: Any, **k: Any) -> Any:
        if vocoding.is_set():  # the stream after it
            return real_vocoder(*a, **k)
        vocoding.set()
        assert stepping.wait(timeout=60)  # T3's step over the stream is under way
        raise RuntimeError("the vocoder broke, on purpose")

    def wrap(forward: Any) -> Any:
        def step(*a: Any, **k: Any) -> Any:
            if vocoding.is_set() and not stepping.is_set() and k["inputs_embeds"].size(1) == 1:
                stepping.set()
                with engine._lock:  # the step outlives S3Gen's failure of its stream
                    assert engine._lock.wait_for(lambda: failed[0].error is not None, timeout=60)
                raise RuntimeError("the step broke too, on purpose")
            return forward(*a, **k)

        return step

    monkeypatch.setattr(engine_module, "vocoder", vocoder_failing_during_a_step)
    with shadow(tts.t3.tfmr, "forward", wrap), engine:
        failed.append(engine.submit(TEXTS[0], seed=0, max_new_tokens=200))
        for _ in range(2):
            with pytest.raises(RuntimeError, match="the vocoder broke"):
                list(failed[0])
        assert engine.wait_rows_free(timeout=60) and engine.free_rows() == engine.rows_per_stream
        assert engine.stats.failed == 1 and "vocoder" in str(failed[0].error)
        assert failed[0].report.chunks == [] and engine.active() == 0
        after = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)  # its rows were freed once
        assert read_within(after) and after.error is None
    assert after.tokens == solo(tts, TEXTS[2], 2)[1]


def test_the_warm_up_runs_in_the_t3_stage(tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA graph trees keep their graphs per thread: the steps are built where they run."""
    with StreamEngine(tts, max_streams=2, config=CONFIG, max_cache_len=256) as engine:
        threads: list[str] = []
        build = engine._step_fn

        def recorded(bucket: int, span: int) -> object:
            threads.append(threading.current_thread().name)
            return build(bucket, span)

        monkeypatch.setattr(engine, "_step_fn", recorded)
        assert engine.warmup() > 0  # seconds the builds took
    assert threads == ["engine-t3", "engine-t3"]  # buckets 1 and 2, one span
    with pytest.raises(RuntimeError, match="closed"):
        engine.warmup()


def test_a_stream_its_reader_left_during_a_close_ends_without_an_error(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that closes its stream while close() waits for the T3 step under way: the stream
    ended with its reader. close() used to end it again, with "the engine was closed before this
    stream ended", which its next read raised."""
    engine = StreamEngine(tts, max_streams=1, config=CONFIG)
    step, stepping, go = engine._step, threading.Event(), threading.Event()

    def held() -> None:  # the first step waits (no token yet: the stream's queue stays empty)
        stepping.set()
        go.wait(60)
        step()

    monkeypatch.setattr(engine, "_step", held)
    handle = engine.submit(TEXTS[0], seed=0, max_new_tokens=400)
    try:
        assert stepping.wait(60)  # admitted, its rows held
        closer = threading.Thread(target=engine.close, daemon=True)
        closer.start()
        s3gen = next(t for t in engine._threads if t.name == "engine-s3gen")
        s3gen.join(60)  # that stage has stopped; T3 is still in its step, close() waits for it
        assert not s3gen.is_alive() and not engine.running
        handle.close()  # the reader leaves before close() is done
    finally:
        go.set()
    closer.join(60)
    assert not closer.is_alive()
    assert handle.error is None and list(handle) == []


def test_a_close_during_the_warm_up_waits_for_one_build_not_all(tts: ChatterboxTTS) -> None:
    # Before, close() waited for every bucket's and span's build (each a compile, when compiling).
    engine = StreamEngine(tts, max_streams=4, config=CONFIG, max_cache_len=512)  # 3 buckets x 2 spans
    build, built, started = engine._step_fn, [], threading.Event()

    def slow(bucket: int, span: int) -> object:
        built.append((bucket, span))
        started.set()
        assert wait_until(lambda: engine._stopped, 30.0)  # a compile under way when close() comes
        return build(bucket, span)

    engine._step_fn = slow  # type: ignore[method-assign]
    errors: list[Exception] = []

    def warm() -> None:
        try:
            engine.warmup()
        except RuntimeError as e:
            errors.append(e)

    warming = threading.Thread(target=warm)
    warming.start()
    assert started.wait(timeout=30)
    engine.close()
    warming.join(timeout=30)
    assert len(built) == 1 and not warming.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])


def test_a_stream_queued_behind_a_warm_up_is_counted_queued_through_it(tts: ChatterboxTTS) -> None:
    # Before, a stream taken at the pass that ran a warm-up counted as active (not queued) all
    # through the warm-up's builds, before it was even prefilled.
    with StreamEngine(tts, max_streams=1, config=CONFIG, max_cache_len=256) as engine:  # one build each
        build, calls, building, release, seen = engine._step_fn, [], threading.Event(), threading.Event(), []

        def held(bucket: int, span: int) -> object:
            calls.append((bucket, span))
            if len(calls) == 1:  # the first warm-up's build: a stream and a second warm-up queue meanwhile
                building.set()
                assert release.wait(timeout=60)
            elif len(calls) == 2:  # the second warm-up's build
                seen.append(engine.counts())
            return build(bucket, span)

        engine._step_fn = held  # type: ignore[method-assign]
        first = threading.Thread(target=engine.warmup)
        first.start()
        assert building.wait(timeout=60)
        waiting = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)
        second = threading.Thread(target=engine.warmup)
        second.start()
        with engine._lock:  # the second warm-up's job is queued beside the stream
            assert engine._lock.wait_for(lambda: bool(engine._jobs), timeout=60)
        release.set()
        for thread in (first, second):
            thread.join(timeout=120)
            assert not thread.is_alive()
        assert read_within(waiting) and waiting.error is None
    assert seen == [(1, 0)]  # (queued, active) while the warm-up it waited for ran
    assert waiting.tokens == solo(tts, TEXTS[2], 2)[1]


def test_a_close_during_admissions_waits_for_one_prefill_not_all(tts: ChatterboxTTS) -> None:
    engine = StreamEngine(tts, max_streams=4, config=CONFIG)
    prefill, prefilled, started = engine._prefill, [], threading.Event()

    def slow(handle: Any, request: Any) -> Any:
        prefilled.append(handle)
        started.set()
        assert wait_until(lambda: engine._stopped, 30.0)  # a prefill under way when close() comes
        return prefill(handle, request)

    engine._prefill = slow  # type: ignore[method-assign]
    step, steps = engine._step, []
    engine._step = lambda: (steps.append(1), step())[-1]  # type: ignore[method-assign]
    with engine.together():  # four join at one step: admitted one after another
        handles = [engine.submit(TEXTS[0], seed=k, max_new_tokens=TOKENS) for k in range(4)]
    assert started.wait(timeout=30)
    engine.close()
    assert len(prefilled) == 1 and steps == []  # before, all four were prefilled, then a step ran
    for h in handles:  # each as any stream a close ends, whether it was prefilled or not
        with pytest.raises(RuntimeError, match="closed before this stream ended"):
            list(h)


def test_streams_past_the_first_span_sample_their_solo_tokens(tts: ChatterboxTTS) -> None:
    """The step attends to 256 cache slots while every stream's positions fit, then to 512:
    across the change each stream samples what the single-stream static step samples, from
    logits within float32 rounding of its (the random tiny model hardly depends on one key more
    or less: a span one slot short still samples the same tokens, but moves the logits)."""
    texts = [" ".join([t] * 4) for t in TEXTS[:2]]  # long prefills: the span changes a few dozen steps in
    prefills = [prefill_length(tts, t) for t in texts]
    n = 256 - min(prefills) + 30  # (before 2026-12-07 230 tokens after short prefills: 3x the steps)
    assert max(prefills) < 250, prefills  # both start in the 256 span, and end 30 or more steps past it
    with StreamEngine(tts, max_streams=2, config=CONFIG, max_cache_len=512, keep_logits=True) as engine:
        with engine.together():
            handles = [engine.submit(t, seed=k, max_new_tokens=n) for k, t in enumerate(texts)]
        for h in handles:
            assert sum(1 for _ in h) > 0
    assert engine.stats.spans_used == {256, 512}
    for k, h in enumerate(handles):
        check_logits(tts, h, texts[k], k, n)


def test_the_sets_of_buckets_and_spans_used_are_replaced_not_changed(tts: ChatterboxTTS) -> None:
    """A server's scrape reads ``stats`` (``to_dict``) while the T3 stage steps: a set it is
    iterating must not change size under it, so the stage puts new sets in their place."""
    with StreamEngine(tts, max_streams=1, config=CONFIG, max_cache_len=256) as engine:
        stats = engine.stats
        buckets_held, spans_held = stats.buckets_used, stats.spans_used  # what a reader holds
        assert read_within(engine.submit(TEXTS[2], seed=2, max_new_tokens=6))
        assert buckets_held == set() and spans_held == set()
        assert stats.to_dict()["buckets_used"] == [1] and stats.to_dict()["spans_used"] == [256]


@pytest.mark.parametrize(("flow_batches", "per_call"), [(None, 4), ([1, 2], 2)])
def test_windows_ready_at_one_step_share_a_flow_call(
    tts: ChatterboxTTS, flow_batches: list[int] | None, per_call: int
) -> None:
    # Four listeners of one text and seed: their windows are ready at the same steps (with random
    # weights about a fifth of the ids are not speech, so streams of other seeds rarely line up).
    # A call takes at most the largest of flow_batches.
    with StreamEngine(tts, max_streams=4, config=CONFIG, flow_batches=flow_batches) as engine:
        with engine.together():
            handles = [engine.submit(TEXTS[0], seed=7, max_new_tokens=TOKENS) for _ in range(4)]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
    assert engine.stats.flow_windows == per_call * engine.stats.flow_calls > 0
    # each chunk is charged its share of the call it shared
    assert sum(m.flow_s for h in handles for m in h.report.chunks) == pytest.approx(engine.stats.flow_s)
    # Each stage's busy time holds all its work (before 2026-12-04 the load study counted S3Gen's
    # as its flow calls and vocoder only, leaving out the windows' tokens, noise and crossfades).
    s, ms = engine.stats, 1e-3  # two clocks read around each other
    assert s.s3gen_busy_s + ms >= s.flow_s + s.vocoder_s > 0 and s.t3_busy_s + ms >= s.t3_s + s.prefill_s > 0
    wav, tokens = solo(tts, TEXTS[0], 7)
    assert all(h.tokens == tokens for h in handles)
    assert all(np.allclose(w, wav, atol=1e-5) for w in waves)


def test_a_cache_past_gpt2s_positions_is_refused(tmp_path: Path) -> None:
    """Turbo's GPT-2 adds a learned position to every input over the whole sequence (8196 of
    them): a longer cache held positions no step could embed (an IndexError once reached)."""
    turbo = load_model("turbo-tiny")
    limit = turbo.t3.tfmr.config.n_positions
    for make in (functools.partial(DecodePlan.plain, turbo.t3), functools.partial(StreamEngine, turbo)):
        with pytest.raises(ConfigError, match=f"max_cache_len {limit + 1} is past the {limit} positions"):
            make(max_cache_len=limit + 1)
    assert DecodePlan.plain(turbo.t3, max_cache_len=limit).max_cache_len == limit
    # A request past those positions is told to shorten its text, not to start the engine with a
    # longer cache, which the lines above refuse (before 2026-12-04 it was told so).
    prepare_voice(turbo, str(make_reference_wav(tmp_path / "r.wav", seconds=6.0)))  # Turbo: > 5 s
    with StreamEngine(turbo, max_streams=1, max_cache_len=limit, config=CONFIG) as engine:
        with pytest.raises(CacheError, match="shorten the text") as e:
            list(engine.submit(TEXTS[0], seed=0, max_new_tokens=limit))
        assert "max_cache_len >=" not in str(e.value)


def test_turbo_streams_speak_their_solo_tokens(tmp_path: Path, steer: type[Steer]) -> None:
    turbo = load_model("turbo-tiny")
    prepare_voice(turbo, str(make_reference_wav(tmp_path / "r.wav", seconds=6.0)))  # Turbo: > 5 s
    check_against_solo(turbo, 3, 2)
    # inference_turbo feeds a first token that is the stop token back and goes on (test_families)
    stop = turbo.t3.hp.stop_speech_token
    with (
        shadow(turbo.t3.speech_head, "forward", steer({1: stop})),
        StreamEngine(turbo, max_streams=1, config=CONFIG) as engine,
    ):
        handle = engine.submit(TEXTS[0], seed=3, max_new_tokens=6)
        assert [m for _, m in handle]
    assert handle.sampled[0] == stop and len(handle.sampled) == 6 and handle.capped
    with (  # its only token the stop token it goes on after: the cap ended it, not the stop
        shadow(turbo.t3.speech_head, "forward", steer({1: stop})),
        StreamEngine(turbo, max_streams=1, config=CONFIG) as engine,
    ):
        one = engine.submit(TEXTS[0], seed=3, max_new_tokens=1)
        list(one)
    assert one.sampled == [stop] and one.capped
    with StreamEngine(turbo, max_streams=1, config=CONFIG) as engine:  # what Turbo samples with
        with pytest.raises(ConfigError, match=r"'cfg_weight'.*use .*top_k.*no classifier-free guidance"):
            engine.submit(TEXTS[0], cfg_weight=0.5)
        with pytest.raises(ConfigError, match="'min_p'"):
            engine.submit(TEXTS[0], min_p=0.05)


def test_a_bad_request_fails_alone_and_rows_come_back(tts: ChatterboxTTS) -> None:
    with StreamEngine(tts, max_streams=2, config=CONFIG, max_cache_len=256) as engine:
        good = engine.submit(TEXTS[0], seed=1, max_new_tokens=TOKENS)
        empty = engine.submit("   ", seed=2)
        too_long = engine.submit(TEXTS[1], seed=3, max_new_tokens=400)
        late = engine.submit(TEXTS[2], seed=4, max_new_tokens=TOKENS)  # queued behind the others
        with pytest.raises(EmptyTextError):
            list(empty)
        with pytest.raises(CacheError, match="engine holds max_cache_len=256: lower max_new_tokens to"):
            list(too_long)
        assert len(np.concatenate([c for c, _ in good])) > 0
        assert [m for _, m in late]
        assert engine.stats.failed == 2 and engine.stats.admitted == 2
        assert engine.free_rows() == 4 and engine.active() == 0 and engine.queued() == 0
    # the failures took nothing from the streams served beside and after them
    assert good.tokens == solo(tts, TEXTS[0], 1)[1] and late.tokens == solo(tts, TEXTS[2], 4)[1]


def test_a_failed_stream_raises_its_error_at_every_read(tts: ChatterboxTTS) -> None:
    """The first read ends the stream (and closes it): a later one must not look like a stream
    that ended with no audio."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        empty = engine.submit("   ", seed=0)
        for _ in range(2):
            with pytest.raises(EmptyTextError):
                list(empty)

        async def read() -> list[Any]:
            return [item async for item in empty]

        with pytest.raises(EmptyTextError):
            asyncio.run(asyncio.wait_for(read(), timeout=60))


def test_streams_being_prefilled_count_as_active(tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's health and gauges read counts() (queued, active): a stream taken from the
    queue for its prefill is admitted, and counted, until it ends."""
    with StreamEngine(tts, max_streams=4, config=CONFIG) as engine:
        prefill = engine._prefill

        def slow(handle: Any, request: Any) -> Any:
            time.sleep(0.2)  # four prefills in a row: the count is read many times meanwhile
            return prefill(handle, request)

        monkeypatch.setattr(engine, "_prefill", slow)
        with engine.together():
            handles = [engine.submit(t, seed=k, max_new_tokens=6) for k, t in enumerate(TEXTS)]
        counts = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            count = sum(engine.counts())  # as the server reads them: both at one moment
            if any(h.report.chunks for h in handles):  # read after the count: no stream had ended
                break
            counts.append(count)
            time.sleep(0.005)
        assert counts and set(counts) == {4}, counts
        for h in handles:
            assert [c for c, _ in h]
        assert engine.active() == 0 and engine.queued() == 0


def test_a_voice_or_sampling_value_no_stream_takes_is_refused_at_submit(tts: ChatterboxTTS) -> None:
    """Before, these were queued and failed only at their turn, after the streams ahead of them:
    a path as the voice with Python's own AttributeError ('str' object has no attribute 't3'),
    cfg_weight=None with a ConfigError; language_id=5 ran on this model and failed on the
    multilingual one with an AttributeError."""
    from chatterbox import mtl_tts

    other = mtl_tts.Conditionals(tts.conds.t3, tts.conds.gen)  # the multilingual family's voice
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        wrong: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({"conds": "x.wav"}, SourceError, r"conds must be a voice prepared by this standard model .*got "
             r"str \(no voice\): call prepare_voice\(tts, wav\) / prepare_conditionals\(reference_wav\)"),
            ({"conds": other}, SourceError, r"got chatterbox\.mtl_tts\.Conditionals \(made by the "
             r"multilingual family's prepare_conditionals\): call prepare_voice"),
            ({"cfg_weight": None}, ConfigError, "cfg_weight must be a number, got None"),
            ({"temperature": "warm"}, ConfigError, "temperature must be a number, got 'warm'"),
            ({"language_id": 5}, ConfigError, "language_id must be a language code such as 'fr', or None"),
            # (before 2026-12-07 taken, and the stream spoke English; "en" is taken, below)
            ({"language_id": "fr"}, ConfigError, "the standard model speaks English only"),
        ]  # fmt: skip
        for kwargs, kind, message in wrong:
            with pytest.raises(kind, match=message):
                engine.submit(TEXTS[2], seed=0, max_new_tokens=6, **kwargs)
        # this family's voice, for another model size: it failed at its turn with torch's "shape
        # '[-1, 256]' is invalid for input of size 7"
        narrow = copy.copy(tts.conds)
        narrow.t3 = copy.copy(tts.conds.t3)
        narrow.t3.speaker_emb = torch.zeros(1, 7)
        with pytest.raises(
            SourceError, match=r"do not fit this model: t3\.speaker_emb is width 7, .* expects"
        ):
            engine.submit(TEXTS[2], seed=0, max_new_tokens=6, conds=narrow)
        # a Turbo voice's speech prompt (375 tokens) in this family's class, as a folder's conds.pt
        # of another family loads: ran unrefused before 2026-12-07
        longer = copy.copy(tts.conds)
        longer.t3 = copy.copy(tts.conds.t3)
        longer.t3.cond_prompt_speech_tokens = torch.zeros(1, 375, dtype=torch.long)
        with pytest.raises(
            SourceError, match=r"speech prompt is 375 tokens, the standard model's at most 150"
        ):
            engine.submit(TEXTS[2], seed=0, max_new_tokens=6, conds=longer)
        assert engine.queued() == 0 and engine.active() == 0  # nothing was queued
        assert engine.free_rows() == engine.max_streams * engine.rows_per_stream
        assert engine.stats.admitted == 0 and engine.stats.failed == 0
        served = engine.submit(TEXTS[2], seed=0, max_new_tokens=6, conds=tts.conds, language_id="en")
        assert read_within(served) and served.error is None


def test_a_sampling_value_no_stream_takes_is_refused_at_submit(tts: ChatterboxTTS) -> None:
    """Before, these were queued and failed only at their turn, after the streams ahead of them
    (the sampler was built at the prefill), with the same ConfigError (an infinite cfg_weight
    earlier still, after the prefill, as logits "not finite ... half precision?")."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        wrong: list[tuple[dict[str, float], str]] = [
            ({"temperature": 0.0}, r"temperature must be above 0 .*got 0\.0"),
            ({"top_p": 2.0}, r"top_p must be in \[0, 1\] .*got 2\.0"),
            ({"min_p": -1.0}, r"min_p must be in \[0, 1\] .*got -1\.0"),
            ({"repetition_penalty": 0.0}, r"repetition_penalty must be above 0 .*got 0\.0"),
            ({"cfg_weight": -5.0}, r"cfg_weight must be 0 .* or above, and finite, got -5\.0"),
            ({"cfg_weight": math.inf}, "cfg_weight must be 0 .* or above, and finite, got inf"),
        ]
        for kwargs, message in wrong:
            with pytest.raises(ConfigError, match=message):
                engine.submit(TEXTS[2], seed=0, max_new_tokens=6, **kwargs)
        assert engine.queued() == 0 and engine.active() == 0  # nothing was queued
        assert engine.stats.admitted == 0 and engine.stats.failed == 0
        served = engine.submit(TEXTS[2], seed=0, max_new_tokens=6)
        assert read_within(served) and served.error is None


def test_a_model_without_a_voice_is_refused_at_submit_with_the_engines_fix(tts: ChatterboxTTS) -> None:
    """Before, the stream was queued and failed at its turn asking for an ``audio_prompt_path``,
    which ``submit`` refuses; a voice prepared after the submit did not help it (it took none).
    The warm-up of a compiled flow said the same."""
    bare = load_model("tiny")
    with StreamEngine(bare, max_streams=1, config=CONFIG, flow=FlowPlan("compiled")) as engine:
        for call in (lambda: engine.submit(TEXTS[2], seed=0, max_new_tokens=6), engine.warmup):
            with pytest.raises(NoVoiceError, match=r"prepare_voice\(tts, wav\).*or pass conds=") as refused:
                call()
            assert "audio_prompt_path" not in str(refused.value)
        assert engine.queued() == 0 and engine.active() == 0 and engine.stats.failed == 0


def test_unknown_sampling_arguments_are_refused_at_submit(tts: ChatterboxTTS) -> None:
    """Upstream ``generate`` raises on an unknown keyword; the engine refuses it in the caller's
    thread, queues nothing, and goes on serving."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        with pytest.raises(ConfigError, match=r"'temprature'.*use cfg_weight, min_p, .*temperature"):
            engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS, temprature=0.1)
        with pytest.raises(ConfigError, match=r"'exaggeration'.*prepare_voice"):
            engine.submit(TEXTS[0], exaggeration=2.0)
        with pytest.raises(ConfigError, match="'top_k'"):  # Turbo's only: the standard model has none
            engine.submit(TEXTS[0], top_k=50)
        assert engine.queued() == 0
        served = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)
        assert [c for c, _ in served] and served.error is None
        assert engine.stats.admitted == 1 and engine.stats.failed == 0
    assert served.tokens == solo(tts, TEXTS[2], 2)[1]


def test_arguments_of_the_wrong_type_are_refused_at_submit(tts: ChatterboxTTS) -> None:
    """Before, these were queued and failed only at their turn, after the prefill, with torch's or
    Python's own error."""
    with StreamEngine(tts, max_streams=1, config=CONFIG, max_cache_len=256) as engine:
        wrong: list[tuple[dict[str, Any], str]] = [
            ({"seed": 2**64}, r"seed must be an int in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"),
            ({"seed": -(2**63) - 1}, "seed must be an int"),
            ({"seed": 1.5}, "seed must be an int"),
            ({"seed": True}, "seed must be an int"),
            ({"max_new_tokens": 10.5}, "max_new_tokens must be an int, got 10.5"),
            ({"max_new_tokens": True}, "max_new_tokens must be an int"),
            ({"text": 123}, "text must be a str, got int 123"),
        ]
        for kwargs, message in wrong:
            text = kwargs.pop("text", TEXTS[2])
            with pytest.raises(ConfigError, match=message):
                engine.submit(text, max_new_tokens=kwargs.pop("max_new_tokens", 6), **kwargs)
        assert engine.queued() == 0 and engine.stats.failed == 0  # nothing was queued
        for seed in (2**64 - 1, -(2**63)):  # the ends of what a generator takes are served
            assert read_within(engine.submit(TEXTS[2], seed=seed, max_new_tokens=6))
        # numpy integers are whole numbers (before, refused as "must be an int"), taken as ints
        numpy_made = engine.submit(TEXTS[2], seed=np.int64(3), max_new_tokens=np.int32(6))
        assert read_within(numpy_made)
        assert type(numpy_made.request.seed) is int and type(numpy_made.request.max_new_tokens) is int


def test_a_stream_that_exactly_fills_its_rows_speaks_its_solo_tokens(tts: ChatterboxTTS) -> None:
    """TOKENS tokens write the prefill's positions and TOKENS - 1 more (the last is never fed
    back): an engine of exactly that many serves the stream (before, refused with a CacheError)."""
    need = prefill_length(tts, TEXTS[0]) + TOKENS - 1
    with StreamEngine(tts, max_streams=1, config=CONFIG, max_cache_len=need) as engine:
        fits = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        assert read_within(fits) and fits.tokens == solo(tts, TEXTS[0], 0)[1]
        with pytest.raises(CacheError, match=f"max_cache_len={need}: lower max_new_tokens to {TOKENS} "):
            list(engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS + 1))


def test_a_reader_that_stops_frees_its_rows(tts: ChatterboxTTS) -> None:
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        quitter = engine.submit(TEXTS[1], seed=0, max_new_tokens=200)
        stayer = engine.submit(TEXTS[0], seed=1, max_new_tokens=TOKENS)
        for _chunk in quitter:
            break  # leaving the loop closes the stream
        assert quitter.closed
        assert [c for c, _ in stayer]
        for _ in range(100):  # the rows at T3's next step, the place a S3Gen pass later
            if engine.free_rows() == 4 and engine.active() == 0:
                break
            time.sleep(0.05)
        assert engine.free_rows() == 4 and engine.active() == 0
        assert len(quitter.sampled) < 200  # (its speech tokens are fewer anyway: ids are dropped)
    assert stayer.tokens == solo(tts, TEXTS[0], 1)[1]  # the quitter's leaving took nothing from it


def test_a_stream_waits_in_the_queue_while_the_engine_is_full(tts: ChatterboxTTS) -> None:
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        first = engine.submit(TEXTS[0], seed=1, max_new_tokens=TOKENS)
        second = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)
        submitted = time.perf_counter()  # after second's own submit time
        busy_until = submitted
        for _ in range(3000):  # bounded wait (30 s) for first's last token
            t = time.perf_counter()  # read before the check: at t first was still decoding
            if len(first.sampled) >= TOKENS:
                break
            busy_until = t  # second cannot have joined before it
            time.sleep(0.01)
        metrics = [m for _, m in second]
        assert [c for c, _ in first]
    # Causal, not a timing: second joined after first's last token, so it waited at least this.
    assert busy_until > submitted and metrics[0].queued_s >= busy_until - submitted
    assert {m.queued_s for m in metrics} == {metrics[0].queued_s}  # every chunk carries it


def test_a_stream_still_being_vocoded_holds_its_place(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most ``max_streams`` streams are active, S3Gen's included: before, a stream whose T3
    had ended let the next one in while S3Gen still had its windows to vocode, so with an S3Gen
    slower than T3 the streams (and their windows) piled up past ``max_streams``."""

    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        real_vocoder, prefill, idle = engine_module.vocoder, engine._prefill, engine._idle
        decided, seen, calls = threading.Event(), [], []

        def prefill_counted(handle: Any, request: Any) -> Any:
            seen.append((handle.index, engine.counts()))
            if handle.index == 1:  # the second stream was let in
                decided.set()
            return prefill(handle, request)

        def idle_watched() -> bool:
            out = idle()
            if out and engine._waiting and not engine._held:  # it waits, the second stream left queued
                seen.append(("idle", engine.counts()))
                decided.set()
            return out

        def slow_vocoder(*a: Any, **k: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:  # the first stream's only window: held until the T3 stage has chosen
                assert decided.wait(timeout=60)
            return real_vocoder(*a, **k)

        monkeypatch.setattr(engine, "_prefill", prefill_counted)
        monkeypatch.setattr(engine, "_idle", idle_watched)
        monkeypatch.setattr(engine_module, "vocoder", slow_vocoder)
        with engine.together():  # the first is admitted, the second queued behind it
            first = engine.submit(TEXTS[0], seed=0, max_new_tokens=10)  # one window, cut when T3 ends
            second = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)
        assert read_within(first) and read_within(second)  # the second joins once the first is out
        assert engine.active() == 0 and engine.queued() == 0
    # (queued, active): the second waited while the first was vocoded; its prefill came after
    assert seen[0] == (0, (1, 1)) and ("idle", (1, 1)) in seen and seen[-1] == (1, (0, 1)), seen
    assert max(active for _, (_, active) in seen) == 1
    assert second.tokens == solo(tts, TEXTS[2], 2)[1]


def test_a_stream_closed_while_queued_leaves_the_queue_at_once(tts: ChatterboxTTS) -> None:
    """Not when a slot frees: the queue (the server's queued_streams) drops it while the engine
    is still full, its reader ends without chunks, and the running stream is not disturbed."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        running = engine.submit(TEXTS[1], seed=0, max_new_tokens=400)
        wait_until(lambda: bool(running.sampled), 30.0)  # admitted and decoding
        waiting = engine.submit(TEXTS[0], seed=1, max_new_tokens=TOKENS)
        assert engine.queued() == 1
        waiting.close()
        for _ in range(100):  # polled for at most 1 s
            if engine.queued() == 0:
                break
            time.sleep(0.01)
        assert engine.queued() == 0 and engine.free_rows() == 0  # the running stream still holds its rows
        assert list(waiting) == [] and waiting.error is None and not waiting.sampled
        assert [c for c, _ in running] and running.error is None
        assert engine.stats.admitted == 1 and engine.active() == 0


def test_async_readers_that_leave_free_their_rows(tts: ChatterboxTTS) -> None:
    """What the server relies on: a reader closed after its first chunk, and one cancelled
    while its stream is still queued, both free their stream (rows or queue place) at once."""

    async def scenario(engine: StreamEngine) -> None:
        reading = engine.submit(TEXTS[1], seed=0, max_new_tokens=200)
        queued = engine.submit(TEXTS[0], seed=1, max_new_tokens=200)
        async with contextlib.aclosing(aiter(reading)) as chunks:
            await anext(chunks)  # admitted and speaking; the other waits for its rows
            waiting = asyncio.ensure_future(anext(aiter(queued)))
            await asyncio.sleep(0.05)
            assert engine.queued() == 1 and not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert reading.closed and queued.closed and not queued.sampled
        # The T3 stage frees the rows before its next step; the stream keeps its place (active)
        # until the S3Gen stage has let go of it, a pass later (bounded: before, the loop waited
        # for the rows alone and the check below caught it still active, once in a fresh clone).
        for _ in range(200):
            if engine.free_rows() == 2 and engine.queued() == 0 and engine.active() == 0:
                break
            await asyncio.sleep(0.05)

    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        asyncio.run(asyncio.wait_for(scenario(engine), timeout=120))
        assert engine.free_rows() == 2 and engine.active() == 0 and engine.queued() == 0


def test_leaving_as_ready_early_closes_every_stream(tts: ChatterboxTTS) -> None:
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        handles = [engine.submit(TEXTS[k], seed=k, max_new_tokens=200) for k in range(2)]
        for _k, _chunk, _m in as_ready(handles):
            break
        assert all(h.closed for h in handles)
        for _ in range(200):  # bounded; the rows at T3's next step, the place a S3Gen pass later
            if engine.free_rows() == 4 and engine.active() == 0:
                break
            time.sleep(0.05)
        assert engine.free_rows() == 4 and engine.active() == 0
        assert all(len(h.sampled) < 200 for h in handles)


def test_async_readers(tts: ChatterboxTTS) -> None:
    async def read(engine: StreamEngine, k: int) -> list[int]:
        handle = engine.submit(TEXTS[k % len(TEXTS)], seed=k, max_new_tokens=TOKENS)
        return [m.index async for _, m in handle]

    executor_threads: set[str] = set()

    async def main(engine: StreamEngine) -> list[list[int]]:
        readers = asyncio.gather(*(read(engine, k) for k in range(8)))
        deadline = time.monotonic() + 240
        while not readers.done() and time.monotonic() < deadline:  # watch the threads meanwhile
            executor_threads.update(t.name for t in threading.enumerate() if t.name.startswith("asyncio_"))
            await asyncio.sleep(0.05)
        return await asyncio.wait_for(readers, timeout=1)

    with StreamEngine(tts, max_streams=8, config=CONFIG) as engine:
        indices = asyncio.run(main(engine))
    assert all(ix == list(range(len(ix))) and ix for ix in indices)
    # Eight readers, no thread waiting for each: asyncio's default executor (a few threads on a
    # small machine, which would make the readers queue for them) was never started.
    assert not executor_threads


def test_many_streams_in_a_row_leave_nothing_behind(tts: ChatterboxTTS) -> None:
    with StreamEngine(tts, max_streams=8, config=CONFIG) as engine:
        handles = [
            engine.submit("" if k % 5 == 4 else TEXTS[k % 4], seed=k, max_new_tokens=6) for k in range(20)
        ]  # more than twice what it holds at once (scripts/engine_soak.py runs 200)
        ok = failed = 0
        for h in handles:
            try:
                ok += bool([c for c, _ in h])
            except EmptyTextError:
                failed += 1
        assert (ok, failed) == (16, 4)
        assert engine.free_rows() == 16 and engine.active() == 0 and engine.queued() == 0


def test_an_idle_engine_serves_the_next_stream(tts: ChatterboxTTS) -> None:
    """A server's engine goes idle between requests: a stream that finishes alone (its end seen
    with no window ready) must leave both stages running for the next one."""
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        for k in range(3):
            assert [c for c, _ in engine.submit(TEXTS[k], seed=k, max_new_tokens=6)]
            for _ in range(200):  # bounded: until the S3Gen stage has seen the stream end
                if engine.active() == 0:
                    break
                time.sleep(0.01)
            time.sleep(0.1)
            assert all(t.is_alive() for t in engine._threads), k


def test_bad_engine_settings_are_refused(tts: ChatterboxTTS) -> None:
    with pytest.raises(ConfigError, match="max_streams"):
        StreamEngine(tts, max_streams=0)
    for streams in (2.0, "2", True):  # were an AttributeError (no bit_length), a TypeError, 1 stream
        with pytest.raises(ConfigError, match=f"max_streams must be a whole number from 1, got {streams!r}"):
            StreamEngine(tts, max_streams=streams)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_cache_len must be at least 2"):  # was torch's own error
        StreamEngine(tts, max_cache_len=-5)
    with pytest.raises(ConfigError, match="static or compiled"):
        StreamEngine(tts, step="eager")
    with pytest.raises(ConfigError, match="buffered strategy only"):
        StreamEngine(tts, config=StreamConfig("naive"))
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]


def test_bfloat16_streams_agree_with_solo_bfloat16_streams(tts: ChatterboxTTS) -> None:
    # T3 in bfloat16 (a copy): a batched kernel may round differently from a batch of one, so a
    # near tie can flip a sample. Up to and including the first differing token (all when none differs)
    # the logits agree within 3% of the largest logit, the bound of the single-stream bf16 tests.
    plan = decode_plan(tts, "bfloat16")
    sampling = family_of(tts).sampling
    with StreamEngine(tts, max_streams=3, config=CONFIG, plan=plan, keep_logits=True) as engine:
        with engine.together():
            handles = [engine.submit(t, seed=k, max_new_tokens=TOKENS) for k, t in enumerate(TEXTS[:3])]
        for h in handles:
            assert [c for c, _ in h]
    solo_plan = DecodePlan(plan.prefill, plan.decode, step="static")
    for k, h in enumerate(handles):
        logits: list[torch.Tensor] = []
        ids = t3_decode(
            tts.t3, tts.conds.t3, text_tokens(tts, TEXTS[k], 0.5), max_new_tokens=TOKENS, plan=solo_plan,
            generator=StreamRandom(k).generator(), logits_out=logits, **sampling,
        ).tokens[0].tolist()  # fmt: skip
        first = next((i for i, (a, b) in enumerate(zip(h.sampled, ids, strict=True)) if a != b), len(ids))
        assert first > 0
        # the differing token's logits too: a flip must be a near tie, not a diverged state
        for i in range(min(first + 1, len(h.logits), len(logits))):
            assert (h.logits[i] - logits[i]).abs().max() <= 0.03 * logits[i].abs().max(), (k, i)


def test_a_step_first_needed_while_streams_run_compiles_once(tts: ChatterboxTTS, traced_only: None) -> None:
    """A shape first needed by a running step was compiled with inference tensors (made inside the
    step's inference mode), and again at its first real call (before 2026-12-04): twice, the
    second time inside the timed step. Dynamo's eager backend: its guards, without Inductor."""
    with StreamEngine(tts, max_streams=1, step="compiled", config=CONFIG, max_cache_len=256) as engine:
        graphs = counters["stats"]["unique_graphs"]
        handle = engine.submit(TEXTS[2], seed=2, max_new_tokens=6)  # no warm-up: built by the step
        read_within(handle)
        assert engine.stats.buckets_used == {1} and engine.stats.spans_used == {256}
        assert counters["stats"]["unique_graphs"] - graphs == 1


@pytest.mark.integration  # two cold bucket compiles (~50 s of one core): the serving path's
def test_the_compiled_engine_compiles_once_per_bucket_and_speaks_the_solo_tokens(tts: ChatterboxTTS) -> None:
    # One span (256 slots: the whole cache), so one graph per bucket.
    with StreamEngine(tts, max_streams=2, step="compiled", config=CONFIG, max_cache_len=256) as engine:
        graphs = counters["stats"]["unique_graphs"]
        assert engine.warmup() > 0
        assert counters["stats"]["unique_graphs"] - graphs == 2  # buckets 1 and 2
        graphs = counters["stats"]["unique_graphs"]
        alone = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)  # bucket 1, warmed up first
        assert sum(1 for _ in alone) > 0
        with engine.together():
            handles = [engine.submit(t, seed=k, max_new_tokens=TOKENS) for k, t in enumerate(TEXTS[:2])]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
        assert counters["stats"]["unique_graphs"] == graphs  # the real steps reused them
        assert engine.stats.buckets_used == {1, 2}
    for k, h in enumerate(handles):
        wav, tokens = solo(tts, TEXTS[k], k)
        assert h.tokens == tokens
        assert np.allclose(waves[k], wav, atol=1e-5)


def test_a_compiled_flow_pads_each_call_to_a_batch_size_and_keeps_every_streams_audio(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's side of a compiled flow, without the compiler (each shape "compiled" into the
    eager estimator, seconds instead of minutes): three windows ready together run as a call of
    four (the next of ``flow_batches``), the copy's mels dropped; the estimator's frames padded to
    the window kind's size; every stream still gets its solo audio."""
    seen: list[tuple[int, ...]] = []  # the estimator's input shapes, every call

    def compile_method(fn: Any, module: Any, *_a: Any, **_k: Any) -> Any:
        return lambda x, *rest: (seen.append(tuple(x.shape)), fn(module, x, *rest))[1]

    monkeypatch.setattr(vocode, "compile_method", compile_method)
    flow = FlowPlan("compiled")
    with StreamEngine(tts, max_streams=3, config=CONFIG, flow=flow, flow_batches=[1, 4]) as engine:
        assert engine.warmup() > 0
        built = set(flow.shapes)
        assert len(built) == 4  # first and later windows, at 1 and 4 windows
        with engine.together():  # one text and seed: their windows are ready at the same steps
            handles = [engine.submit(TEXTS[0], seed=7, max_new_tokens=TOKENS) for _ in range(3)]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
        stats = engine.stats
    assert flow.shapes == built  # the streams ran the warmed-up shapes only
    assert stats.flow_windows == 3 * stats.flow_calls > 0 and stats.flow_padded == stats.flow_calls
    prompt = engine._voice(tts.conds)["prompt_feat"].size(1)
    c = CONFIG
    kinds = {prompt + 2 * (c.first_window_tokens + c.lookahead_tokens),
             prompt + 2 * (c.left_context_tokens + c.window_tokens + c.lookahead_tokens)}  # fmt: skip
    assert {(rows, frames) for rows, _, frames in seen} == {(2 * b, f) for b in (1, 4) for f in kinds}
    wav, tokens = solo(tts, TEXTS[0], 7)
    assert all(h.tokens == tokens for h in handles)
    assert all(np.allclose(w, wav, atol=1e-5) for w in waves)


def test_flow_batches_must_be_whole_numbers_of_windows(tts: ChatterboxTTS) -> None:
    for bad in ([], [0, 2], [1.5], [True]):
        with pytest.raises(ConfigError, match="flow_batches"):
            StreamEngine(tts, max_streams=2, config=CONFIG, flow_batches=bad)  # type: ignore[arg-type]


@pytest.mark.integration  # two cold estimator compiles (~40 s of one core each)
def test_a_compiled_flow_compiles_in_the_warm_up_and_streams_keep_their_solo_audio(
    tts: ChatterboxTTS,
) -> None:
    flow = FlowPlan("compiled")
    with StreamEngine(tts, max_streams=2, config=CONFIG, flow=flow, flow_batches=[2]) as engine:
        graphs = counters["stats"]["unique_graphs"]
        engine.warmup()
        assert flow.compiled and len(flow.shapes) == 2  # first and later windows, 2 windows a call
        assert counters["stats"]["unique_graphs"] - graphs == 2
        with engine.together():
            handles = [engine.submit(t, seed=k, max_new_tokens=TOKENS) for k, t in enumerate(TEXTS[:2])]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
        assert counters["stats"]["unique_graphs"] - graphs == 2  # the streams reused them
        assert engine.stats.flow_compile_s == 0 and engine.stats.flow_calls > 0
    for k, h in enumerate(handles):
        wav, tokens = solo(tts, TEXTS[k], k)
        assert h.tokens == tokens
        # Inductor's kernels round apart from the eager ones (as test_flow_plan's compiled stream)
        assert np.linalg.norm(waves[k] - wav) / np.linalg.norm(wav) < 1e-3, k


def test_steps_run_over_the_buckets_asked_for_and_speak_the_solo_tokens(tts: ChatterboxTTS) -> None:
    """A few buckets (a compile each on a GPU): the live streams padded up to the next, and
    max_streams always one of them."""
    with StreamEngine(tts, max_streams=3, config=CONFIG, step_buckets=[1]) as engine:
        assert engine.step_buckets == [1, 3]
        with engine.together():
            handles = [engine.submit(t, seed=k, max_new_tokens=TOKENS) for k, t in enumerate(TEXTS[:2])]
        waves = [np.concatenate([c for c, _ in h]) for h in handles]
        assert engine.stats.buckets_used == {3}  # two streams, padded to three rows' worth
        # streams stepped, not the bucket's rows (the load study's streams per step): each stream's
        # first id comes from its prefill, each later one from a step
        assert engine.stats.t3_rows == sum(len(h.sampled) - 1 for h in handles) < 3 * engine.stats.t3_steps
        assert engine.stats.t3_tokens == sum(len(h.sampled) for h in handles)
    for k, h in enumerate(handles):
        wav, tokens = solo(tts, TEXTS[k], k)
        assert h.tokens == tokens and np.allclose(waves[k], wav, atol=1e-5)
    for bad in ([0], [4], [1.5]):
        with pytest.raises(ConfigError, match="step_buckets .* from 1 to max_streams"):
            StreamEngine(tts, max_streams=3, config=CONFIG, step_buckets=bad)  # type: ignore[list-item]


def test_a_wrapper_is_refused_while_an_engine_runs_on_its_model(tts: ChatterboxTTS) -> None:
    """Before 2026-12-06 a bfloat16 wrapper opened on a model an engine ran on cast T3's weights
    under the engine's float32 KV cache: its streams died with torch's "Expected query, key, and
    value to have the same dtype", which never named the wrapper. Refused now, the stream it was
    tried beside speaks its solo tokens, and once the engine is closed the model may be wrapped."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        handle = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
        assert wait_until(lambda: len(handle.sampled) >= 4, 60.0)
        with pytest.raises(ConfigError, match="in use by an open StreamEngine.*close the engine first"):
            PerformanceOptimizedTTS(tts, policy="bfloat16")
        assert read_within(handle) and handle.error is None
    assert handle.tokens == solo(tts, TEXTS[0], 0)[1]
    with PerformanceOptimizedTTS(tts, policy="bfloat16"):
        assert next(tts.t3.parameters()).dtype == torch.bfloat16
    assert next(tts.t3.parameters()).dtype == torch.float32


def test_an_engine_out_of_reach_is_closed_as_the_wrappers_refusal_says(tts: ChatterboxTTS) -> None:
    """An engine never closed runs until ``close()``: its stage threads hold it, so it is never
    collected (a notebook cell ``engine = StreamEngine(tts)`` run twice loses the first). Before
    2026-12-06 the wrapper's refusal said to close it, with no way to reach it: the model could
    not be wrapped again in that process. The refusal's recovery, run as written, closes it."""
    engine = weakref.ref(StreamEngine(tts, max_streams=1, config=CONFIG))  # no reference kept
    gc.collect()
    assert engine() is not None and engine().running  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="in use by an open StreamEngine") as refused:
        PerformanceOptimizedTTS(tts, policy="float32")
    recovery = re.search(r"(from \S+ import sharers), then (for engine in sharers\(tts\): engine\.close\(\))",
                         str(refused.value))  # fmt: skip
    assert recovery is not None, str(refused.value)
    exec("\n".join(recovery.groups()), {"tts": tts})
    assert engine() is None or not engine().running  # type: ignore[union-attr]
    with PerformanceOptimizedTTS(tts, policy="float32"):
        pass


def test_an_engine_is_refused_inside_a_wrappers_block(tts: ChatterboxTTS) -> None:
    """Before 2026-12-06 an engine built there ran on the wrapper's bfloat16 copies (its KV cache
    bfloat16), and once the wrapper closed and cast T3 back every stream failed with torch's dtype
    error while the engine said it was running. The refusal names the way out: the engine after
    the wrapper's close (built before it opens, it refuses the wrapper), with its own T3 dtype (a
    plan), which leaves the model's weights as they are."""
    with PerformanceOptimizedTTS(tts, policy="bfloat16"):
        with pytest.raises(
            ConfigError,
            match=r"held by an open PerformanceOptimizedTTS.*after the wrapper's close\(\).*"
            r"plan=decode_plan\(tts, \"bfloat16\"\)",
        ):
            StreamEngine(tts, max_streams=1, config=CONFIG)
    with StreamEngine(tts, max_streams=1, config=CONFIG, plan=decode_plan(tts, "bfloat16")) as engine:
        handle = engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS)
        assert read_within(handle) and handle.error is None
        assert engine.batched.kv[0][0].dtype == torch.bfloat16
        assert next(tts.t3.parameters()).dtype == torch.float32


def test_an_engine_and_a_wrapper_on_two_model_objects_around_one_t3_are_refused(tts: ChatterboxTTS) -> None:
    """Before 2026-12-06 the registry keyed on the model object: an engine on ``copy.copy(tts)`` (the
    same T3) ran beside a bfloat16 wrapper of ``tts``, on its cast weights, and a wrapper opened on
    the copy of a model an engine ran on cast T3 under the engine's KV cache."""
    with PerformanceOptimizedTTS(tts, policy="bfloat16"):
        with pytest.raises(ConfigError, match="held by an open PerformanceOptimizedTTS"):
            StreamEngine(copy.copy(tts), max_streams=1, config=CONFIG)
    with StreamEngine(tts, max_streams=1, config=CONFIG):
        with pytest.raises(ConfigError, match="in use by an open StreamEngine"):
            PerformanceOptimizedTTS(copy.copy(tts), policy="bfloat16")
    assert next(tts.t3.parameters()).dtype == torch.float32
    with StreamEngine(copy.copy(tts), max_streams=1, config=CONFIG):  # both gone: free again
        pass


def test_two_engines_run_on_one_model_at_once(tts: ChatterboxTTS) -> None:
    # Engines share a model (each its own KV cache over its weights): only a wrapper is kept out.
    with (
        StreamEngine(tts, max_streams=1, config=CONFIG) as first,
        StreamEngine(tts, max_streams=1, config=CONFIG) as second,
    ):
        handles = [first.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS),
                   second.submit(TEXTS[1], seed=1, max_new_tokens=TOKENS)]  # fmt: skip
        assert all(read_within(h) and h.error is None for h in handles)
    assert [h.tokens for h in handles] == [solo(tts, TEXTS[k], k)[1] for k in range(2)]


def test_queue_wait_ends_when_the_prefill_begins(tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch) -> None:
    """ChunkMetrics.queued_s is 'from the request to its prefill': causal, no timing."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        prefill, began = engine._prefill, {}

        def timed(handle: Any, request: Any) -> Any:
            began[handle.index] = time.perf_counter()
            return prefill(handle, request)

        monkeypatch.setattr(engine, "_prefill", timed)
        handles = [engine.submit(TEXTS[k], seed=k, max_new_tokens=TOKENS) for k in (0, 2)]  # 2nd queued
        for h in handles:
            first = [m for _, m in h][0]
            assert h.submitted + first.queued_s <= began[h.index], (h.index, first.queued_s)


def test_a_queued_streams_chunks_count_their_time_from_the_request(tts: ChatterboxTTS) -> None:
    """emitted_s counts from the request (queue wait included: ttfa_s, the load study's first
    audio): a chunk cannot be out before its stream was admitted."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        alone = [m for _, m in engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)][0].emitted_s
        hold = 2 * alone + 0.5  # longer than the stream takes from admission to its first chunk
        with engine.together():
            h = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
            time.sleep(hold)
        metrics = [m for _, m in h]
    assert metrics[0].queued_s >= hold
    assert all(m.emitted_s >= m.queued_s for m in metrics), [(m.emitted_s, m.queued_s) for m in metrics]


def test_a_sampling_error_fails_only_the_streams_sampled_with_it(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/many-streams.md: 'An error while sampling fails the streams sampled in that batch
    (those with the same settings)'."""
    real = Sampler.sample

    def broken_at_07(self: Sampler, *a: Any, **k: Any) -> Any:
        if self.temperature == 0.7:
            raise RuntimeError("sampler broke, on purpose")
        return real(self, *a, **k)

    monkeypatch.setattr(Sampler, "sample", broken_at_07)
    with StreamEngine(tts, max_streams=2, config=CONFIG) as engine:
        with engine.together():
            good = engine.submit(TEXTS[0], seed=0, max_new_tokens=TOKENS)
            bad = engine.submit(TEXTS[1], seed=1, max_new_tokens=TOKENS, temperature=0.7)
        with pytest.raises(RuntimeError, match="on purpose"):
            list(bad)
        assert [c for c, _ in good] and good.error is None and engine.stats.failed == 1
    assert good.tokens == solo(tts, TEXTS[0], 0)[1]


def test_a_padded_compiled_flow_call_gives_each_window_its_own_mels(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three different windows padded to a call of four: window k gets the mels of its own call
    (the existing test pads three identical windows, so a shifted slice passes it)."""
    monkeypatch.setattr(vocode, "compile_method", lambda fn, module, *_a, **_k: lambda *a: fn(module, *a))
    with StreamEngine(
        tts, max_streams=3, config=CONFIG, flow=FlowPlan("compiled"), flow_batches=[1, 4]
    ) as engine:
        gen = engine._voice(tts.conds)
        regular = CONFIG.padded_tokens(first=True)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, SPEECH_VOCAB_SIZE, (3, regular), generator=g)
        noise = torch.randn(3, 80, gen["prompt_feat"].size(1) + regular * FRAMES_PER_TOKEN, generator=g)
        mels, *_ = engine._flow_call(gen, tokens, noise, regular)
        for k in range(3):
            one, *_ = engine._flow_call(gen, tokens[k : k + 1], noise[k : k + 1], regular)
            assert (mels[k] - one[0]).abs().max() <= 1e-4 * one.abs().max(), k
