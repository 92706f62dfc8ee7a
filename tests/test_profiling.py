"""The op frame and the tables derived from it, checked against the profiler's own events;
profiler traces on disk; a real TensorBoard serving them; the bench CLI; the GPU script's CPU
dry run."""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from chatterbox.tts import ChatterboxTTS
from torch.autograd.profiler import record_function
from torch.autograd.profiler_util import FunctionEvent
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity

from conftest import loopback_server
from tts_workbench.core.constants import RANDOM_NO_STOP
from tts_workbench.core.errors import ConfigError
from tts_workbench.core.families import TTSModel, family_of
from tts_workbench.core.patching import around
from tts_workbench.core.quiet import upstream_bars_off
from tts_workbench.instruments import memory
from tts_workbench.instruments.attention import KernelRecord
from tts_workbench.instruments.latency import StreamReport
from tts_workbench.instruments.memory import _reset_peak_rss, memory_window, module_bytes, process_peak_bytes
from tts_workbench.instruments.plots import time_share_figure
from tts_workbench.instruments.profiling import (
    EAGER,
    KERNEL_OPS,
    MATH,
    MODEL_DEVICE_KEY,
    OP_COLUMNS,
    T3_INFERENCES,
    TensorBoard,
    activities,
    ancestors,
    free_port,
    long_run_schedule,
    op_events,
    op_frame,
    phase_regions,
    profile_run,
    profiled_chunks,
    read_ops,
    read_trace,
    region_of,
    run_folder,
    start_server,
    start_tensorboard,
    time_share,
    top_ops,
    trace_files,
    write_ops,
)
from tts_workbench.instruments.trace_analysis import CPU_ONLY_NOTE, NO_HTA_NOTE, TraceReport
from tts_workbench.interface.cli import main
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.decode import T3Parts
from tts_workbench.runtime.generation import generate, prepare_voice
from tts_workbench.runtime.optimized import UpstreamTTS
from tts_workbench.runtime.streaming import StreamConfig, StreamState, stream
from tts_workbench.studies import bench, profile_report
from tts_workbench.studies.bench import run_bench
from tts_workbench.studies.bench import run_pipeline as bench_run_pipeline
from tts_workbench.studies.profile_report import format_profile, profile_generation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profiled(tiny_tts: ChatterboxTTS, tmp_path_factory: pytest.TempPathFactory) -> dict:
    logdir = tmp_path_factory.mktemp("tb")
    return profile_generation(
        tiny_tts, logdir, "generation", tokens=12, text="Profile me, please.", model="tiny"
    )


@pytest.fixture(scope="module")
def frame_me(tiny_tts: ChatterboxTTS) -> torch.profiler.profile:
    """A 5-token generation profiled in its phases."""
    with torch.profiler.profile(record_shapes=True) as prof, phase_regions(tiny_tts):
        generate(tiny_tts, "Frame me.", max_new_tokens=5)
    return prof


@pytest.fixture(scope="module")
def events(frame_me: torch.profiler.profile) -> list[FunctionEvent]:
    return list(frame_me.events())


@pytest.fixture(scope="module")
def ops(events: list[FunctionEvent]) -> pd.DataFrame:
    return op_frame(events)


def test_the_op_events_give_the_frame_torchs_events_give(frame_me: torch.profiler.profile) -> None:
    """``op_events`` reads the profiler's records without torch's FunctionEvents (3.5x less time
    for frame and events here): the same rows, phases, categories, kernels and times, for T3's
    SDPA, S3Gen's eager attention and the ops nested under both."""
    ours, torchs = op_frame(op_events(frame_me)), op_frame(frame_me.events())
    pd.testing.assert_frame_equal(ours, torchs)
    assert {"t3.decode", "s3gen.flow"} <= set(ours["phase"]) and {EAGER, "flash (CPU)"} <= set(ours["kernel"])


def _aten(events: list[FunctionEvent], phase: str) -> list[FunctionEvent]:
    return [e for e in events if e.name.startswith("aten::") and region_of(e) == phase]


def test_op_frame_is_one_row_per_aten_event(events: list[FunctionEvent], ops: pd.DataFrame) -> None:
    assert list(ops.columns) == list(OP_COLUMNS)
    assert len(ops) == sum(e.name.startswith("aten::") for e in events)
    assert (ops["self_ms"] <= ops["total_ms"] + 1e-9).all()
    for phase in ("t3.prefill", "t3.decode", "s3gen.flow"):
        rows = ops[ops["phase"] == phase]
        # self_ms is the events' self time, total_ms their inclusive time: swapping them fails here
        assert rows["self_ms"].sum() == pytest.approx(
            sum(e.self_cpu_time_total for e in _aten(events, phase)) / 1e3
        )
        assert rows["total_ms"].sum() == pytest.approx(
            sum(e.cpu_time_total for e in _aten(events, phase)) / 1e3
        )


@pytest.fixture(scope="module")
def turbo_tts(tmp_path_factory: pytest.TempPathFactory) -> TTSModel:
    turbo = load_model("turbo-tiny")
    prepare_voice(turbo, str(make_reference_wav(tmp_path_factory.mktemp("turbo") / "r.wav", seconds=6.0)))
    return turbo  # (a Turbo voice is longer than 5 s)


@pytest.mark.parametrize("family", ["standard", "turbo"])
def test_every_op_of_t3s_inference_is_in_a_t3_phase(
    family: str, tiny_tts: ChatterboxTTS, request: pytest.FixtureRequest
) -> None:
    # The speech head's matmuls and sampling (softmax, sort, multinomial) ran outside the
    # transformer's ranges and were labelled "other". The phases are generate's (t3_timed):
    # t3.prefill the transformer and head over more than one position, t3.decode everything after
    # the prefill; what T3's inference does before its prefill is t3.conditioning.
    tts = tiny_tts if family == "standard" else request.getfixturevalue("turbo_tts")
    method = family_of(tts).t3_inference
    marked = around(tts.t3, method, lambda args, kwargs: record_function("test.t3_inference"))
    with torch.profiler.profile(record_shapes=True) as prof, phase_regions(tts), marked:
        result = generate(tts, "Frame me.", max_new_tokens=5)
    # every method is put back (the instances hold none of their own)
    assert not set(T3_INFERENCES) & set(vars(tts.t3))
    assert "forward" not in vars(tts.t3.speech_head) and "forward" not in vars(tts.t3.tfmr)
    inside = [
        e
        for e in sorted(prof.events(), key=lambda e: e.time_range.start)
        if e.name.startswith("aten::") and any(a.name == "test.t3_inference" for a in ancestors(e))
    ]
    ops = op_frame(inside)
    assert len(ops) == len(inside) > 0 and set(ops["phase"]) == {"t3.conditioning", "t3.prefill", "t3.decode"}
    # in time order: conditioning, then the prefill, then the decode, never back
    order = ops["phase"].cat.codes
    assert order.is_monotonic_increasing, ops[order.diff() < 0]
    assert "aten::embedding" in set(ops[ops["phase"] == "t3.conditioning"]["op"])  # the input embeddings
    sampled = ops[ops["op"] == "aten::multinomial"]
    assert len(sampled) == len(result.speech_tokens) and set(sampled["phase"]) == {"t3.decode"}
    # the speech head, (positions, hidden) x (hidden, vocabulary), by its own positions as t3_timed
    vocab = str(tts.t3.hp.speech_tokens_dict_size)
    head = ops[ops["op"].isin(["aten::mm", "aten::addmm"]) & ops["input_shapes"].str.contains(vocab)]
    calls = head.groupby("phase", observed=True).size().to_dict()
    if family == "standard":  # the prefill's head over the whole prompt, one per decode step
        assert calls == {"t3.prefill": 1, "t3.decode": result.decode_steps}
    else:  # inference_turbo gives the prefill's head its last position only
        assert calls == {"t3.decode": result.decode_steps + 1}


def test_kernel_counts_match_the_kernel_ops(
    events: list[FunctionEvent], ops: pd.DataFrame, tiny_tts: ChatterboxTTS
) -> None:
    by_phase = KernelRecord(ops).by_phase()
    layers = tiny_tts.t3.cfg.num_hidden_layers
    assert by_phase["t3.decode"] == {"flash (CPU)": 5 * layers} and by_phase["t3.prefill"] == {
        "flash (CPU)": layers
    }
    # Counted another way: each fused call shows as its kernel op, a child of the SDPA op.
    for phase, kernels in by_phase.items():
        for kernel, n in kernels.items():
            if kernel != EAGER:
                assert n == sum(e.name == KERNEL_OPS[kernel] for e in _aten(events, phase)), (phase, kernel)
    assert by_phase["s3gen.flow"][EAGER] == sum(
        e.name == "aten::softmax" and len(e.input_shapes[0]) == 4 for e in _aten(events, "s3gen.flow")
    )


def test_a_kernel_label_leaves_out_a_dtype_the_profiler_did_not_record(ops: pd.DataFrame) -> None:
    with_dtype = KernelRecord(ops).by_phase(with_dtype=True)["t3.decode"]
    assert list(with_dtype) == ["flash (CPU) [float32]"]  # torch 2.11's profiler records none:
    blank = KernelRecord(ops.assign(dtype="")).by_phase(with_dtype=True)["t3.decode"]
    assert blank == KernelRecord(ops).by_phase()["t3.decode"]  # no empty "[]" (the H200 run's)


def test_only_a_softmax_over_attention_scores_is_attention(ops: pd.DataFrame) -> None:
    softmax = ops[ops["op"].str.contains("softmax")]
    scores = softmax["input_shapes"].map(lambda s: len(json.loads(s)[0]) == 4)  # batch, heads, queries, keys
    assert (~scores).any()  # sampling's softmax over the vocabulary ([1, 8194] on the tiny model)
    assert (softmax[scores]["category"] == "attention").all()
    assert (softmax[~scores]["category"] == "other").all()  # was attention


def test_every_op_under_an_sdpa_call_is_attention() -> None:
    # The math fallback runs SDPA as bmm, mul, softmax, where, ...; they are attention, not
    # linear/matmul and other, or the attention share understates it.
    q = torch.randn(2, 16, 64, 64)
    with sdpa_kernel([SDPBackend.MATH]), torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(5):
            F.scaled_dot_product_attention(q, q, q)
    ops = op_frame(op_events(prof))
    assert {"aten::bmm", "aten::mul"} <= set(ops["op"])  # the fallback's ops, in the frame
    assert set(ops["category"]) == {"attention"}
    # one kernel per call: the fallback's own softmax over the scores is no eager attention call
    assert KernelRecord(ops).by_phase() == {"other": {MATH: 5}}
    share = time_share(ops).set_index("category")["self_ms"]
    assert share["attention"] == pytest.approx(ops["self_ms"].sum())
    assert share["linear/matmul"] == share["other"] == 0


def test_eager_attentions_matmuls_are_attention() -> None:
    """Eager attention counted its softmax alone: QK^T and the product with V were linear/matmul
    (28% of a timed attention was attention, where the math fallback's bmm for the same work
    counted 100%). A relative-position term beside QK^T (S3Gen's conformer) is attention too;
    a 4-D matmul of other rows, and one in a region with no scores, stays linear/matmul."""
    q, pos = torch.randn(1, 4, 32, 16), torch.randn(1, 4, 63, 16)
    other = torch.randn(1, 4, 8, 16)
    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.profiler.record_function("t3.decode"):
            scores = q @ q.transpose(-1, -2) + (q @ pos.transpose(-1, -2))[..., :32]
            torch.softmax(scores / 4.0, dim=-1) @ q
            other @ other.transpose(-1, -2)  # not these scores' rows
        with torch.profiler.record_function("s3gen.flow"):
            q @ q.transpose(-1, -2)  # no softmax over scores beside it
    ops = op_frame(op_events(prof))
    matmuls = ops[ops["op"] == "aten::matmul"]
    assert list(matmuls["category"]) == ["attention"] * 3 + ["linear/matmul"] * 2
    bmm = ops[ops["op"] == "aten::bmm"]  # what each matmul called
    assert list(bmm["category"]) == ["attention"] * 3 + ["linear/matmul"] * 2
    assert KernelRecord(ops).by_phase() == {"t3.decode": {EAGER: 1}}


def test_an_sdpa_call_under_autocast_is_one_call_of_its_kernel() -> None:
    """Autocast shows as an SDPA op around the real SDPA op (which casts, then runs the kernel):
    the outer op, with no kernel op as its own child, is no math fallback call beside it."""
    q = torch.randn(2, 4, 8, 16)
    with torch.profiler.profile(record_shapes=True) as prof, torch.autocast("cpu", torch.bfloat16):
        F.scaled_dot_product_attention(q, q, q)
    ops = op_frame(op_events(prof))
    assert (ops["op"] == "aten::scaled_dot_product_attention").sum() == 2  # the wrapper and the call
    assert KernelRecord(ops).by_phase() == {"other": {"flash (CPU)": 1}}


def test_the_dtype_column_has_torchs_dtype_names() -> None:
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
    dtypes += [torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn]
    tensors = [torch.zeros(2, dtype=d) for d in dtypes]
    with torch.profiler.profile(record_shapes=True) as prof:
        for t in tensors:
            t.clone()
        torch.cat(tensors[:2])
    ops = op_frame(op_events(prof))
    # The profiler writes C++ types: float, double, c10::Half, c10::BFloat16, long int, ...
    assert list(ops[ops["op"] == "aten::clone"]["dtype"]) == [str(d).removeprefix("torch.") for d in dtypes]
    assert list(ops[ops["op"] == "aten::cat"]["dtype"]) == [""]  # a TensorList, no tensor's dtype


def test_time_share_adds_up_to_each_phase_op_time(ops: pd.DataFrame) -> None:
    share = time_share(ops)
    assert list(share.columns) == ["phase", "category", "self_ms"]
    assert set(share["phase"]) == set(ops["phase"])
    assert (share.groupby("phase", observed=True).size() == 3).all()  # every category, zero or not
    per_phase = share.groupby("phase", observed=True)["self_ms"].sum()
    pd.testing.assert_series_equal(per_phase, ops.groupby("phase", observed=True)["self_ms"].sum())
    attention = share[(share["phase"] == "t3.decode") & (share["category"] == "attention")]["self_ms"].item()
    decode = ops[ops["phase"] == "t3.decode"]
    # the SDPA calls' inclusive time: the fused kernel and the ops it ran (empty, transpose, ...)
    calls = decode[(decode["op"] == "aten::scaled_dot_product_attention") & (decode["kernel"] != "")]
    assert attention == pytest.approx(calls["total_ms"].sum())
    # the JSON form is the same numbers, rounded
    assert KernelRecord(ops).summary()["time_share_ms"]["t3.decode"]["attention"] == round(attention, 2)


def test_a_profile_without_operators_is_a_figure_that_says_so() -> None:
    fig = time_share_figure(time_share(op_frame([])))  # was a TypeError: no numeric data to plot
    ax = fig.axes[0]
    assert not ax.patches and [t.get_text() for t in ax.texts] == ["no operator in this profile"]
    plt.close(fig)


@pytest.mark.parametrize("by", ["self_ms", "total_ms"])
def test_top_ops_are_ordered_by_the_stated_column(ops: pd.DataFrame, by: str) -> None:
    top = top_ops(ops, by=by, top=5)
    for phase, rows in top.groupby("phase", observed=True):
        assert len(rows) <= 5 and rows[by].is_monotonic_decreasing
        sums = ops[ops["phase"] == phase].groupby("op")[by].sum()
        assert rows[by].iloc[0] == pytest.approx(sums.max()) and rows["op"].iloc[0] == sums.idxmax()
        first = ops[(ops["phase"] == phase) & (ops["op"] == rows["op"].iloc[0])]
        assert rows["calls"].iloc[0] == len(first)


def test_op_frame_round_trips_through_csv(ops: pd.DataFrame, tmp_path: Path) -> None:
    pd.testing.assert_frame_equal(read_ops(write_ops(ops, tmp_path)), ops)


def test_trace_is_written_with_its_op_frame(profiled: dict) -> None:
    assert Path(profiled["trace"]).stat().st_size > 10_000
    assert {"t3.prefill", "t3.decode", "s3gen.flow", "s3gen.vocoder"} <= set(profiled["top_ops"])
    assert all(rows for rows in profiled["top_ops"].values())
    # the kernel the op frame saw is in the trace file TensorBoard and Perfetto open
    assert profiled["recorded_decode_kernels"] == ["flash (CPU)"]
    assert all(profiled["recorded_kernels_in_trace"].values())
    # the saved frame gives back the report's top operators without parsing the trace
    top = top_ops(read_ops(profiled["ops"]))
    assert (
        top[top["phase"] == "t3.decode"].drop(columns="phase").to_dict("records")
        == profiled["top_ops"]["t3.decode"]
    )
    assert "t3.decode" in format_profile(profiled)
    # how the generation ended, from the generation (a stop token would say so)
    assert profiled["note"] == f"12 tokens, ended by the token cap ({RANDOM_NO_STOP})"


@pytest.mark.integration  # a TensorBoard server (~7 s)
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


@pytest.fixture
def http_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """Another server answering on 127.0.0.1 (its port from the system), for as long as the test runs."""
    with loopback_server(http.server.SimpleHTTPRequestHandler) as server:
        yield server


def _no_server_started(monkeypatch: pytest.MonkeyPatch) -> None:
    def popen(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"a server was started: {args[0]}")

    monkeypatch.setattr(subprocess, "Popen", popen)


def test_tensorboard_refuses_a_port_another_server_answers_on(
    http_server: http.server.ThreadingHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TensorBoard could not bind and exited, but the other server answered the readiness request:
    # start_tensorboard "succeeded" with a dead process and a URL serving something else.
    _no_server_started(monkeypatch)
    port = http_server.server_address[1]
    with pytest.raises(ConfigError, match=f"already answers on port {port}: stop it or give another port"):
        start_tensorboard(tmp_path, port=port)


def test_tensorboard_refuses_a_port_it_cannot_bind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_server_started(monkeypatch)
    with socket.socket() as taken:  # bound, not listening: nothing answers, yet the port is taken
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 cannot be bound"):
            start_tensorboard(tmp_path, port=port)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """The processes ``start_server`` starts, in order."""
    processes: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recorded(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        processes.append(popen(*args, **kwargs))
        return processes[-1]

    monkeypatch.setattr(subprocess, "Popen", recorded)
    return processes


def test_a_server_that_answered_and_exited_has_not_started(
    started: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The readiness request can be answered by another process that took the port meanwhile;
    # only a server still running after it has started.
    def answered_once_it_exited(self: Any, url: Any, *args: Any, **kwargs: Any) -> io.BytesIO:
        started[-1].wait()
        return io.BytesIO(b"")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", answered_once_it_exited)
    cmd = [sys.executable, "-c", "raise SystemExit(3)"]
    with tempfile.TemporaryFile() as log, pytest.raises(RuntimeError, match="exited with code 3"):
        start_server(cmd, f"http://127.0.0.1:{free_port()}", log, timeout=30)


@pytest.mark.timeout(60)
def test_a_server_that_never_answers_shows_its_output(started: list[subprocess.Popen[bytes]]) -> None:
    # The TimeoutError said only that it did not answer: what the server wrote (here why it
    # cannot start) was thrown away with its log.
    # What it says comes from its environment: not in the command, which the error names too.
    env = {**os.environ, "SAID": "cannot load plugin: missing dependency XYZ"}
    cmd = [sys.executable, "-c", "import os, time; print(os.environ['SAID'], flush=True); time.sleep(60)"]
    with tempfile.TemporaryFile() as log, pytest.raises(TimeoutError, match="XYZ") as raised:
        # waited out in full: 3 s for a bare interpreter to print its line, on a loaded machine too
        start_server(cmd, f"http://127.0.0.1:{free_port()}", log, timeout=3, env=env)
    assert "longer timeout" in str(raised.value)
    assert started[-1].poll() is not None  # stopped, not left running


def test_loopback_requests_do_not_go_through_a_proxy(
    tmp_path: Path, behind_a_proxy: None, serve_folder: Callable[[Path], Any]
) -> None:
    # With http_proxy set (and no no_proxy), urllib sent the readiness and plugin requests for
    # 127.0.0.1 to the proxy: a server that was up never "answered".
    route = tmp_path / "data" / "plugin" / "pytorch_profiler" / "runs"
    route.parent.mkdir(parents=True)
    route.write_text(json.dumps({"runs": ["generation"], "loading": False}))
    with serve_folder(tmp_path) as server:
        tb = TensorBoard(server.process, server.url, tmp_path)
        assert tb.profiler("runs") == {"runs": ["generation"], "loading": False}
        tb.wait_for_run("generation", timeout=5)


def test_waiting_for_a_run_asks_at_least_once(tmp_path: Path) -> None:
    # timeout=0 never asked, then named the answer it never got: an UnboundLocalError
    tb = TensorBoard(mock.Mock(spec=subprocess.Popen), f"http://127.0.0.1:{free_port()}", tmp_path)
    # Wrapped, the request still goes out: nothing listens on the port, so it is refused.
    with (
        mock.patch.object(tb, "profiler", wraps=tb.profiler) as asked,
        pytest.raises(TimeoutError, match="did not list run 'generation' within 0 s") as raised,
    ):
        tb.wait_for_run("generation", timeout=0)
    assert asked.call_args_list == [mock.call("runs")]
    assert "(no answer: " in str(raised.value)  # the refused request's error, not a made-up one


def test_stream_chunks_are_labelled_with_a_schedule(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    state = StreamState(StreamReport("buffered"))
    config = StreamConfig("buffered", first_window_s=0.4, window_s=0.6)
    with profile_run(
        tiny_tts, tmp_path, "stream", schedule=long_run_schedule(wait=0, warmup=0, active=2)
    ) as prof:
        chunks = stream(tiny_tts, "One, two, three, four.", config, max_new_tokens=50, state=state)
        n = sum(1 for _ in profiled_chunks(chunks, prof))
    assert n == len(state.report.chunks) >= 3
    events = read_trace(trace_files(tmp_path / "stream")[-1])["traceEvents"]
    names = {e["name"] for e in events if e.get("ph") == "X"}
    assert {"stream.next[0]", "stream.next[1]"} <= names and "stream.next[2]" not in names  # active=2


def test_no_range_names_a_chunk_the_stream_never_gave() -> None:
    # What a stream does after its last chunk (finishing, T3 blocks that give no audio) was
    # labelled stream.chunk[2], a chunk that never came. A range's name is fixed when it opens,
    # before anyone knows whether that request brings a chunk or the end: ranges name requests.
    def chunks() -> Iterator[torch.Tensor]:
        yield torch.ones(3)
        yield torch.ones(3)
        torch.ones(1000).sum()  # the tail

    with torch.profiler.profile() as prof:
        assert len(list(profiled_chunks(chunks()))) == 2
    ranges = [e for e in prof.events() if e.name.startswith("stream.")]
    assert [e.name for e in ranges] == ["stream.next[0]", "stream.next[1]", "stream.next[2]"]
    tail = [e.name for e in prof.events() if any(a is ranges[-1] for a in ancestors(e))]
    assert "aten::sum" in tail  # the end: the one request more than there are chunks


def test_a_run_folder_holds_one_profile(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    # (before, each rerun of a notebook added a trace to the folder, and TensorBoard loaded them all)
    for _ in range(2):
        with profile_run(tiny_tts, tmp_path, "again", phases=False):
            torch.ones(8).sum()
    assert len(trace_files(tmp_path / "again")) == 1


def test_a_trace_says_where_the_model_ran(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    # torch lists every GPU it sees in a trace, so a trace of a CPU model on a GPU machine could
    # not be told from one whose profiler missed the GPU's kernels
    with profile_run(tiny_tts, tmp_path, "where", phases=False):
        torch.ones(8).sum()
    assert read_trace(trace_files(tmp_path / "where")[-1])[MODEL_DEVICE_KEY] == "cpu" == tiny_tts.device
    # with a schedule too, whose profiler has not started while it waits (metadata added then is lost)
    with profile_run(tiny_tts, tmp_path, "waited", schedule=long_run_schedule(), phases=False) as prof:
        for _ in range(5):
            torch.ones(8).sum()
            prof.step()
    assert read_trace(trace_files(tmp_path / "waited")[-1])[MODEL_DEVICE_KEY] == "cpu"


def test_a_cpu_model_is_profiled_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA was asked for whenever a GPU was there, whatever device the model was on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert activities("cpu") == activities(torch.device("cpu")) == [ProfilerActivity.CPU]
    assert activities("cuda:0") == [ProfilerActivity.CPU, ProfilerActivity.CUDA]


def test_a_run_folder_keeps_no_file_of_an_earlier_profile(tmp_path: Path) -> None:
    # Only traces were removed: a rerun that failed after writing its trace left it beside the
    # earlier run's op frame and region cut, and `trace --read` read the stale region.
    run = tmp_path / "generation"
    run.mkdir()
    for name in ("workbench.1.pt.trace.json", "ops.csv", "t3.decode.json.gz", "notes.txt"):
        (run / name).write_text("earlier")
    assert run_folder(tmp_path, "generation") == run
    assert [p.name for p in run.iterdir()] == ["notes.txt"]  # not the workbench's: kept


def test_profile_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_wav: Path) -> None:
    args = ["profile", "--model", "tiny", "--tokens", "6", "--logdir", str(tmp_path), "--decode", "compiled"]
    assert main([*args, "--reference", str(reference_wav), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert Path(report["trace"]).parent == tmp_path / "generation"
    # the compiled step's attention op, read from Inductor's code (no trace can show it)
    assert report["decode_step"] == {
        "step": "compiled", "kernels": ["flash (CPU)"], "found_by": "Inductor's generated code",
    }  # fmt: skip
    # a CPU trace: HolisticTraceAnalysis has no device activity to read, and the report says so
    assert report["device_trace"] == {"device": "cpu only", "note": CPU_ONLY_NOTE}


@pytest.mark.parametrize(
    "command, runs",
    [(["profile"], "tts_workbench.studies.profile_report.generate"),
     (["trace", "--steps", "eager"], "tts_workbench.studies.trace_report.t3_decode")],
)  # fmt: skip
def test_a_logdir_that_is_a_file_is_refused_before_the_model_runs(
    command: list[str],
    runs: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    reference_wav: Path,
) -> None:
    # torch's trace handler found it only after the whole profiled run: a RuntimeError traceback
    monkeypatch.setattr(runs, lambda *args, **kwargs: pytest.fail("the model ran"))
    logdir = tmp_path / "bad.json"
    logdir.write_text("{}")
    args = ["--model", "tiny", "--tokens", "2", "--logdir", str(logdir), "--reference", str(reference_wav)]
    assert main([*command, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the model's build on a bar, then the error
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and str(logdir) in errors[0], lines


def test_bench_cli_tiny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, reference_wav: Path
) -> None:
    calls = []

    def counted(pipeline: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        if isinstance(pipeline, UpstreamTTS):
            calls.append(a)
        return bench_run_pipeline(pipeline, *a, **kw)

    monkeypatch.setattr(bench, "run_pipeline", counted)
    # the allocator as CUDA's would read (this CPU has none): 1 GiB handed out while the wrapper opened
    readings = iter([3 * 2**30, 4 * 2**30])
    monkeypatch.setattr(bench, "allocated_bytes", lambda device: next(readings))
    args = ["bench", "--model", "tiny", "--configs", "upstream,optimized", "--tokens", "20", "--repeats", "2"]
    args += ["--reference", str(reference_wav)]
    assert main([*args, "--dtype", "decode-bfloat16", "--warmup", "1", "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["config"] for s in report["summary"]] == ["upstream", "optimized"]
    # One untimed warm-up run, then two timed ones: only the timed ones are rows.
    assert len(calls) == 3 and report["settings"]["warmup"] == 1
    assert len(report["rows"]) == 4 and report["summary"][0]["wall_s_ratio"] == 1.0
    # interleaved (docs/bench.md), so a drift of the machine falls on every configuration alike
    assert [row["config"] for row in report["rows"]] == ["upstream", "optimized"] * 2
    assert report["environment"]["torch"] and report["environment"]["chatterbox-tts"] == "0.1.7"
    assert report["floors"]["optimized"]["t3_bytes"] * 2 == pytest.approx(
        report["floors"]["upstream"]["t3_bytes"]
    )
    assert "meaningless" in report["note"]
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.csv").exists()
    assert (tmp_path / "memory.png").stat().st_size > 10_000  # the memory figure, drawn
    assert report["files"] == {n: str(tmp_path / n) for n in ("bench.json", "bench.csv", "memory.png")}
    assert set(report["memory"]["configs"]) == {"upstream", "optimized"}
    assert report["memory"]["wrapper_open_gib"] == 1.0  # measured around the wrapper's opening
    assert (
        "holds it on the device, measured (allocator, before its model loaded and after the wrapper "
        "opened): 1.000 GiB" in bench.format_bench(report)
    )
    # The repeats as torch.utils.benchmark Measurements (spread kept), one Compare table.
    cells = bench.bench_measurements(report)
    assert [(m.task_spec.sub_label, m.task_spec.description) for m in cells[:2]] == [
        ("upstream", "T3 step"), ("upstream", "T3 prefill")
    ]  # fmt: skip
    assert len(cells) == 8 and all(len(m.times) == 2 for m in cells)
    assert cells[0].median == pytest.approx(report["summary"][0]["t3_step_s_median"])
    text = bench.format_bench(report)
    assert "[------" in text and "bench: tiny on cpu, 20 tokens" in text
    # two repeats: their "interquartile range" is half their range, and the report says so
    spread = "spread: the interquartile range of 2 repeats is not a quartile spread (part of their range)"
    assert spread in text


def test_bench_refuses_no_repeats_before_building_anything(tmp_path: Path) -> None:
    # through the API (the command line's own check stops it there): an UnboundLocalError before
    with pytest.raises(ConfigError, match="repeats must be at least 1"):
        run_bench("tiny", repeats=0, outdir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_bench_cli_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--configs", "upstream,warp-speed"]) == 2
    assert "error: argument --configs: unknown configs ['warp-speed']" in capsys.readouterr().err
    assert main(["bench", "--configs", ","]) == 2
    assert "error: argument --configs: no config given: choose from upstream," in capsys.readouterr().err
    # a config twice ran twice a round and pooled its runs under one name (4 "repeats" of 2)
    assert main(["bench", "--configs", "upstream,optimized,upstream"]) == 2
    assert "error: argument --configs: upstream given twice: name each config once" in capsys.readouterr().err


def gpu_check_dry_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``scripts/gpu_check.sh --dry-run`` with results under tmp_path; (process, results file)."""
    env = {
        **os.environ,
        "GPU_CHECK_OUT": str(tmp_path / "gpu.json"),
        "GPU_CHECK_DIR": str(tmp_path / "steps"),
        "PYTHON": sys.executable,
        "GPU_CHECK_DEADLINE_S": "540",  # its steps stop in time: none is left behind by a timeout here
        **env,
    }
    p = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=580,
    )  # fmt: skip
    return p, json.loads((tmp_path / "gpu.json").read_text())


@pytest.mark.integration  # five processes, each importing torch and building a model
def test_gpu_check_dry_run_records_each_step(tmp_path: Path) -> None:
    # One dry run (each step is a process that builds the model): two configs keep it short (the
    # GPU run does six), and a policy that does not exist shows a failed step recorded with its
    # stderr while the others still run, and the exit code saying so.
    p, result = gpu_check_dry_run(
        tmp_path,
        GPU_CHECK_POLICIES="no-such-policy bfloat16",
        GPU_CHECK_CONFIGS="upstream,compiled",
        GPU_CHECK_TRACE="0",  # diagnose and trace are left off: test_cli and test_trace_analysis run them
        GPU_CHECK_MULTILINGUAL="1",
        GPU_CHECK_MULTILINGUAL_CONFIGS="upstream",
        GPU_CHECK_REFERENCE=str(make_reference_wav(tmp_path / "ref.wav", seconds=2)),
    )
    assert p.returncode == 1, p.stderr[-2000:] + p.stdout[-2000:]
    assert "DRY RUN" in result["what"] and set(result["runs"]) == {"bfloat16"}
    assert result["mode"] == "dry-run" and result["complete"] and result["skipped"] == {}
    assert set(result["errors"]) == {"bench-no-such-policy"}
    # the environment, recorded once at the start by its own step (not taken from a bench)
    env = result["environment"]
    assert env["model"] == "tiny" and env["device"] == "cpu" and env["cpu_count"] > 0
    assert {"date", "torch", "transformers", "chatterbox-tts"} <= set(env)
    assert result["nvidia_smi"] is None  # queried on the GPU only
    # every step ran under the watchdog and left its status; sampling too (--plain: no --json)
    steps = result["steps"]
    ran = {"environment", "bench-no-such-policy", "bench-bfloat16", "bench-multilingual", "sampling"}
    assert set(steps) == ran
    assert steps["sampling"]["rc"] == 0 and steps["bench-no-such-policy"]["rc"] != 0
    # the step folder, packed beside the results file after every step (what a killed call returns)
    with tarfile.open(tmp_path / "gpu_steps.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {"mode", "environment.json", "bench-bfloat16.json", "sampling.json", "sampling.status"} <= packed
    assert "no-such-policy" in result["errors"]["bench-no-such-policy"]
    run = result["runs"]["bfloat16"]
    assert run["policy"]["policy"] == "bfloat16"
    assert run["settings"]["configs"] == ["upstream", "compiled"]
    assert run["attention_kernels_optimized"]["t3.decode"]
    assert run["compile_s"]["compiled"] > 0 and run["compile_fallback"] is None
    assert run["compiled_attention"] == ["flash (CPU)"]  # read from Inductor's code
    # memory per configuration: weights counted apart; the compiled step keeps a KV cache
    memory = run["memory"]["configs"]
    assert memory["upstream"]["kv_cache_gib"] == 0 and memory["compiled"]["kv_cache_gib"] > 0
    assert memory["compiled"]["weights_gib"] < memory["upstream"]["weights_gib"]  # T3 in bfloat16
    for m in memory.values():
        assert m["total_gib"] == pytest.approx(m["weights_gib"] + m["kv_cache_gib"] + m["run_growth_gib"])
    assert any("memory per configuration" in line for line in run["table"])
    assert result["diagnose"] is None  # not asked for
    # the Multilingual model's bench: upstream alone here, so no policy given (bench refuses one
    # no config runs), and the wrapper float32, nothing measured; the GPU run's configs run it in bfloat16
    multi = result["multilingual"]
    assert multi["policy"]["policy"] == "float32" and multi["settings"]["configs"] == ["upstream"]
    assert any("bench: multilingual-tiny on cpu" in line for line in multi["table"])
    assert "## Multilingual, optimized policy float32" in p.stdout
    assert "## optimized policy bfloat16" in p.stdout
    # sampling one stream at a time vs batched: both timed on the same logits (tokens checked equal)
    ways = {"upstream, one stream at a time", "Sampler, batched"}
    assert {r["how"] for r in result["sampling"]["rows"]} == ways
    assert set(result["sampling"]["batched_over_one_by_one"]) == {"2"}
    assert result["trace"] is None  # not asked for


def test_gpu_check_deadline_skips_steps_and_still_writes_results(tmp_path: Path) -> None:
    # A deadline already spent when the first step would start: no step starts (no model is built,
    # so this takes about a second), each is recorded as skipped with why, and the results file and
    # the packed step folder are written all the same; a skipped step makes the exit status 1.
    p, result = gpu_check_dry_run(
        tmp_path,
        GPU_CHECK_DEADLINE_S="1",
        GPU_CHECK_REFERENCE=str(tmp_path / "unused.wav"),
        GPU_CHECK_LOAD="1",
    )
    assert p.returncode == 1, p.stderr[-2000:] + p.stdout[-2000:]
    assert result["mode"] == "dry-run" and "DRY RUN" in result["what"] and result["complete"]
    assert set(result["skipped"]) == {"environment", "bench-bfloat16", "load", "sampling", "trace"}
    assert all("GPU_CHECK_DEADLINE_S" in why for why in result["skipped"].values())
    assert result["errors"] == {} and result["runs"] == {} and result["steps"] == {}
    with tarfile.open(tmp_path / "gpu_steps.tar.gz") as tar:
        assert {"mode", "environment.skipped", "sampling.skipped"} <= set(tar.getnames())
    assert "skipped: ['bench-bfloat16', 'environment', 'load', 'sampling', 'trace']" in p.stdout


def test_memory_window_sees_a_block_peak_and_not_what_came_before() -> None:
    held = torch.ones(25_000_000)  # 100 MB resident before the block: not the block's
    with memory_window("cpu") as w:
        transient = torch.ones(12_500_000)  # 50 MB, freed inside the block
        del transient
    assert 45e6 < w.growth_bytes < 80e6, w
    # the kernel's peak where this machine lets it be reset, else the sampled resident set
    assert ("VmHWM" if _reset_peak_rss() else "sampled every 10 ms") in w.how
    weight = torch.nn.Linear(1000, 1000)
    tied = torch.nn.ModuleList([weight, weight])  # one storage, counted once
    assert module_bytes([tied]) == module_bytes([weight]) == (1000 * 1000 + 1000) * 4
    del held


def test_a_block_that_raises_still_gets_its_peak() -> None:
    with pytest.raises(ValueError), memory_window("cpu") as w:
        transient = torch.ones(12_500_000)  # 50 MB
        raise ValueError(transient.shape)
    assert w.growth_bytes > 45e6, w  # was 0: the VmHWM path filled the window in only on success
    cuda = mock.patch.multiple(
        torch.cuda,
        synchronize=mock.DEFAULT,
        reset_peak_memory_stats=mock.DEFAULT,
        memory_allocated=mock.Mock(return_value=100),
        memory_reserved=mock.Mock(return_value=200),
        max_memory_allocated=mock.Mock(return_value=150),
        max_memory_reserved=mock.Mock(return_value=400),
        current_device=mock.Mock(return_value=0),
    )
    with cuda, pytest.raises(ValueError), memory_window("cuda") as w:
        raise ValueError
    assert (w.growth_bytes, w.reserved_growth_bytes) == (50, 200)


@pytest.mark.parametrize("outer_device", ["cpu", "cpu:0"])
def test_a_window_opened_inside_another_keeps_the_outer_ones_peak(outer_device: str) -> None:
    """An inner window reset the process-wide peak (the kernel's VmHWM) and the outer window,
    ending after it, read the peak since that reset: 3 MiB of growth for a block that touched
    100 MiB. On "cpu:0" too: a window there was registered under that name while every reset
    keeps the peaks under "cpu", so an inner "cpu" window wiped its peak (2 MiB of growth)."""
    if not _reset_peak_rss():
        pytest.skip("the kernel's peak cannot be reset here: windows sample, and reset nothing")
    with memory_window(outer_device) as outer:
        x = torch.ones(100 * 2**20 // 4)
        x += 1  # 100 MiB resident
        del x
        with memory_window("cpu") as inner:
            pass
    assert outer.growth_bytes >= 90 * 2**20, outer
    assert inner.growth_bytes < 90 * 2**20, inner  # the inner block's own peak, not the outer one's


def test_the_process_peak_is_one_whether_named_cpu_or_cpu_0() -> None:
    # "cpu:0" lost the peaks saved under "cpu" before a window's reset
    if not _reset_peak_rss():
        pytest.skip("the kernel's peak cannot be reset here: windows sample, and reset nothing")
    big = torch.ones(50_000_000)  # 200 MB, freed before the window
    peak = process_peak_bytes("cpu:0")
    del big
    with memory_window("cpu"):
        pass
    assert process_peak_bytes("cpu:0") == process_peak_bytes("cpu") >= peak >= 200e6


def test_a_cuda_window_opened_inside_another_keeps_the_outer_ones_peak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # reset_peak_memory_stats is process-wide too: the outer window read the peak since the inner reset
    monkeypatch.setattr(memory, "_peaks_before", {})
    allocator = {"peak": 100, "reserved": 200}

    def reset(device: object = None) -> None:
        allocator.update(peak=100, reserved=200)

    stand_in = {"synchronize": lambda device=None: None, "reset_peak_memory_stats": reset,
                "memory_allocated": lambda device=None: 100, "memory_reserved": lambda device=None: 200,
                "max_memory_allocated": lambda device=None: allocator["peak"],
                "max_memory_reserved": lambda device=None: allocator["reserved"],
                "current_device": lambda: 0}  # fmt: skip
    for name, fn in stand_in.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    with memory_window("cuda") as outer:
        allocator.update(peak=5000, reserved=8000)  # the outer block's own peak
        with memory_window("cuda:0") as inner:
            pass
    assert (outer.growth_bytes, outer.reserved_growth_bytes) == (4900, 7800)
    assert (inner.growth_bytes, inner.reserved_growth_bytes) == (0, 0)


def test_the_process_peak_so_far_outlives_a_window_that_reset_it() -> None:
    """A window resets the kernel's VmHWM (getrusage's ru_maxrss with it): the wrapper's
    ``last_run`` still reports the process's peak so far."""
    big = torch.ones(50_000_000)  # 200 MB, freed before the window
    peak = process_peak_bytes("cpu")
    del big
    with memory_window("cpu"):
        pass
    assert process_peak_bytes("cpu") >= peak >= 200e6


def test_a_cuda_peak_is_one_device_whether_named_cuda_or_cuda_0(monkeypatch: pytest.MonkeyPatch) -> None:
    # load.py opens its windows on cuda:0 and the optimized wrapper reads the peak on cuda: the
    # peak a window reset was remembered under one name and not found under the other.
    monkeypatch.setattr(memory, "_peaks_before", {})
    allocator = {"peak": 5000}  # the caching allocator's peak so far: a window resets it

    def reset(device: object = None) -> None:
        allocator["peak"] = 100

    stand_in = {"synchronize": lambda device=None: None, "reset_peak_memory_stats": reset,
                "memory_allocated": lambda device=None: 100, "memory_reserved": lambda device=None: 100,
                "max_memory_allocated": lambda device=None: allocator["peak"],
                "max_memory_reserved": lambda device=None: 100, "current_device": lambda: 0}  # fmt: skip
    for name, fn in stand_in.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    with memory_window("cuda:0"):
        pass
    assert process_peak_bytes("cuda") == process_peak_bytes("cuda:0") == 5000  # was 100 under "cuda"
    allocator["peak"] = 7000
    with memory_window("cuda"):
        pass
    assert process_peak_bytes("cuda:0") == 7000


def test_a_run_that_built_its_cache_does_not_count_it_twice() -> None:
    from types import SimpleNamespace

    from tts_workbench.studies.bench import Row, memory_per_config

    lin = torch.nn.Linear(4, 4)  # 80 bytes of weights wherever one is asked for
    plan = SimpleNamespace(prefill=lin, decode=lin, step_parts=lin, step="static", static_bytes=lambda: 1000)
    models = SimpleNamespace(t3=lin, s3gen=lin, ve=lin)
    opt: Any = SimpleNamespace(plans={"compiled": plan}, tts=models)

    def row(config: str, repeat: int, growth: int, built: bool) -> Row:
        return Row(config, repeat, 1.0, 1.0, 1.0, 8, 0.1, 0.1, 1, 0.5, growth, 0, t3_compile_s=float(built))

    opt.plans["static"] = plan
    rows = [
        row("compiled", 0, 1500, True),
        row("compiled", 1, 300, False),
        row("static", 0, 1500, True),
        row("upstream", 0, 700, True),
    ]
    configs = memory_per_config(rows, models, opt, torch.device("cpu"), "test")["configs"]
    # A run that built its step (and compiled it) holds the build's own temporary memory: with a
    # run that did not build, that one is the configuration's working memory (before, the
    # compiled row showed the compile's 1500 - 1000 and looked heavier than the static one).
    assert configs["compiled"]["kv_cache_gib"] * 2**30 == 1000
    assert configs["compiled"]["run_growth_gib"] * 2**30 == 300
    assert not configs["compiled"]["growth_run_built"]
    assert configs["compiled"]["total_gib"] * 2**30 == 80 + 1000 + 300
    # Only a run that built: it allocated the 1000-byte cache inside its window, 500 bytes are its own.
    assert configs["static"]["run_growth_gib"] * 2**30 == 500 and configs["static"]["growth_run_built"]
    assert configs["upstream"]["run_growth_gib"] * 2**30 == 700  # upstream keeps no static cache


def test_the_step_floor_counts_one_row_of_each_embedding_table(tiny_tts: ChatterboxTTS) -> None:
    # A decode step looks up one row of each table; it reads every other weight once.
    parts = T3Parts.of(tiny_tts.t3)
    tables = [m for part in parts.modules() for m in part.modules() if isinstance(m, torch.nn.Embedding)]
    assert tables
    unread = sum((m.num_embeddings - 1) * m.embedding_dim * m.weight.element_size() for m in tables)
    assert parts.step_bytes() == parts.nbytes() - unread


def test_the_streaming_table_gives_a_ratio_for_every_measured_seam() -> None:
    common = {
        "s3gen_calls": 2, "prompt_frames": 10, "context_frames": 4, "new_frames": 8, "s3gen_s": 0.1,
        "s3gen_vs_one_shot": 1.2, "ttfa_s": 0.05, "wall_s": 0.5, "rtf": 0.4, "underruns": 0,
        "underrun_s": 0.0, "ordinary_max_over_median": 2.0, "snr_db": 30.0,
        "snr_vs_full_prompt_one_shot_db": 20.0,
    }  # fmt: skip
    rows = [
        {"name": "flat seam", "seam_max_over_median": 0.0, **common},  # measured: no jump at all
        {"name": "one chunk", "seam_max_over_median": None, **common},
        # a silent stream (every sample zero, e.g. NaN samples zeroed): no jump anywhere
        {"name": "silent", **common, "seam_max_over_median": 0.0, "ordinary_max_over_median": 0.0},
    ]
    ratios = bench.streaming_frame(rows)["seam_ratio"].tolist()
    assert ratios[0] == 0.0 and pd.isna(ratios[1]) and pd.isna(ratios[2])


def test_the_bench_says_random_weights_only_of_a_random_build() -> None:
    from tts_workbench.studies.bench import weights_note

    assert weights_note("deep-narrow").startswith("random weights: timing is realistic")
    assert weights_note("pretrained") == "weights from pretrained"  # its audio means something


PROFILE_STAGES = [
    "profiled generation", "op frame", "reading the trace", "reading t3.decode with HTA", "writing ops.csv",
    "finding the eager step's kernels",
]  # fmt: skip


def test_profile_names_each_stage_on_stderr_as_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tiny_tts: ChatterboxTTS,
) -> None:  # fmt: skip
    """(before 2026-12-06: nothing on stderr until the report: the command silences upstream's bars)"""
    from contextlib import contextmanager

    from tts_workbench.interface import commands

    @contextmanager
    def voiced(*_a: Any, **_k: Any) -> Iterator[ChatterboxTTS]:
        yield tiny_tts  # built and voiced once per session

    monkeypatch.setattr(commands, "voiced_model", voiced)
    assert main(["profile", "--tokens", "3", "--text", "Hi.", "--logdir", str(tmp_path), "--json"]) == 0
    err = capsys.readouterr().err
    bar = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("profile:")]
    assert bar and "6/6" in bar[-1], err[-2000:]
    shown = [err.find(f", {name}]") for name in PROFILE_STAGES]  # the bar's postfix, in this order
    assert -1 not in shown and shown == sorted(shown), err[-2000:]
    # Called from a notebook (upstream's bars off, as notebook_setup has them) it writes nothing: a
    # saved notebook's output stays as it was. This run has no HTA (as on the GPU image), where the
    # report said to read the region trace with `trace --read PATH` but named no path: the cut it
    # wrote was in neither the JSON nor the text.
    cut = profile_report.analyze_cut

    def without_hta(steps: dict[str, Any], out: Path) -> TraceReport:
        return TraceReport(cut(steps, out).trace, "NVIDIA H200", note=NO_HTA_NOTE)

    monkeypatch.setattr(profile_report, "analyze_cut", without_hta)
    with upstream_bars_off():
        report = profile_generation(tiny_tts, tmp_path, "quiet", tokens=3, text="Hi.")
    assert capsys.readouterr().err == ""
    region = tmp_path / "quiet" / "t3.decode.json.gz"
    assert report["region_trace"] == str(region) and region.is_file()
    assert str(region) in format_profile(report)
