"""How T3 samples the next speech token, on the device and for many streams at once.

Upstream draws each token with ``torch.multinomial``, which reads the probabilities back to the
host on every call (it checks them). ``Sampler`` keeps upstream's arithmetic (classifier-free
guidance, the logits processors in upstream's order, the same draw) and reads nothing back:
``multinomial``'s one sample is ``argmax(probs / q)`` with ``q ~ Exp(1)``, so the noise ``q`` is
drawn apart from each stream's own generator (``exponential_noise``) and the rest (``pick``) is
pure tensor arithmetic that can run inside a compiled decode step. Equal logits give equal tokens
for a seed; the callers read the tokens when they need them, for every stream at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..core.errors import ConfigError


def penalize(seen: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` over a mask (B, vocab) of the tokens
    seen instead of their ids: the same arithmetic on the same elements (its own 3-D path does
    it this way too; a test compares the two), without a gather over a history that grows."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def not_finite(where: str) -> RuntimeError:
    """The error ``multinomial`` raised on probabilities that are not finite, with the likely
    cause (the draw here reads nothing back: callers check at their next host sync)."""
    return RuntimeError(
        f"T3's logits were not finite {where} (probability tensor contains inf or nan): "
        "an overflow in a half-precision dtype? Decode in float32"
    )


def exponential_noise(
    rows: int, vocab: int, device: torch.device, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """``q ~ Exp(1)`` (rows, vocab) float32, row r drawn from ``generators[r]``: what
    ``torch.multinomial(probs, 1)`` draws for one sample. ATen's multinomial then takes
    ``argmax(probs / q)`` (``draw``), so drawing ``q`` apart gives the same tokens for a seed
    without multinomial's host read (it checks the probabilities every call)."""
    q = torch.empty((rows, vocab), dtype=torch.float32, device=device)
    for row, generator in enumerate(generators):
        q[row : row + 1].exponential_(generator=generator)
    return q


def draw(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The one-sample ``multinomial`` of each row of ``probs`` given its noise ``q``."""
    return torch.argmax(probs / q, dim=-1, keepdim=True)


class MinP:
    """transformers' ``MinPLogitsWarper`` as upstream builds it (``min_tokens_to_keep=1``) without
    its ``topk``: that keeps the most probable token, which is never below ``min_p`` (at most 1)
    times its own probability, so it changes nothing. Compiled on this 2-core CPU, the
    ``topk`` and its scatter made one (1, 6561) row's filter 3× slower (0.24 ms against 0.08)."""

    def __init__(self, min_p: float) -> None:
        if not 0 <= min_p <= 1:
            raise ConfigError(
                f"min_p must be in [0, 1] (a share of the top token's probability), got {min_p}"
            )
        self.min_p = min_p

    def __call__(self, input_ids: Any, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        low = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        return scores.masked_fill(low, float("-inf"))


def check_sampling(
    turbo: bool, cfg_weight: float, temperature: float, top_p: float, repetition_penalty: float, **_: Any
) -> None:
    """Refuse settings upstream's T3 would fail on inside torch or sample nonsense with (``Sampler``,
    the wrapper's ``generate`` and the baseline's ``generation.generate`` check them before anything
    runs; the others, ``min_p`` and ``top_k``, are checked by their processors)."""
    if not turbo and not temperature > 0:  # inference_turbo skips it instead
        raise ConfigError(f"temperature must be above 0 (T3 divides its logits by it), got {temperature}")
    # Infinite ones pass upstream's checks and sample nonsense: logits divided by an infinite
    # temperature are all 0 (every id equally likely, the masked ones NaN); an infinite
    # penalty sends every seen token's logit to 0 or -inf, whatever the model said.
    for name, value in (("temperature", temperature), ("repetition_penalty", repetition_penalty)):
        if value == math.inf:
            raise ConfigError(f"{name} must be finite, got inf")
    # T3.inference builds TopPLogitsWarper, which refuses these (inference_turbo ignores top_p
    # from 1 up); here top-p at 1 is left out, so its check is made here.
    if not turbo and not 0 <= top_p <= 1:
        raise ConfigError(f"top_p must be in [0, 1] (a share of the probability kept), got {top_p}")
    # inference_turbo builds the warper below 1, which refuses a negative top-p (a plain ValueError
    # once the processors were built); NaN, which it would leave out, is refused as nonsense
    if turbo and not top_p >= 0:
        raise ConfigError(f"top_p must be 0 or above (1 or more: no top-p), got {top_p}")
    # as transformers' RepetitionPenaltyLogitsProcessor, which both upstream loops build
    if not repetition_penalty > 0:
        raise ConfigError(
            f"repetition_penalty must be above 0 (1 for none; the logits of seen tokens are "
            f"divided by it), got {repetition_penalty}"
        )
    # upstream generate runs guidance's second row only for a weight above 0; an infinite
    # weight makes every guided logit infinite or NaN (cond - uncond is 0 for some tokens)
    if not 0 <= cfg_weight < math.inf:  # NaN too
        raise ConfigError(f"cfg_weight must be 0 (no guidance) or above, and finite, got {cfg_weight}")


@dataclass(frozen=True, eq=False)
class Sampler:
    """How upstream samples the next speech token (``T3.inference``; Turbo's T3:
    ``inference_turbo``), for a batch of streams sharing these settings: classifier-free
    guidance over each stream's two rows, the logits processors in upstream's order (transformers'
    own, the repetition penalty over a mask of the tokens seen), then one draw per stream from
    its own generator (``draw``). Nothing is read back to the host: the caller reads the tokens
    when it needs them, for every stream at once."""

    turbo: bool
    cfg_weight: float = 0.5
    temperature: float = 0.8
    top_p: float = 0.95
    min_p: float = 0.05
    top_k: int = 1000
    repetition_penalty: float = 1.2
    # built once, here: a compiled step then only reads them
    _warpers: tuple[Any, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_sampling(self.turbo, self.cfg_weight, self.temperature, self.top_p, self.repetition_penalty)
        object.__setattr__(self, "_warpers", self._make_warpers())

    def _read(self) -> tuple[Any, ...]:
        """The settings this family's sampling reads. Two samplers are equal when these are: a
        compiled step is keyed on its sampler, and a setting no sampling reads (``top_k`` for
        Llama's T3, ``min_p`` and guidance for Turbo's) built another graph before 2026-12-04."""
        if self.turbo:
            return (True, self.temperature, self.top_p, self.top_k, self.repetition_penalty)
        return (False, self.cfg_weight, self.temperature, self.top_p, self.min_p, self.repetition_penalty)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sampler) and self._read() == other._read()

    def __hash__(self) -> int:
        return hash(self._read())

    def _make_warpers(self) -> tuple[Any, ...]:
        """The processors other than the repetition penalty, in upstream's order."""
        # Top-p only below 1, as inference_turbo and transformers' generate add it: T3.inference
        # adds it always, but at 1 it removes only tokens of probability 0, which are never drawn
        # (and its sort is the costliest op of a compiled CPU step's sampling).
        top_p = (TopPLogitsWarper(top_p=self.top_p),) if self.top_p < 1.0 else ()
        if not self.turbo:
            return (MinP(self.min_p), *top_p)
        # inference_turbo: each processor only when it changes anything
        steps: list[Any] = []
        if self.temperature > 0 and self.temperature != 1.0:
            steps.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            steps.append(TopKLogitsWarper(self.top_k))
        return (*steps, *top_p)

    def scores(self, seen: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The processed scores (B, vocab) of guided ``logits`` after the tokens in ``seen``."""
        if self.turbo:
            for warp in self._warpers:
                logits = warp(None, logits)
            if self.repetition_penalty != 1.0:
                logits = penalize(seen, logits, self.repetition_penalty)
            return logits
        logits = penalize(seen, logits, self.repetition_penalty)  # T3.inference's order
        if self.temperature != 1.0:
            logits = logits / self.temperature
        for warp in self._warpers:
            logits = warp(None, logits)
        return logits

    def sample(
        self,
        logits: torch.Tensor,
        seen: torch.Tensor,
        generators: Sequence[torch.Generator | None],
        analyzers: Sequence[Any] = (),
        last_tokens: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token (B, 1) of each of B streams from their ``logits`` (B·rows, vocab; two
        rows per stream with guidance, cond then uncond), ``seen`` (B, vocab) and generators,
        and (B, 1) whether a stream's probabilities were not finite (``multinomial`` raises
        there; the caller reads it at its next host sync). ``analyzers``: upstream
        multilingual's alignment analyzer of each stream (none, or one per stream), with the
        token each stream was just fed (``last_tokens``): it may suppress or force the stop
        token before the processors."""
        q = exponential_noise(len(generators), logits.size(-1), logits.device, generators)
        return self.pick(logits, seen, q, analyzers, last_tokens)

    def pick(
        self,
        logits: torch.Tensor,
        seen: torch.Tensor,
        q: torch.Tensor,
        analyzers: Sequence[Any] = (),
        last_tokens: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample`` given the streams' noise ``q`` (``exponential_noise``): pure tensor
        arithmetic without analyzers, so it can run inside the compiled decode step."""
        if logits.size(0) == 2 * q.size(0):  # guidance: cond and uncond rows per stream
            cond, uncond = logits[0::2], logits[1::2]
            guided = cond + self.cfg_weight * (cond - uncond)
        else:
            guided = logits
        if analyzers:  # each edits its row in place: a copy, not the caller's logits (logits_out)
            rows = zip(analyzers, last_tokens, guided.split(1), strict=True)
            guided = torch.cat([a.step(row.clone(), next_token=t) for a, t, row in rows])
        probs = torch.softmax(self.scores(seen, guided), dim=-1)
        return draw(probs, q), ~torch.isfinite(probs).all(dim=-1, keepdim=True)

    def saw(self, seen: torch.Tensor, token: torch.Tensor, first: bool) -> None:
        """Mark ``token`` (1, 1) in one stream's ``seen`` (1, vocab) after it was sampled. Turbo
        penalises the tokens sampled so far, its start token only before the first of them;
        ``T3.inference`` penalises the start token and every token sampled."""
        if self.turbo and first:
            seen.zero_()
        seen.scatter_(1, token, True)

    def start(self, start_token: int, vocab: int, device: torch.device) -> torch.Tensor:
        """A stream's ``seen`` before its first sample: the start-of-speech token."""
        seen = torch.zeros((1, vocab), dtype=torch.bool, device=device)
        seen[0, start_token] = True
        return seen
