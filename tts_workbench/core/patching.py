"""Changing a model for a while, and putting it back exactly.

Everything the workbench does to a user's model goes through here:

- ``shadow``: replace a method (or any attribute) on one instance while inside, then restore
  whatever the instance had before. What is set is a function that calls the wrapper and keeps
  the wrapped function's name, docstring and signature (``functools.wraps``), so tracebacks and
  ``help()`` still read as upstream; the wrapper itself is not changed (it may be a function used
  elsewhere, or a bound method; a class is set as it is). Dynamo traces through the function.
- ``around``: the common case of ``shadow``: run every call of a method inside a context
  manager built for that call (a timer, a profiler range, ...).
- ``shared`` and ``routed``: shadows that several threads may hold at once (streams in threads).
  Plain shadows in two threads stack: each thread's calls run both wrappers. ``shared``
  installs one wrapper for every user, the first in and the last out deciding; ``routed``
  applies each user's wrapper to its own thread's (or asyncio task's) calls only. Whatever
  the kind and the order they leave in, the instance is left as it was: a shadow that leaves
  while another sits on top of it is put back by that one (a shared or routed one calls
  through meanwhile). A shared and a routed shadow of one attribute stack as two shadows do.
  None of them takes a property (or any data descriptor): setting it does not set the
  instance's own attribute, which is what they put back.
- ``preserved`` (``ModuleSnapshot``): remember every parameter and buffer tensor of modules
  (references, not copies) and put them back; casting with ``module.to(dtype)`` swaps
  ``param.data``, so the originals come back bit for bit. The references keep the originals
  alive beside the cast tensors: on a GPU, ``release_replaced`` moves the ones the module no
  longer holds to the CPU (before 2026-12-04 a bfloat16 wrapper held the float32 weights on the
  GPU too). (A deep copy of a whole ChatterboxTTS is not possible: HiFT's weight-norm keeps
  non-leaf tensors, which ``copy.deepcopy`` refuses.)
- ``working_copy``: an attribute replaced by a copy of itself, what the instance had put back.
- ``clean_copy``: a deep copy of a module without the shadows on the module while it is made
  (a copy of a wrapper calls the source's method) nor transformers' capture hooks that
  ``capture_hooks_undone`` will take off it.
- ``capture_hooks_undone``: the forward hooks transformers installs for good on a model the first
  time attentions (or hidden states) are asked of it taken off again by the last user to leave.
- ``scoped_item``: set a key of a dict (e.g. upstream's ``LLAMA_CONFIGS``) and remove it again,
  held as ``shared`` holds a shadow.
- ``own_code``: a copy of a function with its own code object, for ``torch.compile``.
- ``HOLDERS``: the open wrapper that has each model changed for a while, so that code below the
  wrapper's layer (a save) can refuse a model whose weights are the wrapper's cast copies
  (``holder_of``). ``holding`` takes a model there (refused while another holds it or any user
  shares it). ``SHARERS``: the users (stream engines) running on each model's weights as they
  are, several at once; ``sharing`` adds one (refused while a holder has the model), ``sharers``
  lists them (an engine its user can no longer reach, to close). ``let_go`` gives a model back for
  either. Before 2026-12-06 engines registered nowhere: a wrapper cast T3 under an engine's KV
  cache (or cast it back under one built inside its block), and the engine's streams failed with
  torch's dtype error. All of them take the model and register its components (T3, S3Gen, VE):
  what a wrapper changes, and what every model object built around them shares (a ``copy.copy``
  of the model, one given its S3Gen).
"""

from __future__ import annotations

import copy
import functools
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers.utils import output_capturing

from .families import components, family_of

_MISSING = object()

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]
M = TypeVar("M", bound=nn.Module)
F = TypeVar("F", bound=Callable[..., Any])

# The open wrapper of each model (runtime.optimized's PerformanceOptimizedTTS), by the id of each of
# the model's components (``_keys``): the wrapper holds the model, hence its components, so no id
# is reused while it lives. Before 2026-12-06 by the model object's id: a wrapper of ``copy.copy(tts)``
# opened beside one of ``tts``, on its bfloat16 weights, and, the copy's closed last, left them so
# for good. The wrapper puts itself here at the start of its construction (``holding``), before it
# changes the model (two built at once must not both find the model free), and takes itself out
# when it has given the model back (``let_go``).
HOLDERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
# The users sharing a model's weights as they are (runtime.engine's StreamEngine: each its own KV
# cache in the weights' dtype), each with the ids of its model's components: a user holds its
# model, so no id is reused while it lives. Weak: a user never let go stops counting once
# collected. An engine never closed is not: its stage threads hold it, so it stays here, and keeps
# its model from every wrapper, until its close(); ``sharers`` finds one its user can no longer reach.
SHARERS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()
# Held while a holder or a sharer checks that its model is free and takes it, and while one lets it
# go: before 2026-12-05 the check and the taking were a whole constructor apart (the "auto"
# measurement), and two wrappers built at once on one model both found it free.
_holders_lock = threading.Lock()


def _keys(model: Any) -> frozenset[int]:
    """The ids ``model`` is registered by: its components' (``families.components``), which a
    wrapper changes and which other model objects may share. Anything that is no model (a wrapper
    given for its model) is refused naming the model classes (``families.family_of``)."""
    family_of(model)
    return frozenset(id(part) for part in components(model).values())


def _holder(keys: frozenset[int]) -> object | None:
    """The holder of any of ``keys``, or None."""
    return next((holder for key in keys if (holder := HOLDERS.get(key)) is not None), None)


def holder_of(model: Any) -> object | None:
    """The open holder of ``model`` (of any of its components, through whatever model object it
    took them), or None."""
    return _holder(_keys(model))


def _occupant(keys: frozenset[int]) -> object | None:
    """What has any of ``keys`` now (under ``_holders_lock``): its holder, else one of its sharers."""
    holder = _holder(keys)
    if holder is not None:
        return holder
    return next(iter(_sharers(keys)), None)


def _sharers(keys: frozenset[int]) -> list[Any]:
    """The sharers of any of ``keys`` (under ``_holders_lock``)."""
    return [user for user, held in SHARERS.items() if held & keys]


def sharers(model: Any) -> list[Any]:
    """The users sharing ``model`` now (of any of its components, through whatever model object
    they took them): the stream engines running on it, one out of its user's reach (a notebook
    cell that built one run again) included, to close."""
    keys = _keys(model)
    with _holders_lock:
        return _sharers(keys)


@contextmanager
def holding(model: Any, holder: object, refusal: Callable[[object], Exception]) -> Iterator[None]:
    """Take ``model`` for ``holder`` alone in ``HOLDERS`` (``refusal(what has it)`` is raised
    while another holder or any sharer has any of its components) for the block and after it,
    until ``let_go``; let go at once if the block fails."""
    keys = _keys(model)
    with _holders_lock:
        occupant = _occupant(keys)
        if occupant is not None:
            raise refusal(occupant)
        for key in keys:
            HOLDERS[key] = holder
    try:
        yield
    except BaseException:
        let_go(holder)
        raise


@contextmanager
def sharing(model: Any, user: object, refusal: Callable[[object], Exception]) -> Iterator[None]:
    """Add ``user`` to ``model``'s sharers in ``SHARERS`` (``refusal(its holder)`` is raised while
    a holder has any of its components) for the block and after it, until ``let_go`` or until
    ``user`` is collected; let go at once if the block fails."""
    keys = _keys(model)
    with _holders_lock:
        holder = _holder(keys)
        if holder is not None:
            raise refusal(holder)
        SHARERS[user] = keys
    try:
        yield
    except BaseException:
        let_go(user)
        raise


def let_go(user: object) -> None:
    """Let go of whatever ``user`` holds or shares (nothing if neither): by the components its
    model had when taken, not those it has now: before 2026-12-06 a T3 swapped in while an engine
    ran left the closed engine registered, and its model kept from every wrapper for good."""
    with _holders_lock:
        SHARERS.pop(user, None)
        for key in [key for key, holder in HOLDERS.items() if holder is user]:
            del HOLDERS[key]


@contextmanager
def shadow(obj: object, name: str, wrap: Wrap) -> Iterator[None]:
    """Set ``obj.name = wrap(obj.name)`` on the instance while inside; restore on exit.

    Whatever the instance's own ``__dict__`` held before (another shadow, or nothing, so that the
    class attribute shows through again) is put back, so shadows nest.
    """
    _check_shadowable(obj, name)
    # under the lock ``_holding`` sets its shadows under: one landing between this read and
    # this set would be overwritten, its calls lost and its exit left waiting in ``_left``
    with _held_lock:
        before = _own(obj, name)
        original = getattr(obj, name)
        wrapped = wrap(original)
        if callable(original) and callable(wrapped) and wrapped is not original:
            wrapped = _forwarding(wrapped, original)
        _set(obj, name, wrapped, before)
    try:
        yield
    finally:
        _put_back(obj, name, wrapped, before)


def _forwarding(target: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """A new function that calls ``target``, named, documented and signed as ``original``.
    ``target`` is the wrap's: a function used elsewhere would keep upstream's metadata for good,
    a bound method cannot take it, so it is never written on. A class is returned as it is: in a
    function's place, ``isinstance`` and subclassing would fail."""
    if isinstance(target, type):
        return target

    def forward(*args: Any, **kwargs: Any) -> Any:
        return target(*args, **kwargs)

    return functools.update_wrapper(forward, original)


@dataclass(eq=False)
class _Held:
    """One installation of a ``shared`` or ``routed`` shadow, from its first user in to its last
    out: what the instance's ``__dict__`` had before (``before``), what the attribute was
    (``original``), what was set (``installed``). Its last user may have to leave it under
    another shadow (``_put_back``) until that one leaves; ``live`` is then false, and routes are
    keyed by the installation: one left behind never takes a later one's calls for its own."""

    before: Any
    original: Callable[..., Any]
    installed: Callable[..., Any] | None = None
    users: int = 0
    live: bool = True


# Shadows held by several users at once, by (id(obj), name, "shared" or "routed"); items held by
# ``scoped_item``, by (id(mapping), key).
_held: dict[tuple[int, str, str], _Held] = {}
_held_lock = threading.RLock()
_items: dict[tuple[int, str], list[Any]] = {}  # -> [the value, users' threads, what was there before]
_items_free = threading.Condition()
# A shadow that left while another sat on top of it (two threads, out of order): (id(obj), name,
# id(shadow)) -> (the shadow, what to put back in its place when the one on top puts it back).
# Not by the shadow's id alone: shadows of two instances may set the same object (a small int).
_left: dict[tuple[int, str, int], tuple[Any, Any]] = {}
# What an instance's attribute was before the shadows of any kind on it now (what the last to
# leave puts back): (id(obj), name) -> [shadows on it, the value (``_MISSING``: the class's)].
_under: dict[tuple[int, str], list[Any]] = {}
# Models whose capture hooks are taken off by their last user: id -> [users, flag set before the first]
_capturing: dict[int, list[Any]] = {}
_CAPTURE_FLAG = "_output_capturing_hooks_installed"  # transformers': its hooks are on the model
_TRANSIENT = "_tts_workbench_transient"  # on a hook registered for a while (``transient``)


def _module_slots(obj: object) -> tuple[Mapping[str, Any], ...]:
    """Where an ``nn.Module`` keeps its submodules, parameters and buffers: not its ``__dict__``."""
    return (obj._modules, obj._parameters, obj._buffers) if isinstance(obj, nn.Module) else ()


def _own(obj: object, name: str) -> Any:
    """What the instance itself holds as ``name`` (``_MISSING`` when the class's shows through)."""
    for slots in (*_module_slots(obj), obj.__dict__):
        if name in slots:
            return slots[name]
    return _MISSING


def _check_settable(obj: object, name: str) -> None:
    """A TypeError for a data descriptor of the class (a property, a slot): setting it runs the
    descriptor, so the value set never is the instance's own attribute that is put back."""
    found = next((vars(cls)[name] for cls in type(obj).__mro__ if name in vars(cls)), None)
    if hasattr(type(found), "__set__") or hasattr(type(found), "__delete__"):
        raise TypeError(
            f"{name!r} is a data descriptor (a property or slot) of {type(obj).__name__}: it cannot be "
            "put back; replace the method or attribute it reads or writes instead"
        )


def _check_shadowable(obj: object, name: str) -> None:
    """A TypeError for what a shadow cannot give back: a data descriptor, and the submodules,
    parameters and buffers of an ``nn.Module``, where a wrapper cannot be set."""
    _check_settable(obj, name)
    if any(name in slots for slots in _module_slots(obj)):
        raise TypeError(
            f"{name!r} is a submodule, parameter or buffer of {type(obj).__name__}: shadow replaces "
            "methods and plain attributes; swap a submodule or tensor with working_copy or preserved"
        )


def _set(obj: object, name: str, mine: Any, before: Any) -> None:
    """``obj.name = mine``, in place of ``before``, one more shadow in ``_under`` (under the lock)."""
    setattr(obj, name, mine)
    _under.setdefault((id(obj), name), [0, before])[0] += 1


def _put_back(obj: object, name: str, mine: Any, before: Any) -> None:
    """Undo ``obj.name = mine``: put ``before`` back if ``mine`` is still on the instance; if
    another shadow has been set on top since, leave it there and let it put back ``before``
    (not ``mine``) when it leaves. ``before`` may itself have left meanwhile: then what it
    stood for goes back."""
    with _held_lock:
        under = _under[id(obj), name]
        under[0] -= 1
        if under[0] == 0:
            del _under[id(obj), name]
        while (key := (id(obj), name, id(before))) in _left and _left[key][0] is before:
            before = _left.pop(key)[1]
        if _own(obj, name) is not mine:
            _left[id(obj), name, id(mine)] = (mine, before)
        elif before is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


_Routes = Mapping[_Held, Callable[..., Any]]
_routes: ContextVar[_Routes] = ContextVar("tts_workbench_routes", default=types.MappingProxyType({}))


@contextmanager
def _holding(
    obj: object, name: str, kind: str, install: Callable[[_Held], Callable[..., Any]]
) -> Iterator[_Held]:
    """One more user of ``obj.name`` of this ``kind`` while inside: the first in sets it to
    ``install(held)``, the last out puts back what the instance had before the first, in whatever
    order they leave. Another kind installs its own on top: joining this one would drop its wrapper."""
    _check_shadowable(obj, name)
    key = (id(obj), name, kind)
    with _held_lock:
        held = _held.get(key)
        if held is None:
            held = _Held(_own(obj, name), getattr(obj, name))
            held.installed = functools.update_wrapper(install(held), held.original)
            # first: if it fails (a frozen instance), nothing is held
            _set(obj, name, held.installed, held.before)
            _held[key] = held
        held.users += 1
    try:
        yield held
    finally:
        with _held_lock:
            held.users -= 1
            if held.users == 0:
                held.live = False
                del _held[key]
                _put_back(obj, name, held.installed, held.before)


@contextmanager
def shared(obj: object, name: str, wrap: Wrap) -> Iterator[None]:
    """``obj.name = wrap(obj.name)`` while any user is inside, for every caller: the first user
    in sets it, the last out restores it, in whatever order they leave. Every user of one
    attribute passes the same ``wrap``. The attribute may be a hook slot that holds None when
    unset (Inductor's ``GraphLowering.save_output_code``)."""

    def install(held: _Held) -> Callable[..., Any]:
        wrapped = wrap(held.original)

        def call(*args: Any, **kwargs: Any) -> Any:
            # left under another shadow by its last user: not applied any more (nor twice, under
            # a later installation); an unset hook slot it stands for is nothing to call
            target = wrapped if held.live else held.original
            return None if target is None else target(*args, **kwargs)

        return call

    with _holding(obj, name, "shared", install):
        yield


@contextmanager
def routed(obj: object, name: str, wrap: Wrap) -> Iterator[None]:
    """While inside, this thread's (or asyncio task's) calls of ``obj.name`` run
    ``wrap(what it called before)``; other threads' calls run what the instance had. A
    dispatcher sits on the instance while any user is inside and is removed by the last to
    leave, in whatever order they leave; routes nest within a thread."""

    def dispatcher(held: _Held) -> Callable[..., Any]:
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            return _routes.get().get(held, held.original)(*args, **kwargs)

        return dispatch

    with _holding(obj, name, "routed", dispatcher) as held:
        routes = _routes.get()
        token = _routes.set({**routes, held: wrap(routes.get(held, held.original))})
        try:
            yield
        finally:
            _routes.reset(token)


def around(
    obj: object,
    name: str,
    enter: Callable[[tuple[Any, ...], dict[str, Any]], AbstractContextManager[Any]],
    *,
    this_thread: bool = False,
) -> AbstractContextManager[None]:
    """Shadow method ``name`` so that each call runs inside ``enter(args, kwargs)``; with
    ``this_thread``, only this thread's (or task's) calls, through ``routed`` (a timer of one
    generation must not count another thread's calls, nor be left behind by it). Plain shadows
    stay the default: a compiled ``fullgraph`` region can trace through them, not through the
    dispatcher's context variable."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            with enter(args, kwargs):
                return fn(*args, **kwargs)

        return inner

    return (routed if this_thread else shadow)(obj, name, wrap)


@contextmanager
def scoped_item(mapping: MutableMapping[str, Any], key: str, value: Any) -> Iterator[None]:
    """``mapping[key] = value`` while any user is inside: the first in sets it, the last out
    restores the previous value (or absence), in whatever order they leave (threads). A user
    with another value waits until the item is free, so each builds with its own; one nested
    in a thread that holds the item with another value is refused (it would wait for ever)."""
    item, me = (id(mapping), key), threading.get_ident()
    with _items_free:
        held = _items.get(item)
        if held is not None and held[0] != value and me in held[1]:
            raise RuntimeError(f"{key!r} is set to another value by this thread already: not nested")
        _items_free.wait_for(lambda: item not in _items or _items[item][0] == value)
        if item not in _items:
            before = mapping.get(key, _MISSING)
            # first: if it fails (os.environ takes strings only), nothing is held
            mapping[key] = value
            _items[item] = [value, [], before]
        _items[item][1].append(me)
    try:
        yield
    finally:
        with _items_free:
            _items[item][1].remove(me)
            if not _items[item][1]:
                before = _items.pop(item)[2]
                try:
                    if before is _MISSING:
                        del mapping[key]
                    else:
                        mapping[key] = before
                finally:  # the item is free even if putting it back failed: wake those waiting
                    _items_free.notify_all()


class _Kept:
    """A remembered tensor's values kept on another device (``release_replaced``), copied back
    once at restore: every remembered name that shared the tensor gets the same copy."""

    def __init__(self, away: torch.Tensor, device: torch.device) -> None:
        self.away, self.device = away, device
        self._back: torch.Tensor | None = None

    def back(self) -> torch.Tensor:
        if self._back is None:
            self._back = self.away.to(self.device)
        return self._back


def _elsewhere(t: torch.Tensor, to: torch.device) -> bool:
    """Is ``t`` on another device than ``to``, so that keeping it there instead frees its memory?"""
    return t.device != to


def _value(v: torch.Tensor | _Kept) -> torch.Tensor:
    return v.back() if isinstance(v, _Kept) else v


class ModuleSnapshot:
    """The tensors behind every parameter and buffer of ``module``, and every plain tensor
    attribute of its submodules, to restore them later. The last matter: upstream caches some
    tensors as plain attributes and converts them to the dtype of whatever ran last (S3Gen's
    conformer keeps its positional encoding ``pe`` so; after one bfloat16 call it would stay
    rounded to bfloat16 in float32 runs)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params: dict[str, torch.Tensor | _Kept] = {
            n: p.data for n, p in module.named_parameters(remove_duplicate=False)
        }
        self.buffers: dict[str, torch.Tensor | _Kept] = dict(module.named_buffers(remove_duplicate=False))
        self.attributes: dict[tuple[nn.Module, str], torch.Tensor | _Kept] = {
            (m, name): value
            for m in module.modules()
            for name, value in vars(m).items()
            if isinstance(value, torch.Tensor)
        }

    def release_replaced(self, to: torch.device | str = "cpu") -> int:
        """Keep on ``to`` the remembered tensors that the module no longer holds (a cast replaced
        them) and that are on another device: a wrapper that casts a model on a GPU would
        otherwise hold its original weights there too, beside the cast ones. Tensors whose memory
        the module still holds, under any name, stay as they are (no copy: it would free nothing,
        and would part tensors that share it). Bytes moved off their device."""
        to = torch.device(to)
        held = {t.untyped_storage().data_ptr() for t in self._live() if isinstance(t, torch.Tensor)}
        kept: dict[tuple[Any, ...], _Kept] = {}  # one copy per tensor however many names share it
        moved = 0
        for table in (self.params, self.buffers, self.attributes):
            for key, value in table.items():
                if isinstance(value, _Kept) or not _elsewhere(value, to):
                    continue
                if value.untyped_storage().data_ptr() in held:  # still the module's (any name)
                    continue
                ident = (value.untyped_storage().data_ptr(), value.storage_offset(),
                         tuple(value.shape), value.stride(), value.dtype, value.device)  # fmt: skip
                if ident not in kept:
                    kept[ident] = _Kept(value.to(to, copy=True), value.device)
                    moved += value.nbytes
                table[key] = kept[ident]  # type: ignore[index]
        return moved

    def _live(self) -> list[Any]:
        """What the module holds now under each remembered name (None where it holds nothing;
        a plain attribute may hold anything by now)."""
        params = dict(self.module.named_parameters(remove_duplicate=False))
        buffers = dict(self.module.named_buffers(remove_duplicate=False))
        return [
            *(params[n].data if n in params else None for n in self.params),
            *(buffers.get(n) for n in self.buffers),
            *(getattr(m, name, None) for m, name in self.attributes),
        ]

    def restore(self) -> None:
        """Put every remembered tensor back (dtype, device and values as they were). Submodules
        added since (upstream T3 adds ``patched_model`` on first use) share the same parameters."""
        for name, data in self.params.items():
            self.module.get_parameter(name).data = _value(data)
        for name, buffer in self.buffers.items():
            owner, _, leaf = name.rpartition(".")
            setattr(self.module.get_submodule(owner) if owner else self.module, leaf, _value(buffer))
        for (m, name), value in self.attributes.items():
            setattr(m, name, _value(value))


@contextmanager
def preserved(*modules: nn.Module) -> Iterator[list[ModuleSnapshot]]:
    """Every parameter and buffer of ``modules`` as it was on entry, again on exit; inside, their
    snapshots (``release_replaced`` after a cast)."""
    snapshots = [ModuleSnapshot(m) for m in modules]
    try:
        yield snapshots
    finally:
        restore_all(snapshots)


def restore_all(snapshots: list[ModuleSnapshot]) -> None:
    """Every snapshot put back, each tried whatever one before raised (an allocation failing while
    T3's weights were copied back left S3Gen cast too); then the first error raised."""
    errors = []
    for snap in snapshots:
        try:
            snap.restore()
        except BaseException as e:  # noqa: PERF203 (each restore on its own)
            errors.append(e)
    if errors:
        raise errors[0]


@contextmanager
def working_copy(obj: object, name: str, copier: Callable[[Any], Any] = copy.deepcopy) -> Iterator[Any]:
    """``obj.name`` replaced by ``copier(obj.name)`` while inside; on exit what the instance had
    is put back (the original object, not changed by whatever was done to the copy, or nothing
    where the class's showed through), whatever the block set meanwhile (``prepare_conditionals``
    inside a wrapper replaces its conditionals). Users of one attribute nest. A submodule,
    parameter or buffer may be copied so."""
    _check_settable(obj, name)
    before = _own(obj, name)
    setattr(obj, name, copier(getattr(obj, name)))
    try:
        yield getattr(obj, name)
    finally:
        if before is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


def transient(hook: F) -> F:
    """``hook`` marked as registered for a while (an instrument's): ``clean_copy`` leaves it off a
    copy, whose modules would otherwise keep it for good once the source's handle removes it."""
    setattr(hook, _TRANSIENT, True)
    return hook


def clean_copy(module: M) -> M:
    """A deep copy of ``module`` without what is set on it for a while: where a shadow sits on
    anything it copies (a submodule), the copy has what was there before the shadows (a copied
    wrapper would call the source's method: a bfloat16 copy made inside a profiler's shadows
    ran the float32 source), transformers' capture hooks that ``capture_hooks_undone`` will
    take off the source are not on the copy, nor hooks marked ``transient`` (before 2026-12-07 a
    decode copy made inside a dtype trace kept its 62 hooks, recording every later step)."""
    with _held_lock:  # no shadow comes or goes between the copy and its clean-up
        memo: dict[int, Any] = {}  # id of each object copied -> its copy
        dup = copy.deepcopy(module, memo)
        for (obj, name), (_, before) in _under.items():
            if obj in memo and before is not _MISSING:
                setattr(memo[obj], name, copy.deepcopy(before, memo))  # a bound method: the copy's
            elif obj in memo and name in vars(memo[obj]):
                delattr(memo[obj], name)
        for model, (_, had_hooks) in _capturing.items():
            if model in memo and not had_hooks:
                _drop_capture_hooks(memo[model])
    _drop_hooks(dup, lambda hook: getattr(hook, _TRANSIENT, False))
    return dup


def _drop_hooks(model: nn.Module, which: Callable[[Any], bool]) -> None:
    """Take the forward hooks (pre- and post-) ``which`` picks off ``model``'s modules, with what
    torch keeps of each beside it (its kwargs and always-call flags)."""
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, hook in hooks.items() if which(hook)]:
                del hooks[key]
                for extra in (m._forward_pre_hooks_with_kwargs, m._forward_hooks_with_kwargs,
                              m._forward_hooks_always_called):  # fmt: skip
                    extra.pop(key, None)


def _drop_capture_hooks(model: nn.Module) -> None:
    """Take transformers' capture hooks off ``model``'s modules, and its flag that they are on."""
    _drop_hooks(model, _is_capture_hook)
    vars(model).pop(_CAPTURE_FLAG, None)


def _is_capture_hook(hook: Any) -> bool:
    return getattr(hook, "__module__", None) == output_capturing.__name__


@contextmanager
def capture_hooks_undone(model: nn.Module) -> Iterator[None]:
    """While any user is inside, ``model`` may be asked for attentions: transformers then hooks
    every layer and attention module of it, for good (``_output_capturing_hooks_installed``).
    The hooks do nothing unless outputs are collected, but every call of a hooked module takes
    nn.Module's slower path. The last user to leave takes them and the flag off again, unless
    the model had them before the first came in."""
    with _held_lock:
        entry = _capturing.setdefault(id(model), [0, bool(getattr(model, _CAPTURE_FLAG, False))])
        entry[0] += 1
    try:
        yield
    finally:
        with _held_lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _capturing[id(model)]
                if not entry[1]:
                    _drop_capture_hooks(model)


def own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of function ``fn`` with a code object of its own. Dynamo keeps its compiled entries,
    and its recompile limit (8), per code object: compiling a copy keeps one user's graphs (a
    decode step, a model's estimator) apart from every other user of the same upstream code."""
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None  # not copied by FunctionType
    return copy
