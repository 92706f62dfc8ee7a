"""A stream's drawing mode (core.rng): random calls without a generator draw from the stream's."""

from __future__ import annotations

import torch

from tts_workbench.core.rng import StreamRandom


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
    for name, call in calls.items():
        torch.manual_seed(7)
        alone = call()
        torch.manual_seed(123)
        with StreamRandom(7).drawing():
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
