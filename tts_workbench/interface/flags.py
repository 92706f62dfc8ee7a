"""The command line's flags: the parser class, each flag's value type (a bad value ends with one
``error:`` line naming the flag), and the flag groups several commands share. Light on purpose:
``--help`` and a refused value come before torch and chatterbox are imported (~6 s on 2 cores)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, NoReturn

# (constants.UPSTREAM_SENTENCE's start: this module is read before torch is imported, constants after)
TEXT_HELP = "text to speak (default: upstream's English example, 'Ezreal and Jinx teamed up with ...')"


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help, except where there is none to show (no default, a
    switch) or the help gives it; description and epilog wrapped line by line, with lines
    indented by two spaces (examples) kept as they are."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not nothing and "(default" not in text:
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            kept = not line or line.startswith("  ")
            lines.append(indent + line if kept else super()._fill_text(line, width, indent))
        return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse's parser with no abbreviated flags and one ``error:`` line pointing at ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviated flags: `load --text ""` would silently be taken as `--texts ""`.
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _integer(value: str, low: int, high: int | None = None, what: str = "a positive integer") -> int:
    """``value`` as an int in [low, high], else the error argparse prints after the flag."""
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if n < low or (high is not None and n > high):
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
    return n


def _number(value: str, what: str, zero: bool) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``zero``), else the error argparse prints
    after the flag (inf and nan are refused: a window or timeout of inf seconds is a typo)."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0 or (x == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
    return x


def seconds(value: str) -> float:
    """A positive number of seconds (a timeout, a limit)."""
    return _number(value, "a positive number of seconds", zero=False)


def _span(value: str, what: str, zero: bool, most: float) -> float:
    """``_number`` up to ``most``: a window or prompt of an hour at most (streaming's MAX_SPAN_S,
    not imported: the parser stays light; 1e308 s overflowed a count of tokens), a crossfade of
    ``MAX_CROSSFADE_MS``."""
    x = _number(value, what, zero)
    if x > most:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
    return x


def window(value: str) -> float:
    """A window's or prompt's seconds of audio: positive, an hour at most."""
    return _span(value, "a positive number of seconds up to 3600", zero=False, most=3600)


def given(value: str) -> str:
    """A flag's value that is not empty: an empty one (an unset shell variable) would otherwise
    read as not given (``load --url ""`` measuring this process) or as the working folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty: give a value, or leave the flag out for its default"
        )
    return value


def path(value: str) -> str:
    """A file or folder flag's value, not empty (``given``) and valid UTF-8: argv bytes that are
    not would reach soundfile (or a checkpoint reader) after the model is built and fail there
    with a codec error naming no flag."""
    from ..core.errors import unicode_problem

    value = given(value)
    if problem := unicode_problem(value):
        raise argparse.ArgumentTypeError(
            f"the path is not valid UTF-8 ({problem}), which the audio and trace writers need: "
            "give a path whose name is UTF-8"
        )
    return value


# The longest crossfade buffered streaming takes: half of it lies on either side of a seam, in the
# 3 tokens of 40 ms that StreamConfig's default left context and lookahead hold. No flag sets those,
# so a longer one is refused here, naming --crossfade-ms alone (StreamConfig's refusal asks for a
# longer context). Not imported: the parser stays light; a test ties them.
MAX_CROSSFADE_MS = 240


def fade(value: str) -> float:
    """A crossfade's milliseconds, 0 to ``MAX_CROSSFADE_MS``."""
    what = f"a number of milliseconds from 0 to {MAX_CROSSFADE_MS}"
    return _span(value, what, zero=True, most=MAX_CROSSFADE_MS)


def positive(value: str) -> int:
    """An integer >= 1 (a count of tokens, repeats, replicas)."""
    return _integer(value, 1)


def non_negative(value: str) -> int:
    """An integer >= 0 (untimed warm-up runs)."""
    return _integer(value, 0, what="an integer >= 0")


def _positive_ints(value: str, example: str, item: str) -> tuple[int, ...]:
    """``value``'s comma list as positive integers, ascending; one given twice is refused (before:
    merged silently)."""
    try:
        sizes = sorted(int(v) for v in value.split(","))
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(
            f"must be a list of positive integers such as {example}, got {value!r}"
        )
    if len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError(f"a {item} is given twice in {value!r}: give each once")
    return tuple(sizes)


def batches(value: str) -> tuple[int, ...]:
    """``"1,4"`` → ``(1, 4)``: windows per flow call or streams per step (``StreamEngine``'s
    ``flow_batches``, ``step_buckets``)."""
    return _positive_ints(value, "1,4", "size")


def levels(value: str) -> tuple[int, ...]:
    """``"4,1,2"`` → ``(1, 2, 4)``: a load study's concurrency levels, ascending (the figure's
    lines and the real-time verdict read them so), refused here before torch is imported (before
    2026-12-07 after it, ~8 s); the study's own check (``load.checked_levels``) adds the largest
    level any device could hold."""
    return _positive_ints(value, "1,2,4,8", "level")


def comma_list(value: str, flag: str, example: str) -> list[str]:
    """The items of ``flag``'s comma list ``value``, stripped; none where it names none (the
    command says what to give). An empty item among others (``a,,b``, a comma at either end) is
    refused, as ``load --streams`` refuses it, not dropped."""
    from ..core.errors import ConfigError

    items = [item.strip() for item in value.split(",")]
    if not any(items):
        return []
    if "" in items:
        raise ConfigError(f"argument {flag}: an empty item in {value!r}: give a list such as {example}")
    return items


def seed(value: str) -> int:
    """A seed torch takes: 0 to 2**63 - 1."""
    return _integer(value, 0, 2**63 - 1, "an integer from 0 to 2**63 - 1")


def port(value: str) -> int:
    """A TCP port to listen on, 1 to 65535."""
    return _integer(value, 1, 65535, "a port number from 1 to 65535")  # 0 would print no usable URL


def reference(
    p: argparse.ArgumentParser, what: str = "WAV of the voice (default: a generated 10 s voice-like signal)"
) -> None:
    """``--reference``: the voice's WAV."""
    p.add_argument("--reference", type=path, help=what)


def on_command_line(argv: Sequence[str]) -> set[str]:
    """The flags on the command line, ``--flag`` or ``--flag=value`` (argparse reads a word that
    starts with ``--`` as a flag unless it holds a space, and then it names no flag). A flag
    given with its default value is given all the same, which the parsed value cannot tell."""
    return {word.split("=", 1)[0] for word in argv if word.startswith("--")}


def refuse_given(args: argparse.Namespace, flags: Sequence[str], why: str) -> None:
    """Refuse the first of ``flags`` on the command line: this run would ignore it."""
    for flag in flags:
        if flag in args.flags_given:
            raise ValueError(f"argument {flag}: {why}")


MODEL_HELP = (
    "tiny (default), deep-narrow, random, turbo-tiny, turbo-random, multilingual-tiny, multilingual-random "
    "(random weights), pretrained, turbo-pretrained, multilingual-pretrained, or PATH to a checkpoint folder"
)


# core.families.FAMILIES (not imported: the parser stays light; a test ties them)
FAMILY_CHOICES = ("standard", "turbo", "multilingual")


def family(p: argparse.ArgumentParser) -> None:
    """``--family``: which model of a folder holding two."""
    p.add_argument(
        "--family",
        choices=FAMILY_CHOICES,
        help="which model to load of a --model folder holding two families' files (a copy of "
        "upstream's ResembleAI/chatterbox repository holds the standard and the multilingual one)",
    )


def common(p: argparse.ArgumentParser, model_help: str = MODEL_HELP) -> None:
    """The model and run flags."""
    p.add_argument("--model", type=path, default="tiny", help=model_help)
    family(p)
    p.add_argument("--tokens", type=positive, default=150, help="cap on generated speech tokens")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random weights and of sampling")
    p.add_argument("--device", type=given, default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def language_flag(p: argparse.ArgumentParser, also: str = "") -> None:
    """``--language``: a multilingual model's (``spoken_language``); ``also``: the end of its help."""
    p.add_argument(
        "--language",
        type=given,
        help="the language a multilingual model speaks (default: en; one of upstream's 23 codes); the "
        "other families speak English only" + also,
    )


def engine_flags(p: argparse.ArgumentParser) -> None:
    """The stream engine's T3 step and weights dtype, and its flow (``load`` and ``serve``)."""
    p.add_argument(
        "--decode",
        default="static",
        choices=["static", "compiled"],
        help="the engine's batched T3 step: static (one cache allocated at its largest) or compiled "
        "(through torch.compile); it has no eager step",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "decode-bfloat16"],
        help="dtype of T3's weights in each engine (a copy; S3Gen runs as loaded)",
    )
    p.add_argument(
        "--step-buckets",
        type=batches,
        help="streams a T3 step runs over, e.g. 1,8: the live streams padded to the next, the engine's "
        "--max-streams (load: each level) always one; a compiled step compiles each (default 1,2,4,...)",
    )
    p.add_argument(
        "--flow",
        default="eager",
        choices=["eager", "compiled"],
        help="S3Gen's CFM estimator in the engine: eager, or compiled once per voice, window kind and "
        "batch size (CUDA graphs on CUDA; the load study's levels share it)",
    )
    p.add_argument(
        "--flow-batches",
        type=batches,
        help="windows per flow call, e.g. 1,4: at most the largest; a compiled estimator pads each call to "
        "the next and compiles each size (default 1,2,4,... up to the engine's streams)",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="T3's step with q, k, v and gate, up each one matmul (a copy of the backbone)",
    )
    p.add_argument(
        "--alignment",
        action="store_true",
        help="Multilingual: each stream runs upstream's alignment analyzer, which stops it as upstream's "
        "generate does (the static step, eager attention)",
    )
