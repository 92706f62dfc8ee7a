"""Profiler traces on disk, read back; a real TensorBoard serving them; the bench CLI; the GPU
script's CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chatterbox.tts import ChatterboxTTS

from tts_workbench import bench
from tts_workbench.bench import run_pipeline as bench_run_pipeline
from tts_workbench.cli import main
from tts_workbench.latency import StreamReport
from tts_workbench.optimized import UpstreamTTS
from tts_workbench.profile_report import profile_generation
from tts_workbench.profiling import (
    long_run_schedule,
    profile_run,
    profiled_chunks,
    start_tensorboard,
    trace_files,
)
from tts_workbench.streaming import StreamConfig, StreamState, stream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profiled(tiny_tts: ChatterboxTTS, tmp_path_factory: pytest.TempPathFactory) -> dict:
    logdir = tmp_path_factory.mktemp("tb")
    return profile_generation(tiny_tts, logdir, "generation", tokens=12, text="Profile me, please.")


def test_trace_is_written_and_read_back_by_phase(profiled: dict) -> None:
    assert Path(profiled["trace"]).stat().st_size > 10_000
    assert {"t3.prefill", "t3.decode", "s3gen.flow", "s3gen.vocoder"} <= set(profiled["top_ops"])
    assert all(rows for rows in profiled["top_ops"].values())
    # the kernel the attention recorder saw is the one in the trace's decode region
    assert profiled["recorded_decode_kernels"] == ["flash (CPU)"]
    assert all(profiled["recorded_kernels_in_trace"].values())


def test_tensorboard_serves_the_run(profiled: dict) -> None:
    tb = start_tensorboard(profiled["logdir"])
    try:
        tb.wait_for_run("generation", timeout=120)
        views = tb.profiler("views", run="generation")
        assert "Overview" in views and "Operator" in views
        workers = tb.profiler("workers", run="generation", view="Overview")
        assert workers == ["workbench"]
        spans = tb.profiler("spans", run="generation", worker=workers[0])
        params = {"run": "generation", "worker": workers[0], "span": spans[0] if spans else ""}
        overview = tb.profiler("overview", **params)
        assert "steps" in overview and "performance" in overview
        ops = {row["name"] for row in tb.profiler("operation/table", **params, group_by="Operation")["data"]}
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops  # run inside t3.decode
    finally:
        tb.stop()
    assert tb.process.poll() is not None  # stopped by its pid


def test_stream_chunks_are_labelled_with_a_schedule(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    state = StreamState(StreamReport("buffered"))
    config = StreamConfig("buffered", first_window_s=0.4, window_s=0.6)
    with profile_run(
        tiny_tts, tmp_path, "stream", schedule=long_run_schedule(wait=0, warmup=0, active=2)
    ) as prof:
        chunks = stream(tiny_tts, "One, two, three, four.", config, max_new_tokens=50, state=state)
        n = sum(1 for _ in profiled_chunks(chunks, prof))
    assert n == len(state.report.chunks) >= 3
    names = {e["name"] for e in json.loads(trace_files(tmp_path / "stream")[-1].read_text())["traceEvents"]}
    assert {"stream.chunk[0]", "stream.chunk[1]"} <= names and "stream.chunk[2]" not in names  # active=2


def test_profile_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "tiny", "--tokens", "6", "--logdir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert Path(report["trace"]).parent == tmp_path / "generation"


def test_bench_cli_tiny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def counted(pipeline: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        if isinstance(pipeline, UpstreamTTS):
            calls.append(a)
        return bench_run_pipeline(pipeline, *a, **kw)

    monkeypatch.setattr(bench, "run_pipeline", counted)
    args = ["bench", "--model", "tiny", "--configs", "upstream,optimized", "--tokens", "20", "--repeats", "2"]
    assert main([*args, "--dtype", "decode-bfloat16", "--warmup", "1", "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["config"] for s in report["summary"]] == ["upstream", "optimized"]
    # One untimed warm-up run, then two timed ones: only the timed ones are rows.
    assert len(calls) == 3 and report["settings"]["warmup"] == 1
    assert len(report["rows"]) == 4 and report["summary"][0]["wall_s_ratio"] == 1.0
    assert report["environment"]["torch"] and report["environment"]["chatterbox-tts"] == "0.1.7"
    assert report["floors"]["optimized"]["t3_bytes"] * 2 == pytest.approx(
        report["floors"]["upstream"]["t3_bytes"]
    )
    assert "meaningless" in report["note"]
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.csv").exists()


def test_bench_cli_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--configs", "upstream,warp-speed"]) == 2
    assert "unknown configs ['warp-speed']" in capsys.readouterr().err


def gpu_check_dry_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``scripts/gpu_check.sh --dry-run`` with results under tmp_path; (process, results file)."""
    env = {
        **os.environ,
        "GPU_CHECK_OUT": str(tmp_path / "gpu.json"),
        "GPU_CHECK_DIR": str(tmp_path / "steps"),
        "PYTHON": sys.executable,
        **env,
    }
    p = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return p, json.loads((tmp_path / "gpu.json").read_text())


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    # Two configs keep the test short; the GPU run does six.
    p, result = gpu_check_dry_run(tmp_path, GPU_CHECK_CONFIGS="upstream,compiled", GPU_CHECK_DIAGNOSE="1")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]
    assert "DRY RUN" in result["what"] and set(result["runs"]) == {"bfloat16"} and result["errors"] == {}
    run = result["runs"]["bfloat16"]
    assert run["policy"]["policy"] == "bfloat16"
    assert run["settings"]["configs"] == ["upstream", "compiled"]
    assert run["attention_kernels_optimized"]["t3.decode"]
    assert run["compile_s"]["compiled"] > 0 and run["compile_fallback"] is None
    assert result["diagnose"]["kernels"] and result["diagnose"]["precision"]
    assert "## optimized policy bfloat16" in p.stdout


def test_gpu_check_records_a_failed_step(tmp_path: Path) -> None:
    # A step that fails is recorded with its stderr, the others still run, the exit code says so.
    p, result = gpu_check_dry_run(
        tmp_path, GPU_CHECK_POLICIES="no-such-policy bfloat16", GPU_CHECK_CONFIGS="upstream"
    )
    assert p.returncode == 1
    assert (
        set(result["runs"]) == {"bfloat16"} and "no-such-policy" in result["errors"]["bench-no-such-policy"]
    )
    assert result["diagnose"] is None  # not asked for
