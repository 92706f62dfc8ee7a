"""Upstream multilingual T3's alignment analyzer, one per generation, however many run at once.

``AlignmentStreamAnalyzer`` reads three heads' attention at every step and suppresses the stop
token until the text is read, or forces it on a repetition: without it the tokens are not
upstream's. It spies on the attention with forward hooks that it never removes, and it switches
the backbone to eager attention with ``output_attentions`` on for good (upstream leaves three
more hooks, each copying attention to the host every step, after every generation).

Hooks sit on the module and fire for every forward, whoever runs it: two generations at once
(two threads, or two streams read in turns from one) would each read the other's attention,
and the first to finish would take the other's hooks away. So an analyzer's spies are taken off
the module as soon as it has made them; one router per attention module, there while any
generation uses it, hands each forward's output to the spies of the generation running that
forward (``Alignment.watching``, set around its own forwards only). The backbone's attention
settings change with the first generation in and are put back by the last one out, and the
capture hooks transformers installs for good on a backbone asked for attentions are taken off
again (``patching.capture_hooks_undone``). A copy of a backbone made meanwhile
(``copy_as_given_back``) has none of these changes.

Upstream ``T3.inference`` (multilingual ``generate``) makes its analyzer itself: inside
``upstream_alignment`` the one it makes in this thread is made by ``alignment`` too. Several
generations in one batched forward (the stream engine's step) each feed their own analyzer their
own row of the attention weights (``watching_rows``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import chatterbox.models.t3.t3 as upstream_t3
from chatterbox.models.t3.inference.alignment_stream_analyzer import (
    LLAMA_ALIGNED_HEADS,
    AlignmentStreamAnalyzer,
)
from torch import nn

from ..core.patching import capture_hooks_undone, clean_copy, routed

Spy = Callable[[nn.Module, Any, Any], None]

# The spies of the generation whose forward is running, by id of the attention module.
_watching: ContextVar[Mapping[int, list[Spy]]] = ContextVar("alignment_spies", default=MappingProxyType({}))
# Reentrant: the garbage collector may close a forgotten generation (its exit takes the lock)
# in a thread that holds it.
_lock = threading.RLock()
# id(attention module) -> [generations using it, the router's hook handle]
_routers: dict[int, list[Any]] = {}
# id(backbone config) -> [generations using it, its attention implementation, output_attentions]
_configs: dict[int, list[Any]] = {}


def _route(module: nn.Module, args: Any, output: Any) -> None:
    for spy in _watching.get().get(id(module), ()):
        spy(module, args, output)


def _take_spies(attns: list[nn.Module], before: dict[int, set[int]]) -> dict[int, list[Spy]]:
    """The spy hooks an analyzer added to these attention modules (those not in ``before``),
    taken off them, by module id. Only upstream's: another thread's forward may meanwhile have
    installed transformers' capture hook, which stays."""
    spies: dict[int, list[Spy]] = {}
    for a in attns:
        for key, hook in list(a._forward_hooks.items()):
            if key not in before[id(a)] and hook.__module__ == AlignmentStreamAnalyzer.__module__:
                spies.setdefault(id(a), []).append(a._forward_hooks.pop(key))
    return spies


class Alignment:
    """One generation's analyzer (``analyzer``, upstream's) and the spies that feed it."""

    def __init__(self, analyzer: AlignmentStreamAnalyzer, spies: dict[int, list[Spy]]) -> None:
        self.analyzer, self.spies = analyzer, spies

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Forwards run inside feed this generation's analyzer (and no other)."""
        token = _watching.set(self.spies)
        try:
            yield
        finally:
            _watching.reset(token)


def text_columns(prefill_len: int, text_len: int) -> tuple[int, int]:
    """The text's columns [start, end) in T3's prefill (conditioning, text, two start-of-speech
    tokens): what an analyzer reads."""
    return prefill_len - text_len - 2, prefill_len - 2


def _row_of(spy: Spy, row: int, last: bool) -> Spy:
    """``spy`` fed one row of a batch's attention weights (upstream's spy reads row 0) and, with
    ``last``, its last query only."""

    def spy_row(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            weights = output[1][row : row + 1]
            output = (output[0], weights[:, :, -1:] if last else weights, *output[2:])
        spy(module, args, output)

    return spy_row


@contextmanager
def watching_rows(streams: Sequence[tuple[Alignment, int]], last: bool = False) -> Iterator[None]:
    """``Alignment.watching`` for a batched forward of several generations: each analyzer is fed
    its own generation's row (its first: the conditional row with guidance) of the attention
    weights, and with ``last`` the last query's only (a forward over many positions, where
    upstream's step reads one)."""
    spies: dict[int, list[Spy]] = {}
    for aligned, row in streams:
        for module, own in aligned.spies.items():
            spies.setdefault(module, []).extend(_row_of(spy, row, last) for spy in own)
    token = _watching.set(MappingProxyType(spies))
    try:
        yield
    finally:
        _watching.reset(token)


@contextmanager
def alignment(tfmrs: list[Any], text: tuple[int, int], eos: int) -> Iterator[Alignment]:
    """Upstream's analyzer for a generation whose steps run ``tfmrs`` (the prefill's backbone,
    and a decode copy in another dtype if there is one); ``text``: the text's columns [start,
    end) in the prefill. Every change to the backbones is undone by the last generation to
    leave. A backbone given twice (the decode running the prefill's own) counts once."""
    tfmrs = list({id(m): m for m in tfmrs}.values())
    attns = [m.layers[layer].self_attn for m in tfmrs for layer, _ in LLAMA_ALIGNED_HEADS]
    with ExitStack() as captures, _lock:  # no other analyzer is made meanwhile
        before = {id(a): set(a._forward_hooks) for a in attns}
        settings = [(m.config._attn_implementation, m.config.output_attentions) for m in tfmrs]
        try:
            analyzer = AlignmentStreamAnalyzer(tfmrs[0], None, text, alignment_layer_idx=9, eos_idx=eos)
            for m in tfmrs[1:]:  # a decode copy in another dtype runs the steps: spy on it too
                for k, (layer, head) in enumerate(LLAMA_ALIGNED_HEADS):
                    analyzer._add_attention_spy(m, k, layer, head)
        finally:  # its spies come off the modules (made or not), its settings are undone
            spies = _take_spies(attns, before)
            for m, (implementation, output_attentions) in zip(tfmrs, settings, strict=True):
                m.config._attn_implementation, m.config.output_attentions = implementation, output_attentions
        for a in attns:
            entry = _routers.setdefault(id(a), [0, None])
            if entry[0] == 0:
                entry[1] = a.register_forward_hook(_route)
            entry[0] += 1
        for m, (implementation, output_attentions) in zip(tfmrs, settings, strict=True):
            entry = _configs.setdefault(id(m.config), [0, implementation, output_attentions])
            entry[0] += 1
            m.config._attn_implementation, m.config.output_attentions = "eager", True
            captures.enter_context(capture_hooks_undone(m))
        undo_captures = captures.pop_all()  # held until this generation leaves; undone if it fails first
    try:
        yield Alignment(analyzer, spies)
    finally:
        with _lock, undo_captures:
            for a in attns:
                entry = _routers[id(a)]
                entry[0] -= 1
                if entry[0] == 0:
                    entry[1].remove()
                    del _routers[id(a)]
            for m in tfmrs:
                entry = _configs[id(m.config)]
                entry[0] -= 1
                if entry[0] == 0:
                    m.config._attn_implementation, m.config.output_attentions = entry[1], entry[2]
                    del _configs[id(m.config)]


def copy_as_given_back(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (``patching.clean_copy``) as the generations now aligning its
    backbone will give it back: with the backbone's own attention settings, not eager with
    attentions on, and without the routers' hooks. Made while a stream was paused, a decode
    copy kept eager attention for its holder's life."""
    with _lock:
        dup = clean_copy(module)
        for src, mine in zip(module.modules(), dup.modules(), strict=True):
            config = getattr(src, "config", None)
            if config is not None and id(config) in _configs:
                copied: Any = mine.config  # the copy's (one per backbone, whatever shares it)
                _, copied._attn_implementation, copied.output_attentions = _configs[id(config)]
            if id(src) in _routers:
                del mine._forward_hooks[_routers[id(src)][1].id]
    return dup


@contextmanager
def upstream_alignment() -> Iterator[None]:
    """While inside, the analyzer upstream ``T3.inference`` makes in this thread (or asyncio
    task) comes from ``alignment``: fed by this generation's forwards only, its hooks and the
    backbone's attention settings undone on the way out (upstream leaves them for good)."""
    with ExitStack() as scope:

        def analyzer(
            tfmr: nn.Module, queue: Any, text_tokens_slice: tuple[int, int], alignment_layer_idx: int = 9,
            eos_idx: int = 0,
        ) -> AlignmentStreamAnalyzer:  # fmt: skip
            aligned = scope.enter_context(alignment([tfmr], text_tokens_slice, eos_idx))
            scope.enter_context(aligned.watching())  # upstream's forwards follow, in this context
            return aligned.analyzer

        # Upstream names the class in its module: other threads' generations keep upstream's own.
        with routed(upstream_t3, "AlignmentStreamAnalyzer", lambda _: analyzer):
            yield
