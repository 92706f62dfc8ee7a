"""``PerformanceOptimizedTTS``: the seed's wrapper, every fix applied to an upstream ChatterboxTTS.

Fixes, each visible in a few lines below:

1. **dtype policy** (``core.policies.POLICIES``), chosen per device and checkpoint by *measuring*
   the candidates (``choose_policy`` returns a ``Policy``; for ``"auto"`` the wrapper calls it on
   the model as given, before changing anything) unless one is given; a checkpoint with a
   float16/bfloat16 component that the policies cast (T3, S3Gen's flow) keeps its dtypes;
2. **float32 islands** for the precision-hungry signal processing (``precision.ISLANDS``);
3. **conditionals** cast to each consumer's dtype after ``prepare_conditionals`` and after
   loading ``conds.pt`` (``_ensure_conditionals_dtype``);
4. **own T3 decode loop** (``decode.t3_decode``): no attention weights or hidden states per step,
   the speech head on the last position only, the stop check every few steps;
5. **decode step** (``decode=``): "eager" (transformers' growing cache), "static" (a KV cache
   allocated once, a fixed-shape step) or "compiled" (that step under ``torch.compile``, CUDA
   graphs on a GPU); "auto" picks per device (``DEFAULT_DECODE``, from the measurements in the
   README);
6. **S3Gen's estimator in a stream** (``flow=``): "eager", or "compiled" for the buffered
   windows' fixed shapes (``vocode.FlowPlan``); "auto" picks per device (``DEFAULT_FLOW``).

Both pipelines here, ``UpstreamTTS`` (upstream ``generate`` with a token cap: the baseline) and
``PerformanceOptimizedTTS``, have one interface (``Pipeline``): ``generate``,
``generate_stream``, ``prepare_conditionals``, ``last`` (what the last run did),
``configuration()``, ``performance_info()`` and ``close()``. The optimized wrapper changes the
model it is given (dtypes, islands, conditionals); ``close()`` (or leaving a ``with`` block)
puts every tensor, method and conditional back as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import weakref
from collections.abc import Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import ChatterboxTTS
from torch.utils.benchmark import Measurement

from ..core.clock import measurement, now
from ..core.constants import HALF_DTYPES, dtype_name
from ..core.devices import check_device
from ..core.errors import PREPARE_FIRST, ConfigError, NoVoiceError
from ..core.families import family_of
from ..core.patching import ModuleSnapshot, holding, let_go, restore_all
from ..core.policies import POLICIES
from ..core.rng import StreamRandom
from ..instruments.attention import KernelRecord, configured_backend, record_kernels, why_not_flash
from ..instruments.latency import ChunkMetrics
from ..instruments.memory import process_peak_bytes
from ..models.checkpoints import load_folder
from ..models.sources import load_pretrained, model_summary
from ..models.vocode import FLOW_MODES, FlowPlan, s3gen_inference
from .decode import (
    DEFAULT_MAX_CACHE_LEN,
    STEP_MODES,
    DecodePlan,
    DecodeResult,
    StepMode,
    T3Parts,
    check_cache_len,
    checked_cap,
    checked_stop_check_every,
    invalid_ids,
    is_turbo,
    prefill_length,
    t3_decode,
    text_tokens,
)
from .generation import checked_call, checked_voice, prepare_voice, vocoded_ids, voice_turn
from .generation import generate as capped_generate
from .precision import (
    ISLANDS,
    Island,
    check_conditionals,
    check_policy,
    compute_dtype,
    copy_conditionals,
    ensure_conditionals_dtype,
    install_islands,
    island_modules,
    restored,
)
from .sampling import check_sampling
from .streaming import StreamConfig, StreamState, stream

# The decode step "auto" picks per device type: measured side by side with `tts-workbench bench`
# (docs/decode.md). On CUDA the eager step is host-bound (H200: 43 ms per token).
DEFAULT_DECODE = {"cuda": "compiled", "cpu": "eager"}


# Likewise for the streaming windows' CFM estimator (the compile pays back over a few windows).
DEFAULT_FLOW = {"cuda": "compiled", "cpu": "eager"}


def _mode(what: str, mode: str, modes: Sequence[str], defaults: dict[str, str], device: torch.device) -> str:
    """``mode`` itself if it is one of ``modes``, or the device's default for ``"auto"``."""
    if mode == "auto":
        return defaults.get(device.type, "eager")
    if mode not in modes:
        raise ConfigError(f"unknown {what} {mode!r}: use auto or one of {', '.join(modes)}")
    return mode


def stream_seed(seed: int | None) -> int:
    """A stream's seed: ``seed``, or for ``None`` one drawn from the global generator, so unseeded
    streams differ as unseeded ``generate`` calls do, and ``torch.manual_seed`` before repeats one."""
    return int(torch.randint(2**63 - 1, ())) if seed is None else seed


def check_decode(step: str, device: torch.device) -> str:
    """The decode step to run: ``step`` itself, or the device's default for ``"auto"``."""
    return _mode("decode step", step, STEP_MODES, DEFAULT_DECODE, device)


def check_flow(mode: str, device: torch.device) -> str:
    """How a stream runs the flow's estimator: ``mode`` itself, or the device's default for "auto"."""
    return _mode("flow mode", mode, FLOW_MODES, DEFAULT_FLOW, device)


def decode_plan(tts: ChatterboxTTS, policy: str) -> DecodePlan:
    """The T3 weights and autocast dtype a policy decodes with (copies for per-phase policies).

    A ConfigError for a name that is no policy (``precision.check_policy``) and for ``"auto"``,
    which is chosen per device (``choose_policy``): either would decode with the model's own
    weights, as ``"keep"`` does, under the name given."""
    if policy == "auto":
        raise ConfigError(
            "dtype policy 'auto' is chosen per device and checkpoint: resolve it first with "
            "choose_policy(tts, device) and pass the name of the Policy it returns"
        )
    check_policy(policy)
    parts = T3Parts.of(tts.t3)
    if policy.startswith("autocast-"):
        return DecodePlan(parts, parts, autocast=HALF_DTYPES[policy.removeprefix("autocast-")])
    if policy == "decode-bfloat16":
        return DecodePlan(parts, parts.to(torch.bfloat16))
    if policy in HALF_DTYPES and parts.dtype != HALF_DTYPES[policy]:
        half = parts.to(HALF_DTYPES[policy])
        return DecodePlan(half, half)
    return DecodePlan(parts, parts)


# ---------------------------------------------------------------- dtype policy


@dataclass(frozen=True)
class Policy:
    """A dtype policy and why it was chosen (with the measurements when it was measured)."""

    name: str
    reason: str
    measured: dict[str, dict[str, Measurement]] = field(default_factory=dict)  # candidate -> phase

    @classmethod
    def requested(cls, name: str) -> Policy:
        """The policy ``name`` as asked for by the caller (not measured)."""
        return cls(check_policy(name), f"requested: {POLICIES[name]}")

    def summary(self) -> dict[str, dict[str, float]]:
        """Medians in seconds per candidate and phase (JSON-friendly)."""
        return {c: {k: m.median for k, m in phases.items()} for c, phases in self.measured.items()}


def _probe_cond(tts: ChatterboxTTS) -> T3Cond:
    """Conditionals for a timing probe: the real ones when prepared, else zeros of the right shape."""
    if tts.conds is not None:
        return tts.conds.t3
    dev = tts.t3.speech_head.weight.device
    plen = tts.t3.hp.speech_cond_prompt_len or 0
    return T3Cond(
        speaker_emb=torch.zeros(1, tts.t3.cond_enc.spkr_enc.in_features, device=dev),
        cond_prompt_speech_tokens=torch.zeros(1, plen, dtype=torch.long, device=dev) if plen else None,
        emotion_adv=0.5 * torch.ones(1, 1, 1, device=dev),
    )


def measure_policy(
    tts: ChatterboxTTS, policy: str, steps: int = 8, text_len: int = 60, repeats: int = 3
) -> dict[str, Measurement]:
    """Prefill seconds and seconds per decode step of T3 under ``policy`` (tts is not changed),
    each a ``Measurement`` over ``repeats`` synchronised runs after one warm-up."""
    plan = decode_plan(tts, policy)
    text = torch.full((family_of(tts).rows, text_len), 1, dtype=torch.long)
    text[:, 0], text[:, -1] = tts.t3.hp.start_text_token, tts.t3.hp.stop_text_token
    # A copy, so the prompt embedding T3 caches on the conditionals is not left behind.
    cond = T3Cond(**{**vars(_probe_cond(tts)), "cond_prompt_speech_emb": None})
    cond.to(dtype=next(tts.t3.cond_enc.parameters()).dtype)
    # The probes draw from a throwaway generator: a later unseeded generate goes on from the
    # caller's random state as if nothing had been measured.
    probe = functools.partial(
        t3_decode, tts.t3, cond, text, plan=plan, generator=torch.Generator(tts.t3.speech_head.weight.device)
    )
    probe(max_new_tokens=2)  # warm-up (allocator, kernels)
    # Each run times its own prefill and steps on the synchronised clock (decode.py).
    runs = [probe(max_new_tokens=steps + 1, stop_check_every=steps + 1) for _ in range(repeats)]
    return {
        "prefill_s": measurement([r.prefill_s for r in runs], f"T3 {policy} prefill"),
        "step_s": measurement([r.step_s for r in runs], f"T3 {policy} decode step"),
    }


def resolve_policy(tts: ChatterboxTTS, policy: Policy | str, device: torch.device) -> Policy:
    """``policy`` itself, a requested policy by name, or for ``"auto"`` the measured choice."""
    if isinstance(policy, Policy):
        check_policy(policy.name)  # a hand-made Policy too: an unknown name would run as "keep"
        if policy.name == "auto":  # a choice still to be made: it too would run as "keep"
            raise ConfigError(
                'a Policy named "auto" chooses nothing: pass policy="auto" (the name) to let the wrapper '
                "choose by measuring, or a Policy of a concrete policy (choose_policy(tts) returns one)"
            )
        return policy
    return choose_policy(tts, device) if policy == "auto" else Policy.requested(policy)


def choose_policy(tts: ChatterboxTTS, device: torch.device | str | None = None, tokens: int = 200) -> Policy:
    """Pick a policy for this checkpoint on this device by measuring.

    A checkpoint with a component that the policies cast (T3, S3Gen's flow) not in float32 (a
    float16 export; a folder's files each keep their saved dtype) keeps its dtypes. Otherwise
    the candidates are timed on T3 (the phase that dominates) and the one with the least median
    prefill + ``tokens`` decode steps wins: on CUDA native half vs autocast; on CPU float32 vs a
    bfloat16 decode copy.
    """
    device = torch.device(device or tts.device)
    # Both, not T3 alone: before 2026-12-05 a float16 flow beside a float32 T3 was cast up.
    cast = {"t3": compute_dtype(tts.t3), "s3gen.flow": compute_dtype(tts.s3gen.flow)}
    if kept := [f"{dtype_name(d)} in {name}" for name, d in cast.items() if d != torch.float32]:
        return Policy("keep", f"checkpoint is {', '.join(kept)}: kept (no upcast)")
    if device.type == "cuda":
        half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        candidates = [half, f"autocast-{half}"]
    else:
        candidates = ["float32", "decode-bfloat16"]
    measured = {c: measure_policy(tts, c) for c in candidates}

    def cost(c: str) -> float:
        return measured[c]["prefill_s"].median + tokens * measured[c]["step_s"].median

    best = min(candidates, key=cost)
    reason = f"measured on T3 (median prefill + {tokens} steps): " + ", ".join(
        f"{c} {cost(c):.2f} s" for c in candidates
    )
    return Policy(best, reason, measured)


# ---------------------------------------------------------------- the two pipelines


@dataclass
class LastGeneration:
    """What the last ``generate`` did."""

    tokens: int = 0
    stopped_by: str = ""
    invalid_tokens: int = 0
    # t3.prefill, t3.decode, t3.step (per token), t3.compile, s3gen, watermark, total
    seconds: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, dict[str, int]] = field(default_factory=dict)  # only when recorded
    decode_step: str = ""  # eager, static or compiled: what ran the decode steps


class Pipeline:
    """What both pipelines offer; ``tts`` is the upstream model underneath."""

    tts: ChatterboxTTS
    device: torch.device
    optimize: bool
    last: LastGeneration

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the model back as it was (nothing to do for a pipeline that changes nothing)."""

    def configuration(self) -> dict[str, Any]:
        """How this pipeline runs: policy, dtypes, decode loop, islands, parameter bytes, and
        apart from them the static KV caches' bytes."""
        tts = self.tts
        return {
            "family": family_of(tts).name,
            "optimize": self.optimize,
            "device": str(self.device),
            "model_dtype": dtype_name(next(tts.t3.parameters()).dtype),
            "component_dtypes": {
                "ve": dtype_name(next(tts.ve.parameters()).dtype),
                "t3": dtype_name(next(tts.t3.parameters()).dtype),
                "s3gen.flow": dtype_name(tts.s3gen.dtype),
                "s3gen.mel2wav": dtype_name(next(tts.s3gen.mel2wav.parameters()).dtype),
            },
            "parameter_bytes": {name: part["bytes"] for name, part in model_summary(tts).items()},
            "kv_cache_bytes": 0,  # held between generations: upstream's cache lives only in one
        }

    def last_run(self) -> dict[str, Any]:
        """What the last generation did, and the process's peak memory so far."""
        memory = {"peak_rss_bytes": process_peak_bytes("cpu")}
        if self.device.type == "cuda":
            memory["peak_cuda_bytes"] = process_peak_bytes(self.device)
        # a copy: the caller's dict stays as it was when asked (it was the wrapper's own, live)
        return {"last_generation": copy.deepcopy(vars(self.last)), "memory": memory}

    def performance_info(self) -> dict[str, Any]:
        """``configuration()`` and ``last_run()`` in one dict (parameter and KV cache bytes under
        ``memory``)."""
        config, last = self.configuration(), self.last_run()
        for key in ("parameter_bytes", "kv_cache_bytes"):
            last["memory"][key] = config.pop(key)
        return {**config, **last}

    def _voice(
        self, text: str, audio_prompt_path: str | None, exaggeration: float, norm_loudness: bool = True
    ) -> None:
        """The voice to speak ``text`` with, as upstream ``generate`` makes it: ``audio_prompt_path``
        prepared (``norm_loudness``: Turbo's), else the prepared one with ``exaggeration``. An empty
        text is refused first: no voice is prepared for it."""
        checked_voice(audio_prompt_path or self.tts.conds, text)  # a path to prepare will do
        if audio_prompt_path:
            self.prepare_conditionals(audio_prompt_path, exaggeration, norm_loudness)
        conds = self.tts.conds
        # As upstream: compared in the tensor's dtype (float32 0.7 is not the float 0.7), and in new
        # conditionals (before 2026-12-07 set on the caller's own T3Cond)
        if bool(exaggeration != conds.t3.emotion_adv.flatten()[0]):
            emotion = exaggeration * torch.ones(1, 1, 1, device=conds.t3.speaker_emb.device)
            self.tts.conds = type(conds)(dataclasses.replace(conds.t3, emotion_adv=emotion), conds.gen)

    def prepare_conditionals(
        self, wav_fpath: str, exaggeration: float = 0.5, norm_loudness: bool = True
    ) -> None:
        """The voice of the WAV at ``wav_fpath`` for the next generations (checked: ``prepare_voice``)."""
        prepare_voice(self.tts, wav_fpath, exaggeration, norm_loudness)

    def generate(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        *,
        max_new_tokens: int = 1000,
        seed: int | None = None,
    ) -> torch.Tensor:
        """A watermarked waveform (1, samples) for ``text``; ``last`` says what it cost."""
        raise NotImplementedError

    def generate_stream(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        config: StreamConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
        """Yield ``(audio_chunk, metrics)`` as audio is ready."""
        raise NotImplementedError


class UpstreamTTS(Pipeline):
    """The baseline: upstream ``ChatterboxTTS.generate`` unchanged, with a token cap."""

    def __init__(self, tts: ChatterboxTTS) -> None:
        self.tts = tts
        self.device = check_device(str(tts.device))
        self.optimize = False
        self.last = LastGeneration()

    def generate(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        *,
        max_new_tokens: int = 1000,
        seed: int | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Upstream ``generate`` (watermarked waveform, shape (1, samples)), phases timed; an
        ``audio_prompt_path`` is prepared as upstream ``generate`` prepares it (its defaults,
        Turbo's ``norm_loudness``), inside the timed call as there."""
        r = capped_generate(  # which checks the seed and cap (``generation.checked_call``)
            self.tts, text, max_new_tokens, seed, audio_prompt_path=audio_prompt_path, **sampling
        )
        decode = r.seconds.get("t3.decode", 0.0)
        # inference_turbo drops the stop token it sampled: counted, as the other families count it
        dropped = family_of(self.tts).name == "turbo" and r.stopped_by == "stop token"
        self.last = LastGeneration(
            tokens=len(r.speech_tokens) + dropped,
            stopped_by=r.stopped_by,
            invalid_tokens=r.invalid_tokens,
            seconds={
                "t3.prefill": r.seconds.get("t3.prefill", 0.0),
                "t3.decode": decode,
                "t3.step": decode / max(r.decode_steps, 1),
                "s3gen": r.seconds.get("s3gen.flow", 0.0) + r.seconds.get("s3gen.vocoder", 0.0),
                "watermark": r.seconds.get("watermark", 0.0),
                "total": r.wall_s,
            },
        )
        return torch.from_numpy(r.wav).unsqueeze(0)

    def generate_stream(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        config: StreamConfig | None = None,
        *,
        seed: int | None = 0,
        **kwargs: Any,
    ) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
        """The upstream streaming fork's naive loop on the upstream model (``streaming.stream``);
        ``seed=None`` draws the seed from the global generator (``stream_seed``). The wrapper's
        options are refused first, as ``from_model(optimize=False)`` refuses them: before 2026-12-06
        they went on to ``stream``, where a ``flow`` or ``plan`` named as the wrapper takes it
        failed after T3 ran, and ``amp`` ran the baseline under autocast."""
        _upstream_takes_none(False, {k: v for k, v in kwargs.items() if k in _WRAPPER_STREAM_OPTIONS})
        voice = kwargs.pop("exaggeration", 0.5), kwargs.pop("norm_loudness", True)
        with voice_turn(self.tts):  # the voice written is the one copied (the stream's read lazily)
            self._voice(text, audio_prompt_path, *voice)
            conds = copy_conditionals(self.tts.conds)  # as asked for now: PerformanceOptimizedTTS's says why
        return stream(
            self.tts, text, config or StreamConfig("naive"), seed=stream_seed(seed), conds=conds, **kwargs
        )

    def configuration(self) -> dict[str, Any]:
        return {
            **super().configuration(),
            "policy": "upstream",
            "policy_reason": "optimize=False: upstream code path",
            "decode": "upstream T3.inference",
            "using_amp": False,
        }


# What a stream of the wrapper runs with that the baseline's must not: the decode step and flow
# (the wrapper's ``generate_stream``), their plans and the autocast dtype (``streaming.stream``'s)
_WRAPPER_STREAM_OPTIONS = ("decode", "flow", "plan", "amp")


def _upstream_takes_none(optimize: bool, options: dict[str, Any]) -> None:
    """Refuse the wrapper's options (``dtype`` other than "auto", ``decode``, ...) with
    ``optimize=False``: the upstream pipeline takes none, and would run without them."""
    given = sorted(k for k, v in options.items() if (k, v) != ("dtype", "auto"))
    if not optimize and given:
        raise ConfigError(
            "upstream's pipeline (UpstreamTTS, optimize=False) runs unchanged and takes no "
            f"{', '.join(given)}: leave them out, or pass optimize=True for the wrapper"
        )


def _already_wrapped(by: object) -> ConfigError:
    """The refusal of a wrapper of a model that ``by`` has: an open wrapper (or one being built), or
    a stream engine running on its weights as they are (``patching.sharing``)."""
    if not isinstance(by, PerformanceOptimizedTTS):
        # the wrapper would cast T3 (or shadow its methods) under the engine's KV cache and steps
        return ConfigError(
            f"this model is in use by an open {type(by).__name__}, whose streams run on its weights as "
            "they are: close the engine first (close(), or the end of its with block), then wrap the "
            "model. One never closed runs on, out of reach once its name is rebound (a notebook cell "
            "run again): from tts_workbench.core.patching import sharers, then for engine in "
            "sharers(tts): engine.close(). For streams in another T3 dtype, give the engine its own "
            '(plan=decode_plan(tts, "bfloat16"))'
        )
    # a copy is no way out: a deep copy of a model fails (HiFT's weight norm keeps non-leaf
    # tensors), and one made while it is wrapped has the wrapper's cast weights
    return ConfigError(
        "this model is already wrapped by an open PerformanceOptimizedTTS: close it first (or "
        "use it), or load the model again (load_model, or PerformanceOptimizedTTS.from_local) "
        "for another wrapper; each wrapper gives the model back as it found it (a model object "
        "sharing its T3, S3Gen or VE counts as this model)"
    )


class PerformanceOptimizedTTS(Pipeline):
    """An upstream ChatterboxTTS with the fixes applied (see the module docstring).

    Build it with ``from_model`` / ``from_local`` / ``from_pretrained`` or directly, with a
    policy name or a ``Policy`` from ``choose_policy``. Use it in a ``with`` block, or call
    ``close()``, to give the model back exactly as it was.
    """

    def __init__(
        self,
        tts: ChatterboxTTS,
        policy: Policy | str = "auto",
        record_attention: bool = False,
        stop_check_every: int = 8,
        decode: str = "auto",
        max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
        flow: str = "auto",
        cpp_wrapper: bool = False,
        fused: bool = False,
    ) -> None:
        if isinstance(tts, Pipeline):  # before 2026-12-06 an AttributeError on its .conds
            raise ConfigError(
                f"{type(tts).__name__} is not a Chatterbox model but a pipeline of one: wrap the model it "
                "runs, pass its .tts"
            )
        # Each wrapper restores the model as it found it: a second one, opened on a model the first
        # has changed (or on another model object around its T3, S3Gen or VE: a copy.copy), would
        # restore the first one's bfloat16 copy when it closes. Taken before anything else: a
        # second wrapper built meanwhile (while "auto" measures) is refused, and so is one while a
        # stream engine runs on the model (its KV cache is in T3's dtype).
        with holding(tts, self, _already_wrapped):
            self.tts = tts
            self.cpp_wrapper = cpp_wrapper  # the compiled decode step's, on a CPU (DecodePlan)
            self.fused = fused  # the static and compiled steps run a copy with fused projections (DecodePlan)
            self.optimize = True
            self.record_attention = record_attention  # off by default: the profiler costs time
            # checked here: before 2026-12-06 a wrapper built with 0 failed every generation
            self.stop_check_every = checked_stop_check_every(stop_check_every)
            self.device = check_device(str(tts.device))
            self.decode = check_decode(decode, self.device)
            self.flow = check_flow(flow, self.device)
            self.flows = {mode: FlowPlan(mode) for mode in FLOW_MODES}  # each keeps its compiled shapes
            self.max_cache_len = max_cache_len  # static KV cache positions: core.positions.positions_needed
            self.last = LastGeneration()
            self.closed = False  # close() gave the model back: nothing may change it any more
            self._final: dict[str, Any] = {}  # configuration() as it was at close()
            # the streams being read: close() ends them first (a multilingual one has the model's
            # attention switched to eager, with spies on it, while it runs)
            self._streams: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()
            # the streams making a chunk right now, each with the thread making it, marked under
            # ``_made`` with the open check: close() waits for them (one chunk each) before it closes
            # them (closed under its maker, a stream would end early with no error, or fail with
            # "generator already executing"), and is refused in their threads (it would wait for itself)
            self._making: dict[Generator[Any, None, None], int] = {}
            # the threads of the public calls in progress (``_using``), one entry per call: close()
            # waits for them too, under the same condition
            self._calls: list[int] = []
            self._made = threading.Condition()
            # held while a stream is closed: close() and the stream's reader (stopped by the closed
            # error) both close it, and a generator closed in two threads at once fails in one with
            # "generator already executing" (a close() that failed so left the model wrapped).
            # Reentrant: a stream let go by the garbage collector may be closed inside another's close.
            self._ending = threading.RLock()
            self._closing = False  # close() has begun: no stream makes another chunk, no call starts
            self._in_close = False  # a close() is running: another one waits for it to end
            if tts.conds is not None:
                check_conditionals(tts.conds, tts)  # before any probe runs T3 on them
            # Checked (and for "auto" measured, on the model as given) before anything is changed.
            self.policy_choice = resolve_policy(tts, policy, self.device)
            self.amp: torch.dtype | None = None
            # Everything changed below is undone by close(): tensors, shadows, conditionals. If a
            # step fails (a "keep" policy on mixed dtypes, say), the model is given back at once.
            self._stack = ExitStack()
            self._snapshots: list[ModuleSnapshot] = []  # every component's tensors as they were
            self._unrestored = False  # a close() failed putting them back: the next tries again
            try:
                snapshots = self._snapshots
                self._stack.enter_context(restored(tts, snapshots))
                self.islands: list[Island] = install_islands(tts, self._stack)
                self._apply_policy()
                # The original tensors a cast replaced, kept on the CPU while open (close() copies them
                # back): on a GPU the float32 weights would stay there beside the bfloat16 ones.
                self.released_bytes = sum(snap.release_replaced() for snap in snapshots)
                if tts.conds is not None:
                    self._ensure_conditionals_dtype()
                # Asked for the decode step: the static and compiled ones mask their cache's unused slots
                # (Flash takes no mask), a Multilingual model's eager one runs eager attention.
                self._flash_attention_available = not why_not_flash(
                    tts, dtype=self.target_dtype, step=self.decode
                )
            except BaseException:
                self._stack.close()
                raise

    # ------------------------------------------------------------ construction

    @classmethod
    def from_model(
        cls, tts: ChatterboxTTS, optimize: bool = True, dtype: str = "auto", **kwargs: Any
    ) -> Pipeline:
        """Wrap an already-built model (``sources.load_model('tiny' | 'random')``);
        ``optimize=False`` gives the upstream pipeline (``UpstreamTTS``), which takes no options."""
        _upstream_takes_none(optimize, {"dtype": dtype, **kwargs})
        if not optimize:
            return UpstreamTTS(tts)
        if "policy" in kwargs:  # the constructor's name for it (before 2026-12-04 a TypeError)
            raise ConfigError(
                f"policy={kwargs['policy']!r}: from_model and from_local take the dtype policy as "
                f"dtype= (PerformanceOptimizedTTS(tts, policy=...) takes it as policy=)"
            )
        return cls(tts, policy=dtype, **kwargs)

    @classmethod
    def from_local(
        cls,
        folder: str | Path,
        device: str = "cpu",
        optimize: bool = True,
        family: str | None = None,
        **kwargs: Any,
    ) -> Pipeline:
        """Load a checkpoint folder. Optimized: each file keeps its saved dtype (a float16 export
        stays float16). ``optimize=False``: upcast to float32 the way upstream ``from_local`` does.
        ``family``: which model to load of a folder holding two families' files, as ``load_folder``'s."""
        _upstream_takes_none(optimize, kwargs)  # before the folder is read
        tts = load_folder(folder, device, keep_dtype=optimize, family=family)
        return cls.from_model(tts, optimize, **kwargs)

    @classmethod
    def from_pretrained(cls, device: str = "cpu", optimize: bool = True, **kwargs: Any) -> Pipeline:
        """Upstream ``from_pretrained`` (hub weights; offline here, so it fails with the fix)."""
        _upstream_takes_none(optimize, kwargs)  # before the hub is tried
        return cls.from_model(load_pretrained(device), optimize, **kwargs)

    def close(self) -> None:
        """End the streams still open (a chunk being made in another thread is waited for: its
        reader then gets a ``ConfigError``), wait for the calls in progress (``generate``, ...) in
        other threads, put the wrapped model back as it was (methods, every tensor's dtype and
        values, the conditionals) and free the static KV caches and compiled steps. Afterwards
        the wrapper only reports (``performance_info``: as it was). Refused (``ConfigError``) from
        inside one of the wrapper's own calls (a hook, say): it would wait for itself. A close()
        while another thread's runs waits for that one to end."""
        with self._made:
            me = threading.get_ident()
            # before this fix (2026-12-05) a close() inside a stream's chunk (read after generate_stream
            # returned) was let through, and waited for that chunk for good
            if me in self._calls or me in self._making.values():
                raise ConfigError(
                    "close() inside this wrapper's own call (from a hook or callback) would wait for "
                    "that call to end: close the wrapper after the call returns"
                )
            # Before, a second close() tore down again: its report, of the model already given
            # back (float32), was kept as the wrapper's, or it failed on the plans let go. One
            # that failed before giving the model back leaves it to this one.
            self._made.wait_for(lambda: not self._in_close)
            if self.closed:
                return
            self._in_close = True
            self._closing = True  # a reader between chunks stops at its next (ConfigError)
            idle = [chunks for chunks in self._streams if chunks not in self._making]
        try:
            for chunks in idle:  # (none starts a chunk now: each open check sees _closing)
                self._end(chunks)
            # before 2026-12-04 the model went back under a chunk being made; before 2026-12-05
            # under a generate, whose new voice then replaced the caller's conditionals for good
            with self._made:
                self._made.wait_for(lambda: not self._making and not self._calls)
                made = list(self._streams)  # none is making a chunk now, nor can start one
            # before this fix (2026-12-05) the streams waited for were left open: the model went back with
            # their changes on it (a multilingual one's eager attention and spies, a static
            # step's cache) until their readers asked for another chunk
            for chunks in made:
                self._end(chunks)
            try:
                if not self._unrestored:  # (a close() again: its report was made the first time)
                    self._final = self.configuration()
            finally:  # the model goes back even if the report fails
                # The decode copies, static caches and compiled flows freed first: on a GPU the
                # weights copied back need their memory (before 2026-12-07 freed after).
                for plan in self.plans.values():
                    plan.drop_static()
                self.plans.clear()
                for flow in self.flows.values():
                    flow.drop()
                self._give_back()
                let_go(self)
                self.closed = True
        finally:
            with self._made:
                self._in_close = False
                self._made.notify_all()

    def _give_back(self) -> None:
        """Undo everything the wrapper changed on the model (its ``ExitStack``). Where putting a
        weight back failed (an allocation, an interrupt), the error is raised and the next
        ``close()`` tries every weight again: before 2026-12-07 it found nothing left to undo and
        reported the model given back, still cast."""
        try:
            if self._unrestored:
                restore_all(self._snapshots)
            self._stack.close()  # (empty after a first try: every callback runs once)
        except BaseException:
            self._unrestored = True
            raise
        self._unrestored = False
        # the originals a cast replaced (on a GPU kept on the CPU: ~2.4 GiB at full size) let go
        self._snapshots.clear()

    def _end(self, chunks: Generator[Any, None, None]) -> None:
        """Close the stream ``chunks``, one thread at a time (``_ending``)."""
        with self._ending:
            chunks.close()

    def _check_open(self, starting: bool = False) -> None:
        """A ConfigError once closed; for something new to start (``starting``: a stream's next
        chunk, a call not made from inside another of this thread's), once close() began."""
        if self.closed or (starting and self._closing):
            raise ConfigError(
                "this PerformanceOptimizedTTS was closed and its model given back as it was: "
                "wrap the model again (PerformanceOptimizedTTS.from_model(tts)) to use it"
            )

    @contextmanager
    def _using(self) -> Iterator[None]:
        """A public call that uses the model: refused once closed (or once close() began, unless
        made from inside another call of this thread, which close() is waiting for); close()
        gives the model back only when no call is in progress."""
        me = threading.get_ident()
        with self._made:
            self._check_open(starting=me not in self._calls)
            self._calls.append(me)
        try:
            yield
        finally:
            with self._made:
                self._calls.remove(me)
                self._made.notify_all()

    @property
    def policy(self) -> str:
        """The dtype policy in force (``core.policies.POLICIES`` names it)."""
        return self.policy_choice.name

    def _apply_policy(self) -> None:
        t3, flow = self.tts.t3, self.tts.s3gen.flow
        p = self.policy
        if p in ("float32", "decode-bfloat16") or p.startswith("autocast-"):
            t3.float()
            flow.float()
        elif p in HALF_DTYPES:
            t3.to(HALF_DTYPES[p])
            flow.to(HALF_DTYPES[p])
        compute_dtype(t3)  # "keep" on a checkpoint with mixed dtypes inside one component: refuse
        compute_dtype(self.tts.s3gen, island_modules(self.tts))
        self.amp = HALF_DTYPES[p.removeprefix("autocast-")] if p.startswith("autocast-") else None
        base = decode_plan(self.tts, p)
        # One plan per decode step, sharing the weights; each keeps its own static cache and
        # compiled step, so a later generation (or another step asked of generate) reuses them.
        self.plans = {
            step: dataclasses.replace(
                base,
                step=cast(StepMode, step),
                max_cache_len=self.max_cache_len,
                cpp_wrapper=self.cpp_wrapper,
                fused=self.fused,
                cache_fix="call the wrapper's set_max_cache_len({need}) (or decode='eager')",
                busy_fix="decode this one with decode='eager'",
            )
            for step in STEP_MODES
        }

    def set_max_cache_len(self, positions: int) -> None:
        """Size the static KV caches (``core.positions.positions_needed``); built anew at the next
        generation. One already running (in another thread) goes on with the size it started
        with, checked and built alike."""
        with self._using():
            for plan in self.plans.values():  # all checked before any changes
                check_cache_len(positions, plan.decode.tfmr.config)
            self.max_cache_len = positions
            for plan in self.plans.values():
                plan.max_cache_len = positions
                plan.drop_static()

    def prefill_length(self, text: str, cfg_weight: float = 0.5, language_id: str | None = None) -> int:
        """Positions T3's prefill fills for ``text`` with the prepared voice (conditioning, text,
        start-of-speech tokens): ``core.positions.positions_needed`` turns it into the static
        cache's length."""
        if self.tts.conds is None:
            raise NoVoiceError(fix=PREPARE_FIRST)
        return prefill_length(self.tts, text, cfg_weight, language_id)

    @property
    def plan(self) -> DecodePlan:
        """The decode plan ``generate`` and ``generate_stream`` use by default."""
        return self.plan_for(None)

    def plan_for(self, decode: str | None) -> DecodePlan:
        """The plan of decode step ``decode`` (``None``: the wrapper's own)."""
        self._check_open()  # its plans were freed
        return self.plans[check_decode(decode or self.decode, self.device)]

    def flow_for(self, mode: str | None) -> FlowPlan:
        """The flow plan ``mode`` (``None``: the wrapper's own)."""
        return self.flows[check_flow(mode or self.flow, self.device)]

    def _amp(self) -> Any:
        return torch.autocast(self.device.type, self.amp) if self.amp else nullcontext()

    @property
    def target_dtype(self) -> torch.dtype:
        """The dtype T3's matmuls run in (the decode steps, for per-phase policies)."""
        return self.amp or self.plan.decode.dtype

    # ------------------------------------------------------------ conditionals

    def _ensure_conditionals_dtype(self) -> None:
        conds = self.tts.conds
        if conds is None:
            raise NoVoiceError()
        check_conditionals(conds, self.tts)
        t3_dtype = torch.float32 if self.amp else compute_dtype(self.tts.t3)
        self.tts.conds = ensure_conditionals_dtype(conds, t3_dtype, self.tts.s3gen.dtype, self.device)

    def prepare_conditionals(
        self, wav_fpath: str, exaggeration: float = 0.5, norm_loudness: bool = True
    ) -> None:
        with self._using(), voice_turn(self.tts):
            with self._amp():
                prepare_voice(self.tts, wav_fpath, exaggeration, norm_loudness)
            self._ensure_conditionals_dtype()

    def _voice(
        self, text: str, audio_prompt_path: str | None, exaggeration: float, norm_loudness: bool = True
    ) -> None:
        super()._voice(text, audio_prompt_path, exaggeration, norm_loudness)
        self._ensure_conditionals_dtype()  # a new exaggeration is made in float32

    # ------------------------------------------------------------ generation

    def speech_tokens(
        self,
        text: str,
        max_new_tokens: int = 1000,
        cfg_weight: float = 0.5,
        decode: str | None = None,
        language_id: str | None = None,
        generator: torch.Generator | None = None,
        **sampling: Any,
    ) -> DecodeResult:
        """T3 only: the speech tokens for ``text`` (the voice must be prepared); ``decode``
        overrides the wrapper's decode step for this call; the multilingual model speaks
        ``language_id`` (default "en"); samples come from ``generator`` (default: the global one)."""
        # in turn: another call's voice write (or its dtype fix, which drops the prompt's
        # embedding) mid-decode spoke its voice, or failed in T3
        with self._using(), voice_turn(self.tts):
            conds = checked_voice(self.tts.conds, text, PREPARE_FIRST)
            return t3_decode(  # the plan carries the autocast dtype, entered around each step
                self.tts.t3,
                conds.t3,
                text_tokens(self.tts, text, cfg_weight, language_id),
                max_new_tokens=checked_cap(max_new_tokens),
                plan=self.plan_for(decode),
                cfg_weight=cfg_weight,
                stop_check_every=self.stop_check_every,
                generator=generator,
                **sampling,
            )

    def vocode(self, tokens: torch.Tensor, rng: StreamRandom | None = None) -> torch.Tensor:
        """S3Gen (flow + vocoder) over valid speech tokens; returns a float32 waveform (1, N).
        Its noise comes from ``rng`` (default: the global generator, as upstream)."""
        with self._using(), voice_turn(self.tts):  # as speech_tokens
            if self.tts.conds is None:
                raise NoVoiceError(fix=PREPARE_FIRST)
            with self._amp(), rng.drawing() if rng is not None else nullcontext():
                return s3gen_inference(self.tts.s3gen, tokens, self.tts.conds.gen)

    def generate(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        exaggeration: float = 0.5,
        max_new_tokens: int = 1000,
        seed: int | None = None,
        decode: str | None = None,
        language_id: str | None = None,
        norm_loudness: bool = True,
        **sampling: Any,
    ) -> torch.Tensor:
        """Like the family's upstream ``generate``: a watermarked waveform, shape (1, samples).
        ``sampling`` (temperature, top_p, ...; ``cfg_weight``) defaults as that ``generate`` does
        (``families.Family.sampling``); ``norm_loudness`` is Turbo's, for an ``audio_prompt_path``.
        ``decode`` overrides the wrapper's decode step for this call (the bench compares them).
        With a ``seed`` the call draws from its own generators (``rng.StreamRandom``: the tokens
        and audio of upstream ``generate`` after ``torch.manual_seed(seed)``, safe beside other
        threads); without one it goes on from the global random state, as upstream does.
        Generates on one model run one after the other (``generation.voice_turn``, from the voice
        written to the last read: S3Gen's); for streams at once, use ``engine.StreamEngine``."""
        with self._using(), voice_turn(self.tts):
            cfg_weight, sampling = family_of(self.tts).sampling_with(sampling)
            check_sampling(is_turbo(self.tts.t3), cfg_weight, **sampling)  # before a voice is prepared
            seed, max_new_tokens = checked_call(seed, max_new_tokens)
            rng = StreamRandom(seed) if seed is not None else None
            generator = rng.generator(self.tts.t3.speech_head.weight.device) if rng is not None else None
            # Kernels are recorded (on request) over T3 only, where the attention backend matters:
            # profiling the thousands of small S3Gen ops as well costs seconds per call. Recording
            # runs the eager step: a compiled graph hides its kernels from the recorder's ops.
            if self.record_attention:
                decode = "eager"
            record = KernelRecord()
            t0 = now(self.device)  # a voice prepared for this call is in the total, as upstream's
            self._voice(text, audio_prompt_path, exaggeration, norm_loudness)
            with (
                record_kernels(self.tts, [self.plan.decode])
                if self.record_attention
                else (nullcontext(record)) as record
            ):
                decoded = self.speech_tokens(
                    text, max_new_tokens, cfg_weight, decode, language_id, generator, **sampling
                )
            t1 = now(self.device)
            tokens = decoded.tokens[0]
            ids = tokens.tolist()
            speech = tokens.new_tensor(vocoded_ids(self.tts, ids))  # as upstream
            wav = self.vocode(speech, rng).squeeze(0).cpu().numpy()
            t2 = now(self.device)
            marked = self.tts.watermarker.apply_watermark(wav, sample_rate=self.tts.sr)
            t3 = now(self.device)
            self.last = LastGeneration(
                tokens=decoded.steps,
                stopped_by="stop token" if decoded.stopped else "token cap",
                invalid_tokens=invalid_ids(ids, self.tts.t3.hp.stop_speech_token),
                seconds={
                    "t3.prefill": decoded.prefill_s,
                    "t3.decode": decoded.decode_s,
                    "t3.step": decoded.step_s,
                    "t3.compile": decoded.compile_s,
                    "s3gen": t2 - t1,
                    "watermark": t3 - t2,
                    "total": t3 - t0,
                },
                kernels=record.by_phase(with_dtype=True),
                decode_step=decoded.step_mode,
            )
            return torch.from_numpy(marked).unsqueeze(0)

    def generate_stream(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        config: StreamConfig | None = None,
        exaggeration: float = 0.5,
        max_new_tokens: int = 1000,
        seed: int | None = 0,
        state: StreamState | None = None,
        decode: str | None = None,
        flow: str | None = None,
        norm_loudness: bool = True,
        **sampling: Any,
    ) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
        """Yield ``(audio_chunk, metrics)`` as audio is ready (``streaming.stream``, buffered by
        default) with this wrapper's decode plan, flow plan and autocast dtype (``decode`` and
        ``flow`` override the wrapper's own for this call); sampling and the voice as ``generate``.
        ``seed=None`` draws the seed from the global generator (``stream_seed``: reproducible after
        ``torch.manual_seed``, as upstream's unseeded ``generate``). The stream speaks the voice
        asked for by this call however late it is read (``UpstreamTTS``'s too).
        A stream still being read when the wrapper closes stops there (``ConfigError``)."""
        with self._using():
            # in turn until the voice is copied (not for the stream's life: it is read lazily)
            with voice_turn(self.tts):
                self._voice(text, audio_prompt_path, exaggeration, norm_loudness)
                conds = copy_conditionals(self.tts.conds)
            chunks = stream(  # sampling defaults as the family's generate (``stream``)
                self.tts,
                text,
                config or StreamConfig("buffered"),
                max_new_tokens=max_new_tokens,
                seed=stream_seed(seed),
                plan=self.plan_for(decode),
                amp=self.amp,
                flow=self.flow_for(flow),
                state=state,
                # the voice as asked for now: the stream starts when first read, maybe after
                # another call prepared another voice (or changed this one's exaggeration in place)
                conds=conds,
                **sampling,
            )
            return self._while_open(chunks)

    def _while_open(
        self, chunks: Generator[tuple[np.ndarray, ChunkMetrics], None, None]
    ) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
        """``chunks``, each only while the wrapper is open: after ``close()`` the model is given
        back, and the stream's plan (a bfloat16 copy, a freed cache) is no longer its own."""
        self._streams.add(chunks)
        try:
            while True:
                with self._made:
                    self._check_open(starting=True)
                    self._making[chunks] = threading.get_ident()
                try:
                    item = next(chunks)
                except StopIteration:
                    return
                finally:
                    with self._made:
                        self._making.pop(chunks, None)
                        self._made.notify_all()
                yield item
        finally:  # its cache and compiled step go back when the reader stops
            self._end(chunks)

    # ------------------------------------------------------------ reporting

    def configuration(self) -> dict[str, Any]:
        # the model given back, or a close() that failed putting it back (its plans are gone):
        # what the wrapper ran with
        if self.closed or self._unrestored:
            return copy.deepcopy(self._final)
        config = super().configuration()
        if self.plan.decode is not self.plan.prefill:
            config["parameter_bytes"]["t3.decode_copy"] = self.plan.decode.nbytes()
        if fused := self.plan.fusion.nbytes():  # one copy, shared by the static and compiled plans
            config["parameter_bytes"]["t3.fused_copy"] = fused
        steps = [s for p in self.plans.values() for b in (1, 2) if (s := p.static_step(b)) is not None]
        config["kv_cache_bytes"] = sum(p.static_bytes() for p in self.plans.values())
        return {
            "decode_step": self.decode,
            "compile_fallback": next((s.fallback_reason for s in steps if s.fallback_reason), None),
            # read from Inductor's generated code: the profiler cannot see inside compiled graphs
            "compiled_attention": next((s.attention_kernels for s in steps if s.attention_kernels), None),
            "flow": self.flow,
            "flow_compile_fallback": self.flows["compiled"].fallback_reason,
            **config,
            "policy": self.policy,
            "policy_reason": self.policy_choice.reason,
            "policy_measured": self.policy_choice.summary(),
            "target_dtype": dtype_name(self.target_dtype),
            "decode": self.plan.describe(),
            "using_amp": self.amp is not None,
            "flash_attention_available": self._flash_attention_available,
            "float32_islands": [{"module": f"{i.path}.{i.method}", "why": i.why} for i in self.islands],
            "attention_configured": configured_backend(self.tts),
        }


__all__ = [
    "ISLANDS",
    "PerformanceOptimizedTTS",
    "Pipeline",
    "Policy",
    "UpstreamTTS",
    "choose_policy",
    "decode_plan",
    "measure_policy",
]
