"""The bench: what it refuses before anything runs, the token count of every row, and its files
written whole or not at all."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from matplotlib.figure import Figure

from conftest import _process_state
from tts_workbench.core import machine
from tts_workbench.core.constants import UPSTREAM_GENERATE_CAP
from tts_workbench.core.errors import ConfigError
from tts_workbench.core.families import FAMILIES
from tts_workbench.core.machine import busy_machine_line, environment, slow_spell_line
from tts_workbench.interface.cli import main
from tts_workbench.models.builders import MODELS
from tts_workbench.models.checkpoints import save_checkpoint
from tts_workbench.models.sources import load_model
from tts_workbench.runtime import optimized
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS
from tts_workbench.studies import bench
from tts_workbench.studies.bench import Row, bench_frame, run_bench, summarize


class Reached(Exception):
    """Raised where the bench would start building models: the checks before it passed."""


def _reached(*_a: object, **_k: object) -> None:
    raise Reached


PROBE = machine.read_bandwidth  # the real probe, for the tests of it


def _fixed_bandwidth(device: str = "cpu", mbytes: int = 512, min_run_time_s: float = 1.0) -> float:
    return 10e9


@pytest.fixture(autouse=True)
def _no_bandwidth_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bench here without its bandwidth probes (a 512 MiB reduction timed for a second, before
    and after the runs: 2-3 s a bench), each read as 10 GB/s; `bench --model tiny` in
    test_profiling.py runs them."""
    monkeypatch.setattr(bench, "read_bandwidth", _fixed_bandwidth)


class FixedTimer:
    """``machine.Timer`` whose every measurement takes 0.5 s (the probe's arithmetic, not its timing)."""

    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def blocked_autorange(self, **_k: Any) -> Any:
        return SimpleNamespace(median=0.5)


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_tokens_past_upstream_generates_own_cap_are_refused_with_an_upstream_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Upstream generate stops at its own 1000 tokens (Turbo's: 1001, one from the prefill and
    then max_gen_len=1000): the ratios would compare 1000 upstream tokens with 1010 of the others
    (before: run, wall_ratio 0.771). The cap is the family's, so it is checked once the upstream
    model has loaded (before 2026-12-04, Turbo's 1001 was refused)."""

    def upstream_model(source: str, *_a: object) -> object:
        """A model of the source's family whose first use (cast to float32) says the checks passed."""
        part = SimpleNamespace(float=_reached)
        # T3's speech positions as Llama's (bench checks --tokens against them first)
        hp = SimpleNamespace(max_speech_tokens=4096, input_pos_emb="learned")
        t3 = SimpleNamespace(float=_reached, hp=hp, tfmr=SimpleNamespace(config=SimpleNamespace()))
        return SimpleNamespace(t3=t3, s3gen=part, ve=part, family=FAMILIES[MODELS[source][0]])

    monkeypatch.setattr(bench, "load_model", upstream_model)
    monkeypatch.setattr(bench, "family_of", lambda tts: tts.family)
    cap = UPSTREAM_GENERATE_CAP
    for model, own in (("tiny", cap), ("turbo-tiny", cap + 1)):
        with pytest.raises(ConfigError, match=f"argument --tokens: {own + 1} is past .* own cap of {own} "):
            run_bench(model, configs=("upstream", "optimized"), tokens=own + 1, outdir=tmp_path)
        assert not any(tmp_path.iterdir())  # refused before anything was written
    args = ["bench", "--tokens", str(cap + 10), "--configs", "upstream,optimized", "--out", str(tmp_path)]
    assert main(args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--tokens" in errors[0] and "leave upstream out of --configs" in errors[0]
    # at the cap (Turbo's too), and past it without upstream generate (the streamed upstream is the
    # workbench's loop)
    runs = ((("upstream",), cap, "tiny"), (("upstream",), cap + 1, "turbo-tiny"),
            (("optimized", "upstream-stream"), cap + 1, "tiny"))  # fmt: skip
    for configs, tokens, model in runs:
        with pytest.raises(Reached):
            run_bench(model, configs=configs, tokens=tokens, outdir=tmp_path)


def test_tokens_past_turbos_positions_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Turbo's GPT-2 has 8196 positions, prompt included: before, the bench said "max_cache_len 9367
    is past ...: give 8196 or less", a flag it has not and positions, not tokens; then "lower
    max_new_tokens", after writing the generated voice to --out."""
    args = ["bench", "--model", "turbo-tiny", "--configs", "optimized", "--tokens", "8190"]
    args += ["--out", str(tmp_path / "out")]
    assert main(args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: argument --tokens: "), errors
    assert "lower --tokens to" in errors[0] and "max_cache_len" not in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_the_cpp_wrapper_without_a_compiled_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(before: accepted, and no configuration compiled anything for it to change)"""
    monkeypatch.setattr(bench, "load_model", _reached)
    with pytest.raises(ConfigError, match="argument --cpp-wrapper: .* --configs"):
        run_bench("tiny", configs=("upstream", "static"), cpp_wrapper=True, outdir=tmp_path)
    assert main(["bench", "--cpp-wrapper", "--configs", "upstream,optimized", "--out", str(tmp_path)]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--cpp-wrapper" in errors[0] and "--configs" in errors[0], errors
    for compiled in ("compiled", "compiled-stream"):
        with pytest.raises(Reached):
            run_bench("tiny", configs=("upstream", compiled), cpp_wrapper=True, outdir=tmp_path)


def test_the_table_shows_the_tokens_each_configuration_decoded() -> None:
    def row(config: str, tokens: int) -> Row:
        return Row(config, 0, 1.0, 1.0, 1.0, tokens, 0.1, 0.01, 1, 0.5, 0, 0)

    floors = dict.fromkeys(("upstream", "optimized"), {"floor_s": 0.001, "t3_bytes": 10**6})
    report = {"summary": summarize([row("upstream", 1000), row("optimized", 1010)], floors), "floors": floors}
    assert bench_frame(report)["tokens"].tolist() == [1000, 1010]


def test_the_real_time_factor_is_compute_seconds_per_audio_second() -> None:
    def row(wall: float, audio: float) -> Row:
        return Row("upstream", 0, wall, wall, audio, 10, 0.1, 0.01, 1, 0.5, 0, 0)

    assert row(3.0, 1.5).rtf == pytest.approx(2.0)  # slower than real time: above 1
    assert row(1.0, 0.0).rtf == float("inf")  # no audio: no real-time factor


def _row(config: str, repeat: int, wall: float, step: float) -> Row:
    """A bench row of ``config``: ``wall`` seconds (a quarter of it S3Gen), ``step`` per T3 token."""
    return Row(config, repeat, wall, wall, 2.0, 10, 0.1, step, 1, wall / 4, 0, 0, phases_s=wall)


def test_the_summary_divides_by_the_first_config_and_each_step_by_its_own_weights_floor() -> None:
    # The optimized config reads half the bytes per step (its floor is half upstream's) and runs
    # twice as fast: each step is 4 floors, and each of its medians half upstream's.
    floors = {"upstream": {"floor_s": 0.01}, "optimized": {"floor_s": 0.005}}
    up, opt = summarize([_row("upstream", 0, 4.0, 0.04), _row("optimized", 0, 2.0, 0.02)], floors)
    for key in ("ttfa_s", "wall_s", "t3_step_s", "s3gen_s"):
        assert up[f"{key}_ratio"] == pytest.approx(1.0) and opt[f"{key}_ratio"] == pytest.approx(0.5), key
    assert (up["rtf_median"], opt["rtf_median"]) == (pytest.approx(2.0), pytest.approx(1.0))
    assert up["t3_step_vs_floor"] == pytest.approx(4.0) and opt["t3_step_vs_floor"] == pytest.approx(4.0)


def test_a_failed_write_leaves_no_file_and_the_wrapper_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_wav: Path
) -> None:
    """(before: bench.json and bench.csv were written and listed memory.png, which the failed
    figure left half written; the wrapper stayed open)"""
    closed = []
    close = PerformanceOptimizedTTS.close

    def counted(self: PerformanceOptimizedTTS) -> None:
        closed.append(self)
        close(self)

    def half_written(_fig: Any, path: Path, **_k: Any) -> None:
        path.write_bytes(b"\x89PNG half a figure")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PerformanceOptimizedTTS, "close", counted)
    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="No space left"):
        run_bench(
            "tiny",
            ("optimized",),
            tokens=3,
            repeats=1,
            reference=str(reference_wav),
            outdir=tmp_path,
            dtype="float32",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv"]  # whole; no report, no partial file
    assert len(closed) == 1


def test_the_cpp_wrapper_on_cuda_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled step on CUDA runs as CUDA graphs, which have no C++ wrapper: the flag was
    dropped there, and bench.json recorded settings.cpp_wrapper true (before: accepted)."""
    monkeypatch.setattr(bench, "load_model", _reached)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="argument --cpp-wrapper: .*CUDA graphs.*--device"):
            run_bench("tiny", configs=("compiled",), device=device, cpp_wrapper=True, outdir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was loaded or written
    with pytest.raises(Reached):  # on a CPU it applies
        run_bench("tiny", configs=("compiled",), device="cpu", cpp_wrapper=True, outdir=tmp_path)


def test_reserved_growth_comes_from_the_same_runs_as_run_growth() -> None:
    """A run that built its step reserved the KV cache, the compile's workspace and (on CUDA) the
    graph pool inside its window: where a run that did not build exists, reserved growth is taken
    from those runs, as run growth is (before: the max over every run, the build's 4096 beside a
    run growth of 300)."""
    lin = torch.nn.Linear(4, 4)  # 80 bytes of weights wherever one is asked for
    plan = SimpleNamespace(prefill=lin, decode=lin, step_parts=lin, step="static", static_bytes=lambda: 1000)
    models = SimpleNamespace(t3=lin, s3gen=lin, ve=lin)
    opt: Any = SimpleNamespace(plans={"compiled": plan, "static": plan}, tts=models)

    def row(config: str, repeat: int, growth: int, reserved: int, built: bool) -> Row:
        return Row(
            config, repeat, 1.0, 1.0, 1.0, 8, 0.1, 0.1, 1, 0.5, growth, reserved, t3_compile_s=float(built)
        )

    rows = [
        row("compiled", 0, 1500, 4096, True),
        row("compiled", 1, 300, 512, False),
        row("static", 0, 1500, 2048, True),  # every run built: the cache is taken off, as from its growth
        row("upstream", 0, 700, 900, False),
    ]
    configs = bench.memory_per_config(rows, models, opt, torch.device("cpu"), "test")["configs"]
    assert configs["compiled"]["run_growth_gib"] * 2**30 == 300
    assert configs["compiled"]["reserved_growth_gib"] * 2**30 == 512
    assert configs["static"]["run_growth_gib"] * 2**30 == 500 and configs["static"]["growth_run_built"]
    assert configs["static"]["reserved_growth_gib"] * 2**30 == 2048 - 1000
    assert configs["upstream"]["reserved_growth_gib"] * 2**30 == 900


def test_the_allocator_is_read_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # a CPU process's resident set cannot be split between the two models the bench loads
    from tts_workbench.instruments.memory import allocated_bytes

    assert allocated_bytes(torch.device("cpu")) is None
    # and CUDA's is read (faked here, as the window test fakes it: no GPU needed)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_a, **_k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *_a, **_k: 1234)
    assert allocated_bytes(torch.device("cuda")) == 1234


def test_what_the_process_holds_is_its_tensors_on_cuda_and_its_resident_set_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tts_workbench.instruments import memory

    monkeypatch.setattr(memory, "rss_bytes", lambda: 5678)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_a, **_k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *_a, **_k: 1234)
    assert memory.held_bytes(torch.device("cpu")) == 5678
    assert memory.held_bytes(torch.device("cuda")) == 1234


def test_the_bandwidth_is_read_on_the_threads_the_decode_steps_run_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timer runs its statement on one thread unless told otherwise: the CPU bandwidth was a
    single-core figure beside steps on every thread, its floor too high and x_floor too low."""
    seen: set[int] = set()
    timer = machine.Timer

    def recording(stmt: str, globals: dict[str, Any], **options: Any) -> Any:
        """The bench's Timer, whose statement also notes the threads it runs on."""
        names = {**globals, "seen": seen, "torch": torch}
        return timer(f"{stmt}; seen.add(torch.get_num_threads())", globals=names, **options)

    monkeypatch.setattr(machine, "Timer", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        PROBE("cpu", mbytes=4)
    finally:
        torch.set_num_threads(threads)
    assert seen == {2}


def test_a_cuda_window_keeps_the_allocators_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench times every run inside a window: emptying the caching allocator first would put
    the driver's allocations (cudaMalloc) into each timed run. Its reserved growth is what the
    run reserved beyond the blocks the process already held cached (docs/bench.md)."""
    from tts_workbench.instruments import memory

    calls: list[str] = []

    def fake(name: str, value: int | None = None) -> Any:
        def called(*_a: object, **_k: object) -> int | None:
            calls.append(name)
            return value

        return called

    monkeypatch.setattr(memory, "_peaks_before", {})
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, fake(name))
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, fake(name, 100))
    monkeypatch.setattr(torch.cuda, "current_device", fake("current_device", 0))
    with memory.memory_window("cuda"):
        calls.append("block")
    assert "empty_cache" not in calls and calls.index("reset_peak_memory_stats") < calls.index("block"), calls


def test_the_weights_of_a_cpu_config_include_the_watermarker() -> None:
    """Upstream loads the watermarker's network on the CPU and every one-shot config runs it in
    its timed watermark phase (before: not counted, 35.7 MiB beside the tiny model's 109.1 MiB
    counted, 144.7 MiB in all)."""
    from tts_workbench.instruments.memory import module_bytes
    from tts_workbench.models.sources import load_model

    tts = load_model("tiny", seed=0)
    lin = torch.nn.Linear(4, 4)
    plan = SimpleNamespace(prefill=lin, decode=lin, step="eager", static_bytes=lambda: 0)
    opt: Any = SimpleNamespace(plans={"eager": plan}, tts=tts)
    rows = [Row(c, 0, 1.0, 1.0, 1.0, 8, 0.1, 0.1, 1, 0.5, 0, 0) for c in ("upstream", "optimized")]
    configs = bench.memory_per_config(rows, tts, opt, torch.device("cpu"), "test")["configs"]
    four = module_bytes([tts.t3, tts.s3gen, tts.ve, tts.watermarker.perth_net])
    assert configs["upstream"]["weights_gib"] * 2**30 == four
    assert configs["optimized"]["weights_gib"] * 2**30 == four + module_bytes([lin])


def test_fused_needs_a_static_or_compiled_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "load_model", _reached)
    with pytest.raises(ConfigError, match="argument --fused: .* --configs"):
        run_bench("tiny", configs=("upstream", "optimized", "optimized-stream"), fused=True, outdir=tmp_path)
    assert main(["bench", "--fused", "--configs", "upstream,optimized", "--out", str(tmp_path)]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--fused" in errors[0] and "--configs" in errors[0], errors
    for step in ("static", "compiled", "compiled-stream"):
        with pytest.raises(Reached):
            run_bench("tiny", configs=("upstream", step), fused=True, outdir=tmp_path)


def _kept_wrappers(monkeypatch: pytest.MonkeyPatch) -> list[PerformanceOptimizedTTS]:
    """Every wrapper the bench opens from now on, kept in the list returned for a test to look into."""
    opts: list[PerformanceOptimizedTTS] = []

    def kept(*a: Any, **k: Any) -> PerformanceOptimizedTTS:
        opts.append(PerformanceOptimizedTTS(*a, **k))
        return opts[-1]

    monkeypatch.setattr(bench, "PerformanceOptimizedTTS", kept)
    return opts


def test_a_fused_bench_runs_the_copy_and_counts_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_wav: Path
) -> None:
    """The static configuration's weights include the fused copy of T3's backbone it runs. The
    policy is float32 in both: "auto" is chosen by timing, and under load it once took a bfloat16
    decode copy in one run and not the other (the difference was that copy and the fused one)."""
    opts: list[PerformanceOptimizedTTS] = []
    forwards: list[int] = []  # the fused copy's forwards inside each timed window
    window = bench.memory_window

    @contextmanager
    def watched(dev: torch.device) -> Iterator[Any]:
        """The window, counting the forwards through the fused copy (made before the windows)."""
        calls: list[int] = []
        plan = opts[-1].plans["static"]
        copy = plan.step_parts.tfmr
        assert copy is not plan.decode.tfmr  # a copy of its own, not the model's backbone
        hook = copy.register_forward_pre_hook(lambda *_a: calls.append(1))
        try:
            with window(dev) as w:
                yield w
        finally:
            hook.remove()
        forwards.append(len(calls))

    weights = {}
    for fused in (False, True):
        if fused:  # counted and made is not run: the static step must step through the copy
            opts = _kept_wrappers(monkeypatch)
            monkeypatch.setattr(bench, "memory_window", watched)
        report = run_bench("tiny", ("static",), tokens=2, repeats=1, reference=str(reference_wav),
                           outdir=tmp_path / str(fused), fused=fused, dtype="float32")  # fmt: skip
        assert report["settings"]["fused"] is fused
        weights[fused] = report["memory"]["configs"]["static"]["weights_gib"] * 2**30
    backbone = sum(p.numel() * p.element_size() for p in load_model("tiny").t3.tfmr.parameters())
    assert weights[True] - weights[False] == pytest.approx(backbone, rel=0.01)
    assert forwards and all(forwards), forwards


def test_the_footer_names_the_estimator_only_where_a_configuration_compiled_it(
    tmp_path: Path, reference_wav: Path, traced_only: None
) -> None:
    """The one-shot configurations run S3Gen eagerly: only compiled-stream compiles its estimator,
    yet the footer said compile_s was "T3's step and S3Gen's estimator" after any bench, and
    docs/gpu-check.md quoted an upstream,compiled run's 99.6 s as both."""
    report = run_bench(
        "tiny",
        ("upstream", "compiled"),
        tokens=2,
        repeats=1,
        reference=str(reference_wav),
        outdir=tmp_path,
        dtype="float32",
    )
    assert report["compile_s"]["compiled"] > 0
    footer = bench.format_bench(report).splitlines()[-2]  # (the last line lists the files written)
    assert "compile_s: T3's step, kept out of TTFA and wall" in footer and "estimator" not in footer
    report["settings"]["configs"].append("compiled-stream")  # as if it had run beside them
    assert "compile_s: T3's step and S3Gen's estimator" in bench.format_bench(report)


def test_a_text_past_t3s_positions_is_refused_as_text_before_anything_is_written(tmp_path: Path) -> None:
    """(before: refused only once the wrapper had opened, reference.wav written, without the flag)"""
    outdir = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"^argument --text: the text is \d+ text tokens, beyond the 2048"):
        run_bench("tiny", ("upstream", "optimized"), tokens=4, repeats=1, text="hello world. " * 1500,
                  outdir=outdir)  # fmt: skip
    assert not outdir.exists()


def test_the_attention_recording_runs_after_the_timed_runs_and_only_for_a_wrapper_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_wav: Path
) -> None:
    """The recorded run warmed the wrapper before its timed runs, even with --warmup 0 (the header
    saying "after 0 untimed"), and ran with only upstream configurations listed."""
    calls: list[tuple[str, bool]] = []  # (whose pipeline, recording attention)
    run_pipeline = bench.run_pipeline

    def logged(pipeline: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        recording = getattr(pipeline, "record_attention", False)
        calls.append(("wrapper" if isinstance(pipeline, PerformanceOptimizedTTS) else "upstream", recording))
        return run_pipeline(pipeline, *a, **kw)

    monkeypatch.setattr(bench, "run_pipeline", logged)
    report = run_bench("tiny", ("upstream", "optimized"), tokens=2, repeats=1, warmup=0,
                       reference=str(reference_wav), outdir=tmp_path / "both", dtype="float32")  # fmt: skip
    assert calls == [("upstream", False), ("wrapper", False), ("wrapper", True)]
    assert report["attention_kernels_optimized"]["t3.decode"]  # recorded, after the timed runs
    calls.clear()
    # with no --reference: the generated voice, kept in the run folder and named there
    report = run_bench("tiny", ("upstream",), tokens=2, repeats=1, warmup=0, outdir=tmp_path / "upstream")
    assert calls == [("upstream", False)] and report["attention_kernels_optimized"] == {}
    assert report["reference"]["path"] == str(tmp_path / "upstream" / "reference.wav")  # not a temp name
    assert report["reference"]["notes"] == []


def test_a_step_shared_by_two_configurations_shows_its_compile_on_both(
    tmp_path: Path, reference_wav: Path, traced_only: None
) -> None:
    """compiled and compiled-stream run one plan's compiled T3 step: the first listed built it and
    was charged for it, the other showed 0 (before: compile_s {'compiled-stream': 20.17,
    'compiled': 0.0}), though docs/bench.md says each row's compile_s covers its T3 step."""
    report = run_bench("tiny", ("compiled-stream", "compiled"), tokens=2, repeats=1, warmup=0,
                       reference=str(reference_wav), outdir=tmp_path, dtype="float32")  # fmt: skip
    rows = {r["config"]: r for r in report["rows"]}
    step, estimator = rows["compiled-stream"]["t3_compile_s"], rows["compiled-stream"]["s3gen_compile_s"]
    assert rows["compiled"]["t3_compile_s"] == 0  # its runs found the step built
    assert report["compile_s"]["compiled"] == step > 0
    assert report["compile_s"]["compiled-stream"] == step + estimator
    footer = bench.format_bench(report).splitlines()[-2]
    assert "compiled-stream and compiled share one T3 step, built once and shown on both" in footer


def test_the_fused_copy_is_made_outside_every_timed_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_wav: Path
) -> None:
    """The run that built the static step made the fused backbone inside its memory window, so
    its run growth held the copy that weights_gib counts too: total_gib counted it twice."""
    made: list[int] = []  # fused bytes made inside each timed window
    window = bench.memory_window

    @contextmanager
    def watched(dev: torch.device) -> Iterator[Any]:
        before = opts[0].plans["static"].fusion.nbytes()
        with window(dev) as w:
            yield w
        made.append(opts[0].plans["static"].fusion.nbytes() - before)

    opts = _kept_wrappers(monkeypatch)
    monkeypatch.setattr(bench, "memory_window", watched)
    run_bench("tiny", ("static",), tokens=2, repeats=1, warmup=0, reference=str(reference_wav),
              outdir=tmp_path, fused=True, dtype="float32")  # fmt: skip
    assert made == [0]  # (the one timed run, which built the step: no untimed run before it)


@pytest.fixture(scope="module")
def upstream_bench(tmp_path_factory: pytest.TempPathFactory, reference_wav: Path) -> SimpleNamespace:
    """One upstream-only bench (2 tokens, 1 repeat, no warm-up, a stereo copy of the
    reference), every policy measurement refused, without the bandwidth probe, and checked to
    leave torch's process settings as it found them (a module fixture runs before the per-test
    fixtures that stub the probe and check the settings): its ``.report`` and ``.stereo``, read
    by the three tests below."""
    folder = tmp_path_factory.mktemp("upstream_bench")
    mono, sr = sf.read(reference_wav)
    stereo = folder / "stereo.wav"
    sf.write(stereo, np.stack([mono, 0.5 * mono], axis=1), sr)

    def measured(tts: Any, candidate: str, *a: Any, **k: Any) -> None:
        raise AssertionError(f"policy {candidate} timed for a bench that runs no wrapper")

    before = _process_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimized, "measure_policy", measured)
        patch.setattr(bench, "read_bandwidth", _fixed_bandwidth)
        report = run_bench(  # (no untimed run: the cold-run test reads this report)
            "tiny", ("upstream",), tokens=2, repeats=1, warmup=0, reference=str(stereo), outdir=folder / "b"
        )
    assert _process_state() == before
    return SimpleNamespace(report=report, stereo=stereo)


def test_an_upstream_only_bench_measures_no_policy(upstream_bench: SimpleNamespace) -> None:
    """With no config running the wrapper, "auto" timed T3's policies for nothing and recorded
    whichever won that moment (a loaded machine recorded decode-bfloat16, failing the GPU check's
    dry run): the wrapper now opens in upstream's float32, nothing measured (``upstream_bench``
    refuses every measurement)."""
    assert upstream_bench.report["optimized_policy"]["policy"] == "float32"


def test_fused_on_turbo_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As load and serve refuse it (before 2026-12-06: accepted, Turbo's own GPT-2 backbone ran as
    the "fused" one and bench.json said fused true): a name's family, and a folder's, known unloaded."""
    folder = tmp_path / "turbo"
    save_checkpoint(load_model("turbo-tiny"), folder)
    monkeypatch.setattr(bench, "load_model", _reached)
    args = ["--configs", "static", "--fused", "--tokens", "5", "--repeats", "1", "--out", str(tmp_path / "o")]
    assert main(["bench", "--model", "turbo-tiny", *args]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "argument --fused" in errors[0] and "Turbo" in errors[0], errors
    with pytest.raises(ConfigError, match="argument --fused: Turbo's"):
        run_bench(str(folder), configs=("static",), fused=True, outdir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(Reached):  # the same flags on another family pass the checks
        run_bench("tiny", configs=("static",), fused=True, outdir=tmp_path / "o")


def test_a_converted_reference_is_in_the_report(upstream_bench: SimpleNamespace) -> None:
    """The other commands said a stereo or resampled reference was converted; the bench converted
    it without a word (docs/index.md said so)."""
    report, stereo = copy.deepcopy(upstream_bench.report), upstream_bench.stereo
    sr = sf.info(stereo).samplerate
    assert report["reference"]["path"] == str(stereo) and report["reference"]["channels"] == 2
    assert f"reference {stereo} ({report['reference']['seconds']} s, {sr} Hz): mixed 2 channels to mono" in (
        bench.format_bench(report).splitlines()
    )
    del report["reference"]  # a report written before 2026-12-06: its table all the same
    assert bench.format_bench(report).splitlines()[1].startswith("2 tokens, 1 timed run (after 0 untimed)")
    # a generated voice's reference is checked in the attention-recording test's upstream-only run


def test_a_bench_without_an_untimed_run_says_its_first_run_was_cold(upstream_bench: SimpleNamespace) -> None:
    """The first configuration's first run is the process's first generation (lazy set-up, first
    allocations): with no warm-up that lands in the baseline's median and every ratio to it
    (a full-size CPU run's upstream: 91.6 s then 83.8 s, the optimized runs level)."""
    report = copy.deepcopy(upstream_bench.report)
    cold = "no untimed run: the first configuration's first run also paid the process's one-time"
    assert report["settings"]["warmup"] == 0 and cold in bench.format_bench(report)
    report["settings"]["warmup"] = 1
    assert cold not in bench.format_bench(report)


def test_the_bandwidth_probe_gives_its_buffer_back_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Left in CUDA's caching allocator, the probe's 512 MiB served every run's large allocations,
    and the runs' reserved growth showed only the small pool's (the H200's upstream: 0.02 GiB
    reserved against 0.15 GiB grown). A CPU buffer stands in for the device's."""
    emptied: list[bool] = []
    ones = torch.ones
    monkeypatch.setattr(machine.torch, "ones", lambda *a, device=None, **k: ones(*a, **k))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(machine, "Timer", FixedTimer)
    assert PROBE("cuda", mbytes=8) > 0 and emptied == [True]
    assert PROBE("cpu", mbytes=8) > 0 and emptied == [True]  # nothing to give back


def test_the_summary_is_the_median_and_min_of_the_repeats_not_their_mean() -> None:
    """docs/bench.md: bench.json's summary holds the min and median of each; one slow repeat of
    three (a page-fault storm, a neighbour's burst) moves a mean, not a median."""
    floors = {"upstream": {"floor_s": 0.01}, "optimized": {"floor_s": 0.005}}
    rows = [_row("upstream", r, w, w / 100) for r, w in enumerate((1.0, 1.0, 10.0))]
    rows += [_row("optimized", r, w, w / 100) for r, w in enumerate((0.5, 0.5, 0.5))]
    up, opt = summarize(rows, floors)
    assert up["wall_s_median"] == pytest.approx(1.0) and up["wall_s_min"] == pytest.approx(1.0)
    assert up["t3_step_s_median"] == pytest.approx(0.01) and up["t3_step_vs_floor"] == pytest.approx(1.0)
    assert opt["wall_s_ratio"] == pytest.approx(0.5)  # 0.5 / upstream's median 1.0, not / a mean of 4.0


def test_the_table_reads_gb_per_s_in_bytes_and_each_ratio_from_its_own_timing() -> None:
    # optimized: wall half upstream's, step a quarter; 10**8 bytes a step in 0.01 s = 10 GB/s
    floors = {
        "upstream": {"floor_s": 0.002, "t3_bytes": 10**8},
        "optimized": {"floor_s": 0.001, "t3_bytes": 10**8},
    }
    report = {
        "summary": summarize([_row("upstream", 0, 4.0, 0.04), _row("optimized", 0, 2.0, 0.01)], floors),
        "floors": floors,
    }
    frame = bench_frame(report).set_index("config")
    assert frame.loc["optimized", "gb_per_s"] == pytest.approx(10.0)
    assert frame.loc["optimized", "wall_ratio"] == pytest.approx(0.5)
    assert frame.loc["optimized", "step_ratio"] == pytest.approx(0.25)
    assert frame.loc["optimized", "x_floor"] == pytest.approx(10.0)


def test_the_floor_is_the_step_bytes_read_once_at_the_measured_bandwidth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/bench.md: floor = T3 bytes per step / read bandwidth (bytes/s, a float32 buffer)."""
    monkeypatch.setattr(machine, "Timer", FixedTimer)
    bandwidth = PROBE("cpu", mbytes=4)
    assert bandwidth == pytest.approx(4 * 2**20 / 0.5)  # the buffer's bytes over the time to read them
    assert bench.step_floor(10**9, 10**9) == pytest.approx(1.0)  # bytes over bytes/s: seconds


def test_the_environment_names_the_cpu_and_its_half_precision_features() -> None:
    """The CPU machine has been an AVX2-only one, an AMD EPYC and an Intel Xeon with AMX: bfloat16
    results differ between them, and the results files did not say which ran them."""
    env = environment("tiny", "cpu")
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(env["cpu_flags"]) <= set(machine.ISA_FLAGS) and env["cpu"]
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    flags = next((line.split() for line in lines if line.startswith("flags")), None)
    if flags is not None:  # x86 Linux: the flags and the model name are the CPU's own
        assert env["cpu_flags"] == [f for f in machine.ISA_FLAGS if f in flags]
        assert env["cpu"] in cpuinfo.read_text()


def test_a_bench_on_a_busy_machine_says_its_times_are_inflated() -> None:
    """A bench run while another job used the 2 cores timed T3's step 25-50 times slower and said
    nothing (2026-12-07); the report now records the load average and warns past 1.5x the CPUs."""
    env = environment("tiny", "cpu")
    assert isinstance(env["load_average_1m"], float) and env["cpu_count"] >= 1
    assert busy_machine_line({"load_average_1m": 4.2, "cpu_count": 2}) == [
        "the machine was busy: load average 4.2 on 2 CPUs as the run ended: absolute times are inflated; "
        "compare the ratios of one run, or run again on an idle machine"
    ]
    assert busy_machine_line({"load_average_1m": 3.0, "cpu_count": 2}) == []  # its own 2 threads, one more
    assert busy_machine_line({"cpu_count": 2}) == []  # a report from before the figure
    # a run with two stages at work (the load study's T3 and S3Gen threads, 2 torch threads each)
    alone = {"load_average_1m": 4.5, "cpu_count": 2, "torch_threads": 2}
    assert busy_machine_line(alone, stages=2) == [] and busy_machine_line(alone) != []


def test_a_probe_below_the_runs_best_bandwidth_says_the_machine_ran_slower(
    upstream_bench: SimpleNamespace,
) -> None:
    """A slow spell of the host (2026-12-07: T3's step 4x slower for minutes) left the load average
    as it was; the bandwidth probe read 7.5 GB/s against 18.6-20.0. The bench probes before and
    after its runs, the load study before each level: a probe under 0.7x the best is named."""
    assert slow_spell_line([("before the runs", 19.0), ("after them", 7.5)]) == [
        "the machine ran slower during the run: memory read bandwidth 7.5 GB/s after them, against "
        "19.0 GB/s before the runs (a slow spell of the host; the load average does not show one): what "
        "ran then is slower for that alone; run again"
    ]
    assert slow_spell_line([("a", 20.0), ("b", 14.0), ("c", 18.0)]) == []  # 0.7x the best: not below
    assert "13.9 GB/s b" in slow_spell_line([("a", 20.0), ("b", 13.9)])[0]
    assert slow_spell_line([("a", 20.0)]) == [] and slow_spell_line([("a", 20.0), ("b", None)]) == []
    report = copy.deepcopy(upstream_bench.report)
    assert report["read_bandwidth_after_gb_s"] == 10.0  # (the fixed probe's) both probes kept
    assert "ran slower" not in bench.format_bench(report)
    report["read_bandwidth_after_gb_s"] = 3.0
    assert "memory read bandwidth 3.0 GB/s after them, against 10.0 GB/s" in bench.format_bench(report)
    del report["read_bandwidth_after_gb_s"]  # a report from before the second probe
    assert "ran slower" not in bench.format_bench(report)
