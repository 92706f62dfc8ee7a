"""Fused projections (``runtime.fusion``): a copy of T3's Llama backbone with q, k, v and gate, up
each one matmul, run by the static step and the stream engine when a plan asks for it."""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any

import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from tts_workbench.models.sources import load_model
from tts_workbench.runtime.alignment import alignment
from tts_workbench.runtime.decode import DecodePlan, FusedCopies, t3_decode, text_tokens
from tts_workbench.runtime.engine import StreamEngine
from tts_workbench.runtime.fusion import FusedLlamaAttention, FusedLlamaMLP, fused_backbone
from tts_workbench.runtime.optimized import PerformanceOptimizedTTS

TEXT = "The quick brown fox jumps over the lazy dog."
TOKENS = 60


def _linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


def test_the_copy_joins_the_projections_and_the_model_keeps_its_own(tiny_tts: ChatterboxTTS) -> None:
    tfmr = tiny_tts.t3.tfmr
    before = {name: p.data_ptr() for name, p in tfmr.named_parameters()}
    fused = fused_backbone(tfmr)
    layers = len(tfmr.layers)
    assert fused is not tfmr
    assert _linears(tfmr) == 7 * layers and _linears(fused) == 4 * layers  # q, k, v and gate, up joined
    assert all(
        type(layer.self_attn) is LlamaAttention and type(layer.mlp) is LlamaMLP for layer in tfmr.layers
    )
    assert {name: p.data_ptr() for name, p in tfmr.named_parameters()} == before
    for mine, theirs in zip(fused.layers, tfmr.layers, strict=True):
        attn: Any = mine.self_attn
        assert isinstance(attn, FusedLlamaAttention) and isinstance(mine.mlp, FusedLlamaMLP)
        a = theirs.self_attn
        assert torch.equal(
            attn.qkv_proj.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        )
        m = theirs.mlp
        assert torch.equal(mine.mlp.gate_up_proj.weight, torch.cat([m.gate_proj.weight, m.up_proj.weight]))


def test_making_the_copy_draws_nothing_from_the_global_generator(tiny_tts: ChatterboxTTS) -> None:
    """(before: nn.Linear initialised each joined layer from the global generator before its
    weights were copied in, so a fused wrapper's first unseeded generation sampled other tokens
    than every later one, and `load --fused` moved the caller's random state)"""
    before = torch.get_rng_state()
    fused_backbone(tiny_tts.t3.tfmr)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_fused_static_step_samples_the_unfused_steps_tokens(tiny_tts: ChatterboxTTS) -> None:
    """float32: the same tokens, and logits within 1e-5 of the largest at every step (the joined
    matmul sums the same products, maybe in another order)."""
    ids = text_tokens(tiny_tts, TEXT)
    runs = {}
    for fused in (False, True):
        plan = DecodePlan.plain(tiny_tts.t3, step="static", fused=fused)
        logits: list[torch.Tensor] = []
        g = torch.Generator().manual_seed(3)
        kw: dict[str, Any] = {"plan": plan, "logits_out": logits, "generator": g}
        r = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, ids, max_new_tokens=TOKENS, **kw)
        runs[fused] = (r.tokens, torch.stack(logits), plan)
    (plain, plain_logits, _), (fused_tokens, fused_logits, plan) = runs[False], runs[True]
    assert torch.equal(plain, fused_tokens)
    scale = plain_logits.abs().amax(dim=-1, keepdim=True)
    assert ((fused_logits - plain_logits).abs() / scale).max() < 1e-5
    assert plan.describe().endswith("static step, fused")
    step = plan.static_step(2)
    assert step is not None and step.parts is plan.step_parts and step.parts.tfmr is not tiny_tts.t3.tfmr
    assert isinstance(step.parts.tfmr.layers[0].self_attn, FusedLlamaAttention)
    plan.drop_static()  # forgets the copy too: the next step is built from the model as it is then
    assert plan.step_parts.tfmr is not step.parts.tfmr


def test_the_engine_runs_the_fused_copy_with_the_same_tokens(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []  # the fused attention's forwards: the engine must run the copy, not the model's own
    forward = FusedLlamaAttention.forward
    monkeypatch.setattr(FusedLlamaAttention, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    tokens, ran = {}, {}
    for fused in (False, True):
        plan = DecodePlan.plain(tiny_tts.t3, step="static", fused=fused)
        before = len(calls)
        with StreamEngine(tiny_tts, max_streams=2, plan=plan) as engine:
            with engine.together():
                handles = [engine.submit(TEXT, seed=k, max_new_tokens=24) for k in range(2)]
            for h in handles:
                list(h)
        tokens[fused], ran[fused] = [h.tokens for h in handles], len(calls) - before
    assert tokens[True] == tokens[False] and tokens[True][0] != tokens[True][1]
    assert ran[False] == 0 and ran[True] >= 23 * len(tiny_tts.t3.tfmr.layers)  # every step, every layer


def test_a_copy_made_while_an_analyzer_runs_keeps_the_models_own_attention() -> None:
    """Made while a multilingual generation's analyzer had the backbone in eager attention with
    attentions on (a paused stream), the fused copy kept them for the wrapper's life, and the
    hooks on the backbone for that generation with them."""
    tfmr = load_model("multilingual-tiny").t3.tfmr
    with alignment([tfmr], (1, 3), 0), torch.inference_mode():
        tfmr(inputs_embeds=torch.zeros(1, 5, tfmr.config.hidden_size))  # transformers hooks it
        assert (tfmr.config._attn_implementation, tfmr.config.output_attentions) == ("eager", True)
        fused = fused_backbone(tfmr)
    assert (fused.config._attn_implementation, fused.config.output_attentions) == ("sdpa", False)
    assert not any(m._forward_hooks for m in fused.modules())
    assert not hasattr(fused, "_output_capturing_hooks_installed")


def test_turbo_has_nothing_to_fuse() -> None:
    """GPT-2 already projects q, k and v in one matmul: the backbone is used as it is."""
    t3 = load_model("turbo-tiny").t3
    assert fused_backbone(t3.tfmr) is t3.tfmr
    plan = DecodePlan.plain(t3, step="static", fused=True)
    assert plan.step_parts.tfmr is t3.tfmr and "fused" not in plan.describe()


def test_the_fused_step_compiles_whole_and_samples_the_same_tokens(tiny_tts: ChatterboxTTS) -> None:
    """Compiled (fullgraph: a graph break would fall back to the static step, with a warning), the
    fused step samples the unfused static step's tokens, as the unfused compiled step does."""
    ids = text_tokens(tiny_tts, TEXT)
    runs = {}
    for step, fused in (("static", False), ("compiled", True)):
        plan = DecodePlan.plain(tiny_tts.t3, step=step, fused=fused)
        g = torch.Generator().manual_seed(5)
        runs[step] = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, ids, max_new_tokens=24, plan=plan, generator=g)
    assert runs["compiled"].step_mode == "compiled"
    assert torch.equal(runs["compiled"].tokens, runs["static"].tokens)
    built = plan.static_step(2)  # the compiled plan's step, its batch the two guidance rows
    assert built is not None and built.compiled
    assert all(isinstance(layer.self_attn, FusedLlamaAttention) for layer in built.parts.tfmr.layers)


@pytest.mark.integration  # two cold compiles of the engine's step, a minute
def test_the_engines_fused_step_compiles_and_samples_the_same_tokens(tiny_tts: ChatterboxTTS) -> None:
    """Compiled in the engine (where a graph break falls back to the static step, with a warning),
    the fused step gives the unfused static step's tokens."""
    tokens = {}
    for step, fused in (("static", False), ("compiled", True)):
        plan = DecodePlan.plain(tiny_tts.t3, step="static", fused=fused)
        with StreamEngine(tiny_tts, max_streams=2, step=step, plan=plan, max_cache_len=256) as engine:
            with engine.together():
                handles = [engine.submit(TEXT, seed=k, max_new_tokens=24) for k in range(2)]
            for h in handles:
                list(h)
            assert engine.fallback_reason is None
        tokens[step] = [h.tokens for h in handles]
    assert tokens["compiled"] == tokens["static"]


def test_a_copy_dropped_meanwhile_never_makes_step_parts_none(tiny_tts: ChatterboxTTS) -> None:
    """A ``drop_static`` in another thread just before ``step_parts`` returns (forced with a trace
    hook) leaves it returning the copy it made or found, never None."""
    plan = DecodePlan.plain(tiny_tts.t3, step="static", fused=True)
    made = plan.step_parts
    code = FusedCopies.of.__code__
    source, first = inspect.getsourcelines(code)
    ret = first + next(i for i, line in enumerate(source) if line.strip() == "return made[1]")
    dropper = threading.Thread(target=plan.drop_static)

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def line(f: Any, e: str, a: Any) -> Any:
            if e == "line" and f.f_lineno == ret and not dropper.is_alive() and dropper.ident is None:
                dropper.start()
                dropper.join(timeout=1.0)  # it waits for the lock this call holds, if it takes it
            return line

        return line

    sys.settrace(tracer)
    try:
        got = plan.step_parts
    finally:
        sys.settrace(None)
    dropper.join(timeout=10.0)
    assert got is made and not dropper.is_alive()
    assert plan.step_parts is not made  # dropped: the next call makes a new copy


@pytest.mark.parametrize("policy", ["float32", "decode-bfloat16"])
def test_the_wrappers_plans_share_one_fused_copy_and_report_it(reference_wav: Any, policy: str) -> None:
    """The wrapper's static and compiled plans (dataclasses.replace of one plan) run one copy, and
    its bytes are in the wrapper's parameter bytes (before: a copy per plan, reported nowhere).
    Both policies "auto" may choose: CI once measured the bfloat16 decode copy faster, whose
    fused copy is half the float32 backbone's bytes."""
    tts = load_model("tiny")
    with PerformanceOptimizedTTS(tts, policy=policy, decode="static", fused=True) as opt:
        opt.prepare_conditionals(str(reference_wav))
        opt.generate(TEXT, max_new_tokens=4)
        static, compiled = opt.plans["static"], opt.plans["compiled"]
        assert static.step_parts is compiled.step_parts and static.step_parts.tfmr is not tts.t3.tfmr
        backbone = sum(p.numel() * p.element_size() for p in static.decode.tfmr.parameters())
        assert opt.performance_info()["memory"]["parameter_bytes"]["t3.fused_copy"] == backbone
