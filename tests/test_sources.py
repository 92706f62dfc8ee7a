"""Model sources: tiny/random builds of upstream classes, checkpoint folders, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.tts import ChatterboxTTS
from safetensors.torch import load_file, save_file

from tts_workbench.core.errors import SourceError
from tts_workbench.models.sources import (
    build_tokenizer_json,
    check_reference,
    load_folder,
    load_model,
    save_checkpoint,
)
from tts_workbench.runtime.generation import prepare_voice
from tts_workbench.runtime.streaming import SAMPLES_PER_TOKEN, StreamConfig, stream_all


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def test_tiny_is_the_upstream_classes() -> None:
    tts = load_model("tiny", seed=3)
    assert isinstance(tts, ChatterboxTTS)
    assert isinstance(tts.t3, T3) and isinstance(tts.s3gen, S3Gen) and isinstance(tts.ve, VoiceEncoder)
    assert tts.t3.cfg.num_hidden_layers == 2 and tts.t3.cfg.hidden_size == 256
    assert sum(p.numel() for p in tts.s3gen.parameters()) < 30e6  # full S3Gen: 264 M


def test_small_backbones_leave_upstream_llama_configs_unchanged(tmp_path: Path) -> None:
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    before = dict(LLAMA_CONFIGS)
    deep = load_model("deep-narrow")
    assert deep.t3.cfg.num_hidden_layers == 30 and deep.t3.cfg.hidden_size == 64
    assert load_model(str(save_checkpoint(deep, tmp_path / "dn"))).t3.cfg.num_hidden_layers == 30
    assert LLAMA_CONFIGS == before  # registered only while T3 is built


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    w = "tfmr.layers.0.self_attn.q_proj.weight"
    assert torch.equal(_params(a.t3)[w], _params(b.t3)[w])
    assert not torch.equal(_params(a.t3)[w], _params(c.t3)[w])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_checkpoint_round_trip_is_exact_and_keeps_dtype(
    tiny_tts: ChatterboxTTS, tmp_path: Path, dtype: torch.dtype
) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt", dtype=dtype)
    meta = json.loads((folder / "tts_workbench.json").read_text())
    assert meta["dtypes"]["t3_cfg"] == str(dtype).removeprefix("torch.")
    loaded = load_folder(str(folder))  # keep_dtype=True (load_model loads as upstream: float32)
    for name in ("t3", "s3gen", "ve"):
        before, after = _params(getattr(tiny_tts, name)), _params(getattr(loaded, name))
        for k, v in before.items():
            if k in after and v.is_floating_point():
                assert after[k].dtype == dtype, k
                assert torch.equal(after[k], v.to(dtype)), k
    assert loaded.conds is not None  # conds.pt travels with the checkpoint


def test_upstream_style_load_silently_upcasts_float16(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "half", dtype=torch.float16)
    upstream_like = load_folder(folder, keep_dtype=False)
    assert {p.dtype for p in upstream_like.t3.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_model_upcasts_a_half_checkpoint_so_it_runs(
    tiny_tts: ChatterboxTTS, tmp_path: Path, reference_wav: Path, dtype: torch.dtype
) -> None:
    # Before, load_model kept the half dtype: streaming the saved voice (conds.pt is float32)
    # failed on a dtype mismatch, and prepare_voice failed in S3Gen's fbank.
    folder = save_checkpoint(tiny_tts, tmp_path / "half", dtype=dtype)
    loaded = load_model(str(folder))
    wav, state = stream_all(loaded, "Hi there.", StreamConfig("buffered"), max_new_tokens=10)  # saved voice
    assert len(wav) == len(state.tokens) * SAMPLES_PER_TOKEN > 0 and np.isfinite(wav).all()
    for name in ("t3", "s3gen", "ve"):
        before, after = _params(getattr(tiny_tts, name)), _params(getattr(loaded, name))
        for k, v in before.items():
            if k in after and v.is_floating_point():
                assert after[k].dtype == torch.float32, k
                assert torch.equal(after[k], v.to(dtype).float()), k  # the saved values, upcast
    prepare_voice(loaded, str(reference_wav))  # and a new voice


def test_pt_layout_of_the_streaming_fork(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    for name in ("ve", "t3_cfg", "s3gen"):
        torch.save(load_file(str(folder / f"{name}.safetensors")), folder / f"{name}.pt")
        (folder / f"{name}.safetensors").unlink()
    loaded = load_model(str(folder))
    w = "speech_head.weight"
    assert torch.equal(_params(loaded.t3)[w], _params(tiny_tts.t3)[w])


def test_a_weights_file_is_not_a_folder(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    with pytest.raises(SourceError, match="t3_cfg.safetensors is a file; give the folder that holds it"):
        load_model(str(folder / "t3_cfg.safetensors"))  # before: "does not exist"


@pytest.mark.parametrize("seconds", [0.02, 0.3])
def test_too_short_reference_is_refused_before_conditioning(
    tiny_tts: ChatterboxTTS, tmp_path: Path, seconds: float
) -> None:
    # Before, 0.02 s passed check_reference and prepare_voice failed in torch's padding.
    path = tmp_path / "short.wav"
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(int(seconds * 24000)), 24000)
    with pytest.raises(SourceError, match=f"too short \\({seconds:.2f} s.*give at least 3 s of speech"):
        check_reference(path)
    with pytest.raises(SourceError, match="too short"):
        prepare_voice(tiny_tts, str(path))
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(12000), 24000)  # 0.5 s
    assert any("only 0.50 s long" in note for note in check_reference(path).notes)  # accepted


def test_unknown_source() -> None:
    with pytest.raises(SourceError, match="unknown model source 'tinyy'"):
        load_model("tinyy")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_folder_missing_one_file_names_it(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    (folder / "s3gen.safetensors").unlink()
    with pytest.raises(SourceError, match="missing s3gen.safetensors"):
        load_model(str(folder))


def test_truncated_safetensors(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    data = (folder / "t3_cfg.safetensors").read_bytes()
    (folder / "t3_cfg.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="cannot read t3_cfg.safetensors.*truncated"):
        load_model(str(folder))


def test_weights_of_another_architecture(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    state = load_file(str(folder / "t3_cfg.safetensors"))
    state["speech_head.weight"] = torch.zeros(8194, 1024)
    save_file(state, str(folder / "t3_cfg.safetensors"))
    with pytest.raises(SourceError, match="do not fit the standard tiny architecture"):
        load_model(str(folder))


def test_tokenizer_ids_beyond_text_vocabulary(tiny_tts: ChatterboxTTS, tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_tts, tmp_path / "ckpt")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zz"] = 900
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SourceError, match="token id 900.*704 entries"):
        load_model(str(folder))


def test_tokenizer_follows_upstream_special_ids(tmp_path: Path) -> None:
    from chatterbox.models.tokenizers import EnTokenizer

    tok = EnTokenizer(str(build_tokenizer_json(tmp_path / "tokenizer.json")))
    vocab = tok.tokenizer.get_vocab()
    assert vocab["[START]"] == 255 and vocab["[STOP]"] == 0
    ids = tok.encode("Hello, world.")
    assert len(ids) == 13 and max(ids) < 704
    assert tok.decode(ids) == "Hello, world."


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda() -> None:
    with pytest.raises(SourceError, match="CUDA is not available.*use device='cpu'"):
        load_model("tiny", device="cuda")


def test_pretrained_offline_fails_at_once_and_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = c.HF_HUB_OFFLINE
    with pytest.raises(SourceError, match="load_model\\('/path/to/folder'\\)") as e:
        load_model("pretrained")
    assert c.HF_HUB_OFFLINE == before  # offline only during the call
    # the hub's own reason is named (its type and first line), not only "not available"
    cause = e.value.__cause__
    assert cause is not None and f"({type(cause).__name__}: {str(cause).splitlines()[0]}" in str(e.value)


def test_building_a_model_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)  # the caller's draws go on as if nothing was built
    b = load_model("tiny", seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.t3.parameters(), b.t3.parameters(), strict=True))
