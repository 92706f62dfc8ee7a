"""The load study as a client (``studies/http_load.py``) against stand-in endpoints (httpx's
MockTransport: nothing listens; a stdlib server on 127.0.0.1 where the proxy matters), the load
study's argument checks, and ``serve`` stopped before it serves (Ray's calls replaced: no Ray starts)."""

from __future__ import annotations

import asyncio
import errno
import gzip
import http.server
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import loopback_server
from tts_workbench.core.errors import ConfigError
from tts_workbench.core.ports import free_port
from tts_workbench.interface.cli import main
from tts_workbench.serving.protocol import FORMATS, Limits, RequestError, parse_speech, wav_header
from tts_workbench.studies import http_load, load
from tts_workbench.studies.http_load import EndpointError, check_url, run_http_load

SECOND = np.zeros(24000, dtype="<i2").tobytes()  # one second of pcm: 24 kHz, 16-bit, mono
STAND_IN = Limits("stand-in", ("default",))


def _endpoint(speech: Callable[[dict[str, Any]], httpx.Response]) -> httpx.MockTransport:
    """A stand-in server: its model list, and ``speech(body)`` for each speech request that
    this workbench's server would take (``response_format`` included: it has no default)."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "stand-in"}]})
        body = json.loads(request.content)
        try:
            parse_speech(body, STAND_IN)
        except RequestError as e:
            return httpx.Response(e.status, json=e.body())
        return speech(body)

    return httpx.MockTransport(handle)


def _errors(capfd: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]


def test_a_refused_text_ends_the_study_on_the_first_level_and_is_a_failed_row_after(tmp_path: Path) -> None:
    """A refusal (4xx, not 408/429) of the first level's request names the text; at a later
    level the refused streams are failed rows and the levels measured are kept."""

    def speech(body: dict[str, Any]) -> httpx.Response:
        if body["input"] == "Zebra crossing":
            return httpx.Response(400, json={"error": {"message": "input refused", "param": "input"}})
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    texts, endpoint = ["a", "b", "c", "Zebra crossing"], _endpoint(speech)
    report = run_http_load("http://stand-in", [1, 2, 4], texts=texts, transport=endpoint, outdir=tmp_path)
    four = report["levels"][2]
    [refused] = [row for row in four["per_stream"] if row["error"]]
    assert refused["text"] == "Zebra crossing" and refused["status"] == 400
    assert refused["error"] == "HTTP 400: input refused"
    assert four["summary"]["failed"] == 1 and report["levels"][1]["summary"]["failed"] == 0
    assert report["real_time"]["missed"][4].startswith("1 failed")
    assert json.loads((tmp_path / "load.json").read_text())["levels"][2]["summary"]["failed"] == 1
    with pytest.raises(EndpointError, match=r"--url: .*'Zebra crossing'.*HTTP 400: input refused"):
        run_http_load("http://stand-in", [2, 4], texts=texts[::-1], transport=endpoint)


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": FORMATS["pcm"]},  # what this project's server sends
        {"content-type": "audio/L16; rate=24000; channels=1"},
        {"content-type": "application/octet-stream"},
        {"content-type": "audio/pcm", "content-encoding": "identity"},
        {},  # no claim: read as the pcm asked for
    ],
)
def test_raw_pcm_answers_are_counted_as_samples(headers: dict[str, str]) -> None:
    def speech(_body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers=headers)

    [row] = run_http_load("http://stand-in", [1], transport=_endpoint(speech))["levels"][0]["per_stream"]
    assert row["error"] is None and row["audio_s"] == 1.0


@pytest.mark.parametrize(
    ("headers", "body", "said"),
    [
        ({"content-type": "audio/mpeg"}, b"ID3" + bytes(9997), "content-type 'audio/mpeg'"),
        ({"content-type": "audio/wav"}, bytes(44) + SECOND, "content-type 'audio/wav'"),
        ({"content-type": "audio/L16; rate=16000"}, SECOND, "rate=16000"),
        ({"content-type": "audio/L16; rate=24000; channels=2"}, SECOND, "channels=2"),
        ({"content-encoding": "gzip"}, gzip.compress(SECOND, mtime=0), "content-encoding gzip"),
        # typed as no format, or not typed at all: the body's first bytes say what it is (before
        # 2026-12-06 counted as samples, the header's bytes timed as first audio)
        ({}, wav_header() + SECOND, "a WAV body, not raw PCM"),
        ({"content-type": "application/octet-stream"}, wav_header() + SECOND, "a WAV body, not raw PCM"),
        ({}, b"ID3" + bytes(9997), "an MP3 body, not raw PCM"),
        ({"content-type": "application/octet-stream"}, b"OggS" + bytes(9996), "an Ogg body, not raw PCM"),
        ({}, b"fLaC" + bytes(9996), "a FLAC body, not raw PCM"),
    ],
    # names, not bytes: the pytest-xdist workers compare them
    ids=[
        "mp3",
        "wav",
        "16 kHz",
        "stereo",
        "gzip",
        "bare wav",
        "octet wav",
        "bare mp3",
        "octet ogg",
        "bare flac",
    ],
)
def test_an_answer_that_is_not_raw_pcm_is_an_error_not_samples(
    headers: dict[str, str], body: bytes, said: str
) -> None:
    """On the first level it ends the study (the endpoint answers in another format); later,
    while the first level's answers were pcm, it is a failed row saying what came. The body
    comes in two reads that split its first four bytes, as a network may."""
    calls: list[int] = []

    def speech(_body: dict[str, Any]) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:  # the first level's one stream: pcm
            return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})
        return httpx.Response(200, stream=_Parts([(0.0, body[:2]), (0.0, body[2:])]), headers=headers)

    report = run_http_load("http://stand-in", [1, 2], transport=_endpoint(speech))
    rows = report["levels"][1]["per_stream"]
    assert all(row["status"] == 200 and said in row["error"] for row in rows), rows
    assert all(row["audio_s"] == 0.0 and row["rtf"] is None and row["ttfa_s"] is None for row in rows)
    assert report["levels"][1]["summary"]["failed"] == 2
    calls.append(1)  # from now on every answer is the wrong one, the first level's too
    with pytest.raises(EndpointError, match=re.escape(said)):
        run_http_load("http://stand-in", [1], transport=_endpoint(speech))


def test_every_row_has_the_same_keys_and_a_failed_row_no_rtf() -> None:
    def speech(body: dict[str, Any]) -> httpx.Response:
        if body["seed"] == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, stream=httpx.ByteStream(SECOND[:4800]), headers={"x-replica": "7"})

    report = run_http_load("http://stand-in", [2], transport=_endpoint(speech))
    ok, failed = report["levels"][0]["per_stream"]
    assert sorted(ok) == sorted(failed) and {"replica", "server"} <= set(failed)
    assert ok["replica"] == "7" and report["replicas_seen"] == ["7"]  # as the server named itself
    assert failed["replica"] is None and failed["server"] is None and failed["rtf"] is None
    assert "ConnectError" in failed["error"]
    for row in (ok, failed):
        assert isinstance(row["audio_s"], float) and isinstance(row["underrun_s"], float)
        assert isinstance(row["max_underrun_s"], float)


class _Clock:
    """``time`` as http_load reads it: a clock that moves only when the stand-in stream says
    when its bytes arrive, so the arrivals (and the underruns) are what the test set."""

    now = 1000.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


class _Parts(httpx.AsyncByteStream):
    """A response body whose parts arrive ``delay`` seconds (on ``_Clock``) after the one before;
    ``hang``: then it waits, for real, much longer than the test's --timeout."""

    def __init__(self, parts: list[tuple[float, bytes]], hang: bool = False) -> None:
        self.parts, self.hang = parts, hang

    async def __aiter__(self) -> Any:
        for delay, data in self.parts:
            _Clock.now += delay
            yield data
        if self.hang:
            await asyncio.sleep(60)


def test_underruns_from_byte_arrival_busy_refusals_and_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream whose second half comes 1 s after its first half (0.5 s of audio) underruns once,
    for 0.5 s, its audio counted in bytes though a part splits a sample; a 429, a 408 and a
    stream past --timeout are failed rows, and the level goes on (the study with it)."""
    monkeypatch.setattr(http_load, "time", _Clock)
    half = SECOND[:24000]  # 0.5 s

    def speech(body: dict[str, Any]) -> httpx.Response:
        if body["seed"] == 0:  # the second half in two parts of odd sizes: a sample split
            return httpx.Response(200, stream=_Parts([(0.1, half), (1.0, half[:12001]), (0.0, half[12001:])]))
        if body["seed"] in (2, 3):  # busy: not a refusal of the study's request
            return httpx.Response(429 if body["seed"] == 2 else 408, json={"error": {"message": "busy"}})
        return httpx.Response(200, stream=_Parts([(0.0, half)], hang=True))  # never finishes

    report = run_http_load("http://stand-in", [4], transport=_endpoint(speech), timeout_s=1.0)
    spoke, late, *busy = report["levels"][0]["per_stream"]
    assert spoke["error"] is None and spoke["audio_s"] == pytest.approx(1.0)
    assert spoke["ttfa_s"] == pytest.approx(0.1) and spoke["wall_s"] == pytest.approx(1.1)
    assert spoke["underruns"] == 1 and spoke["underrun_s"] == pytest.approx(0.5)
    assert spoke["max_underrun_s"] == pytest.approx(0.5) and spoke["rtf"] == pytest.approx(1.1)
    assert late["error"] == "not finished within 1.0 s (--timeout)" and late["rtf"] is None
    assert late["audio_s"] == 0.5  # what came before the timeout, as it came
    statuses = [(row["status"], row["error"]) for row in busy]
    assert statuses == [(429, "HTTP 429: busy"), (408, "HTTP 408: busy")]
    summary = report["levels"][0]["summary"]
    assert summary["failed"] == 3 and summary["streams_with_underruns"] == 1
    assert summary["ttfa_p50_s"] == pytest.approx(0.1)
    # the stream that spoke, not the one cut off with 0.5 s of it: an overloaded level is no faster
    assert summary["audio_per_wall_s"] == pytest.approx(1.0 / report["levels"][0]["wall_s"])


@pytest.mark.parametrize(
    "url",  # an empty query or fragment too: httpx parses it as none (before 2026-12-04, let through)
    [
        "http://h:8000/v1",
        "http://h:8000/?q=1",
        "http://h:8000/#x",
        "http://h/a/",
        "http://h:8000/?",
        "http://h#",
    ],
)
def test_a_url_with_a_path_or_query_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=r"argument --url: .*the server's root"):
        check_url(url)


def test_a_url_with_credentials_is_refused_before_they_reach_the_report() -> None:
    with pytest.raises(ConfigError, match=r"argument --url: .*credentials") as e:
        check_url("http://me:secret@h:8000")
    assert "secret" not in str(e.value)


def test_a_url_is_the_servers_root() -> None:
    assert check_url("http://h:8000/") == "http://h:8000"
    assert check_url("https://h") == "https://h"


def test_the_cli_refuses_a_url_with_a_path_before_any_request(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["load", "--url", url, "--streams", "1", "--out", str(tmp_path)]) == 2
    [error] = _errors(capfd)
    assert "--url" in error and "root" in error, error


def test_an_arrival_rate_too_slow_for_the_largest_level_is_refused() -> None:
    """The largest level's arrivals spread over (streams - 1) / RATE seconds on average: past an
    hour it is a typo, not a study (poisson:1e-300 overflowed a sleep or waited for ever)."""
    assert load.parse_arrival("poisson:1e-300", 1) == ("poisson", 1e-300)  # one stream waits for none
    assert load.parse_arrival("poisson:7", 8) == ("poisson", 7.0)
    at_cap = 7 / load.MAX_ARRIVAL_SPAN_S
    assert load.parse_arrival(f"poisson:{at_cap!r}", 8) == ("poisson", at_cap)
    # the largest level past 4 million streams: a suggestion of 1234.557 was printed 1234.56 and
    # refused in turn (before 2026-12-04)
    for rate, largest in (("1e-300", 8), ("0.001", 8), (repr(at_cap * 0.99), 8), ("1", 4444423)):
        with pytest.raises(ConfigError, match="argument --arrival") as refused:
            load.parse_arrival(f"poisson:{rate}", largest)
        [suggested] = re.findall(r"poisson:(\S+) or more", str(refused.value))
        assert load.parse_arrival(f"poisson:{suggested}", largest)  # the fix it gives holds
        assert len(str(refused.value)) < 200, refused.value  # (a 301-digit span, for a moment)
    with pytest.raises(ConfigError, match=r"over 3600\.4 s on average, more than 3600 s"):
        load.parse_arrival(f"poisson:{7 / 3600.4!r}", 8)  # not "over 3600 s ..., more than 3600 s"


def test_the_cli_refuses_a_slow_arrival_before_any_request(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing answers: a later check would say --url
    args = ["load", "--url", url, "--streams", "1,8", "--arrival", "poisson:1e-300", "--out", str(tmp_path)]
    assert main(args) == 2
    [error] = _errors(capfd)
    assert "--arrival" in error, error


def test_an_unreadable_texts_file_names_texts(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    read_text = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == texts:  # root reads any file whatever its mode: the refusal is made here
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert main(["load", "--texts", str(texts), "--out", str(tmp_path / "out")]) == 2
    assert _errors(capfd) == [f"error: argument --texts: cannot read {texts}: Permission denied"]


def test_a_text_longer_than_the_cache_names_texts_and_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A text whose prefill alone fills the KV cache is the text's fault, not --tokens'."""
    monkeypatch.setattr(load, "prefill_length", lambda _tts, text, **_k: len(text))  # a position a character
    cache = load.DEFAULT_MAX_CACHE_LEN
    long = "Once upon a time " + "x" * cache
    with pytest.raises(ConfigError, match=r"^argument --texts: .*'Once upon a time x") as refused:
        load.cache_positions(None, ["short", long], 10)
    assert "--tokens" not in str(refused.value)
    with pytest.raises(ConfigError, match=rf"^argument --tokens: .* use --tokens {cache - 999} or fewer"):
        load.cache_positions(None, ["x" * 1000], cache)
    # the request that exactly fills the cache fits: its last token is never fed back (before, refused)
    assert load.cache_positions(None, ["x" * 1000], cache - 999) == cache
    assert load.cache_positions(None, ["x" * 100], 28) == 128


def test_a_text_past_t3s_text_positions_names_texts_and_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def prefill_length(_tts: object, text: str, **_k: object) -> int:
        if text.startswith("Once"):  # as runtime.decode.text_tokens refuses a text too long for T3
            raise ConfigError("the text is 3000 text tokens, beyond the 2048 T3 has positions for")
        return 100

    monkeypatch.setattr(load, "prefill_length", prefill_length)
    with pytest.raises(ConfigError, match=r"^argument --texts: 'Once upon a time': the text is 3000 "):
        load.cache_positions(None, ["short", "Once upon a time"], 10)


@pytest.mark.parametrize(
    ("interrupted", "stop"),
    [("ray.init", KeyboardInterrupt), ("ray.init", SystemExit), ("serve.run", KeyboardInterrupt)],
)
def test_serve_interrupted_while_starting_says_it_stopped_before_serving(
    interrupted: str,
    stop: type[BaseException],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C, or SIGTERM (during ray.init its own handler raises SystemExit), before the
    replicas answer: Ray is shut down and the command says it never served."""
    import ray
    from ray import serve

    calls: list[str] = []

    def call(name: str) -> Callable[..., None]:
        def record(*_a: object, **_k: object) -> None:
            calls.append(name)
            if name == interrupted:
                raise stop(15) if stop is SystemExit else stop

        return record

    for module, prefix in ((ray, "ray"), (serve, "serve")):
        for name in ("init", "start", "run", "shutdown"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, call(f"{prefix}.{name}"))
    assert main(["serve", "--port", str(free_port()), "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "stopped before serving" in out and "cleanly" not in out, out
    assert calls[-1] == "ray.shutdown", calls  # whatever Ray had started is stopped


def test_a_redirect_is_a_failed_row_saying_why() -> None:
    """httpx follows no redirect: later, a failed row with its reason; on the first level, the
    end of the study (before: error None, so the row failed with no reason)."""
    calls: list[int] = []
    said = "HTTP 307: redirect to https://stand-in/"

    def speech(_body: dict[str, Any]) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:  # the first level's one stream: pcm
            return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})
        return httpx.Response(307, headers={"location": "https://stand-in/v1/audio/speech"})

    report = run_http_load("http://stand-in", [1, 2], transport=_endpoint(speech))
    rows = report["levels"][1]["per_stream"]
    assert all(row["status"] == 307 and said in row["error"] for row in rows), rows
    assert report["levels"][1]["summary"]["failed"] == 2
    calls.append(1)  # from now on every answer is the redirect, the first level's too
    with pytest.raises(EndpointError, match=r"^argument --url: .*" + re.escape(said)):
        run_http_load("http://stand-in", [1], transport=_endpoint(speech))
    # the model list redirected: its answer is no list to read, the URL the one to fix
    moved = httpx.MockTransport(
        lambda _request: httpx.Response(308, headers={"location": "https://stand-in/"})
    )
    with pytest.raises(EndpointError, match=r"answered 308: redirect to .* give the final URL .* as --url"):
        run_http_load("http://stand-in", [1], transport=moved)


@pytest.mark.parametrize(
    ("status", "headers"),
    [(204, {}), (200, {"content-type": "audio/pcm"}), (200, {})],
    ids=["no content", "empty pcm", "empty untyped"],
)
def test_a_2xx_that_ends_without_audio_is_silent_not_failed(status: int, headers: dict[str, str]) -> None:
    """A stream that ended cleanly with no audio byte spoke nothing, as the in-process study
    counts it (and this workbench's server answers it: 200, an empty body); a first level where
    nobody spoke is reported as such and the study goes on, as in process. Before 2026-12-06:
    failed rows (``HTTP 200: no audio bytes``), and such a first level ended the study."""
    calls: list[int] = []

    def speech(_body: dict[str, Any]) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:  # the first level's one stream: pcm
            return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(b""))  # as a network reads

    report = run_http_load("http://stand-in", [1, 2], transport=_endpoint(speech))
    rows = report["levels"][1]["per_stream"]
    assert all(row["status"] == status and row["error"] is None and row["ttfa_s"] is None for row in rows)
    assert all(row["audio_s"] == 0.0 and row["rtf"] is None for row in rows)
    summary = report["levels"][1]["summary"]
    assert summary["silent"] == 2 and summary["failed"] == 0, summary
    assert report["real_time"]["streams"] == 1 and "2 spoke nothing" in report["real_time"]["missed"][2]
    calls.append(1)  # from now on every answer is the empty one, the first level's too
    report = run_http_load("http://stand-in", [1, 2], transport=_endpoint(speech))
    assert [level["summary"]["silent"] for level in report["levels"]] == [1, 2]
    assert report["real_time"]["streams"] is None and "none spoke" in report["real_time"]["missed"][1]


@pytest.mark.parametrize(
    ("status", "models"),
    [(404, {"error": {"message": "Not Found"}}), (200, {"object": "list", "data": []})],
    ids=["missing", "empty"],
)
def test_a_server_that_lists_no_model_asks_for_model(status: int, models: dict[str, Any]) -> None:
    """(before: the 404 ended the study with no way forward, --model being refused with --url,
    and the empty list was called "not OpenAI's model list")"""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(status, json=models)
        raise AssertionError("a speech request was sent")

    with pytest.raises(EndpointError, match=r"^argument --url: .*lists no model: give --model ID"):
        run_http_load("http://stand-in", [1], transport=httpx.MockTransport(handle))


def test_another_servers_error_page_is_quoted_on_one_line() -> None:
    """An HTML page as the error (a web server that is no speech server): before 2026-12-07 its
    text went into the error as it came, ten lines under one ``error:``."""
    page = '<!DOCTYPE HTML>\n<html lang="en">\n  <head>\n' + "  <p>Not found</p>\n" * 40 + "</html>\n"

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text=page, headers={"content-type": "text/html"})

    with pytest.raises(EndpointError) as e:
        run_http_load("http://stand-in", [1], transport=httpx.MockTransport(handle))
    message = str(e.value)
    assert "\n" not in message and """answered 404 ('<!DOCTYPE HTML> <html lang="en"> <head>""" in message
    assert "' ...): " in message and "lists no model" in message, message


def test_a_body_that_is_no_model_list_is_told_apart_from_an_empty_list() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="hello")

    with pytest.raises(EndpointError, match="is not OpenAI's model list") as e:
        run_http_load("http://stand-in", [1], transport=httpx.MockTransport(handle))
    assert "--model" not in str(e.value)


def test_a_model_given_is_the_model_each_request_names_and_no_list_is_asked_for() -> None:
    models: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            raise AssertionError("GET /v1/models was sent")
        models.append(json.loads(request.content)["model"])
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    report = run_http_load("http://stand-in", [1, 2], model="tts-1", transport=httpx.MockTransport(handle))
    assert models == ["tts-1"] * 3 and report["model"] == "tts-1" and "model tts-1" in report["title"]


def test_a_server_on_this_machine_has_the_hosts_bandwidth_read_before_each_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the in-process study reads it (a slow spell of the host, which no load average shows, is
    named in the report); a server elsewhere runs on another machine's speed: none read."""
    speeds = iter([20e9, 6e9])
    monkeypatch.setattr(http_load, "read_bandwidth", lambda device, min_run_time_s: next(speeds))

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    local = run_http_load("http://127.0.0.1:1", [1, 2], model="m", transport=httpx.MockTransport(handle))
    assert [lv["summary"]["read_bandwidth_gb_s"] for lv in local["levels"]] == [20.0, 6.0]
    assert "memory read bandwidth 6.0 GB/s before 2 streams" in load.format_load(local)
    remote = run_http_load("http://stand-in", [1], model="m", transport=httpx.MockTransport(handle))
    assert "read_bandwidth_gb_s" not in remote["levels"][0]["summary"]  # (the iterator is spent: not read)


def test_a_language_given_is_each_requests_field_and_in_the_report() -> None:
    bodies: list[dict[str, Any]] = []

    def speech(body: dict[str, Any]) -> httpx.Response:
        bodies.append(body)
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    report = run_http_load("http://stand-in", [1, 2], language="fr", transport=_endpoint(speech))
    assert [body["language"] for body in bodies] == ["fr"] * 3
    assert report["language"] == "fr" and ", language fr," in report["title"]
    bodies.clear()  # none given: no field (another server may refuse one it does not know)
    report = run_http_load("http://stand-in", [1], transport=_endpoint(speech))
    assert "language" not in bodies[0] and report["language"] is None and "language" not in report["title"]
    with pytest.raises(ConfigError, match="argument --language: a language code"):  # before any request
        run_http_load("http://stand-in", [1], language=" ", transport=_endpoint(speech))
    assert len(bodies) == 1


def test_the_cli_passes_model_with_url_and_only_when_given(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[Any] = []

    def run_http_load(_url: str, _levels: list[int], **kwargs: Any) -> None:
        got.append(kwargs.get("model"))
        raise ConfigError("stopped here")

    monkeypatch.setattr(http_load, "run_http_load", run_http_load)
    args = ["load", "--url", "http://127.0.0.1:9", "--streams", "1", "--out", str(tmp_path)]
    assert main([*args, "--model", "tts-1"]) == 2 and main(args) == 2
    assert _errors(capfd) == ["error: stopped here"] * 2
    assert got == ["tts-1", None]  # without --model: the first /v1/models lists, not the default tiny


def test_an_unusable_out_folder_is_refused_before_any_request(tmp_path: Path) -> None:
    """(before: found by conclude, once every level had run, and the measurements lost)"""
    calls: list[int] = []

    def speech(_body: dict[str, Any]) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    (tmp_path / "a_file").write_text("not a folder")
    under_a_file = tmp_path / "a_file" / "out"
    with pytest.raises(OSError):
        run_http_load("http://stand-in", [1, 2], transport=_endpoint(speech), outdir=under_a_file)
    assert calls == []


@pytest.mark.parametrize(("levels", "message"), [([], "no level given"), ([2, 2], "given twice")])
def test_levels_are_checked_as_the_engines_study_checks_them(levels: list[int], message: str) -> None:
    """(before: no level failed in max(); a repeated level was measured twice)"""

    def speech(_body: dict[str, Any]) -> httpx.Response:
        raise AssertionError("a request was sent")

    with pytest.raises(ConfigError, match=f"argument --streams: .*{message}"):
        run_http_load("http://stand-in", levels, transport=_endpoint(speech))


def test_a_seed_a_later_stream_could_not_send_is_refused_before_any_request() -> None:
    """Stream k of a level sends ``seed + k`` and the server takes seeds under 2**63 (before: the
    largest --seed the CLI takes failed the 4-stream level's later streams, as the server's
    failures, or ended the study naming --url)."""
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"object": "list", "data": [{"id": "stand-in"}]})

    largest = 2**63 - 1
    with pytest.raises(ConfigError, match=f"argument --seed: .*4-stream level's last stream .*{largest + 3}"):
        run_http_load("http://stand-in", [1, 4], seed=largest, transport=httpx.MockTransport(handle))
    assert sent == []
    with pytest.raises(ConfigError, match="argument --seed: .*-1"):
        run_http_load("http://stand-in", [1], seed=-1, transport=httpx.MockTransport(handle))
    assert sent == []


def test_poisson_arrivals_are_sent_no_earlier_than_their_offsets() -> None:
    """Each row's request reaches the endpoint at its ``arrival_s`` after the level began or
    later: measured from the model list, asked for before the level's clock starts (a lower
    bound, whatever the machine's speed)."""
    reached: dict[int, float] = {}
    listed: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            listed.append(time.perf_counter())
            return httpx.Response(200, json={"object": "list", "data": [{"id": "stand-in"}]})
        reached[json.loads(request.content)["seed"]] = time.perf_counter()
        return httpx.Response(
            200, stream=httpx.ByteStream(SECOND[:4800]), headers={"content-type": "audio/pcm"}
        )

    report = run_http_load("http://stand-in", [4], arrival="poisson:4", transport=httpx.MockTransport(handle))
    rows = report["levels"][0]["per_stream"]
    assert len({row["arrival_s"] for row in rows}) == 4 and len(reached) == 4  # spread, not a burst
    assert all(reached[row["seed"]] - listed[0] >= row["arrival_s"] for row in rows), (reached, listed, rows)
    # first audio counts from each request's own send, not from the level's start: the stand-in
    # answers at once, so the last one sent (0.3 s and more in, seed 0) hears it before its offset
    late = max(rows, key=lambda row: row["arrival_s"])
    assert late["arrival_s"] > 0.3 and late["ttfa_s"] < late["arrival_s"], rows
    # the level's wall time holds the arrivals' spread, and its audio per wall second is over it
    level = report["levels"][0]
    assert level["wall_s"] >= late["arrival_s"]
    audio = sum(row["audio_s"] for row in rows)
    assert level["summary"]["audio_per_wall_s"] == pytest.approx(audio / level["wall_s"])


def test_levels_run_in_ascending_order() -> None:
    """(before: as given, though the report's figure and verdict read them in order)"""

    def speech(_body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    report = run_http_load("http://stand-in", [2, 1], transport=_endpoint(speech))
    assert [level["streams"] for level in report["levels"]] == [1, 2]


def test_a_failed_figure_leaves_the_report_whole_and_no_half_written_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before: load.json and load.png were written in place, a failing figure left half of one)"""
    from matplotlib.figure import Figure

    def half_written(_fig: Any, path: Path, **_k: Any) -> None:
        Path(path).write_bytes(b"\x89PNG half a figure")
        raise OSError(28, "No space left on device")

    def speech(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="No space left"):
        run_http_load("http://stand-in", [1], texts=["a"], transport=_endpoint(speech), outdir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.json"]
    assert json.loads((tmp_path / "load.json").read_text())["levels"][0]["summary"]["failed"] == 0


def test_a_model_list_that_never_ends_is_an_error_within_the_timeout() -> None:
    """httpx's timeout bounds each read, not the answer: a server that trickles its model list a
    byte at a time held the study before its first request (before: forever)."""
    stop = threading.Event()  # ends the trickle once the guard below gives up (so the thread ends)

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"object": "list", "data": ['
        while not stop.is_set():
            yield b" "
            await asyncio.sleep(0.05)

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, content=trickle())
        raise AssertionError("a speech request was sent")

    async def guarded() -> None:
        study = asyncio.to_thread(
            run_http_load, "http://x", [1], timeout_s=1, transport=httpx.MockTransport(handle)
        )
        try:
            await asyncio.wait_for(study, 5)
        finally:
            stop.set()

    said = "argument --url: GET http://x/v1/models did not answer within 1 s (--timeout)"
    with pytest.raises(EndpointError, match=re.escape(said)):
        asyncio.run(guarded())


def test_an_out_folder_this_user_cannot_write_is_refused_before_any_request() -> None:
    """/proc is there and a folder, so making it succeeds, but no user writes in it, root neither
    (before: every level ran, then writing load.json failed and the measurements were lost)."""
    calls: list[int] = []

    def speech(_body: dict[str, Any]) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, stream=httpx.ByteStream(SECOND), headers={"content-type": "audio/pcm"})

    with pytest.raises(OSError, match="/proc"):
        run_http_load("http://stand-in", [1, 2], transport=_endpoint(speech), outdir="/proc")
    assert calls == []


@pytest.mark.parametrize(
    ("url", "trusted"),
    [
        ("http://127.0.0.1:8000", False),
        ("http://127.3.2.1:8000", False),
        ("http://localhost:8000", False),
        ("http://[::1]:8000", False),
        # what `serve --host 0.0.0.0` prints, a trailing dot, another case, IPv4 mapped to IPv6
        ("http://0.0.0.0:8000", False),
        ("http://[::]:8000", False),
        ("http://localhost.:8000", False),
        ("http://LOCALHOST:8000", False),
        ("http://127.0.0.1.:8000", False),
        ("http://[::ffff:127.0.0.1]:8000", False),
        ("https://tts.example.com", True),
        ("http://10.0.0.7:8000", True),
        ("http://[2001:db8::1]:8000", True),
    ],
)
def test_only_a_remote_server_is_reached_through_the_environment(url: str, trusted: bool) -> None:
    assert http_load.trusts_env(url) is trusted


class _Speaker(http.server.BaseHTTPRequestHandler):
    """A stand-in server over a real socket: its model list, one second of pcm for any speech."""

    def do_GET(self) -> None:
        listed = {"object": "list", "data": [{"id": "stand-in"}]}
        self._answer(json.dumps(listed).encode(), "application/json")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self._answer(SECOND, "audio/pcm")

    def _answer(self, body: bytes, kind: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:  # quiet: pytest shows stderr of failing tests
        pass


class _Pair(_Speaker):
    """A stand-in that answers speech only once a second request has come in (3 s at most)."""

    together = threading.Barrier(2, timeout=3)

    def do_POST(self) -> None:
        try:
            self.together.wait()
        except threading.BrokenBarrierError:
            self.rfile.read(int(self.headers["content-length"]))
            self._answer(b'{"error": {"message": "alone"}}', "application/json", 500)
            return
        super().do_POST()


def test_a_loopback_server_is_measured_whatever_http_proxy_says(behind_a_proxy: None) -> None:
    """A proxy elsewhere cannot reach this machine's loopback (before: with http_proxy set, the
    study's requests to 127.0.0.1 went to it, and a running server "did not answer")."""
    with loopback_server(_Speaker) as server:
        report = run_http_load(f"http://127.0.0.1:{server.server_port}", [1], timeout_s=30)
    assert report["levels"][0]["summary"]["failed"] == 0 and report["model"] == "stand-in"


def test_a_levels_streams_reach_the_server_together() -> None:
    """A level's streams are sent at once, not queued in the client's connection pool (where
    the wait would be timed as the server's first audio)."""
    _Pair.together.reset()  # (broken by an earlier run of this test that failed)
    with loopback_server(_Pair) as server:
        report = run_http_load(f"http://127.0.0.1:{server.server_port}", [2], timeout_s=30)
    assert report["levels"][0]["summary"]["failed"] == 0, report["levels"][0]["per_stream"]


def test_a_remote_server_that_does_not_answer_names_the_proxy(
    behind_a_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment's proxy (a port where nothing listens) is what failed to connect, not the
    server: the message names its variable as a possible cause, not its value (credentials)."""
    monkeypatch.setenv("http_proxy", "http://user:secret@127.0.0.1:9")
    said = "does not answer (ConnectError: "
    with pytest.raises(EndpointError, match=re.escape(said)) as e:
        run_http_load("http://tts.invalid:8000", [1], timeout_s=30)
    assert "the requests go through the proxy http_proxy/HTTP_PROXY sets" in str(e.value)
    assert "secret" not in str(e.value)
