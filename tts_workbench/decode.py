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
"""

from __future__ import annotations

import copy
import time
from collections.abc import Generator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import ChatterboxTTS, punc_norm
from torch import nn
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopPLogitsWarper,
)

from .sources import dtype_name


@dataclass
class T3Parts:
    """The pieces of T3 that a decode step touches, possibly a copy in another dtype."""

    tfmr: nn.Module
    speech_emb: nn.Module
    speech_pos_emb: Any
    speech_head: nn.Module

    @classmethod
    def of(cls, t3: T3) -> T3Parts:
        return cls(t3.tfmr, t3.speech_emb, t3.speech_pos_emb, t3.speech_head)

    def to(self, dtype: torch.dtype) -> T3Parts:
        """A copy of these weights in ``dtype`` (the originals are untouched)."""
        return T3Parts(*(copy.deepcopy(m).to(dtype) for m in vars(self).values()))

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = next(self.speech_head.parameters()).dtype
        return dtype

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in vars(self).values() for p in m.parameters())


@dataclass
class DecodePlan:
    """Which weights (and autocast dtype, if any) run the prefill and the decode steps."""

    prefill: T3Parts
    decode: T3Parts
    autocast: torch.dtype | None = None

    @classmethod
    def plain(cls, t3: T3) -> DecodePlan:
        parts = T3Parts.of(t3)
        return cls(parts, parts)

    def describe(self) -> str:
        if self.autocast is not None:
            return f"autocast {dtype_name(self.autocast)} over {dtype_name(self.prefill.dtype)} weights"
        if self.prefill is self.decode:
            return f"native {dtype_name(self.decode.dtype)}"
        return f"prefill {dtype_name(self.prefill.dtype)}, decode {dtype_name(self.decode.dtype)}"


def _cast_cache(past: Any, dtype: torch.dtype) -> None:
    """Cast every key/value tensor of a transformers cache in place (prefill → decode dtype)."""
    for layer in past.layers:
        layer.keys = layer.keys.to(dtype)
        layer.values = layer.values.to(dtype)


def _logits(parts: T3Parts, embeds: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
    out = parts.tfmr(inputs_embeds=embeds, past_key_values=past, use_cache=True)
    return parts.speech_head(out.last_hidden_state[:, -1:]).float()[:, -1, :], out.past_key_values


def text_tokens(tts: ChatterboxTTS, text: str, cfg_weight: float = 0.5) -> torch.Tensor:
    """T3's text input, exactly as upstream ``ChatterboxTTS.generate`` builds it: normalised
    punctuation, a second copy for classifier-free guidance, start and stop text tokens."""
    tokens = tts.tokenizer.text_to_tokens(punc_norm(text)).to(tts.device)
    if cfg_weight > 0.0:
        tokens = torch.cat([tokens, tokens], dim=0)
    hp = tts.t3.hp
    return F.pad(F.pad(tokens, (1, 0), value=hp.start_text_token), (0, 1), value=hp.stop_text_token)


@dataclass
class DecodeStats:
    """Filled in by ``decode_blocks`` as it runs (time spent suspended at a yield excluded)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    stopped: bool = False

    @property
    def step_s(self) -> float:
        """Mean seconds per decode step (the first token comes from the prefill)."""
        return self.decode_s / max(self.steps - 1, 1)


@dataclass(kw_only=True)
class DecodeResult(DecodeStats):
    """The stats plus the tokens of the conditional stream (stop token included when sampled)."""

    tokens: torch.Tensor  # (1, steps) long


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
    stop_check_every: int = 8,
    stats: DecodeStats | None = None,
) -> Generator[torch.Tensor, None, None]:
    """Sample speech tokens like ``T3.inference`` and yield them in blocks of ``stop_check_every``
    (1, k) as soon as each block has been checked for the stop token (the last block ends with
    the stop token when one was sampled). Same arguments, same tokens for a seed."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if stop_check_every < 1:
        raise ValueError(f"stop_check_every must be at least 1, got {stop_check_every}")
    plan = plan or DecodePlan.plain(t3)
    stats = stats if stats is not None else DecodeStats()
    hp = t3.hp
    device = t3.speech_head.weight.device
    text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=device)

    def ctx() -> ExitStack:
        # Entered around each compute step, never across a yield: autocast and inference mode
        # are thread-wide and must not leak into the consumer's code.
        stack = ExitStack()
        stack.enter_context(torch.inference_mode())
        if plan.autocast:
            stack.enter_context(torch.autocast(device.type, plan.autocast))
        return stack

    t0 = time.perf_counter()
    with ctx():
        # Exactly the upstream prefill: conditioning, text, one BOS from prepare_input_embeds ...
        bos = torch.full((1, 1), hp.start_speech_token, dtype=torch.long, device=device)
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=t3_cond,
            text_tokens=text_tokens,
            speech_tokens=bos.expand(text_tokens.size(0), 1),
            cfg_weight=cfg_weight,
        )
        # ... and a second BOS appended by T3.inference.
        bos_embed = t3.speech_emb(bos) + t3.speech_pos_emb.get_fixed_embedding(0)
        embeds = torch.cat([embeds, bos_embed.expand(embeds.size(0), -1, -1)], dim=1)
        logits, past = _logits(plan.prefill, embeds.to(plan.prefill.dtype), None)
        if plan.decode.dtype != plan.prefill.dtype:
            _cast_cache(past, plan.decode.dtype)
        repetition = RepetitionPenaltyLogitsProcessor(penalty=float(repetition_penalty))
        min_p_warper, top_p_warper = MinPLogitsWarper(min_p=min_p), TopPLogitsWarper(top_p=top_p)
        ids = torch.full((1, max_new_tokens + 1), hp.start_speech_token, dtype=torch.long, device=device)
    stats.prefill_s = time.perf_counter() - t0
    dec = plan.decode
    start = 0  # first step of the current block
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        with ctx():
            cond, uncond = logits[0:1], logits[1:2]
            guided = cond + cfg_weight * (cond - uncond) if logits.size(0) == 2 else cond
            seen = cast(torch.LongTensor, ids[:, : i + 1])
            scores = repetition(seen, guided)
            if temperature != 1.0:
                scores = scores / temperature
            scores = top_p_warper(seen, min_p_warper(seen, scores))
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
            ids[:, i + 1] = token[:, 0]
            stats.steps = i + 1
            last = i + 1 == max_new_tokens
            block = None
            if (i + 1) % stop_check_every == 0 or last:
                block = ids[:, start + 1 : i + 2].clone()
                hits = (block[0] == hp.stop_speech_token).nonzero()
                if hits.numel():
                    block, stats.stopped = block[:, : int(hits[0, 0]) + 1], True
                    stats.steps = start + block.size(1)
                start = i + 1
        stats.decode_s += time.perf_counter() - t0
        if block is not None:
            yield block
            if stats.stopped:
                return
        if last:
            return
        t0 = time.perf_counter()
        with ctx():
            step = dec.speech_emb(token) + dec.speech_pos_emb.get_fixed_embedding(i + 1)
            logits, past = _logits(dec, step.expand(logits.size(0), -1, -1).to(dec.dtype), past)
        stats.decode_s += time.perf_counter() - t0


def t3_decode(t3: T3, t3_cond: T3Cond, text_tokens: torch.Tensor, **kwargs: Any) -> DecodeResult:
    """All tokens of ``decode_blocks`` at once (keyword arguments as there)."""
    stats = DecodeStats()
    blocks = list(decode_blocks(t3, t3_cond, text_tokens, stats=stats, **kwargs))
    return DecodeResult(tokens=torch.cat(blocks, dim=1), **vars(stats))
