"""A T3 decode loop without the upstream overheads, on the upstream modules and weights.

Upstream ``T3.inference`` asks the transformer for attention weights and all hidden states at
every step (``output_attentions=True, output_hidden_states=True``), runs the speech head over the
whole prefill, and calls ``.item()``-style comparisons every token to look for the stop token.
This loop keeps the same arithmetic (the same prefill embeddings, classifier-free guidance on a
batch of two, and the same transformers logits processors in the same order) so with the same
seed it samples the same tokens, and drops the rest:

- the transformer returns only ``last_hidden_state`` and the KV cache;
- the speech head runs on the last position only;
- the stop token is looked for every ``stop_check_every`` steps, not every step (on CUDA each
  check is a host sync); tokens sampled after the stop are discarded, so the output is the same.

``DecodePlan`` says which weights and dtype run each phase: the prefill (one pass over ~100+
positions, compute-bound) and the decode steps (one position each, bound by reading every weight
once) may use different dtypes, because on some CPUs bfloat16 halves the bytes read per step but
has slow matmuls for long inputs.

``DecodePlan.step`` says how each decode step runs (the prefill is always the eager upstream one):

- ``"eager"`` (default, the reference): transformers' ``DynamicCache``, grown every step;
- ``"static"``: the prefill's keys/values are copied into a transformers ``StaticCache``
  allocated once at ``max_cache_len`` positions, and ``StaticStep.decode_one_token`` (fixed
  shapes, no host syncs) runs each step. Each step attends to a prefix of the cache (its
  ``span``: 256, 512, ... slots, the smallest that holds the positions in use), not to all
  ``max_cache_len`` slots: reading 1536 slots per layer when 250 are in use was most of a CPU
  step on ``deep-narrow``;
- ``"compiled"``: the same step under ``torch.compile(fullgraph=True, dynamic=False)`` (with
  CUDA graphs, ``mode="reduce-overhead"``, on CUDA), compiled once per plan and batch and reused by
  later generations, one graph per span (the first generation's first span as the step is built,
  any other by the first step that attends to it). Compiling is timed on its own
  (``DecodeStats.compile_s``); a compile that fails falls back to the static step with one
  warning (``StaticStep.fallback_reason``).

Turbo's T3 (GPT-2, ``T3.inference_turbo``) runs through the same loop: no guidance (batch 1), one
start-of-speech token, no learned speech positions (GPT-2 adds its own), and upstream Turbo's
processors in its order (temperature, top-k, top-p, then the repetition penalty over the tokens
sampled so far). Sampling (``sampling.Sampler``) runs on the device with the same logits processors and
the same draw as ``multinomial`` but without its host read, so equal logits give equal tokens
for a seed and the only host syncs are the stop checks; the static and compiled steps sample
inside the step (one compiled graph per token, as gpt-fast), only the noise of each draw is
drawn outside, from the stream's generator. All timers
use ``clock.now(device)`` and are read only at phase boundaries (after the prefill, at each
block's stop check), never inside a step.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.mtl_tts import punc_norm as mtl_punc_norm
from chatterbox.tts import punc_norm
from chatterbox.tts_turbo import punc_norm as turbo_punc_norm
from torch import nn
from torch.autograd.profiler import record_function
from transformers.cache_utils import StaticCache, StaticLayer

from ..core.clock import now
from ..core.compiling import compile_method, fell_back, replay, warmup_calls
from ..core.constants import SPEECH_VOCAB_SIZE, dtype_name
from ..core.errors import CacheError, ConfigError, as_int, whole_from_one
from ..core.families import check_speaks_languages, family_of, kv_layout, language_for
from ..core.positions import positions_needed, tokens_that_fit
from ..core.rng import default_generator
from ..instruments.attention import compiled_attention, compiled_with_code
from ..instruments.memory import tensor_bytes
from .alignment import alignment, copy_as_given_back, text_columns
from .fusion import fusable, fused_backbone
from .sampling import Sampler, exponential_noise, not_finite

StepMode = Literal["eager", "static", "compiled"]
STEP_MODES: tuple[str, ...] = get_args(StepMode)

# Static KV cache positions per plan and batch: upstream ``ChatterboxTTS.generate`` samples at most
# 1000 speech tokens, and the prefill (34 conditioning positions, the text with its start/stop
# tokens, two speech BOS) stays under 536 positions for texts up to ~500 text tokens.
DEFAULT_MAX_CACHE_LEN = 1536
# The smallest prefix of the static cache a step attends to; spans double from here.
MIN_SPAN = 256


def spans(max_cache_len: int) -> list[int]:
    """The spans a static step of ``max_cache_len`` slots attends to: 256, 512, ... while at most
    half of ``max_cache_len``, then ``max_cache_len`` itself. Each span is one more compiled
    graph, so one that would save less than half the reads is not worth it."""
    out, span = [], MIN_SPAN
    while 2 * span <= max_cache_len:
        out.append(span)
        span *= 2
    return [*out, max_cache_len]


def span_for(length: int, max_cache_len: int) -> int:
    """The smallest span holding ``length`` positions (slots ``[0, length)``)."""
    return next(s for s in spans(max_cache_len) if s >= length)


@dataclass
class T3Parts:
    """The pieces of T3 that a decode step touches, possibly a copy in another dtype."""

    tfmr: nn.Module
    speech_emb: nn.Module
    speech_pos_emb: Any
    speech_head: nn.Module

    @classmethod
    def of(cls, t3: T3) -> T3Parts:
        """The modules of ``t3`` a decode step runs (its own, not copies)."""
        # Turbo's GPT-2 has no learned speech positions (it adds its own position embedding).
        return cls(t3.tfmr, t3.speech_emb, getattr(t3, "speech_pos_emb", None), t3.speech_head)

    def modules(self) -> list[nn.Module]:
        """The modules these parts hold (no speech positions for Turbo)."""
        return [m for m in vars(self).values() if m is not None]

    def to(self, dtype: torch.dtype) -> T3Parts:
        """A copy of these weights in ``dtype`` (the originals are untouched)."""
        copies: list[Any] = [
            None if m is None else copy_as_given_back(m).to(dtype) for m in vars(self).values()
        ]
        return T3Parts(*copies)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (the speech head's)."""
        dtype: torch.dtype = next(self.speech_head.parameters()).dtype
        return dtype

    def nbytes(self) -> int:
        """Bytes of every weight these parts hold."""
        return sum(p.numel() * p.element_size() for m in self.modules() for p in m.parameters())

    def step_bytes(self) -> int:
        """Weight bytes one decode step reads: every weight once, but one row of each embedding
        table (a lookup reads only its token's row; the transformer's own token table, unused
        with input embeddings, counts one row too)."""
        total = 0
        for part in self.modules():
            for m in part.modules():
                for p in m.parameters(recurse=False):
                    rows = p.size(0) if isinstance(m, nn.Embedding) else 1
                    total += p.numel() // rows * p.element_size()
        return total

    def embed(self, token: torch.Tensor, position: torch.Tensor | int) -> torch.Tensor:
        """A sampled token's input embedding at learned speech ``position`` (an index tensor
        or an int; GPT-2 positions itself)."""
        x = self.speech_emb(token)
        if self.speech_pos_emb is None:
            return x
        if isinstance(position, int):
            return x + self.speech_pos_emb.get_fixed_embedding(position)
        return x + self.speech_pos_emb.emb(position)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The speech logits (B, vocab), float32, at the last position of the backbone's
        ``hidden`` states: only the next token's are computed."""
        out: torch.Tensor = self.speech_head(hidden[:, -1:]).float()[:, -1, :]
        return out


class FusedCopies:
    """Copies of decode weights with fused projections (``fusion.fused_backbone``), one per
    ``T3Parts`` they were made from, made once under a lock however many threads ask."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[int, tuple[T3Parts, T3Parts]] = {}  # id of the source: (source, copy)

    def of(self, decode: T3Parts) -> T3Parts:
        """``decode`` with a fused backbone (itself where there is nothing to fuse)."""
        with self._lock:
            made = self._made.get(id(decode))
            if made is None or made[0] is not decode:  # (an id reused by a newer object)
                d = decode
                copy_ = T3Parts(fused_backbone(d.tfmr), d.speech_emb, d.speech_pos_emb, d.speech_head)
                made = self._made[id(decode)] = (decode, copy_)
            return made[1]

    def drop(self) -> None:
        """Forget the fused copies made so far (the next ``of`` makes them again)."""
        with self._lock:
            self._made.clear()

    def nbytes(self) -> int:
        """Bytes of the fused backbones held (the embeddings and heads are the source's own)."""
        with self._lock:
            fused = [c.tfmr for d, c in self._made.values() if c.tfmr is not d.tfmr]
        return sum(p.numel() * p.element_size() for m in fused for p in m.parameters())


@dataclass
class DecodePlan:
    """Which weights (and autocast dtype, if any) run the prefill and the decode steps, and how
    each decode step runs (``step``: "eager" | "static" | "compiled", see the module docstring).

    ``max_cache_len`` is the number of positions (``positions_needed``) of the static KV cache
    that "static" and "compiled" allocate once per batch size (2 with classifier-free guidance,
    1 without) and keep on the plan (``StaticStep``, reused by later generations without
    reallocating or recompiling). Changing ``max_cache_len`` reallocates at the next generation
    (one already started keeps the length it read at its start); ``drop_static()`` frees the
    cache (e.g. after moving the model to another device).

    ``cpp_wrapper``: compile the "compiled" step with Inductor's C++ wrapper where there are no
    CUDA graphs (on a CPU): on ``deep-narrow`` 0.67-0.89x the time per token in four runs, at a
    longer first compile (docs/decode.md). Off by default.

    ``fused``: the "static" and "compiled" steps (and the stream engine's) run a copy of
    ``decode``'s backbone with q, k, v and gate, up each projected in one matmul
    (``fusion.fused_backbone``, ``step_parts``): on ``deep-narrow`` the compiled step took
    0.85x the time (0.88x in the engine at 4 streams), for one more backbone in memory. Off by
    default; the eager step and the prefill always run the model's own modules. The copy is made
    once: weights loaded into the model in place afterwards reach it only after ``drop_static()``.
    """

    prefill: T3Parts
    decode: T3Parts
    autocast: torch.dtype | None = None
    step: StepMode = "eager"
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN
    cpp_wrapper: bool = False
    # What a request too long for the static cache is told to do ({need}: the positions it needs),
    # in the words of whoever holds the plan.
    cache_fix: str = "set plan.max_cache_len >= {need} (or use step='eager')"
    # What a generation refused while another holds the static cache may do instead, likewise.
    busy_fix: str = "decode this one with step='eager'"
    fused: bool = False
    # The fused copies, shared with the plans made from this one by dataclasses.replace (the
    # wrapper's plan per step): one copy of the decode weights however many plans run it.
    fusion: FusedCopies = field(default_factory=lambda: FusedCopies(), repr=False, compare=False)
    _static: dict[int, StaticStep] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Held while a generation finds or builds its step and claims it (``_static_step``).
    _building: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.step not in STEP_MODES:
            raise ConfigError(f"unknown decode step {self.step!r}: use one of {', '.join(STEP_MODES)}")
        check_cache_len(self.max_cache_len, self.decode.tfmr.config)

    @classmethod
    def plain(cls, t3: T3, **kwargs: Any) -> DecodePlan:
        """A plan that runs the prefill and the decode steps on ``t3``'s own weights."""
        parts = T3Parts.of(t3)
        return cls(parts, parts, **kwargs)

    def describe(self) -> str:
        """One line for reports: the dtypes each phase runs in, and the decode step where not eager."""
        if self.autocast is not None:
            what = f"autocast {dtype_name(self.autocast)} over {dtype_name(self.prefill.dtype)} weights"
        elif self.prefill is self.decode:
            what = f"native {dtype_name(self.decode.dtype)}"
        else:
            what = f"prefill {dtype_name(self.prefill.dtype)}, decode {dtype_name(self.decode.dtype)}"
        if self.step == "eager":
            return what
        on_cpu = next(self.decode.speech_head.parameters()).device.type != "cuda"
        cpp = self.cpp_wrapper and self.step == "compiled" and on_cpu  # CUDA graphs have no wrapper
        fused = self.fused and fusable(self.decode.tfmr)
        return f"{what}, {self.step} step" + (" (C++ wrapper)" if cpp else "") + (", fused" if fused else "")

    @property
    def step_parts(self) -> T3Parts:
        """What the static and compiled steps run: ``decode``, or with ``fused`` a copy of it whose
        backbone has fused projections (``fusion``: made on first use, kept until ``drop_static``)."""
        return self.fusion.of(self.decode) if self.fused else self.decode

    def static_step(self, batch: int) -> StaticStep | None:
        """The static step (cache and compiled function) kept for ``batch``, if one was built."""
        return self._static.get(batch)

    def static_bytes(self) -> int:
        """Bytes of the static KV caches this plan holds (every batch size built so far)."""
        layers = [layer for s in self._static.values() for layer in s.cache.layers]
        return tensor_bytes(t for layer in layers for t in (layer.keys, layer.values))

    def drop_static(self) -> None:
        """Forget the static caches, compiled steps and fused copies (those of the plans sharing
        ``fusion`` too): the next generation builds new ones."""
        self._static.clear()
        self.fusion.drop()

    def context(self, device: torch.device) -> ExitStack:
        """Inference mode, and autocast on ``device`` when the plan has an autocast dtype, entered
        now: use it as ``with plan.context(device):`` around each compute step, never across a
        yield (autocast and inference mode are thread-wide and must not leak into the consumer's
        code)."""
        stack = ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast:
            stack.enter_context(torch.autocast(device.type, self.autocast))
        return stack


class SpanStaticLayer(StaticLayer):
    """transformers' ``StaticLayer`` whose steps attend to its first ``span`` slots only (the
    keys, values and mask of a step end there), storing keys and values in its own dtype, as
    ``DynamicCache`` does by concatenation: under autocast the keys leave the float32 rotary
    embedding in float32 while the values leave ``v_proj`` in the autocast dtype, and
    ``index_copy_`` refuses a mix."""

    def __init__(self, max_cache_len: int) -> None:
        super().__init__(max_cache_len)
        self.span = max_cache_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values (in the cache's dtype); the span they attend to."""
        dtype = cast(torch.Tensor, self.keys).dtype
        super().update(key_states.to(dtype), value_states.to(dtype), cache_kwargs)
        return self.attended()

    def attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a step attends to: the first ``span`` slots."""
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)
        return keys[:, :, : self.span], values[:, :, : self.span]

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """The mask covers the span, not the whole cache (transformers asks the layer)."""
        return self.span, 0


class StaticStep:
    """One decode step of fixed shapes over a ``StaticCache`` allocated once, optionally compiled.

    ``decode_one_token(token (B, 1) long, position (1, 1) long, cache_position (1,) long, q)``
    returns the speech logits (B, vocab) float32 for ``token`` at learned speech position
    ``position`` and KV cache slot ``cache_position`` (speech embedding + learned position
    embedding looked up from the tensor, the transformer over the static cache, the speech head
    on the last position) and the next token (1, 1) sampled from them by ``sampler`` given the
    noise ``q`` (``exponential_noise``, drawn outside from the stream's generator), marked in
    ``seen``: as gpt-fast's step, the sampling is inside the step, so a compiled step is one
    graph (one CUDA graph replay) per token. It reads no value back to the host. The caller says
    how many slots are in use (``length``, known on the host): the step attends to the smallest
    span of ``spans(max_cache_len)`` that holds them.

    With ``compile=True`` it runs under ``torch.compile(fullgraph=True, dynamic=False)``
    (``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA), one graph per span and sampler
    (sampling settings are constants of the graph). The graph of the span the first generation's
    first step attends to (``first_length``: the slots in use then) is compiled here, by
    ``warmup_calls(cudagraphs)`` calls at cache slot 0 (overwritten by the next ``load``); another
    span's graph on the first step that needs it, and the steps after that one still warming it up
    (with CUDA graphs the second call records). All are timed in ``compile_s``. A warm-up call
    interrupted (Ctrl-C mid-compile) leaves its graph unmade: the next step needing it makes and
    times it afresh. If compiling raises, the step runs eagerly instead, ``fallback_reason`` says
    why and one warning is issued.

    Dynamo checks its guards (~340 tensors: every weight and cache tensor) before each call,
    about 1 ms of host time per step on the 30-layer T3. With ``skip_guards`` (default) they are
    checked only on the first call after ``begin()`` (decode_blocks calls it once per
    generation) or after a change of span: the later steps pass the same tensors laid out the
    same way (views of the same aranges, the token expanded to the batch) under the same modes,
    and each span's code object holds only its own compiled entry, so the check cannot come out
    differently. Modules changed in place mid-generation would go unnoticed until the next one.
    """

    def __init__(
        self,
        parts: T3Parts,
        *,
        batch: int,
        max_cache_len: int,
        dtype: torch.dtype,
        device: torch.device,
        compile: bool = False,
        enter: Callable[[], Any] = torch.inference_mode,
        sampler: Sampler,
        cpp_wrapper: bool = False,
        first_length: int = 1,
    ) -> None:
        self.parts, self.batch, self.max_cache_len = parts, batch, max_cache_len
        self.cpp_wrapper = cpp_wrapper
        self.sampler = sampler  # the warm-up's; ``begin`` sets each generation's
        self.dtype, self.device = dtype, torch.device(device)
        self.embed_dtype = parts.dtype
        config: Any = parts.tfmr.config
        heads, head_dim = kv_layout(config)
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        self.cache.layers = [
            SpanStaticLayer(max_cache_len) if type(layer) is StaticLayer else layer
            for layer in self.cache.layers
        ]
        with enter():
            self.cache.early_initialization(batch, heads, head_dim, dtype, self.device)
            # The tokens the repetition penalty applies to: the step updates it (a fixed address,
            # as the cache's tensors, so CUDA graphs may write it); decode_blocks resets it.
            vocab = int(cast(nn.Embedding, parts.speech_emb).num_embeddings)  # = the head's outputs
            self.seen = torch.zeros((1, vocab), dtype=torch.bool, device=self.device)
            torch._dynamo.mark_static_address(self.seen)
        self.span = max_cache_len  # what the layers attend to now (set by the first call)
        self.cudagraphs = False
        self.fallback_reason: str | None = None
        self.compile_s = 0.0
        self.compiled = False
        self._compiled: dict[tuple[int, Sampler], Callable[..., Any]] = {}  # per span and sampler
        # Calls of a graph made mid-generation still warming up (timed in compile_s): with CUDA
        # graphs its first call compiles, the second records, only the third replays.
        self._warming: dict[tuple[int, Sampler], int] = {}
        self.compile_calls = 0  # such calls so far (``DecodeStats.compile_steps``)
        # The attention kernels the compiled graph calls, read from Inductor's generated code
        # (the profiler cannot see inside a compiled graph); empty when not compiled.
        self.attention_kernels: list[str] = []
        self.skip_guards = True
        self._guarded = False  # guards checked since the last begin() or change of span
        self.busy = False  # a generation (maybe a paused stream) holds the cache (``claim``)
        self._claiming = threading.Lock()
        if compile:
            self.compiled, self.cudagraphs = True, self.device.type == "cuda"
            self._warm_up(enter, first_length)

    def decode_one_token(
        self, token: torch.Tensor, position: torch.Tensor, cache_position: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of fixed shapes (the class docstring gives them): the compile boundary."""
        p = self.parts
        embeds = p.embed(token, position).to(self.embed_dtype)
        out = p.tfmr(
            inputs_embeds=embeds, past_key_values=self.cache, cache_position=cache_position, use_cache=True
        )
        logits = p.logits(out.last_hidden_state)
        token, bad = self.sampler.pick(logits, self.seen, q)
        self.sampler.saw(self.seen, token, first=False)
        return logits, token, bad

    def _warm_up(self, enter: Callable[[], Any], length: int) -> None:
        """Compile the graph of the span holding ``length`` slots (the first step's: a long prompt's
        steps never attend to the first span) and read which attention op it calls."""
        # Warm-up inputs laid out as decode_blocks passes them (dynamo guards on strides): the
        # sampled token expanded to the batch, views of aranges for the positions.
        token = torch.zeros((1, 1), dtype=torch.long, device=self.device).expand(self.batch, 1)
        position = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        slot = torch.zeros((1,), dtype=torch.long, device=self.device)
        q = torch.ones((1, self.seen.size(1)), device=self.device)
        t0 = now(self.device)
        self._set_span(span_for(length, self.max_cache_len))
        try:
            fn = self._function()  # torch.compile may raise here already (no backend, say)
            for k in range(warmup_calls(self.cudagraphs)):
                with enter():
                    if k == 0:  # the call that compiles: keep what Inductor generated
                        _, code = compiled_with_code(lambda *a: self._run(fn, *a), token, position, slot, q)
                        self.attention_kernels = compiled_attention(code)
                    else:
                        self._run(fn, token, position, slot, q)
        except Exception as e:
            self._give_up(e)
        self.compile_s += now(self.device) - t0

    def _function(self) -> Callable[..., Any]:
        """What runs a step at the current span and sampler: its compiled graph (made on first
        use, a code object of its own so graphs do not share a recompile limit) or the eager step."""
        if not self.compiled:
            return self.decode_one_token
        key = (self.span, self.sampler)
        if key not in self._compiled:
            self._compiled[key] = compile_method(
                StaticStep.decode_one_token, self, self.cudagraphs, cpp_wrapper=self.cpp_wrapper
            )
        return self._compiled[key]

    def _give_up(self, e: Exception) -> None:
        """A compile failed: run the static step eagerly from now on, with one warning."""
        self.fallback_reason = fell_back(
            e, "the T3 decode step", "running the static-cache step eagerly", stacklevel=3
        )
        self.compiled, self.cudagraphs = False, False
        self._compiled.clear()
        self._warming.clear()
        self.attention_kernels = []

    def _set_span(self, span: int) -> None:
        if span != self.span:
            for layer in self.cache.layers:
                if isinstance(layer, SpanStaticLayer):
                    layer.span = span
            self.span, self._guarded = span, False

    @property
    def mode(self) -> str:
        """What actually runs: "compiled", or "static" (asked for, or after a compile failure)."""
        return "compiled" if self.compiled else "static"

    def claim(self, fix: str) -> None:
        """Take the cache for one generation until ``busy`` is cleared (when its
        ``decode_blocks`` ends), or a CacheError while another holds it, offering ``fix``
        (the plan's ``busy_fix``) besides waiting. Checked and taken under one lock: two threads
        starting at once cannot both pass."""
        with self._claiming:
            if self.busy:
                raise CacheError(
                    "another generation (e.g. a paused generate_stream) still uses this plan's static "
                    f"KV cache; finish or close it first, or {fix}"
                )
            self.busy = True

    def begin(self, sampler: Sampler, seen: torch.Tensor) -> None:
        """A new generation starts (the cache ``claim``ed), sampled by ``sampler`` after the
        tokens in ``seen``: the next call checks dynamo's guards again."""
        self.sampler = sampler
        self.seen.copy_(seen)
        self._guarded = False

    def __call__(
        self,
        token: torch.Tensor,
        position: torch.Tensor,
        cache_position: torch.Tensor,
        length: int,
        q: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's logits, next token and whether its probabilities were not finite (B, 1);
        ``length``: slots in use once this step has written its own; ``q``: the next token's noise."""
        self._set_span(span_for(length, self.max_cache_len))
        key = (self.span, self.sampler)
        if self.compiled and key not in self._compiled:  # compiled on this call, warmed on the next
            self._warming[key] = warmup_calls(self.cudagraphs)
        if self.compiled and self._warming.get(key):
            self.compile_calls += 1
            t0 = now(self.device)
            try:
                out = self._run(self._function(), token, position, cache_position, q)
            except Exception as e:
                self._give_up(e)
                return self._run(self.decode_one_token, token, position, cache_position, q)
            except BaseException:
                # Interrupted (Ctrl-C mid-compile, or mid-record with CUDA graphs): what the function
                # holds is unknown, so the next step needing it makes it afresh, timed as compiling.
                self._compiled.pop(key, None)  # (none if torch.compile itself was interrupted)
                del self._warming[key]
                raise
            finally:
                self.compile_s += now(self.device) - t0
            self._warming[key] -= 1  # only once the call is done
            return out
        return self._run(self._function(), token, position, cache_position, q)

    def _run(
        self,
        fn: Callable[..., Any],
        token: torch.Tensor,
        position: torch.Tensor,
        slot: torch.Tensor,
        q: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        skip = self.compiled and self.skip_guards and self._guarded
        logits, nxt, bad = replay(
            fn, token, position, slot, q, cudagraphs=self.cudagraphs, compiled=self.compiled, skip_guards=skip
        )
        self._guarded = True
        return logits, nxt, bad

    def load(self, past: Any) -> None:
        """Copy a prefill's cache (keys/values of its first positions) into slots 0..n-1, cast to
        this cache's dtype, and zero the slots past n: the causal mask hides an earlier
        generation's values there, but not a NaN or inf one left (0 x NaN is NaN), which would
        fail every later generation on this step."""
        layers: list[Any] = self.cache.layers
        for mine, theirs in zip(layers, past.layers, strict=True):
            n = theirs.keys.size(2)
            mine.keys[:, :, :n].copy_(theirs.keys)
            mine.values[:, :, :n].copy_(theirs.values)
            mine.keys[:, :, n:].zero_()
            mine.values[:, :, n:].zero_()


def _cast_cache(past: Any, dtype: torch.dtype) -> None:
    """Cast every key/value tensor of a transformers cache in place (prefill → decode dtype)."""
    for layer in past.layers:
        layer.keys = layer.keys.to(dtype)
        layer.values = layer.values.to(dtype)


def head_logits(parts: T3Parts, embeds: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
    """The speech logits (B, vocab) float32 at the last of ``embeds``' positions, and the cache."""
    out = parts.tfmr(inputs_embeds=embeds, past_key_values=past, use_cache=True)
    return parts.logits(out.last_hidden_state), out.past_key_values


def speech_token_limit(t3: T3) -> int | None:
    """The most tokens a stream of T3 may sample whatever its cache holds: its learned speech
    positions (Llama's 4096), or None where the backbone positions itself (GPT-2, Turbo's: its
    positions bound the whole cache, ``check_cache_len``)."""
    return int(t3.hp.max_speech_tokens) if t3.hp.input_pos_emb == "learned" else None


def gpt2_positions(config: Any) -> int | None:
    """The positions a GPT-2 backbone (Turbo's) embeds, one learned position per input of the
    whole sequence; None for Llama, whose rotary positions have no table."""
    return getattr(config, "n_positions", None)


def checked_seed(seed: object) -> int:
    """``seed`` as a Python int (a numpy integer is taken), or a ConfigError where no generator
    takes it: not a whole number (``True`` neither), or outside what ``manual_seed`` takes. A
    stream checks it before it draws: its own seeds failed in numpy or torch with their errors."""
    whole = as_int(seed)
    # torch.Generator.manual_seed takes these (a negative seed as its 64-bit two's complement)
    if whole is None or not -(2**63) <= whole < 2**64:
        raise ConfigError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    return whole


def checked_cap(max_new_tokens: object) -> int:
    """``max_new_tokens`` as a Python int (a numpy integer is taken), or a ConfigError where it is
    not a whole number: a cap of ``True`` streamed one token, one of 40.5 failed in torch."""
    whole = as_int(max_new_tokens)
    if whole is None:
        raise ConfigError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    return whole


def checked_stop_check_every(stop_check_every: object) -> int:
    """``stop_check_every`` as a Python int (a numpy integer is taken), or a ConfigError where it is
    not a whole number of at least 1: 0 divided by zero, 2.5 looked for the stop token every 5
    tokens and NaN never (every step up to the cap, past the stop token)."""
    refusal = f"stop_check_every must be a whole number of tokens, at least 1, got {stop_check_every!r}"
    return whole_from_one(stop_check_every, refusal)


def check_new_tokens(t3: T3, max_new_tokens: int) -> None:
    """A ConfigError for a token cap below 1, past ``speech_token_limit`` or, on a GPT-2
    backbone (Turbo's), past all its positions: cheap checks that need no prefill, made before
    anything is sized by the cap (a stream's noise track: 10**20 tokens failed inside torch's
    ``randn``); the exact check with the prefill is ``check_positions``."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = speech_token_limit(t3)
    if limit is not None and max_new_tokens > limit:
        raise ConfigError(
            f"{max_new_tokens} new tokens is beyond the {limit} speech positions T3 has: "
            f"ask for {limit} or fewer"
        )
    positions = gpt2_positions(t3.tfmr.config)
    if positions is not None and max_new_tokens > positions:
        raise ConfigError(
            f"{max_new_tokens} new tokens is beyond the {positions} positions of T3's GPT-2 backbone, "
            "which the prompt shares: ask for fewer"
        )


def speech_ids(ids: list[int]) -> list[int]:
    """The ids S3Gen vocodes: T3's speech tokens without its start, stop and other special ids."""
    return [t for t in ids if t < SPEECH_VOCAB_SIZE]


def generated_ids(ids: list[int], t3: T3) -> list[int]:
    """The ids a whole generation's upstream ``generate`` vocodes: for the standard and
    multilingual models (``drop_invalid_tokens``) only those after a sampled start-of-speech
    token (random weights sample it), then the speech tokens; Turbo's only the speech tokens.
    A stream cannot take back what it played, so streams keep ``speech_ids`` of every block.
    (Upstream's ``drop_invalid_tokens`` fails on two sampled start ids; here the first cuts.)"""
    start = t3.hp.start_speech_token
    if not is_turbo(t3) and start in ids:
        ids = ids[ids.index(start) + 1 :]
    return speech_ids(ids)


def invalid_ids(ids: list[int], stop_token: int) -> int:
    """How many of T3's ``ids`` are neither speech tokens nor its stop token: ids random weights
    sample that S3Gen cannot vocode (dropped before it, as upstream drops them)."""
    return sum(t >= SPEECH_VOCAB_SIZE and t != stop_token for t in ids)


def text_tokens(tts: Any, text: str, cfg_weight: float = 0.5, language_id: str | None = None) -> torch.Tensor:
    """T3's text input, exactly as each family's upstream ``generate`` builds it: its punctuation
    normalisation and tokenizer (multilingual: with ``language_id``, "en" when None, as every
    generation here defaults it, so a cache sized from these tokens fits the generation's; the
    English-only families refuse any other, ``spoken_language``); for the guided families a second
    copy for classifier-free guidance and start and stop text tokens (Turbo: neither)."""
    # (before 2026-12-07 an English-only model spoke English when asked for French: the wrapper's
    # generate and speech_tokens took any language_id and ignored it)
    language_id = spoken_language(tts, language_id)
    if is_turbo(tts.t3):
        encoded = tts.tokenizer(turbo_punc_norm(text), return_tensors="pt", padding=True, truncation=True)
        return cast(torch.Tensor, encoded.input_ids).to(tts.device)
    if language_id is not None:
        tokens = tts.tokenizer.text_to_tokens(mtl_punc_norm(text), language_id=language_id)
    else:
        tokens = tts.tokenizer.text_to_tokens(punc_norm(text))
    hp = tts.t3.hp
    if tokens.size(1) > hp.max_text_tokens:  # T3's learned text positions end there
        raise ConfigError(
            f"the text is {tokens.size(1)} text tokens, beyond the {hp.max_text_tokens} T3 has positions "
            "for: split it into shorter texts"
        )
    tokens = tokens.to(tts.device)
    if cfg_weight > 0.0:
        tokens = torch.cat([tokens, tokens], dim=0)
    return F.pad(F.pad(tokens, (1, 0), value=hp.start_text_token), (0, 1), value=hp.stop_text_token)


@dataclass
class DecodeStats:
    """Filled in by ``decode_blocks`` as it runs (time spent suspended at a yield excluded).

    ``compile_s`` is the time spent building the static step in this generation (allocating its
    cache and, for "compiled", compiling and warming it up); it is in neither ``prefill_s`` nor
    ``decode_s``, and is 0 when the plan's step was reused and no longer span compiled.
    ``step_mode`` is what ran the decode steps: "eager", "static" or "compiled" ("static" after
    a compile failure).
    """

    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # tokens kept (up to and including a stop token)
    sampled: int = 0  # tokens sampled: past a stop token, to the end of its block
    stopped: bool = False
    compile_s: float = 0.0
    compile_steps: int = 0  # steps that warmed up a graph built mid-generation: timed in compile_s
    step_mode: str = "eager"

    @property
    def step_s(self) -> float:
        """Mean seconds per decode step (the first token comes from the prefill). ``decode_s``
        covers every step run up to the block where the stop token was seen, but those timed in
        ``compile_s`` (``compile_steps``), so it is divided by those steps, not by the tokens
        kept. NaN when no step was timed (one token, from the prefill: before 2026-12-04 that
        token's sampling was reported as a step)."""
        timed = self.sampled - 1 - self.compile_steps
        return self.decode_s / timed if timed > 0 else math.nan


@dataclass(kw_only=True)
class DecodeResult(DecodeStats):
    """The stats plus the tokens of the conditional stream (stop token included when sampled)."""

    tokens: torch.Tensor  # (1, steps) long


def _check_static(
    plan: DecodePlan,
    device: torch.device,
    batch: int,
    prefill_len: int,
    max_new_tokens: int,
    max_cache_len: int,
) -> None:
    """Refuse, before anything runs, a request that a static cache of ``max_cache_len`` positions
    (the plan's, as the generation read it) cannot serve."""
    check_cache_len(max_cache_len, plan.decode.tfmr.config)  # set after the plan was made
    dec_device = next(plan.decode.tfmr.parameters()).device
    if dec_device != device:
        raise CacheError(
            f"the plan's decode weights are on {dec_device} but the model is on {device}: "
            "build the DecodePlan after moving the model"
        )
    held = plan.static_step(batch)
    if held is not None and held.device != device:
        raise CacheError(
            f"the plan's static KV cache is on {held.device} but the model is on {device}: "
            "call plan.drop_static() (or build a new DecodePlan) after moving the model"
        )
    holder = "the plan's static cache holds max_cache_len"
    check_room(prefill_len, max_new_tokens, max_cache_len, holder, plan.cache_fix)


def check_cache_len(max_cache_len: object, config: Any) -> None:
    """Refuse a cache length that is not a whole number (a numpy integer is one), one too short for
    any request (a prefill holds conditioning and a start token), or one longer than the backbone
    ``config`` has positions for: GPT-2 (Turbo's) embeds a learned position for every input of the
    sequence, so no step could run past its ``n_positions``."""
    whole = as_int(max_cache_len)  # 400.0 failed later inside torch, with a TypeError naming nothing
    if whole is None:
        raise ConfigError(f"max_cache_len must be a whole number of positions, got {max_cache_len!r}")
    if whole < 2:
        raise ConfigError(f"max_cache_len must be at least 2, got {max_cache_len}")
    positions = gpt2_positions(config)
    if positions is not None and whole > positions:
        raise ConfigError(
            f"max_cache_len {max_cache_len} is past the {positions} positions of T3's GPT-2 backbone: "
            f"give {positions} or less"
        )


def check_room(
    prefill_len: int,
    max_new_tokens: int,
    max_cache_len: int,
    holder: str,
    fix: str,
    name: str = "max_new_tokens",
) -> None:
    """A CacheError saying what fits when the request's ``positions_needed`` exceed
    ``max_cache_len`` (``holder``: what holds that many, "the engine holds max_cache_len";
    ``fix`` may name ``{need}``; ``name``: what the caller calls the token cap, a flag on the
    command line)."""
    need = positions_needed(prefill_len, max_new_tokens)
    if need > max_cache_len:
        room = tokens_that_fit(prefill_len, max_cache_len)
        shorter = f"lower {name} to {room} or " if room >= 1 else ""
        raise CacheError(
            f"the request needs {need} positions ({prefill_len} of prefill, then one for each of its "
            f"{max_new_tokens} new tokens but the last) but {holder}={max_cache_len}: "
            f"{shorter}{fix.format(need=need)}"
        )


def check_positions(config: Any, prefill_len: int, max_new_tokens: int, name: str = "max_new_tokens") -> None:
    """Refuse, whatever the step, a request past the positions of a GPT-2 backbone (Turbo's):
    it embeds a learned position for every input, so the eager step would fail there with an
    index error after the work before it (``name``: the token cap's, as ``check_room``)."""
    positions = gpt2_positions(config)
    if positions is not None:
        holder = "T3's GPT-2 backbone has n_positions"
        check_room(prefill_len, max_new_tokens, positions, holder, "shorten the text", name)


def spoken_language(tts: Any, language_id: object) -> str | None:
    """The language ``tts`` speaks when asked for ``language_id``: a multilingual model's
    (default "en"; one it lacks, or one whose front end needs what this machine lacks: a package,
    upstream's Chinese table, refused by ``language_for``), None for the English-only families,
    which refuse any but English (``check_speaks_languages``). One that is no text, or blank, is
    refused on every family (before 2026-12-07: an AttributeError, or a blank read as English by
    the multilingual model and refused by the others)."""
    if language_id is not None and (not isinstance(language_id, str) or not language_id.strip()):
        raise ConfigError(
            "language_id must be a language code such as 'fr', or None (the model's default), got "
            f"{type(language_id).__name__} {language_id!r}"
        )
    check_speaks_languages(family_of(tts).name, language_id)
    return language_for(tts, language_id)


def checked_prefill(
    tts: Any, text: str, max_new_tokens: int, name: str = "max_new_tokens", language_id: str | None = None
) -> int:
    """The positions T3's prefill fills for ``text`` (in ``language_id``, multilingual) with
    ``tts``'s voice (``prefill_length``), once ``check_positions`` has found room after it for
    ``max_new_tokens`` (``name``: the caller's word for them, a flag on the command line)."""
    prefill = prefill_length(tts, text, language_id=language_id)
    check_positions(tts.t3.tfmr.config, prefill, max_new_tokens, name)
    return prefill


def _static_step(
    plan: DecodePlan,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    enter: Any,
    sampler: Sampler,
    max_cache_len: int,
    first_length: int,
) -> tuple[StaticStep, bool]:
    """The plan's static step for ``batch`` with a cache of ``max_cache_len`` positions, built
    (and compiled, for the span of this generation's first step, holding ``first_length`` slots)
    if there is none that fits, and ``claim``ed for this generation; and whether it was built now.
    A step built for a length the plan no longer has (resized since the generation read it)
    serves this generation only.

    Found or built, and claimed, under the plan's lock: two generations starting at once on a
    fresh plan each built (and compiled) a step of their own. The second now waits for the
    first's build and meets its claim (a CacheError while the first runs). Holding the lock
    through a compile cannot deadlock: it is taken only here, at the start of a generation, never
    held across a yield or a step, and nothing run under it (the build, its compile and replays,
    ``FusedCopies``) takes it; a generation on another plan does not wait for it."""
    with plan._building:
        held = plan.static_step(batch)
        compile = plan.step == "compiled"
        cpp_wrapper = plan.cpp_wrapper and compile and device.type != "cuda"  # where it has an effect
        same = held is not None and held.cpp_wrapper == cpp_wrapper and held.parts is plan.step_parts
        if held is not None and same and held.max_cache_len == max_cache_len:
            # A step whose compile failed is kept: it does not retry (and warn) every generation.
            if compile == (held.compiled or held.fallback_reason is not None):
                if held.dtype != dtype:
                    raise CacheError(
                        f"the plan's static KV cache holds {dtype_name(held.dtype)} but this prefill gives "
                        f"{dtype_name(dtype)}: call plan.drop_static() after changing the plan's dtypes"
                    )
                held.claim(plan.busy_fix)
                return held, False
        step = StaticStep(
            plan.step_parts,
            batch=batch,
            max_cache_len=max_cache_len,
            dtype=dtype,
            device=device,
            compile=compile,
            enter=enter,
            sampler=sampler,
            cpp_wrapper=cpp_wrapper,
            first_length=first_length,
        )
        step.claim(plan.busy_fix)  # (a new step: nobody else holds it)
        if max_cache_len == plan.max_cache_len:  # else the next generation builds the new length
            plan._static[batch] = step
        return step, True


def prefill_embeds(t3: T3, t3_cond: T3Cond, text_tokens: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """Exactly upstream's prefill input (B, positions, dim): conditioning, text, one start-of-
    speech token from ``prepare_input_embeds`` and a second one appended by ``T3.inference``
    (``inference_turbo`` appends none)."""
    bos = torch.full((1, 1), t3.hp.start_speech_token, dtype=torch.long, device=text_tokens.device)
    embeds, _ = t3.prepare_input_embeds(
        t3_cond=t3_cond,
        text_tokens=text_tokens,
        speech_tokens=bos.expand(text_tokens.size(0), 1),
        cfg_weight=cfg_weight,
    )
    if is_turbo(t3):
        return embeds
    bos_embed = T3Parts.of(t3).embed(bos, 0)
    return torch.cat([embeds, bos_embed.expand(embeds.size(0), -1, -1)], dim=1)


def prefill_length(tts: Any, text: str, cfg_weight: float = 0.5, language_id: str | None = None) -> int:
    """Positions T3's prefill fills for ``text`` with ``tts``'s prepared voice (conditioning,
    text, start-of-speech tokens): ``positions_needed`` turns it into a static cache's length."""
    # On a copy: T3 caches the prompt embedding on the T3Cond it is given.
    cond = T3Cond(**vars(tts.conds.t3))
    with torch.inference_mode():
        return prefill_embeds(tts.t3, cond, text_tokens(tts, text, cfg_weight, language_id), cfg_weight).size(
            1
        )


def is_turbo(t3: T3) -> bool:
    """Turbo's T3: GPT-2, sampled by ``inference_turbo``."""
    return bool(getattr(t3, "is_gpt", False))


def decode_blocks(
    t3: T3,
    t3_cond: T3Cond,
    text_tokens: torch.Tensor,
    *,
    max_new_tokens: int,
    plan: DecodePlan | None = None,
    temperature: float = 0.8,
    top_p: float = 0.95,
    min_p: float = 0.05,
    repetition_penalty: float = 1.2,
    cfg_weight: float = 0.5,
    top_k: int = 1000,
    stop_check_every: int = 8,
    stats: DecodeStats | None = None,
    logits_out: list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Generator[torch.Tensor, None, None]:
    """Sample speech tokens like ``T3.inference`` and yield them in blocks of ``stop_check_every``
    (1, k) as soon as each block has been checked for the stop token (the last block ends with
    the stop token when one was sampled). Same arguments, same tokens for a seed; for Turbo's T3
    the arguments and tokens of ``T3.inference_turbo`` (``cfg_weight`` and ``min_p`` unused).

    ``logits_out``, when given, receives the (B, vocab) float32 logits each token was sampled
    from (B = 2 with classifier-free guidance), one tensor per sampled token. ``generator``
    (on T3's device) is what the samples are drawn from; ``None``: the global generator, as
    upstream. The draws of tokens sampled after a stop token (before the block's check saw it)
    are taken back at that check: the generator is left where upstream's T3 leaves it, so what
    draws from it next (S3Gen's noise in a seeded ``generate``) draws what it draws upstream.
    """
    check_new_tokens(t3, max_new_tokens)
    stop_check_every = checked_stop_check_every(stop_check_every)
    plan = plan or DecodePlan.plain(t3)
    stats = stats if stats is not None else DecodeStats()
    hp = t3.hp
    device = t3.speech_head.weight.device
    generator = generator if generator is not None else default_generator(device)
    text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=device)
    static = plan.step != "eager"
    turbo = is_turbo(t3)
    if turbo:
        cfg_weight = 0.0
    # its settings checked before anything runs (before 2026-12-04, after the prefill)
    sampler = Sampler(turbo, cfg_weight, temperature, top_p, min_p, top_k, repetition_penalty)

    ctx = functools.partial(plan.context, device)  # around each compute step, never across a yield

    step: StaticStep | None = None
    scope = ExitStack()  # what the multilingual alignment analyzer changes, undone at the end
    try:
        t0 = now(device)
        for f in fields(DecodeStats):  # a stats object passed again starts afresh
            setattr(stats, f.name, f.default)
        with ctx():
            embeds = prefill_embeds(t3, t3_cond, text_tokens, cfg_weight)
            batch, prefill_len = embeds.size(0), embeds.size(1)
            check_positions(plan.decode.tfmr.config, prefill_len, max_new_tokens)
            # Multilingual: upstream's alignment analyzer, which reads attention weights. The static
            # and compiled steps have none to give it: they decode without it (README).
            watching: Callable[[], AbstractContextManager[None]] = nullcontext
            analyzers: list[Any] = []  # one (this stream's) or none
            if hp.is_multilingual and not static:
                tfmrs = [plan.prefill.tfmr, plan.decode.tfmr]
                text = text_columns(prefill_len, text_tokens.size(1))
                aligned = scope.enter_context(alignment(tfmrs, text, hp.stop_speech_token))
                watching, analyzers = aligned.watching, [aligned.analyzer]
            if static:
                # Read once, for the check and the build: before 2026-12-05 a resize during the
                # prefill (the wrapper's set_max_cache_len) built a step too short for the request.
                max_cache_len = plan.max_cache_len
                _check_static(plan, device, batch, prefill_len, max_new_tokens, max_cache_len)
            with watching():
                logits, past = head_logits(plan.prefill, embeds.to(plan.prefill.dtype), None)
            seen = sampler.start(hp.start_speech_token, logits.size(-1), device)
            if static:
                # The cache holds what the eager loop's DynamicCache would: the decode dtype when the
                # decode weights differ, else the prefill's (DynamicCache keeps values in its keys' dtype).
                same = plan.decode.dtype == plan.prefill.dtype
                kv_dtype = past.layers[0].keys.dtype if same else plan.decode.dtype
                t_build = now(device)
                # the slots its first step attends to, the prefill's and its own (one token alone may
                # fill the cache with its prefill: no step runs then, and no span holds one more)
                first = min(prefill_len + 1, max_cache_len)
                # Claimed there, or refused before it is ours: `finally` must not free the holder's cache.
                step, new = _static_step(plan, batch, kv_dtype, device, ctx, sampler, max_cache_len, first)
                if new:
                    stats.compile_s = now(device) - t_build
                stats.step_mode = step.mode
                step.load(past)
                step.begin(sampler, seen)
                seen = step.seen  # the step samples and marks the tokens after the first
                compiled_s = step.compile_s  # a longer span compiled mid-way is added to compile_s
                compiled_calls = step.compile_calls  # and the steps that built it, to compile_steps
                past = None
                # Per-step inputs are views of these (no host tensor, no copy per step).
                positions = torch.arange(max_new_tokens + 1, device=device).view(-1, 1)
                slots = torch.arange(prefill_len, prefill_len + max_new_tokens, device=device)
            elif plan.decode.dtype != plan.prefill.dtype:
                _cast_cache(past, plan.decode.dtype)
            ids = torch.full((1, max_new_tokens + 1), hp.start_speech_token, dtype=torch.long, device=device)
        t_mark = now(device)
        stats.prefill_s = t_mark - t0 - stats.compile_s
        dec = plan.decode
        start = 0  # first step of the current block
        rewind = generator.get_state()  # the generator before the draw of token `start`
        sampled: torch.Tensor | None = None  # the next token, when the static step sampled it
        # The first token drawn from probabilities that were not finite (none: max_new_tokens).
        # Where multinomial would have raised; only if the stop token did not come first.
        first_bad = torch.full((1, 1), max_new_tokens, dtype=torch.long, device=device)
        for i in range(max_new_tokens):
            with ctx():
                if logits_out is not None:
                    logits_out.append(logits)
                if sampled is None:  # the first token (from the prefill's logits), or the eager step
                    if i == start:
                        rewind = generator.get_state()
                    fed = [int(ids[0, i])] if analyzers else []  # a host read, as upstream
                    token, bad = sampler.sample(logits, seen, [generator], analyzers, fed)
                    first_bad = torch.where(bad, torch.clamp(first_bad, max=i), first_bad)
                    sampler.saw(seen, token, first=i == 0)
                else:
                    token = sampled
                ids[:, i + 1] = token[:, 0]
                stats.steps = stats.sampled = i + 1
                last = i + 1 == max_new_tokens
                block = None
                if (i + 1) % stop_check_every == 0 or last:
                    block = ids[:, start + 1 : i + 2].clone()
                    stops = block[0] == hp.stop_speech_token
                    if turbo and start == 0:  # inference_turbo feeds a first stop token back and goes on
                        stops[0] = False
                    hits = stops.nonzero()  # a host sync on CUDA
                    bad_at = int(first_bad)
                    if bad_at <= (start + int(hits[0, 0]) if hits.numel() else i):
                        raise not_finite(f"at token {bad_at + 1}")
                    if hits.numel():
                        block, stats.stopped = block[:, : int(hits[0, 0]) + 1], True
                        stats.steps = start + block.size(1)
                        if stats.steps < i + 1:  # tokens drawn past the stop: draw up to it again
                            n = block.size(1)
                            generator.set_state(rewind)
                            exponential_noise(n, logits.size(-1), device, [generator] * n)
                    start = i + 1
            if block is not None:
                grown = 0.0  # a longer span compiled mid-way: compiling, not decoding
                if step is not None:
                    grown, compiled_s = step.compile_s - compiled_s, step.compile_s
                    stats.compile_steps += step.compile_calls - compiled_calls
                    compiled_calls = step.compile_calls
                    stats.step_mode = step.mode  # a longer span's compile may have failed
                stats.compile_s += grown
                stats.decode_s += now(device) - t_mark - grown
                yield block
                if stats.stopped or last:
                    return
                t_mark = now(device)
            # A profiler range per decode step, whatever runs it (a compiled graph calls nothing
            # the phase hooks see): trace_analysis.region_trace cuts the decode steps out by it.
            with ctx(), record_function("t3.decode"):
                if step is not None:  # the step samples the token after this one, on this noise
                    if i + 1 == start:
                        rewind = generator.get_state()
                    q = exponential_noise(1, logits.size(-1), device, [generator])
                    slot, length = slots[i : i + 1], prefill_len + i + 1
                    logits, sampled, bad = step(
                        token.expand(batch, 1), positions[i + 1 : i + 2], slot, length, q
                    )
                    first_bad = torch.where(bad, torch.clamp(first_bad, max=i + 1), first_bad)
                else:
                    embed = dec.embed(token, i + 1)
                    with watching():
                        logits, past = head_logits(dec, embed.expand(batch, -1, -1).to(dec.dtype), past)
    finally:
        scope.close()
        if step is not None:
            step.busy = False


def t3_decode(t3: T3, t3_cond: T3Cond, text_tokens: torch.Tensor, **kwargs: Any) -> DecodeResult:
    """All tokens of ``decode_blocks`` at once (keyword arguments as there)."""
    stats = DecodeStats()
    blocks = list(decode_blocks(t3, t3_cond, text_tokens, stats=stats, **kwargs))
    return DecodeResult(tokens=torch.cat(blocks, dim=1), **vars(stats))
