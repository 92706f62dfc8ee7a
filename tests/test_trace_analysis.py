"""HolisticTraceAnalysis on device traces: a hand-made trace with known answers, a real GPU
trace (tests/data/README.md), and this project's own CPU traces, where HTA has nothing to read."""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from chatterbox.tts import ChatterboxTTS
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text

from tts_workbench.core.errors import ConfigError, TraceError
from tts_workbench.core.quiet import upstream_bars_off
from tts_workbench.instruments import trace_analysis
from tts_workbench.instruments.attention import device_attention_kernel
from tts_workbench.instruments.plots import device_time_figure, memory_figure
from tts_workbench.instruments.profiling import EAGER, MODEL_DEVICE_KEY
from tts_workbench.instruments.trace_analysis import (
    CPU_ONLY_NOTE,
    DEVICE_CATEGORIES,
    NO_HTA_NOTE,
    TraceReport,
    analyze,
    analyze_region,
    compare,
    cut_region,
    events_within,
    read_trace,
    region_trace,
)
from tts_workbench.interface.cli import main
from tts_workbench.runtime import decode
from tts_workbench.studies import trace_report
from tts_workbench.studies.profile_report import _device_line, in_trace
from tts_workbench.studies.trace_report import (
    cut_report,
    decode_trace_report,
    decode_traces,
    format_decode_traces,
    read_traces,
)

GPU_TRACE = Path(__file__).parent / "data" / "hta_a100_simple_add.pt.trace.json.gz"
GPU_REGION = "[param|pytorch.model.alex_net|0|0|0|measure|forward]"  # two ranges in that trace


def _kernel(ts: float, dur: float, corr: int) -> dict[str, Any]:
    args = {"device": 0, "stream": 7, "correlation": corr, "External id": corr}
    return {
        "ph": "X",
        "cat": "kernel",
        "name": f"k{corr}",
        "pid": 0,
        "tid": 7,
        "ts": ts,
        "dur": dur,
        "args": args,
    }


def _launch(ts: float, dur: float, corr: int) -> dict[str, Any]:
    args = {"correlation": corr, "External id": corr}
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 1,
            "ts": ts, "dur": dur, "args": args}  # fmt: skip


def _no_bar_note(fig: Figure) -> Text:
    """The device-time figure's "no bar for ..." note (a figure's or its axes' text)."""
    return next(t for t in [*fig.texts, *fig.axes[0].texts] if t.get_text().startswith("no bar for"))


def _said(fig: Figure) -> str:
    """``_no_bar_note``'s words, its line breaks (it is wrapped to the figure) as spaces."""
    return " ".join(_no_bar_note(fig).get_text().split())


def _check_device_time_layout(fig: Figure) -> None:
    """The no-bar note and the x label drawn apart, each inside the figure, and a legend (where
    there are bars to key) of one colour per stage: the note was drawn over the label and cut off
    below the figure, and with no bar the legend's entries were all one colour."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg's, without a display
    ax, page = fig.axes[0], fig.bbox
    note, label = (t.get_window_extent(renderer) for t in (_no_bar_note(fig), ax.xaxis.label))
    assert not note.overlaps(label), (note, label)
    for box in (note, label):
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, box
    legend = ax.get_legend()
    if legend is not None:
        colours = [to_hex(h.get_facecolor()) for h in legend.legend_handles]  # type: ignore[union-attr]
        assert len(set(colours)) == len(colours) == 4, colours


@pytest.fixture
def known_trace(tmp_path: Path) -> Path:
    """Three kernels on one stream, µs: [100, 110), [150, 170), [175, 180), launched by calls
    ending at 95, 145 and 174; a ``t3.decode`` range from 139 to 175 holds the last two launches."""
    events = [_launch(90, 5, 1), _kernel(100, 10, 1), _launch(140, 5, 2), _kernel(150, 20, 2),
              _launch(172, 2, 3), _kernel(175, 5, 3),
              {"ph": "X", "cat": "user_annotation", "name": "t3.decode", "pid": 1, "tid": 1,
               "ts": 139, "dur": 36}]  # fmt: skip
    trace = {
        "deviceProperties": [{"id": 0, "name": "test GPU"}],
        "distributedInfo": {"rank": 0},
        "traceEvents": events,
    }
    path = tmp_path / "known.json"
    path.write_text(json.dumps(trace))
    return path


def test_known_trace_numbers(known_trace: Path) -> None:
    r = analyze(known_trace)
    # span 100..180 = 80 µs, kernels 35 µs, gaps 40 + 5 µs
    assert r.temporal[["idle_us", "compute_us", "non_compute_us"]].iloc[0].tolist() == [45, 35, 0]
    assert r.temporal["idle_pct"].iloc[0] == pytest.approx(56.25)
    assert r.launches["launch_delay_us"].tolist() == [5, 5, 1]
    assert r.launches[["cpu_us", "gpu_us"]].values.tolist() == [[5, 10], [5, 20], [2, 5]]
    assert r.kernels["kernel"].tolist() == ["k2", "k1", "k3"]  # by time, largest first
    assert r.kernels["share_pct"].tolist() == pytest.approx([100 * 20 / 35, 100 * 10 / 35, 100 * 5 / 35])
    s = r.summary()
    assert s["device"] == "test GPU" and s["span_us"] == 80 and s["top_kernel"] == "k2"
    assert s["idle_host_wait_pct"] == 100.0  # each kernel was launched after the one before it ended


def test_cuda_syncs_are_not_device_time(known_trace: Path, tmp_path: Path) -> None:
    # torch.profiler records a host sync as a "cuda_sync" event on the stream it waited for;
    # HTA counted it as device work, so the span ran to the sync's end (121 µs, 40 µs "non-compute")
    trace = json.loads(known_trace.read_text())
    args = {"cuda_sync_kind": "Stream Sync", "stream": 7, "correlation": 4, "device": 0}
    sync = {"ph": "X", "cat": "cuda_sync", "name": "Stream Sync", "pid": 0, "tid": 7, "ts": 181, "dur": 40,
            "args": args}  # fmt: skip
    trace["traceEvents"] += [{**_launch(181, 40, 4), "name": "cudaStreamSynchronize"}, sync]
    path = tmp_path / "sync.json.gz"
    path.write_bytes(gzip.compress(json.dumps(trace).encode()))
    r = analyze(path)
    assert r.temporal[["idle_us", "compute_us", "non_compute_us"]].iloc[0].tolist() == [45, 35, 0]
    s = r.summary()
    assert s["span_us"] == 80 and s["idle_pct"] == pytest.approx(56.25) and s["non_compute_pct"] == 0
    assert r.trace == str(path.resolve()) and r.launches["correlation"].tolist() == [1, 2, 3]
    assert read_trace(path) == trace  # the file itself is left as it was


def _kernels_at(starts: list[float], dur: float) -> dict[str, Any]:
    """A trace of one kernel of ``dur`` µs at each of ``starts``, each launched 3 µs before."""
    events = [e for i, ts in enumerate(starts) for e in (_launch(ts - 3, 2.0, i), _kernel(ts, dur, i))]
    return {"deviceProperties": [{"id": 0, "name": "test GPU"}], "traceEvents": events}


def test_float_timestamps_are_read_to_the_nanosecond(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch writes ns-precision float µs ("ts": 5649212617414.744); HTA 0.5.0 rounded each event
    # inward to whole µs: 50 kernels of 1.6 µs, 0.3 µs apart, read as 30 µs of compute and 63 idle
    # (the kernels table: 80), and a kernel inside one µs got a negative length (AssertionError).
    monkeypatch.delenv("HTA_DISABLE_NS_ROUNDING", raising=False)
    path = tmp_path / "ns.json"
    path.write_text(json.dumps(_kernels_at([round(200.25 + 1.9 * i, 3) for i in range(50)], 1.6)))
    r = analyze(path)
    t = r.temporal.iloc[0]
    assert t["compute_us"] == pytest.approx(r.kernels["sum_us"].sum()) == pytest.approx(80)
    assert t["idle_us"] == pytest.approx(49 * 0.3) and t["idle_pct"] == pytest.approx(15.52, abs=0.01)
    path.write_text(json.dumps(_kernels_at([round(1000.123 + 1.3 * i, 3) for i in range(20)], 0.9)))
    assert analyze(path).temporal["compute_us"].iloc[0] == pytest.approx(20 * 0.9)
    assert "HTA_DISABLE_NS_ROUNDING" not in os.environ  # set only while HTA reads


@pytest.mark.parametrize(
    "steps",
    [[(80, 65), (145, 45)], [(0, 80), (80, 110)]],
    ids=["kernels in both steps", "all kernels in the last step"],
)
def test_profiler_steps_leave_the_device_numbers_as_they_are(
    known_trace: Path, tmp_path: Path, steps: list[tuple[int, int]]
) -> None:
    # prof.step() writes ProfilerStep#N ranges; HTA 0.5.0 dropped everything from the last one's
    # start on (span 70 µs for the first case) and raised IndexError when all kernels were in it
    trace = json.loads(known_trace.read_text())
    trace["traceEvents"] += [
        {"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{n}", "pid": 1, "tid": 1, "ts": ts,
         "dur": dur}
        for n, (ts, dur) in enumerate(steps, start=1)
    ]  # fmt: skip
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(trace))
    r, plain = analyze(path), analyze(known_trace)
    pd.testing.assert_frame_equal(r.temporal, plain.temporal)
    pd.testing.assert_frame_equal(r.idle, plain.idle)
    s = r.summary()
    assert s == plain.summary() and s["span_us"] == 80 and s["idle_pct"] == pytest.approx(56.25)
    assert s["launches"] == 3 and read_trace(path) == trace  # the file itself is left as it was


def _gpu_trace_without_kernels(tmp_path: Path, events: list[dict[str, Any]], **meta: str) -> list[Path]:
    """A trace of ``events`` that lists an H200 (as torch writes every GPU it sees, used or not),
    with the top-level ``meta`` (where the model ran), and a copy with a ``t3.decode`` range
    around them: the files to read whole and by region."""
    gpu = [{"id": 0, "name": "NVIDIA H200"}]
    region = {"ph": "X", "cat": "user_annotation", "name": "t3.decode", "pid": 1, "tid": 1, "ts": 0, "dur": 5}
    paths = [tmp_path / "gpu.json", tmp_path / "cut.json"]
    for path, kept in zip(paths, (events, [*events, region]), strict=True):
        path.write_text(json.dumps({"deviceProperties": gpu, **meta, "traceEvents": kept}))
    return paths


def _reports(paths: list[Path]) -> list[TraceReport]:
    """``analyze`` of the whole trace and ``analyze_region`` of its copy with a region (which
    reports a trace without device activity without ``analyze``)."""
    whole, cut = paths
    return [analyze(whole), analyze_region(cut, "t3.decode", whole.parent / "region.json")]


_MM = {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 5,
       "args": {"External id": 7}}  # fmt: skip


def test_a_gpu_trace_without_kernels_names_its_gpu(tmp_path: Path) -> None:
    # torch writes "deviceProperties": [] for a CPU profile on a machine without a GPU; a GPU
    # listed there with none of its kernels recorded, the model on CUDA, is a profiler that
    # missed them (CUPTI), not a CPU-only profile
    events = [_MM, {**_launch(1, 3, 7), "ts": 1}]
    for r in _reports(_gpu_trace_without_kernels(tmp_path, events, **{MODEL_DEVICE_KEY: "cuda"})):
        assert not r.analyzed and r.device == "NVIDIA H200" and r.summary()["device"] == "NVIDIA H200"
        assert "CPU-only" not in r.note and "CUPTI" in r.note and "ProfilerActivity.CUDA" in r.note
        assert "ran on the CPU" not in r.note
    # a trace of another tool's (no word of where its model ran): either reading
    for r in _reports(_gpu_trace_without_kernels(tmp_path, events)):
        assert r.device == "NVIDIA H200" and "CUPTI" in r.note and "or the model ran on the CPU" in r.note
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"deviceProperties": [], "traceEvents": events[:1]}))
    assert analyze(cpu).device == "cpu only" and analyze(cpu).note == CPU_ONLY_NOTE


def test_a_cpu_model_on_a_gpu_machine_is_not_a_profiler_that_missed_kernels(tmp_path: Path) -> None:
    # torch lists every GPU it sees in a trace, whatever device the model is on: `profile` with
    # the default --device cpu on a GPU machine said the profiler had kept none of the H200's
    # kernels and to check CUPTI, where the model had run on the CPU
    paths = _gpu_trace_without_kernels(tmp_path, [_MM], **{MODEL_DEVICE_KEY: "cpu"})
    for r in _reports(paths):
        assert not r.analyzed and r.summary()["device"] == "cpu"
        assert "CUPTI" not in r.note and "ProfilerActivity" not in r.note, r.note
        assert "NVIDIA H200" in r.note and "the model ran on the CPU: profile with --device cuda" in r.note


def test_a_cpu_decode_cut_on_a_gpu_machine_says_the_model_ran_on_the_cpu(
    cpu_traces: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    # as the trace of `trace` with the default --device cpu reads on a GPU machine
    _, regions = cpu_traces
    cut = read_trace(regions["eager"])
    assert cut[MODEL_DEVICE_KEY] == "cpu"  # decode_traces writes where the model ran, and the cut keeps it
    path = tmp_path / "on_a_gpu_machine.json"
    path.write_text(json.dumps({**cut, "deviceProperties": [{"id": 0, "name": "NVIDIA H200"}]}))
    r = analyze_region(path, "t3.decode", tmp_path / "cut.json.gz")
    assert "CUPTI" not in r.note and "--device cuda" in r.note, r.note


def test_trace_read_errors_say_what_to_give(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1, 2]")  # JSON, but not a trace
    missing, not_trace = tmp_path / "none.json", tmp_path / "list.json"
    for path, why in ((missing, "argument --read: no trace file"), (not_trace, "no traceEvents")):
        assert main(["trace", "--read", str(path)]) == 2
        err = capsys.readouterr().err
        assert why in err and "torch.profiler" in err, err
    with pytest.raises(TraceError, match="no traceEvents.*torch.profiler"):
        read_trace(tmp_path / "list.json")


def test_without_hta_the_report_says_where_to_read_it(
    known_trace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hta.trace_analysis", None)  # as on the GPU image
    r = analyze(known_trace)
    assert not r.analyzed and r.note.startswith(NO_HTA_NOTE) and r.device == "test GPU"
    # the command to run where HTA is, not only the constant the code builds the note from
    assert "`tts-workbench trace --read PATH`" in r.note and "pip install -r requirements.lock" in r.note


def test_known_trace_region(known_trace: Path, tmp_path: Path) -> None:
    r = analyze_region(known_trace, "t3.decode", tmp_path / "cut.json.gz")
    # kernels 2 and 3 only (kernel 3 starts at the range's end: it counts by its launch)
    assert r.launches["correlation"].tolist() == [2, 3]
    assert r.temporal[["idle_us", "compute_us"]].iloc[0].tolist() == [5, 25]
    with pytest.raises(TraceError, match="no profiler range named 'prefill'"):
        region_trace(known_trace, "prefill", tmp_path / "none.json")


def test_attention_kernels_named_from_device_kernel_names(known_trace: Path, tmp_path: Path) -> None:
    names = {  # shaped like the names of PyTorch's Flash, CUTLASS FMHA and cuDNN SDPA kernels
        1: "void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<64, 64, 256, 4>>",
        2: "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)",
        3: "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wmma_f16_knob_7_64x64x64_4x1x1_kernel0_0",
    }
    trace = read_trace(known_trace)
    for e in trace["traceEvents"]:
        if e.get("cat") == "kernel":
            e["name"] = names[e["args"]["correlation"]]
    path = tmp_path / "named.json"
    path.write_text(json.dumps(trace))
    r = analyze(path)
    assert dict(zip(r.attention["label"], r.attention["sum_us"], strict=True)) == {
        "mem-efficient (CUDA)": 20, "flash (CUDA)": 10, "cuDNN (CUDA)": 5,
    }  # fmt: skip
    assert r.summary()["attention_kernels"] == ["cuDNN (CUDA)", "flash (CUDA)", "mem-efficient (CUDA)"]
    assert analyze(GPU_TRACE).attention.empty  # a convolution benchmark: no attention kernel
    # Inductor's own kernels are named after the op whose inputs they prepare: not attention
    for name in ("triton_poi_fused__scaled_dot_product_efficient_attention_4",
                 "triton_poi_fused__scaled_dot_product_flash_attention__to_copy_7"):  # fmt: skip
        assert device_attention_kernel(name) is None


def test_a_cuda_graph_replay_is_one_launch_of_its_kernels(known_trace: Path, tmp_path: Path) -> None:
    # HTA 0.5.0's launch statistics count cudaLaunchKernel only: a graph replay would be missing
    trace = read_trace(known_trace)
    events = trace["traceEvents"]
    events += [_kernel(190 + 10 * i, 5, 4) for i in range(3)]  # one replay: three kernels, one id
    events.append({**_launch(180, 4, 4), "name": "cudaGraphLaunch"})
    events.append({"ph": "X", "cat": "user_annotation", "name": "t3.decode", "pid": 1, "tid": 1,
                   "ts": 178, "dur": 10})  # fmt: skip
    events.append({"ph": "X", "cat": "user_annotation", "name": "t3.decode", "pid": 1, "tid": 1,
                   "ts": 141, "dur": 2})  # nested in the first range: not a step of its own  # fmt: skip
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(trace))
    r = analyze(path)
    graph = r.launches[r.launches["launch"] == "cudaGraphLaunch"].iloc[0]
    assert (graph["kernels"], graph["cpu_us"], graph["gpu_us"], graph["launch_delay_us"]) == (3, 4, 15, 6)
    assert r.summary()["kernels_per_launch"] == 6 / 4
    spread = r.launch_spread()
    assert list(spread.columns) == ["cpu_us", "gpu_us", "launch_delay_us"]
    assert spread.loc["count", "gpu_us"] == 4
    assert spread.loc["50%", "launch_delay_us"] == r.summary()["median_launch_delay_us"]
    # the first two outermost t3.decode ranges: from 139 to 188, so launches 2, 3 and the replay
    cut = analyze(region_trace(path, "t3.decode", tmp_path / "two.json", occurrences=2))
    assert cut.launches["correlation"].tolist() == [2, 3, 4]


def test_real_gpu_trace_region(tmp_path: Path) -> None:
    whole = analyze(GPU_TRACE)
    region = analyze_region(GPU_TRACE, GPU_REGION, tmp_path / "cut.json.gz")
    assert whole.device == region.device == "NVIDIA A100-PG509-200"
    cut = read_trace(region.trace)
    ranges = [e for e in cut["traceEvents"] if e.get("name") == GPU_REGION]
    start, end = ranges[0]["ts"], ranges[-1]["ts"] + ranges[-1]["dur"]
    launched = {e["args"]["correlation"] for e in cut["traceEvents"] if e.get("cat") == "cuda_runtime"}
    device = [e for e in cut["traceEvents"] if e.get("cat") in DEVICE_CATEGORIES]
    # only the window's host events, and only the device work they launched
    assert len(ranges) == 2 and all(
        start <= e["ts"] <= end for e in cut["traceEvents"] if e.get("cat") == "cpu_op"
    )
    assert device and {e["args"]["correlation"] for e in device} <= launched
    assert set(region.launches["correlation"]) <= launched
    assert 0 < len(region.launches) < len(whole.launches)
    for r in (whole, region):
        t = r.temporal.iloc[0]
        assert t["idle_pct"] + t["compute_pct"] + t["non_compute_pct"] == pytest.approx(100, abs=0.05)
        assert r.kernels["share_pct"].sum() == pytest.approx(100)
    table = compare({"whole": whole, "region": region})
    assert table["run"].tolist() == ["whole", "region"]
    cpu = pd.DataFrame([{"run": "cpu", "device": "cpu only", "note": CPU_ONLY_NOTE}])
    both = pd.concat([table, cpu], ignore_index=True)
    fig = device_time_figure(both)
    assert len(fig.axes[0].get_yticklabels()) == 2 and "cpu: " in _said(fig)
    _check_device_time_layout(fig)  # with bars beside the note
    # the labels `trace --read` gives decode_traces' folders: the note, wrapped to the figure's
    # width, started right of them and ran off the figure
    names = ["decode-eager/t3.decode", "decode-static/t3.decode", "decode-compiled/t3.decode"]
    _check_device_time_layout(device_time_figure(both.assign(run=names)))
    assert table["span_us"].iloc[1] < table["span_us"].iloc[0]
    # The whole trace's headline numbers, checked on the trace itself: the span runs from the first
    # device event's start to the last one's end; the kernels' intervals cover 10670 µs of it, the
    # copies' and memsets' 39088 µs (HTA rounds the shares to 0.01 %); 37 of the 98 launches did
    # less work on the device than their launch call took on the host.
    events = [e for e in read_trace(GPU_TRACE)["traceEvents"] if e.get("cat") in DEVICE_CATEGORIES]
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    s = whole.summary()
    assert s["span_us"] == span
    assert s["compute_pct"] == pytest.approx(round(100 * 10670 / span, 2))
    assert s["non_compute_pct"] == pytest.approx(round(100 * 39088 / span, 2))
    assert s["gpu_shorter_than_launch_pct"] == pytest.approx(100 * 37 / 98)


def test_kernel_times_are_per_call(tmp_path: Path) -> None:
    # HTA 0.5.0 folds names beyond its top 10 into "others" by regrouping the per-name sums: the
    # mean and max of each kernel it kept were its sum
    kernels = analyze(GPU_TRACE).kernels.set_index("kernel")
    sgemm = kernels.loc["ampere_sgemm_32x32_sliced1x4_tn"]
    assert (sgemm["calls"], sgemm["sum_us"], sgemm["mean_us"], sgemm["max_us"]) == (6, 2673, 445.5, 868)
    assert sgemm["kernel_type"] == "COMPUTATION"
    assert kernels.loc["Memcpy HtoD (Pageable -> Device)", "kernel_type"] == "MEMORY"
    device = [e for e in read_trace(GPU_TRACE)["traceEvents"] if e.get("cat") in DEVICE_CATEGORIES]
    assert kernels["calls"].sum() == len(device) and kernels["sum_us"].sum() == sum(e["dur"] for e in device)


def test_the_text_table_shows_counts_as_integers() -> None:
    text = format_decode_traces(decode_trace_report(read_traces({"a100": GPU_TRACE}), "a100"))
    header, row = text.splitlines()[1:3]
    end = header.index("launches") + len("launches")  # numbers are right-aligned under their header
    launches = row[:end].split()[-1]
    assert launches == "98", text


def test_the_gpu_traces_top_kernels_come_longest_first_and_its_line_reads_its_idle_share() -> None:
    report = decode_trace_report(read_traces({"a100": GPU_TRACE}), "a100")
    top = report["top_kernels"]["a100"]
    sums = [k["sum_us"] for k in top]
    # the host-to-device copies: 39080 of the 49816 us of device work (test_kernel_times_are_per_call)
    assert sums == sorted(sums, reverse=True) and top[0]["kernel"] == "Memcpy HtoD (Pageable -> Device)"
    summary = report["table"][0]
    line = _device_line(summary)
    # the device waits most of this trace: idle, not its 0.07 % of compute (test_real_gpu_trace_region)
    assert round(summary["idle_pct"], 1) == 99.7 and "idle 99.7% of the span" in line, line


@pytest.fixture(scope="module")
def cpu_traces(
    tiny_tts: ChatterboxTTS, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Path]]:
    logdir = tmp_path_factory.mktemp("trace")
    return logdir, decode_traces(tiny_tts, ["eager", "static"], logdir, tokens=8, text="Hello there.")


def test_cpu_trace_says_what_hta_cannot_show(cpu_traces: tuple[Path, dict[str, Path]]) -> None:
    logdir, regions = cpu_traces
    assert regions == {step: logdir / f"decode-{step}" / "t3.decode.json.gz" for step in ("eager", "static")}
    reports = read_traces(regions)
    for r in reports.values():
        assert not r.analyzed and r.note == CPU_ONLY_NOTE and r.summary()["device"] == "cpu only"
    text = format_decode_traces(decode_trace_report(reports, "tiny, float32"))
    assert "no device activity" in text
    assert text.startswith("HolisticTraceAnalysis read none of these T3 decode regions:"), text
    # the figure says so too (it raised a KeyError), beside a run that has device time
    fig = device_time_figure(compare(reports))
    assert not fig.axes[0].patches and f"eager: {CPU_ONLY_NOTE}" in _said(fig)
    _check_device_time_layout(fig)  # no bar at all: two long notes


def test_cut_only_reports_where_the_regions_are(cpu_traces: tuple[Path, dict[str, Path]]) -> None:
    # what `trace --cut-only` prints on a GPU machine without HTA: no table, the files, their events
    _, regions = cpu_traces
    report = cut_report(regions, "tiny, float32")
    assert report["table"] == [] and report["traces"] == {step: str(p) for step, p in regions.items()}
    assert report["device_events"] == {"eager": 0, "static": 0}  # a CPU trace
    assert all(str(p) in format_decode_traces(report) for p in regions.values())


def test_a_read_of_mixed_traces_shows_each(cpu_traces: tuple[Path, dict[str, Path]]) -> None:
    # one trace HTA reads, one it cannot (CPU only): a table row for the first, a note for the second
    reports = read_traces({"a100": GPU_TRACE, "cpu": cpu_traces[1]["eager"]})
    text = format_decode_traces(decode_trace_report(reports, "mixed"))
    assert "NVIDIA A100-PG509-200" in text and "cpu: no device activity" in text
    assert "top kernels, a100:" in text and "top kernels, cpu" not in text


def test_trace_cli_reads_traces_taken_elsewhere(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # a GPU machine without HTA cuts (--cut-only); this one reads, with no model
    assert main(["trace", "--read", str(GPU_TRACE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in report["table"]] == ["hta_a100_simple_add.pt.trace"]
    assert report["table"][0]["device"] == "NVIDIA A100-PG509-200" and report["top_kernels"]
    assert main(["trace", "--read", str(tmp_path / "none.json")]) == 2
    assert "no trace file" in capsys.readouterr().err
    (tmp_path / "notes.json.gz").write_text("not gzip")  # one error line, not a traceback
    (tmp_path / "list.json").write_text("[1, 2]")
    for bad, why in (("notes.json.gz", "is not a readable trace"), ("list.json", "no traceEvents")):
        assert main(["trace", "--read", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert f"error: argument --read: {tmp_path / bad} " in err and why in err, err
        with pytest.raises(TraceError, match=why):  # what a caller in Python catches
            read_trace(tmp_path / bad)
    # decode_traces names every region t3.decode.json.gz: their folders tell them apart
    for step in ("eager", "compiled"):
        (tmp_path / f"decode-{step}").mkdir()
        (tmp_path / f"decode-{step}" / "t3.decode.json.gz").write_bytes(GPU_TRACE.read_bytes())
    assert main(["trace", "--read", *map(str, sorted(tmp_path.glob("decode-*/*.gz"))), "--json"]) == 0
    runs = [r["run"] for r in json.loads(capsys.readouterr().out)["table"]]
    assert runs == ["decode-compiled/t3.decode", "decode-eager/t3.decode"]


def test_trace_cli_json_of_mixed_traces_is_strict_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A GPU trace beside a CPU-only one: the table went through a DataFrame, so each row's missing
    # fields came out as NaN (not JSON: jq and JSON.parse refuse it) and the launch count as 98.0.
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 5}
    ]}))  # fmt: skip
    assert main(["trace", "--read", str(GPU_TRACE), str(cpu), "--json"]) == 0

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in the JSON output")

    gpu_row, cpu_row = json.loads(capsys.readouterr().out, parse_constant=refuse)["table"]
    assert list(gpu_row) == list(cpu_row)  # every row has every field, null where it has none
    assert gpu_row["note"] is None and isinstance(gpu_row["launches"], int) and gpu_row["launches"] > 0
    assert cpu_row["note"] == CPU_ONLY_NOTE and cpu_row["device"] == "cpu only"
    assert cpu_row["idle_pct"] is None and cpu_row["attention_kernels"] is None
    assert main(["trace", "--read", str(GPU_TRACE), str(cpu)]) == 0  # the text report reads the same rows
    text = capsys.readouterr().out
    assert "NVIDIA A100-PG509-200" in text and f"cpu: {CPU_ONLY_NOTE}" in text


def test_region_of_own_cpu_trace(cpu_traces: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    logdir, regions = cpu_traces
    for step in regions:  # decode_blocks labels its steps whatever runs them
        trace = next((logdir / f"decode-{step}").glob("*.pt.trace.json*"))
        cut = read_trace(region_trace(trace, "t3.decode", tmp_path / f"{step}.json", occurrences=3))
        ranges = [
            e for e in cut["traceEvents"] if e.get("cat") == "user_annotation" and e["name"] == "t3.decode"
        ]
        assert len(ranges) == 3, step
        end = ranges[-1]["ts"] + ranges[-1]["dur"]
        assert all(
            ranges[0]["ts"] <= e["ts"] <= end for e in cut["traceEvents"] if "ts" in e and e.get("ph") == "X"
        )


def test_trace_cli_refuses_bad_flags_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--steps", "eager,fast"]) == 2
    assert "error: argument --steps: unknown decode step 'fast'" in capsys.readouterr().err
    assert main(["trace", "--tokens", "1"]) == 2  # no decode step would run
    assert "at least 2" in capsys.readouterr().err


def test_a_trace_without_device_activity_has_an_empty_launch_spread() -> None:
    spread = TraceReport("t.json", device="cpu only", note=CPU_ONLY_NOTE).launch_spread()
    assert spread.empty and list(spread.columns) == ["cpu_us", "gpu_us", "launch_delay_us"]


def test_eager_attention_is_in_a_trace_only_as_a_softmax_over_4d_scores() -> None:
    # Upstream samples inside t3.decode: its softmax over the vocabulary (2-D) is no attention.
    def softmax(dims: list[list[int]]) -> dict[str, Any]:
        return {"name": "aten::softmax", "args": {"Input Dims": dims}}

    sampling, scores = softmax([[1, 8194], []]), softmax([[2, 16, 1, 40], []])
    assert not in_trace(EAGER, [sampling]) and in_trace(EAGER, [sampling, scores])
    assert in_trace("flash (CPU)", [{"name": "aten::_scaled_dot_product_flash_attention_for_cpu"}])


def test_events_within_a_region_leave_out_what_runs_between_its_ranges() -> None:
    # Two decode steps with sampling's softmax between them: a cut keeps it (it spans the first
    # step's start to the last one's end), the kernel check must not count it as attention.
    def event(name: str, ts: int, dur: int, cat: str = "cpu_op") -> dict[str, Any]:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    trace = {"traceEvents": [
        event("t3.decode", 0, 10, "user_annotation"), event(flash, 2, 3),
        event("aten::softmax", 12, 2), event("t3.decode", 20, 10, "user_annotation"),
        event("aten::argmax", 9, 3),  # starts inside the first step, ends after it
    ]}  # fmt: skip
    names = {e["name"] for e in events_within(trace, "t3.decode")}
    assert flash in names and "aten::softmax" not in names and "aten::argmax" not in names
    with pytest.raises(ConfigError, match="occurrences must be at least 1"):  # not "no range named"
        cut_region(trace, "t3.decode", occurrences=0)


def _without(event: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != key}


@pytest.mark.parametrize(
    ("events", "says"),
    [
        # were AttributeError ('int' object has no attribute 'get'), IndexError in HTA, ...
        ([1, 2], "event 0 is 1, not an object"),
        ([_launch(90, 5, 1), _without(_kernel(100, 10, 1), "dur")], "event 1 (kernel) has no dur"),
        ([_launch(90, 5, 1), {**_kernel(100, 10, 1), "args": {"correlation": 1}}], "has no args.stream"),
        ([_without(_launch(90, 5, 1), "args"), _kernel(100, 10, 1)], "event 0 (cuda_runtime) has no args"),
        ([_launch(90, 5, 1), {**_kernel(100, 10, 1), "args": None}], "event 1 (kernel) has no args"),
        ([{"ph": "X", "cat": "user_annotation", "name": "t3.decode", "ts": "139"}], "has no ts, dur"),
        ([{"cat": ["kernel"], "name": "k"}], 'event 0 has a category ["kernel"], not a name'),  # unhashable
    ],
)
def test_a_json_file_of_trace_events_that_are_not_is_a_trace_error_naming_it(
    events: list[Any], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"traceEvents": events}))
    with pytest.raises(TraceError, match=f"^{path} .*{re.escape(says)}.*torch.profiler"):
        analyze(path)
    with pytest.raises(TraceError, match=re.escape(says)):
        region_trace(path, "t3.decode", tmp_path / "cut.json")
    assert main(["trace", "--read", str(path)]) == 2  # one error line, not a traceback
    assert says in capsys.readouterr().err


def test_the_device_time_figure_says_why_each_run_has_no_bar(
    known_trace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hta.trace_analysis", None)  # a GPU trace left unread
    unread, cpu = analyze(known_trace), TraceReport("t.json", device="cpu only", note=CPU_ONLY_NOTE)
    said = _said(device_time_figure(compare({"gpu": unread, "cpu": cpu})))
    assert f"gpu: {NO_HTA_NOTE}" in said and f"cpu: {CPU_ONLY_NOTE}" in said
    assert said.count("no device activity") == 1  # the CPU trace's; the unread GPU trace was labelled so too


def test_trace_sizes_each_static_cache_before_it_empties_a_folder(
    tiny_tts: ChatterboxTTS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # decode_traces emptied every decode-STEP folder, then refused a run longer than the plan's
    # default static cache (`trace --tokens 1600 --steps static`), naming plan.max_cache_len: the
    # earlier traces were gone. Here the default cache is 8 positions, the run needs more.
    old = tmp_path / "decode-static" / "earlier.pt.trace.json"
    old.parent.mkdir()
    old.write_text("{}")
    # one token is the prefill's: no decode step ran, so no t3.decode range, found with folders emptied
    # keep=0 was refused by region_trace, after the profiled run, naming its own "occurrences"
    refusals = [(["static", "fast"], 8, None, "unknown decode step 'fast'"),
                (["static"], 0, None, "at least 2"),
                (["static"], 1, None, "at least 2, got 1: the first token comes from the prefill"),
                (["static"], 8, 0, r"^keep must be at least 1 \(or None: .+\), got 0$")]  # fmt: skip
    for steps, tokens, keep, says in refusals:
        with pytest.raises(ConfigError, match=says):
            decode_traces(tiny_tts, steps, tmp_path, tokens=tokens, text="Hello there.", keep=keep)
        assert old.is_file(), steps  # refused before any folder was emptied
    small = trace_report.decode_plan
    monkeypatch.setattr(trace_report, "decode_plan", lambda *a: replace(small(*a), max_cache_len=8))
    regions = decode_traces(tiny_tts, ["static", "eager"], tmp_path, tokens=8, text="Hello there.")
    assert all(path.is_file() for path in regions.values()) and not old.exists()  # a new profile


def test_a_compiled_step_that_ran_static_is_reported_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], reference_wav: Path
) -> None:
    # A failed compile falls back to the static step with a warning on stderr only: the report
    # still called the step that ran "compiled".
    def no_compiler(*_a: Any, **_k: Any) -> Any:
        def compiled(*_x: Any) -> Any:
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(decode, "compile_method", no_compiler)
    args = ["trace", "--model", "tiny", "--steps", "eager,compiled", "--tokens", "4"]
    args += ["--logdir", str(tmp_path), "--reference", str(reference_wav)]
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert main([*args, "--cut-only", "--json"]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["steps"]["eager"] == {"asked": "eager", "ran": "eager", "fallback": None}
    assert cut["steps"]["compiled"] == {
        "asked": "compiled", "ran": "static", "fallback": "RuntimeError: no compiler here"
    }  # fmt: skip
    assert main(["trace", "--read", *cut["traces"].values(), "--json"]) == 0  # read elsewhere: kept
    rows = {row["run"]: row for row in json.loads(capsys.readouterr().out)["table"]}
    compiled = rows["decode-compiled/t3.decode"]
    assert (compiled["step"], compiled["step_ran"]) == ("compiled", "static")
    assert compiled["compile_fallback"] == "RuntimeError: no compiler here"
    assert rows["decode-eager/t3.decode"]["step_ran"] == "eager"
    with pytest.warns(RuntimeWarning):
        assert main([*args, "--cut-only"]) == 0
    assert "compiled: compiled step (ran static: RuntimeError: no compiler here)" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning):
        assert main(args) == 0  # the text report, read here
    out = capsys.readouterr().out
    assert "compiled: T3 decode region, compiled step (ran static: RuntimeError: no compiler here)" in out
    assert "eager: T3 decode region, eager step" in out


def test_a_trace_read_whole_is_not_called_a_decode_region(
    known_trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `trace --read` called every file the T3 decode region: this A100 trace is a whole AlexNet run.
    assert main(["trace", "--read", str(GPU_TRACE)]) == 0
    out = capsys.readouterr().out
    assert "T3 decode region" not in out and "whole trace (no t3.decode range)" in out, out
    assert main(["trace", "--read", str(GPU_TRACE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["table"][0]["region"] is None
    # a trace with t3.decode ranges is read for its decode region: the last two of three kernels
    assert main(["trace", "--read", str(known_trace), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["table"]
    assert row["region"] == "t3.decode" and row["launches"] == 2 and row["span_us"] == 30
    assert main(["trace", "--read", str(known_trace)]) == 0
    assert "T3 decode region, read by HolisticTraceAnalysis:" in capsys.readouterr().out


def test_read_traces_parses_each_trace_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """It read a trace to find its region, then again to analyse it (a GPU trace of many MB)."""
    parsed: list[Path] = []
    read = trace_analysis.read_trace

    def counted(path: str | Path) -> dict[str, Any]:
        parsed.append(Path(path))
        return read(path)

    for module in (trace_analysis, trace_report):  # each reads through its own name
        monkeypatch.setattr(module, "read_trace", counted)
    reports = read_traces({"a100": GPU_TRACE})
    assert reports["a100"].analyzed and parsed.count(GPU_TRACE) == 1, parsed


def test_the_memory_figure_keeps_its_legend_off_the_totals() -> None:
    # The legend sat in the lower right, over the total written beside the last bars.
    for configs in (["upstream", "optimized"], ["upstream", "autocast", "static", "compiled"]):
        n = len(configs)
        memory = pd.DataFrame({"config": configs, "weights_gib": [1.0] * n,
                               "kv_cache_gib": [0.0, 0.5] * (n // 2),
                               "run_growth_gib": [0.2 + 0.05 * i for i in range(n)]})  # fmt: skip
        memory["total_gib"] = memory[["weights_gib", "kv_cache_gib", "run_growth_gib"]].sum(axis=1)
        fig = memory_figure(memory)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg's, without a display
        ax, key = fig.axes[0], fig.axes[0].get_legend()
        assert key is not None
        legend = key.get_window_extent(renderer)
        totals = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(totals) == n and not any(t.overlaps(legend) for t in totals), configs
        assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1 and legend.y1 <= fig.bbox.y1, legend


def test_the_text_report_says_so_when_hta_read_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its heading said "Read by HolisticTraceAnalysis:" above traces HTA had not read.
    read = format_decode_traces(decode_trace_report(read_traces({"a100": GPU_TRACE}), "read"))
    assert read.startswith("Read by HolisticTraceAnalysis:"), read
    monkeypatch.setitem(sys.modules, "hta.trace_analysis", None)  # as on the GPU image
    unread = format_decode_traces(decode_trace_report(read_traces({"a100": GPU_TRACE}), "unread"))
    assert "read by holistictraceanalysis" not in unread.lower(), unread
    assert unread.startswith("HolisticTraceAnalysis read none of these traces") and NO_HTA_NOTE in unread


def test_trace_names_each_stage_on_stderr_as_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tiny_tts: ChatterboxTTS,
) -> None:  # fmt: skip
    """(before 2026-12-06: nothing on stderr until the report: the command silences upstream's bars)"""
    from contextlib import contextmanager

    from tts_workbench.interface import commands

    @contextmanager
    def voiced(*_a: Any, **_k: Any) -> Any:
        yield tiny_tts  # built and voiced once per session

    monkeypatch.setattr(commands, "voiced_model", voiced)
    args = ["trace", "--steps", "eager,static", "--tokens", "3", "--text", "Hi.", "--logdir", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    taken = [line for line in lines if line.startswith("trace:")]
    read = [line for line in lines if line.startswith("read:")]
    assert taken and "6/6" in taken[-1] and read and "2/2" in read[-1], err[-2000:]
    stages = [f"{step} step: {what}" for step in ("eager", "static")
              for what in ("warm-up", "profiled run", "cutting t3.decode")]  # fmt: skip
    shown = [err.find(f", {name}]") for name in [*stages, "reading eager", "reading static"]]
    assert -1 not in shown and shown == sorted(shown), err[-2000:]
    # called from a notebook (upstream's bars off, as notebook_setup has them) they write nothing:
    # a saved notebook's output stays as it was
    with upstream_bars_off():
        read_traces(decode_traces(tiny_tts, ["eager"], tmp_path / "quiet", tokens=3, text="Hi."))
    assert capsys.readouterr().err == ""
