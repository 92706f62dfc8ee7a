"""Attention backend: configured vs effective, kernels by phase, why not Flash, forced backends."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from torch._dynamo.utils import counters
from transformers.utils import logging as hf_logging
from transformers.utils.logging import warning_once

from conftest import pretend_cuda, voiced
from tts_workbench.instruments.attention import (
    EAGER,
    INDUCTOR_DECOMPOSED,
    NO_CODE_CAPTURED,
    compiled_attention,
    compiled_with_code,
    configured_backend,
    probe_backends,
    probe_output_attentions,
    record_kernels,
    why_not_flash,
)
from tts_workbench.models.sources import load_model
from tts_workbench.runtime.decode import DecodePlan, T3Parts, t3_decode, text_tokens
from tts_workbench.runtime.generation import generate
from tts_workbench.studies.diagnose import _stage, decode_step_kernels, diagnose_attention


def test_sdpa_backbone_with_and_without_output_attentions(tiny_tts: ChatterboxTTS) -> None:
    rng = torch.get_rng_state()
    probe = probe_output_attentions(tiny_tts)
    assert torch.equal(torch.get_rng_state(), rng)  # a later unseeded generate samples as without it
    assert probe.configured == "sdpa"
    assert probe.kernels_with
    # The pinned transformers (5.2.0, tests/test_environment.py) keeps sdpa and returns no weights;
    # a pin that falls back to eager instead must update this.
    assert probe.transformers == "5.2.0" and not probe.attentions_returned
    assert EAGER not in probe.kernels_with
    assert probe.kernels_with == probe.kernels_without and "keeps sdpa" in probe.verdict


def test_the_probe_sees_the_warning_transformers_gives_once(tiny_tts: ChatterboxTTS) -> None:
    probe_output_attentions(tiny_tts)  # its warning_once, used up here if not before
    shown = warning_once.cache_info().currsize
    probe = probe_output_attentions(tiny_tts)
    assert any("output_attentions" in line for line in probe.log)  # was [] once upstream had warned
    assert warning_once.cache_info().currsize == shown  # every other warning stays once-only
    # Where transformers is told to log errors only (the notebooks, the command line) the probe
    # still hears it, and prints nothing: it was [] in notebook 02.
    verbosity, shown_by = hf_logging.get_verbosity(), hf_logging._get_library_root_logger().handlers
    assert shown_by  # transformers' own handler (stderr)
    hf_logging.set_verbosity_error()
    try:
        with contextlib.ExitStack() as stack:
            emits = [stack.enter_context(mock.patch.object(h, "emit")) for h in shown_by]
            probe = probe_output_attentions(tiny_tts)
    finally:
        hf_logging.set_verbosity(verbosity)
    assert any("output_attentions" in line for line in probe.log)
    assert not any(emit.called for emit in emits) and hf_logging.get_verbosity() == verbosity


def _capture_hooks(tfmr: torch.nn.Module) -> tuple[int, bool]:
    """transformers' output-capture hooks on the backbone's modules, and its flag that they are
    installed (it installs them the first time attentions are asked of the model)."""
    hooks = [h for m in tfmr.modules() for h in m._forward_hooks.values()]
    n = sum(h.__module__ == "transformers.utils.output_capturing" for h in hooks)
    return n, bool(getattr(tfmr, "_output_capturing_hooks_installed", False))


def test_the_probe_leaves_no_capture_hooks_on_the_model(reference_wav: Path) -> None:
    """Its call with attentions made transformers hook every layer and attention module for
    good: every later call of them took the slower hooked path."""
    tts = load_model("tiny")
    probe_output_attentions(tts)
    assert _capture_hooks(tts.t3.tfmr) == (0, False)
    # Hooks the model had before the probe are the model's: they stay.
    tts.t3.tfmr(inputs_embeds=torch.zeros(1, 2, tts.t3.tfmr.config.hidden_size), output_attentions=True)
    had = _capture_hooks(tts.t3.tfmr)
    assert had[0] > 0 and had[1]
    probe_output_attentions(tts)
    assert _capture_hooks(tts.t3.tfmr) == had


def test_a_decode_copy_made_while_kernels_are_recorded_runs_its_own_modules(
    tiny_tts: ChatterboxTTS,
) -> None:
    """The copy took the recorder's wrapper of the user's forward with it: a bfloat16 decode copy
    made inside ``record_kernels`` never ran, the user's float32 layers did every step."""
    t3 = tiny_tts.t3
    with record_kernels(tiny_tts):
        copy_ = T3Parts.of(t3).to(torch.bfloat16)
    assert "forward" not in vars(copy_.tfmr) and "forward" not in vars(copy_.speech_head)
    calls: dict[str, list[torch.dtype]] = {"user": [], "copy": []}
    hooks = [
        parts.tfmr.layers[0].register_forward_pre_hook(lambda m, a, who=who: calls[who].append(a[0].dtype))
        for who, parts in (("user", T3Parts.of(t3)), ("copy", copy_))
    ]
    try:
        plan = DecodePlan(T3Parts.of(t3), copy_)
        t3_decode(t3, tiny_tts.conds.t3, text_tokens(tiny_tts, "Copies."), max_new_tokens=4, plan=plan)
    finally:
        for h in hooks:
            h.remove()
    assert calls["user"] == [torch.float32]  # the prefill only
    assert calls["copy"] and set(calls["copy"]) == {torch.bfloat16}


def test_eager_backbone_is_detected(reference_wav: Path) -> None:
    tts = load_model("tiny")
    tts.t3.tfmr.config._attn_implementation = "eager"
    probe = probe_output_attentions(tts)
    assert probe.kernels_with == [EAGER] and probe.attentions_returned
    assert "eager" in probe.verdict


def test_a_backbone_that_falls_back_to_eager_for_attentions_is_told_so(tiny_tts: ChatterboxTTS) -> None:
    """transformers 4.x ran eager attention for a call that asked for attentions, sdpa for the
    others: the probe says which kernel ran with the flag and which without."""
    tfmr = tiny_tts.t3.tfmr
    cls_forward = type(tfmr).forward

    def forward(*a: Any, output_attentions: bool = False, **k: Any) -> Any:
        """The backbone's forward, with eager attention while attentions are asked for."""
        config, before = tfmr.config, tfmr.config._attn_implementation
        if output_attentions:
            config._attn_implementation = "eager"
        try:
            return cls_forward(tfmr, *a, output_attentions=output_attentions, **k)
        finally:
            config._attn_implementation = before

    with mock.patch.object(tfmr, "forward", forward):
        probe = probe_output_attentions(tiny_tts)
    assert probe.kernels_with == [EAGER] and probe.kernels_without == ["flash (CPU)"]
    assert "fall back" in probe.verdict and probe.configured == "sdpa"


def test_kernels_per_phase_on_the_real_generate_path(tiny_tts: ChatterboxTTS) -> None:
    with record_kernels(tiny_tts) as rec:
        generate(tiny_tts, "Kernels.", max_new_tokens=6)
    phases = rec.by_phase()
    layers = tiny_tts.t3.cfg.num_hidden_layers
    assert sum(phases["t3.prefill"].values()) == layers
    assert sum(phases["t3.decode"].values()) == 6 * layers
    assert "flash (CPU)" in phases["t3.decode"]  # float32 CPU: the CPU fused kernel runs
    calls = rec.to_frame()
    assert set(calls.loc[calls["phase"] == "t3.decode", "dtype"]) == {"float32"}  # torch's name, not C++'s
    assert len(calls) == sum(sum(k.values()) for k in phases.values())
    share = rec.summary()["time_share_ms"]["t3.decode"]
    assert share["linear/matmul"] > 0 and share["attention"] > 0


def test_a_profiler_that_cannot_start_reports_its_own_error(tiny_tts: ChatterboxTTS) -> None:
    """Its error, not an UnboundLocalError from reading a profile that never began; a diagnosis
    stage reports it on its line and goes on."""

    class Refusing(torch.profiler.profile):
        def __enter__(self) -> Any:
            raise RuntimeError("the profiler cannot start here")

    with mock.patch("tts_workbench.instruments.attention.profile", Refusing):
        with pytest.raises(RuntimeError, match="cannot start here"):
            with record_kernels(tiny_tts):
                pass
        stage = _stage(tiny_tts, lambda: None, kernels=True)
    assert stage["error"] == "RuntimeError: the profiler cannot start here"


def test_the_kernels_that_ran_before_an_error_are_recorded(tiny_tts: ChatterboxTTS) -> None:
    """A block that raises still fills the record (a diagnosis stage that failed half way shows
    what ran before)."""
    ids = text_tokens(tiny_tts, "Cut short.")
    with pytest.raises(RuntimeError, match="cut short"), record_kernels(tiny_tts) as rec:
        t3_decode(tiny_tts.t3, tiny_tts.conds.t3, ids, max_new_tokens=3)
        raise RuntimeError("cut short")
    assert rec.by_phase()["t3.decode"]


def test_why_not_flash_on_cpu(tiny_tts: ChatterboxTTS) -> None:
    # tiny_tts is on the CPU whatever the machine has, so this holds everywhere.
    reasons = why_not_flash(tiny_tts)
    assert any("device is cpu" in r for r in reasons) and any("float32" in r for r in reasons)
    assert not any("float32" in r for r in why_not_flash(tiny_tts, dtype=torch.bfloat16))
    assert any("CPU runs its own fused kernel" in r for r in reasons)
    # the half dtypes Flash takes give no dtype reason; every other one is named (float64 gave none)
    assert not any("dtype is" in r for r in why_not_flash(tiny_tts, dtype=torch.float16))
    wide = why_not_flash(tiny_tts, dtype=torch.float64)
    assert any("dtype is float64: CUDA Flash needs" in r for r in wide)


def test_where_sdpa_never_runs_no_cpu_kernel_is_said_to(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "SDPA is never called" stood beside "CPU runs its own fused kernel, ..._for_cpu", a
    kernel that did not run."""
    recorded = why_not_flash(tiny_tts, kernels=[EAGER])
    assert any("SDPA is never called" in r for r in recorded)
    monkeypatch.setattr(tiny_tts.t3.tfmr.config, "_attn_implementation", "eager")
    configured = why_not_flash(tiny_tts)
    assert any("SDPA is never called" in r for r in configured)
    for reasons in (recorded, configured):
        assert any("device is cpu" in r for r in reasons)
        assert not any("fused kernel" in r for r in reasons), reasons


def test_why_not_flash_on_cuda_names_every_rule_torch_refuses(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's can_use_flash_attention(debug=True) warns of the first of its rules that fails
    (the mask before the head dim before the dtype) and checks no further: a masked float32 step
    is refused for both, and both are named (before 2026-12-04 only the mask was)."""

    def first_refusal(params: Any, debug: bool = False) -> bool:
        q = params.query
        rules = [
            (params.attn_mask is None, "Flash attention does not support non-null attn_mask."),
            (q.size(-1) <= 256, f"Flash attention requires head dim <= 256. Got {q.size(-1)}"),
            (q.dtype in (torch.float16, torch.bfloat16), f"Expected {{Half, BFloat16}}. Got {q.dtype}"),
        ]
        for holds, reason in rules:
            if not holds:
                if debug:
                    warnings.warn(reason, stacklevel=1)
                return False
        return True

    pretend_cuda(monkeypatch, first_refusal)
    assert why_not_flash(tiny_tts, step="static") == [  # tiny_tts is float32
        "Flash attention does not support non-null attn_mask.",
        "Expected {Half, BFloat16}. Got torch.float32",
    ]
    assert why_not_flash(tiny_tts, dtype=torch.bfloat16) == []
    # the compiled step passes the static step's mask (Inductor's graph keeps it)
    masked = ["Flash attention does not support non-null attn_mask."]
    assert why_not_flash(tiny_tts, step="compiled", dtype=torch.bfloat16) == masked
    config = tiny_tts.t3.tfmr.config
    before = config.head_dim
    try:
        config.head_dim = 256  # the widest it takes
        assert not any("head dim" in r for r in why_not_flash(tiny_tts, dtype=torch.float16))
        config.head_dim = 264
        reasons = why_not_flash(tiny_tts, step="static", dtype=torch.float16)
    finally:
        config.head_dim = before
    assert reasons == [
        "Flash attention does not support non-null attn_mask.",
        "Flash attention requires head dim <= 256. Got 264",
    ]


@pytest.mark.parametrize("step", ["static", "compiled"])
def test_a_masked_step_is_told_flash_takes_no_mask(
    tiny_tts: ChatterboxTTS, step: str, traced_only: None
) -> None:
    """The static and compiled steps do pass a mask to SDPA (their cache's unused slots: the
    graph dynamo traces keeps it; the op Inductor's code calls is read by the profile test),
    upstream's eager step none: why_not_flash(step=...) names it (on CUDA
    can_use_flash_attention does)."""
    masks: dict[str, list[object]] = {"eager": [], step: []}
    real = torch.nn.functional.scaled_dot_product_attention
    for mode, seen in masks.items():

        def spy(*a: Any, seen: list[object] = seen, **k: Any) -> torch.Tensor:
            seen.append(k.get("attn_mask", a[3] if len(a) > 3 else None))
            return real(*a, **k)

        plan = DecodePlan.plain(tiny_tts.t3, step=mode)
        ids = text_tokens(tiny_tts, "A mask or none.")
        # The spy is in before the first call: the compiled step is traced through it there.
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
            t3_decode(tiny_tts.t3, tiny_tts.conds.t3, ids, max_new_tokens=1, plan=plan)  # prefill apart
            seen.clear()
            ran = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, ids, max_new_tokens=3, plan=plan)
        assert ran.step_mode == mode  # a compile that failed runs the static step instead
    # Two decode steps per generation after the prefill; each layer's call is seen.
    assert masks[step] and all(m is not None for m in masks[step][-2:])
    assert any(m is None for m in masks["eager"][-2:])
    assert any("mask" in r for r in why_not_flash(tiny_tts, step=step))
    assert not any("mask" in r for r in why_not_flash(tiny_tts))


def test_on_cpu_the_mask_is_said_to_refuse_cuda_flash_only(tiny_tts: ChatterboxTTS) -> None:
    """CPU's own fused Flash kernel takes a mask, and runs the static step's: the reason said
    Flash takes none, as if the mask kept the CPU step off it too."""
    said = [r for r in why_not_flash(tiny_tts, step="static") if "mask" in r]
    assert said and all("CUDA Flash takes none" in r for r in said), said
    flash = next(p for p in probe_backends(tiny_tts, step="static") if p.backend == "FLASH_ATTENTION")
    assert flash.ok, flash  # tiny_tts is on the CPU whatever the machine has


def test_the_backend_probe_passes_the_mask_its_step_passes(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the static step's mask keeps Flash off: a probe without it would say Flash ran."""
    masks: list[torch.Tensor | None] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, **kw: Any) -> Any:
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    probe_backends(tiny_tts, step="static")
    assert masks and all(m is not None for m in masks)
    masks.clear()
    probe_backends(tiny_tts, step="eager")
    assert masks and all(m is None for m in masks)


def test_forced_backends_report_pass_and_fail(tiny_tts: ChatterboxTTS) -> None:
    # The probe's inputs are on the model's device: tiny_tts's is the CPU whatever the machine has
    # (a guard on torch.cuda.is_available() skipped the fail half on every CUDA machine).
    assert next(tiny_tts.t3.parameters()).device.type == "cpu"
    results = {p.backend: p for p in probe_backends(tiny_tts)}
    assert results["MATH"].ok
    # the CPU has no memory-efficient kernel: refused, with torch's reason
    assert not results["EFFICIENT_ATTENTION"].ok and results["EFFICIENT_ATTENTION"].reason


def test_the_compiled_attention_kernel_is_read_from_inductors_code() -> None:
    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v

    def not_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v  # normalised over queries

    q = k = v = torch.randn(1, 2, 8, 16)
    # Inductor's pattern matcher turns hand-written attention into the SDPA op (found by running).
    cases = ((sdpa, ["flash (CPU)"]), (by_hand, ["flash (CPU)"]), (not_attention, [INDUCTOR_DECOMPOSED]))
    for fn, want in cases:
        torch._dynamo.reset()
        out, code = compiled_with_code(torch.compile(fn, fullgraph=True), q, k, v)
        assert torch.allclose(out, fn(q, k, v), atol=1e-5) and code
        assert compiled_attention(code) == want
    # a C++ wrapper calls the op as aoti_torch_cpu_<op>(
    torch._dynamo.reset()
    _, code = compiled_with_code(torch.compile(sdpa, fullgraph=True, options={"cpp_wrapper": True}), q, k, v)
    assert "aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu(" in "\n".join(code)
    assert compiled_attention(code) == ["flash (CPU)"]
    # the order of first call, each once
    cudnn, flash = (f"aten._scaled_dot_product_{k}_attention.default(x)" for k in ("cudnn", "flash"))
    text = f"{cudnn}\n{flash}"
    assert compiled_attention([text, text]) == ["cuDNN (CUDA)", "flash (CUDA)"]
    assert compiled_attention([f"{flash}\n{cudnn}"]) == ["flash (CUDA)", "cuDNN (CUDA)"]  # not by name
    # a CUDA graph compiled with the C++ wrapper calls the op through torch's C shim (c_shim_cuda.h)
    shim = "aoti_torch_cuda__scaled_dot_product_flash_attention(buf0, buf1)"
    assert compiled_attention([shim]) == ["flash (CUDA)"]


def test_a_compile_in_another_thread_stays_out_of_this_calls_code() -> None:
    """The engine's warm-up compiles T3's step and S3Gen's estimator in two threads at once: the
    estimator's attention was read as the step's (before 2026-12-04 the hook was the whole
    class's), and two overlapping calls left the hook in place for good."""
    import threading

    from torch._inductor.graph import GraphLowering

    errors: list[BaseException] = []  # each thread's: an exception in a thread is only a warning

    def started(fn: Callable[..., object], *args: Any) -> threading.Thread:
        """A thread running ``fn(*args)``, started; what it raises goes to ``errors``."""

        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def joined(thread: threading.Thread, timeout: float = 30) -> None:
        thread.join(timeout)
        assert not thread.is_alive()  # a join that timed out returns all the same

    step = torch.compile(lambda x: torch.relu(x) * 3, fullgraph=True)  # no attention in it
    flow = torch.compile(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), fullgraph=True)

    def run(x: torch.Tensor) -> torch.Tensor:
        joined(started(flow, torch.randn(1, 2, 8, 16)), 120)  # compiling meanwhile
        return step(x)

    _, code = compiled_with_code(run, torch.randn(8))
    assert compiled_attention(code) == [INDUCTOR_DECOMPOSED] and errors == []
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a_inside() -> None:
        a_in.set()
        assert b_in.wait(30)

    def a() -> None:
        compiled_with_code(a_inside)
        a_out.set()

    def b_inside() -> None:
        b_in.set()
        assert a_out.wait(30)

    first = started(a)
    assert a_in.wait(30)
    second = started(compiled_with_code, b_inside)  # in while the first is; out after it
    joined(first)
    joined(second)
    assert errors == [] and GraphLowering.save_output_code is None
    # Another patcher (torch's run_and_get_code, mock.patch) in after this call and out after it
    # puts back this call's hook, stale: it must do nothing, not call the unset slot (None) at
    # every later compile.
    in_, other_in, out = threading.Event(), threading.Event(), threading.Event()

    def patcher() -> None:
        with mock.patch.object(GraphLowering, "save_output_code", lambda code: None):
            other_in.set()
            assert out.wait(30)

    def reader_inside() -> None:
        in_.set()
        assert other_in.wait(30)

    def reader() -> None:
        compiled_with_code(reader_inside)
        out.set()

    threads = [started(reader)]
    assert in_.wait(30)
    threads.append(started(patcher))
    for t in threads:
        joined(t)
    try:
        GraphLowering.save_output_code("code")  # what Inductor does at each compile: no TypeError
    finally:
        GraphLowering.save_output_code = None  # the slot as torch has it
    assert errors == []


def test_no_captured_code_names_no_kernel() -> None:
    # Inductor generated no code during the call: nothing to read a kernel from
    assert compiled_attention([]) == compiled_attention([""]) == [NO_CODE_CAPTURED]  # was INDUCTOR_DECOMPOSED


def test_reading_a_graphs_code_keeps_the_graphs_compiled_before() -> None:
    """torch's run_and_get_code resets dynamo: each warm-up through it made every graph compiled
    earlier (the engine's other buckets) compile again at its first real call."""
    first = torch.compile(lambda x: torch.relu(x) * 2, fullgraph=True)
    second = torch.compile(lambda x: torch.sigmoid(x) + 1, fullgraph=True)
    x = torch.randn(8)
    _, code = compiled_with_code(first, x)
    assert code
    _, code = compiled_with_code(second, x)
    assert code
    graphs = counters["stats"]["unique_graphs"]
    first(x)
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_static_steps_mask_is_among_the_reasons_flash_is_refused(tiny_tts: ChatterboxTTS) -> None:
    """The static and compiled steps pass a mask (``diagnose --decode static`` asks with it; before
    2026-12-04 it asked as for the eager step, and on CUDA could answer that Flash can run)."""
    eager, static = diagnose_attention(tiny_tts), diagnose_attention(tiny_tts, "static")
    assert not any("mask" in r for r in eager["why_not_flash"])
    assert any("an attention mask is passed" in r for r in static["why_not_flash"])
    assert {p["backend"] for p in static["forced_backends"]} == {"FLASH_ATTENTION", "EFFICIENT_ATTENTION",
                                                                 "CUDNN_ATTENTION", "MATH"}  # fmt: skip
    assert next(p for p in static["forced_backends"] if p["backend"] == "MATH")["ok"]  # math takes a mask


@pytest.mark.parametrize(
    ("step", "found_by"), [("static", "torch.profiler op records"), ("compiled", "Inductor's generated code")]
)
def test_diagnose_names_the_kernel_of_the_decode_step_asked_for(
    tiny_tts: ChatterboxTTS, step: str, found_by: str
) -> None:
    found = decode_step_kernels(tiny_tts, "A short one.", step, tokens=6)
    assert found == {"step": step, "kernels": ["flash (CPU)"], "found_by": found_by}


def test_a_head_dim_torch_flash_takes_is_not_given_as_a_reason(tiny_tts: ChatterboxTTS) -> None:
    # CUDA Flash takes dense heads up to 256 wide, a multiple of 8 or not (torch's
    # check_head_dim_size_flash); before 2026-12-04 a head of 36 was said to be refused
    config = tiny_tts.t3.tfmr.config
    before = config.head_dim
    try:
        config.head_dim = 36
        assert not any("head dim" in r for r in why_not_flash(tiny_tts, dtype=torch.float16))
        config.head_dim = 256  # the widest it takes
        assert not any("head dim" in r for r in why_not_flash(tiny_tts, dtype=torch.float16))
        config.head_dim = 264
        assert any("head dim 264" in r for r in why_not_flash(tiny_tts, dtype=torch.float16))
    finally:
        config.head_dim = before


@pytest.fixture(scope="module")
def multilingual_tts(reference_wav: Path) -> Any:
    return voiced("multilingual-tiny", reference_wav)


def test_a_multilingual_eager_step_is_told_the_alignment_analyzer_keeps_sdpa_from_running(
    multilingual_tts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream's alignment analyzer switches a Multilingual T3 to eager attention for each
    generation with the eager step (it reads attention weights) and back after: the backbone
    still says sdpa when asked, but its decode step runs matmul + softmax. Before 2026-12-05 the
    reasons left that out, and on CUDA in bfloat16 there were none: Flash would run."""
    assert configured_backend(multilingual_tts) == "sdpa"
    found = decode_step_kernels(multilingual_tts, "Hello there.", "eager", tokens=4)
    assert found["kernels"] == [EAGER]  # what the reasons stand on
    assert any("alignment analyzer" in r for r in why_not_flash(multilingual_tts))
    for step in ("static", "compiled"):  # they decode without the analyzer
        assert not any("alignment analyzer" in r for r in why_not_flash(multilingual_tts, step=step))
    pretend_cuda(monkeypatch, lambda *_a, **_k: True)  # torch would take every input
    assert why_not_flash(multilingual_tts, step="static", dtype=torch.bfloat16) == []
    [reason] = why_not_flash(multilingual_tts, dtype=torch.bfloat16)
    assert "alignment analyzer" in reason and "static or compiled step" in reason


def test_the_decode_steps_recorded_kernels_are_preferred_to_the_config(
    tiny_tts: ChatterboxTTS, multilingual_tts: Any
) -> None:
    assert any("recorded" in r for r in why_not_flash(tiny_tts, kernels=[EAGER]))
    assert not any("recorded" in r for r in why_not_flash(tiny_tts, kernels=["flash (CPU)"]))
    # an analyzer that left SDPA alone: what ran is what counts
    assert not any(
        "alignment analyzer" in r for r in why_not_flash(multilingual_tts, kernels=["flash (CPU)"])
    )
    att = diagnose_attention(multilingual_tts, "eager", [EAGER])
    assert att["configured"] == "sdpa"
    assert att["backend"] == "sdpa (eager during each generation: the alignment analyzer)"
    assert "eager" in att["output_attentions"]["verdict"]
    assert "useless" not in att["output_attentions"]["verdict"]
    assert diagnose_attention(tiny_tts, "eager", ["flash (CPU)"])["backend"] == "sdpa"
