"""OpenAI's ``POST /v1/audio/speech``, as this server speaks it: the request's fields, the
errors (OpenAI's ``{"error": {...}}`` body, naming the field and the fix) and the bytes.

The audio is OpenAI's ``pcm`` (24 kHz, signed 16-bit little-endian, mono, no header) or
``wav`` (the same samples after a 44-byte header whose sizes say "unknown length", as a stream
cannot know its length when it starts). Nothing here touches torch or the network.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.constants import REQUEST_SEEDS, SAMPLE_RATE
from ..core.errors import as_code, as_int, unicode_problem
from ..core.positions import positions_needed, tokens_that_fit

FORMATS = {"pcm": "audio/pcm", "wav": "audio/wav"}
# The fields a request may carry: OpenAI's, and three of this server's own (seed, max_tokens, and
# language: what a multilingual model speaks, a field OpenAI's speech API does not have).
FIELDS = ("model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
          "seed", "max_tokens", "language")  # fmt: skip


class RequestError(ValueError):
    """A request the server will not run: HTTP ``status``, the field (``param``), the fix, and
    OpenAI's ``code`` where OpenAI has one (``model_not_found``)."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server."""

    model: str  # the id a request names in ``model``
    voices: tuple[str, ...]
    max_input_chars: int = 1000
    max_tokens: int = 1000  # the largest max_tokens: what a cache holds after the shortest prompt

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: the longest input with every character a JSON escape
        (a surrogate pair ``\\uXXXX\\uXXXX``, 12 bytes, outside the Basic Multilingual Plane),
        and 64 KiB for the other fields and whitespace."""
        return 12 * self.max_input_chars + 64 * 1024


@dataclass(frozen=True)
class SpeechRequest:
    """A ``POST /v1/audio/speech`` body, checked (``parse_speech``)."""

    input: str
    voice: str
    response_format: str
    seed: int
    max_tokens: int
    tokens_sent: bool = True  # False: max_tokens is the server's default (--tokens), not the client's
    language: str | None = None  # None: the model's default ("en" for a multilingual one)


def parse_speech(body: Any, limits: Limits, default_tokens: int = 150) -> SpeechRequest:
    """Check a decoded JSON body field by field; the first problem raises a ``RequestError``."""
    if not isinstance(body, dict):
        raise RequestError(
            "the body must be a JSON object such as "
            '{"model": ..., "input": "Hello", "response_format": "pcm"}'
        )
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: the fields are {', '.join(FIELDS)}", unknown[0])
    model = body.get("model")
    if model is None:
        raise RequestError(f'model is missing: send "model": "{limits.model}" (GET /v1/models)', "model")
    if model != limits.model:
        named = isinstance(model, str)  # a name not served is OpenAI's model_not_found, a 404
        raise RequestError(
            f"model {model!r} is not served here: use {limits.model!r} (GET /v1/models)", "model",
            404 if named else 400, "model_not_found" if named else None,
        )  # fmt: skip
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise RequestError("input is missing or empty: give the text to speak as a non-empty string", "input")
    if problem := unicode_problem(text):  # JSON may escape a lone surrogate (\\ud800)
        raise RequestError(f"input is not valid Unicode text ({problem}): send the text as UTF-8, "
                           "without lone surrogate escapes", "input")  # fmt: skip
    if len(text) > limits.max_input_chars:
        raise RequestError(
            f"input has {len(text)} characters, more than this server's {limits.max_input_chars}: "
            "split the text and send the parts as separate requests", "input",
        )  # fmt: skip
    voice = body.get("voice", "default")
    if voice is None:
        raise RequestError(f"voice is null: leave it out (the default voice) or send one of "
                           f"{', '.join(limits.voices)}", "voice")  # fmt: skip
    if voice not in limits.voices:  # a 400, as OpenAI answers a voice it does not have
        raise RequestError(
            f"unknown voice {voice!r}: use one of {', '.join(limits.voices)} (the server's --voices "
            "folder, by file stem)", "voice",
        )  # fmt: skip
    fmt = body.get("response_format")
    if fmt is None:  # openai-python leaves it out, meaning mp3: served pcm, it saved an unplayable .mp3
        raise RequestError(
            "response_format is required here: OpenAI's default is mp3, which this server does not serve; "
            'send "pcm" (24 kHz 16-bit mono) or "wav"',
            "response_format",
        )
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise RequestError(f"response_format {fmt!r} is not supported: use pcm or wav", "response_format")
    speed = body.get("speed", 1.0)
    if not isinstance(speed, int | float) or isinstance(speed, bool) or speed != 1.0:
        raise RequestError(f"speed {speed!r} is not supported: leave it out or send 1.0", "speed")
    if body.get("stream_format", "audio") != "audio":
        raise RequestError("stream_format: only 'audio' (raw audio bytes) is served", "stream_format")
    if body.get("instructions") not in (None, ""):  # false, 0, [] too: a field of the wrong type
        raise RequestError("instructions are not supported by Chatterbox: leave them out", "instructions")
    seed = body.get("seed", 0)
    if as_int(seed) is None or not 0 <= seed < REQUEST_SEEDS:
        raise RequestError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}", "seed")
    tokens = body.get("max_tokens", default_tokens)
    if as_int(tokens) is None or not 1 <= tokens <= limits.max_tokens:
        raise RequestError(f"max_tokens must be an integer from 1 to {limits.max_tokens}, got {tokens!r}",
                           "max_tokens")  # fmt: skip
    # Whether the model speaks it is the service's to say (it knows the model): only the type here;
    # null is no language, as a field left out (the model's default)
    language = body.get("language")
    if language is not None and as_code(language) is None:
        raise RequestError(f'language must be a language code such as "fr", got {language!r}', "language")
    return SpeechRequest(text, voice, fmt, seed, tokens, "max_tokens" in body, as_code(language))


def check_cache(prefill: int, max_tokens: int, max_cache_len: int) -> None:
    """A ``RequestError`` when the input's ``prefill`` positions and ``max_tokens`` exceed the
    ``max_cache_len`` KV cache positions a stream has: the field to change, and by how much."""
    if positions_needed(prefill, max_tokens) <= max_cache_len:
        return
    room = tokens_that_fit(prefill, max_cache_len)
    if room >= 1:
        raise RequestError(
            f"input needs {prefill} cache positions and max_tokens {max_tokens} needs {max_tokens - 1} more "
            f"(its last token is never fed back), this server holds {max_cache_len}: "
            f"send max_tokens <= {room}",
            "max_tokens",
        )  # fmt: skip
    raise RequestError(
        f"input needs {prefill} cache positions, this server holds {max_cache_len} and needs room for "
        "at least one token: shorten the input (split the text and send the parts as separate requests)",
        "input",
    )


def pcm16(chunk: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as signed 16-bit little-endian bytes (clipped, rounded)."""
    return (np.clip(chunk, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as OpenAI's
    streamed WAV; players read to the end of the data)."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + \
        struct.pack("<I", unknown)  # fmt: skip
