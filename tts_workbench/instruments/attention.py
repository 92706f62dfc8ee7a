"""Attention backends: which implementation T3 is configured with, which kernel actually ran,
why Flash was refused, and how much of the time attention takes at all.

Kernels are identified by the aten op that executed, read from a torch.profiler profile
(``profiling.op_frame`` names the kernel of each attention call: Flash, mem-efficient, cuDNN,
the CPU flash kernel, the math fallback or eager softmax). Each call is labelled with the phase
it ran in.

A compiled graph hides its ops from the profiler's per-op recording (and on CUDA a graph replay
records no op at all), so for compiled code the kernel is read from what Inductor generated
(``compiled_with_code``, ``compiled_attention``): the attention op its code calls, or none when
Inductor decomposed attention into matmuls and a softmax it generated itself. On CUDA the
device kernels themselves, replayed from a graph or not, keep their names in a trace
(``device_attention_kernel``; ``trace_analysis`` reads them).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pandas as pd
import torch
import torch.nn.functional as F
import transformers
from chatterbox.tts import ChatterboxTTS
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile

from ..core.constants import dtype_name
from ..core.families import family_of, kv_layout
from ..core.patching import capture_hooks_undone, shared
from .profiling import EAGER, FUSED_KERNELS, activities, op_events, op_frame, phase_regions, time_share


@dataclass
class KernelRecord:
    """Attention kernels seen during a recorded block, per phase, read from the block's op frame
    (``profiling.op_frame``)."""

    ops: pd.DataFrame = field(default_factory=lambda: op_frame([]))

    def to_frame(self) -> pd.DataFrame:
        """One row per attention call (the op frame's rows with a kernel)."""
        return self.ops[self.ops["kernel"] != ""].reset_index(drop=True)

    def by_phase(self, with_dtype: bool = False) -> dict[str, dict[str, int]]:
        """``{phase: {kernel: count}}`` (kernel as ``"flash (CPU) [bfloat16]"`` with dtype, where
        the frame has dtypes: not one of torch 2.11's ``prof.events()``); decode steps pooled under
        ``t3.decode``."""
        calls = self.to_frame()
        labels = calls["kernel"]
        if with_dtype:
            labels = labels + calls["dtype"].map(lambda d: f" [{d}]" if d else "")
        return {str(p): dict(Counter(k)) for p, k in labels.groupby(calls["phase"], observed=True)}

    def kernels(self, phase_prefix: str = "t3") -> set[str]:
        """The attention kernels seen in the phases whose names start with ``phase_prefix``."""
        calls = self.to_frame()
        return set(calls["kernel"][calls["phase"].astype(str).str.startswith(phase_prefix)])

    @property
    def share(self) -> pd.DataFrame:
        """Self CPU ms per phase and operator category (``profiling.time_share``)."""
        return time_share(self.ops)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly: ``kernels`` (counts per phase) and ``time_share_ms`` (``{phase:
        {category: self ms}}``)."""
        share = self.share.pivot(index="phase", columns="category", values="self_ms").round(2)
        return {
            "kernels": self.by_phase(),
            "time_share_ms": {str(p): r for p, r in share.to_dict("index").items()},
        }


@contextmanager
def record_kernels(tts: ChatterboxTTS, extra_t3s: Sequence[Any] = ()) -> Iterator[KernelRecord]:
    """Record the attention kernel of every attention call inside the block, by phase
    (``t3.conditioning``, ``t3.prefill``, ``t3.decode``, ``s3gen.flow``, ``conditioning``, ...);
    ``extra_t3s``: T3 decode copies in another dtype (``decode.T3Parts``), labelled as T3 is.

    The record is filled when the block exits.
    """
    record = KernelRecord()
    prof = profile(activities=activities(tts.device), record_shapes=True)
    ran = False  # a profiler that could not start has no events: its own error goes up alone
    try:
        with prof, phase_regions(tts, extra_t3s):
            ran = True
            yield record
    finally:  # also when the block raised: the kernels that ran before the error count
        if ran:
            record.ops = op_frame(op_events(prof))


# ---------------------------------------------------------------- configuration and probes


@dataclass
class OutputAttentionsProbe:
    """What the installed transformers does when T3 asks for attentions with its backend."""

    configured: str
    transformers: str
    kernels_with: list[str]  # kernels seen with output_attentions=True
    kernels_without: list[str]
    attentions_returned: bool  # False: the attention weights came back empty/None
    log: list[str]  # what transformers logged about it
    verdict: str


# Inductor's own kernels when its code calls no attention op: it decomposed SDPA.
INDUCTOR_DECOMPOSED = "decomposed by Inductor (its own matmul + softmax kernels)"
NO_CODE_CAPTURED = "no compiled code captured"


def compiled_attention(code: Sequence[str]) -> list[str]:
    """The attention kernels (the profiler's labels) that Inductor's generated ``code`` calls,
    each once, in the order first called; ``[INDUCTOR_DECOMPOSED]`` when it calls none,
    ``[NO_CODE_CAPTURED]`` when there is no code to read. Python wrappers call
    ``aten.OP.default(``, C++ wrappers ``aoti_torch_DEVICE_OP(``."""
    text = "\n".join(code)
    if not text.strip():
        return [NO_CODE_CAPTURED]
    calls = {
        call: label
        for op, label in FUSED_KERNELS.items()
        for name in [op.removeprefix("aten::")]
        for call in (f"aten.{name}.default(", f"aoti_torch_cpu_{name}(", f"aoti_torch_cuda_{name}(")
    }
    first: dict[str, int] = {}
    for call, label in calls.items():
        if call in text:
            first[label] = min(first.get(label, len(text)), text.find(call))
    return sorted(first, key=first.__getitem__) or [INDUCTOR_DECOMPOSED]


def device_attention_kernel(name: str) -> str | None:
    """The fused attention kernel (the labels of ``FUSED_KERNELS``) a device kernel's name
    belongs to, or None: cuDNN's SDPA kernels (their names may also say "flash"), the
    mem-efficient kernels (CUTLASS FMHA), then the Flash kernels."""
    n = name.lower()
    if n.startswith("triton_"):  # Inductor's own kernels, named after the op whose inputs they prepare
        return None
    if "cudnn" in n and any(k in n for k in ("sdpa", "fmha", "flash")):
        return FUSED_KERNELS["aten::_scaled_dot_product_cudnn_attention"]
    if any(k in n for k in ("fmha_cutlass", "memeffattention", "efficient_attention")):
        return FUSED_KERNELS["aten::_scaled_dot_product_efficient_attention"]
    if "flash" in n:
        return FUSED_KERNELS["aten::_scaled_dot_product_flash_attention"]
    return None


_code_sinks = threading.local()  # this thread's list of generated code, inside compiled_with_code


def _saving_code(original: Callable[[str], None] | None) -> Callable[[str], None]:
    """Inductor's output-code hook while a ``compiled_with_code`` runs in any thread: the code goes
    to the list of the thread that compiled it (Inductor compiles in the caller's thread), and to
    a hook already there."""

    def save(code: str) -> None:
        sink = getattr(_code_sinks, "code", None)
        if sink is not None:
            sink.append(code)
        if original is not None:
            original(code)

    return save


def compiled_with_code(fn: Any, *args: Any) -> tuple[Any, list[str]]:
    """Call a ``torch.compile``d ``fn`` for the first time: its result and the source code
    Inductor generated for it in this thread. As ``torch._inductor.utils.run_and_get_code``,
    without its ``torch._dynamo.reset()`` (that drops every graph compiled so far in the process,
    so each warm-up through it made the previous shapes compile again at their first real call),
    and without its patch of the whole class: a compile in another thread meanwhile (the engine's
    flow build beside its T3 build) went into this call's code, and overlapping calls left the
    patch in place (before 2026-12-04)."""
    from torch._inductor.graph import GraphLowering

    code: list[str] = []
    outer = getattr(_code_sinks, "code", None)  # a call nested in this thread gets its own list
    _code_sinks.code = code
    try:
        with shared(GraphLowering, "save_output_code", _saving_code):
            result = fn(*args)
    finally:
        _code_sinks.code = outer
    return result, code


def configured_backend(tts: ChatterboxTTS) -> str:
    """The backbone's ``attn_implementation`` as configured."""
    return str(tts.t3.tfmr.config._attn_implementation)


# What T3's decode step runs instead of the SDPA it is configured for (``eager_instead``).
ANALYZER_SWITCH = "eager during each generation: the alignment analyzer"
RECORDED_EAGER = "eager in the recorded decode step"


def runs_alignment_analyzer(tts: ChatterboxTTS, step: str) -> bool:
    """Whether T3's decode ``step`` ("eager", "static" or "compiled") runs upstream's alignment
    analyzer: a Multilingual model's eager step. The analyzer reads attention weights, so it
    switches an SDPA backbone to eager attention for each generation and back after (upstream's
    ``AlignmentStreamAnalyzer``; ``runtime.alignment`` does the same): the configuration read
    afterwards says sdpa. The static and compiled steps decode without it."""
    return step == "eager" and bool(tts.t3.hp.is_multilingual)


def eager_instead(tts: ChatterboxTTS, step: str, kernels: Sequence[str] | None = None) -> str | None:
    """What T3's decode ``step`` runs instead of the SDPA its backbone is configured for
    (``ANALYZER_SWITCH`` or ``RECORDED_EAGER``), or None where it runs SDPA or is configured for
    another backend. ``kernels``: the step's recorded attention kernels, where known
    (``diagnose.decode_step_kernels``): what ran, preferred to what the model and step imply."""
    if configured_backend(tts) != "sdpa":
        return None
    analyzer = runs_alignment_analyzer(tts, step)
    if not (analyzer if kernels is None else set(kernels) == {EAGER}):
        return None
    return ANALYZER_SWITCH if analyzer else RECORDED_EAGER


def probe_output_attentions(tts: ChatterboxTTS, seq: int = 8, step: str = "eager") -> OutputAttentionsProbe:
    """Run the T3 backbone once with and once without ``output_attentions`` and report which
    kernel ran each time. Determined by running, not from version tables. The capture hooks
    transformers installs on the backbone for the first call are taken off again. ``step``: the
    decode step the verdict is for (one that runs the alignment analyzer asks for the weights)."""
    tfmr = tts.t3.tfmr
    p = next(tfmr.parameters())
    # its own generator: the caller's global random state (a later unseeded generate) stays
    draws = torch.Generator(p.device).manual_seed(0)
    x = torch.randn(1, seq, tfmr.config.hidden_size, dtype=p.dtype, device=p.device, generator=draws)
    logs: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            logs.append(rec.getMessage())

    hf_log = logging.getLogger("transformers")
    seen: dict[bool, KernelRecord] = {}
    out_attn = None
    # While the probe runs, transformers' warnings reach its catcher alone, whatever verbosity
    # the caller set (the notebooks and the command line keep errors only) and without printing;
    # and its warning_once (lru_cached) stays silent once anything showed the warning (upstream's
    # generate asks for attentions): plain warnings for the probe, that cache untouched.
    level = hf_log.level
    with (
        mock.patch.object(hf_log, "handlers", [_Catch()]),
        mock.patch.object(logging.Logger, "warning_once", logging.Logger.warning),
        capture_hooks_undone(tfmr),
    ):
        hf_log.setLevel(logging.WARNING)  # (setLevel, not the attribute: it clears logging's caches)
        try:
            for flag in (True, False):
                with torch.inference_mode(), record_kernels(tts) as rec:
                    out = tfmr(inputs_embeds=x, output_attentions=flag, use_cache=False)
                seen[flag] = rec
                if flag:
                    out_attn = out.attentions
        finally:
            hf_log.setLevel(level)
    returned = bool(out_attn) and all(a is not None and a.numel() > 0 for a in out_attn or ())
    with_k, without_k = sorted(seen[True].kernels()), sorted(seen[False].kernels())
    configured = configured_backend(tts)
    if configured == "eager":
        verdict = "the backbone is configured for eager attention: no fused kernel can run"
    elif EAGER in with_k:
        verdict = (
            f"output_attentions=True makes transformers {transformers.__version__} fall back "
            "from sdpa to eager attention (slow path)"
        )
    elif not returned:
        verdict = (
            f"transformers {transformers.__version__} keeps sdpa with output_attentions=True "
            "and returns no attention weights: "
            + (
                "upstream's alignment analyzer, which reads them, switches T3 to eager attention "
                "for each generation"
                if runs_alignment_analyzer(tts, step)
                else "the flag costs nothing but is useless"
            )
        )
    else:
        verdict = "sdpa ran and attention weights were returned"
    return OutputAttentionsProbe(
        configured, transformers.__version__, with_k, without_k, returned, sorted(set(logs)), verdict
    )


def _sdpa_inputs(tts: ChatterboxTTS, keys: int, dtype: torch.dtype | None, device: str | None):
    cfg = tts.t3.tfmr.config
    p = next(tts.t3.parameters())
    dtype = dtype or p.dtype
    dev = torch.device(device) if device else p.device
    kv_heads, head_dim = kv_layout(cfg)
    batch = family_of(tts).rows  # Turbo has no guidance batch
    # Zeros, not random: whether a kernel can run does not depend on the values, and drawing
    # them would move the caller's global random state (a later unseeded generate).
    q = torch.zeros(batch, cfg.num_attention_heads, 1, head_dim, dtype=dtype, device=dev)
    k = torch.zeros(batch, kv_heads, keys, head_dim, dtype=dtype, device=dev)
    return q, k, k.clone()


def _step_mask(q: torch.Tensor, keys: int, step: str) -> torch.Tensor | None:
    """The boolean mask ``step`` passes over ``keys`` slots (every slot in use), or None: the
    static and compiled steps mask their cache's slots past the positions in use; upstream's
    eager step passes none."""
    return None if step == "eager" else q.new_ones(q.size(0), 1, 1, keys, dtype=torch.bool)  # on q's device


def _torch_flash_refusals(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> list[str]:
    """torch's reasons for refusing CUDA Flash on these inputs, all of them (empty: it runs).
    ``can_use_flash_attention`` checks its rules in order and names only the first that fails
    (the mask, then a head dim over 256, ..., then the dtype), so it is asked again with each of
    these causes taken away in that order, until it accepts or none is left."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    # Each step keeps the earlier ones' removals. A refusal of the inputs with fewer causes is
    # one of the original inputs too: 256-wide float16 heads and no mask are what Flash takes.
    asked = [(q, k, v, mask)]
    if mask is not None:
        asked.append((q, k, v, None))
    if q.shape[-1] > 256:
        q, k, v = (t[..., :256] for t in (q, k, v))
        asked.append((q, k, v, None))
    if q.dtype not in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.float16) for t in (q, k, v))
        asked.append((q, k, v, None))
    reasons: list[str] = []
    for inputs in asked:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = can_use_flash_attention(SDPAParams(*inputs, 0.0, False, False), debug=True)
        if ok:
            break
        said = [str(w.message).splitlines()[0] for w in caught] or ["refused (no reason given)"]
        reasons = list(dict.fromkeys(reasons + said))  # a cause no step takes away is named again
    return reasons


def why_not_flash(
    tts: ChatterboxTTS,
    keys: int = 200,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    step: str = "eager",
    kernels: Sequence[str] | None = None,
) -> list[str]:
    """Reasons a fused Flash kernel is refused for T3's decode ``step`` ("eager", "static" or
    "compiled"; empty: Flash can run). The static and compiled steps pass an attention mask;
    a Multilingual model's eager step runs eager attention (``eager_instead``; ``kernels``: the
    step's recorded attention kernels, where known, preferred to the configuration).

    On CUDA the reasons come from ``torch.backends.cuda.can_use_flash_attention(debug=True)``
    (``_torch_flash_refusals``: every rule refused, not only the first); elsewhere from the same
    rules written out.
    """
    q, k, v = _sdpa_inputs(tts, keys, dtype, device)
    mask = _step_mask(q, keys, step)
    reasons = []
    backend = configured_backend(tts)
    instead = eager_instead(tts, step, kernels)
    if backend != "sdpa":
        reasons.append(f"attn_implementation is {backend!r}: SDPA is never called")
    elif instead == ANALYZER_SWITCH:
        reasons.append(
            "upstream's alignment analyzer switches T3 to eager attention for each generation (it "
            "reads attention weights): SDPA, and so Flash, is never called; the static or compiled "
            "step runs without the analyzer (but its tokens can differ from upstream's, and it never "
            "forces the stop token)"
        )
    elif instead == RECORDED_EAGER:
        reasons.append("the decode step's recorded kernels are eager attention: SDPA is never called")
    if q.device.type == "cuda":
        return reasons + _torch_flash_refusals(q, k, v, mask)
    # the CPU's own fused kernel, where SDPA runs at all (not beside "SDPA is never called")
    cpu_kernel = " (CPU runs its own fused kernel, _scaled_dot_product_flash_attention_for_cpu)"
    reasons.append(
        f"device is {q.device.type}: the CUDA Flash kernel needs an NVIDIA GPU"
        + (cpu_kernel if q.device.type == "cpu" and backend == "sdpa" and instead is None else "")
    )
    if q.dtype not in (torch.float16, torch.bfloat16):  # (before 2026-12-06: float64 gave no reason)
        reasons.append(f"dtype is {dtype_name(q.dtype)}: CUDA Flash needs float16 or bfloat16")
    if q.shape[-1] > 256:  # (torch's check_head_dim_size_flash: no multiple of 8 asked for dense inputs)
        reasons.append(f"head dim {q.shape[-1]} is over the 256 CUDA Flash takes")
    if mask is not None:
        reasons.append(
            "an attention mask is passed (the static cache's unused slots): CUDA Flash takes none "
            "(the CPU kernel takes it)"
        )
    return reasons


@dataclass
class BackendProbe:
    """Whether SDPA ran with only ``backend`` allowed, on T3's decode shapes; why not if it did not."""

    backend: str
    ok: bool
    reason: str


def probe_backends(
    tts: ChatterboxTTS,
    keys: int = 200,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    step: str = "eager",
) -> list[BackendProbe]:
    """Force each SDPA backend alone with ``torch.nn.attention.sdpa_kernel`` on T3's decode
    shapes (with the mask ``step`` passes, as ``why_not_flash``) and report pass/fail. (The seed's
    ``torch.backends.cuda.sdp_kernel`` is deprecated and silently falls back; ``sdpa_kernel``
    with one backend raises instead.)"""
    q, k, v = _sdpa_inputs(tts, keys, dtype, device)
    mask = _step_mask(q, keys, step)
    out = []
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.append(BackendProbe(backend.name, True, "ran"))
        except RuntimeError as e:
            out.append(BackendProbe(backend.name, False, str(e).splitlines()[0]))
    return out
