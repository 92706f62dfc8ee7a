"""Shared fixtures: one tiny model with a prepared voice per test session.

The first ``prepare_conditionals`` in a fresh venv pays a one-off numba JIT (~30 s); the
session fixture makes the suite pay it once. The imports are inside the fixtures: pytest-xdist's
controller process loads this file too but runs no test, and importing chatterbox there would
hold back the workers' start by its ~7 s.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from chatterbox.tts import ChatterboxTTS


# The tests' voices: 3 s, not the CLI's 10 s. S3Gen runs its flow over the whole voice prompt with
# every call (the default voice's 500 mel frames are most of a tiny window's cost).
VOICE_S = 3.0


@pytest.fixture(scope="session")
def reference_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tts_workbench.models.reference import make_reference_wav

    return make_reference_wav(tmp_path_factory.mktemp("ref") / "reference.wav", seconds=VOICE_S)


def with_short_voices(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``module`` (a study script, the service) making the voices it makes itself ``VOICE_S``
    seconds long by default, not 10 s."""
    from tts_workbench.models.reference import make_reference_wav

    monkeypatch.setattr(module, "make_reference_wav", functools.partial(make_reference_wav, seconds=VOICE_S))
    return module


def voiced(model: str, reference: Path | str) -> Any:
    """The source ``model`` (random weights, seed 0) with ``reference`` prepared as its voice."""
    from tts_workbench.models.sources import load_model
    from tts_workbench.runtime.generation import prepare_voice

    tts = load_model(model, seed=0)
    prepare_voice(tts, str(reference))
    return tts


@pytest.fixture(scope="session")
def tiny_tts(reference_wav: Path) -> ChatterboxTTS:
    tts: ChatterboxTTS = voiced("tiny", reference_wav)
    _weights_changed(tts)  # the baseline each test's are checked against
    return tts


class Analyzers:
    """Every upstream alignment analyzer that steps while installed (the ``analyzers`` fixture),
    by the text columns it reads (``take``: those since the last take; ``count``: how many)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

        self.seen: dict[tuple[int, int], list[Any]] = {}
        step = AlignmentStreamAnalyzer.step

        def recorded(analyzer: Any, *a: Any, **k: Any) -> Any:
            runs = self.seen.setdefault(analyzer.text_tokens_slice, [])
            if analyzer not in runs:
                runs.append(analyzer)
            return step(analyzer, *a, **k)

        monkeypatch.setattr(AlignmentStreamAnalyzer, "step", recorded)

    def take(self) -> dict[tuple[int, int], list[Any]]:
        """The analyzers seen since the last ``take``, by text columns."""
        seen, self.seen = self.seen, {}
        return seen

    def count(self) -> int:
        """How many analyzers have stepped since the last ``take``."""
        return sum(map(len, self.seen.values()))


@pytest.fixture
def traced_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` traced by dynamo and run by its ``eager`` backend: guards, graph breaks
    (``fullgraph``), recompiles and the time they take are all real, Inductor's code generation
    and C++ compiles are left out (a cold compile of the tiny T3 step is ~30 s of one core, most
    of it gcc). For tests of what the workbench does around a compile (timing, sharing, reuse,
    reports); tests of what Inductor makes (its tokens, the attention op in its code) keep it."""
    import torch

    real = torch.compile

    def traced(*args: Any, **kwargs: Any) -> Any:
        return real(*args, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", traced)


class Meeting:
    """Where two threads calling one model meet (``wait``) before going on, to run a race at its
    worst: both voices written before either is read. The model's turn (``generation.voice_turn``)
    is watched: a thread holding the turn goes on as soon as the other is waiting for it, since
    the other cannot come before it (until 2026-12-07 a 3 s barrier timeout was waited out
    instead, in each of seven tests). A wait for the turn that has ended lets no one go: a turn
    taken around too little (the other thread waited, then wrote its voice) still meets.
    ``timeout`` bounds the wait either way."""

    def __init__(self, tts: Any, monkeypatch: pytest.MonkeyPatch, timeout: float = 3.0) -> None:
        from tts_workbench.runtime import generation

        self.timeout, self.arrived, self.blocked = timeout, 0, 0  # blocked: threads waiting for the turn
        self.changed = threading.Condition()
        self.turn = turn = threading.RLock()
        meeting = self

        class Watched:
            """The model's turn, counting the threads that wait for it."""

            def __enter__(self) -> None:
                if turn.acquire(blocking=False):
                    return
                with meeting.changed:
                    meeting.blocked += 1
                    meeting.changed.notify_all()
                turn.acquire()
                with meeting.changed:
                    meeting.blocked -= 1

            def __exit__(self, *_exc: object) -> None:
                turn.release()

        monkeypatch.setitem(generation._turns, tts.t3, Watched())

    def wait(self) -> None:
        """Back once the other thread is here too, or is waiting for the turn this thread holds,
        or ``timeout`` passed."""

        def may_go() -> bool:
            return self.arrived >= 2 or (self.blocked > 0 and self.turn._is_owned())  # type: ignore[attr-defined]

        with self.changed:
            self.arrived += 1
            self.changed.notify_all()
            self.changed.wait_for(may_go, self.timeout)


MeetingOn = Callable[[Any], Meeting]  # the ``meeting`` fixture: a model's Meeting


@pytest.fixture
def meeting(monkeypatch: pytest.MonkeyPatch) -> MeetingOn:
    """``meeting(tts)``: a ``Meeting`` of two threads on ``tts``, its turn watched for the test."""
    return lambda tts: Meeting(tts, monkeypatch)


@pytest.fixture
def analyzers(monkeypatch: pytest.MonkeyPatch) -> Analyzers:
    """``Analyzers`` installed for the test."""
    return Analyzers(monkeypatch)


def pretend_cuda(monkeypatch: pytest.MonkeyPatch, can_use_flash: Callable[..., bool]) -> None:
    """``why_not_flash`` takes its CUDA branch without a GPU: its decode-shaped inputs say they
    are on CUDA, and ``can_use_flash`` stands in for torch's ``can_use_flash_attention``."""
    import torch

    from tts_workbench.instruments import attention

    class _OnCuda(torch.Tensor):
        device = property(lambda self: torch.device("cuda"))

    sdpa_inputs = attention._sdpa_inputs
    monkeypatch.setattr(
        attention, "_sdpa_inputs", lambda *a: tuple(t.as_subclass(_OnCuda) for t in sdpa_inputs(*a))
    )
    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", can_use_flash)


@pytest.fixture
def fused_copies(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every fused backbone a ``DecodePlan`` makes during the test (``fusion.fused_backbone``)."""
    from tts_workbench.runtime import decode, fusion

    copies: list[Any] = []

    def counted(tfmr: Any) -> Any:
        copies.append(fusion.fused_backbone(tfmr))
        return copies[-1]

    monkeypatch.setattr(decode, "fused_backbone", counted)
    return copies


class Steer:
    """A wrap for a speech head's ``forward`` (``patching.shadow``) that edits the logits of
    chosen calls, counted from 1 (the prefill's): ``{call: token}`` pushes that token to the
    top, ``{call: None}`` makes every logit NaN. ``calls``: how many calls it has seen."""

    def __init__(self, edits: dict[int, int | None]) -> None:
        self.edits, self.calls = edits, 0

    def __call__(self, forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
        import torch

        def steered(x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out: torch.Tensor = forward(x)
            if self.calls not in self.edits:
                return out
            token = self.edits[self.calls]
            return out * float("nan") if token is None else out.index_fill(-1, torch.tensor([token]), 1e4)

        return steered


@pytest.fixture
def steer() -> type[Steer]:
    """``Steer``, for the tests that make a head sample what they need."""
    return Steer


@pytest.fixture
def behind_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """http_proxy set, no no_proxy: urllib (its opener, built once, rebuilt to read them) and httpx
    send every http request to the proxy, where nothing listens."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)


@contextlib.contextmanager
def loopback_server(
    handler: type[http.server.BaseHTTPRequestHandler],
) -> Iterator[http.server.ThreadingHTTPServer]:
    """``handler`` answering in this process on 127.0.0.1 (its port from the system) while the
    block runs, stopped and its thread joined on leaving."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


@pytest.fixture
def serve_folder() -> Callable[[Path], AbstractContextManager[Any]]:
    """``serve_folder(folder)``: python's http.server serving ``folder`` on 127.0.0.1 while inside
    (the ``profiling.start_server`` server: ``.url``, ``.process``), stopped on leaving."""
    from tts_workbench.instruments.profiling import free_port, start_server

    @contextlib.contextmanager
    def serve(folder: Path) -> Iterator[Any]:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(folder),
        ]
        with tempfile.TemporaryFile() as log:
            server = start_server(cmd, f"http://127.0.0.1:{port}", log, timeout=15)
            try:
                yield server
            finally:
                server.stop()

    return serve


SDPA_FLAGS = ("flash", "mem_efficient", "math", "cudnn")  # torch.backends.cuda.*_sdp_enabled


def _process_state() -> dict[str, Any]:
    """Settings one process shares across threads and tests, which the workbench must put back."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "autocast": torch.is_autocast_enabled("cpu"),
        "function_modes": torch._C._len_torch_function_stack(),
        "skip_guards": torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe,
        "sdpa": [getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in SDPA_FLAGS],
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "profiler": torch.autograd.profiler._is_profiler_enabled,
    }


def _engine_threads() -> set[int]:
    import threading

    return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("engine-")}


def _prompt_embedding_is_its_own(tts: ChatterboxTTS) -> bool:
    """Whether the prompt embedding upstream's T3 cached on ``tts``'s voice (if any) is the one
    its own T3 makes: another model's, cached through a shared T3Cond, made the session model
    speak with it in every later test of the worker."""
    import dataclasses

    import torch

    cond = tts.conds.t3
    if cond.cond_prompt_speech_emb is None:
        return True
    fresh = dataclasses.replace(cond, cond_prompt_speech_emb=None)
    with torch.inference_mode():
        tts.t3.prepare_conditioning(fresh)
    return torch.equal(fresh.cond_prompt_speech_emb, cond.cond_prompt_speech_emb)


_WEIGHTS: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}  # id(model): (fingerprint, values)


_PLAIN: dict[int, list[tuple[str, str]]] = {}  # id(model): its modules' plain tensor attributes


def _tensors(tts: ChatterboxTTS) -> dict[str, Any]:
    """Every parameter, buffer and plain tensor attribute (upstream keeps some: S3Gen's ``pe``,
    ``freqs_cis``, ``stft_window``) of the model's three components, by name. The attributes are
    found once, on the first look (each module's ~20 attributes scanned took most of a look, and
    a look runs twice in every test that takes the session model); later looks read those names
    (an attribute set since is not seen, one gone is)."""
    import torch

    found, modules = {}, {}
    for name in ("t3", "s3gen", "ve"):
        for path, module in getattr(tts, name).named_modules(prefix=name):
            modules[path] = module
            for group in (module._parameters, module._buffers):
                found.update((f"{path}.{key}", t) for key, t in group.items() if t is not None)
    if id(tts) not in _PLAIN:
        _PLAIN[id(tts)] = [
            (path, attr)
            for path, module in modules.items()
            for attr, value in vars(module).items()
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
        ]
    for path, attr in _PLAIN[id(tts)]:
        value = getattr(modules.get(path), attr, None)
        if isinstance(value, torch.Tensor):
            found[f"{path}.{attr}"] = value
    return found


def _weights_changed(tts: ChatterboxTTS) -> list[str]:
    """The names of the model's tensors (``_tensors``) whose values, dtype or device differ from
    the last look's; the first look is the baseline. Cheap while every tensor is the same object
    at the same version, storage, dtype and device; values are compared only otherwise (a write
    through ``.data`` in place, which moves none of these, is not seen). After a change the
    changed model is the baseline, so only the test that changed it fails."""
    import torch

    tensors = _tensors(tts)
    fingerprint = {
        k: (id(t), -1 if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device)
        for k, t in tensors.items()
    }
    if id(tts) not in _WEIGHTS:
        _WEIGHTS[id(tts)] = (fingerprint, {k: t.detach().clone() for k, t in tensors.items()})
        return []
    seen, values = _WEIGHTS[id(tts)]
    if fingerprint == seen:
        return []
    changed = [k for k, v in values.items()
               if k not in tensors or tensors[k].dtype != v.dtype or tensors[k].device != v.device
               or not torch.equal(tensors[k].detach(), v)]  # fmt: skip
    # unchanged: other objects with the same values (a model given back by copying them in)
    now = {k: t.detach().clone() for k, t in tensors.items()} if changed else values
    _WEIGHTS[id(tts)] = (fingerprint, now)
    return changed


@pytest.fixture(autouse=True)
def _leaves_the_process_as_it_found_it(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test leaves torch's process-wide settings, no engine thread, and the session model's
    weights and its voice's cached prompt embedding as it found them: a leak would change the
    tests that run after it in the same worker (and a user's process)."""
    before, engines = _process_state(), _engine_threads()
    if "tiny_tts" in request.fixturenames:  # a module fixture's setup, or a test that takes it otherwise
        changed = _weights_changed(request.getfixturevalue("tiny_tts"))
        assert not changed, f"the session model's weights changed before this test: {changed[:5]}"
    yield
    after = _process_state()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert _engine_threads() <= engines, "an engine of this test is still running: close it"
    if "tiny_tts" in request.fixturenames:
        tts = request.getfixturevalue("tiny_tts")
        assert _prompt_embedding_is_its_own(tts), "the session model's voice caches another embedding"
        changed = _weights_changed(tts)
        assert not changed, f"the session model's weights changed: {changed[:5]} ({len(changed)})"
