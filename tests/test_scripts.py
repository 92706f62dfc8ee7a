"""The study scripts in scripts/: what they time with, what they check before their run, what
they leave behind, and what their docstrings say. Each runs its real ``main`` with its slow parts
stubbed (a full run takes minutes)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
import tempfile
import types
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from conftest import Analyzers, with_short_voices

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def script(name: str) -> ModuleType:
    """scripts/NAME.py imported as a module (scripts/ is no package); its ``main`` not run."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Ran(Exception):
    """A stubbed slow part was reached: the script got past its argument checks."""


def ran(*_: Any, **__: Any) -> Any:
    raise Ran()


def refused(
    module: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """Run ``module.main()`` with ``argv``; the argparse error it must stop with (its stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- sampling_study


class _Measurement:
    median, iqr = 1e-3, 1e-4


def test_sampling_study_times_with_the_threads_it_records(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    study = script("sampling_study")
    timers: list[dict[str, Any]] = []

    class Timer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            timers.append(kwargs)

        def blocked_autorange(self, min_run_time: float) -> _Measurement:
            return _Measurement()

    monkeypatch.setattr(study.benchmark, "Timer", Timer)
    study._level(2, torch.device("cpu"), 0.01)
    assert timers and all(t.get("num_threads") == torch.get_num_threads() for t in timers)

    monkeypatch.setattr(study, "_processors", lambda device, min_run_time: [])  # two compiles apart
    monkeypatch.setattr(sys, "argv", ["sampling_study", "--streams", "1", "--min-run-time", "0.01"])
    study.main()
    out = json.loads(capsys.readouterr().out)
    assert out["timer_threads"] == torch.get_num_threads()
    assert out["min_run_time"] == 0.01  # each way's seconds timed, as asked


# ---------------------------------------------------------------- engine_soak


def test_engine_soak_records_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # its result had no date, device or versions (core.machine.environment, recorded with every result)
    soak = with_short_voices(script("engine_soak"), monkeypatch)
    monkeypatch.chdir(tmp_path)  # its reference goes to runs/soak/ under the working folder
    monkeypatch.setattr(sys, "argv", ["engine_soak", "--streams", "5", "--tokens", "2"])
    soak.main()
    out = json.loads(capsys.readouterr().out)
    assert (out["environment"]["model"], out["environment"]["device"]) == ("tiny", "cpu")
    assert (out["ok"], out["failed_on_purpose"]) == (4, 1)


# ---------------------------------------------------------------- gpu_identity


def test_gpu_identity_sizes_its_cache_for_the_tokens_asked(tiny_tts: Any) -> None:
    from tts_workbench.core.positions import positions_needed
    from tts_workbench.runtime.decode import prefill_length

    identity = script("gpu_identity")
    need = positions_needed(prefill_length(tiny_tts, identity.TEXT), 700)
    assert need > 600  # past the cache the script had fixed
    assert identity.cache_len(tiny_tts, 700) == need
    assert identity.cache_len(tiny_tts, 20) == 600  # the default runs keep the cache they measured


# ---------------------------------------------------------------- serving_study


@pytest.mark.timeout(60)  # the old wait ran 300 s against a server that had exited
def test_serving_study_names_a_server_that_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    serving = script("serving_study")
    monkeypatch.setattr(serving, "CLI", ["false"])  # a "server" that exits at once, code 1
    monkeypatch.setattr(serving, "_load", lambda args, out: {"max_cache_len": 64, "levels": []})
    monkeypatch.setattr(sys, "argv", ["serving_study"])
    with pytest.raises(RuntimeError, match="exited with code 1"):
        serving.main()


def test_serving_study_runs_each_level_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its default, three single streams then four at once, went to `load --streams 1,1,1,4`, which
    refuses a level given twice (since 2026-12-03): the study could not run. Each level is a run."""
    serving = script("serving_study")
    runs: list[list[str]] = []

    def load(args: list[str], out: Path) -> dict[str, Any]:
        runs.append(args)
        n = int(args[1])
        return {"max_cache_len": 64, "levels": [{"streams": n}], "replicas_seen": [str(len(runs) % 2)]}

    monkeypatch.setattr(serving, "_load", load)
    report = serving._loads([1, 1, 1, 4], ["--tokens", "100", "--url", "http://127.0.0.1:1"], tmp_path)
    assert [args[:2] for args in runs] == [["--streams", "1"]] * 3 + [["--streams", "4"]]
    assert all(args[2:] == ["--tokens", "100", "--url", "http://127.0.0.1:1"] for args in runs)
    assert [lv["streams"] for lv in report["levels"]] == [1, 1, 1, 4] and report["replicas_seen"] == [
        "0",
        "1",
    ]


def test_serving_study_shows_why_load_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serving = script("serving_study")
    fails = [sys.executable, "-c", "import sys; print('no such model: nope', file=sys.stderr); sys.exit(3)"]
    monkeypatch.setattr(serving, "CLI", fails)
    with pytest.raises(RuntimeError, match=r"code 3.*no such model: nope"):
        serving._load([], tmp_path)


@pytest.mark.parametrize(
    ("name", "slow", "streams"),
    [*[("serving_study", "_load", s) for s in ("1,1,1", "2,4", "4", "1,x")],  # it cannot tabulate them
     *[("alignment_study", "build_model", s) for s in ("0", "1,,2", "x")]],
)  # fmt: skip
def test_studies_refuse_streams_they_cannot_run(
    name: str, slow: str, streams: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    study = script(name)
    monkeypatch.setattr(study, slow, ran)
    assert "--streams" in refused(study, ["--streams", streams], monkeypatch, capsys)


# ------------------------------------------- span_study, cpp_wrapper_study, fusion_study, alignment_study

STUDIES = ["span_study", "cpp_wrapper_study", "fusion_study", "alignment_study"]


@pytest.mark.parametrize("name", STUDIES)
def test_studies_refuse_no_repeats(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    study = script(name)
    monkeypatch.setattr(study, "build_model", ran)
    monkeypatch.setattr(study, "make_reference_wav", ran)
    assert "--repeats must be at least 1" in refused(study, ["--repeats", "0"], monkeypatch, capsys)


@pytest.mark.parametrize("name", STUDIES)
def test_studies_keep_their_reference_in_a_temporary_folder(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = script(name)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    written: list[Path] = []

    def reference(path: str | Path, **_: Any) -> Path:
        Path(path).write_bytes(b"")
        written.append(Path(path))
        return Path(path)

    monkeypatch.setattr(study, "make_reference_wav", reference)

    def bypassed(*_: Any, **__: Any) -> None:
        raise AssertionError("upstream's prepare_conditionals called past prepare_voice")

    # the model's build (cpp_wrapper_study) or its voice (the others) ends the run; the voice is read
    # by prepare_voice (fusion_study failed on turbo-tiny past it: no float32 loudness fix)
    monkeypatch.setattr(
        study, "build_model", lambda name, **_: SimpleNamespace(prepare_conditionals=bypassed)
    )
    monkeypatch.setattr(study, "prepare_voice", ran)
    monkeypatch.setattr(study, "UpstreamTTS", ran, raising=False)
    monkeypatch.setattr(sys, "argv", [name])
    with pytest.raises(Ran):
        study.main()
    assert len(written) == 1 and written[0].is_relative_to(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "model", "says"),
    [
        # tiny was built, then StreamEngine(alignment=True) refused it, with advice about a flag
        # the script has not
        ("alignment_study", "tiny", "multilingual-tiny"),
        # Turbo has nothing to fuse: it was built, then failed in its voice (float64 loudness)
        ("fusion_study", "turbo-tiny", "nothing to fuse"),
    ],
)
def test_a_study_refuses_a_model_it_cannot_study_before_building_it(
    name: str, model: str, says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    study = script(name)
    monkeypatch.setattr(study, "build_model", ran)
    err = refused(study, ["--model", model], monkeypatch, capsys)
    assert "argument --model" in err and says in err and "--alignment" not in err and "--fused" not in err


def test_the_alignment_study_closes_each_engine_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine without the analyzers was left running (its threads) when the one with them failed
    study = script("alignment_study")
    built: list[Any] = []

    class Engine:
        def __init__(self, tts: Any, *, alignment: bool, **_: Any) -> None:
            if alignment:
                raise Ran()
            self.closed = False
            built.append(self)

        def close(self) -> None:
            self.closed = True

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *_: Any) -> None:
            self.close()

    monkeypatch.setattr(study, "build_model", lambda name, **_: SimpleNamespace())
    monkeypatch.setattr(study, "prepare_voice", lambda tts, reference: None)
    monkeypatch.setattr(study, "cache_positions", lambda tts, texts, tokens: 192)
    monkeypatch.setattr(study, "StreamEngine", Engine)
    monkeypatch.setattr(sys, "argv", ["alignment_study", "--streams", "1"])
    with pytest.raises(Ran):
        study.main()
    assert len(built) == 1 and built[0].closed


def test_the_alignment_study_refuses_more_tokens_than_its_cache_holds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One error line naming --tokens and what fits, once the model has counted the text's
    positions (before 2026-12-07 it sized its own cache, past the engine's largest)."""
    study = script("alignment_study")
    monkeypatch.setattr(study, "StreamEngine", ran)  # not reached
    err = refused(study, ["--tokens", "5000"], monkeypatch, capsys)
    assert "error: argument --tokens: 5000 tokens" in err and "use --tokens" in err, err


def test_the_studies_refuse_a_policy_they_cannot_decode_with(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "auto" and a misspelt name failed once the model had loaded, "auto" with advice for the API
    study = script("fusion_study")
    monkeypatch.setattr(study, "build_model", ran)
    for policy in ("auto", "bfloat"):
        err = refused(study, ["--policy", policy], monkeypatch, capsys)
        assert "argument --policy: invalid choice" in err
    # bench_streaming runs at import: its model loads from models.sources, stubbed before
    from tts_workbench.models import sources

    monkeypatch.setattr(sources, "load_model", ran)
    monkeypatch.setattr(sys, "argv", ["bench_streaming", "--decode", "auto"])
    with pytest.raises(SystemExit) as e:
        script("bench_streaming")
    assert e.value.code == 2 and "argument --decode: invalid choice" in capsys.readouterr().err


def test_stop_rate_removes_its_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stop_rate = script("stop_rate")
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)  # a reference written into the working folder would stay there
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(stop_rate.torch, "set_num_threads", lambda n: None)  # the process's own
    written: list[Path] = []
    make_reference_wav = stop_rate.make_reference_wav

    def reference(path: str | Path, **kwargs: Any) -> Path:
        written.append(Path(path).absolute())
        return make_reference_wav(path, **kwargs)

    monkeypatch.setattr(stop_rate, "make_reference_wav", reference)
    stop_rate.main([])  # no sources: the reference alone
    assert len(written) == 1 and written[0].is_relative_to(temp) and not written[0].exists()
    assert list(work.iterdir()) == [] and list(temp.iterdir()) == []


# ---------------------------------------------------------------- docstrings


def docstring(name: str) -> str:
    """The module docstring of scripts/NAME.py, read without running it (some run at import)."""
    return ast.get_docstring(ast.parse((SCRIPTS / f"{name}.py").read_text())) or ""


@pytest.mark.parametrize("name", ["family_table", "bench_streaming"])
def test_the_page_a_script_says_quotes_it_does(name: str) -> None:
    pages = set(re.findall(r"README(?:\.md)?|docs/[\w/]+\.md", docstring(name)))
    assert pages, "the docstring names the page that quotes the script's table"
    for page in pages:
        text = (ROOT / (page if page.endswith(".md") else page + ".md")).read_text()
        assert f"scripts/{name}.py" in text, f"{page} does not quote scripts/{name}.py"


def test_cpp_wrapper_study_counts_the_runs_its_results_hold() -> None:
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
    said = re.search(r"holds (\w+) such runs", docstring("cpp_wrapper_study"))
    assert said is not None
    runs = json.loads((ROOT / "results" / "cpp_wrapper_cpu_deep_narrow.json").read_text())["runs"]
    assert words[said.group(1)] == len(runs)


@pytest.mark.parametrize("name", ["engine_soak", "span_study", "serving_study"])
def test_a_results_file_older_than_its_script_is_said_to_be(name: str) -> None:
    # the files hold fields the scripts no longer write (rss_mb_, device, machine) and lack
    # environment; a file written again by the script has it, and the note must go
    doc = docstring(name)
    paths = set(re.findall(r"results/[\w.-]+\.json", doc))
    assert paths, doc
    for path in paths:
        result = json.loads((ROOT / path).read_text())
        assert ("earlier version" in doc) == ("environment" not in result), path


def test_the_fusion_study_compiles_each_step_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two plans, one stream and the engine: four compiles however many rounds (before: a new
    engine every round, each compiling anew: ten in the GPU check's three rounds). Compiling is
    counted and left out (the steps run eagerly), so this takes seconds."""
    from tts_workbench.runtime import batched_step, decode

    compiled: list[str] = []

    def counting(where: str) -> Any:
        def compile_method(fn: Any, owner: Any, cudagraphs: bool, **_: Any) -> Any:
            compiled.append(where)
            return types.MethodType(fn, owner)

        return compile_method

    monkeypatch.setattr(decode, "compile_method", counting("one stream"))
    monkeypatch.setattr(batched_step, "compile_method", counting("engine"))
    monkeypatch.setattr(sys, "argv", ["fusion_study", "--model", "tiny", "--repeats", "2", "--streams", "2"])
    study = with_short_voices(script("fusion_study"), monkeypatch)
    monkeypatch.setattr(study, "TOKENS", 24)
    study.main()
    out = json.loads(capsys.readouterr().out)
    assert sorted(compiled) == ["engine", "engine", "one stream", "one stream"]
    assert len(out["one_stream_compiled"]["ms"]["fused"]) == 2 and out["one_stream_compiled"]["same_tokens"]
    assert len(out["engine_2_streams_compiled"]["ms"]["unfused"]) == 2


def test_the_alignment_study_runs_the_analyzers_in_one_engine_of_each_pair(
    analyzers: Analyzers, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each level runs an engine with the analyzers and one without, every round kept but the
    first; the analyzers step only in the first (one per stream and round)."""
    argv = ["alignment_study", "--streams", "2", "--tokens", "6", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    study = with_short_voices(script("alignment_study"), monkeypatch)
    study.main()
    level = json.loads(capsys.readouterr().out)["levels"]["2_streams"]
    assert {name: len(ms) for name, ms in level["ms"].items()} == {"without": 1, "with": 1}
    assert level["with_over_without"] > 0 and analyzers.count() == 2 * 2  # two rounds of two streams
