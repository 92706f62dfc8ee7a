"""KV cache positions: how many a request writes, how many tokens a cache holds.

Pure arithmetic, here so that every check (the decode loop, the engine, the CLI, the bench, the
load study and a server's request check, which imports no torch) counts alike.
"""

from __future__ import annotations


def positions_needed(prefill_len: int, max_new_tokens: int) -> int:
    """KV positions a request writes: its prefill's, then one per sampled token but the last,
    which is never fed back (the loops end on it; upstream's standard loop runs one more forward
    and drops its logits, ``inference_turbo`` does not). Before 2026-12-04 every check asked for
    one position more, and refused the request that exactly fills a cache."""
    return prefill_len + max_new_tokens - 1


def tokens_that_fit(prefill_len: int, max_cache_len: int) -> int:
    """The most tokens a request with ``prefill_len`` prefill positions samples in
    ``max_cache_len`` positions (below 1: not even one)."""
    return max_cache_len - prefill_len + 1
