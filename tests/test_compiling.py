"""core.compiling: what a failed compile says, and CUDA graph trees' per-thread state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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


def test_a_backend_error_without_a_message_is_named_by_where_it_was_raised() -> None:
    # Dynamo wraps the backend's error: "backend='inductor' raised: AssertionError:" has a message,
    # the bare assert inside it none
    def failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        raise AssertionError

    double = torch.compile(lambda x: x * 2, backend=failing_backend)
    with pytest.raises(Exception) as caught:
        double(torch.ones(2))
    with pytest.warns(RuntimeWarning, match="raised at test_compiling.py"):
        reason = fell_back(caught.value, "a step", "the eager one")
    assert "AssertionError: raised at test_compiling.py:" in reason
    assert reason.endswith(" in failing_backend")


def test_compile_method_asks_for_cuda_graphs_or_the_cpp_wrapper_on_a_code_object_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What each path passes torch.compile: static shapes always, CUDA graph trees
    ("reduce-overhead") with cudagraphs and then no C++ wrapper (a replayed graph has none to run)."""
    asked: list[tuple[Any, dict[str, Any]]] = []

    def recording(fn: Any, **kwargs: Any) -> Any:
        asked.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", recording)

    class Owner:
        def step(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    owner = Owner()
    for cudagraphs, cpp_wrapper in ((True, False), (True, True), (False, True), (False, False)):
        compiling.compile_method(Owner.step, owner, cudagraphs=cudagraphs, cpp_wrapper=cpp_wrapper)
    graphs = {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}
    static = {"fullgraph": True, "dynamic": False}
    cpp, plain = {**static, "options": {"cpp_wrapper": True}}, {**static, "options": None}
    assert [kw for _, kw in asked] == [graphs, graphs, cpp, plain]
    assert all(fn.__self__ is owner and fn.__func__.__code__ is not Owner.step.__code__ for fn, _ in asked)


def test_a_cuda_graph_replay_marks_a_step_before_the_call_and_clones_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unmarked, the tree may not reuse its pool; uncloned, the next replay overwrites the outputs."""
    events: list[str] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))

    class PoolOutput:  # an output living in the graph's memory pool
        def clone(self) -> str:
            events.append("clone")
            return "copy"

    def graph(*outputs: PoolOutput) -> Any:
        events.append("call")
        return outputs if len(outputs) > 1 else outputs[0]

    assert compiling.replay(graph, PoolOutput(), cudagraphs=True) == "copy"
    assert events == ["mark", "call", "clone"]
    events.clear()
    assert compiling.replay(graph, PoolOutput(), PoolOutput(), cudagraphs=True) == ("copy", "copy")
    assert events == ["mark", "call", "clone", "clone"]
    events.clear()
    out = PoolOutput()
    assert compiling.replay(graph, out, cudagraphs=False) is out and events == ["call"]  # no graph, no pool


def _get_obj_before_torch_2_13(local: Any, attr_name: str) -> Any:
    """``cudagraph_trees.get_obj`` as torch 2.11 (the H200 image's) has it."""
    if hasattr(local, attr_name):
        return getattr(local, attr_name)
    assert torch._C._is_key_in_tls(attr_name)
    return torch._C._get_obj_in_tls(attr_name)


def _in_threads(*fns: Callable[[], object], timeout: float = 30) -> list[BaseException]:
    """Each of ``fns`` run in a thread of its own, all at once: what they raised. A thread still
    running ``timeout`` seconds after its join began fails the test (a deadlock); it is a daemon,
    so that it does not keep the test process alive after the session."""
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
        assert not t.is_alive(), f"a thread still runs after {timeout} s: deadlocked"
    return errors


def _in_a_new_thread(fn: Callable[[], object]) -> BaseException | None:
    """What ``fn`` raised in a thread of its own, if anything."""
    errors = _in_threads(fn)
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

    # 60 replays take well under a second: a thread still running after 10 s is stuck
    assert _in_threads(lambda: worker(1.0), lambda: worker(2.0), timeout=10) == []
    assert wrong == []


@pytest.mark.parametrize("first", ["trace", "step"])
def test_a_dtype_trace_and_a_step_crossing_in_two_threads_leave_the_stance_as_it_was(first: str) -> None:
    """A dtype trace (compiled code eager) and a step (guards skipped) each saved torch's
    process-wide stance and put it back: when one entered after the other and left after it too,
    it put back the other's. Trace first left "force_eager" for good; step first left guards
    skipped for good, and a later call with a new shape failed ("Recompilation triggered with
    skip_guard_eval_unsafe stance")."""
    from torch._dynamo import eval_frame

    from tts_workbench.core.compiling import skipping_guards
    from tts_workbench.instruments.dtypes import trace_dtypes

    net = torch.nn.Linear(4, 4)
    holders = {"trace": lambda: trace_dtypes(net), "step": lambda: skipping_guards(True)}
    second = "step" if first == "trace" else "trace"
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    double(torch.ones(2))
    before = eval_frame._stance
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[Any] = []  # the stance the second holder has once the first has left

    def enter_first() -> None:
        with holders[first]():
            first_in.set()
            assert second_in.wait(timeout=30)
        first_out.set()

    def enter_second() -> None:
        assert first_in.wait(timeout=30)
        with holders[second]():
            second_in.set()
            assert first_out.wait(timeout=30)
            seen.append(eval_frame._stance)

    try:
        assert _in_threads(enter_first, enter_second, timeout=60) == [] and len(seen) == 1
        assert eval_frame._stance == before
        assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))  # a new shape recompiles
        # The trace still open: compiled code eager (the step that skipped has left); the step
        # still inside, the only step: its guards skipped, compiled code no longer eager.
        inside = ("force_eager", False) if second == "trace" else ("default", True)
        assert (seen[0].stance, seen[0].skip_guard_eval_unsafe) == inside
    finally:
        eval_frame._stance = before  # the rest of the session's compiled code as it was


def test_a_callers_block_begun_while_a_step_was_inside_leaves_no_skipped_guards() -> None:
    """torch's block saves the stance it found, a step's skipped guards, and puts it back as it
    ends: ending while the next step was inside, it left the guards skipped for good (2026-12-06,
    a first mend of the test below; an engine steps back to back)."""
    from torch._dynamo import eval_frame

    from tts_workbench.core.compiling import skipping_guards

    before = eval_frame._stance
    first_in, block_in, second_in, block_out = (threading.Event() for _ in range(4))

    def steps() -> None:
        with skipping_guards(True):
            first_in.set()
            assert block_in.wait(timeout=30)
        with skipping_guards(True):
            second_in.set()
            assert block_out.wait(timeout=30)

    def callers_block() -> None:
        assert first_in.wait(timeout=30)
        with torch.compiler.set_stance("force_eager"):
            block_in.set()
            assert second_in.wait(timeout=30)
        block_out.set()

    try:
        assert _in_threads(steps, callers_block, timeout=60) == []
        assert eval_frame._stance == before
    finally:
        eval_frame._stance = before


def test_a_callers_own_stance_equal_to_a_holders_temporary_one_is_the_callers() -> None:
    """A dtype trace once made "force_eager" on the default stance; a caller's own "force_eager"
    (equal in value, another object) is still the caller's, kept inside a step."""
    from torch._dynamo import eval_frame

    from tts_workbench.core.compiling import forcing_eager, skipping_guards

    before = eval_frame._stance
    try:
        with forcing_eager():
            assert eval_frame._stance.stance == "force_eager"
        with torch.compiler.set_stance("force_eager"):
            with skipping_guards(True):
                assert (eval_frame._stance.stance, eval_frame._stance.skip_guard_eval_unsafe) == (
                    "force_eager",
                    True,
                )
            assert eval_frame._stance == eval_frame.DynamoStance("force_eager")
        assert eval_frame._stance == before
    finally:
        eval_frame._stance = before


@pytest.mark.parametrize("user", [{"stance": "force_eager"}, {"skip_guard_eval_unsafe": True}])
def test_a_callers_stance_block_ending_while_a_step_is_inside_is_not_put_back(user: dict[str, Any]) -> None:
    """A step that came in during a caller's own ``set_stance`` block (in another thread) saved
    the caller's temporary stance and, leaving after the block had ended, put it back for good."""
    from torch._dynamo import eval_frame

    from tts_workbench.core.compiling import skipping_guards

    before = eval_frame._stance
    block_in, step_in, block_out = threading.Event(), threading.Event(), threading.Event()

    def step() -> None:
        assert block_in.wait(timeout=30)
        with skipping_guards(False):
            step_in.set()
            assert block_out.wait(timeout=30)

    def callers_block() -> None:
        with torch.compiler.set_stance(**user):
            block_in.set()
            assert step_in.wait(timeout=30)
        block_out.set()

    try:
        assert _in_threads(step, callers_block, timeout=60) == []
        assert eval_frame._stance == before
    finally:
        eval_frame._stance = before  # the rest of the session's compiled code as it was
