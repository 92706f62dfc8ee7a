"""The static-cache and compiled T3 decode steps (``DecodePlan.step``) on the tiny model.

float32: both sample exactly upstream's tokens. bfloat16: the static cache (attention over the
whole masked cache) and inductor's fused kernels round differently from the eager loop, so a
sample can flip where two tokens are nearly tied (on the machine this was written on: static
identical over 150 tokens, compiled first differs at token 60). There the check is that the
logits agree within ``BF16_RTOL`` at every step up to and including the first differing token;
all those steps had identical inputs, so a wrong step (position, cache slot, mask) fails it.
"""

from __future__ import annotations

import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from torch._dynamo.utils import counters

from tts_workbench.core.compiling import replay, skipping_guards
from tts_workbench.core.errors import CacheError, ConfigError
from tts_workbench.core.patching import shadow
from tts_workbench.runtime import decode as decode_module
from tts_workbench.runtime.decode import (
    DEFAULT_MAX_CACHE_LEN,
    DecodePlan,
    DecodeResult,
    DecodeStats,
    StaticStep,
    T3Parts,
    check_positions,
    check_room,
    decode_blocks,
    prefill_length,
    spans,
    t3_decode,
    text_tokens,
)
from tts_workbench.runtime.sampling import Sampler, draw, exponential_noise, penalize

if TYPE_CHECKING:
    from conftest import Steer

TEXT = "Hello there, this is a test."
OTHER = "Another sentence, a good deal longer than the first one, so its prompt is longer too."
N = 150
# The wrapper's default (prefill ~45 positions with TEXT, ~70 with OTHER, + 150 tokens attend
# to its first span, 256): the compiled step's first graph is then the one the wrapper's tests
# and the CLI's compile, served by Inductor's cache (a graph compiled from nothing: ~10 CPU-s).
CACHE = DEFAULT_MAX_CACHE_LEN
SEED = 7
# ChatterboxTTS.generate's top_p (T3.inference's own default is 0.95): the step samples inside its
# graph, so these tests then compile the graphs the wrapper, the bench and notebook 07 compile
# (Inductor's cache serves them across processes), not ones of their own.
TOP_P = 1.0
# max |logit difference| / max |logit| at a step: 1 bfloat16 ulp of the largest logit is 2**-8
# to 2**-7 of it; observed at most 0.008. A wrong step differs by far more (see
# test_the_tolerance_catches_a_wrong_position).
BF16_RTOL = 0.03
F32_RTOL = 1e-5


def _run(
    tts: ChatterboxTTS, plan: DecodePlan, text: str = TEXT, n: int = N, **kw: Any
) -> tuple[DecodeResult, list]:
    logits: list[torch.Tensor] = []
    torch.manual_seed(SEED)
    tokens = text_tokens(tts, text, kw.get("cfg_weight", 0.5))
    kw = {"top_p": TOP_P, **kw}
    r = t3_decode(tts.t3, tts.conds.t3, tokens, max_new_tokens=n, plan=plan, logits_out=logits, **kw)
    return r, logits


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the first differing token of two (1, n) streams (the shorter length if none)."""
    n = min(a.size(1), b.size(1))
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


def _assert_same_or_close(ref: tuple[DecodeResult, list], got: tuple[DecodeResult, list], rtol: float) -> int:
    """Same tokens, or logits within rtol up to and including the first token that differs."""
    (r0, l0), (r1, l1) = ref, got
    first = _first_difference(r0.tokens, r1.tokens)
    for i in range(min(first + 1, len(l0), len(l1))):
        err = (l1[i] - l0[i]).abs().max().item()
        scale = l0[i].abs().max().item()
        assert err <= rtol * scale, f"step {i}: max |logit diff| {err:.3g} > {rtol} * {scale:.3g}"
    return first


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's ops gain nothing from a second thread, and on shared cores an OpenMP team
    waiting for a descheduled thread makes each op slow (this file took 6 min instead of 40 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def upstream_tokens(tiny_tts: ChatterboxTTS) -> torch.Tensor:
    torch.manual_seed(SEED)
    return tiny_tts.t3.inference(
        t3_cond=tiny_tts.conds.t3, text_tokens=text_tokens(tiny_tts, TEXT), max_new_tokens=N, top_p=TOP_P
    )


@pytest.fixture(scope="module")
def compiled_plan(tiny_tts: ChatterboxTTS) -> DecodePlan:
    """One compiled float32 plan shared by the tests below: it compiles once."""
    return DecodePlan.plain(tiny_tts.t3, step="compiled", max_cache_len=CACHE)


@pytest.fixture(scope="module")
def f32_eager(tiny_tts: ChatterboxTTS) -> tuple[DecodeResult, list]:
    return _run(tiny_tts, DecodePlan.plain(tiny_tts.t3))


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_float32_samples_exactly_upstreams_tokens(
    tiny_tts: ChatterboxTTS,
    upstream_tokens: torch.Tensor,
    f32_eager: tuple[DecodeResult, list],
    compiled_plan: DecodePlan,
    mode: str,
) -> None:
    if mode == "compiled":
        plan = compiled_plan
    else:
        plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    r, logits = _run(tiny_tts, plan)
    assert upstream_tokens.shape == (1, N)
    assert r.step_mode == plan.step and r.tokens.shape == (1, N)
    assert torch.equal(upstream_tokens, r.tokens)
    # The random tiny model hardly depends on positions (a step one cache slot off still samples
    # the same first ~90 tokens), so the logits are checked too: observed within 1e-6 of the eager
    # loop's; that slot error moves them by 1e-3.
    assert torch.equal(f32_eager[0].tokens, r.tokens)
    assert _assert_same_or_close(f32_eager, (r, logits), F32_RTOL) == N
    step = plan.static_step(2)  # batch 2: classifier-free guidance
    assert isinstance(step, StaticStep) and step.fallback_reason is None
    assert step.cache.max_cache_len == CACHE and step.cache.max_batch_size == 2
    if plan.step == "compiled":
        assert step.compiled and step.compile_s > 0 and not step.cpp_wrapper
        assert step.attention_kernels == ["flash (CPU)"]  # read from Inductor's code
    else:
        assert not step.compiled and step.fallback_reason is None


# Every processor on, each away from its no-op value (top_p < 1 too): the step samples inside its
# graph, so these are other graphs than the ones above (one more compile of the tiny step).
EVERY_PROCESSOR = {"top_p": 0.8, "min_p": 0.1, "repetition_penalty": 2.0, "temperature": 0.5}


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_float32_samples_upstreams_tokens_with_every_processor_on(tiny_tts: ChatterboxTTS, mode: str) -> None:
    n = 40
    torch.manual_seed(SEED)
    want = tiny_tts.t3.inference(
        t3_cond=tiny_tts.conds.t3,
        text_tokens=text_tokens(tiny_tts, TEXT),
        max_new_tokens=n,
        **EVERY_PROCESSOR,
    )
    r, _ = _run(
        tiny_tts, DecodePlan.plain(tiny_tts.t3, step=mode, max_cache_len=CACHE), n=n, **EVERY_PROCESSOR
    )
    assert want.shape == (1, n) and torch.equal(want, r.tokens)
    if mode == "compiled":  # a fresh plan's step compiled after the prefill: its time is not the prefill's
        assert 0 < r.prefill_s < r.compile_s, (r.prefill_s, r.compile_s)


def test_the_cpp_wrapper_option_reaches_torch_compile(
    tiny_tts: ChatterboxTTS, f32_eager: tuple[DecodeResult, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor's C++ wrapper (opt-in, CPU; a cold compile of the tiny step takes ~20 s here) is
    # Inductor's to get right, and test_attention compiles one for real and reads its kernel;
    # this checks the plan passes the option on, and the step's tokens stay the eager loop's.
    options: list[object] = []

    def recording(fn: Any, **kwargs: Any) -> Any:
        options.append(kwargs.get("options"))
        return fn  # runs eagerly

    monkeypatch.setattr(torch, "compile", recording)
    plan = DecodePlan.plain(tiny_tts.t3, step="compiled", max_cache_len=CACHE, cpp_wrapper=True)
    r, _ = _run(tiny_tts, plan)
    assert options == [{"cpp_wrapper": True}] and plan.describe().endswith("compiled step (C++ wrapper)")
    step = plan.static_step(2)
    assert isinstance(step, StaticStep) and step.cpp_wrapper and step.fallback_reason is None
    assert torch.equal(f32_eager[0].tokens, r.tokens)


def test_without_guidance_the_cache_has_batch_one(tiny_tts: ChatterboxTTS) -> None:
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    eager = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3), n=40, cfg_weight=0.0)
    static = _run(tiny_tts, plan, n=40, cfg_weight=0.0)
    assert torch.equal(eager[0].tokens, static[0].tokens)
    step = plan.static_step(1)
    assert step is not None and step.cache.max_batch_size == 1 and plan.static_step(2) is None


def _bf16_plan(tts: ChatterboxTTS, kind: str, mode: str) -> DecodePlan:
    parts = T3Parts.of(tts.t3)
    half = parts.to(torch.bfloat16)
    prefill = parts if kind == "decode-bfloat16" else half
    return DecodePlan(prefill, half, step=mode, max_cache_len=CACHE)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bf16_eager(tiny_tts: ChatterboxTTS) -> dict[str, tuple[DecodeResult, list]]:
    return {k: _run(tiny_tts, _bf16_plan(tiny_tts, k, "eager")) for k in ("decode-bfloat16", "bfloat16")}


# compiled: a cold compile of the bfloat16 step (~14 s), in the integration tier
@pytest.mark.parametrize("mode", ["static", pytest.param("compiled", marks=pytest.mark.integration)])
@pytest.mark.parametrize("kind", ["decode-bfloat16", "bfloat16"])
def test_bfloat16_agrees_with_the_eager_loop(
    tiny_tts: ChatterboxTTS, bf16_eager: dict, kind: str, mode: str
) -> None:
    plan = _bf16_plan(tiny_tts, kind, mode)
    got = _run(tiny_tts, plan)
    assert got[0].step_mode == mode and got[0].tokens.shape == (1, N)
    step = plan.static_step(2)
    assert step is not None and step.dtype == torch.bfloat16
    first = _assert_same_or_close(bf16_eager[kind], got, BF16_RTOL)
    print(f"{kind} {mode}: tokens identical up to {first} of {N}")


def test_the_tolerance_catches_a_wrong_position(tiny_tts: ChatterboxTTS, bf16_eager: dict) -> None:
    """The bfloat16 check has teeth: a static step one learned position off fails it."""
    plan = _bf16_plan(tiny_tts, "bfloat16", "static")
    emb = plan.decode.speech_pos_emb.emb

    def wrap(forward: Any) -> Any:
        return lambda idx: forward(idx + 1)

    with shadow(emb, "forward", wrap):
        got = _run(tiny_tts, plan, n=20)
    with pytest.raises(AssertionError, match=re.escape("max |logit diff|")):
        _assert_same_or_close(bf16_eager["bfloat16"], got, BF16_RTOL)


def test_a_second_text_reuses_the_compiled_step(tiny_tts: ChatterboxTTS, compiled_plan: DecodePlan) -> None:
    _run(tiny_tts, compiled_plan, n=20)  # built here unless an earlier test did
    step = compiled_plan.static_step(2)
    assert step is not None and step.compiled
    # The attention kernel of the compiled graph, read from Inductor's code: on this CPU the
    # graph calls the CPU flash kernel as an extern op (what the eager step's profile shows too).
    assert step.attention_kernels == ["flash (CPU)"]
    keys = step.cache.layers[0].keys
    assert keys is not None
    graphs, ptr = counters["stats"]["unique_graphs"], keys.data_ptr()
    eager = DecodePlan.plain(tiny_tts.t3)
    assert text_tokens(tiny_tts, OTHER).size(1) != text_tokens(tiny_tts, TEXT).size(1)
    # A longer prompt, then the shorter one again over the longer one's stale cache slots.
    for text, n in ((OTHER, 60), (TEXT, 40)):
        r, _ = _run(tiny_tts, compiled_plan, text, n)
        assert r.compile_s == 0.0 and r.step_mode == "compiled"
        assert torch.equal(r.tokens, _run(tiny_tts, eager, text, n)[0].tokens)
    assert counters["stats"]["unique_graphs"] == graphs  # no new compile
    assert compiled_plan.static_step(2) is step and step.cache.layers[0].keys is keys
    assert keys.data_ptr() == ptr  # no reallocation


def test_the_mask_penalty_is_transformers_repetition_penalty() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(1, 300) * 5
    ids = torch.tensor([[7, 3, 7, 299, 0, 3]])  # repeats included
    seen = torch.zeros(1, 300, dtype=torch.bool)
    seen[0, ids[0]] = True
    want = RepetitionPenaltyLogitsProcessor(penalty=1.2)(ids, scores.clone())
    assert torch.equal(penalize(seen, scores, 1.2), want)


@pytest.mark.parametrize("top_p", [1.0, 0.95])
@pytest.mark.parametrize("min_p", [0.0, 0.05, 1.0])
def test_the_processors_give_upstreams_probabilities(top_p: float, min_p: float) -> None:
    """Without min-p's topk, and without top-p at 1, the drawn-from probabilities are still
    exactly those of T3.inference's processors, underflowing and -inf logits included."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6561, generator=gen) * torch.tensor([[1.0], [5], [30], [60], [120], [400]])
    logits[0, :100] = float("-inf")
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie at the top
    ids = torch.randint(0, 6561, (6, 40), generator=gen)
    seen = torch.zeros(6, 6561, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(penalty=1.2)(ids, logits.clone()) / 0.8
    want = TopPLogitsWarper(top_p=top_p)(ids, MinPLogitsWarper(min_p=min_p)(ids, want))
    sampler = Sampler(turbo=False, temperature=0.8, top_p=top_p, min_p=min_p)
    mine = sampler.scores(seen, logits.clone())
    assert torch.equal(torch.softmax(mine, dim=-1), torch.softmax(want, dim=-1))
    if top_p == 1.0 and min_p == 0.0:  # top-p at 1 removed tokens of probability 0, and only those
        assert (torch.isinf(want) & ~torch.isinf(mine)).any()


def test_the_draw_is_multinomials_draw_without_its_host_read() -> None:
    probs = torch.softmax(torch.randn(3, 8194) * 4, dim=-1)
    for seed in range(20):
        mine = [torch.Generator().manual_seed(seed + r) for r in range(3)]
        theirs = [torch.Generator().manual_seed(seed + r) for r in range(3)]
        tokens = draw(probs, exponential_noise(3, 8194, torch.device("cpu"), mine))
        for r in range(3):
            want = torch.multinomial(probs[r : r + 1], num_samples=1, generator=theirs[r])
            assert torch.equal(tokens[r : r + 1], want), (seed, r)
            assert torch.equal(mine[r].get_state(), theirs[r].get_state())  # as many numbers drawn


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_the_static_step_samples_inside_itself(
    tiny_tts: ChatterboxTTS, compiled_plan: DecodePlan, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Only the first token is sampled outside the step (from the prefill's logits): every later
    one inside it, so a compiled step is one graph per token, as gpt-fast's."""
    plan = (
        compiled_plan if mode == "compiled" else DecodePlan.plain(tiny_tts.t3, step=mode, max_cache_len=CACHE)
    )
    calls: list[int] = []
    real = Sampler.sample
    monkeypatch.setattr(Sampler, "sample", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    r, _ = _run(tiny_tts, plan, n=20)
    assert r.tokens.size(1) == 20 and len(calls) == 1


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_logits_that_are_not_finite_raise_as_multinomial_did(tiny_tts: ChatterboxTTS, mode: str) -> None:
    """The draw reads nothing back, so the check multinomial made every call is read at the
    stop check: an error naming the cause, not a stream of token 0."""
    plan = DecodePlan.plain(tiny_tts.t3, step=mode, max_cache_len=CACHE)

    def wrap(forward: Any) -> Any:
        return lambda x: forward(x) * float("nan")

    with shadow(tiny_tts.t3.speech_head, "forward", wrap), pytest.raises(RuntimeError, match="not finite"):
        _run(tiny_tts, plan, n=20)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_logits_not_finite_after_the_stop_token_are_never_drawn(
    tiny_tts: ChatterboxTTS, mode: str, steer: type[Steer]
) -> None:
    """Upstream stops at the stop token and never draws again: a NaN after it, sampled within
    the same block of 8 here, is not an error."""
    stop = tiny_tts.t3.hp.stop_speech_token
    head = steer({3: stop, 5: None})  # the third token is the stop token, the fifth's logits NaN
    with shadow(tiny_tts.t3.speech_head, "forward", head):
        r, _ = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3, step=mode, max_cache_len=CACHE), n=20)
    assert head.calls >= 5 and r.stopped and r.tokens.size(1) == 3 and r.tokens[0, -1] == stop


def test_a_generation_that_overflowed_leaves_the_static_cache_usable(tiny_tts: ChatterboxTTS) -> None:
    """An overflow fills the static cache with NaN past the next generation's shorter prefill:
    masked slots, but a masked NaN still poisons attention (0 x NaN), so they are zeroed."""
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    long = "A much longer sentence than the next one, so that its prefill fills more slots."

    def wrap(forward: Any) -> Any:
        return lambda x: forward(x) * float("inf")

    with (
        shadow(tiny_tts.t3.tfmr.layers[0].mlp, "forward", wrap),
        pytest.raises(RuntimeError, match="not finite"),
    ):
        _run(tiny_tts, plan, text=long, n=20)
    after, _ = _run(tiny_tts, plan, n=20)  # the same step and cache, after the overflow
    fresh, _ = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE), n=20)
    assert torch.equal(after.tokens, fresh.tokens)


def test_spans_double_from_256_up_to_the_cache() -> None:
    assert spans(1536) == [256, 512, 1536] and spans(1024) == [256, 512, 1024]
    assert spans(512) == [256, 512] and spans(384) == [384] and spans(100) == [100]


LONG_TEXT = " ".join([TEXT] * 5)  # a prefill of ~200 positions: the first span ends a few dozen steps in


@pytest.fixture(scope="module")
def past_the_first_span(tiny_tts: ChatterboxTTS) -> tuple[int, tuple[DecodeResult, list]]:
    """Tokens that take ``LONG_TEXT``'s generation 30 steps past the first span (256 slots),
    and the eager loop's run of them (before 2026-12-07 240 tokens after a short prefill, each
    of the two modes running the eager loop again)."""
    prefill = prefill_length(tiny_tts, LONG_TEXT)
    assert prefill < 250, prefill  # it starts in the first span
    n = 256 - prefill + 30
    return n, _run(tiny_tts, DecodePlan.plain(tiny_tts.t3), LONG_TEXT, n=n)


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_a_generation_past_the_first_span_goes_on_like_the_eager_loop(
    tiny_tts: ChatterboxTTS, past_the_first_span: tuple[int, tuple[DecodeResult, list]], mode: str
) -> None:
    """Slot 256 is written and read at the step after the first span: the tokens and logits
    go on as the eager loop's, and the second span's graph is compiled then, its time counted
    as compiling, and reused by the next generation."""
    n, eager = past_the_first_span
    plan = DecodePlan.plain(tiny_tts.t3, step=mode, max_cache_len=CACHE)
    got = _run(tiny_tts, plan, LONG_TEXT, n=n)
    assert torch.equal(eager[0].tokens, got[0].tokens)
    assert _assert_same_or_close(eager, got, F32_RTOL) == n
    step = plan.static_step(2)
    assert step is not None and step.span == 512
    if mode == "compiled":
        assert sorted(span for span, _ in step._compiled) == [256, 512]
        built = got[0].compile_s
        assert got[0].compile_steps == 1  # the step that compiled span 512: out of step_s
        graphs = counters["stats"]["unique_graphs"]
        again = _run(tiny_tts, plan, LONG_TEXT, n=n)[0]
        assert again.compile_s == 0.0 < built and torch.equal(again.tokens, got[0].tokens)
        assert again.compile_steps == 0 and counters["stats"]["unique_graphs"] == graphs
    else:
        assert got[0].compile_steps == 0


def test_skipping_guards_is_held_by_count_and_put_back_whatever_the_order() -> None:
    """torch's stance is one setting for the process: two steps in two threads, leaving in the
    other order, left it skipping guards for good (every later compiled call in the process)."""

    def skipping() -> bool:
        return bool(torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe)

    assert not skipping()
    first, second = skipping_guards(True), skipping_guards(True)
    first.__enter__()
    assert skipping()  # alone inside: skipped
    second.__enter__()
    assert not skipping()  # a second step arrived: its call is checked
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert not skipping()
    with skipping_guards(False):
        assert not skipping()
    # A compiled call elsewhere puts the checks back while it runs; an eager one has none to check.
    with skipping_guards(True):
        assert not replay(skipping, cudagraphs=False)
    with skipping_guards(True):
        assert replay(skipping, cudagraphs=False, compiled=False) and skipping()
    # Entering the stance can fail (inside a compiled region): the count is undone, so a later
    # step alone still skips (before, the count stayed at 1 and no step skipped again).
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch._dynamo.eval_frame, "_set_stance", _refusing_stance)  # what _Stance calls
        with pytest.raises(RuntimeError, match="on purpose"), skipping_guards(True):
            pass
    with skipping_guards(True):
        assert skipping()
    assert not skipping()


def _refusing_stance(*a: object, **k: object) -> object:
    raise RuntimeError("attempted to set_stance in a torch.compile region, on purpose")


def test_guards_are_checked_on_the_first_step_of_each_generation(
    tiny_tts: ChatterboxTTS, traced_only: None
) -> None:
    cpu, sampler = torch.device("cpu"), Sampler(turbo=False, top_p=TOP_P)
    step = StaticStep(
        T3Parts.of(tiny_tts.t3), batch=2, max_cache_len=CACHE, dtype=torch.float32, device=cpu, compile=True,
        sampler=sampler,
    )  # fmt: skip
    assert step.compiled and step.skip_guards
    with torch.inference_mode():
        token = torch.zeros((1, 1), dtype=torch.long).expand(2, 1)  # as decode_blocks passes it
        position, slot = torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)
        q = torch.ones(1, step.seen.size(1))
        step.begin(sampler, step.seen.clone())
        step(token, position, slot, 1, q)  # guards checked
        step(token, position, slot, 1, q)  # guards skipped
        graphs = counters["stats"]["unique_graphs"]
        other = torch.zeros((2, 1), dtype=torch.long)  # another layout: the compiled entry does not fit
        # Mid-generation (guards skipped) dynamo refuses it rather than run the wrong code ...
        with pytest.raises(RuntimeError, match="skip_guard_eval_unsafe"):
            step(other, position, slot, 1, q)
        # ... and after begin() the guards are checked: it compiles a second entry.
        step.begin(sampler, step.seen.clone())
        step(other, position, slot, 1, q)
    assert counters["stats"]["unique_graphs"] == graphs + 1


@pytest.fixture
def calls_of_tfmr(tiny_tts: ChatterboxTTS) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = tiny_tts.t3.tfmr.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_a_request_beyond_the_cache_is_refused_before_anything_runs(
    tiny_tts: ChatterboxTTS, calls_of_tfmr: list[int], mode: str
) -> None:
    plan = DecodePlan.plain(tiny_tts.t3, step=mode, max_cache_len=96)
    prefill = text_tokens(tiny_tts, TEXT).size(1)  # + conditioning positions + 2 BOS
    blocks = decode_blocks(
        tiny_tts.t3, tiny_tts.conds.t3, text_tokens(tiny_tts, TEXT), max_new_tokens=100, plan=plan
    )
    with pytest.raises(CacheError, match=r"max_cache_len=96: lower max_new_tokens to \d+ or set") as e:
        next(blocks)
    assert not calls_of_tfmr and plan.static_step(2) is None  # no prefill, nothing allocated
    room = int(str(e.value).split("lower max_new_tokens to ")[1].split()[0])
    assert 0 < room < 96 - prefill
    # The fix in the message works: that many tokens fit.
    r, _ = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=96), n=room)
    assert r.tokens.size(1) == room


def test_a_cache_with_room_for_one_token_says_so() -> None:
    """A prefill of 10 in a cache of 10 positions has room for one token (it is never fed back):
    the refusal of two offers it."""
    with pytest.raises(CacheError, match="lower max_new_tokens to 1 or FIX"):
        check_room(10, 2, 10, "the plan's static cache holds max_cache_len", "FIX")
    with pytest.raises(CacheError, match=r"max_cache_len=9: FIX"):  # none fits: only the fix
        check_room(10, 1, 9, "the plan's static cache holds max_cache_len", "FIX")


def test_a_plans_cache_grown_by_hand_is_reallocated_at_the_next_generation(tiny_tts: ChatterboxTTS) -> None:
    """``DecodePlan.max_cache_len`` set directly (as its docstring allows, not through the
    wrapper's ``set_max_cache_len``): the next generation gets a cache of the new length, and its
    tokens are a fresh plan's."""
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=prefill_length(tiny_tts, TEXT) + 7)
    _run(tiny_tts, plan, n=8)
    plan.max_cache_len = CACHE
    grown, _ = _run(tiny_tts, plan, n=40)
    fresh, _ = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3, step="static"), n=40)
    step = plan.static_step(2)
    assert torch.equal(grown.tokens, fresh.tokens) and step is not None and step.max_cache_len == CACHE


def test_a_request_that_exactly_fills_the_cache_runs(tiny_tts: ChatterboxTTS) -> None:
    """n tokens write the prefill's positions and n - 1 more: the last is never fed back. Before,
    every check asked for one position more and refused this request."""
    n, prefill = 8, prefill_length(tiny_tts, TEXT)
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=prefill + n - 1)
    full, _ = _run(tiny_tts, plan, n=n)
    roomy, _ = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3, step="static"), n=n)
    assert full.tokens.size(1) == n and torch.equal(full.tokens, roomy.tokens)
    with pytest.raises(CacheError, match=f"needs {prefill + n} positions .* lower max_new_tokens to {n} "):
        _run(tiny_tts, plan, n=n + 1)
    # A GPT-2 backbone's learned positions (Turbo's) bound every step the same way, the eager one too.
    gpt2 = SimpleNamespace(n_positions=100)
    check_positions(gpt2, 90, 11)  # positions 0 to 99
    with pytest.raises(CacheError, match="n_positions=100: lower max_new_tokens to 11 "):
        check_positions(gpt2, 90, 12)


def test_a_cache_on_another_device_is_refused(tiny_tts: ChatterboxTTS, calls_of_tfmr: list[int]) -> None:
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    _run(tiny_tts, plan, n=4)
    step = plan.static_step(2)
    assert step is not None
    step.device = torch.device("meta")  # as if the model had been moved after the first generation
    calls_of_tfmr.clear()
    with pytest.raises(CacheError, match="drop_static"):
        _run(tiny_tts, plan, n=4)
    assert not calls_of_tfmr
    plan.drop_static()
    assert _run(tiny_tts, plan, n=4)[0].tokens.size(1) == 4
    step = plan.static_step(2)
    assert step is not None
    step.dtype = torch.bfloat16  # as if the plan's weights had been cast since: refused likewise
    with pytest.raises(CacheError, match="bfloat16 but this prefill gives float32: call plan.drop_static"):
        _run(tiny_tts, plan, n=4)


def test_a_refused_generation_leaves_the_paused_ones_cache_alone(tiny_tts: ChatterboxTTS) -> None:
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    tokens = text_tokens(tiny_tts, TEXT)

    def paused_run() -> Generator[torch.Tensor, None, None]:
        gen = torch.Generator().manual_seed(SEED)
        kw: dict[str, Any] = {"max_new_tokens": 16, "plan": plan, "stop_check_every": 8, "generator": gen}
        return decode_blocks(tiny_tts.t3, tiny_tts.conds.t3, tokens, **kw)

    alone = torch.cat(list(paused_run()), dim=1)
    paused = paused_run()
    first = next(paused)
    # Twice: a refusal used to clear the holder's busy flag, so the second call took the cache.
    for _ in range(2):
        with pytest.raises(CacheError, match="still uses this plan's static KV cache"):
            _run(tiny_tts, plan, text=OTHER, n=4)
    assert torch.equal(torch.cat([first, *paused], dim=1), alone)  # resumed on its own cache
    assert _run(tiny_tts, plan, n=4)[0].tokens.size(1) == 4  # free once the holder has ended


def test_two_threads_starting_on_one_plan_cannot_both_take_its_cache(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is claimed where it is checked: a second generation that starts while the first
    is still loading its prefill is refused, not let in to share the cache."""
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    _run(tiny_tts, plan, n=2)  # the step is built, so both threads below take the same one
    loading, go = threading.Event(), threading.Event()
    real_load = StaticStep.load

    def slow_load(step: StaticStep, past: Any) -> None:
        loading.set()
        go.wait(timeout=10)  # bounded: held until the second generation has been let in or refused
        real_load(step, past)

    monkeypatch.setattr(StaticStep, "load", slow_load)
    errors: dict[str, BaseException | None] = {}

    def run(name: str) -> None:
        try:
            _run(tiny_tts, plan, n=4)
            errors[name] = None
        except BaseException as e:
            errors[name] = e

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert loading.wait(timeout=30)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    second.join(timeout=30)  # refused at once; let in, it would wait in slow_load
    go.set()
    for t in (first, second):
        t.join(timeout=60)
    assert errors["first"] is None
    assert isinstance(errors["second"], CacheError) and "still uses" in str(errors["second"])


def test_two_threads_starting_on_a_fresh_plan_build_one_step(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh plan's step was looked for and built outside any lock: two generations starting at
    once each built (for "compiled": compiled) a step of their own, the second's replacing the
    first's on the plan. Now the second waits for the first's build and meets its claim: refused,
    as any second generation on a plan's cache is (``StaticStep.claim``)."""
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    built: list[StaticStep] = []
    building, second_in, second_done = threading.Event(), threading.Event(), threading.Event()
    real_init, real_load, real_static_step = StaticStep.__init__, StaticStep.load, decode_module._static_step

    def slow_init(step: StaticStep, *a: Any, **k: Any) -> None:
        real_init(step, *a, **k)
        built.append(step)
        if len(built) == 1:  # the first build lasts until the second generation looks for a step
            building.set()
            second_in.wait(timeout=30)
            time.sleep(0.2)  # (its look, unlocked, came before this build was kept: the race lost)

    def entering(*a: Any, **k: Any) -> Any:
        if threading.current_thread().name == "second":
            second_in.set()
        return real_static_step(*a, **k)

    def held_load(step: StaticStep, past: Any) -> None:
        if threading.current_thread().name == "first":  # the first holds the cache until the second ends
            second_done.wait(timeout=30)
        real_load(step, past)

    monkeypatch.setattr(StaticStep, "__init__", slow_init)
    monkeypatch.setattr(StaticStep, "load", held_load)
    monkeypatch.setattr(decode_module, "_static_step", entering)
    errors: dict[str, BaseException | None] = {}

    def run() -> None:
        name = threading.current_thread().name
        try:
            _run(tiny_tts, plan, n=4)
            errors[name] = None
        except BaseException as e:
            errors[name] = e
        finally:
            if name == "second":
                second_done.set()

    first = threading.Thread(target=run, name="first")
    first.start()
    assert building.wait(timeout=30)
    second = threading.Thread(target=run, name="second")
    second.start()
    for t in (first, second):
        t.join(timeout=60)
    assert len(built) == 1 and plan.static_step(2) is built[0]
    assert errors["first"] is None
    assert isinstance(errors["second"], CacheError) and "still uses" in str(errors["second"])


def _compile_with(monkeypatch: pytest.MonkeyPatch, backend: Callable[[Any, Any], Any]) -> None:
    """``torch.compile`` with ``backend`` (and no mode), while the test runs."""
    real = torch.compile

    def compile_with(fn: Any, **kw: Any) -> Any:
        kw.pop("mode", None)
        return real(fn, **kw, backend=backend)

    monkeypatch.setattr(torch, "compile", compile_with)


def test_a_compile_failure_falls_back_to_the_static_step(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_compiler(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    _compile_with(monkeypatch, no_compiler)
    plan = DecodePlan.plain(tiny_tts.t3, step="compiled", max_cache_len=CACHE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r, _ = _run(tiny_tts, plan, n=30)
        again, _ = _run(tiny_tts, plan, n=30)  # the failed step is kept: no second try, no warning
    ours = [w for w in caught if "decode step failed" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "no compiler here" in str(ours[0].message)
    step = plan.static_step(2)
    assert step is not None and not step.compiled
    assert step.fallback_reason is not None and "RuntimeError: no compiler here" in step.fallback_reason
    assert r.step_mode == again.step_mode == "static"
    eager, _ = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3), n=30)
    assert torch.equal(r.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)


def test_torch_compile_raising_itself_falls_back_to_the_static_step(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.compile raising when it wraps the step (not in the first call, which compiles) crashed
    # the generation instead of falling back
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no backend here")

    monkeypatch.setattr(torch, "compile", broken)
    plan = DecodePlan.plain(tiny_tts.t3, step="compiled", max_cache_len=CACHE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r, _ = _run(tiny_tts, plan, n=10)
    ours = [w for w in caught if "decode step failed" in str(w.message)]
    assert len(ours) == 1 and "no backend here" in str(ours[0].message)
    step = plan.static_step(2)
    assert step is not None and step.fallback_reason == "RuntimeError: no backend here"
    assert r.step_mode == step.mode == "static" and r.tokens.size(1) == 10


def test_a_compile_failing_at_a_longer_span_is_reported_as_the_static_step(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first span's graph compiles (here with the eager backend), the next span's fails
    # mid-generation: the steps after it run the static step, and the stats say so.
    graphs: list[int] = []

    def second_fails(gm: Any, example_inputs: Any) -> Any:
        graphs.append(1)
        if len(graphs) > 1:
            raise RuntimeError("no compiler for this span")
        return gm.forward

    _compile_with(monkeypatch, second_fails)
    plan = DecodePlan.plain(tiny_tts.t3, step="compiled", max_cache_len=CACHE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r, _ = _run(tiny_tts, plan, n=300)  # past the 256-slot span
    step = plan.static_step(2)
    assert step is not None and step.fallback_reason is not None and len(graphs) == 2
    assert r.step_mode == step.mode == "static"


def test_stop_token_ends_a_static_stream_like_the_eager_loop(tiny_tts: ChatterboxTTS) -> None:
    stop = tiny_tts.t3.hp.stop_speech_token

    def wrap(forward: Any) -> Any:
        def biased(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            out[..., stop] += 4.0
            return out

        return biased

    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    with shadow(tiny_tts.t3.speech_head, "forward", wrap):
        eager, _ = _run(tiny_tts, DecodePlan.plain(tiny_tts.t3), n=60)
        static, _ = _run(tiny_tts, plan, n=60)
    assert eager.stopped and eager.tokens[0, -1] == stop and eager.tokens.size(1) < 60
    assert static.stopped and torch.equal(eager.tokens, static.tokens) and static.steps == eager.steps
    # The block that held the stop token was decoded to its end: step_s divides by those steps.
    assert static.sampled == min(-(-static.steps // 8) * 8, 60) > static.steps
    assert static.step_s == pytest.approx(static.decode_s / (static.sampled - 1))


def test_bad_options_are_config_errors(tiny_tts: ChatterboxTTS) -> None:
    with pytest.raises(ConfigError, match="unknown decode step 'jit'"):
        DecodePlan.plain(tiny_tts.t3, step="jit")
    with pytest.raises(ConfigError, match="max_cache_len"):
        DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=1)
    with pytest.raises(ValueError, match="max_new_tokens"):  # ConfigError is a ValueError
        t3_decode(tiny_tts.t3, tiny_tts.conds.t3, text_tokens(tiny_tts, TEXT), max_new_tokens=0)
    # not a modulo by 0
    with pytest.raises(ConfigError, match="stop_check_every must be a whole number .* got 0"):
        _run(tiny_tts, DecodePlan.plain(tiny_tts.t3), n=4, stop_check_every=0)
    assert DecodePlan.plain(tiny_tts.t3, step="compiled").describe() == "native float32, compiled step"
    with pytest.raises(ConfigError, match=r"top_p must be in \[0, 1\]"):  # as T3.inference's warper
        Sampler(turbo=False, top_p=1.5)
    Sampler(turbo=True, top_p=1.5)  # inference_turbo leaves top-p out from 1 up
    # below 0 transformers' warper raised a plain ValueError once the processors were built
    for top_p in (-0.5, math.nan):  # NaN, which inference_turbo would leave out, is nonsense
        with pytest.raises(ConfigError, match=rf"top_p must be 0 or above .* got {top_p}"):
            Sampler(turbo=True, top_p=top_p)
    # Before, a penalty of 0 failed mid-stream as "logits not finite" (advice to decode in
    # float32) and a negative one ran; upstream's processor refuses both at once.
    for turbo, penalty in ((False, 0.0), (True, -1.0), (False, float("nan"))):
        with pytest.raises(ConfigError, match="repetition_penalty must be above 0"):
            Sampler(turbo=turbo, repetition_penalty=penalty)
    # A negative weight guided against a row no prefill wrote (upstream's generate runs one row
    # for it): refused, not sampled.
    # Infinite ones passed and sampled nonsense (every id equally likely at an infinite temperature)
    for turbo in (False, True):
        for name in ("temperature", "repetition_penalty"):
            with pytest.raises(ConfigError, match=f"{name} must be finite, got inf"):
                Sampler(turbo=turbo, **{name: math.inf})
    for weight in (-0.5, float("nan")):  # NaN: before, sampled, then blamed on half precision
        with pytest.raises(ConfigError, match="cfg_weight must be 0 .* or above"):
            Sampler(turbo=False, cfg_weight=weight)


def test_a_cache_length_that_is_not_a_whole_number_is_refused(tiny_tts: ChatterboxTTS) -> None:
    # 400.0 was taken, then failed inside torch with a TypeError naming nothing
    with pytest.raises(ConfigError, match="max_cache_len must be a whole number"):
        DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=400.0)  # type: ignore[arg-type]
    plan = DecodePlan.plain(tiny_tts.t3, step="static", max_cache_len=CACHE)
    plan.max_cache_len = 400.0  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="max_cache_len must be a whole number of positions, got 400.0"):
        _run(tiny_tts, plan, n=4)


def test_bad_sampling_is_refused_before_the_prefill(
    tiny_tts: ChatterboxTTS, calls_of_tfmr: list[int]
) -> None:
    # (before 2026-12-04 the prefill ran first: one forward, then the refusal)
    for bad in ({"temperature": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError):
            t3_decode(tiny_tts.t3, tiny_tts.conds.t3, text_tokens(tiny_tts, TEXT), max_new_tokens=4, **bad)
    assert not calls_of_tfmr


def test_samplers_differing_only_in_what_their_family_ignores_are_one_step() -> None:
    # a compiled step is keyed on its sampler: top_k built another graph for Llama's T3 (which
    # never reads it), min_p and guidance for Turbo's (before 2026-12-04)
    assert Sampler(False, top_k=1) == Sampler(False, top_k=50)
    assert len({Sampler(False, top_k=k) for k in (1, 2)}) == 1  # one key of a dict of graphs
    assert Sampler(True, min_p=0.1, cfg_weight=0.0) == Sampler(True, min_p=0.2, cfg_weight=0.0)
    assert Sampler(False, min_p=0.1) != Sampler(False, min_p=0.2)
    assert Sampler(True, top_k=5) != Sampler(True, top_k=6)


def test_one_token_reports_no_step_time(tiny_tts: ChatterboxTTS) -> None:
    # the one token comes from the prefill: before 2026-12-04 its sampling was reported as a step
    r = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, text_tokens(tiny_tts, TEXT), max_new_tokens=1)
    assert math.isnan(r.step_s)
    assert t3_decode(tiny_tts.t3, tiny_tts.conds.t3, text_tokens(tiny_tts, TEXT), max_new_tokens=3).step_s > 0


def _emulated_compiled_step(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch, cudagraphs: bool, run: Callable[..., Any]
) -> tuple[StaticStep, list[int]]:
    """A static step taken for a compiled one (with CUDA graphs or not) on a clock that moves 1 s
    per reading, its graphs stand-ins that ``run`` replaces ``_run`` for; and the spans of the
    graphs it made (torch.compile called), not found."""
    sampler = Sampler(turbo=False, top_p=TOP_P)
    parts, cpu = T3Parts.of(tiny_tts.t3), torch.device("cpu")
    step = StaticStep(parts, batch=2, max_cache_len=CACHE, dtype=torch.float32, device=cpu, sampler=sampler)
    step.compiled, step.cudagraphs = True, cudagraphs
    clock = iter(range(10_000))
    monkeypatch.setattr(decode_module, "now", lambda device: float(next(clock)))
    graph = lambda *a: None  # noqa: E731 (a stand-in: ``run`` never calls it)
    made: list[int] = []

    def make() -> Callable[..., Any]:
        if (step.span, step.sampler) not in step._compiled:
            made.append(step.span)
        return step._compiled.setdefault((step.span, step.sampler), graph)

    monkeypatch.setattr(step, "_function", make)
    monkeypatch.setattr(step, "_run", run)
    return step, made


@pytest.mark.parametrize(("cudagraphs", "timed"), [(False, 1), (True, 3)])
def test_a_graph_made_mid_generation_is_timed_in_compile_s_while_it_warms_up(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch, cudagraphs: bool, timed: int
) -> None:
    # A longer span's (or a new sampler's) graph is made on the step that needs it. With CUDA graphs
    # the next call records it: that call was counted as a decode step (only the first was timed in
    # compile_s). Emulated (no GPU): a stand-in graph, and a clock that moves 1 s per reading.
    step, made = _emulated_compiled_step(tiny_tts, monkeypatch, cudagraphs, lambda fn, *a: (None, None, None))
    for _ in range(5):
        step(None, None, None, 1, None)  # type: ignore[arg-type]
    assert len(made) == 1
    assert step.compile_s == timed  # each warming call one reading apart; the steps after, none
    assert step.compile_calls == timed  # decode_blocks takes them out of the steps step_s divides by


@pytest.mark.parametrize(("cudagraphs", "timed"), [(False, 1), (True, 3)])
def test_a_graph_whose_compile_was_interrupted_is_timed_in_compile_s_when_made_again(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch, cudagraphs: bool, timed: int
) -> None:
    # Ctrl-C while a graph compiled (emulated: its first call raising KeyboardInterrupt) left it
    # counted as warmed up: the next generation compiled it inside a step timed as decoding
    # (step_s ~15x too high). Emulated as the test above: a stand-in graph, a 1 s per reading clock.
    interrupted: list[int] = []

    def run(fn: Any, *a: Any) -> tuple[None, None, None]:
        if not interrupted:  # the compiling call of the first generation
            interrupted.append(1)
            raise KeyboardInterrupt
        return None, None, None

    step, made = _emulated_compiled_step(tiny_tts, monkeypatch, cudagraphs, run)
    with pytest.raises(KeyboardInterrupt):
        step(None, None, None, 1, None)  # type: ignore[arg-type]
    for _ in range(5):  # the next generation
        step(None, None, None, 1, None)  # type: ignore[arg-type]
    assert len(made) == 2  # the interrupted graph is not kept: made again, not found half made
    assert step.compile_calls == 1 + timed  # the interrupted call, then a whole warm-up again
    assert step.compile_s == 1 + timed
    assert (step.span, step.sampler) in step._compiled and not step._warming[(step.span, step.sampler)]


@pytest.mark.parametrize("every", [2.5, math.nan, 0, True])
def test_stop_check_every_must_be_a_whole_number_of_at_least_one(
    tiny_tts: ChatterboxTTS, calls_of_tfmr: list[int], every: object
) -> None:
    # 2.5 looked for the stop token every 5 tokens, NaN never: every step to the cap past the stop
    with pytest.raises(
        ConfigError, match=f"stop_check_every must be a whole number .* got {re.escape(repr(every))}"
    ):
        t3_decode(
            tiny_tts.t3,
            tiny_tts.conds.t3,
            text_tokens(tiny_tts, TEXT),
            max_new_tokens=4,
            stop_check_every=every,  # type: ignore[arg-type]
        )
    assert not calls_of_tfmr  # refused before the prefill


def test_a_long_prompt_compiles_only_the_span_its_steps_attend_to(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The build compiled span 256 whatever the prefill: here ~765 positions, so every step attends
    # to span 1024, compiled by the first step (timed out of step_s), and 256's graph (on CUDA,
    # its graph pool) went unused. A stand-in torch.compile, counted: no compile to wait for.
    compiles: list[int] = []

    def counted(fn: Any, **kw: Any) -> Any:
        compiles.append(1)
        return fn

    monkeypatch.setattr(torch, "compile", counted)
    text = " ".join(["This is a fairly long sentence that keeps going on."] * 14)
    plan = DecodePlan.plain(tiny_tts.t3, step="compiled", max_cache_len=1024)
    assert prefill_length(tiny_tts, text) > 512
    r, _ = _run(tiny_tts, plan, text=text, n=20)
    step = plan.static_step(2)
    assert step is not None and sorted(span for span, _ in step._compiled) == [1024]
    assert len(compiles) == 1 and r.compile_steps == 0 and r.step_mode == "compiled"
    # one token, its prefill filling the cache (what the refusal of two tokens advises): no span
    # holds a first step's slots, and the warm-up asked for one (StopIteration, before 2026-12-06)
    full = DecodePlan.plain(tiny_tts.t3, step="compiled", max_cache_len=prefill_length(tiny_tts, TEXT))
    r, _ = _run(tiny_tts, full, n=1)
    assert r.tokens.shape == (1, 1)


def test_step_s_divides_by_the_steps_it_timed() -> None:
    # 11 tokens sampled: 10 steps after the prefill's token, 2 of them timed in compile_s (a graph
    # built mid-generation warming up): decode_s holds the other 8
    assert DecodeStats(decode_s=8.0, sampled=11, compile_steps=2).step_s == 1.0
    assert math.isnan(DecodeStats(decode_s=0.0, sampled=3, compile_steps=2).step_s)


def test_a_static_step_under_autocast_samples_the_eager_loops_tokens(tiny_tts: ChatterboxTTS) -> None:
    """Under autocast the static step's SpanStaticLayer.update casts to the cache's dtype (keys
    float32 from the rotary embedding, values bfloat16 from v_proj); no test ran it there."""
    tok = text_tokens(tiny_tts, TEXT)
    out: dict[str, Any] = {}
    for step in ("eager", "static"):
        plan = DecodePlan.plain(tiny_tts.t3, autocast=torch.bfloat16, step=step)
        torch.manual_seed(1)
        out[step] = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, tok, max_new_tokens=20, plan=plan)
    assert out["static"].step_mode == "static"
    assert torch.equal(out["eager"].tokens, out["static"].tokens)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_stop_in_a_later_block_leaves_everything_as_upstream(
    tiny_tts: ChatterboxTTS, steer: Steer, mode: str
) -> None:
    """A stop token in a later block (not the first) of a static stream: tokens, steps and the generator
    state left as upstream's T3 leaves it (docstring of decode_blocks)."""
    stop = tiny_tts.t3.hp.stop_speech_token
    cond, tok = tiny_tts.conds.t3, text_tokens(tiny_tts, TEXT)
    with shadow(tiny_tts.t3.speech_head, "forward", steer({12: stop})):
        torch.manual_seed(1)
        upstream = tiny_tts.t3.inference(t3_cond=cond, text_tokens=tok, max_new_tokens=40)
        after_upstream = torch.get_rng_state()
    with shadow(tiny_tts.t3.speech_head, "forward", steer({12: stop})):
        torch.manual_seed(1)
        plan = DecodePlan.plain(tiny_tts.t3, step=mode)
        ours = t3_decode(tiny_tts.t3, cond, tok, max_new_tokens=40, plan=plan, stop_check_every=8)
    assert upstream.size(1) == 12 and upstream[0, -1] == stop
    assert torch.equal(ours.tokens, upstream)
    assert ours.stopped and ours.steps == 12 and ours.sampled == 16
    assert torch.equal(torch.get_rng_state(), after_upstream)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_nan_right_after_the_stop_token_is_not_an_error(
    tiny_tts: ChatterboxTTS, steer: Steer, mode: str
) -> None:
    """The token whose probabilities were not finite: a NaN right after the stop token is never drawn;
    and the error names the token that was."""
    stop = tiny_tts.t3.hp.stop_speech_token
    plan = DecodePlan.plain(tiny_tts.t3, step=mode)
    tok = text_tokens(tiny_tts, TEXT)
    with shadow(tiny_tts.t3.speech_head, "forward", steer({3: stop, 4: None})):
        r = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, tok, max_new_tokens=20, plan=plan)
    assert r.stopped and r.tokens.size(1) == 3
    with (
        shadow(tiny_tts.t3.speech_head, "forward", steer({4: None})),
        pytest.raises(RuntimeError, match="at token 4"),
    ):
        t3_decode(tiny_tts.t3, tiny_tts.conds.t3, tok, max_new_tokens=20, plan=plan)


def test_a_span_compiled_mid_generation_is_compile_s_not_decode_s(
    tiny_tts: ChatterboxTTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A longer span's graph compiled mid-generation is compile time, not decode time
    (DecodeStats.compile_s / step_s docstrings). A stand-in torch.compile whose graphs take 1000 s (on a
    clock that jumps) on their first call."""
    jump = [0.0]
    monkeypatch.setattr(decode_module, "now", lambda device: time.perf_counter() + jump[0])

    def slow_first_call(fn: Any, **kw: Any) -> Any:
        first = [True]

        def run(*a: Any) -> Any:
            if first[0]:
                first[0] = False
                jump[0] += 1000.0
            return fn(*a)

        return run

    monkeypatch.setattr(torch, "compile", slow_first_call)
    plan = DecodePlan.plain(tiny_tts.t3, step="compiled")
    torch.manual_seed(1)
    r = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, text_tokens(tiny_tts, TEXT), max_new_tokens=240, plan=plan)
    step = plan.static_step(2)
    assert sorted(span for span, _ in step._compiled) == [256, 512]  # a second graph mid-way
    assert r.compile_steps == 1
    assert r.compile_s >= 2000  # both graphs' compiles
    assert r.decode_s < 1000 and r.step_s < 1000 / 200 and r.prefill_s < 1000


def test_switching_fused_on_rebuilds_the_step_on_the_fused_copy(tiny_tts: ChatterboxTTS) -> None:
    """``plan.fused`` switched on after a generation: the next one runs the fused copy
    (_static_step compares held.parts with plan.step_parts)."""
    plan = DecodePlan.plain(tiny_tts.t3, step="static")
    tok = text_tokens(tiny_tts, TEXT)
    torch.manual_seed(1)
    plain = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, tok, max_new_tokens=8, plan=plan)
    plan.fused = True
    torch.manual_seed(1)
    fused = t3_decode(tiny_tts.t3, tiny_tts.conds.t3, tok, max_new_tokens=8, plan=plan)
    step = plan.static_step(2)
    assert plan.describe().endswith(", fused")
    assert step.parts is plan.step_parts and step.parts.tfmr is not plan.decode.tfmr
    assert fused.compile_s > 0 and torch.equal(plain.tokens, fused.tokens)
