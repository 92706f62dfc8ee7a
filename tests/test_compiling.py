"""core.compiling: what a failed compile says, and CUDA graph trees' per-thread state."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from torch._inductor import cudagraph_trees as trees

from tts_workbench.core import compiling
from tts_workbench.core.compiling import cudagraph_thread_ready, fell_back


def test_a_compile_error_without_a_message_is_named_by_where_it_was_raised() -> None:
    # the H200's load study (2026-12-04) recorded only "AssertionError": nothing to go on
    def inside_inductor() -> None:
        raise AssertionError  # a bare assert, as Inductor's (pytest would rewrite an assert here)

    try:
        inside_inductor()
    except AssertionError as e:
        with pytest.warns(RuntimeWarning, match="raised at test_compiling.py"):
            reason = fell_back(e, "a step", "the eager one")
    assert reason.startswith("AssertionError: raised at test_compiling.py:")
    assert reason.endswith(" in inside_inductor")
    with pytest.warns(RuntimeWarning):  # a message, when there is one, is the reason as before
        assert fell_back(ValueError("bad shape\n\nadvice"), "a step", "eager") == "ValueError: bad shape"


def _get_obj_before_torch_2_13(local: Any, attr_name: str) -> Any:
    """``cudagraph_trees.get_obj`` as torch 2.11 (the H200 image's) has it."""
    if hasattr(local, attr_name):
        return getattr(local, attr_name)
    assert torch._C._is_key_in_tls(attr_name)
    return torch._C._get_obj_in_tls(attr_name)


def _in_a_new_thread(fn: Any) -> BaseException | None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    return errors[0] if errors else None


def test_a_new_thread_gets_its_own_cuda_graph_tree_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trees, "get_obj", _get_obj_before_torch_2_13)
    monkeypatch.delattr(trees, "_initialize_tls", raising=False)  # torch 2.13's, not 2.11's
    # torch 2.11: a thread that did not import cudagraph_trees fails its first compiled call
    assert isinstance(_in_a_new_thread(lambda: trees.get_container(0)), AssertionError)
    mine = trees.get_container(0)  # the importing thread's own container

    def ready_then_get() -> None:
        cudagraph_thread_ready()
        theirs = trees.get_container(0)
        assert theirs is not mine and theirs is trees.get_container(0)  # its own, kept
        cudagraph_thread_ready()  # a second call keeps what the thread has
        assert trees.get_container(0) is theirs

    assert _in_a_new_thread(ready_then_get) is None
    assert trees.get_container(0) is mine  # this thread's state untouched


def test_replays_in_two_threads_each_get_their_own_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    # A compiled function's CUDA graph lives in the tree of the thread that first called it, and
    # every thread replays it into the same output memory: a replay of another thread between a
    # call and its clone gave both threads the second one's output. Emulated here (no GPU): one
    # static output buffer, the GIL let go between the graph's write and the return.
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    monkeypatch.setattr(compiling, "cudagraph_thread_ready", lambda: None)
    static_out = torch.zeros(1)

    def graph(x: torch.Tensor) -> torch.Tensor:
        static_out.copy_(x)
        time.sleep(0.001)  # the launch: another thread runs meanwhile
        return static_out

    wrong: list[tuple[float, float]] = []

    def worker(v: float) -> None:
        for _ in range(30):
            out = compiling.replay(graph, torch.tensor([v]), cudagraphs=True)
            if out.item() != v:
                wrong.append((v, out.item()))

    threads = [threading.Thread(target=worker, args=(float(v),)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert wrong == []
