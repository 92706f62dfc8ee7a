"""The workbench's exception types: one per condition, each message naming the cause and the fix.

All derive from ``WorkbenchError`` (a ``ValueError``, so code that caught ``ValueError`` before
still does); the CLI turns any of them into one ``error:`` line and exit code 2, ``naming_flag``
puts the flag in front of a refusal raised below the CLI. ``as_int`` is the one test of "a whole
number" behind every such refusal, ``unicode_problem`` the one test of valid UTF-8 text (a
request's, a flag's) in a module light enough for argument parsing. ``error_line`` is how a
caught error is named in one line of a report or a refusal.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager


class WorkbenchError(ValueError):
    """Bad input or a model the workbench cannot use; the message says what to do."""


class SourceError(WorkbenchError):
    """A model source, checkpoint folder, device or reference file cannot be used."""


class FamilyError(SourceError):
    """A model folder of another family than the one asked for, or of two with none asked for."""


# What each kind of caller can do about no voice (NoVoiceError's ``fix``): generate takes a
# reference's path; a stream and the stream engine take a prepared voice (``conds=``); the
# wrapper's T3-only and S3Gen-only calls take neither.
PREPARE_FIRST = "call prepare_voice(tts, wav) / prepare_conditionals(wav) first"
PASS_A_PATH = f"pass audio_prompt_path or {PREPARE_FIRST}"
PASS_CONDS = f"{PREPARE_FIRST}, or pass conds= (a voice this model prepared)"


class NoVoiceError(WorkbenchError):
    """Generation was asked for before a voice (conditionals) was prepared; ``fix``: what the
    caller can do (``PASS_A_PATH``, ``PASS_CONDS`` or ``PREPARE_FIRST``)."""

    def __init__(self, detail: str = "", fix: str = PASS_A_PATH) -> None:
        super().__init__(f"no voice: {fix}" + (f" ({detail})" if detail else ""))


class EmptyTextError(WorkbenchError):
    """The text to speak is empty or only whitespace."""

    def __init__(self) -> None:
        super().__init__("text is empty: give at least one word to speak")


class ConfigError(WorkbenchError):
    """An option is out of range or unknown (dtype policy, strategy, window size, token cap ...)."""


class CacheError(WorkbenchError):
    """A static KV cache cannot hold the request (too long, wrong device or dtype)."""


class NoSpeechError(WorkbenchError):
    """T3 sampled no speech token, so a one-shot generation has nothing to vocode."""

    def __init__(self, sampled: int) -> None:
        super().__init__(
            f"no speech token among the {sampled} ids T3 sampled (random weights sample ids past the "
            "speech vocabulary, which are dropped), so S3Gen has nothing to vocode: sample more tokens "
            "(max_new_tokens, --tokens) or use another seed"
        )


class TraceError(WorkbenchError):
    """A file is not a profiler trace the workbench can read, or lacks the region asked for."""


def as_int(value: object) -> int | None:
    """``value`` as an ``int`` when it is a whole number (a Python or numpy integer: anything with
    ``__index__``), else None. A bool is not one: ``True`` is an ``int`` to Python, but a token
    count or a seed of ``True`` is a caller's mistake, not 1. Nor is an array: a torch tensor has
    ``__index__`` for one element of any rank, a boolean one's included."""
    if isinstance(value, bool):  # numpy's bool has no __index__
        return None
    if getattr(value, "ndim", 0) != 0 or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:  # a float, a str, None: no __index__
        return None


def as_code(value: object) -> str | None:
    """``value`` without the spaces around it when it is a ``str`` holding more than spaces (a
    language code, say), else None: the one test behind the server's ``language`` field and the
    load client's ``--language``."""
    return value.strip() or None if isinstance(value, str) else None


def whole_from_one(value: object, refusal: str) -> int:
    """``value`` as an ``int`` where it is a whole number of at least 1 (``as_int``), else a
    ``ConfigError`` saying ``refusal``: a count a caller gives (streams, samples per second)."""
    whole = as_int(value)
    if whole is None or whole < 1:
        raise ConfigError(refusal)
    return whole


@contextmanager
def naming_flag(flag: str, *errors: type[WorkbenchError]) -> Iterator[None]:
    """Raise any of ``errors`` again, of its type, with ``argument FLAG:`` in front, as argparse
    words its own refusals: the check below the CLI knows the value, not the flag it came from.
    ``errors`` are types made from a message alone (not ``NoVoiceError``, ``EmptyTextError``); one
    that names its flag already (an inner ``naming_flag`` for a narrower type) is left as it is."""
    try:
        yield
    except errors as e:
        if str(e).startswith("argument "):  # named already, by a check nearer the cause
            raise
        raise type(e)(f"argument {flag}: {e}") from None


def error_line(e: BaseException, named: bool = True) -> str:
    """``e`` in one line: its message's first line that says something, after ``Type:`` when
    ``named``; its type's name alone when the message is empty (a bare ``assert``). Many errors
    put pages of advice after the first line, and some start with a blank one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0]}" if named else lines[0]


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate, which no tokenizer takes), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{e.reason} at character {e.start}"
    return None
