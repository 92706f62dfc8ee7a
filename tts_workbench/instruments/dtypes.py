"""Dtype flows: which module holds which dtype, what each call receives, where precision breaks.

``census`` lists parameter/buffer dtypes per component and the dtypes of the conditionals.
``trace_dtypes`` hooks every submodule for the duration of a ``with`` block and records, per
call, the module path, the floating dtypes of its inputs, its own weights and its outputs, and
flags mismatches. A module shared by several parents is named by the path it was called
through; ``torch.compile``'d code runs eagerly inside the block (dynamo ignores hooks added
after compiling), so its modules are traced too. Evidence is recorded as it happens, so it
survives a user's own ``try/except`` inside the block: an input/weight mismatch when the call
*starts*, and the failure (the "Input type (FloatTensor) and weight type (HalfTensor) should be
the same" family: the module that raised, the tensors it got) when the module *raises*, whoever
catches it. An exception that leaves the block propagates unchanged, with a note naming the
module.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pandas as pd
import torch
from chatterbox.tts import ChatterboxTTS
from torch import nn

from ..core.compiling import forcing_eager
from ..core.constants import dtype_name
from ..core.errors import ConfigError, error_line
from ..core.families import components
from ..core.patching import transient
from ..core.tables import render


def _short(dtype: torch.dtype | None) -> str:
    return dtype_name(dtype) if dtype is not None else "-"


# ---------------------------------------------------------------- census


@dataclass
class CensusRow:
    """Parameter and buffer dtypes of one module (its whole subtree)."""

    path: str
    param_dtypes: dict[str, int]  # dtype name -> number of elements
    buffer_dtypes: dict[str, int]
    bytes: int


def _count(tensors: Iterator[torch.Tensor]) -> tuple[dict[str, int], int]:
    counts: dict[str, int] = {}
    nbytes = 0
    for t in tensors:
        counts[_short(t.dtype)] = counts.get(_short(t.dtype), 0) + t.numel()
        nbytes += t.numel() * t.element_size()
    return counts, nbytes


@dataclass
class Census:
    """Parameter and buffer dtypes per module of a model (``census``)."""

    rows: list[CensusRow]

    def to_frame(self) -> pd.DataFrame:
        """One row per module: elements per parameter dtype (``params_<dtype>``) and buffer dtype
        (``buffers_<dtype>``), then parameters and buffers together in MiB (``size_mib``)."""
        rows = [
            {"module": r.path, "size_mib": r.bytes / 2**20}
            | {f"params_{k}": v for k, v in r.param_dtypes.items()}
            | {f"buffers_{k}": v for k, v in r.buffer_dtypes.items()}
            for r in self.rows
        ]
        found = {c for row in rows for c in row} - {"module", "size_mib"}
        counts = sorted(found, key=lambda c: (c.startswith("buffers_"), c))
        # Columns named: a census without rows is a table without rows (pandas made one without columns).
        frame = pd.DataFrame(rows, columns=["module", *counts, "size_mib"])
        return frame.fillna(0).astype(dict.fromkeys(counts, int))


def census(tts: ChatterboxTTS, depth: int = 1) -> Census:
    """One row per component and per submodule down to ``depth`` levels below it."""
    rows = []
    for name, comp in components(tts).items():
        for path, module in comp.named_modules(prefix=name):
            if path.count(".") > depth or path.endswith("patched_model"):
                continue
            params, pbytes = _count(module.parameters())
            buffers, bbytes = _count(module.buffers())
            if params or buffers:
                rows.append(CensusRow(path, params, buffers, pbytes + bbytes))
    return Census(rows)


@dataclass
class CondRow:
    """One conditioning tensor: where it lives and in which dtype."""

    name: str
    dtype: str
    device: str
    shape: list[int]


def conditionals_census(tts: ChatterboxTTS) -> list[CondRow]:
    """Dtype and device of every tensor in ``tts.conds`` (T3 and S3Gen conditionals)."""
    if tts.conds is None:
        return []
    items = [(f"conds.t3.{k}", v) for k, v in vars(tts.conds.t3).items()]
    items += [(f"conds.gen.{k}", v) for k, v in tts.conds.gen.items()]
    return [CondRow(n, _short(v.dtype), str(v.device), list(v.shape)) for n, v in items if torch.is_tensor(v)]


# ---------------------------------------------------------------- tracer


@dataclass
class CallRecord:
    """One module call as seen by the tracer."""

    module: str  # dotted path inside the traced root
    kind: str  # module class name
    inputs: list[str]  # floating dtypes of tensor inputs, in order
    weight: str | None  # the module's own floating parameter dtype (None: no own parameters)
    outputs: list[str]
    autocast: str | None  # autocast dtype active during the call
    mismatch: str | None = None  # "input/weight", "upcast" or "autocast"


@dataclass
class Failure:
    """The module that was running when the traced block raised."""

    module: str
    kind: str
    inputs: list[str]
    weight: str | None
    error: str
    where: str  # innermost source line outside torch (the call that raised)

    def __str__(self) -> str:
        return (
            f"{self.module or '(no module running)'} ({self.kind}) raised at {self.where} with inputs "
            f"{self.inputs} and weights {self.weight}: {self.error}"
        )


@dataclass
class DtypeTrace:
    """Everything a ``trace_dtypes`` block saw."""

    records: list[CallRecord] = field(default_factory=list)
    failure: Failure | None = None
    untraced: list[str] = field(default_factory=list)  # TorchScript modules: torch takes no hooks on them
    # Calls were recorded inside torch.compile'd code, which the block ran eagerly: the dtypes are
    # the eager modules', which are the ones its compiled graph computes in.
    forced_eager: bool = False

    @property
    def mismatches(self) -> list[CallRecord]:
        """The recorded calls flagged with a mismatch: input/weight, upcast or autocast."""
        return [r for r in self.records if r.mismatch]

    @property
    def first_mismatch(self) -> CallRecord | Failure | None:
        """The first flagged call, or the failure where no call was flagged (a flagged call comes
        first even if a module raised before it and the block caught that: ``failure`` has it)."""
        found = self.mismatches
        return found[0] if found else self.failure

    def summary(self) -> dict[str, Any]:
        """JSON-friendly digest: calls, mismatches by kind and module, failure, untraced modules,
        whether compiled code ran eagerly."""
        by_module: dict[str, CallRecord] = {}
        for r in self.mismatches:
            by_module.setdefault(r.module, r)
        return {
            "calls": len(self.records),
            "mismatches": [vars(r) for r in by_module.values()],
            "failure": vars(self.failure) if self.failure else None,
            "untraced": self.untraced,
            "forced_eager": self.forced_eager,
        }


def _floating(x: Any) -> list[torch.dtype]:
    if torch.is_tensor(x):
        # An empty tensor holds no value to mismatch: upstream's S3Gen encoder layers pass a
        # float32 ``torch.zeros((0, 0, 0, 0))`` cache default on, whatever the model's dtype.
        return [x.dtype] if x.is_floating_point() and x.numel() > 0 else []
    if isinstance(x, list | tuple):
        return [d for item in x for d in _floating(item)]
    if isinstance(x, dict):
        return [d for item in x.values() for d in _floating(item)]
    return []


def _own_weight_dtype(module: nn.Module) -> torch.dtype | None:
    dtypes = {p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()}
    return next(iter(dtypes)) if len(dtypes) == 1 else (min(dtypes, key=str) if dtypes else None)


def _autocast_dtype() -> torch.dtype | None:
    for dev in ("cpu", "cuda"):
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    return None


def _classify_inputs(
    inputs: list[torch.dtype], weight: torch.dtype | None, autocast: torch.dtype | None
) -> str | None:
    """A mismatch visible when the call starts: inputs in another dtype than the weights."""
    if weight is not None and any(d != weight for d in inputs):
        return "autocast" if autocast is not None else "input/weight"
    return None


def _classify_outputs(
    inputs: list[torch.dtype],
    outputs: list[torch.dtype],
    weight: torch.dtype | None,
    autocast: torch.dtype | None,
) -> tuple[str | None, set[torch.dtype]]:
    """A mismatch visible when the call returns: outputs in another (or a wider) dtype; with the
    output dtypes that make it one."""
    if weight is None:
        # No weights to compare with (HiFT's SineGen, SinusoidalPosEmb): a module that hands on
        # a wider dtype than it got is where the flow widens, not the next module that trips on it.
        widest = max((d.itemsize for d in inputs), default=None)
        wider = {d for d in outputs if widest is not None and d.itemsize > widest}
        return ("autocast" if autocast is not None else "upcast") if wider else None, wider
    if autocast is not None and (other := {d for d in outputs if d != weight}):
        return "autocast", other
    wider = {d for d in outputs if d.itemsize > weight.itemsize}
    return "upcast" if wider else None, wider


def _where(e: BaseException, in_hook: bool) -> str:
    # Inside a hook, the traceback only runs from torch's _call_impl down to the raise: the stack
    # above the hook holds the caller's frames, the source line that made the call. Where the
    # block itself caught it, the traceback covers the block and the stack only its callers.
    frames = list(traceback.extract_tb(e.__traceback__))
    if in_hook:
        frames = traceback.extract_stack()[:-1] + frames
    outside = [f for f in frames if "/torch/" not in f.filename and "/tts_workbench/" not in f.filename]
    f = (outside or frames)[-1]
    return f"{'/'.join(f.filename.split('/')[-3:])}:{f.lineno} {f.name}"


def _roots(target: nn.Module | ChatterboxTTS) -> dict[str, nn.Module]:
    return {"": target} if isinstance(target, nn.Module) else components(target)  # a model of any family


def _module_paths(roots: dict[str, nn.Module]) -> dict[int, tuple[nn.Module, list[str]]]:
    """Every module under ``roots`` (by id, in ``named_modules`` order) with all its dotted paths:
    a module shared by several parents has several. A module inside itself is not entered again."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}

    def walk(module: nn.Module, path: str, above: frozenset[int]) -> None:
        found.setdefault(id(module), (module, []))[1].append(path or "(root)")
        above |= {id(module)}
        for name, child in module._modules.items():
            if child is not None and id(child) not in above:
                walk(child, f"{path}.{name}" if path else name, above)

    for prefix, root in roots.items():
        walk(root, prefix, frozenset())
    return found


def _call_path(paths: list[str], caller: str | None) -> str:
    """The path of a call of a module found at ``paths`` (all of them, in ``named_modules`` order),
    made from the traced call ``caller`` (None: from none): the nearest path below the caller, which
    for a child is its first name in the caller's ``_modules``; else the module's first path."""
    if caller is not None and len(paths) > 1:
        below = [p for p in paths if caller == "(root)" or p.startswith(caller + ".")]
        if below:
            return min(below, key=lambda p: p.count("."))  # the first of the nearest
    return paths[0]


_EVAL_FRAME = "/torch/_dynamo/eval_frame.py"


def _in_compiled_code() -> bool:
    """Whether this thread is inside a ``torch.compile``'d callable (a function, an OptimizedModule,
    a ``Module.compile``'d module): the wrapper dynamo puts around each of them (torch 2.13's
    ``compile_wrapper``) is on the stack."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename.endswith(_EVAL_FRAME):
            return True
        frame = frame.f_back
    return False


class _Calls(threading.local):
    """One thread's calls in progress and its own records: threads that run the same modules at
    once must not pop each other's calls, nor take each other's records for submodules' ones."""

    def __init__(self) -> None:
        # per running call: module, floating inputs, its record, where its submodules' records
        # start in ``records``, the exception its caller was handling when it started
        self.stack: list[tuple[nn.Module, list[torch.dtype], CallRecord, int, BaseException | None]] = []
        self.records: list[CallRecord] = []


@contextmanager
def trace_dtypes(target: nn.Module | ChatterboxTTS) -> Iterator[DtypeTrace]:
    """Record dtype flow through every submodule of ``target`` while inside the block.

    Module paths are dotted paths inside ``target`` (prefixed by ``ve``/``t3``/``s3gen`` when
    ``target`` is a ChatterboxTTS), the one a shared module was called through. All hooks are
    removed on exit, also on error. TorchScript modules take no hooks: they are left out and
    listed in ``trace.untraced``. Compiled code runs eagerly in the block (``trace.forced_eager``
    when traced calls were made in it); the caller's compile stance is back on exit.
    """
    trace = DtypeTrace()
    calls = _Calls()
    lock = threading.Lock()  # trace.records and trace.failure are the threads' together
    handles = []
    # Every exception recorded so far with its failure (trace.failure: the last), so that a module
    # an exception passes through after another thread's failure does not take it for a new one,
    # and the note names the escaping exception's own failure. Keyed by id: an exception may be
    # unhashable (a dataclass one); it is held in the value, so its id stays its own.
    recorded: dict[int, tuple[BaseException, Failure]] = {}

    def fail(path: str, module: nn.Module | None, inputs: list[torch.dtype], e: BaseException) -> Failure:
        weight = None
        if module is not None:
            weight = _own_weight_dtype(module) or next(
                (p.dtype for p in module.parameters() if p.is_floating_point()), None
            )
        failure = Failure(
            path,
            type(module).__name__ if module is not None else "-",
            [_short(d) for d in inputs],
            _short(weight) if weight else None,
            error_line(e),
            _where(e, in_hook=module is not None),  # module: None only outside any module call
        )
        with lock:
            recorded[id(e)] = (e, failure)
            trace.failure = failure
        return failure

    def pre(paths: list[str]):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs = _floating(args) + _floating(kwargs)
            weight = _own_weight_dtype(module)
            ac = _autocast_dtype()
            if not trace.forced_eager and _in_compiled_code():  # a stack walk: only until one is found
                trace.forced_eager = True
            record = CallRecord(
                # named through the traced call that made it: a shared module has one hook for all
                module=_call_path(paths, calls.stack[-1][2].module if calls.stack else None),
                kind=type(module).__name__,
                inputs=[_short(d) for d in inputs],
                weight=_short(weight) if weight else None,
                outputs=[],
                autocast=_short(ac) if ac else None,
                mismatch=_classify_inputs(inputs, weight, ac),
            )
            with lock:
                trace.records.append(record)  # at call start: kept even if the call never returns
            calls.records.append(record)
            # The exception handled now (by a caller's except block) is not one this call raised.
            calls.stack.append((module, inputs, record, len(calls.records), sys.exc_info()[1]))

        return hook

    def post():
        # always_call: torch runs this hook also when forward raised (output is then None and
        # the exception is the one being handled), so the innermost raising module is caught
        # here even when the user's code catches the exception inside the block.
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not calls.stack or calls.stack[-1][0] is not module:
                return  # our pre-hook never ran (a pre-hook ahead of it raised): nothing to pop
            _, inputs, record, inner, handled = calls.stack.pop()
            raised = sys.exc_info()[1]
            weight = _own_weight_dtype(module)
            # A container that hands its inputs on to a flagged submodule, or a flagged
            # submodule's outputs on to its caller, is not where the dtypes change, weights of its
            # own or not (VoiceEncoder's similarity_weight, unused in this call).
            flagged = [r for r in calls.records[inner:] if r.mismatch]
            met = {d for r in flagged for d in r.inputs}
            if record.mismatch and {_short(d) for d in inputs if d != weight} <= met:
                record.mismatch = None
            if output is None and raised is not None and raised is not handled:
                if id(raised) not in recorded:  # the innermost module this exception passed through
                    fail(record.module, module, inputs, raised)
                return
            outputs = _floating(output)
            record.outputs = [_short(d) for d in outputs]
            found, changed = _classify_outputs(inputs, outputs, weight, _autocast_dtype())
            if found and {_short(d) for d in changed} <= {d for r in flagged for d in r.outputs}:
                found = None
            record.mismatch = record.mismatch or found

        return hook

    try:  # the hooks registered so far come off also when registering one fails
        for module, paths in _module_paths(_roots(target)).values():
            if isinstance(module, torch.jit.ScriptModule):  # skipped, not fatal: the rest is traced
                trace.untraced.append(paths[0])
                continue
            # prepend: run ahead of the module's own pre-hooks, so one of them raising still
            # finds our entry on the stack for the always_call post-hook to pop.
            # transient: a copy made in the block (a decode copy, a fused one) does not keep them
            before, after = transient(pre(paths)), transient(post())
            handles.append(module.register_forward_pre_hook(before, prepend=True, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
        # Dynamo ignores module hooks added after compiling (skip_nnmodule_hook_guards): compiled
        # code called in the block would run past them, unrecorded.
        with forcing_eager():
            try:
                yield trace
            except Exception as e:
                # The failure of this exception, not the last one recorded (a kept error raised after
                # another failure named that one); an error raised anew from a module's (``raise ...
                # from e``) keeps that module (before 2026-12-04 it named none); raised outside any
                # module call (e.g. a feature extractor): recorded now, with no module.
                own = next((recorded[id(c)][1] for c in _chain(e) if id(c) in recorded), None)
                e.add_note(f"dtype trace: {own or fail('', None, [], e)}")
                raise
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- scenarios on the real model

# The CAMPPlus advice, ``{}`` taking the reason where the failing part is known. Upstream casts the
# 16 kHz wav to S3Gen's dtype before the encoder (s3gen.py:152, embed_ref): a float32 encoder alone
# still hands its fbank a float16 wav (before 2026-12-05 the advice said only to keep it float32).
_CAMPPLUS = (
    "keep the CAMPPlus speaker encoder (s3gen.speaker_encoder) in float32 and cast the wav it gets to "
    "float32 (upstream casts it to S3Gen's dtype){}; runtime.precision's s3gen.speaker_encoder island "
    "(install_islands) does both"
)

# The HiFT advice, ``{}`` taking the reason where the failing part is known. A float32 sine source
# alone hands its float32 sines on to HiFT's half-precision convolutions (source_downs): before
# 2026-12-06 the advice said to keep only the source module in float32.
_HIFT = (
    "keep all of HiFT (s3gen.mel2wav) in float32 and cast the mel it gets to float32{}; "
    "runtime.precision's s3gen.mel2wav island (install_islands) does both"
)

# Where upstream's half-precision paths break, and what to do about it. Keys are substrings of
# the failing module path or source location found by the tracer; checked in order.
ADVICE = [
    # The float32 generation before a cast leaves a float32 prompt embedding cached on the
    # conditionals (before 2026-12-06 the advice named only the first two: T3 then failed in its
    # perceiver).
    (
        "cond_enc",
        "cast the conditionals' speaker_emb and emotion_adv to T3's dtype and set their "
        "cond_prompt_speech_emb to None (a cache of an earlier generation's dtype, remade in T3's); "
        "tts.conds = runtime.precision.ensure_conditionals_dtype(...) does all three",
    ),
    (
        "m_source",
        _HIFT.format(
            ": its sine source makes float32 sines, and a float32 source module alone hands them on "
            "to HiFT's half-precision convolutions"
        ),
    ),
    # torch.complex takes float16 on CPU (complex32) but refuses bfloat16; the CPU FFT behind
    # torch.istft refuses float16 ("MKL FFT doesn't support tensors of type: Half").
    (
        "_istft",
        "run HiFT's iSTFT in float32: torch.complex has no bfloat16 kernel and the CPU FFT none for float16",
    ),
    # Before "mel", which the vocoder's path s3gen.mel2wav also contains.
    ("s3gen.mel2wav.", _HIFT.format("")),
    ("kaldi", _CAMPPLUS.format(": its kaldi fbank has no half-precision (float16/bfloat16) kernel")),
    ("xvector", _CAMPPLUS.format("")),
    ("s3tokenizer", "keep the S3 speech tokenizer (log-mel front-end) in float32"),
    # Under autocast the VE runs (LSTM included, on float32 inputs and weights) but its embedding
    # comes out bfloat16, and upstream's .numpy() of it raises "unsupported ScalarType BFloat16".
    (
        "embeds_from_mels",
        "cast the VoiceEncoder's output to float32 before upstream's .numpy() (numpy has no bfloat16), "
        "or leave the VoiceEncoder out of autocast",
    ),
    ("ve.", "keep the VoiceEncoder in float32 and out of autocast: upstream feeds it float32 mels"),
    ("voice_encoder", "keep the VoiceEncoder in float32 and out of autocast: upstream feeds it float32 mels"),
    ("mel", "compute mel spectrograms in float32 and cast the result"),
]


# Weights in a half dtype other than autocast's (float16 under bfloat16): autocast computes its
# float32 ops (norms) in float32 and the rest in its own dtype, so a module's weights meet inputs in
# another dtype whatever is cast before it (before 2026-12-06 T3's perceiver norm was given the
# conditionals advice, which cannot help there).
_UNDER_AUTOCAST = (
    "{weight} weights under {autocast} autocast fit neither dtype it computes in (float32 for norms, "
    "{autocast} elsewhere): keep the weights float32 under autocast, which casts them op by op"
)


def advice_for(failure: Failure | CallRecord | None, autocast: torch.dtype | None = None) -> str | None:
    """One sentence saying how to fix ``failure`` (None when there is nothing to fix), which ran
    under ``autocast`` to that dtype (None: none)."""
    if failure is None:
        return None
    if autocast is not None and failure.weight not in (None, "float32", _short(autocast)):
        return _UNDER_AUTOCAST.format(weight=failure.weight, autocast=_short(autocast))
    where = failure.module + " " + getattr(failure, "where", "")
    for key, text in ADVICE:
        if key in where:
            return text
    return "cast the input to the module's weight dtype at this boundary, or keep the module in float32"


@contextmanager
def autocast_or_refuse(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` that raises ValueError when the device does not support ``dtype``
    (torch only warns and silently disables autocast)."""
    if dtype is None:
        yield
        return
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = torch.autocast(device_type=torch.device(device).type, dtype=dtype)
        ctx.__enter__()
    try:
        if any("isabling autocast" in str(w.message) for w in caught) or not ctx._enabled:
            raise ConfigError(
                f"autocast to {_short(dtype)} is not supported on {device}: use another --autocast"
            )
        yield
    finally:
        ctx.__exit__(None, None, None)


def format_census(census: Census) -> str:
    """A census as a table: module, elements per parameter and buffer dtype, MiB."""
    return render(census.to_frame())


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or during (``__cause__``, ``__context__``)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return chain
