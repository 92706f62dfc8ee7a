"""The real server: `tts-workbench serve` with two replicas on a local Ray (2 CPUs, one thread
per replica), started and stopped by this module; its HTTP proxy listens on 127.0.0.1 (Ray's own
processes, GCS and raylet, listen on the machine's addresses as Ray starts them: Ray has no
loopback-only mode). Every request loop is bounded in
count and time; the server is stopped with SIGTERM, as a person's Ctrl-C would, and must exit."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tts_workbench.core.ports import free_port
from tts_workbench.interface.cli import main
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.serving.protocol import pcm16

pytestmark = pytest.mark.integration  # a Ray cluster and two replicas: `make integration-test`

TEXT = "One stream over HTTP, one in this process."
START_S = 240  # replicas build their model, prepare the voice and warm up


# Every request here goes to the server on 127.0.0.1 with trust_env=False: httpx would send it to
# the environment's http_proxy otherwise, which cannot reach this machine's loopback.
def _health(url: str) -> dict[str, object] | None:
    try:
        r = httpx.get(f"{url}/health", timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(url, model id) of a two-replica server; at the end it must stop cleanly on SIGTERM."""
    port, run = free_port(), tmp_path_factory.mktemp("serve")
    cmd = [sys.executable, "-m", "tts_workbench.interface.cli", "serve", "--port", str(port),
           "--replicas", "2", "--threads", "1", "--max-streams", "4", "--out", str(run)]  # fmt: skip
    out, err = open(run / "stdout", "w+"), open(run / "stderr", "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while _health(url) is None:
            assert proc.poll() is None, (run / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer in time"
            time.sleep(1.0)
        model = httpx.get(f"{url}/v1/models", timeout=5, trust_env=False).json()["data"][0]["id"]
        yield url, model
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out.seek(0)
        stdout = out.read()
        out.close()
        err.close()
    assert rc == 0 and "stopped cleanly" in stdout, (rc, stdout, (run / "stderr").read_text()[-3000:])
    assert f"after serving {url} " in stdout  # the URL read from what Ray Serve listens on
    assert socket.socket().connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def _speech(url: str, model: str, **fields: object) -> httpx.Response:
    body = {"model": model, "input": TEXT, "response_format": "pcm", "seed": 7, "max_tokens": 40, **fields}
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=120, trust_env=False)


def test_http_audio_equals_the_in_process_stream(server: tuple[str, str], tmp_path: Path) -> None:
    url, model = server
    # The replicas' model and voice: the same random weights (seed 0), the generated 10 s voice.
    tts = load_model("tiny", seed=0)
    prepare_voice(tts, str(make_reference_wav(tmp_path / "reference.wav")))
    with StreamEngine(tts, max_streams=1, max_cache_len=1024) as engine:
        local = np.concatenate([c for c, _ in engine.submit(TEXT, seed=7, max_new_tokens=40)])
    expected = np.frombuffer(pcm16(local), "<i2").astype(int)
    pcm = _speech(url, model)
    assert pcm.status_code == 200 and pcm.headers["content-type"] == "audio/pcm"
    got = np.frombuffer(pcm.content, "<i2").astype(int)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1
    wav = _speech(url, model, response_format="wav")
    assert wav.content[:4] == b"RIFF" and np.abs(np.frombuffer(wav.content[44:], "<i2") - expected).max() <= 1


def test_four_concurrent_clients_and_both_replicas(server: tuple[str, str]) -> None:
    url, model = server
    results: dict[int, httpx.Response] = {}

    def client(k: int) -> None:
        results[k] = _speech(url, model, seed=k, max_tokens=30)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.status_code == 200 and len(r.content) > 0 for r in results.values())
    assert len({r.content for r in results.values()}) == 4  # each seed its own audio
    replicas = {r.headers["x-replica"] for r in results.values()}
    for _ in range(20):  # bounded: Ray Serve spreads requests; both replicas answer
        if len(replicas) == 2:
            break
        replicas.add(httpx.get(f"{url}/health", timeout=5, trust_env=False).headers["x-replica"])
    assert len(replicas) == 2


def test_a_bad_request_gets_its_4xx_and_the_server_goes_on(server: tuple[str, str]) -> None:
    url, model = server
    r = _speech(url, model, voice="nobody")
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"
    r = httpx.post(f"{url}/v1/audio/speech", content=b"{oops", timeout=30, trust_env=False)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert _speech(url, model, max_tokens=10).status_code == 200


def _tokens_sampled(metrics: str, replica: str) -> float:
    found = re.search(
        rf'^tts_t3_tokens_sampled_total{{replica="{re.escape(replica)}"}} (\S+)$', metrics, re.M
    )
    assert found, metrics
    return float(found.group(1))


def test_a_client_that_disconnects_frees_its_stream(server: tuple[str, str]) -> None:
    url, model = server
    before: dict[str, float] = {}
    for _ in range(40):  # bounded: Ray Serve spreads requests; read both replicas' counts
        if len(before) == 2:
            break
        answer = httpx.get(f"{url}/metrics", timeout=5, trust_env=False)
        before[answer.headers["x-replica"]] = _tokens_sampled(answer.text, answer.headers["x-replica"])
    body = {"model": model, "input": TEXT * 3, "response_format": "pcm", "seed": 1, "max_tokens": 800}
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=60, trust_env=False) as r:
        replica = r.headers["x-replica"]
        next(r.iter_raw())  # the first audio, then the client goes away
    idle = f'tts_active_streams{{replica="{replica}"}} 0.0'
    left = f'tts_streams_total{{outcome="disconnected",replica="{replica}"}} 1.0'
    seen = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bounded: ask until that replica answers idle
        answer = httpx.get(f"{url}/metrics", timeout=5, trust_env=False)
        if answer.headers["x-replica"] == replica:
            seen = answer.text
            if idle in seen and left in seen:
                break
        time.sleep(0.2)
    assert idle in seen and left in seen, seen
    # Stopped, not finished: a stream left running would have sampled all 800 tokens.
    assert 0 < _tokens_sampled(seen, replica) - before[replica] < 800


def test_load_url_measures_the_server(
    server: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _ = server
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # the study's client reads the environment's proxy
    args = ["load", "--url", url, "--streams", "1,2", "--tokens", "30", "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["endpoint"] == url and report["model"] == "chatterbox-tiny" and report["server"] == "uvicorn"
    )
    for level in report["levels"]:
        s = level["summary"]
        assert s["failed"] == 0 and 0 < s["ttfa_p50_s"] <= s["ttfa_p99_s"] and s["audio_per_wall_s"] > 0
        assert all(row["status"] == 200 and row["audio_s"] > 0 for row in level["per_stream"])
    assert (tmp_path / "load.json").exists() and (tmp_path / "load.png").exists()
    # the study's own request refused (an unknown voice): one error line, exit 2
    assert main([*args[:-1], "--voice", "nobody"]) == 2


def test_health_and_metrics_answer_while_the_replicas_hold_many_streams(server: tuple[str, str]) -> None:
    """More speech requests than the engines run: each replica takes them all (its engine queues
    what it cannot run) and /health and /metrics still answer. Before 2026-12-07 a replica held
    16 requests here (the larger of 16 and 4 x --max-streams) and Ray Serve queued the rest,
    probes included, behind the streams: a busy server's probes waited until streams ended. Last
    in this module: the streams it starts end disconnected, which the counts read above would
    include."""
    url, model = server
    streams = 36  # more than the two replicas' 32 places before
    body = {"model": model, "input": TEXT, "response_format": "pcm", "seed": 3, "max_tokens": 800}

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        limits = httpx.Limits(max_connections=streams + 2)
        async with httpx.AsyncClient(timeout=120, trust_env=False, limits=limits) as client:
            speech = f"{url}/v1/audio/speech"
            posts = [asyncio.create_task(client.post(speech, json=body)) for _ in range(streams)]
            try:
                await asyncio.sleep(3.0)  # the requests reach the replicas
                health = await client.get(f"{url}/health", timeout=10)  # ReadTimeout: a probe queued
                metrics = await client.get(f"{url}/metrics", timeout=10)
            finally:
                for post in posts:  # the clients leave: their streams end disconnected, rows freed
                    post.cancel()
                await asyncio.gather(*posts, return_exceptions=True)
        return health, metrics

    health, metrics = asyncio.run(scenario())
    assert health.status_code == 200 and metrics.status_code == 200
    # the replica that answered holds more streams than its engine runs (4): queued in the engine
    assert health.json()["queued_streams"] > 0, health.json()
    assert f'tts_queued_streams{{replica="{metrics.headers["x-replica"]}"}}' in metrics.text
