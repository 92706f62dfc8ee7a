"""The HTTP routes over one ``SpeechService`` (FastAPI): OpenAI's speech and model list, health
and Prometheus metrics. Every answer names the replica that gave it (``x-replica``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .protocol import FORMATS, RequestError, parse_speech
from .service import SpeechService


def speech_app(service: SpeechService) -> FastAPI:
    """The FastAPI app of ``service``: ``POST /v1/audio/speech``, ``GET /v1/models``,
    ``GET /health``, ``GET /metrics``."""
    app = FastAPI(title="tts-workbench", description="Chatterbox streams behind OpenAI's speech API")

    @app.middleware("http")
    async def name_replica(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["x-replica"] = service.replica
        return response

    @app.exception_handler(RequestError)
    async def refused(_request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> StreamingResponse:
        try:
            body: Any = json.loads(await request.body())
        # not JSON, not UTF-8, an integer of over 4300 digits, nesting deeper than the stack
        except (ValueError, RecursionError) as e:
            raise RequestError(
                f'the body is not valid JSON ({e}): send {{"model": ..., "input": "Hello"}}'
            ) from e
        req = parse_speech(body, service.limits, service.options.default_tokens)
        audio = await service.speech(req)
        return StreamingResponse(audio, media_type=FORMATS[req.response_format])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {
            "id": service.model_id,
            "object": "model",
            "created": service.created,
            "owned_by": "tts-workbench",
        }
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> JSONResponse:
        state = service.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app
