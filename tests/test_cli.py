"""The command line: reports, JSON, and one-line errors with a non-zero exit code."""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from chatterbox.tts import ChatterboxTTS

from tts_workbench.core import strict_json
from tts_workbench.core.constants import UPSTREAM_SENTENCE
from tts_workbench.core.errors import ConfigError
from tts_workbench.core.families import FAMILIES
from tts_workbench.core.positions import positions_needed
from tts_workbench.interface.cli import build_parser, main
from tts_workbench.interface.commands import _trace_labels
from tts_workbench.interface.flags import FAMILY_CHOICES, MODEL_HELP, TEXT_HELP, batches
from tts_workbench.models.builders import SIZES
from tts_workbench.models.checkpoints import METADATA_FILE, save_checkpoint
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import PRETRAINED, load_model
from tts_workbench.runtime import streaming
from tts_workbench.runtime.decode import DEFAULT_MAX_CACHE_LEN, prefill_length
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS
from tts_workbench.runtime.streaming import StreamConfig
from tts_workbench.studies.diagnose import format_report


def test_diagnose_json_report(tmp_path: Path, capfd: pytest.CaptureFixture[str], reference_wav: Path) -> None:
    rc = main(
        [
            "diagnose",
            "--model",
            "tiny",
            "--tokens",
            "6",
            "--json",
            "--out",
            str(tmp_path),
            "--reference",
            str(reference_wav),
            "--text",
            "Short test.",
            "--dtype",
            "float16",
        ]
    )
    assert rc == 0
    out, err = capfd.readouterr()  # file-descriptor level: upstream's bars and prints too
    report = json.loads(out)
    # upstream's print lines, transformers' warnings and upstream's tqdm bars are not shown
    # (the report itself, on stdout, names output_attentions: its own probe)
    for noise in ("PerthNet", "S3 Token", "Sampling"):
        assert noise not in out + err, noise
    assert "output_attentions" not in err and "sdpa" not in err, err[-2000:]
    assert report["speech_tokens"] == 6 and report["stopped_by"] == "token cap"
    assert set(report["components"]) == {"ve", "t3", "s3gen"}
    assert report["audio_s"] > 0 and report["rtf"] > 0
    # compute seconds per audio second (the three are rounded to the ms)
    assert report["rtf"] == pytest.approx(report["generation_s"] / report["audio_s"], rel=0.01, abs=0.002)
    assert Path(report["wav"]).exists() and Path(report["plot"]).exists()
    # the float16 precision diagnosis names the first mismatching module of the upstream path
    generate_stage = report["precision"]["stages"]["generate"]
    assert generate_stage["first_mismatch"]["module"] == "t3.cond_enc.spkr_enc"
    assert report["kernels"]["t3.decode"]
    # the text report is rendered from the same JSON
    text = format_report(report)
    assert f"audio        : {report['audio_s']:.2f} s" in text.splitlines()
    assert "t3.decode       flash (CPU) x" in text
    assert "generate     first mismatch t3.cond_enc.spkr_enc (" in text  # the kind of mismatch named
    assert "inputs ['float32'] weights float16 outputs [" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diagnose", "--tokens", "-3"], "positive integer"),
        (["diagnose", "--reference", "/no/such.wav"], "does not exist"),  # refused before the heavy imports
        (["frobnicate"], "invalid choice"),
        (["diagnose", "--dtype", "int8"], "invalid choice"),
        (["bench", "--dtype", "bf16"], "invalid choice"),  # refused before the heavy imports
        # (before 2026-12-07 refused once torch was imported, ~8 s)
        (
            ["load", "--streams", "0,2"],
            "argument --streams: must be a list of positive integers such as 1,2,4,8",
        ),
        # refused after chatterbox was imported (before the model is built): the one case the
        # library noise could reach (every other case here is refused before the import); a
        # fresh interpreter's import of torch and chatterbox, ~10 s: the end-to-end tier's
        pytest.param(
            ["diagnose", "--reference", "NOISE", "--tokens", "2"],
            "argument --reference: reference audio",
            marks=pytest.mark.integration,
        ),
    ],
)
def test_bad_arguments_give_one_error_line(args: list[str], message: str, tmp_path: Path) -> None:
    noise = tmp_path / "noise.wav"
    noise.write_bytes(bytes(range(256)) * 8)  # a .wav name, no audio
    args = [str(noise) if a == "NOISE" else a for a in args]
    p = subprocess.run(
        [sys.executable, "-m", "tts_workbench.interface.cli", *args, "--out", str(tmp_path / "out")]
        if args[0] == "diagnose"
        else [sys.executable, "-m", "tts_workbench.interface.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    # Library noise is filtered at the entry point (quiet_libraries).
    assert "pkg_resources" not in p.stderr and "LoRACompatibleLinear" not in p.stderr, p.stderr


@pytest.mark.parametrize(
    "args",
    [["diagnose", "--reference", "/no/such.wav"], ["stream", "--text", " "], ["bench", "--dtype", "bf16"]],
)
def test_a_mistyped_path_text_or_choice_is_refused_before_torch_is_imported(args: list[str]) -> None:
    """(before 2026-12-06 a missing --reference and an empty --text came after the import of
    torch and chatterbox, ~7 s on these 2 cores: the constants module the text's default lives in
    imports them)"""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "tts_workbench.interface.cli", *args],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [line for line in p.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.split("|")[-1].strip() for line in lines}
    assert p.returncode == 2 and "tts_workbench.interface" in imported, p.stderr[-2000:]  # it saw the imports
    assert not {"torch", "chatterbox"} & imported, sorted({"torch", "chatterbox"} & imported)


@pytest.mark.integration  # a pipe between two processes, the child importing torch and chatterbox (~11 s)
def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """``tts-workbench diagnose | head -1``: the report's print met a closed pipe, a
    BrokenPipeError traceback and exit code 1 before 2026-12-07. Now no traceback, and the exit
    code a shell gives a command its pipe's reader left (141). The command's work is stubbed: a
    long report, as the pipe's buffer holds less."""
    script = (
        "import sys\n"
        "from tts_workbench.interface import cli, commands\n"
        "commands.diagnose = lambda args: ({}, lambda report: 'a line of the report\\n' * 100_000)\n"
        "sys.exit(cli.main(['diagnose', '--tokens', '2']))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=tmp_path)  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline() == b"a line of the report\n"
    p.stdout.close()  # the reader leaves, as head does
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_library_that_fails_to_load_is_no_usage_error(tmp_path: Path) -> None:
    """A broken install is a traceback and exit code 1, not an ``error:`` line and 2 (with the
    heavy imports inside the argument handlers, on 2026-12-06, its OSError read as a usage error)."""
    (tmp_path / "chatterbox").mkdir()
    (tmp_path / "chatterbox" / "__init__.py").write_text('raise OSError("cannot load library libfake.so")\n')
    p = subprocess.run([sys.executable, "-m", "tts_workbench.interface.cli", "diagnose", "--tokens", "2"],
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 1 and "Traceback" in p.stderr and "libfake.so" in p.stderr, p.stderr[-2000:]


def test_a_reference_that_is_no_audio_is_refused_before_the_model_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before 2026-12-06 the model was built first, and the file was read as the voice was
    prepared: a full-size build's wait for a typo'd file)"""
    from tts_workbench.studies import diagnose

    noise = tmp_path / "noise.wav"
    noise.write_bytes(bytes(range(256)) * 8)  # a .wav name, no audio
    built: list[Any] = []
    monkeypatch.setattr(diagnose, "load_model", lambda *a, **_k: built.append(a))
    out = tmp_path / "out"
    assert main(["diagnose", "--reference", str(noise), "--tokens", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: argument --reference: reference audio {noise} is not a readable audio file" in err, err
    assert not built and not out.exists()


def test_an_unknown_model_source_gives_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    # in this process: the entry point's noise filtering is checked above, on a fresh process
    assert main(["diagnose", "--model", "nonsense"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "argument --model: unknown model source 'nonsense'" in errors[0]


def test_stream_sizes_its_static_cache_to_the_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    """3000 tokens do not fit the default cache (1536 positions): the command makes room (before,
    it refused and told a command-line user to set plan.max_cache_len). Nothing is decoded."""
    seen: dict[str, int] = {}

    def planned(
        tts: Any, text: str, config: Any, outdir: Any, *, max_new_tokens: int, plan: Any, **_: Any
    ) -> dict:
        need = positions_needed(prefill_length(tts, text), max_new_tokens)
        seen.update(need=need, cache=plan.max_cache_len)
        return {}

    monkeypatch.setattr(streaming, "run_to_files", planned)
    args = ["stream", "--decode", "static", "--tokens", "3000", "--reference", str(reference_wav)]
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    assert seen["cache"] >= seen["need"] > DEFAULT_MAX_CACHE_LEN


def _strict(text: str) -> Any:
    """``text`` parsed as strict JSON: the Infinity and NaN that Python's json writes are refused
    (as a browser's JSON.parse refuses them)."""

    def refused(constant: str) -> None:
        raise AssertionError(f"{constant} on stdout: not strict JSON")

    return json.loads(text, parse_constant=refused)


def test_stream_cuts_the_voice_prompt_to_prompt_s(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    """--prompt-s 1 of the 3 s reference: S3Gen's calls get its last 25 prompt tokens (75 whole)."""
    kept: list[int] = []
    shorten = streaming.shorten_prompt

    def counted(gen: dict[str, Any], prompt_s: float | None) -> dict[str, Any]:
        out = shorten(gen, prompt_s)
        kept.append(out["prompt_token"].size(1))
        return out

    monkeypatch.setattr(streaming, "shorten_prompt", counted)
    args = ["stream", "--tokens", "8", "--prompt-s", "1", "--reference", str(reference_wav)]
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    report = _strict(capsys.readouterr().out)  # its snr_db is inf: null, not Infinity
    assert report["config"]["prompt_s"] == 1.0
    assert kept and set(kept) == {25}  # the stream's and the one-shot's calls alike


def test_stream_speaks_the_language_given_to_a_multilingual_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before 2026-12-07 the command line had no --language: a multilingual model always spoke
    English (upstream's default), and nothing said so. Now the stream samples what the library's
    stream samples with that language_id, says the language, and a language the model cannot
    speak, or a family that speaks English only, is one error line naming the flag."""
    args = ["stream", "--model", "multilingual-tiny", "--tokens", "12", "--text", "Bonjour à tous.",
            "--reference", str(reference_wav)]  # fmt: skip
    assert main([*args, "--language", "fr", "--out", str(tmp_path / "fr"), "--json"]) == 0
    report = _strict(capsys.readouterr().out)
    tts = load_model("multilingual-tiny")
    prepare_voice(tts, str(reference_wav))
    _, state = streaming.stream_all(tts, "Bonjour à tous.", streaming.StreamConfig("buffered"),
                                    max_new_tokens=12, seed=0, language_id="fr")  # fmt: skip
    assert report["language"] == "fr" and report["speech_tokens"] == list(state.tokens)
    assert main([*args, "--out", str(tmp_path / "en")]) == 0
    assert "language: en" in capsys.readouterr().out.splitlines()  # the default, said
    refused = [
        (["--language", "xx"], "argument --language: unsupported language 'xx'"),
        (["--language", "ja"], "argument --language: Japanese (ja) text needs the optional package"),
        (["--model", "tiny", "--language", "fr"], "argument --language: the standard model speaks English"),
    ]
    for extra, message in refused:
        assert main([*args, *extra, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    # a family that speaks English only is refused before the model is built
    monkeypatch.setattr("tts_workbench.models.sources.load_model", lambda *a, **k: pytest.fail("built"))
    assert main(["stream", "--model", "random", "--language", "fr", "--out", str(tmp_path / "refused")]) == 2
    assert "argument --language: the standard model speaks English" in capsys.readouterr().err


def test_diagnose_speaks_the_language_given_to_a_multilingual_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, reference_wav: Path
) -> None:
    """As ``stream --language``: the generation, the decode-step check and the precision stages
    each get the language (every T3 prefill of the diagnosis spells the text in it)."""
    from tts_workbench.runtime import decode

    languages: list[str | None] = []
    tokens = decode.text_tokens

    def spelled(tts: Any, text: str, cfg_weight: float = 0.5, language_id: str | None = None) -> torch.Tensor:
        if text != "a":  # spoken_language's own trial
            languages.append(decode.language_for(tts, language_id))
        return tokens(tts, text, cfg_weight, language_id)

    monkeypatch.setattr(decode, "text_tokens", spelled)
    for module in ("tts_workbench.studies.diagnose", "tts_workbench.runtime.generation"):
        monkeypatch.setattr(f"{module}.text_tokens", spelled)
    args = ["diagnose", "--model", "multilingual-tiny", "--tokens", "4", "--text", "Bonjour."]
    args += ["--reference", str(reference_wav)]  # not the generated 10 s voice: every flow call runs over it
    assert main([*args, "--language", "fr", "--out", str(tmp_path), "--json"]) == 0
    assert _strict(capsys.readouterr().out)["language"] == "fr"
    assert languages and set(languages) == {"fr"}, languages
    assert main(["diagnose", "--model", "tiny", "--language", "fr", "--out", str(tmp_path / "no")]) == 2
    assert "argument --language: the standard model speaks English only" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_a_converted_reference_is_said_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    """Only diagnose's report said a stereo or resampled reference was converted; the other
    commands converted it silently (docs/index.md said every report does)."""
    mono, sr = sf.read(reference_wav)
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([mono, 0.5 * mono], axis=1), sr)
    args = ["stream", "--strategy", "naive", "--tokens", "4", "--reference", str(stereo)]
    assert main([*args, "--out", str(tmp_path / "out"), "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout still the report alone
    assert f"reference: {stereo}: mixed 2 channels to mono" in err.splitlines()


def test_the_model_help_names_every_source() -> None:
    assert set(re.findall(r"[\w-]+", MODEL_HELP)) >= {*SIZES, *PRETRAINED}  # whole names


def test_the_help_speaks_of_what_a_user_sees_not_of_module_names() -> None:
    """(before 2026-12-07 it said "(bench.CONFIGS)", "(decode.py)", "(core.policies.POLICIES)" and
    gave the default text as "constants.UPSTREAM_SENTENCE"; the text's start is shown now, kept
    the sentence's own here)"""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        named = re.findall(r"\b[a-z_/]+\.(?:py|[A-Z_]{3,})\b", text)  # a file, or a module's constant
        assert not named, (name, named)
    shown = re.search(r"'([^']+) \.\.\.'", TEXT_HELP)
    assert shown and UPSTREAM_SENTENCE.startswith(shown.group(1)), TEXT_HELP


def shows_no_default(action: argparse.Action) -> bool:
    """Whether ``action`` has no default worth showing: none, a switch's False, or SUPPRESS."""
    return action.default is None or action.default is False or action.default == argparse.SUPPRESS


def test_every_flag_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "tts-workbench diagnose --model tiny" in top and "README.md" in top
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"diagnose", "stream", "profile", "trace", "bench", "load", "serve"}
    for name, command in commands.items():
        assert command.description, name
        formatter = command._get_formatter()
        for action in command._actions:
            assert action.help, (name, action.option_strings)
            # _HelpFormatter's rule: a flag shows its default unless it has none (None, a switch's
            # False, SUPPRESS); a help that writes "(default" itself must name the value there.
            if action.option_strings and not shows_no_default(action):
                shown = formatter._expand_help(action)  # the help as --help prints it
                assert "(default" in shown and str(action.default) in shown, (name, action.option_strings)
        text = " ".join(command.format_help().split())  # unwrapped
        assert "--seed SEED seed of the random" in text and "(default: 0)" in text, name
        assert "(default: None)" not in text and "(default: False)" not in text, name
    bench = " ".join(commands["bench"].format_help().split())
    assert "medians reported) (default: 2)" in bench and "--cpp-wrapper" in bench


@pytest.mark.parametrize("command", ["stream", "profile", "trace", "diagnose"])
def test_a_text_longer_than_t3s_positions_gives_one_error_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    """(before: an IndexError from T3's text position embedding, exit code 1; then an error that
    named no flag; upstream generate's path, which diagnose takes, is tests/test_generation.py's)"""
    args = [command, "--text", "hello world " * 1500, "--tokens", "4", "--reference", str(reference_wav)]
    out = "--logdir" if command in ("profile", "trace") else "--out"
    assert main([*args, out, str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --text: "), errors
    assert "beyond the 2048 T3 has positions for: split it" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_a_trace_past_turbos_positions_names_tokens_and_keeps_the_last_runs_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before: each step's folder was emptied, the last run's trace with it, then the refusal
    named max_new_tokens, no flag)"""
    args = ["trace", "--model", "turbo-tiny", "--steps", "eager"]  # Turbo's voice: 5 s at least

    def files() -> list[Path]:
        return sorted(p.relative_to(tmp_path) for p in (tmp_path / "decode-eager").rglob("*") if p.is_file())

    assert main([*args, "--tokens", "4", "--logdir", str(tmp_path)]) == 0
    kept = files()
    assert kept and (tmp_path / "reference.wav").is_file()  # the generated voice, kept with the run
    capsys.readouterr()
    assert main([*args, "--tokens", "8190", "--logdir", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --tokens: "), errors
    assert files() == kept


@pytest.mark.parametrize("command", ["stream", "load", "trace"])  # bench's: tests/test_bench.py
def test_a_refusal_after_the_voice_is_prepared_leaves_no_output_folder(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Turbo's positions are checked once its voice is prepared (the prefill holds the voice's
    prompt). Before, the generated voice was written to the output folder first, and stream's
    refusal told a command-line user to lower max_new_tokens."""
    out = tmp_path / "out"
    folder = "--logdir" if command == "trace" else "--out"
    args = [command, "--model", "turbo-tiny", "--tokens", "8190", folder]
    extra = {"load": ["--streams", "1"], "trace": ["--steps", "eager"]}
    assert main([*args, str(out), *extra.get(command, [])]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --tokens: "), errors
    assert "max_new_tokens" not in errors[0], errors
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "flag"),
    [("stream", "--out"), ("diagnose", "--out"), ("profile", "--logdir"), ("stream", "--reference"),
     ("load", "--texts"), ("trace", "--read")],  # before: the study ran, then printing its name failed
)  # fmt: skip
def test_a_path_that_is_not_utf8_is_refused_naming_its_flag(
    command: str, flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """argv bytes that are not UTF-8 (``$'out\\xff'``) are lone surrogates (before: soundfile's
    "'utf-8' codec can't encode" after the model was built, naming no flag, its folder made)."""
    from tts_workbench.interface import cli

    monkeypatch.setattr(cli, "_check_model", _built)
    with pytest.raises(SystemExit) as exit_:
        main([command, flag, "runs/out\udcff"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"argument {flag}: the path is not valid UTF-8" in errors[0], errors


@pytest.mark.parametrize("command", ["diagnose", "stream", "profile", "bench"])
def test_empty_text_is_refused_on_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # (before, `diagnose --text ""` spoke the default sentence instead, with exit code 0)
    assert main([command, "--text", " "]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--text: empty text" in errors[0]


def _built(*_a: object) -> None:
    raise AssertionError("a refused command went on to the model")


@contextmanager
def _no_model(*_a: object, **_k: object) -> Iterator[object]:
    """Stands in for ``commands.voiced_model`` where the study it feeds is replaced too: no model built."""
    yield object()


def test_diagnose_passes_autocast_on_and_prints_strict_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--autocast reaches the precision diagnosis (dropped, it ran without autocast unnoticed);
    a float of the report that is not finite is printed as null, not as Infinity."""
    from tts_workbench.studies import diagnose

    seen: list[dict[str, Any]] = []

    def diagnosed(**kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs)
        return {"snr_db": math.inf, "rtf": 0.5}

    monkeypatch.setattr(diagnose, "run_diagnosis", diagnosed)
    for flags in (["--autocast", "bfloat16"], []):
        assert main(["diagnose", *flags, "--dtype", "float16", "--out", str(tmp_path), "--json"]) == 0
        assert _strict(capsys.readouterr().out) == {"snr_db": None, "rtf": 0.5}
    assert [(s["dtype"], s["autocast"]) for s in seen] == [
        (torch.float16, torch.bfloat16), (torch.float16, None)
    ]  # fmt: skip


def test_profile_memory_reaches_the_profiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tts_workbench.interface import commands
    from tts_workbench.studies import profile_report

    memory: list[bool] = []

    def profiled(*args: Any, **_k: Any) -> dict[str, Any]:
        memory.append(args[6])  # (tts, logdir, run, tokens, text, seed, memory, decode)
        return {}

    monkeypatch.setattr(commands, "voiced_model", _no_model)
    monkeypatch.setattr(profile_report, "profile_generation", profiled)
    for flags in ([], ["--memory"]):
        assert main(["profile", *flags, "--logdir", str(tmp_path), "--json"]) == 0
    assert memory == [False, True]


def test_load_speaks_its_texts_file_and_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tts_workbench.interface import commands
    from tts_workbench.studies import load

    seen: dict[str, Any] = {}

    def loaded(_tts: object, _levels: list[int], **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {}

    texts = tmp_path / "texts.txt"
    texts.write_text("One.\n\nTwo.\n", encoding="utf-8")
    monkeypatch.setattr(commands, "voiced_model", _no_model)
    monkeypatch.setattr(load, "run_load", loaded)
    args = ["load", "--streams", "1", "--texts", str(texts), "--out", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    assert seen["texts"] == ["One.", "Two."] and seen["texts_from"] == str(texts)  # the report names it


def test_the_cli_defaults_are_the_librarys() -> None:
    """Written out in the parser (which imports no study: it stays light); tied here, as
    test_load_study ties --first-audio-limit."""
    from tts_workbench.serving.service import ServeOptions
    from tts_workbench.studies.bench import run_bench

    parser = build_parser()
    serve, options = parser.parse_args(["serve"]), ServeOptions()
    same = [("stall_s", "stall_s"), ("max_input_chars", "max_input_chars"), ("tokens", "default_tokens"),
            ("max_cache_len", "max_cache_len"), ("max_streams", "max_streams"), ("decode", "step"),
            ("dtype", "dtype"), ("flow", "flow"), ("model", "model"), ("out", "run_dir")]  # fmt: skip
    assert [getattr(serve, dest) for dest, _ in same] == [getattr(options, field) for _, field in same]
    # deliberately not None (torch's default: every core, in each replica): one torch thread, and
    # one Ray CPU, per replica (docs/serving.md)
    assert serve.threads == 1
    stream, config = parser.parse_args(["stream"]), StreamConfig()
    assert (stream.first_window_s, stream.window_s, stream.crossfade_ms) == (
        config.first_window_s, config.window_s, config.crossfade_ms
    )  # fmt: skip
    assert parser.parse_args(["bench"]).warmup == inspect.signature(run_bench).parameters["warmup"].default


@pytest.mark.parametrize("command", ["diagnose", "stream", "profile", "bench", "trace"])
def test_text_that_is_not_utf8_is_refused_on_every_command(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python reads argv bytes that are not UTF-8 (``printf 'caf\\xe9'``) as lone surrogates
    (before: a TypeError traceback from the tokenizer, exit code 1)."""
    from tts_workbench.interface import cli

    monkeypatch.setattr(cli, "_check_model", _built)
    assert main([command, "--text", "caf\udce9"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "argument --text: not valid Unicode text" in errors[0], errors


def test_load_windows_no_longer_than_the_crossfade_name_the_window_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``load`` has no crossfade flag: the fix is wider windows (before: "shorten it or widen
    the windows", after the model was built)."""
    from tts_workbench.interface import commands

    monkeypatch.setattr(commands, "voiced_model", _built)
    args = ["load", "--first-window-s", "0.04", "--window-s", "0.04", "--streams", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--first-window-s" in errors[0] and "shorten" not in errors[0], errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diagnose", "--device", "foo"], "unknown device 'foo'"),
        (["trace", "--device", "foo"], "unknown device 'foo'"),
        (["bench", "--tokens", "1"], "--tokens: at least 2"),  # no decode step to time
    ],
)
def test_bad_values_checked_in_process_give_one_error_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "--out" if args[0] != "trace" else "--logdir", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_an_output_folder_that_is_a_file_gives_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(["diagnose", "--out", str(taken / "sub")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(taken) in errors[0] and "give another folder (--out)" in errors[0]
    # profile has no --out: its folder is --logdir's, and --run's below it
    assert main(["profile", "--logdir", str(tmp_path), "--run", "taken/sub", "--tokens", "5"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "give another folder (--logdir / --run)" in errors[0], errors


def test_bench_refuses_a_policy_no_config_runs(capsys: pytest.CaptureFixture[str]) -> None:
    # upstream runs in float32 whatever --dtype says: the report named a policy nothing ran
    assert main(["bench", "--configs", "upstream,upstream-stream", "--dtype", "bfloat16"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --dtype: is the optimized wrapper's")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "99999"], "a port number from 1 to 65535, got '99999'"),
        (["load", "--text", "Hello."], "unrecognized arguments: --text"),  # not taken as --texts
        (["bench", "--tokens", "x"], "--tokens: must be a positive integer, got 'x'"),
        (["bench", "--warmup", "-1"], "--warmup: must be an integer >= 0, got '-1'"),
        (["stream", "--seed", "99999999999999999999999"], "--seed: must be an integer from 0 to 2**63 - 1"),
        # before: an OverflowError traceback from the window's token count
        (["load", "--window-s", "1e308"], "--window-s: must be a positive number of seconds up to 3600"),
        (["stream", "--first-window-s", "1e307"], "--first-window-s: must be a positive number of seconds"),
        # before: an empty value (an unset shell variable) was taken as not given, or as the working
        # folder: `load --url ""` measured the engine in this process, `serve --address ""` a local Ray
        (["load", "--url", ""], "--url: must not be empty"),
        (["load", "--voice", " "], "--voice: must not be empty"),
        (["serve", "--address", ""], "--address: must not be empty"),
        (["serve", "--voices", ""], "--voices: must not be empty"),
        (["stream", "--out", ""], "--out: must not be empty"),
        (["trace", "--logdir", ""], "--logdir: must not be empty"),
        # before 2026-12-04: "" read as the working folder (--model), an unknown device, a folder
        (["diagnose", "--model", ""], "--model: must not be empty"),
        (["stream", "--device", ""], "--device: must not be empty"),
        (["serve", "--device", ""], "--device: must not be empty"),
        (["stream", "--reference", ""], "--reference: must not be empty"),
    ],
)
def test_flag_values_are_checked_before_anything_runs(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diagnose", "--reference", "/"], "reference audio / is a folder, not a file"),
        (["stream", "--reference", "no/such.wav"], "reference audio no/such.wav does not exist"),
    ],
)
def test_a_reference_that_is_no_file_is_refused_before_the_command_runs(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tts_workbench.interface import commands

    def ran(_args: Any) -> None:
        raise AssertionError("the command ran: a model would be built before the refusal")

    monkeypatch.setattr(commands, args[0], ran)  # bound by the parser main builds
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: argument --reference: {message}: give a WAV of the voice"], errors


def test_trace_files_from_two_runs_get_labels_of_their_own() -> None:
    a, b = Path("m1/decode-eager/t3.decode.json.gz"), Path("m2/decode-eager/t3.decode.json.gz")
    assert _trace_labels([a, b]) == {"m1/decode-eager/t3.decode": a, "m2/decode-eager/t3.decode": b}
    one, other = Path("x/eager.json"), Path("y/compiled.json.gz")
    assert _trace_labels([one, other]) == {"eager": one, "compiled": other}


def test_a_trace_written_as_json_and_as_gzip_is_read_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # without their suffixes the two files had one label at every depth: refused as "named twice"
    trace = json.dumps({"deviceProperties": [], "traceEvents": []}).encode()  # a CPU-only profile
    plain, packed = tmp_path / "t.json", tmp_path / "t.json.gz"
    plain.write_bytes(trace)
    packed.write_bytes(gzip.compress(trace))
    assert _trace_labels([plain, packed]) == {"t.json": plain, "t.json.gz": packed}
    assert main(["trace", "--read", str(plain), str(packed), "--json"]) == 0
    assert [r["run"] for r in json.loads(capsys.readouterr().out)["table"]] == ["t.json", "t.json.gz"]
    assert main(["trace", "--read", str(plain), str(plain)]) == 2  # the same file given twice
    assert "error: argument --read: a trace file is named twice" in capsys.readouterr().err
    # the flag given once per file: the second list replaced the first, and one trace was read
    assert main(["trace", "--read", str(plain), "--read", str(packed), "--json"]) == 0
    assert [r["run"] for r in json.loads(capsys.readouterr().out)["table"]] == ["t.json", "t.json.gz"]
    assert main(["trace", "--read", str(plain), "--read", str(plain)]) == 2
    assert "error: argument --read: a trace file is named twice" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "said"), [
    (["--json", "diagnose"], "error: --json goes after the command: tts-workbench diagnose --json ..."),
    (["--seed=3", "stream"], "error: --seed=3 goes after the command: tts-workbench stream --seed=3 ..."),
    (["--bogus", "stream"], "error: unrecognized arguments: --bogus"),  # no flag of the command's
])  # fmt: skip
def test_a_commands_flag_before_the_command_is_told_to_go_after_it(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before: "unrecognized arguments: --json (see `tts-workbench diagnose --help`)", a help page
    that lists --json)"""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(said), errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where CUDA is not available")
def test_cuda_on_a_machine_without_it_names_the_flag_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    """(before: "use device='cpu'", Python's form, to a command-line user)"""
    assert main(["diagnose", "--device", "cuda"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "(on the command line: --device cpu)" in errors[0], errors


@pytest.mark.parametrize("flag", [["--voice", "alice"], ["--timeout", "5"]])
def test_load_refuses_url_flags_without_url(
    flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before: ignored, the study ran in process with the default voice and no timeout)"""
    assert main(["load", *flag, "--streams", "1", "--tokens", "4", "--out", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"argument {flag[0]}" in errors[0] and "--url" in errors[0], errors


def test_an_os_error_without_a_file_gives_no_folder_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder hint is for an output folder that cannot be made, not for a network error."""
    import errno

    from tts_workbench.interface import commands

    def unreachable(_args: object) -> None:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(commands, "load", unreachable)
    assert main(["load", "--url", "http://10.0.0.1:8000"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: Network is unreachable"], errors


def test_a_diagnosis_stage_whose_tracer_cannot_start_reports_it(
    tiny_tts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "never raise": before, the tracer's own error became an UnboundLocalError
    from tts_workbench.studies import diagnose

    def broken(_: object) -> None:
        raise RuntimeError("no hooks here (made on purpose)")

    monkeypatch.setattr(diagnose, "trace_dtypes", broken)
    out = diagnose._stage(tiny_tts, lambda: None)
    assert out["error"] == "RuntimeError: no hooks here (made on purpose)" and out["first_mismatch"] is None


def test_reports_are_written_as_strict_json() -> None:
    # Python's json writes inf as Infinity, which no strict parser (a browser's JSON.parse) takes
    report = {"ttfa_s": math.inf, "rows": [{"snr_db": -math.inf}, (1, math.nan)], "tokens": 3}
    text = strict_json.dumps(report)
    assert json.loads(text) == {"ttfa_s": None, "rows": [{"snr_db": None}, [1, None]], "tokens": 3}
    assert "Infinity" in json.dumps(report) and "Infinity" not in text


@pytest.mark.parametrize(("decode", "tokens", "says"), [
    ("eager", 8190, "n_positions=8196"), ("static", 8190, "n_positions=8196"),  # with the prompt's
    ("static", 9000, "beyond the 8196 positions"),  # alone past them: refused before the prefill
])  # fmt: skip
def test_stream_refuses_tokens_past_gpt2s_positions_before_streaming(
    decode: str, tokens: int, says: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Turbo's GPT-2 has 8196 positions (before: the static cache was made long enough and the
    stream ran ~2 min, then died with an IndexError; the eager step the same)."""
    monkeypatch.setattr(streaming, "run_to_files", lambda *_a, **_k: _built())
    args = ["stream", "--model", "turbo-tiny", "--decode", decode, "--tokens", str(tokens)]
    assert main([*args, "--out", str(tmp_path)]) == 2  # (Turbo's voice: the default, over 5 s)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "argument --tokens:" in errors[0] and says in errors[0], errors


@pytest.mark.parametrize("model", ["tiny", "turbo-tiny"])
def test_a_token_cap_no_stream_can_reach_is_refused_before_its_noise_is_drawn(
    model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stream's noise track is sized by the cap: before 2026-12-04, 10**20 tokens failed with a
    traceback from torch's randn (exit code 1), and 10**9 tried to allocate 640 GB."""
    huge, tts = 10**20, load_model(model)
    prepare_voice(tts, str(make_reference_wav(tmp_path / "voice.wav")))  # the default, over Turbo's 5 s
    with pytest.raises(ConfigError, match=f"{huge} new tokens is beyond the"):
        next(streaming.stream(tts, "Hi.", StreamConfig(), max_new_tokens=huge))
    args = ["stream", "--model", model, "--tokens", str(huge), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --tokens: ") and "beyond" in errors[0]


@pytest.mark.parametrize(
    "flag",
    [["--cut-only"], ["--keep", "5"], ["--steps", "eager"], ["--dtype", "bfloat16"], ["--tokens", "60"],
     ["--model", "tiny"], ["--logdir", "elsewhere"], ["--seed", "1"], ["--text", "Hi."],
     ["--reference", "no/such/voice.wav"]],  # before: "does not exist: give a WAV", then refused
)  # fmt: skip
def test_trace_read_refuses_the_flags_of_profiling(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A read trace is read as it was taken (before: these were ignored); a flag given with its
    default value is refused too (--tokens 60)."""
    assert main(["trace", "--read", "no/such/t3.decode.json.gz", *flag]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"argument {flag[0]}: " in errors[0] and "--read" in errors[0], errors


@pytest.mark.parametrize("steps", ["eager,eager", "static,eager,static"])
def test_trace_refuses_a_step_named_twice(
    steps: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before: profiled twice into one decode-STEP folder, the second run's trace replacing the first)"""
    from tts_workbench.interface import commands

    monkeypatch.setattr(commands, "voiced_model", _built)
    assert main(["trace", "--steps", steps, "--logdir", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "argument --steps:" in errors[0] and "twice" in errors[0], errors


@pytest.mark.parametrize(
    "flag", [["--first-window-s", "2"], ["--window-s", "3.5"], ["--crossfade-ms", "100"]]
)
def test_naive_streaming_refuses_the_buffered_flags(
    flag: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Naive cuts fixed chunks: a window was ignored, while a crossfade it never uses was checked
    against those windows (before: `--crossfade-ms 1000` refused as longer than a window; the
    parser now refuses over 240 ms whatever the strategy)."""
    from tts_workbench.interface import commands

    monkeypatch.setattr(commands, "voiced_model", _built)
    assert main(["stream", "--strategy", "naive", *flag]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"argument {flag[0]}: " in errors[0] and "buffered" in errors[0], errors
    assert "shorter than a window" not in errors[0]


def test_a_crossfade_past_the_seams_room_names_only_the_crossfade_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Buffered streaming's seams hold 240 ms of crossfade, which the flag's range says (before: 0 to
    3600000 ms, and 300 was refused with left_context_tokens and lookahead_tokens, which no flag sets)."""
    from tts_workbench.interface import commands, flags

    monkeypatch.setattr(commands, "voiced_model", _built)
    with pytest.raises(SystemExit) as exit_:
        main(["stream", "--crossfade-ms", "300", "--tokens", "4"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: argument --crossfade-ms: ") and "0 to 240" in errors[0], errors
    assert "left_context_tokens" not in errors[0], errors
    # the range is StreamConfig's with its default context and lookahead: the longest it takes
    assert flags.MAX_CROSSFADE_MS == 240
    StreamConfig(crossfade_ms=flags.MAX_CROSSFADE_MS)
    with pytest.raises(ConfigError, match="half the crossfade"):
        StreamConfig(crossfade_ms=flags.MAX_CROSSFADE_MS + 1)


def test_a_flag_the_command_does_not_have_points_to_the_commands_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """(before: "see `tts-workbench --help`", whose help lists no command's flags)"""
    with pytest.raises(SystemExit) as exit_:
        main(["load", "--max-streams", "4"])  # serve's flag
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(errors) == 1, errors
    assert "unrecognized arguments: --max-streams 4" in errors[0], errors
    assert "see `tts-workbench load --help`" in errors[0], errors


@pytest.mark.parametrize("run", ["../outside", "a/../../outside", "/tmp/outside"])
def test_profile_refuses_a_run_outside_its_logdir(
    run: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    tiny_tts: Any,
) -> None:  # fmt: skip
    """(before: `--run ../x` wrote the trace beside --logdir, not in it)"""
    from tts_workbench.core.errors import ConfigError
    from tts_workbench.interface import commands
    from tts_workbench.studies.profile_report import profile_generation

    monkeypatch.setattr(commands, "voiced_model", _built)
    assert main(["profile", "--run", run, "--logdir", str(tmp_path / "logs")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "argument --run:" in errors[0] and "inside --logdir" in errors[0], errors
    with pytest.raises(ConfigError, match="argument --run:"):  # from Python too
        profile_generation(tiny_tts, tmp_path / "logs", run, tokens=4, text="Hi.")
    assert not any(tmp_path.iterdir())


def test_diagnose_leaves_no_half_written_figure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    """(before: a figure that failed half way stayed under its real name)"""
    from matplotlib.figure import Figure

    def half_written(_fig: Any, path: Path, **_k: Any) -> None:
        path.write_bytes(b"\x89PNG half a figure")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    args = ["diagnose", "--tokens", "4", "--reference", str(reference_wav), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]  # whole; no figure, no partial file


def test_a_generation_without_a_speech_token_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path, tiny_tts: Any, steer: Any
) -> None:
    """(before: S3Gen's convolution failed on no input, a traceback; `stream` says "no audio")"""
    from tts_workbench.core.errors import NoSpeechError
    from tts_workbench.core.patching import shadow
    from tts_workbench.runtime.optimized import PerformanceOptimizedTTS

    base = ["--tokens", "1", "--seed", "5", "--reference", str(reference_wav)]  # seed 5: a first id no speech
    for command in (["diagnose", "--out", str(tmp_path / "d")], ["profile", "--logdir", str(tmp_path / "p")]):
        assert main([*command, *base]) == 2
        assert "no speech token" in capsys.readouterr().err
    invalid = tiny_tts.t3.hp.stop_speech_token + 1  # an id past the speech vocabulary
    with PerformanceOptimizedTTS(tiny_tts, policy="float32", decode="eager") as opt:
        with shadow(tiny_tts.t3.speech_head, "forward", steer({1: invalid})), pytest.raises(NoSpeechError):
            opt.generate("Hi.", max_new_tokens=1, seed=0)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["bench", "--tokens", "100000", "--configs", "optimized"], "--tokens"),
        (["trace", "--tokens", "100000", "--steps", "eager"], "--tokens"),
        (["stream", "--tokens", "100000"], "--tokens"),  # wrote reference.wav first
        (["stream", "--window-s", "0.02"], "--first-window-s/--window-s/--crossfade-ms"),
        (["diagnose", "--model", "EMPTY_DIR"], "--model"),
        (["diagnose", "--model", "A_FILE"], "--model"),
        (["diagnose", "--reference", "A_FILE", "--tokens", "5"], "--reference"),
        (["bench", "--reference", "A_FILE", "--tokens", "5", "--configs", "optimized"], "--reference"),
        (["stream", "--device", "foo"], "--device"),
    ],
)
def test_a_refusal_names_its_flag_and_writes_nothing(
    args: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before 2026-12-04 each of these named no flag, or made the output folder first (bench and
    trace decoded until T3 ran out of positions; a folder without weights passed the model check)."""
    (tmp_path / "empty").mkdir()
    noise = tmp_path / "noise.wav"
    noise.write_bytes(bytes(range(256)) * 8)  # a .wav name, no audio
    args = [{"EMPTY_DIR": str(tmp_path / "empty"), "A_FILE": str(noise)}.get(a, a) for a in args]
    out = tmp_path / "out"
    assert main([*args, "--out" if args[0] != "trace" else "--logdir", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: argument {flag}:"), errors
    assert not out.exists()


def test_profile_takes_tokens_past_t3s_positions_as_diagnose_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It runs upstream generate, which caps a longer run at its own 1000 tokens (the report says
    so), as diagnose does: --tokens 5000 is not refused (it was, for a moment on 2026-12-04)."""
    from tts_workbench.studies import profile_report

    class Profiled(Exception):
        pass

    def reached(*_a: object, **_k: object) -> None:
        raise Profiled

    monkeypatch.setattr(profile_report, "profile_generation", reached)
    with pytest.raises(Profiled):
        main(["profile", "--tokens", "5000", "--logdir", str(tmp_path)])


@pytest.mark.parametrize(
    ("field", "value"),
    [("t3_heads", 0), ("t3_heads", -1), ("t3_heads", "x"), ("t3_layers", None), ("t3_hidden", True),
     ("t3_heads", 3),  # 256 is no multiple of 3: T3's attention heads split its width
     ("cfm_channels", 12), ("hift_channels", 4)],  # S3Gen's group norms of 8, HiFT's three halvings
)  # fmt: skip
def test_a_damaged_tiny_config_is_refused_naming_the_model_flag(
    field: str, value: object, tiny_tts: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before: a ZeroDivisionError, TypeError or ValueError from the builders, a traceback or an
    error that named no flag)"""
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["tiny_config"][field] = value
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert main(["diagnose", "--model", str(folder), "--tokens", "4", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --model: "), errors
    assert "records a tiny_config this version cannot read" in errors[0] and field in errors[0], errors
    assert not out.exists()


@pytest.mark.parametrize("command", ["stream", "diagnose", "bench"])
def test_a_model_folder_that_cannot_be_loaded_names_the_model_flag(
    command: str, tiny_tts: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its files are all there (the check before anything runs passes) but one is truncated
    (before: diagnose and bench, which load in the study, named no flag)."""
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    data = (folder / "t3_cfg.safetensors").read_bytes()
    (folder / "t3_cfg.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert main([command, "--model", str(folder), "--tokens", "4", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --model: cannot read t3_cfg"), errors


# A packed trace of some size: cut in half, its deflate stream ends in the middle.
_PACKED = gzip.compress(
    json.dumps({"traceEvents": [{"name": f"aten::mm{i}", "ts": i, "dur": 1} for i in range(200)]}).encode(),
    mtime=0,
)


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("t3.decode.json", b"{}", "not a Chrome/Kineto trace"),
        ("t3.decode.json", b'{"traceEvents": 5}', "not a Chrome/Kineto trace"),
        # an interrupted copy (before: an EOFError traceback, exit code 1)
        ("t3.decode.json.gz", _PACKED[: len(_PACKED) // 2], "not a readable trace (EOFError"),
        # a first deflate block of the reserved type (before: a zlib.error traceback, exit code 1)
        ("t3.decode.json.gz", _PACKED[:10] + b"\xff" + _PACKED[11:], "not a readable trace (zlib.error: "),
    ],
    ids=["no-events", "events-not-a-list", "gzip-cut-in-half", "gzip-corrupted"],
)
def test_trace_read_of_json_that_is_no_trace_names_the_read_flag(
    name: str, data: bytes, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / name
    trace.write_bytes(data)
    assert main(["trace", "--read", str(trace)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --read: "), errors
    assert says in errors[0], errors


@pytest.mark.parametrize(
    ("command", "flag", "value", "says"),
    [("bench", "--configs", "upstream,,optimized", "an empty item"),
     ("bench", "--configs", ",optimized", "an empty item"),
     ("bench", "--configs", "optimized,", "an empty item"),
     ("trace", "--steps", "eager,,static", "an empty item"), ("trace", "--steps", ",eager", "an empty item"),
     ("trace", "--steps", "eager,", "an empty item"),
     ("trace", "--steps", "", "no decode step given"), ("trace", "--steps", " , ", "no decode step given")],
)  # fmt: skip
def test_a_comma_list_with_an_empty_item_is_refused(
    command: str, flag: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """As ``load --streams 1,,2`` is (before: the empty item was dropped and the rest ran); a list
    with no item at all names what to give."""
    from tts_workbench.interface import commands
    from tts_workbench.studies import bench

    monkeypatch.setattr(commands, "voiced_model", _built)
    monkeypatch.setattr(bench, "run_bench", _built)
    assert main([command, flag, value, "--out" if command == "bench" else "--logdir", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: argument {flag}: {says}"), errors


def test_a_size_given_twice_is_refused() -> None:
    """As ``--streams 2,2`` is (before: ``--step-buckets 1,1`` was taken as 1)."""
    assert batches("4,1") == (1, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="given twice in '1,1'"):
        batches("1,1")


def _two_families(tiny_tts: Any, folder: Path) -> Path:
    """A folder holding the standard and the Multilingual model's files, as a copy of upstream's
    ResembleAI/chatterbox repository does (the two share it). Its tts_workbench.json records the
    tiny sizes of the standard model (upstream's has none: read as full size) and no family."""
    other = save_checkpoint(load_model("multilingual-tiny"), folder.parent / "multilingual")
    save_checkpoint(tiny_tts, folder)
    for name in FAMILIES["multilingual"].files:
        (folder / name).write_bytes((other / name).read_bytes())
    meta = json.loads((folder / METADATA_FILE).read_text())
    del meta["family"]
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


def test_a_folder_of_two_families_loads_the_family_flag_names(
    tiny_tts: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before: refused, asking for family= to load_model, which no command has)"""
    folder = _two_families(tiny_tts, tmp_path / "hub")
    args = ["stream", "--model", str(folder), "--tokens", "4", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --model: "), errors
    assert "t3_cfg.safetensors" in errors[0] and "t3_mtl23ls_v2.safetensors" in errors[0], errors
    assert FAMILY_CHOICES == tuple(FAMILIES)  # the parser's own list, kept light
    assert main([*args, "--family", "standard"]) == 0
    with PerformanceOptimizedTTS.from_local(folder, family="standard") as tts:
        assert type(tts.tts) is ChatterboxTTS
    one = save_checkpoint(tiny_tts, tmp_path / "one")  # a family it does not hold: refused by name
    assert main(["stream", "--model", str(one), "--family", "turbo", "--out", str(tmp_path / "out2")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --family: "), errors
    assert "holds a standard model (t3_cfg.safetensors), not a turbo one" in errors[0], errors
    assert "--family standard" in errors[0], errors


@pytest.mark.parametrize("command", ["diagnose", "stream", "profile", "trace", "bench", "load", "serve"])
def test_the_family_flag_with_a_named_model_is_refused(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As load_model refuses family= with a name: the name says its family."""
    from tts_workbench.interface import commands

    monkeypatch.setattr(commands, "voiced_model", _built)
    assert main([command, "--model", "tiny", "--family", "standard"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: argument --family: "), errors
    assert "'tiny' names its family" in errors[0], errors


@pytest.mark.parametrize("command", ["diagnose", "profile", "trace", "load"])
def test_ctrl_c_ends_a_command_with_one_error_line(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before 2026-12-06: a Ctrl-C ended every command in a full traceback, exit code 1)"""
    from tts_workbench.interface import commands

    def interrupted(_args: argparse.Namespace) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, command, interrupted)
    assert main([command]) == 130  # 128 + SIGINT, as a shell reports a Ctrl-C
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["error: interrupted (Ctrl-C)"], err[-2000:]


def test_ctrl_c_during_the_heavy_imports_ends_with_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C before the command runs (torch and chatterbox's imports take seconds) was a
    traceback: only the command's own run was covered."""
    from tts_workbench.interface import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "quiet_libraries", interrupted)
    assert main(["diagnose"]) == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"
