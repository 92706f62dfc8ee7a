"""A stream of the engine as its reader sees it: what was asked (``Request``), and its chunks.

``StreamHandle`` is what ``engine.StreamEngine.submit`` returns: iterate it, plainly or with
``async for``, for ``(chunk, ChunkMetrics)`` as the engine's S3Gen stage puts them; an error that
ends the stream is raised where the chunks would come, after the chunks before it. An async
reader waits on an event the engine sets (no thread per reader: a server reads many streams).
``as_ready`` reads several streams from one loop in the order their chunks arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..instruments.latency import ChunkMetrics, StreamReport
from .sampling import Sampler
from .streaming import StreamState


@dataclass
class Request:
    """What a client asked for, as ``submit`` checked it. ``conds``: the voice (upstream
    ``Conditionals``); ``sampler``: how its tokens are drawn (temperature, top_p, ... as the
    family's upstream generate, made once at the submit); ``t3_cond``: T3's part of the voice as it
    was at the submit (a copy of ``conds.t3``, which upstream ``generate(exaggeration=...)`` and the
    optimized wrapper change on the voice itself)."""

    text: str
    seed: int
    max_new_tokens: int
    conds: Any
    language_id: str | None
    sampler: Sampler
    t3_cond: Any


END = object()  # what ``put`` hands a reader at a stream's end


class StreamHandle:
    """One stream of the engine: iterate it (plainly or with ``async for``) for its
    ``(chunk, ChunkMetrics)``; ``close()`` (or leaving the loop early) frees its rows. An iterator
    dropped or closed before the end closes the stream too, so ``next(iter(handle))`` reads one
    chunk and cuts the stream short: keep the iterator to read on."""

    def __init__(self, request: Request, index: int, drop: Callable[[StreamHandle], None]) -> None:
        self.request, self.index = request, index
        self._drop = drop  # the engine's: out of its queue, or its rows freed before its next step
        self.state = StreamState(StreamReport("buffered"))
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.error: BaseException | None = None
        self._error_tb: TracebackType | None = None  # where it was raised: each raise here starts from it
        self.closed = False
        # T3 ended it at its token cap, not at a stop token: its speech may be cut short (random
        # weights almost never sample the stop token)
        self.capped = False
        self.sampled: list[int] = []  # every id T3 sampled, stop and non-speech ids included
        self.logits: list[torch.Tensor] = []  # (rows, vocab) float32 per sampled id, if the engine keeps them
        self._queue: queue.Queue[Any] = queue.Queue()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # an async reader's

    @property
    def tokens(self) -> list[int]:
        """The speech tokens sampled so far (ids S3Gen can vocode, in order)."""
        return self.state.tokens

    @property
    def report(self) -> StreamReport:
        """The stream's ``StreamReport`` so far (whole once the stream has ended)."""
        return self.state.report

    def __iter__(self) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
        try:
            while (item := self._unwrap(self._queue.get())) is not None:
                yield item
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[tuple[np.ndarray, ChunkMetrics]]:
        # No thread waits per reader (a server reads many streams; the default executor has a
        # few threads): the engine's put sets this loop's event, and the reader waits on it.
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        self._waker = (loop, ready)
        try:
            while True:
                try:
                    item = self._unwrap(self._queue.get_nowait())
                except queue.Empty:
                    await ready.wait()  # set by a put after the get above found nothing: no lost wake-up
                    ready.clear()
                    continue
                if item is None:
                    return
                yield item
        finally:
            self._waker = None
            self.close()

    def _unwrap(self, item: Any) -> tuple[np.ndarray, ChunkMetrics] | None:
        """A chunk, ``None`` at the end, or the stream's error raised."""
        if item is not END and not isinstance(item, BaseException):
            chunk: tuple[np.ndarray, ChunkMetrics] = item  # the chunks before an error are read first
            return chunk
        if self.error is None:
            return None
        # A failed stream's reader that reads again (after the read that raised closed it) gets
        # its error again, not an end that looks like a stream that spoke nothing. Raised with
        # the traceback it was raised with: one error may end several streams (a failed step's),
        # and each raise of it would add its reader's frames, kept alive, to what the next sees.
        raise self.error.with_traceback(self._error_tb)

    def close(self) -> None:
        """Stop this stream: a queued one leaves the queue now, an admitted one frees its rows
        before the engine's next step."""
        self._drop(self)
        self.put(END)  # wakes a reader still waiting

    def fail(self, error: BaseException, tb: TracebackType | None) -> None:
        """End the stream with ``error`` (the engine's, under its lock): its reader raises it,
        from ``tb``, where it was raised (read once by the engine: a reader of another stream
        the same error ended may be raising it meanwhile); ``handle.error`` keeps it."""
        self.closed = True
        self.error, self._error_tb = error, tb
        self.put(error)

    def put(self, item: Any) -> None:
        """Hand the reader ``item``: a ``(chunk, ChunkMetrics)``, ``END`` or an error (the engine
        puts them; ``close`` puts ``END``), waking an async reader."""
        self._queue.put(item)
        if (waker := self._waker) is not None:
            loop, ready = waker
            with contextlib.suppress(RuntimeError):  # the reader's loop has closed: nobody to wake
                loop.call_soon_threadsafe(ready.set)


def as_ready(handles: list[StreamHandle]) -> Iterator[tuple[int, np.ndarray, ChunkMetrics]]:
    """``(k, chunk, metrics)`` of several streams in the order their chunks arrive (``k``: the
    stream's position in ``handles``), e.g. to play two streams side by side from one loop. A
    stream's error is raised when it comes. Leaving early (a break, an error) closes every
    stream, which frees their rows."""
    merged: queue.Queue[Any] = queue.Queue()

    def pump(k: int, handle: StreamHandle) -> None:
        try:
            for chunk, m in handle:
                merged.put((k, chunk, m))
        except BaseException as e:  # whatever ended it reaches the reader, which must not wait on
            merged.put(e)
        finally:
            merged.put(END)

    for k, handle in enumerate(handles):
        threading.Thread(target=pump, args=(k, handle), daemon=True).start()
    ended = 0
    try:
        while ended < len(handles):
            item = merged.get()
            if item is END:
                ended += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for handle in handles:  # a no-op for streams that have ended
            handle.close()
