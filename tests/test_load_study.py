"""The load study (``tts-workbench load``): its levels and their report, what it refuses before any
level runs (bad flags, an unusable --out, a level no device holds, in-process flags given with
--url), the untimed stream before its first level, and the capacity it concludes."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from matplotlib.figure import Figure

from conftest import Analyzers, voiced
from tts_workbench.core.constants import SPEECH_VOCAB_SIZE
from tts_workbench.core.errors import ConfigError
from tts_workbench.instruments.latency import ChunkMetrics, StreamReport
from tts_workbench.interface import flags
from tts_workbench.interface.cli import build_parser, main
from tts_workbench.interface.commands import SERVER_FLAGS
from tts_workbench.models import sources, vocode
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.runtime.streaming import StreamConfig, stream_tokens
from tts_workbench.studies import load
from tts_workbench.studies.load import (
    FIRST_AUDIO_LIMIT_S,
    MAX_LEVEL,
    arrival_offsets,
    checked_levels,
    fallbacks,
    format_load,
    format_real_time,
    listener_summary,
    real_time_capacity,
    run_level,
    run_load,
    same_as_solo,
    side_by_side,
)

CONFIG = StreamConfig("buffered", first_window_s=0.4, window_s=0.8)


def errors_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(autouse=True)
def _no_bandwidth_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every level here without its bandwidth probe (a 512 MiB reduction read for a quarter second,
    ~0.45 s a level); test_bench.py tests the probe, the first test below when a level takes it."""
    monkeypatch.setattr(load, "read_bandwidth", lambda *_a, **_k: 10e9)


def test_run_load_makes_its_out_folder_before_any_engine(
    tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before: made by ``conclude``, once every level had run: an unusable one lost them all)"""

    def engine(*_a: Any, **_k: Any) -> None:
        raise AssertionError("an engine was made before the --out folder")

    monkeypatch.setattr("tts_workbench.studies.load.StreamEngine", engine)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(NotADirectoryError):
        run_load(tiny_tts, [1, 2], tokens=6, outdir=afile / "load")


def test_load_cli_refuses_an_unusable_out_before_the_model_loads(
    reference_wav: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --reference nothing else writes into --out before the study ends (the generated
    voice is written there otherwise, which found a bad --out early by accident)."""

    def load_model(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the model loaded before the --out folder was made")

    monkeypatch.setattr("tts_workbench.models.sources.load_model", load_model)
    afile = tmp_path / "afile"
    afile.write_text("")
    out = afile / "load"
    args = ["load", "--streams", "1,2", "--tokens", "8", "--reference", str(reference_wav), "--out", str(out)]
    assert main(args) == 2
    errors = errors_in(capsys.readouterr().err)
    assert len(errors) == 1 and f"{out}: give another folder" in errors[0], errors


def test_flow_batches_past_the_largest_level_are_refused_before_the_model_loads(
    tiny_tts: ChatterboxTTS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As --step-buckets past every level is (before 2026-12-06: taken; 100000000000 windows
    allocated until the machine ran out, a traceback)."""

    def load_model(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the model loaded before --flow-batches was checked")

    monkeypatch.setattr("tts_workbench.models.sources.load_model", load_model)
    flags = ["--flow", "compiled", "--flow-batches", "1,16", "--out", str(tmp_path)]
    assert main(["load", "--streams", "1,2", *flags]) == 2
    errors = errors_in(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: argument --flow-batches"), errors
    with pytest.raises(ConfigError, match="argument --flow-batches: .* the largest level"):
        run_load(tiny_tts, [1, 2], tokens=6, flow="compiled", flow_batches=[1, 16])


BIG = "1" + "0" * 400


@pytest.mark.parametrize(
    "args",
    [
        ["--streams", BIG],  # before: OverflowError in the KV check's GiB
        ["--streams", str(MAX_LEVEL + 1)],
    ],
)
def test_a_level_past_any_device_gives_one_error_line(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", *args, "--out", str(tmp_path)]) == 2
    errors = errors_in(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: argument --streams: "), errors
    assert len(errors[0]) < 300, errors  # the 401 digits are cut


def test_a_level_that_raises_closes_its_progress_bar(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before: the bar was closed only when the level ended well; one that raised left its
    line open on stderr)"""
    bars: list[Any] = []

    class Bar:
        closed = False

        def __init__(self, **_k: Any) -> None:
            bars.append(self)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.closed = True

        def close(self) -> None:
            self.closed = True

        def update(self, _n: int) -> None:
            pass

        def set_postfix_str(self, _s: str) -> None:
            pass

    def submit(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("a submit that fails")

    monkeypatch.setattr(load, "progress_bar", Bar)
    monkeypatch.setattr(StreamEngine, "submit", submit)
    with pytest.raises(RuntimeError, match="a submit that fails"):
        run_level(tiny_tts, 1, ["Hello."], tokens=4, progress=True)
    assert len(bars) == 1 and bars[0].closed


def test_the_largest_level_allowed_is_the_kv_checks_to_refuse() -> None:
    assert checked_levels([MAX_LEVEL, 1], "given") == [1, MAX_LEVEL]
    with pytest.raises(ConfigError, match=f"^argument --streams: a level of more than {MAX_LEVEL} streams"):
        checked_levels([1, MAX_LEVEL + 1], "given")


def test_an_untimed_stream_runs_before_the_first_level_and_each_level_probes_the_machine(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3Gen is shared by every level's engine: its first calls cost more than later ones (the
    flow and vocoder ran at half the time after the first stream), which the first level, the
    1-stream baseline, paid alone. (before: the first engine made was the first level's)
    Each level reads the machine's bandwidth once warm, before its first stream: a level that
    fell in a slow spell of the host is named in the report."""
    events: list[tuple[str, int]] = []
    engines: list[Counted] = []
    speeds = iter([20e9, 5e9])

    def probe(device: str, mbytes: int = 512, min_run_time_s: float = 1.0) -> float:
        events.append(("probe", len(engines) - 1))
        return next(speeds)

    class Counted(StreamEngine):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            engines.append(self)
            events.append(("engine", self.max_streams))

        def submit(self, *a: Any, **k: Any) -> Any:
            events.append(("submit", engines.index(self)))
            return super().submit(*a, **k)

        def close(self) -> None:
            super().close()
            events.append(("close", engines.index(self)))

    monkeypatch.setattr("tts_workbench.studies.load.StreamEngine", Counted)
    monkeypatch.setattr(load, "read_bandwidth", probe)
    report = run_load(tiny_tts, [1, 2], tokens=20, config=CONFIG)
    # the warm stream's engine: one stream, through S3Gen, ended before the first level's engine
    assert events[:3] == [("engine", 1), ("submit", 0), ("close", 0)], events
    # the warm stream takes no probe; each level one, before its streams
    assert [e for e in events if e[0] in ("probe", "submit")] == [
        ("submit", 0),
        ("probe", 1),
        ("submit", 1),
        ("probe", 2),
        ("submit", 2),
        ("submit", 2),
    ]
    assert [level["summary"]["read_bandwidth_gb_s"] for level in report["levels"]] == [20.0, 5.0]
    text = format_load(report)
    assert re.search(r"read_bandwidth_gb_s +20\.00 +5\.00", text), text
    assert "memory read bandwidth 5.0 GB/s before 2 streams, against 20.0 GB/s before 1 stream" in text
    warm = engines[0]
    assert warm.stats.flow_calls >= 1 and warm.stats.vocoder_s > 0
    assert [e.max_streams for e in engines[1:]] == [1, 2]
    assert report["warmup_s"] > 0 and report["warmup_error"] is None
    # each level counts its own engine's streams and S3Gen calls, not the warm stream's
    for level, engine in zip(report["levels"], engines[1:], strict=True):
        assert len(level["per_stream"]) == level["streams"]
        assert level["engine"]["flow_calls"] == engine.stats.flow_calls
        assert level["engine"]["flow_windows"] == engine.stats.flow_windows


def load_flags() -> set[str]:
    """The long flags of ``tts-workbench load`` (``--help`` among them)."""
    command = next(
        a.choices["load"] for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    return {o for a in command._actions for o in a.option_strings if o.startswith("--")}


def test_the_load_studys_usage_block_shows_every_in_process_flag() -> None:
    # --seed and --dtype change what is measured and were in no usage block
    page = (Path(__file__).parents[1] / "docs" / "many-streams.md").read_text()
    usage = page.split("## The load study", 1)[1].split("```")[1]
    url_only = {"--url", "--voice", "--timeout"}  # docs/serving.md's
    flags = load_flags() - {"--help"} - url_only
    # a whole flag: --flow is inside --flow-batches, so a bare substring test always finds it
    assert sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", usage)) == []


def test_the_serving_page_lists_the_flags_load_url_refuses() -> None:
    # --prompt-s was refused with --url before the page listed it
    page = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    listed = re.search(r"The\s+in-process flags \(([^)]*)\)", page)
    assert listed and re.findall(r"`(--[a-z-]+)`", listed.group(1)) == list(SERVER_FLAGS)


@pytest.mark.parametrize(
    "flag",
    [
        ["--device", "cpu"],  # given with its default value: given all the same
        ["--decode", "compiled"],
        ["--dtype=bfloat16"],
        ["--flow", "eager"],
        ["--step-buckets", "1,2"],
        ["--flow-batches", "1,4"],
        ["--reference", "REF"],
        ["--reference", "no/such/voice.wav"],  # before: "does not exist: give a WAV", then refused
        ["--first-window-s", "2"],
        ["--window-s", "5"],
        ["--prompt-s", "3"],
        ["--alignment"],
        ["--fused"],
        ["--family", "standard"],
    ],
)
def test_load_refuses_in_process_flags_with_url(
    flag: list[str],
    reference_wav: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """(before: accepted and dropped: the server's model, step, dtype and windows were measured)"""

    def run_http_load(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a request was sent")

    monkeypatch.setattr("tts_workbench.studies.http_load.run_http_load", run_http_load)
    flag = [str(reference_wav) if a == "REF" else a for a in flag]
    assert main(["load", "--url", "http://127.0.0.1:9", *flag, "--streams", "1", "--out", str(tmp_path)]) == 2
    errors = errors_in(capsys.readouterr().err)
    name = flag[0].split("=")[0]
    assert len(errors) == 1 and errors[0].startswith(f"error: argument {name}: is the server's with --url")


def test_load_with_url_takes_its_own_flags_and_leaves_defaults_unrefused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    got: dict[str, Any] = {}

    def run_http_load(url: str, levels: list[int], **kwargs: Any) -> None:
        got.update(kwargs, url=url, levels=levels)
        raise ConfigError("stopped here")

    monkeypatch.setattr("tts_workbench.studies.http_load.run_http_load", run_http_load)
    args = ["load", "--url", "http://127.0.0.1:9", "--streams", "1,2", "--tokens", "7", "--seed", "3",
            "--arrival", "poisson:2", "--voice", "alice", "--timeout", "9", "--first-audio-limit", "0.7",
            "--language", "fr", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 2
    assert errors_in(capsys.readouterr().err) == ["error: stopped here"]
    # --language: each request's field, the server's model checks it (before 2026-12-07 refused
    # as the server's, and a multilingual server could be measured in English only)
    want = {"levels": [1, 2], "tokens": 7, "seed": 3, "arrival": "poisson:2", "voice": "alice",
            "timeout_s": 9.0, "first_audio_limit_s": 0.7, "language": "fr"}  # fmt: skip
    assert {k: got[k] for k in want} == want


def test_load_cli_reports_each_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    args = ["load", "--streams", "1,2", "--tokens", "20", "--first-window-s", "0.4", "--window-s", "0.8",
            "--prompt-s", "3"]  # fmt: skip
    rc = main([*args, "--reference", str(reference_wav), "--out", str(tmp_path), "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    # each level's summary on stderr as it ends (a run killed at a later level keeps them)
    lines = [line for line in captured.err.splitlines() if line.startswith("level ")]
    summaries = [json.loads(line.split(": ", 1)[1]) for line in lines]
    assert [summary.pop("failed_streams") for summary in summaries] == [[], []]  # (where: none)
    assert summaries == [level["summary"] for level in report["levels"]]
    # what was measured: the --model, the voice and the texts, in the report and its title
    assert (report["model"], report["reference"], report["texts"]) == ("tiny", str(reference_wav), "built-in")
    assert report["title"].startswith(
        f"load study of tiny on cpu, voice {reference_wav} (the last 3 s of its prompt), texts built-in,"
    )
    assert (report["config"]["first_window_s"], report["config"]["prompt_s"]) == (0.4, 3.0)
    lines = format_load(report).splitlines()
    assert lines[0] == report["title"]
    # a column per level, a line per figure (a line per level was ~330 characters wide)
    head = next(k for k, line in enumerate(lines) if line.split() == ["1", "stream", "2", "streams"])
    p95 = next(line.split() for line in lines[head:] if line.startswith("ttfa_p95_s "))
    assert p95 == ["ttfa_p95_s", *(f"{level['summary']['ttfa_p95_s']:.2f}" for level in report["levels"])]
    # the machine it ran on, as the bench's results record it (before 2026-12-07 none), and the
    # warning where another job shared the machine
    assert (report["environment"]["model"], report["environment"]["device"]) == ("tiny", "cpu")

    def at(load: float) -> dict:  # the report as if run on 2 CPUs, 2 torch threads, at that load
        env = {**report["environment"], "load_average_1m": load, "cpu_count": 2, "torch_threads": 2}
        return {**report, "environment": env}

    assert format_load(at(9.0)).splitlines()[1].startswith("the machine was busy: load average 9.0 on 2 CPUs")
    # its two stages' threads alone (T3's and S3Gen's, 2 each) make a load of 4: not a busy machine
    assert not any(line.startswith("the machine was busy") for line in format_load(at(4.5)).splitlines())
    assert [level["streams"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        s = level["summary"]
        ttfa = [row["ttfa_s"] for row in level["per_stream"]]
        assert s["failed"] == 0 and s["kv_mib_per_stream"] > 0
        # streams' own figures; with so few streams p95 and p99 are the slowest one's
        assert s["ttfa_p50_s"] in ttfa and s["ttfa_p95_s"] == s["ttfa_p99_s"] == max(ttfa)
        # the limiting stage is the one whose thread was busier
        assert s["limiting_stage"] == max(("t3", "s3gen"), key=lambda stage: s[f"{stage}_busy_pct"])
        assert len(level["per_stream"]) == level["streams"]
        # the tokens per second the level needs count the ids T3 samples and S3Gen drops
        sampled = sum(row["sampled_tokens"] for row in level["per_stream"])
        kept = sum(len(row["speech_tokens"]) for row in level["per_stream"])
        assert sampled == 20 * level["streams"] > kept  # random weights: some ids are not speech
        # and no stop token: each stream ran to its cap, and the level counts them
        assert all(row["capped"] for row in level["per_stream"]) and s["capped"] == level["streams"]
        assert s["t3_tokens_per_s_needed"] == pytest.approx(25 * level["streams"] * sampled / kept)
        assert all(row["speech_tokens"] and row["ttfa_s"] > 0 for row in level["per_stream"])
        assert level["rows_held_after"] == 0  # every stream freed its rows
        # the level's rates and sizes from its own figures: per wall second, per call, per stream
        engine, memory, n = level["engine"], level["memory"], level["streams"]
        assert s["t3_tokens_per_s"] == pytest.approx(engine["t3_tokens"] / level["wall_s"])
        assert s["windows_per_flow_call"] == pytest.approx(engine["flow_windows"] / engine["flow_calls"])
        assert s["kv_mib_per_stream"] * 2**20 == pytest.approx(level["kv_bytes_per_stream"])
        growth = memory["peak_bytes"] - memory["start_bytes"]
        assert s["growth_mib_per_stream"] * n * 2**20 == pytest.approx(growth)
    assert (tmp_path / "load.json").exists() and (tmp_path / "load.png").exists()
    assert "note" in report and "capped at 20 tokens (a model with random weights" in report["note"]
    # which levels held in real time, by the stated first-audio limit (the default 0.5 s)
    real_time = report["real_time"]
    assert real_time["first_audio_limit_s"] == 0.5
    for level in report["levels"]:
        s = level["summary"]
        held = not s["failed"] and not s["streams_with_underruns"] and s["ttfa_p95_s"] <= 0.5
        assert (str(level["streams"]) not in real_time["missed"]) == held  # JSON keys are strings


def test_turbos_closing_silence_is_no_token_t3_kept(tmp_path: Path) -> None:
    """The engine appends Turbo's three closing silence tokens to a stream that ended: vocoded, never
    sampled. (before: counted as kept, so the tokens per second needed were under 25 a stream)"""
    tts = voiced("turbo-tiny", make_reference_wav(tmp_path / "r.wav", seconds=6.0))  # Turbo: > 5 s
    level = run_load(tts, [1], tokens=20, config=CONFIG, model="turbo-tiny")["levels"][0]
    (row,) = level["per_stream"]
    tail = vocode.tail_tokens(tts.s3gen)
    assert len(tail) == 3 and row["error"] is None and row["speech_tokens"][-3:] == tail
    needed = level["summary"]["t3_tokens_per_s_needed"]
    assert needed == pytest.approx(25 * row["sampled_tokens"] / (len(row["speech_tokens"]) - 3))
    assert needed >= 25  # each second of audio is 25 speech tokens T3 sampled, and the ids it dropped


def test_the_cli_default_first_audio_limit_is_the_studys() -> None:
    # written out in the parser (which imports no study): a test keeps the two one number
    from tts_workbench.interface.cli import build_parser

    args = build_parser().parse_args(["load"])
    assert args.first_audio_limit == FIRST_AUDIO_LIMIT_S


def test_load_studies_side_by_side_keep_each_ones_label_and_levels() -> None:
    def study(ttfa: list[float]) -> dict:
        levels = [{"summary": {"streams": 2**k, "ttfa_p95_s": t, "failed": 0}} for k, t in enumerate(ttfa)]
        return {"levels": levels}

    studies = {"10 s": study([1.0, 2.0]), "2 s": study([0.5, 0.7])}
    both = side_by_side(studies, "prompt", ["streams", "ttfa_p95_s"])
    assert list(both.columns) == ["prompt", "streams", "ttfa_p95_s"]
    assert both.values.tolist() == [["10 s", 1, 1.0], ["10 s", 2, 2.0], ["2 s", 1, 0.5], ["2 s", 2, 0.7]]


def test_levels_run_in_ascending_order_and_are_refused_before_torch_is_imported() -> None:
    assert flags.levels("4,1,2") == (1, 2, 4)  # the figure's lines and the verdict read them so
    for bad, says in (
        ("0", "positive integers"),
        ("1,,2", "positive integers"),
        ("2,1,2", "a level is given twice"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            flags.levels(bad)
    # the command line's parser and type, in an interpreter that has not imported torch
    probe = (
        "import sys; from tts_workbench.interface import cli; "
        "print(cli.build_parser().parse_args(['load', '--streams', '2,1']).streams, 'torch' in sys.modules)"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert ran.stdout.strip() == "(1, 2) False", ran.stderr


def test_run_load_refuses_no_level_or_a_repeated_one_before_touching_the_model() -> None:
    for levels in ([], [0, 1], [2, 1, 2]):
        with pytest.raises(ConfigError, match="^argument --streams: "):
            run_load(object(), levels)


def test_run_load_runs_its_levels_in_ascending_order(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    def level(_tts: Any, n: int, *_a: Any, **_k: Any) -> dict[str, Any]:
        return {"streams": n, "summary": {"streams": n, "failed": 0, "ttfa_p95_s": 0.1,
                                          "streams_with_underruns": 0, "worst_underrun_s": 0.0}}  # fmt: skip

    monkeypatch.setattr("tts_workbench.studies.load.run_level", level)
    report = run_load(tiny_tts, [4, 1, 2], tokens=6)
    assert [lv["streams"] for lv in report["levels"]] == [1, 2, 4]
    assert report["real_time"]["streams"] == 4


def test_a_level_whose_kv_cache_outgrows_the_device_is_refused_before_any_level_runs(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    def level(*_a: Any, **_k: Any) -> dict[str, Any]:
        raise AssertionError("a level ran")

    monkeypatch.setattr("tts_workbench.studies.load.run_level", level)
    too_many = r"^argument --streams: the 1000000000-stream level needs .* GiB of KV cache .* or fewer"
    with pytest.raises(ConfigError, match=too_many):
        run_load(tiny_tts, [1, 1_000_000_000], tokens=6)


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        ("bf16", r"unknown dtype policy 'bf16'"),
        ("auto", r"dtype policy 'auto' is chosen per device.*choose_policy"),
    ],
)
def test_run_load_refuses_a_dtype_policy_it_cannot_run_before_any_level(
    policy: str, error: str, tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before 2026-12-06: "bf16" and "auto" ran T3 with the model's float32 weights and the report
    named them as its T3 dtype; ``same_as_solo`` reran the same plan, so nothing caught it)"""

    def ran(*_a: Any, **_k: Any) -> dict[str, Any]:
        raise AssertionError("the warm-up or a level ran")

    monkeypatch.setattr(load, "warm_up", ran)
    monkeypatch.setattr(load, "run_level", ran)
    with pytest.raises(ConfigError, match=f"^argument --dtype: {error}"):
        run_load(tiny_tts, [1], tokens=4, policy=policy)


def test_a_kv_refusal_where_not_one_stream_fits_names_what_shrinks_a_streams_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Less than one stream's KV cache left beside what the process holds (before 2026-12-06: "keep
    the levels to 0 streams or fewer", and a level of 0 streams is refused)."""
    kv, held = 3 * 2**19, 2**30
    monkeypatch.setattr(load, "device_memory_bytes", lambda _device: held + kv // 2)
    monkeypatch.setattr(load, "held_bytes", lambda _device: held)
    with pytest.raises(ConfigError) as refused:
        load.check_kv_fits(1, kv, torch.device("cpu"))
    message = str(refused.value)
    assert "not even one stream's KV cache fits beside what this process holds; use" in message, message
    assert "0 streams" not in message, message
    suggested = set(re.findall(r"--[\w-]+", message)) - {"--streams"}  # the flag it is refused under
    assert suggested == {"--tokens", "--dtype", "--device"} and suggested <= load_flags(), message


@pytest.mark.parametrize("gap", [1, 2**20 // 2])  # bytes the level needs past what is left: 1 to the last
def test_a_kv_refusal_tells_its_figures_apart_and_leaves_the_process_its_memory(
    gap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the boundary (the reviewer's cpu: 23.5 GiB, 1.5 MiB a stream, 1.1 GiB held) the level
    needs a byte or half a stream's KV more than is left: both GiB figures differ, and the bound
    it suggests fits beside what the process holds (before 2026-12-06: "needs 23.5 GiB ... more
    than the 23.5 GiB" and a bound that gave all the RAM to the KV cache)."""
    kv, held = 3 * 2**19, int(1.1 * 2**30)
    largest = 15_300
    total = held + largest * kv - gap
    monkeypatch.setattr(load, "device_memory_bytes", lambda _device: total)
    monkeypatch.setattr(load, "held_bytes", lambda _device: held)
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError) as refused:
        load.check_kv_fits(largest, kv, cpu)
    message = str(refused.value)
    found = re.search(r"needs ([\d.]+) GiB of KV cache .* more than the ([\d.]+) GiB .* keep the levels to "
                      r"(\d+) streams or fewer$", message)  # fmt: skip
    assert found, message
    needs, left, bound = found.groups()
    assert float(needs) > float(left) and f"the {1.1:.2f} GiB this process holds" in message, message
    assert int(bound) * kv <= total - held and int(bound) == largest - 1, message
    load.check_kv_fits(int(bound), kv, cpu)  # the bound suggested passes


@pytest.mark.parametrize(
    ("seed", "error"),
    [
        (
            2**64 - 1,
            "^seed 18446744073709551615: the 2-stream level's last stream takes seed 18446744073709551616, "
            r"past 2\*\*64 - 1: give 18446744073709551614 or less",
        ),
        (-(2**63) - 1, r"^seed must be an int in \[-2\*\*63, 2\*\*64\), got -9223372036854775809$"),
    ],
)
def test_a_seed_a_levels_stream_cannot_take_is_refused_before_any_engine(
    seed: int, error: str, tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's seed is the study's plus its place in the level, each in [-2**63, 2**64) as the
    engine takes it (before: past it, the engine refused a later level's stream after the earlier
    levels had run)."""

    def engine(*_a: Any, **_k: Any) -> None:
        raise AssertionError("an engine was made for a seed no stream can take")

    monkeypatch.setattr("tts_workbench.studies.load.StreamEngine", engine)
    with pytest.raises(ConfigError, match=error):
        run_load(tiny_tts, [1, 2], tokens=6, seed=seed)


def test_the_capacity_is_the_largest_level_held_and_each_miss_says_why() -> None:
    def level(n: int, p95: float | None, failed: int = 0, underran: int = 0) -> dict[str, Any]:
        return {"streams": n, "failed": failed, "ttfa_p95_s": p95, "streams_with_underruns": underran,
                "worst_underrun_s": 0.3 if underran else 0.0}  # fmt: skip

    levels = pd.DataFrame([level(1, 0.2), level(2, 0.4), level(4, 0.45, underran=2), level(8, 0.9, failed=1)])
    got = real_time_capacity(levels, first_audio_limit_s=0.5)
    assert got["streams"] == 2 and set(got["missed"]) == {4, 8}
    assert got["missed"][4] == "2 underran (worst gap 0.30 s)"
    assert got["missed"][8] == "1 failed; first-audio p95 0.90 s > 0.5 s"
    assert real_time_capacity(levels, first_audio_limit_s=0.3)["streams"] == 1  # 2's p95 is 0.4 s
    assert real_time_capacity(levels, first_audio_limit_s=0.4)["streams"] == 2  # "p95 <= limit": held
    text = format_real_time(got)
    assert text.startswith("held in real time: 2 streams") and "4 streams missed: 2 underran" in text
    # a level where no stream spoke has no first-audio p95 (NaN in the frame): it missed too
    nobody = real_time_capacity(pd.DataFrame([level(1, None, failed=1)]))
    assert nobody["streams"] is None and "none spoke" in nobody["missed"][1]
    assert format_real_time(nobody).startswith("held in real time: no level")


def test_a_level_where_nobody_spoke_says_so_without_a_p95() -> None:
    level = {"streams": 2, "failed": 2, "ttfa_p95_s": None, "streams_with_underruns": 0,
             "worst_underrun_s": 0.0}  # fmt: skip
    assert real_time_capacity(pd.DataFrame([level]), 0.5)["missed"][2] == "2 failed; none spoke"


def test_a_stream_that_ended_without_audio_is_silent_not_failed() -> None:
    # random weights may sample no speech token in a short stream: it ends cleanly, with nothing
    # to play (before 2026-12-04 counted as failed, where the engine counted no failure)
    quiet = {"arrival_s": 0.0, "ttfa_s": None, "audio_s": 0.0, "underruns": 0, "max_underrun_s": 0.0,
             "error": None}  # fmt: skip
    s = listener_summary(1, 1.0, [quiet])
    assert (s["failed"], s["silent"]) == (0, 1)
    assert real_time_capacity(pd.DataFrame([s]), 0.5)["missed"][1] == "1 spoke nothing; none spoke"


@pytest.fixture(scope="module")
def one_failed(tiny_tts: ChatterboxTTS) -> dict[str, Any]:
    """A 2-stream level whose second stream fails on its own request (an empty text), run as the
    command line runs it (progress on; what it wrote to stderr in ``"stderr"``)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as patch:
        # (a module fixture is set up before the function fixture that stubs the probe)
        patch.setattr(load, "read_bandwidth", lambda *_a, **_k: 10e9)
        report = run_load(
            tiny_tts, [2], texts=["Hello there, how are you.", ""], tokens=20, config=CONFIG, progress=True
        )
    return {**report, "stderr": err.getvalue()}


def test_each_level_ends_with_a_line_a_person_reads(one_failed: dict[str, Any]) -> None:
    """(before 2026-12-07 the command line printed each level's whole summary as JSON, ~800
    characters, also without --json; with it, it still does: test_load_cli_reports_each_level)"""
    summary = one_failed["levels"][0]["summary"]
    (line,) = [x for x in one_failed["stderr"].splitlines() if "done:" in x]
    underran = summary["streams_with_underruns"]  # (the one that spoke may underrun on a busy machine)
    assert line == (
        f"2 streams done: first audio p95 {summary['ttfa_p95_s']:.2f} s, {summary['audio_per_wall_s']:.2f} s "
        f"of audio a wall second, limiting stage {summary['limiting_stage']}"
        f"{f', {underran} underran' if underran else ''}, stream 2 failed"
    )
    assert "{" not in one_failed["stderr"]
    none = {**summary, "ttfa_p95_s": None, "limiting_stage": None, "streams_with_underruns": 2}
    assert load.level_line(none, [1, 2]) == (
        f"2 streams done: none spoke, {summary['audio_per_wall_s']:.2f} s of audio a wall second, "
        "limiting stage none, 2 underran, streams 1, 2 failed"
    )


def test_the_solo_check_skips_the_streams_that_failed_and_counts_them(
    tiny_tts: ChatterboxTTS, one_failed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(before: it ran the failed stream alone, which raised its error again: notebook 09's check
    died instead of reporting)"""
    first, second = one_failed["levels"][0]["per_stream"]
    assert first["error"] is None and second["error"].startswith("EmptyTextError: ")
    compared: list[str] = []  # the texts run alone: all([]) is True, so a check of none would pass

    def counted(tts: Any, text: str, **kwargs: Any) -> Any:
        compared.append(text)
        return stream_tokens(tts, text, **kwargs)

    monkeypatch.setattr(load, "stream_tokens", counted)
    solo = same_as_solo(tiny_tts, one_failed)
    assert solo[["streams", "solo_tokens", "failed"]].values.tolist() == [[2, True, 1]]
    assert compared == [first["text"]]
    # the stream that spoke, its tokens no longer its solo run's: the check says so
    changed = {**first, "speech_tokens": [*first["speech_tokens"], 0]}
    level = {**one_failed["levels"][0], "per_stream": [changed, second]}
    solo = same_as_solo(tiny_tts, {**one_failed, "levels": [level]})
    assert solo[["streams", "solo_tokens", "failed"]].values.tolist() == [[2, False, 1]]
    # every stream failed: none to compare, so no verdict (all([]) said True)
    level = {**one_failed["levels"][0], "per_stream": [second, second]}
    solo = same_as_solo(tiny_tts, {**one_failed, "levels": [level]})
    assert solo["solo_tokens"].tolist() == [None]


def test_the_report_says_which_streams_failed_and_why(one_failed: dict[str, Any]) -> None:
    """(before: only how many, though each stream's error is in the report)"""
    error = one_failed["levels"][0]["per_stream"][1]["error"]
    lines = format_load(one_failed).splitlines()
    assert f"  2 streams: stream 2 (seed 1, text '') failed: {error}" in lines
    assert not any("stream 1 (" in line for line in lines)  # the one that spoke
    # a report kept without its per-stream rows (the GPU check's results file) still prints
    kept = {**one_failed, "levels": [{k: v for k, v in level.items() if k != "per_stream"}
                                     for level in one_failed["levels"]]}  # fmt: skip
    assert "failed:" not in format_load(kept) and format_load(kept).startswith(one_failed["title"])


def test_arrivals_and_what_the_listeners_got_from_hand_made_streams() -> None:
    # Poisson: the first stream at the level's start (no idle lead-in), then seeded gaps.
    offsets = arrival_offsets(("poisson", 2.0), 4, seed=0)
    assert offsets[0] == 0.0 and len(offsets) == 4 and (np.diff(offsets) > 0).all()
    assert (offsets == arrival_offsets(("poisson", 2.0), 4, seed=0)).all()
    assert (arrival_offsets(("burst", math.inf), 3, seed=0) == 0).all()
    # any seed a stream takes (before: numpy's generator refused a negative one after the warm-up)
    for seed in (-1, -(2**63), 2**64 - 1):
        spread = arrival_offsets(("poisson", 2.0), 3, seed)
        assert len(spread) == 3 and (np.diff(spread) > 0).all()
        assert (spread == arrival_offsets(("poisson", 2.0), 3, seed)).all()

    def row(
        arrival_s: float, ttfa_s: float | None, audio_s: float, error: str | None = None
    ) -> dict[str, Any]:
        return {"arrival_s": arrival_s, "ttfa_s": ttfa_s, "audio_s": audio_s, "underruns": 0,
                "max_underrun_s": 0.0, "error": error}  # fmt: skip

    streams = [row(0.0, 0.5, 2.0), row(1.0, 0.7, 2.0), row(3.0, 0.9, 4.0), row(0.5, None, 0.0, "boom")]
    s = listener_summary(4, 8.0, streams)
    assert s["failed"] == 1 and s["ttfa_p50_s"] == 0.7 and s["ttfa_p99_s"] == 0.9
    # Percentiles are streams' own figures (nearest rank): below 20 streams p95 is the slowest
    # stream's; at 20, one stream in 20 is the 5% it leaves out. Interpolated, one stream at 2 s
    # gave p95 1.34 s at 8 streams, 0.58 s at 16: neither any listener's wait nor 95% of them.
    for n, p95 in ((8, 2.0), (16, 2.0), (19, 2.0), (20, 0.1), (32, 0.1)):
        level = [row(0.0, 0.1, 2.0) for _ in range(n - 1)] + [row(0.0, 2.0, 2.0)]
        assert listener_summary(n, 8.0, level)["ttfa_p95_s"] == p95, n
    assert s["audio_per_wall_s"] == 1.0  # 8 s of audio in 8 wall seconds
    # every stream in real time from its arrival: the last one ends at 3 + 4 s
    assert s["real_time_audio_per_wall_s"] == pytest.approx(8.0 / 7.0)
    burst = listener_summary(2, 3.0, [row(0.0, 0.5, 2.0), row(0.0, 0.6, 2.0)])
    assert burst["real_time_audio_per_wall_s"] == 2.0  # a burst of equal streams: their count


def test_the_underrun_figures_count_streams_that_underran_and_keep_the_worst_gap() -> None:
    def row(underruns: int, max_underrun_s: float) -> dict[str, Any]:
        return {"arrival_s": 0.0, "ttfa_s": 0.2, "audio_s": 2.0, "underruns": underruns,
                "max_underrun_s": max_underrun_s, "error": None}  # fmt: skip

    failed = {**row(2, 0.9), "error": "RuntimeError: boom"}  # it underran, then failed
    s = listener_summary(4, 4.0, [row(3, 0.4), row(1, 0.1), row(0, 0.0), failed])
    # two streams underran (four gaps between them), the longest gap 0.4 s; a failed stream's
    # gaps are not a listener's (it is counted failed)
    assert (s["streams_with_underruns"], s["worst_underrun_s"]) == (2, 0.4)


def test_a_streams_row_counts_from_its_own_submit_and_keeps_its_worst_gap() -> None:
    """A stream sent 1 s into its level, queued 0.05 s, first audio 0.3 s after its submit, then
    two gaps (0.2 s and 0.5 s): its row's first audio and queue wait are its own (not counted from
    the level's start), its worst gap is the longer one, not the two summed."""

    def chunk(k: int, emitted_s: float, queued_s: float = 0.0) -> ChunkMetrics:
        return ChunkMetrics(index=k, emitted_s=emitted_s, tokens=12, invalid_tokens=0, t3_s=0.1, flow_s=0.1,
                            vocoder_s=0.0, audio_s=0.5, prompt_frames=0, context_frames=0, new_frames=25,
                            s3gen_calls=1, queued_s=queued_s)  # fmt: skip

    report = StreamReport("buffered", chunks=[chunk(0, 0.3, queued_s=0.05), chunk(1, 1.0), chunk(2, 2.0)])
    report.wall_s = 2.0
    handle = SimpleNamespace(report=report, request=SimpleNamespace(text="Hi.", seed=7), tokens=[3, 4],
                             sampled=[3, 4, SPEECH_VOCAB_SIZE], capped=True)  # fmt: skip
    row = load._stream_row(handle, {}, arrival_s=1.0)  # type: ignore[arg-type]
    assert (row["arrival_s"], row["queued_s"], row["ttfa_s"]) == (1.0, 0.05, 0.3)
    assert row["underruns"] == 2 and row["underrun_s"] == pytest.approx(0.7)
    assert row["max_underrun_s"] == pytest.approx(0.5)
    assert (row["sampled_tokens"], row["kept_tokens"], row["error"]) == (3, 2, None)


def test_the_figure_draws_the_first_audio_limit_the_verdict_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[float] = []

    def figure(_levels: pd.DataFrame, limit_s: float) -> Figure:
        drawn.append(limit_s)
        return Figure()

    monkeypatch.setattr(load, "load_figure", figure)
    summary = {"streams": 1, "failed": 0, "ttfa_p95_s": 0.6, "streams_with_underruns": 0,
               "worst_underrun_s": 0.0}  # fmt: skip
    report = load.conclude({"levels": [{"summary": summary}]}, 0.7, tmp_path)
    assert report["real_time"]["streams"] == 1 and drawn == [0.7]
    assert Path(report["files"]["figure"]).is_file()


def test_a_levels_rates_and_sizes_from_hand_made_figures() -> None:
    """Each per-stream, per-second and per-call figure of a level, where every one differs from its
    inverse, its total or its busy-time rate (a live level of the tiny model may vocode one window a
    call, and its memory may not grow)."""
    row = {"arrival_s": 0.0, "ttfa_s": 0.2, "audio_s": 1.0, "underruns": 0, "max_underrun_s": 0.0,
           "error": None, "sampled_tokens": 25, "kept_tokens": 25, "capped": True}  # fmt: skip
    engine = {"t3_tokens": 100, "t3_busy_s": 0.5, "s3gen_busy_s": 1.0, "flow_windows": 6, "flow_calls": 4,
              "flow_s": 0.2, "vocoder_calls": 3, "vocoder_s": 0.09}  # fmt: skip
    memory = {"start_bytes": 10 * 2**20, "peak_bytes": 14 * 2**20}
    s = load._level_summary(2, 2.0, [row, row], engine, memory, 3 * 2**20)
    assert s["t3_tokens_per_s"] == 50.0  # over the level's 2 wall seconds, not T3's 0.5 busy ones
    assert s["t3_tokens_per_busy_s"] == 200.0
    assert s["windows_per_flow_call"] == 1.5
    assert s["windows_per_vocoder_call"] == 2.0  # 6 windows in 3 vocoder calls
    assert s["vocoder_ms_per_call"] == pytest.approx(30.0)  # 90 ms over 3 calls (not 6 windows)
    assert s["growth_mib_per_stream"] == 2.0  # 4 MiB over 2 streams
    assert s["kv_mib_per_stream"] == 3.0  # one stream's cache, not the level's
    assert s["limiting_stage"] == "s3gen"  # busy 1.0 s of 2 against T3's 0.5 s
    assert s["capped"] == 2  # both streams ended at their cap
    # a level whose streams all failed before any stage worked: no stage limited it ("t3" before)
    idle = {
        **engine,
        "t3_tokens": 0,
        "t3_busy_s": 0.0,
        "s3gen_busy_s": 0.0,
        "flow_windows": 0,
        "flow_calls": 0,
        "vocoder_calls": 0,
    }
    failed = {**row, "error": "EmptyTextError: ...", "audio_s": 0.0}
    assert load._level_summary(2, 2.0, [failed, failed], idle, memory, 3 * 2**20)["limiting_stage"] is None


def test_load_cli_passes_its_seed_dtype_and_first_audio_limit_to_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    args = ["load", "--streams", "1", "--tokens", "8", "--seed", "7", "--dtype", "bfloat16",
            "--first-audio-limit", "9", "--first-window-s", "0.4", "--window-s", "0.8"]  # fmt: skip
    assert main([*args, "--reference", str(reference_wav), "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (level,) = report["levels"]
    assert report["real_time"]["first_audio_limit_s"] == 9.0
    assert report["t3_dtype"] == "bfloat16"
    assert [row["seed"] for row in level["per_stream"]] == [7]  # the level's first stream: --seed


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--streams", "0"], "--streams"),
        (["--streams", "-2"], "--streams"),
        (["--streams", "1,two"], "--streams"),
        (["--streams", "2,1,2"], "--streams"),  # a level twice: its rows would share one verdict
        (["--arrival", "poisson:fast"], "--arrival"),
        (["--arrival", "sometimes"], "--arrival"),
        (["--texts", "/no/such/file"], "--texts"),
        (["--texts", "EMPTY"], "--texts"),
        (["--texts", "LATIN1"], "--texts"),
        (["--tokens", "5000"], "--tokens"),
        (["--streams", "1000000000"], "--streams"),  # a KV cache beyond the device's memory
        (["--first-window-s", "inf"], "--first-window-s"),
        (["--first-audio-limit", "0"], "--first-audio-limit"),
        (["--url", "http://127.0.0.1:1", "--timeout", "0"], "--timeout"),
        (["--url", "http://127.0.0.1:1", "--timeout", "nan"], "--timeout"),
        (["--url", "http://127.0.0.1:abc"], "--url"),
        (["--url", "http://127.0.0.1:99999"], "--url"),
        (["--url", "127.0.0.1:8000"], "--url"),
        (["--device", "foo"], "--device"),  # before 2026-12-04 these two named no flag
        (["--reference", "NOISE"], "--reference"),
        (["--flow-batches", "0,4"], "--flow-batches"),
        (["--flow-batches", "four"], "--flow-batches"),
        (["--flow", "graphs"], "--flow"),
        (["--streams", "1,2", "--step-buckets", "4"], "--step-buckets"),  # past every level
        (["--alignment", "--decode", "compiled"], "--alignment"),  # no attention weights there
        (["--alignment", "--streams", "1"], "--alignment"),  # tiny is no Multilingual model
        (["--fused", "--model", "turbo-tiny"], "--fused"),  # GPT-2: nothing to fuse
    ],
)
def test_load_cli_bad_flags_give_one_error_line(
    args: list[str], flag: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait.".encode("latin-1"))  # not UTF-8
    noise = tmp_path / "noise.wav"
    noise.write_bytes(bytes(range(256)) * 8)  # a .wav name, no audio file
    args = [{"EMPTY": str(empty), "LATIN1": str(latin1), "NOISE": str(noise)}.get(a, a) for a in args]
    try:
        rc = main(["load", *args, "--out", str(tmp_path / "out")])
    except SystemExit as e:  # refused by the parser itself
        rc = e.code
    assert rc == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: argument {flag}"), errors


def test_the_report_names_levels_whose_compile_fell_back() -> None:
    # On the H200 (2026-12-04) the 8- and 32-stream engines ran the static step after a failed
    # compile while the report's title said "compiled step": only the JSON's compile_fallback said so
    level = {"streams": 1, "compile_fallback": None, "summary": {"streams": 1}, "per_stream": []}
    failed = {"streams": 8, "compile_fallback": "AssertionError", "summary": {"streams": 8}, "per_stream": []}
    report = {"title": "t", "note": "n", "levels": [level, failed],
              "real_time": {"first_audio_limit_s": 0.5, "streams": 1, "missed": {}}}  # fmt: skip
    assert fallbacks(report) == ["8 streams: T3 ran the static step, its compile failed (AssertionError)"]
    assert fallbacks({"levels": [level]}) == []
    assert fallbacks(report)[0] in format_load(report)
    flow = {**report, "flow_fallback": "RuntimeError: no backend"}
    assert (
        fallbacks(flow)[-1]
        == "S3Gen's estimator ran eagerly from its failed compile on (RuntimeError: no backend)"
    )


def test_a_compiled_estimator_serves_every_level(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One FlowPlan for all levels (the compiler stubbed: each shape "compiled" into the eager
    estimator), its shapes built in the first level's warm-up, none in the levels themselves."""
    monkeypatch.setattr(vocode, "compile_method", lambda fn, module, *a, **kw: lambda *x: fn(module, *x))
    report = run_load(
        tiny_tts, [1, 2], tokens=20, config=CONFIG, flow="compiled", flow_batches=[2], step_buckets=[2]
    )
    assert report["flow"] == "compiled" and report["flow_batches"] == [2] and report["flow_fallback"] is None
    # T3's buckets: the levels themselves (1: its own; 2: the one asked for), each engine's own
    assert [level["step_buckets"] for level in report["levels"]] == [[1], [2]]
    assert [level["engine"]["buckets_used"] for level in report["levels"]] == [[1], [2]]
    assert report["step_buckets"] == [2]
    with pytest.raises(
        ConfigError, match="--step-buckets: a step of 4 streams is more than the largest level"
    ):
        run_load(tiny_tts, [1, 2], tokens=20, step_buckets=[4])  # refused before any level runs
    assert report["flow_shapes"] == 2  # first and later windows at 2 windows a call, built once
    assert "S3Gen estimator compiled" in report["title"]
    for level in report["levels"]:
        engine = level["engine"]
        assert engine["flow_calls"] > 0 and engine["flow_compile_s"] == 0  # compiled in the warm-up
        assert engine["flow_padded"] == 2 * engine["flow_calls"] - engine["flow_windows"]
        assert level["summary"]["flow_ms_per_call"] > 0


def test_a_load_with_alignment_gives_each_stream_its_analyzer(
    reference_wav: Path, analyzers: Analyzers
) -> None:
    """Multilingual streams through the level's engine each run upstream's analyzer (the warm
    stream too), and each speaks the tokens of the eager single-stream decode that runs one."""
    tts = voiced("multilingual-tiny", reference_wav)
    report = run_load(tts, [2], tokens=12, alignment=True, model="multilingual-tiny")
    assert report["alignment"] and "with alignment analyzers" in report["title"]
    assert analyzers.count() == 1 + 2  # the warm stream and the level's two
    assert same_as_solo(tts, report)["solo_tokens"].all()


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--alignment"], "--alignment"), (["--fused", "--model", "turbo-tiny"], "--fused")],
)
def test_engine_options_the_model_cannot_run_are_refused_before_it_loads(
    args: list[str],
    flag: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model's family is read from its name (or folder), not by building it (before
    2026-12-05 ``--alignment`` on tiny was refused once the model had loaded, and ``--fused`` on
    Turbo ran unfused while the report said fused)."""

    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("a model was built for a command that should have been refused")

    monkeypatch.setattr(sources, "build_model", no_build)
    assert main(["load", *args, "--streams", "1", "--out", str(tmp_path)]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: argument {flag}"), errors


def test_a_fused_load_of_turbo_is_refused() -> None:
    """Turbo's GPT-2 has nothing to fuse: refused before the warm-up (its voice is not needed), not
    run unfused under a title saying fused."""
    with pytest.raises(ConfigError, match="argument --fused: Turbo's GPT-2"):
        run_load(sources.load_model("turbo-tiny"), [1], tokens=6, fused=True)


@pytest.mark.parametrize("model", ["tiny", "multilingual-tiny"])
def test_a_fused_load_runs_one_fused_copy_and_its_solo_tokens(
    model: str, reference_wav: Path, analyzers: Analyzers, fused_copies: list[Any]
) -> None:
    """``load --fused``: every level's engine (and the warm stream's) steps one fused copy of
    the backbone, made once, and each stream speaks its solo tokens; on Multilingual with the
    alignment analyzers too, each reading the fused copy's attention (as the unfused one's)."""
    tts = voiced(model, reference_wav)
    aligned = model.startswith("multilingual")
    report = run_load(tts, [1, 2], tokens=12, fused=True, alignment=aligned, model=model)
    assert report["fused"] and ", fused" in report["title"]
    assert len(fused_copies) == 1  # one copy for the warm stream's engine and both levels'
    assert all(level["summary"]["failed"] == 0 for level in report["levels"])
    assert analyzers.count() == (1 + 1 + 2 if aligned else 0)
    assert same_as_solo(tts, report)["solo_tokens"].all()


def _row(arrival_s: float, ttfa_s: float | None, audio_s: float, error: str | None = None) -> dict[str, Any]:
    return {"arrival_s": arrival_s, "ttfa_s": ttfa_s, "audio_s": audio_s, "underruns": 0,
            "max_underrun_s": 0.0, "error": error, "sampled_tokens": 25, "kept_tokens": 25,
            "capped": error is None}  # fmt: skip


def test_poisson_offsets_are_rate_streams_a_second_from_the_seed() -> None:
    gaps = np.diff(arrival_offsets(("poisson", 4.0), 2001, seed=0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)  # 4 streams/s: a quarter second apart
    a, b = arrival_offsets(("poisson", 4.0), 5, seed=0), arrival_offsets(("poisson", 4.0), 5, seed=1)
    assert not np.array_equal(a, b)  # --seed N draws the arrivals too
    # the 64-bit two's complement, as torch's manual_seed takes a negative seed
    assert np.array_equal(
        arrival_offsets(("poisson", 4.0), 5, -1), arrival_offsets(("poisson", 4.0), 5, 2**64 - 1)
    )


def test_a_failed_stream_is_not_silent_and_memory_grows_per_stream_of_the_level() -> None:
    streams = [_row(0.0, 0.2, 1.0), _row(0.0, None, 0.0, "EmptyTextError: ...")]
    s = listener_summary(2, 1.0, streams)
    assert (s["failed"], s["silent"]) == (1, 0)
    assert real_time_capacity(pd.DataFrame([s]), 0.5)["missed"][2] == "1 failed"
    engine = {"t3_tokens": 100, "t3_busy_s": 0.5, "s3gen_busy_s": 1.0, "flow_windows": 6, "flow_calls": 4,
              "flow_s": 0.2, "vocoder_calls": 6, "vocoder_s": 0.1}  # fmt: skip
    memory = {"start_bytes": 0, "peak_bytes": 4 * 2**20}
    assert load._level_summary(2, 1.0, streams, engine, memory, 2**20)["growth_mib_per_stream"] == 2.0


def test_p99_is_its_own_rank_and_real_time_audio_ends_at_the_latest_stream_end() -> None:
    streams = [_row(0.0, (k + 1) / 100, 1.0) for k in range(100)]  # 0.01 .. 1.00 s
    s = listener_summary(100, 10.0, streams)
    assert (s["ttfa_p50_s"], s["ttfa_p95_s"], s["ttfa_p99_s"]) == (0.5, 0.95, 0.99)
    # the stream arriving last is not the longest: every one played from its arrival ends by 4 s
    s = listener_summary(2, 5.0, [_row(0.0, 0.2, 4.0), _row(3.0, 0.2, 1.0)])
    assert s["real_time_audio_per_wall_s"] == pytest.approx(5.0 / 4.0)


def test_flow_ms_is_per_call_and_a_t3_only_level_is_limited_by_t3() -> None:
    engine = {"t3_tokens": 100, "t3_busy_s": 0.5, "s3gen_busy_s": 1.0, "flow_windows": 6, "flow_calls": 4,
              "flow_s": 0.2, "vocoder_calls": 6, "vocoder_s": 0.1}  # fmt: skip
    memory = {"start_bytes": 0, "peak_bytes": 0}
    s = load._level_summary(2, 2.0, [_row(0.0, 0.2, 1.0)] * 2, engine, memory, 2**20)
    assert s["flow_ms_per_call"] == pytest.approx(50.0)  # 200 ms over 4 calls (not 6 windows)
    # every stream silent: T3 sampled, S3Gen never ran; T3 still limited the level
    quiet = {**engine, "s3gen_busy_s": 0.0, "flow_windows": 0, "flow_calls": 0, "flow_s": 0.0,
             "vocoder_calls": 0, "vocoder_s": 0.0}  # fmt: skip
    silent = [_row(0.0, None, 0.0)] * 2
    assert load._level_summary(2, 2.0, silent, quiet, memory, 2**20)["limiting_stage"] == "t3"


def test_a_levels_poisson_streams_are_sent_at_their_arrival_and_its_wall_leaves_out_the_warm_up(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, stream k is sent offsets[k] after the level starts (each wait runs to that
    moment: waits of the offsets themselves add up), and the level's wall holds no warm-up."""
    real_sleep, warmup = time.sleep, StreamEngine.warmup
    main = threading.current_thread()
    waits: list[float] = []

    def recorded(seconds: float) -> None:
        if threading.current_thread() is main:  # the level's own waits, not its players'
            waits.append(seconds)
        real_sleep(seconds)

    def slow_warmup(self: StreamEngine) -> float:
        took = warmup(self)
        real_sleep(1.0)  # as if its compile took a second more
        return took + 1.0

    monkeypatch.setattr(StreamEngine, "warmup", slow_warmup)
    monkeypatch.setattr(load.time, "sleep", recorded)
    began = time.perf_counter()
    level = run_level(
        tiny_tts, 3, ["Hello there."], arrival=("poisson", 4.0), tokens=8, seed=1, config=CONFIG
    )
    elapsed = time.perf_counter() - began
    arrivals = [r["arrival_s"] for r in level["per_stream"]]  # 0, 0.27, 0.35 at seed 1
    assert len(waits) == 3 and sum(waits) <= max(arrivals) + 1e-9, (waits, arrivals)
    assert level["wall_s"] < elapsed - 1.0  # the second slept in the warm-up is in no level's wall


def test_rows_a_level_leaves_held_are_reported(tiny_tts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rows_held_after`` is the level's rows its engine has not freed once every stream ended
    (a leak the load study would otherwise hide): here an engine made to say none is free."""
    monkeypatch.setattr(StreamEngine, "free_rows", lambda self: 0)
    monkeypatch.setattr(StreamEngine, "wait_rows_free", lambda self, timeout: False)
    level = run_level(tiny_tts, 2, ["Hello."], tokens=4, config=CONFIG)
    assert level["summary"]["failed"] == 0
    assert level["rows_held_after"] == 2 * 2  # two streams, two rows each (guidance)


def test_a_load_of_a_multilingual_model_speaks_the_language_given(
    reference_wav: Path, tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stream of the study (the warm one too) is submitted in ``language_id``, and the report
    and its title say which; an English-only model refuses one (before 2026-12-07 the study had no
    language: a multilingual model's streams spoke English)."""
    asked: list[str | None] = []
    submit = StreamEngine.submit

    def spy(self: StreamEngine, text: str, **kwargs: Any) -> Any:
        asked.append(kwargs.get("language_id"))
        return submit(self, text, **kwargs)

    monkeypatch.setattr(StreamEngine, "submit", spy)
    tts = voiced("multilingual-tiny", reference_wav)
    report = run_load(tts, [2], texts=["Bonjour à tous."], tokens=8, language_id="fr")
    assert asked == ["fr"] * 3 and report["language"] == "fr" and " in fr," in report["title"]
    assert not report["levels"][0]["summary"]["failed"]
    with pytest.raises(ConfigError, match="argument --language: the standard model speaks English only"):
        run_load(tiny_tts, [1], tokens=4, language_id="fr")
