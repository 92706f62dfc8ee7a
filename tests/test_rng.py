"""A stream's drawing mode (core.rng): random calls without a generator draw from the stream's."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tts_workbench.core.rng import RowsDrawError, StreamRandom, default_generator, drawn_from, rows_drawing
from tts_workbench.models.builders import build_model


def test_drawing_finds_the_device_of_a_tensor_given_by_keyword() -> None:
    # The device was taken from the first positional argument: ``rand_like(input=x)`` raised
    # an IndexError inside the mode.
    x = torch.ones(4) / 2
    calls = {
        "rand_like": lambda: torch.rand_like(input=x),
        "randint_like": lambda: torch.randint_like(input=x, high=9),
        "multinomial": lambda: torch.multinomial(input=x, num_samples=2),
        "bernoulli": lambda: torch.bernoulli(input=x),
        "poisson": lambda: torch.poisson(input=x),
    }
    _assert_drawn_from_the_stream(calls, StreamRandom.drawing)


def _assert_drawn_from_the_stream(calls: dict[str, Callable[[], torch.Tensor]], mode: Callable) -> None:
    """Each call inside ``mode`` of a stream seeded 7 draws what it draws after manual_seed(7),
    and leaves the global generator untouched."""
    for name, call in calls.items():
        torch.manual_seed(7)
        alone = call()
        torch.manual_seed(123)
        with mode(StreamRandom(7)):
            drawn = call()
        assert torch.equal(drawn, alone), name  # the stream's generator, seeded 7
        after = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(1)), name  # the global generator untouched


def test_a_factory_without_a_device_draws_on_the_default_device() -> None:
    # Before, ``randn(3)`` under ``torch.set_default_device("cuda")`` got the stream's CPU
    # generator, and torch refused it for the CUDA tensor. ("meta" stands in for CUDA here.)
    stream, asked = StreamRandom(7), []

    def generator(device: torch.device | str) -> torch.Generator:
        asked.append(torch.device(device))
        return torch.Generator()

    stream.generator = generator  # type: ignore[method-assign]
    with torch.device("meta"), stream.drawing():
        torch.randn(3)
        torch.randint(5, (3,))
        torch.randn(3, device="cpu")
    assert asked == [torch.device("meta"), torch.device("meta"), torch.device("cpu")]


def test_drawing_all_reaches_draws_inside_other_functions_and_refuses_what_takes_no_generator() -> None:
    # drawing() sees nn.init.kaiming_uniform_, not the uniform_ inside it; drawing_all() sees
    # the operators, and gives rand.default (no generator slot) its packet's rand.generator.
    calls = {
        "kaiming_uniform_": lambda: torch.nn.init.kaiming_uniform_(torch.empty(3, 3)),
        "LSTM": lambda: torch.nn.LSTM(3, 3).weight_hh_l0,
        "rand": lambda: torch.rand(3),
        "randperm": lambda: torch.randperm(5),
    }
    _assert_drawn_from_the_stream(calls, StreamRandom.drawing_all)
    with pytest.raises(RuntimeError, match="native_dropout"), StreamRandom(7).drawing_all():
        torch.native_dropout(torch.ones(4), 0.5, True)


def test_a_seeded_build_is_its_seeds_while_another_thread_draws_and_leaves_its_draws_alone() -> None:
    # Before, the build seeded torch's one global generator and put its state back on exit: the
    # other thread's draws during the build moved the weights (672 of 1550 tensors of tiny seed
    # 0), and the build's end rewound that thread's generator, so it drew the same numbers again.
    solo = build_model("tiny", seed=0)
    drawn: list[torch.Tensor] = []
    started, stop = threading.Event(), threading.Event()

    def draw() -> None:  # an unseeded upstream generate in another thread, say
        torch.manual_seed(5)
        started.set()
        while not stop.is_set():
            drawn.append(torch.rand(1))

    other = threading.Thread(target=draw, daemon=True)
    other.start()
    try:
        assert started.wait(60)
        before = len(drawn)
        built = build_model("tiny", seed=0)
        during = len(drawn) - before
    finally:
        stop.set()
        other.join(60)
    assert not other.is_alive()
    assert during > 0  # the other thread drew while the model was built
    for part in ("ve", "t3", "s3gen"):
        mine, alone = getattr(built, part).state_dict(), getattr(solo, part).state_dict()
        assert mine.keys() == alone.keys()
        for name, tensor in mine.items():
            assert torch.equal(tensor, alone[name]), f"{part}.{name}"
    # Only that thread drew from the global generator: its numbers are seed 5's, none twice.
    own = torch.Generator().manual_seed(5)
    assert torch.equal(torch.cat(drawn), torch.cat([torch.rand(1, generator=own) for _ in drawn]))


def test_drawn_from_names_the_generator_a_draw_without_one_takes() -> None:
    """What a build sets past the draws it skips (``builders._skeleton_draws``): torch's default
    outside ``drawing_all``; inside, the stream's, with another dispatch mode inside it too (it
    passes the draw on to the stream's mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            return func(*args, **(kwargs or {}))

    cpu, stream = torch.device("cpu"), StreamRandom(3)
    assert drawn_from(cpu) is default_generator(cpu)
    with stream.drawing_all(), Passing():
        named = drawn_from(cpu)
        before = named.get_state()
        torch.empty(4).normal_()
    assert named is stream.generator(cpu) and not torch.equal(named.get_state(), before)


def test_a_draw_given_its_own_generator_is_left_alone() -> None:
    # Only ``generator=`` was looked for: drawing() added a second generator to
    # ``poisson(x, g)`` (a TypeError), and drawing_all() to aten's poisson, which takes it by
    # position (a RuntimeError).
    x = torch.ones(4) * 3
    calls = {
        StreamRandom.drawing: lambda: torch.poisson(x, torch.Generator().manual_seed(7)),
        StreamRandom.drawing_all: lambda: torch.poisson(x, generator=torch.Generator().manual_seed(7)),
    }
    for mode, call in calls.items():
        with mode(StreamRandom(1)):
            drawn = call()
        assert torch.equal(drawn, call()), mode.__name__


def test_rows_draw_each_streams_rows_as_it_draws_them_alone() -> None:
    # the batched vocoder's draws (HiFT's sine phases: torch.rand through Uniform; its noise:
    # randn_like): each stream's row must be what its own one-row call draws, in the same order
    seeds = (3, 5, 7)
    with rows_drawing([StreamRandom(s) for s in seeds]):
        drawn = [torch.rand((3, 4, 1)), torch.randn_like(torch.zeros(3, 5)),
                 torch.empty(3, 2).uniform_(-1.0, 1.0), torch.randn(3, 2, dtype=torch.float64),
                 torch.rand(3, 2), torch.rand(size=(3, 2), generator=None)]  # fmt: skip
    for k, seed in enumerate(seeds):
        with StreamRandom(seed).drawing():
            alone = [torch.rand((1, 4, 1)), torch.randn_like(torch.zeros(1, 5)),
                     torch.empty(1, 2).uniform_(-1.0, 1.0), torch.randn(1, 2, dtype=torch.float64),
                     torch.rand(1, 2), torch.rand(1, 2)]  # fmt: skip
        assert all(torch.equal(d[k : k + 1], a) for d, a in zip(drawn, alone, strict=True)), k
    assert drawn[3].dtype == torch.float64


@pytest.mark.parametrize(
    ("draw", "said"),
    [(lambda: torch.rand(2, 4), "rand draws 2 rows in a call of 3 streams' rows"),
     (lambda: torch.randn_like(torch.zeros(4, 2)), "randn_like draws 4 rows in a call of 3 streams' rows"),
     (lambda: torch.multinomial(torch.ones(3, 4), 1), "multinomial draws in a call of several streams' rows"),
     (lambda: torch.rand(3, 4, out=torch.empty(3, 4)), "rand draws into out=")],
)  # fmt: skip
def test_rows_refuse_a_draw_they_cannot_split(draw: Callable[[], torch.Tensor], said: str) -> None:
    # a draw of other rows (one row broadcast over the batch, say) would give a stream values its
    # solo call does not draw: refused, so the engine runs each window alone instead
    with pytest.raises(RowsDrawError, match=said), rows_drawing([StreamRandom(s) for s in (1, 2, 3)]):
        draw()


def test_a_checkpoint_puts_the_generators_back() -> None:
    # the engine's vocoder runs a failed batched call's windows again one a call: each stream must
    # draw what it drew before the failed call, a generator first made in that call included
    r = StreamRandom(4)
    back = r.checkpoint()  # before any generator is made
    first = torch.rand(2, generator=r.generator())
    back()
    assert torch.equal(torch.rand(2, generator=r.generator()), first)
    back = r.checkpoint()
    after = torch.rand(2, generator=r.generator())
    back()
    assert torch.equal(torch.rand(2, generator=r.generator()), after) and not torch.equal(first, after)
