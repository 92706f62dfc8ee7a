"""The load study's set-up: what it refuses before any level runs (an unusable --out, a level no
device holds, in-process flags given with --url), and the untimed stream before its first level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chatterbox.tts import ChatterboxTTS

from tts_workbench.core.errors import ConfigError
from tts_workbench.interface.cli import main
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.runtime.streaming import StreamConfig
from tts_workbench.studies.load import MAX_LEVEL, checked_levels, run_load

CONFIG = StreamConfig("buffered", first_window_s=0.4, window_s=0.8)


def errors_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


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


BIG = "1" + "0" * 400


@pytest.mark.parametrize(
    "args",
    [
        ["--streams", BIG],  # before: OverflowError in the KV check's GiB
        ["--streams", f"1,{BIG}", "--arrival", "poisson:1"],  # before: OverflowError in the arrival check
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


def test_the_largest_level_allowed_is_the_kv_checks_to_refuse() -> None:
    assert checked_levels([MAX_LEVEL, 1], "given") == [1, MAX_LEVEL]
    with pytest.raises(ConfigError, match=f"^argument --streams: a level of more than {MAX_LEVEL} streams"):
        checked_levels([1, MAX_LEVEL + 1], "given")


def test_an_untimed_stream_runs_before_the_first_level_and_counts_in_none(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3Gen is shared by every level's engine: its first calls cost more than later ones (the
    flow and vocoder ran at half the time after the first stream), which the first level, the
    1-stream baseline, paid alone. (before: the first engine made was the first level's)"""
    events: list[tuple[str, int]] = []
    engines: list[Counted] = []

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
    report = run_load(tiny_tts, [1, 2], tokens=20, config=CONFIG)
    # the warm stream's engine: one stream, through S3Gen, ended before the first level's engine
    assert events[:3] == [("engine", 1), ("submit", 0), ("close", 0)], events
    warm = engines[0]
    assert warm.stats.flow_calls >= 1 and warm.stats.vocoder_s > 0
    assert [e.max_streams for e in engines[1:]] == [1, 2]
    assert report["warmup_s"] > 0 and report["warmup_error"] is None
    # each level counts its own engine's streams and S3Gen calls, not the warm stream's
    for level, engine in zip(report["levels"], engines[1:], strict=True):
        assert len(level["per_stream"]) == level["streams"]
        assert level["engine"]["flow_calls"] == engine.stats.flow_calls
        assert level["engine"]["flow_windows"] == engine.stats.flow_windows


@pytest.mark.parametrize(
    "flag",
    [
        ["--model", "tiny"],  # given with its default value: given all the same
        ["--device", "cpu"],
        ["--decode", "compiled"],
        ["--dtype=bfloat16"],
        ["--reference", "REF"],
        ["--first-window-s", "2"],
        ["--window-s", "5"],
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
            "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 2
    assert errors_in(capsys.readouterr().err) == ["error: stopped here"]
    want = {"levels": [1, 2], "tokens": 7, "seed": 3, "arrival": "poisson:2", "voice": "alice",
            "timeout_s": 9.0, "first_audio_limit_s": 0.7}  # fmt: skip
    assert {k: got[k] for k in want} == want
