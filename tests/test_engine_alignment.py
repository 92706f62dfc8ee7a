"""Multilingual streams in the engine with upstream's alignment analyzer (``alignment=True``):
each stream's analyzer reads its own rows of the batched step's attention, so every stream
samples the tokens of the single-stream eager decode (upstream's multilingual generate), its
analyzer sees what it sees there, and the model is given back as it was."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from chatterbox.models.t3.inference.alignment_stream_analyzer import (
    LLAMA_ALIGNED_HEADS,
)
from chatterbox.mtl_tts import ChatterboxMultilingualTTS
from chatterbox.tts import ChatterboxTTS

from conftest import Analyzers, voiced
from tts_workbench.core.errors import ConfigError
from tts_workbench.core.families import family_of
from tts_workbench.core.patching import shadow
from tts_workbench.runtime.alignment import alignment as new_analyzer
from tts_workbench.runtime.decode import DecodePlan
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.runtime.stream_handle import StreamHandle
from tts_workbench.runtime.streaming import StreamConfig, stream_all

CONFIG = StreamConfig("buffered", first_window_s=1.0, window_s=1.2)  # TOKENS in one window: tokens checked
TEXTS = [
    "Bonjour à tous, ceci est un essai.",
    "Une deuxième phrase, un peu plus longue que la première, arrive.",
    "Trois.",
]
TOKENS = 24


@pytest.fixture(scope="module")
def tts(reference_wav: Path) -> ChatterboxMultilingualTTS:
    tts: ChatterboxMultilingualTTS = voiced("multilingual-tiny", reference_wav)
    return tts


@functools.cache
def solo(tts: ChatterboxMultilingualTTS, k: int) -> list[int]:
    """Stream ``k`` alone with the eager step (upstream's multilingual loop, its analyzer)."""
    _, state = stream_all(
        tts, TEXTS[k], CONFIG, max_new_tokens=TOKENS, seed=k, plan=DecodePlan.plain(tts.t3),
        language_id="fr", **family_of(tts).sampling,
    )  # fmt: skip
    return state.tokens


def model_state(tts: ChatterboxMultilingualTTS) -> tuple[Any, ...]:
    """What the analyzers change on the model: the attention settings, and the hooks on the
    aligned layers but transformers' own (added the first time attentions are asked for, kept)."""
    config = tts.t3.tfmr.config
    attns = [tts.t3.tfmr.layers[layer].self_attn for layer, _ in LLAMA_ALIGNED_HEADS]
    own = "transformers.utils.output_capturing"
    hooks = [sum(h.__module__ != own for h in a._forward_hooks.values()) for a in attns]
    return config._attn_implementation, config.output_attentions, *hooks


def submit(engine: StreamEngine, k: int) -> StreamHandle:
    return engine.submit(TEXTS[k], seed=k, max_new_tokens=TOKENS, language_id="fr")


def check_alignments(solos: dict[Any, list[Any]], engines: dict[Any, list[Any]]) -> None:
    """Each stream's analyzer in the engine saw what the solo stream's saw: the same alignment
    matrix (text columns by step), within float32 rounding."""
    assert solos.keys() == engines.keys() and len(solos) == len(TEXTS)
    for columns, (alone,) in solos.items():
        (batched,) = engines[columns]
        assert batched.alignment.shape == alone.alignment.shape, columns
        assert torch.allclose(batched.alignment, alone.alignment, atol=1e-5), columns


def test_each_streams_analyzer_reads_its_own_rows(
    tts: ChatterboxMultilingualTTS, analyzers: Analyzers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two streams start together and a third joins while they decode: each samples its solo
    eager tokens, and its analyzer's alignment is the solo one's (another stream's rows would
    give another text's attention)."""
    before = model_state(tts)
    solo.cache_clear()
    tokens = [solo(tts, k) for k in range(3)]
    solos = analyzers.take()
    handles: list[StreamHandle] = []
    with StreamEngine(tts, max_streams=3, config=CONFIG, alignment=True) as engine:
        step, joined = engine._step, threading.Event()

        def held() -> None:
            """Once the first stream has 2 tokens, no step runs until the third is queued: it
            then joins the two mid-way (the second, 19 tokens long, still decoding), however
            late the poll below comes."""
            if len(handles[0].tokens) >= 2:
                joined.wait(60.0)
            step()

        monkeypatch.setattr(engine, "_step", held)
        with engine.together():
            handles += [submit(engine, 0), submit(engine, 1)]
        deadline = time.monotonic() + 30
        while len(handles[0].tokens) < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"the first stream had {len(handles[0].tokens)} tokens of 2 after 30 s")
            time.sleep(0.01)
        handles.append(submit(engine, 2))
        joined.set()
        for h in handles:
            list(h)
        assert model_state(tts)[:2] == ("sdpa", False)  # the last stream out gave it back
        # steps over all three ran: the third joined the two while they decoded
        assert 3 in engine.stats.buckets_used, engine.stats.buckets_used
    assert [h.tokens for h in handles] == tokens
    check_alignments(solos, analyzers.take())
    assert model_state(tts) == before


def test_a_preempted_streams_analyzer_goes_on_where_it_was(
    tts: ChatterboxMultilingualTTS, analyzers: Analyzers
) -> None:
    """A step over three streams runs out of memory: the newest is preempted and recomputed
    later in one forward over its prefill and tokens; its analyzer reads that forward's last
    position only, as it would have read the step it was taken out of."""
    solo.cache_clear()
    tokens = [solo(tts, k) for k in range(3)]
    solos = analyzers.take()
    with StreamEngine(tts, max_streams=3, config=CONFIG, alignment=True) as engine:

        def wrap(forward: Any) -> Any:
            def step(*a: Any, **k: Any) -> Any:
                embeds = k["inputs_embeds"]
                if embeds.size(1) == 1 and embeds.size(0) > 4:  # a step over more than two streams
                    raise torch.OutOfMemoryError("made on purpose")
                return forward(*a, **k)

            return step

        with shadow(tts.t3.tfmr, "forward", wrap):
            with engine.together():
                handles = [submit(engine, k) for k in range(3)]
            for h in handles:
                list(h)
        assert engine.stats.preempted == 1 and engine.stats.failed == 0
    assert [h.tokens for h in handles] == tokens
    check_alignments(solos, analyzers.take())


def test_the_analyzer_stops_a_repeating_stream_and_not_the_one_beside_it(
    tts: ChatterboxMultilingualTTS,
) -> None:
    """The first stream's rows are pushed to sample one token again and again: its analyzer
    forces the stop token after two repeats, as upstream's (tests/test_families.py); the
    stream beside it in the same steps goes on to its cap with its solo tokens."""
    solo.cache_clear()
    repeated = 1234

    def wrap(forward: Any) -> Any:
        calls = 0

        def head(x: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            out: torch.Tensor = forward(x)
            # the first stream's prefill (the first call), then its rows of the steps of both
            if calls == 1 or x.size(0) == 4:
                out[:2, ..., repeated] = 1e4
            return out

        return head

    with StreamEngine(tts, max_streams=2, config=CONFIG, alignment=True) as engine:
        with shadow(tts.t3.speech_head, "forward", wrap):
            with engine.together():
                handles = [submit(engine, 0), submit(engine, 1)]
            for h in handles:
                list(h)
    stop = tts.t3.hp.stop_speech_token
    assert handles[0].sampled == [repeated, repeated, stop]
    assert len(handles[1].sampled) == TOKENS and handles[1].tokens == solo(tts, 1)


def test_a_language_the_model_does_not_speak_is_refused_at_submit(tts: ChatterboxMultilingualTTS) -> None:
    """Before, the stream was queued and failed only at its turn (its prompt's tokens), after the
    streams ahead of it, with the same ConfigError."""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        with pytest.raises(ConfigError, match="unsupported language 'xx': the multilingual model speaks"):
            engine.submit(TEXTS[2], seed=2, max_new_tokens=TOKENS, language_id="xx")
        assert engine.queued() == 0 and engine.active() == 0  # nothing was queued
        assert engine.stats.admitted == 0 and engine.stats.failed == 0
        served = submit(engine, 2)
        assert list(served) and served.error is None


def test_alignment_is_refused_where_it_cannot_run(
    tts: ChatterboxMultilingualTTS, tiny_tts: ChatterboxTTS
) -> None:
    with pytest.raises(ConfigError, match="Multilingual T3's"):
        StreamEngine(tiny_tts, alignment=True)
    with pytest.raises(ConfigError, match="use --decode static"):
        StreamEngine(tts, step="compiled", alignment=True)


def test_a_plain_engine_beside_a_running_analyzer_keeps_its_tokens(tts: ChatterboxMultilingualTTS) -> None:
    """While an analyzer runs on the model (here one held open, as an aligned stream's or an eager
    multilingual generate's is) its backbone runs eager attention: an engine without analyzers
    beside it samples what it samples alone. (Before 2026-12-05 it chose its mask once, when
    made: a boolean mask, which eager attention adds to the scores, masking nothing.)"""
    with StreamEngine(tts, max_streams=1, config=CONFIG) as engine:
        alone = submit(engine, 0)
        list(alone)
        with new_analyzer([tts.t3.tfmr], (0, 1), tts.t3.hp.stop_speech_token):
            assert tts.t3.tfmr.config._attn_implementation == "eager"
            beside = submit(engine, 0)
            list(beside)
    assert beside.sampled == alone.sampled


def test_an_analyzer_started_during_a_step_leaves_that_steps_logits_as_alone(
    tts: ChatterboxMultilingualTTS,
) -> None:
    """Each attention layer reads the model's attention setting when it runs: an analyzer started
    (by another engine's stream, say) while a step of this engine is between its layers switches
    the later ones to eager attention. Before 2026-12-06 the step chose its mask kind at its start:
    a boolean one for sdpa, which the eager layers added to the scores, masking nothing (a
    logit 0.27 off, logit std 0.57). The step is paused at its second layer while the analyzer
    starts, then let go: every step's logits are those of the stream alone, within 1e-4."""
    with StreamEngine(tts, max_streams=1, config=CONFIG, keep_logits=True) as engine:
        alone = submit(engine, 0)
        list(alone)
        paused, resume, handles = threading.Event(), threading.Event(), []
        t3 = engine._threads[0]  # the T3 stage's (the prefill runs the layers too, before any token)

        def pause(module: Any, args: Any) -> None:
            if threading.current_thread() is t3 and len(handles[0].sampled) >= 6 and not paused.is_set():
                paused.set()
                resume.wait(60)

        with contextlib.ExitStack() as stack:
            stack.callback(resume.set)  # the step goes on whatever fails here
            stack.callback(tts.t3.tfmr.layers[1].register_forward_pre_hook(pause).remove)
            with engine.together():  # no prefill before the hook can find the stream's handle
                handles.append(submit(engine, 0))
            assert paused.wait(60)
            stack.enter_context(new_analyzer([tts.t3.tfmr], (0, 1), tts.t3.hp.stop_speech_token))
            assert tts.t3.tfmr.config._attn_implementation == "eager"
            resume.set()
            list(handles[0])
    beside = handles[0]
    assert beside.sampled == alone.sampled and len(beside.logits) == len(alone.logits) > 6
    for k, (got, want) in enumerate(zip(beside.logits, alone.logits, strict=True)):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), k
