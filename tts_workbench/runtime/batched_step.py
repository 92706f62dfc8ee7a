"""T3's decode step over many streams: one KV cache allocated once, a few rows per stream.

The stream engine's compute half (``engine`` schedules; this runs), after gpt-fast's decode: the
cache is allocated once at its largest shape (every stream the engine holds, every position a
stream may reach), and the step, eager or compiled (CUDA graphs on CUDA), is built once per shape
and reused. A shape is a bucket of streams (the rows a step runs over, the live ones padded up)
and a span of cache slots (``decode.spans``: the smallest holding every live stream's positions).

Each stream has its own rows (two with classifier-free guidance, one for Turbo) at its own
position: row ``r`` writes its new key and value at its own slot, which transformers'
``StaticCache`` cannot (it writes every row at one slot), hence ``_RowLayer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from transformers.cache_utils import StaticCache

from ..core.compiling import compile_method, fell_back, replay, warmup_calls
from ..core.families import family_of, kv_layout
from ..instruments.attention import compiled_attention, compiled_with_code
from .decode import DecodePlan, SpanStaticLayer, head_logits


def kv_bytes_per_stream(tts: Any, plan: DecodePlan, max_cache_len: int) -> int:
    """Bytes of one stream's rows of the engine's KV cache (keys and values of every layer), known
    before the cache is allocated (a caller can refuse a size that cannot fit)."""
    config: Any = plan.decode.tfmr.config
    kv_heads, head_dim = kv_layout(config)
    rows = family_of(tts).rows
    row_bytes = kv_heads * max_cache_len * head_dim * plan.decode.dtype.itemsize
    return 2 * config.num_hidden_layers * rows * row_bytes


class _RowLayer(SpanStaticLayer):
    """A static cache layer whose rows sit at different positions: row ``r`` writes its new key
    and value at slot ``cache_position[r]`` (transformers' ``StaticLayer`` writes every row at
    the same slots) and the step attends to its first ``span`` slots (``SpanStaticLayer``).
    ``keys``/``values`` are views of the one allocation."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, span: int) -> None:
        super().__init__(keys.size(2))
        self.keys, self.values, self.span = keys, values, span
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert cache_kwargs is not None  # the step always passes its slots
        slots = cache_kwargs["cache_position"]
        rows = torch.arange(key_states.size(0), device=slots.device)
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)
        keys[rows, :, slots] = key_states[:, :, 0].to(keys.dtype)
        values[rows, :, slots] = value_states[:, :, 0].to(values.dtype)
        return self.attended()


class BatchedStep:
    """T3's decode over ``streams`` streams of ``rows_per_stream`` rows each, every stream at its
    own position in one KV cache of ``max_cache_len`` positions (``plan``'s weights and dtypes).

    ``mode``: "static" (the step as is) or "compiled" (``torch.compile``, CUDA graphs on CUDA,
    once per bucket and span); a compile that fails runs every shape as the static step from then
    on, with one warning (``fallback_reason``). ``now``: the caller's clock (a stage's, on CUDA).
    One thread (the engine's T3 stage) runs it; ``close()``, which lets the cache go, runs once
    that thread has ended. Its status attributes (``mode``, ...) may be read from any thread."""

    def __init__(
        self,
        plan: DecodePlan,
        *,
        streams: int,
        rows_per_stream: int,
        max_cache_len: int,
        mode: str,
        device: torch.device,
        now: Callable[[], float],
    ) -> None:
        self.plan, self.mode, self.device, self._now = plan, mode, device, now
        self.rows_per_stream, self.max_cache_len = rows_per_stream, max_cache_len
        # What each step runs, taken once here, outside the compiled step (the plan makes a fused
        # copy under a lock, which dynamo cannot trace).
        self.parts = plan.step_parts
        config: Any = plan.decode.tfmr.config
        kv_heads, head_dim = kv_layout(config)
        shape = (streams * rows_per_stream, kv_heads, max_cache_len, head_dim)
        with torch.inference_mode():
            self.kv = [
                (torch.zeros(shape, dtype=plan.decode.dtype, device=device),
                 torch.zeros(shape, dtype=plan.decode.dtype, device=device))
                for _ in range(config.num_hidden_layers)
            ]  # fmt: skip
        self.moves: list[tuple[int, int]] = []  # first rows (from, to) of streams left to copy: ``move``
        self._caches: dict[tuple[int, int], StaticCache] = {}  # per (bucket, span)
        self.steps: dict[tuple[int, int], Callable[..., torch.Tensor]] = {}  # built: ``build``
        self.attention_kernels: list[str] = []  # of the compiled step, from Inductor's code
        self.fallback_reason: str | None = None  # why the compiled step runs as the static one

    def fill(self, row: int, embeds: torch.Tensor) -> torch.Tensor:
        """Prefill ``embeds`` (rows, positions, dim) into the stream rows from ``row`` (eager, as
        upstream's prefill); the last position's logits."""
        self.apply_moves()  # the rows it takes may be a moved stream's old ones
        logits, past = head_logits(self.plan.prefill, embeds.to(self.plan.prefill.dtype), None)
        n = self.rows_per_stream
        for (keys, values), layer in zip(self.kv, past.layers, strict=True):
            # The rows' other slots are zeroed: an earlier stream's values there are masked,
            # but a masked NaN or inf (a stream that overflowed) still poisons the attention
            # (0 x NaN), and a stream without guidance leaves its second row unwritten.
            keys[row : row + n].zero_()
            values[row : row + n].zero_()
            keys[row : row + embeds.size(0), :, : embeds.size(1)].copy_(layer.keys)
            values[row : row + embeds.size(0), :, : embeds.size(1)].copy_(layer.values)
        return logits

    def move(self, src: int, dst: int) -> None:
        """Record that the stream at rows ``src`` now has rows ``dst``: its keys and values are
        copied by ``apply_moves``, which the caller runs outside its lock (a full-size stream's
        rows are ~0.5 GB, half a second's copy on a CPU)."""
        self.moves.append((src, dst))

    def apply_moves(self) -> None:
        """Copy the rows ``move`` recorded, in order, before anything reads or writes the cache
        again (``fill``, a step)."""
        n = self.rows_per_stream
        with torch.inference_mode():
            for src, dst in self.moves:
                for keys, values in self.kv:
                    keys[dst : dst + n].copy_(keys[src : src + n])
                    values[dst : dst + n].copy_(values[src : src + n])
        self.moves.clear()

    def build(self, bucket: int, span: int) -> float:
        """Build the step for ``bucket`` streams attending to ``span`` slots (``steps``), compiled
        when the mode compiles; seconds spent building (0 if it was built already)."""
        if (bucket, span) in self.steps:
            return 0.0
        cache = self._cache(bucket, span)
        t0 = self._now()
        step: Callable[..., torch.Tensor] | None = None
        if self.mode == "compiled":
            try:
                step = self._compiled(bucket, cache, span)
            except Exception as e:
                self._give_up(e)
        self.steps[bucket, span] = step or (lambda *a: self._forward(cache, span, *a))
        return self._now() - t0

    def close(self) -> None:
        """Let the cache, its views and the compiled steps go."""
        self.kv, self._caches, self.steps, self.moves = [], {}, {}, []

    def _cache(self, bucket: int, span: int) -> StaticCache:
        if (bucket, span) not in self._caches:
            rows = bucket * self.rows_per_stream
            config: Any = self.plan.decode.tfmr.config
            cache = StaticCache(config=config, max_cache_len=self.max_cache_len)
            cache.layers = [_RowLayer(k[:rows], v[:rows], span) for k, v in self.kv]
            for layer in cache.layers:  # as transformers' StaticLayer does: CUDA graphs may keep them
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            self._caches[bucket, span] = cache
        return self._caches[bucket, span]

    def _forward(
        self, cache: StaticCache, span: int, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor
    ) -> torch.Tensor:
        """One decode step over ``cache``'s rows (a bucket of streams): token, learned speech
        position and cache slot per row (B, 1), (B, 1), (B,); the logits (B, vocab) float32. Row r
        attends to its own slots ``[0, slot[r]]`` only, among the first ``span``. The cache is
        an argument, not looked up in ``_caches``: a compiled graph guards on what it reads, and
        that dict grows as shapes are added (each addition would recompile the others)."""
        parts = self.parts
        embeds = parts.embed(token, position).to(parts.dtype)
        keep = torch.arange(span, device=slot.device)[None, :] <= slot[:, None]
        # An additive mask, which sdpa and eager attention both take: while any alignment analyzer
        # runs on this model (an engine's, an eager multilingual generate's) its backbone runs
        # eager attention, which adds its mask to the scores, and each layer reads the setting
        # when it runs, so an analyzer started during a step switches its later layers.
        # Before 2026-12-06 the kind was chosen once per step: a boolean mask for sdpa, which
        # the switched layers added as 1 and 0, masking nothing.
        mask = torch.zeros(keep.shape, dtype=embeds.dtype, device=slot.device)
        mask = mask.masked_fill(~keep, torch.finfo(embeds.dtype).min)[:, None, None, :]
        out = parts.tfmr(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=slot[:, None],
            past_key_values=cache,
            cache_position=slot,
            use_cache=True,
        )
        return parts.logits(out.last_hidden_state)

    def _give_up(self, e: Exception) -> None:
        """A compile failed: every bucket runs the static step from now on, with one warning."""
        self.fallback_reason = fell_back(e, "the engine's T3 step", "running the static step eagerly")
        self.mode, self.attention_kernels = "static", []
        self.steps.clear()

    def _compiled(self, bucket: int, cache: StaticCache, span: int) -> Callable[..., torch.Tensor]:
        cudagraphs = self.device.type == "cuda"
        compiled = compile_method(BatchedStep._forward, self, cudagraphs)  # one code object per shape

        def run(*a: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = replay(compiled, cache, span, *a, cudagraphs=cudagraphs)
            return out

        rows = bucket * self.rows_per_stream
        for k in range(warmup_calls(cudagraphs)):
            # Three tensors made as the engine's step makes them, outside inference mode, also when
            # a step needs this shape while streams run (inside its plan's context): dynamo guards
            # on aliasing, strides and inference tensors, and any difference was compiled again at
            # the first real step (before 2026-12-04, every shape first needed mid-run). They
            # write the span's last slot of the bucket's rows: a live stream writes a slot in the
            # same forward that first reads it, so the stale values there are never read.
            with torch.inference_mode(False):
                token, position = (torch.zeros((rows, 1), dtype=torch.long, device=self.device) for _ in "tp")
                slot = torch.full((rows,), span - 1, dtype=torch.long, device=self.device)
            with self.plan.context(self.device):
                if k == 0:  # the call that compiles: which attention op Inductor's code calls
                    _, code = compiled_with_code(run, token, position, slot)
                    self.attention_kernels = compiled_attention(code)
                else:
                    run(token, position, slot)
        return run
