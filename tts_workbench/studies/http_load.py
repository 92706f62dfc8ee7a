"""The load study as a client: the same streams sent to an OpenAI-style speech endpoint
(``POST /v1/audio/speech``: this workbench's ``serve``, or another server that takes its
fields of its own, ``seed`` and ``max_tokens``, and ``language`` where one is given), measured
from the bytes' arrival as a listener's player would feel them. The model is the one given
(``--model``), else the first one ``GET /v1/models`` lists; the requests carry no API key.

Per stream: HTTP status, time to the first audio byte, RTF (last byte over audio seconds),
underruns of a real-time player that starts at the first byte, and the replica that answered
(``x-replica``, where the server names it). Per level the same listener figures as the
in-process study (``load.listener_summary``); what happens inside the server (stage busy
shares, batch fill) is the server's ``/metrics``, not the client's to see. The client runs on
one asyncio loop (httpx); on a loopback test it shares the machine's cores with the server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx

from ..core.constants import REQUEST_SEEDS, SAMPLE_RATE
from ..core.errors import ConfigError, as_code, as_int, naming_flag
from ..core.files import check_folder
from ..core.machine import read_bandwidth
from ..core.progress import progress_bar
from ..instruments.latency import gap_summary, underruns
from ..models.sources import token_cap_note
from .load import (
    DEFAULT_TEXTS,
    FIRST_AUDIO_LIMIT_S,
    PROBE_S,
    arrival_offsets,
    checked_level_seed,
    checked_levels,
    conclude,
    listener_summary,
    parse_arrival,
    shown,
    streams_label,
    texts_source,
)

IDENTITY = {"Accept-Encoding": "identity"}  # httpx asks for gzip by default
# The content types of raw samples, the bytes the study counts: this workbench's server sends
# audio/pcm (serving.protocol.FORMATS), RFC 2586's name is audio/L16, and a server may send
# the bytes untyped. WAV, MP3 and the like would be counted as samples they are not.
RAW_PCM = ("audio/pcm", "audio/l16", "application/octet-stream")
# The first bytes of the containers a speech server may send whatever its content-type says (or
# without one). MPEG audio without an ID3 tag starts with a frame sync (0xFFE?) instead, left out:
# quiet pcm whose first samples are -1 and 0 (FF FF 00 00) is a valid MPEG-1 Layer I header.
CONTAINERS = {b"RIFF": "a WAV", b"ID3": "an MP3", b"OggS": "an Ogg", b"fLaC": "a FLAC"}
HEAD_BYTES = max(map(len, CONTAINERS))


def checked_request_seed(seed: object, largest: int) -> int:
    """``seed`` as an int, or a ConfigError naming ``--seed`` where a stream of the ``largest``
    level would send a seed the server refuses (``load.checked_level_seed`` at a request's bound):
    found now, not as failed streams once the levels before have run."""
    whole = as_int(seed)
    if whole is None or not 0 <= whole < REQUEST_SEEDS:
        raise ConfigError(
            f"argument --seed: must be an integer from 0 to 2**63 - 1 (a request's seed), got {seed!r}"
        )
    with naming_flag("--seed", ConfigError):
        return checked_level_seed(whole, largest, REQUEST_SEEDS)


class EndpointError(ConfigError):
    """The endpoint does not answer, redirects the study's requests (3xx) or refuses them (4xx)."""


def _error_message(response: httpx.Response) -> str:
    if response.is_redirect:  # httpx follows none: the server wants another URL than --url gave
        where = response.headers.get("location", "an unnamed place")
        return f"redirect to {where} not followed: give the final URL (the server's root) as --url"
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):  # another server's page (HTML, say): quoted on one line
        body = " ".join(response.text.split())
        return repr(body[:200]) + (" ..." if len(body) > 200 else "")


def check_url(url: str) -> str:
    """``url`` without its trailing slash; a ConfigError naming ``--url`` unless it is
    ``http(s)://HOST[:PORT]`` with a port a connection can use (no path, query or fragment:
    the study adds ``/v1/...`` to it)."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except httpx.InvalidURL as e:
        raise ConfigError(f"argument --url: {url!r} is not a URL ({e}): use http://HOST:PORT") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"argument --url: {url!r} is not an http:// or https:// URL: use http://HOST:PORT")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"argument --url: port {port} of {url!r} is not a port (1 to 65535)")
    if parsed.userinfo:  # the study sends none, and the URL goes into the report as given
        raise ConfigError(
            "argument --url: the URL holds credentials, which the study would not send and the "
            "report would keep: give http://HOST:PORT (no API key option)"
        )
    # the raw string: httpx parses "http://h:1/?" to an empty query, as if there were none
    if parsed.path not in ("", "/") or "?" in url or "#" in url:
        root = f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"
        raise ConfigError(f"argument --url: {url!r} has a path, query or fragment and the study adds /v1/... "
                          f"to the URL: give the server's root, {root}")  # fmt: skip
    return url.rstrip("/")


def trusts_env(url: str) -> bool:
    """Whether the study's client reads the environment (``http_proxy``, ``SSL_CERT_FILE`` and the
    like) for the server at ``url``: not on this machine (``localhost``, 127.0.0.0/8, ``::1``, and
    0.0.0.0 or ``::``, which ``serve --host 0.0.0.0`` prints and reach this machine), which a proxy
    elsewhere cannot reach and one here would be measured with the server; yes for another host,
    which a proxy may be the only way to reach."""
    host = httpx.URL(url).host.rstrip(".")  # a fully qualified name's dot (httpx lowers the case)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name, not an address
        return host != "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return not (address.is_loopback or address.is_unspecified)


def proxy_note(url: str) -> str:
    """A possible cause for a ``url`` that does not answer: the environment's proxy for its scheme,
    named by its variable (its value may hold credentials), through which httpx sends the requests
    unless ``no_proxy`` names the host; "" where the environment sets none."""
    scheme = httpx.URL(url).scheme
    proxies = urllib.request.getproxies()  # the environment's {scheme}_proxy, either case
    key = scheme if scheme in proxies else "all"
    if key not in proxies:
        return ""
    return (f"; the requests go through the proxy {key}_proxy/{key.upper()}_PROXY sets (unless no_proxy "
            "names the host): it may be what does not answer")  # fmt: skip


async def served_model(client: httpx.AsyncClient, url: str, timeout_s: float) -> str:
    """The first model id of ``GET /v1/models``; an EndpointError if nothing answers, the whole
    answer takes over ``timeout_s`` (httpx's timeout bounds each read: a server that trickles
    its answer would hold the study for ever) or it lists no model (a 404 or an empty list: then
    ``--model`` names it)."""
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.get(f"{url}/v1/models")
    except httpx.HTTPError as e:
        raise EndpointError(
            f"argument --url: {url} does not answer ({type(e).__name__}: {e}): start a server "
            f"(`tts-workbench serve`) or check the URL{proxy_note(url) if client.trust_env else ''}"
        ) from None
    except TimeoutError:
        raise EndpointError(
            f"argument --url: GET {url}/v1/models did not answer within {timeout_s} s (--timeout): "
            "check the server, or give --model ID (then no model list is asked for)"
        ) from None
    no_model = "the server lists no model: give --model ID, the model its speech requests are to name"
    if response.status_code == 404:
        raise EndpointError(f"argument --url: GET {url}/v1/models answered 404 ({_error_message(response)}): "
                            f"{no_model}")  # fmt: skip
    if response.status_code >= 300:
        raise EndpointError(f"argument --url: GET {url}/v1/models answered {response.status_code}: "
                            f"{_error_message(response)}")  # fmt: skip
    try:
        listed = response.json()["data"]
        first = None if listed == [] else str(listed[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(
            f"argument --url: GET {url}/v1/models is not OpenAI's model list ({response.text[:120]!r}): "
            "is this an OpenAI-compatible speech server?"
        ) from None
    if first is None:  # OpenAI's list, empty: a server that serves without naming its models
        raise EndpointError(f"argument --url: GET {url}/v1/models is an empty list: {no_model}")
    return first


def not_raw_pcm(headers: httpx.Headers) -> str | None:
    """Why the bytes of a 2xx answer are not the raw samples the study counts (24 kHz, 16-bit,
    mono), or None when they are: a ``content-encoding`` other than identity, a ``content-type``
    not in ``RAW_PCM``, or a ``rate``/``channels`` parameter other than 24000 and 1. An answer
    without a content-type makes no claim: its bytes are read as the pcm the request asked for,
    unless they begin as a container does (``not_samples``)."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        return f"content-encoding {encoding}: compressed audio, though the study asked for identity"
    kind = headers.get("content-type")
    if kind is None:
        return None
    media, *params = (part.strip().lower() for part in kind.split(";"))
    given = dict(param.partition("=")[::2] for param in params)
    expected = {"rate": str(SAMPLE_RATE), "channels": "1"}
    if media not in RAW_PCM or any(given.get(key, value) != value for key, value in expected.items()):
        return (f"content-type {kind!r}: not the raw pcm the study asked for (response_format pcm, "
                f"{SAMPLE_RATE} Hz 16-bit mono: audio/pcm, audio/L16, application/octet-stream)")  # fmt: skip
    return None


def not_samples(head: bytes) -> str | None:
    """Why a 2xx body whose first bytes are ``head`` is not raw samples, whatever its headers
    said: it begins with a container's header (``CONTAINERS``); None when it does not."""
    for magic, kind in CONTAINERS.items():
        if head.startswith(magic):
            return (f"{kind} body, not raw PCM: it begins {magic!r}, where the study asked for "
                    f"response_format pcm ({SAMPLE_RATE} Hz 16-bit mono samples, no header): measure a "
                    "server that answers pcm with the samples alone")  # fmt: skip
    return None


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], at: float, timeout_s: float
) -> tuple[dict[str, Any], bool]:
    """One request sent at ``at`` (perf_counter), read to the end within ``timeout_s``: its row,
    and whether the server refused the request itself (a 4xx other than 408 and 429, which say
    it is busy), redirected it (3xx: httpx follows no redirect) or answered it in another format
    than raw pcm. A 2xx that ends without an audio byte has no error and no first audio: it spoke
    nothing (``silent``), as the in-process study counts a stream that ended with no audio."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    sent = time.perf_counter()
    arrivals: list[float] = []
    seconds: list[float] = []
    row: dict[str, Any] = {"text": body["input"], "seed": body["seed"], "status": None, "replica": None,
                           "server": None, "error": None}  # fmt: skip
    refused = False
    try:
        async with (
            asyncio.timeout(timeout_s),
            # identity: the bytes read are the samples, whatever compression the server offers
            client.stream("POST", f"{url}/v1/audio/speech", json=body, headers=IDENTITY) as response,
        ):
            row["status"], row["replica"] = response.status_code, response.headers.get("x-replica")
            row["server"] = response.headers.get("server")
            if response.status_code >= 300:
                await response.aread()
                row["error"] = f"HTTP {response.status_code}: {_error_message(response)}"
                # a redirect (3xx) is the URL's fault as a 4xx is the request's: no other stream speaks
                refused = response.status_code < 500 and response.status_code not in (408, 429)
            elif wrong := not_raw_pcm(response.headers):
                row["error"], refused = f"HTTP {response.status_code} with {wrong}", True
            else:
                head = b""  # the body's first bytes, which a network may split over reads
                async for data in response.aiter_raw():
                    if len(head) < HEAD_BYTES:
                        head += data[: HEAD_BYTES - len(head)]
                        if not_samples(head):
                            break
                    arrivals.append(time.perf_counter() - sent)
                    seconds.append(len(data) / 2 / SAMPLE_RATE)  # pcm: 16-bit mono samples
                if wrong := not_samples(head):  # no byte of it is audio, the first read not first audio
                    arrivals.clear()
                    seconds.clear()
                    row["error"], refused = f"HTTP {response.status_code} with {wrong}", True
    except httpx.HTTPError as e:  # a dropped connection: this stream failed, the level goes on
        row["error"] = f"{type(e).__name__}: {e}"
    except TimeoutError:
        row["error"] = f"not finished within {timeout_s} s (--timeout)"
    gaps = gap_summary(underruns(arrivals, seconds))
    audio = float(sum(seconds))
    row.update({
        "ttfa_s": arrivals[0] if arrivals else None,
        "wall_s": arrivals[-1] if arrivals else None,
        "audio_s": audio,
        # a stream cut short has no RTF: its last byte is not the end of its audio
        "rtf": arrivals[-1] / audio if audio and row["error"] is None else None,
        **gaps,
    })  # fmt: skip
    return row, refused


async def _level(
    client: httpx.AsyncClient, url: str, model: str, n: int, texts: list[str], *, fields: dict[str, str],
    arrival: tuple[str, float], tokens: int, seed: int, timeout_s: float, bar: Any, first: bool,
) -> dict[str, Any]:  # fmt: skip
    offsets = arrival_offsets(arrival, n, seed)
    t0 = time.perf_counter()

    async def one(k: int) -> tuple[dict[str, Any], bool]:
        body = {"model": model, "input": texts[k % len(texts)], **fields, "response_format": "pcm",
                "seed": seed + k, "max_tokens": tokens}  # fmt: skip
        row, refused = await _stream(client, url, body, t0 + float(offsets[k]), timeout_s)
        row["arrival_s"] = float(offsets[k])  # sent this long after the level began
        bar.update(1)
        return row, refused

    results = await asyncio.gather(*(one(k) for k in range(n)))
    wall = time.perf_counter() - t0
    streams = [row for row, _ in results]
    # A request refused (or answered in another format) on the first level says the study's own
    # requests are wrong for this server: nothing has been measured yet, so it ends the study.
    # Later (a text the first level did not send, say) the measured levels are kept: those
    # streams are failed rows, and the level summaries leave them out.
    refused = [row for row, wrong in results if wrong]
    if first and refused:
        raise EndpointError(f"argument --url: the first level's request to speak {shown(refused[0]['text'])} "
                            f"failed: {refused[0]['error']}")  # fmt: skip
    # Every stream of the first level failed: the endpoint serves nobody. At a later level the
    # server may be overloaded (every stream past --timeout): that is a result, the study goes on.
    # Streams that ended cleanly with no audio are no failure (error None): a level where nobody
    # spoke is reported as such and the study goes on, as in process.
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


async def _run(url: str, levels: list[int], texts: list[str], *, fields: dict[str, str],
               arrival: tuple[str, float], tokens: int, seed: int, timeout_s: float, progress: bool,
               model: str | None, transport: httpx.AsyncBaseTransport | None) -> dict[str, Any]:  # fmt: skip
    limits = httpx.Limits(max_connections=max(levels) + 4)
    timeout = httpx.Timeout(timeout_s, connect=5.0)
    async with httpx.AsyncClient(
        timeout=timeout, limits=limits, transport=transport, trust_env=trusts_env(url)
    ) as client:
        if model is None:
            model = await served_model(client, url, timeout_s)
        runs: list[dict[str, Any]] = []
        here = not trusts_env(url)  # a server on this machine: its speed is this host's
        for n in levels:
            # as the in-process study does (``load.run_level``): a slow spell of the host named
            bandwidth = (
                await asyncio.to_thread(read_bandwidth, "cpu", min_run_time_s=PROBE_S) if here else None
            )
            with progress_bar(
                total=n, desc=streams_label(n), unit="stream", disable=not progress, file=sys.stderr
            ) as bar:
                level = await _level(client, url, model, n, texts, fields=fields, arrival=arrival,
                                     tokens=tokens, seed=seed, timeout_s=timeout_s, bar=bar,
                                     first=not runs)  # fmt: skip
            if bandwidth is not None:
                level["summary"]["read_bandwidth_gb_s"] = bandwidth / 1e9
            runs.append(level)
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
    texts_from: str | None = None,
    model: str | None = None,
    language: str | None = None,
) -> dict[str, Any]:
    """Each level's streams sent to ``url`` (``http://HOST:PORT``) and how many held in real
    time (``load.conclude``); writes ``load.json`` and ``load.png`` to ``outdir`` when given.
    Every request is bounded by ``timeout_s``. ``transport``: httpx's, for stand-in endpoints in
    tests (through ``httpx.ASGITransport`` an app failing mid-stream raises its own error here,
    where over TCP the server drops the connection and the stream is a failed row). ``texts_from``:
    the texts' file, for the report (``load.texts_source``). ``model``: the model each request
    names (``--model``); None: the first ``GET /v1/models`` lists. ``language``: each request's
    ``language`` field (``--language``: what a multilingual model speaks; this workbench's server
    refuses any but English for an English-only model); None: no such field. A ``seed`` one of the
    largest level's streams could not send (``checked_request_seed``), or a ``language`` that is no
    text, is a ConfigError before any request."""
    url = check_url(url)
    if language is not None and as_code(language) is None:
        raise ConfigError(f'argument --language: a language code such as "fr", got {language!r}')
    levels = checked_levels(levels, repr(levels))
    seed = checked_request_seed(seed, levels[-1])
    texts = texts or list(DEFAULT_TEXTS)
    kind = parse_arrival(arrival, levels[-1])
    if outdir is not None:  # an unusable --out found now, not once every level has been measured
        check_folder(outdir)
    # the voice every request names, and the language where one was given (a field of this server's)
    fields = {"voice": voice, **({"language": language} if language is not None else {})}
    got = asyncio.run(_run(url, levels, texts, fields=fields, arrival=kind, tokens=tokens, seed=seed,
                           timeout_s=timeout_s, progress=progress, model=model,
                           transport=transport))  # fmt: skip
    rows = [s for level in got["levels"] for s in level["per_stream"]]
    servers = sorted({s["server"] for s in rows if s["server"]})
    replicas = sorted({s["replica"] for s in rows if s["replica"]})
    source = texts_source(texts, texts_from)
    report: dict[str, Any] = {
        "endpoint": url,
        "model": got["model"],
        "server": ", ".join(servers) or "unnamed",
        "replicas_seen": replicas,
        "voice": voice,
        "language": language,
        "texts": source,
        "arrival": arrival,
        "tokens": tokens,
        "levels": got["levels"],
        "title": f"load study of {url} (model {got['model']}, server {', '.join(servers) or 'unnamed'}, "
        f"{len(replicas) or 'unnamed'} replica(s) answered), voice {voice}"
        f"{'' if language is None else ', language ' + language}, texts {source}, "
        f"arrival {arrival}, max_tokens {tokens} per stream, measured from the bytes' arrival",
        "note": f"each stream ends where the server ends it, at max_tokens={tokens} at most "
        f"({token_cap_note(None)})",
    }
    return conclude(report, first_audio_limit_s, outdir)
