"""Serving without Ray: OpenAI's request checks, the audio bytes, and the FastAPI app over one
speech service (FastAPI's test client, in this process); the command line's refusals, which
come before any Ray starts. The real server on Ray Serve is tests/test_serve_ray.py."""

from __future__ import annotations

import asyncio
import copy
import gc
import io
import json
import socket
import struct
import threading
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect, Request

import tts_workbench.runtime.engine as engine_module
import tts_workbench.serving.service as service_module
from conftest import VOICE_S, with_short_voices
from tts_workbench.core.errors import CacheError, ConfigError, SourceError
from tts_workbench.core.families import spoken_languages
from tts_workbench.core.ports import free_port
from tts_workbench.interface.cli import main
from tts_workbench.models import vocode
from tts_workbench.models.checkpoints import save_checkpoint
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.decode import prefill_length
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.serving.api import speech_app, unless_gone
from tts_workbench.serving.protocol import (
    Limits,
    RequestError,
    SpeechRequest,
    check_cache,
    parse_speech,
    pcm16,
    wav_header,
)
from tts_workbench.serving.service import (
    ServeOptions,
    SpeechService,
    SpeechStream,
    check_options,
    find_voices,
)
from tts_workbench.studies.http_load import _stream

REFUSED = {"replica": "0", "outcome": "refused"}  # the fixture's service is replica "0"
LIMITS = Limits("chatterbox-tiny", ("default", "alice"), max_input_chars=50, max_tokens=300)
# response_format is required: OpenAI's default, mp3 (openai-python leaves the field out), is not served
GOOD = {"model": "chatterbox-tiny", "input": "Hello there.", "response_format": "pcm"}
NO_FORMAT = {k: v for k, v in GOOD.items() if k != "response_format"}  # as openai-python sends it


# Remedies the messages name, as LIMITS makes them; the fields are protocol.FIELDS in order.
VOICE_FIX = "use one of default, alice"
FIELDS_FIX = (
    "the fields are model, input, voice, response_format, speed, stream_format, instructions, "
    "seed, max_tokens, language"
)


@pytest.mark.parametrize(
    ("change", "param", "status", "fix"),
    [
        ({"model": "tts-1"}, "model", 404, "use 'chatterbox-tiny' (GET /v1/models)"),
        ({"model": None}, "model", 400, 'send "model": "chatterbox-tiny"'),
        ({"input": ""}, "input", 400, "give the text to speak as a non-empty string"),
        ({"input": "   "}, "input", 400, "give the text to speak as a non-empty string"),
        ({"input": None}, "input", 400, "give the text to speak as a non-empty string"),
        ({"input": "x" * 51}, "input", 400, "split the text and send the parts as separate requests"),
        # a lone surrogate: JSON allows its escape
        ({"input": "hi \ud800 there"}, "input", 400, "as UTF-8, without lone surrogate escapes"),
        ({"voice": "bob"}, "voice", 400, VOICE_FIX),  # OpenAI answers an invalid voice with 400
        ({"voice": "../alice"}, "voice", 400, VOICE_FIX),  # a voice is a name, never a path
        ({"voice": ["alice"]}, "voice", 400, VOICE_FIX),
        ({"voice": ""}, "voice", 400, VOICE_FIX),  # no voice of that name: not the default
        ({"voice": None}, "voice", 400, "leave it out (the default voice) or send one of default, alice"),
        ({"response_format": "mp3"}, "response_format", 400, "use pcm or wav"),
        ({"response_format": ["pcm"]}, "response_format", 400, "use pcm or wav"),
        ({"speed": 1.25}, "speed", 400, "leave it out or send 1.0"),
        ({"speed": "fast"}, "speed", 400, "leave it out or send 1.0"),
        ({"stream_format": "sse"}, "stream_format", 400, "only 'audio' (raw audio bytes) is served"),
        ({"instructions": "cheerful"}, "instructions", 400, "leave them out"),
        # before 2026-12-04 any falsy value passed
        ({"instructions": False}, "instructions", 400, "leave them out"),
        ({"instructions": []}, "instructions", 400, "leave them out"),
        ({"seed": -1}, "seed", 400, "an integer from 0 to 2**63 - 1"),
        ({"seed": 2**64}, "seed", 400, "an integer from 0 to 2**63 - 1"),
        # of another type: a string, a float or a bool is no seed (JSON's true would pass as 1)
        ({"seed": "5"}, "seed", 400, "an integer from 0 to 2**63 - 1"),
        ({"seed": 1.5}, "seed", 400, "an integer from 0 to 2**63 - 1"),
        ({"seed": True}, "seed", 400, "an integer from 0 to 2**63 - 1"),
        ({"seed": None}, "seed", 400, "an integer from 0 to 2**63 - 1"),
        ({"max_tokens": 0}, "max_tokens", 400, "an integer from 1 to 300"),
        ({"max_tokens": 301}, "max_tokens", 400, "an integer from 1 to 300"),
        ({"max_tokens": True}, "max_tokens", 400, "an integer from 1 to 300"),
        ({"temperature": 0.5}, "temperature", 400, FIELDS_FIX),  # not a field: the message lists them
        # whether the model speaks it is the service's check (below): only its type here
        ({"language": 5}, "language", 400, 'a language code such as "fr", got 5'),
        ({"language": " "}, "language", 400, 'a language code such as "fr", got'),
    ],
)
def test_each_bad_field_is_named_with_its_fix(
    change: dict[str, object], param: str, status: int, fix: str
) -> None:
    with pytest.raises(RequestError) as e:
        parse_speech({**GOOD, **change}, LIMITS)
    assert e.value.param == param and e.value.status == status
    body = e.value.body()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error" and param in body["message"]
    assert fix in body["message"], body["message"]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": "Hello"}, "model", 'model is missing: send "model": "chatterbox-tiny"'),
        ({**GOOD, "model": None}, "model", 'model is missing: send "model": "chatterbox-tiny"'),
        ({**GOOD, "voice": None}, "voice", "voice is null: leave it out (the default voice) or send one of"),
    ],
)
def test_a_missing_model_or_voice_says_what_to_send(body: dict[str, object], param: str, says: str) -> None:
    """(before: "model None is not served here", "unknown voice None")"""
    with pytest.raises(RequestError) as e:
        parse_speech(body, LIMITS)
    assert e.value.param == param and says in str(e.value), str(e.value)


@pytest.mark.parametrize("fmt", [{}, {"response_format": None}])
def test_a_request_without_response_format_is_refused_not_sent_pcm(fmt: dict[str, object]) -> None:
    """OpenAI's default is mp3, and openai-python leaves the field out unless it is set: the
    answer says to send pcm or wav (before: raw pcm, which ``write_to_file("x.mp3")`` saved)."""
    body = {**NO_FORMAT, **fmt}
    with pytest.raises(RequestError) as e:
        parse_speech(body, LIMITS)
    assert e.value.param == "response_format" and e.value.status == 400
    assert "OpenAI's default is mp3" in str(e.value) and 'send "pcm"' in str(e.value), str(e.value)


def test_the_example_body_of_a_refusal_is_one_the_server_takes() -> None:
    """(before: a body that is not an object was told to send one without response_format,
    which is refused since that field is required)"""
    with pytest.raises(RequestError) as e:
        parse_speech(["x"], LIMITS)
    example = json.loads(str(e.value).split("such as ", 1)[1].replace("...", f'"{LIMITS.model}"'))
    assert parse_speech(example, LIMITS).response_format == "pcm"


def test_an_unknown_model_is_openais_model_not_found() -> None:
    """(before: "code": null, where OpenAI's 404 says "model_not_found")"""
    with pytest.raises(RequestError) as e:
        parse_speech({**GOOD, "model": "tts-1"}, LIMITS)
    assert e.value.status == 404 and e.value.body()["error"]["code"] == "model_not_found"
    with pytest.raises(RequestError) as e:  # not a name at all: a malformed field, no code
        parse_speech({**GOOD, "model": 5}, LIMITS)
    assert e.value.status == 400 and e.value.body()["error"]["code"] is None


def test_a_good_request_gets_the_defaults() -> None:
    req = parse_speech({**GOOD, "voice": "alice", "speed": 1.0, "response_format": "wav"}, LIMITS,
                       default_tokens=40)  # fmt: skip
    assert (req.input, req.voice, req.response_format, req.seed, req.max_tokens, req.language) == (
        "Hello there.", "alice", "wav", 0, 40, None,
    )  # fmt: skip
    assert parse_speech({**GOOD, "language": "fr"}, LIMITS).language == "fr"
    with pytest.raises(RequestError, match="JSON object"):
        parse_speech(["not", "an", "object"], LIMITS)


def test_pcm_and_the_streamed_wav_header() -> None:
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0], dtype=np.float32)
    pcm = pcm16(samples)
    assert np.frombuffer(pcm, "<i2").tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]
    header = wav_header()
    assert len(header) == 44
    # byte rate and block align, which the wave module reads past: 2 bytes a frame, 24000 frames a second
    assert struct.unpack("<IH", header[28:34]) == (24000 * 2, 2)
    with wave.open(io.BytesIO(header + pcm)) as w:  # a player reads to the end of what came
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.readframes(100) == pcm


def test_the_seed_and_the_cache_are_refused_at_their_edges() -> None:
    """The largest seed the message names is taken and the next refused; a prompt that leaves
    room for exactly one token is told ``max_tokens <= 1``, not to shorten its input."""
    assert parse_speech({**GOOD, "seed": 2**63 - 1}, LIMITS).seed == 2**63 - 1
    with pytest.raises(RequestError, match=r"from 0 to 2\*\*63 - 1, got 9223372036854775808") as e:
        parse_speech({**GOOD, "seed": 2**63}, LIMITS)
    assert e.value.param == "seed"
    cache = 1024
    check_cache(cache, 1, cache)  # the prompt fills the cache: its one token is never fed back
    with pytest.raises(RequestError, match="send max_tokens <= 1$") as e:
        check_cache(cache, 2, cache)
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError, match="shorten the input") as e:
        check_cache(cache + 1, 1, cache)
    assert e.value.param == "input"


@pytest.fixture(scope="module", autouse=True)
def _short_default_voice() -> Iterator[None]:
    """The services here make their default voice ``VOICE_S`` long, not 10 s."""
    with pytest.MonkeyPatch.context() as patch:
        with_short_voices(service_module, patch)
        yield


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpeechService]:
    voices = tmp_path_factory.mktemp("voices")
    make_reference_wav(voices / "alice.wav", seconds=VOICE_S, seed=1)
    (voices / "notes.txt").write_text("not a voice")
    options = ServeOptions(voices_dir=str(voices), run_dir=str(tmp_path_factory.mktemp("run")), max_streams=2)
    service = SpeechService(options)
    yield service
    service.close()


def test_a_request_the_cache_cannot_hold_names_the_field_to_change(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the API's terms (max_tokens, not the engine's max_new_tokens nor the operator's fix),
    counted with the voice the request names, before anything is submitted."""
    # The count from each voice's positions at start-up and the text's tokens is prefill_length's
    # (punc_norm's rewrites included: "…" becomes ", ").
    for voice, conds in service.voices.items():
        voiced = copy.copy(service.tts)
        voiced.conds = conds
        for text in (GOOD["input"], "a…" * 9, "Short"):
            assert service.prefill_positions(voice, text) == prefill_length(voiced, text, 0.0), (voice, text)
    refused = service.registry.get_sample_value("tts_streams_total", REFUSED) or 0.0
    prefill = prefill_length(service.tts, GOOD["input"])
    room = service.options.max_cache_len - prefill + 1  # the last token is never fed back
    with TestClient(speech_app(service)) as client:
        r = client.post("/v1/audio/speech", json={**GOOD, "voice": "alice", "max_tokens": room + 1})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "max_tokens", error
        assert f"max_tokens <= {room}" in error["message"], error
        assert "max_new_tokens" not in error["message"] and "start the engine" not in error["message"]
        # An input within --max-input-chars whose positions alone fill the cache: punc_norm writes
        # each "…" as ", ", 1.5 positions a character where "a" alone (the startup check) takes one.
        long = "a…" * (service.options.max_input_chars // 2)
        r = client.post("/v1/audio/speech", json={**GOOD, "input": long, "max_tokens": 1})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "input", error
        assert "shorten the input" in error["message"] and "max_new_tokens" not in error["message"]
        # The named voice's positions count: a voice whose conditioning filled the cache refuses
        # the input that fits the default voice.
        monkeypatch.setitem(service.voice_positions, "alice", service.options.max_cache_len)
        r = client.post("/v1/audio/speech", json={**GOOD, "voice": "alice", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        assert service.engine.active() == 0 and service.engine.queued() == 0  # nothing was submitted
    assert service.registry.get_sample_value("tts_streams_total", REFUSED) == refused + 3


def test_the_app_refuses_bad_requests_and_goes_on_serving(service: SpeechService) -> None:
    disconnected = {"replica": "0", "outcome": "disconnected"}
    left = service.registry.get_sample_value("tts_streams_total", disconnected)
    with TestClient(speech_app(service)) as client:
        (entry,) = client.get("/v1/models").json()["data"]
        assert entry["id"] == "chatterbox-tiny" and entry["languages"] == ["en"]
        assert entry["voices"] == list(service.voices) and "default" in entry["voices"]
        bad = [
            (b"{not json", None, 400),
            (b"[" * 20_000 + b"]" * 20_000, None, 400),  # nested deeper than the stack
            (b'{"seed": ' + b"1" * 5000 + b"}", None, 400),  # an integer past Python's 4300 digits
            (b'{"model": "chatterbox-tiny", "input": "hi \\ud800"}', "input", 400),  # a lone surrogate
            # ... as a field's name, echoed as param (before 2026-12-04 a plain-text 500: UTF-8 had no room)
            (b'{"model": "chatterbox-tiny", "input": "hi", "\\ud800": 1}', "\ud800", 400),
            ({"model": "chatterbox-tiny"}, "input", 400),
            ({**GOOD, "input": "x" * 1001}, "input", 400),
            ({**GOOD, "voice": "bob"}, "voice", 400),
            ({**GOOD, "model": "tts-1"}, "model", 404),
            ({**GOOD, "response_format": "opus"}, "response_format", 400),
            (NO_FORMAT, "response_format", 400),
            ({**GOOD, "speed": 2.0}, "speed", 400),
            ({**GOOD, "language": "fr"}, "language", 400),  # the standard model speaks English only
        ]
        for body, param, status in bad:
            if isinstance(body, bytes):
                r = client.post("/v1/audio/speech", content=body)
            else:
                r = client.post("/v1/audio/speech", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param, r.json()
            assert r.json()["error"]["code"] == ("model_not_found" if status == 404 else None), r.json()
            assert r.headers["x-replica"] == "0"
        spoken: dict[str, bytes] = {}
        for voice in ("default", "alice"):  # and it still serves, each voice its own
            r = client.post("/v1/audio/speech", json={**GOOD, "voice": voice, "max_tokens": 20})
            assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
            assert len(r.content) > 0 and len(r.content) % 2 == 0
            spoken[voice] = r.content
        # the same text and seed: a voice the request named but the stream ignored would be the default's
        assert spoken["alice"] != spoken["default"]
        r = client.post("/v1/audio/speech", json={**GOOD, "response_format": "wav", "max_tokens": 20})
        assert r.content[:4] == b"RIFF" and r.headers["content-type"] == "audio/wav"
        # a header of another rate would play the same samples at the wrong pitch and speed
        with wave.open(io.BytesIO(r.content)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            assert w.readframes(len(r.content)) == spoken["default"]  # the pcm answer's samples, after it
        health = client.get("/health").json()
        assert health["active_streams"] == 0 and health["queued_streams"] == 0
        metrics = client.get("/metrics").text
        # Admission held: a stream submitted now waits, none is active (the two counts told apart)
        with service.engine.together():
            held = service.engine.submit(GOOD["input"], max_new_tokens=1)
            health, waiting = client.get("/health").json(), client.get("/metrics").text
            held.close()
        assert (health["active_streams"], health["queued_streams"]) == (0, 1), health
        assert health["streams_fit"] == health["max_streams"] == 2, health  # no step ran out of memory
        assert 'tts_active_streams{replica="0"} 0.0' in waiting
        assert 'tts_streams_fit{replica="0"} 2.0' in waiting
        assert 'tts_queued_streams{replica="0"} 1.0' in waiting
        # An engine that stopped: /health says so with 503 (Ray Serve's own check replaces the
        # replica), and a request gets OpenAI's error body, not a bare 500.
        service.engine.close()
        stopped = client.get("/health")
        assert stopped.status_code == 503 and stopped.json()["reason"] == "the engine is closed"
        r = client.post("/v1/audio/speech", json={**GOOD, "max_tokens": 10})
        error = r.json()["error"]
        assert r.status_code == 503 and error["type"] == "server_error"
        assert "retry the request: this replica's /health answers 503" in error["message"], error
    assert 'tts_streams_total{outcome="completed",replica="0"} 3.0' in metrics
    assert 'tts_time_to_first_audio_seconds_count{replica="0"} 3.0' in metrics
    assert 'tts_stream_rtf_count{replica="0"} 3.0' in metrics  # each completed stream's RTF
    # each counted once, as it ended: the response's close of a finished stream is no disconnect
    assert service.registry.get_sample_value("tts_streams_total", disconnected) == left
    assert 'tts_active_streams{replica="0"} 0.0' in metrics and "tts_s3gen_flow_calls_total" in metrics
    assert service.voices["alice"] is not service.voices["default"]


def test_a_stalled_engine_answers_503_and_fails_rays_health_check(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before 2026-12-04 /health asked only whether the engine ran: a stage hung on one step or
    flow call (the engine's ``stalled``, tested in test_engine.py) answered "ok" for ever."""
    from tts_workbench.serving.deployment import SpeechDeployment  # imports Ray

    asked: list[float] = []

    def stalled(after_s: float) -> str:
        asked.append(after_s)
        return "the t3 stage has been on a decode step of 2 stream(s) for 301 s (more than 300 s): it hangs"

    engine = SimpleNamespace(stop_reason=None, stalled=stalled, counts=lambda: (0, 2), max_streams=2, fits=2)
    monkeypatch.setattr(service, "engine", engine)
    with TestClient(speech_app(service)) as client:
        r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "stalled" and "t3 stage" in r.json()["reason"]
    with pytest.raises(RuntimeError, match="^stalled: the t3 stage has been on a decode step"):
        SpeechDeployment.check_health(SimpleNamespace(service=service))  # type: ignore[arg-type]
    assert asked and set(asked) == {service.options.stall_s}
    with pytest.raises(ConfigError, match="argument --stall-s: must be a positive number"):
        check_options(ServeOptions(stall_s=0.0))


def test_flow_batches_past_max_streams_are_refused_before_ray() -> None:
    """No call fills more windows than there are streams (before 2026-12-06: a compiled shape no
    call filled)."""
    with pytest.raises(ConfigError, match="argument --flow-batches: .*--max-streams \\(8\\)"):
        check_options(ServeOptions(flow_batches=(1, 64), max_streams=8))
    check_options(ServeOptions(flow_batches=(1, 8), max_streams=8))


def test_a_stream_that_fails_to_start_says_to_retry_and_logs_its_traceback(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine runs but this stream failed: a 500 whose message says what to do, the cause in
    the replica's log (before 2026-12-05 the message said only what happened, and nothing was logged:
    the app's handler turns the error into the answer)."""
    import asyncio

    def submit(*_args: object, **_kwargs: object) -> None:
        raise ValueError("no room for this stream")

    engine = SimpleNamespace(submit=submit, running=True, max_cache_len=service.options.max_cache_len)
    monkeypatch.setattr(service, "engine", engine)
    with pytest.raises(RequestError) as e:
        asyncio.run(service.speech(parse_speech(GOOD, service.limits)))
    assert e.value.status == 500 and e.value.param is None
    assert str(e.value) == (
        "the engine could not start this stream: ValueError: no room for this stream: retry the request; "
        "if it fails again, the replica's log has the traceback"
    )
    [record] = [r for r in caplog.records if r.name == "tts_workbench.serving.service"]
    assert record.exc_info is not None and record.exc_info[1] is e.value.__cause__


def test_a_cache_refusal_the_check_did_not_foresee_names_the_input(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's CacheError is the request's: a 400 naming input, the field a client can change
    (param null would leave it guessing), counted refused."""

    def submit(*_args: object, **_kwargs: object) -> None:
        raise CacheError("the request needs 1100 cache positions, the cache holds 1024")

    engine = SimpleNamespace(submit=submit, running=True, max_cache_len=service.options.max_cache_len)
    monkeypatch.setattr(service, "engine", engine)
    refused = service.registry.get_sample_value("tts_streams_total", REFUSED) or 0.0
    with pytest.raises(RequestError) as e:
        asyncio.run(service.speech(parse_speech(GOOD, service.limits)))
    assert (e.value.status, e.value.param) == (400, "input"), str(e.value)
    assert str(e.value).startswith("the engine refused this request: the request needs 1100"), str(e.value)
    assert service.registry.get_sample_value("tts_streams_total", REFUSED) == refused + 1
    # the same error from an engine that has stopped (a stage that died with it fails every
    # stream): the replica's failure, a 503 as /health answers, not this request's 400
    failed = (
        service.registry.get_sample_value("tts_streams_total", {"replica": "0", "outcome": "failed"}) or 0.0
    )
    monkeypatch.setattr(engine, "running", False)
    with pytest.raises(RequestError) as e:
        asyncio.run(service.speech(parse_speech(GOOD, service.limits)))
    assert e.value.status == 503 and "/health answers 503" in str(e.value), str(e.value)
    assert service.registry.get_sample_value("tts_streams_total", REFUSED) == refused + 1
    assert (
        service.registry.get_sample_value("tts_streams_total", {"replica": "0", "outcome": "failed"})
        == failed + 1
    )


def test_every_metric_names_its_replica(service: SpeechService) -> None:
    """Through Ray Serve's proxy each scrape answers one replica, so a series without the replica
    label would jump between replicas' counts; running counts are counters a scraper can rate
    (before: only tts_replica_info named the replica, tokens sampled was a gauge and the batch
    fill a lifetime average)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(service.metrics_text().decode())}
    counters = ("tts_t3_tokens_sampled", "tts_s3gen_windows", "tts_s3gen_flow_calls",
                "tts_s3gen_vocoder_calls", "tts_streams", "tts_streams_preempted")  # fmt: skip
    assert {name: families[name].type for name in counters} == dict.fromkeys(counters, "counter")
    assert "tts_s3gen_windows_per_flow_call" not in families
    samples = [sample for family in families.values() for sample in family.samples]
    assert samples and all(sample.labels.get("replica") == service.replica for sample in samples), samples


def test_the_engines_counters_read_its_counts(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the engine's counters is its own count, set apart here (one stream's windows and
    flow calls are equal: a series reading the other's count would pass a real run)."""
    counts = {
        "tts_t3_tokens_sampled_total": ("t3_tokens", 11),
        "tts_s3gen_windows_total": ("flow_windows", 7),
        "tts_s3gen_flow_calls_total": ("flow_calls", 5),
        "tts_s3gen_vocoder_calls_total": ("vocoder_calls", 4),
        "tts_streams_preempted_total": ("preempted", 3),
    }
    for field, value in counts.values():
        monkeypatch.setattr(service.engine.stats, field, value)
    read = {name: service.registry.get_sample_value(name, {"replica": "0"}) for name in counts}
    assert read == {name: float(value) for name, (_field, value) in counts.items()}


def test_a_completed_streams_rtf_is_its_wall_time_over_its_audio_time(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 s of wall time to its last chunk for 4 s of audio: an RTF of 0.25, however long the
    client then took to read the body (before 2026-12-07 the clock ran to the client's last read:
    a player reading at its own pace made the server look as slow as playback). The engine's
    stream is a stand-in that ends at once, submitted 0.25 s after the request's checks began."""
    monkeypatch.setattr("tts_workbench.serving.service.time", SimpleNamespace(perf_counter=lambda: 110.0))

    async def ended() -> AsyncIterator[Any]:
        return
        yield  # an async generator that yields nothing

    handle = SimpleNamespace(report=SimpleNamespace(audio_s=4.0, wall_s=0.75), submitted=100.25, capped=False)
    stream = SpeechStream(service, handle, ended(), [], t0=100.0)  # type: ignore[arg-type]

    series = [("sum", {}), ("bucket", {"le": "0.1"}), ("bucket", {"le": "0.25"})]

    def rtf() -> list[float]:
        """The histogram's sum, and its counts at or under 0.1 and 0.25."""
        get = service.registry.get_sample_value
        return [get(f"tts_stream_rtf_{name}", {"replica": "0", **le}) or 0.0 for name, le in series]

    before = rtf()

    async def read() -> list[bytes]:
        return [chunk async for chunk in stream]

    assert asyncio.run(read()) == [] and stream.outcome == "completed"
    added = [now - then for now, then in zip(rtf(), before, strict=True)]
    assert added == [pytest.approx(0.25), 0.0, 1.0]


def test_the_cache_check_runs_off_the_event_loop(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting a request's positions tokenizes it and, on CUDA, copies the tokens to the device,
    which waits behind the engine's queued GPU work: not on the loop that serves every request."""
    import asyncio
    import threading

    counted_on: list[int] = []

    def filling(_voice: str, _text: str, _language: str | None) -> int:
        counted_on.append(threading.get_ident())
        return service.options.max_cache_len + 1  # no room for a token: refused, nothing submitted

    monkeypatch.setattr(service, "prefill_positions", filling)

    async def ask() -> int:
        with pytest.raises(RequestError, match="shorten the input"):
            await service.speech(parse_speech(GOOD, service.limits))
        return threading.get_ident()

    loop_thread = asyncio.run(ask())
    assert counted_on and counted_on[0] != loop_thread


def test_an_input_past_t3s_text_positions_names_the_input(service: SpeechService) -> None:
    """(before: param null, "the engine refused this request")"""
    import asyncio

    req = SpeechRequest("hello world " * 1500, "default", "pcm", 0, 10)  # past --max-input-chars too
    with pytest.raises(RequestError, match="beyond the 2048 T3 has positions for") as e:
        asyncio.run(service.speech(req))
    assert e.value.param == "input" and e.value.status == 400


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_body_that_is_not_plain_utf8_is_refused(service: SpeechService, encoding: str) -> None:
    """RFC 8259: JSON between systems is UTF-8 without a byte order mark (before: json.loads of
    the bytes guessed UTF-16 and UTF-32 and skipped the BOM, where the docs promise a 400)."""
    body = json.dumps({**GOOD, "max_tokens": 1}).encode(encoding)
    with TestClient(speech_app(service)) as client:
        r = client.post("/v1/audio/speech", content=body)
    assert r.status_code == 400, r.headers["content-type"]  # (a 200's text is audio)
    error = r.json()["error"]
    assert error["param"] is None and "not valid JSON" in error["message"], error


def test_every_refused_speech_request_is_counted(service: SpeechService) -> None:
    """Refusals of the request's parsing count as refused, as the cache's do; an unknown path
    is no speech request (before: only refusals inside service.speech counted)."""
    refused = service.registry.get_sample_value("tts_streams_total", REFUSED) or 0.0
    with TestClient(speech_app(service)) as client:
        bad = [b"{not json", b" " * (service.limits.max_body_bytes + 1)]
        assert [client.post("/v1/audio/speech", content=body).status_code for body in bad] == [400, 413]
        for change in ({"voice": "bob"}, {"model": "tts-1"}, {"response_format": "mp3"}, {"max_tokens": 0}):
            assert client.post("/v1/audio/speech", json={**GOOD, **change}).status_code in (400, 404)
        assert client.post("/v1/audio/speeches", json=GOOD).status_code == 404
        # FastAPI's own pages are not served (docs/serving.md lists four routes; they loaded a CDN)
        assert [client.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [404] * 3
    assert service.registry.get_sample_value("tts_streams_total", REFUSED) == refused + 6


def _speech_scope(length: int | None, spec_version: str = "2.3") -> dict[str, Any]:
    """A raw ASGI scope of ``POST /v1/audio/speech`` with a JSON body of ``length`` bytes (None:
    sent chunked, its length not declared)."""
    size = (
        (b"content-length", str(length).encode())
        if length is not None
        else (b"transfer-encoding", b"chunked")
    )
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/audio/speech", "raw_path": b"/v1/audio/speech",
        "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), size],
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
    }  # fmt: skip


def test_a_client_that_leaves_while_sending_its_body_is_counted_disconnected(service: SpeechService) -> None:
    """Starlette raises ClientDisconnect from the body's stream (before: uncaught, a bare 500
    without x-replica, a traceback in the replica's log and no outcome counted)."""
    import asyncio

    disconnected = {"replica": "0", "outcome": "disconnected"}
    before = service.registry.get_sample_value("tts_streams_total", disconnected) or 0.0
    scope = _speech_scope(40)
    half = [{"type": "http.request", "body": b'{"model": "chatterbox-', "more_body": True}]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return half.pop(0) if half else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(speech_app(service)(scope, receive, send))
    assert service.registry.get_sample_value("tts_streams_total", disconnected) == before + 1
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 499 and (b"x-replica", b"0") in start["headers"], start

    # Behind Ray Serve the proxy cancels the handler instead (its disconnect task wins the race):
    # counted all the same (before: not counted), the cancel let through.
    half = [{"type": "http.request", "body": b'{"model": "chatterbox-', "more_body": True}]
    waiting = asyncio.Event()

    async def receive_then_wait() -> MutableMapping[str, Any]:
        if half:
            return half.pop(0)
        waiting.set()
        await asyncio.sleep(60)  # the rest of the body never comes (cancelled long before)
        raise AssertionError("not cancelled")

    async def cancelled() -> None:
        task = asyncio.ensure_future(speech_app(service)(scope, receive_then_wait, send))
        await asyncio.wait_for(waiting.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    asyncio.run(cancelled())
    assert service.registry.get_sample_value("tts_streams_total", disconnected) == before + 2


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpeechService]:
    """A service of one stream, its engine left running (``service``'s is closed by a test)."""
    service = SpeechService(ServeOptions(run_dir=str(tmp_path_factory.mktemp("run")), max_streams=1))
    yield service
    service.close()


def _client_that_leaves(
    body: bytes,
) -> tuple[Callable[[], Awaitable[MutableMapping[str, Any]]], asyncio.Event]:
    """An ASGI ``receive`` that gives ``body`` whole, then says the client left once the event
    is set (and not before: a server says nothing else meanwhile)."""
    request, gone = [{"type": "http.request", "body": body, "more_body": False}], asyncio.Event()

    async def receive() -> MutableMapping[str, Any]:
        if request:
            return request.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive, gone


@pytest.mark.parametrize("leaves", ["send raises OSError", "in a blocked send", "before the body began"])
def test_a_client_that_leaves_mid_stream_frees_its_stream_and_is_counted_once(
    one_slot: SpeechService, leaves: str
) -> None:
    """Starlette's StreamingResponse never closes its body: when the cancel does not land inside
    it (a send that raises OSError under ASGI 2.4, a cancel in a blocked send under 2.3, a cancel
    before the body's first read), the stream waited for the cyclic GC (before: the engine went
    on decoding for nobody, its slot held, and no outcome counted). The GC is off here, so only
    the app's own close frees it."""
    disconnected = {"replica": "0", "outcome": "disconnected"}
    before = one_slot.registry.get_sample_value("tts_streams_total", disconnected) or 0.0
    body = json.dumps({**MIDWAY, "max_tokens": 900}).encode()  # seconds of decoding on the tiny model
    started: list[int] = []
    oserror = leaves == "send raises OSError"  # ASGI 2.4's way: the server's send raises

    async def scenario() -> None:
        receive, gone = _client_that_leaves(body)

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.append(message["status"])
            kind = "http.response.start" if leaves == "before the body began" else "http.response.body"
            if message["type"] != kind:
                return
            if oserror:
                raise OSError("the client is gone")
            gone.set()  # a slow client's write waits (flow control), then the client goes away
            await asyncio.sleep(3600)

        app = speech_app(one_slot)(_speech_scope(len(body), "2.4" if oserror else "2.3"), receive, send)
        if oserror:
            with pytest.raises(ClientDisconnect):  # Starlette's word for the OSError, to the server
                await asyncio.wait_for(app, 60)
        else:
            await asyncio.wait_for(app, 60)
        assert started == [200]
        for _ in range(100):  # bounded: 5 s
            if one_slot.engine.active() == 0:
                break
            await asyncio.sleep(0.05)
        # checked here: asyncio.run's end closes every async generator left open
        assert one_slot.engine.active() == 0
        assert one_slot.registry.get_sample_value("tts_streams_total", disconnected) == before + 1

    gc.disable()  # the GC would close the stream at a time of its own choosing
    try:
        asyncio.run(scenario())
    finally:
        gc.enable()
    assert one_slot.registry.get_sample_value("tts_streams_total", disconnected) == before + 1  # once


def test_a_client_that_leaves_while_its_next_chunk_is_awaited_is_counted_disconnected(
    one_slot: SpeechService,
) -> None:
    """Ray Serve's proxy cancels the handler of a client that went away: mid-stream the cancel
    lands in the read waiting for the engine's next chunk. The stream is counted disconnected,
    not failed, and its rows freed."""
    engine = one_slot.engine

    def ended(outcome: str) -> float:
        labels = {"replica": "0", "outcome": outcome}
        return one_slot.registry.get_sample_value("tts_streams_total", labels) or 0.0

    before = {outcome: ended(outcome) for outcome in ("disconnected", "failed")}
    req = parse_speech({**MIDWAY, "max_tokens": 900}, one_slot.limits)  # seconds of decoding

    async def scenario() -> None:
        stream = await one_slot.speech(req)
        await anext(stream)  # the first chunk, ready before the engine's next
        for _ in range(1000):  # bounded: a read whose chunk was ready is read on
            reading = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0)  # the read runs until it waits for the engine
            if not reading.done():
                break
            reading.result()
        assert not reading.done()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        for _ in range(100):  # bounded: 5 s (its rows are freed before the engine's next step)
            if engine.active() == 0:
                break
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert engine.active() == 0 and engine.queued() == 0
    counted = {outcome: ended(outcome) - before[outcome] for outcome in before}
    assert counted == {"disconnected": 1.0, "failed": 0.0}


def test_a_client_that_leaves_while_queued_frees_its_place_under_a_plain_asgi_server(
    one_slot: SpeechService,
) -> None:
    """uvicorn says a client left only as an ``http.disconnect`` from ``receive``: the queued
    request is cancelled then, answered 499 and counted disconnected (before: it stayed in the
    queue, to be admitted and decoded up to its first chunk for nobody; here, with admission
    held, the app never answered)."""
    engine = one_slot.engine
    disconnected = {"replica": "0", "outcome": "disconnected"}
    before = one_slot.registry.get_sample_value("tts_streams_total", disconnected) or 0.0
    body = json.dumps({**GOOD, "max_tokens": 40}).encode()
    sent: list[MutableMapping[str, Any]] = []

    async def scenario() -> None:
        receive, left = _client_that_leaves(body)

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        with engine.together():  # admission held: the request waits in the queue
            app = asyncio.ensure_future(speech_app(one_slot)(_speech_scope(len(body)), receive, send))
            for _ in range(200):  # bounded: 10 s
                if engine.queued() == 1:
                    break
                await asyncio.sleep(0.05)
            assert engine.queued() == 1 and not app.done()
            left.set()
            await asyncio.wait_for(app, 10)
            assert engine.queued() == 0 and engine.active() == 0

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 499 and (b"x-replica", b"0") in start["headers"], start
    assert one_slot.registry.get_sample_value("tts_streams_total", disconnected) == before + 1


@pytest.mark.parametrize(
    "client",
    ["stays", "leaves", "cannot be heard", "is cancelled by the server", "leaves as the server cancels"],
)
def test_unless_gone_gives_the_stream_only_to_a_client_still_there(client: str) -> None:
    """The start is cancelled when the client leaves (answered None, the handler's task left with
    no cancel pending), a ``receive`` that raises is no sign of leaving (Ray Serve's proxy puts
    its own failures there: the start is waited for), and the server's own cancel (Ray Serve's
    proxy, for a client that left) passes through, also when the client's leaving is heard at
    the same moment."""
    stream, started, cancelled, handler = object(), asyncio.Event(), [], []

    async def start() -> Any:
        started.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return stream

    async def receive() -> MutableMapping[str, Any]:
        if client == "cannot be heard":
            raise RuntimeError("the proxy's fetch failed")
        if client == "leaves as the server cancels":
            handler[0].cancel()
        elif client != "leaves":
            await asyncio.sleep(60)  # cancelled once the start is done
        return {"type": "http.disconnect"}

    async def handle() -> tuple[Any, int]:
        got = await unless_gone(Request(_speech_scope(0), receive), start())
        task = asyncio.current_task()
        return got, task.cancelling() if task else -1

    async def scenario() -> Any:
        handler.append(asyncio.ensure_future(handle()))
        if client == "is cancelled by the server":
            await asyncio.wait_for(started.wait(), 10)
            handler[0].cancel()
        if client.endswith("by the server") or client.endswith("server cancels"):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(handler[0], 10)
            return "raised"
        got, pending = await asyncio.wait_for(handler[0], 10)
        assert pending == 0  # a cancel of the watcher's own is not left counted against the task
        return got

    got = asyncio.run(scenario())
    assert got == {"stays": stream, "leaves": None, "cannot be heard": stream}.get(client, "raised")
    assert cancelled == ([] if client in ("stays", "cannot be heard") else [True])


def test_a_standard_server_takes_english_asked_for_in_any_case(one_slot: SpeechService) -> None:
    # English is what it speaks: no refusal (another language is, in the test of bad requests)
    with TestClient(speech_app(one_slot)) as client:
        r = client.post("/v1/audio/speech", json={**GOOD, "language": "EN", "max_tokens": 4})
        assert r.status_code == 200 and r.content, r.text


def test_a_multilingual_server_speaks_the_language_a_request_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before 2026-12-07 a request had no language field: a multilingual server spoke English
    only, and ``load --url --language`` was refused)"""
    service = SpeechService(ServeOptions(model="multilingual-tiny", run_dir=str(tmp_path), max_streams=1))
    try:
        asked: list[str | None] = []
        counted: list[str | None] = []  # the language the cache check tokenizes in
        submit, tokens = service.engine.submit, service_module.text_tokens

        def spy(text: str, **kwargs: Any) -> Any:
            asked.append(kwargs["language_id"])
            return submit(text, **kwargs)

        def spelled(tts: Any, text: str, cfg_weight: float = 0.5, language_id: str | None = None) -> Any:
            counted.append(language_id)
            return tokens(tts, text, cfg_weight, language_id)

        monkeypatch.setattr(service.engine, "submit", spy)
        monkeypatch.setattr(service_module, "text_tokens", spelled)
        spoken = {}
        good = {**GOOD, "model": "chatterbox-multilingual-tiny"}
        with TestClient(speech_app(service)) as client:
            # the languages a request may name: those this machine's front ends speak (a client
            # could not tell before 2026-12-07)
            listed = client.get("/v1/models").json()["data"][0]["languages"]
            assert listed == spoken_languages(service.tts) and {"en", "fr"} <= set(listed)
            for language in (" fr ", None):  # (spaces around a code are dropped)
                body = {**good, "max_tokens": 12, **({} if language is None else {"language": language})}
                r = client.post("/v1/audio/speech", json=body)
                assert r.status_code == 200, r.text
                spoken[language] = r.content
            r = client.post("/v1/audio/speech", json={**good, "language": "xx"})  # one it lacks
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "language", r.text
            assert "unsupported language 'xx'" in error["message"], error["message"]
        # each stream in the language its request named (the one refused never reached the engine);
        # the audio cannot tell: the tiny model's random weights sample the same 12 tokens after
        # "[fr]" as after "[en]", one prompt token apart
        assert asked == ["fr", None] and all(spoken.values())
        assert counted == ["fr", None]  # the cache counted in the language the stream speaks
    finally:
        service.close()


def test_the_seed_and_max_tokens_sent_are_the_streams(
    one_slot: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed speaks its own audio, the same each time it is sent, and max_tokens is the stream's
    token limit (a seed left out of the stream gave every request seed 0's audio; max_tokens
    replaced by --tokens, 150 here, or capped at it cut a longer text short)."""
    submitted: list[tuple[object, object]] = []
    submit = one_slot.engine.submit

    def spy(text: str, **kwargs: Any) -> Any:
        submitted.append((kwargs["seed"], kwargs["max_new_tokens"]))
        return submit(text, **kwargs)

    monkeypatch.setattr(one_slot.engine, "submit", spy)
    sent = [(1, 20), (1, 20), (2, 20), (7, 160)]  # (seed, max_tokens); 160: past --tokens
    spoken = []
    with TestClient(speech_app(one_slot)) as client:
        for seed, tokens in sent:
            r = client.post("/v1/audio/speech", json={**GOOD, "seed": seed, "max_tokens": tokens})
            assert r.status_code == 200, r.text
            spoken.append(r.content)
    assert spoken[0] == spoken[1] != spoken[2]
    assert submitted == sent


def test_a_request_without_max_tokens_runs_what_the_cache_holds_after_its_input(
    one_slot: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's default (--tokens) lowered to the room the input leaves, not a 400 naming a
    max_tokens the client never sent (openai-python has no such field); one sent is still held to
    the room. Each stream T3 ends at its cap is counted: random weights never stop, so both."""
    submitted: list[object] = []
    submit = one_slot.engine.submit

    def spy(text: str, **kwargs: Any) -> Any:
        submitted.append(kwargs["max_new_tokens"])
        return submit(text, **kwargs)

    monkeypatch.setattr(one_slot.engine, "submit", spy)
    cache = one_slot.options.max_cache_len
    text = one_slot.prefill_positions("default", GOOD["input"]) - one_slot.voice_positions["default"]
    monkeypatch.setitem(one_slot.voice_positions, "default", cache - text - 11)  # room for 12 tokens
    capped = {"replica": "0"}
    before = one_slot.registry.get_sample_value("tts_streams_capped_total", capped) or 0.0
    with TestClient(speech_app(one_slot)) as client:
        r = client.post("/v1/audio/speech", json=GOOD)
        assert r.status_code == 200 and r.content, r.text
        r = client.post("/v1/audio/speech", json={**GOOD, "max_tokens": 13})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert "max_tokens <= 12" in r.json()["error"]["message"]
        assert client.post("/v1/audio/speech", json={**GOOD, "max_tokens": 5}).status_code == 200
    assert one_slot.options.default_tokens > 12 and submitted == [12, 5]
    assert one_slot.registry.get_sample_value("tts_streams_capped_total", capped) == before + 2


def test_the_largest_max_tokens_advertised_can_be_met(service: SpeechService) -> None:
    """The range in the max_tokens message leaves room for the shortest prompt (before: "from
    1 to 1024", the whole cache, which no prompt leaves)."""
    largest = service.limits.max_tokens
    fewest = min(service.prefill_positions(voice, ".") for voice in service.voices)
    check_cache(fewest, largest, service.options.max_cache_len)  # fits, exactly
    assert parse_speech({**GOOD, "max_tokens": largest}, service.limits).max_tokens == largest  # and is taken
    with pytest.raises(RequestError, match=f"send max_tokens <= {largest}"):
        check_cache(fewest, largest + 1, service.options.max_cache_len)
    with pytest.raises(RequestError, match=f"from 1 to {largest}, got {largest + 1}"):
        parse_speech({**GOOD, "max_tokens": largest + 1}, service.limits)


def _post_counting_reads(
    service: SpeechService, length: int | None, chunks: list[bytes]
) -> tuple[int, dict[bytes, bytes], dict[str, Any], int]:
    """POST ``chunks`` as the body straight to the app (the test client reads a body whole before
    the app runs): the status, headers and JSON body answered, and how many chunks were pulled."""
    sent: list[MutableMapping[str, Any]] = []
    pulled = 0

    async def receive() -> MutableMapping[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):  # read past its end: the client gone, not an IndexError here
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(speech_app(service)(_speech_scope(length), receive, send), 60))
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body), pulled


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(service: SpeechService) -> None:
    """413 in OpenAI's error body, by its declared length before a chunk is pulled or, sent
    chunked, at the chunk that passes the limit, the rest never pulled (before: any body was read
    whole and parsed on the event loop)."""
    limit = service.limits.max_body_bytes
    # The longest input fits, every character escaped (one outside the BMP: a surrogate pair)
    wide = Limits("m", ("default",), max_input_chars=20_000)
    assert wide.max_body_bytes >= len(json.dumps({"input": "\U0001f600" * 20_000}))
    declared = _post_counting_reads(service, limit + 1, [b" " * (limit + 1)])
    # three halves pass the limit; three more follow that a refusal never pulls
    chunked = _post_counting_reads(service, None, [b" " * (limit // 2)] * 6)
    assert (declared[3], chunked[3]) == (0, 3)
    for status, headers, body, _ in (declared, chunked):
        error = body["error"]
        assert status == 413 and error["param"] is None, body
        assert f"at most {limit} bytes" in error["message"] and headers[b"x-replica"] == b"0"
    with TestClient(speech_app(service)) as client:
        at_the_limit = client.post("/v1/audio/speech", content=b" " * (limit - 2) + b"{}")
    assert at_the_limit.status_code == 400 and at_the_limit.json()["error"]["param"] == "model"


def test_an_unknown_path_or_method_gets_openais_error_body(service: SpeechService) -> None:
    """(before: FastAPI's own {"detail": "Not Found"})"""
    with TestClient(speech_app(service)) as client:
        missing = client.post("/v1/audio/speeches", json=GOOD)
        wrong = client.get("/v1/audio/speech")
    assert (missing.status_code, wrong.status_code) == (404, 405) and wrong.headers["allow"] == "POST"
    for r in (missing, wrong):
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None, r.text
        assert "POST /v1/audio/speech" in error["message"] and "GET /metrics" in error["message"]
        assert r.headers["x-replica"] == "0"


def test_a_service_refuses_options_no_request_could_run_with(tmp_path: Path) -> None:
    """A default token count the cache cannot hold, before the model loads; an input limit whose
    longest input leaves no cache position for a token, before the engine is built."""
    # a one-position input and 1024 tokens fill 1024 positions exactly (the last token is not fed back)
    with pytest.raises(ConfigError, match="--tokens: 1025 .* lower --tokens or raise --max-cache-len"):
        SpeechService(ServeOptions(run_dir=str(tmp_path), default_tokens=1025, max_cache_len=1024))
    assert not (tmp_path / "reference.wav").exists()  # refused before the default voice was made
    with pytest.raises(
        ConfigError, match="--max-input-chars: an input of 1000 characters .* --max-cache-len"
    ):
        SpeechService(ServeOptions(run_dir=str(tmp_path), max_input_chars=1000, max_cache_len=1024))
    # room for the default tokens, but not with the shortest prompt (the voice's positions and a
    # text token) before them (before: every request that sent no max_tokens was refused)
    with pytest.raises(ConfigError, match="--tokens: 1000 .* lower --tokens or raise --max-cache-len"):
        SpeechService(ServeOptions(run_dir=str(tmp_path), max_input_chars=10, default_tokens=1000))


def test_a_default_tokens_past_t3s_learned_speech_positions_names_tokens(tmp_path: Path) -> None:
    """(before: the service started, and every request that sent no max_tokens was refused)"""
    with pytest.raises(ConfigError, match="--tokens: 4097 .* 4096 speech positions .* --tokens 4096 or"):
        SpeechService(ServeOptions(run_dir=str(tmp_path), default_tokens=4097, max_cache_len=4400))
    assert not (tmp_path / "reference.wav").exists()  # refused before the default voice was made


def test_max_tokens_stops_at_t3s_learned_speech_positions(tmp_path: Path) -> None:
    """A cache longer than T3's 4096 learned speech positions (plus the shortest prompt) holds more
    tokens than T3 can place: the range advertised is T3's (before: 1 to the cache less the
    prompt, and a request past 4096 refused by the engine with param null)."""
    from tts_workbench.runtime.decode import check_new_tokens

    service = SpeechService(ServeOptions(run_dir=str(tmp_path), max_streams=1, max_cache_len=4400))
    try:
        assert service.limits.max_tokens == service.tts.t3.hp.max_speech_tokens == 4096
        check_new_tokens(service.tts.t3, service.limits.max_tokens)  # the engine takes the largest
        with TestClient(speech_app(service)) as client:
            r = client.post("/v1/audio/speech", json={**GOOD, "max_tokens": 4097})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "max_tokens", error
        assert "from 1 to 4096" in error["message"], error
    finally:
        service.close()


def test_an_input_limit_past_t3s_text_positions_names_the_flag(tmp_path: Path) -> None:
    """(before: "split it into shorter texts", the fix of a text, not of the operator's flag)"""
    with pytest.raises(ConfigError, match="--max-input-chars: .* 2048 .* lower --max-input-chars"):
        SpeechService(ServeOptions(run_dir=str(tmp_path), max_input_chars=3000, max_cache_len=4096))


def test_a_multilingual_service_with_alignment_gives_each_request_its_analyzer(
    tmp_path: Path, analyzers: Any
) -> None:
    """``serve --alignment``: every request's stream runs upstream's alignment analyzer over its
    own text (as the engine's, tests/test_engine_alignment.py); a model without one is refused
    naming the flag, before the default voice is written (before 2026-12-05 serve had no such
    option: Multilingual replicas never ran the analyzer)."""
    with pytest.raises(ConfigError, match="argument --alignment: .* Multilingual"):
        SpeechService(ServeOptions(run_dir=str(tmp_path / "tiny"), alignment=True))
    assert not (tmp_path / "tiny" / "reference.wav").exists()
    service = SpeechService(ServeOptions(model="multilingual-tiny", run_dir=str(tmp_path), max_streams=2,
                                         default_tokens=12, alignment=True))  # fmt: skip
    try:
        analyzers.take()  # the warm-up's
        with TestClient(speech_app(service)) as client:
            for text in ("Hello there.", "A longer text, to read."):
                body = {**GOOD, "model": service.model_id, "input": text, "max_tokens": 12}
                response = client.post("/v1/audio/speech", json=body)
                assert response.status_code == 200 and response.content, response.text
                [[analyzer]] = analyzers.take().values()  # one analyzer, this request's alone
                start, end = analyzer.text_tokens_slice
                assert (
                    end - start
                    == service.prefill_positions("default", text) - service.voice_positions["default"]
                )  # its own text's columns
    finally:
        service.close()
    assert service.engine.free_rows() == 4


def test_a_fused_service_steps_one_fused_copy(tmp_path: Path, fused_copies: list[Any]) -> None:
    """``serve --fused``: the replica's engine steps T3 on one copy of the backbone with fused
    projections (``DecodePlan``), made once, and answers with it; Turbo's replica, with nothing
    to fuse, refuses to start (before 2026-12-05 it served unfused)."""
    with pytest.raises(ConfigError, match="argument --fused: Turbo's GPT-2"):
        SpeechService(ServeOptions(model="turbo-tiny", run_dir=str(tmp_path / "turbo"), fused=True))
    service = SpeechService(ServeOptions(run_dir=str(tmp_path), max_streams=1, default_tokens=12, fused=True))
    try:
        with TestClient(speech_app(service)) as client:
            response = client.post("/v1/audio/speech", json=GOOD)
        assert response.status_code == 200 and response.content, response.text
        assert len(fused_copies) == 1 and fused_copies[0] is not service.tts.t3.tfmr
    finally:
        service.close()


def test_a_voice_file_named_default_is_refused(tmp_path: Path) -> None:
    """(before: default.wav silently replaced the generated default voice)"""
    make_reference_wav(tmp_path / "default.wav")
    with pytest.raises(ConfigError, match="--voices: .*default.wav.* generated reference voice.* rename"):
        find_voices(str(tmp_path))


def test_a_voices_folder_with_a_broken_file_is_refused_naming_it(tmp_path: Path) -> None:
    """Every file that fails ``check_reference`` is named, with why (before: it was left out and
    the server started without it, told only when no file of the folder passed)."""
    make_reference_wav(tmp_path / "alice.wav", seed=1)
    with wave.open(str(tmp_path / "carol.wav"), "wb") as silent:  # a readable WAV, but no voice
        silent.setnchannels(1)
        silent.setsampwidth(2)
        silent.setframerate(24000)
        silent.writeframes(bytes(2 * 24000))
    (tmp_path / "dave.wav").write_bytes(b"RIFF not really")
    broken = r"argument --voices: .*carol\.wav is silence.*; .*dave\.wav is not a readable"
    with pytest.raises(SourceError, match=broken):
        find_voices(str(tmp_path))


def test_a_voice_file_is_found_whatever_the_case_of_its_suffix(tmp_path: Path) -> None:
    """(before: only ``*.wav`` was matched: Erin.WAV was no voice, a folder of it refused); two
    files of one stem are refused, not one dropped."""
    make_reference_wav(tmp_path / "Erin.WAV")
    assert find_voices(str(tmp_path)) == {"Erin": tmp_path / "Erin.WAV"}
    make_reference_wav(tmp_path / "alice.wav")
    assert sorted(find_voices(str(tmp_path))) == ["Erin", "alice"]
    make_reference_wav(tmp_path / "alice.WAV")  # one voice name, two files: neither replaces the other
    with pytest.raises(SourceError, match="alice.WAV and alice.wav are both voice 'alice'"):
        find_voices(str(tmp_path))


def test_a_service_whose_warm_up_fails_stops_its_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile error in the warm-up must not leave the engine's two threads and its cache
    behind: the caller (a Ray replica) never gets a service to close."""
    built: list[StreamEngine] = []

    def failing(engine: StreamEngine, *_a: object) -> float:
        built.append(engine)
        raise RuntimeError("the compile failed, on purpose")

    monkeypatch.setattr(StreamEngine, "warmup", failing)
    with pytest.raises(RuntimeError, match="on purpose"):
        SpeechService(ServeOptions(run_dir=str(tmp_path)))
    [engine] = built
    assert not engine.running and not any(t.is_alive() for t in engine._threads)


def _holding_a_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_serve_refuses_bad_flags_before_starting_ray(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    def no_ray(*_a: object, **_k: object) -> None:
        raise AssertionError("Ray was started for a command that should have been refused")

    monkeypatch.setattr(ray, "init", no_ray)
    held, port = _holding_a_port()
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.wav").write_bytes(b"RIFF not really")
    cases = [
        (["--port", str(port)], "--port"),
        (["--port", "0"], "--port"),  # any free port: the URL printed would not be the server's
        (["--port", str(free_port()), "--voices", str(tmp_path / "missing")], "--voices"),
        (["--port", str(free_port()), "--voices", str(tmp_path / "empty")], "--voices"),
        (["--port", str(free_port()), "--voices", str(tmp_path / "bad")], "--voices"),
        (["--port", str(free_port()), "--address", f"127.0.0.1:{free_port()}"], "--address"),
        # joining a cluster, the model is the workers' to find: only the address is refused here
        (["--address", f"127.0.0.1:{free_port()}", "--model", "/only/on/the/workers"], "--address"),
        (["--port", str(free_port()), "--model", "huge"], "unknown model source 'huge'"),
        (["--port", str(free_port()), "--model", str(tmp_path / "no" / "folder")], "does not exist"),
        (["--port", str(free_port()), "--device", "cuda"], "--device: device='cuda' requested but CUDA"),
        (["--port", str(free_port()), "--device", "foo"], "argument --device: unknown device 'foo'"),
        (["--port", str(free_port()), "--tokens", "300", "--max-cache-len", "256"], "--tokens"),
        (["--port", str(free_port()), "--max-streams", "4", "--step-buckets", "1,8"], "--step-buckets"),
        (["--port", str(free_port()), "--step-buckets", "0,2"], "--step-buckets"),
        (["--port", str(free_port()), "--alignment", "--decode", "compiled"], "--alignment"),
        (["--port", str(free_port()), "--alignment"], "--alignment"),  # tiny has no analyzer
        (["--port", str(free_port()), "--fused", "--model", "turbo-tiny"], "--fused"),  # nothing to fuse
        (["--host", "999.1.1.1"], "--host"),
        (["--port", str(free_port()), "--address", "127.0.0.1:99999"], "--address"),
        (["--port", str(free_port()), "--out", str(tmp_path / "bad" / "broken.wav")], "--out"),  # a file
    ]
    try:
        for args, flag in cases:
            out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
            try:
                rc = main(["serve", *args, *out])
            except SystemExit as e:  # refused by the parser itself
                rc = e.code
            assert rc == 2, args
            errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and flag in errors[0], (args, errors)
    finally:
        held.close()


@pytest.mark.parametrize("host", ["8.8.8.8", "fe80::1"])
def test_a_host_this_machine_does_not_have_is_named_not_the_port(host: str) -> None:
    """bind fails with EADDRNOTAVAIL (8.8.8.8) or EINVAL (fe80::1 without a scope); (before: a
    --port problem)"""
    from tts_workbench.serving.deployment import check_port_free

    with pytest.raises(ConfigError, match="argument --host: .* not an address of this machine"):
        check_port_free(host, free_port())


def _serve_errors(capfd: pytest.CaptureFixture[str], args: list[str]) -> list[str]:
    """The ``error:`` lines of ``serve ARGS``, which must end with exit code 2."""
    assert main(["serve", *args]) == 2, args
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]


def test_serve_without_a_ray_cluster_names_the_address_not_a_folder(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ray.init raises ConnectionError (an OSError) when no cluster answers, e.g. ``--address
    auto`` with none running (before: "...: give another folder (--out / --logdir)")."""
    import ray

    def no_cluster(*_a: object, **_k: object) -> None:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    [error] = _serve_errors(capfd, ["--address", "auto", "--out", str(tmp_path)])
    assert "--address auto" in error and "ray start --head" in error and "folder" not in error, error


def test_a_local_serve_starts_its_own_ray_whatever_ray_address_says(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With RAY_ADDRESS set (or after `ray start --head` on this machine) ray.init without an
    address joined that cluster, then refused num_cpus: "When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided", arguments the user never gave."""
    import ray

    given: list[dict[str, object]] = []

    def init(**kwargs: object) -> None:
        given.append(kwargs)
        raise KeyboardInterrupt  # stop there: serve says it stopped before serving

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert main(["serve", "--port", str(free_port()), "--out", str(tmp_path)]) == 0
    assert "stopped before serving" in capfd.readouterr().out
    [kwargs] = given
    assert kwargs["address"] == "local" and kwargs["num_cpus"] == 2, kwargs  # Ray's word for "start one"


def test_serve_refuses_gpus_ray_cannot_give_each_replica(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a machine with one GPU (as torch sees it): two replicas on a local Ray would leave
    serve.run waiting for ever for the second; a device index is not what a replica sees (Ray
    gives it one GPU, as cuda:0). Refused before any Ray starts."""
    import ray
    import torch

    from tts_workbench.serving.deployment import Placement, check_placement

    def no_ray(*_a: object, **_k: object) -> None:
        raise AssertionError("Ray was started for a command that should have been refused")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = ["--out", str(tmp_path / "out")]
    [error] = _serve_errors(capfd, ["--port", str(free_port()), "--device", "cuda", "--replicas", "2", *out])
    assert "--replicas 2" in error and "1 GPU" in error, error
    assert not (tmp_path / "out").exists()  # (before: an empty run folder was left behind)
    for where in (["--port", str(free_port())], ["--address", "auto"]):
        [error] = _serve_errors(capfd, [*where, "--device", "cuda:1", *out])
        assert "--device cuda:1" in error and "use --device cuda" in error, error
    check_placement(ServeOptions(device="cuda", run_dir=str(tmp_path)), Placement(port=free_port()))


def test_serve_hands_the_replicas_absolute_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray worker may run in another working directory (on a cluster, where `ray start` ran)."""
    from tts_workbench.serving import deployment

    seen: list[ServeOptions] = []

    def serving(options: ServeOptions, where: deployment.Placement, **_: object) -> dict[str, object]:
        seen.append(options)
        return {"url": where.url, "served_s": 0.0, "stopped": "cleanly"}

    monkeypatch.setattr(deployment, "serve_until_stopped", serving)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--out", "run", "--voices", "voices"]) == 0
    save_checkpoint(load_model("tiny"), tmp_path / "ckpt")
    assert main(["serve", "--model", "ckpt", "--out", "run"]) == 0
    named, folder = seen
    assert (named.run_dir, named.voices_dir) == (str(tmp_path / "run"), str(tmp_path / "voices"))
    assert (named.model, folder.model) == ("tiny", str(tmp_path / "ckpt"))
    assert (named.flow, named.flow_batches) == ("eager", None)
    assert (
        main(["serve", "--out", "run", "--flow", "compiled", "--flow-batches", "4,1", "--step-buckets", "1"])
        == 0
    )
    assert (seen[-1].flow, seen[-1].flow_batches, seen[-1].step_buckets) == ("compiled", (1, 4), (1,))
    assert main(["serve", "--model", "ckpt", "--family", "standard", "--out", "run"]) == 0
    assert (seen[-1].model, seen[-1].family) == (str(tmp_path / "ckpt"), "standard")  # to the replicas


def test_a_compiled_flow_is_built_for_every_voice_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled estimator's shapes hold a voice's prompt length: the service warms them up for
    each voice it serves (the compiler stubbed: each shape "compiled" into the eager estimator)."""
    monkeypatch.setattr(vocode, "compile_method", lambda fn, module, *a, **kw: lambda *x: fn(module, *x))
    voices = tmp_path / "voices"
    voices.mkdir()
    make_reference_wav(voices / "brief.wav", seconds=2.0, seed=1)  # a shorter prompt than the default's
    options = ServeOptions(
        run_dir=str(tmp_path / "run"), voices_dir=str(voices), flow="compiled", flow_batches=(2,)
    )
    service = SpeechService(options)
    try:
        frames = {shape[1][2] for shape in service.engine.flow.shapes}  # (id, x's shape, dtype, autocast)
        assert len(service.engine.flow.shapes) == 4 and len(frames) == 4  # 2 voices x 2 window kinds
    finally:
        service.close()


def test_the_servers_url_writes_an_ipv6_host_in_brackets() -> None:
    from tts_workbench.serving.deployment import Placement  # imports Ray

    assert Placement("::1", 8000).url == "http://[::1]:8000"
    assert Placement("127.0.0.1", 8000).url == "http://127.0.0.1:8000"


def test_a_clusters_serve_is_reported_where_it_listens() -> None:
    """Joining a cluster whose Ray Serve already runs, Serve keeps its own HTTP options (it only
    logs that it ignored --host/--port): before, `serve --address` printed the URL from the flags."""
    from tts_workbench.serving.deployment import Placement  # imports Ray

    cluster = Placement("127.0.0.1", 8000, address="head.example:6379")
    assert cluster.listening_url("0.0.0.0", 9000) == "http://head.example:9000"  # a wildcard: at the head
    assert cluster.listening_url("::", 9000) == "http://head.example:9000"
    assert cluster.listening_url("10.0.0.5", 9000) == "http://10.0.0.5:9000"
    assert "already listens on 0.0.0.0:9000" in cluster.listening_note("0.0.0.0", 9000)
    assert "--host 127.0.0.1 --port 8000 are not used" in cluster.listening_note("0.0.0.0", 9000)
    assert cluster.listening_note("127.0.0.1", 8000) == ""  # where the flags asked: nothing to say
    local = Placement("0.0.0.0", 8000)  # no cluster: the listening host as it is
    assert local.listening_url("0.0.0.0", 8000) == local.url == "http://0.0.0.0:8000"


# Ray Serve's message when every start of a replica failed (its constructor raised): before Ray
# 2.60 serve.run's RuntimeError held the replica's traceback; from 2.60 it says only which
# deployment failed, and serve.status() holds the traceback in the deployment's message.
DEPLOY_FAILED_2_60 = (
    "Deploying application tts-workbench failed: Failed to update the deployments ['speech']."
)
REPLICA_TRACEBACK = """ray::ServeReplica:tts-workbench:speech.initialize_and_get_metadata() (pid=4242)
RuntimeError: Traceback (most recent call last):
  File "/work/main/tts_workbench/serving/service.py", line 131, in __init__
    check_input_fits(prefill, options)
  File "/work/main/tts_workbench/serving/service.py", line 92, in check_input_fits
    raise ConfigError(
tts_workbench.core.errors.ConfigError: argument --max-input-chars: an input of 5000 characters needs more
"""
DEPLOY_FAILED_BEFORE_2_60 = f"""{DEPLOY_FAILED_2_60}
The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or
initial health check failing. See controller logs for details. Error:
{REPLICA_TRACEBACK}"""


def _no_status() -> None:
    raise RuntimeError("the controller is gone")  # serve.status may fail too: serve.run's message is kept


def _status_2_60() -> SimpleNamespace:
    speech = SimpleNamespace(status="DEPLOY_FAILED", message=REPLICA_TRACEBACK)
    app = SimpleNamespace(deployments={"speech": speech})
    return SimpleNamespace(applications={"tts-workbench": app})


@pytest.mark.parametrize(
    ("deploy_failed", "status"),
    [(DEPLOY_FAILED_BEFORE_2_60, _no_status), (DEPLOY_FAILED_2_60, _status_2_60)],
    ids=["ray-before-2.60", "ray-2.60"],
)
def test_a_replica_that_cannot_start_gives_one_error_line_with_its_reason(
    deploy_failed: str, status: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """What only a replica can check (the input limit against the cache needs the tokenizer)
    fails in Ray Serve's deploy (before: with Ray 2.60, "the replicas could not start: Deploying
    application tts-workbench failed: ...", the reason left out)."""
    import ray
    from ray import serve

    stopped = []

    def failing(*_a: object, **_k: object) -> None:
        raise RuntimeError(deploy_failed)

    for module, name in ((ray, "init"), (serve, "start")):
        monkeypatch.setattr(module, name, lambda *a, **k: None)
    for module, name in ((ray, "shutdown"), (serve, "shutdown")):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: stopped.append(name))
    monkeypatch.setattr(serve, "run", failing)
    monkeypatch.setattr(serve, "status", status)
    assert main(["serve", "--port", str(free_port()), "--out", str(tmp_path)]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the replicas could not start: ConfigError: argument --max-input-chars: an input of "
        "5000 characters needs more"
    ]
    assert stopped == ["shutdown", "shutdown"]  # Serve, then the local Ray


def test_load_url_without_a_server_gives_one_error_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    for url in (f"http://127.0.0.1:{free_port()}", "127.0.0.1:8000"):
        assert main(["load", "--url", url, "--streams", "1", "--out", str(tmp_path)]) == 2
        errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--url" in errors[0], errors


def test_load_url_reads_samples_and_goes_on_past_a_failed_level(tmp_path: Path) -> None:
    """A stand-in endpoint (httpx's MockTransport): it compresses its audio when the client
    accepts gzip, and answers 503 after its first stream (an overloaded server)."""
    import gzip
    import json

    from tts_workbench.studies.http_load import run_http_load

    samples = np.zeros(24000, dtype="<i2").tobytes()  # one second of pcm
    calls: list[int] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "stand-in"}]})
        calls.append(1)
        if len(calls) > 1:
            return httpx.Response(503, json={"error": {"message": "busy", "type": "server_error"}})
        if "gzip" in request.headers.get("accept-encoding", ""):
            gz = httpx.ByteStream(gzip.compress(samples))
            return httpx.Response(200, stream=gz, headers={"content-encoding": "gzip"})
        return httpx.Response(200, stream=httpx.ByteStream(samples))  # read as streamed

    report = run_http_load(
        "http://stand-in", [1, 2], tokens=10, transport=httpx.MockTransport(endpoint), outdir=tmp_path
    )
    one, two = (level["summary"] for level in report["levels"])
    assert report["levels"][0]["per_stream"][0]["audio_s"] == 1.0  # the samples, not gzip's bytes
    assert one["failed"] == 0 and two["failed"] == 2  # a level that failed whole is a result
    assert two["ttfa_p95_s"] is None  # nobody spoke: no percentile (JSON null, not NaN)
    strict = json.loads((tmp_path / "load.json").read_text(), parse_constant=pytest.fail)
    assert strict["levels"][1]["summary"]["failed"] == 2


def test_a_client_that_leaves_is_counted_and_freed_even_before_its_first_chunk(tmp_path: Path) -> None:
    import asyncio

    service = SpeechService(ServeOptions(run_dir=str(tmp_path), max_streams=1))
    engine, req = service.engine, parse_speech({**GOOD, "max_tokens": 200}, service.limits)

    async def scenario() -> None:
        speaking = await service.speech(req)
        await anext(speaking)
        with engine.together():  # admission held: the next request waits in the queue
            waiting = asyncio.ensure_future(service.speech(req))
            for _ in range(100):  # bounded
                if engine.queued() == 1:
                    break
                await asyncio.sleep(0.05)
            assert engine.queued() == 1 and not waiting.done()
            waiting.cancel()  # as Ray Serve cancels the handler of a client that went away
            with pytest.raises(asyncio.CancelledError):
                await waiting
        await speaking.aclose()  # and one that went away mid-stream
        for _ in range(200):  # bounded
            if engine.active() == 0 and engine.queued() == 0:
                break
            await asyncio.sleep(0.05)

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        assert engine.active() == 0 and engine.queued() == 0 and engine.free_rows() == 2
        assert 'tts_streams_total{outcome="disconnected",replica="0"} 2.0' in service.metrics_text().decode()
    finally:
        service.close()


def test_an_error_nothing_answered_is_openais_500_with_the_replica(
    service: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before 2026-12-04: Starlette's plain-text 500, from outside the middleware: no x-replica)"""

    async def broken(_req: object) -> None:
        raise RuntimeError("a defect")

    monkeypatch.setattr(service, "speech", broken)
    with TestClient(speech_app(service), raise_server_exceptions=False) as client:
        r = client.post("/v1/audio/speech", json=GOOD)
    assert r.status_code == 500 and r.headers["x-replica"] == "0", r.text
    assert r.json()["error"]["type"] == "server_error" and "RuntimeError" in r.json()["error"]["message"]


MIDWAY = {**GOOD, "input": "Hello there, this is a longer sentence.", "seed": 0, "max_tokens": 200}


@pytest.fixture(scope="module")
def failing_midway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SpeechService, Any]]:
    """The tiny service served as ``serve`` serves it, over a real socket (uvicorn on 127.0.0.1, in
    a thread: httpx's ASGITransport and Starlette's TestClient raise the app's exception either
    way, so neither shows what reaches a client), its vocoder failing from its second call after
    each ``arm()``: the next stream sends its first chunk, then fails. Its URL, service, arm."""
    service = SpeechService(ServeOptions(run_dir=str(tmp_path_factory.mktemp("run")), max_streams=1))
    real, calls = engine_module.vocoder, [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("the vocoder failed (injected)")
        return real(*args, **kwargs)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(speech_app(service), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "vocoder", flaky)
        thread.start()
        try:
            for _ in range(600):  # bounded: 30 s
                if server.started or not thread.is_alive():
                    break
                time.sleep(0.05)
            assert server.started, "uvicorn did not start"
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", service, lambda: calls.__setitem__(0, 0)
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()
            service.close()


def test_a_stream_that_fails_midway_reaches_the_client_cut_not_as_a_whole_200(
    failing_midway: tuple[str, SpeechService, Any],
) -> None:
    """Its headers (x-replica too) are sent with the first chunk, so the failure can only break
    the connection: the client's read fails (before: x-replica's BaseHTTPMiddleware closed the
    body cleanly, a whole 200 with audio cut off, counted failed only on the server)."""
    import httpx

    url, service, arm = failing_midway
    failed = {"replica": "0", "outcome": "failed"}
    before = service.registry.get_sample_value("tts_streams_total", failed) or 0.0
    got = bytearray()
    arm()
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=MIDWAY, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-replica"] == "0"
        with pytest.raises(httpx.RemoteProtocolError):
            for data in r.iter_raw():
                got += data
    assert got, "no audio came: the stream failed before it began, not mid-way"
    assert service.registry.get_sample_value("tts_streams_total", failed) == before + 1
    assert httpx.get(f"{url}/no-such-path", timeout=30).headers["x-replica"] == "0"  # and every answer named


def test_the_load_client_counts_a_stream_cut_midway_as_failed(
    failing_midway: tuple[str, SpeechService, Any],
) -> None:
    """(before: error None, a healthy row with short audio and an RTF)"""
    url, _service, arm = failing_midway

    async def one() -> tuple[dict[str, Any], bool]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await _stream(client, url, MIDWAY, time.perf_counter(), 120)

    arm()
    row, refused = asyncio.run(one())
    assert row["status"] == 200 and "RemoteProtocolError" in (row["error"] or ""), row
    assert row["audio_s"] > 0 and row["rtf"] is None and not refused, row
