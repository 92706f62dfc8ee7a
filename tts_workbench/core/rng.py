"""Private random streams: each stream draws from its own ``torch.Generator``.

Two streams that share the process-global generator interleave their draws, so neither samples
what it samples alone (and swapping the global state in and out around each step is not safe
once streams run in threads). So every stream holds a ``StreamRandom``: its generators, one per
device, seeded from the stream's seed. T3's sampling draws its noise from the generator
explicitly (``sampling.exponential_noise``); upstream code that draws without one (HiFT's sine
source and noise, all of a seeded ``generation.generate``) runs inside ``StreamRandom.drawing()``,
a ``TorchFunctionMode`` that hands the stream's generator to the random functions listed below
(``_LIKE`` ... ``_METHODS``) when they are called without one. Torch function modes are
thread-local, so a stream's mode never sees another thread's calls.

Not covered: draws that take no generator (``F.dropout`` and ``F.rrelu`` in training,
``F.gumbel_softmax``), and draws made inside another torch function (the mode sees the outer
call only: ``nn.init.kaiming_uniform_``, not the ``uniform_`` it calls); those still draw from
the global generator. Upstream inference (modules in eval mode) makes none of them.

A construction draws almost only inside such functions (``nn.init``'s, modules' own
``reset_parameters``), so it runs inside ``StreamRandom.drawing_all()`` instead: a
``TorchDispatchMode``, also thread-local, that sees each operator torch runs (what a Python
function or C++ code calls included) and gives every one that draws without a generator the
stream's. An operator that draws but takes no generator (CUDA's fused dropout, flash attention
with dropout) is refused rather than left to draw from the global generator; a construction runs
none. It costs a Python call per operator: for constructions, not for generation.

Several streams' rows in one call (the stream engine's batched vocoder) draw inside
``rows_drawing(randoms)``: row k of every draw comes from stream k's generator, drawn as that
stream alone draws it (one row at a time), so each stream's rows get the values its solo call gets.

A fresh ``torch.Generator(device).manual_seed(s)`` starts where ``torch.manual_seed(s)`` leaves
that device's default generator, so a stream seeded ``s`` samples the tokens a one-shot upstream
generation after ``torch.manual_seed(s)`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

# Random factories that take a ``generator`` keyword, and how each finds its device.
_LIKE = {torch.rand_like, torch.randn_like, torch.randint_like}
_FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm}
_OF_INPUT = {torch.multinomial, torch.bernoulli, torch.poisson}
_METHODS = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_, torch.Tensor.random_,
            torch.Tensor.exponential_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
            torch.Tensor.geometric_, torch.Tensor.multinomial, torch.Tensor.bernoulli}  # fmt: skip
_ON_INPUT = _LIKE | _OF_INPUT | _METHODS  # the generator's device: the first argument's (or input=)
_RANDOM = _ON_INPUT | _FACTORIES | {torch.normal}


class StreamRandom:
    """A stream's random state: one generator per device, each seeded with ``seed``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """This stream's generator on ``device`` (created and seeded on first use)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def checkpoint(self) -> Callable[[], None]:
        """A function that puts this stream's generators back where they are now (one made since
        is dropped: made again on its next use, it starts from the seed, unused)."""
        states = {device: g.get_state() for device, g in self._generators.items()}

        def back() -> None:
            self._generators = {d: g for d, g in self._generators.items() if d in states}
            for device, state in states.items():
                self._generators[device].set_state(state)

        return back

    def drawing(self) -> _Drawing:
        """Inside, random factories called without a generator draw from this stream's."""
        return _Drawing(self.generator)

    def drawing_all(self) -> _DrawingAll:
        """Inside, every draw of this thread without a generator draws from this stream's, those
        inside other functions (``nn.init``'s) included; one that takes no generator is refused."""
        return _DrawingAll(self.generator)


def rows_drawing(randoms: list[StreamRandom]) -> _RowsDrawing:
    """Inside, a draw without a generator over ``len(randoms)`` rows (its first dimension) draws
    row k from ``randoms[k]``'s generator, one row at a time, as that stream's own call of one row
    would (``torch.rand``/``randn``, the ``*_like`` factories and the in-place ``Tensor`` draws);
    any other draw, or one of another number of rows, is refused (``RowsDrawError``)."""
    return _RowsDrawing([r.generator for r in randoms])


class RowsDrawError(RuntimeError):
    """A draw inside ``rows_drawing`` that it cannot split into the streams' rows."""


def default_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.manual_seed`` seeds on ``device``: the one a draw without one uses."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


def drawn_from(device: torch.device) -> torch.Generator:
    """The generator a draw on ``device`` (CPU or CUDA) without one reaches in this thread's
    dispatch now: the innermost ``drawing_all()`` stream's (another dispatch mode inside it passes
    the draw on), else torch's default (``default_generator``). A torch function mode's
    (``drawing()``) is not looked for: it hands its generator to the call before dispatch, and no
    construction runs inside one."""
    modes = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, _DrawingAll)]
    return modes[-1].generator(device) if modes else default_generator(device)


def overwritten() -> _Drawing:
    """For upstream draws whose values are overwritten (the flow's start noise when the caller
    gives all of it): they go to a throwaway generator, so they neither advance the global
    generator nor a stream's own."""
    return StreamRandom(0).drawing()


@contextmanager
def not_drawing() -> Iterator[None]:
    """Inside: this thread's stream drawing mode off, if it is the innermost torch function
    mode, and every other mode left on (a caller's own, ``torch.set_default_device``). For code
    known to draw nothing, which would pay the mode at every op (and Dynamo would trace it)."""
    stack = _get_current_function_mode_stack()
    if stack and isinstance(stack[-1], _Drawing):
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _made_on(kwargs: dict[str, Any]) -> torch.device | str:
    """The device a factory makes its tensor on: ``device=``, else torch's default (a
    ``torch.set_default_device("cuda")`` outside this mode; before 2026-12-04, the CPU's
    generator was given, which torch refused for the CUDA tensor)."""
    return kwargs.get("device") or torch.get_default_device()


def _given_generator(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call has a generator of its own, by keyword or by position: ``poisson(x, g)``,
    and aten's poisson, _standard_gamma and rrelu_with_noise, which take it by position (before
    2026-12-06 only ``generator=`` was looked for, and a second one was added: torch refused it)."""
    return kwargs.get("generator") is not None or any(isinstance(a, torch.Generator) for a in args)


class _Drawing(TorchFunctionMode):
    def __init__(self, generator: Callable[[torch.device | str], torch.Generator]) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        # Every torch call of the thread comes through here: the common case (no draw) is one
        # set lookup, and the caller's kwargs are copied only when a generator is added.
        if func in _RANDOM and not _given_generator(args, kwargs):
            if func in _ON_INPUT:  # a Tensor method gets its tensor by position, a function may not
                device = (args[0] if args else kwargs["input"]).device
            elif func is torch.normal:  # on its tensor mean or std, else as a factory
                given = (*args[:2], kwargs.get("mean"), kwargs.get("std"))
                tensors = [a for a in given if torch.is_tensor(a)]
                device = tensors[0].device if tensors else _made_on(kwargs)
            else:
                device = _made_on(kwargs)
            kwargs = {**kwargs, "generator": self.generator(device)}
        return func(*args, **kwargs)


def _takes_generator(func: torch._ops.OpOverload) -> bool:
    """Whether the operator overload ``func`` has a ``generator`` argument."""
    return any(argument.name == "generator" for argument in func._schema.arguments)


class _DrawingAll(TorchDispatchMode):
    def __init__(self, generator: Callable[[torch.device | str], torch.Generator]) -> None:
        super().__init__()
        self.generator = generator

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags or _given_generator(args, kwargs):
            return func(*args, **kwargs)
        # It draws on its first tensor's device (an input, or out=), a factory on its device=.
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = torch.device(tensors[0].device if tensors else _made_on(kwargs))
        if device.type == "meta":  # nothing is drawn for a tensor without data
            return func(*args, **kwargs)
        kwargs = {**kwargs, "generator": self.generator(device)}
        if _takes_generator(func):
            return func(*args, **kwargs)
        # torch.rand(3) arrives as rand.default, which takes no generator: its packet picks the
        # overload that does (rand.generator).
        if any(
            _takes_generator(getattr(func.overloadpacket, name)) for name in func.overloadpacket.overloads()
        ):
            return func.overloadpacket(*args, **kwargs)
        raise RuntimeError(
            f"{func} draws from torch's global generator and takes no other: it cannot draw from "
            "a stream's inside StreamRandom.drawing_all()"
        )


_ROW_FACTORIES = {torch.rand, torch.randn}
_ROW_LIKE = {torch.rand_like, torch.randn_like}
_ROW_IN_PLACE = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.exponential_,
                 torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_}  # fmt: skip


class _RowsDrawing(TorchFunctionMode):
    def __init__(self, generators: list[Callable[[torch.device | str], torch.Generator]]) -> None:
        super().__init__()
        self.generators = generators

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _RANDOM or _given_generator(args, kwargs):
            return func(*args, **kwargs)
        if kwargs.get("out") is not None:
            raise RowsDrawError(f"{func.__name__} draws into out=: its rows cannot be drawn apart")
        kwargs.pop("generator", None)  # given as None
        rows = len(self.generators)
        if func in _ROW_FACTORIES:  # rand(2, 3), rand((2, 3)) or rand(size=(2, 3))
            one = len(args) == 1 and isinstance(args[0], tuple | list | torch.Size)  # a size in one sequence
            size = kwargs.pop("size", None) or (args[0] if one else args)
            self._check(func, tuple(size)[:1], rows)
            device = _made_on(kwargs)
            return torch.cat([func((1, *size[1:]), **kwargs, generator=g(device)) for g in self.generators])
        if func in _ROW_LIKE:
            x, rest = (args[0], args[1:]) if args else (kwargs.pop("input"), ())
            self._check(func, tuple(x.shape)[:1], rows)
            return torch.cat([func(x[k : k + 1], *rest, **kwargs, generator=g(x.device))
                              for k, g in enumerate(self.generators)])  # fmt: skip
        if func in _ROW_IN_PLACE:
            x = args[0]
            self._check(func, tuple(x.shape)[:1], rows)
            for k, g in enumerate(self.generators):
                func(x[k : k + 1], *args[1:], **kwargs, generator=g(x.device))
            return x
        raise RowsDrawError(
            f"{func.__name__} draws in a call of several streams' rows: it cannot be split by stream"
        )

    @staticmethod
    def _check(func: Any, first: tuple[int, ...], rows: int) -> None:
        if first != (rows,):
            drawn = first[0] if first else "no"
            raise RowsDrawError(
                f"{func.__name__} draws {drawn} rows in a call of {rows} streams' rows: "
                "it cannot be split by stream"
            )
