"""S3Gen calls with exact token ids: flow matching (tokens → mel) and the HiFT vocoder (mel → wav).

Upstream ``S3Gen.forward`` casts *every* tensor of the reference dict to the model dtype, in
place, integer token ids included. In bfloat16 only integers up to 256 are exact (float16: 2048),
so a half-precision S3Gen silently rounds the reference prompt's speech tokens (ids up to 6560;
bfloat16 turns 267 into 268). Their count survives: upstream cuts the prompt to 10 s, at most
250 tokens. These functions call the same flow and vocoder modules with the ids kept
as ``long`` and only the float tensors in the model dtype, and without mutating the caller's
dict.

``FlowPlan`` is how the flow's CFM estimator (10 steps of a U-Net at batch 2, the bulk of S3Gen's
time) runs in a stream: eager, or compiled for the stream's few fixed window shapes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.s3gen import decoder as s3gen_decoder
from chatterbox.models.s3gen.const import S3GEN_SIL

from ..core.clock import now
from ..core.compiling import compile_method, fell_back, replay, warmup_calls
from ..core.constants import FRAMES_PER_TOKEN
from ..core.errors import ConfigError
from ..core.families import FAMILIES
from ..core.patching import routed, shared
from ..core.rng import not_drawing

# Integer entries of the reference dict. After one upstream ``S3Gen.forward`` in float32 they
# are float32 in the caller's dict (exact up to 2**24, so they round back exactly).
TOKEN_KEYS = ("prompt_token", "prompt_token_len")


def cast_gen(gen: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
    """S3Gen's reference dict with float tensors in ``dtype``, token ids and lengths ``long``."""
    out = {}
    for k, v in gen.items():
        if torch.is_tensor(v):
            integer = k in TOKEN_KEYS or not v.is_floating_point()
            v = v.round().to(device=device, dtype=torch.long) if integer else v.to(device=device, dtype=dtype)
        out[k] = v
    return out


FLOW_MODES = ("eager", "compiled")


class FlowPlan:
    """How the flow runs its CFM estimator: ``"eager"`` as upstream, or ``"compiled"``: under
    ``torch.compile(dynamic=False)`` (``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA).

    A compiled graph has one shape, and every streaming window would bring a new one (the last
    window's length, the prompt plus the window). So ``flow_mels(..., pad_to=n)`` pads the
    estimator's frames on the right to the prompt plus ``n`` tokens with masked frames: the
    estimator is causal (causal convolutions, attention masked by key), so the real frames come
    out as unpadded, up to the rounding of differently shaped kernels (test), and a buffered
    stream compiles two shapes per voice (its first and its regular window). A new shape is
    compiled and warmed up on its first call, timed in ``compile_s`` and kept out of the call's
    own time, on a code object of its own: dynamo keeps at most 8 entries per code object
    (``recompile_limit``) and runs a ninth shape of one code object eagerly, unannounced. A
    compile failure runs the estimator eagerly, with one warning and ``fallback_reason`` saying
    why.
    """

    def __init__(self, mode: str = "eager") -> None:
        if mode not in FLOW_MODES:
            raise ConfigError(f"unknown flow mode {mode!r}: use {' or '.join(FLOW_MODES)}")
        self.mode = mode
        self.compile_s = 0.0  # compiling and warming up new shapes, all calls together
        self._here = threading.local()  # the same, per thread (``compile_s_here``)
        self.fallback_reason: str | None = None
        # per (estimator id, shape, dtype, autocast dtype or None): compiled on its own code object
        self._compiled: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}
        self._compiling = threading.Lock()  # one thread compiles (or warms up) at a time (``_estimator``)

    @property
    def compile_s_here(self) -> float:
        """``compile_s`` of this thread's calls: what a stream subtracts from its own flow time
        (streams in other threads may share this plan and compile meanwhile)."""
        return float(getattr(self._here, "s", 0.0))

    @property
    def compiled(self) -> bool:
        """Whether calls run the compiled estimator: compiled asked for, and nothing made it fall back."""
        return self.mode == "compiled" and self.fallback_reason is None

    @property
    def shapes(self) -> set[tuple[Any, ...]]:
        """The (estimator id, shape, dtype, autocast dtype or None) keys compiled so far."""
        return set(self._compiled)

    def drop(self) -> None:
        """Forget the compiled estimators (the model's own modules are not touched)."""
        self._compiled.clear()

    def running(self, s3gen: S3Gen, frames: int | None) -> AbstractContextManager[Any]:
        """While inside, ``s3gen``'s estimator runs this plan's way, on frames padded to
        ``frames`` (``None``: as they come), with the stream's drawing mode off (``_padded``)."""
        estimator = s3gen.flow.decoder.estimator
        stack = ExitStack()
        # Per thread: streams in threads each run their own plan and padding.
        stack.enter_context(routed(estimator, "forward", lambda fwd: self._padded(estimator, fwd, frames)))
        if self.compiled:  # one function for all: the same masks for every non-empty window
            stack.enter_context(shared(s3gen_decoder, "add_optional_chunk_mask", _full_context_mask))
        return stack

    def _padded(
        self, estimator: torch.nn.Module, forward: Callable[..., torch.Tensor], frames: int | None
    ) -> Any:
        def run(
            x: torch.Tensor,
            mask: torch.Tensor,
            mu: torch.Tensor,
            t: torch.Tensor,
            spks: torch.Tensor | None = None,
            cond: torch.Tensor | None = None,
            r: torch.Tensor | None = None,
        ) -> torch.Tensor:
            n = x.size(2)
            pad = max(0, (frames or n) - n)
            if pad:  # zeros in the mask: the padded frames are masked out
                x, mask, mu = (F.pad(v, (0, pad)) for v in (x, mask, mu))
                cond = None if cond is None else F.pad(cond, (0, pad))
            # The estimator draws nothing, so a stream's random-draw mode (``core.rng``, a
            # TorchFunctionMode) is switched off around it: Dynamo would trace the mode into
            # every op (a third of the compile time) and eager calls would pay it per op.
            with not_drawing():
                cudagraphs = self.compiled and x.device.type == "cuda"
                fn = self._estimator(estimator, forward, (x, mask, mu, t, spks, cond, r), cudagraphs)
                # sliced before replay clones it: only the window's own frames are copied
                out: torch.Tensor = replay(
                    lambda *a: fn(*a)[..., :n], x, mask, mu, t, spks, cond, r,
                    cudagraphs=cudagraphs, compiled=fn is not forward,
                )  # fmt: skip
            return out

        return run

    def _estimator(
        self,
        estimator: torch.nn.Module,
        forward: Callable[..., torch.Tensor],
        args: tuple[Any, ...],
        cudagraphs: bool = False,
    ) -> Callable[..., torch.Tensor]:
        """The callable for these inputs: the compiled estimator, compiled and warmed up first
        for a shape not seen yet; the eager one when not compiling (or after a failure). With
        CUDA graphs a shape compiled in another thread is warmed up again in this one: a thread
        has its own graph tree (torch 2.13 keeps even the compiled callable per thread), so its
        first calls would record there, inside a timed call (the load study's levels each run
        a new engine, so new threads, on one plan)."""
        if not self.compiled:
            return forward
        x = args[0]
        # The autocast dtype too: a graph traced under bf16 autocast is not the fp16 one (before,
        # fp16 after bf16 got the bf16 entry and dynamo recompiled inside the timed call).
        device_type = x.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (id(estimator), tuple(x.shape), x.dtype, autocast)
        warmed: set[tuple[Any, ...]] = self._here.__dict__.setdefault("warmed", set())
        fn = self._compiled.get(key)
        if fn is not None and (key in warmed or not cudagraphs):
            return fn
        # Two streams meeting a new shape at once each compiled it: now the second waits for the
        # first's compile and uses it (its wait counts in its own time, as a wait for replay's lock
        # does). Shapes already compiled are served above, without waiting. Holding the lock
        # through a compile cannot deadlock: it is taken only here, and nothing run under it (the
        # compile, replay and its lock) calls back into this plan.
        with self._compiling:
            if not self.compiled:  # the compile waited for failed: eager, with no second try or warning
                return forward
            fn = self._compiled.get(key)
            if fn is not None and (key in warmed or not cudagraphs):
                return fn
            t0 = now(x.device)
            try:
                if fn is None:  # compile_method: a code object per call, per shape: never past dynamo's limit
                    fn = compile_method(type(estimator).forward, estimator, cudagraphs, fullgraph=False)
                for _ in range(warmup_calls(cudagraphs)):
                    replay(fn, *args, cudagraphs=cudagraphs)
                self._compiled[key] = fn
                warmed.add(key)
            except Exception as e:  # any compile failure falls back to the eager estimator
                self.fallback_reason = fell_back(e, "S3Gen's CFM estimator", "running it eagerly")
                fn = forward
            spent = now(x.device) - t0
            self.compile_s += spent
            self._here.s = self.compile_s_here + spent
        return fn


def _full_context_mask(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Upstream ``add_optional_chunk_mask`` without, for the estimator's full-context attention,
    its check for a row with no valid key: ``.item()`` reads a value back to the host, a graph
    break and a device sync once in each of the estimator's 14 block groups (56 attention blocks)
    at each of 10 steps. A key mask of a non-empty window (all the estimator is given) has no such
    row."""

    def mask(
        xs: torch.Tensor,
        masks: torch.Tensor,
        use_dynamic_chunk: bool,
        use_dynamic_left_chunk: bool,
        decoding_chunk_size: int,
        static_chunk_size: int,
        num_decoding_left_chunks: int,
        enable_full_context: bool = True,
    ) -> torch.Tensor:
        if not use_dynamic_chunk and static_chunk_size <= 0:
            return masks
        return original(
            xs, masks, use_dynamic_chunk, use_dynamic_left_chunk, decoding_chunk_size,
            static_chunk_size, num_decoding_left_chunks, enable_full_context,
        )  # fmt: skip

    return mask


def cfm_steps(s3gen: S3Gen) -> int:
    """CFM steps per flow call, as upstream ``flow_inference`` counts them: Turbo's (its S3Gen
    is the meanflow one) or the other families' (``Family.cfm_steps``)."""
    return FAMILIES["turbo" if s3gen.meanflow else "standard"].cfm_steps


def flow_mels(
    s3gen: S3Gen,
    tokens: torch.Tensor,
    gen: dict[str, Any],
    n_timesteps: int | None = None,
    noise: torch.Tensor | None = None,
    plan: FlowPlan | None = None,
    pad_to: int | None = None,
) -> torch.Tensor:
    """Mel frames (1, 80, 2·tokens) for speech ``tokens`` after the reference prompt in ``gen``;
    one frame fewer, 2·tokens - 1, where the prompt has one frame more than twice its tokens, as
    upstream ``embed_ref`` leaves a reference under 10 s that is not a multiple of 40 ms
    (``streaming.shorten_prompt`` drops that frame, so every token gets two). Several windows of
    one voice and one length in one call: ``tokens`` (windows, n) give (windows, 80, 2·n), each
    row computed apart from the others (the stream engine's batched flow calls).

    Always finalized, every token's frames made (upstream's ``finalize=False``, which drops the
    last ``pre_lookahead_len`` tokens' frames, fails in its own mask there; before 2026-12-04 it
    was offered here and failed so). ``noise`` (windows, 80, frames) replaces
    the flow-matching start noise of the generated frames (upstream draws it afresh every call),
    so windows of one utterance can share one noise track. ``plan`` runs the CFM estimator its
    way, its frames padded to the prompt plus ``pad_to`` tokens (``FlowPlan``). ``n_timesteps``
    defaults as upstream ``flow_inference`` (``cfm_steps``: 2 for Turbo's meanflow S3Gen, else 10).
    """
    dtype, device = s3gen.dtype, s3gen.device
    ref = cast_gen(gen, dtype, device)
    tokens = torch.atleast_2d(tokens).to(device=device, dtype=torch.long)
    frames = None if pad_to is None else ref["prompt_feat"].size(1) + pad_to * FRAMES_PER_TOKEN
    with torch.inference_mode(), (plan or FlowPlan()).running(s3gen, frames):
        mels, _ = s3gen.flow.inference(
            token=tokens,
            token_len=torch.full((tokens.size(0),), tokens.size(1), device=device),
            finalize=True,
            n_timesteps=n_timesteps or cfm_steps(s3gen),
            noised_mels=None if noise is None else noise.to(device=device, dtype=dtype),
            meanflow=s3gen.meanflow,
            **ref,
        )
    return mels


def vocoder(
    s3gen: S3Gen, mels: torch.Tensor, cache_source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HiFT: waveform (1, samples) in float32 and the excitation source (for ``cache_source``)."""
    if cache_source is None:
        cache_source = torch.zeros(1, 1, 0, device=mels.device)
    with torch.inference_mode():
        wav, source = s3gen.mel2wav.inference(speech_feat=mels, cache_source=cache_source)
    return wav.float(), source


def fade_in(s3gen: S3Gen, wav: torch.Tensor) -> None:
    """Upstream's fade-in over the first 40 ms of ``wav`` (..., samples), in place: it hides the
    spill-over from the reference prompt at the start of every ``S3Gen.inference`` output.
    Under inference mode, where ``vocoder``'s output (an inference tensor) can be updated in place;
    a normal tensor is updated as under ``no_grad``."""
    with torch.inference_mode():
        n = min(len(s3gen.trim_fade), wav.shape[-1])
        wav[..., :n] *= s3gen.trim_fade[:n].to(wav)


def tail_tokens(s3gen: S3Gen) -> list[int]:
    """The tokens upstream appends to T3's before vocoding: Turbo's generate ends every utterance
    with three silence tokens (its S3Gen is the meanflow one); the other families append none."""
    return [S3GEN_SIL] * 3 if s3gen.meanflow else []


def s3gen_inference(s3gen: S3Gen, tokens: torch.Tensor, gen: dict[str, Any]) -> torch.Tensor:
    """Upstream ``S3Gen.inference`` (flow, vocoder, fade-in over the reference spill-over)."""
    noise = None
    if s3gen.meanflow:  # drawn first, as upstream's flow_inference does: the same draws for a seed
        noise = torch.randn(1, 80, tokens.size(-1) * FRAMES_PER_TOKEN, dtype=s3gen.dtype, device=s3gen.device)
    with torch.inference_mode():
        wav, _ = vocoder(s3gen, flow_mels(s3gen, tokens, gen, noise=noise))
        fade_in(s3gen, wav)
    return wav
