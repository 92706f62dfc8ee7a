"""Streaming on the tiny model: the recorder adds up, buffered vocodes every token once, bad input."""

from __future__ import annotations

import copy
import gc
import itertools
import json
import math
import re
import threading
import time
import types
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import soundfile as sf
import torch
from chatterbox.tts import ChatterboxTTS, Conditionals
from matplotlib.figure import Figure

from tts_workbench.core.constants import RANDOM_NO_STOP, SAMPLE_RATE, SPEECH_VOCAB_SIZE
from tts_workbench.core.errors import ConfigError, NoVoiceError, SourceError
from tts_workbench.core.patching import shadow
from tts_workbench.core.rng import StreamRandom
from tts_workbench.core.strict_json import finite
from tts_workbench.instruments.latency import StreamReport, format_report, seam_metric, underruns
from tts_workbench.interface.cli import main
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.models.vocode import fade_in
from tts_workbench.runtime import streaming
from tts_workbench.runtime.decode import DecodePlan, prefill_length
from tts_workbench.runtime.generation import generate
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS, UpstreamTTS
from tts_workbench.runtime.streaming import (
    SAMPLES_PER_TOKEN,
    BufferedCutter,
    StreamConfig,
    StreamState,
    Window,
    noise_track,
    one_shot,
    quality,
    run_to_files,
    shorten_prompt,
    stream,
    stream_all,
    stream_tokens,
)
from tts_workbench.studies.bench import stream_quality

TEXT = "Streaming should never drop the tail of a sentence."

if TYPE_CHECKING:
    from conftest import Steer


@pytest.fixture(scope="module")
def tts(tmp_path_factory: pytest.TempPathFactory) -> ChatterboxTTS:
    model = load_model("tiny")
    model.prepare_conditionals(str(make_reference_wav(tmp_path_factory.mktemp("r") / "r.wav", seconds=3.0)))
    return model


@pytest.fixture(scope="module")
def odd_conds(tts: ChatterboxTTS, tmp_path_factory: pytest.TempPathFactory) -> Conditionals:
    """A voice from a 2.5 s reference (not a multiple of 40 ms): upstream ``embed_ref`` leaves
    125 prompt mel frames for 62 prompt tokens. The module's model keeps its 3 s voice."""
    before = tts.conds
    tts.prepare_conditionals(str(make_reference_wav(tmp_path_factory.mktemp("odd") / "r.wav", seconds=2.5)))
    odd, tts.conds = tts.conds, before
    return odd


def _run(
    tts: ChatterboxTTS, config: StreamConfig, tokens: int = 80, text: str = TEXT
) -> tuple[np.ndarray, StreamState]:
    return stream_all(tts, text, config, max_new_tokens=tokens)


def test_buffered_vocodes_every_token_exactly_once(tts: ChatterboxTTS) -> None:
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2)
    wav, state = _run(tts, config)
    s = state.report.summary()
    assert len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN == len(one_shot(tts, state, StreamConfig()))
    assert s["new_frames"] == 2 * len(state.tokens) == 2 * s["tokens"]
    assert s["s3gen_calls"] == len(state.report.chunks) >= 3
    assert s["audio_s"] == pytest.approx(len(wav) / 24000)
    assert s["tokens"] + s["invalid_tokens"] == state.t3.steps == 80  # no stop token: capped
    # A chunk's context is its window's left context and lookahead (the last window has none)
    _, windows = _all_windows(config, StreamState(StreamReport("buffered")), len(state.tokens))
    context = [2 * (w.begin - w.start + w.stop - w.end) for w in windows]
    assert [c.context_frames for c in state.report.chunks] == context
    assert context[1] == 2 * (config.left_context_tokens + config.lookahead_tokens)
    assert context[-1] == 2 * config.left_context_tokens


@pytest.mark.parametrize("strategy", ["buffered", "naive"])
def test_a_stream_under_bfloat16_autocast_vocodes_in_float32(tts: ChatterboxTTS, strategy: str) -> None:
    # HiFT's iSTFT takes no bfloat16: a stream(amp=torch.bfloat16) on a model without the wrapper's
    # float32 island failed at its first chunk, after T3 had run
    wav, state = stream_all(tts, TEXT, StreamConfig(strategy), max_new_tokens=20, amp=torch.bfloat16)
    assert len(state.tokens) > 0 and len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN
    assert wav.dtype == np.float32 and np.isfinite(wav).all()


def test_buffered_quality_holds_and_naive_is_reported(tts: ChatterboxTTS) -> None:
    configs = {
        "buffered": StreamConfig("buffered", first_window_s=0.6, window_s=1.2),
        "naive": StreamConfig("naive"),
    }
    waves, states = {}, {}
    for name, config in configs.items():
        waves[name], states[name] = _run(tts, config)
    frame = stream_quality(tts, waves, states, configs).set_index("strategy")
    naive_alone = one_shot(tts, states["naive"], configs["naive"])
    assert frame.loc["naive"].to_dict() == quality(waves["naive"], naive_alone, states["naive"])
    buffered, naive = frame.loc["buffered"], frame.loc["naive"]
    assert buffered["seam_max_over_median"] <= buffered["ordinary_max_over_median"]  # no click
    assert buffered["snr_db"] >= 18.0
    # naive draws new start noise for its context and new tokens at every call (the prompt's is
    # the stream's one track, as buffered's) and re-vocodes the context: its seams differ more
    assert buffered["snr_db"] > naive["snr_db"]
    assert buffered["length_diff_samples"] == 0


def test_every_way_to_stream_speaks_upstream_generates_tokens_for_its_seed(tts: ChatterboxTTS) -> None:
    # Sampling defaults as the family's generate (top_p 1.0), not as T3.inference (0.95).
    result = generate(tts, TEXT, max_new_tokens=60, seed=0)
    spoken = [t for t in result.speech_tokens if t < SPEECH_VOCAB_SIZE]
    for config in (StreamConfig("naive"), StreamConfig("buffered")):
        _, state = _run(tts, config, tokens=60)  # seed 0
        assert state.tokens == spoken
    assert stream_tokens(tts, TEXT, max_new_tokens=60) == spoken  # T3 alone, nothing vocoded
    assert stream_tokens(tts, TEXT, max_new_tokens=60, seed=1) != spoken  # the seed is the stream's
    upstream = StreamState(StreamReport("naive"))
    for _ in UpstreamTTS(tts).generate_stream(TEXT, max_new_tokens=60, seed=0, state=upstream):
        pass
    assert upstream.tokens == spoken


def test_two_streams_in_two_threads_each_speak_their_solo_tokens_and_audio(tts: ChatterboxTTS) -> None:
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2)
    texts = {3: TEXT, 11: "A second voice reads another sentence at the same moment."}
    solo = {seed: _run_seeded(tts, config, text, seed) for seed, text in texts.items()}
    torch.manual_seed(123)  # the global state is neither read nor changed by a seeded stream
    before = torch.get_rng_state()
    together: dict[int, tuple[np.ndarray, list[int]]] = {}
    start = threading.Barrier(len(texts))

    def run(seed: int) -> None:
        start.wait()
        together[seed] = _run_seeded(tts, config, texts[seed], seed)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert torch.equal(torch.get_rng_state(), before)
    # the per-call patch of the estimator is gone, whichever stream finished first
    assert "forward" not in vars(tts.s3gen.flow.decoder.estimator)
    for seed in texts:
        assert together[seed][1] == solo[seed][1]  # the same tokens
        assert np.array_equal(together[seed][0], solo[seed][0])  # and the same samples
    assert solo[3][1] != solo[11][1]


def test_hard_cuts_are_seams_too_and_one_chunk_has_none(tts: ChatterboxTTS) -> None:
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2, crossfade_ms=0)
    wav, state = _run(tts, config)
    assert len(state.seams) == len(state.report.chunks) - 1 >= 2  # every window after the first
    # each seam is where a chunk's samples end and the next one's begin (no fade to place it)
    ends = np.cumsum([c.tokens * SAMPLES_PER_TOKEN for c in state.report.chunks])
    assert state.seams == ends[:-1].tolist() and ends[-1] == len(wav)
    seam = quality(wav, wav, state)["seam_max_over_median"]
    assert isinstance(seam, float) and math.isfinite(seam) and seam > 0  # measured at those seams
    wav, state = _run(tts, StreamConfig("buffered"), tokens=12)  # one window
    assert len(state.report.chunks) == 1 and quality(wav, wav, state)["seam_max_over_median"] is None


def _run_seeded(
    tts: ChatterboxTTS, config: StreamConfig, text: str, seed: int
) -> tuple[np.ndarray, list[int]]:
    wav, state = stream_all(tts, text, config, max_new_tokens=40, seed=seed)
    return wav, state.tokens


def test_an_odd_prompt_frame_is_dropped_so_every_token_is_vocoded_once(
    tts: ChatterboxTTS, odd_conds: Conditionals, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = odd_conds.gen
    assert gen["prompt_feat"].size(1) == 2 * gen["prompt_token"].size(1) + 1  # upstream's odd frame
    monkeypatch.setattr(tts, "conds", odd_conds)
    # Before, every S3Gen call came out 480 samples short: with a 240 ms crossfade (allowed) the
    # stream lost samples at each seam (30720 vs one-shot's 31200) and the fade sat off the seam.
    buffered = StreamConfig("buffered", first_window_s=0.6, window_s=1.2, crossfade_ms=240)
    for config in (buffered, StreamConfig("naive")):
        wav, state = _run(tts, config, tokens=40)
        reference = one_shot(tts, state, config)
        assert len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN == len(reference), config.strategy
    c = buffered.crossfade_samples
    wav, state = _run(tts, buffered, tokens=40)
    assert len(state.seams) >= 1 and state.crossfades == [(s - c // 2, s + c // 2) for s in state.seams]
    assert quality(wav, one_shot(tts, state, buffered), state)["snr_db"] >= 18.0


def test_the_one_shot_yardstick_speaks_the_voice_the_stream_spoke(
    tts: ChatterboxTTS, odd_conds: Conditionals, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, one_shot read tts.conds when called: a stream given its voice (conds=, as the
    # wrappers' generate_stream give theirs) was compared with the model's voice of the moment.
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2)
    state = StreamState(StreamReport("buffered"))
    for _ in stream(tts, TEXT, config, max_new_tokens=40, state=state, conds=odd_conds):
        pass
    assert state.voice is odd_conds and tts.conds is not odd_conds
    spoken = one_shot(tts, state, config)
    state.voice = None  # as before: the model's voice of the moment
    in_the_models_voice = one_shot(tts, state, config)
    monkeypatch.setattr(tts, "conds", odd_conds)
    assert np.array_equal(spoken, one_shot(tts, state, config))
    assert not np.array_equal(spoken, in_the_models_voice)


def test_shorten_prompt_keeps_frames_2i_and_2i_plus_1_with_token_i() -> None:
    p = 62
    frames = torch.arange(2 * p + 1)  # frame k holds k; the last one (124) belongs to no token
    gen = {
        "prompt_token": torch.arange(p)[None],
        "prompt_token_len": torch.tensor([p]),
        "prompt_feat": frames[None, :, None].expand(1, -1, 80).float(),
        "prompt_feat_len": None,
        "embedding": torch.zeros(1, 192),
    }
    for prompt_s, kept in ((None, p), (1.0, 25), (0.2, 5), (30.0, p)):
        out = shorten_prompt(gen, prompt_s)
        tokens, feat = out["prompt_token"][0], out["prompt_feat"][0, :, 0].long()
        assert len(tokens) == int(out["prompt_token_len"]) == kept and tokens[-1] == p - 1, prompt_s
        assert torch.equal(feat[0::2], 2 * tokens) and torch.equal(feat[1::2], 2 * tokens + 1), prompt_s
    aligned = shorten_prompt(gen, None)
    assert shorten_prompt(aligned, None) is aligned  # an aligned prompt is passed on as it is


def test_an_english_only_model_refuses_another_language_and_speaks_english(tts: ChatterboxTTS) -> None:
    """(before 2026-12-07 a ``language_id`` was ignored there: a stream asked for French spoke English)"""
    with pytest.raises(ConfigError, match="the standard model speaks English only"):
        next(iter(stream(tts, "Bonjour.", max_new_tokens=4, language_id="fr")))
    assert next(iter(stream(tts, "Hello.", max_new_tokens=30, language_id="EN", seed=0)))[0].size > 0


def test_first_audio_counts_the_text_front_end(tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's clock started after its text was tokenized (a one-shot generation's includes
    that time; a multilingual front end's first call loads a model): 0.3 s of it went unseen."""
    tokens = streaming.text_tokens

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return tokens(*args, **kwargs)

    monkeypatch.setattr(streaming, "text_tokens", slow)
    _, first = next(iter(stream(tts, "Hello.", max_new_tokens=30, seed=0)))
    # in the wait for the chunk, beside the stages' own work (T3's seconds count its steps only)
    assert first.emitted_s - first.compute_s >= 0.3


def test_a_one_shot_reference_has_its_nan_samples_zeroed_as_the_stream_has(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before 2026-12-07 the stream's NaN samples were zeroed and the reference's kept: the SNR was NaN)"""
    state = StreamState(StreamReport("buffered"))
    list(stream(tts, "Hello.", max_new_tokens=30, seed=0, state=state))
    s3gen = streaming._s3gen

    def with_nan(*args: Any, **kwargs: Any) -> Any:
        wav, *rest = s3gen(*args, **kwargs)
        wav[:10] = np.nan
        return (wav, *rest)

    monkeypatch.setattr(streaming, "_s3gen", with_nan)
    reference = streaming.one_shot(tts, state, StreamConfig())
    assert reference.size and not np.isnan(reference).any() and not reference[:10].any()


def test_a_stream_state_that_holds_a_stream_is_refused(tts: ChatterboxTTS) -> None:
    # Before, the second stream vocoded the first utterance's tokens again, then its own, and the
    # report added both streams' chunks up.
    state = StreamState(StreamReport("buffered"))
    chunks = list(stream(tts, "First one.", StreamConfig("buffered"), max_new_tokens=12, state=state))
    tokens = list(state.tokens)
    with pytest.raises(ConfigError, match="already holds a stream.*pass a fresh StreamState"):
        next(stream(tts, "Second one.", StreamConfig("buffered"), max_new_tokens=12, state=state))
    assert state.tokens == tokens and len(state.report.chunks) == len(chunks)  # left as it was


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # before: an OverflowError or TypeError from own_seed, torch or Python, and a cap of True
        # streamed one token
        ({"seed": 1.5}, r"seed must be an int in \[-2\*\*63, 2\*\*64\), got 1.5"),
        ({"seed": None}, "seed must be an int.*got None"),
        ({"seed": 2**64}, "seed must be an int.*got 18446744073709551616"),
        ({"seed": True}, "seed must be an int.*got True"),
        ({"max_new_tokens": 40.5}, "max_new_tokens must be an int, got 40.5"),
        ({"max_new_tokens": True}, "max_new_tokens must be an int, got True"),
        ({"max_new_tokens": "20"}, "max_new_tokens must be an int, got '20'"),
        # a tensor has __index__ for one element of any rank, a boolean one's too
        ({"max_new_tokens": torch.tensor(True)}, "max_new_tokens must be an int, got tensor"),
        ({"seed": torch.tensor([3])}, "seed must be an int.*got tensor"),
    ],
)
def test_a_seed_or_token_cap_no_stream_runs_with_is_refused(
    tts: ChatterboxTTS, kwargs: dict[str, object], message: str
) -> None:
    kwargs = {"max_new_tokens": 20, **kwargs}
    with pytest.raises(ConfigError, match=message):
        next(stream(tts, TEXT, StreamConfig(), **kwargs))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        stream_tokens(tts, TEXT, **kwargs)  # type: ignore[arg-type]


def test_a_numpy_seed_and_cap_stream_as_the_same_ints(tts: ChatterboxTTS) -> None:
    wav, state = stream_all(tts, TEXT, StreamConfig(), max_new_tokens=20, seed=3)
    np_wav, np_state = stream_all(tts, TEXT, StreamConfig(), max_new_tokens=np.int32(20), seed=np.int64(3))
    assert np_state.tokens == state.tokens and np.array_equal(np_wav, wav)
    assert type(np_state.seed) is int
    numpy_made = stream_tokens(tts, TEXT, max_new_tokens=np.int32(20), seed=np.int64(3))  # type: ignore[arg-type]
    assert numpy_made == state.tokens


def test_numpy_token_counts_are_kept_as_ints_the_report_can_write(tts: ChatterboxTTS) -> None:
    # A sweep over np.arange kept numpy ints in the config and its chunks' rows: JSON refused them.
    config = StreamConfig(left_context_tokens=np.int64(4), t3_block=np.int64(5))  # type: ignore[arg-type]
    assert config == StreamConfig(left_context_tokens=4, t3_block=5)
    assert all(type(v) is int for k, v in asdict(config).items() if k.endswith(("_tokens", "_block")))
    rows = [asdict(m) for _, m in stream(tts, TEXT, config, max_new_tokens=20, seed=3)]
    assert rows and json.loads(json.dumps({"config": asdict(config), "chunks": rows}))["config"] == asdict(
        config
    )


@pytest.mark.parametrize("total", [10, 16, 17, 18, 19, 40, 48, 49])  # around the windows' edges
def test_windows_do_not_depend_on_when_they_are_asked(total: int) -> None:
    # ``stream`` asks for a window as T3's tokens come; the engine's S3Gen stage may first ask
    # once T3 is done. Before, a stream that ended before its first window was asked for got
    # one merged window in the engine and two alone: the same tokens, other audio.
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2)

    def windows(asked_as_they_come: bool) -> list[tuple[int, int, bool]]:
        state, out = StreamState(StreamReport("buffered")), []
        cutter = BufferedCutter(config, state)
        for k in range(total):
            state.tokens.append(k)
            while asked_as_they_come and (w := cutter.next_window(True)) is not None:
                out.append(w)
                cutter.advance(w)
        while (w := cutter.next_window(False)) is not None:
            out.append(w)
            cutter.advance(w)
        # no window runs past the tokens T3 sampled: once T3 has ended, a tail no longer than a
        # window and its lookahead goes into one last window (one S3Gen call, not two)
        assert all(w.stop <= total for w in out), [(w.begin, w.end, w.stop) for w in out]
        return [(w.begin, w.end, w.final) for w in out]

    alone, late = windows(True), windows(False)
    assert alone == late and alone[-1][1] == total and alone[-1][2]
    assert [end for _, end, _ in alone[:-1]] == [b for b, _, _ in alone[1:]]  # every token once


def test_naive_re_vocodes_context(tts: ChatterboxTTS) -> None:
    config = StreamConfig("naive")
    wav, state = _run(tts, config, tokens=100)
    s = state.report.summary()
    assert s["s3gen_calls"] >= 3 and s["context_frames"] > s["new_frames"] / 2
    assert s["prompt_frames"] == s["s3gen_calls"] * state.report.chunks[0].prompt_frames
    # each chunk runs again the (at most) 50 tokens before it, two mel frames a token, and
    # counts its own apart (a context one token short, or the two counts swapped, passed above)
    done, expected = 0, []
    for chunk in state.report.chunks:
        expected.append((2 * min(done, config.context_tokens), 2 * chunk.tokens))
        done += chunk.tokens
    assert [(c.context_frames, c.new_frames) for c in state.report.chunks] == expected


def test_naive_fades_each_later_chunk_in_over_fade_ms_and_seams_where_chunks_meet(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planted: S3Gen gives a steady 1.0 for every token. The first chunk is upstream's fade-in
    alone; every later one starts with the fork's ``fade_ms`` ramp and is steady after it; each
    seam is where one chunk's samples end (the seam metric reads the audio there)."""

    def steady(_tts: Any, _gen: Any, tokens: list[int], *_a: Any, **_k: Any) -> tuple[Any, ...]:
        return np.ones(len(tokens) * SAMPLES_PER_TOKEN, np.float32), torch.zeros(0), 0.0, 0.0, 0.0

    monkeypatch.setattr(streaming, "_s3gen", steady)
    # 40 ms: past upstream's own 20 ms of silence, so a fork's fade on the first chunk would show
    config = StreamConfig("naive", fade_ms=40.0)
    wav, state = _run(tts, config, tokens=100)
    lengths = [round(c.audio_s * SAMPLE_RATE) for c in state.report.chunks]
    ends = np.cumsum(lengths)
    assert len(lengths) >= 3 and state.seams == ends[:-1].tolist() and ends[-1] == len(wav)
    upstream = torch.ones(lengths[0])
    fade_in(tts.s3gen, upstream)
    assert np.array_equal(wav[: lengths[0]], upstream.numpy())
    fade = int(config.fade_ms * SAMPLE_RATE / 1000)
    for seam, length in zip(state.seams, lengths[1:], strict=True):
        assert np.array_equal(wav[seam : seam + fade], np.linspace(0.0, 1.0, fade, dtype=np.float32))
        assert np.all(wav[seam + fade : seam + length] == 1.0)


def test_the_snr_leaves_the_crossfades_out() -> None:
    """quality's SNR is "outside the crossfades" (docs/streaming.md): a stream that differs from
    its one-shot only inside one is identical to it."""
    one_shot_wav = np.sin(np.arange(24000) / 10).astype(np.float32)
    streamed = one_shot_wav.copy()
    streamed[11520:12480] += 0.3
    state = StreamState(StreamReport("buffered"))
    state.seams.append(12000)
    state.crossfades.append((11520, 12480))
    q = quality(streamed, one_shot_wav, state)
    assert q["snr_db"] == math.inf and q["identical_to_one_shot"] is True, q
    state.crossfades.clear()
    assert quality(streamed, one_shot_wav, state)["identical_to_one_shot"] is False


@pytest.mark.parametrize("strategy", ["buffered", "naive"])
def test_each_chunk_times_the_flow_and_the_vocoder_apart(
    tts: ChatterboxTTS, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that moves 1 s inside the flow and 100 s inside HiFT, nowhere else (every other
    check summed the two, so swapped fields passed)."""
    clock = [0.0]

    def timed(fn: Any, seconds: float) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            clock[0] += seconds
            return fn(*a, **k)

        return run

    monkeypatch.setattr(streaming, "now", lambda *_a, **_k: clock[0])
    monkeypatch.setattr(streaming, "flow_mels", timed(streaming.flow_mels, 1.0))
    monkeypatch.setattr(streaming, "vocoder", timed(streaming.vocoder, 100.0))
    config = StreamConfig(strategy, first_window_s=0.6, window_s=1.2)
    _, state = stream_all(tts, TEXT, config, max_new_tokens=40)
    assert state.report.chunks
    assert all((c.flow_s, c.vocoder_s) == (1.0, 100.0) for c in state.report.chunks)


def test_carry_source_hands_each_call_the_source_over_its_overlap(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``carry_source=True`` passes HiFT's excitation of the overlap to the next call (no test
    used it: a cache always None passed)."""
    caches: list[torch.Tensor | None] = []
    vocoder = streaming.vocoder

    def recorded(s3gen: Any, mels: torch.Tensor, cache: torch.Tensor | None = None) -> Any:
        caches.append(cache)
        return vocoder(s3gen, mels, cache)

    monkeypatch.setattr(streaming, "vocoder", recorded)
    config = StreamConfig(first_window_s=0.6, window_s=1.2, carry_source=True)
    stream_all(tts, TEXT, config, max_new_tokens=80)
    overlap = (config.left_context_tokens + config.lookahead_tokens) * SAMPLES_PER_TOKEN
    assert len(caches) >= 3 and caches[0] is None
    assert all(c is not None and c.shape[-1] == overlap for c in caches[1:])


def test_a_failed_stream_ends_its_progress_line(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the caller keeps the error (a notebook keeps the last traceback, and with it the
    stream's frame), only the stream's own close ends the bar's line."""

    def failing(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("vocoder failed")

    monkeypatch.setattr(streaming, "vocoder", failing)
    with pytest.raises(RuntimeError, match="vocoder failed") as kept:
        stream_all(tts, TEXT, StreamConfig(), max_new_tokens=20, progress=True)
    err = capsys.readouterr().err
    assert kept.value and err and err.endswith("\n"), err[-200:]


def test_a_seeded_naive_stream_draws_its_noise_from_its_own_generator(tts: ChatterboxTTS) -> None:
    # naive draws fresh start noise at every call: from the stream's generator, as buffered's
    # track is, so its audio is its seed's whatever the global generator holds, which it leaves
    waves = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        waves.append(stream_all(tts, TEXT, StreamConfig("naive"), max_new_tokens=30, seed=3)[0])
        assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(*waves)


def test_underruns_on_a_planted_schedule() -> None:
    # Player starts at 1.0 with 1.5 s; chunk 2 arrives at 2.0 (in time), the audio runs out at
    # 3.5, chunk 3 arrives at 5.0: one gap of 1.5 s.
    gaps = underruns([1.0, 2.0, 5.0], [1.5, 1.0, 1.0])
    assert [(g.at_s, g.gap_s) for g in gaps] == [(3.5, 1.5)]
    assert underruns([0.5, 1.0, 1.5], [1.0, 1.0, 1.0]) == []
    assert underruns([], []) == []


def test_seam_metric_sees_a_click() -> None:
    t = np.arange(24000) / 24000
    smooth = np.sin(2 * np.pi * 220 * t).astype(np.float32)
    clicked = smooth.copy()
    clicked[12000:] += 0.5  # a step: one jump far above any sample-to-sample change of the sine
    assert (
        seam_metric(smooth, [12000])["seam_max_over_median"]
        <= seam_metric(smooth, [12000])["ordinary_max_over_median"]
    )
    m = seam_metric(clicked, [12000])
    assert m["seam_max_over_median"] > 5 * m["ordinary_max_over_median"]


def test_a_single_short_word_is_flushed(tts: ChatterboxTTS) -> None:
    wav, state = _run(tts, StreamConfig("buffered"), tokens=12, text="Hi.")  # fewer than a window
    assert len(state.report.chunks) == 1 and len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN


def test_a_window_larger_than_the_utterance(tts: ChatterboxTTS) -> None:
    wav, state = _run(tts, StreamConfig("buffered", first_window_s=30, window_s=60), tokens=40)
    assert state.report.s3gen_calls == 1 and len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window_s": 0}, "window_s must be positive"),
        ({"first_window_s": -1}, "first_window_s must be positive"),
        ({"chunk_tokens": 0}, "chunk_tokens must be positive"),
        ({"crossfade_ms": -5}, "crossfade_ms must be zero or positive"),
        ({"crossfade_ms": 1500, "first_window_s": 1.0}, r"than a window \(25 tokens of 40 ms = 1000 ms\)"),
        # 0.05 s rounds to one token: the window compared is 40 ms long (it said "0.05 s")
        ({"crossfade_ms": 40, "first_window_s": 0.05}, r"than a window \(1 token of 40 ms = 40 ms\)"),
        (  # compared in whole samples: the message said 39.98 ms was not shorter than 40 ms
            {"crossfade_ms": 39.98, "first_window_s": 0.04, "lookahead_tokens": 1, "left_context_tokens": 1},
            r"crossfade of 39.98 ms \(40 ms in whole samples\) is not shorter than a window \(1 token",
        ),
        # it said no limit and no remedy: 240 ms is twice the 3 tokens of lookahead
        ({"crossfade_ms": 300}, r"must fit in the left context .* of 240 ms or less, or raise left_context"),
        ({"crossfade_ms": 20, "lookahead_tokens": 0}, r"give crossfade_ms \(--crossfade-ms\) of 0 \(none\)"),
        # whole tokens: 2.5 passed, then failed after T3 ran (t3_block=2.5 checked every 5 tokens)
        ({"strategy": "naive", "context_tokens": 2.5}, "context_tokens must be a whole number of tokens"),
        # every call's first token is faded in from silence: without context, 20 ms of it per chunk
        ({"strategy": "naive", "context_tokens": 0}, "context_tokens must be 1 or more for the naive"),
        (
            {"left_context_tokens": 4.5},
            r"left_context_tokens must be a whole number of tokens \(an int\), got 4.5",
        ),
        ({"lookahead_tokens": 3.0}, "lookahead_tokens must be a whole number of tokens"),
        ({"t3_block": 2.5}, "t3_block must be a whole number of tokens"),
        ({"t3_block": 0.5}, "t3_block must be a whole number of tokens"),
        ({"chunk_tokens": True}, "chunk_tokens must be a whole number of tokens"),
        ({"strategy": "magic"}, "unknown strategy"),
        ({"prompt_s": 0}, "prompt_s must be positive"),
        # inf and nan too (a window of inf seconds overflowed a token count further on)
        ({"first_window_s": math.inf}, "first_window_s must be positive and finite"),
        ({"window_s": math.nan}, "window_s must be positive and finite"),
        ({"crossfade_ms": math.nan}, "crossfade_ms must be zero or positive and finite"),
        ({"prompt_s": math.inf}, "prompt_s must be positive"),
        # finite but past an hour: round(1e308 * 25) overflowed (an OverflowError, no ConfigError)
        ({"window_s": 1e308}, "window_s of 1e[+]308 s is longer than an hour"),
        ({"prompt_s": 1e308}, "prompt_s of 1e[+]308 s is longer than an hour"),
        ({"crossfade_ms": 1e308}, "crossfade_ms of 1e[+]308 ms is longer than an hour"),
        # token counts too: unbounded before 2026-12-07 (a window padded to them ran out of memory)
        ({"left_context_tokens": 10**6}, "left_context_tokens of 1e[+]06 tokens is longer than an hour"),
        ({"lookahead_tokens": 90_001}, "lookahead_tokens of 90001 tokens is longer than an hour"),
        ({"strategy": "naive", "context_tokens": 10**9}, "context_tokens of 1e[+]09 tokens is longer"),
    ],
)
def test_bad_sizes_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StreamConfig(**kwargs)


@pytest.mark.parametrize(("left_context_tokens", "lookahead_tokens"), [(4, 3), (1, 5), (2, 2), (5, 4)])
def test_the_crossfade_refused_says_the_most_that_fits(
    left_context_tokens: int, lookahead_tokens: int
) -> None:
    sizes = {"left_context_tokens": left_context_tokens, "lookahead_tokens": lookahead_tokens}
    with pytest.raises(ConfigError, match="must fit in the left context") as e:
        StreamConfig(crossfade_ms=500, **sizes)
    most = float(re.search(r"of ([0-9.]+) ms or less", str(e.value)).group(1))  # type: ignore[union-attr]
    StreamConfig(crossfade_ms=most, **sizes)  # the most is allowed ...
    with pytest.raises(ConfigError, match="must fit in the left context"):
        StreamConfig(crossfade_ms=most + 1, **sizes)  # ... and a millisecond more is not


def test_naive_is_not_refused_over_the_buffered_windows_it_does_not_use() -> None:
    # Both refused a crossfade (naive has none) not shorter than a window (naive has none).
    for sizes in ({"window_s": 0.04}, {"crossfade_ms": 300}, {"first_window_s": 0.04, "lookahead_tokens": 0}):
        assert StreamConfig("naive", **sizes).strategy == "naive"
        with pytest.raises(ConfigError, match="crossfade"):
            StreamConfig("buffered", **sizes)


def _threads() -> set[threading.Thread]:
    """The process's threads but tqdm's monitor, which the first progress bar of the process
    starts and keeps (run alone, this test's stream drew the first: 2 threads against 1)."""
    return {t for t in threading.enumerate() if t.name != "tqdm_monitor"}


def test_consumer_stopping_early_stops_everything(tts: ChatterboxTTS) -> None:
    threads = _threads()
    state = StreamState(StreamReport("buffered"))
    gen = stream(tts, TEXT, StreamConfig("buffered", first_window_s=0.4), max_new_tokens=200, state=state)
    next(gen)
    steps = state.t3.steps
    gen.close()  # what a `break` out of a for loop does
    del gen
    gc.collect()
    assert state.t3.steps == steps < 200  # T3 stopped with the consumer: nothing ran ahead
    assert _threads() == threads
    assert not torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu")


def test_nan_in_a_chunk_is_reported_and_zeroed(tts: ChatterboxTTS) -> None:
    def poison(fn):  # type: ignore[no-untyped-def]
        def inner(*args, **kwargs):  # type: ignore[no-untyped-def]
            wav, source = fn(*args, **kwargs)
            wav = wav.clone()
            wav[..., 100:110] = float("nan")
            return wav, source

        return inner

    with shadow(tts.s3gen.mel2wav, "inference", poison):
        wav, state = _run(tts, StreamConfig("buffered", first_window_s=0.6, window_s=1.2))
    assert np.isfinite(wav).all()
    assert state.report.chunks[0].nan_samples == 10
    assert state.report.summary()["nan_samples"] >= 10


def test_wrapper_streams_with_its_plan(tmp_path: Path) -> None:
    opt = PerformanceOptimizedTTS.from_model(
        load_model("tiny"), dtype="decode-bfloat16", record_attention=False, decode="static"
    )
    with opt:
        opt.prepare_conditionals(str(make_reference_wav(tmp_path / "r.wav", seconds=3.0)))
        state = StreamState(StreamReport("buffered"))
        chunks = list(opt.generate_stream(TEXT, max_new_tokens=40, state=state))
        assert len(chunks) >= 1 and all(m.audio_s > 0 for _, m in chunks)
        assert sum(len(c) for c, _ in chunks) == len(state.tokens) * SAMPLES_PER_TOKEN
        # T3 ran the wrapper's decode step (without its plan the stream decodes eagerly) ...
        assert opt.decode == "static" and state.t3.step_mode == "static"
        # ... and a step asked for by the call overrides it
        eager = StreamState(StreamReport("buffered"))
        list(opt.generate_stream(TEXT, max_new_tokens=10, state=eager, decode="eager"))
        assert eager.t3.step_mode == "eager"


def test_stream_cli_writes_wav_and_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    rc = main(
        [
            "stream",
            "--reference",
            str(reference_wav),
            "--model",
            "tiny",
            "--tokens",
            "40",
            "--strategy",
            "naive",
            "--decode",
            "static",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["s3gen_calls"] == len(report["chunks"]) >= 1
    assert Path(report["files"]["wav"]).stat().st_size > 1000 and Path(report["files"]["timeline"]).exists()
    written = sf.info(report["files"]["wav"])  # the whole stream, at the model's rate
    assert written.samplerate == SAMPLE_RATE
    assert written.frames == pytest.approx(report["summary"]["audio_s"] * SAMPLE_RATE, abs=SAMPLE_RATE / 100)
    assert report["note"] == f"no stop token within 40 tokens ({RANDOM_NO_STOP})"
    assert report["t3_step_mode"] == "static" and "t3_compile_s" in report


def test_the_report_tells_t3_compiling_before_the_first_token_from_that_mid_way(
    tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the whole of state.t3.compile_s was printed as built "before the first token",
    # though a span compiled once prefill and tokens pass 256 positions is timed in it too: with a
    # reused plan, all of it came after the first token. The steps run eagerly here (each span's
    # first call is still timed as its compiling), as the other tests stand in for Inductor.
    from tts_workbench.runtime import decode

    monkeypatch.setattr(decode, "compile_method", lambda fn, owner, *_a, **_k: types.MethodType(fn, owner))
    plan = DecodePlan.plain(tts.t3, step="compiled")
    text = " ".join([TEXT] * 3)  # a long prefill: its span changes a few dozen tokens in (not 180)
    prefill, config = prefill_length(tts, text), StreamConfig("buffered")
    # the tokens before the first chunk: its window and the flow's lookahead, handed over by T3 in blocks
    first_chunk = (
        math.ceil((config.first_window_tokens + config.lookahead_tokens) / config.t3_block) * config.t3_block
    )
    assert prefill + max(40, first_chunk) <= 256, prefill  # the first run and chunk in one span
    first = run_to_files(tts, text, config, tmp_path, max_new_tokens=40, plan=plan)
    assert first["t3_compile_before_first_s"] == first["t3_compile_s"] > 0  # one short span, built first
    report = run_to_files(tts, text, config, tmp_path, max_new_tokens=256 - prefill + 30, plan=plan)
    assert report["t3_compile_before_first_s"] == 0.0 < report["t3_compile_s"]  # a longer span, mid-way
    line = next(x for x in format_report(report).splitlines() if x.startswith("T3 decode step"))
    before = re.search(r"built in ([0-9.]+) s before the first chunk", line)
    assert before is not None and float(before[1]) <= report["chunks"][0]["emitted_s"], line
    assert f"and {report['t3_compile_s']:.2f} s after it for a longer span" in line, line


def test_a_stream_without_audio_compiled_all_of_t3s_step_before_any(
    tts: ChatterboxTTS, steer: type[Steer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No chunk to time it at: it was all "mid-way", though it came before the first (and only) token.
    from tts_workbench.runtime import decode

    monkeypatch.setattr(decode, "compile_method", lambda fn, owner, *_a, **_k: types.MethodType(fn, owner))
    plan = DecodePlan.plain(tts.t3, step="compiled")
    with shadow(tts.t3.speech_head, "forward", steer({1: tts.t3.hp.stop_speech_token})):
        report = run_to_files(tts, TEXT, StreamConfig("buffered"), tmp_path, max_new_tokens=20, plan=plan)
    assert report["summary"]["chunks"] == 0 and report["t3_compile_s"] > 0
    assert report["t3_compile_before_first_s"] == report["t3_compile_s"]
    assert "after it" not in format_report(report)


@pytest.mark.parametrize(
    ("flag", "value"), [("--window-s", "0"), ("--first-window-s", "inf"), ("--crossfade-ms", "nan"),
                        ("--crossfade-ms", "-5"), ("--prompt-s", "ten"),
                        ("--prompt-s", "1e308"), ("--crossfade-ms", "1e308")],
)  # fmt: skip
def test_stream_cli_bad_size(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # refused by the parser, before any model is built
        main(["stream", "--model", "tiny", flag, value])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and f"argument {flag}: must be" in errors[0], errors


def test_bench_stream_row_times_t3_from_its_decode_stats(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tts_workbench.studies import bench

    def known_times(
        tts: ChatterboxTTS, text: str, config: StreamConfig, **kwargs: Any
    ) -> tuple[np.ndarray, StreamState]:
        """The real stream, its T3 stats' clock readings set to known ones (a real one cannot be
        compared): a 0.25 s prefill and 0.5 s a timed decode step (``DecodeStats.step_s``)."""
        wav, state = stream_all(tts, text, config, **kwargs)
        state.t3.prefill_s = 0.25
        state.t3.decode_s = 0.5 * (state.t3.sampled - 1 - state.t3.compile_steps)
        return wav, state

    monkeypatch.setattr(bench, "stream_all", known_times)
    row = bench.run_stream(tts, StreamConfig("buffered", first_window_s=0.6, window_s=1.2), TEXT, 30, 0)
    assert (row["t3_prefill_s"], row["t3_step_s"]) == (0.25, 0.5)
    assert {"wall_s", "ttfa_s"} <= set(row)  # clock readings: not compared
    assert row["s3gen_calls"] >= 1
    # Tokens sampled, as the one-shot rows count them (this seed samples no stop token).
    assert row["t3_tokens"] == 30


def test_a_whole_prompt_yardstick_of_a_short_prompt_stream_is_the_whole_prompt_streams(
    tts: ChatterboxTTS,
) -> None:
    """bench.compare_streaming measures every config against one one-shot call with the whole
    prompt, made from its first config's stream: that stream's prompt noise was for its own
    (maybe shortened) prompt, not the whole one."""
    windows = {"first_window_s": 0.6, "window_s": 1.2}
    _, short = stream_all(tts, TEXT, StreamConfig(prompt_s=1.0, **windows), max_new_tokens=30, seed=5)
    _, whole = stream_all(tts, TEXT, StreamConfig(**windows), max_new_tokens=30, seed=5)
    assert short.tokens == whole.tokens and short.prompt_noise.shape != whole.prompt_noise.shape
    assert np.array_equal(one_shot(tts, short, StreamConfig()), one_shot(tts, whole, StreamConfig()))


def test_naive_report_counts_t3_blocks_after_its_last_chunk(tts: ChatterboxTTS, steer: type[Steer]) -> None:
    # Before, T3 blocks after the last chunk (only invalid ids, or only the stop token) made no
    # chunk and their T3 time and invalid ids were in no chunk's record: 22 tokens + 0 invalid
    # of 25 steps, and T3 seconds short of prefill + decode.
    config = StreamConfig("naive", chunk_tokens=22, t3_block=1)
    valid = {call: 1 for call in range(1, 23)}  # 22 speech tokens: one chunk
    invalid = dict.fromkeys((23, 24, 25), SPEECH_VOCAB_SIZE)
    stop = tts.t3.hp.stop_speech_token
    # then only invalid ids up to the cap; or only the stop token; or nothing but the stop token
    cases = (({**valid, **invalid}, 25, 1), ({**valid, 23: stop}, 60, 1), ({1: stop}, 60, 0))
    for edits, cap, chunks in cases:
        state = StreamState(StreamReport("naive"))
        with shadow(tts.t3.speech_head, "forward", steer(edits)):
            handed = [asdict(m) for _, m in stream(tts, TEXT, config, max_new_tokens=cap, state=state)]
        s, t3 = state.report.summary(), state.t3
        assert s["chunks"] == chunks and s["tokens"] == len(state.tokens) == 22 * chunks
        assert s["tokens"] + s["invalid_tokens"] + t3.stopped == t3.steps == len(edits)
        assert s["t3_s"] == pytest.approx(t3.prefill_s + t3.decode_s)
        assert handed == [asdict(m) for m in state.report.chunks]  # records unchanged once handed out


def test_streams_with_adjacent_seeds_draw_different_noise() -> None:
    # The load study and the engine give stream k the seed seed + k. Before, a stream's S3Gen
    # draws came from seed + 1, + 2, + 3: stream 0's prompt noise was stream 1's noise track,
    # stream 0's HiFT draws were stream 3's T3 draws.
    first: dict[tuple[str, int], tuple[float, ...]] = {}
    for seed in range(8):
        state = StreamState(StreamReport("buffered"))
        state.draw_from(seed, tokens=10, prompt_tokens=10)
        t3 = StreamRandom(seed).generator()
        assert t3.initial_seed() == seed  # T3 samples from the seed itself, as upstream
        hift = torch.Generator().manual_seed(state.rng.seed)
        draws = {
            "t3": torch.randn(4, generator=t3),
            "noise": state.noise.flatten()[:4],
            "prompt_noise": state.prompt_noise.flatten()[:4],
            "hift": torch.randn(4, generator=hift),
        }
        first.update({(name, seed): tuple(v.tolist()) for name, v in draws.items()})
        assert torch.equal(state.prompt_noise_for(10), state.prompt_noise)  # drawn the same way
        assert torch.equal(state.prompt_noise_for(20)[:, :, :20], state.prompt_noise)  # its start
    assert len(set(first.values())) == len(first) == 32, "two draws of streams 0..7 start alike"


def test_a_shorter_noise_track_is_the_start_of_a_longer_one() -> None:
    # Drawn (1, 80, frames) before, frame k's values moved with the frame count.
    longest = noise_track(60, seed=7)
    for tokens in (0, 1, 7, 40):
        assert torch.equal(noise_track(tokens, seed=7), longest[:, :, : 2 * tokens])


def test_a_seeded_streams_audio_does_not_depend_on_its_token_cap(tts: ChatterboxTTS) -> None:
    # The token cap sizes the stream's noise track: before, the same tokens with another cap
    # were vocoded on other noise (a first chunk of the same tokens 8 % off).
    config = StreamConfig("buffered", first_window_s=0.6, window_s=0.4)  # 15, then 10 tokens
    chunks, states = {}, {}
    for cap in (40, 60):
        states[cap] = StreamState(StreamReport("buffered"))
        chunks[cap] = [c for c, _ in stream(tts, TEXT, config, max_new_tokens=cap, seed=7, state=states[cap])]
    short, long = states[40].tokens, states[60].tokens
    assert short == long[: len(short)] and len(short) > 30  # T3 agrees: the same tokens
    # Every window of the capped stream but its last (flushed at the cap) ran on the same tokens
    # and the same noise frames as the longer stream's: its chunks are the same, sample for sample.
    assert len(chunks[40]) >= 3
    for a, b in zip(chunks[40][:-1], chunks[60], strict=False):
        assert np.array_equal(a, b)


def test_one_buffered_window_is_the_one_shot_exactly(tts: ChatterboxTTS) -> None:
    # A window is a slice of the stream's one noise track: with a single window the stream is
    # the one-shot call of its tokens, sample for sample (a fresh draw per window is not).
    config = StreamConfig("buffered", first_window_s=30, window_s=60)
    wav, state = _run(tts, config, tokens=40)
    assert state.report.s3gen_calls == 1
    assert np.array_equal(wav, one_shot(tts, state, config))


def test_stream_all_fills_the_state_it_is_given(tts: ChatterboxTTS) -> None:
    # Before, stream_all passed a state of its own and state= too: a TypeError.
    given = StreamState(StreamReport("buffered"))
    wav, state = stream_all(tts, "Hi.", StreamConfig(), max_new_tokens=5, state=given)
    assert state is given and given.tokens and given.report.chunks
    assert len(wav) == len(given.tokens) * SAMPLES_PER_TOKEN


def _all_windows(
    config: StreamConfig, state: StreamState, tokens: int
) -> tuple[BufferedCutter, list[Window]]:
    """The windows a buffered stream cuts from ``tokens`` tokens all sampled (T3 ended)."""
    cutter = BufferedCutter(config, state)
    state.tokens.extend(range(tokens))
    windows = []
    while (w := cutter.next_window(False)) is not None:
        windows.append(w)
        cutter.advance(w)
    return cutter, windows


def test_a_windows_start_noise_is_the_streams_track_at_its_frames() -> None:
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2)
    state = StreamState(StreamReport("buffered"))
    state.draw_from(5, tokens=100, prompt_tokens=12)
    cutter, windows = _all_windows(config, state, tokens=100)
    assert len(windows) >= 3 and windows[-1].final
    for w in windows:
        noise = cutter.noise(w)
        assert torch.equal(noise[:, :, :24], state.prompt_noise)  # the prompt's: one for every call
        assert torch.equal(noise[:, :, 24:], state.noise[:, :, 2 * w.start : 2 * w.stop])


def _planted(
    config: StreamConfig, tokens: int, levels: Iterable[float]
) -> tuple[list[np.ndarray], StreamState]:
    """The chunks a buffered stream of ``tokens`` tokens, all sampled, assembles when S3Gen gives
    each window a steady wave at the next of ``levels``: as many windows as there are levels, or
    every window there is, whichever ends first."""
    state = StreamState(StreamReport("buffered"))
    state.tokens.extend(range(tokens))
    cutter, s3gen = BufferedCutter(config, state), types.SimpleNamespace(trim_fade=torch.zeros(0))
    chunks = []
    for level in levels:
        if (w := cutter.next_window(False)) is None:
            break
        wav = np.full((w.stop - w.start) * SAMPLES_PER_TOKEN, level, np.float32)
        chunks.append(cutter.assemble(w, wav, torch.zeros(0), s3gen))
    return chunks, state


def test_the_length_difference_is_the_streams_samples_less_the_one_shots() -> None:
    """Positive where the stream is longer than the one-shot call, negative where shorter (every
    stream tested before was as long as its one-shot call, so no test held the sign)."""
    reference = np.sin(np.arange(960, dtype=np.float32))
    state = StreamState(StreamReport("buffered"))
    for extra in (40, -40):
        wav = np.sin(np.arange(960 + extra, dtype=np.float32))
        assert quality(wav, reference, state)["length_diff_samples"] == extra


def test_the_crossfade_runs_from_the_previous_window_to_the_next() -> None:
    # Planted: a window of ones, then one of zeros. The blend over the seam falls from the first
    # window's level to the second's (sides swapped, it would rise from 0 to 1 and click twice).
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2)
    chunks, state = _planted(config, 40, (1.0, 0.0))
    assert len(chunks) == 2
    wav = np.concatenate(chunks)
    [(lo, hi)] = state.crossfades
    blend = wav[lo:hi]
    assert blend[0] == 1.0 and blend[-1] == 0.0 and np.all(np.diff(blend) <= 0)
    assert np.all(wav[:lo] == 1.0) and not wav[hi:].any()
    # Two windows of ones: the two ramps sum to one at every sample, so a steady sound passes the
    # seam unchanged (the incoming window weighted by the outgoing ramp dipped to 0 and rose to 2).
    chunks, state = _planted(config, 40, (1.0, 1.0))
    assert len(chunks) == 2
    [(lo, hi)] = state.crossfades
    assert np.allclose(np.concatenate(chunks)[lo:hi], 1.0, atol=1e-6)


def test_an_odd_crossfade_length_loses_no_sample() -> None:
    """A crossfade of 20.0417 ms is 481 samples: rounded to an even count it splits around each
    seam, and the stream is exactly its tokens' samples (an odd one lost a sample a seam)."""
    config = StreamConfig("buffered", first_window_s=0.6, window_s=1.2, crossfade_ms=20.0417)
    assert config.crossfade_samples % 2 == 0
    chunks, _ = _planted(config, 100, itertools.repeat(1.0))
    assert len(chunks) >= 3 and sum(map(len, chunks)) == 100 * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("first_window_s", [0.1, 1.0])  # 2 tokens (< the 4 of left context), 25
def test_a_compiled_estimator_sees_two_window_shapes(first_window_s: float) -> None:
    # Before, with a first window shorter than the left context the second window had less of
    # it than the later ones and was padded to a shape of its own: three shapes to compile.
    config = StreamConfig("buffered", first_window_s=first_window_s)
    _, windows = _all_windows(config, StreamState(StreamReport("buffered")), tokens=1000)
    assert len(windows) >= 5
    assert all(w.stop - w.start <= w.regular for w in windows)  # padded, never cut
    assert len({w.regular for w in windows}) == 2
    assert windows[0].regular == config.first_window_tokens + config.lookahead_tokens


def test_run_to_files_notes_a_token_cap_only_when_it_ended_the_generation(
    tts: ChatterboxTTS, steer: type[Steer], tmp_path: Path
) -> None:
    stop = tts.t3.hp.stop_speech_token
    with shadow(tts.t3.speech_head, "forward", steer({30: stop})):
        report = run_to_files(tts, TEXT, StreamConfig("naive"), tmp_path, max_new_tokens=60)
    assert len(report["speech_tokens"]) < 30  # it stopped (some of the 29 ids are invalid)
    assert "no stop token" not in report["note"] and "never" not in report["note"]
    assert report["note"] == "ended by the stop token at token 30"
    assert (report["environment"]["model"], report["environment"]["device"]) == ("unnamed", "cpu")
    busy = {**report, "environment": {**report["environment"], "load_average_1m": 9.0, "cpu_count": 2}}
    assert "the machine was busy: load average 9.0" in format_report(busy)
    assert "the machine was busy" not in format_report({**report, "environment": {}})
    # capped, a trained model's stream is told to raise --tokens, not blamed on random weights
    capped = run_to_files(tts, TEXT, StreamConfig("naive"), tmp_path, max_new_tokens=8, model="pretrained")
    assert (
        capped["note"] == "no stop token within 8 tokens (the speech may be cut short before its stop "
        "token: raise --tokens)"
    )


def test_a_stream_of_one_window_is_reported_identical_to_one_shot_in_its_json(
    tts: ChatterboxTTS, tmp_path: Path
) -> None:
    # Before, its SNR of inf was written as null in `stream --json`, as "nothing to compare" is:
    # the exact match could not be told from a stream without audio.
    report = run_to_files(tts, TEXT, StreamConfig("buffered"), tmp_path, max_new_tokens=20)
    assert report["summary"]["chunks"] == 1
    written = json.loads(json.dumps(finite(report), allow_nan=False))["quality_vs_one_shot"]
    assert written["snr_db"] is None and written["identical_to_one_shot"] is True


def test_a_stream_that_keeps_no_speech_token_is_reported_not_a_crash(
    tts: ChatterboxTTS, steer: type[Steer], tmp_path: Path
) -> None:
    # The stop token first: no token to vocode. Before, the one-shot yardstick ran S3Gen on no
    # token and HiFT failed ("Kernel size can't be greater than actual input size"), so the
    # `stream` command crashed; the empty waveform's seam metric warned ("Mean of empty slice").
    stop = tts.t3.hp.stop_speech_token
    state = StreamState(StreamReport("buffered"))
    with shadow(tts.t3.speech_head, "forward", steer({1: stop})):
        assert list(stream(tts, TEXT, StreamConfig("buffered"), max_new_tokens=20, state=state)) == []
    with shadow(tts.t3.speech_head, "forward", steer({1: stop})):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            report = run_to_files(tts, TEXT, StreamConfig("buffered"), tmp_path, max_new_tokens=20)
    assert state.tokens == [] and one_shot(tts, state, StreamConfig()).shape == (0,)
    assert report["speech_tokens"] == [] and report["summary"]["chunks"] == 0
    quality = {"seam_max_over_median": None, "ordinary_max_over_median": 0.0, "snr_db": None,
               "identical_to_one_shot": False}  # fmt: skip
    assert report["quality_vs_one_shot"] == {**quality, "length_diff_samples": 0}
    assert report["note"] == "ended by the stop token at token 1"
    assert "buffered: no audio (T3 kept no speech token)" in format_report(report)
    # `stream --json`: no first audio is inf in the report, null in the JSON (Infinity is no JSON)
    assert report["summary"]["ttfa_s"] == math.inf
    assert json.loads(json.dumps(finite(report), allow_nan=False))["summary"]["ttfa_s"] is None


def test_naive_wall_time_covers_t3_after_its_last_chunk(tts: ChatterboxTTS, steer: type[Steer]) -> None:
    # 22 valid tokens make the one chunk, then only invalid ids up to the cap: T3's work after
    # the chunk is in t3_s. Before, wall_s stopped at the chunk and the RTF left that work out.
    # The phases run one after another inside the stream: their sum cannot exceed its wall.
    cap = 80
    edits = {**{call: 1 for call in range(1, 23)}, **dict.fromkeys(range(23, cap + 1), SPEECH_VOCAB_SIZE)}
    state = StreamState(StreamReport("naive"))
    with shadow(tts.t3.speech_head, "forward", steer(edits)):
        for _ in stream(tts, TEXT, StreamConfig("naive", chunk_tokens=22), max_new_tokens=cap, state=state):
            pass
    s = state.report.summary()
    assert s["chunks"] == 1 and state.report.t3_after_s > 0
    assert s["wall_s"] >= s["t3_s"] + s["flow_s"] + s["vocoder_s"] - 1e-9
    assert s["rtf"] == s["wall_s"] / s["audio_s"]


@pytest.mark.parametrize("failing", ["wav", "timeline"])
def test_run_to_files_leaves_no_half_written_file(
    failing: str, tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before: a write that failed half way left its file under the real name)"""
    import soundfile

    def half_written(path: Path, *_a: object, **_k: object) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    if failing == "wav":
        monkeypatch.setattr(soundfile, "write", half_written)
    else:
        monkeypatch.setattr(Figure, "savefig", lambda _fig, path, **_k: half_written(path))
    with pytest.raises(OSError, match="No space left"):
        run_to_files(tts, TEXT, StreamConfig("naive"), tmp_path, max_new_tokens=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if failing == "wav" else ["naive.wav"])


def test_a_voice_the_model_cannot_speak_is_refused_before_t3_runs(tts: ChatterboxTTS) -> None:
    """Before, another model size's voice failed at T3's first step with torch's "shape '[-1,
    256]' is invalid for input of size 7", a reference's path with Python's AttributeError."""
    narrow = copy.copy(tts.conds)
    narrow.t3 = copy.copy(tts.conds.t3)
    narrow.t3.speaker_emb = torch.zeros(1, 7)
    wrong = [(narrow, r"do not fit this model: t3\.speaker_emb is width 7"), ("r.wav", r"str \(no voice\)")]
    for conds, message in wrong:
        for call in (stream, stream_tokens):
            with pytest.raises(SourceError, match=rf"{message}.*prepare_conditionals\(reference_wav\)"):
                next(iter(call(tts, "Hi.", conds=conds)))


def test_no_voice_names_what_each_caller_takes() -> None:
    """``stream`` and ``stream_tokens`` take a prepared voice (``conds=``), ``one_shot`` the state's,
    the wrapper's T3-only and S3Gen-only calls none: before, each asked for an ``audio_prompt_path``
    none of them takes."""
    bare = load_model("tiny")
    for call in (lambda: list(stream(bare, "Hi.", max_new_tokens=4)), lambda: stream_tokens(bare, "Hi.")):
        with pytest.raises(NoVoiceError, match=r"prepare_voice\(tts, wav\).*or pass conds=") as refused:
            call()
        assert "audio_prompt_path" not in str(refused.value)
    # one_shot takes no conds: it speaks the state's voice (before, it too asked for conds=)
    with pytest.raises(NoVoiceError, match=r"state\.voice.*prepare_voice\(tts, wav\)") as refused:
        one_shot(bare, StreamState(StreamReport("buffered")), StreamConfig())
    assert "conds=" not in str(refused.value)
    with PerformanceOptimizedTTS(bare, policy="float32") as opt:
        calls = (lambda: opt.speech_tokens("Hi."), lambda: opt.vocode(torch.zeros(1, 4, dtype=torch.long)),
                 lambda: opt.prefill_length("Hi."))  # fmt: skip
        for call in calls:
            with pytest.raises(NoVoiceError, match=r"prepare_conditionals\(wav\) first$") as refused:
                call()
            assert "audio_prompt_path" not in str(refused.value)
