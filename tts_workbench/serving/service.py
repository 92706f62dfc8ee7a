"""One speech service: a model, its voices, a ``StreamEngine`` and the metrics a server exports.

A Ray Serve replica holds one (``deployment``); tests hold one directly. Voices are the WAV files
of a folder (``.wav`` in any case), by file stem, plus ``default`` (the generated reference voice
written into the run folder); each voice's conditionals are prepared once, at start. Requests
name voices, never paths, so no request reads or writes a file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.errors import CacheError, ConfigError, SourceError, WorkbenchError
from ..core.families import family_of, spoken_languages
from ..core.positions import positions_needed, tokens_that_fit
from ..models.reference import check_reference, make_reference_wav
from ..models.sources import load_model
from ..models.vocode import FlowPlan
from ..runtime.decode import prefill_length, speech_token_limit, spoken_language, text_tokens
from ..runtime.engine import StreamEngine, check_engine_options, check_sizes
from ..runtime.generation import prepare_voice
from ..runtime.optimized import decode_plan
from ..runtime.stream_handle import StreamHandle
from .protocol import Limits, RequestError, SpeechRequest, check_cache, pcm16, wav_header

TTFA_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
OUTCOMES = ("completed", "refused", "disconnected", "failed")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Everything a replica needs to build its service (it crosses to Ray workers as is)."""

    model: str = "tiny"
    family: str | None = None  # which to load of a folder holding two families' files
    device: str = "cpu"
    seed: int = 0
    voices_dir: str | None = None
    run_dir: str = "runs/serve"
    max_streams: int = 8
    step: str = "static"
    dtype: str = "float32"  # T3's weights in the engine (optimized.decode_plan: a copy); S3Gen as loaded
    flow: str = "eager"  # S3Gen's CFM estimator in the engine: eager, or compiled for every voice
    flow_batches: tuple[int, ...] | None = None  # windows per flow call (None: the engine's 1, 2, 4, ...)
    step_buckets: tuple[int, ...] | None = None  # streams a T3 step runs over (None: 1, 2, 4, ...)
    threads: int | None = None  # torch's intra-op threads in this process (None: torch's default)
    # 800 letters (about a cache position each), the voice's conditioning (~40 positions) and
    # 150 tokens fit 1024 positions: a longest input of plain words sent without max_tokens runs.
    # Some characters take more positions ("…" about 1.5): a request sent without max_tokens runs
    # with fewer tokens than default_tokens where the cache has less room after its input, and one
    # whose input leaves none is refused (400, "shorten").
    max_input_chars: int = 800
    max_cache_len: int = 1024
    default_tokens: int = 150
    # A stage on one prefill, step or flow call this long hangs: /health answers 503 and Ray
    # Serve replaces the replica. Far above any step or flow call, and a compile a step needs.
    stall_s: float = 300.0
    # Multilingual: each stream runs upstream's alignment analyzer (the static step; StreamEngine)
    alignment: bool = False
    fused: bool = False  # T3's step with fused projections (a copy of the backbone; DecodePlan)


def check_options(options: ServeOptions, prompt: int = 1, speech_tokens: int | None = None) -> None:
    """A ConfigError for options no request could run with: without a model, with a prompt of
    one position; with one, ``prompt`` is the fewest positions any prompt takes and
    ``speech_tokens`` the most tokens T3 has positions for (``decode.speech_token_limit``)."""
    if not 0 < options.stall_s < math.inf:  # NaN too
        raise ConfigError(f"argument --stall-s: must be a positive number of seconds, got {options.stall_s}")
    check_engine_options(None, options.step, alignment=options.alignment, fused=options.fused)
    most = options.max_streams
    check_sizes(options.step_buckets, options.flow_batches, most, f"--max-streams ({most}) lets run")
    if speech_tokens is not None and options.default_tokens > speech_tokens:
        raise ConfigError(
            f"argument --tokens: {options.default_tokens} tokens is beyond the {speech_tokens} speech "
            "positions T3 has (a request that sends no max_tokens gets up to --tokens): use --tokens "
            f"{speech_tokens} or fewer"
        )
    if positions_needed(prompt, options.default_tokens) > options.max_cache_len:
        raise ConfigError(
            f"argument --tokens: {options.default_tokens} tokens leave no room in --max-cache-len "
            f"{options.max_cache_len} for an input (a request that sends no max_tokens gets up to --tokens): "
            "lower --tokens or raise --max-cache-len"
        )


def check_input_fits(prefill: int, options: ServeOptions) -> None:
    """A ConfigError when an input of ``max_input_chars`` characters, ``prefill`` positions with
    the default voice, could never fit the KV cache. The caller counts "a" repeated (a position
    per character): a cheap worst case, not a bound (each request is checked on its own,
    ``SpeechService.speech``)."""
    if tokens_that_fit(prefill, options.max_cache_len) < 1:
        raise ConfigError(
            f"argument --max-input-chars: an input of {options.max_input_chars} characters needs about "
            f"{prefill} KV cache positions before its first token, and --max-cache-len is "
            f"{options.max_cache_len}: lower --max-input-chars or raise --max-cache-len to "
            f"{positions_needed(prefill, options.default_tokens)} or more"
        )


def find_voices(folder: str | None) -> dict[str, Path]:
    """The folder's WAV files (``.wav`` in any case) by stem; a SourceError if it is missing, holds
    none, or holds one that is no voice (each named, with why), a ConfigError if one is named
    ``default`` (the generated reference voice's name)."""
    if folder is None:
        return {}
    path = Path(folder)
    if not path.is_dir():
        raise SourceError(f"argument --voices: {folder} is not a folder: give a folder of WAV files")
    voices: dict[str, Path] = {}
    problems = []
    for wav in sorted(p for p in path.iterdir() if p.suffix.lower() == ".wav"):
        try:
            check_reference(wav)
        except SourceError as e:
            problems.append(str(e))
            continue
        if wav.stem in voices:  # bob.wav and bob.WAV, side by side where file names keep their case
            problems.append(f"{voices[wav.stem].name} and {wav.name} are both voice {wav.stem!r}")
        voices[wav.stem] = wav
    # A file the operator put there is meant to be a voice: refused at start, not dropped unsaid
    # (before 2026-12-05 it was left out, and a request for it told "unknown voice").
    if problems:
        raise SourceError(
            f"argument --voices: {folder} holds files that are no voice ({'; '.join(problems)}): "
            "fix, rename or remove them"
        )
    if not voices:
        raise SourceError(f"argument --voices: {folder} holds no .wav file: give a folder of WAV files")
    if "default" in voices:
        raise ConfigError(f"argument --voices: {voices['default']} would replace `default`, the generated "
                          "reference voice: rename the file (its stem is the voice's name)")  # fmt: skip
    return voices


class SpeechService:
    """A model, its voices and one engine, answering speech requests with audio bytes."""

    def __init__(self, options: ServeOptions, replica: str = "0") -> None:
        check_options(options)
        if options.threads:
            torch.set_num_threads(options.threads)
        self.options, self.replica = options, replica
        self.created = int(time.time())  # OpenAI's model list says when the model was made
        self.model_id = (
            f"chatterbox-{options.model}" if os.sep not in options.model else Path(options.model).name
        )
        tts = load_model(options.model, options.device, options.seed, family=options.family)
        speech_tokens = speech_token_limit(tts.t3)
        # both before the default voice is written
        check_engine_options(
            family_of(tts).name, options.step, alignment=options.alignment, fused=options.fused
        )
        check_options(options, speech_tokens=speech_tokens)
        paths = {"default": make_reference_wav(Path(options.run_dir) / "reference.wav")}
        paths.update(find_voices(options.voices_dir))
        self.voices: dict[str, Any] = {}
        # Each voice's conditionals once, and the cache positions they take before the text:
        # a request's prefill is then counted by the tokenizer alone, not by running T3's
        # conditioning encoder on the event loop (guidance doubles rows, not positions: one row).
        self.voice_positions: dict[str, int] = {}
        for name, path in paths.items():
            prepare_voice(tts, str(path))
            self.voices[name] = tts.conds
            self.voice_positions[name] = prefill_length(tts, "a", 0.0) - text_tokens(tts, "a", 0.0).size(1)
        tts.conds = self.voices["default"]
        self.tts = tts
        self.languages = spoken_languages(tts)  # what a request's ``language`` may name (GET /v1/models)
        # before the engine allocates its cache and warms up
        try:
            longest = self.prefill_positions("default", "a" * options.max_input_chars)
        except ConfigError:  # text_tokens: more text tokens than T3 has positions for
            raise ConfigError(
                f"argument --max-input-chars: an input of {options.max_input_chars} characters is more text "
                f"tokens than the {tts.t3.hp.max_text_tokens} T3 has positions for: lower --max-input-chars"
            ) from None
        check_input_fits(longest, options)
        # the shortest prompt: any input is one text token at least, as "." is
        fewest = min(self.prefill_positions(voice, ".") for voice in self.voices)
        check_options(options, fewest)
        # a cache longer than T3's positions holds tokens no stream can sample: advertise what can be met
        room = tokens_that_fit(fewest, options.max_cache_len)
        self.limits = Limits(self.model_id, tuple(self.voices), options.max_input_chars,
                             room if speech_tokens is None else min(room, speech_tokens))  # fmt: skip
        plan = dataclasses.replace(decode_plan(tts, options.dtype), fused=options.fused)
        self.engine = StreamEngine(
            tts, max_streams=options.max_streams, step=options.step, max_cache_len=options.max_cache_len,
            plan=plan, flow=FlowPlan(options.flow),
            flow_batches=options.flow_batches, step_buckets=options.step_buckets, alignment=options.alignment,
        )  # fmt: skip
        try:
            for conds in self.voices.values():  # a compiled flow's shapes are per voice (its prompt's length)
                self.engine.warmup(conds)
            self._metrics()
        except BaseException:  # no service for the caller to close: stop the engine's threads here
            self.engine.close()
            raise

    def _metrics(self) -> None:
        """Every series labelled with this replica: behind Ray Serve's proxy each scrape answers
        one replica, and series without the label would jump between replicas' counts."""
        disable_created_metrics()  # no *_created series: they say nothing a scraper needs here
        r = self.registry = CollectorRegistry()
        Info("tts_replica", "which replica answered, and its model", registry=r).info(
            {"replica": self.replica, "model": self.model_id}
        )
        r.register(_EngineMetrics(self.engine, self.replica))
        ttfa = Histogram("tts_time_to_first_audio_seconds", "a checked request to its first audio chunk",
                         ["replica"], buckets=TTFA_BUCKETS_S, registry=r)  # fmt: skip
        rtf = Histogram("tts_stream_rtf", "a completed stream's time to its end over its audio time",
                        ["replica"], buckets=RTF_BUCKETS, registry=r)  # fmt: skip
        self.ttfa, self.rtf = ttfa.labels(self.replica), rtf.labels(self.replica)
        streams = Counter("tts_streams", "streams by how they ended", ["replica", "outcome"], registry=r)
        # every outcome from zero, so that a rate over the first of them is not lost
        self.outcomes = {outcome: streams.labels(self.replica, outcome) for outcome in OUTCOMES}
        capped_help = "completed streams T3 ended at their token cap, not a stop token (speech cut short?)"
        capped = Counter("tts_streams_capped", capped_help, ["replica"], registry=r)
        self.capped = capped.labels(self.replica)

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of this replica's metrics."""
        return generate_latest(self.registry)

    def health(self) -> dict[str, Any]:
        """``status`` "ok"; "engine stopped" when the engine no longer runs, or "stalled" when
        a stage has been on one piece of work for more than ``stall_s`` (``StreamEngine.stalled``),
        with its ``reason``: the replica then answers /health with 503 and Ray Serve's health
        check replaces it (before 2026-12-04 a hung stage answered "ok")."""
        status, reason = "ok", self.engine.stop_reason
        if reason is not None:
            status = "engine stopped"
        elif (reason := self.engine.stalled(self.options.stall_s)) is not None:
            status = "stalled"
        queued, active = self.engine.counts()
        return {
            "status": status,
            **({} if reason is None else {"reason": reason}),
            "model": self.model_id,
            "replica": self.replica,
            "active_streams": active,
            "queued_streams": queued,
            "max_streams": self.engine.max_streams,
            # lower after a T3 step ran out of memory, until the engine has no stream, held or queued
            "streams_fit": self.engine.fits,
        }

    async def speech(self, req: SpeechRequest) -> SpeechStream:
        """Refuse a request too long for the KV cache, then start a stream and wait for its first
        chunk, so that a request the engine refuses becomes a ``RequestError`` before any byte is
        sent; then the bytes as the engine produces them. Closing the stream (a client gone)
        frees its rows in the engine, read from or not."""
        t0 = time.perf_counter()
        try:
            # Off the event loop: counting tokenizes, and on CUDA copies the tokens to the device,
            # which waits behind the engine's queued GPU work.
            tokens = await asyncio.to_thread(self._check_cache, req)
            handle = self.engine.submit(
                req.input, seed=req.seed, max_new_tokens=tokens, conds=self.voices[req.voice],
                language_id=req.language,
            )  # fmt: skip
            chunks = aiter(handle)
            first = await anext(chunks, None)
        except asyncio.CancelledError:  # the client left before its first chunk (rows freed)
            self.outcomes["disconnected"].inc()
            raise
        except RequestError:
            self.outcomes["refused"].inc()
            raise
        except WorkbenchError as e:  # a refusal _check_cache did not foresee
            if not self.engine.running:  # a stage that died with one fails every stream: not this one's
                self.outcomes["failed"].inc()
                raise RequestError(f"the engine stopped: {e}: this replica's /health answers 503 and Ray "
                                   "Serve replaces it; retry the request", status=503) from e  # fmt: skip
            self.outcomes["refused"].inc()
            param = "input" if isinstance(e, CacheError) else None
            raise RequestError(f"the engine refused this request: {e}", param) from e
        except Exception as e:  # the engine's own failure: this request fails, in OpenAI's format
            self.outcomes["failed"].inc()
            failed = f"the engine could not start this stream: {type(e).__name__}: {e}: retry the request"
            if not self.engine.running:  # health() says so: Ray Serve's check replaces the replica
                raise RequestError(f"{failed}: this replica's /health answers 503 and Ray Serve replaces it",
                                   status=503) from e  # fmt: skip
            # the app answers a RequestError and logs nothing: the traceback is logged here (with
            # no handler configured, to stderr, which Ray keeps as the replica's log)
            log.exception("a stream failed to start")
            raise RequestError(f"{failed}; if it fails again, the replica's log has the traceback",
                               status=500) from e  # fmt: skip
        head = [wav_header()] if req.response_format == "wav" else []
        if first is not None:
            self.ttfa.observe(time.perf_counter() - t0)
            head.append(pcm16(first[0]))
        return SpeechStream(self, handle, chunks, head, t0)

    def prefill_positions(self, voice: str, text: str, language: str | None = None) -> int:
        """KV cache positions the prefill of ``text`` in ``voice`` (and ``language``, a multilingual
        model's) fills (``prefill_length``'s count, from the voice's positions counted at start-up
        and the text's tokens)."""
        return self.voice_positions[voice] + text_tokens(self.tts, text, 0.0, language).size(1)

    def _check_language(self, language: str | None) -> None:
        """Refuse a ``language`` this model does not speak, naming the field (``spoken_language``:
        any but English on an English-only family; on a multilingual one, one upstream's model
        lacks or whose text front end cannot run here). The engine refuses it too, with its own
        ConfigError."""
        if language is None:
            return
        try:
            spoken_language(self.tts, language)
        except ConfigError as e:
            raise RequestError(f"language: {e}", "language") from None

    def _check_cache(self, req: SpeechRequest) -> int:
        """The tokens the request's stream may sample: its ``max_tokens``; the server's default
        (``default_tokens``) where it sent none, lowered to the room its input leaves in the KV
        cache (a 400 naming a field the client never sent would be no help). Refuse a request
        the cache cannot hold, naming the HTTP fields (the engine's own refusal names its
        arguments and the operator's fix)."""
        self._check_language(req.language)  # before the count, which tokenizes in that language
        try:
            prefill = self.prefill_positions(req.voice, req.input, req.language)
        except ConfigError as e:  # text_tokens: more text tokens than T3 has positions for
            raise RequestError(f"input: {e}", "input") from None
        tokens = req.max_tokens
        if not req.tokens_sent:  # no room at all: check_cache refuses the input
            tokens = min(tokens, max(1, tokens_that_fit(prefill, self.engine.max_cache_len)))
        check_cache(prefill, tokens, self.engine.max_cache_len)
        return tokens

    def close(self) -> None:
        """Close the engine: streams still running end with an error, its stages stop, the model is let go."""
        self.engine.close()


class SpeechStream(AsyncIterator[bytes]):
    """One request's audio bytes as the engine produces them. Its outcome is counted here, once,
    as it ends: read to its end (completed), the engine's error (failed), a read cancelled or
    the stream closed before its end (disconnected). Not an async generator: closing one never
    started runs none of its code, and ``api.SpeechResponse`` may close a body it never began to
    read, whose engine stream must stop all the same."""

    def __init__(self, service: SpeechService, handle: StreamHandle, chunks: AsyncIterator[Any],
                 head: list[bytes], t0: float) -> None:  # fmt: skip
        self.service, self.handle, self.chunks, self.t0 = service, handle, chunks, t0
        self.head = head  # bytes ready before the engine's next chunk: WAV's header, the first chunk
        self.outcome: str | None = None

    async def __anext__(self) -> bytes:
        if self.outcome is not None:  # closed, or failed: nothing more comes
            raise StopAsyncIteration
        if self.head:
            return self.head.pop(0)
        try:
            chunk, _metrics = await anext(self.chunks)
        except StopAsyncIteration:
            await self._end("completed")
            raise
        except asyncio.CancelledError:  # the client went away while this read waited
            await self._end("disconnected")
            raise
        except BaseException:
            await self._end("failed")
            raise
        return pcm16(chunk)

    async def aclose(self) -> None:
        """Stop the engine's stream, its rows freed, and count it disconnected, unless it has
        already ended (then nothing)."""
        await self._end("disconnected")

    async def _end(self, outcome: str) -> None:
        """Close the engine's stream and count ``outcome``: the first end only."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        try:
            await self.chunks.aclose()  # type: ignore[attr-defined]  # the handle's: its close frees the rows
        finally:
            self.service.outcomes[outcome].inc()
            report = self.handle.report
            if outcome == "completed" and report.audio_s:
                # to its end (its last chunk, or T3's end if later; the engine's clock, from the
                # submit, plus the checks before it), not to now: the client's pace of reading the
                # body is not the server's
                wall_s = self.handle.submitted - self.t0 + report.wall_s
                self.service.rtf.observe(wall_s / report.audio_s)
            if outcome == "completed" and self.handle.capped:
                self.service.capped.inc()


class _EngineMetrics(Collector):
    """What the engine counts, read at each scrape: its streams now (gauges) and its running
    counts (counters, for a scraper to rate; S3Gen's batch fill is the rate of windows over the
    rate of flow calls)."""

    def __init__(self, engine: StreamEngine, replica: str) -> None:
        self.engine, self.replica = engine, replica

    def collect(self) -> Iterator[Metric]:
        """Each series as the engine has it now, labelled with the replica."""
        stats = self.engine.stats
        queued, active = self.engine.counts()
        yield self._one(GaugeMetricFamily, "tts_active_streams", "streams admitted, not yet finished",
                        active)  # fmt: skip
        yield self._one(GaugeMetricFamily, "tts_queued_streams", "streams waiting for a free engine slot",
                        queued)  # fmt: skip
        yield self._one(GaugeMetricFamily, "tts_streams_fit",
                        "streams the engine admits at once: max_streams, fewer after a T3 step out of memory",
                        self.engine.fits)  # fmt: skip
        yield self._one(CounterMetricFamily, "tts_t3_tokens_sampled", "T3 tokens sampled, all streams",
                        stats.t3_tokens)  # fmt: skip
        yield self._one(CounterMetricFamily, "tts_s3gen_windows", "S3Gen windows through the flow",
                        stats.flow_windows)  # fmt: skip
        yield self._one(CounterMetricFamily, "tts_s3gen_flow_calls", "S3Gen flow calls (batches of windows)",
                        stats.flow_calls)  # fmt: skip
        yield self._one(CounterMetricFamily, "tts_s3gen_vocoder_calls",
                        "S3Gen vocoder calls (batches of windows)", stats.vocoder_calls)  # fmt: skip
        yield self._one(CounterMetricFamily, "tts_streams_preempted",
                        "streams a T3 step out of memory preempted (requeued, recomputed)",
                        stats.preempted)  # fmt: skip

    def _one(self, kind: type[GaugeMetricFamily | CounterMetricFamily], name: str, doc: str,
             value: float) -> Metric:  # fmt: skip
        """A family of one series, this replica's."""
        family = kind(name, doc, labels=["replica"])
        family.add_metric([self.replica], value)
        return family
