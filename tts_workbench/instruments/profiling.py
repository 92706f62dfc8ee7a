"""torch.profiler helpers: phase-labelled regions on the real modules, traces written for
TensorBoard and Perfetto, the op frame every profile table is derived from, and a TensorBoard
server.

``phase_regions`` opens a ``record_function`` range named by phase around each call of the
methods that make up a phase, so every profiler event can be attributed to its phase; inside
T3's inference every op is in one of T3's phases, split as ``generation.t3_timed`` times them
(sampling in ``t3.decode``, the speech head by its positions).
``op_frame`` turns a profile's events into one DataFrame, one row per aten op (phase, op,
attention kernel, dtype, shapes, self and total ms), from ``op_events`` (the CPU events and
their nesting, read from the profiler's own records: torch's ``prof.events()`` builds a Python
object of some forty fields per event, 2.1 s for the 23k events of a tiny model's 3-token
generation, against 0.6 s for these and the frame together); the attention kernels
(``attention.KernelRecord``), the time share per phase and category (``time_share``) and the
top operators (``top_ops``) are all read from it.
"""

from __future__ import annotations

import atexit
import gzip
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd
import torch
from chatterbox.tts import ChatterboxTTS
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function
from torch.autograd.profiler_util import FunctionEvent, _filter_name
from torch.profiler import ProfilerActivity, tensorboard_trace_handler

from ..core.errors import ConfigError, TraceError
from ..core.patching import around
from ..core.ports import bind_error, free_port

PHASES = ("conditioning", "t3.conditioning", "t3.prefill", "t3.decode", "s3gen.flow", "s3gen.vocoder")


def _phase_methods(tts: ChatterboxTTS) -> list[tuple[object, str, str]]:
    """The methods of a fixed phase, with it."""
    # Methods, not module hooks: upstream calls `flow.inference`, `mel2wav.inference`,
    # `tokenizer.forward` directly, which module hooks never see.
    s3 = tts.s3gen
    return [
        (tts.ve, "embeds_from_wavs", "conditioning"),
        (s3.tokenizer, "forward", "conditioning"),
        (s3.speaker_encoder, "inference", "conditioning"),
        (tts.t3.cond_enc, "forward", "t3.conditioning"),
        (s3.flow, "inference", "s3gen.flow"),
        (s3.mel2wav, "inference", "s3gen.vocoder"),
    ]


def _t3_calls(tts: ChatterboxTTS, extra_t3s: Sequence[Any]) -> list[tuple[object, str, bool]]:
    """T3's calls phased by their new positions (``t3_phase``), as ``generation.t3_timed`` does:
    the transformers and the speech heads (True: their logits are what the decode samples
    from), T3's own and those of ``extra_t3s`` (decode copies in another dtype: anything with a
    ``tfmr`` and a ``speech_head``, such as ``decode.T3Parts``)."""
    calls: list[tuple[object, str, bool]] = []
    for part in (tts.t3, *extra_t3s):
        for module, head in ((part.tfmr, False), (part.speech_head, True)):
            if all(module is not m for m, _, _ in calls):  # a copy may share a module with T3
                calls.append((module, "forward", head))
    return calls


# The T3 methods upstream generate calls (families.Family.t3_inference), inside which every op
# is in one of T3's phases.
T3_INFERENCES = ("inference", "inference_turbo")


class _T3Phases(threading.local):
    """The phase range open inside this thread's T3 inference call: ``t3.conditioning`` from its
    start, ``t3.prefill`` from its first call over more than one new position, ``t3.decode`` from
    the end of the prefill (the head's logits over the prefill, or the first one-position call
    after it) to its end. Between T3's calls upstream embeds, samples (softmax, sort,
    multinomial) and moves tensors: those ops land in the phase around them."""

    def __init__(self) -> None:
        self.open: record_function | None = None  # None: outside an inference
        self.phase = ""

    def switch(self, phase: str) -> None:
        if self.open is None or self.phase == phase:
            return
        self.open.__exit__(None, None, None)
        self.open, self.phase = record_function(phase), phase
        self.open.__enter__()

    @contextmanager
    def inference(self) -> Iterator[None]:
        if self.open is not None:  # already inside one (a method calling the other): its phases go on
            yield
            return
        self.open, self.phase = record_function("t3.conditioning"), "t3.conditioning"
        self.open.__enter__()
        try:
            yield
        finally:
            self.open.__exit__(None, None, None)
            self.open, self.phase = None, ""

    @contextmanager
    def call(self, phase: str, head: bool) -> Iterator[None]:
        self.switch(phase)  # the phase range first, then the call's own inside it: they nest
        with record_function(phase):
            yield
        if head:
            self.switch("t3.decode")  # what follows the logits is sampling


@contextmanager
def phase_regions(tts: ChatterboxTTS, extra_t3s: Sequence[Any] = ()) -> Iterator[None]:
    """Wrap every call of the phase methods in a profiler range named by its phase; inside T3's
    inference (``T3_INFERENCES``) every op is in a T3 phase, as ``generation.t3_timed`` splits
    them (see ``_T3Phases``). The methods are put back on exit."""
    t3 = _T3Phases()

    def fixed(label: str) -> Callable[[tuple[Any, ...], dict[str, Any]], record_function]:
        return lambda args, kwargs: record_function(label)

    def by_positions(head: bool) -> Callable[[tuple[Any, ...], dict[str, Any]], AbstractContextManager[None]]:
        return lambda args, kwargs: t3.call(t3_phase(args, kwargs), head)

    with ExitStack() as stack:
        for obj, method, label in _phase_methods(tts):
            stack.enter_context(around(obj, method, fixed(label)))
        for obj, method, head in _t3_calls(tts, extra_t3s):
            stack.enter_context(around(obj, method, by_positions(head)))
        for method in T3_INFERENCES:
            stack.enter_context(around(tts.t3, method, lambda args, kwargs: t3.inference()))
        yield


def t3_phase(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``t3.prefill`` for a transformer (or speech head) call over more than one new position,
    else ``t3.decode``."""
    x = kwargs.get("inputs_embeds", args[0] if args else None)
    return "t3.prefill" if x is not None and x.shape[1] > 1 else "t3.decode"


@dataclass(eq=False)
class OpEvent:
    """What the op frame reads of one CPU event (``FunctionEvent``'s names), times in us."""

    name: str
    input_shapes: list[Any]
    input_dtypes: list[str]
    start_us: float
    end_us: float
    thread: int
    cpu_parent: OpEvent | None = None
    cpu_children: list[OpEvent] = field(default_factory=list)

    @property
    def cpu_time_total(self) -> float:
        """Microseconds from the op's start to its end, its children included."""
        return self.end_us - self.start_us

    @property
    def self_cpu_time_total(self) -> float:
        """Microseconds of the op less its children's."""
        return self.cpu_time_total - sum(c.cpu_time_total for c in self.cpu_children)


Event = FunctionEvent | OpEvent


def op_events(prof: torch.profiler.profile) -> list[OpEvent]:
    """The CPU events of a finished profile, nested as torch nests them for ``prof.events()``
    (its ``_parse_kineto_results`` and ``_build_tree``: the same names filtered out, a runtime
    event moved to the thread of the op it serves, a child in its parent's interval on one
    thread, a parent's only child of the same name merged into it), without the rest of each
    ``FunctionEvent``. Events that start and end on different threads are left out (torch
    keeps them outside its nesting, as rows of no phase; a generation here has none)."""
    result = prof.profiler.kineto_results if prof.profiler else None
    if result is None:
        return []
    start = result.trace_start_ns()
    events: list[OpEvent] = []
    ops: dict[int, OpEvent] = {}  # by correlation id
    served: list[tuple[int, OpEvent]] = []  # (the op's correlation id, a runtime event of it)
    for k in result.events():
        if _filter_name(k.name()) or getattr(k, "is_hidden_event", lambda: False)():
            continue
        if k.device_type() != DeviceType.CPU or k.is_async() or k.start_thread_id() != k.end_thread_id():
            continue
        times = ((k.start_ns() - start) / 1e3, (k.end_ns() - start) / 1e3)
        e = OpEvent(k.name(), k.shapes(), k.dtypes(), *times, k.start_thread_id())
        if k.linked_correlation_id() > 0:
            served.append((k.linked_correlation_id(), e))
        else:
            ops[k.correlation_id()] = e
        events.append(e)
    for op, e in served:
        if op in ops:
            e.thread = ops[op].thread
    for _, thread in itertools.groupby(sorted(events, key=lambda e: e.thread), key=lambda e: e.thread):
        open_: list[OpEvent] = []  # each inside the ones below it
        for e in sorted(thread, key=lambda e: (e.start_us, -e.end_us)):
            while open_ and (e.start_us >= open_[-1].end_us or e.end_us > open_[-1].end_us):
                open_.pop()
            if open_:
                e.cpu_parent = open_[-1]
                open_[-1].cpu_children.append(e)
            open_.append(e)
    while merged := {id(e) for e in events if e.cpu_parent and e.cpu_parent.name == e.name
                     and len(e.cpu_parent.cpu_children) == 1}:  # fmt: skip
        for e in events:
            if id(e) in merged and e.cpu_parent:
                e.cpu_parent.cpu_children = e.cpu_children
                for child in e.cpu_children:
                    child.cpu_parent = e.cpu_parent
        events = [e for e in events if id(e) not in merged]
    return sorted(events, key=lambda e: (e.start_us, -e.end_us))


def region_of(event: Event) -> str:
    """The innermost phase range enclosing ``event`` (``other`` when none)."""
    return next((e.name for e in (event, *ancestors(event)) if e.name in PHASES), "other")


def ancestors(event: Event) -> Iterator[Event]:
    """The host events ``event`` ran inside, innermost first."""
    e = event.cpu_parent
    while e is not None:
        yield e
        e = e.cpu_parent


# ---------------------------------------------------------------- traces on disk


def activities(device: str | torch.device) -> list[ProfilerActivity]:
    """What torch.profiler records of a model on ``device``: the CPU, and CUDA for a CUDA model.
    A CPU model on a GPU machine gets no CUDA activity: there is no kernel of its to record."""
    cuda = torch.device(device).type == "cuda"
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


# The top-level key of every trace ``profile_run`` writes: the device its model ran on ("cpu",
# "cuda", ...). torch lists every GPU it sees in a trace's ``deviceProperties``, used or not, so
# without it a CPU model's trace on a GPU machine reads as a GPU whose kernels were missed.
MODEL_DEVICE_KEY = "workbench_device"


@contextmanager
def profile_run(
    tts: ChatterboxTTS,
    logdir: str | Path = "runs/profile",
    run: str = "generation",
    memory: bool = False,
    schedule: Callable[[int], Any] | None = None,
    phases: bool = True,
) -> Iterator[torch.profiler.profile]:
    """Profile the block with phase regions; the trace goes to ``logdir/run/`` in the format
    TensorBoard's PyTorch Profiler plugin reads (it is also a Chrome/Perfetto trace).

    ``phases=False`` leaves the model's methods alone: a compiled step guards on the functions
    it traced, so the phase hooks would make it compile again (``decode.decode_blocks`` labels
    its steps ``t3.decode`` itself).

    With a ``schedule`` (see ``long_run_schedule``) call ``prof.step()`` per iteration, e.g. per
    streamed chunk with ``profiled_chunks``.

    The run folder is made, and emptied of an earlier profile, before anything runs (``run_folder``).
    The trace records the device the model ran on (``MODEL_DEVICE_KEY``), and holds CUDA activity
    for a model on CUDA only (``activities``).
    """
    run_dir = run_folder(logdir, run)
    prof = torch.profiler.profile(
        activities=activities(tts.device),
        record_shapes=True,
        profile_memory=memory,
        schedule=schedule,
        on_trace_ready=tensorboard_trace_handler(str(run_dir), worker_name="workbench"),
    )
    # Preset, not added: torch adds it as each trace starts (add_metadata_json while a schedule
    # waits is dropped, the profiler not started yet).
    prof.preset_metadata_json(MODEL_DEVICE_KEY, json.dumps(str(tts.device)))
    with prof, phase_regions(tts) if phases else nullcontext():
        yield prof


# What the workbench writes beside a run's trace: its op frame (``write_ops``) and the cut of its
# decode region (``profile`` and ``trace`` write it with ``trace_analysis``).
OPS_FILE = "ops.csv"
DECODE_CUT = "t3.decode.json.gz"


def run_folder(logdir: str | Path, run: str) -> Path:
    """``logdir/run``, made now and holding no trace: an ``OSError`` naming it if it cannot be
    made (a ``logdir`` that is a file) comes before anything is profiled, not from torch's trace
    handler once the whole run is done. A run folder holds one profile: the traces an earlier run
    of that name left are removed (TensorBoard would load them all and show them as one run's
    spans), and so are its ``OPS_FILE`` and ``DECODE_CUT`` (a run that failed after its trace
    would leave them beside it, read as its own); other files are kept."""
    run_dir = Path(logdir) / run
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in [*trace_files(run_dir), run_dir / OPS_FILE, run_dir / DECODE_CUT]:
        old.unlink(missing_ok=True)
    return run_dir


def long_run_schedule(wait: int = 1, warmup: int = 1, active: int = 3) -> Callable[[int], Any]:
    """Skip ``wait`` steps, warm up ``warmup``, record ``active``: a trace of a long stream stays small."""
    return torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)


def profiled_chunks(chunks: Iterator[Any], prof: torch.profiler.profile | None = None) -> Iterator[Any]:
    """Label the work behind each request for a streamed chunk ``stream.next[i]`` (and step the
    profiler after each chunk). ``stream.next[i]`` holds the work behind chunk ``i``; a stream
    of ``n`` chunks has one more, ``stream.next[n]``: its end, the work after its last chunk
    (T3 blocks that gave no audio, closing)."""
    # Named by request, not by chunk: torch fixes a range's name when it opens, before anyone
    # can know whether the request brings a chunk or the end (``stream.chunk[n]`` named a chunk
    # that never came).
    for i in itertools.count():
        with record_function(f"stream.next[{i}]"):
            item = next(chunks, None)
        if item is None:
            return
        yield item
        if prof is not None:
            prof.step()


def trace_files(run_dir: str | Path) -> list[Path]:
    """The trace files a run wrote, newest last."""
    return sorted(Path(run_dir).glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)


# What to give instead, in every error about a file that is not a trace.
TRACE_FILE_ASKED = "give a .json or .json.gz file written by torch.profiler (profile, trace)"


def read_trace(path: str | Path) -> dict[str, Any]:
    """A Chrome/Kineto trace file (``.json`` or ``.json.gz``) as written by torch.profiler; a
    ``TraceError`` naming the file if it is not one."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            trace = json.load(f)
    # gzip's BadGzipFile is an OSError; a .gz cut short (an interrupted copy) ends in an EOFError,
    # one with damaged bytes in a zlib.error (before 2026-12-05 both were tracebacks)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__  # its name alone: "error"
        why = f"{kind}: {e}"
        raise TraceError(f"{path} is not a readable trace ({why}): {TRACE_FILE_ASKED}") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise TraceError(
            f"{path} is JSON but not a Chrome/Kineto trace (no traceEvents list): {TRACE_FILE_ASKED}"
        )
    return trace


# ---------------------------------------------------------------- the op frame

# Attention kernels by the aten op that shows each in a profile: under each
# ``aten::scaled_dot_product_attention`` a child op names the fused kernel (none of them: the
# math fallback); a 4-D ``aten::softmax`` outside any SDPA op is eager attention.
SDPA = "aten::scaled_dot_product_attention"
FUSED_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash (CUDA)",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient (CUDA)",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN (CUDA)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
}
MATH = "math (SDPA fallback)"
EAGER = "eager (matmul + softmax)"
KERNEL_OPS = {label: op for op, label in FUSED_KERNELS.items()} | {
    MATH: "aten::_scaled_dot_product_attention_math",
    EAGER: "aten::softmax",
}
LINEAR_OPS = {f"aten::{op}" for op in ("addmm", "mm", "bmm", "linear", "matmul", "baddbmm")}

# The profiler records each input's C++ type (gcc's names); the op frame uses torch's dtype names.
# c10's own types not listed here are torch's name capitalized (c10::BFloat16, c10::Float8_e5m2).
_CPP_DTYPES = {
    "float": "float32", "double": "float64", "c10::Half": "float16", "bool": "bool",
    "signed char": "int8", "short int": "int16", "int": "int32", "long int": "int64",
    "unsigned char": "uint8", "short unsigned int": "uint16", "unsigned int": "uint32",
    "long unsigned int": "uint64", "c10::complex<c10::Half>": "complex32",
    "c10::complex<float>": "complex64", "c10::complex<double>": "complex128",
}  # fmt: skip


def _torch_dtype_name(cpp: str) -> str:
    """torch's name of a dtype as the profiler records it; "" for an input that is no tensor
    (``Scalar``, ``ScalarList``, ``TensorList``, ...)."""
    if cpp in _CPP_DTYPES:
        return _CPP_DTYPES[cpp]
    return cpp.removeprefix("c10::").lower() if cpp.startswith("c10::") else ""


# Column types of the op frame: phases in pipeline order, so every table derived from it is too.
OP_COLUMNS: dict[str, Any] = {
    "phase": pd.CategoricalDtype([*PHASES, "other"], ordered=True),
    "op": str,
    "category": pd.CategoricalDtype(["attention", "linear/matmul", "other"], ordered=True),
    "kernel": str,
    "dtype": str,
    "input_shapes": str,
    "self_ms": float,
    "total_ms": float,
}


def _scores_softmax(e: Event) -> bool:
    """A softmax over 4-D attention scores (batch, heads, queries, keys), not sampling's over
    the vocabulary."""
    shapes: Sequence[Any] = e.input_shapes or []  # one shape per input (torch annotates ints)
    return "softmax" in e.name and bool(shapes) and len(shapes[0]) == 4


def _in_sdpa(e: Event) -> bool:
    """Whether an SDPA op encloses ``e`` (one of its kernel's or its math fallback's ops)."""
    return any(a.name == SDPA for a in ancestors(e))


def _kernel(e: Event) -> str:
    """The attention kernel an op event stands for ("" for any other op)."""
    if e.name == SDPA:
        if any(c.name == SDPA for c in e.cpu_children):
            return ""  # an autocast wrapper around the real call
        return next((FUSED_KERNELS[c.name] for c in e.cpu_children if c.name in FUSED_KERNELS), MATH)
    if e.name == "aten::softmax" and _scores_softmax(e):
        return "" if _in_sdpa(e) else EAGER
    return ""


def _eager_matmuls(events: Sequence[Event]) -> set[int]:
    """The ids of eager attention's matmuls: beside a softmax over 4-D scores (under the same
    parent op or region), an ``aten::matmul`` whose product has the scores' batch, heads and
    queries (QK^T, a relative-position term beside it, and scores times V). The scale and mask
    between them stay ``other``: matched by shape alone, the rotary ops on Q would join them
    whenever the keys happen to number the head size."""
    scores: dict[int, set[tuple[int, ...]]] = {}
    for e in events:
        if e.name == "aten::softmax" and _scores_softmax(e) and not _in_sdpa(e):
            scored: Sequence[Any] = e.input_shapes  # one shape per input (torch annotates ints)
            scores.setdefault(id(e.cpu_parent), set()).add(tuple(scored[0][:3]))
    found = set()
    for e in events:
        shapes: Sequence[Any] = e.input_shapes or []
        if e.name != "aten::matmul" or len(shapes) < 2 or not len(shapes[0]) == len(shapes[1]) == 4:
            continue
        try:  # the product's batch and heads, as matmul broadcasts them
            rows = (*torch.broadcast_shapes(tuple(shapes[0][:2]), tuple(shapes[1][:2])), shapes[0][2])
        except RuntimeError:
            continue
        if rows in scores.get(id(e.cpu_parent), ()):
            found.add(id(e))
    return found


def _category(e: Event, eager_matmuls: set[int]) -> str:
    """attention, linear/matmul or other; every op under an SDPA op is attention (the math
    fallback's bmm, mul, where, ... are the attention's time), and so is every op of eager
    attention's matmuls (``_eager_matmuls``: without them eager attention counted its softmax
    alone, 28% of its time, where the math fallback counts the same work whole)."""
    if "scaled_dot_product" in e.name or _scores_softmax(e) or _in_sdpa(e):
        return "attention"
    if any(id(a) in eager_matmuls for a in (e, *ancestors(e))):
        return "attention"
    return "linear/matmul" if e.name in LINEAR_OPS else "other"


def op_frame(events: Iterable[Event]) -> pd.DataFrame:
    """One row per aten op event of a profile taken under ``phase_regions`` (``op_events(prof)``,
    or torch's ``prof.events()``: the same frame, but that torch 2.11's events, on the GPU image,
    have no dtypes).

    Columns: ``phase`` (innermost phase region, ``other`` outside them), ``op``, ``category``
    (attention: SDPA ops, the ops under them, softmaxes over 4-D scores and eager attention's
    matmuls; linear/matmul; other),
    ``kernel`` (the attention kernel of an attention call, else ""), ``dtype`` (torch's name of the
    first input's dtype; "" where that is no tensor or torch does not record it), ``input_shapes``
    (JSON), ``self_ms`` (self CPU time: the op without the ops it called) and ``total_ms``
    (inclusive CPU time: the op and everything it called). Sum ``self_ms`` to add up op time;
    ``total_ms`` of nested ops overlaps.
    """
    events = list(events)
    eager_matmuls = _eager_matmuls(events)
    rows = []
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        # FunctionEvent.input_dtypes is newer than torch 2.11 (the GPU image's); op_events reads
        # the profiler's dtypes there too.
        dtypes = getattr(e, "input_dtypes", None)
        rows.append(
            (
                region_of(e),
                e.name,
                _category(e, eager_matmuls),
                _kernel(e),
                _torch_dtype_name(dtypes[0]) if dtypes else "",
                json.dumps(e.input_shapes or []),
                e.self_cpu_time_total / 1e3,
                e.cpu_time_total / 1e3,
            )
        )
    return pd.DataFrame(rows, columns=list(OP_COLUMNS)).astype(OP_COLUMNS)


def write_ops(ops: pd.DataFrame, run_dir: str | Path) -> Path:
    """Save an op frame as ``run_dir/ops.csv`` (``OPS_FILE``), beside the run's trace."""
    path = Path(run_dir) / OPS_FILE
    ops.to_csv(path, index=False)
    return path


def read_ops(path: str | Path) -> pd.DataFrame:
    """An op frame saved by ``write_ops``, with its column types (no trace JSON parsed again)."""
    return pd.read_csv(path, dtype=OP_COLUMNS, keep_default_na=False)


def time_share(ops: pd.DataFrame) -> pd.DataFrame:
    """Self CPU milliseconds per phase and category (``phase, category, self_ms``): the
    categories of a phase add up to that phase's op time."""
    share = ops.groupby(["phase", "category"], observed=False)["self_ms"].sum().reset_index()
    return share[share["phase"].isin(ops["phase"])].reset_index(drop=True)


def top_ops(ops: pd.DataFrame, by: str = "total_ms", top: int = 8) -> pd.DataFrame:
    """The ``top`` operators of each phase by ``by`` (``self_ms`` or ``total_ms``), with their
    calls and both times summed over the calls (``phase, op, calls, self_ms, total_ms``)."""
    table = (
        ops.groupby(["phase", "op"], observed=True)
        .agg(calls=("self_ms", "size"), self_ms=("self_ms", "sum"), total_ms=("total_ms", "sum"))
        .reset_index()
        .sort_values(["phase", by], ascending=[True, False])
    )
    return table.groupby("phase", observed=True).head(top).reset_index(drop=True)


# ---------------------------------------------------------------- TensorBoard


@dataclass
class Server:
    """A local server this process started (``start_server``); ``stop()`` ends it by its pid."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        """SIGTERM by pid; if it has not exited within 30 s, SIGKILL to its process group."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# Requests to the servers started here (127.0.0.1) go straight to them: urlopen's default opener
# would send them to the http_proxy of the environment, which cannot reach this machine's loopback.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_port_free(url: str) -> None:
    """A ``ConfigError`` saying what to do if the port of ``url`` already answers (another server
    listens there) or cannot be bound on its host; nothing if a server may start there."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    with socket.socket() as probe:
        probe.settimeout(2)
        answers = probe.connect_ex((host, port)) == 0
    if answers:
        raise ConfigError(
            f"another server already answers on port {port}: stop it or give another port "
            "(start_tensorboard picks a free one when port is None)"
        )
    if (error := bind_error(host, port)) is not None:
        raise ConfigError(
            f"port {port} on {host} cannot be bound ({error.strerror or error}): give another port "
            "(start_tensorboard picks a free one when port is None)"
        )


def start_server(
    cmd: Sequence[str],
    url: str,
    log: IO[bytes],
    ready: str = "",
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start ``cmd`` in its own process group (with ``env``, default this process's environment),
    its output to ``log`` (a file, not a pipe: a pipe nobody reads fills up and stalls the
    server); return once ``url + ready`` answers and the server is still running. A port that
    another server answers on, or that cannot be bound, is refused before anything starts
    (``check_port_free``). A server that exits (``RuntimeError``) or does not answer within
    ``timeout`` (stopped, ``TimeoutError``) is an error that shows the end of its output."""
    check_port_free(url)
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    server = Server(process, url)
    # Stopped when this process exits too: a notebook whose cells failed before its stop() cell
    # would otherwise leave the server running after its kernel is gone (its own session).
    atexit.register(server.stop)
    name = " ".join(cmd[:3])  # e.g. "python -m tensorboard.main"

    def output() -> str:
        """The end of what the server wrote to ``log``."""
        log.seek(0)
        return log.read().decode(errors="replace")[-2000:] or "(nothing)"

    def exited() -> RuntimeError:
        return RuntimeError(f"{name} exited with code {server.process.returncode}: {output()}")

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise exited()
        try:
            _LOOPBACK.open(url + ready, timeout=2).close()
        except OSError:
            time.sleep(0.5)
            continue
        # The answer may have come from a process that took the port meanwhile (this server then
        # failed to bind and exits): only a server still running has started.
        if server.process.poll() is not None:
            raise exited()
        return server
    server.stop()
    raise TimeoutError(
        f"{name} did not answer on {url + ready} within {timeout:.0f} s (stopped): give a longer timeout "
        f"if it was still starting, else see why in its output: {output()}"
    )


@dataclass
class TensorBoard(Server):
    """A TensorBoard server this process started, with the PyTorch Profiler plugin's API."""

    logdir: Path

    def profiler(self, route: str, **params: str) -> Any:
        """GET a route of the PyTorch Profiler plugin's JSON API."""
        query = urllib.parse.urlencode(params)
        with _LOOPBACK.open(f"{self.url}/data/plugin/pytorch_profiler/{route}?{query}", timeout=30) as r:
            return json.load(r)

    def wait_for_run(self, run: str, timeout: float = 120.0) -> None:
        """Poll until the plugin lists ``run`` and has finished loading (it rescans every ~10 s),
        at least once whatever ``timeout``. A request that fails counts as not listed yet: a
        server busy loading traces may not answer in time."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                runs = self.profiler("runs")
            except OSError as e:
                last = f"no answer: {e}"
            else:
                if run in runs["runs"] and not runs["loading"]:
                    return
                last = f"runs: {runs}"
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"TensorBoard did not list run {run!r} within {timeout:.0f} s ({last}): give a longer "
                    f"timeout, or check that it runs at {self.url} and {self.logdir / run} holds a trace"
                )
            time.sleep(1.0)

    def iframe(self, height: int = 800) -> Any:
        """Show the PyTorch Profiler tab inside a notebook."""
        from IPython.display import IFrame

        return IFrame(f"{self.url}/#pytorch_profiler", width="100%", height=height)


def start_tensorboard(logdir: str | Path, port: int | None = None, timeout: float = 60.0) -> TensorBoard:
    """Start ``tensorboard --logdir`` on 127.0.0.1 and ``port`` (None: a free one); returns once
    it answers. A ``ConfigError`` if another server answers on ``port`` or it cannot be bound."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--reload_interval",
        "5",
    ]
    server = start_server(cmd, url, tempfile.TemporaryFile(), timeout=timeout)
    return TensorBoard(server.process, server.url, Path(logdir))
