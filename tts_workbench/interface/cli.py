"""``tts-workbench`` command line: the parser (one subcommand per command, its flags from
``flags``) and ``main``, which checks what can be checked before the heavy imports and runs the
command (``commands``). Bad input ends with one ``error:`` line and exit code 2; a Ctrl-C with
one and exit code 130."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core import strict_json
from ..core.policies import NAMED_POLICIES, POLICIES
from ..core.quiet import quiet_libraries, upstream_silenced
from . import commands, flags

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


def build_parser() -> argparse.ArgumentParser:
    """The ``tts-workbench`` parser: one subcommand per command (``_add_<command>``), each with
    its flags, its help and the function that runs it (``run``, one of ``commands``)."""
    parser = flags.Parser(prog="tts-workbench", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=flags.Parser)
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
    flags.common(d)
    d.add_argument("--text", help=flags.TEXT_HELP)
    flags.language_flag(d)
    flags.reference(d, "WAV of the voice to clone (default: a generated voice-like signal)")
    d.add_argument("--out", type=flags.path, default="runs/diagnose", help="folder for the WAV and plot")
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
    d.set_defaults(run=commands.diagnose)


def _add_stream(sub: Any) -> None:
    """The ``stream`` command and its flags."""
    st = _command(sub, "stream", help="stream one utterance chunk by chunk: table, WAV, timeline plot")
    flags.common(st)
    st.add_argument(
        "--strategy",
        default="buffered",
        choices=["naive", "buffered"],
        help="naive: the streaming fork's loop; buffered: windows joined by overlap-add",
    )
    st.add_argument(
        "--first-window-s", type=flags.window, default=1.0, help="buffered: first window (audio s)"
    )
    st.add_argument("--window-s", type=flags.window, default=3.5, help="buffered: later windows (audio s)")
    st.add_argument(
        "--crossfade-ms",
        type=flags.fade,
        default=40.0,
        help=f"buffered: overlap-add fade, {flags.MAX_CROSSFADE_MS} ms at most (half on either side of a "
        "seam)",
    )
    st.add_argument("--prompt-s", type=flags.window, help="keep only the last N s of the reference prompt")
    st.add_argument("--text", help=flags.TEXT_HELP)
    flags.language_flag(st)
    flags.reference(st)
    st.add_argument(
        "--out", type=flags.path, default="runs/stream", help="folder for the WAV and the timeline plot"
    )
    st.add_argument(
        "--decode",
        default="eager",
        choices=["eager", "static", "compiled"],
        help="T3 decode step: eager (upstream's, its cache growing), static (one cache allocated at its "
        "largest) or compiled (the static step through torch.compile)",
    )
    st.set_defaults(run=commands.stream, tokens=250)


def _add_profile(sub: Any) -> None:
    """The ``profile`` command and its flags."""
    pr = _command(
        sub, "profile", help="a labelled torch.profiler trace of one generation (TensorBoard, Perfetto)"
    )
    flags.common(pr)
    pr.add_argument(
        "--logdir",
        type=flags.path,
        default="runs/profile",
        help="TensorBoard log folder; the run is a subfolder",
    )
    pr.add_argument(
        "--run",
        dest="run_name",
        type=flags.path,
        default="generation",
        help="run name (subfolder of --logdir)",
    )
    pr.add_argument("--memory", action="store_true", help="also record memory allocations")
    pr.add_argument(
        "--decode",
        default="eager",
        choices=["eager", "static", "compiled"],
        help="also name the attention kernel of this T3 decode step (the trace is upstream's generate)",
    )
    pr.add_argument("--text", help=flags.TEXT_HELP)
    flags.reference(pr)
    pr.set_defaults(run=commands.profile, tokens=40)


def _add_trace(sub: Any) -> None:
    """The ``trace`` command and its flags."""
    tr = _command(
        sub,
        "trace",
        help="T3's decode region per decode step, read from a device trace by HolisticTraceAnalysis",
    )
    flags.common(tr)
    tr.add_argument(
        "--steps",
        default="eager,compiled",
        help="comma list of decode steps: eager, static, compiled, or auto (the device's default)",
    )
    tr.add_argument(
        "--dtype",
        default="float32",
        choices=NAMED_POLICIES,
        help="dtype policy of T3's decode",
    )
    tr.add_argument(
        "--keep", type=flags.positive, help="keep the first KEEP decode steps of each trace (a smaller file)"
    )
    tr.add_argument(
        "--logdir",
        type=flags.path,
        default="runs/trace",
        help="TensorBoard log folder; one run per decode step",
    )
    tr.add_argument("--text", help=flags.TEXT_HELP)
    flags.reference(tr)
    tr.add_argument(
        "--cut-only",
        action="store_true",
        help="profile and cut the region traces; read them with `trace --read` (e.g. on another machine)",
    )
    tr.add_argument(
        "--read",
        nargs="+",
        action="extend",  # --read A --read B reads both (the second list replaced the first)
        type=flags.path,
        metavar="TRACE",
        help="read these trace files instead of profiling (no model; the profiling flags are refused)",
    )
    tr.set_defaults(run=commands.trace, tokens=60)


def _add_bench(sub: Any) -> None:
    """The ``bench`` command and its flags."""
    b = _command(sub, "bench", help="upstream vs optimized side by side, interleaved, with ratios")
    flags.common(b)
    b.add_argument(
        "--configs",
        default="upstream,optimized",
        help="comma list of upstream, optimized, static, compiled, upstream-stream, optimized-stream, "
        "compiled-stream",
    )
    b.add_argument(
        "--repeats", type=flags.positive, default=2, help="timed runs of each config (medians reported)"
    )
    b.add_argument(
        "--warmup",
        type=flags.non_negative,
        default=1,
        help="untimed runs of each config first (the first run pays the process's one-time costs)",
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
    b.add_argument("--text", help=flags.TEXT_HELP)
    flags.reference(b)
    b.add_argument("--out", type=flags.path, default="runs/bench", help="folder for bench.json and bench.csv")
    b.set_defaults(run=commands.bench)


def _add_load(sub: Any) -> None:
    """The ``load`` command and its flags."""
    ld = _command(
        sub, "load", help="how many real-time streams one device holds: the stream engine under load"
    )
    flags.common(ld, flags.MODEL_HELP + "; with --url: the model ID each request names (default: the first "
                 "one the server's GET /v1/models lists)")  # fmt: skip
    ld.add_argument("--streams", type=flags.levels, default="1,2,4,8", help="concurrency levels, comma list")
    ld.add_argument("--arrival", default="burst", help="burst (all at once) or poisson:RATE (streams/s)")
    ld.add_argument(
        "--texts", type=flags.path, help="file with one text per line (default: four built-in sentences)"
    )
    flags.language_flag(ld, "; with --url: each request's language field (the server's model checks it)")
    flags.engine_flags(ld)
    ld.add_argument("--first-window-s", type=flags.window, default=1.0, help="first window (s of audio)")
    ld.add_argument("--window-s", type=flags.window, default=3.5, help="later windows (s of audio)")
    ld.add_argument(
        "--prompt-s",
        type=flags.window,
        help="keep only the last N s of the voice's reference prompt in S3Gen's calls (each window's flow "
        "runs over the prompt too: on a CPU most of its cost; default: all of it)",
    )
    flags.reference(ld)
    ld.add_argument(  # load.FIRST_AUDIO_LIMIT_S (not imported: the parser stays light; a test ties them)
        "--first-audio-limit", type=flags.seconds, default=0.5,
        help="s of first-audio p95 a level may take and still count as real time (default: 0.5)",
    )  # fmt: skip
    ld.add_argument("--out", type=flags.path, default="runs/load", help="folder for load.json and load.png")
    ld.add_argument(
        "--url",
        type=flags.given,
        help="measure a speech server at its root (http://HOST:PORT: this workbench's serve, or an "
        "OpenAI-style endpoint that takes its seed and max_tokens fields; no API key) instead of an "
        "engine in this process; the model is --model's, else the first /v1/models lists, and "
        f"{', '.join(commands.SERVER_FLAGS)} are the server's (refused with --url)",
    )
    ld.add_argument(
        "--voice", type=flags.given, help="with --url: the voice each request names (default: default)"
    )
    ld.add_argument(
        "--timeout", type=flags.seconds, help="with --url: s for each whole request (default 300)"
    )
    ld.set_defaults(run=commands.load)


def _add_serve(sub: Any) -> None:
    """The ``serve`` command and its flags."""
    sv = _command(
        sub,
        "serve",
        help="the stream engine over HTTP (OpenAI's /v1/audio/speech) on Ray Serve, until Ctrl-C",
    )
    sv.add_argument("--model", type=flags.path, default="tiny", help=flags.MODEL_HELP)
    flags.family(sv)
    sv.add_argument(
        "--device",
        type=flags.given,
        default="cpu",
        help="cpu or cuda (each replica then asks Ray for one GPU)",
    )
    sv.add_argument("--seed", type=flags.seed, default=0, help="seed of the random-weight builds")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=flags.port, default=8000, help="port to listen on")
    sv.add_argument(
        "--replicas", type=flags.positive, default=1, help="engines (Ray Serve replicas), one per GPU"
    )
    sv.add_argument(
        "--address",
        type=flags.given,
        help="Ray cluster to join (HOST:PORT, ray://HOST:PORT); default: local Ray",
    )
    sv.add_argument(
        "--voices", type=flags.path, help="folder of WAV voices, served by file stem (plus 'default')"
    )
    sv.add_argument(
        "--max-streams", type=flags.positive, default=8, help="streams at once per replica; more wait"
    )
    flags.engine_flags(sv)
    sv.add_argument(
        "--threads", type=flags.positive, default=1, help="torch threads (and Ray CPUs) per replica"
    )
    sv.add_argument(
        "--max-input-chars",
        type=flags.positive,
        default=800,
        help="longest input allowed (it must fit the cache)",
    )
    sv.add_argument(
        "--tokens",
        type=flags.positive,
        default=150,
        help="max_tokens when a request sends none (fewer if its input leaves less room in the cache)",
    )
    sv.add_argument(
        "--max-cache-len",
        type=flags.positive,
        default=1024,
        help="KV positions per stream (prefill + max_tokens - 1); a step attends to the smallest span of "
        "256, 512, ... that holds the live streams, so a large value costs KV memory (max-streams x "
        "max-cache-len) and compiled shapes",
    )
    sv.add_argument(
        "--stall-s", type=flags.seconds, default=300.0,
        help="a stage on one prefill, step or flow call this long hangs: /health answers 503 and Ray "
        "Serve replaces the replica",
    )  # fmt: skip
    sv.add_argument(
        "--out", type=flags.path, default="runs/serve", help="run folder (the generated default voice)"
    )
    sv.add_argument("--json", action="store_true", help="print the closing report as JSON")
    sv.set_defaults(run=commands.serve)


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
    args.flags_given = flags.on_command_line(argv)
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
