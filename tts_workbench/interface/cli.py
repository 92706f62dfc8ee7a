"""``tts-workbench`` command line. Bad input ends with one ``error:`` line and exit code 2; a Ctrl-C
with one and exit code 130."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from ..core import strict_json
from ..core.policies import NAMED_POLICIES, POLICIES
from ..core.quiet import quiet_libraries, upstream_silenced

TEXT_HELP = "text to speak (default: upstream's example sentence, constants.UPSTREAM_SENTENCE)"


DESCRIPTION = (
    "Diagnostic and profiling workbench for Chatterbox text-to-speech: where precision breaks, "
    "which attention kernel runs, where the time goes, and how many streams one device holds. "
    "The models have random weights unless --model names pretrained ones or a checkpoint folder: "
    "the timing is realistic, the audio is meaningless."
)
EPILOG = """example:
  tts-workbench diagnose --model tiny --dtype float16 --decode compiled

Each command has its own help (tts-workbench COMMAND --help). Bad input ends with one error line \
and exit code 2. More in README.md and the documentation site (make docs, then open \
site/index.html)."""


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


class _Parser(argparse.ArgumentParser):
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


def _seconds(value: str) -> float:
    return _number(value, "a positive number of seconds", zero=False)


def _span(value: str, what: str, zero: bool, most: float) -> float:
    """``_number`` up to ``most``: a window or prompt of an hour at most (streaming's MAX_SPAN_S,
    not imported: the parser stays light; 1e308 s overflowed a count of tokens), a crossfade of
    ``MAX_CROSSFADE_MS``."""
    x = _number(value, what, zero)
    if x > most:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
    return x


def _window(value: str) -> float:
    return _span(value, "a positive number of seconds up to 3600", zero=False, most=3600)


def _given(value: str) -> str:
    """A flag's value that is not empty: an empty one (an unset shell variable) would otherwise
    read as not given (``load --url ""`` measuring this process) or as the working folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty: give a value, or leave the flag out for its default"
        )
    return value


def _path(value: str) -> str:
    """A file or folder flag's value, not empty (``_given``) and valid UTF-8: argv bytes that are
    not would reach soundfile (or a checkpoint reader) after the model is built and fail there
    with a codec error naming no flag."""
    from ..core.errors import unicode_problem

    value = _given(value)
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


def _fade(value: str) -> float:
    what = f"a number of milliseconds from 0 to {MAX_CROSSFADE_MS}"
    return _span(value, what, zero=True, most=MAX_CROSSFADE_MS)


def _positive(value: str) -> int:
    return _integer(value, 1)


def _non_negative(value: str) -> int:
    return _integer(value, 0, what="an integer >= 0")


def _batches(value: str) -> tuple[int, ...]:
    """``"1,4"`` → ``(1, 4)``: windows per flow call or streams per step (``StreamEngine``'s
    ``flow_batches``, ``step_buckets``); a size given twice is refused, as ``--streams`` refuses
    a level given twice (before: merged silently)."""
    try:
        sizes = sorted(int(v) for v in value.split(","))
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"must be a list of positive integers such as 1,4, got {value!r}")
    if len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError(f"a size is given twice in {value!r}: give each once")
    return tuple(sizes)


def _comma_list(value: str, flag: str, example: str) -> list[str]:
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


def _seed(value: str) -> int:
    return _integer(value, 0, 2**63 - 1, "an integer from 0 to 2**63 - 1")


def _port(value: str) -> int:
    return _integer(value, 1, 65535, "a port number from 1 to 65535")  # 0 would print no usable URL


def _check_reference(args: argparse.Namespace) -> None:
    """A ``--reference`` that names no file, refused before the model is built (a full-size build
    takes a while); what the file holds is checked when the voice is prepared."""
    value = getattr(args, "reference", None)
    if value is not None and not Path(value).is_file():
        what = "is a folder, not a file" if Path(value).is_dir() else "does not exist"
        raise ValueError(f"argument --reference: reference audio {value} {what}: give a WAV of the voice")


def _check_reference_audio(args: argparse.Namespace) -> None:
    """What a ``--reference`` file holds (readable audio, long and loud enough), refused before the
    model is built; Turbo's longer minimum is checked when the voice is prepared."""
    from ..core.errors import SourceError, naming_flag
    from ..models.reference import check_reference

    if getattr(args, "reference", None) is not None:
        with naming_flag("--reference", SourceError):
            check_reference(args.reference)


def _reference(
    p: argparse.ArgumentParser, what: str = "WAV of the voice (default: a generated 10 s voice-like signal)"
) -> None:
    p.add_argument("--reference", type=_path, help=what)


def _check_decode_tokens(tokens: int) -> None:
    """A per-step time needs a decode step: the first token comes from the prefill."""
    if tokens < 2:
        raise ValueError("argument --tokens: at least 2 (the first token comes from the prefill)")


def _flags_given(argv: Sequence[str]) -> set[str]:
    """The flags on the command line, ``--flag`` or ``--flag=value`` (argparse reads a word that
    starts with ``--`` as a flag unless it holds a space, and then it names no flag). A flag
    given with its default value is given all the same, which the parsed value cannot tell."""
    return {word.split("=", 1)[0] for word in argv if word.startswith("--")}


def _refuse_given(args: argparse.Namespace, flags: Sequence[str], why: str) -> None:
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


def _family(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--family",
        choices=FAMILY_CHOICES,
        help="which model to load of a --model folder holding two families' files (a copy of "
        "upstream's ResembleAI/chatterbox repository holds the standard and the multilingual one)",
    )


def _common(p: argparse.ArgumentParser, model_help: str = MODEL_HELP) -> None:
    """The model and run flags."""
    p.add_argument("--model", type=_path, default="tiny", help=model_help)
    _family(p)
    p.add_argument("--tokens", type=_positive, default=150, help="cap on generated speech tokens")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random weights and of sampling")
    p.add_argument("--device", type=_given, default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _language_flag(p: argparse.ArgumentParser) -> None:
    """``--language``: a multilingual model's (``spoken_language``)."""
    p.add_argument(
        "--language",
        type=_given,
        help="the language a multilingual model speaks (default: en; one of upstream's 23 codes); the "
        "other families speak English only",
    )


def _engine_flags(p: argparse.ArgumentParser) -> None:
    """The stream engine's T3 step and weights dtype, and its flow (``load`` and ``serve``)."""
    p.add_argument(
        "--decode",
        default="static",
        choices=["static", "compiled"],
        help="the engine's batched T3 step (runtime/batched_step.py; it has no eager step)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "decode-bfloat16"],
        help="dtype of T3's weights in each engine (a copy; S3Gen runs as loaded)",
    )
    p.add_argument(
        "--step-buckets",
        type=_batches,
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
        type=_batches,
        help="windows per flow call, e.g. 1,4: at most the largest; a compiled estimator pads each call to "
        "the next and compiles each size (default 1,2,4,... up to the engine's streams)",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="T3's step with q, k, v and gate, up each one matmul (a copy of the backbone; "
        "runtime/fusion.py)",
    )
    p.add_argument(
        "--alignment",
        action="store_true",
        help="Multilingual: each stream runs upstream's alignment analyzer, which stops it as upstream's "
        "generate does (the static step, eager attention)",
    )


def _diagnose(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from ..core.constants import parse_dtype
    from ..studies.diagnose import format_report, run_diagnosis

    report = run_diagnosis(
        model=args.model,
        text=args.text,
        reference=args.reference,
        tokens=args.tokens,
        seed=args.seed,
        device=args.device,
        outdir=args.out,
        dtype=parse_dtype(args.dtype),
        autocast=parse_dtype(args.autocast) if args.autocast else None,
        decode=args.decode,
        family=args.family,
        progress=True,
        language_id=args.language,
    )
    return report, format_report


def _bench(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from ..studies.bench import format_bench, run_bench

    _check_decode_tokens(args.tokens)
    configs = tuple(_comma_list(args.configs, "--configs", "upstream,optimized"))
    if configs and all(c.startswith("upstream") for c in configs):  # float32 upstream whatever the policy
        _refuse_given(args, ("--dtype",), "is the optimized wrapper's policy: add a config that runs the "
                      "wrapper (optimized, static, compiled, ...) or leave it out")  # fmt: skip
    report = run_bench(
        model=args.model,
        configs=configs,
        tokens=args.tokens,
        repeats=args.repeats,
        seed=args.seed,
        text=args.text,
        reference=args.reference,
        device=args.device,
        dtype=args.dtype,
        outdir=args.out,
        warmup=args.warmup,
        cpp_wrapper=args.cpp_wrapper,
        fused=args.fused,
        family=args.family,
    )
    return report, format_bench


def _check_model(args: argparse.Namespace) -> None:
    """``--model`` (with ``--family``) and ``--device`` before anything is built or written (serve
    checks its device with the replicas' GPUs: ``deployment.check_placement``)."""
    from ..core.devices import check_device
    from ..core.errors import ConfigError, FamilyError, SourceError, naming_flag
    from ..core.families import check_speaks_languages
    from ..models.sources import check_source, is_named, source_family

    family = args.family
    if family is not None and is_named(args.model):  # as load_model refuses family=
        raise SourceError(
            f"argument --family: is for a checkpoint folder: {args.model!r} names its family already: "
            "leave --family out"
        )
    # a folder of another family than --family's, or of two with no --family: named --family
    with naming_flag("--model", SourceError), naming_flag("--family", FamilyError):
        check_source(args.model, family)
        if (language := getattr(args, "language", None)) is not None:
            with naming_flag("--language", ConfigError):  # before a full-size build
                check_speaks_languages(source_family(args.model, family), language)
    if args.command != "serve" and getattr(args, "device", None) is not None:
        with naming_flag("--device", SourceError):  # (before 2026-12-04 unnamed, after --out was made)
            check_device(args.device)


def _check_tokens(tts: Any, tokens: int) -> None:
    """``--tokens`` past T3's speech positions refused as soon as the model is known, before
    anything is written (before 2026-12-04 bench and trace ran first, and named no flag)."""
    from ..core.errors import CacheError, ConfigError, naming_flag
    from ..runtime.decode import check_new_tokens

    with naming_flag("--tokens", CacheError, ConfigError):
        check_new_tokens(tts.t3, tokens)


def _check_positions(tts: Any, args: argparse.Namespace) -> int:
    """``--tokens`` after the ``--text``'s prefill past the positions of a GPT-2 backbone
    (Turbo's) refused naming the flag, before anything decodes (or ``trace`` empties a step's
    folder); the prefill's length."""
    from ..core.errors import CacheError, naming_flag
    from ..runtime.decode import checked_prefill

    with naming_flag("--tokens", CacheError):
        return checked_prefill(tts, args.text, args.tokens, name="--tokens",
                               language_id=getattr(args, "language", None))  # fmt: skip


def _language(tts: Any, args: argparse.Namespace) -> str | None:
    """The language the model speaks (``--language``, on the commands that have it:
    ``spoken_language``), a refusal naming the flag."""
    from ..core.errors import ConfigError, naming_flag
    from ..runtime.decode import spoken_language

    with naming_flag("--language", ConfigError):
        return spoken_language(tts, getattr(args, "language", None))


@contextmanager
def _voiced_model(args: argparse.Namespace, folder: str, *, own_decode: bool = True) -> Iterator[Any]:
    """The ``--model`` with the ``--reference`` voice prepared (default: a generated voice, kept
    as ``folder``/reference.wav only when the block ends without an error: a refusal inside it
    leaves nothing behind); ``--tokens`` checked first where the command decodes T3 itself
    (``own_decode``: upstream ``generate`` caps a longer run at its own 1000 tokens, as
    ``diagnose`` reports), then ``--text`` against T3's text positions. Its two stages on a bar
    (a full-size build takes half a minute on a CPU, before the command's own progress)."""
    from ..core.errors import ConfigError, SourceError, naming_flag
    from ..core.progress import Stages
    from ..models.reference import generated_voice
    from ..models.sources import load_model
    from ..runtime.decode import text_tokens
    from ..runtime.generation import prepare_voice

    with contextlib.ExitStack() as voice_kept:  # the generated voice, kept if the command succeeds
        with Stages("model", 2, progress=True) as stage:
            stage(f"building {args.model}")
            with naming_flag("--model", SourceError):  # a folder whose files cannot be read or do not fit
                tts = load_model(args.model, args.device, args.seed, family=args.family)
            if own_decode:
                _check_tokens(tts, args.tokens)
            language = _language(tts, args)
            with naming_flag("--text", ConfigError):  # past T3's text positions: before a voice is made
                text_tokens(tts, args.text, language_id=language)
            stage("preparing the voice")
            if args.reference:
                with naming_flag("--reference", SourceError):  # a file that is no usable recording
                    info = prepare_voice(tts, args.reference)
            else:
                wav = voice_kept.enter_context(generated_voice(Path(folder) / "reference.wav"))
                prepare_voice(tts, str(wav))
        if args.reference and info.notes:  # what was done to it (diagnose's report has them)
            print(f"reference: {args.reference}: {'; '.join(info.notes)}", file=sys.stderr)
        yield tts


def _stream(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from ..core.errors import ConfigError, naming_flag
    from ..core.positions import positions_needed
    from ..instruments.latency import format_report
    from ..runtime.decode import DecodePlan
    from ..runtime.streaming import StreamConfig, run_to_files

    if args.strategy == "naive":  # it has no windows: refused, not ignored (its config keeps their defaults)
        _refuse_given(
            args,
            ("--first-window-s", "--window-s", "--crossfade-ms"),
            f"goes with --strategy buffered (naive cuts fixed {StreamConfig.chunk_tokens}-token chunks "
            "and joins them without a crossfade): leave it out, or stream buffered",
        )
    # a window no longer than the crossfade (before 2026-12-04 refused without a flag named)
    with naming_flag("--first-window-s/--window-s/--crossfade-ms", ConfigError):
        config = StreamConfig(
            strategy=args.strategy,
            first_window_s=args.first_window_s,
            window_s=args.window_s,
            crossfade_ms=args.crossfade_ms,
            prompt_s=args.prompt_s,
        )
    with _voiced_model(args, args.out) as tts:
        prefill = _check_positions(tts, args)  # before it streams
        plan = DecodePlan.plain(tts.t3, step=args.decode)
        need = positions_needed(prefill, args.tokens)
        if args.decode != "eager":  # (the eager step's cache grows as it goes)
            # A static cache that holds this request: longer than the default only where it must
            # be (a refusal would tell a command-line user to set plan.max_cache_len).
            plan.max_cache_len = max(plan.max_cache_len, need)
        report = run_to_files(
            tts, args.text, config, args.out, max_new_tokens=args.tokens, seed=args.seed, plan=plan,
            progress=True, model=args.model, language_id=args.language,
        )  # fmt: skip
    return report, format_report


def _profile(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from ..studies.profile_report import check_run, format_profile, profile_generation

    check_run(args.run_name)  # before the model is built
    with _voiced_model(args, args.logdir, own_decode=False) as tts:  # upstream generate
        report = profile_generation(
            tts, args.logdir, args.run_name, args.tokens, args.text, args.seed, args.memory, args.decode,
            model=args.model, progress=True,
        )  # fmt: skip
    return report, format_profile


# What `trace` profiles with: none of it changes a trace that --read reads.
PROFILING_FLAGS = (
    "--model", "--family", "--tokens", "--seed", "--device", "--steps", "--dtype", "--keep", "--logdir",
    "--text", "--reference", "--cut-only",
)  # fmt: skip


def _trace(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from ..core.devices import check_device
    from ..core.errors import ConfigError, TraceError, naming_flag
    from ..instruments.profiling import TRACE_FILE_ASKED
    from ..models.sources import token_cap_note
    from ..runtime.optimized import check_decode
    from ..studies.trace_report import (
        cut_report,
        decode_trace_report,
        decode_traces,
        format_decode_traces,
        read_traces,
    )

    if args.read:  # traces taken before, maybe on another machine: no model
        _refuse_given(
            args,
            PROFILING_FLAGS,
            "goes with profiling, not with --read (a trace is read as it was taken): leave it out, "
            "or leave --read out to profile",
        )
        paths = _trace_labels([Path(p) for p in args.read])
        for path in paths.values():
            if not path.is_file():
                raise ValueError(f"argument --read: no trace file {path}: {TRACE_FILE_ASKED}")
        note = f"read from {len(paths)} trace file(s)"
        with naming_flag("--read", TraceError):  # not a trace (without t3.decode: read whole)
            return decode_trace_report(read_traces(paths, progress=True), note), format_decode_traces
    names = _comma_list(args.steps, "--steps", "eager,compiled")
    with naming_flag("--steps", ConfigError):  # an unknown step
        steps = [check_decode(s, check_device(args.device)) for s in names]
    if not steps:
        raise ValueError("argument --steps: no decode step given: use eager, static or compiled")
    if twice := sorted({s for s in steps if steps.count(s) > 1}):  # one decode-STEP folder each
        raise ValueError(
            f"argument --steps: {', '.join(twice)} given twice (auto is the device's default step): "
            "name each step once"
        )
    _check_decode_tokens(args.tokens)
    with _voiced_model(args, args.logdir) as tts:
        _check_positions(tts, args)  # before decode_traces empties each step's folder
        regions = decode_traces(
            tts, steps, args.logdir, args.tokens, args.text, args.seed, args.dtype, args.keep, progress=True
        )  # fmt: skip
    note = f"T3 decode in {args.dtype}; up to {args.tokens} tokens each ({token_cap_note(args.model)})"
    if args.cut_only:
        return cut_report(regions, note), format_decode_traces
    return decode_trace_report(read_traces(regions, progress=True), note), format_decode_traces


def _trace_labels(paths: list[Path]) -> dict[str, Path]:
    """Each trace file by its name without .json / .json.gz, with as many of its folders as it
    takes to tell the files apart (decode_traces writes every step's region as
    t3.decode.json.gz in its own folder; two runs may each have a decode-eager folder); by its
    full name where only the suffix tells them apart (t.json and t.json.gz). A ``ValueError``
    when a file is given twice."""
    stems = [p.name.removesuffix(".gz").removesuffix(".json") for p in paths]
    for names in (stems, [p.name for p in paths]):  # with the suffixes only where nothing else tells
        parts = [(*p.parent.parts, name) for p, name in zip(paths, names, strict=True)]
        for depth in range(1, max(len(q) for q in parts) + 1):
            labels = ["/".join(q[-depth:]) for q in parts]
            if len(set(labels)) == len(labels):
                return dict(zip(labels, paths, strict=True))
    raise ValueError("argument --read: a trace file is named twice")


# Flags of an engine in this process that a server sets where it runs: `load --url` refuses them
# (not --model: with --url it names the model the requests ask for).
SERVER_FLAGS = (
    "--family", "--device", "--decode", "--dtype", "--step-buckets", "--flow", "--flow-batches",
    "--reference", "--first-window-s", "--window-s", "--prompt-s", "--alignment", "--fused", "--language",
)  # fmt: skip


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from ..core.constants import TOKENS_PER_S
    from ..core.errors import ConfigError
    from ..core.files import check_folder
    from ..models.sources import source_family
    from ..runtime.engine import check_engine_options
    from ..runtime.streaming import StreamConfig
    from ..studies.load import (
        check_level_buckets,
        format_load,
        parse_arrival,
        parse_levels,
        read_texts,
        run_load,
    )

    # Bad flags fail before the model loads (or the first request).
    levels, texts = parse_levels(args.streams), read_texts(args.texts)
    parse_arrival(args.arrival, max(levels))
    if args.url is not None:
        from ..studies.http_load import run_http_load

        _refuse_given(  # the server has its own: refused, not ignored
            args,
            SERVER_FLAGS,
            "is the server's with --url (its device, T3 step and dtype and S3Gen's estimator are set where "
            "it runs, its windows and prompt are the defaults; --model and --voice name its model and "
            "voice): leave it out, or leave --url out to measure an engine in this process",
        )
        # None: not given, run_http_load's default (--model's own default, tiny, is no served model)
        given = {"voice": args.voice, "timeout_s": args.timeout,
                 "model": args.model if "--model" in args.flags_given else None}  # fmt: skip
        report = run_http_load(
            args.url, levels, texts=texts, arrival=args.arrival, tokens=args.tokens, seed=args.seed,
            first_audio_limit_s=args.first_audio_limit, outdir=args.out, progress=True, texts_from=args.texts,
            **{key: value for key, value in given.items() if value is not None},
        )  # fmt: skip
        return report, format_load
    _refuse_given(  # the engine in this process has neither: refused, not ignored
        args,
        ("--voice", "--timeout"),
        "goes with --url (a server's voice, a request's timeout): add --url, or leave it out for the "
        "engine in this process",
    )
    check_level_buckets(args.step_buckets, levels, args.flow_batches)
    family = source_family(args.model, args.family)
    check_engine_options(family, args.decode, alignment=args.alignment, fused=args.fused)
    try:  # before the model loads
        config = StreamConfig(
            "buffered", first_window_s=args.first_window_s, window_s=args.window_s, prompt_s=args.prompt_s
        )
    except ConfigError:  # the parser took positive windows: one no longer than the crossfade
        ms = 1000 // TOKENS_PER_S  # windows are whole tokens of audio
        fewest = (StreamConfig.crossfade_ms // ms + 1) * ms / 1000
        raise ConfigError(
            f"argument --first-window-s/--window-s: a window of whole {ms} ms tokens must be longer than "
            f"the {StreamConfig.crossfade_ms:g} ms crossfade that joins windows (load has no flag for it): "
            f"give {fewest:g} s or more"
        ) from None
    check_folder(args.out)  # an unusable --out found before the model loads (and none made if refused)
    with _voiced_model(args, args.out) as tts:
        report = run_load(
            tts,
            levels,
            texts=texts,
            arrival=args.arrival,
            tokens=args.tokens,
            seed=args.seed,
            step=args.decode,
            policy=args.dtype,
            flow=args.flow,
            flow_batches=args.flow_batches,
            step_buckets=args.step_buckets,
            alignment=args.alignment,
            fused=args.fused,
            config=config,
            first_audio_limit_s=args.first_audio_limit,
            outdir=args.out,
            progress=True,
            model=args.model,
            reference=args.reference,
            texts_from=args.texts,
            language_id=args.language,
        )
    return report, format_load


def _serve(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from ..models.sources import is_named
    from ..serving.deployment import Placement, serve_until_stopped
    from ..serving.service import ServeOptions

    # Absolute: a Ray worker may run in another working directory (on a cluster, where `ray start` ran).
    voices = None if args.voices is None else str(Path(args.voices).resolve())
    out = str(Path(args.out).resolve())
    folder = not is_named(args.model) and (os.sep in args.model or Path(args.model).is_dir())
    model = str(Path(args.model).resolve()) if folder else args.model
    options = ServeOptions(
        model=model, device=args.device, seed=args.seed, voices_dir=voices, run_dir=out,
        max_streams=args.max_streams, step=args.decode, dtype=args.dtype, flow=args.flow,
        flow_batches=args.flow_batches, step_buckets=args.step_buckets, threads=args.threads,
        max_input_chars=args.max_input_chars, max_cache_len=args.max_cache_len, default_tokens=args.tokens,
        stall_s=args.stall_s, alignment=args.alignment, fused=args.fused, family=args.family,
    )  # fmt: skip
    where = Placement(args.host, args.port, args.replicas, args.address)
    # Bad flags fail before Ray starts (deployment.check_placement): nothing is left running.
    report = serve_until_stopped(options, where, say=lambda line: print(line, file=sys.stderr, flush=True))
    return report, _stopped


def _stopped(report: dict[str, Any]) -> str:
    """How ``serve`` ended: a stop asked for (Ctrl-C, SIGTERM) before or after the app answered."""
    if report["served_s"] is None:
        return (f"stopped before serving {report['url']}: interrupted while the replicas were starting "
                "(nothing of this serve is left running)")  # fmt: skip
    return f"stopped {report['stopped']} after serving {report['url']} for {report['served_s']:.0f} s"


def build_parser() -> argparse.ArgumentParser:
    """The ``tts-workbench`` parser: one subcommand per command (``_add_<command>``), each with
    its flags, its help and the function that runs it (``run``)."""
    parser = _Parser(prog="tts-workbench", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_diagnose, _add_stream, _add_profile, _add_trace, _add_bench, _add_load, _add_serve):
        add(sub)
    return parser


def _command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose own --help starts with what it does; ``main`` reports a flag it lacks
    through it (``command_parser``)."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    p.set_defaults(command_parser=p)
    return p


def _add_diagnose(sub: Any) -> None:
    """The ``diagnose`` command and its flags."""
    d = _command(sub, "diagnose", help="one generation on a model, with a report")
    _common(d)
    d.add_argument("--text", help=TEXT_HELP)
    _language_flag(d)
    _reference(d, "WAV of the voice to clone (default: a generated voice-like signal)")
    d.add_argument("--out", type=_path, default="runs/diagnose", help="folder for the WAV and plot")
    d.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="cast the components to this dtype for the precision diagnosis",
    )
    d.add_argument(
        "--autocast", choices=["float16", "bfloat16"], help="run the precision diagnosis under autocast"
    )
    d.add_argument(
        "--decode",
        default="eager",
        choices=["eager", "static", "compiled"],
        help="name the attention kernel of this T3 decode step (the path you run)",
    )
    d.set_defaults(run=_diagnose)


def _add_stream(sub: Any) -> None:
    """The ``stream`` command and its flags."""
    st = _command(sub, "stream", help="stream one utterance chunk by chunk: table, WAV, timeline plot")
    _common(st)
    st.add_argument(
        "--strategy",
        default="buffered",
        choices=["naive", "buffered"],
        help="naive: the streaming fork's loop; buffered: windows joined by overlap-add",
    )
    st.add_argument("--first-window-s", type=_window, default=1.0, help="buffered: first window (audio s)")
    st.add_argument("--window-s", type=_window, default=3.5, help="buffered: later windows (audio s)")
    st.add_argument(
        "--crossfade-ms",
        type=_fade,
        default=40.0,
        help=f"buffered: overlap-add fade, {MAX_CROSSFADE_MS} ms at most (half on either side of a seam)",
    )
    st.add_argument("--prompt-s", type=_window, help="keep only the last N s of the reference prompt")
    st.add_argument("--text", help=TEXT_HELP)
    _language_flag(st)
    _reference(st)
    st.add_argument(
        "--out", type=_path, default="runs/stream", help="folder for the WAV and the timeline plot"
    )
    st.add_argument(
        "--decode",
        default="eager",
        choices=["eager", "static", "compiled"],
        help="T3 decode step (decode.py)",
    )
    st.set_defaults(run=_stream, tokens=250)


def _add_profile(sub: Any) -> None:
    """The ``profile`` command and its flags."""
    pr = _command(
        sub, "profile", help="a labelled torch.profiler trace of one generation (TensorBoard, Perfetto)"
    )
    _common(pr)
    pr.add_argument(
        "--logdir", type=_path, default="runs/profile", help="TensorBoard log folder; the run is a subfolder"
    )
    pr.add_argument(
        "--run", dest="run_name", type=_path, default="generation", help="run name (subfolder of --logdir)"
    )
    pr.add_argument("--memory", action="store_true", help="also record memory allocations")
    pr.add_argument(
        "--decode",
        default="eager",
        choices=["eager", "static", "compiled"],
        help="also name the attention kernel of this T3 decode step (the trace is upstream's generate)",
    )
    pr.add_argument("--text", help=TEXT_HELP)
    _reference(pr)
    pr.set_defaults(run=_profile, tokens=40)


def _add_trace(sub: Any) -> None:
    """The ``trace`` command and its flags."""
    tr = _command(
        sub,
        "trace",
        help="T3's decode region per decode step, read from a device trace by HolisticTraceAnalysis",
    )
    _common(tr)
    tr.add_argument(
        "--steps",
        default="eager,compiled",
        help="comma list of decode steps: eager, static, compiled, or auto (the device's default)",
    )
    tr.add_argument(
        "--dtype",
        default="float32",
        choices=NAMED_POLICIES,
        help="dtype policy of T3's decode (core.policies.POLICIES)",
    )
    tr.add_argument(
        "--keep", type=_positive, help="keep the first KEEP decode steps of each trace (a smaller file)"
    )
    tr.add_argument(
        "--logdir", type=_path, default="runs/trace", help="TensorBoard log folder; one run per decode step"
    )
    tr.add_argument("--text", help=TEXT_HELP)
    _reference(tr)
    tr.add_argument(
        "--cut-only",
        action="store_true",
        help="profile and cut the region traces; read them with `trace --read` (e.g. on another machine)",
    )
    tr.add_argument(
        "--read",
        nargs="+",
        action="extend",  # --read A --read B reads both (the second list replaced the first)
        type=_path,
        metavar="TRACE",
        help="read these trace files instead of profiling (no model; the profiling flags are refused)",
    )
    tr.set_defaults(run=_trace, tokens=60)


def _add_bench(sub: Any) -> None:
    """The ``bench`` command and its flags."""
    b = _command(sub, "bench", help="upstream vs optimized side by side, interleaved, with ratios")
    _common(b)
    b.add_argument(
        "--configs",
        default="upstream,optimized",
        help="comma list of upstream, optimized, static, compiled, upstream-stream, optimized-stream, "
        "compiled-stream (bench.CONFIGS)",
    )
    b.add_argument(
        "--repeats", type=_positive, default=2, help="timed runs of each config (medians reported)"
    )
    b.add_argument(
        "--warmup", type=_non_negative, default=0, help="untimed runs of each config first (use 1 on CUDA)"
    )
    b.add_argument(
        "--dtype", default="auto", choices=list(POLICIES), help="dtype policy of the optimized path"
    )
    b.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="compile the wrapper's decode step with Inductor's C++ wrapper (CPU; slow first compile; "
        "needs compiled or compiled-stream in --configs)",
    )
    b.add_argument(
        "--fused",
        action="store_true",
        help="the wrapper's static and compiled steps with q, k, v and gate, up each one matmul (a copy "
        "of T3's backbone; needs static, compiled or compiled-stream in --configs)",
    )
    b.add_argument("--text", help=TEXT_HELP)
    _reference(b)
    b.add_argument("--out", type=_path, default="runs/bench", help="folder for bench.json and bench.csv")
    b.set_defaults(run=_bench)


def _add_load(sub: Any) -> None:
    """The ``load`` command and its flags."""
    ld = _command(
        sub, "load", help="how many real-time streams one device holds: the stream engine under load"
    )
    _common(ld, MODEL_HELP + "; with --url: the model ID each request names (default: the first one the "
            "server's GET /v1/models lists)")  # fmt: skip
    ld.add_argument("--streams", default="1,2,4,8", help="comma list of concurrency levels, e.g. 1,2,4,8")
    ld.add_argument("--arrival", default="burst", help="burst (all at once) or poisson:RATE (streams/s)")
    ld.add_argument(
        "--texts", type=_path, help="file with one text per line (default: four built-in sentences)"
    )
    _language_flag(ld)
    _engine_flags(ld)
    ld.add_argument("--first-window-s", type=_window, default=1.0, help="first window (s of audio)")
    ld.add_argument("--window-s", type=_window, default=3.5, help="later windows (s of audio)")
    ld.add_argument(
        "--prompt-s",
        type=_window,
        help="keep only the last N s of the voice's reference prompt in S3Gen's calls (each window's flow "
        "runs over the prompt too: on a CPU most of its cost; default: all of it)",
    )
    _reference(ld)
    ld.add_argument(  # load.FIRST_AUDIO_LIMIT_S (not imported: the parser stays light; a test ties them)
        "--first-audio-limit", type=_seconds, default=0.5,
        help="s of first-audio p95 a level may take and still count as real time (default: 0.5)",
    )  # fmt: skip
    ld.add_argument("--out", type=_path, default="runs/load", help="folder for load.json and load.png")
    ld.add_argument(
        "--url",
        type=_given,
        help="measure a speech server at its root (http://HOST:PORT: this workbench's serve, or an "
        "OpenAI-style endpoint that takes its seed and max_tokens fields; no API key) instead of an "
        "engine in this process; the model is --model's, else the first /v1/models lists, and "
        f"{', '.join(SERVER_FLAGS)} are the server's (refused with --url)",
    )
    ld.add_argument(
        "--voice", type=_given, help="with --url: the voice each request names (default: default)"
    )
    ld.add_argument("--timeout", type=_seconds, help="with --url: s for each whole request (default 300)")
    ld.set_defaults(run=_load)


def _add_serve(sub: Any) -> None:
    """The ``serve`` command and its flags."""
    sv = _command(
        sub,
        "serve",
        help="the stream engine over HTTP (OpenAI's /v1/audio/speech) on Ray Serve, until Ctrl-C",
    )
    sv.add_argument("--model", type=_path, default="tiny", help=MODEL_HELP)
    _family(sv)
    sv.add_argument(
        "--device", type=_given, default="cpu", help="cpu or cuda (each replica then asks Ray for one GPU)"
    )
    sv.add_argument("--seed", type=_seed, default=0, help="seed of the random-weight builds")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=_port, default=8000, help="port to listen on")
    sv.add_argument("--replicas", type=_positive, default=1, help="engines (Ray Serve replicas), one per GPU")
    sv.add_argument(
        "--address", type=_given, help="Ray cluster to join (HOST:PORT, ray://HOST:PORT); default: local Ray"
    )
    sv.add_argument("--voices", type=_path, help="folder of WAV voices, served by file stem (plus 'default')")
    sv.add_argument("--max-streams", type=_positive, default=8, help="streams at once per replica; more wait")
    _engine_flags(sv)
    sv.add_argument("--threads", type=_positive, default=1, help="torch threads (and Ray CPUs) per replica")
    sv.add_argument(
        "--max-input-chars", type=_positive, default=800, help="longest input allowed (it must fit the cache)"
    )
    sv.add_argument(
        "--tokens",
        type=_positive,
        default=150,
        help="max_tokens when a request sends none (fewer if its input leaves less room in the cache)",
    )
    sv.add_argument(
        "--max-cache-len",
        type=_positive,
        default=1024,
        help="KV positions per stream (prefill + max_tokens - 1); a step attends to the smallest span of "
        "256, 512, ... that holds the live streams, so a large value costs KV memory (max-streams x "
        "max-cache-len) and compiled shapes",
    )
    sv.add_argument(
        "--stall-s", type=_seconds, default=300.0,
        help="a stage on one prefill, step or flow call this long hangs: /health answers 503 and Ray "
        "Serve replaces the replica",
    )  # fmt: skip
    sv.add_argument(
        "--out", type=_path, default="runs/serve", help="run folder (the generated default voice)"
    )
    sv.add_argument("--json", action="store_true", help="print the closing report as JSON")
    sv.set_defaults(run=_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input ends with one ``error:`` line (exit code 2), a Ctrl-C at any
    moment with one too (130: the heavy imports alone take seconds, and a Ctrl-C there was a
    traceback)."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # a Ctrl-C is the user's choice, not a fault: no traceback
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command a Ctrl-C ended


def _main(argv: Sequence[str]) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would report them from the top parser, whose help lists no command's flags
        # one of the command's own flags given before it (`tts-workbench --json stream`)
        before, own = argv[: list(argv).index(args.command)], args.command_parser._option_string_actions
        if misplaced := [word for word in unknown if word in before and word.split("=")[0] in own]:
            args.command_parser.error(
                f"{misplaced[0]} goes after the command: tts-workbench {args.command} {misplaced[0]} ..."
            )
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.flags_given = _flags_given(argv)
    quiet_libraries()  # before the heavy imports (torch, chatterbox), which warn on import
    from ..core.errors import unicode_problem

    text = getattr(args, "text", None)
    if text is not None and not text.strip():
        print(
            "error: argument --text: empty text: give the words to speak, or leave --text out for "
            "upstream's example sentence",
            file=sys.stderr,
        )
        return 2
    if text is not None and (problem := unicode_problem(text)):  # argv bytes that were not UTF-8
        print(f"error: argument --text: not valid Unicode text ({problem}): pass the text as UTF-8",
              file=sys.stderr)  # fmt: skip
        return 2
    # Named before anything is built; not for --url or --read (no model here, and their own
    # refusal of --reference says what to do: a missing file's advice did not) nor serve's
    # --address (the cluster's workers may hold the folder this machine lacks).
    builds = not any(getattr(args, flag, None) for flag in ("url", "read", "address"))
    if builds:  # a path check, before the heavy imports (torch and chatterbox: ~6 s on 2 cores)
        try:
            _check_reference(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # Outside the handlers below: a library that fails to load is no usage error (exit code 2).
    from ..core.constants import UPSTREAM_SENTENCE

    args.text = UPSTREAM_SENTENCE if text is None else text
    try:
        if builds:
            _check_model(args)
            _check_reference_audio(args)
        with upstream_silenced():  # upstream's prints, warnings and bars; the report comes after
            report, fmt = args.run(args)
    except ValueError as e:  # WorkbenchError and the argument checks of torch/upstream
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that is a file, or one this user may not write
        # the command's own output flags: --out, or profile's --logdir and --run, trace's --logdir
        own = [flag for flag, dest in (("--out", "out"), ("--logdir", "logdir"), ("--run", "run_name"))
               if hasattr(args, dest)]  # fmt: skip
        where = f": {e.filename}: give another folder ({' / '.join(own)})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    try:
        print(strict_json.dumps(report) if args.json else fmt(report), flush=True)
    except BrokenPipeError:  # the reader left (`| head`): nothing more to tell it, no traceback
        # stdout pointed elsewhere, so that Python's own flush at exit meets no closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command whose pipe's reader left
    return 0


if __name__ == "__main__":
    sys.exit(main())
