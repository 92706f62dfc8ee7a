"""S3Gen's CFM estimator in fixed shapes: padding is exact, a compiled stream compiles two shapes."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from torch._dynamo.utils import counters

from tts_workbench.core.compiling import replay, skipping_guards, warmup_calls
from tts_workbench.core.errors import ConfigError
from tts_workbench.core.patching import shadow
from tts_workbench.core.rng import StreamRandom
from tts_workbench.models import vocode
from tts_workbench.models.reference import make_reference_wav
from tts_workbench.models.sources import load_model
from tts_workbench.models.vocode import FlowPlan, fade_in, flow_mels, vocoder
from tts_workbench.runtime.streaming import SAMPLES_PER_TOKEN, StreamConfig, one_shot, stream_all

TEXT = "Fixed shapes for the flow."
# The default buffered windows, 25 and 87 tokens: 60 tokens end in a partial second window
# (25 + 35). With the default generated voice these are the shapes of the bench's
# compiled-stream (notebook 07), so Inductor's cache serves the two estimator graphs to whichever
# of the two runs second (each costs ~20 CPU-s to compile from nothing).
CONFIG = StreamConfig("buffered")
TOKENS = 60


@pytest.fixture(scope="module")
def tts(tmp_path_factory: pytest.TempPathFactory) -> ChatterboxTTS:
    model = load_model("tiny")
    model.prepare_conditionals(str(make_reference_wav(tmp_path_factory.mktemp("r") / "r.wav")))
    return model


def _mels(tts: ChatterboxTTS, tokens: torch.Tensor, **kw: object) -> torch.Tensor:
    noise = torch.randn(1, 80, 2 * tokens.size(1), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # the prompt part of the start noise
    return flow_mels(tts.s3gen, tokens, tts.conds.gen, noise=noise, **kw)  # type: ignore[arg-type]


def test_padded_frames_leave_the_real_frames_as_they_were(tts: ChatterboxTTS) -> None:
    tokens = torch.randint(0, 6561, (1, 17), generator=torch.Generator().manual_seed(0))
    plain = _mels(tts, tokens)
    estimator = tts.s3gen.flow.decoder.estimator
    frames: set[int] = set()  # what the estimator is given: the prompt's frames and 40 tokens'

    def seen(forward: Any) -> Any:
        def run(x: torch.Tensor, *rest: Any, **kw: Any) -> Any:
            frames.add(x.size(2))
            return forward(x, *rest, **kw)

        return run

    with shadow(estimator, "forward", seen):
        padded = _mels(tts, tokens, plan=FlowPlan("eager"), pad_to=40)
    assert frames == {tts.conds.gen["prompt_feat"].size(1) + 2 * 40}  # padded (not to 40 tokens in all)
    assert padded.shape == plain.shape == (1, 80, 34)
    assert ((padded - plain).norm() / plain.norm()).item() < 1e-5
    # The check can fail: 23 more tokens, unmasked (real frames, through the encoder too), change
    # the first 17 tokens' frames (the encoder is not causal: the mask is what keeps them apart).
    changed = _mels(tts, torch.nn.functional.pad(tokens, (0, 23)))[..., :34]
    assert ((changed - plain).norm() / plain.norm()).item() > 1e-3


def test_the_vocoders_output_fades_in_outside_inference_mode(tts: ChatterboxTTS) -> None:
    wav, _ = vocoder(tts.s3gen, _mels(tts, torch.arange(100, 110)[None]))
    assert wav[..., :480].abs().max() > 0  # the check can fail: the head is not silent before the fade
    fade_in(tts.s3gen, wav)  # before: "Inplace update to inference tensor outside InferenceMode"
    assert not wav[..., :480].any()  # upstream's fade: its first 20 ms zero, then a cosine ramp
    assert wav[..., 960:].abs().max() > 0


def test_a_prompt_with_an_odd_mel_frame_gives_one_frame_less(tts: ChatterboxTTS) -> None:
    # upstream embed_ref of a reference under 10 s and not a multiple of 40 ms keeps one mel frame
    # more than twice its tokens (streaming.shorten_prompt drops it): the flow then makes 2T-1 frames
    wav = 0.1 * np.random.default_rng(0).standard_normal(72500).astype(np.float32)
    gen = tts.s3gen.embed_ref(wav, 24000)
    assert gen["prompt_feat"].size(1) == 2 * gen["prompt_token"].size(1) + 1
    assert flow_mels(tts.s3gen, torch.arange(10) + 100, gen).shape == (1, 80, 19)


@pytest.mark.integration  # two cold estimator compiles (~100 s of one core); notebook 07 shares them
def test_compiled_stream_compiles_two_shapes_and_vocodes_every_token(tts: ChatterboxTTS) -> None:
    torch.manual_seed(7)  # S3Gen's own random draws (the prompt's start noise, HiFT's source)
    eager, state = stream_all(tts, TEXT, CONFIG, max_new_tokens=TOKENS)
    flow = FlowPlan("compiled")
    graphs = counters["stats"]["unique_graphs"]
    torch.manual_seed(7)
    wav, compiled_state = stream_all(tts, TEXT, CONFIG, max_new_tokens=TOKENS, flow=flow)
    assert flow.compiled and flow.fallback_reason is None
    assert len(flow.shapes) == 2  # first window, regular window (the partial one padded to it)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert compiled_state.tokens == state.tokens
    assert compiled_state.s3gen_compile_s == pytest.approx(flow.compile_s) and flow.compile_s > 0
    summary = compiled_state.report.summary()
    assert summary["s3gen_calls"] == 2
    # Disjoint intervals inside the wall time: the compile is counted once, apart from the calls.
    t3 = compiled_state.t3.prefill_s + compiled_state.t3.decode_s + compiled_state.t3.compile_s
    assert t3 + summary["flow_s"] + summary["vocoder_s"] + flow.compile_s <= summary["wall_s"]
    # Only the first shape's compile came before the first audio: TTFA less it stays positive.
    assert 0 < compiled_state.compile_before_first_s < flow.compile_s
    assert summary["ttfa_s"] - compiled_state.compile_before_first_s > 0
    assert len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN == len(one_shot(tts, state, StreamConfig()))
    assert np.linalg.norm(wav - eager) / np.linalg.norm(eager) < 1e-3
    # A second stream of another length reuses both shapes.
    stream_all(tts, TEXT, CONFIG, max_new_tokens=50, flow=flow)
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_a_failed_compile_runs_eagerly_and_says_why(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no backend here")

    monkeypatch.setattr(torch, "compile", broken)
    flow = FlowPlan("compiled")
    tokens = torch.randint(0, 6561, (1, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mels = _mels(tts, tokens, plan=flow, pad_to=20)
    assert flow.fallback_reason == "RuntimeError: no backend here" and not flow.compiled
    assert any("CFM estimator failed" in str(w.message) for w in caught)
    assert torch.allclose(mels, _mels(tts, tokens), rtol=1e-4, atol=1e-5)


def test_unknown_flow_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="eager or compiled"):
        FlowPlan("graphs")


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_the_estimator_runs_without_a_streams_random_mode(
    tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # A stream's random draws are routed by a TorchFunctionMode (core.rng); the estimator draws
    # nothing, so inside it the mode is off (Dynamo would trace it into every op, and eager
    # calls pay it per op). The compiler is stubbed: the compiled plan's path runs, no compile.
    monkeypatch.setattr(vocode, "compile_method", lambda fn, module, *a, **kw: lambda *x: fn(module, *x))
    plan = FlowPlan(mode)
    tokens = torch.randint(0, 6561, (1, 12), generator=torch.Generator().manual_seed(0))
    seen: list[bool] = []
    block = next(iter(tts.s3gen.flow.decoder.estimator.children()))
    hook = block.register_forward_pre_hook(lambda *_: seen.append(torch._C._is_torch_function_mode_enabled()))
    try:
        with StreamRandom(5).drawing():
            mels = _mels(tts, tokens, plan=plan, pad_to=12)
            assert torch._C._is_torch_function_mode_enabled()  # on again after the estimator
    finally:
        hook.remove()
    assert seen and not any(seen) and mels.shape == (1, 80, 24)
    # the compiled plan ran its (stubbed) compiled estimator, not the eager fallback
    assert plan.compiled == (mode == "compiled") and len(plan.shapes) == (mode == "compiled")


def test_a_stream_counts_only_its_own_threads_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams in two threads share a wrapper's FlowPlan: what one subtracts from its flow time
    (``compile_s_here``) is what its own thread compiled, not a compile another stream ran
    meanwhile (``compile_s`` counts every thread)."""
    monkeypatch.setattr(vocode, "compile_method", lambda fn, module, *a, **kw: lambda *x: fn(module, *x))
    ticks = iter(range(1, 100))  # a clock that moves one second per reading, whatever the machine
    monkeypatch.setattr(vocode, "now", lambda *a, **k: float(next(ticks)))
    plan, estimator = FlowPlan("compiled"), torch.nn.Linear(4, 4)
    other = threading.Thread(
        target=plan._estimator, args=(estimator, estimator.forward, (torch.zeros(1, 4),))
    )
    other.start()
    other.join(timeout=60)
    assert plan.compile_s == 1.0 and plan.compile_s_here == 0.0  # compiled in the other thread
    plan._estimator(estimator, estimator.forward, (torch.zeros(2, 4),))  # a new shape, here
    assert plan.compile_s_here == 1.0 and plan.compile_s == 2.0


def test_a_new_shape_compiles_while_a_step_elsewhere_skips_its_guards() -> None:
    """A compiled T3 step inside ``skipping_guards`` alone (another thread's stream) sets dynamo's
    stance for the whole process: an estimator meeting a new window shape meanwhile ran its
    first shape's graph on it. Every compiled call goes through ``replay``, which puts the
    checks back while it runs."""

    class Toy(torch.nn.Module):
        def forward(self, x: torch.Tensor, *rest: object) -> torch.Tensor:
            return x.cumsum(-1) * 2

    plan, toy = FlowPlan("compiled"), Toy()
    first, new = torch.ones(1, 2, 4), torch.arange(12.0).view(1, 2, 6)
    plan._estimator(toy, toy.forward, (first,))
    with skipping_guards(True):  # the other thread's step, inside alone
        out = replay(plan._estimator(toy, toy.forward, (new,)), new, cudagraphs=False)
    assert plan.fallback_reason is None and torch.equal(out, new.cumsum(-1) * 2)


def test_every_shape_compiles_past_dynamos_recompile_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo keeps a recompile limit (8) per code object: with one code object for every shape,
    from the ninth (a buffered stream compiles two per voice: the fifth voice) the estimator ran
    eagerly while the plan still said compiled. Here with the limit at 2 and dynamo's eager
    backend (fast)."""

    class Toy(torch.nn.Module):
        def forward(self, x: torch.Tensor, *rest: object) -> torch.Tensor:
            return x.cumsum(-1) * 2

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **kw, backend="eager"))
    plan, toy = FlowPlan("compiled"), Toy()
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in range(4, 8):
            x = torch.ones(1, 2, n)
            out = replay(plan._estimator(toy, toy.forward, (x,)), x, cudagraphs=False)
            assert torch.equal(out, x.cumsum(-1) * 2)
    assert counters["stats"]["unique_graphs"] - graphs == 4  # before: 2, then eager
    assert len(plan.shapes) == 4 and plan.compiled


def test_each_autocast_dtype_compiles_apart_from_the_timed_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's key held whether autocast was on, not its dtype: a shape compiled under bf16
    autocast served fp16 autocast too, and dynamo recompiled inside the (timed) call, unannounced,
    against the recompile limit the plan exists to stay under."""

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(6, 6)

        def forward(self, x: torch.Tensor, *rest: object) -> torch.Tensor:
            return self.linear(x)

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **kw, backend="eager"))
    plan, toy, x = FlowPlan("compiled"), Toy(), torch.randn(1, 2, 6)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype):
            fn = plan._estimator(toy, toy.forward, (x,))
            graphs = counters["stats"]["unique_graphs"]  # compiled and warmed up by now
            out = replay(fn, x, cudagraphs=False)
        assert out.dtype == dtype
        assert counters["stats"]["unique_graphs"] == graphs, f"{dtype} compiled inside the call"
    assert sorted(str(key[-1]) for key in plan.shapes) == ["torch.bfloat16", "torch.float16"]
    assert plan.compiled


def test_a_shape_compiled_in_another_thread_is_warmed_up_in_this_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA graphs each thread records its own graphs (torch 2.13 keeps the cudagraphified
    callable per thread): the load study's next level, a new engine with a new S3Gen thread on
    the same plan, recorded them inside its first timed flow calls. Now a thread's first use of
    a shape warms it up there, timed as that thread's compile (the compiler stubbed, the
    replays run on the CPU)."""
    calls: list[str] = []

    def compile_method(fn: Any, module: Any, *_a: Any, **_k: Any) -> Any:
        def run(*x: torch.Tensor) -> torch.Tensor:
            calls.append(threading.current_thread().name)
            return fn(module, *x)

        return run

    class Toy(torch.nn.Module):
        def forward(self, x: torch.Tensor, *rest: object) -> torch.Tensor:
            return x * 2

    monkeypatch.setattr(vocode, "compile_method", compile_method)
    plan, toy, x = FlowPlan("compiled"), Toy(), torch.ones(1, 2, 4)
    warm = warmup_calls(True)

    compiled_here: dict[str, float] = {}

    def use(name: str) -> None:
        plan._estimator(toy, toy.forward, (x,), cudagraphs=True)
        plan._estimator(toy, toy.forward, (x,), cudagraphs=True)  # warmed up here: no call
        compiled_here[name] = plan.compile_s_here

    for name in ("first", "second"):
        # a daemon: one left waiting (a lock never released) must not hold the test run at exit
        thread = threading.Thread(target=use, args=(name,), name=name, daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), f"thread {name} still waits"
    assert calls == ["first"] * warm + ["second"] * warm and len(plan.shapes) == 1
    assert compiled_here["first"] > 0 and compiled_here["second"] > 0


@pytest.mark.parametrize("fails", [False, True])
def test_two_threads_meeting_a_new_shape_compile_it_once(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """Two streams meeting a new window shape at once each compiled it (the look for a compiled
    shape and the compile were apart): now the second waits for the first's compile and runs it,
    or after a failure the eager estimator, with no second try and no second warning (the
    compiler stubbed)."""
    made: list[str] = []
    compiling = threading.Event()

    def compile_method(fn: Any, module: Any, *_a: Any, **_k: Any) -> Any:
        made.append(threading.current_thread().name)
        compiling.set()
        time.sleep(0.2)  # (the second thread's look came meanwhile: the race the old code lost)
        if fails:
            raise RuntimeError("no backend here")
        return lambda *x: fn(module, *x)

    monkeypatch.setattr(vocode, "compile_method", compile_method)
    plan, estimator = FlowPlan("compiled"), torch.nn.Linear(4, 4)
    got: dict[str, Any] = {}

    def use() -> None:
        got[threading.current_thread().name] = plan._estimator(
            estimator, estimator.forward, (torch.zeros(1, 4),)
        )

    first = threading.Thread(target=use, name="first")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first.start()
        assert compiling.wait(timeout=30)
        second = threading.Thread(target=use, name="second")
        second.start()
        for t in (first, second):
            t.join(timeout=30)
    assert made == ["first"] and got["first"] == got["second"]
    assert len([w for w in caught if "CFM estimator failed" in str(w.message)]) == fails
    assert (got["first"] == estimator.forward) == fails and len(plan.shapes) == (0 if fails else 1)
