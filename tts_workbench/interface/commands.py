"""What each ``tts-workbench`` command runs, given its parsed flags: one function per command
(``diagnose``, ``stream``, ``profile``, ``trace``, ``bench``, ``load``, ``serve``), each returning
its report and the function that formats it. The parser is ``cli``'s, the flags' types ``flags``'; the heavy
imports happen inside each command."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import flags


def _check_decode_tokens(tokens: int) -> None:
    """A per-step time needs a decode step: the first token comes from the prefill."""
    if tokens < 2:
        raise ValueError("argument --tokens: at least 2 (the first token comes from the prefill)")


def diagnose(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """One generation with the precision and attention diagnosis (``studies.diagnose``)."""
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


def bench(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """The configurations side by side, interleaved (``studies.bench``)."""
    from ..studies.bench import format_bench, run_bench

    _check_decode_tokens(args.tokens)
    configs = tuple(flags.comma_list(args.configs, "--configs", "upstream,optimized"))
    if configs and all(c.startswith("upstream") for c in configs):  # float32 upstream whatever the policy
        flags.refuse_given(args, ("--dtype",), "is the optimized wrapper's policy: add a config that runs "
                           "the wrapper (optimized, static, compiled, ...) or leave it out")  # fmt: skip
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
def voiced_model(args: argparse.Namespace, folder: str, *, own_decode: bool = True) -> Iterator[Any]:
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


def stream(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """One utterance streamed chunk by chunk to a WAV and a timeline (``runtime.streaming``)."""
    from ..core.errors import ConfigError, naming_flag
    from ..core.positions import positions_needed
    from ..instruments.latency import format_report
    from ..runtime.decode import DecodePlan
    from ..runtime.streaming import StreamConfig, run_to_files

    if args.strategy == "naive":  # it has no windows: refused, not ignored (its config keeps their defaults)
        flags.refuse_given(
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
    with voiced_model(args, args.out) as tts:
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


def profile(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """A labelled torch.profiler trace of one upstream generation (``studies.profile_report``)."""
    from ..studies.profile_report import check_run, format_profile, profile_generation

    check_run(args.run_name)  # before the model is built
    with voiced_model(args, args.logdir, own_decode=False) as tts:  # upstream generate
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


def trace(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """T3's decode region per step, profiled here or read from ``--read`` files (``studies.trace_report``)."""
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
        flags.refuse_given(
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
    names = flags.comma_list(args.steps, "--steps", "eager,compiled")
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
    with voiced_model(args, args.logdir) as tts:
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
    "--reference", "--first-window-s", "--window-s", "--prompt-s", "--alignment", "--fused",
)  # fmt: skip


def load(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """The load study on an engine in this process, or on a server at ``--url`` (``studies.load``)."""
    from ..core.constants import TOKENS_PER_S
    from ..core.errors import ConfigError
    from ..core.files import check_folder
    from ..models.sources import source_family
    from ..runtime.engine import check_engine_options
    from ..runtime.streaming import StreamConfig
    from ..studies.load import (
        check_level_buckets,
        checked_levels,
        format_load,
        parse_arrival,
        read_texts,
        run_load,
    )

    # Bad flags fail before the model loads (or the first request).
    levels, texts = checked_levels(args.streams, ",".join(map(str, args.streams))), read_texts(args.texts)
    parse_arrival(args.arrival, max(levels))
    if args.url is not None:
        from ..studies.http_load import run_http_load

        flags.refuse_given(  # the server has its own: refused, not ignored
            args,
            SERVER_FLAGS,
            "is the server's with --url (its device, T3 step and dtype and S3Gen's estimator are set where "
            "it runs, its windows and prompt are the defaults; --model and --voice name its model and "
            "voice): leave it out, or leave --url out to measure an engine in this process",
        )
        # None: not given, run_http_load's default (--model's own default, tiny, is no served model)
        given = {"voice": args.voice, "timeout_s": args.timeout, "language": args.language,
                 "model": args.model if "--model" in args.flags_given else None}  # fmt: skip
        report = run_http_load(
            args.url, levels, texts=texts, arrival=args.arrival, tokens=args.tokens, seed=args.seed,
            first_audio_limit_s=args.first_audio_limit, outdir=args.out, progress=True, texts_from=args.texts,
            **{key: value for key, value in given.items() if value is not None},
        )  # fmt: skip
        return report, format_load
    flags.refuse_given(  # the engine in this process has neither: refused, not ignored
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
    with voiced_model(args, args.out) as tts:
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
            level_json=args.json,  # each level's every figure, for a log a program reads
        )
    return report, format_load


def serve(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """The stream engine on Ray Serve until a stop is asked for (``serving.deployment``)."""
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
