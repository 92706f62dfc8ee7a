"""Random-weight builds of the upstream classes (no weights can be downloaded here).

``MODELS`` names each build: the family and the T3 sizes (``None``: full size).

- ``"tiny"``: the same classes with small widths and depths, for tests (builds in seconds);
- ``"deep-narrow"``: T3 at its full depth (30 layers) but 64 wide, with the tiny S3Gen: its decode
  step costs almost only per-layer dispatch overhead on a CPU, as the full model's step does on a
  GPU, so it stands in for a host-bound GPU step on machines without one;
- ``"random"``: the full-size architecture, for realistic compute and memory;
- ``"turbo-tiny"``, ``"turbo-random"``, ``"multilingual-tiny"``, ``"multilingual-random"``: the same
  for the other two families, with the text front ends of ``frontends.py``.

Random weights almost never sample T3's stop token: generation must be capped (see ``generation.py``).
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import chatterbox.models.s3gen.s3gen as s3gen_module
import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.s3gen.decoder import ConditionalDecoder
from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
from chatterbox.models.s3gen.hifigan import HiFTGenerator
from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder
from chatterbox.models.s3gen.xvector import CAMPPlus
from chatterbox.models.s3tokenizer import S3Tokenizer
from chatterbox.models.t3 import T3
from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS
from chatterbox.models.t3.modules.perceiver import Perceiver
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.voice_encoder import VoiceEncoder
from perth.perth_net.perth_net_implicit.model.perth_net import PerthNet
from perth.perth_net.perth_net_implicit.perth_watermarker import PerthImplicitWatermarker
from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization

from ..core.constants import SAMPLE_RATE
from ..core.devices import check_device
from ..core.errors import SourceError, error_line
from ..core.families import FAMILIES, TTSModel
from ..core.patching import scoped_item
from ..core.rng import StreamRandom, drawn_from
from .frontends import check_tokenizer, default_tokenizer, missing_tokens, read_tokenizer


@dataclass(frozen=True)
class TinyConfig:
    """Reduced sizes for the ``tiny`` builds. Same classes as upstream, smaller numbers."""

    t3_layers: int = 2
    t3_hidden: int = 256
    t3_heads: int = 4
    t3_intermediate: int = 512
    flow_blocks: int = 1  # S3Gen conformer encoder; its width (512) is hard-coded upstream
    flow_linear_units: int = 512
    cfm_channels: int = 64
    hift_channels: int = 64
    tokenizer_width: int = 128


TINY = TinyConfig()
# Full T3 depth at a width where each layer's matmuls cost next to nothing: per-token time is
# then the per-layer dispatch overhead, the cost the H200 run found in the full model's step.
DEEP_NARROW = TinyConfig(t3_layers=30, t3_hidden=64, t3_heads=4, t3_intermediate=128)
# The multilingual T3's alignment analyzer reads heads (9, 2), (12, 15) and (13, 11) every step:
# its tiny T3 needs 14 layers of 16 heads.
MULTILINGUAL_TINY = TinyConfig(t3_layers=14, t3_hidden=256, t3_heads=16, t3_intermediate=512)
# S3Gen's HiFT as upstream builds it (but its F0 predictor).
_HIFT: dict[str, Any] = dict(
    sampling_rate=SAMPLE_RATE,
    upsample_rates=[8, 5, 3],
    upsample_kernel_sizes=[16, 11, 7],
    source_resblock_kernel_sizes=[7, 7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
)
TINY_BACKBONES = {"Llama_520M": "Llama_tiny", "GPT2_medium": "GPT2_tiny"}
# Every random-weight build: name -> (family, T3 sizes; None = full size).
MODELS: dict[str, tuple[str, TinyConfig | None]] = {
    "tiny": ("standard", TINY),
    "deep-narrow": ("standard", DEEP_NARROW),
    "random": ("standard", None),
    "turbo-tiny": ("turbo", TINY),
    "turbo-random": ("turbo", None),
    "multilingual-tiny": ("multilingual", MULTILINGUAL_TINY),
    "multilingual-random": ("multilingual", None),
}
SIZES = tuple(MODELS)

# transformers' no_init_weights swaps torch.nn.init's functions for no-ops in the whole process
# (restoring, on exit, what it found on entry), and a tiny S3Gen's build swaps the part classes
# upstream's S3Gen module builds with: a model built in another thread meanwhile would get no
# init, or tiny parts. Every construction of the workbench holds this lock, upstream's
# from_pretrained too (sources.load_pretrained), which also keeps a build's entry in upstream's
# LLAMA_CONFIGS its own; reentrant, for the no-init block inside a build. It cannot guard a
# user's own construction in another thread, nor keep other threads' draws off the global
# generator: a construction takes its own.
CONSTRUCTION = threading.RLock()


@contextmanager
def no_init() -> Iterator[None]:
    """transformers' ``no_init_weights`` (modules built inside are left uninitialised), entered by
    one thread at a time and never while another thread builds a model."""
    from transformers.initialization import no_init_weights

    with CONSTRUCTION, no_init_weights():
        yield


@contextmanager
def own_random_state(seed: int = 0) -> Iterator[None]:
    """A construction in one thread at a time, every draw in it from its own generator seeded
    ``seed``, as after ``torch.manual_seed(seed)``: its weights are the seed's whatever other
    threads draw meanwhile, and the global generator is neither drawn from nor put back (before
    2026-12-05 it was seeded and restored, which rewound other threads' draws)."""
    with CONSTRUCTION, StreamRandom(seed).drawing_all():
        yield


def _backbone_config(name: str, cfg: TinyConfig) -> dict[str, Any]:
    """Upstream's backbone config ``name`` at the sizes of ``cfg``."""
    if name == "GPT2_medium":
        # GPT-2's own token embedding (wte) is never used by T3: a small vocabulary keeps it small.
        return {
            **GPT2_MEDIUM_CONFIG,
            **{"n_embd": cfg.t3_hidden, "hidden_size": cfg.t3_hidden, "n_head": cfg.t3_heads},
            **{"n_layer": cfg.t3_layers, "n_inner": cfg.t3_intermediate, "vocab_size": 256},
        }
    return {
        **LLAMA_CONFIGS[name],
        "hidden_size": cfg.t3_hidden,
        "intermediate_size": cfg.t3_intermediate,
        "num_hidden_layers": cfg.t3_layers,
        "num_attention_heads": cfg.t3_heads,
        "num_key_value_heads": cfg.t3_heads,
        "head_dim": cfg.t3_hidden // cfg.t3_heads,
    }


def _hp(family: str) -> T3Config:
    """The T3 settings each family's upstream ``from_local`` builds T3 with."""
    if family == "multilingual":
        return T3Config.multilingual()
    if family == "turbo":  # as ChatterboxTurboTTS.from_local sets them, inline, before T3(hp)
        hp = T3Config(text_tokens_dict_size=50276)
        hp.llama_config_name = "GPT2_medium"
        hp.speech_tokens_dict_size = 6563
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
        return hp
    return T3Config.english_only()


def build_t3(family: str, cfg: TinyConfig | None) -> T3:
    """The family's T3, full size or at ``cfg``'s sizes (GPT-2's unused wte still attached)."""
    hp = _hp(family)
    if cfg is None:
        return T3(hp)
    full = hp.llama_config_name
    hp.llama_config_name = TINY_BACKBONES[full]
    # T3 reads the backbone size from upstream's LLAMA_CONFIGS by name (only while it is built),
    # so the small backbone is registered there for the construction and removed again.
    with scoped_item(LLAMA_CONFIGS, hp.llama_config_name, _backbone_config(full, cfg)):
        t3 = T3(hp)
    if hp.use_perceiver_resampler:  # the Perceiver hard-codes width 1024: rebuild it at ours
        t3.cond_enc.perceiver = Perceiver(
            pre_attention_query_size=cfg.t3_hidden, embedding_dim=cfg.t3_hidden, num_attn_heads=4
        )
    return t3


def _tiny_parts(cfg: TinyConfig) -> dict[str, Callable[..., Any]]:
    """What S3Gen's constructor builds its parts with, by the names it calls, building them at
    ``cfg``'s sizes (until 2026-12-07 a whole full-size S3Gen was built first and its parts
    replaced: ~0.5 s of each build, 0.35 s of it saved here)."""

    def tokenizer(name: str) -> S3Tokenizer:
        _skeleton_draws()
        with no_init():
            tok = S3Tokenizer(name)  # its mel front end is kept, its encoder and quantizer are ours
        tok.encoder = AudioEncoderV2(128, cfg.tokenizer_width, 2, 1, 2, False)
        tok.quantizer = FSQVectorQuantization(cfg.tokenizer_width, 3**8)
        return tok

    return {
        "S3Tokenizer": tokenizer,
        "CAMPPlus": lambda **_: CAMPPlus(growth_rate=16, init_channels=32, memory_efficient=False),
        # the encoder's width (512) is hard-coded upstream; its depth and feed-forward are ours
        "UpsampleConformerEncoder": lambda **_: UpsampleConformerEncoder(
            input_size=512,
            output_size=512,
            attention_heads=4,
            linear_units=cfg.flow_linear_units,
            num_blocks=cfg.flow_blocks,
            use_cnn_module=False,
            macaron_style=False,
        ),
        "ConditionalDecoder": lambda meanflow, **_: ConditionalDecoder(
            in_channels=320,
            out_channels=80,
            causal=True,
            channels=[cfg.cfm_channels],
            attention_head_dim=32,
            n_blocks=1,
            num_mid_blocks=1,
            num_heads=2,
            meanflow=meanflow,
        ),
        "ConvRNNF0Predictor": lambda: ConvRNNF0Predictor(cond_channels=cfg.hift_channels),
        "HiFTGenerator": lambda **kw: HiFTGenerator(**kw, base_channels=cfg.hift_channels),
    }


# The generator's state after the skeleton's draws, by the device, the default dtype (how far a
# draw moves a generator depends on both) and the state before: at most a few dozen a process (one
# per model size and weight seed it builds), 10 KB each on the CPU.
_AFTER_SKELETON: dict[tuple[str, torch.dtype, bytes], torch.Tensor] = {}


def _skeleton_draws() -> None:
    """Advance the construction's generator past the draws a full-size HiFT's construction makes.
    The full-size skeleton tiny builds replaced made them (hifigan's ``init_weights`` draws with
    ``Tensor.normal_``, which ``no_init`` leaves alone): each seed's weights stay those of the runs
    before. A build from a state seen before (the same size and seed) sets the state the draws
    left instead of making them again: a tiny build 0.53 -> 0.40 s (2026-12-07, minimum of 12;
    docs/measurements.md). Under ``CONSTRUCTION``, as every build."""
    device = torch.get_default_device()  # where the skeleton's weights, and so its draws, are made
    if device.type not in ("cpu", "cuda"):  # meta draws nothing; another device's generator is not ours
        with no_init():
            HiFTGenerator(**_HIFT, f0_predictor=ConvRNNF0Predictor())
        return
    generator = drawn_from(device)
    key = (str(device), torch.get_default_dtype(), generator.get_state().numpy().tobytes())
    if key not in _AFTER_SKELETON:
        with no_init():
            HiFTGenerator(**_HIFT, f0_predictor=ConvRNNF0Predictor())
        if len(_AFTER_SKELETON) >= 64:
            del _AFTER_SKELETON[next(iter(_AFTER_SKELETON))]
        _AFTER_SKELETON[key] = generator.get_state()
    else:
        generator.set_state(_AFTER_SKELETON[key])


def _tiny_s3gen(cfg: TinyConfig, meanflow: bool = False) -> S3Gen:
    """Upstream's S3Gen constructor, its large parts built at ``cfg``'s sizes (``_tiny_parts``;
    its flow and CFM wrappers as upstream's). It holds ``CONSTRUCTION`` while the parts are
    swapped: no other construction of the workbench sees the small parts."""
    with CONSTRUCTION, ExitStack() as stack:
        for name, factory in _tiny_parts(cfg).items():
            stack.enter_context(scoped_item(vars(s3gen_module), name, factory))
        return S3Gen(meanflow=meanflow)


def build_s3gen(family: str, cfg: TinyConfig | None) -> S3Gen:
    """The family's S3Gen (Turbo's with meanflow), full size or at the S3Gen sizes of ``cfg``
    (every build here keeps ``TinyConfig``'s defaults for them)."""
    meanflow = family == "turbo"
    return S3Gen(meanflow=meanflow) if cfg is None else _tiny_s3gen(cfg, meanflow)


@functools.cache
def _perth_net() -> PerthNet:
    """The PerthNet upstream's watermarker loads from perth's package files: loaded once."""
    return PerthImplicitWatermarker().perth_net


def _watermarker() -> PerthImplicitWatermarker:
    """Upstream's watermarker (``perth.PerthImplicitWatermarker()``) with its own copy of the
    PerthNet loaded once (a load, 0.1-0.2 s, was a sixth of a tiny build). A load drew the
    network's initialisation from the build's generator after every weight of the model, then
    overwrote it with the file's: every build's weights stay as they were."""
    return PerthImplicitWatermarker(run_name=None, perth_net=copy.deepcopy(_perth_net()))


# ``perth`` as upstream's model constructors see it while ``assemble`` runs one: the only name they
# read from it is the watermarker's.
_PERTH_SEEN = SimpleNamespace(PerthImplicitWatermarker=_watermarker)


def assemble(
    family: str, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer: Any, dev: torch.device
) -> TTSModel:
    """The family's upstream model of these parts on ``dev``, as its ``from_local`` assembles them."""
    check_tokenizer(tokenizer, t3.hp.text_tokens_dict_size)
    if family == "turbo" and hasattr(t3.tfmr, "wte"):
        del t3.tfmr.wte  # as upstream from_local: T3 embeds text itself
    cls = FAMILIES[family].model_class
    # Swapped in the constructor's own module only: perth itself, and a user's calls of it, untouched.
    with CONSTRUCTION, scoped_item(vars(sys.modules[cls.__module__]), "perth", _PERTH_SEEN):
        model: TTSModel = cls(t3.to(dev).eval(), s3gen.to(dev).eval(), ve.to(dev).eval(), tokenizer, str(dev))
    return model


def _cached_tokenizer(family: str) -> Any:
    """The family's text front end from the cache (``default_tokenizer``, written there if missing).
    One the build cannot use is named, to be deleted and written again: a file that cannot be read
    (upstream EnTokenizer's check of [START]/[STOP] is a bare assert, with no message), or another
    family's file under this family's name, which can load and read text with the other's ids."""
    path = default_tokenizer(family)
    try:
        tokenizer = read_tokenizer(family, path)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON, transformers others
        raise _stale(path, f"cannot be read ({error_line(e, named=False)})") from e
    lacks = missing_tokens(family, tokenizer)
    if lacks is not None:
        raise _stale(path, f"has no {lacks}: another family's tokenizer?")
    try:
        check_tokenizer(tokenizer, _hp(family).text_tokens_dict_size)
    except SourceError as e:  # without its fix (the files saved with the weights): a build has none
        raise _stale(path, f"does not fit T3 ({str(e).split(';')[0]})") from e
    return tokenizer


def _stale(path: Path, why: str) -> SourceError:
    """The refusal of the cached tokenizer ``path``, ``why``, with the fix."""
    return SourceError(f"the cached tokenizer {path} {why}: delete it; the next build writes it again")


def build_model(size: str, device: str = "cpu", seed: int = 0) -> TTSModel:
    """A random-weight model of one of ``MODELS`` (family and sizes by name)."""
    if size not in MODELS:
        raise SourceError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    dev = check_device(device)
    family, cfg = MODELS[size]
    tokenizer = _cached_tokenizer(family)
    # Seeded weights (the watermarker upstream's constructor builds draws too).
    with own_random_state(seed):
        t3, s3gen = build_t3(family, cfg), build_s3gen(family, cfg)
        return assemble(family, t3, s3gen, VoiceEncoder(), tokenizer, dev)
