"""Dtype policies, float32 islands and conditionals casting: the fixes for the dtype causes.

The dtype tracer (``dtypes.trace_dtypes``) finds where half precision breaks Chatterbox:
kaldi fbank in CAMPPlus, the S3 tokenizer's log-mel, the VoiceEncoder (float32 mels in, ``.numpy()`` out),
HiFT's source module and iSTFT, and T3's conditioning encoder fed a float32 speaker embedding.
The first five are signal processing on reference audio or waveforms, cheap and precision-hungry,
so they become **islands**: their weights stay float32, their inputs are cast to float32 and
autocast is off inside them. The last is fixed by casting the conditionals
(``ensure_conditionals_dtype``). All of it is done on the instance; the installed package is not
edited.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from chatterbox.tts import ChatterboxTTS, Conditionals
from torch import nn

from ..core.constants import dtype_name
from ..core.errors import ConfigError, SourceError
from ..core.families import FAMILIES, components, family_of
from ..core.patching import ModuleSnapshot, preserved, shadow, working_copy
from ..core.policies import POLICIES
from ..models.vocode import cast_gen


@dataclass(frozen=True)
class Island:
    """A part that runs in float32 whatever the policy: ``path.method`` on the instance."""

    path: str  # attribute path from the ChatterboxTTS, e.g. "s3gen.mel2wav"
    method: str
    why: str


ISLANDS = (
    Island("ve", "forward", "VoiceEncoder: upstream feeds it float32 mels and .numpy()s its embedding"),
    Island("s3gen.tokenizer", "forward", "S3 tokenizer log-mel (STFT) on reference audio"),
    Island("s3gen.speaker_encoder", "inference", "CAMPPlus: kaldi fbank needs float32 input"),
    Island("s3gen", "mel_extractor", "reference mel spectrogram (STFT)"),
    # all of it: its float32 sines in float16 convolutions failed (so a float32 source alone)
    Island("s3gen.mel2wav", "inference", "all of HiFT: its sine source and iSTFT need float32"),
)


def check_policy(name: str) -> str:
    """``name`` if it is a known policy, else a ConfigError listing them."""
    if name not in POLICIES:
        raise ConfigError(f"unknown dtype policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return name


def _to_float32(x: Any) -> Any:
    if torch.is_tensor(x) and x.is_floating_point():
        return x.float()
    if isinstance(x, list | tuple):
        return type(x)(_to_float32(v) for v in x)
    return x


def _float32_island(fn: Callable[..., Any]) -> Callable[..., Any]:
    def inner(*args: Any, **kwargs: Any) -> Any:
        with ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return fn(*_to_float32(args), **{k: _to_float32(v) for k, v in kwargs.items()})

    return inner


def install_islands(tts: ChatterboxTTS, stack: ExitStack) -> list[Island]:
    """Make every island float32 and shadow its method with the float32 boundary.

    The shadows live as long as ``stack``; the float32 weights stay.
    """
    for module in island_modules(tts):
        module.float()
    for island in ISLANDS:
        stack.enter_context(shadow(attrgetter(island.path)(tts), island.method, _float32_island))
    return list(ISLANDS)


def island_modules(tts: ChatterboxTTS) -> list[nn.Module]:
    """The modules whose weights are islands (the mel extractor is a function on S3Gen itself)."""
    return [attrgetter(i.path)(tts) for i in ISLANDS if i.path != "s3gen"]


def compute_dtype(module: nn.Module, skip: Sequence[nn.Module] = ()) -> torch.dtype:
    """The floating dtype of ``module``'s parameters outside the islands in ``skip``.

    Raises if they are mixed: half the weights in one dtype and half in another is not a
    policy, it is a broken checkpoint (re-save it with ``save_checkpoint(dtype=...)`` or load it
    with an explicit dtype policy, which casts).
    """
    skipped = {id(p) for m in skip for p in m.parameters()}
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if id(p) not in skipped and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if len(counts) > 1:
        mix = ", ".join(f"{dtype_name(d)}: {n:,}" for d, n in counts.items())
        raise SourceError(
            f"{type(module).__name__} has mixed parameter dtypes ({mix}); re-save the checkpoint "
            "with one dtype or choose an explicit dtype policy to cast it, e.g. float32: "
            "PerformanceOptimizedTTS(tts, policy='float32'), from_model(tts, dtype='float32') or "
            "from_local(folder, dtype='float32'), --dtype float32 on the command line"
        )
    return next(iter(counts), torch.float32)


def check_conditionals(conds: Conditionals, tts: ChatterboxTTS) -> None:
    """Refuse conditionals made for another family or model size, or anything that is no voice
    (a reference's path, say: the voice is what preparing it makes), naming what does not fit."""
    family, kind = family_of(tts), type(conds)
    if kind is not family.conditionals:
        made_for = next((f.name for f in FAMILIES.values() if kind is f.conditionals), None)
        given = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        made = f"made by the {made_for} family's prepare_conditionals" if made_for else "no voice"
        raise SourceError(
            f"conds must be a voice prepared by this {family.name} model (its tts.conds, a "
            f"{family.conditionals.__module__}.Conditionals), got {given} ({made}): call "
            "prepare_voice(tts, wav) / prepare_conditionals(reference_wav) with this model"
        )
    expect = {
        "t3.speaker_emb": (conds.t3.speaker_emb, tts.t3.cond_enc.spkr_enc.in_features),
        "gen.embedding": (conds.gen.get("embedding"), tts.s3gen.flow.spk_embed_affine_layer.in_features),
        "gen.prompt_feat": (conds.gen.get("prompt_feat"), tts.s3gen.flow.output_size),
    }
    for name, (tensor, width) in expect.items():
        if tensor is None or tensor.shape[-1] != width:
            got = "missing" if tensor is None else f"width {tensor.shape[-1]}"
            raise SourceError(
                f"conditionals do not fit this model: {name} is {got}, the model expects {width}. "
                "They were made for another model size; call prepare_conditionals(reference_wav) "
                "with this model instead"
            )
    # Of one class for every family where loaded from a folder's conds.pt (the folder's family's):
    # a Turbo voice, its speech prompt 375 tokens, ran on a standard model's 150 unrefused (before
    # 2026-12-07). A standard voice on a Turbo model cannot be told so: 150 fits Turbo's too.
    prompt, longest = conds.t3.cond_prompt_speech_tokens, tts.t3.hp.speech_cond_prompt_len
    if prompt is not None and prompt.size(-1) > longest:
        raise SourceError(
            f"conditionals do not fit this model: their speech prompt is {prompt.size(-1)} tokens, the "
            f"{family.name} model's at most {longest} (its prepare_conditionals cuts it there): they were "
            "made by another family's model; call prepare_conditionals(reference_wav) with this model instead"
        )


def copy_conditionals(conds: Conditionals | None) -> Conditionals | None:
    """A copy with every tensor detached and cloned (``copy.deepcopy`` refuses the non-leaf
    tensors that ``prepare_conditionals`` leaves when it ran with autograd on)."""
    if conds is None:
        return None

    def fresh(v: Any) -> Any:
        return v.detach().clone() if torch.is_tensor(v) else v

    t3 = type(conds.t3)(**{k: fresh(v) for k, v in vars(conds.t3).items()})
    return type(conds)(t3, {k: fresh(v) for k, v in conds.gen.items()})  # the family's own class


@contextmanager
def restored(
    tts: ChatterboxTTS, snapshots: list[ModuleSnapshot] | None = None
) -> Iterator[Conditionals | None]:
    """Everything the workbench may change on ``tts``, given back on exit as it was on entry:
    every tensor of its components (``patching.preserved``) and its conditionals (the block
    works on a copy, yielded). ``snapshots``, when given, receives the components' snapshots
    (a caller that casts them releases what the cast replaced: ``release_replaced``)."""
    with (
        preserved(*components(tts).values()) as snaps,
        working_copy(tts, "conds", copy_conditionals) as conds,
    ):
        if snapshots is not None:
            snapshots.extend(snaps)
        yield conds


def ensure_conditionals_dtype(
    conds: Conditionals, t3_dtype: torch.dtype, s3_dtype: torch.dtype, device: torch.device | str
) -> Conditionals:
    """Float conditionals to each consumer's dtype, token prompts to ``long``, all on ``device``:
    new conditionals, ``conds`` left as it was (before 2026-12-07 cast in place: a voice the user
    had set on the wrapped model stayed bfloat16 after the wrapper closed).

    T3's speaker embedding and emotion scalar go to T3's compute dtype (a float32 embedding into a
    float16 ``spkr_enc`` is the "FloatTensor and HalfTensor" error); S3Gen's prompt mel and
    x-vector to S3Gen's. The cached prompt embedding is dropped so T3 recomputes it in its dtype.
    """
    t3 = copy.copy(conds.t3)
    for name in ("speaker_emb", "emotion_adv", "clap_emb"):
        value = getattr(t3, name, None)
        if torch.is_tensor(value):
            setattr(t3, name, value.to(device=device, dtype=t3_dtype))
    if t3.cond_prompt_speech_tokens is not None:
        t3.cond_prompt_speech_tokens = t3.cond_prompt_speech_tokens.to(device=device, dtype=torch.long)
    t3.cond_prompt_speech_emb = None
    return type(conds)(t3, cast_gen(conds.gen, s3_dtype, device))
