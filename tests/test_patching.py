"""Shadows that threads hold at once and leave in any order (core.patching.shared, routed)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from tts_workbench.core.patching import own_code, routed, shadow, shared


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
            # the one still inside is still on the model (over had captured under's wrapper on
            # entry, so it still calls it: under's leaving cannot reach into over's closure) ...
            expected = "over(under(upstream))" if first_out == "under" else "under(upstream)"
            assert v.speak() == expected, (under, over, first_out)
            stacks[still].close()
            assert v.speak() == "upstream" and "speak" not in vars(v), (under, over, first_out)  # then none


def test_a_submodule_parameter_or_buffer_cannot_be_shadowed() -> None:
    # nn.Module keeps them outside the instance's __dict__: before, a shadow of a child module
    # was never undone (its exit took the child for another shadow sitting on top).
    import pytest
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    lin = model[0]
    for obj, name in ((model, "0"), (lin, "weight"), (model[1], "running_mean")):
        with pytest.raises(TypeError, match="shadow replaces methods and plain attributes"), shadow(
            obj, name, lambda x: x
        ):
            pass
    assert model[0] is lin and isinstance(lin.weight, torch.nn.Parameter)
    with pytest.raises(TypeError, match="shadow replaces"), shared(model, "0", lambda x: x):
        pass
