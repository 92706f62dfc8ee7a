"""The HTTP routes over one ``SpeechService`` (FastAPI): OpenAI's speech and model list, health
and Prometheus metrics. Every answer names the replica that gave it (``x-replica``); every error
is OpenAI's error body, Starlette's own 404 and 405 included."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import FORMATS, RequestError, SpeechRequest, parse_speech
from .service import SpeechService, SpeechStream

CLIENT_CLOSED = 499  # nginx's status for a request whose client closed it: logs tell it from a 4xx or 5xx


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: Starlette's own ``JSONResponse`` writes UTF-8,
    which a lone surrogate from the request (a field named ``"\\ud800"``, echoed as ``param``)
    cannot be (before 2026-12-04: a plain-text 500 in place of the 400)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")  # as Starlette's


class NameReplica:
    """ASGI middleware: ``x-replica`` on every HTTP answer. Plain ASGI, not ``@app.middleware``
    (Starlette's BaseHTTPMiddleware): that one ends a stream whose audio fails mid-way as a whole
    200 (it closes the body, then re-raises), where without it the server drops the connection
    and the client sees the stream cut short. An error nothing answered before the response
    started gets OpenAI's error body as a 500 here, with the header (Starlette's own 500 sits
    outside this middleware)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (b"x-replica", replica.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and any websocket) passes through untouched
            await self.app(scope, receive, send)
            return

        started = False

        async def named(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        try:
            await self.app(scope, receive, named)
        except Exception as e:
            if not started:  # else Starlette's plain-text 500 (outside this middleware) had no x-replica
                name = type(e).__name__
                error = RequestError(f"internal error ({name}): the replica's log has it", status=500)
                await AsciiJSON(error.body(), status_code=500)(scope, receive, named)
            raise  # for the server's log (a stream cut mid-way stays cut, as the docstring says)


class SpeechResponse(StreamingResponse):
    """The audio of one speech request, its engine stream closed however the response ends.
    Starlette never closes a StreamingResponse's body: when the client's leaving reaches it
    outside the body's read (a send that raises OSError, ASGI 2.4; a cancel in a blocked send,
    2.3; a cancel before the first read), the body is left suspended until the cyclic GC finds
    it (before: the engine decoded for nobody meanwhile, its slot held, its outcome uncounted)."""

    body_iterator: SpeechStream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # closed even when the handler is cancelled
                await self.body_iterator.aclose()


def speech_app(service: SpeechService) -> FastAPI:
    """The FastAPI app of ``service``: ``POST /v1/audio/speech``, ``GET /v1/models``,
    ``GET /health``, ``GET /metrics``. A client that leaves before its first chunk (while its
    request is queued, say) frees its place at once, under Ray Serve (whose proxy cancels the
    handler) and under a plain ASGI server such as uvicorn (``unless_gone``) alike."""
    # No /docs, /redoc or /openapi.json: the four routes below are the server (FastAPI's pages
    # loaded their scripts from a CDN, which an offline machine cannot reach)
    app = FastAPI(
        title="tts-workbench",
        description="Chatterbox streams behind OpenAI's speech API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    app.add_middleware(NameReplica, replica=service.replica)

    @app.exception_handler(RequestError)
    async def refused(_request: Request, e: RequestError) -> JSONResponse:
        return AsciiJSON(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, e: HTTPException) -> JSONResponse:
        """Starlette's own 404 (no such path) and 405 (wrong method), in OpenAI's error body too."""
        routes = ", ".join(
            f"{method} {route.path}" for route in app.routes if isinstance(route, APIRoute)
            for method in sorted(route.methods or ())
        )  # fmt: skip
        error = RequestError(f"{request.method} {request.url.path}: {e.detail}: this server answers {routes}",
                             status=e.status_code)  # fmt: skip
        return AsciiJSON(error.body(), status_code=e.status_code, headers=e.headers)

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        try:
            req = await read_speech(request, service)
        except RequestError:  # (service.speech counts its own refusals)
            service.outcomes["refused"].inc()
            raise
        except ClientDisconnect:  # gone before its body was whole: nobody reads an answer
            service.outcomes["disconnected"].inc()
            return Response(status_code=CLIENT_CLOSED)
        except asyncio.CancelledError:  # the same, as Ray Serve's proxy says it: it cancels the handler
            service.outcomes["disconnected"].inc()
            raise
        audio = await unless_gone(request, service.speech(req))
        if audio is None:  # gone while its request waited for its first chunk (rows freed, counted)
            return Response(status_code=CLIENT_CLOSED)
        return SpeechResponse(audio, media_type=FORMATS[req.response_format])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {
            "id": service.model_id,
            "object": "model",
            "created": service.created,
            "owned_by": "tts-workbench",
            # this server's own: what a request may send in ``voice`` and ``language``
            "voices": list(service.voices),
            "languages": service.languages,
        }
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> JSONResponse:
        state = service.health()
        return AsciiJSON(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app


async def unless_gone(request: Request, start: Coroutine[Any, Any, SpeechStream]) -> SpeechStream | None:
    """``start``'s stream, or None if the client left first. Ray Serve's proxy cancels the
    handler of a client that left, and ``SpeechService.speech`` frees a cancelled start's rows
    and counts it disconnected; a plain ASGI server (uvicorn) says so only as an
    ``http.disconnect`` from ``receive``, which nothing reads before the response starts, so
    this watches it meanwhile and cancels the handler the same way (before 2026-12-07 a request
    whose client left while it was queued was admitted and decoded up to its first chunk for
    nobody)."""
    handler = asyncio.current_task()
    assert handler is not None  # (an ASGI app runs in a task)
    left = False

    async def watch() -> None:
        """Cancel the handler once the client has left. A receive that raises (Ray Serve's proxy
        raises its own failures there) ends the watch only; its ``cancel()`` below drops the error."""
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass  # the body was read whole already: nothing else comes before the client leaves
        left = True
        handler.cancel()

    watching = asyncio.ensure_future(watch())
    try:
        return await start  # awaited in the handler's task, so that a cancel always lands inside it
    except asyncio.CancelledError:
        if left and handler.uncancel() == 0:  # the watcher's cancel, no one else's
            return None
        raise
    finally:
        watching.cancel()


async def read_speech(request: Request, service: SpeechService) -> SpeechRequest:
    """The request's body as a checked speech request, or a ``RequestError`` saying what is wrong."""
    raw = await read_body(request, service.limits.max_body_bytes)
    try:
        # UTF-8 as RFC 8259 requires: json.loads of bytes would also take UTF-16, UTF-32 and a BOM
        body: Any = json.loads(raw.decode("utf-8"))
    # not UTF-8 (UnicodeDecodeError is a ValueError), not JSON (a BOM included), an integer of
    # over 4300 digits, nesting deeper than the stack
    except (ValueError, RecursionError) as e:
        raise RequestError(
            f"the body is not valid JSON ({e}): "
            'send {"model": ..., "input": "Hello", "response_format": "pcm"}'
        ) from e
    return parse_speech(body, service.limits, service.options.default_tokens)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or a 413 ``RequestError`` once it is over ``limit`` bytes: by its
    declared length before a byte is read, or (sent chunked) as soon as the bytes that came pass
    it, so a huge body is neither held nor parsed."""
    too_large = RequestError(
        f"the request body is over {limit} bytes: send at most {limit} bytes, the speech fields only "
        "(split a long input and send the parts as separate requests)", status=413,
    )  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)
