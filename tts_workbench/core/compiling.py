"""torch.compile as the workbench's compiled paths use it (the T3 decode step, the stream
engine's batched step, S3Gen's CFM estimator), in one place.

- ``compile_method``: a method compiled on a code object of its own (``patching.own_code``:
  dynamo keeps its compiled entries and its recompile limit per code object, so one user's
  graphs never evict another's), for static shapes, with CUDA graphs
  (``mode="reduce-overhead"``) on CUDA; without them, optionally with Inductor's C++ wrapper
  (the graph's kernels called from generated C++ instead of Python: less host time per call,
  a C++ compile of seconds to minutes per graph).
- ``replay``: one call of such a function. With CUDA graphs it first marks a new step (the graph
  tree may then reuse its memory pool) and clones the outputs, which live in that pool and would
  be overwritten by the next replay: one thread's mark, call and clone at a time, since in
  torch 2.11 (the GPU image's) a compiled function's graphs live in the tree of the thread that
  first called it and every thread replays those same graphs into the same output memory (in
  torch 2.13 each thread records its own: ``FlowPlan`` warms a shape up again in a new thread).
  A function's first call compiles under that lock too: streams in other threads wait meanwhile
  (seconds to a minute on the H200), and their wait counts in their own time, not in their
  ``compile_s`` (the engine replays in its T3 thread alone and compiles in its warm-up).
- ``warmup_calls``: how many calls leave such a function ready: with CUDA graph trees three (the
  first runs eagerly, the second records, the third replays), else one (the one that compiles).
- ``skipping_guards``: dynamo's guard checks skipped for a call whose guards were checked
  before, as long as no other thread is inside such a call (torch's stance is process-wide;
  the rest of it, a caller's ``force_eager`` say, is kept).
- ``forcing_eager``: compiled code run eagerly in every thread (a dtype trace's hooks see it).
  Both hold the one stance of the process by count (``_Stance``), so holders whose lifetimes
  cross in two threads never put back each other's temporary stance, nor a caller's.
- ``fell_back``: the one warning of a compile that failed, its error in one line (the reason a
  caller keeps as its ``fallback_reason``).
- ``cudagraph_thread_ready``: CUDA graph trees' per-thread state made for a thread that has none
  (``replay`` calls it): before torch 2.13 only the thread that imported Inductor's
  ``cudagraph_trees`` had it, and any other thread's first compiled call failed with a bare
  AssertionError (pytorch/pytorch#123177). Seen on the H200 (torch 2.11, 2026-12-04): the load
  study's second engine, in a thread of its own, fell back to the static step.
"""

from __future__ import annotations

import threading
import traceback
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from .patching import own_code


def compile_method(
    fn: Callable[..., Any], owner: object, cudagraphs: bool, fullgraph: bool = True, cpp_wrapper: bool = False
) -> Callable[..., Any]:
    """``fn`` bound to ``owner`` and compiled on its own code object for static shapes
    (``cpp_wrapper`` applies without CUDA graphs only: a replayed graph has no wrapper to run)."""
    own = types.MethodType(own_code(fn), owner)
    if cudagraphs:
        return torch.compile(own, fullgraph=fullgraph, dynamic=False, mode="reduce-overhead")
    options: dict[str, str | int | bool | Callable[..., Any]] | None = (
        {"cpp_wrapper": True} if cpp_wrapper else None
    )
    return torch.compile(own, fullgraph=fullgraph, dynamic=False, options=options)


_replay_lock = threading.RLock()  # one CUDA graph replay (mark, call, clone) at a time


def replay(
    fn: Callable[..., Any], *args: Any, cudagraphs: bool, compiled: bool = True, skip_guards: bool = False
) -> Any:
    """``fn(*args)``; with CUDA graphs, a new step marked first and the outputs (a tensor or a
    tuple of them) cloned out of the graph's memory pool. Every compiled call of the package
    runs here, inside ``skipping_guards(skip_guards)``: one that checks its guards (a new shape,
    say) puts the checks back for a step of another thread that skips them. An eager ``fn``
    (``compiled=False``) has no guards and leaves the stance alone."""
    if not compiled:
        return fn(*args)
    with skipping_guards(skip_guards):
        if not cudagraphs:
            return fn(*args)
        cudagraph_thread_ready()
        # Held to the clone: another thread's replay of the same graph in between would overwrite
        # the outputs before they are copied (streams in threads share a wrapper's estimator).
        with _replay_lock:
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(*args)
            return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


def cudagraph_thread_ready() -> None:
    """Give this thread CUDA graph trees' own state (a tree manager per device, its locks) where
    it has none, as torch 2.13's ``get_obj`` does itself; before that version a thread other than
    the one that imported ``cudagraph_trees`` (and the threads autograd copies its state to) failed
    ``assert torch._C._is_key_in_tls(...)``. A thread's graphs stay in its own tree, as before."""
    from torch._inductor import cudagraph_trees as trees  # imported by the first compile anyway

    local = trees.local
    if hasattr(local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    # What the module does for its importing thread (torch 2.13 calls it ``_initialize_tls``,
    # which earlier versions do not have): a tree manager per device, and the same objects
    # stashed where the threads autograd starts look them up.
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


def warmup_calls(cudagraphs: bool) -> int:
    """Calls after which a compiled function runs as it will from then on."""
    return 3 if cudagraphs else 1


class _Stance:
    """torch's compile stance (``torch._dynamo.eval_frame._stance``), owned here for its holders.

    The stance is one setting for the whole process, read each time compiled code is entered.
    Two things change it for a while: a dtype trace (compiled code eager, so its hooks see the
    calls) and a step (guards skipped). Each saving the stance it found and putting it back on
    exit, holders whose lifetimes crossed in two threads put back each other's temporary one
    ("force_eager" or skipped guards for good). So they are counted: the stance the first holder
    of either kind found is the base, the stance is made again from the base and the holders
    inside at every entry and exit, and the base is back when the last one leaves. A stance the
    holders did not set themselves (a caller's ``set_stance``, or the end of its block that began
    before a holder came in) is the new base from the next entry or exit on: the holders' changes
    are made on it, and it is the one left when the last holder leaves. A block that began while a
    holder was inside puts that holder's temporary stance back as it ends (the very object it
    found): the base it was made on is taken instead."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.eager = 0  # open forcing_eager() blocks, in any thread
        self.steps = 0  # calls inside skipping_guards(), in any thread
        self.skip = False  # the one call inside came in alone and asked to skip its guards
        self.base: Any = None  # the stance the holders change, as its last setter outside left it
        self.applied: Any = None  # the stance object _apply last left set: any other was set outside
        # Each temporary stance set here, one object per (stance, base it was made on), and its
        # base: a caller's block puts back the very object it found (a caller's set_stance makes
        # a new one), so one that began while a holder was inside and ends later is known by it.
        self.made: list[tuple[Any, Any]] = []

    def _apply(self) -> None:
        """Set the stance the base and the holders inside now make (the lock held), on the
        stance set now if that is not the one left here last (or none was yet): a caller set it,
        or a caller's block put back a temporary one of ours as it ended, whose base is taken."""
        from torch._dynamo import eval_frame  # imported by the first compile, not by torch

        now = eval_frame._stance
        if now is not self.applied:
            self.base = next((base for made, base in self.made if made is now), now)
        base = self.base
        eager = self.eager > 0  # a forced backend is for compiling: none under force_eager
        want = eval_frame.DynamoStance(
            "force_eager" if eager else base.stance,
            base.skip_guard_eval_unsafe or self.skip,
            None if eager else base.backend,
        )
        target = base  # the object itself: the base, or the one made for this temporary stance on it
        if want != base:
            target = next((m for m, b in self.made if m == want and b == base), want)
            if target is want:
                self.made.append((want, base))  # a handful at most: two flags on a caller's few
        if target != now:  # (set_stance refuses inside a compiled region, even a no-op)
            eval_frame._set_stance(target)
        self.applied = eval_frame._stance

    @contextmanager
    def held(self, eager: bool, skip: bool = False) -> Iterator[None]:
        """Inside: a holder of compiled code run eagerly (``eager``) or of a step, which skips its
        guards if it asked to (``skip``) and no other step is inside: one arriving meanwhile is
        checked (its call may be the first after a change), and no step skips again until all
        have left."""
        with self.lock:
            before = (self.eager, self.steps, self.skip, self.base)
            if eager:
                self.eager += 1
            else:
                self.steps += 1
                self.skip = skip and self.steps == 1
            try:
                self._apply()
            except BaseException:  # (inside a compiled region, say): this holder never came in
                self.eager, self.steps, self.skip, self.base = before
                raise
        try:
            yield
        finally:
            with self.lock:
                if eager:
                    self.eager -= 1
                else:
                    self.steps -= 1
                    self.skip = self.skip and self.steps > 0
                self._apply()


_stance = _Stance()


def forcing_eager() -> AbstractContextManager[None]:
    """Inside: ``torch.compile``'d code runs eagerly, in every thread (the stance is the
    process's); the stance from before (or one a caller set meanwhile) is back when the last
    holder leaves."""
    return _stance.held(eager=True)


def skipping_guards(wanted: bool) -> AbstractContextManager[None]:
    """Inside: dynamo skips its guard checks, if ``wanted`` and no other thread is inside too
    (the rest of the stance, a caller's ``force_eager`` say, is kept). Compiled code run while a
    step is inside alone must come in too (``replay`` does), or it would skip its guards as well."""
    return _stance.held(eager=False, skip=wanted)


def fell_back(e: Exception, what: str, instead: str, stacklevel: int = 2) -> str:
    """Warn once that ``torch.compile`` of ``what`` failed and ``instead`` runs from now on;
    the reason, ``Type: first paragraph`` of the error (dynamo puts the backend's own error
    there, then pages of advice), and for an error with no message (a bare ``assert``), the
    error itself or the backend's one dynamo wrapped, the file, line and function that raised it.
    ``stacklevel`` as the caller's own ``warnings.warn``."""
    first = " ".join(str(e).strip().split("\n\n")[0].split())
    # dynamo's wrapper says "backend='inductor' raised: AssertionError:": the inner error is bare
    bare = (getattr(e, "inner_exception", None) or e.__cause__) if first else e
    if bare is not None and not str(bare).strip() and bare.__traceback__ is not None:
        frame = traceback.extract_tb(bare.__traceback__)[-1]  # where it failed is the reason
        first = f"{first} raised at {Path(frame.filename).name}:{frame.lineno} in {frame.name}".strip()
    reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
    warnings.warn(f"torch.compile of {what} failed ({reason}); {instead}", RuntimeWarning, stacklevel + 1)
    return reason
