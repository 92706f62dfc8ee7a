"""The load study: how many real-time streams one device holds.

For each level (a number of streams), that many streams go through one ``StreamEngine``, each
read by a simulated real-time player: it starts playing at the first chunk and plays in real
time, so every chunk that arrives after the audio before it ran out is an underrun. Arrivals are
a burst (all at once) or Poisson (``poisson:RATE`` streams per second). Per stream: queue wait,
time to first audio, RTF, underruns and the sampled speech tokens; per level: first-audio
percentiles, aggregate seconds of audio per wall second, T3 tokens/s, S3Gen windows per flow
call, how busy each stage's thread was (the busiest one limits the level), and memory.

Each level gets an engine of its own, sized to it (``max_streams`` = the level), warmed up
before the clock starts (a compiled step is compiled per bucket then, not inside the level).
With ``flow="compiled"`` one compiled estimator (``vocode.FlowPlan``) serves every level: the
first level's warm-up compiles its shapes (each window kind at each of ``flow_batches``), later
levels compile only the batch sizes they add.
S3Gen (flow and vocoder) is shared by every level's engine, and its first calls cost more than
later ones (lazy set-up, allocator growth, kernel choice): before the first level, one untimed
stream (the first text, at the levels' token cap) goes through an engine of its own, so the first
level, usually the 1-stream baseline, does not pay that alone. Its seconds are the report's
``warmup_s``; it counts in no level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.constants import TOKENS_PER_S, UPSTREAM_SENTENCE
from ..core.errors import ConfigError, naming_flag
from ..core.families import family_of
from ..core.files import written
from ..core.machine import busy_machine_line, environment, read_bandwidth, slow_spell_line
from ..core.positions import positions_needed, tokens_that_fit
from ..core.progress import progress_bar
from ..core.strict_json import dumps as json_dumps
from ..core.tables import counted, render_sideways
from ..instruments.memory import device_memory_bytes, held_bytes, memory_window
from ..instruments.plots import load_figure, save
from ..models.sources import token_cap_note
from ..models.vocode import FlowPlan
from ..runtime.batched_step import kv_bytes_per_stream
from ..runtime.decode import (
    DEFAULT_MAX_CACHE_LEN,
    DecodePlan,
    checked_seed,
    prefill_length,
    speech_ids,
    spoken_language,
)
from ..runtime.engine import StreamEngine, check_engine_options, check_sizes
from ..runtime.optimized import decode_plan
from ..runtime.stream_handle import StreamHandle
from ..runtime.streaming import StreamConfig, stream_tokens

DEFAULT_TEXTS = (
    UPSTREAM_SENTENCE,
    "The quick brown fox jumps over the lazy dog, and then it runs away into the forest.",
    "Streaming speech should start quickly and never stop to catch its breath.",
    "How many voices can one machine carry before a listener hears a gap?",
)
# The longest a listener waits for speech to start before a level no longer counts as real
# time (issue 19's target on a GPU; conversational agents aim lower still).
FIRST_AUDIO_LIMIT_S = 0.5
# The most streams a level may have: far past any device's memory already (the KV check says
# so below it); past it a typo such as 400 digits overflowed the checks' float arithmetic.
MAX_LEVEL = 10**9
# The longest the largest level's Poisson arrivals may take on average: past it the rate is a
# typo (poisson:1e-300 overflows a sleep in process, and waits for ever over HTTP).
MAX_ARRIVAL_SPAN_S = 3600.0
# What the report's less obvious figures mean: a line under its table for each column it has.
LEGEND = {
    "audio_per_wall_s": "seconds of audio delivered per wall second, all streams together "
    "(1.0 = one real-time stream)",
    "t3_busy_pct": "(and s3gen_busy_pct) share of the wall time each stage's thread was working",
    "read_bandwidth_gb_s": "the host's memory read bandwidth (its CPU's) as the level started "
    "(a slow host reads less)",
}
# How long each level's bandwidth probe reads (``read_bandwidth``): the bench's second took 1.2 s
# here, a quarter of one 0.45 s, and read within 2% of it (three pairs, 2026-12-07).
PROBE_S = 0.25


def checked_levels(levels: Sequence[int], given: str) -> list[int]:
    """``levels`` as a study runs them, ascending (the command line's ``--streams`` rules,
    ``flags.levels``); a ConfigError
    naming ``--streams`` when there is none, one is not a positive integer, one is more than
    ``MAX_LEVEL`` or one is given twice. ``given``: the levels as the caller wrote them, for the
    message."""
    if not levels:
        raise ConfigError("argument --streams: no level given: give one or more, such as 1,2,4,8")
    if any(not isinstance(n, numbers.Integral) or n < 1 for n in levels):
        raise ConfigError(f"argument --streams: every level must be a positive integer, got {given}")
    if max(levels) > MAX_LEVEL:
        raise ConfigError(
            f"argument --streams: a level of more than {MAX_LEVEL} streams is more than any device holds, "
            f"got {given if len(given) <= 60 else given[:57] + '...'}: give fewer"
        )
    if len(set(levels)) < len(levels):
        raise ConfigError(f"argument --streams: a level is given twice in {given}: give each once")
    return sorted(int(n) for n in levels)


def checked_level_seed(seed: object, largest: int, bound: int = 2**64) -> int:
    """``seed`` as an int (``decode.checked_seed``), or a ConfigError where the ``largest`` level's
    last stream would take a seed of ``bound`` or more (a power of two; by default the engine's,
    past which no generator takes one; a server's may be less): stream k of a level takes
    ``seed + k``."""
    whole = checked_seed(seed)
    last = whole + largest - 1
    if last >= bound:  # found now, not once the levels before ran
        raise ConfigError(
            f"seed {whole}: the {largest}-stream level's last stream takes seed {last}, past "
            f"2**{bound.bit_length() - 1} - 1: give {bound - largest} or less"
        )
    return whole


def check_level_buckets(
    step_buckets: Sequence[int] | None, levels: Sequence[int], flow_batches: Sequence[int] | None = None
) -> None:
    """``engine.check_sizes`` against the largest level: no level's engine would run a larger
    size, and the report would list it."""
    check_sizes(step_buckets, flow_batches, max(levels), f"the largest level ({max(levels)} streams) runs")


def check_kv_fits(largest: int, kv_per_stream: int, device: torch.device) -> None:
    """A ConfigError naming ``--streams`` when the ``largest`` level's KV cache alone is more than
    the device's memory beside what this process holds already (``memory.held_bytes``: the model, the
    voice): its engine could not be made, and the levels before it would be lost. The bound it
    suggests fits there; where not even one stream's cache fits, it names what shrinks that cache."""
    total, held = device_memory_bytes(device), held_bytes(device)
    left, need = max(0, total - held), largest * kv_per_stream
    if need > left:
        # to the fewest decimals (2 at least) that tell them apart: at the boundary :.3g printed
        # "needs 23.5 GiB ... more than the 23.5 GiB"; 10 resolve a byte (2**-30 GiB)
        places = next((p for p in range(2, 10) if f"{need / 2**30:.{p}f}" != f"{left / 2**30:.{p}f}"), 10)
        fit = left // kv_per_stream
        # no level fits (a level of 0 streams is refused): a stream's cache must shrink instead
        advice = (
            f"keep the levels to {fit} streams or fewer"
            if fit
            else "not even one stream's KV cache fits beside what this process holds; use fewer --tokens "
            "(a shorter cache), a smaller --dtype or another --device"
        )
        raise ConfigError(
            f"argument --streams: the {largest}-stream level needs {need / 2**30:.{places}f} GiB of KV "
            f"cache ({kv_per_stream / 2**20:.3g} MiB per stream), more than the {left / 2**30:.{places}f} "
            f"GiB of memory of {device} left beside the {held / 2**30:.2f} GiB this process holds: {advice}"
        )


def parse_arrival(value: str, largest: int = 1) -> tuple[str, float]:
    """``"burst"`` or ``"poisson:RATE"`` (streams per second) → (kind, rate); a ConfigError
    when the ``largest`` level's streams would take more than ``MAX_ARRIVAL_SPAN_S`` on average
    to arrive ((largest - 1) / RATE: the first comes at the level's start)."""
    if value == "burst":
        return "burst", math.inf
    kind, _, rate = value.partition(":")
    try:
        per_s = float(rate)
    except ValueError:
        per_s = -1.0
    if kind != "poisson" or not per_s > 0 or not math.isfinite(per_s):
        raise ConfigError(
            f"argument --arrival: use burst or poisson:RATE with RATE > 0 streams/s, got {value!r}"
        )
    if (largest - 1) / per_s > MAX_ARRIVAL_SPAN_S:
        # rounded up to a thousandth, so the rate suggested passes this check
        least = math.ceil((largest - 1) / MAX_ARRIVAL_SPAN_S * 1000) / 1000
        raise ConfigError(
            f"argument --arrival: {value} spreads the {largest}-stream level's arrivals over "
            f"{(largest - 1) / per_s:.6g} s on average, more than {MAX_ARRIVAL_SPAN_S:g} s: use "
            f"poisson:{least:.3f} or more"  # (:g kept 6 digits: 1234.557 read 1234.56, refused)
        )
    return "poisson", per_s


def arrival_offsets(arrival: tuple[str, float], n: int, seed: int) -> np.ndarray:
    """Seconds from the level's start at which each of ``n`` streams is sent: all at 0 for a
    burst; for Poisson arrivals the first at 0 (the level's clock starts with it, not with an
    idle wait), then exponential gaps at the rate (seeded, so every run is alike)."""
    if arrival[0] != "poisson":
        return np.zeros(n)
    # numpy takes no negative seed: the 64-bit two's complement, as torch's manual_seed takes it
    gaps = np.random.default_rng(seed % 2**64).exponential(1 / arrival[1], n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def read_texts(path: str | None) -> list[str]:
    """The texts to speak: one per non-empty line of ``path``, or the built-in ones."""
    if path is None:
        return list(DEFAULT_TEXTS)
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError(f"argument --texts: {path} does not exist or is not a file")
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"argument --texts: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:  # the command line reads an OSError as an output folder it cannot write
        raise ConfigError(f"argument --texts: cannot read {path}: {e.strerror or e}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ConfigError(f"argument --texts: {path} holds no text (one text per line)")
    return texts


def texts_source(texts: list[str], path: str | None) -> str:
    """Where a study's texts came from, for its report: the ``--texts`` file, the built-in
    texts, or a list a caller gave."""
    if path is not None:
        return path
    return "built-in" if texts == list(DEFAULT_TEXTS) else "given by the caller"


def shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters (a line may be long)."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def cache_positions(tts: Any, texts: list[str], tokens: int, language_id: str | None = None) -> int:
    """KV positions one stream needs for the longest text's prefill (in ``language_id``) and ``tokens``
    (``positions_needed``), rounded up to 64; past the engine's largest cache a ConfigError
    naming ``--texts`` when the longest text leaves no room for a single token (or is past T3's
    text positions), ``--tokens`` otherwise."""
    prefills = []
    for text in texts:
        try:
            prefills.append(prefill_length(tts, text, language_id=language_id))
        except ConfigError as e:  # more text tokens than T3 has positions for: which line
            raise ConfigError(f"argument --texts: {shown(text)}: {e}") from None
    longest = max(prefills)
    if tokens_that_fit(longest, DEFAULT_MAX_CACHE_LEN) < 1:
        text = texts[prefills.index(longest)]
        raise ConfigError(
            f"argument --texts: the text {shown(text)} needs {longest} prefill positions, and the engine's "
            f"KV cache holds {DEFAULT_MAX_CACHE_LEN} for the prefill and the tokens after it: split it "
            "over several lines"
        )
    need = positions_needed(longest, tokens)
    if need > DEFAULT_MAX_CACHE_LEN:
        raise ConfigError(
            f"argument --tokens: {tokens} tokens after the longest text's {longest} prefill positions need "
            f"{need} KV cache positions, beyond the engine's {DEFAULT_MAX_CACHE_LEN}: use --tokens "
            f"{tokens_that_fit(longest, DEFAULT_MAX_CACHE_LEN)} or fewer"
        )
    return min(DEFAULT_MAX_CACHE_LEN, 64 * math.ceil(need / 64))


def _play(handle: StreamHandle, out: dict[str, Any], done: Any) -> None:
    """Read one stream to the end as a real-time player would (its report holds the arrivals)."""
    try:
        for _chunk in handle:
            pass
    except Exception as e:  # a failed stream is reported, the level goes on
        out["error"] = f"{type(e).__name__}: {e}"
    done()


def warm_up(
    tts: Any,
    text: str,
    *,
    tokens: int,
    seed: int,
    config: StreamConfig,
    plan: DecodePlan,
    max_cache_len: int,
    alignment: bool = False,
    language_id: str | None = None,
) -> dict[str, Any]:
    """One untimed stream of ``text`` through a 1-stream engine of its own, its audio dropped, so
    that S3Gen's first calls (shared by every level's engine) and T3's first steps are paid
    before the first level's clock starts: ``{"s": seconds, "error": why it failed or None}``
    (a failed warm-up is reported, the study goes on). The static step: a compiled one would be
    compiled here for nothing (each level's engine compiles its own)."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with StreamEngine(
        tts, max_streams=1, config=config, plan=plan, max_cache_len=max_cache_len, alignment=alignment
    ) as engine:
        handle = engine.submit(text, seed=seed, max_new_tokens=tokens, language_id=language_id)
        _play(handle, out, lambda: None)
    return {"s": time.perf_counter() - t0, "error": out.get("error")}


def run_level(
    tts: Any,
    n: int,
    texts: list[str],
    *,
    arrival: tuple[str, float] = ("burst", math.inf),
    tokens: int = 150,
    seed: int = 0,
    step: str = "static",
    config: StreamConfig | None = None,
    plan: DecodePlan | None = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    progress: bool = False,
    flow: FlowPlan | None = None,
    flow_batches: Sequence[int] | None = None,
    step_buckets: Sequence[int] | None = None,
    alignment: bool = False,
    language_id: str | None = None,
    level_json: bool = False,
) -> dict[str, Any]:
    """``n`` streams through a fresh engine sized to ``n``; the level's row and its streams.
    ``flow`` runs S3Gen's estimator (kept by the caller: its compiled shapes serve the next
    level too), at most the largest of ``flow_batches`` windows a call; T3 steps over the
    ``step_buckets`` up to ``n`` and ``n`` itself (None: 1, 2, 4, ... and ``n``). With
    ``progress``, a line on stderr as the level ends: ``level_line``'s, or with ``level_json``
    every figure of its summary as JSON."""
    sizes = None if step_buckets is None else [b for b in step_buckets if b <= n]
    engine = StreamEngine(
        tts, max_streams=n, step=step, config=config, plan=plan, max_cache_len=max_cache_len,
        flow=flow, flow_batches=flow_batches, step_buckets=sizes, alignment=alignment,
    )  # fmt: skip
    try:
        # closed when the level ends, also when it raises (its line left on stderr otherwise)
        with progress_bar(
            total=n, desc=streams_label(n), unit="stream", disable=not progress, file=sys.stderr
        ) as bar:
            # its warm-up compiles the level's new shapes: minutes on a cold cache, said meanwhile
            bar.set_postfix_str("engine warm-up")
            compile_s = engine.warmup()
            bar.set_postfix_str("")
            # The host's speed as the level starts: a slow spell of the host, which the load average
            # does not show, slows every stage of the levels it falls on (``slow_spell_line``). Read
            # on the CPU, the host's, also beside a GPU: there its own probe would empty the caching
            # allocator the warm-up filled and need 512 MiB beside the engine's cache.
            bandwidth = read_bandwidth("cpu", min_run_time_s=PROBE_S)
            offsets = arrival_offsets(arrival, n, seed)
            lock = threading.Lock()

            def done() -> None:
                with lock:
                    bar.update(1)

            before = asdict(engine.stats)
            outs: list[dict[str, Any]] = [{} for _ in range(n)]
            handles, players = [], []
            t0 = time.perf_counter()
            burst = arrival[0] == "burst"
            with memory_window(engine.device) as memory:
                with engine.together() if burst else contextlib.nullcontext():  # a burst joins at one step
                    for k in range(n):
                        time.sleep(max(0.0, t0 + float(offsets[k]) - time.perf_counter()))
                        text = texts[k % len(texts)]
                        h = engine.submit(text, seed=seed + k, max_new_tokens=tokens, language_id=language_id)
                        player = threading.Thread(target=_play, args=(h, outs[k], done), daemon=True)
                        player.start()
                        handles.append(h)
                        players.append(player)
                for player in players:
                    player.join()
            wall = time.perf_counter() - t0
            engine.wait_rows_free(timeout=10.0)  # a stream S3Gen failed frees its rows at T3's next pass
            held_after = n * engine.rows_per_stream - engine.free_rows()  # every stream has ended: 0
        after = asdict(engine.stats)
    finally:
        engine.close()
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float)}
    streams = [_stream_row(h, out, float(at)) for h, out, at in zip(handles, outs, offsets, strict=True)]
    mem = {"start_bytes": memory.start_bytes, "peak_bytes": memory.peak_bytes}
    summary = {**_level_summary(n, wall, streams, delta, mem, engine.kv_bytes_per_stream),
               "read_bandwidth_gb_s": bandwidth / 1e9}  # fmt: skip
    if progress:  # each level's figures as it ends: a run stopped before the report keeps them
        failed = failed_positions(streams)
        if level_json:  # all of them, for a log a program reads (the GPU check's): ~800 characters
            line = {**summary, "failed_streams": failed}
            print(f"level {n}: {json_dumps(line, indent=None)}", file=sys.stderr, flush=True)
        else:
            print(level_line(summary, failed), file=sys.stderr, flush=True)
    return {
        "streams": n,
        "wall_s": wall,
        "compile_s": compile_s,
        "engine": {**delta, **{k: v for k, v in engine.stats.to_dict().items() if k.endswith("_used")}},
        "compiled_attention": engine.attention_kernels or None,  # read from Inductor's code
        "compile_fallback": engine.fallback_reason,  # why a compiled engine ran the static step
        "step_buckets": engine.step_buckets,  # the sizes its T3 step could run over (built in its warm-up)
        "kv_bytes_per_stream": engine.kv_bytes_per_stream,
        "rows_held_after": held_after,
        "memory": mem,
        "per_stream": streams,
        "summary": summary,
    }


def level_line(summary: dict[str, Any], failed: list[int]) -> str:
    """A level's headline figures as it ends, for a person watching the run (the report has them
    all): first-audio p95, audio per wall second, the limiting stage, and which streams failed."""
    p95, n = summary["ttfa_p95_s"], summary["streams"]
    parts = ["none spoke" if p95 is None else f"first audio p95 {p95:.2f} s",
             f"{summary['audio_per_wall_s']:.2f} s of audio a wall second",
             f"limiting stage {summary['limiting_stage'] or 'none'}"]  # fmt: skip
    if summary["streams_with_underruns"]:
        parts.append(f"{summary['streams_with_underruns']} underran")
    if failed:
        parts.append(f"stream{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed")
    return f"{streams_label(n)} done: " + ", ".join(parts)


def _stream_row(h: StreamHandle, out: dict[str, Any], arrival_s: float) -> dict[str, Any]:
    s = h.report.summary()
    first = h.report.chunks[0] if h.report.chunks else None
    return {
        "text": h.request.text,
        "seed": h.request.seed,
        "arrival_s": arrival_s,  # sent this long after the level began
        "queued_s": first.queued_s if first else None,
        "ttfa_s": s["ttfa_s"] if first else None,
        "rtf": s["rtf"] if first else None,
        "audio_s": s["audio_s"],
        **{k: s[k] for k in ("underruns", "underrun_s", "max_underrun_s")},
        "speech_tokens": list(h.tokens),  # with Turbo's closing silence, appended once T3 ended
        "sampled_tokens": len(h.sampled),  # invalid ids too (dropped before S3Gen)
        "kept_tokens": len(speech_ids(h.sampled)),  # the speech ids among them
        "capped": h.capped,  # T3 ended it at --tokens, not a stop token: its speech may be cut short
        "error": out.get("error"),
    }


def listener_summary(n: int, wall: float, streams: list[dict[str, Any]]) -> dict[str, Any]:
    """What the level's listeners got, from each stream's ``arrival_s``, ``ttfa_s``, ``audio_s``,
    ``underruns``, ``max_underrun_s`` and ``error``: first-audio percentiles, gaps, audio per
    wall second, and beside it the audio per wall second had every stream played in real time
    from its arrival with no wait (``n`` for a burst of equal streams; less for spread arrivals,
    whose wall time holds the gaps between them)."""
    failed = sum(s["error"] is not None for s in streams)
    ok = [s for s in streams if s["error"] is None and s["ttfa_s"] is not None]
    ttfa = [s["ttfa_s"] for s in ok]
    # Nearest rank: each percentile is one stream's figure, the first q% of listeners had theirs
    # by then (below 20 streams p95 is the slowest; interpolating between the two slowest of a
    # few streams gives a wait nobody had). None (JSON null, not NaN) where no stream spoke.
    p50, p95, p99 = (
        float(np.percentile(ttfa, q, method="inverted_cdf")) if ok else None for q in (50, 95, 99)
    )
    return {
        "streams": n,
        "failed": failed,
        # ended without an error and without audio (no speech token among its ids): before
        # 2026-12-04 counted as failed, where the engine counted no failure
        "silent": n - failed - len(ok),
        "ttfa_p50_s": p50,
        "ttfa_p95_s": p95,
        "ttfa_p99_s": p99,
        "worst_underrun_s": max((s["max_underrun_s"] for s in ok), default=0.0),
        "streams_with_underruns": sum(s["underruns"] > 0 for s in ok),
        "audio_per_wall_s": sum(s["audio_s"] for s in ok) / wall,
        "real_time_audio_per_wall_s": (
            sum(s["audio_s"] for s in ok) / max(s["arrival_s"] + s["audio_s"] for s in ok) if ok else 0.0
        ),
    }


def _level_summary(
    n: int, wall: float, streams: list[dict[str, Any]], e: dict[str, Any], mem: dict[str, int], kv: int
) -> dict[str, Any]:
    busy = {stage: e[f"{stage}_busy_s"] / wall for stage in ("t3", "s3gen")}
    return {
        **listener_summary(n, wall, streams),
        "capped": sum(s["capped"] for s in streams),  # random weights: every stream that did not fail
        "t3_tokens_per_s": e["t3_tokens"] / wall,
        # what the T3 stage does per second it works: its capacity, whatever S3Gen leaves it to do
        "t3_tokens_per_busy_s": e["t3_tokens"] / e["t3_busy_s"] if e["t3_busy_s"] else 0.0,
        # 25 speech tokens a second of audio, per stream; T3 samples more than that where ids
        # are dropped (random weights: ~20% of them), so the need is scaled by what it sampled
        "t3_tokens_per_s_needed": n * TOKENS_PER_S * _sampled_per_kept(streams),
        "windows_per_flow_call": e["flow_windows"] / e["flow_calls"] if e["flow_calls"] else 0.0,
        "flow_ms_per_call": 1000 * e["flow_s"] / e["flow_calls"] if e["flow_calls"] else 0.0,
        # the vocoder's batches: a flow call's windows whose excitation caches are as long
        "windows_per_vocoder_call": e["flow_windows"] / e["vocoder_calls"] if e["vocoder_calls"] else 0.0,
        "vocoder_ms_per_call": 1000 * e["vocoder_s"] / e["vocoder_calls"] if e["vocoder_calls"] else 0.0,
        "t3_busy_pct": 100 * busy["t3"],
        "s3gen_busy_pct": 100 * busy["s3gen"],
        # none where no stage worked (every stream failed at once): "t3" was a verdict on nothing
        "limiting_stage": max(busy, key=lambda k: busy[k]) if any(busy.values()) else None,
        "peak_mib": mem["peak_bytes"] / 2**20,
        "growth_mib_per_stream": (mem["peak_bytes"] - mem["start_bytes"]) / n / 2**20,
        "kv_mib_per_stream": kv / 2**20,
    }


def _sampled_per_kept(streams: list[dict[str, Any]]) -> float:
    """Speech tokens T3 sampled per token it kept for S3Gen, over the level's streams (1.0 when
    nothing was kept). Turbo's closing silence, appended to ``speech_tokens`` after T3 ended,
    is none of them: counted, a stream needed fewer than 25 tokens a second."""
    kept = sum(s["kept_tokens"] for s in streams)
    return sum(s["sampled_tokens"] for s in streams) / kept if kept else 1.0


def run_load(
    tts: Any,
    levels: list[int],
    *,
    texts: list[str] | None = None,
    arrival: str = "burst",
    tokens: int = 150,
    seed: int = 0,
    step: str = "static",
    policy: str = "float32",
    config: StreamConfig | None = None,
    first_audio_limit_s: float = FIRST_AUDIO_LIMIT_S,
    outdir: str | Path | None = None,
    progress: bool = False,
    model: str | None = None,
    reference: str | None = None,
    texts_from: str | None = None,
    flow: str = "eager",
    flow_batches: Sequence[int] | None = None,
    step_buckets: Sequence[int] | None = None,
    alignment: bool = False,
    fused: bool = False,
    language_id: str | None = None,
    level_json: bool = False,
) -> dict[str, Any]:
    """The load study at each level (``run_level``) and how many streams held in real time
    (``conclude``); writes ``load.json`` and ``load.png`` to ``outdir`` when given (made before
    the first level: one that cannot be made would lose them all). ``tts`` has
    its voice prepared. ``policy`` is the dtype T3 runs in (``optimized.decode_plan``: float32,
    bfloat16, decode-bfloat16, ...; weights copied, the model untouched); S3Gen runs as loaded,
    its CFM estimator ``flow`` ("eager" or "compiled", one ``FlowPlan`` for every level) at most
    the largest of ``flow_batches`` windows a call (None: up to each level's streams). T3's step
    runs over the ``step_buckets`` up to each level and the level itself (None: 1, 2, 4, ...):
    a compiled step compiles each, so the levels alone (``step_buckets=levels``) compile fewest.
    ``alignment``: Multilingual streams each run upstream's alignment analyzer (the static step;
    ``StreamEngine``), as upstream's multilingual generate does, speaking ``language_id`` (default
    "en"; ``spoken_language``). ``fused``: T3's step runs a copy
    of the backbone with fused projections (``DecodePlan``; Turbo has none to fuse). ``progress``:
    bars and a line per level on stderr (``run_level``; ``level_json``: as JSON). The report names what was
    measured: ``model`` (the source ``tts`` was loaded from; None: unnamed), ``reference`` (the
    WAV its voice was prepared from; None: the generated one, ``reference.make_reference_wav``)
    and ``texts_from`` (the texts' file, ``texts_source``).
    ``levels`` run in ascending order, after one untimed stream (``warm_up``; its seconds are
    ``warmup_s``); none, a repeated one, or a largest one whose KV cache is more than the device's
    memory beside what this process holds (``check_kv_fits``) is a ConfigError before any level
    runs, as is a ``seed`` one of its streams cannot take (``checked_level_seed``) and a ``policy``
    that is no dtype policy or is ``"auto"`` (``decode_plan``; ``choose_policy`` resolves it)."""
    levels = checked_levels(levels, repr(levels))
    seed = checked_level_seed(seed, levels[-1])
    check_level_buckets(step_buckets, levels, flow_batches)
    # before the warm-up: no engine would take them
    check_engine_options(family_of(tts).name, step, alignment=alignment, fused=fused)
    with naming_flag("--language", ConfigError):  # a multilingual model's; the others speak English only
        language_id = spoken_language(tts, language_id)
    texts = texts or list(DEFAULT_TEXTS)
    with naming_flag("--dtype", ConfigError):  # a name that is no policy, or "auto": no dtype to report
        # with ``fused``, one copy of the decode backbone (made by the first engine) serves every level
        plan = dataclasses.replace(decode_plan(tts, policy), fused=fused)
    kind = parse_arrival(arrival, levels[-1])
    max_cache_len = cache_positions(tts, texts, tokens, language_id)
    device = tts.t3.speech_head.weight.device
    check_kv_fits(levels[-1], kv_bytes_per_stream(tts, plan, max_cache_len), device)
    config = config or StreamConfig("buffered")
    estimator = FlowPlan(flow)
    if outdir is not None:  # an unusable --out found now, not once every level has run
        Path(outdir).mkdir(parents=True, exist_ok=True)
    with progress_bar(total=1, desc="warm-up", unit="stream", disable=not progress, file=sys.stderr) as bar:
        warm = warm_up(
            tts, texts[0], tokens=tokens, seed=seed, config=config, plan=plan, max_cache_len=max_cache_len,
            alignment=alignment, language_id=language_id,
        )  # fmt: skip
        bar.update()
    runs = [
        run_level(
            tts,
            n,
            texts,
            arrival=kind,
            tokens=tokens,
            seed=seed,
            step=step,
            config=config,
            plan=plan,
            max_cache_len=max_cache_len,
            progress=progress,
            flow=estimator,
            flow_batches=flow_batches,
            step_buckets=step_buckets,
            alignment=alignment,
            language_id=language_id,
            level_json=level_json,
        )
        for n in levels
    ]
    voice = reference or "generated"
    prompt = "" if config.prompt_s is None else f" (the last {config.prompt_s:g} s of its prompt)"
    source = texts_source(texts, texts_from)
    report: dict[str, Any] = {
        "environment": environment(model or "unnamed", str(device)),  # as the levels ended (load average)
        "model": model,
        "reference": voice,
        "texts": source,
        "device": str(device),
        "step": step,
        "alignment": alignment,  # Multilingual's alignment analyzer per stream
        "language": language_id,  # a multilingual model's; None for the English-only families
        "fused": fused,  # T3's static or compiled step with fused projections (DecodePlan)
        "t3_dtype": policy,
        "flow": flow,
        "flow_batches": None if flow_batches is None else sorted(set(flow_batches)),
        "step_buckets": None if step_buckets is None else sorted(set(step_buckets)),
        "flow_shapes": len(estimator.shapes),  # compiled estimator graphs, all levels
        "flow_compile_s": estimator.compile_s,  # in the levels' compile_s (their warm-ups)
        "flow_fallback": estimator.fallback_reason,  # why a compiled estimator ran eagerly
        "arrival": arrival,
        "tokens": tokens,
        "max_cache_len": max_cache_len,
        "config": asdict(config),
        "warmup_s": warm["s"],  # the untimed stream before the first level
        "warmup_error": warm["error"],
        "levels": runs,
        "title": f"load study of {model or 'an unnamed model'} on {device}, voice {voice}{prompt}, "
        f"texts {source}{f' in {language_id}' if language_id else ''}, T3 {policy} {step} step"
        f"{', fused' if fused else ''}"
        f"{' with alignment analyzers' if alignment else ''}, "
        f"S3Gen estimator {flow}, arrival {arrival}, "
        f"{tokens} tokens per stream",
        "note": f"every stream is capped at {tokens} tokens ({token_cap_note(model)})",
    }
    return conclude(report, first_audio_limit_s, outdir)


def conclude(report: dict[str, Any], first_audio_limit_s: float, outdir: str | Path | None) -> dict[str, Any]:
    """``report`` with ``real_time`` (``real_time_capacity``) added; ``load.json`` and
    ``load.png`` written into ``outdir`` when given, their paths in ``report["files"]``."""
    levels = load_frame(report)
    report["real_time"] = real_time_capacity(levels, first_audio_limit_s)
    if outdir is None:
        return report
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = written(out / "load.json", lambda path: path.write_text(json_dumps(report)))
    figure = save(load_figure(levels, first_audio_limit_s), out / "load.png")
    report["files"] = {"json": str(json_path), "figure": str(figure)}
    return report


def real_time_capacity(
    levels: pd.DataFrame, first_audio_limit_s: float = FIRST_AUDIO_LIMIT_S
) -> dict[str, Any]:
    """How many streams the device held in real time, from the levels run (``load_frame``):
    ``streams``, the largest level where every stream spoke, none underran after its first
    audio and the first-audio p95 was within ``first_audio_limit_s`` (None when no level held),
    and ``missed``, why each other level did not. Levels not run say nothing: between a level
    that held and one that missed, the capacity is not known."""
    missed: dict[int, str] = {}
    for row in levels.itertuples(index=False):
        why = []
        if row.failed:
            why.append(f"{row.failed} failed")
        if pd.notna(silent := getattr(row, "silent", 0)) and silent:  # (reports before 2026-12-04: none)
            why.append(f"{silent:.0f} spoke nothing")
        if row.streams_with_underruns:
            why.append(f"{row.streams_with_underruns} underran (worst gap {row.worst_underrun_s:.2f} s)")
        if pd.isna(row.ttfa_p95_s):  # no first audio to compare with the limit
            why.append("none spoke")
        elif row.ttfa_p95_s > first_audio_limit_s:
            why.append(f"first-audio p95 {row.ttfa_p95_s:.2f} s > {first_audio_limit_s:g} s")
        if why:
            missed[int(row.streams)] = "; ".join(why)
    held = [int(n) for n in levels["streams"] if int(n) not in missed]
    return {"first_audio_limit_s": first_audio_limit_s, "streams": max(held, default=None), "missed": missed}


def streams_label(n: int | str) -> str:
    """A level as words, "1 stream" or "8 streams" (``n`` an int, or a key read back from JSON)."""
    return counted(int(n), "stream")


def format_real_time(real_time: dict[str, Any]) -> str:
    """How many streams held in real time, then one line per level that missed, saying why."""
    held = real_time["streams"]
    head = "no level" if held is None else streams_label(held)
    limit = real_time["first_audio_limit_s"]
    criteria = f"every stream spoke, none underran after its first audio, first-audio p95 <= {limit:g} s"
    missed = [f"  {streams_label(n)} missed: {why}" for n, why in real_time["missed"].items()]
    return "\n".join([f"held in real time: {head} (a level holds where {criteria})", *missed])


def load_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per level (units in the column names)."""
    return pd.DataFrame([level["summary"] for level in report["levels"]])


def side_by_side(reports: dict[str, dict[str, Any]], name: str, columns: Sequence[str]) -> pd.DataFrame:
    """Several load studies' levels in one frame (``columns`` of ``load_frame``), each row
    labelled with its study's key in a first column called ``name`` (what differs between them)."""
    frames = {label: load_frame(report)[list(columns)] for label, report in reports.items()}
    return pd.concat(frames, names=[name]).reset_index(level=0).reset_index(drop=True)


def fallbacks(report: dict[str, Any]) -> list[str]:
    """A line per level whose engine ran T3's static step where the compiled one was asked for,
    and one if S3Gen's estimator ran eagerly where compiled was asked for (their compiles failed:
    the report's title names what was asked for, not what ran)."""
    lines = [
        f"{streams_label(level['streams'])}: T3 ran the static step, its compile failed ({why})"
        for level in report["levels"]
        if (why := level.get("compile_fallback"))
    ]
    if why := report.get("flow_fallback"):
        lines.append(f"S3Gen's estimator ran eagerly from its failed compile on ({why})")
    return lines


def failed_positions(streams: list[dict[str, Any]]) -> list[int]:
    """Where in its level (from 1, in the order sent) each stream that failed was."""
    return [k + 1 for k, s in enumerate(streams) if s["error"] is not None]


def failures(report: dict[str, Any]) -> list[str]:
    """A line per stream that failed, by level: its place in the level, its seed, its text
    (``shown``) and its error on one line. None for a level kept without its per-stream rows
    (the GPU check's results file drops them; they stay in the step's own JSON)."""
    lines = []
    for level in report["levels"]:
        n, streams = level["streams"], level.get("per_stream", [])
        for k in failed_positions(streams):
            s = streams[k - 1]
            lines.append(
                f"  {streams_label(n)}: stream {k} (seed {s['seed']}, text {shown(s['text'])}) "
                f"failed: {' '.join(s['error'].split())}"
            )
    return lines


def format_load(report: dict[str, Any]) -> str:
    """The ``tts-workbench load`` report."""
    columns = ["streams", "failed", "silent", "capped", "ttfa_p50_s", "ttfa_p95_s", "ttfa_p99_s",
               "worst_underrun_s", "audio_per_wall_s", "t3_tokens_per_s", "t3_tokens_per_busy_s",
               "windows_per_flow_call", "flow_ms_per_call", "windows_per_vocoder_call", "vocoder_ms_per_call",
               "t3_busy_pct", "s3gen_busy_pct", "limiting_stage", "peak_mib", "growth_mib_per_stream",
               "kv_mib_per_stream", "read_bandwidth_gb_s"]  # fmt: skip
    frame = load_frame(report)
    lines = [
        report["title"],
        # (no environment before 2026-12-07); the engine's two stages work at once
        *busy_machine_line(report.get("environment", {}), stages=2),
        # (none in reports before late 2026-12-07)
        *slow_spell_line([(f"before {streams_label(lv['streams'])}", lv["summary"].get("read_bandwidth_gb_s"))
                          for lv in report["levels"]]),  # fmt: skip
        # a column per level: a row per level was ~330 characters wide
        render_sideways(frame[[c for c in columns if c in frame]], "streams", streams_label),
        *failures(report),
        *[f"{column}: {meaning}" for column, meaning in LEGEND.items() if column in frame],
        format_real_time(report["real_time"]),
        *fallbacks(report),
        report["note"],
    ]  # fmt: skip
    if "files" in report:
        lines.append(f"wrote {report['files']['json']} and {report['files']['figure']}")
    return "\n".join(lines)


def same_as_solo(tts: Any, report: dict[str, Any]) -> pd.DataFrame:
    """Per level: did every stream that did not fail speak exactly the tokens it speaks alone (same
    text, seed and T3 dtype, the static step, fused if the study's was: ``streaming.stream_tokens``,
    T3 alone), and how many cache rows were still held when every stream had ended (0: each freed
    its rows)? One row per level; ``solo_tokens`` None where every stream failed. A stream that
    failed (``failed`` counts them) is not re-run: its tokens stop where it failed, and a request
    that failed alone (an empty text) fails again. In bfloat16 a batched kernel's rounding can
    flip a near tie, so False there is not necessarily a bug."""
    parts = decode_plan(tts, report["t3_dtype"])  # the report's T3 dtype, the static step
    # (with alignment analyzers the eager one: the single-stream step that runs one)
    plan = DecodePlan(
        parts.prefill,
        parts.decode,
        autocast=parts.autocast,
        step="eager" if report.get("alignment") else "static",
        fused=bool(report.get("fused")),  # absent from reports before 2026-12-05; the eager step has none
    )
    rows = []
    for level in report["levels"]:
        same = [
            stream_tokens(tts, s["text"], max_new_tokens=report["tokens"], seed=s["seed"], plan=plan)
            == s["speech_tokens"]
            for s in level["per_stream"]
            if s["error"] is None
        ]
        failed = level["summary"]["failed"]
        rows.append(
            {"streams": level["streams"], "solo_tokens": all(same) if same else None, "failed": failed,
             "rows_held_after": level.get("rows_held_after")}  # absent from reports before 2026-12-03
        )  # fmt: skip
    return pd.DataFrame(rows)
