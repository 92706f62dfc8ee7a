"""Where a ChatterboxTTS comes from.

Every source returns an upstream ``chatterbox.tts.ChatterboxTTS`` built from the upstream classes
(T3, S3Gen, VoiceEncoder, EnTokenizer). No weights can be downloaded here, so besides the real
loaders (``from_local``/``from_pretrained``) there are two random-weight builds:

- ``"tiny"``: the same classes with small widths and depths, for tests (builds in seconds);
- ``"deep-narrow"``: T3 at its full depth (30 layers) but 64 wide, with the tiny S3Gen: its decode
  step costs almost only per-layer dispatch overhead on a CPU, as the full model's step does on a
  GPU, so it stands in for a host-bound GPU step on machines without one;
- ``"random"``: the full-size architecture, for realistic compute and memory.

Random weights never emit T3's stop token: generation must be capped (see ``generation.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
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
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.models.t3.modules.perceiver import Perceiver
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.tokenizers import EnTokenizer
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.tts import ChatterboxTTS, Conditionals
from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .constants import SAMPLE_RATE, dtype_name
from .errors import SourceError
from .patching import scoped_item

TEXT_VOCAB = 704  # T3Config.english_only().text_tokens_dict_size
METADATA_FILE = "tts_workbench.json"
SAFETENSORS_LAYOUT = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json")
PT_LAYOUT = ("ve.pt", "t3_cfg.pt", "s3gen.pt", "tokenizer.json")  # chatterbox-streaming fork


def components(tts: ChatterboxTTS) -> dict[str, torch.nn.Module]:
    """The three neural components of a ChatterboxTTS, by the names used in reports."""
    return {"ve": tts.ve, "t3": tts.t3, "s3gen": tts.s3gen}


@dataclass(frozen=True)
class TinyConfig:
    """Reduced sizes for the ``tiny`` build. Same classes as upstream, smaller numbers."""

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
TINY_LLAMA = "Llama_tiny"
SIZES = ("tiny", "deep-narrow", "random")


def _llama_config(cfg: TinyConfig) -> dict[str, Any]:
    return {
        **LLAMA_CONFIGS["Llama_520M"],
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


def _tiny_t3(cfg: TinyConfig) -> T3:
    hp = T3Config.english_only()
    hp.llama_config_name = TINY_LLAMA
    # T3 reads the backbone size from upstream's LLAMA_CONFIGS by name (only while it is built),
    # so the small backbone is registered there for the construction and removed again.
    with scoped_item(LLAMA_CONFIGS, TINY_LLAMA, _llama_config(cfg)):
        t3 = T3(hp)
    # The conditioning Perceiver hard-codes width 1024; rebuild it at the backbone width.
    t3.cond_enc.perceiver = Perceiver(
        pre_attention_query_size=cfg.t3_hidden, embedding_dim=cfg.t3_hidden, num_attn_heads=4
    )
    return t3


def _tiny_s3gen(cfg: TinyConfig) -> S3Gen:
    # Build the full skeleton without paying for its random init, then replace every large
    # submodule by the same class at a smaller size (initialised normally, from the seed).
    from transformers.initialization import no_init_weights

    with no_init_weights():
        s3 = S3Gen()
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


def build_tokenizer_json(path: Path) -> Path:
    """Write a character-level ``tokenizer.json`` that upstream ``EnTokenizer`` can read.

    Ids follow upstream conventions: ``[STOP]`` = 0 and ``[START]`` = 255 (T3Config's stop and
    start text tokens), every id below T3's text vocabulary of 704.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    specials = ["[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)] + list("àâçéèêëîïôûùüÿñæœ’“”—–…")
    tokens = specials + chars
    # Fill up to [START]=255 so the id space has no holes (tokenizers warns about holes).
    tokens += [f"[unused{i}]" for i in range(len(tokens), 255)] + ["[START]"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Split("", behavior="isolated")  # one token per character
    tok.add_special_tokens(specials + ["[START]"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _assemble(t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer_json: Path, dev: torch.device):
    tokenizer = EnTokenizer(str(tokenizer_json))
    _check_tokenizer(tokenizer, t3.hp.text_tokens_dict_size, tokenizer_json)
    return ChatterboxTTS(t3.to(dev).eval(), s3gen.to(dev).eval(), ve.to(dev).eval(), tokenizer, str(dev))


def _default_tokenizer() -> Path:
    path = Path(os.environ.get("TTS_WORKBENCH_CACHE", Path.home() / ".cache" / "tts_workbench"))
    path = path / "tokenizer.json"
    return path if path.exists() else build_tokenizer_json(path)


def build_model(size: str, device: str = "cpu", seed: int = 0) -> ChatterboxTTS:
    """Random-weight ChatterboxTTS: ``size`` is ``"tiny"``, ``"deep-narrow"`` or ``"random"``."""
    dev = check_device(device)
    torch.manual_seed(seed)
    if size == "tiny":
        t3, s3gen = _tiny_t3(TINY), _tiny_s3gen(TINY)
    elif size == "deep-narrow":
        t3, s3gen = _tiny_t3(DEEP_NARROW), _tiny_s3gen(TINY)
    elif size == "random":
        t3, s3gen = T3(), S3Gen()
    else:
        raise SourceError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    return _assemble(t3, s3gen, VoiceEncoder(), _default_tokenizer(), dev)


# ---------------------------------------------------------------- checkpoint folders


def save_checkpoint(tts: ChatterboxTTS, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``tts`` in the upstream ``from_local`` layout, floating tensors cast to ``dtype``.

    A ``tts_workbench.json`` beside the weights names the architecture and each file's dtype.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"ve": tts.ve, "t3_cfg": tts.t3, "s3gen": tts.s3gen}
    for name, module in parts.items():
        state = {
            k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in module.state_dict().items()
            # After a first inference upstream T3 keeps `patched_model`, a second view of the
            # same weights; upstream checkpoints do not contain it.
            if not k.startswith("patched_model.")
        }
        save_file(state, str(folder / f"{name}.safetensors"))
    tts.tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    if tts.conds is not None:
        tts.conds.save(folder / "conds.pt")
    meta = {
        "architecture": "tiny" if tts.t3.hp.llama_config_name == TINY_LLAMA else "full",
        "tiny_config": asdict(_config_of(tts.t3)),
        "dtypes": {name: dtype_name(dtype) for name in parts},
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def _config_of(t3: T3) -> TinyConfig:
    """The TinyConfig a small T3 was built with (its S3Gen sizes are always ``TINY``'s)."""
    c = t3.cfg
    return TinyConfig(
        t3_layers=c.num_hidden_layers,
        t3_hidden=c.hidden_size,
        t3_heads=c.num_attention_heads,
        t3_intermediate=c.intermediate_size,
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise SourceError(
            f"cannot read {path.name} in {path.parent}: {e}. The file is truncated or not a "
            "checkpoint; copy it again or re-export it with save_checkpoint()"
        ) from e


def _check_tokenizer(tok: EnTokenizer, vocab: int, path: Path) -> None:
    top = max(tok.tokenizer.get_vocab().values())
    if top >= vocab:
        raise SourceError(
            f"{path} has token id {top}, but T3's text vocabulary has {vocab} entries (ids 0..{vocab - 1}); "
            "use the tokenizer.json that was saved with these weights"
        )


def _folder_layout(folder: Path) -> tuple[str, ...]:
    if not folder.is_dir():
        raise SourceError(
            f"model folder {folder} does not exist: give a folder written by save_checkpoint() "
            "or by the upstream from_local layout"
        )
    for layout in (SAFETENSORS_LAYOUT, PT_LAYOUT):
        if (folder / layout[0]).exists() or (folder / layout[1]).exists():
            missing = [f for f in layout if not (folder / f).exists()]
            if missing:
                raise SourceError(f"model folder {folder} is missing {', '.join(missing)}")
            return layout
    raise SourceError(
        f"model folder {folder} has neither {', '.join(SAFETENSORS_LAYOUT)} nor {', '.join(PT_LAYOUT)}"
    )


def load_folder(folder: str | Path, device: str = "cpu", keep_dtype: bool = True) -> ChatterboxTTS:
    """Load a checkpoint folder (safetensors or the fork's ``.pt`` layout).

    ``keep_dtype=True`` keeps each tensor's saved dtype (a float16 file stays float16).
    ``keep_dtype=False`` loads the way upstream ``ChatterboxTTS.from_local`` does:
    ``load_state_dict`` copies into freshly built float32 parameters, so a float16 checkpoint
    silently comes back as float32.
    """
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    dev = check_device(device)
    layout = _folder_layout(folder)
    meta_path = folder / METADATA_FILE
    meta: dict[str, Any] = (
        json.loads(meta_path.read_text()) if meta_path.exists() else {"architecture": "full"}
    )
    states = {name: _read_state(folder / name) for name in layout[:3]}
    with no_init_weights():  # every weight is overwritten below
        if meta["architecture"] == "tiny":
            cfg = TinyConfig(**meta.get("tiny_config", {}))
            t3, s3gen = _tiny_t3(cfg), _tiny_s3gen(cfg)
        else:
            t3, s3gen = T3(), S3Gen()
        ve = VoiceEncoder()
    t3_state: Any = states[layout[1]]
    if "model" in t3_state:  # upstream from_local accepts this wrapped form too
        t3_state = t3_state["model"][0]
    for module, state, strict in (
        (ve, states[layout[0]], True),
        (t3, t3_state, True),
        (s3gen, states[layout[2]], False),
    ):
        try:
            module.load_state_dict(state, strict=strict, assign=keep_dtype)
        except RuntimeError as e:
            raise SourceError(
                f"weights in {folder} do not fit the {meta['architecture']} architecture: "
                f"{str(e).splitlines()[0]}"
            ) from e
    tts = _assemble(t3, s3gen, ve, folder / "tokenizer.json", dev)
    if (folder / "conds.pt").exists():
        tts.conds = Conditionals.load(folder / "conds.pt", map_location="cpu").to(str(dev))
    return tts


def load_pretrained(device: str = "cpu", allow_download: bool = False) -> ChatterboxTTS:
    """Upstream ``ChatterboxTTS.from_pretrained``.

    Without ``allow_download`` the hub is used offline (cached files only), so an offline
    machine fails at once instead of waiting on the network.
    """
    from huggingface_hub import constants

    check_device(device)
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not allow_download
    try:
        return ChatterboxTTS.from_pretrained(device)
    except Exception as e:  # hub errors have many types; all mean "weights not available"
        raise SourceError(
            f"pretrained Chatterbox weights are not available ({type(e).__name__}). Offline, "
            "download ve.safetensors, t3_cfg.safetensors, s3gen.safetensors, tokenizer.json and "
            "conds.pt from ResembleAI/chatterbox on a connected machine, copy them into a folder "
            "and use load_model('/path/to/folder')"
        ) from e
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_model(source: str | Path, device: str = "cpu", seed: int = 0) -> ChatterboxTTS:
    """One entry point: ``"tiny"``, ``"deep-narrow"``, ``"random"``, ``"pretrained"`` or a
    checkpoint folder."""
    if source in SIZES:
        return build_model(str(source), device, seed)
    if source == "pretrained":
        return load_pretrained(device)
    path = Path(source)
    if isinstance(source, str) and os.sep not in source and not path.exists():
        raise SourceError(
            f"unknown model source {source!r}: use one of {', '.join(SIZES)}, 'pretrained' "
            "or a checkpoint folder"
        )
    return load_folder(path, device)


def model_summary(tts: ChatterboxTTS) -> dict[str, dict[str, object]]:
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
    sf.write(str(path), wav.astype(np.float32), sr)
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
    if seconds < 1.0:
        notes.append(f"only {seconds:.2f} s long: conditioning quality will suffer")
    return ReferenceInfo(str(path), round(seconds, 3), sr, data.shape[1], notes)
