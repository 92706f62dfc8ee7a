"""Device traces read by HolisticTraceAnalysis (HTA), PyTorch's own reader of GPU traces.

A trace written by ``profiling.profile_run`` on a GPU holds, beside the host's operators, every
kernel the device ran, CUDA-graph replays included, each tied to the host call that launched it
by a correlation id. HTA turns that into the numbers that say whether a step is host-bound: the
share of the device's time it sat idle (temporal breakdown), the idle time split into waiting
for the host and gaps between kernels (idle breakdown). Read from the trace here: which
kernels took the time (per call, which HTA's kernel breakdown gets wrong for the kernels it
keeps beside its ``others``; HTA's kernel types), how long each launch took on the host against
on the device (launch statistics, CUDA-graph replays included, which HTA's own leave out) and
which fused attention kernels ran (by the device kernels' names:
``attention.device_attention_kernel``).

``region_trace`` cuts a trace down to one phase region (``t3.decode``: from the first decode
step's start to the last one's end, so without the prefill, and without S3Gen when the trace
holds one one-shot generation; a stream's S3Gen calls between decode blocks stay in) and writes
it as a trace of its own, small enough to keep; HTA
then reads the region as a whole trace. ``analyze`` reads one trace file into DataFrames with
units in the column names (``TraceReport``); ``compare`` puts the headline
numbers of several side by side. A trace without device activity gets no frames and a note:
on a CPU-only profile, what HTA cannot show there; where the trace lists a GPU (torch lists every
GPU it sees, used or not), the GPU's name and, as the trace says where its model ran
(``profiling.MODEL_DEVICE_KEY``), to profile a CPU model on CUDA, or for a CUDA model whose
kernels the profiler did not record, what to check. HTA reads each trace without its
CUDA syncs (``cuda_sync`` events: the host waiting, which HTA 0.5.0 counts as device time) and
its ``ProfilerStep#N`` ranges (``prof.step()``'s, of which HTA 0.5.0 drops the last), and with its
times to the ns (HTA 0.5.0 rounds them to whole µs: ``HTA_NS_ROUNDING_OFF``).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import ConfigError, TraceError
from .attention import device_attention_kernel
from .profiling import MODEL_DEVICE_KEY, TRACE_FILE_ASKED, read_trace

# Trace event categories of work on the device (Kineto's names).
DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
# Host events that launch device work and carry its correlation id.
LAUNCH_CATEGORIES = frozenset({"cuda_runtime", "cuda_driver"})
# A host's wait for the device (Stream Sync, Context Sync, Event Sync): on a stream in the trace,
# but not work the device did.
SYNC_CATEGORY = "cuda_sync"

CPU_ONLY_NOTE = (
    "no device activity in this trace (a CPU-only profile): HTA's temporal, idle and kernel "
    "breakdowns and its launch statistics are all read from device kernels and their launches, "
    "so none of them exists here; the host's operator times are in `tts-workbench profile`'s "
    "ops.csv (profiling.op_frame)"
)

# The notes on a trace that lists a GPU (torch lists every GPU it sees, used or not) but holds no
# device activity, by where the trace says its model ran (``profiling.MODEL_DEVICE_KEY``).
_LISTED = "no device activity recorded on {device}, which the trace lists"
_MISSED = (
    "the profiler kept none of its kernels, copies or memsets (profile with ProfilerActivity.CUDA, "
    "and check that torch.profiler has CUPTI: a warning at the profile's start says when it has not)"
)
_NO_BREAKDOWNS = (
    "HTA's temporal, idle and kernel breakdowns and its launch statistics are all read from device "
    "kernels, so none of them exists here"
)
NO_KERNELS_NOTE = f"{_LISTED}: {_MISSED}; {_NO_BREAKDOWNS}"  # the model ran on CUDA
CPU_MODEL_NOTE = (
    f"{_LISTED} (torch lists every GPU it sees, used or not): the model ran on the CPU: profile with "
    f"--device cuda; {_NO_BREAKDOWNS}"
)
# A trace that does not say where its model ran (another tool's, or written before 2026-12-06).
NO_KERNELS_OR_CPU_MODEL_NOTE = f"{_LISTED}: {_MISSED}, or the model ran on the CPU; {_NO_BREAKDOWNS}"

NO_HTA_NOTE = (
    "HolisticTraceAnalysis is not installed in this Python: the trace is kept unread; read it with "
    "`tts-workbench trace --read PATH` where it is (pip install -r requirements.lock)"
)


# The fields read from each kind of event (Kineto's categories), here and by HTA, and their types.
_TIMED: dict[str, type | tuple[type, ...]] = {"name": str, "ts": (int, float), "dur": (int, float)}
_READ = {
    **dict.fromkeys(DEVICE_CATEGORIES | LAUNCH_CATEGORIES, {**_TIMED, "args": dict}),
    "user_annotation": _TIMED,  # profiler ranges
}


def _flaw(e: Any) -> str | None:
    """What trace event ``e`` lacks of what is read from it, in words; None when nothing."""
    if not isinstance(e, dict):
        return f"is {json.dumps(e)[:40]}, not an object"
    if not isinstance(e.get("cat", ""), str):
        return f"has a category {json.dumps(e['cat'])[:40]}, not a name"
    lacks = [k for k, kind in _READ.get(e.get("cat", ""), {}).items() if not isinstance(e.get(k), kind)]
    # HTA drops a device event without its stream, then fails on a trace of such events (IndexError).
    if e.get("cat") in DEVICE_CATEGORIES and isinstance(args := e.get("args"), dict) and "stream" not in args:
        lacks.append("args.stream")
    return f"({e['cat']}) has no {', '.join(lacks)}" if lacks else None


def read_checked_trace(path: str | Path) -> dict[str, Any]:
    """``read_trace``, with a ``TraceError`` naming ``path`` when an event is not an object, or a
    device event, a launch or a profiler range lacks a field read from it."""
    trace = read_trace(path)
    for i, e in enumerate(trace["traceEvents"]):
        if flaw := _flaw(e):
            raise TraceError(
                f"{path} is not a trace as torch.profiler writes one: event {i} {flaw}; {TRACE_FILE_ASKED}"
            )
    return trace


def device_events(trace: Mapping[str, Any]) -> int:
    """How many device events (kernels, copies, memsets) a trace holds."""
    return sum(1 for e in trace["traceEvents"] if e.get("cat") in DEVICE_CATEGORIES)


def region_trace(path: str | Path, region: str, out: str | Path, occurrences: int | None = None) -> Path:
    """Write the part of trace ``path`` inside the profiler ranges named ``region`` to ``out``.

    The window runs from the start of the first range to the end of the last (of the first
    ``occurrences`` ranges, if given: a trace small enough to keep). Kept: the host events inside
    the window, the device work launched from inside it (matched by correlation id, so a kernel
    that ran after the window's host end still counts), their launch arrows, and the trace's
    metadata. A ``TraceError`` if the file is not a trace or no range is named ``region``.
    """
    return _write(cut_region(read_checked_trace(path), region, occurrences, path), out)


def _is_range(event: Any, region: str) -> bool:
    """Whether trace event ``event`` is a profiler range named ``region``."""
    return (
        isinstance(event, dict)
        and event.get("ph") == "X"
        and event.get("cat") == "user_annotation"
        and event.get("name") == region
    )


def has_region(trace: Mapping[str, Any], region: str) -> bool:
    """Whether ``trace`` holds a profiler range named ``region`` (what ``region_trace`` cuts)."""
    return any(_is_range(e, region) for e in trace["traceEvents"])


def _ranges(
    trace: Mapping[str, Any], region: str, occurrences: int | None, path: str | Path
) -> list[Mapping[str, Any]]:
    """The profiler ranges named ``region``, in time order, none nested in another (the first
    ``occurrences``); a ``TraceError`` when there is none."""
    named = (e for e in trace["traceEvents"] if _is_range(e, region))
    ranges: list[Mapping[str, Any]] = []
    for e in sorted(named, key=lambda e: (e["ts"], -e["dur"])):
        if not ranges or e["ts"] + e["dur"] > ranges[-1]["ts"] + ranges[-1]["dur"]:
            ranges.append(e)  # not nested in the one before (the phase hooks nest t3.decode ranges)
    if occurrences is not None and occurrences < 1:
        raise ConfigError(f"occurrences must be at least 1 (or None: all of them), got {occurrences}")
    ranges = ranges[:occurrences]
    if not ranges:
        raise TraceError(
            f"no profiler range named {region!r} in {path}: profile the work with its ranges "
            "(profiling.phase_regions; decode_blocks names each decode step t3.decode itself)"
        )
    return ranges


def events_within(
    trace: Mapping[str, Any], region: str, path: str | Path = "the trace"
) -> list[dict[str, Any]]:
    """The host events inside one of ``region``'s ranges (not between two of them, where a cut
    keeps everything: in a ``decode_blocks`` trace sampling runs between the steps)."""
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in _ranges(trace, region, None, path)]
    return [
        e
        for e in trace["traceEvents"]
        if e.get("ph") == "X"
        and e.get("cat") not in DEVICE_CATEGORIES
        and any(a <= e["ts"] and e["ts"] + e.get("dur", 0) <= b for a, b in spans)
    ]


def cut_region(
    trace: dict[str, Any], region: str, occurrences: int | None = None, path: str | Path = "the trace"
) -> dict[str, Any]:
    """``region_trace`` on a trace already read (``path``: its name, for the error)."""
    events = trace["traceEvents"]
    ranges = _ranges(trace, region, occurrences, path)
    start, end = ranges[0]["ts"], max(e["ts"] + e["dur"] for e in ranges)

    def inside(e: Mapping[str, Any]) -> bool:
        return bool(start <= e["ts"] and e["ts"] + e.get("dur", 0) <= end)

    launched = {
        e["args"]["correlation"]
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {}) and inside(e)
    }
    kept = []
    for e in events:
        if e.get("ph") == "M":
            kept.append(e)
        elif e.get("cat") in DEVICE_CATEGORIES or e.get("cat") == "ac2g":
            if e.get("args", {}).get("correlation", e.get("id")) in launched:
                kept.append(e)
        elif "ts" in e and e.get("cat") != "gpu_user_annotation" and inside(e):
            kept.append(e)
    return {**trace, "traceEvents": kept}


def _write(trace: Mapping[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(trace).encode()
    # gzip's fastest level: a cut is written once per profile, and level 9 costs seconds on a big one
    out.write_bytes(gzip.compress(data, compresslevel=1) if out.name.endswith(".gz") else data)
    return out


@dataclass
class TraceReport:
    """HTA's analyses of one trace (all times in microseconds, as the trace's own).

    - ``temporal``: one row, ``idle_us``, ``compute_us``, ``non_compute_us`` (copies, memsets)
      and their ``_pct`` of the device's busy-or-idle span, from its first kernel, copy or
      memset to its last (CUDA syncs left out: ``SYNC_CATEGORY``);
    - ``idle``: per CUDA stream, idle time by cause: ``host_wait`` (the host had not launched the
      next kernel yet), ``kernel_wait`` (short gaps between back-to-back kernels), ``other``;
    - ``kernels``: every device kernel, copy and memset by name, most time first (``kernel_times``:
      read from the trace, not HTA's breakdown), ``kernel_type`` (HTA's: COMPUTATION, MEMORY,
      COMMUNICATION, OTHER), ``calls``, ``sum_us``, ``mean_us``, ``max_us`` (per call),
      ``share_pct`` (of all device time);
    - ``launches``: one row per launch, CUDA-graph replays included (``launch_stats``), its
      ``kernels``, ``cpu_us`` (the launch call on the host), ``gpu_us`` (the work on the device)
      and ``launch_delay_us`` (from the call's end to the work's start);
    - ``attention``: the fused attention kernels by name, ``kernel``, ``label`` (flash,
      mem-efficient, cuDNN), ``calls``, ``sum_us``.
    """

    trace: str
    device: str
    note: str = ""
    temporal: pd.DataFrame = field(default_factory=pd.DataFrame)
    idle: pd.DataFrame = field(default_factory=pd.DataFrame)
    kernels: pd.DataFrame = field(default_factory=pd.DataFrame)
    launches: pd.DataFrame = field(default_factory=pd.DataFrame)
    attention: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def analyzed(self) -> bool:
        """Whether HTA read device activity (else ``note`` says why not)."""
        return not self.temporal.empty

    def launch_spread(self) -> pd.DataFrame:
        """How the launches spread: count, mean, quartiles and extremes of the host's launch call
        (``cpu_us``), the device's work (``gpu_us``) and the delay between them, one column each;
        no rows for a trace without device activity (``note`` says why)."""
        columns = ["cpu_us", "gpu_us", "launch_delay_us"]
        return self.launches[columns].describe() if self.analyzed else pd.DataFrame(columns=columns)

    def summary(self) -> dict[str, Any]:
        """The headline numbers: the device's compute, non-compute and idle shares of the span
        from its first to its last kernel, the share of idle time spent waiting for the host (over
        all streams), the launches and their median delay, the share of launches whose device
        work was shorter than the host's launch call (the host-bound signature), and the kernel
        that took most time."""
        if not self.analyzed:
            return {"device": self.device, "note": self.note}
        t = self.temporal.iloc[0]
        idle = self.idle.groupby("idle_category")["idle_us"].sum()  # over the streams
        top = self.kernels.nlargest(1, "sum_us")
        return {
            "device": self.device,
            "span_us": float(t["idle_us"] + t["compute_us"] + t["non_compute_us"]),
            "compute_pct": float(t["compute_pct"]),
            "non_compute_pct": float(t["non_compute_pct"]),
            "idle_pct": float(t["idle_pct"]),
            "idle_host_wait_pct": float(100 * idle.get("host_wait", 0.0) / idle.sum()) if idle.sum() else 0.0,
            "launches": len(self.launches),
            "kernels_per_launch": float(self.launches["kernels"].mean()),
            "median_launch_delay_us": float(self.launches["launch_delay_us"].median()),
            "gpu_shorter_than_launch_pct": float(
                100 * (self.launches["gpu_us"] < self.launches["cpu_us"]).mean()
            ),
            "attention_kernels": sorted(set(self.attention["label"])),
            "top_kernel": str(top["kernel"].iloc[0]) if len(top) else "",
            "top_kernel_share_pct": float(top["share_pct"].iloc[0]) if len(top) else 0.0,
        }


@contextmanager
def _hta_quiet() -> Iterator[None]:
    # HTA logs every parse at INFO and warns that a trace has no ProfilerStep (the workbench
    # profiles generations, not training steps); errors still show.
    log = logging.getLogger("hta")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# HTA 0.5.0 rounds every event of a trace with float timestamps (torch's, to the ns: "ts":
# 5649212617414.744) inward to whole µs as it parses it: start up, end down. Short kernels lost up
# to 1 µs each (50 kernels of 1.6 µs, 0.3 µs apart: 30 µs of compute, not 80), and one inside a
# whole µs got a negative length, on which HTA's temporal breakdown failed an assert. This
# variable, read by its parser, keeps the times as the trace has them.
HTA_NS_ROUNDING_OFF = "HTA_DISABLE_NS_ROUNDING"


@contextmanager
def _hta_exact_times() -> Iterator[None]:
    """Inside: HTA parses traces without rounding their times (``HTA_NS_ROUNDING_OFF``); the
    variable's earlier value is restored after."""
    before = os.environ.get(HTA_NS_ROUNDING_OFF)
    os.environ[HTA_NS_ROUNDING_OFF] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[HTA_NS_ROUNDING_OFF]
        else:
            os.environ[HTA_NS_ROUNDING_OFF] = before


# HTA 0.5.0's name test for a training iteration's range (what ``prof.step()`` writes, e.g.
# ProfilerStep#3): with two or more in a trace it keeps only the device work launched before the
# last one's start (include_last_profiler_step=True: before its end), so the temporal and idle
# breakdowns lost the last step, and a trace whose kernels all ran in it raised IndexError. The
# workbench's steps are chunks of a stream, not iterations to pick from: HTA reads them all.
PROFILER_STEP = "ProfilerStep"


def _left_out_for_hta(e: Mapping[str, Any]) -> bool:
    """Whether HTA reads the trace without event ``e``: a CUDA sync or a profiler step."""
    return e.get("cat") == SYNC_CATEGORY or PROFILER_STEP in str(e.get("name", ""))


@contextmanager
def _copy_for_hta(trace: Mapping[str, Any], path: Path) -> Iterator[Path]:
    """``path``, or where ``trace`` holds CUDA syncs or profiler steps, a copy of it without them
    (HTA reads files). HTA 0.5.0 counts every event on a stream as device time, so a host's sync
    after the last kernel stretched the span to the sync's end and counted the wait as
    non-compute time; on profiler steps see ``PROFILER_STEP``."""
    if not any(_left_out_for_hta(e) for e in trace["traceEvents"]):
        yield path
        return
    kept = [e for e in trace["traceEvents"] if not _left_out_for_hta(e)]
    with tempfile.TemporaryDirectory(prefix="hta-") as tmp:
        yield _write({**trace, "traceEvents": kept}, Path(tmp) / path.name.removesuffix(".gz"))


def _without_device_activity(trace: Mapping[str, Any], path: str | Path) -> TraceReport:
    """The report on a trace without device events: a CPU-only profile when the trace lists no
    device (torch writes ``deviceProperties: []`` on a machine without a GPU); else, as the trace
    says where its model ran (``MODEL_DEVICE_KEY``), a CPU model beside an unused GPU, a GPU whose
    kernels the profiler did not record, or either when it does not say."""
    if not trace.get("deviceProperties"):
        return TraceReport(str(path), device="cpu only", note=CPU_ONLY_NOTE)
    gpu, ran_on = _device(trace), trace.get(MODEL_DEVICE_KEY)
    if ran_on is None:
        return TraceReport(str(path), gpu, note=NO_KERNELS_OR_CPU_MODEL_NOTE.format(device=gpu))
    if str(ran_on).partition(":")[0] == "cpu":  # "cpu", or "cpu:0" from a torch.device
        return TraceReport(str(path), device="cpu", note=CPU_MODEL_NOTE.format(device=gpu))
    return TraceReport(str(path), gpu, note=NO_KERNELS_NOTE.format(device=gpu))


def _device(trace: Mapping[str, Any]) -> str:
    props = trace.get("deviceProperties") or [{}]
    return str(props[0].get("name", "unknown device"))


def analyze(path: str | Path) -> TraceReport:
    """HTA's temporal and idle breakdowns of one trace file, and read from the trace itself its
    kernels' times, launch statistics and attention kernels."""
    return analyze_trace(read_checked_trace(path), path)


def analyze_trace(trace: Mapping[str, Any], path: str | Path) -> TraceReport:
    """``analyze`` of the trace file at ``path``, already read into ``trace`` (a trace of many MB
    is parsed once by a caller that reads it too)."""
    device = _device(trace)
    if not device_events(trace):
        return _without_device_activity(trace, path)
    try:
        from hta.trace_analysis import TraceAnalysis  # imports plotly and more: only when needed
        from hta.utils.utils import get_kernel_type
    except ImportError as e:  # e.g. a GPU image without it: the trace is kept to read elsewhere
        return TraceReport(str(path), device, note=f"{NO_HTA_NOTE} ({e})")
    path = Path(path).resolve()
    with _hta_quiet(), _hta_exact_times(), _copy_for_hta(trace, path) as read:
        hta = TraceAnalysis(trace_files={0: str(read)}, trace_dir=str(read.parent))
        temporal = hta.get_temporal_breakdown(visualize=False)
        idle, _ = hta.get_idle_time_breakdown(visualize=False)
    temporal = temporal.rename(
        columns={
            "idle_time(us)": "idle_us",
            "compute_time(us)": "compute_us",
            "non_compute_time(us)": "non_compute_us",
            "idle_time_pctg": "idle_pct",
            "compute_time_pctg": "compute_pct",
            "non_compute_time_pctg": "non_compute_pct",
        }
    )[["idle_us", "compute_us", "non_compute_us", "idle_pct", "compute_pct", "non_compute_pct"]]
    idle = idle.rename(columns={"idle_time": "idle_us"})[
        ["stream", "idle_category", "idle_us", "idle_time_ratio"]
    ]
    # Not HTA's kernel breakdown: 0.5.0 folds the names beyond its top 10 into "others" by
    # regrouping the per-name sums, so the mean and max it gives each kernel it kept are its sum.
    kernels = kernel_times(trace)
    kernels.insert(1, "kernel_type", kernels["kernel"].map(get_kernel_type))
    kernels["share_pct"] = 100 * kernels["sum_us"] / kernels["sum_us"].sum()
    return TraceReport(
        str(path), device, "", temporal, idle, kernels, launch_stats(trace), attention_kernels(trace)
    )


def launch_stats(trace: Mapping[str, Any]) -> pd.DataFrame:
    """One row per host call that launched device work: ``launch`` (the call's name),
    ``kernels`` (device events it started), ``cpu_us`` (the call on the host), ``gpu_us`` (its
    device events' time), ``launch_delay_us`` (from the call's end to its first device event).

    HTA's own launch statistics (0.5.0) count ``cudaLaunchKernel`` and copies only, so a CUDA
    graph's replay (``cudaGraphLaunch``, many kernels under one correlation id) and Triton's
    ``cuLaunchKernel`` would be left out: the compiled step would look as if it launched
    almost nothing. Matched here by correlation id, as HTA does."""
    device: dict[int, list[Mapping[str, Any]]] = {}
    for e in trace["traceEvents"]:
        if e.get("cat") in DEVICE_CATEGORIES and "correlation" in e.get("args", {}):
            device.setdefault(e["args"]["correlation"], []).append(e)
    rows = []
    for e in trace["traceEvents"]:
        if e.get("cat") not in LAUNCH_CATEGORIES or not (
            work := device.get(e["args"].get("correlation", -1))
        ):
            continue
        gpu_us, first = sum(w["dur"] for w in work), min(w["ts"] for w in work)
        rows.append(
            (e["args"]["correlation"], e["name"], len(work), e["dur"], gpu_us, first - e["ts"] - e["dur"])
        )
    columns = ["correlation", "launch", "kernels", "cpu_us", "gpu_us", "launch_delay_us"]
    return pd.DataFrame(rows, columns=columns).sort_values("correlation").reset_index(drop=True)


def kernel_times(trace: Mapping[str, Any], categories: frozenset[str] = DEVICE_CATEGORIES) -> pd.DataFrame:
    """The trace's device events of ``categories`` by name (``kernel``): their ``calls``, and
    ``sum_us``, ``mean_us``, ``max_us`` of their durations; most time first."""
    durs = pd.DataFrame(
        [(e["name"], e["dur"]) for e in trace["traceEvents"] if e.get("cat") in categories],
        columns=["kernel", "dur"],
    )
    table = durs.groupby("kernel")["dur"].agg(calls="size", sum_us="sum", mean_us="mean", max_us="max")
    return table.reset_index().sort_values(["sum_us", "kernel"], ascending=[False, True], ignore_index=True)


def attention_kernels(trace: Mapping[str, Any]) -> pd.DataFrame:
    """The trace's device kernels that are fused attention kernels, with their label, number of
    calls and total µs, most time first."""
    table = kernel_times(trace, frozenset({"kernel"}))
    table["label"] = table["kernel"].map(device_attention_kernel)
    return table.dropna(subset="label")[["kernel", "label", "calls", "sum_us"]].reset_index(drop=True)


def analyze_region(
    path: str | Path, region: str, out: str | Path, occurrences: int | None = None
) -> TraceReport:
    """``analyze`` of ``region_trace(path, region, out, occurrences)``."""
    return analyze_cut(cut_region(read_checked_trace(path), region, occurrences, path), out)


def analyze_cut(cut: dict[str, Any], out: str | Path) -> TraceReport:
    """``analyze`` of a ``cut_region``, written to ``out`` first (HTA reads files); without
    device activity, the report that says so (``analyze``'s)."""
    out = _write(cut, out)
    if not device_events(cut):  # read here already: HTA would have nothing to read
        return _without_device_activity(cut, out)
    return analyze(out)


def compare(reports: Mapping[str, TraceReport]) -> pd.DataFrame:
    """The ``summary`` of each report, one row per label (e.g. the decode step that ran)."""
    return pd.DataFrame([{"run": label, **r.summary()} for label, r in reports.items()])
