"""Shadows that threads hold at once and leave in any order (core.patching.shared, routed)."""

from __future__ import annotations

import copy
import itertools
import os
import threading
import time
import types
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from chatterbox.tts import ChatterboxTTS
from transformers.utils import output_capturing

from tts_workbench.core import patching
from tts_workbench.core.compiling import skipping_guards
from tts_workbench.core.errors import ConfigError
from tts_workbench.core.patching import own_code, routed, scoped_item, shadow, shared, working_copy
from tts_workbench.models.frontends import offline_hub


class Voice:
    def speak(self) -> str:
        return "upstream"


def tagged(tag: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def wrap(fn: Callable[..., str]) -> Callable[..., str]:
        return lambda: f"{tag}({fn()})"

    return wrap


def test_shared_stays_until_the_last_user_leaves_in_any_order() -> None:
    v = Voice()
    a, b = ExitStack(), ExitStack()
    a.enter_context(shared(v, "speak", tagged("fast")))
    b.enter_context(shared(v, "speak", tagged("fast")))
    a.close()  # the first in leaves first: a plain shadow would restore the instance here
    assert v.speak() == "fast(upstream)"
    b.close()
    assert v.speak() == "upstream" and "speak" not in vars(v)


def test_routed_applies_to_its_own_thread_and_is_removed_by_the_last_to_leave() -> None:
    v = Voice()
    inside, leave = threading.Event(), threading.Event()
    heard: dict[str, Any] = {}

    def other() -> None:  # enters before the main thread and leaves before it
        with routed(v, "speak", tagged("B")):
            inside.set()
            heard["B"] = v.speak()
            leave.wait(timeout=30)

    thread = threading.Thread(target=other)
    with routed(v, "speak", tagged("A")):
        thread.start()
        assert inside.wait(timeout=30)
        assert v.speak() == "A(upstream)"  # not B's: each thread its own route
        with routed(v, "speak", tagged("inner")):  # nested in one thread: wraps the outer
            assert v.speak() == "inner(A(upstream))"
        leave.set()
        thread.join(timeout=30)
        assert heard["B"] == "B(upstream)" and v.speak() == "A(upstream)"
    assert v.speak() == "upstream" and "speak" not in vars(v)
    # a thread that is not inside any route calls what the instance had
    with routed(v, "speak", tagged("A")):
        seen: list[str] = []
        t = threading.Thread(target=lambda: seen.append(v.speak()))
        t.start()
        t.join(timeout=30)
        assert seen == ["upstream"]


def test_a_code_copy_keeps_keyword_only_defaults() -> None:
    def f(x: int, *, k: int = 3) -> int:
        return x + k

    assert own_code(f)(1) == 4 and own_code(f).__code__ is not f.__code__


def test_shadows_overlapping_out_of_order_leave_the_instance_as_it_was() -> None:
    """Two shadows (plain or shared) on the same method, entered and left in any order (two
    threads): each leaving put back what it saw on entry, so one undid the other's and the
    last left a wrapper on the model for good."""
    for under, over in (("shared", "shadow"), ("shadow", "shared"), ("shadow", "shadow")):
        for first_out in ("under", "over"):
            v = Voice()
            stacks = {"under": ExitStack(), "over": ExitStack()}
            for place, kind in (("under", under), ("over", over)):
                make = shared if kind == "shared" else shadow
                stacks[place].enter_context(make(v, "speak", tagged(place)))
            assert v.speak() == "over(under(upstream))"
            stacks[first_out].close()
            still = "over" if first_out == "under" else "under"
            # the one still inside is still on the model. Over had captured under's wrapper on
            # entry and still calls it: a plain shadow under it still runs, a shared one whose
            # users all left calls through ...
            if first_out == "over":
                expected = "under(upstream)"
            else:
                expected = "over(upstream)" if under == "shared" else "over(under(upstream))"
            assert v.speak() == expected, (under, over, first_out)
            stacks[still].close()
            assert v.speak() == "upstream" and "speak" not in vars(v), (under, over, first_out)  # then none
    v = Voice()
    for make in (shadow, shared, routed):  # a block that fails puts back what the instance had too
        with pytest.raises(ValueError):
            with make(v, "speak", tagged("failing")):
                raise ValueError(make.__name__)
        assert v.speak() == "upstream" and "speak" not in vars(v), make.__name__


def test_a_shadow_leaves_what_its_wrap_returned_as_it_was() -> None:
    """``functools.update_wrapper`` wrote upstream's metadata onto whatever the wrap returned: an
    existing function kept upstream's name, docstring and ``__wrapped__`` (a bound method, which
    kept its instance alive) for good; a bound method of another object, or a class, could not
    take them (AttributeError), so the shadow failed."""

    class Model:
        def forward(self, x: int) -> int:
            """Upstream's forward."""
            return x

    def fast_forward(x: int) -> int:
        """My replacement."""
        return 2 * x

    m, donor = Model(), types.SimpleNamespace(g=Voice().speak)
    with shadow(m, "forward", lambda _: fast_forward):
        assert m.forward(3) == 6  # and it still reads as upstream:
        assert (m.forward.__name__, m.forward.__doc__) == ("forward", "Upstream's forward.")
    meta = (fast_forward.__name__, fast_forward.__doc__, hasattr(fast_forward, "__wrapped__"))
    assert meta == ("fast_forward", "My replacement.", False)
    with shadow(donor, "g", lambda _: m.forward):  # another object's bound method
        assert donor.g(5) == 5 and donor.g.__name__ == "speak"
    assert donor.g() == "upstream"

    class Mine(Voice):
        pass

    ns = types.SimpleNamespace(Cls=Voice)
    with shadow(ns, "Cls", lambda _: Mine):  # a class is installed as it is: still a class
        assert ns.Cls is Mine
    assert (Mine.__name__, ns.Cls) == ("Mine", Voice)


def test_a_submodule_parameter_or_buffer_cannot_be_shadowed() -> None:
    # nn.Module keeps them outside the instance's __dict__: before, a shadow of a child module
    # was never undone (its exit took the child for another shadow sitting on top).
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    lin = model[0]
    for obj, name in ((model, "0"), (lin, "weight"), (model[1], "running_mean")):
        with (
            pytest.raises(TypeError, match="shadow replaces methods and plain attributes"),
            shadow(obj, name, lambda x: x),
        ):
            pass
    assert model[0] is lin and isinstance(lin.weight, torch.nn.Parameter)
    with pytest.raises(TypeError, match="shadow replaces"), shared(model, "0", lambda x: x):
        pass


def test_a_shared_or_routed_shadow_left_under_another_does_nothing_once_its_users_left() -> None:
    """Its last user left while a plain shadow sat on top (``around`` of the profiler in one
    thread, generations timed in another): it stays under that shadow. Entered again, a routed
    one's route was found by the one left behind too (a RecursionError), a shared one's wrapper
    ran twice."""
    for make in (routed, shared):
        v = Voice()
        first, top = ExitStack(), ExitStack()
        first.enter_context(make(v, "speak", tagged("mine")))
        top.enter_context(shadow(v, "speak", tagged("top")))
        first.close()
        assert v.speak() == "top(upstream)", make
        with make(v, "speak", tagged("mine")):
            assert v.speak() == "mine(top(upstream))", make
        top.close()
        assert v.speak() == "upstream" and "speak" not in vars(v), make


def test_a_routed_shadow_whose_wrap_fails_is_not_left_on_the_instance() -> None:
    def failing(fn: Callable[..., str]) -> Callable[..., str]:
        raise RuntimeError("wrap failed")

    v = Voice()
    with pytest.raises(RuntimeError, match="wrap failed"), routed(v, "speak", failing):
        pass
    assert "speak" not in vars(v)  # before, the dispatcher stayed, held by a user who had left
    with routed(v, "speak", tagged("A")):
        assert v.speak() == "A(upstream)"
    assert "speak" not in vars(v)


def test_a_shadow_entered_while_a_routed_one_enters_in_another_thread_leaves_both_working() -> None:
    """A plain shadow (the profiler's) still building its wrapper when another thread's routed
    timer entered: before, it then set its wrapper over the timer's dispatcher, so the timer
    counted none of its thread's calls and its dispatcher stayed behind in ``_left``."""
    v = Voice()
    building, built, installed, entered, done = (threading.Event() for _ in range(5))
    calls: list[str] = []

    def slow(fn: Callable[..., str]) -> Callable[..., str]:
        building.set()
        built.wait(timeout=30)
        return tagged("profiler")(fn)

    def profiler() -> None:
        with shadow(v, "speak", slow):
            installed.set()
            done.wait(timeout=30)

    def counted(fn: Callable[..., str]) -> Callable[..., str]:
        def inner() -> str:
            calls.append("timer")
            return fn()

        return inner

    def timer() -> None:
        with routed(v, "speak", counted):
            entered.set()
            assert installed.wait(timeout=30)
            for _ in range(5):
                v.speak()

    left = len(patching._left)
    p = threading.Thread(target=profiler)
    p.start()
    assert building.wait(timeout=30)
    t = threading.Thread(target=timer)
    t.start()
    entered.wait(timeout=1)  # before: entered at once; now: waits until the shadow is on
    built.set()
    t.join(timeout=30)
    done.set()
    p.join(timeout=30)
    assert calls == ["timer"] * 5
    assert "speak" not in vars(v) and len(patching._left) == left


def test_a_shared_or_routed_shadow_that_cannot_be_set_leaves_nothing_held() -> None:
    """An instance that refuses to be set. Before, the failed installation stayed held, so the
    next user installed nothing (no error, no wrapper) and left an entry in ``_left``."""

    class Frozen(Voice):
        def __setattr__(self, name: str, value: Any) -> None:
            raise AttributeError(f"{name!r} cannot be set")

    left = len(patching._left)
    for make in (shared, routed):
        v = Frozen()
        for _ in range(2):
            with pytest.raises(AttributeError, match="cannot be set"), make(v, "speak", tagged("A")):
                pass
        assert not [key for key in patching._held if key[:2] == (id(v), "speak")], make
        assert v.speak() == "upstream", make
    assert len(patching._left) == left


class Settable:
    def __init__(self) -> None:
        self._speak: Callable[[], str] = lambda: "upstream"

    @property
    def speak(self) -> Callable[[], str]:
        return self._speak

    @speak.setter
    def speak(self, fn: Callable[[], str]) -> None:
        self._speak = fn


class ReadOnly:
    @property
    def speak(self) -> Callable[[], str]:
        return lambda: "upstream"


def test_a_property_cannot_be_shadowed_nor_copied() -> None:
    """Setting a settable property ran its setter, so the exit never found its value on the
    instance: the wrapper stayed behind the property for good, and in ``_left``."""
    left = len(patching._left)
    for cls in (Settable, ReadOnly):
        for make in (shadow, shared, routed, working_copy):
            v = cls()
            fn = v.speak
            with pytest.raises(TypeError, match="data descriptor"), make(v, "speak", tagged("A")):
                pass
            assert v.speak() == "upstream" and "speak" not in vars(v), (cls, make)
            assert cls is ReadOnly or v.speak is fn, make
            assert not [key for key in patching._held if key[:2] == (id(v), "speak")], (cls, make)
    assert len(patching._left) == left


def test_shadows_setting_the_same_object_on_two_instances_put_back_their_own() -> None:
    """What a shadow left under another was keyed by the value's id alone: a shadow of another
    instance that set the same object (a cached small int) took it for its own."""
    left = len(patching._left)
    a, b = types.SimpleNamespace(x=1), types.SimpleNamespace(x=2)
    under, over = ExitStack(), ExitStack()
    under.enter_context(shadow(a, "x", lambda v: v + 1))
    assert a.x is b.x  # the very int object
    over.enter_context(shadow(a, "x", lambda v: v * 10))
    under.close()  # left under ``over``, which puts back 1 for it
    with shadow(b, "x", lambda v: 99):
        assert b.x == 99
    assert b.x == 2
    over.close()
    assert (a.x, b.x) == (1, 2) and len(patching._left) == left


def test_a_shared_and_a_routed_shadow_of_one_method_stack_and_leave_in_any_order() -> None:
    """They were one installation: the second in joined the first's, its wrapper never applied."""
    left = len(patching._left)
    for lower, upper in ((shared, routed), (routed, shared)):
        for first_out in ("lower", "upper"):
            v = Voice()
            stacks = {"lower": ExitStack(), "upper": ExitStack()}
            stacks["lower"].enter_context(lower(v, "speak", tagged("lower")))
            stacks["upper"].enter_context(upper(v, "speak", tagged("upper")))
            assert v.speak() == "upper(lower(upstream))", (lower, upper)
            stacks[first_out].close()
            still = "upper" if first_out == "lower" else "lower"
            assert v.speak() == f"{still}(upstream)", (lower, upper, first_out)  # the other calls through
            stacks[still].close()
            assert v.speak() == "upstream" and "speak" not in vars(v), (lower, upper, first_out)
    assert len(patching._left) == left


def test_a_working_copy_puts_back_what_the_instance_had() -> None:
    """It set back the value it read on entry: of a class attribute, it left an instance
    attribute. What the block sets meanwhile (prepare_conditionals inside a wrapper) is replaced
    by the original too."""

    class Holder:
        conds = "class-level"

    h = Holder()
    with working_copy(h, "conds", lambda v: f"copy of {v}") as conds:
        assert h.conds == conds == "copy of class-level"
    assert "conds" not in vars(h) and h.conds == "class-level"
    with pytest.raises(ValueError), working_copy(h, "conds", lambda v: f"copy of {v}"):
        raise ValueError("the block failed")
    assert "conds" not in vars(h) and h.conds == "class-level"
    h.conds = ["original"]  # type: ignore[assignment]
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))  # a submodule: kept outside ``__dict__``
    for obj, name in ((h, "conds"), (model, "0")):
        original = getattr(obj, name)
        with working_copy(obj, name, copy.deepcopy) as mine:
            assert getattr(obj, name) is mine is not original
            setattr(obj, name, copy.deepcopy(original))  # replaced inside the block
        assert getattr(obj, name) is original, name
        with pytest.raises(ValueError), working_copy(obj, name, copy.deepcopy):
            raise ValueError("the block failed")
        assert getattr(obj, name) is original, name
    assert "conds" in vars(h) and "0" not in vars(model)


def test_a_clean_copy_leaves_the_sources_shadows_behind() -> None:
    """A deep copy made inside a shadow copied the wrapper, which calls the source's method: a
    bfloat16 decode copy made inside ``record_kernels`` ran the user's float32 layers. The copy
    has what the source had before its shadows, however they stack, and runs its own modules."""

    def calling(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: fn(*args)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    model[1].scale = 2  # an instance attribute of its own, shadowed too
    left = ExitStack()  # a shared shadow whose last user left while another sat on top of it
    left.enter_context(shared(model, "forward", calling))
    with ExitStack() as stack:
        stack.enter_context(shadow(model, "forward", calling))
        left.close()
        stack.enter_context(routed(model[0], "forward", calling))
        stack.enter_context(shadow(model[1], "scale", lambda v: v * 10))
        dup = patching.clean_copy(model)
        assert "forward" in vars(model) and "forward" in vars(model[0]) and model[1].scale == 20
    assert "forward" not in vars(dup) and "forward" not in vars(dup[0]) and vars(dup[1])["scale"] == 2
    calls: list[str] = []
    model[0].register_forward_hook(lambda *_: calls.append("source"))
    dup[0].register_forward_hook(lambda *_: calls.append("copy"))
    dup(torch.ones(1, 2))
    assert calls == ["copy"] and dup[0] is not model[0]


def test_a_copy_made_inside_a_dtype_trace_keeps_none_of_its_hooks() -> None:
    """A decode copy made inside ``trace_dtypes`` (a decode-bfloat16 wrapper, the fused copy) kept
    the trace's hooks for good: 62 on the tiny T3's copy, recording every later step into a trace
    long ended. Hooks of the model's own (not transient) are copied as deepcopy copies them."""
    from tts_workbench.instruments.dtypes import trace_dtypes

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    own: list[str] = []
    model[0].register_forward_hook(lambda *_: own.append("own"))
    with trace_dtypes(model) as trace:
        dup = patching.clean_copy(model)
        model(torch.ones(1, 2))
    recorded = len(trace.records)
    assert recorded > 0 and len(own) == 1
    dup(torch.ones(1, 2))  # no trace hook: nothing recorded, nothing raised
    assert len(trace.records) == recorded and len(own) == 2  # the model's own hook, copied with it
    for m in dup.modules():
        assert not m._forward_pre_hooks and not m._forward_pre_hooks_with_kwargs
        assert not m._forward_hooks_always_called and not m._forward_hooks_with_kwargs
    assert sum(len(m._forward_hooks) for m in dup.modules()) == 1


def test_a_restore_that_fails_still_puts_back_every_other_module() -> None:
    """An allocation failing while T3's weights were copied back left S3Gen cast too: each
    snapshot is put back, then the first error is raised."""
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    weights = [first.weight.data, second.weight.data]
    with pytest.raises(MemoryError, match="copying back"):
        with patching.preserved(first, second) as snapshots:
            first.half(), second.half()

            def failing() -> None:
                raise MemoryError("copying back")

            snapshots[0].restore = failing  # type: ignore[method-assign]
    assert first.weight.dtype == torch.float16  # the one that failed
    assert second.weight.data_ptr() == weights[1].data_ptr() and second.weight.dtype == torch.float32


def test_a_scoped_item_overlapping_in_threads_stays_until_the_last_leaves() -> None:
    """Each put back what it saw on entry: the first out took the item from the second, still
    inside, and the second out put the first's back for good."""
    configs: dict[str, Any] = {"kept": 1}
    hub = types.SimpleNamespace(HF_HUB_OFFLINE=False)
    a, b = ExitStack(), ExitStack()
    for stack in (a, b):
        stack.enter_context(scoped_item(configs, "tiny", {"layers": 2}))
        stack.enter_context(offline_hub(hub))
    a.close()  # the first in leaves first
    assert configs == {"kept": 1, "tiny": {"layers": 2}} and hub.HF_HUB_OFFLINE is True
    b.close()
    assert configs == {"kept": 1} and hub.HF_HUB_OFFLINE is False


def test_a_scoped_item_with_another_value_waits_until_the_item_is_free() -> None:
    configs: dict[str, Any] = {}
    inside, seen = threading.Event(), []

    def other() -> None:
        inside.set()
        with scoped_item(configs, "tiny", "B"):
            seen.append(configs["tiny"])

    thread = threading.Thread(target=other)
    with scoped_item(configs, "tiny", "A"):
        thread.start()
        assert inside.wait(timeout=30)
        thread.join(timeout=0.2)
        assert thread.is_alive() and configs["tiny"] == "A"  # B waits: A still builds with its own
    thread.join(timeout=30)
    assert seen == ["B"] and configs == {}
    with scoped_item(configs, "tiny", "A"), scoped_item(configs, "tiny", "A"):  # the same: nests
        with pytest.raises(RuntimeError, match="not nested"), scoped_item(configs, "tiny", "B"):
            pass  # would wait for this thread to leave
    assert configs == {}


def test_a_scoped_item_that_cannot_be_set_leaves_nothing_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.environ takes strings only. Before, the item was held before it was set: after the
    TypeError it stayed held with no users, and a user with another value waited for ever."""
    monkeypatch.delenv("TTS_WORKBENCH_SCOPED", raising=False)
    with pytest.raises(TypeError), scoped_item(os.environ, "TTS_WORKBENCH_SCOPED", True):
        pass
    assert (id(os.environ), "TTS_WORKBENCH_SCOPED") not in patching._items
    seen: list[str | None] = []

    def other() -> None:
        with scoped_item(os.environ, "TTS_WORKBENCH_SCOPED", "1"):
            seen.append(os.environ.get("TTS_WORKBENCH_SCOPED"))

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and seen == ["1"]
    assert "TTS_WORKBENCH_SCOPED" not in os.environ


def test_multilingual_readers_in_two_threads_leave_the_logger_and_the_hub_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each reader saved the tokenizer logger's level and the hub's offline switch and restored
    them: the first in leaving first left the other one online and, once both left, the logger
    at ERROR and the hub offline for good."""
    import logging

    from huggingface_hub import constants

    from tts_workbench.models import frontends

    log = logging.getLogger("chatterbox.models.tokenizers.tokenizer")
    level, offline = log.level, constants.HF_HUB_OFFLINE
    warning = logging.LogRecord(log.name, logging.WARNING, "", 0, "missing", None, None)
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def tokenizer(path: str) -> str:  # reader A in one thread, B in another
        if path == "A":
            a_inside.set()
            assert b_inside.wait(timeout=30)
        else:
            b_inside.set()
            assert a_left.wait(timeout=30)
            seen["B"] = (
                log.isEnabledFor(logging.WARNING) and bool(log.filter(warning)),
                constants.HF_HUB_OFFLINE,
            )
        return path

    def read(path: str, after: threading.Event | None = None) -> None:
        frontends.read_tokenizer("multilingual", Path(path))
        if after is not None:
            after.set()

    monkeypatch.setattr(frontends, "MTLTokenizer", tokenizer)
    a = threading.Thread(target=read, args=("A", a_left))
    b = threading.Thread(target=read, args=("B",))
    a.start()
    assert a_inside.wait(timeout=30)
    b.start()
    a.join(timeout=30)
    b.join(timeout=30)
    assert seen["B"] == (False, True)  # B, still inside, quiet and offline
    assert (log.level, log.filters, constants.HF_HUB_OFFLINE) == (level, [], offline)


def test_skipping_guards_keeps_the_callers_stance() -> None:
    """It set the stance "default" with the skip, so a caller's ``force_eager`` (or forced
    backend) was off inside the calls."""
    from torch._dynamo import eval_frame

    for stance, backend in (("force_eager", None), ("fail_on_recompile", None), ("default", "eager")):
        with torch.compiler.set_stance(stance, force_backend=backend):
            with skipping_guards(True):
                now = eval_frame._stance
                assert (now.stance, now.backend, now.skip_guard_eval_unsafe) == (stance, backend, True)
            now = eval_frame._stance
            assert (now.stance, now.backend, now.skip_guard_eval_unsafe) == (stance, backend, False)


def test_released_originals_leave_the_snapshot_and_come_back_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU a cast module's originals stayed referenced by its snapshot, on the GPU: a bfloat16
    # wrapper held the float32 weights too. Here every tensor counts as elsewhere (this CPU has no
    # other device), so release_replaced copies exactly what it would move off a GPU.
    monkeypatch.setattr(patching, "_elsewhere", lambda t, to: True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight = torch.nn.Parameter(model[0].weight.data)  # another parameter, the same memory
    model.register_buffer("scale", torch.rand(4))
    model[2].cached = torch.rand(3)  # a plain tensor attribute (upstream caches some so)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    snap = patching.ModuleSnapshot(model)
    model[0].to(torch.bfloat16)  # replaces model[0]'s weight and bias; model[1] holds the memory
    model[1].to(torch.bfloat16)  # now no one does: one copy for both names
    original = snap.params["0.weight"]
    assert isinstance(original, torch.Tensor)
    watch = torch.utils.weak.WeakTensorKeyDictionary({original: True})
    del original
    moved = snap.release_replaced()
    assert moved == 4 * 4 * 4 + 2 * 4 * 4  # the shared weight once, the two biases
    assert len(watch) == 0  # the snapshot no longer holds the replaced tensor
    snap.restore()
    assert all(torch.equal(v, want[k]) and v.dtype == want[k].dtype for k, v in model.state_dict().items())
    assert model[1].weight.data_ptr() == model[0].weight.data_ptr()  # shared again
    assert model[1].weight is not model[0].weight
    assert isinstance(model[2].cached, torch.Tensor)


def test_memory_the_module_still_holds_is_not_released(monkeypatch: pytest.MonkeyPatch) -> None:
    # one of two parameters sharing memory cast, the other not: copying the cast one's original
    # would free nothing (the other holds it) and part the two at restore
    monkeypatch.setattr(patching, "_elsewhere", lambda t, to: True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    model[1].weight = torch.nn.Parameter(model[0].weight.data)
    snap = patching.ModuleSnapshot(model)
    model[0].to(torch.bfloat16)
    assert snap.release_replaced() == 0
    snap.restore()
    assert model[1].weight.data_ptr() == model[0].weight.data_ptr()
    assert model[0].weight.dtype == torch.float32


def test_nothing_is_released_where_the_tensors_already_are() -> None:
    model = torch.nn.Linear(4, 4)
    snap = patching.ModuleSnapshot(model)
    model.to(torch.bfloat16)
    assert snap.release_replaced() == 0  # on this CPU the originals are where a copy would go
    snap.restore()
    assert model.weight.dtype == torch.float32


class User:
    """A wrapper or an engine, as the registry sees it: anything it can hold a weak reference to."""


class Model(ChatterboxTTS):
    """A Chatterbox model as the registry sees it: its three components, nothing built."""

    def __init__(self) -> None:
        self.t3, self.s3gen, self.ve = User(), User(), User()


def test_sharers_keep_a_holder_out_and_a_holder_keeps_them_out() -> None:
    """Several users may share a model (stream engines: each its own cache over the weights as
    they are), one may hold it alone (a wrapper that changes them): before 2026-12-06 only the
    holder registered, and a wrapper cast T3 under an engine's cache. Each refusal is given
    what has the model; a sharer let go, failed in its block or collected counts no more."""
    model, first, second, holder, other = Model(), User(), User(), User(), User()

    def refused(by: object) -> RuntimeError:
        return RuntimeError(by)

    with patching.sharing(model, first, refused), patching.sharing(model, second, refused):
        pass  # shared by both, after their blocks too, until they let go
    with pytest.raises(RuntimeError) as e, patching.holding(model, holder, refused):
        pass
    assert e.value.args[0] in (first, second)
    patching.let_go(first)
    with pytest.raises(RuntimeError) as e, patching.holding(model, holder, refused):
        pass
    assert e.value.args[0] is second
    patching.let_go(second)
    patching.let_go(second)  # twice: nothing
    with patching.holding(model, holder, refused):
        pass
    with pytest.raises(RuntimeError) as e, patching.sharing(model, first, refused):
        pass
    assert e.value.args[0] is holder and patching.holder_of(model) is holder
    with pytest.raises(RuntimeError) as e, patching.holding(model, other, refused):
        pass
    assert e.value.args[0] is holder
    patching.let_go(holder)
    with pytest.raises(ValueError), patching.holding(model, holder, refused):
        raise ValueError("its construction failed")
    assert patching.holder_of(model) is None
    with pytest.raises(ValueError), patching.sharing(model, first, refused):
        raise ValueError("its construction failed")
    with patching.sharing(model, User(), refused):
        pass  # never let go: collected with its last reference
    with patching.holding(model, holder, refused):
        pass
    patching.let_go(holder)
    assert patching.holder_of(model) is None and not patching.SHARERS


@pytest.mark.parametrize("takes", ["holding", "sharing"])
def test_a_model_object_sharing_a_component_with_a_held_one_is_held_too(takes: str) -> None:
    """Before 2026-12-06 the registry keyed on the model object: a ``copy.copy`` of a wrapped model
    (or a model built around its S3Gen) was free to wrap, and two wrappers closed out of order left
    the user's model in bfloat16 for good. Its components are what a holder changes: a model object
    sharing any of them is held, by the holder, whichever of the two it was given."""
    model, holder, user = Model(), User(), User()
    twin, beside = copy.copy(model), Model()
    beside.s3gen = model.s3gen  # its own T3 and VE, the held model's S3Gen

    def refused(by: object) -> RuntimeError:
        return RuntimeError(by)

    with patching.holding(model, holder, refused):
        pass
    for other in (twin, beside):
        assert patching.holder_of(other) is holder
        with pytest.raises(RuntimeError) as e, getattr(patching, takes)(other, user, refused):
            pass
        assert e.value.args[0] is holder
    assert patching.holder_of(Model()) is None  # a model of its own is free
    patching.let_go(holder)
    assert patching.holder_of(model) is None
    with patching.sharing(beside, user, refused):
        pass
    with pytest.raises(RuntimeError) as e, patching.holding(twin, holder, refused):
        pass
    assert e.value.args[0] is user
    patching.let_go(user)
    assert not patching.SHARERS


@pytest.mark.parametrize("takes", ["holding", "sharing"])
def test_a_user_is_let_go_whatever_its_model_holds_by_then(takes: str) -> None:
    """Before 2026-12-06 ``let_go`` looked the user up by the model's components as they were then:
    a T3 swapped in while an engine ran (a fine-tuned one) left the closed engine registered, and
    every wrapper of the model refused for good. It takes out whatever the user registered."""
    model, user = Model(), User()

    def refused(by: object) -> RuntimeError:
        return RuntimeError(by)

    with getattr(patching, takes)(model, user, refused):
        pass
    before = model.t3
    model.t3 = User()  # swapped while the user has the model
    patching.let_go(user)
    assert user not in patching.SHARERS and user not in patching.HOLDERS.values()
    model.t3 = before  # and back: the model is free
    with patching.holding(model, user, refused):
        pass
    patching.let_go(user)
    assert not patching.HOLDERS and not patching.SHARERS


@pytest.mark.parametrize("takes", ["holding", "sharing"])
def test_a_holder_and_another_taking_the_model_at_once_are_not_both_let_in(
    takes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that a model is free and its taking are one step under ``_holders_lock``: a second
    user checking while a holder is between the two was let in beside it."""
    model, holder, other = Model(), User(), User()
    checked = threading.Event()
    occupant = patching._occupant

    def slow_occupant(keys: frozenset[int]) -> object | None:
        found = occupant(keys)
        checked.set()
        time.sleep(0.2)  # the second user checks meanwhile
        return found

    monkeypatch.setattr(patching, "_occupant", slow_occupant)
    outcomes: list[str] = []

    def take(how: str, user: object) -> None:
        try:
            with getattr(patching, how)(model, user, RuntimeError):
                outcomes.append("took")
        except RuntimeError:
            outcomes.append("refused")

    first = threading.Thread(target=take, args=("holding", holder))
    first.start()
    assert checked.wait(timeout=30)
    second = threading.Thread(target=take, args=(takes, other))
    second.start()
    for thread in (first, second):
        thread.join(timeout=30)
        assert not thread.is_alive()
    patching.let_go(holder)
    patching.let_go(other)
    assert sorted(outcomes) == ["refused", "took"]


def test_the_registry_refuses_what_is_no_model() -> None:
    # a wrapper given for its model: refused by name, before anything is registered
    with pytest.raises(ConfigError, match="User is not a Chatterbox model"):
        with patching.holding(User(), User(), RuntimeError):
            pass


def test_a_snapshot_puts_back_cast_buffers_and_plain_tensor_attributes() -> None:
    # The tests above cast no buffer and checked only that a plain attribute was still a tensor:
    # a restore that skipped buffers (replaced, not swapped, by a cast) or plain attributes (S3Gen's
    # ``pe``, recast by upstream to whatever ran last) left them half precision and passed.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model(torch.rand(4, 2))  # running statistics of their own, not BatchNorm's zeros and ones
    model[1].cached = torch.rand(3)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    cached = model[1].cached.clone()
    snap = patching.ModuleSnapshot(model)
    model.half()
    model[1].cached = model[1].cached.half()  # as upstream recasts its cache
    snap.restore()
    assert all(torch.equal(v, want[k]) and v.dtype == want[k].dtype for k, v in model.state_dict().items())
    assert model[1].cached.dtype == torch.float32 and torch.equal(model[1].cached, cached)


def test_three_shadows_leaving_in_any_order_leave_the_instance_as_it_was() -> None:
    # The one left last puts back what stood under the one below it, which may itself have left
    # (middle, then bottom, then top): following only one such step put the bottom's wrapper back
    for order in itertools.permutations(range(3)):
        v = Voice()
        stacks = [ExitStack() for _ in range(3)]
        for place, stack in enumerate(stacks):  # 0 at the bottom, 2 on top
            stack.enter_context(shadow(v, "speak", tagged(str(place))))
        for place in order:
            stacks[place].close()
        assert v.speak() == "upstream" and "speak" not in vars(v), order


def _capture_hooks(model: torch.nn.Module) -> tuple[int, bool]:
    """Forward hooks on ``model``'s modules, and transformers' flag that its capture hooks are on."""
    return sum(len(m._forward_hooks) for m in model.modules()), vars(model).get(patching._CAPTURE_FLAG, False)


def _hook_for_attentions(model: torch.nn.Sequential) -> None:
    """What transformers does the first time attentions are asked of ``model``: every layer hooked."""
    for layer in model:
        output_capturing.install_output_capuring_hook(layer, "attentions", 1)
    setattr(model, patching._CAPTURE_FLAG, True)


def test_capture_hooks_come_off_with_the_last_user_unless_the_model_had_them() -> None:
    # (no test here took them off: a drop that kept the flag, or that ran only for a model hooked
    # before, left every later call on nn.Module's slow path and passed)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    model[1].register_forward_hook(lambda *_: None)  # a user's own hook, which stays
    first, last = ExitStack(), ExitStack()
    first.enter_context(patching.capture_hooks_undone(model))
    last.enter_context(patching.capture_hooks_undone(model))
    _hook_for_attentions(model)
    assert _capture_hooks(patching.clean_copy(model)) == (1, False)  # a copy is made without them
    first.close()
    assert _capture_hooks(model) == (3, True)  # another user is still inside
    last.close()
    assert _capture_hooks(model) == (1, False)
    _hook_for_attentions(model)  # hooked before the first user came: left as it was
    with patching.capture_hooks_undone(model):
        pass
    assert _capture_hooks(model) == (3, True)
