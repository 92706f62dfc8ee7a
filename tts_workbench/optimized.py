"""``PerformanceOptimizedTTS``: the seed's wrapper, every fix applied to an upstream ChatterboxTTS.

Fixes, each visible in a few lines below:

1. **dtype policy** (``precision.POLICIES``), chosen per device and checkpoint by *measuring*
   the candidates (``choose_policy``) unless one is given; a float16/bfloat16 checkpoint keeps
   its dtype;
2. **float32 islands** for the precision-hungry signal processing (``precision.ISLANDS``);
3. **conditionals** cast to each consumer's dtype after ``prepare_conditionals`` and after
   loading ``conds.pt`` (``_ensure_conditionals_dtype``);
4. **own T3 decode loop** (``decode.t3_decode``): no attention weights or hidden states per step,
   the speech head on the last position only, the stop check every few steps.

``optimize=False`` applies none of them: ``generate`` is upstream ``ChatterboxTTS.generate``.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE, drop_invalid_tokens
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import ChatterboxTTS

from .attention import KernelRecord, configured_backend, record_kernels, why_not_flash
from .decode import DecodePlan, DecodeResult, T3Parts, t3_decode, text_tokens
from .generation import token_cap
from .latency import ChunkMetrics
from .precision import (
    ISLANDS,
    POLICIES,
    Island,
    check_conditionals,
    check_policy,
    compute_dtype,
    ensure_conditionals_dtype,
    install_islands,
    island_modules,
)
from .sources import check_device, components, dtype_name, load_folder, load_pretrained
from .streaming import StreamConfig, StreamState, stream
from .vocode import s3gen_inference

_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def decode_plan(tts: ChatterboxTTS, policy: str) -> DecodePlan:
    """The T3 weights and autocast dtype a policy decodes with (copies for per-phase policies)."""
    parts = T3Parts.of(tts.t3)
    if policy.startswith("autocast-"):
        return DecodePlan(parts, parts, autocast=_HALF[policy.removeprefix("autocast-")])
    if policy == "decode-bfloat16":
        return DecodePlan(parts, parts.to(torch.bfloat16))
    if policy in _HALF and parts.dtype != _HALF[policy]:
        half = parts.to(_HALF[policy])
        return DecodePlan(half, half)
    return DecodePlan(parts, parts)


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


def measure_policy(tts: ChatterboxTTS, policy: str, steps: int = 8, text_len: int = 60) -> dict[str, float]:
    """Prefill seconds and seconds per decode step of T3 under ``policy`` (tts is not changed)."""
    plan = decode_plan(tts, policy)
    text = torch.full((2, text_len), 1, dtype=torch.long)
    text[:, 0], text[:, -1] = tts.t3.hp.start_text_token, tts.t3.hp.stop_text_token
    # A copy, so the prompt embedding T3 caches on the conditionals is not left behind.
    cond = T3Cond(**{**vars(_probe_cond(tts)), "cond_prompt_speech_emb": None})
    cond.to(dtype=next(tts.t3.cond_enc.parameters()).dtype)
    t3_decode(tts.t3, cond, text, max_new_tokens=2, plan=plan)  # warm-up (allocator, kernels)
    r = t3_decode(tts.t3, cond, text, max_new_tokens=steps + 1, plan=plan, stop_check_every=steps + 1)
    return {"prefill_s": r.prefill_s, "step_s": r.step_s}


def choose_policy(tts: ChatterboxTTS, device: torch.device, tokens: int = 200) -> tuple[str, str, dict]:
    """Pick a policy for this checkpoint on this device; returns (policy, reason, measurements).

    A half-precision checkpoint keeps its dtype. Otherwise the candidates are timed on T3 (the
    phase that dominates) and the one with the least prefill + ``tokens`` decode steps wins:
    on CUDA native half vs autocast; on CPU float32 vs a bfloat16 decode copy.
    """
    t3_dtype = compute_dtype(tts.t3)
    if t3_dtype != torch.float32:
        return "keep", f"checkpoint is {dtype_name(t3_dtype)}: kept (no upcast)", {}
    if device.type == "cuda":
        half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        candidates = [half, f"autocast-{half}"]
    else:
        candidates = ["float32", "decode-bfloat16"]
    measured = {c: measure_policy(tts, c) for c in candidates}

    def cost(c: str) -> float:
        return measured[c]["prefill_s"] + tokens * measured[c]["step_s"]

    best = min(candidates, key=cost)
    reason = f"measured on T3 (prefill + {tokens} steps): " + ", ".join(
        f"{c} {cost(c):.2f} s" for c in candidates
    )
    return best, reason, measured


@dataclass
class LastGeneration:
    """What the last ``generate`` did, for ``performance_info``."""

    tokens: int = 0
    stopped_by: str = ""
    invalid_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, dict[str, int]] = field(default_factory=dict)


class PerformanceOptimizedTTS:
    """An upstream ChatterboxTTS with the fixes applied (see the module docstring)."""

    def __init__(
        self,
        tts: ChatterboxTTS,
        optimize: bool = True,
        dtype: str = "auto",
        record_attention: bool = True,
        stop_check_every: int = 8,
    ) -> None:
        self.tts = tts
        self.optimize = optimize
        self.record_attention = record_attention
        self.stop_check_every = stop_check_every
        self.device = check_device(str(tts.device))
        self.last = LastGeneration()
        self._stack = ExitStack()  # keeps the island shadows installed for the wrapper's lifetime
        self.policy, self.policy_reason = check_policy(dtype), ""
        self.policy_measured: dict[str, dict[str, float]] = {}
        self.islands: list[Island] = []
        self.amp: torch.dtype | None = None
        if not optimize:
            self.policy, self.policy_reason = "upstream", "optimize=False: upstream code path"
            self.plan = DecodePlan.plain(tts.t3)
        else:
            if tts.conds is not None:
                check_conditionals(tts.conds, tts)  # before any probe runs T3 on them
            self.islands = install_islands(tts, self._stack)
            if dtype == "auto":
                self.policy, self.policy_reason, self.policy_measured = choose_policy(tts, self.device)
            else:
                self.policy_reason = f"requested: {POLICIES[dtype]}"
            self._apply_policy()
            if tts.conds is not None:
                self._ensure_conditionals_dtype()
        self._flash_attention_available = self._validate_flash_attention()

    # ------------------------------------------------------------ construction

    @classmethod
    def from_model(cls, tts: ChatterboxTTS, optimize: bool = True, **kwargs: Any) -> PerformanceOptimizedTTS:
        """Wrap an already-built model (``sources.load_model('tiny' | 'random')``)."""
        return cls(tts, optimize=optimize, **kwargs)

    @classmethod
    def from_local(
        cls, folder: str | Path, device: str = "cpu", optimize: bool = True, **kwargs: Any
    ) -> PerformanceOptimizedTTS:
        """Load a checkpoint folder. Optimized: each file keeps its saved dtype (a float16 export
        stays float16). ``optimize=False``: upcast to float32 the way upstream ``from_local`` does."""
        return cls(load_folder(folder, device, keep_dtype=optimize), optimize=optimize, **kwargs)

    @classmethod
    def from_pretrained(
        cls, device: str = "cpu", optimize: bool = True, **kwargs: Any
    ) -> PerformanceOptimizedTTS:
        """Upstream ``from_pretrained`` (hub weights; offline here, so it fails with the fix)."""
        return cls(load_pretrained(device), optimize=optimize, **kwargs)

    def _apply_policy(self) -> None:
        t3, flow = self.tts.t3, self.tts.s3gen.flow
        p = self.policy
        if p in ("float32", "decode-bfloat16") or p.startswith("autocast-"):
            t3.float()
            flow.float()
        elif p in _HALF:
            t3.to(_HALF[p])
            flow.to(_HALF[p])
        compute_dtype(t3)  # "keep" on a checkpoint with mixed dtypes inside one component: refuse
        compute_dtype(self.tts.s3gen, island_modules(self.tts))
        self.amp = _HALF[p.removeprefix("autocast-")] if p.startswith("autocast-") else None
        self.plan = decode_plan(self.tts, p)

    def _amp(self) -> Any:
        return torch.autocast(self.device.type, self.amp) if self.amp else nullcontext()

    @property
    def target_dtype(self) -> torch.dtype:
        """The dtype T3's matmuls run in (the decode steps, for per-phase policies)."""
        return self.amp or self.plan.decode.dtype

    # ------------------------------------------------------------ conditionals

    def _ensure_conditionals_dtype(self) -> None:
        conds = self.tts.conds
        assert conds is not None
        check_conditionals(conds, self.tts)
        t3_dtype = torch.float32 if self.amp else compute_dtype(self.tts.t3)
        ensure_conditionals_dtype(conds, t3_dtype, self.tts.s3gen.dtype, self.device)

    def prepare_conditionals(self, wav_fpath: str, exaggeration: float = 0.5) -> None:
        with self._amp():
            self.tts.prepare_conditionals(wav_fpath, exaggeration=exaggeration)
        if self.optimize:
            self._ensure_conditionals_dtype()

    # ------------------------------------------------------------ generation

    def _voice(self, audio_prompt_path: str | None, exaggeration: float) -> None:
        if audio_prompt_path:
            self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration)
        elif self.tts.conds is None:
            raise ValueError("no voice: pass audio_prompt_path or call prepare_conditionals(wav) first")
        if exaggeration != float(self.tts.conds.t3.emotion_adv.flatten()[0]):  # as upstream generate
            self.tts.conds.t3.emotion_adv = exaggeration * torch.ones(1, 1, 1)
            self._ensure_conditionals_dtype()

    def speech_tokens(
        self,
        text: str,
        max_new_tokens: int = 1000,
        cfg_weight: float = 0.5,
        **sampling: Any,
    ) -> DecodeResult:
        """T3 only: the speech tokens for ``text`` (the voice must be prepared)."""
        assert self.tts.conds is not None
        return t3_decode(  # the plan carries the autocast dtype, entered around each step
            self.tts.t3,
            self.tts.conds.t3,
            text_tokens(self.tts, text, cfg_weight),
            max_new_tokens=max_new_tokens,
            plan=self.plan,
            cfg_weight=cfg_weight,
            stop_check_every=self.stop_check_every,
            **sampling,
        )

    def vocode(self, tokens: torch.Tensor) -> torch.Tensor:
        """S3Gen (flow + vocoder) over valid speech tokens; returns a float32 waveform (1, N)."""
        assert self.tts.conds is not None
        with self._amp():
            return s3gen_inference(self.tts.s3gen, tokens, self.tts.conds.gen)

    def generate(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        exaggeration: float = 0.5,
        cfg_weight: float = 0.5,
        temperature: float = 0.8,
        repetition_penalty: float = 1.2,
        min_p: float = 0.05,
        top_p: float = 1.0,
        max_new_tokens: int = 1000,
    ) -> torch.Tensor:
        """Like upstream ``ChatterboxTTS.generate``: a watermarked waveform, shape (1, samples)."""
        sampling = dict(
            temperature=temperature, repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p
        )
        if not self.optimize:
            with token_cap(self.tts, max_new_tokens):
                return self.tts.generate(
                    text,
                    audio_prompt_path=audio_prompt_path,
                    exaggeration=exaggeration,
                    cfg_weight=cfg_weight,
                    **sampling,
                )
        self._voice(audio_prompt_path, exaggeration)
        # Kernels are recorded over T3 only, where the attention backend matters: profiling the
        # thousands of small S3Gen ops as well costs seconds per call (diagnose covers S3Gen).
        record = KernelRecord()
        t0 = time.perf_counter()
        with (
            record_kernels(self.tts, [self.plan.decode.tfmr])
            if self.record_attention
            else (nullcontext(record)) as record
        ):
            decoded = self.speech_tokens(text, max_new_tokens, cfg_weight, **sampling)
        t1 = time.perf_counter()
        tokens = drop_invalid_tokens(decoded.tokens[0])
        wav = self.vocode(tokens[tokens < SPEECH_VOCAB_SIZE]).squeeze(0).cpu().numpy()
        t2 = time.perf_counter()
        marked = self.tts.watermarker.apply_watermark(wav, sample_rate=self.tts.sr)
        self.last = LastGeneration(
            tokens=decoded.steps,
            stopped_by="stop token" if decoded.stopped else "token cap",
            invalid_tokens=int((decoded.tokens >= SPEECH_VOCAB_SIZE).sum()) - int(decoded.stopped),
            seconds={
                "t3.prefill": decoded.prefill_s,
                "t3.decode": decoded.decode_s,
                "t3.step": decoded.step_s,
                "s3gen": t2 - t1,
                "total": time.perf_counter() - t0,
            },
            kernels=record.by_phase(with_dtype=True),
        )
        return torch.from_numpy(marked).unsqueeze(0)

    def generate_stream(
        self,
        text: str,
        audio_prompt_path: str | None = None,
        config: StreamConfig | None = None,
        exaggeration: float = 0.5,
        max_new_tokens: int = 1000,
        seed: int = 0,
        state: StreamState | None = None,
        **sampling: Any,
    ) -> Iterator[tuple[np.ndarray, ChunkMetrics]]:
        """Yield ``(audio_chunk, metrics)`` as audio is ready (``streaming.stream``; the buffered
        strategy by default, or the upstream fork's naive loop when ``optimize=False``)."""
        if audio_prompt_path or self.tts.conds is None:
            self._voice(audio_prompt_path, exaggeration)
        config = config or StreamConfig("buffered" if self.optimize else "naive")
        return stream(
            self.tts,
            text,
            config,
            max_new_tokens=max_new_tokens,
            seed=seed,
            plan=self.plan,
            amp=self.amp,
            state=state,
            **sampling,
        )

    # ------------------------------------------------------------ reporting

    def _validate_flash_attention(self) -> bool:
        """True when a fused CUDA Flash kernel can run T3's decode attention in the target dtype."""
        return not why_not_flash(self.tts, dtype=self.target_dtype)

    def performance_info(self) -> dict[str, Any]:
        """What runs in which dtype, which attention kernel ran last time, and the memory used."""
        tts = self.tts
        memory: dict[str, Any] = {
            "parameter_bytes": {
                name: sum(p.numel() * p.element_size() for p in m.parameters())
                for name, m in components(tts).items()
            }
        }
        if self.plan.decode is not self.plan.prefill:
            memory["parameter_bytes"]["t3.decode_copy"] = self.plan.decode.nbytes()
        if self.device.type == "cuda":
            memory["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.device)
        memory["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "optimize": self.optimize,
            "device": str(self.device),
            "policy": self.policy,
            "policy_reason": self.policy_reason,
            "policy_measured": self.policy_measured,
            "model_dtype": dtype_name(next(tts.t3.parameters()).dtype),
            "target_dtype": dtype_name(self.target_dtype),
            "decode": self.plan.describe() if self.optimize else "upstream T3.inference",
            "using_amp": self.amp is not None,
            "flash_attention_available": self._flash_attention_available,
            "component_dtypes": {
                "ve": dtype_name(next(tts.ve.parameters()).dtype),
                "t3": dtype_name(next(tts.t3.parameters()).dtype),
                "s3gen.flow": dtype_name(tts.s3gen.dtype),
                "s3gen.mel2wav": dtype_name(next(tts.s3gen.mel2wav.parameters()).dtype),
            },
            "float32_islands": [{"module": f"{i.path}.{i.method}", "why": i.why} for i in self.islands],
            "attention": {
                "configured": configured_backend(tts),
                "last_generation": self.last.kernels,
            },
            "memory": memory,
            "last_generation": vars(self.last),
        }


__all__ = ["ISLANDS", "PerformanceOptimizedTTS", "choose_policy", "decode_plan", "measure_policy"]
