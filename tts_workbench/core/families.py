"""The three text-to-speech model families of chatterbox-tts 0.1.7, and what differs between them
where the workbench looks.

- ``standard``: ``ChatterboxTTS`` (``tts.py``): Llama-520M T3 with classifier-free guidance (a
  batch of two), S3Gen with 10 CFM steps, the English character tokenizer.
- ``turbo``: ``ChatterboxTurboTTS`` (``tts_turbo.py``): a GPT-2 medium T3 without guidance
  (``T3.inference_turbo``, top-k sampling), ``S3Gen(meanflow=True)`` with 2 CFM steps, a GPT-2
  tokenizer.
- ``multilingual``: ``ChatterboxMultilingualTTS`` (``mtl_tts.py``): the Llama T3 with a 2454-entry
  grapheme vocabulary for 23 languages (``MTLTokenizer``), guided like the standard model, plus an
  alignment analyzer inside ``T3.inference`` that reads three heads' attention every step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import pandas as pd
from chatterbox import mtl_tts, tts, tts_turbo
from chatterbox.mtl_tts import SUPPORTED_LANGUAGES, ChatterboxMultilingualTTS
from chatterbox.tts import ChatterboxTTS
from chatterbox.tts_turbo import ChatterboxTurboTTS
from torch import nn

from .constants import UPSTREAM_GENERATE_CAP
from .errors import ConfigError

# Any of the three upstream model classes (they share t3, s3gen, ve, tokenizer, conds, generate).
TTSModel: TypeAlias = ChatterboxTTS | ChatterboxTurboTTS | ChatterboxMultilingualTTS


@dataclass(frozen=True)
class Family:
    """What one family's upstream class loads and runs."""

    name: str
    model_class: type
    conditionals: type  # the family's own (identical) Conditionals class, for conds.pt
    repo: str  # the hub repository upstream from_pretrained downloads
    files: tuple[str, ...]  # upstream from_local's layout: ve, t3, s3gen weights, text front end
    t3_inference: str  # the T3 method upstream generate calls
    backbone: str
    guidance: bool  # classifier-free guidance: T3 runs a batch of two
    cfm_steps: int  # S3Gen flow-matching steps per call
    sampling: dict[str, float]  # upstream generate's default sampling arguments
    # sampling arguments upstream generate takes and ignores (with a logged warning): Turbo's
    ignored: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        """T3's batch rows per generation: two with guidance (conditioned and unconditioned), else one."""
        return 2 if self.guidance else 1

    @property
    def upstream_cap(self) -> int:
        """The most tokens upstream ``generate`` samples: its hard-coded 1000 (``max_new_tokens``;
        Turbo's ``max_gen_len``, after one token from the prefill: 1001)."""
        return UPSTREAM_GENERATE_CAP + 1 if self.name == "turbo" else UPSTREAM_GENERATE_CAP

    def sampling_with(self, overrides: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Upstream generate's sampling defaults under ``overrides``: the guidance weight apart
        (0 for a family without guidance, whose generate has none), then the rest
        (temperature, top_p, ...). An argument the family does not take, or no number, is refused
        (``check_sampling_keys``, ``ConfigError``)."""
        self.check_sampling_keys(overrides)
        sampling = {**self.sampling, **overrides}
        cfg_weight = _number("cfg_weight", sampling.pop("cfg_weight", 0.0), float)
        # transformers' warpers check types: TopK wants an int, Temperature a float (2 fails)
        typed = {k: _number(k, v, int if k == "top_k" else float) for k, v in sampling.items()}
        return (cfg_weight if self.guidance else 0.0), typed

    def check_sampling_keys(self, sampling: Iterable[str], *, ignored: bool = True) -> None:
        """Refuse arguments this family's sampling does not take, naming them and those it takes:
        a misspelled or misplaced one (``language``) would otherwise be read as a number or dropped.
        ``ignored``: take those upstream ``generate`` takes and ignores (``Family.ignored``), as it
        does; without, they are refused with the reason."""
        accepted = {*self.sampling, *(self.ignored if ignored else ())}
        unknown = sorted(set(sampling) - accepted)
        if not unknown:
            return
        hints = []
        if "exaggeration" in unknown:
            hints.append(
                "exaggeration is set when the voice is prepared: prepare_voice(tts, wav, exaggeration=...) "
                "or tts.prepare_conditionals(wav, exaggeration=...)"
            )
        if set(self.ignored) & set(unknown):
            hints.append(
                f"the {self.name} model samples without {' or '.join(self.ignored)}"
                + ("" if self.guidance else " (it has no classifier-free guidance)")
                + ": upstream ignores them, leave them out"
            )
        names = ", ".join(map(repr, unknown))
        raise ConfigError(
            f"unknown sampling argument {names} for the {self.name} model: use {', '.join(sorted(accepted))}"
            + "".join(f"; {hint}" for hint in hints)
        )


def _number(name: str, value: Any, kind: type[int] | type[float]) -> int | float:
    """A sampling argument's ``value`` as ``kind``; refused naming it where it is no number."""
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # int() of an infinity overflows
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


FAMILIES = {
    "standard": Family(
        "standard",
        ChatterboxTTS,
        tts.Conditionals,
        tts.REPO_ID,
        ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json"),
        "inference",
        "Llama",
        True,
        10,
        {"temperature": 0.8, "repetition_penalty": 1.2, "min_p": 0.05, "top_p": 1.0, "cfg_weight": 0.5},
    ),
    "turbo": Family(
        "turbo",
        ChatterboxTurboTTS,
        tts_turbo.Conditionals,
        tts_turbo.REPO_ID,
        (
            "ve.safetensors",
            "t3_turbo_v1.safetensors",
            "s3gen_meanflow.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ),
        "inference_turbo",
        "GPT-2",
        False,
        2,
        {"temperature": 0.8, "repetition_penalty": 1.2, "top_p": 0.95, "top_k": 1000},
        ("cfg_weight", "min_p"),
    ),
    "multilingual": Family(
        "multilingual",
        ChatterboxMultilingualTTS,
        mtl_tts.Conditionals,
        mtl_tts.REPO_ID,
        ("ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json"),
        "inference",
        "Llama",
        True,
        10,
        {"temperature": 0.8, "repetition_penalty": 2.0, "min_p": 0.05, "top_p": 1.0, "cfg_weight": 0.5},
    ),
}

# Languages whose upstream text front end needs a package of its own. Upstream logs a warning and
# skips the step when it is missing (Japanese kanji stay unread, Hebrew without vowels, ...), which
# changes the tokens silently; the workbench refuses instead.
LANGUAGE_PACKAGES = {
    "ja": "pykakasi",
    "he": "dicta_onnx",
    "zh": "spacy_pkuseg",
    "ru": "russian_text_stresser",
}


def family_frame() -> pd.DataFrame:
    """The families side by side, one row each: where they differ for the workbench."""
    return pd.DataFrame(
        [
            {
                "family": f.name,
                "class": f.model_class.__name__,
                "backbone": f.backbone,
                "guidance": f.guidance,
                "cfm_steps": f.cfm_steps,
                "t3_call": f"T3.{f.t3_inference}",
                "sampling": " ".join(f"{k}={v:g}" for k, v in f.sampling.items()),
            }
            for f in FAMILIES.values()
        ]
    )


def components(tts: TTSModel) -> dict[str, nn.Module]:
    """The three neural components of a Chatterbox model, by the names used in reports."""
    return {"ve": tts.ve, "t3": tts.t3, "s3gen": tts.s3gen}


def family_of(tts: Any) -> Family:
    """The family of an upstream model object, or of a subclass's (the three upstream classes do
    not derive from one another); refused with the three classes named otherwise."""
    for cls in type(tts).__mro__:
        for family in FAMILIES.values():
            if cls is family.model_class:
                return family
    names = ", ".join(f.model_class.__name__ for f in FAMILIES.values())
    raise ConfigError(f"{type(tts).__name__} is not a Chatterbox model: expected one of {names}")


def language_for(tts: Any, language_id: str | None) -> str | None:
    """The language ``tts`` is asked to speak: for the multilingual model ``language_id`` checked
    (default "en"; ``check_language``, and Chinese refused where ``tts``'s tokenizer lacks
    upstream's Cangjie table), for the others None (they have no language argument)."""
    if family_of(tts).name != "multilingual":
        return None
    language = check_language(language_id or "en")
    if language == "zh" and not tts.tokenizer.cangjie_converter.word2cj:
        # MTLTokenizer fetches it from the hub when built and, failing, passes Chinese through
        # unencoded: other tokens than upstream's, silently.
        raise ConfigError(
            "Chinese (zh) text needs upstream's Cangjie table (Cangjie5_TC.json, in the hub repository "
            "ResembleAI/chatterbox), and this model's tokenizer has none: put the file beside the model "
            "folder's grapheme_mtl_merged_expanded_v1.json (for multilingual-pretrained: in the hub's "
            "cache, as from_pretrained downloads it)"
        )
    return language


def spoken_languages(tts: Any) -> list[str]:
    """The language codes ``tts`` speaks on this machine: ``["en"]`` for the English-only
    families; for the multilingual model each of upstream's 23 that ``language_for`` takes (those
    whose front end needs a package not installed here, or Chinese without its table, left out)."""
    if family_of(tts).name != "multilingual":
        return ["en"]
    spoken = []
    for code in SUPPORTED_LANGUAGES:
        try:
            language_for(tts, code)
        except ConfigError:
            continue
        spoken.append(code)
    return spoken


def check_speaks_languages(family: str, language_id: str | None) -> None:
    """Refuse a ``language_id`` other than English ("en") given to a family that speaks English
    only (upstream's standard and Turbo ``generate`` take none), by the family's name: known
    before a model is built. English is what such a model speaks: asked for, it is no error."""
    if language_id is not None and family != "multilingual" and language_id.lower() != "en":
        raise ConfigError(
            f"the {family} model speaks English only: leave the language out, or use a multilingual "
            "model (multilingual-tiny, multilingual-random, ...)"
        )


def check_language(language_id: str) -> str:
    """``language_id`` lower-cased if the multilingual model speaks it and its text front end can
    run here; otherwise a ConfigError that lists the languages or names the missing package."""
    code = language_id.lower()
    if code not in SUPPORTED_LANGUAGES:
        listing = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_LANGUAGES.items())
        raise ConfigError(f"unsupported language {language_id!r}: the multilingual model speaks {listing}")
    package = LANGUAGE_PACKAGES.get(code)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{SUPPORTED_LANGUAGES[code]} ({code}) text needs the optional package {package!r}, which is not "
            f"installed (upstream would skip that step and change the tokens): pip install {package}"
        )
    return code


def kv_layout(config: Any) -> tuple[int, int]:
    """Key/value heads and head width of a T3 backbone's transformers config: what one cache
    row holds per layer and position (GPT-2, Turbo's backbone, has no grouped keys: as many
    key/value heads as query heads)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(head_dim)
