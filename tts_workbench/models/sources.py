"""Where a Chatterbox model comes from.

Every source returns an upstream model object of one of the three families (``families.py``:
``ChatterboxTTS``, ``ChatterboxTurboTTS``, ``ChatterboxMultilingualTTS``) built from the upstream
classes (T3, S3Gen, VoiceEncoder and the family's text front end). No weights can be downloaded
here, so besides the real loaders (``from_local``/``from_pretrained``) there are random-weight
builds (``MODELS``):

- ``"tiny"``: the same classes with small widths and depths, for tests (builds in seconds);
- ``"deep-narrow"``: T3 at its full depth (30 layers) but 64 wide, with the tiny S3Gen: its decode
  step costs almost only per-layer dispatch overhead on a CPU, as the full model's step does on a
  GPU, so it stands in for a host-bound GPU step on machines without one;
- ``"random"``: the full-size architecture, for realistic compute and memory;
- ``"turbo-tiny"``, ``"turbo-random"``, ``"multilingual-tiny"``, ``"multilingual-random"``: the same
  for the other two families. Their text front ends, which upstream downloads (a GPT-2
  tokenizer, the grapheme vocabulary), are built here deterministically and read by the real
  classes (``AutoTokenizer``, ``MTLTokenizer``).

Random weights almost never sample T3's stop token: generation must be capped (see ``generation.py``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.s3gen.configs import CFM_PARAMS
from chatterbox.models.s3gen.decoder import ConditionalDecoder
from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec
from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM
from chatterbox.models.s3gen.hifigan import HiFTGenerator
from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder
from chatterbox.models.s3gen.xvector import CAMPPlus
from chatterbox.models.t3 import T3
from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS
from chatterbox.models.t3.modules.perceiver import Perceiver
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.tokenizers import EnTokenizer, MTLTokenizer
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.mtl_tts import SUPPORTED_LANGUAGES
from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.constants import SAMPLE_RATE, dtype_name
from ..core.errors import SourceError
from ..core.families import FAMILIES, Family, TTSModel, family_of
from ..core.patching import scoped_item

METADATA_FILE = "tts_workbench.json"
# Below this a reference is refused: at 0.02 s the mel extractor's padding fails, and a prompt of
# a few tokens is no voice (the under-1 s note already says conditioning will suffer).
MIN_REFERENCE_S = 0.5
PT_LAYOUT = ("ve.pt", "t3_cfg.pt", "s3gen.pt", "tokenizer.json")  # chatterbox-streaming fork
# What save_gpt2_tokenizer writes (transformers' save_pretrained, older versions also the last two)
GPT2_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def components(tts: TTSModel) -> dict[str, torch.nn.Module]:
    """The three neural components of a Chatterbox model, by the names used in reports."""
    return {"ve": tts.ve, "t3": tts.t3, "s3gen": tts.s3gen}


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
PRETRAINED = {
    "pretrained": "standard",
    "turbo-pretrained": "turbo",
    "multilingual-pretrained": "multilingual",
}


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


def check_device(device: str) -> torch.device:
    """Return ``torch.device(device)`` or raise SourceError when it cannot run here."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SourceError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
        raise SourceError(
            f"device={device!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"{build}); use device='cpu' or run on a machine with an NVIDIA GPU"
        )
    if dev.type not in ("cpu", "cuda"):
        raise SourceError(f"device {device!r} is not supported: use 'cpu' or 'cuda'")
    return dev


# ---------------------------------------------------------------- random-weight builds


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


def _t3(family: str, cfg: TinyConfig | None) -> T3:
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


def _tiny_s3gen(cfg: TinyConfig, meanflow: bool = False) -> S3Gen:
    # Build the full skeleton without paying for its random init, then replace every large
    # submodule by the same class at a smaller size (initialised normally, from the seed).
    from transformers.initialization import no_init_weights

    with no_init_weights():
        s3 = S3Gen(meanflow=meanflow)
    s3.tokenizer.encoder = AudioEncoderV2(128, cfg.tokenizer_width, 2, 1, 2, False)
    s3.tokenizer.quantizer = FSQVectorQuantization(cfg.tokenizer_width, 3**8)
    s3.speaker_encoder = CAMPPlus(growth_rate=16, init_channels=32, memory_efficient=False)
    encoder = UpsampleConformerEncoder(
        input_size=512,
        output_size=512,
        attention_heads=4,
        linear_units=cfg.flow_linear_units,
        num_blocks=cfg.flow_blocks,
        use_cnn_module=False,
        macaron_style=False,
    )
    estimator = ConditionalDecoder(
        in_channels=320,
        out_channels=80,
        causal=True,
        channels=[cfg.cfm_channels],
        attention_head_dim=32,
        n_blocks=1,
        num_mid_blocks=1,
        num_heads=2,
        meanflow=meanflow,
    )
    s3.flow = CausalMaskedDiffWithXvec(
        encoder=encoder,
        decoder=CausalConditionalCFM(spk_emb_dim=80, cfm_params=CFM_PARAMS, estimator=estimator),
    )
    s3.mel2wav = HiFTGenerator(
        sampling_rate=SAMPLE_RATE,
        base_channels=cfg.hift_channels,
        upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7],
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        f0_predictor=ConvRNNF0Predictor(cond_channels=cfg.hift_channels),
    )
    return s3


def _s3gen(family: str, cfg: TinyConfig | None) -> S3Gen:
    """The family's S3Gen (Turbo's with meanflow), full size or tiny (the tiny sizes of ``TINY``)."""
    meanflow = family == "turbo"
    return S3Gen(meanflow=meanflow) if cfg is None else _tiny_s3gen(TINY, meanflow)


def build_tokenizer_json(path: Path) -> Path:
    """Write a character-level ``tokenizer.json`` that upstream ``EnTokenizer`` can read.

    Ids follow upstream conventions: ``[STOP]`` = 0 and ``[START]`` = 255 (T3Config's stop and
    start text tokens), every id below T3's text vocabulary of 704.
    """
    chars = [chr(c) for c in range(33, 127)] + list("àâçéèêëîïôûùüÿñæœ’“”—–…")
    return _save_char_tokenizer(path, chars, [])


def build_grapheme_vocab(path: Path) -> Path:
    """Write a grapheme vocabulary that upstream ``MTLTokenizer`` reads in place of
    ``grapheme_mtl_merged_expanded_v1.json``: the same special tokens and ids as the English one
    (``[STOP]`` 0, ``[START]`` 255), one token per language (``[fr]``, ...), and the characters
    of the 23 languages' scripts after NFKD decomposition (Latin, combining accents, Greek,
    Cyrillic, Hebrew, Arabic, Devanagari, kana, Hangul jamo), all below T3's 2454 text ids."""
    blocks = [(0x21, 0x7F), (0xC0, 0x250), (0x300, 0x370), (0x370, 0x400), (0x400, 0x500)]
    blocks += [(0x590, 0x600), (0x600, 0x700), (0x900, 0x980), (0x1100, 0x1200), (0x3040, 0x3100)]
    chars = [chr(c) for lo, hi in blocks for c in range(lo, hi) if chr(c).isprintable()]
    return _save_char_tokenizer(path, chars, [f"[{code}]" for code in SUPPORTED_LANGUAGES])


def _save_char_tokenizer(path: Path, chars: list[str], languages: list[str]) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    specials = ["[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"]
    first = chars[: 255 - len(specials)]  # ids below [START]=255, then the rest after it
    tokens = specials + first + [f"[unused{i}]" for i in range(len(specials) + len(first), 255)]
    tokens += ["[START]", *languages, *chars[len(first) :]]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}  # no holes in the id space
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Split("", behavior="isolated")  # one token per character
    tok.add_special_tokens(specials + ["[START]", *languages])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def build_gpt2_tokenizer(folder: Path) -> Path:
    """Write a GPT-2 style tokenizer (byte-level BPE: 256 byte tokens, no merges, and GPT-2's
    ``<|endoftext|>``), which transformers' ``AutoTokenizer.from_pretrained`` reads as upstream
    Turbo reads its own (files: ``save_gpt2_tokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return save_gpt2_tokenizer(tok, folder)


def save_gpt2_tokenizer(tok: Any, folder: Path) -> Path:
    """Write a byte-level BPE ``tokenizers.Tokenizer`` as upstream's published Turbo folder has
    it: ``tokenizer_config.json`` naming ``GPT2Tokenizer`` (a class every transformers version
    knows; transformers 5's generic ``TokenizersBackend`` is unknown to the 4.46 that
    chatterbox-tts pins), ``tokenizer.json``, and ``vocab.json`` + ``merges.txt`` for the slow
    tokenizer of older versions."""
    from transformers import GPT2Tokenizer

    eos = "<|endoftext|>"
    GPT2Tokenizer(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos).save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)  # transformers 5's own key: older versions pass it on as a kwarg
    config_path.write_text(json.dumps(config | {"tokenizer_class": "GPT2Tokenizer"}, indent=2))
    model = json.loads(tok.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    return folder


def _read_tokenizer(family: str, path: Path) -> Any:
    """The family's upstream text front end, read from ``path`` (a file, or Turbo's folder)."""
    if family == "turbo":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:  # as upstream from_local
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if family == "multilingual":
        from huggingface_hub import constants

        # MTLTokenizer fetches a Chinese mapping from the hub and warns when it (or the Chinese
        # segmenter) is missing: offline, fail at once and quietly; families.check_language
        # refuses Chinese without its segmenter instead.
        log = logging.getLogger("chatterbox.models.tokenizers.tokenizer")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with _offline(constants):
                return MTLTokenizer(str(path))
        finally:
            log.setLevel(level)
    return EnTokenizer(str(path))


def _vocab(tokenizer: Any) -> dict[str, int]:
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # EnTokenizer / MTLTokenizer wrap one
    vocab: dict[str, int] = inner.get_vocab()
    return vocab


def _assemble(
    family: str, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer: Any, dev: torch.device
) -> TTSModel:
    _check_tokenizer(tokenizer, t3.hp.text_tokens_dict_size)
    if family == "turbo" and hasattr(t3.tfmr, "wte"):
        del t3.tfmr.wte  # as upstream from_local: T3 embeds text itself
    cls = FAMILIES[family].model_class
    model: TTSModel = cls(t3.to(dev).eval(), s3gen.to(dev).eval(), ve.to(dev).eval(), tokenizer, str(dev))
    return model


def _beside(path: Path, tag: str) -> Path:
    """A hidden name next to ``path``, unique to this process and thread."""
    return path.with_name(f".{path.name}.{tag}.{os.getpid()}.{threading.get_ident()}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _cached(path: Path, build: Callable[[Path], Path]) -> Path:
    """``path``, built by ``build`` on first use. Built beside it and renamed: another process
    (test workers on a fresh machine) sees it whole or not at all, and an interrupted build
    leaves nothing behind."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _beside(path, "partial")
    try:
        build(partial)
        os.replace(partial, path)
    except OSError:
        if not path.exists():
            raise
        # else a second process got there first (a folder, Turbo's, cannot replace another)
    finally:
        _remove(partial)
    return path


def _default_tokenizer(family: str) -> Path:
    cache = Path(os.environ.get("TTS_WORKBENCH_CACHE", Path.home() / ".cache" / "tts_workbench"))
    if family == "turbo":
        return _cached(cache / "gpt2_tokenizer", build_gpt2_tokenizer)
    if family == "multilingual":
        return _cached(cache / FAMILIES["multilingual"].files[3], build_grapheme_vocab)
    return _cached(cache / "tokenizer.json", build_tokenizer_json)


def build_model(size: str, device: str = "cpu", seed: int = 0) -> TTSModel:
    """A random-weight model of one of ``MODELS`` (family and sizes by name)."""
    if size not in MODELS:
        raise SourceError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    dev = check_device(device)
    family, cfg = MODELS[size]
    path = _default_tokenizer(family)
    try:
        tokenizer = _read_tokenizer(family, path)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON, transformers others
        raise SourceError(
            f"the cached tokenizer {path} cannot be read ({str(e).strip().splitlines()[0]}): "
            "delete it; the next build writes it again"
        ) from e
    # Seeded weights (the watermarker upstream's constructor builds draws too); the caller's
    # random state is left as it was.
    with torch.random.fork_rng(devices=[]):  # the weights are made on the CPU, then moved
        torch.default_generator.manual_seed(seed)
        return _assemble(family, _t3(family, cfg), _s3gen(family, cfg), VoiceEncoder(), tokenizer, dev)


# ---------------------------------------------------------------- checkpoint folders


def save_checkpoint(tts: TTSModel, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``tts`` in its family's upstream ``from_local`` layout, floating tensors cast to
    ``dtype`` (the voice, ``conds.pt``, always float32). A ``tts_workbench.json`` beside the
    weights names the family, the architecture and each file's dtype.

    The files go into a new folder that then replaces ``folder`` whole: interrupted, ``folder``
    is still the previous checkpoint (or absent), never a mix of two. A folder holding anything
    but a previous checkpoint (files its save did not write) is refused rather than replaced.
    What a save killed outright left beside the folder is cleared first: a half-written new
    folder is deleted, a previous checkpoint moved aside is put back (or deleted, if the folder
    is there)."""
    folder = Path(folder)
    real = folder.resolve()  # a link to a folder: the folder it names is replaced
    _sweep_stale(real)
    _check_replaceable(folder, real)
    real.parent.mkdir(parents=True, exist_ok=True)
    partial = _beside(real, "partial")
    try:
        partial.mkdir()
        _write_checkpoint(tts, partial, dtype)
        _check_replaceable(folder, real)  # again: a file may have been added meanwhile
        _replace_folder(partial, real)
    finally:
        _remove(partial)  # there only if the save failed
    return folder


def _saved_names(folder: Path) -> set[str]:
    """The names a save wrote into checkpoint ``folder``: its metadata's ``files``, or for a
    checkpoint written before that was recorded, every name any save writes."""
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    files = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return {*files, METADATA_FILE}
    every = {name for f in FAMILIES.values() for name in f.files}
    return every | {*PT_LAYOUT, *GPT2_TOKENIZER_FILES, "conds.pt", METADATA_FILE}


def _check_replaceable(folder: Path, real: Path) -> None:
    """Refuse to replace ``real`` unless it is absent, an empty folder, or a checkpoint that
    holds only what its save wrote."""
    if not real.exists():
        return
    if not (real / METADATA_FILE).exists():
        if real.is_file() or any(real.iterdir()):
            raise SourceError(
                f"{folder} is neither an empty folder nor a checkpoint written by save_checkpoint() "
                f"(it has no {METADATA_FILE}); a save replaces the whole folder: give a new or empty folder"
            )
        return
    known = _saved_names(real)
    other = sorted(p.name for p in real.iterdir() if p.name not in known)
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise SourceError(
            f"{folder} holds {', '.join(other[:3])}{more}, which save_checkpoint() did not write; "
            "a save replaces the whole folder, deleting them: move them out or give another folder"
        )


_STALE = re.compile(r"\.(partial|old)\.(\d+)\.\d+")


def _dead(pid: int) -> bool:
    """Whether no process ``pid`` runs (only on POSIX, where signal 0 only probes)."""
    if os.name != "posix" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def _stale_siblings(real: Path, tag: str) -> list[Path]:
    """``_beside(real, tag)`` folders left by processes no longer running, newest first."""
    prefix = f".{real.name}"
    found = []
    try:
        entries = list(real.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _STALE.fullmatch(p.name[len(prefix) :]) if p.name.startswith(prefix) else None
        if m and m.group(1) == tag and _dead(int(m.group(2))):
            found.append(p)
    return sorted(found, key=lambda p: p.lstat().st_mtime, reverse=True)


def _sweep_stale(real: Path) -> None:
    """Clear what saves killed outright (SIGKILL, out of memory) left beside ``real``."""
    for partial in _stale_siblings(real, "partial"):
        _remove(partial)
    for old in _stale_siblings(real, "old"):
        if not real.exists() and not real.is_symlink():
            logging.getLogger(__name__).warning("putting back %s, left aside by an interrupted save", old)
            old.rename(real)
        else:
            _remove(old)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """A tensor on the CPU, floating point cast to ``dtype``; anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()


def _write_checkpoint(tts: TTSModel, folder: Path, dtype: torch.dtype) -> None:
    family = family_of(tts)
    parts = dict(zip(family.files[:3], (tts.ve, tts.t3, tts.s3gen), strict=True))
    for name, module in parts.items():
        state = {
            k: _cast(v, dtype)
            for k, v in module.state_dict().items()
            # After a first inference upstream T3 keeps `patched_model`, a second view of the
            # same weights; upstream checkpoints do not contain it.
            if not k.startswith("patched_model.")
        }
        if module is tts.t3 and family.name == "turbo":
            # Upstream Turbo loads GPT-2's wte (strictly) and then deletes it: write one, unused.
            cfg = tts.t3.cfg
            state["tfmr.wte.weight"] = torch.zeros(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        if name.endswith(".pt"):
            torch.save(state, folder / name)
        else:
            save_file(state, str(folder / name))
    if family.name == "turbo":
        save_gpt2_tokenizer(tts.tokenizer.backend_tokenizer, folder)
    else:
        tts.tokenizer.tokenizer.save(str(folder / family.files[3]))
    if tts.conds is not None:  # float32: upstream's pipeline runs a voice only in float32
        conds: Any = tts.conds
        t3 = replace(conds.t3, **{k: _cast(v, torch.float32) for k, v in vars(conds.t3).items()})
        type(conds)(t3, {k: _cast(v, torch.float32) for k, v in conds.gen.items()}).save(folder / "conds.pt")
    tiny = tts.t3.hp.llama_config_name in TINY_BACKBONES.values()
    meta = {
        "family": family.name,
        "architecture": "tiny" if tiny else "full",
        "tiny_config": asdict(_config_of(tts.t3)),
        "dtypes": {Path(name).stem: dtype_name(dtype) for name in parts},
        # what a later save may delete: anything else in the folder makes it refuse
        "files": sorted({*(p.name for p in folder.iterdir()), METADATA_FILE}),
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2))


def _replace_folder(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``; an existing ``folder`` is moved aside first and deleted
    after (put back if the rename fails)."""
    if not folder.exists():
        new.rename(folder)
        return
    old = _beside(folder, "old")
    folder.rename(old)
    try:
        new.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    # Unlinked files stay readable where they are mapped (safetensors maps what it loads), so a
    # model loaded from this folder and saved back into it keeps its weights.
    shutil.rmtree(old)


def _config_of(t3: T3) -> TinyConfig:
    """The TinyConfig a small T3 was built with (its S3Gen sizes are always ``TINY``'s)."""
    c = t3.cfg
    return TinyConfig(
        t3_layers=c.num_hidden_layers,
        t3_hidden=c.hidden_size,
        t3_heads=c.num_attention_heads,
        t3_intermediate=getattr(c, "intermediate_size", None)
        or getattr(c, "n_inner", None)
        or 4 * c.hidden_size,
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        # torch's unpickling message advises weights_only=False, unsafe for a file that is damaged
        why = "it holds no plain tensors" if isinstance(e, pickle.UnpicklingError) else str(e)
        raise SourceError(
            f"cannot read {path.name} in {path.parent}: {why}. The file is truncated or not a "
            "checkpoint; copy it again or re-export it with save_checkpoint()"
        ) from e


def _check_tokenizer(tok: Any, vocab: int) -> None:
    top = max(_vocab(tok).values())
    if top >= vocab:
        raise SourceError(
            f"the tokenizer has token id {top}, but T3's text vocabulary has {vocab} entries "
            f"(ids 0..{vocab - 1}); use the tokenizer files that were saved with these weights"
        )


def _folder_family(folder: Path) -> tuple[Family, tuple[str, ...], dict[str, Any]]:
    """The folder's family, the files of its layout and its metadata. The family is the one its
    ``tts_workbench.json`` records; without one (upstream's own layout), the one whose T3 file
    is there."""
    if folder.is_file():
        raise SourceError(f"model folder {folder} is a file; give the folder that holds it ({folder.parent})")
    if not folder.is_dir():
        aside = _stale_siblings(folder.resolve(), "old")
        if aside:
            raise SourceError(
                f"model folder {folder} does not exist, but a save interrupted before it finished "
                f"left the previous checkpoint in {aside[0]}: rename it to {folder.name} "
                f"(mv '{aside[0]}' '{folder}'), or save to {folder} again, which puts it back first"
            )
        raise SourceError(
            f"model folder {folder} does not exist: give a folder written by save_checkpoint() "
            "or by an upstream from_local layout"
        )
    meta_path = folder / METADATA_FILE
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    recorded = meta.get("family")
    if recorded is not None and recorded not in FAMILIES:
        raise SourceError(
            f"{meta_path} records an unknown family {recorded!r} (known: {', '.join(FAMILIES)}): "
            "save the model again with save_checkpoint()"
        )
    layouts = [(f, f.files) for f in FAMILIES.values()] + [(FAMILIES["standard"], PT_LAYOUT)]
    # Files of another family copied in do not decide: the recorded family's own are read.
    layouts = [(f, files) for f, files in layouts if recorded in (None, f.name)]
    present = [(f, files) for f, files in layouts if (folder / files[1]).exists()]
    if not present and recorded is None:
        expected = "; ".join(f"{f.name}: {', '.join(f.files)}" for f in FAMILIES.values())
        raise SourceError(f"model folder {folder} holds no T3 weights of any family ({expected})")
    family, files = (present or layouts)[0]
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        recorded_by = f" (the family its {METADATA_FILE} records)" if recorded else ""
        raise SourceError(
            f"{family.name} model folder {folder} is missing {', '.join(missing)}{recorded_by}: "
            "copy them in, or save the model again with save_checkpoint()"
        )
    return family, files, meta


def load_folder(
    folder: str | Path, device: str = "cpu", keep_dtype: bool = True, family: str | None = None
) -> TTSModel:
    """Load a checkpoint folder of any family (safetensors, or the fork's ``.pt`` layout).

    The family is the one ``tts_workbench.json`` records, or for a folder without one (upstream's
    own layout) the one whose T3 file is there; ``family`` refuses a folder of another one.
    ``keep_dtype=True`` keeps each tensor's saved dtype (a float16 file stays float16).
    ``keep_dtype=False`` loads the way upstream ``from_local`` does: ``load_state_dict`` copies
    into freshly built float32 parameters, so a float16 checkpoint silently comes back as float32.
    """
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    dev = check_device(device)
    found, layout, meta = _folder_family(folder)
    if family is not None and family != found.name:
        raise SourceError(
            f"model folder {folder} holds a {found.name} model ({layout[1]}), not a {family} one: "
            f"load it as {found.name}"
        )
    architecture = meta.get("architecture", "full")
    states = {name: _read_state(folder / name) for name in layout[:3]}
    cfg = TinyConfig(**meta.get("tiny_config", {})) if architecture == "tiny" else None
    with no_init_weights():  # every weight is overwritten below
        t3, s3gen, ve = _t3(found.name, cfg), _s3gen(found.name, cfg), VoiceEncoder()
    t3_state: Any = states[layout[1]]
    if "model" in t3_state:  # upstream from_local accepts this wrapped form too
        t3_state = t3_state["model"][0]
    missing: list[str] = []  # only S3Gen's: the strict loads raise
    for module, state, strict in (
        (ve, states[layout[0]], True),
        (t3, t3_state, True),
        (s3gen, states[layout[2]], False),
    ):
        try:
            missing += module.load_state_dict(state, strict=strict, assign=keep_dtype).missing_keys
        except RuntimeError as e:
            raise SourceError(
                f"weights in {folder} do not fit the {found.name} {architecture} architecture: "
                f"{str(e).splitlines()[0]}"
            ) from e
    # S3Gen loads non-strictly as upstream's does, for the buffers upstream's own files may lack
    # (rebuilt by the constructor); any other missing weight would stay uninitialised memory.
    missing = [k for k in missing if k not in S3Gen.ignore_state_dict_missing]
    if missing:
        raise SourceError(
            f"{layout[2]} in {folder} lacks {len(missing)} of S3Gen's tensors ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): the file is incomplete; copy it again or "
            "re-export it with save_checkpoint()"
        )
    tokenizer = _read_tokenizer(found.name, folder if found.name == "turbo" else folder / layout[3])
    tts = _assemble(found.name, t3, s3gen, ve, tokenizer, dev)
    if (folder / "conds.pt").exists():
        conds: Any = found.conditionals
        tts.conds = conds.load(folder / "conds.pt", map_location="cpu").to(str(dev))
    return tts


@contextmanager
def _offline(constants: Any) -> Iterator[None]:
    """The hub used offline (cached files only) while inside: an offline machine fails at once
    instead of waiting on the network."""
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_pretrained(device: str = "cpu", family: str = "standard") -> TTSModel:
    """Upstream ``from_pretrained`` of ``family``, offline (files already in the hub's cache)."""
    from huggingface_hub import constants

    check_device(device)
    fam = FAMILIES[family]
    try:
        with _offline(constants):
            cls: Any = fam.model_class
            model: TTSModel = cls.from_pretrained(device)
            return model
    except Exception as e:  # hub errors have many types; the first line of each says which
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise SourceError(
            f"pretrained Chatterbox {family} weights could not be loaded ({why}). Offline, "
            f"download {', '.join(fam.files)} and conds.pt from {fam.repo} on a connected machine, "
            "copy them into a folder and use load_model('/path/to/folder')"
        ) from e


def is_named(source: str | Path) -> bool:
    """Whether ``source`` names a random-weight build or pretrained weights, not a folder
    (``load_model`` reads names before paths: a folder called ``tiny`` is not loaded as one)."""
    return source in MODELS or source in PRETRAINED


def check_source(source: str | Path) -> None:
    """A SourceError for a name that is no model source and no existing path (before loading)."""
    if is_named(source) or Path(source).exists():
        return
    if isinstance(source, str) and os.sep not in source:
        raise SourceError(
            f"unknown model source {source!r}: use one of {', '.join(SIZES)}, "
            f"{', '.join(PRETRAINED)} or a checkpoint folder"
        )
    raise SourceError(f"checkpoint folder {source} does not exist")


def load_model(source: str | Path, device: str = "cpu", seed: int = 0) -> TTSModel:
    """One entry point: a random-weight build (``MODELS``), ``"pretrained"`` (or
    ``"turbo-pretrained"``, ``"multilingual-pretrained"``) or a checkpoint folder.

    A folder loads as upstream ``from_local`` loads it: every weight in float32, whatever dtype
    it was saved in. The upstream pipeline this returns (``prepare_conditionals``, ``generate``,
    streaming, and ``conds.pt``, always float32) runs only in float32: a float16 or bfloat16
    model fails there on the first dtype mismatch. To run a half-precision export in its own
    dtype use ``PerformanceOptimizedTTS.from_local(folder)`` (its dtype policy casts what must
    match); ``load_folder(folder)`` gives the model with each file's dtype kept."""
    if source in MODELS:
        return build_model(str(source), device, seed)
    if source in PRETRAINED:
        return load_pretrained(device, family=PRETRAINED[str(source)])
    if isinstance(source, str) and os.sep not in source:
        check_source(source)
    return load_folder(Path(source), device, keep_dtype=False)


def model_summary(tts: TTSModel) -> dict[str, dict[str, object]]:
    """Parameters and dtypes per component (ve, t3, s3gen)."""
    out: dict[str, dict[str, object]] = {}
    for name, module in components(tts).items():
        params = list(module.parameters())
        out[name] = {
            "parameters": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "dtypes": sorted({dtype_name(p.dtype) for p in params}),
        }
    return out


# ---------------------------------------------------------------- reference voice


def make_reference_wav(path: str | Path, seconds: float = 10.0, sr: int = SAMPLE_RATE, seed: int = 0) -> Path:
    """Write a deterministic voice-like signal: harmonics of a gliding pitch under formant
    peaks, syllable envelopes and pauses. Enough to drive the real conditioning path."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.4 * t) + 10 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = [(700, 130), (1220, 70), (2600, 160)]
    wav = np.zeros(n)
    for k in range(1, 30):
        fk = k * f0
        gain = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in formants) + 0.3 / k
        wav += gain * np.sin(k * phase)
    syllable = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t))  # ~4 syllables per second
    pauses = np.ones(n)
    for start in rng.uniform(0, seconds - 0.5, size=max(1, int(seconds / 3))):
        pauses[int(start * sr) : int((start + 0.35) * sr)] = 0.0
    wav = wav * syllable * pauses + 0.003 * rng.standard_normal(n)
    wav = 0.5 * wav / max(1e-9, float(np.abs(wav).max()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed: a process reading the same path (notebooks run side by side)
    # sees the old file or the new one, never half of one.
    partial = _beside(path, "partial")
    sf.write(str(partial), wav.astype(np.float32), sr, format="WAV")
    os.replace(partial, path)
    return path


@dataclass
class ReferenceInfo:
    """What was done to a user's reference audio before conditioning."""

    path: str
    seconds: float
    sample_rate: int
    channels: int
    notes: list[str]


def check_reference(path: str | Path) -> ReferenceInfo:
    """Validate reference audio; raise SourceError naming the problem.

    Stereo and other sample rates are accepted (upstream's librosa.load mixes to mono and
    resamples); the returned notes say so.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"reference audio {path} does not exist")
    try:
        data, sr = sf.read(str(path), always_2d=True, dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as e:
        raise SourceError(
            f"reference audio {path} is not a readable audio file ({e}); give a WAV/FLAC file"
        ) from e
    if data.shape[0] == 0:
        raise SourceError(f"reference audio {path} is empty (0 samples); give at least 3 s of speech")
    if not np.any(data):
        raise SourceError(f"reference audio {path} is all zeros (silence); give a recording of speech")
    if not np.all(np.isfinite(data)):
        raise SourceError(f"reference audio {path} contains NaN or infinite samples")
    notes = []
    if data.shape[1] > 1:
        notes.append(f"mixed {data.shape[1]} channels to mono")
    if sr != SAMPLE_RATE:
        notes.append(f"resampled {sr} Hz to {SAMPLE_RATE} Hz (S3Gen) and 16000 Hz (tokenizer, voice encoder)")
    seconds = data.shape[0] / sr
    if seconds < MIN_REFERENCE_S:
        raise SourceError(
            f"reference audio {path} is too short ({seconds:.2f} s, under {MIN_REFERENCE_S} s); "
            "give at least 3 s of speech"
        )
    if seconds < 1.0:
        notes.append(f"only {seconds:.2f} s long: conditioning quality will suffer")
    return ReferenceInfo(str(path), round(seconds, 3), sr, data.shape[1], notes)
