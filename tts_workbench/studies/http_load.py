"""The load study as a client: the same streams sent to any OpenAI-compatible speech endpoint
(``POST /v1/audio/speech``, this workbench's ``serve`` or another server), measured from the
bytes' arrival as a listener's player would feel them.

Per stream: HTTP status, time to the first audio byte, RTF (last byte over audio seconds),
underruns of a real-time player that starts at the first byte, and the replica that answered
(``x-replica``, where the server names it). Per level the same listener figures as the
in-process study (``load.listener_summary``); what happens inside the server (stage busy
shares, batch fill) is the server's ``/metrics``, not the client's to see. The client runs on
one asyncio loop (httpx); on a loopback test it shares the machine's cores with the server.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from ..core.constants import SAMPLE_RATE
from ..core.errors import ConfigError
from ..instruments.latency import gap_summary, underruns
from .load import (
    DEFAULT_TEXTS,
    FIRST_AUDIO_LIMIT_S,
    arrival_offsets,
    conclude,
    listener_summary,
    parse_arrival,
)

IDENTITY = {"Accept-Encoding": "identity"}  # httpx asks for gzip by default


class EndpointError(ConfigError):
    """The endpoint does not answer, or refuses the study's requests (4xx)."""


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def check_url(url: str) -> str:
    """``url`` without its trailing slash; a ConfigError naming ``--url`` unless it is
    ``http(s)://HOST[:PORT]`` with a port a connection can use."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except httpx.InvalidURL as e:
        raise ConfigError(f"argument --url: {url!r} is not a URL ({e}): use http://HOST:PORT") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"argument --url: {url!r} is not an http:// or https:// URL: use http://HOST:PORT")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"argument --url: port {port} of {url!r} is not a port (1 to 65535)")
    return url.rstrip("/")


async def served_model(client: httpx.AsyncClient, url: str) -> str:
    """The first model id of ``GET /v1/models``; an EndpointError if nothing answers."""
    try:
        response = await client.get(f"{url}/v1/models")
    except httpx.HTTPError as e:
        raise EndpointError(
            f"argument --url: {url} does not answer ({type(e).__name__}: {e}): start a server "
            "(`tts-workbench serve`) or check the URL"
        ) from None
    if response.status_code >= 400:
        raise EndpointError(f"argument --url: GET {url}/v1/models answered {response.status_code}: "
                            f"{_error_message(response)}")  # fmt: skip
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(
            f"argument --url: GET {url}/v1/models is not OpenAI's model list ({response.text[:120]!r}): "
            "is this an OpenAI-compatible speech server?"
        ) from None


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], at: float, timeout_s: float
) -> dict[str, Any]:
    """One request sent at ``at`` (perf_counter), read to the end within ``timeout_s``."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    sent = time.perf_counter()
    arrivals: list[float] = []
    seconds: list[float] = []
    row: dict[str, Any] = {"text": body["input"], "seed": body["seed"], "status": None, "error": None}
    try:
        async with (
            asyncio.timeout(timeout_s),
            # identity: the bytes read are the samples, whatever compression the server offers
            client.stream("POST", f"{url}/v1/audio/speech", json=body, headers=IDENTITY) as response,
        ):
            row["status"], row["replica"] = response.status_code, response.headers.get("x-replica")
            row["server"] = response.headers.get("server")
            if response.status_code >= 400:
                await response.aread()
                row["error"] = f"HTTP {response.status_code}: {_error_message(response)}"
            else:
                async for data in response.aiter_raw():
                    arrivals.append(time.perf_counter() - sent)
                    seconds.append(len(data) / 2 / SAMPLE_RATE)  # pcm: 16-bit mono samples
    except httpx.HTTPError as e:  # a dropped connection: this stream failed, the level goes on
        row["error"] = f"{type(e).__name__}: {e}"
    except TimeoutError:
        row["error"] = f"not finished within {timeout_s} s (--timeout)"
    gaps = underruns(arrivals, seconds)
    audio = sum(seconds)
    row.update(
        ttfa_s=arrivals[0] if arrivals else None,
        wall_s=arrivals[-1] if arrivals else None,
        audio_s=audio,
        rtf=arrivals[-1] / audio if audio else None,
        **gap_summary(gaps),
    )
    return row


async def _level(
    client: httpx.AsyncClient, url: str, model: str, n: int, texts: list[str], *, voice: str,
    arrival: tuple[str, float], tokens: int, seed: int, timeout_s: float, bar: Any, first: bool,
) -> dict[str, Any]:  # fmt: skip
    offsets = arrival_offsets(arrival, n, seed)
    t0 = time.perf_counter()

    async def one(k: int) -> dict[str, Any]:
        body = {"model": model, "input": texts[k % len(texts)], "voice": voice, "response_format": "pcm",
                "seed": seed + k, "max_tokens": tokens}  # fmt: skip
        row = await _stream(client, url, body, t0 + float(offsets[k]), timeout_s)
        row["arrival_s"] = float(offsets[k])  # sent this long after the level began
        bar.update(1)
        return row

    streams = await asyncio.gather(*(one(k) for k in range(n)))
    wall = time.perf_counter() - t0
    # A 4xx says the study's own requests are wrong for this server (every level would fail);
    # 408 and 429 say it is busy: those streams failed, the study goes on.
    refused = [s for s in streams if s["status"] is not None and 400 <= s["status"] < 500
               and s["status"] not in (408, 429)]  # fmt: skip
    if refused:
        raise EndpointError(f"argument --url: the server refused the study's request: {refused[0]['error']}")
    # Every stream of the first level failed: the endpoint serves nobody. At a later level the
    # server may be overloaded (every stream past --timeout): that is a result, the study goes on.
    if first and all(s["error"] for s in streams):
        raise EndpointError(
            f"argument --url: every stream of the {n}-stream level failed: {streams[0]['error']}"
        )
    return {
        "streams": n,
        "wall_s": wall,
        "per_stream": streams,
        "summary": listener_summary(n, wall, streams),
    }


async def _run(url: str, levels: list[int], texts: list[str], *, voice: str, arrival: tuple[str, float],
               tokens: int, seed: int, timeout_s: float, progress: bool,
               transport: httpx.AsyncBaseTransport | None) -> dict[str, Any]:  # fmt: skip
    limits = httpx.Limits(max_connections=max(levels) + 4)
    timeout = httpx.Timeout(timeout_s, connect=5.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as client:
        model = await served_model(client, url)
        runs: list[dict[str, Any]] = []
        for n in levels:
            with tqdm(
                total=n, desc=f"{n} streams", unit="stream", disable=not progress, file=sys.stderr
            ) as bar:
                runs.append(await _level(client, url, model, n, texts, voice=voice, arrival=arrival,
                                         tokens=tokens, seed=seed, timeout_s=timeout_s, bar=bar,
                                         first=not runs))  # fmt: skip
    return {"model": model, "levels": runs}


def run_http_load(
    url: str,
    levels: list[int],
    *,
    texts: list[str] | None = None,
    voice: str = "default",
    arrival: str = "burst",
    tokens: int = 150,
    seed: int = 0,
    timeout_s: float = 300.0,
    first_audio_limit_s: float = FIRST_AUDIO_LIMIT_S,
    outdir: str | Path | None = None,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Each level's streams sent to ``url`` (``http://HOST:PORT``) and how many held in real
    time (``load.conclude``); writes ``load.json`` and ``load.png`` to ``outdir`` when given.
    Every request is bounded by ``timeout_s``. ``transport``: httpx's, to reach a server in
    this process (``httpx.ASGITransport``)."""
    url = check_url(url)
    texts = texts or list(DEFAULT_TEXTS)
    kind = parse_arrival(arrival)
    got = asyncio.run(_run(url, levels, texts, voice=voice, arrival=kind, tokens=tokens, seed=seed,
                           timeout_s=timeout_s, progress=progress, transport=transport))  # fmt: skip
    rows = [s for level in got["levels"] for s in level["per_stream"]]
    servers = sorted({s["server"] for s in rows if s.get("server")})
    replicas = sorted({s["replica"] for s in rows if s.get("replica")})
    report: dict[str, Any] = {
        "endpoint": url,
        "model": got["model"],
        "server": ", ".join(servers) or "unnamed",
        "replicas_seen": replicas,
        "voice": voice,
        "arrival": arrival,
        "tokens": tokens,
        "levels": got["levels"],
        "title": f"load study of {url} (model {got['model']}, server {', '.join(servers) or 'unnamed'}, "
        f"{len(replicas) or 'unnamed'} replica(s) answered), voice {voice}, arrival {arrival}, "
        f"max_tokens {tokens} per stream, measured from the bytes' arrival",
        "note": f"each stream ends where the server ends it, at max_tokens={tokens} at most (a model with "
        "random weights never emits a stop token, so its streams run to max_tokens)",
    }
    return conclude(report, first_audio_limit_s, outdir)
